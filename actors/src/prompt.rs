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
    prompt_messages_from(&history[start..]).collect()
}

/// `history` as the model reads it, `history` holding no summary but maybe its first message.
fn prompt_messages_from(history: &[Message]) -> impl Iterator<Item = PromptMessage> + '_ {
    history.iter().filter_map(|m| match m.role {
        Role::Marker => None,
        Role::Summary => Some(PromptMessage {
            role: Role::User,
            parts: Arc::new(vec![Part::text(format!("{SUMMARY_PREFIX}\n{}", m.text()))]),
        }),
        _ if m.parts.is_empty() && m.role != Role::User => None,
        _ => Some(PromptMessage { role: m.role, parts: m.parts.clone() }),
    })
}

/// The file ids of the images `messages` show the model, each once.
pub fn image_ids(messages: &[PromptMessage]) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    add_image_ids(&mut ids, messages);
    ids
}

/// Adds to `ids` the file ids of the images in `messages` it does not hold yet.
fn add_image_ids(ids: &mut Vec<String>, messages: &[PromptMessage]) {
    for part in messages.iter().flat_map(|m| m.parts.iter()) {
        if let Part::Image { file_id } = part
            && !ids.contains(file_id)
        {
            ids.push(file_id.clone());
        }
    }
}

/// A chat's prompt list, kept from one step to the next. A step's history is the last step's
/// plus the messages committed since, so only those are added: without it every step built the
/// list from the whole history, looked through every part for images and dropped the list again,
/// each a pass over every message's shared parts. Anything else (a summary, an edited or dropped
/// message, a history read again from the database) builds the list anew.
#[derive(Default)]
pub struct PromptList {
    /// How many history messages the list was built from.
    covered: usize,
    /// The first and the last of them, held so that their parts cannot be freed and their
    /// addresses taken by others: the same message at the same place, by id and by address,
    /// means the same history up to there (messages are never changed in place).
    first: Option<(String, Arc<Vec<Part>>)>,
    last: Option<(String, Arc<Vec<Part>>)>,
    messages: Arc<Vec<PromptMessage>>,
    image_ids: Vec<String>,
}

impl PromptList {
    /// The prompt for `history` ([`prompt_messages`]) and the file ids of the images it shows
    /// ([`image_ids`]).
    pub fn update(&mut self, history: &[Message]) -> (Arc<Vec<PromptMessage>>, Vec<String>) {
        let added = &history[self.covered.min(history.len())..];
        if self.extends(history) && !added.iter().any(|m| m.role == Role::Summary) {
            let before = self.messages.len();
            // Unshared once the last step's request is gone: the list grows in place.
            let messages = Arc::make_mut(&mut self.messages);
            messages.extend(prompt_messages_from(added));
            add_image_ids(&mut self.image_ids, &messages[before..]);
        } else {
            self.messages = Arc::new(prompt_messages(history));
            self.image_ids = image_ids(&self.messages);
        }
        self.covered = history.len();
        let held = |m: &Message| (m.id.clone(), m.parts.clone());
        self.first = history.first().map(held);
        self.last = history.last().map(held);
        (self.messages.clone(), self.image_ids.clone())
    }

    /// Whether `history` starts with the messages the list was built from.
    fn extends(&self, history: &[Message]) -> bool {
        let same = |held: &Option<(String, Arc<Vec<Part>>)>, message: Option<&Message>| match (held, message) {
            (Some((id, parts)), Some(m)) => *id == m.id && Arc::ptr_eq(parts, &m.parts),
            _ => false,
        };
        self.covered > 0
            && history.len() >= self.covered
            && same(&self.first, history.first())
            && same(&self.last, history.get(self.covered - 1))
    }
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

    fn message(position: i64, role: Role, parts: Vec<Part>) -> Message {
        // Every message its own id, as in a chat: an edited one at the same position too.
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Message {
            id: format!("m{position}-{n}"),
            chat_id: "c".into(),
            position,
            role,
            parts: Arc::new(parts),
            interrupted: false,
            user_id: None,
            model_id: None,
            created_at: chrono::Utc::now(),
        }
    }

    fn text(position: i64, role: Role, text: &str) -> Message {
        message(position, role, vec![Part::text(text)])
    }

    fn image(position: i64, file_id: &str) -> Message {
        message(position, Role::User, vec![Part::text("look"), Part::Image { file_id: file_id.into() }])
    }

    /// What the list gives must be what building the prompt from the whole history gives.
    fn check(list: &mut PromptList, history: &[Message]) -> Arc<Vec<PromptMessage>> {
        let (messages, ids) = list.update(history);
        let built = prompt_messages(history);
        assert_eq!(messages.len(), built.len());
        for (kept, built) in messages.iter().zip(&built) {
            assert_eq!((kept.role, &kept.parts), (built.role, &built.parts));
        }
        assert_eq!(ids, image_ids(&built));
        messages
    }

    #[test]
    fn the_prompt_list_grows_with_the_history_and_is_built_anew_when_it_changed_otherwise() {
        let mut list = PromptList::default();
        let mut history = vec![text(1, Role::User, "hi"), text(2, Role::Assistant, "hello")];
        let first = check(&mut list, &history);
        let address = Arc::as_ptr(&first);
        drop(first);

        // New messages, a marker and an empty answer among them (left out), an image twice.
        history.push(image(3, "f1"));
        history.push(text(4, Role::Marker, "a note for the user"));
        history.push(message(5, Role::Assistant, vec![]));
        history.push(image(6, "f1"));
        history.push(image(7, "f2"));
        let grown = check(&mut list, &history);
        assert_eq!(Arc::as_ptr(&grown), address, "the list grew in place: no copy of the earlier messages");
        assert!(Arc::ptr_eq(&grown[0].parts, &history[0].parts), "parts are shared, not copied");

        // While a request still holds the list, growing it leaves that request's list alone.
        history.push(text(8, Role::User, "more"));
        let held = grown;
        let next = check(&mut list, &history);
        assert_eq!(held.len() + 1, next.len());
        drop((held, next));

        // Unchanged history: the same list.
        check(&mut list, &history);

        // A summary: the prompt starts at it.
        history.push(text(9, Role::Summary, "what happened"));
        history.push(text(10, Role::User, "go on"));
        let summarised = check(&mut list, &history);
        assert_eq!(summarised[0].role, Role::User);
        assert!(matches!(&summarised[0].parts[0], Part::Text { text } if text.starts_with(SUMMARY_PREFIX)));
        drop(summarised);
        history.push(text(11, Role::Assistant, "ok"));
        check(&mut list, &history);

        // An edit: the history is cut and a new message put in place of the last ones, as long
        // as before, then shorter.
        history.truncate(history.len() - 1);
        history.push(text(11, Role::Assistant, "edited"));
        check(&mut list, &history);
        history.truncate(2);
        check(&mut list, &history);

        // Messages dropped from the front (the summary's older messages), none appended.
        history.remove(0);
        check(&mut list, &history);

        // The history read again from the database: the same messages as new values.
        let reloaded: Vec<Message> =
            history.iter().map(|m| Message { parts: Arc::new(m.parts.as_ref().clone()), ..m.clone() }).collect();
        let again = check(&mut list, &reloaded);
        assert!(Arc::ptr_eq(&again[0].parts, &reloaded[0].parts), "built from the history it was given");

        check(&mut list, &[]);
        history.push(image(12, "f3"));
        check(&mut list, &history);
    }
}
