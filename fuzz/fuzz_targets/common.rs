//! Shared by the fuzz targets: the loaders read files, so each input is written to a scratch
//! folder: `$SOFTPROMPT_FUZZ_SCRATCH` when set (scripts/fuzz.sh sets it and removes it after),
//! else one in /dev/shm when there is one (to keep the disk out of the loop).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A scratch folder private to this process, made on first use.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("SOFTPROMPT_FUZZ_SCRATCH") {
            let dir = PathBuf::from(dir).join(std::process::id().to_string());
            std::fs::create_dir_all(&dir).expect("create the fuzz scratch folder");
            return dir;
        }
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let dir = base.join(format!("softprompt-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz scratch folder");
        dir
    })
}

/// Writes `bytes` to `name` in the scratch folder and returns its path.
#[allow(dead_code)] // not every target reads a single file
pub fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).expect("write a fuzz input");
    path
}
