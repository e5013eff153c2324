//! `write_file`, and the atomic replace that `edit_files` shares: write a temporary file next to
//! the target, then rename it over, so a reader (or a crash) never sees half a file.

use std::io::Write as _;
use std::path::Path;

use cap_std::fs::OpenOptions;

use agentplane_schema::tool::WriteFileArgs;

use crate::error::ToolError;
use crate::path::Workspace;

pub(crate) fn write_file(workspace: &Workspace, args: &WriteFileArgs) -> Result<String, ToolError> {
    let relative = workspace.resolve(&args.path)?;
    replace_atomically(workspace, &relative, args.content.as_bytes())?;
    Ok(format!("wrote {} bytes to {}", args.content.len(), args.path))
}

/// Replaces (or creates, with its parent directories) the file at `relative` with `contents`,
/// keeping an existing file's permission bits. `relative` comes from [`Workspace::resolve`].
pub(crate) fn replace_atomically(workspace: &Workspace, relative: &Path, contents: &[u8]) -> Result<(), ToolError> {
    let dir = workspace.dir();
    let shown = relative.display();
    let parent = match relative.parent() {
        Some(parent) if relative.file_name().is_some() => parent,
        _ => return Err(ToolError::Rejected(format!("{shown} is a directory"))),
    };
    if !parent.as_os_str().is_empty() {
        dir.create_dir_all(parent)
            .map_err(|err| ToolError::io(format!("cannot create the directory {}", parent.display()), err))?;
    }
    let permissions = match dir.metadata(relative) {
        Ok(meta) if meta.is_dir() => {
            return Err(ToolError::Rejected(format!("{shown} is a directory")));
        }
        Ok(meta) => Some(meta.permissions()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(ToolError::io(format!("cannot write {shown}"), err)),
    };

    // A fresh unique name, and create_new, so two writers never share a temporary file.
    let temporary = parent.join(format!(".agentplane-{}.tmp", uuid::Uuid::now_v7().simple()));
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    let mut file =
        dir.open_with(&temporary, &options).map_err(|err| ToolError::io(format!("cannot write {shown}"), err))?;
    let written = (|| {
        file.write_all(contents)?;
        if let Some(permissions) = permissions {
            file.set_permissions(permissions)?;
        }
        file.sync_all()?;
        drop(file);
        dir.rename(&temporary, dir, relative)
    })();
    if let Err(err) = written {
        let _ = dir.remove_file(&temporary);
        return Err(ToolError::io(format!("cannot write {shown}"), err));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use serde_json::json;

    use crate::testing::{call, relay};

    #[tokio::test]
    async fn creates_parents_and_reports_bytes() {
        let (_tmp, relay) = relay();
        let result = call(&relay, "write_file", json!({"path": "a/b/c.txt", "content": "héllo\n"})).await;
        assert!(!result.is_error, "{}", result.output);
        assert_eq!(result.output, "wrote 7 bytes to a/b/c.txt");
        assert_eq!(std::fs::read_to_string(relay.root().join("a/b/c.txt")).expect("read"), "héllo\n");
    }

    #[tokio::test]
    async fn replaces_keeping_the_mode_and_leaves_no_temporary() {
        let (_tmp, relay) = relay();
        let path = relay.root().join("run.sh");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        let result = call(&relay, "write_file", json!({"path": "run.sh", "content": "#!/bin/sh\n"})).await;
        assert!(!result.is_error, "{}", result.output);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "#!/bin/sh\n");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o750);
        let names: Vec<_> = std::fs::read_dir(relay.root()).expect("ls").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("run.sh")]);
    }

    #[tokio::test]
    async fn a_directory_is_not_overwritten() {
        let (_tmp, relay) = relay();
        std::fs::create_dir(relay.root().join("d")).expect("mkdir");
        for path in ["d", "."] {
            let result = call(&relay, "write_file", json!({"path": path, "content": "x"})).await;
            assert!(result.is_error);
            assert!(result.output.ends_with("is a directory"), "{}", result.output);
        }
    }

    #[tokio::test]
    async fn escapes_are_refused() {
        let (tmp, relay) = relay();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        symlink(&outside, relay.root().join("out")).expect("symlink");
        symlink(outside.join("f.txt"), relay.root().join("dangling")).expect("symlink");
        for path in ["../x.txt", "out/f.txt", "out/new/f.txt", "dangling", "/tmp/x.txt"] {
            let result = call(&relay, "write_file", json!({"path": path, "content": "x"})).await;
            assert!(result.is_error, "{path}");
            assert!(result.output.starts_with("path escapes the workspace"), "{path}: {}", result.output);
        }
        assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 0);
        assert!(!tmp.path().join("x.txt").exists());
    }

    #[tokio::test]
    async fn symlinks_inside_write_their_target() {
        let (_tmp, relay) = relay();
        std::fs::write(relay.root().join("real.txt"), "old").expect("write");
        symlink("real.txt", relay.root().join("link.txt")).expect("symlink");
        let result = call(&relay, "write_file", json!({"path": "link.txt", "content": "new"})).await;
        assert!(!result.is_error, "{}", result.output);
        assert_eq!(std::fs::read_to_string(relay.root().join("real.txt")).expect("read"), "new");
        assert!(std::fs::symlink_metadata(relay.root().join("link.txt")).expect("meta").file_type().is_symlink());
    }
}
