//! The HTTP API under `/api/v1`, plus `/healthz` and `/readyz`.
//!
//! - [`chats`]: chats, messages, the queue, interrupts;
//! - [`stream`]: the chat WebSocket;
//! - [`admin`]: providers, models, templates, workspaces, users;
//! - [`error`]: the error body and status mapping.

pub mod admin;
pub mod chats;
pub mod error;
pub mod files;
pub mod stream;

use actix_web::{HttpResponse, web};

use crate::state::AppState;
use error::{ApiError, ApiErrorKind, extractor_error};

/// Largest JSON body accepted (long pasted logs fit; images come through the files API).
const JSON_LIMIT_BYTES: usize = 4 * 1024 * 1024;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::JsonConfig::default().limit(JSON_LIMIT_BYTES).error_handler(|e, _| extractor_error(e)))
        .app_data(web::PathConfig::default().error_handler(|e, _| extractor_error(e)))
        .app_data(web::QueryConfig::default().error_handler(|e, _| extractor_error(e)))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .service(
            web::scope("/api/v1")
                .configure(chats::routes)
                .configure(stream::routes)
                .configure(admin::routes)
                .configure(files::routes)
                .default_service(web::to(unknown_route)),
        )
        .default_service(web::to(unknown_route));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.store.count_users().await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"})))
}

async fn unknown_route() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(ApiErrorKind::NotFound, "no such route"))
}
