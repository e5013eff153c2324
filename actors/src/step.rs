//! One step of the agent loop: stream the model's answer (retrying what can be retried), commit
//! it with its tool calls, run the tool calls in parallel, commit their results.
//!
//! A step runs as a future spawned on its chat actor, so the actor's mailbox stays responsive; an
//! interrupt cancels the step's token and the step itself stores what it has (the partial answer,
//! "interrupted" results for open tool calls) before it returns.

use std::sync::Arc;
use std::time::Duration;

use agentplane_schema::api::{ChatError, ChatErrorKind, UsageTotals};
use agentplane_schema::event::{DeltaKind, EventBody, ToolPhase};
use agentplane_schema::message::{Message, Part, Role};
use agentplane_schema::new_id;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::deps::Deps;
use crate::ports::{
    ModelError, ModelEvent, ModelRequest, Op, ResolvedModel, StopReason, StoreError, ToolCallStatus, Usage,
};
use crate::shared::ChatShared;
use crate::tools::{self, ToolContext, ToolOutcome};
use crate::{compaction, prompt};

pub struct StepInput {
    pub deps: Arc<Deps>,
    pub shared: Arc<ChatShared>,
    /// The chat's history when the step started: the actor's snapshot, shared, not copied.
    pub history: Arc<Vec<Message>>,
    pub model_id: Option<String>,
    pub user_id: String,
    pub cancel: CancellationToken,
    /// The chat's own actor, for the sub-agent tools.
    pub agent: actix::Addr<crate::chat::ChatActor>,
    /// Only summarise the conversation (`POST /chats/{id}/compact`), no model answer.
    pub compact_only: bool,
}

/// Largest share of the context window one tool result may take; longer ones are cut in the
/// middle.
const TOOL_RESULT_SHARE: f64 = 0.25;

#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// The model called tools: another step follows.
    Continue,
    /// The model answered without tool calls.
    Done,
    /// The model answered without tool calls, and the answer's commit also ended the turn: the
    /// chat is `idle` in the database.
    Ended,
    Interrupted,
    Failed(ChatError),
    /// The step's task panicked: nothing it held in memory can be trusted, only what it committed.
    Crashed(String),
}

pub struct StepResult {
    pub outcome: StepOutcome,
    /// Messages this step committed, in order.
    pub committed: Vec<Message>,
    /// Ids of messages this step soft-deleted (moved after a summary).
    pub dropped: Vec<String>,
}

/// The answer as it streams in.
#[derive(Default)]
struct Draft {
    reasoning: String,
    reasoning_signature: Option<String>,
    text: String,
    calls: Vec<DraftCall>,
    usage: Usage,
    stop: Option<StopReason>,
    /// Whether any delta reached the clients (a retry must then reset their view).
    emitted: bool,
}

struct DraftCall {
    index: usize,
    call_id: String,
    name: String,
    args: String,
}

enum Streamed {
    Complete,
    Interrupted,
}

pub async fn run_step(mut input: StepInput) -> StepResult {
    // The step reads the actor's snapshot; only compaction, which changes it, makes a copy.
    let history = std::mem::take(&mut input.history);
    let mut result = StepResult { outcome: StepOutcome::Done, committed: Vec::new(), dropped: Vec::new() };
    result.outcome = match step(&input, history, &mut result).await {
        Ok(outcome) => outcome,
        Err(e) => StepOutcome::Failed(ChatError { kind: ChatErrorKind::Internal, message: e.to_string() }),
    };
    result
}

/// Compacts once; the working history and the step's result follow.
async fn compact_into(
    input: &StepInput,
    model: &ResolvedModel,
    history: &mut Vec<Message>,
    result: &mut StepResult,
) -> Result<Option<ChatError>, StoreError> {
    match compaction::compact(input, model, history).await? {
        Ok(c) => {
            history.retain(|m| !c.dropped.contains(&m.id));
            history.extend(c.committed.iter().cloned());
            result.committed.retain(|m| !c.dropped.contains(&m.id));
            result.dropped.extend(c.dropped);
            result.committed.extend(c.committed);
            Ok(None)
        }
        Err(e) => Ok(Some(e)),
    }
}

async fn step(
    input: &StepInput,
    mut history: Arc<Vec<Message>>,
    result: &mut StepResult,
) -> Result<StepOutcome, StoreError> {
    let model = match input.deps.store.resolve_model(input.model_id.as_deref()).await {
        Ok(m) => m,
        Err(StoreError::NotFound(what)) => {
            return Ok(StepOutcome::Failed(ChatError {
                kind: ChatErrorKind::Config,
                message: format!("no usable model: {what}; an administrator must add a provider and a model"),
            }));
        }
        Err(e) => return Err(e),
    };
    if input.compact_only {
        return Ok(match compact_into(input, &model, Arc::make_mut(&mut history), result).await? {
            None => StepOutcome::Done,
            Some(e) => StepOutcome::Failed(e),
        });
    }
    let mut tries = 0;
    let mut draft = Draft::default();
    let streamed = loop {
        while compaction::over_threshold(input, &model, &history) {
            if tries == compaction::MAX_TRIES {
                return Ok(StepOutcome::Failed(compaction::overflow(format!(
                    "the conversation does not fit the model's context window even after {tries} summaries"
                ))));
            }
            tries += 1;
            if let Some(e) = compact_into(input, &model, Arc::make_mut(&mut history), result).await? {
                return Ok(StepOutcome::Failed(e));
            }
        }
        let (messages, image_ids) = input.shared.prompt(&history);
        if !image_ids.is_empty() && !model.vision {
            return Ok(StepOutcome::Failed(ChatError {
                kind: ChatErrorKind::Config,
                message: format!(
                    "the model `{}` does not accept images (it is not marked `vision`); choose a vision model",
                    model.target.model
                ),
            }));
        }
        let images = if image_ids.is_empty() { Default::default() } else { input.shared.images(&image_ids).await? };
        let request = ModelRequest {
            target: model.target.clone(),
            system: prompt::system_prompt(&input.deps.settings.agent.system_prompt),
            messages,
            tools: tools::specs(),
            images,
            memo: input.shared.prompt_memo(),
        };
        match stream_with_retries(input, &request, &mut draft).await? {
            Ok(s) => break s,
            // The provider counts better than we estimate: summarise and try again.
            Err(e) if e.kind == ChatErrorKind::ContextOverflow && tries < compaction::MAX_TRIES => {
                tries += 1;
                if let Some(e) = compact_into(input, &model, Arc::make_mut(&mut history), result).await? {
                    return Ok(StepOutcome::Failed(e));
                }
            }
            Err(e) => return Ok(StepOutcome::Failed(ChatError { kind: e.kind, message: e.message })),
        }
    };
    let committed = &mut result.committed;

    if let Streamed::Interrupted = streamed {
        // Keep what the user saw; tool calls still being written are dropped, never run.
        let mut parts = Vec::new();
        push_text_parts(&mut parts, &draft);
        if !parts.is_empty() {
            let message = new_message(input, Role::Assistant, parts, true, Some(&model));
            input
                .shared
                .commit(vec![Op::InsertMessage(message.clone())], vec![EventBody::Message { message: message.clone() }])
                .await?;
            committed.push(message);
        } else if draft.emitted {
            // Nothing to keep (say, only a tool call being written): its pieces are void.
            input.shared.publish(EventBody::StreamReset);
        }
        return Ok(StepOutcome::Interrupted);
    }

    let mut parts = Vec::new();
    push_text_parts(&mut parts, &draft);
    let calls: Vec<(String, String, Value)> = draft
        .calls
        .iter()
        .map(|c| {
            let call_id = if c.call_id.is_empty() { format!("call_{}", new_id()) } else { c.call_id.clone() };
            (call_id, c.name.clone(), parse_args(&c.args))
        })
        .collect();
    // Our own id per call: provider ids may repeat across turns and may not be NATS subject tokens.
    let wire_ids: Vec<String> = calls.iter().map(|_| new_id()).collect();
    for (call_id, name, args) in &calls {
        parts.push(Part::ToolCall { call_id: call_id.clone(), name: name.clone(), args: args.clone() });
    }
    let assistant = new_message(input, Role::Assistant, parts, false, Some(&model));
    let workspace_id = input.shared.workspace_id();
    let mut ops = vec![Op::InsertMessage(assistant.clone())];
    let mut events = vec![EventBody::Message { message: assistant.clone() }];
    for ((call_id, name, args), wire_id) in calls.iter().zip(&wire_ids) {
        ops.push(Op::InsertToolCall {
            id: wire_id.clone(),
            call_id: call_id.clone(),
            message_id: assistant.id.clone(),
            name: name.clone(),
            args: args.clone(),
            user_id: input.user_id.clone(),
            workspace_id: workspace_id.clone(),
        });
        events.push(EventBody::ToolCall {
            phase: ToolPhase::Started,
            call_id: call_id.clone(),
            name: name.clone(),
            args: Some(args.clone()),
            output: None,
            is_error: None,
            workspace_id: workspace_id.clone(),
        });
    }
    let cost_usd = model.prices.cost(&draft.usage);
    ops.push(Op::RecordUsage {
        message_id: assistant.id.clone(),
        model_id: model.id.clone(),
        usage: draft.usage,
        cost_usd,
    });
    events.push(EventBody::Usage {
        message_id: assistant.id.clone(),
        model_id: model.id.clone(),
        usage: UsageTotals {
            input_tokens: draft.usage.input_tokens,
            output_tokens: draft.usage.output_tokens,
            cache_read_tokens: draft.usage.cache_read_tokens,
            cache_write_tokens: draft.usage.cache_write_tokens,
            cost_usd: cost_usd.unwrap_or(0.0),
            calls: 1,
        },
    });
    let filtered = draft.stop == Some(StopReason::ContentFilter);
    let ended = if calls.is_empty() && !filtered {
        input.shared.commit_answer(ops, events, &input.cancel).await?
    } else {
        input.shared.commit(ops, events).await?;
        false
    };
    input.shared.record_usage(draft.usage.input_tokens + draft.usage.output_tokens, assistant.position);
    let assistant_id = assistant.id.clone();
    committed.push(assistant);

    if calls.is_empty() {
        return Ok(match (filtered, ended) {
            (true, _) => StepOutcome::Failed(ChatError {
                kind: ChatErrorKind::ContentFilter,
                message: "the provider's content filter stopped the answer".into(),
            }),
            (false, true) => StepOutcome::Ended,
            (false, false) => StepOutcome::Done,
        });
    }

    let ctx = ToolContext {
        deps: input.deps.clone(),
        shared: input.shared.clone(),
        user_id: input.user_id.clone(),
        cancel: input.cancel.clone(),
        agent: input.agent.clone(),
    };
    let result_cap = (model.context_window.max(1) as f64 * 4.0 * TOOL_RESULT_SHARE) as usize;
    let finishing = Finishing {
        calls: &calls,
        wire_ids: &wire_ids,
        message_id: &assistant_id,
        result_cap,
        committed: std::sync::Mutex::new(vec![None; calls.len()]),
        results: Default::default(),
    };
    let runs = (0..calls.len()).map(|index| run_and_record(&ctx, input, &finishing, index));
    let outcomes = futures::future::join_all(runs).await.into_iter().collect::<Result<Vec<_>, _>>()?;
    let interrupted = outcomes.iter().any(|o| o.interrupted);
    let results = match finishing.results.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(results) => results,
        // Calls finished together and none saw all the others committed: the results alone.
        None => {
            let results = results_message(input, &calls, outcomes.iter());
            input
                .shared
                .commit(vec![Op::InsertMessage(results.clone())], vec![EventBody::Message { message: results.clone() }])
                .await?;
            results
        }
    };
    committed.push(results);
    Ok(if interrupted || input.cancel.is_cancelled() { StepOutcome::Interrupted } else { StepOutcome::Continue })
}

/// A step's tool calls as they finish. Each call's finish is committed as soon as it has run; the
/// call that finishes when every other one is already committed also commits the tool results
/// message in the same transaction (with one call, always), which saves a commit per step.
struct Finishing<'a> {
    /// Each call's id, name and arguments.
    calls: &'a [(String, String, Value)],
    /// Our own id of each call.
    wire_ids: &'a [String],
    /// The assistant message that made the calls.
    message_id: &'a str,
    /// The longest result kept.
    result_cap: usize,
    /// The outcomes of the calls whose finish is committed, by call.
    committed: std::sync::Mutex<Vec<Option<ToolOutcome>>>,
    /// The results message, once a call committed it.
    results: std::sync::Mutex<Option<Message>>,
}

/// The tool results message: one result part per call, in the calls' order.
fn results_message<'a>(
    input: &StepInput,
    calls: &[(String, String, Value)],
    outcomes: impl Iterator<Item = &'a ToolOutcome>,
) -> Message {
    let mut interrupted = false;
    let parts = calls
        .iter()
        .zip(outcomes)
        .map(|((call_id, name, _), outcome)| {
            interrupted |= outcome.interrupted;
            Part::ToolResult {
                call_id: call_id.clone(),
                name: name.clone(),
                result: outcome.output.clone(),
                is_error: outcome.is_error,
            }
        })
        .collect();
    new_message(input, Role::Tool, parts, interrupted, None)
}

/// Runs call `index` and commits its finish (see [`Finishing`]).
async fn run_and_record(
    ctx: &ToolContext,
    input: &StepInput,
    finishing: &Finishing<'_>,
    index: usize,
) -> Result<ToolOutcome, StoreError> {
    let (call_id, name, args) = &finishing.calls[index];
    let (wire_id, message_id, result_cap) = (&finishing.wire_ids[index], finishing.message_id, finishing.result_cap);
    let mut outcome = if args.is_object() {
        tools::run(ctx, wire_id, call_id, name, args).await
    } else {
        ToolOutcome::error(format!("the arguments of `{name}` must be a JSON object, got: {args}"))
    };
    outcome.output = cut_middle(&outcome.output, result_cap);
    let status = if outcome.interrupted { ToolCallStatus::Interrupted } else { ToolCallStatus::Done };
    let mut ops = vec![
        Op::FinishToolCall {
            call_id: call_id.to_string(),
            message_id: message_id.to_string(),
            status,
            result: outcome.output.clone(),
            is_error: outcome.is_error,
            exit_code: outcome.exit_code,
            duration_ms: outcome.duration_ms,
            workspace_id: outcome.workspace_id.clone(),
        },
        Op::Audit {
            user_id: Some(ctx.user_id.clone()),
            action: "tool.executed".into(),
            target_type: "tool_call".into(),
            target_id: Some(call_id.to_string()),
            details: json!({
                "chat_id": ctx.shared.chat_id,
                "tool": name,
                "workspace_id": outcome.workspace_id,
                "is_error": outcome.is_error,
                "status": status.as_str(),
            }),
        },
    ];
    let mut events = vec![EventBody::ToolCall {
        phase: ToolPhase::Finished,
        call_id: call_id.to_string(),
        name: name.to_string(),
        args: None,
        output: Some(outcome.output.clone()),
        is_error: Some(outcome.is_error),
        workspace_id: outcome.workspace_id.clone(),
    }];
    // Every other call committed: this one is the last, and its commit carries the results.
    // Only a call that did not take this role records its outcome, after its commit, so at
    // most one call takes it.
    let results = {
        let done = finishing.committed.lock().unwrap_or_else(|p| p.into_inner());
        let others = done.iter().enumerate().filter(|(i, _)| *i != index);
        match others.map(|(_, o)| o.as_ref()).collect::<Option<Vec<_>>>() {
            Some(mut outcomes) => {
                outcomes.insert(index, &outcome);
                Some(results_message(input, finishing.calls, outcomes.into_iter()))
            }
            None => None,
        }
    };
    if let Some(results) = &results {
        ops.push(Op::InsertMessage(results.clone()));
        events.push(EventBody::Message { message: results.clone() });
    }
    // The step's last commit, when another step follows it: the next model request need not
    // wait for it (see `ChatShared::commit_ahead`). A stop before it lands leaves these calls
    // without stored results, which recovery marks "outcome unknown", as it did when the stop
    // came while the step waited for the same commit.
    let next_step_follows = !ctx.cancel.is_cancelled() && !ctx.shared.queue_waiting();
    match results.as_ref().filter(|r| next_step_follows && !r.interrupted) {
        Some(results) => ctx.shared.commit_ahead(results.id.clone(), ops, events).await,
        None => ctx.shared.commit(ops, events).await?,
    }
    match results {
        Some(results) => *finishing.results.lock().unwrap_or_else(|p| p.into_inner()) = Some(results),
        None => finishing.committed.lock().unwrap_or_else(|p| p.into_inner())[index] = Some(outcome.clone()),
    }
    Ok(outcome)
}

/// Streams the answer into `draft`, retrying retryable failures with exponential backoff and
/// jitter (a provider's `retry-after` sets the delay). The outer error is a store failure; the
/// inner one the model error that ended the step.
async fn stream_with_retries(
    input: &StepInput,
    request: &ModelRequest,
    draft: &mut Draft,
) -> Result<Result<Streamed, ModelError>, StoreError> {
    let retry = &input.deps.settings.llm.retry;
    let max_delay = Duration::from_millis(retry.max_delay_ms);
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(retry.initial_delay_ms))
        .with_max_delay(max_delay)
        .with_max_times(retry.max_attempts.saturating_sub(1))
        .with_jitter()
        .build();
    let mut attempt = 1u32;
    loop {
        *draft = Draft::default();
        let error = match stream_once(input, request, draft).await {
            Ok(streamed) => return Ok(Ok(streamed)),
            Err(e) => e,
        };
        if draft.emitted {
            input.shared.publish(EventBody::StreamReset);
        }
        let delay = match delays.next() {
            Some(d) if error.retryable => error.retry_after.map(|r| r.min(max_delay)).unwrap_or(d),
            _ => return Ok(Err(error)),
        };
        tracing::info!(chat = %input.shared.chat_id, attempt, ?delay, error = %error, "model call failed, retrying");
        input
            .shared
            .commit(
                vec![],
                vec![EventBody::Retry {
                    attempt,
                    delay_ms: delay.as_millis() as u64,
                    error: ChatError { kind: error.kind, message: error.message.clone() },
                }],
            )
            .await?;
        tokio::select! {
            _ = input.cancel.cancelled() => {
                *draft = Draft::default();
                return Ok(Ok(Streamed::Interrupted));
            }
            _ = tokio::time::sleep(delay) => {}
        }
        attempt += 1;
    }
}

/// Most pieces of an answer merged into one delta: a stream that keeps arriving still reaches
/// watchers as it goes.
const MAX_PIECES_AT_ONCE: usize = 64;

async fn stream_once(input: &StepInput, request: &ModelRequest, draft: &mut Draft) -> Result<Streamed, ModelError> {
    let mut stream = tokio::select! {
        biased;
        _ = input.cancel.cancelled() => return Ok(Streamed::Interrupted),
        s = input.deps.model.stream(request.clone()) => s?,
    };
    // The previous step's results may still be landing (`ChatShared::commit_ahead`): nothing of
    // this answer goes out before them, and nothing of it at all if they could not be stored.
    if let Some(error) = input.shared.settle().await {
        return Err(ModelError::new(ChatErrorKind::Internal, error));
    }
    // Pieces that arrive together reach watchers as one delta: one event to publish, serialise
    // and send instead of one per piece. Nothing waits for more than what has arrived.
    let mut deltas = Deltas::default();
    let mut yielded = false;
    loop {
        let next = if deltas.is_empty() {
            tokio::select! {
                biased;
                _ = input.cancel.cancelled() => return Ok(Streamed::Interrupted),
                e = stream.next() => Some(e),
            }
        } else {
            stream.next().now_or_never()
        };
        match next {
            Some(None) => {
                deltas.publish(input);
                return Ok(Streamed::Complete);
            }
            Some(Some(Err(e))) => {
                deltas.publish(input);
                return Err(e);
            }
            Some(Some(Ok(event))) => {
                apply(draft, event, &mut deltas);
                yielded = false;
                if deltas.pieces >= MAX_PIECES_AT_ONCE {
                    deltas.publish(input);
                }
            }
            // Nothing more yet. The HTTP client's connection task, on this thread, may hold more
            // of what arrived with these pieces: it gets a turn before they go out.
            None if !yielded => {
                tokio::task::yield_now().await;
                yielded = true;
            }
            None => {
                deltas.publish(input);
                yielded = false;
            }
        }
    }
}

/// The deltas of an answer not yet published, in order; consecutive pieces of the same thing
/// (the text, the reasoning, one tool call's arguments) are one delta.
#[derive(Default)]
struct Deltas {
    deltas: Vec<EventBody>,
    /// Pieces in them.
    pieces: usize,
}

impl Deltas {
    fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    fn push(&mut self, kind: DeltaKind, text: String, call_id: Option<&str>, name: Option<&str>) {
        self.pieces += 1;
        // A piece that names its tool call starts that call's delta.
        if name.is_none()
            && let Some(EventBody::MessageDelta { kind: last_kind, text: last_text, call_id: last_call, .. }) =
                self.deltas.last_mut()
            && *last_kind == kind
            && last_call.as_deref() == call_id
        {
            last_text.push_str(&text);
            return;
        }
        self.deltas.push(EventBody::MessageDelta {
            kind,
            text,
            call_id: call_id.map(str::to_string),
            name: name.map(str::to_string),
        });
    }

    fn publish(&mut self, input: &StepInput) {
        self.pieces = 0;
        for delta in self.deltas.drain(..) {
            input.shared.publish(delta);
        }
    }
}

fn apply(draft: &mut Draft, event: ModelEvent, deltas: &mut Deltas) {
    match event {
        ModelEvent::TextDelta(text) => {
            if text.is_empty() {
                return;
            }
            draft.text.push_str(&text);
            draft.emitted = true;
            deltas.push(DeltaKind::Text, text, None, None);
        }
        ModelEvent::ReasoningDelta { text, signature } => {
            if signature.is_some() {
                draft.reasoning_signature = signature;
            }
            if text.is_empty() {
                return;
            }
            draft.reasoning.push_str(&text);
            draft.emitted = true;
            deltas.push(DeltaKind::Reasoning, text, None, None);
        }
        ModelEvent::ToolCallStart { index, call_id, name } => {
            draft.emitted = true;
            deltas.push(DeltaKind::ToolArgs, String::new(), Some(&call_id), Some(&name));
            draft.calls.push(DraftCall { index, call_id, name, args: String::new() });
        }
        ModelEvent::ToolCallArgs { index, piece } => {
            if let Some(call) = draft.calls.iter_mut().rev().find(|c| c.index == index) {
                call.args.push_str(&piece);
                draft.emitted = true;
                deltas.push(DeltaKind::ToolArgs, piece, Some(&call.call_id), None);
            }
        }
        ModelEvent::Usage(usage) => draft.usage = usage,
        ModelEvent::Finish(reason) => draft.stop = Some(reason),
    }
}

fn push_text_parts(parts: &mut Vec<Part>, draft: &Draft) {
    if !draft.reasoning.is_empty() || draft.reasoning_signature.is_some() {
        parts.push(Part::Reasoning { text: draft.reasoning.clone(), signature: draft.reasoning_signature.clone() });
    }
    if !draft.text.is_empty() {
        parts.push(Part::text(draft.text.clone()));
    }
}

/// `text` if it is at most `max` bytes, else its head and tail with a note of what was cut.
fn cut_middle(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let half = max / 2;
    let mut head = half;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - half;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}\n[… {} bytes cut: the result was larger than a quarter of the model's context window …]\n{}",
        &text[..head],
        tail - head,
        &text[tail..]
    )
}

/// Arguments as the model wrote them; an empty string means no arguments.
fn parse_args(raw: &str) -> Value {
    if raw.trim().is_empty() {
        return json!({});
    }
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()))
}

fn new_message(
    input: &StepInput,
    role: Role,
    parts: Vec<Part>,
    interrupted: bool,
    model: Option<&ResolvedModel>,
) -> Message {
    Message {
        id: new_id(),
        chat_id: input.shared.chat_id.clone(),
        position: input.shared.next_position(),
        role,
        parts: Arc::new(parts),
        interrupted,
        user_id: Some(input.user_id.clone()),
        model_id: model.map(|m| m.id.clone()),
        created_at: chrono::Utc::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_results_keep_head_and_tail_on_char_boundaries() {
        assert_eq!(cut_middle("short", 10), "short");
        let text = "é".repeat(100);
        let cut = cut_middle(&text, 51);
        assert!(cut.starts_with("éé") && cut.ends_with("éé") && cut.contains("bytes cut"), "{cut}");
    }

    #[test]
    fn arguments_parse_leniently() {
        assert_eq!(parse_args(""), json!({}));
        assert_eq!(parse_args("{\"a\":1}"), json!({"a":1}));
        assert_eq!(parse_args("{\"a\":"), Value::String("{\"a\":".into()));
    }
}
