//! The journal: which calls this relay has taken and how they ended, kept on disk so that a
//! repeated request gets the recorded result instead of running the tool a second time — also
//! after the relay restarts.
//!
//! It is a file of JSON lines in the state directory: a `started` line before a tool runs, a
//! `finished` line with the result after, each durable (fsync'd) before the call goes on. Calls
//! that change nothing (`read_file`) are only remembered in memory, for repeats in this process:
//! after a restart such a call simply runs again. Calls
//! running at the same time share fsyncs (group commit): a line is written under the file's
//! lock, and one `fsync` then covers every line written before it started, so a relay serving
//! many calls at once pays far fewer than two fsyncs per call. Loading tolerates a
//! torn last line (a crash in the middle of a write) and turns calls that an earlier process
//! started but never finished into "interrupted, outcome unknown" results: the tool may or may
//! not have had its effect, and running it again could do it twice. The file is rewritten whole
//! (compacted) at open and whenever it has grown to about twice what is kept: the newest
//! [`JournalLimits::max_calls`] finished calls, at most [`JournalLimits::max_bytes`] of them.
//!
//! A lock on `<state dir>/lock` keeps a second relay process from sharing the journal.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use agentplane_schema::tool::ToolResult;

/// What a call that an earlier relay process left unfinished ends with.
pub const INTERRUPTED: &str =
    "interrupted, outcome unknown: the relay restarted while this call ran; it was not run again";

const JOURNAL_FILE: &str = "journal.jsonl";
const COMPACTING_FILE: &str = "journal.jsonl.tmp";
const LOCK_FILE: &str = "lock";

/// How much of the past the journal remembers. A repeated request for a call forgotten since
/// runs the tool again, so keep enough to cover the orchestrator's retries comfortably. Both
/// bounds apply separately to calls with effects (in the file) and to reads (in memory only),
/// so reads never push out the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalLimits {
    /// Finished calls kept (default 10 000).
    pub max_calls: usize,
    /// Total size of the kept finished calls' lines, in bytes (default 64 MiB): `read_file`
    /// results can be megabytes each.
    pub max_bytes: usize,
}

impl Default for JournalLimits {
    fn default() -> Self {
        JournalLimits { max_calls: 10_000, max_bytes: 64 * 1024 * 1024 }
    }
}

/// One line of the file, as read.
#[derive(Debug, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Line {
    Started { call_id: String },
    Finished { result: ToolResult },
}

/// One line of the file, as written (the same shape as [`Line`], borrowed).
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum LineOut<'a> {
    Started { call_id: &'a str, at: &'a str },
    Finished { call_id: &'a str, at: &'a str, result: &'a ToolResult },
}

/// What the journal knows about a call id when a request for it arrives.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Claim {
    /// Never seen (or forgotten): it is now marked running. A call with effects must be
    /// [`record_started`](Journal::record_started) before it runs; one without is only
    /// [`remember_finished`](Journal::remember_finished) when it ends.
    New,
    /// Running in this process; its result is published when it ends.
    Running,
    /// Ended before, possibly in an earlier process: the recorded result.
    Finished(ToolResult),
}

pub(crate) struct Journal {
    dir: PathBuf,
    limits: JournalLimits,
    /// Held by every change that touches the file, and always taken before `state`, so a
    /// compaction's snapshot of `state` and the file it writes cannot miss an appended line.
    file: Mutex<Writer>,
    /// Only ever held briefly and never across I/O: [`Journal::claim`] runs on async threads.
    state: Mutex<State>,
    /// Held by whoever runs an fsync, so that the callers waiting behind it find their lines
    /// already covered. Taken before `durable` or `file`, never while holding either.
    syncing: Mutex<()>,
    /// How far the file is known durable. Only ever held briefly; taken after `file`.
    durable: Mutex<Durable>,
    /// fsyncs of appended lines run so far.
    fsyncs: AtomicU64,
    /// Tests: the next fsync of appended lines fails as if the disk had.
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
    /// Held for the journal's lifetime; the OS releases the lock when the process dies.
    _lock: File,
}

struct Writer {
    file: Arc<File>,
    lines: usize,
    bytes: usize,
    /// A failed write may have left a partial line; the next write rewrites the file first.
    damaged: bool,
    /// Serial of the last line written, counted over the journal's lifetime (across compactions).
    written: u64,
}

/// The durable prefix of the lines written: every line up to `through` has reached the disk.
struct Durable {
    through: u64,
    /// An fsync of `file` failed: lines written to it since `through` may be lost, and a later
    /// fsync reporting success does not bring them back (Linux drops the pages whose write-back
    /// failed and reports the error once). Until a compaction rewrites the file, every line not
    /// yet durable fails.
    poisoned: bool,
    /// The file lines are appended to now, and the serial of the last line written to it.
    file: Arc<File>,
    written: u64,
}

#[derive(Default)]
struct State {
    calls: HashMap<String, Call>,
    /// Journaled finished calls oldest first, with their serial: a stale entry (its call id
    /// finished again later) is recognised by a serial that no longer matches.
    finished: Kept,
    /// Results only remembered (reads), under a budget of their own, so that many large reads
    /// never push out the results of calls with effects.
    remembered: Kept,
    next_serial: u64,
}

/// Finished calls of one kind, oldest first, and the bytes of their lines.
#[derive(Default)]
struct Kept {
    order: VecDeque<(u64, String)>,
    bytes: usize,
}

/// A call the journal knows. Calls without effects are kept in memory only (`journaled: false`),
/// and a compaction leaves them out too.
enum Call {
    Running {
        /// Its `started` line is written: a compaction keeps it. A call claimed but not yet
        /// started must not get one, or a crash before it runs would read as interrupted.
        started: bool,
    },
    /// Its `finished` line is written but not yet durable: repeats are told it still runs (the
    /// result is published once the line is on disk), and a compaction writes the result.
    Finishing {
        result: Arc<ToolResult>,
    },
    Finished {
        serial: u64,
        bytes: usize,
        result: Arc<ToolResult>,
        journaled: bool,
    },
}

impl Journal {
    /// Opens the journal in `dir` (created if missing), loads it, and records every call an
    /// earlier process left unfinished as interrupted. Returns those results, which nobody has
    /// seen yet and should be published. Blocking.
    pub(crate) fn open(dir: &Path, limits: JournalLimits) -> io::Result<(Journal, Vec<ToolResult>)> {
        std::fs::create_dir_all(dir)?;
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK_FILE))?;
        lock.try_lock().map_err(|err| match err {
            std::fs::TryLockError::WouldBlock => io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another relay process", dir.display()),
            ),
            std::fs::TryLockError::Error(err) => err,
        })?;

        let mut state = State::default();
        let path = dir.join(JOURNAL_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => state.load(&bytes, limits),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        let at = now();
        let mut interrupted = Vec::new();
        let unfinished: Vec<String> = state
            .calls
            .iter()
            .filter(|(_, call)| matches!(call, Call::Running { .. }))
            .map(|(id, _)| id.clone())
            .collect();
        for call_id in unfinished {
            let result = ToolResult::error(&call_id, INTERRUPTED);
            let bytes = line_bytes(&LineOut::Finished { call_id: &call_id, at: &at, result: &result })?;
            state.finish(Arc::new(result.clone()), bytes.len(), limits, true);
            interrupted.push(result);
        }

        // Compacting at once writes the interrupted results, drops a torn line and starts
        // the new process with a file of only what is kept.
        let (text, lines) = serialize(state.snapshot())?;
        let file = replace(dir, &text)?;
        let bytes = text.len();
        let file = Arc::new(file);
        let journal = Journal {
            dir: dir.to_path_buf(),
            limits,
            file: Mutex::new(Writer { file: Arc::clone(&file), lines, bytes, damaged: false, written: 0 }),
            state: Mutex::new(state),
            syncing: Mutex::new(()),
            durable: Mutex::new(Durable { through: 0, poisoned: false, file, written: 0 }),
            fsyncs: AtomicU64::new(0),
            #[cfg(test)]
            fail_next_sync: std::sync::atomic::AtomicBool::new(false),
            _lock: lock,
        };
        Ok((journal, interrupted))
    }

    /// Looks `call_id` up and, when it is new, marks it running — in one step, so that of two
    /// copies of a request only the first is run. A call with effects is then recorded
    /// ([`Journal::record_started`], [`Journal::record_finished`]); one without is only
    /// remembered ([`Journal::remember_finished`]).
    pub(crate) fn claim(&self, call_id: &str) -> Claim {
        let mut state = self.state();
        match state.calls.get(call_id) {
            Some(Call::Running { .. } | Call::Finishing { .. }) => Claim::Running,
            Some(Call::Finished { result, .. }) => Claim::Finished(ToolResult::clone(result)),
            None => {
                state.calls.insert(call_id.to_owned(), Call::Running { started: false });
                Claim::New
            }
        }
    }

    /// Forgets a claimed call that was not run after all (its `started` line could not be
    /// written), so a later request may try again.
    pub(crate) fn abandon(&self, call_id: &str) {
        let mut state = self.state();
        if matches!(state.calls.get(call_id), Some(Call::Running { .. })) {
            state.calls.remove(call_id);
        }
    }

    /// Tests: the next fsync of appended lines fails as if the disk had.
    #[cfg(test)]
    pub(crate) fn fail_next_sync(&self) {
        self.fail_next_sync.store(true, Ordering::Relaxed);
    }

    /// Durably records that a claimed call is about to run. Blocking (fsync, shared with the
    /// calls writing at the same time).
    pub(crate) fn record_started(&self, call_id: &str) -> io::Result<()> {
        let line = line_bytes(&LineOut::Started { call_id, at: &now() })?;
        let serial = {
            let mut writer = self.writer();
            let serial = self.append(&mut writer, &line)?;
            // Under the file's lock, so that a compaction after this line writes it too.
            if let Some(Call::Running { started }) = self.state().calls.get_mut(call_id) {
                *started = true;
            }
            serial
        };
        self.sync_through(serial)
    }

    /// Durably records how a call ended. The result is remembered even when writing fails, so
    /// this process still answers repeats with it; after a restart such a call reads as
    /// interrupted. Blocking (fsync, shared with the calls writing at the same time).
    pub(crate) fn record_finished(&self, result: &ToolResult) -> io::Result<()> {
        let line = line_bytes(&LineOut::Finished { call_id: &result.call_id, at: &now(), result });
        let result = Arc::new(result.clone());
        let line = match line {
            Ok(line) => line,
            Err(err) => {
                let estimate = estimated_bytes(&result);
                self.state().finish(result, estimate, self.limits, true);
                return Err(err);
            }
        };
        let finish = || self.state().finish(Arc::clone(&result), line.len(), self.limits, true);
        let serial = {
            let mut writer = self.writer();
            let serial = match self.append(&mut writer, &line) {
                Ok(serial) => serial,
                Err(err) => {
                    finish();
                    return Err(err);
                }
            };
            // Under the file's lock, so that a compaction after this line writes the result too.
            self.state().calls.insert(result.call_id.clone(), Call::Finishing { result: Arc::clone(&result) });
            // A call takes two lines (started, finished); compact when the file holds about twice
            // what is kept.
            let oversized = writer.lines > self.limits.max_calls.saturating_mul(4)
                || writer.bytes > self.limits.max_bytes.saturating_mul(2).saturating_add(line.len());
            if oversized && let Err(err) = self.compact(&mut writer) {
                finish();
                return Err(err);
            }
            serial
        };
        let synced = self.sync_through(serial);
        finish();
        synced
    }

    /// Remembers how a call that needs no durable record ended (a read: running it again after
    /// a restart does no harm), so that repeats in this process still get this result.
    pub(crate) fn remember_finished(&self, result: &ToolResult) {
        self.state().finish(Arc::new(result.clone()), estimated_bytes(result), self.limits, false);
    }

    /// Writes `line` (not yet durable) and returns its serial for [`Journal::sync_through`].
    fn append(&self, writer: &mut Writer, line: &[u8]) -> io::Result<u64> {
        if writer.damaged {
            self.compact(writer)?;
        }
        match (&*writer.file).write_all(line) {
            Ok(()) => {
                writer.lines += 1;
                writer.bytes += line.len();
                writer.written += 1;
                let mut durable = self.durable();
                durable.written = writer.written;
                Ok(writer.written)
            }
            Err(err) => {
                writer.damaged = true;
                Err(err)
            }
        }
    }

    /// Returns once the line numbered `serial` is on disk: at once if another caller's fsync
    /// already covered it, otherwise after an fsync that covers every line written so far.
    fn sync_through(&self, serial: u64) -> io::Result<()> {
        let _syncing = self.syncing.lock().unwrap_or_else(PoisonError::into_inner);
        let (file, target) = {
            let durable = self.durable();
            if durable.through >= serial {
                return Ok(());
            }
            if durable.poisoned {
                return Err(io::Error::other("an earlier fsync of the journal failed; this line may be lost"));
            }
            (Arc::clone(&durable.file), durable.written)
        };
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        if let Err(err) = self.sync_data(&file) {
            {
                let mut durable = self.durable();
                if !Arc::ptr_eq(&durable.file, &file) {
                    // A compaction replaced the file meanwhile and made its lines durable.
                    return if durable.through >= serial { Ok(()) } else { Err(err) };
                }
                durable.poisoned = true;
            }
            // Rewrite the file before the next line, unless a compaction has just done so.
            let mut writer = self.writer();
            if Arc::ptr_eq(&writer.file, &file) {
                writer.damaged = true;
            } else if self.durable().through >= serial {
                return Ok(());
            }
            return Err(err);
        }
        // Failures only happen under `syncing`, which this holds: `poisoned` is as checked above.
        // A compaction meanwhile has made everything up to its own point durable already.
        let mut durable = self.durable();
        durable.through = durable.through.max(target);
        Ok(())
    }

    fn sync_data(&self, file: &File) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_next_sync.swap(false, Ordering::Relaxed) {
            return Err(io::Error::other("injected fsync failure"));
        }
        file.sync_data()
    }

    /// Replaces the file with one holding only what the journal keeps.
    fn compact(&self, writer: &mut Writer) -> io::Result<()> {
        // A failed rewrite may have replaced the file already: the next line tries again rather
        // than appending to a file that is no longer the journal.
        writer.damaged = true;
        // Calls change state while the file is written, but not the file: every line is
        // written under the file's lock, which this holds.
        // Only the kept results are gathered under the state's lock (async threads take it to
        // claim calls); serializing them, up to `max_bytes`, happens after.
        let snapshot = self.state().snapshot();
        let (text, lines) = serialize(snapshot)?;
        let file = replace(&self.dir, &text)?;
        let bytes = text.len();
        // The new file was synced and holds every line written so far (as state).
        let file = Arc::new(file);
        let written = writer.written;
        *writer = Writer { file: Arc::clone(&file), lines, bytes, damaged: false, written };
        *self.durable() = Durable { through: written, poisoned: false, file, written };
        Ok(())
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        self.file.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn durable(&self) -> MutexGuard<'_, Durable> {
        self.durable.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Replays the file's lines. Unreadable lines are skipped: a torn last line is what a crash
    /// leaves; anything else is reported.
    fn load(&mut self, bytes: &[u8], limits: JournalLimits) {
        let mut lines = bytes.split(|&b| b == b'\n').enumerate().peekable();
        while let Some((index, line)) = lines.next() {
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Line>(line) {
                Ok(Line::Started { call_id, .. }) => {
                    let replaced = self.calls.insert(call_id, Call::Running { started: true });
                    self.forget_bytes(replaced);
                }
                Ok(Line::Finished { result }) => self.finish(Arc::new(result), line.len() + 1, limits, true),
                Err(err) if lines.peek().is_none() => {
                    tracing::warn!(%err, "ignoring the journal's torn last line (the relay stopped while writing it)");
                }
                Err(err) => tracing::warn!(line = index + 1, %err, "ignoring an unreadable journal line"),
            }
        }
    }

    fn finish(&mut self, result: Arc<ToolResult>, bytes: usize, limits: JournalLimits, journaled: bool) {
        let serial = self.next_serial;
        self.next_serial += 1;
        let call_id = result.call_id.clone();
        let replaced = self.calls.insert(call_id.clone(), Call::Finished { serial, bytes, result, journaled });
        self.forget_bytes(replaced);
        let kept = if journaled { &mut self.finished } else { &mut self.remembered };
        kept.order.push_back((serial, call_id));
        kept.bytes += bytes;
        while kept.order.len() > limits.max_calls || kept.bytes > limits.max_bytes {
            let Some((serial, call_id)) = kept.order.pop_front() else { break };
            if let Some(Call::Finished { serial: current, bytes, .. }) = self.calls.get(&call_id)
                && *current == serial
            {
                kept.bytes -= bytes;
                self.calls.remove(&call_id);
            }
        }
    }

    /// Takes a finished call that was replaced out of its budget (its queue entry goes stale).
    fn forget_bytes(&mut self, replaced: Option<Call>) {
        if let Some(Call::Finished { bytes, journaled, .. }) = replaced {
            let kept = if journaled { &mut self.finished } else { &mut self.remembered };
            kept.bytes -= bytes;
        }
    }
}

impl State {
    /// What a file holding only what is kept has lines for: the kept finished calls oldest
    /// first, then the calls started (or finishing) now. Results are shared, not copied.
    fn snapshot(&self) -> Vec<Entry> {
        let mut entries = Vec::new();
        for (serial, call_id) in &self.finished.order {
            if let Some(Call::Finished { serial: current, result, journaled: true, .. }) = self.calls.get(call_id)
                && current == serial
            {
                entries.push(Entry::Finished(Arc::clone(result)));
            }
        }
        for (call_id, call) in &self.calls {
            match call {
                Call::Running { started: true } => entries.push(Entry::Started(call_id.clone())),
                Call::Finishing { result } => entries.push(Entry::Finished(Arc::clone(result))),
                _ => {}
            }
        }
        entries
    }
}

/// A line of a rewritten file, see [`State::snapshot`].
enum Entry {
    Started(String),
    Finished(Arc<ToolResult>),
}

/// The lines of `entries` and how many there are.
fn serialize(entries: Vec<Entry>) -> io::Result<(Vec<u8>, usize)> {
    let at = now();
    let mut text = Vec::new();
    for entry in &entries {
        let line = match entry {
            Entry::Started(call_id) => LineOut::Started { call_id, at: &at },
            Entry::Finished(result) => LineOut::Finished { call_id: &result.call_id, at: &at, result },
        };
        write_line(&mut text, &line)?;
    }
    Ok((text, entries.len()))
}

/// Writes `text` to a new file and renames it over the journal. Returns the new file opened
/// for appending.
fn replace(dir: &Path, text: &[u8]) -> io::Result<File> {
    let temporary = dir.join(COMPACTING_FILE);
    let mut file = File::create(&temporary)?;
    file.write_all(text)?;
    file.sync_all()?;
    drop(file);
    let path = dir.join(JOURNAL_FILE);
    std::fs::rename(&temporary, &path)?;
    // The rename is durable only once the directory entry is.
    File::open(dir)?.sync_all()?;
    OpenOptions::new().append(true).open(&path)
}

/// About the size a result's line would have, without serialising it.
fn estimated_bytes(result: &ToolResult) -> usize {
    result.output.len() + result.call_id.len() + 128
}

fn line_bytes(line: &LineOut<'_>) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    write_line(&mut bytes, line)?;
    Ok(bytes)
}

/// Appends `line` and its newline to `out`.
fn write_line(out: &mut Vec<u8>, line: &LineOut<'_>) -> io::Result<()> {
    serde_json::to_writer(&mut *out, line)?;
    out.push(b'\n');
    Ok(())
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, limits: JournalLimits) -> (Journal, Vec<ToolResult>) {
        Journal::open(dir, limits).expect("journal opens")
    }

    /// Spins until `lines` lines are written, failing instead of hanging if one of the threads
    /// that should write them has ended.
    fn wait_for_lines<T>(journal: &Journal, lines: u64, threads: &[std::thread::JoinHandle<T>]) {
        while journal.durable().written < lines {
            assert!(!threads.iter().any(|t| t.is_finished()), "a thread ended before writing its line");
            std::thread::yield_now();
        }
    }

    fn finished(journal: &Journal, call_id: &str) -> ToolResult {
        assert_eq!(journal.claim(call_id), Claim::New);
        journal.record_started(call_id).expect("started");
        let result = ToolResult::ok(call_id, format!("output of {call_id}"));
        journal.record_finished(&result).expect("finished");
        result
    }

    #[test]
    fn claims_once_and_remembers_results_across_reopening() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (journal, interrupted) = open(tmp.path(), JournalLimits::default());
        assert!(interrupted.is_empty());
        assert_eq!(journal.claim("a"), Claim::New);
        assert_eq!(journal.claim("a"), Claim::Running);
        journal.record_started("a").expect("started");
        let result = ToolResult::ok("a", "done");
        journal.record_finished(&result).expect("finished");
        assert_eq!(journal.claim("a"), Claim::Finished(result.clone()));
        drop(journal);

        let (journal, interrupted) = open(tmp.path(), JournalLimits::default());
        assert!(interrupted.is_empty());
        assert_eq!(journal.claim("a"), Claim::Finished(result));
    }

    #[test]
    fn started_but_unfinished_calls_become_interrupted_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (journal, _) = open(tmp.path(), JournalLimits::default());
        assert_eq!(journal.claim("a"), Claim::New);
        journal.record_started("a").expect("started");
        drop(journal);

        let (journal, interrupted) = open(tmp.path(), JournalLimits::default());
        assert_eq!(interrupted, vec![ToolResult::error("a", INTERRUPTED)]);
        assert_eq!(journal.claim("a"), Claim::Finished(ToolResult::error("a", INTERRUPTED)));
        drop(journal);
        let (journal, interrupted) = open(tmp.path(), JournalLimits::default());
        assert!(interrupted.is_empty(), "reported again: {interrupted:?}");
        assert_eq!(journal.claim("a"), Claim::Finished(ToolResult::error("a", INTERRUPTED)));
    }

    #[test]
    fn a_torn_last_line_is_ignored() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (journal, _) = open(tmp.path(), JournalLimits::default());
        let kept = finished(&journal, "a");
        assert_eq!(journal.claim("b"), Claim::New);
        journal.record_started("b").expect("started");
        drop(journal);
        let mut file = OpenOptions::new().append(true).open(tmp.path().join(JOURNAL_FILE)).expect("open");
        file.write_all(br#"{"event":"finished","call_id":"b","at":"x","result":{"call_id":"b","out"#).expect("write");
        drop(file);

        let (journal, interrupted) = open(tmp.path(), JournalLimits::default());
        assert_eq!(interrupted, vec![ToolResult::error("b", INTERRUPTED)]);
        assert_eq!(journal.claim("a"), Claim::Finished(kept));
        let text = std::fs::read_to_string(tmp.path().join(JOURNAL_FILE)).expect("read");
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.lines().all(|line| serde_json::from_str::<Line>(line).is_ok()), "{text}");
    }

    #[test]
    fn keeps_only_the_newest_calls_and_compacts_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let limits = JournalLimits { max_calls: 3, max_bytes: usize::MAX };
        let (journal, _) = open(tmp.path(), limits);
        for i in 0..20 {
            finished(&journal, &format!("c{i}"));
        }
        assert_eq!(journal.claim("c0"), Claim::New, "the oldest call is forgotten");
        journal.abandon("c0");
        assert!(matches!(journal.claim("c19"), Claim::Finished(_)));
        let lines = std::fs::read_to_string(tmp.path().join(JOURNAL_FILE)).expect("read").lines().count();
        assert!(lines <= 4 * 3, "{lines} lines");
        drop(journal);

        let (journal, _) = open(tmp.path(), limits);
        for i in 17..20 {
            assert!(matches!(journal.claim(&format!("c{i}")), Claim::Finished(_)), "c{i}");
        }
        assert_eq!(journal.claim("c16"), Claim::New);
    }

    #[test]
    fn the_byte_bound_forgets_large_results_first_in_first_out() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Each line is a little over 500 bytes: two fit.
        let limits = JournalLimits { max_calls: 100, max_bytes: 1200 };
        let (journal, _) = open(tmp.path(), limits);
        for i in 0..5 {
            let call_id = format!("big{i}");
            assert_eq!(journal.claim(&call_id), Claim::New);
            journal.record_finished(&ToolResult::ok(&call_id, "x".repeat(400))).expect("finished");
        }
        assert!(matches!(journal.claim("big4"), Claim::Finished(_)));
        assert!(matches!(journal.claim("big3"), Claim::Finished(_)));
        assert_eq!(journal.claim("big2"), Claim::New);
    }

    #[test]
    fn calls_writing_at_the_same_time_share_one_fsync() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (journal, _) = open(tmp.path(), JournalLimits::default());
        let journal = Arc::new(journal);
        let calls = 16;
        let threads = {
            // Someone else's fsync is under way while every call writes its line.
            let _syncing = journal.syncing.lock().expect("syncing");
            let threads: Vec<_> = (0..calls)
                .map(|i| {
                    let journal = Arc::clone(&journal);
                    std::thread::spawn(move || {
                        let call_id = format!("c{i}");
                        assert_eq!(journal.claim(&call_id), Claim::New);
                        journal.record_started(&call_id).expect("started");
                    })
                })
                .collect();
            wait_for_lines(&journal, calls, &threads);
            threads
        };
        for thread in threads {
            thread.join().expect("thread");
        }
        assert_eq!(journal.fsyncs.load(Ordering::Relaxed), 1, "one fsync covered all {calls} lines");
        assert_eq!(journal.durable().through, calls);

        // And what they wrote is all there after a restart.
        drop(Arc::into_inner(journal).expect("last reference"));
        let (_, interrupted) = open(tmp.path(), JournalLimits::default());
        let mut ids: Vec<String> = interrupted.into_iter().map(|r| r.call_id).collect();
        ids.sort();
        let mut expected: Vec<String> = (0..calls).map(|i| format!("c{i}")).collect();
        expected.sort();
        assert_eq!(ids, expected);
    }

    #[test]
    fn a_failed_fsync_fails_every_line_it_covered_and_the_journal_recovers() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (journal, _) = open(tmp.path(), JournalLimits::default());
        let journal = Arc::new(journal);
        let threads = {
            let _syncing = journal.syncing.lock().expect("syncing");
            let threads: Vec<_> = ["a", "b"]
                .into_iter()
                .map(|call_id| {
                    let journal = Arc::clone(&journal);
                    std::thread::spawn(move || {
                        assert_eq!(journal.claim(call_id), Claim::New);
                        journal.record_started(call_id)
                    })
                })
                .collect();
            wait_for_lines(&journal, 2, &threads);
            journal.fail_next_sync.store(true, Ordering::Relaxed);
            threads
        };
        for thread in threads {
            assert!(thread.join().expect("thread").is_err(), "a line the failed fsync covered reported durable");
        }
        assert_eq!(journal.fsyncs.load(Ordering::Relaxed), 1, "the second caller did not trust a second fsync");
        // The next line rewrites the file first, and is durable again.
        journal.abandon("a");
        journal.abandon("b");
        let kept = finished(&journal, "c");
        drop(Arc::into_inner(journal).expect("last reference"));
        let (journal, interrupted) = open(tmp.path(), JournalLimits::default());
        assert!(interrupted.is_empty(), "{interrupted:?}");
        assert_eq!(journal.claim("c"), Claim::Finished(kept));
    }

    /// A result whose line is written but not yet on disk: a repeat hears "running" (the result
    /// follows once it is durable), and a compaction meanwhile writes the result.
    #[test]
    fn a_result_is_not_handed_out_before_its_line_is_durable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (journal, _) = open(tmp.path(), JournalLimits::default());
        let journal = Arc::new(journal);
        assert_eq!(journal.claim("a"), Claim::New);
        journal.record_started("a").expect("started");
        let result = ToolResult::ok("a", "the output");
        let finishing = {
            let _syncing = journal.syncing.lock().expect("syncing");
            let finishing = {
                let (journal, result) = (Arc::clone(&journal), result.clone());
                std::thread::spawn(move || journal.record_finished(&result))
            };
            wait_for_lines(&journal, 2, std::slice::from_ref(&finishing));
            // Taking the file's lock waits for the other thread to be done with it: its result
            // is in memory, its fsync not yet run.
            journal.compact(&mut journal.writer()).expect("compact");
            assert_eq!(journal.claim("a"), Claim::Running);
            let text = std::fs::read_to_string(tmp.path().join(JOURNAL_FILE)).expect("read");
            assert!(text.contains("the output") && !text.contains("started"), "{text}");
            finishing
        };
        finishing.join().expect("thread").expect("finished");
        assert_eq!(journal.claim("a"), Claim::Finished(result));
    }

    /// A call claimed but not yet started when a compaction runs gets no `started` line: were the
    /// relay to stop before the call's own line, the call never ran and must not read as
    /// interrupted. A started one keeps its line.
    #[test]
    fn a_compaction_writes_started_lines_only_for_calls_that_started() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (journal, _) = open(tmp.path(), JournalLimits::default());
        assert_eq!(journal.claim("claimed"), Claim::New);
        assert_eq!(journal.claim("started"), Claim::New);
        journal.record_started("started").expect("started");
        journal.compact(&mut journal.writer()).expect("compact");
        let text = std::fs::read_to_string(tmp.path().join(JOURNAL_FILE)).expect("read");
        assert!(text.contains("\"started\"") && !text.contains("claimed"), "{text}");
        drop(journal);

        let (journal, interrupted) = open(tmp.path(), JournalLimits::default());
        let ids: Vec<&str> = interrupted.iter().map(|r| r.call_id.as_str()).collect();
        assert_eq!(ids, ["started"]);
        assert_eq!(journal.claim("claimed"), Claim::New, "a call that never started may run");
    }

    #[test]
    fn a_compaction_covers_lines_written_before_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let limits = JournalLimits { max_calls: 2, max_bytes: usize::MAX };
        let (journal, _) = open(tmp.path(), limits);
        for i in 0..12 {
            finished(&journal, &format!("c{i}"));
        }
        let fsyncs = journal.fsyncs.load(Ordering::Relaxed);
        assert!(fsyncs < 24, "compactions made some fsyncs unnecessary: {fsyncs}");
        let durable = journal.durable();
        assert_eq!(durable.through, durable.written);
    }

    #[test]
    fn remembered_reads_answer_repeats_but_stay_out_of_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let limits = JournalLimits { max_calls: 2, max_bytes: usize::MAX };
        let (journal, _) = open(tmp.path(), limits);
        assert_eq!(journal.claim("r"), Claim::New);
        let result = ToolResult::ok("r", "contents");
        journal.remember_finished(&result);
        assert_eq!(journal.claim("r"), Claim::Finished(result));
        assert_eq!(journal.fsyncs.load(Ordering::Relaxed), 0);
        assert_eq!(std::fs::read_to_string(tmp.path().join(JOURNAL_FILE)).expect("read"), "");
        // A read still running; a compaction now, and more from calls with effects.
        assert_eq!(journal.claim("reading"), Claim::New);
        journal.compact(&mut journal.writer()).expect("compact");
        assert_eq!(std::fs::read_to_string(tmp.path().join(JOURNAL_FILE)).expect("read"), "");
        let kept = finished(&journal, "w0");
        for i in 1..10 {
            finished(&journal, &format!("w{i}"));
        }
        let text = std::fs::read_to_string(tmp.path().join(JOURNAL_FILE)).expect("read");
        assert!(!text.contains("\"r\"") && !text.contains("reading"), "{text}");
        drop(journal);
        // After a restart the running read is not "interrupted": it may simply run again.
        let (journal, interrupted) = open(tmp.path(), limits);
        assert!(interrupted.is_empty(), "{interrupted:?}");
        assert_eq!(journal.claim("reading"), Claim::New);
        assert_eq!(journal.claim("w0"), Claim::New, "w0 was forgotten ({kept:?})");
        assert!(matches!(journal.claim("w9"), Claim::Finished(_)));
    }

    #[test]
    fn many_large_reads_do_not_push_out_the_results_of_calls_with_effects() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let limits = JournalLimits { max_calls: 3, max_bytes: 10_000 };
        let (journal, _) = open(tmp.path(), limits);
        let kept = finished(&journal, "write");
        for i in 0..20 {
            let id = format!("read{i}");
            assert_eq!(journal.claim(&id), Claim::New);
            journal.remember_finished(&ToolResult::ok(&id, "x".repeat(3_000)));
        }
        assert_eq!(journal.claim("write"), Claim::Finished(kept));
        assert!(matches!(journal.claim("read19"), Claim::Finished(_)));
        assert_eq!(journal.claim("read0"), Claim::New, "reads keep to their own budget");
    }

    /// A line written while an fsync ran, whose own fsync comes after that one failed: it must
    /// not count as durable, and nor may the lines the failed fsync covered.
    #[test]
    fn after_a_failed_fsync_no_line_in_doubt_reads_as_durable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (journal, _) = open(tmp.path(), JournalLimits::default());
        let line = |id: &str| line_bytes(&LineOut::Started { call_id: id, at: &now() }).expect("line");
        let first = journal.append(&mut journal.writer(), &line("a")).expect("append");
        let second = journal.append(&mut journal.writer(), &line("b")).expect("append");
        journal.fail_next_sync.store(true, Ordering::Relaxed);
        assert!(journal.sync_through(first).is_err());
        // As if the third line had been written before the failure was noticed.
        journal.writer().damaged = false;
        let third = journal.append(&mut journal.writer(), &line("c")).expect("append");
        assert!(journal.sync_through(third).is_err(), "a line written around the failure");
        assert!(journal.sync_through(second).is_err(), "a line the failed fsync covered");
        // The next compaction rewrites the file from memory and everything is durable again.
        journal.compact(&mut journal.writer()).expect("compact");
        let fourth = journal.append(&mut journal.writer(), &line("d")).expect("append");
        journal.sync_through(fourth).expect("durable again");
    }

    #[test]
    fn a_second_process_cannot_open_the_same_journal() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (journal, _) = open(tmp.path(), JournalLimits::default());
        let Err(err) = Journal::open(tmp.path(), JournalLimits::default()) else { panic!("opened twice") };
        assert!(err.to_string().contains("in use by another relay process"), "{err}");
        drop(journal);
        open(tmp.path(), JournalLimits::default());
    }
}
