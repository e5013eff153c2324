//! Path confinement (SPEC §8): hostile paths against `read_file`, `write_file` and `edit_files`
//! never reach outside the workspace root.
//!
//! Each test builds, in a fresh temporary directory `base/`:
//! - `base/root/`: the workspace, with planted symlinks (to the outside directory and the secret,
//!   to `/` and `/etc`, relative, chained, dangling, looping, and a few that stay inside);
//! - `base/outside/`: a secret file with random content, sentinel files and a `file.txt` that
//!   also holds the secret;
//! - `base/root-sibling/`: a directory whose name merely starts with the root's.
//!
//! "Zero escapes" is checked on effects rather than on every path failing, since some
//! hostile-looking strings are plain names inside the root (`%2e%2e`, `....`, `~`):
//! - the secret never appears in any output;
//! - nothing outside the root changes: `outside/`, the sibling, a few system paths and, around
//!   every call, the place a naive (unconfined) tool would have touched;
//! - every successful write or edit is found inside the root;
//! - a path that leaves the root is refused as an escape, and every refused call is an error
//!   with a readable message.
//!
//! The runner is root in some containers, so an escape could damage the machine: calls aimed at
//! files outside the temporary directory write back those files' own content (an escape still
//! shows, as a success and a changed inode), and they run last, only if nothing escaped before.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agentplane_relay::Relay;
use agentplane_schema::tool::{ToolLimits, ToolRequest, ToolResult};
use serde_json::{Value, json};

/// What a hostile path must do.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Leaves the root: refused as an escape ("path escapes the workspace: …").
    Escape,
    /// Stays inside but cannot work (NUL byte, name too long, symlink loop): an error.
    Fails,
    /// An odd but legitimate name inside the root: may succeed or fail, touching only the root.
    Inside,
}

use Expect::{Escape, Fails, Inside};

/// Symlinks planted in the root, as (link, target). `{root}`, `{outside}` and `{base}` stand
/// for absolute paths.
const LINKS: &[(&str, &str)] = &[
    ("out_dir", "{outside}"),                   // absolute, to the outside directory
    ("out_secret", "{outside}/secret"),         // absolute, to the secret itself
    ("fs_root", "/"),                           // the filesystem root
    ("etc", "/etc"),                            // a system directory
    ("rel_out", "../outside"),                  // relative, one level up
    ("rel_secret", "../outside/secret"),        // relative, to the secret
    ("chain_a", "chain_b"),                     // chain: a -> b -> c -> rel_out -> outside
    ("chain_b", "./chain_c"),                   //
    ("chain_c", "rel_out"),                     //
    ("dangling", "{outside}/newfile"),          // dangling: a write would create the target
    ("dangling_rel", "../outside/newfile_rel"), // dangling, relative
    ("loop_a", "loop_b"),                       // a two-link loop
    ("loop_b", "loop_a"),                       //
    ("self_loop", "self_loop"),                 // a link to itself
    ("via_root", "{root}/../outside"),          // absolute through the root, then up
    ("sneaky", "inside_dir/../../outside"),     // relative, dipping inside first
    ("dot_dot", ".."),                          // the root's parent
    ("proc_root", "/proc/self/root"),           // the filesystem root again, via procfs
    ("proc_cwd", "/proc/self/cwd"),             // the test's working directory
    ("sibling", "{base}/root-sibling"),         // the directory sharing the root's prefix
    ("inside_dir/deep_out", "../../outside"),   // climbs out from one level down
    ("inside_dir/up", ".."),                    // allowed: back to the root
    ("inside_link", "inside_dir"),              // allowed: a directory inside
    ("inside_abs", "{root}/inside_dir"),        // allowed: absolute, but inside
    ("inside_file", "inside_dir/file.txt"),     // allowed: a file inside
];

/// Links leading to a directory outside, probed with [`DIR_SUFFIXES`].
const OUTSIDE_DIR_LINKS: &[&str] =
    &["out_dir", "rel_out", "chain_a", "chain_b", "via_root", "sneaky", "sibling", "inside_dir/deep_out"];

/// What is appended to each outside-directory link.
const DIR_SUFFIXES: &[&str] = &[
    "",
    "/",
    "/.",
    "/..",
    "/secret",
    "/sentinel.txt",
    "/newfile",
    "/sub/sentinel.txt",
    "/sub/new/deeper.txt",
    "/../outside/secret",
];

/// Links leading to a file outside (existing or not), probed with [`FILE_SUFFIXES`].
const OUTSIDE_FILE_LINKS: &[&str] = &["out_secret", "rel_secret", "dangling", "dangling_rel"];

const FILE_SUFFIXES: &[&str] = &["", "/", "/.", "/x"];

/// Hand-written cases. `{root}`, `{outside}`, `{base}` stand for absolute paths; `{probe}` for a
/// file name that exists nowhere.
const HAND_WRITTEN: &[(&str, Expect)] = &[
    // `..` in its plain forms
    ("..", Escape),
    ("../", Escape),
    ("../..", Escape),
    ("./..", Escape),
    ("../outside", Escape),
    ("../root-sibling/sentinel.txt", Escape),
    ("../root/ok.txt", Escape), // back inside, but only by way of the parent
    ("a/b/../../../outside/secret", Escape),
    ("inside_dir/up/../outside/secret", Escape), // `up` is the root, so `..` is its parent
    ("inside_link/../../outside/secret", Escape),
    ("inside_dir/..", Inside),
    ("inside_dir/up", Inside),
    ("../*", Escape),
    ("../\n", Escape),
    // dots that are only names
    ("...", Inside),
    ("....", Inside),
    ("....//outside/secret", Inside),
    (".../.../outside/secret", Inside),
    (".. /outside/secret", Inside),
    (" ../outside/secret", Inside),
    ("..\t/outside/secret", Inside),
    ("\n../outside/secret", Inside),
    ("..;/outside/secret", Inside),
    ("outside/secret", Inside),
    // absolute paths
    ("/", Escape),
    ("/etc/passwd", Escape),
    ("/etc/hostname", Escape),
    ("//etc/passwd", Escape),
    ("///etc//passwd", Escape),
    ("/etc/../etc/passwd", Escape),
    ("/proc/self/root/etc/passwd", Escape),
    ("/proc/self/root{outside}/secret", Escape),
    ("/proc/self/root{root}/ok.txt", Escape), // the root, but not spelled as the root
    ("/proc/self/cwd/Cargo.toml", Escape),
    ("/proc/version", Escape),
    ("/tmp/{probe}", Escape),
    ("/{probe}", Escape),
    ("{outside}/secret", Escape),
    ("{outside}/newfile", Escape),
    ("{outside}/sub/new/{probe}", Escape),
    ("{base}/outside/secret", Escape),
    ("{root}/../outside/secret", Escape),
    ("{root}/./../outside/secret", Escape),
    ("{root}/inside_dir/../../outside/secret", Escape),
    ("{root}/out_dir/secret", Escape),
    ("{root}/..", Escape),
    ("{root}-sibling/sentinel.txt", Escape), // shares the root's prefix, not its path
    ("{root}-sibling/{probe}", Escape),
    ("{outside}/secret\0", Escape),
    ("{root}", Inside),
    ("{root}/", Inside),
    ("{root}/ok.txt", Inside),
    ("{root}/inside_dir/up/ok.txt", Inside),
    // URL-encoded and look-alike dots and slashes: names inside the root
    ("%2e%2e", Inside),
    ("%2e%2e/%2e%2e/outside/secret", Inside),
    ("%2e%2e%2f%2e%2e%2foutside%2fsecret", Inside),
    ("..%2f..%2foutside%2fsecret", Inside),
    ("..%5c..%5coutside%5csecret", Inside),
    ("%252e%252e/%252e%252e/outside/secret", Inside),
    ("%c0%ae%c0%ae/%c0%ae%c0%ae/outside/secret", Inside), // overlong UTF-8, as text
    ("..%00/outside/secret", Inside),
    ("\u{ff0e}\u{ff0e}/\u{ff0e}\u{ff0e}/outside/secret", Inside), // fullwidth full stops
    ("\u{2024}\u{2024}/\u{2024}\u{2024}/outside/secret", Inside), // one dot leaders
    ("\u{fe52}\u{fe52}/outside/secret", Inside),                  // small full stops
    ("..\u{2215}..\u{2215}outside\u{2215}secret", Inside),        // division slashes
    ("..\u{ff0f}..\u{ff0f}outside\u{ff0f}secret", Inside),        // fullwidth solidus
    (".\u{200b}./.\u{200b}./outside/secret", Inside),             // zero-width space
    // backslashes are ordinary characters on Unix
    ("..\\..\\outside\\secret", Inside),
    ("..\\secret", Inside),
    ("\\..\\..\\etc\\passwd", Inside),
    ("inside_dir\\..\\..\\outside", Inside),
    // NUL bytes
    ("\0", Fails),
    ("a\0b", Fails),
    ("ok.txt\0", Fails),
    ("out_dir\0/secret", Fails),
    ("ok.txt\0../../x", Inside), // `..` drops the NUL component: resolves to `x` in the root
    ("\0/../../outside/secret", Escape),
    ("../\0", Escape),
    // shell and home spellings: names, never expanded
    ("", Inside),
    (".", Inside),
    ("./", Inside),
    ("~", Inside),
    ("~/secret", Inside),
    ("~root/.bashrc", Inside),
    ("$HOME", Inside),
    ("${HOME}/.bashrc", Inside),
    ("$(cat ../outside/secret)", Inside),
    ("`cat ../outside/secret`", Inside),
    ("file:///etc/passwd", Inside),
    ("*", Inside),
    // symlinks to system places
    ("fs_root", Escape),
    ("fs_root/etc/passwd", Escape),
    ("fs_root{outside}/secret", Escape),
    ("fs_root{root}/ok.txt", Escape), // the root, but by way of `/`
    ("fs_root/tmp/{probe}", Escape),
    ("etc", Escape),
    ("etc/passwd", Escape),
    ("etc/hostname", Escape),
    ("etc/{probe}", Escape),
    ("proc_root/etc/passwd", Escape),
    ("proc_root{outside}/secret", Escape),
    ("proc_cwd", Escape),
    ("proc_cwd/Cargo.toml", Escape),
    ("proc_cwd/{probe}", Escape),
    ("dot_dot", Escape),
    ("dot_dot/outside/secret", Escape),
    ("dot_dot/root/ok.txt", Escape),
    // loops
    ("loop_a", Fails),
    ("loop_a/x", Fails),
    ("self_loop", Fails),
    ("self_loop/x", Fails),
    // links that stay inside
    ("inside_link", Inside),
    ("inside_link/file.txt", Inside),
    ("inside_link/new.txt", Inside),
    ("inside_abs/file.txt", Inside),
    ("inside_abs/up/ok.txt", Inside),
    ("inside_file", Inside),
    ("inside_dir/up/inside_link/up/ok.txt", Inside),
];

/// The `..` cases built by repetition, at depths 1 to 6 (the root sits a few levels below `/`,
/// so the deeper ones reach the filesystem root).
fn dot_dot_cases() -> Vec<(String, Expect)> {
    let mut cases = Vec::new();
    for depth in 1..=6 {
        let up = "../".repeat(depth);
        cases.push((format!("{up}outside/secret"), Escape));
        cases.push((format!("{up}etc/passwd"), Escape));
        cases.push((up.clone(), Escape)); // trailing `../`
        cases.push((format!("a/{up}../outside/secret"), Escape));
        cases.push((format!("inside_dir/{up}../x.txt"), Escape));
        cases.push((format!("{}outside/newfile", "./../".repeat(depth)), Escape));
        cases.push((format!("{}x.txt", "..//".repeat(depth)), Escape));
        cases.push((format!("inside_dir{}", "/..".repeat(depth + 1)), Escape)); // trailing `/..`
        cases.push((format!("{{root}}{}/outside/secret", "/..".repeat(depth)), Escape));
    }
    for depth in 1..=3 {
        cases.push((format!("{}outside/secret", "....//".repeat(depth)), Inside));
        cases.push((".../".repeat(depth), Inside));
        cases.push((format!("{}x", "..../".repeat(depth)), Inside));
    }
    cases
}

/// Very long paths: past NAME_MAX, past PATH_MAX, hundreds of components, many symlink hops.
fn long_cases() -> Vec<(String, Expect)> {
    vec![
        ("x".repeat(256), Fails),                                                     // NAME_MAX + 1
        ("x".repeat(10_000), Fails),                                                  // 10k characters
        (format!("inside_dir/{}", "y".repeat(300)), Fails),                           // long last name
        (format!("{}{}outside/secret", "a/".repeat(300), "../".repeat(301)), Escape), // 300 in, 301 out
        (format!("{}etc/passwd", "../".repeat(2000)), Escape),                        // 6k characters
        (format!("{}ok.txt", "./".repeat(5000)), Inside),                             // 10k characters
        (format!("{}../../outside/secret", "a/../".repeat(1000)), Escape),            // 5k, net two up
        (format!("{{root}}/{}../outside/secret", "x/../".repeat(1000)), Escape),      // absolute, long
        (format!("{}ok.txt", "inside_dir/up/".repeat(30)), Inside),                   // 30 hops
        (format!("{}ok.txt", "inside_dir/up/".repeat(41)), Fails),                    // 41 hops
        (format!("{}../outside/secret", "inside_dir/up/".repeat(20)), Escape),        // hops, then up
        (format!("{}x", "d/".repeat(2100)), Inside),                                  // PATH_MAX+, 2101 parts
        (format!("{}/{}/secret", "z".repeat(255), "../".repeat(2)), Escape),          // longest name, up
    ]
}

/// Every outside-pointing link, with what a model might append to it.
fn link_cases() -> Vec<(String, Expect)> {
    let mut cases = Vec::new();
    for link in OUTSIDE_DIR_LINKS {
        cases.extend(DIR_SUFFIXES.iter().map(|suffix| (format!("{link}{suffix}"), Escape)));
    }
    for link in OUTSIDE_FILE_LINKS {
        cases.extend(FILE_SUFFIXES.iter().map(|suffix| (format!("{link}{suffix}"), Escape)));
    }
    cases
}

/// A token nobody can guess: random per process (std's `RandomState`) and per call (the time).
fn random_token(label: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut first = std::collections::hash_map::RandomState::new().build_hasher();
    first.write_u128(nanos);
    let second = std::collections::hash_map::RandomState::new().hash_one(nanos);
    format!("{label}-{:016x}{second:016x}", first.finish())
}

struct Fixture {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
    outside: PathBuf,
    secret: String,
    /// A file name that exists nowhere, for paths that would create a file outside.
    probe: String,
    relay: Relay,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = tmp.path().canonicalize().expect("canonical tempdir");
        let root = base.join("root");
        let outside = base.join("outside");
        let secret = random_token("SECRET");
        std::fs::create_dir_all(outside.join("sub")).expect("mkdir outside");
        std::fs::write(outside.join("secret"), format!("{secret}\n")).expect("write secret");
        std::fs::write(outside.join("file.txt"), format!("{secret}\n")).expect("write outside file");
        std::fs::write(outside.join("sentinel.txt"), "sentinel\n").expect("write sentinel");
        std::fs::write(outside.join("sub/sentinel.txt"), "sub sentinel\n").expect("write sentinel");
        std::fs::create_dir_all(base.join("root-sibling")).expect("mkdir sibling");
        std::fs::write(base.join("root-sibling/sentinel.txt"), "sibling\n").expect("write sentinel");

        std::fs::create_dir_all(root.join("inside_dir")).expect("mkdir root");
        std::fs::write(root.join("ok.txt"), "ok\n").expect("write ok.txt");
        std::fs::write(root.join("inside_dir/file.txt"), "inside\n").expect("write inside file");
        let fixture = Fixture {
            relay: Relay::new(&root, ToolLimits::default()).expect("relay"),
            probe: random_token("agentplane-probe"),
            _tmp: tmp,
            base,
            root,
            outside,
            secret,
        };
        for (link, target) in LINKS {
            symlink(fixture.expand(target), fixture.root.join(link)).expect("plant symlink");
        }
        fixture
    }

    /// Substitutes the placeholders of the case tables.
    fn expand(&self, template: &str) -> String {
        template
            .replace("{root}", &self.root.to_string_lossy())
            .replace("{outside}", &self.outside.to_string_lossy())
            .replace("{base}", &self.base.to_string_lossy())
            .replace("{probe}", &self.probe)
    }

    /// All hostile paths, expanded, with the cases aimed beyond the temporary directory last.
    fn cases(&self) -> Vec<(String, Expect)> {
        let templates = HAND_WRITTEN.iter().map(|&(path, expect)| (path.to_owned(), expect));
        let mut cases: Vec<(String, Expect)> = templates
            .chain(dot_dot_cases())
            .chain(long_cases())
            .chain(link_cases())
            .map(|(path, expect)| (self.expand(&path), expect))
            .collect();
        cases.sort_by_key(|(path, _)| self.aims_beyond_base(path));
        cases
    }

    fn aims_beyond_base(&self, path: &str) -> bool {
        naive_target(&self.root, path).is_some_and(|target| !target.starts_with(&self.base))
    }

    async fn call(&self, name: &str, args: serde_json::Value) -> ToolResult {
        call(&self.relay, name, args).await
    }

    /// What a call aimed at `target` must leave as it is. A directory outside the fixture (`/tmp`,
    /// `/`) changes its times whenever anyone adds an entry there, other tests included; no call
    /// can write to a directory path, so there only what it is counts, not when it last changed.
    fn watched(&self, target: &Path) -> Option<Entry> {
        let mut entry = Entry::of(target)?;
        if entry.kind == "dir" && !target.starts_with(&self.base) {
            entry.modified = (0, 0);
            entry.changed = (0, 0);
        }
        Some(entry)
    }

    /// Everything outside the root that the test can watch.
    fn outside_snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.walk(&self.base, Some(&self.root));
        for path in ["/", "/etc", "/etc/passwd", "/etc/hostname", "/tmp/{probe}", "/{probe}", "{outside}/newfile"] {
            snapshot.add(Path::new(&self.expand(path)));
        }
        snapshot
    }
}

async fn call(relay: &Relay, name: &str, args: serde_json::Value) -> ToolResult {
    let request = ToolRequest {
        call_id: format!("call-{name}"),
        chat_id: "chat".into(),
        user_id: "user".into(),
        name: name.into(),
        args,
    };
    relay.handle(&request, None).await
}

/// Where plain kernel resolution of `root.join(path)` lands: what an unconfined tool would touch.
/// Symlinks are followed (at most 40 of them, dangling ones included); `..` after a symlink goes
/// to the parent of its target, as in the kernel. `None` for paths the kernel cannot take (NUL).
fn naive_target(root: &Path, path: &str) -> Option<PathBuf> {
    if path.contains('\0') {
        return None;
    }
    let components = |path: &Path| path.components().map(|c| c.as_os_str().to_owned()).collect::<Vec<OsString>>();
    let mut pending = components(&root.join(path));
    pending.reverse();
    let mut current = PathBuf::from("/");
    let mut hops = 0;
    while let Some(component) = pending.pop() {
        match component.to_str() {
            Some("/") => current = PathBuf::from("/"),
            Some(".") => {}
            Some("..") => {
                current.pop();
            }
            _ => {
                let next = current.join(&component);
                match std::fs::read_link(&next) {
                    Ok(target) if hops < 40 => {
                        hops += 1;
                        pending.extend(components(&target).into_iter().rev());
                    }
                    _ => current = next,
                }
            }
        }
    }
    Some(current)
}

/// File metadata (and, for small files, content) that any write, rename or delete would change.
#[derive(Debug, PartialEq)]
struct Entry {
    kind: &'static str,
    len: u64,
    mode: u32,
    inode: u64,
    modified: (i64, i64),
    changed: (i64, i64),
    content: Option<String>,
    link: Option<PathBuf>,
}

impl Entry {
    /// `None` when nothing is there (not even a dangling link).
    fn of(path: &Path) -> Option<Entry> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        let kind = if meta.is_dir() {
            "dir"
        } else if meta.is_symlink() {
            "symlink"
        } else if meta.is_file() {
            "file"
        } else {
            "other"
        };
        let small_file = meta.is_file() && meta.len() <= 64 * 1024;
        Some(Entry {
            kind,
            len: meta.len(),
            mode: meta.mode(),
            inode: meta.ino(),
            modified: (meta.mtime(), meta.mtime_nsec()),
            changed: (meta.ctime(), meta.ctime_nsec()),
            content: if small_file {
                std::fs::read(path).ok().map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            } else {
                None
            },
            link: std::fs::read_link(path).ok(),
        })
    }
}

/// Paths and what was there, missing ones included (so creating them shows).
#[derive(Debug, Default, PartialEq)]
struct Snapshot(BTreeMap<PathBuf, Option<Entry>>);

impl Snapshot {
    fn add(&mut self, path: &Path) {
        self.0.insert(path.to_owned(), Entry::of(path));
    }

    /// Adds `dir` and everything beneath it, without following symlinks, skipping `except`.
    fn walk(&mut self, dir: &Path, except: Option<&Path>) {
        let mut stack = vec![dir.to_owned()];
        while let Some(path) = stack.pop() {
            if Some(path.as_path()) == except {
                continue;
            }
            self.add(&path);
            if std::fs::symlink_metadata(&path).is_ok_and(|meta| meta.is_dir()) {
                let entries = std::fs::read_dir(&path).expect("list a snapshot directory");
                stack.extend(entries.map(|entry| entry.expect("directory entry").path()));
            }
        }
    }

    /// The paths that differ from `earlier`, each with what changed.
    fn changes_since(&self, earlier: &Snapshot) -> Vec<String> {
        let mut keys: Vec<&PathBuf> = self.0.keys().chain(earlier.0.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|path| {
                let (before, after) =
                    (earlier.0.get(path).and_then(Option::as_ref), self.0.get(path).and_then(Option::as_ref));
                (before != after).then(|| format!("{}: {before:?} -> {after:?}", path.display()))
            })
            .collect()
    }
}

/// Whether a regular file beneath `root` (symlinks not followed) contains `needle`.
fn found_inside(root: &Path, needle: &str) -> bool {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(file_type) = entry.file_type() else { continue };
            if file_type.is_dir() {
                stack.push(entry.path());
            } else if file_type.is_file()
                && std::fs::read(entry.path())
                    .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                return true;
            }
        }
    }
    false
}

/// A refusal the model can act on: a non-empty message that is not an internal failure.
fn is_clear_error(result: &ToolResult) -> bool {
    let text = result.output.trim();
    result.is_error && !text.is_empty() && !text.contains("internal error") && !text.contains("panicked")
}

const ESCAPE_PREFIX: &str = "path escapes the workspace";

#[derive(Default)]
struct Tally {
    calls: usize,
    succeeded: usize,
    refused_as_escape: usize,
    other_errors: usize,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Tally { calls, succeeded, refused_as_escape, other_errors } = self;
        write!(
            f,
            "{calls} calls, {succeeded} succeeded, {refused_as_escape} refused as escapes, {other_errors} other errors"
        )
    }
}

impl Tally {
    fn count(&mut self, result: &ToolResult) {
        self.calls += 1;
        if !result.is_error {
            self.succeeded += 1;
        } else if result.output.starts_with(ESCAPE_PREFIX) {
            self.refused_as_escape += 1;
        } else {
            self.other_errors += 1;
        }
    }
}

/// Shortens a path or message for a failure report (some are 10k characters long).
fn short(text: &str) -> String {
    let text = format!("{text:?}");
    match text.char_indices().nth(160) {
        Some((cut, _)) => format!("{}… ({} chars)", &text[..cut], text.len()),
        None => text,
    }
}

/// The three calls made with one hostile path, each with whether it writes `marker`. The edit's
/// `old_text` comes from the file a naive tool would hit, so an escaping edit would match. Aimed
/// beyond the temporary directory, the write and edit put back what is there, so that even an
/// escape damages nothing (it still shows: a success, a changed inode).
fn calls_for(path: &str, naive: Option<&Path>, beyond_base: bool, marker: &str) -> [(&'static str, bool, Value); 3] {
    let naive_text = naive.and_then(|target| std::fs::read_to_string(target).ok());
    let first_line = naive_text.as_deref().and_then(|text| text.lines().find(|line| !line.is_empty()));
    let old_text = first_line.unwrap_or("x");
    let (content, new_text) = match (&naive_text, first_line) {
        (Some(text), Some(line)) if beyond_base => (text.as_str(), line),
        _ => (marker, marker),
    };
    [
        ("read_file", false, json!({"path": path})),
        // Before the write, so that an edit inside the root still finds its old_text.
        (
            "edit_files",
            new_text == marker,
            json!({"edits": [{"path": path, "old_text": old_text, "new_text": new_text}]}),
        ),
        ("write_file", content == marker, json!({"path": path, "content": content})),
    ]
}

#[tokio::test]
async fn hostile_paths_never_escape_the_root() {
    let fx = Fixture::new();
    let cases = fx.cases();
    assert!(cases.len() >= 100, "only {} hostile paths", cases.len());
    let before = fx.outside_snapshot();
    let verbose = std::env::var_os("CONFINEMENT_VERBOSE").is_some();
    let mut problems: Vec<String> = Vec::new();
    let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();

    for (index, (path, expect)) in cases.iter().enumerate() {
        let naive = naive_target(&fx.root, path);
        let beyond_base = naive.as_ref().is_some_and(|target| !target.starts_with(&fx.base));
        if beyond_base && !problems.is_empty() {
            problems.push("stopped before the calls aimed at system files, since something escaped".to_owned());
            break;
        }
        // The place a naive tool would have touched, when it is outside the root.
        let watched = naive.as_deref().filter(|target| !target.starts_with(&fx.root));
        let marker = random_token(&format!("MARKER-{index}"));

        for (tool, writes_marker, args) in calls_for(path, naive.as_deref(), beyond_base, &marker) {
            let watched_before = watched.map(|target| fx.watched(target));
            let result = fx.call(tool, args).await;
            tallies.entry(tool).or_default().count(&result);
            let case = format!("{tool} {} ({expect:?})", short(path));
            if verbose {
                eprintln!("{case} -> {} {}", if result.is_error { "ERR" } else { "OK " }, short(&result.output));
            }

            let mut problem = |what: &str| problems.push(format!("{case}: {what}: {}", short(&result.output)));
            if result.output.contains(&fx.secret) {
                problem("the secret leaked");
            }
            if let Some(target) = watched
                && watched_before != Some(fx.watched(target))
            {
                problem(&format!("{} changed", target.display()));
            }
            match expect {
                // A path holding a NUL byte is refused for that before it is walked.
                Escape
                    if !(result.is_error
                        && (result.output.starts_with(ESCAPE_PREFIX)
                            || (path.contains('\0') && result.output.contains("NUL byte")))) =>
                {
                    problem("not refused as an escape");
                }
                Fails if !result.is_error => problem("succeeded"),
                _ => {}
            }
            if result.is_error && !is_clear_error(&result) {
                problem("unclear error");
            }
            if !result.is_error && writes_marker && !found_inside(&fx.root, &marker) {
                problem("succeeded, but what it wrote is not inside the root");
            }
        }
    }

    let changes = fx.outside_snapshot().changes_since(&before);
    problems.extend(changes.into_iter().map(|change| format!("changed outside the root: {change}")));
    let mut summary = format!("{} hostile paths\n", cases.len());
    for (tool, tally) in &tallies {
        let _ = writeln!(summary, "{tool}: {tally}");
    }
    eprintln!("{summary}");
    assert!(problems.is_empty(), "{} escape(s) or bad refusals:\n{}\n{summary}", problems.len(), problems.join("\n"));
}

/// Rounds of write_file + read_file each race aims for, and the time it may take at most.
const RACE_ROUNDS: usize = 2000;
const RACE_TIME: Duration = Duration::from_secs(6);
const RACE_TASKS: usize = 4;

/// Hammers `write_file` and `read_file` on `path` from several tasks while `swap` runs in a loop
/// on its own thread, then checks that nothing escaped. Returns the calls' tally and the swaps.
async fn race(fx: &Fixture, path: &str, mut swap: impl FnMut(usize) + Send + 'static) -> (Tally, usize) {
    let before = fx.outside_snapshot();
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut swaps = 0;
            while !stop.load(Ordering::Relaxed) {
                swap(swaps);
                swaps += 1;
            }
            swaps
        })
    };

    let deadline = Instant::now() + RACE_TIME;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..RACE_TASKS {
        let (relay, path) = (fx.relay.clone(), path.to_owned());
        tasks.spawn(async move {
            let mut results = Vec::new();
            for round in 0..RACE_ROUNDS / RACE_TASKS {
                if Instant::now() > deadline {
                    break;
                }
                let content = format!("race-{task}-{round}\n");
                results.push(call(&relay, "write_file", json!({"path": path, "content": content})).await);
                results.push(call(&relay, "read_file", json!({"path": path})).await);
            }
            results
        });
    }
    let results: Vec<ToolResult> = tasks.join_all().await.into_iter().flatten().collect();
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().expect("the swapper thread panicked");

    let mut tally = Tally::default();
    let mut problems = BTreeSet::new(); // thousands of calls: each problem once
    let mut other_errors = BTreeSet::new();
    for result in &results {
        tally.count(result);
        if result.is_error && !result.output.starts_with(ESCAPE_PREFIX) {
            other_errors.insert(result.output.as_str());
        }
        if result.output.contains(&fx.secret) {
            problems.insert(format!("the secret leaked: {}", short(&result.output)));
        }
        if result.is_error && !is_clear_error(result) {
            problems.insert(format!("unclear error: {}", short(&result.output)));
        }
    }
    let changes = fx.outside_snapshot().changes_since(&before);
    problems.extend(changes.into_iter().map(|change| format!("changed outside the root: {change}")));
    let summary = format!("{path}: {swaps} swaps, {tally}");
    eprintln!("{summary}; the other errors: {other_errors:?}");
    let problems: Vec<String> = problems.into_iter().collect();
    assert!(problems.is_empty(), "{} escape(s) in the race:\n{}\n{summary}", problems.len(), problems.join("\n"));
    (tally, swaps)
}

/// `root/swap` is a symlink, atomically replaced (a fresh link renamed over it) again and again,
/// pointing inside, then outside, then outside relatively, then inside by an absolute path. The
/// relay must refuse or stay inside whichever it sees at each step of its walk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_symlink_swapped_during_calls_never_leads_out() {
    let fx = Fixture::new();
    let swap = fx.root.join("swap");
    let next = fx.root.join(".swap-next");
    symlink("inside_dir", &swap).expect("symlink");
    let targets: Vec<PathBuf> =
        vec!["inside_dir".into(), fx.outside.clone(), "../outside".into(), fx.root.join("inside_dir")];

    let (tally, swaps) = race(&fx, "swap/file.txt", move |round| {
        let _ = std::fs::remove_file(&next);
        symlink(&targets[round % targets.len()], &next).expect("symlink");
        std::fs::rename(&next, &swap).expect("rename the symlink over");
    })
    .await;
    assert!(swaps > 0, "the symlink was never swapped");
    assert!(tally.succeeded > 0 && tally.refused_as_escape > 0, "the race saw only one side of the swap");
}

/// The kernel-facing layer: `root/flip` is a real directory that is moved aside and replaced by
/// a symlink out (absolute or relative) and back, so the relay's check can see a directory and
/// its open a symlink. A writer may recreate `flip` while it is missing; the swapper then drops
/// that copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_directory_swapped_for_a_symlink_never_leads_out() {
    let fx = Fixture::new();
    let (dir, aside, link) = (fx.root.join("flip"), fx.root.join(".flip-dir"), fx.root.join(".flip-link"));
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("file.txt"), "flip\n").expect("write");
    let targets: Vec<PathBuf> = vec![fx.outside.clone(), "../outside".into()];
    let is = |path: &Path, check: fn(&std::fs::FileType) -> bool| {
        std::fs::symlink_metadata(path).is_ok_and(|meta| check(&meta.file_type()))
    };

    let (_tally, swaps) = race(&fx, "flip/file.txt", move |round| {
        // The directory steps aside and a symlink out takes its place...
        let _ = std::fs::remove_file(&link);
        symlink(&targets[round % targets.len()], &link).expect("symlink");
        if std::fs::rename(&dir, &aside).is_ok() {
            let _ = std::fs::rename(&link, &dir);
        }
        std::thread::sleep(Duration::from_micros(100));
        // ...then the symlink goes and the directory comes back.
        if is(&dir, std::fs::FileType::is_symlink) {
            let _ = std::fs::remove_file(&dir);
        }
        if std::fs::rename(&aside, &dir).is_err() && is(&dir, std::fs::FileType::is_dir) {
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::rename(&aside, &dir);
        }
        std::thread::sleep(Duration::from_micros(100));
    })
    .await;
    assert!(swaps > 0, "the directory was never swapped");
}

/// The last component: `root/leaf.txt` is atomically replaced, again and again, by a regular file
/// and by a symlink to the secret, so a read checked against the file can open the symlink.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_swapped_for_a_symlink_never_leaks() {
    let fx = Fixture::new();
    let leaf = fx.root.join("leaf.txt");
    let (next_file, next_link) = (fx.root.join(".leaf-file"), fx.root.join(".leaf-link"));
    let secret = fx.outside.join("secret");
    std::fs::write(&leaf, "leaf\n").expect("write");

    let (_tally, swaps) = race(&fx, "leaf.txt", move |_| {
        let _ = std::fs::remove_file(&next_link);
        symlink(&secret, &next_link).expect("symlink");
        std::fs::rename(&next_link, &leaf).expect("rename the symlink over the file");
        std::fs::write(&next_file, "leaf\n").expect("write");
        std::fs::rename(&next_file, &leaf).expect("rename the file over the symlink");
    })
    .await;
    assert!(swaps > 0, "the file was never swapped");
}
