//! `edit_files`: search-and-replace edits across files, all or nothing.
//!
//! Every edit is applied in memory first, in order (so later edits to a file see earlier ones);
//! only when all of them matched is any file written. A model that gets one edit wrong then
//! re-reads and retries without having to untangle half-applied changes.

use std::fmt::Write as _;
use std::path::PathBuf;

use similar::TextDiff;

use agentplane_schema::tool::{EditFilesArgs, FileEdit};

use crate::error::ToolError;
use crate::path::Workspace;
use crate::write::replace_atomically;

/// Lines of context around each change in the returned diff.
const DIFF_CONTEXT_LINES: usize = 3;

struct EditedFile {
    relative: PathBuf,
    original: String,
    current: String,
}

pub(crate) fn edit_files(workspace: &Workspace, args: &EditFilesArgs) -> Result<String, ToolError> {
    if args.edits.is_empty() {
        return Err(ToolError::Rejected("edits is empty: give at least one {path, old_text, new_text}".to_owned()));
    }

    let mut files: Vec<EditedFile> = Vec::new();
    for (index, edit) in args.edits.iter().enumerate() {
        let label = format!("edits[{index}] ({})", edit.path);
        if edit.old_text.is_empty() {
            return Err(ToolError::Rejected(format!(
                "{label}: old_text is empty; to create or overwrite a whole file use write_file"
            )));
        }
        let relative = workspace.resolve(&edit.path)?;
        let position = match files.iter().position(|file| file.relative == relative) {
            Some(position) => position,
            None => {
                let original = load(workspace, &relative, &label)?;
                files.push(EditedFile { relative, current: original.clone(), original });
                files.len() - 1
            }
        };
        let file = &mut files[position];
        file.current =
            apply(&file.current, edit).map_err(|reason| ToolError::Rejected(format!("{label}: {reason}")))?;
    }

    let mut out = String::new();
    let mut written: Vec<String> = Vec::new();
    for file in &files {
        let shown = file.relative.display().to_string();
        if file.current == file.original {
            let _ = writeln!(out, "{shown}: no change (new_text equals old_text)");
            continue;
        }
        replace_atomically(workspace, &file.relative, file.current.as_bytes()).map_err(|err| {
            if written.is_empty() {
                err
            } else {
                ToolError::Rejected(format!("{err} (already written: {})", written.join(", ")))
            }
        })?;
        let diff = TextDiff::from_lines(&file.original, &file.current);
        let _ = write!(
            out,
            "{}",
            diff.unified_diff().context_radius(DIFF_CONTEXT_LINES).header(&format!("a/{shown}"), &format!("b/{shown}"))
        );
        written.push(shown);
    }
    Ok(out)
}

fn load(workspace: &Workspace, relative: &std::path::Path, label: &str) -> Result<String, ToolError> {
    let metadata = workspace.dir().metadata(relative).map_err(|err| ToolError::io(label, err))?;
    if !metadata.is_file() {
        return Err(ToolError::Rejected(format!("{label}: not a regular file")));
    }
    let bytes = workspace.dir().read(relative).map_err(|err| ToolError::io(label, err))?;
    String::from_utf8(bytes)
        .map_err(|_| ToolError::Rejected(format!("{label}: the file is not UTF-8 text; use write_file or execute")))
}

/// One edit against the current text: exact match first, then a whitespace-tolerant one.
fn apply(text: &str, edit: &FileEdit) -> Result<String, String> {
    let exact = text.matches(edit.old_text.as_str()).count();
    match exact {
        1 => return Ok(text.replacen(&edit.old_text, &edit.new_text, 1)),
        _ if exact > 1 && edit.replace_all => {
            return Ok(text.replace(&edit.old_text, &edit.new_text));
        }
        _ if exact > 1 => {
            return Err(format!(
                "old_text matches {exact} places; include more surrounding lines to make it unique, or set replace_all"
            ));
        }
        _ => {}
    }

    let matches = tolerant_matches(text, &edit.old_text);
    match matches.len() {
        0 => Err("old_text not found (neither exactly nor ignoring whitespace differences); \
                  read the file again to see its current content"
            .to_owned()),
        1 => Ok(splice(text, &matches, &edit.old_text, &edit.new_text)),
        _ if edit.replace_all => Ok(splice(text, &matches, &edit.old_text, &edit.new_text)),
        n => Err(format!(
            "old_text matches {n} places when ignoring whitespace; include more surrounding lines to make it unique, or set replace_all"
        )),
    }
}

/// A run of whole lines of the text, as byte offsets: from the first line's start to the last
/// line's end (before its line break), plus that first line's indentation.
struct LineMatch {
    start: usize,
    end: usize,
    indent: String,
}

/// Where `old` occurs as whole lines when runs of whitespace are treated as one space and
/// leading/trailing whitespace is ignored (models often get indentation or spacing wrong).
fn tolerant_matches(text: &str, old: &str) -> Vec<LineMatch> {
    let pattern: Vec<String> = old.lines().map(normalize).collect();
    if pattern.iter().all(String::is_empty) {
        return Vec::new();
    }
    let mut lines = Vec::new(); // (start, end) of each line's content
    let mut offset = 0;
    for piece in text.split_inclusive('\n') {
        let content = piece.strip_suffix('\n').unwrap_or(piece);
        let content = content.strip_suffix('\r').unwrap_or(content);
        lines.push((offset, offset + content.len()));
        offset += piece.len();
    }
    let normalized: Vec<String> = lines.iter().map(|&(start, end)| normalize(&text[start..end])).collect();

    let mut found = Vec::new();
    let mut index = 0;
    while index + pattern.len() <= lines.len() {
        if normalized[index..index + pattern.len()] == pattern[..] {
            let (start, line_end) = lines[index];
            let indent_len = text[start..line_end].len() - text[start..line_end].trim_start().len();
            found.push(LineMatch {
                start,
                end: lines[index + pattern.len() - 1].1,
                indent: text[start..start + indent_len].to_owned(),
            });
            index += pattern.len();
        } else {
            index += 1;
        }
    }
    found
}

fn normalize(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Replaces each tolerant match with `new`. The match ends before its last line break, so a
/// trailing line break in `new` that mirrors one in `old` is dropped; and when the file is
/// indented deeper than `old` was, `new` is shifted by the same amount so the result lines up.
fn splice(text: &str, matches: &[LineMatch], old: &str, new: &str) -> String {
    let new = if old.ends_with('\n') {
        new.strip_suffix('\n').map(|n| n.strip_suffix('\r').unwrap_or(n)).unwrap_or(new)
    } else {
        new
    };
    let old_indent = old.lines().next().map(|line| &line[..line.len() - line.trim_start().len()]).unwrap_or("");

    let mut out = String::with_capacity(text.len() + new.len());
    let mut copied = 0;
    for found in matches {
        out.push_str(&text[copied..found.start]);
        match found.indent.strip_prefix(old_indent) {
            Some(extra) if !extra.is_empty() => {
                let shifted: Vec<String> = new
                    .split('\n')
                    .map(|line| if line.trim().is_empty() { line.to_owned() } else { format!("{extra}{line}") })
                    .collect();
                out.push_str(&shifted.join("\n"));
            }
            _ => out.push_str(new),
        }
        copied = found.end;
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testing::{call, relay};

    fn edit(old: &str, new: &str, replace_all: bool) -> FileEdit {
        FileEdit { path: "f".to_owned(), old_text: old.to_owned(), new_text: new.to_owned(), replace_all }
    }

    #[test]
    fn exact_match_replaces_once() {
        assert_eq!(apply("a = 1\nb = 2\n", &edit("b = 2", "b = 3", false)).as_deref(), Ok("a = 1\nb = 3\n"));
    }

    #[test]
    fn several_matches_need_replace_all() {
        let err = apply("x\nx\n", &edit("x", "y", false)).err().unwrap_or_default();
        assert!(err.contains("matches 2 places"), "{err}");
        assert_eq!(apply("x\nx\n", &edit("x", "y", true)).as_deref(), Ok("y\ny\n"));
    }

    #[test]
    fn whitespace_differences_are_tolerated() {
        let text = "fn main() {\n    let  x = 1;\n    println!(\"{x}\");\n}\n";
        // Wrong indentation and spacing in old_text; new_text written at the same wrong depth.
        let old = "let x = 1;\nprintln!(\"{x}\");\n";
        let new = "let x = 2;\nprintln!(\"{x}\");\n";
        let result = apply(text, &edit(old, new, false));
        assert_eq!(result.as_deref(), Ok("fn main() {\n    let x = 2;\n    println!(\"{x}\");\n}\n"));
    }

    #[test]
    fn tolerant_match_also_refuses_ambiguity_and_misses() {
        let text = "  a\n b\n\ta\n b\n";
        let err = apply(text, &edit("a\nb", "c", false)).err().unwrap_or_default();
        assert!(err.contains("2 places when ignoring whitespace"), "{err}");
        assert_eq!(apply(text, &edit("a\nb", "c", true)).as_deref(), Ok("  c\n\tc\n"));
        let err = apply(text, &edit("zzz", "c", false)).err().unwrap_or_default();
        assert!(err.starts_with("old_text not found"), "{err}");
    }

    #[tokio::test]
    async fn edits_apply_in_order_and_return_a_diff() {
        let (_tmp, relay) = relay();
        std::fs::write(relay.root().join("a.txt"), "one\ntwo\nthree\n").expect("write");
        let result = call(
            &relay,
            "edit_files",
            json!({"edits": [
                {"path": "a.txt", "old_text": "two", "new_text": "2"},
                {"path": "a.txt", "old_text": "2\nthree", "new_text": "2\n3"},
            ]}),
        )
        .await;
        assert!(!result.is_error, "{}", result.output);
        assert_eq!(std::fs::read_to_string(relay.root().join("a.txt")).expect("read"), "one\n2\n3\n");
        assert!(result.output.starts_with("--- a/a.txt\n+++ b/a.txt\n@@"), "{}", result.output);
        assert!(result.output.contains("-two\n-three\n+2\n+3\n"), "{}", result.output);
    }

    #[tokio::test]
    async fn nothing_is_written_unless_every_edit_matches() {
        let (_tmp, relay) = relay();
        std::fs::write(relay.root().join("a.txt"), "alpha\n").expect("write");
        std::fs::write(relay.root().join("b.txt"), "beta\n").expect("write");
        let result = call(
            &relay,
            "edit_files",
            json!({"edits": [
                {"path": "a.txt", "old_text": "alpha", "new_text": "ALPHA"},
                {"path": "b.txt", "old_text": "gamma", "new_text": "GAMMA"},
            ]}),
        )
        .await;
        assert!(result.is_error);
        assert!(result.output.starts_with("edits[1] (b.txt): old_text not found"), "{}", result.output);
        assert_eq!(std::fs::read_to_string(relay.root().join("a.txt")).expect("read"), "alpha\n");
    }

    #[tokio::test]
    async fn bad_edits_name_the_edit() {
        let (_tmp, relay) = relay();
        std::fs::write(relay.root().join("a.txt"), "x\n").expect("write");
        let empty =
            call(&relay, "edit_files", json!({"edits": [{"path": "a.txt", "old_text": "", "new_text": "y"}]})).await;
        assert!(empty.is_error);
        assert!(empty.output.starts_with("edits[0] (a.txt): old_text is empty"), "{}", empty.output);
        let missing =
            call(&relay, "edit_files", json!({"edits": [{"path": "b.txt", "old_text": "x", "new_text": "y"}]})).await;
        assert!(missing.is_error);
        assert_eq!(missing.output, "edits[0] (b.txt): no such file or directory");
        let none = call(&relay, "edit_files", json!({"edits": []})).await;
        assert!(none.is_error);
        let escape = call(
            &relay,
            "edit_files",
            json!({"edits": [{"path": "/etc/passwd", "old_text": "root", "new_text": "x"}]}),
        )
        .await;
        assert!(escape.output.starts_with("path escapes the workspace"), "{}", escape.output);
    }
}
