//! `read_file`: numbered lines of a text file, or the listing of a directory.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader};
use std::path::Path;

use agentplane_schema::tool::{ReadFileArgs, ToolLimits};

use crate::error::ToolError;
use crate::path::Workspace;

/// How much of a file is looked at to decide it is binary (git uses the same 8 KiB).
const BINARY_SNIFF_BYTES: usize = 8 * 1024;

pub(crate) fn read_file(workspace: &Workspace, limits: &ToolLimits, args: &ReadFileArgs) -> Result<String, ToolError> {
    let relative = workspace.resolve(&args.path)?;
    let metadata =
        workspace.dir().metadata(&relative).map_err(|err| ToolError::io(format!("cannot read {}", args.path), err))?;
    let first = args.offset.unwrap_or(1).max(1);
    let limit = args.limit.unwrap_or(limits.read_default_limit_lines).max(1);
    if metadata.is_dir() {
        list_dir(workspace, &relative, &args.path, first, limit)
    } else if metadata.is_file() {
        read_lines(workspace, &relative, &args.path, first, limit, limits.read_max_line_chars)
    } else {
        // A FIFO or device would block or never end.
        Err(ToolError::Rejected(format!("{} is not a regular file or directory", args.path)))
    }
}

fn read_lines(
    workspace: &Workspace,
    relative: &Path,
    shown_path: &str,
    first: usize,
    limit: usize,
    max_line_chars: usize,
) -> Result<String, ToolError> {
    let context = || format!("cannot read {shown_path}");
    let file = workspace.dir().open(relative).map_err(|err| ToolError::io(context(), err))?.into_std();
    let size = file.metadata().map(|meta| meta.len()).unwrap_or(0);
    let mut reader = BufReader::with_capacity(BINARY_SNIFF_BYTES, file);
    let start = reader.fill_buf().map_err(|err| ToolError::io(context(), err))?;
    if start.contains(&0) {
        return Ok(format!(
            "{shown_path} is a binary file ({size} bytes); its content is not shown. \
             Use execute with a suitable tool (file, xxd, …) to inspect it."
        ));
    }

    let last = first.saturating_add(limit - 1);
    let mut out = String::new();
    let mut line = Vec::new();
    let mut count = 0usize;
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).map_err(|err| ToolError::io(context(), err))?;
        if read == 0 {
            break;
        }
        count += 1;
        if (first..=last).contains(&count) {
            push_numbered(&mut out, count, &line, max_line_chars);
        }
    }

    if count == 0 {
        out.push_str("(empty file)");
    } else if first > count {
        let _ = write!(out, "(offset {first} is past the end: {shown_path} has {count} lines)");
    } else {
        let shown_last = last.min(count);
        let _ = write!(out, "(lines {first}-{shown_last} of {count}");
        if shown_last < count {
            let _ = write!(out, "; continue with offset={}", shown_last + 1);
        }
        out.push(')');
    }
    Ok(out)
}

fn push_numbered(out: &mut String, number: usize, line: &[u8], max_chars: usize) {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = String::from_utf8_lossy(line);
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => {
            let total = text.chars().count();
            let _ = writeln!(out, "{number:>6}\t{}… [line cut: {total} characters]", &text[..cut]);
        }
        None => {
            let _ = writeln!(out, "{number:>6}\t{text}");
        }
    }
}

fn list_dir(
    workspace: &Workspace,
    relative: &Path,
    shown_path: &str,
    first: usize,
    limit: usize,
) -> Result<String, ToolError> {
    let entries =
        workspace.dir().read_dir(relative).map_err(|err| ToolError::io(format!("cannot list {shown_path}"), err))?;
    let mut names: Vec<String> = entries
        .map(|entry| {
            let entry = entry?;
            let mut name = entry.file_name().to_string_lossy().into_owned();
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                name.push('/');
            } else if file_type.is_symlink() {
                name.push('@');
            }
            Ok(name)
        })
        .collect::<io::Result<_>>()
        .map_err(|err| ToolError::io(format!("cannot list {shown_path}"), err))?;
    names.sort();

    let total = names.len();
    let mut out = format!("directory {shown_path}:\n");
    for name in names.iter().skip(first - 1).take(limit) {
        let _ = writeln!(out, "{name}");
    }
    if total == 0 {
        out.push_str("(empty directory)");
    } else if first > total {
        let _ = write!(out, "(offset {first} is past the end: {total} entries)");
    } else {
        let shown_last = (first - 1).saturating_add(limit).min(total);
        let _ = write!(out, "(entries {first}-{shown_last} of {total}; `/` marks directories, `@` symlinks)");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use serde_json::json;

    use crate::testing::{call, relay};

    #[tokio::test]
    async fn numbers_lines_and_states_the_range() {
        let (_tmp, relay) = relay();
        std::fs::write(relay.root().join("a.txt"), "one\ntwo\r\nthree").expect("write");
        let result = call(&relay, "read_file", json!({"path": "a.txt"})).await;
        assert!(!result.is_error, "{}", result.output);
        assert_eq!(result.output, "     1\tone\n     2\ttwo\n     3\tthree\n(lines 1-3 of 3)");
    }

    #[tokio::test]
    async fn offset_and_limit_select_a_window() {
        let (_tmp, relay) = relay();
        let text: String = (1..=10).map(|n| format!("line {n}\n")).collect();
        std::fs::write(relay.root().join("a.txt"), text).expect("write");
        let result = call(&relay, "read_file", json!({"path": "a.txt", "offset": 4, "limit": 2})).await;
        assert_eq!(result.output, "     4\tline 4\n     5\tline 5\n(lines 4-5 of 10; continue with offset=6)");
        let past = call(&relay, "read_file", json!({"path": "a.txt", "offset": 11})).await;
        assert!(past.output.contains("past the end"), "{}", past.output);
    }

    #[tokio::test]
    async fn long_lines_are_cut_with_a_marker() {
        let (_tmp, relay) = relay();
        let long = "é".repeat(relay.inner.limits.read_max_line_chars + 5);
        std::fs::write(relay.root().join("long.txt"), &long).expect("write");
        let result = call(&relay, "read_file", json!({"path": "long.txt"})).await;
        let expected_kept = "é".repeat(relay.inner.limits.read_max_line_chars);
        assert!(result.output.contains(&format!("\t{expected_kept}… [line cut: ")), "{}", result.output);
    }

    #[tokio::test]
    async fn directories_are_listed_sorted() {
        let (_tmp, relay) = relay();
        std::fs::create_dir_all(relay.root().join("src/bin")).expect("mkdir");
        std::fs::write(relay.root().join("src/b.rs"), "").expect("write");
        std::fs::write(relay.root().join("src/a.rs"), "").expect("write");
        let result = call(&relay, "read_file", json!({"path": "src"})).await;
        assert!(!result.is_error);
        assert!(result.output.contains("a.rs\nb.rs\nbin/\n(entries 1-3 of 3"), "{}", result.output);
        let root = call(&relay, "read_file", json!({"path": "."})).await;
        assert!(root.output.contains("src/\n"), "{}", root.output);
    }

    #[tokio::test]
    async fn binary_files_are_described_not_dumped() {
        let (_tmp, relay) = relay();
        std::fs::write(relay.root().join("x.bin"), [0x7f, b'E', b'L', b'F', 0, 1, 2]).expect("write");
        let result = call(&relay, "read_file", json!({"path": "x.bin"})).await;
        assert!(!result.is_error);
        assert!(result.output.contains("binary file (7 bytes)"), "{}", result.output);
    }

    #[tokio::test]
    async fn missing_file_is_an_error() {
        let (_tmp, relay) = relay();
        let result = call(&relay, "read_file", json!({"path": "nope.txt"})).await;
        assert!(result.is_error);
        assert_eq!(result.output, "cannot read nope.txt: no such file or directory");
    }

    #[tokio::test]
    async fn escapes_are_refused_and_absolute_inside_accepted() {
        let (_tmp, relay) = relay();
        symlink("/etc", relay.root().join("etc")).expect("symlink");
        symlink("/etc/passwd", relay.root().join("passwd")).expect("symlink");
        for path in ["../x", "/etc/passwd", "etc/passwd", "passwd", "etc"] {
            let result = call(&relay, "read_file", json!({"path": path})).await;
            assert!(result.is_error, "{path}: {}", result.output);
            assert!(result.output.starts_with("path escapes the workspace"), "{path}: {}", result.output);
        }
        std::fs::write(relay.root().join("in.txt"), "hi\n").expect("write");
        let absolute = relay.root().join("in.txt");
        let result = call(&relay, "read_file", json!({"path": absolute})).await;
        assert!(!result.is_error, "{}", result.output);
        assert!(result.output.starts_with("     1\thi\n"));
    }
}
