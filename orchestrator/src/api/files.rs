//! `POST /files` (the raw bytes of an image as the body) and `GET /files/{id}[/content]`.

use actix_web::{HttpResponse, web};
use futures::StreamExt;
use serde_json::json;

use super::error::{ApiError, ApiErrorKind};
use crate::auth::AuthUser;
use crate::state::AppState;
use crate::store::{ImageKind, MAX_IMAGE_BYTES};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/files").post(upload))
        .service(web::resource("/files/{id}").get(info))
        .service(web::resource("/files/{id}/content").get(content));
}

/// Reads the body up to the limit; the declared type is ignored, the bytes decide.
async fn upload(state: web::Data<AppState>, user: AuthUser, mut body: web::Payload) -> Result<HttpResponse, ApiError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("reading the upload: {e}")))?;
        if bytes.len() + chunk.len() > MAX_IMAGE_BYTES {
            return Err(ApiError::new(
                ApiErrorKind::PayloadTooLarge,
                format!("images may be at most {} MiB", MAX_IMAGE_BYTES / (1024 * 1024)),
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    if bytes.is_empty() {
        return Err(ApiError::invalid("the body is empty: send the image's bytes as the request body"));
    }
    let kind = ImageKind::sniff(&bytes).ok_or_else(|| {
        ApiError::new(ApiErrorKind::UnsupportedMediaType, "not a PNG, JPEG, GIF or WebP image (checked by its bytes)")
    })?;
    let file = state.store.create_file(user.id(), kind, bytes).await?;
    state
        .store
        .audit(
            Some(user.id()),
            "file.uploaded",
            "file",
            Some(&file.id),
            json!({"content_type": file.content_type, "size": file.size}),
        )
        .await?;
    Ok(HttpResponse::Created().json(file))
}

async fn info(state: web::Data<AppState>, user: AuthUser, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    match state.store.file_info(&path).await? {
        Some((file, owner)) if owner == user.id() => Ok(HttpResponse::Ok().json(file)),
        _ => Err(ApiError::not_found(format!("file {path}"))),
    }
}

async fn content(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    match state.store.file(&path).await? {
        Some(file) if file.owner_id == user.id() => {
            Ok(HttpResponse::Ok().content_type(file.content_type).body(file.bytes))
        }
        _ => Err(ApiError::not_found(format!("file {path}"))),
    }
}
