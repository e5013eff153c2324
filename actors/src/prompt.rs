//! The system prompt and the prompt built from a chat's history.

use std::sync::Arc;

use agentplane_schema::message::{Message, Part, Role};

use crate::ports::PromptMessage;

/// agentplane's own instructions; the operator's deployment prompt is layered after them.
pub const DEFAULT_SYSTEM_PROMPT: &str = "\
You are a coding agent working for the user through agentplane.

Tools:
- list_templates / read_template: the workspace templates you may use, with their parameters.
- create_workspace: provisions a workspace from a template and binds it to this chat (one per chat; \
calling it again returns the bound workspace).
- read_file, write_file, edit_files: files inside the workspace. Paths are relative to the workspace root.
- execute: runs a shell command in the workspace (non-interactive; output is capped, so prefer \
commands with concise output). background=true starts a long-running process; follow it with \
process_output and stop it with process_kill.

A workspace costs real infrastructure: create one only when the work needs files or commands. Answer \
questions, plan and discuss design without one. When a workspace tool says the workspace is gone, \
create a new one from the same template and continue.

Be direct. When the work is done, say what you did and what is left.";

/// The default prompt with the deployment prompt below it.
pub fn system_prompt(deployment_prompt: &str) -> String {
    let deployment_prompt = deployment_prompt.trim();
    if deployment_prompt.is_empty() {
        DEFAULT_SYSTEM_PROMPT.to_string()
    } else {
        format!("{DEFAULT_SYSTEM_PROMPT}\n\n# Deployment instructions\n{deployment_prompt}")
    }
}

/// The history as the model reads it: from the latest summary on (the summary itself as a user
/// message), markers left out.
pub fn prompt_messages(history: &[Message]) -> Vec<PromptMessage> {
    let start = history.iter().rposition(|m| m.role == Role::Summary).unwrap_or(0);
    history[start..]
        .iter()
        .filter_map(|m| match m.role {
            Role::Marker => None,
            Role::Summary => Some(PromptMessage {
                role: Role::User,
                parts: Arc::new(vec![Part::text(format!("{SUMMARY_PREFIX}\n{}", m.text()))]),
            }),
            _ if m.parts.is_empty() && m.role != Role::User => None,
            _ => Some(PromptMessage { role: m.role, parts: m.parts.clone() }),
        })
        .collect()
}

/// The file ids of the images `messages` show the model, each once.
pub fn image_ids(messages: &[PromptMessage]) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for part in messages.iter().flat_map(|m| m.parts.iter()) {
        if let Part::Image { file_id } = part
            && !ids.contains(file_id)
        {
            ids.push(file_id.clone());
        }
    }
    ids
}

/// `messages` with each image replaced by a note that one was there (for calls that do not
/// look at images, such as summarising).
pub fn images_as_notes(messages: &mut [PromptMessage]) {
    // Only messages with an image get parts of their own; the others stay shared.
    let with_images = messages.iter_mut().filter(|m| m.parts.iter().any(|p| matches!(p, Part::Image { .. })));
    for part in with_images.flat_map(|m| Arc::make_mut(&mut m.parts).iter_mut()) {
        if let Part::Image { file_id } = part {
            *part = Part::text(format!("[an image was attached here ({file_id})]"));
        }
    }
}

/// How the summary is introduced to the model.
pub const SUMMARY_PREFIX: &str = "[Summary of the conversation so far, written by you for yourself]";

/// Instructions of the one model call that compacts a conversation.
pub const COMPACTION_PROMPT: &str = "\
Summarise the conversation above for yourself, so you can continue the work without it: the \
user's goals and constraints, decisions made, what was done (files created or changed, commands \
run and their outcomes, the workspace in use), what is still open, and anything the user asked \
you to remember. Be complete but concise. Answer with the summary only.";

/// A rough token count (4 characters a token) of what the model would read of `history`: from
/// its latest summary on, markers left out. For what no usage report covers yet; counts in place.
pub fn estimate_tokens(history: &[Message]) -> u64 {
    let start = history.iter().rposition(|m| m.role == Role::Summary).unwrap_or(0);
    let read = history[start..].iter().filter(|m| m.role != Role::Marker);
    let (chars, count) = read.fold((0usize, 0u64), |(chars, count), m| {
        let size: usize = m
            .parts
            .iter()
            .map(|p| match p {
                Part::Text { text } | Part::Reasoning { text, .. } => text.len(),
                Part::ToolCall { args, .. } => args.to_string().len(),
                Part::ToolResult { result, .. } => result.len(),
                Part::Image { .. } => 4000,
            })
            .sum();
        (chars + size, count + 1)
    });
    (chars / 4) as u64 + 4 * count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_prompt_is_layered_below() {
        assert_eq!(system_prompt("  "), DEFAULT_SYSTEM_PROMPT);
        let p = system_prompt("Use the staging cluster.");
        assert!(p.starts_with(DEFAULT_SYSTEM_PROMPT));
        assert!(p.ends_with("Use the staging cluster."));
    }
}
