//! Start-up clean-up of what an interrupted upload or deletion left in the prompts folder.
//!
//! [`super::Registry::put`] writes the new version into `.NAME.upload-NONCE`, renames the
//! served `NAME` to `.NAME.old-NONCE`, renames the staging folder to `NAME`, then removes the
//! old one; [`super::Registry::delete`] renames `NAME` to `.NAME.deleted-NONCE`, then removes
//! it. A crash can stop the process between any two of these steps, so on start:
//!
//! | left behind | meaning | action |
//! |---|---|---|
//! | `.NAME.upload-*` | never served | removed |
//! | `.NAME.old-*`, no `NAME` | crashed between the two renames: the new version never landed | renamed back to `NAME` |
//! | `.NAME.old-*` next to `NAME` | the new version landed | removed |
//! | `.NAME.deleted-*` | deleted | removed |

use super::valid_name;
use std::path::Path;

/// What an interrupted step left: see the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leftover {
    Upload,
    Old,
    Deleted,
}

impl Leftover {
    fn left_by(self) -> &'static str {
        match self {
            Leftover::Upload => "an interrupted upload",
            Leftover::Old => "a replacement that landed",
            Leftover::Deleted => "an interrupted deletion",
        }
    }

    const ALL: [(Leftover, &'static str); 3] =
        [(Leftover::Upload, ".upload-"), (Leftover::Old, ".old-"), (Leftover::Deleted, ".deleted-")];
}

/// The staging, replaced or deleted folder name of task `name` (`.NAME.KIND-NONCE`).
pub(super) fn upload_dir(name: &str, nonce: &str) -> String {
    format!(".{name}.upload-{nonce}")
}

pub(super) fn old_dir(name: &str, nonce: &str) -> String {
    format!(".{name}.old-{nonce}")
}

pub(super) fn deleted_dir(name: &str, nonce: &str) -> String {
    format!(".{name}.deleted-{nonce}")
}

/// `(task name, kind)` of a leftover folder name; `None` for anything else.
fn parse(file_name: &str) -> Option<(&str, Leftover)> {
    let rest = file_name.strip_prefix('.')?;
    let (at, kind, _) = Leftover::ALL
        .iter()
        .filter_map(|&(kind, marker)| rest.rfind(marker).map(|at| (at, kind, marker)))
        .max_by_key(|&(at, _, _)| at)?;
    let name = &rest[..at];
    valid_name(name).then_some((name, kind))
}

/// Cleans `dir` up as the module doc says; returns one line per action, for the log.
pub(super) fn recover(dir: &Path) -> Vec<String> {
    let mut actions = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return actions;
    };
    let mut leftovers: Vec<(String, Leftover, std::path::PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file_name = e.file_name().to_string_lossy().into_owned();
            let (name, kind) = parse(&file_name)?;
            Some((name.to_string(), kind, e.path()))
        })
        .collect();
    leftovers.sort_by(|a, b| a.2.cmp(&b.2));
    for (name, kind, path) in leftovers {
        let target = dir.join(&name);
        if kind == Leftover::Old && !target.exists() {
            match std::fs::rename(&path, &target) {
                Ok(()) => {
                    actions.push(format!("restored task `{name}` from {} (its replacement never landed)", path.display()));
                    continue;
                }
                Err(e) => actions.push(format!("could not restore {} as `{name}`: {e}", path.display())),
            }
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => actions.push(format!("removed {} (left by {})", path.display(), kind.left_by())),
            Err(e) => actions.push(format!("could not remove {}: {e}", path.display())),
        }
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_names_parse() {
        assert_eq!(parse(".sent.upload-12-34"), Some(("sent", Leftover::Upload)));
        assert_eq!(parse(".a.old-b.old-1"), Some(("a.old-b", Leftover::Old)));
        assert_eq!(parse(".x.deleted-9"), Some(("x", Leftover::Deleted)));
        assert_eq!(parse("sent"), None);
        assert_eq!(parse(".hidden"), None);
        assert_eq!(parse("..upload-1"), None);
    }
}
