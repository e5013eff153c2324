//! Chat titles: one short model call on the first message, by the configured title model (a
//! cheap one) or the chat's. The chat's actor applies the result only if nobody renamed the chat
//! meanwhile; any failure leaves the placeholder.

use std::sync::Arc;

use agentplane_schema::message::{Part, Role};
use futures::StreamExt;

use crate::deps::Deps;
use crate::ports::{ModelEvent, ModelRequest, PromptMessage};
use crate::shared::ChatShared;

const TITLE_CHARS: usize = 80;
/// First-message text the title call sees at most.
const SOURCE_CHARS: usize = 4000;

pub async fn generate(
    deps: Arc<Deps>,
    shared: Arc<ChatShared>,
    model_id: Option<String>,
    first: String,
) -> Option<String> {
    let configured = Some(deps.settings.agent.title_model_id.trim().to_string()).filter(|m| !m.is_empty());
    let model = match deps.store.resolve_model(configured.as_deref().or(model_id.as_deref())).await {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(chat = %shared.chat_id, error = %e, "no model for a title");
            return None;
        }
    };
    let source: String = first.chars().take(SOURCE_CHARS).collect();
    let request = ModelRequest {
        target: model.target,
        system: "You write short, specific titles for conversations.".into(),
        messages: Arc::new(vec![PromptMessage {
            role: Role::User,
            parts: Arc::new(vec![Part::text(format!(
                "Write a title of at most six words for a conversation that begins with this message. \
                 Answer with the title only.\n\n{source}"
            ))]),
        }]),
        tools: Arc::new([]),
        images: Default::default(),
        memo: Default::default(),
    };
    let mut text = String::new();
    match deps.model.stream(request).await {
        Ok(mut stream) => {
            while let Some(event) = stream.next().await {
                match event {
                    Ok(ModelEvent::TextDelta(t)) => text.push_str(&t),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(chat = %shared.chat_id, error = %e, "title call failed");
                        return None;
                    }
                }
            }
        }
        Err(e) => {
            tracing::debug!(chat = %shared.chat_id, error = %e, "title call failed");
            return None;
        }
    }
    let title: String = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .trim_matches(['"', '\'', '*', '#', ' '])
        .chars()
        .take(TITLE_CHARS)
        .collect();
    (!title.is_empty()).then_some(title)
}
