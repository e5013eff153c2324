//! Context compaction: when a prompt nears the model's context window, one model call summarises
//! the conversation so far; the summary is stored as a model-only `summary` message with a
//! visible `marker` after it, and user messages not yet answered are kept after the summary.
//! The prompt then starts from the summary.
//!
//! Whether a prompt fits is judged from the provider's reported usage of the last call plus an
//! estimate of what came after it. At most [`MAX_TRIES`] compactions per model call; a prompt
//! that still does not fit ends the turn with `context_overflow`, never a loop.

use std::sync::Arc;

use agentplane_schema::api::{ChatError, ChatErrorKind};
use agentplane_schema::event::EventBody;
use agentplane_schema::message::{Message, Part, Role};
use agentplane_schema::new_id;
use futures::StreamExt;

use crate::ports::{ModelEvent, ModelRequest, Op, PromptMessage, ResolvedModel, StoreError};
use crate::prompt::{self, COMPACTION_PROMPT};
use crate::step::StepInput;

pub const MAX_TRIES: u32 = 3;

/// The prompt's size in tokens: reported usage where there is one, estimated beyond it.
pub fn prompt_tokens(input: &StepInput, history: &[Message]) -> u64 {
    match input.shared.reported_usage() {
        // History is in position order: what came after the reported answer is a suffix.
        Some((tokens, at)) => {
            tokens + prompt::estimate_tokens(&history[history.partition_point(|m| m.position <= at)..])
        }
        None => prompt::estimate_tokens(history),
    }
}

pub fn over_threshold(input: &StepInput, model: &ResolvedModel, history: &[Message]) -> bool {
    prompt_tokens(input, history) as f64 > model.context_window as f64 * model.compaction_threshold
}

pub fn overflow(message: impl Into<String>) -> ChatError {
    ChatError { kind: ChatErrorKind::ContextOverflow, message: message.into() }
}

/// What a compaction changed, for the actor's copy of the history.
pub struct Compacted {
    pub dropped: Vec<String>,
    pub committed: Vec<Message>,
}

/// Summarises `history` (from its latest summary on) with one model call and commits the result.
/// `Ok(Err(..))` is a compaction that could not be done (nothing to summarise, model failure).
pub async fn compact(
    input: &StepInput,
    model: &ResolvedModel,
    history: &[Message],
) -> Result<Result<Compacted, ChatError>, StoreError> {
    let start = history.iter().rposition(|m| m.role == Role::Summary).unwrap_or(0);
    let recent = &history[start..];
    // User messages after the last answer have not been answered: they stay after the summary.
    let keep_from = recent.iter().rposition(|m| m.role != Role::User).map(|i| i + 1).unwrap_or(0);
    let (older, unanswered) = recent.split_at(keep_from);
    if older.iter().all(|m| matches!(m.role, Role::Summary | Role::Marker)) {
        return Ok(Err(overflow(
            "the conversation does not fit the model's context window and there is nothing left to summarise",
        )));
    }
    let mut messages = prompt::prompt_messages(older);
    prompt::images_as_notes(&mut messages);
    messages.push(PromptMessage { role: Role::User, parts: Arc::new(vec![Part::text(COMPACTION_PROMPT)]) });
    let request = ModelRequest {
        target: model.target.clone(),
        system: "You summarise conversations for your own later use.".into(),
        messages: Arc::new(messages),
        tools: Arc::new([]),
        images: Default::default(),
        // Its messages up to the summary prompt are the conversation's own, already written
        // (reused where the dialect writes them alike without tools: all but Bedrock).
        memo: input.shared.prompt_memo(),
    };
    let summary = match collect_text(input, request).await {
        Ok(text) if !text.trim().is_empty() => text,
        Ok(_) => return Ok(Err(overflow("summarising the conversation produced no text"))),
        Err(e) => return Ok(Err(e)),
    };
    let new_message = |role: Role, text: String| Message {
        id: new_id(),
        chat_id: input.shared.chat_id.clone(),
        position: input.shared.next_position(),
        role,
        parts: Arc::new(vec![Part::text(text)]),
        interrupted: false,
        user_id: Some(input.user_id.clone()),
        model_id: Some(model.id.clone()),
        created_at: chrono::Utc::now(),
    };
    let mut ops = Vec::new();
    let mut events = Vec::new();
    if let Some(first) = unanswered.first() {
        ops.push(Op::DropMessagesFrom { from_position: first.position });
        events.push(EventBody::MessagesDropped { from_position: first.position });
    }
    let mut committed = vec![
        new_message(Role::Summary, summary),
        new_message(
            Role::Marker,
            format!("Conversation summarised: {} earlier messages were condensed for the model.", older.len()),
        ),
    ];
    for m in unanswered {
        committed.push(Message {
            id: new_id(),
            position: input.shared.next_position(),
            created_at: chrono::Utc::now(),
            ..m.clone()
        });
    }
    for m in &committed {
        ops.push(Op::InsertMessage(m.clone()));
        events.push(EventBody::Message { message: m.clone() });
    }
    input.shared.commit(ops, events).await?;
    input.shared.forget_usage();
    Ok(Ok(Compacted { dropped: unanswered.iter().map(|m| m.id.clone()).collect(), committed }))
}

/// The text of one model answer, not streamed to watchers (a summary is not a chat answer).
async fn collect_text(input: &StepInput, request: ModelRequest) -> Result<String, ChatError> {
    let error =
        |e: crate::ports::ModelError| ChatError { kind: e.kind, message: format!("summarising failed: {}", e.message) };
    let mut stream = tokio::select! {
        _ = input.cancel.cancelled() => return Err(overflow("interrupted while summarising")),
        s = input.deps.model.stream(request) => s.map_err(error)?,
    };
    let mut text = String::new();
    loop {
        let event = tokio::select! {
            _ = input.cancel.cancelled() => return Err(overflow("interrupted while summarising")),
            e = stream.next() => e,
        };
        match event {
            None => return Ok(text),
            Some(Err(e)) => return Err(error(e)),
            Some(Ok(ModelEvent::TextDelta(t))) => text.push_str(&t),
            Some(Ok(_)) => {}
        }
    }
}
