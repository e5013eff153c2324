//! Chats, their messages and queue, and interrupts.

use actix_web::{HttpResponse, web};
use agentplane_actors::ports::{Store, StoreError};
use agentplane_schema::api::{
    Chat, ChatDetail, CreateChat, EditMessage, EditQueuedMessage, ForkChat, MessagePage, PatchChat, SendMessage,
    WorkspaceStatus,
};
use agentplane_schema::message::Part;
use serde::Deserialize;

use super::error::ApiError;
use crate::auth::AuthUser;
use crate::state::AppState;
use crate::store::NewChat;

const DEFAULT_PAGE: u64 = 100;
const MAX_PAGE: u64 = 500;
const TITLE_CHARS: usize = 80;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/chats").get(list).post(create))
        .service(web::resource("/chats/{id}").get(get).patch(patch).delete(delete))
        .service(web::resource("/chats/{id}/messages").get(messages).post(send))
        .service(web::resource("/chats/{id}/messages/{mid}").patch(edit_message))
        .service(web::resource("/chats/{id}/queue/{qid}").patch(edit_queued).delete(delete_queued))
        .service(web::resource("/chats/{id}/interrupt").post(interrupt))
        .service(web::resource("/chats/{id}/fork").post(fork))
        .service(web::resource("/chats/{id}/compact").post(compact))
        .service(web::resource("/chats/{id}/usage").get(usage));
}

/// The chat if the caller may see it; another user's chat is indistinguishable from none.
pub async fn visible_chat(state: &AppState, user: &AuthUser, id: &str) -> Result<Chat, ApiError> {
    match state.store.get_chat(id).await? {
        Some(chat) if chat.owner_id == user.id() => Ok(chat),
        _ => Err(ApiError::not_found(format!("chat {id}"))),
    }
}

/// What a user may put in a message.
pub fn validate_content(content: &[Part]) -> Result<(), ApiError> {
    if content.is_empty() {
        return Err(ApiError::invalid("`content` needs at least one part"));
    }
    for (i, part) in content.iter().enumerate() {
        match part {
            Part::Text { text } if text.trim().is_empty() => {
                return Err(ApiError::invalid(format!("content[{i}]: text must not be empty")));
            }
            Part::Text { .. } => {}
            Part::Image { file_id } if file_id.trim().is_empty() => {
                return Err(ApiError::invalid(format!("content[{i}]: `file_id` must not be empty")));
            }
            Part::Image { .. } => {}
            _ => {
                return Err(ApiError::invalid(format!(
                    "content[{i}]: users may send only `text` parts (tool calls, results and reasoning come from the agent)"
                )));
            }
        }
    }
    Ok(())
}

/// [`validate_content`], then the images: each must be a file the user uploaded, and the model
/// that will read them (`model_id`, else the default) must be marked `vision`. Refused here, the
/// message is never stored and no model is called.
pub async fn check_content(
    state: &AppState,
    user: &AuthUser,
    model_id: Option<&str>,
    content: &[Part],
) -> Result<(), ApiError> {
    validate_content(content)?;
    let images: Vec<(usize, &str)> = content
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Part::Image { file_id } => Some((i, file_id.as_str())),
            _ => None,
        })
        .collect();
    if images.is_empty() {
        return Ok(());
    }
    for (i, file_id) in &images {
        match state.store.file_info(file_id).await? {
            Some((_, owner)) if owner == user.id() => {}
            _ => return Err(ApiError::invalid(format!("content[{i}]: file `{file_id}` does not exist"))),
        }
    }
    let model = match Store::resolve_model(&state.store, model_id).await {
        Ok(model) => model,
        Err(StoreError::NotFound(what)) => return Err(ApiError::invalid(format!("no usable model: {what}"))),
        Err(e) => return Err(e.into()),
    };
    if !model.vision {
        return Err(ApiError::invalid(format!(
            "the model `{}` does not accept images (it is not marked `vision`); choose a vision model or send text only",
            model.target.model
        )));
    }
    Ok(())
}

fn default_title(content: &[Part]) -> Option<String> {
    let text = content.iter().find_map(|p| match p {
        Part::Text { text } => Some(text.trim()),
        _ => None,
    })?;
    let line = text.lines().next().unwrap_or(text);
    let mut title: String = line.chars().take(TITLE_CHARS).collect();
    if line.chars().count() > TITLE_CHARS {
        title.push('…');
    }
    Some(title)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    archived: Option<bool>,
    limit: Option<u64>,
}

async fn list(state: web::Data<AppState>, user: AuthUser, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let chats = state.store.list_chats(user.id(), q.archived, limit).await?;
    Ok(HttpResponse::Ok().json(chats))
}

async fn create(
    state: web::Data<AppState>,
    user: AuthUser,
    body: web::Json<CreateChat>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    validate_content(&body.content)?;
    if let Some(model_id) = &body.model_id {
        match state.store.get_model(model_id).await? {
            Some(m) if m.enabled => {}
            _ => return Err(ApiError::invalid(format!("model `{model_id}` does not exist or is disabled"))),
        }
    }
    check_content(&state, &user, body.model_id.as_deref(), &body.content).await?;
    if let Some(ws_id) = &body.workspace_id {
        match state.store.get_workspace(ws_id).await? {
            Some(ws) if ws.owner_id == user.id() && ws.status != WorkspaceStatus::Deleted => {}
            _ => return Err(ApiError::invalid(format!("workspace `{ws_id}` does not exist"))),
        }
    }
    let chat = state
        .store
        .create_chat(NewChat {
            owner_id: user.id().to_string(),
            title: body.title.clone().filter(|t| !t.trim().is_empty()).or_else(|| default_title(&body.content)),
            model_id: body.model_id,
            workspace_id: body.workspace_id,
            parent_id: None,
        })
        .await?;
    let handle = state.directory.chat(&chat.id);
    handle.send(user.id(), body.content, Default::default()).await?;
    if body.title.as_deref().is_none_or(|t| t.trim().is_empty()) {
        handle.generate_title().await;
    }
    let chat = state.store.get_chat(&chat.id).await?.unwrap_or(chat);
    Ok(HttpResponse::Created().json(chat))
}

async fn get(state: web::Data<AppState>, user: AuthUser, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let chat = visible_chat(&state, &user, &path).await?;
    let children = state.store.children(&chat.id).await?;
    Ok(HttpResponse::Ok().json(ChatDetail { chat, children }))
}

/// Tokens and cost of the chat and its sub-agents.
async fn usage(state: web::Data<AppState>, user: AuthUser, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let chat = visible_chat(&state, &user, &path).await?;
    Ok(HttpResponse::Ok().json(state.store.chat_usage(&chat.id).await?))
}

async fn patch(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
    body: web::Json<PatchChat>,
) -> Result<HttpResponse, ApiError> {
    let chat = visible_chat(&state, &user, &path).await?;
    if body.title.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(ApiError::invalid("`title` must not be empty"));
    }
    let body = body.into_inner();
    state.directory.chat(&chat.id).update(body.title, body.archived).await?;
    if let Some(archived) = body.archived {
        state.store.archive_descendants(&chat.id, archived).await?;
    }
    let chat = visible_chat(&state, &user, &path).await?;
    Ok(HttpResponse::Ok().json(chat))
}

async fn delete(state: web::Data<AppState>, user: AuthUser, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let chat = visible_chat(&state, &user, &path).await?;
    state.directory.evict(&chat.id).await;
    state.store.delete_chat(&chat.id, user.id()).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    before: Option<i64>,
    limit: Option<u64>,
}

async fn messages(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
    q: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let chat = visible_chat(&state, &user, &path).await?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let (messages, next_cursor) = state.store.messages_page(&chat.id, q.before, limit).await?;
    let queued_messages = state.store.queued(&chat.id).await?;
    Ok(HttpResponse::Ok().json(MessagePage { messages, queued_messages, next_cursor }))
}

async fn send(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
    body: web::Json<SendMessage>,
) -> Result<HttpResponse, ApiError> {
    // A chat whose actor is loaded is checked against its owner without reading the row: every
    // message of a conversation comes this way.
    let model_id = match state.directory.loaded_chat(&path) {
        Some(facts) if facts.owner_id == user.id() => facts.model_id,
        Some(_) => return Err(ApiError::not_found(format!("chat {path}"))),
        None => visible_chat(&state, &user, &path).await?.model_id,
    };
    let body = body.into_inner();
    check_content(&state, &user, model_id.as_deref(), &body.content).await?;
    let outcome = state.directory.chat(&path).send(user.id(), body.content, body.busy_behavior).await?;
    Ok(HttpResponse::Ok().json(outcome))
}

async fn delete_queued(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, qid) = path.into_inner();
    let chat = visible_chat(&state, &user, &id).await?;
    if state.directory.chat(&chat.id).delete_queued(&qid).await? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::not_found(format!("queued message {qid}")))
    }
}

/// Replaces a past user message; what came after it is dropped and the turn runs again.
async fn edit_message(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<(String, String)>,
    body: web::Json<EditMessage>,
) -> Result<HttpResponse, ApiError> {
    let (id, mid) = path.into_inner();
    let chat = visible_chat(&state, &user, &id).await?;
    check_content(&state, &user, chat.model_id.as_deref(), &body.content).await?;
    let message = state.directory.chat(&chat.id).edit_message(user.id(), &mid, body.into_inner().content).await?;
    Ok(HttpResponse::Ok().json(message))
}

/// Summarises the conversation now (the chat runs until the summary is stored).
async fn compact(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let chat = visible_chat(&state, &user, &path).await?;
    state.directory.chat(&chat.id).compact(user.id()).await?;
    Ok(HttpResponse::Accepted().json(serde_json::json!({"compacting": true})))
}

/// A new chat, owned by the caller, with the history up to and including the given message.
async fn fork(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
    body: web::Json<ForkChat>,
) -> Result<HttpResponse, ApiError> {
    let source = visible_chat(&state, &user, &path).await?;
    let fork = match state.store.fork_chat(&source, &body.message_id, user.id()).await {
        Err(StoreError::NotFound(what)) => return Err(ApiError::invalid(format!("cannot fork: {what} not found"))),
        other => other?,
    };
    Ok(HttpResponse::Created().json(fork))
}

async fn edit_queued(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<(String, String)>,
    body: web::Json<EditQueuedMessage>,
) -> Result<HttpResponse, ApiError> {
    let (id, qid) = path.into_inner();
    let chat = visible_chat(&state, &user, &id).await?;
    check_content(&state, &user, chat.model_id.as_deref(), &body.content).await?;
    match state.directory.chat(&chat.id).edit_queued(&qid, body.into_inner().content).await? {
        Some(queued) => Ok(HttpResponse::Ok().json(queued)),
        None => Err(ApiError::not_found(format!("queued message {qid}"))),
    }
}

async fn interrupt(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let chat = visible_chat(&state, &user, &path).await?;
    state.directory.chat(&chat.id).interrupt().await?;
    Ok(HttpResponse::Accepted().json(serde_json::json!({"interrupted": true})))
}
