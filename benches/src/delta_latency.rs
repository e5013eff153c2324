//! The `delta-latency` scenario: how much time agentplane adds between a provider writing a
//! piece of text and a WebSocket client receiving it as a `message_delta`.
//!
//! The scripted LLM runs in this process and logs when it wrote each piece
//! ([`ScriptedLlmBuilder::write_log`](agentplane_tests::scripted_llm::ScriptedLlmBuilder::write_log));
//! a real `agentplane serve` process streams the chat's events to this process's WebSocket
//! client, which notes when each text delta arrived. Both clocks are this process's monotonic
//! clock, so the difference is the whole path: the server's socket read, SSE and JSON decoding,
//! the chat actor, the event fan-out, WebSocket framing and the client's read. Pieces are paced
//! (`piece_delay_ms` apart) as a model streams them, so each one travels alone.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentplane_schema::api::{ChatStatus, CreateChat, SendMessage};
use agentplane_schema::event::{DeltaKind, EventBody};
use agentplane_schema::message::Part;
use agentplane_tests::{ApiClient, EventStream, Reply, ScriptedLlm};
use anyhow::{Context, bail, ensure};
use serde_json::json;

use crate::{ADMIN_TOKEN, ServerProcess, machine, setup, summarize};

pub const DEFAULT_TURNS: usize = 50;
pub const DEFAULT_PIECES: usize = 40;
pub const DEFAULT_PIECE_DELAY_MS: u64 = 5;

/// How long one turn may take before the run fails.
const WAIT: Duration = Duration::from_secs(60);
/// The user messages of measured turns start with this; anything else (the chat's first
/// message) is answered with a plain `ok`.
const TURN_PREFIX: &str = "delta-latency turn ";

/// Runs `turns` sequential turns of one chat, each answered with `pieces` text pieces written
/// `piece_delay_ms` apart, and returns the added latency per piece (percentiles in ms). Fails if
/// any written piece did not arrive as its own delta, or a delta arrived that was not written.
pub async fn run(
    server_bin: Option<PathBuf>,
    turns: usize,
    pieces: usize,
    piece_delay_ms: u64,
) -> anyhow::Result<serde_json::Value> {
    run_fanout(server_bin, 1, 1, turns, pieces, piece_delay_ms).await
}

/// The `fanout` scenario: `chats` chats stream their turns at the same time, each watched by
/// `watchers` WebSocket clients; the latency of every piece at every watcher is measured as in
/// [`run`] (which is this with one chat and one watcher).
pub async fn run_fanout(
    server_bin: Option<PathBuf>,
    chats: usize,
    watchers: usize,
    turns: usize,
    pieces: usize,
    piece_delay_ms: u64,
) -> anyhow::Result<serde_json::Value> {
    // Without a delay the scripted LLM writes the whole answer at once: no per-piece times.
    ensure!(piece_delay_ms > 0, "--piece-delay-ms must be at least 1");
    ensure!(turns > 0 && pieces > 0 && chats > 0 && watchers > 0, "counts must be at least 1");
    let machine = machine();
    let piece_chars = piece_width(pieces);
    let delay = Duration::from_millis(piece_delay_ms);
    let llm = ScriptedLlm::builder()
        .write_log(true)
        .workers(2)
        .responder(move |req| match req.last_user_text() {
            Some(text) if text.starts_with(TURN_PREFIX) => {
                Reply::text(turn_text(pieces)).chunk_chars(piece_chars).chunk_delay(delay)
            }
            _ => Reply::text("ok"),
        })
        .start();
    // Title calls would be model requests outside the turns; they are not what is measured.
    let server = ServerProcess::start(server_bin, &[("AGENTPLANE__AGENT__GENERATE_TITLES", "false".into())]).await?;
    let admin = setup(&server, &llm).await?;

    let started = Instant::now();
    let drivers: Vec<_> = (0..chats)
        .map(|c| {
            let admin = admin.clone();
            let base = server.base_url.clone();
            tokio::spawn(async move { drive_chat(admin, base, c, watchers, turns, pieces).await })
        })
        .collect();
    // Per chat, per watcher, per turn: each text delta's arrival time and text, in order.
    let mut arrivals = Vec::with_capacity(chats);
    for driver in drivers {
        arrivals.push(driver.await??);
    }
    let wall = started.elapsed();

    let written = llm.write_times();
    let requests = llm.requests();
    let expected: Vec<String> = (0..pieces).map(|k| piece(k, piece_chars)).collect();
    let mut latencies = Vec::with_capacity(chats * watchers * turns * pieces);
    for (c, per_watcher) in arrivals.iter().enumerate() {
        for turn in 0..turns {
            let message = turn_message(c, turn);
            let request: Vec<usize> = requests
                .iter()
                .filter(|r| r.last_user_text().as_deref() == Some(message.as_str()))
                .map(|r| r.index)
                .collect();
            let [request] = request[..] else {
                bail!("chat {c} turn {turn}: {} model requests instead of one (a retry?)", request.len());
            };
            // The role chunk is message 0 and carries no text; text piece k is message k + 1.
            let mut writes: Vec<(usize, Instant)> = written
                .iter()
                .filter(|w| w.request == request && (1..=pieces).contains(&w.message))
                .map(|w| (w.message - 1, w.at))
                .collect();
            writes.sort_by_key(|(k, _)| *k);
            for (w, turns_seen) in per_watcher.iter().enumerate() {
                // Pieces that reached the server together come in one delta: each counts from
                // its own write to that delta's arrival.
                let deltas = split_pieces(&turns_seen[turn], piece_chars)
                    .with_context(|| format!("chat {c} turn {turn} watcher {w}"))?;
                if writes.len() != pieces || deltas.len() != pieces {
                    bail!(
                        "chat {c} turn {turn} watcher {w}: {} of {pieces} pieces written, {} text deltas received",
                        writes.len(),
                        deltas.len()
                    );
                }
                for ((k, wrote), (arrived, text)) in writes.iter().zip(&deltas) {
                    ensure!(
                        *text == expected[*k],
                        "chat {c} turn {turn}: delta {k} is {text:?}, the piece written was {:?}",
                        expected[*k]
                    );
                    latencies.push(signed_ms(*arrived, *wrote));
                }
            }
        }
    }
    let matched = latencies.len();
    let early = latencies.iter().filter(|ms| **ms < 0.0).count();
    let summary = summarize(latencies);

    let scenario = if chats == 1 && watchers == 1 { "delta-latency" } else { "fanout" };
    println!(
        "scenario {scenario}: {chats} chat(s) × {watchers} watcher(s), {turns} turns × {pieces} text pieces of \
         {piece_chars} chars, {piece_delay_ms} ms apart; scripted model in this process"
    );
    println!("{:<34} {:>9} {:>9} {:>9} {:>9}", "", "p50 ms", "p90 ms", "p99 ms", "max ms");
    println!(
        "{:<34} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
        "provider write → WebSocket delta", summary.p50, summary.p90, summary.p99, summary.max
    );
    println!("pieces matched: {matched} of {}; wall {:.1} s", chats * watchers * turns * pieces, wall.as_secs_f64());
    if early > 0 {
        // The write is timed after `write` returns; a fast server can beat that clock read.
        println!("{early} pieces arrived before the write was timed (counted as negative latency)");
    }
    println!("machine: {} cores, load average {} at start", machine["cores"], machine["load_average"]);
    Ok(json!({
        "scenario": scenario,
        "chats": chats,
        "watchers": watchers,
        "turns": turns,
        "pieces": pieces,
        "piece_chars": piece_chars,
        "piece_delay_ms": piece_delay_ms,
        "matched": matched,
        "arrived_before_write_timed": early,
        "added_latency_ms": summary,
        "machine": machine,
    }))
}

fn turn_message(chat: usize, turn: usize) -> String {
    format!("{TURN_PREFIX}{chat}-{turn}")
}

type Arrivals = Vec<Vec<(Instant, String)>>;

/// Creates chat `c`, opens `watchers` streams on it, runs its turns one after the other, and
/// returns what each watcher saw per turn.
async fn drive_chat(
    admin: ApiClient,
    base: String,
    c: usize,
    watchers: usize,
    turns: usize,
    pieces: usize,
) -> anyhow::Result<Vec<Arrivals>> {
    let chat = admin
        .create_chat(&CreateChat { content: vec![Part::text("hi")], model_id: None, workspace_id: None, title: None })
        .await?;
    let mut first = EventStream::connect(&base, &chat.id, ADMIN_TOKEN, Some(0)).await?;
    first.wait_for_status(ChatStatus::Idle, WAIT).await?;
    // The other watchers join now and see only what follows.
    let mut streams = vec![first];
    for _ in 1..watchers {
        let mut stream = EventStream::connect(&base, &chat.id, ADMIN_TOKEN, None).await?;
        // The session subscribes after the handshake; what it sends follows its snapshot, so a
        // turn started before the snapshot arrived could be in the snapshot instead of the stream.
        stream.wait_for(|e| matches!(e.body, EventBody::Snapshot { .. }), WAIT).await?;
        streams.push(stream);
    }
    let mut tasks = Vec::with_capacity(watchers);
    let (go_tx, go_rx) = tokio::sync::watch::channel(0usize);
    // Each watcher reports the turns it saw end (`idle` on its stream): the next turn starts when
    // every watcher saw this one end, so the driver waits on the events it measures instead of
    // polling the chat over REST while the other chats stream.
    let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    for mut stream in streams {
        let mut go = go_rx.clone();
        let ended = ended_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen: Arrivals = Vec::with_capacity(turns);
            for turn in 0..turns {
                go.wait_for(|t| *t > turn).await?;
                let mut deltas = Vec::with_capacity(pieces);
                stream
                    .wait_for(
                        |e| match &e.body {
                            EventBody::MessageDelta { kind: DeltaKind::Text, text, .. } => {
                                deltas.push((Instant::now(), text.clone()));
                                false
                            }
                            EventBody::Status { status: ChatStatus::Idle, .. } => true,
                            _ => false,
                        },
                        WAIT,
                    )
                    .await
                    .with_context(|| format!("turn {turn}"))?;
                seen.push(deltas);
                let _ = ended.send(turn);
            }
            anyhow::Ok(seen)
        }));
    }
    drop(ended_tx);
    let driven = async {
        for turn in 0..turns {
            let message =
                SendMessage { content: vec![Part::text(turn_message(c, turn))], busy_behavior: Default::default() };
            admin.send(&chat.id, &message).await?;
            go_tx.send_replace(turn + 1);
            for _ in 0..watchers {
                match tokio::time::timeout(WAIT, ended_rx.recv()).await {
                    Ok(Some(ended)) if ended == turn => {}
                    Ok(Some(ended)) => bail!("chat {c}: a watcher reported turn {ended} ended during turn {turn}"),
                    Ok(None) => bail!("chat {c} turn {turn}: the watchers stopped"),
                    Err(_) => bail!("chat {c} turn {turn}: the watchers did not see it end within {WAIT:?}"),
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    // Watchers still waiting for a turn that will not come stop when the sender goes.
    drop(go_tx);
    let mut done = Vec::with_capacity(watchers);
    let mut failed = Vec::new();
    for (w, task) in tasks.into_iter().enumerate() {
        match task.await? {
            Ok(seen) => done.push(seen),
            Err(e) => failed.push(format!("watcher {w}: {e:#}")),
        }
    }
    match (driven, failed.is_empty()) {
        (Ok(()), true) => {}
        (Ok(()), false) => bail!("chat {c}: {}", failed.join("; ")),
        (Err(e), _) => return Err(e.context(format!("watchers: {}", failed.join("; ")))),
    }
    Ok(done)
}

/// Each delta's text cut into the pieces it holds (each `width` characters), with the delta's
/// arrival time.
fn split_pieces(deltas: &[(Instant, String)], width: usize) -> anyhow::Result<Vec<(Instant, String)>> {
    let mut pieces = Vec::with_capacity(deltas.len());
    for (arrived, text) in deltas {
        let chars: Vec<char> = text.chars().collect();
        ensure!(
            !chars.is_empty() && chars.len().is_multiple_of(width),
            "a delta of {} characters is not whole pieces of {width}: {text:?}",
            chars.len()
        );
        pieces.extend(chars.chunks(width).map(|piece| (*arrived, piece.iter().collect())));
    }
    Ok(pieces)
}

/// Characters per piece: room for the largest piece number and a space, at least a token's 4.
fn piece_width(pieces: usize) -> usize {
    (pieces.saturating_sub(1).to_string().len() + 1).max(4)
}

/// Piece `k`: its number right-aligned and a space, so every piece is distinct and exactly
/// `width` characters (the scripted LLM cuts the text at that width).
fn piece(k: usize, width: usize) -> String {
    format!("{k:>w$} ", w = width - 1)
}

fn turn_text(pieces: usize) -> String {
    let width = piece_width(pieces);
    (0..pieces).map(|k| piece(k, width)).collect()
}

/// `later − earlier` in ms, negative when `later` came first.
fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(d) => d.as_secs_f64() * 1000.0,
        None => -(earlier.duration_since(later).as_secs_f64() * 1000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_distinct_and_as_wide_as_the_cut() {
        assert_eq!(piece_width(40), 4);
        assert_eq!(piece_width(1000), 4);
        assert_eq!(piece_width(1001), 5);
        assert_eq!(turn_text(3), "  0   1   2 ");
        let all: std::collections::BTreeSet<String> = (0..1001).map(|k| piece(k, 5)).collect();
        assert!(all.len() == 1001 && all.iter().all(|p| p.chars().count() == 5));
    }

    #[test]
    fn a_delta_of_several_pieces_counts_each_piece_at_its_arrival() {
        let (first, second) = (Instant::now(), Instant::now() + Duration::from_millis(3));
        let deltas = [(first, "  0 ".to_string()), (second, "  1   2 ".to_string())];
        let split = split_pieces(&deltas, 4).expect("whole pieces");
        assert_eq!(split, [(first, "  0 ".into()), (second, "  1 ".into()), (second, "  2 ".into())]);
        assert!(split_pieces(&[(first, "  1  ".to_string())], 4).is_err(), "not whole pieces");
    }
}
