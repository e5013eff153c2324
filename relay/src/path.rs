//! Confinement: turning a path the model wrote into one beneath the workspace root.
//!
//! Two layers guard every file tool. [`Workspace::resolve`] walks the requested path one
//! component at a time, following symlinks itself, and refuses (with a message the model can act
//! on) anything that would leave the root: `..` past the top, absolute paths elsewhere, symlinks
//! pointing outside. The path it returns has no symlinks left in its existing part, so the file
//! tools then open it through a `cap_std` [`Dir`] for the root, which refuses escapes in the
//! kernel-facing layer too — a symlink swapped in between the check and the open (by a concurrent
//! `execute`, say) still cannot lead out.

use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::Dir;

use crate::error::ToolError;

/// Matches Linux's MAXSYMLINKS: a chain longer than this is a loop for all practical purposes.
const MAX_SYMLINK_HOPS: usize = 40;

/// The workspace root, opened once.
pub(crate) struct Workspace {
    /// Canonical (symlink-free, absolute) root.
    root: PathBuf,
    /// The root as the caller spelled it, made absolute; absolute paths may use either form.
    given_root: PathBuf,
    dir: Dir,
}

enum Step {
    Parent,
    Name(OsString),
}

impl Workspace {
    /// Opens `root`, creating it if missing.
    pub(crate) fn open(root: PathBuf) -> io::Result<Workspace> {
        std::fs::create_dir_all(&root)?;
        let given_root = std::path::absolute(&root)?;
        let root = root.canonicalize()?;
        let dir = Dir::open_ambient_dir(&root, ambient_authority())?;
        Ok(Workspace { root, given_root, dir })
    }

    /// The canonical root.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The root as a capability: every open through it stays beneath the root.
    pub(crate) fn dir(&self) -> &Dir {
        &self.dir
    }

    /// Maps `requested` to a path relative to the root (`.` for the root itself) in which every
    /// existing symlink has been followed, or refuses it if it would leave the root. Components
    /// that do not exist yet are kept as written, so the result also names files to be created.
    pub(crate) fn resolve(&self, requested: &str) -> Result<PathBuf, ToolError> {
        // The kernel would stop at the NUL and answer "invalid argument"; say what is wrong.
        if requested.contains('\0') {
            return Err(ToolError::Rejected(format!("{requested:?} contains a NUL byte, which no path may hold")));
        }
        let requested_path = Path::new(requested);
        let relative = if requested_path.is_absolute() {
            self.strip_root(requested_path)
                .ok_or_else(|| ToolError::Escape(format!("{requested} is outside the workspace root")))?
        } else {
            requested_path
        };

        let mut pending = Vec::new();
        push_steps(&mut pending, relative);
        let mut resolved = PathBuf::new();
        let mut last_link: Option<PathBuf> = None;
        let mut hops = 0;
        let escape = |last_link: &Option<PathBuf>| match last_link {
            Some(link) => ToolError::Escape(format!(
                "{requested} (through the symlink {}, which points outside the workspace)",
                link.display()
            )),
            None => ToolError::Escape(format!("{requested} goes above the workspace root")),
        };

        while let Some(step) = pending.pop() {
            let name = match step {
                Step::Parent => {
                    if !resolved.pop() {
                        return Err(escape(&last_link));
                    }
                    continue;
                }
                Step::Name(name) => name,
            };
            let candidate = resolved.join(&name);
            let is_symlink = self.dir.symlink_metadata(&candidate).is_ok_and(|meta| meta.file_type().is_symlink());
            if !is_symlink {
                // Missing or not a directory: the operation itself reports that, with its own wording.
                resolved = candidate;
                continue;
            }
            hops += 1;
            if hops > MAX_SYMLINK_HOPS {
                return Err(ToolError::Rejected(format!("{requested}: too many levels of symbolic links")));
            }
            let target = self
                .dir
                .read_link_contents(&candidate)
                .map_err(|err| ToolError::io(format!("cannot read the symlink {}", candidate.display()), err))?;
            last_link = Some(candidate);
            if target.is_absolute() {
                let inside = self.strip_root(&target).ok_or_else(|| escape(&last_link))?;
                resolved.clear();
                push_steps(&mut pending, inside);
            } else {
                push_steps(&mut pending, &target);
            }
        }

        if resolved.as_os_str().is_empty() {
            resolved.push(".");
        }
        Ok(resolved)
    }

    /// Resolves a working directory for `execute` and returns it as an absolute path, checked
    /// again after canonicalization since the shell will use it through the ambient filesystem.
    pub(crate) fn resolve_dir(&self, requested: &str) -> Result<PathBuf, ToolError> {
        let relative = self.resolve(requested)?;
        let absolute = self
            .root
            .join(&relative)
            .canonicalize()
            .map_err(|err| ToolError::io(format!("workdir {requested}"), err))?;
        if !absolute.starts_with(&self.root) {
            return Err(ToolError::Escape(format!("workdir {requested}")));
        }
        if !absolute.is_dir() {
            return Err(ToolError::Rejected(format!("workdir {requested} is not a directory")));
        }
        Ok(absolute)
    }

    fn strip_root<'p>(&self, absolute: &'p Path) -> Option<&'p Path> {
        absolute.strip_prefix(&self.root).or_else(|_| absolute.strip_prefix(&self.given_root)).ok()
    }
}

/// Queues `path`'s components so that popping yields them in order.
fn push_steps(pending: &mut Vec<Step>, path: &Path) {
    let steps = path.components().filter_map(|component| match component {
        Component::ParentDir => Some(Step::Parent),
        Component::Normal(name) => Some(Step::Name(name.to_owned())),
        // Absolute prefixes were stripped by the caller; `.` changes nothing.
        Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
    });
    let steps: Vec<Step> = steps.collect();
    pending.extend(steps.into_iter().rev());
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn workspace() -> (tempfile::TempDir, Workspace) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ws = Workspace::open(tmp.path().join("ws")).expect("open");
        (tmp, ws)
    }

    fn is_escape(result: Result<PathBuf, ToolError>) -> bool {
        matches!(result, Err(ToolError::Escape(_)))
    }

    #[test]
    fn relative_paths_stay_as_written() {
        let (_tmp, ws) = workspace();
        assert_eq!(ws.resolve("a/b.txt").expect("ok"), Path::new("a/b.txt"));
        assert_eq!(ws.resolve("./a/../c").expect("ok"), Path::new("c"));
        assert_eq!(ws.resolve(".").expect("ok"), Path::new("."));
        assert_eq!(ws.resolve("").expect("ok"), Path::new("."));
    }

    #[test]
    fn dot_dot_above_the_root_is_refused() {
        let (_tmp, ws) = workspace();
        assert!(is_escape(ws.resolve("../x")));
        assert!(is_escape(ws.resolve("a/../../x")));
        let message = ws.resolve("../x").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.starts_with("path escapes the workspace"), "{message}");
    }

    #[test]
    fn absolute_paths_only_inside_the_root() {
        let (tmp, ws) = workspace();
        assert!(is_escape(ws.resolve("/etc/passwd")));
        let inside = ws.root().join("src/main.rs");
        assert_eq!(ws.resolve(&inside.to_string_lossy()).expect("ok"), Path::new("src/main.rs"));
        // The spelling the caller used for the root is accepted too.
        let given = tmp.path().join("ws").join("x");
        assert_eq!(ws.resolve(&given.to_string_lossy()).expect("ok"), Path::new("x"));
    }

    #[test]
    fn symlinks_inside_are_followed_and_outside_refused() {
        let (_tmp, ws) = workspace();
        std::fs::create_dir_all(ws.root().join("real/deep")).expect("mkdir");
        symlink("real/deep", ws.root().join("inner")).expect("symlink");
        symlink(ws.root().join("real"), ws.root().join("abs_inner")).expect("symlink");
        symlink("/etc", ws.root().join("etc")).expect("symlink");
        symlink("../..", ws.root().join("real/up")).expect("symlink");
        symlink("loop", ws.root().join("loop")).expect("symlink");

        assert_eq!(ws.resolve("inner/f").expect("ok"), Path::new("real/deep/f"));
        assert_eq!(ws.resolve("inner/../g").expect("ok"), Path::new("real/g"));
        assert_eq!(ws.resolve("abs_inner/deep").expect("ok"), Path::new("real/deep"));
        assert!(is_escape(ws.resolve("etc/passwd")));
        assert!(is_escape(ws.resolve("etc")));
        assert!(is_escape(ws.resolve("real/up/x")));
        assert!(matches!(ws.resolve("loop/x"), Err(ToolError::Rejected(_))));
    }

    #[test]
    fn workdir_must_be_a_directory_inside() {
        let (_tmp, ws) = workspace();
        std::fs::create_dir_all(ws.root().join("sub")).expect("mkdir");
        symlink("/tmp", ws.root().join("tmp")).expect("symlink");
        assert_eq!(ws.resolve_dir("sub").expect("ok"), ws.root().join("sub"));
        assert!(is_escape(ws.resolve_dir("..")));
        assert!(is_escape(ws.resolve_dir("tmp")));
        assert!(ws.resolve_dir("missing").is_err());
    }
}
