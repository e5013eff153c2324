//! The one place errors become HTTP answers: `{"error": {"kind", "message"}}` with a fitting
//! status.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use agentplane_actors::ports::StoreError;
use agentplane_actors::{ChatOpError, ChatOpErrorKind};
use agentplane_schema::api::{ErrorBody, ErrorDetail};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    Unavailable,
    Internal,
}

impl ApiErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ApiErrorKind::InvalidRequest => "invalid_request",
            ApiErrorKind::Unauthorized => "unauthorized",
            ApiErrorKind::Forbidden => "forbidden",
            ApiErrorKind::NotFound => "not_found",
            ApiErrorKind::Conflict => "conflict",
            ApiErrorKind::PayloadTooLarge => "payload_too_large",
            ApiErrorKind::UnsupportedMediaType => "unsupported_media_type",
            ApiErrorKind::Unavailable => "unavailable",
            ApiErrorKind::Internal => "internal",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            ApiErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ApiErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ApiErrorKind::NotFound => StatusCode::NOT_FOUND,
            ApiErrorKind::Conflict => StatusCode::CONFLICT,
            ApiErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ApiErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> Self {
        ApiError { kind, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::InvalidRequest, message)
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::NotFound, format!("{} not found", what.into()))
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Forbidden, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Conflict, message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.kind.status()
    }

    fn error_response(&self) -> HttpResponse {
        if self.kind == ApiErrorKind::Internal {
            tracing::error!(error = %self.message, "internal error");
        }
        HttpResponse::build(self.status_code())
            .json(ErrorBody { error: ErrorDetail { kind: self.kind.as_str().into(), message: self.message.clone() } })
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::not_found(what),
            StoreError::Fenced => ApiError::new(ApiErrorKind::Unavailable, "the chat moved to another replica; retry"),
            StoreError::Conflict(m) => ApiError::conflict(m),
            StoreError::Database(m) if m.contains("UNIQUE") || m.contains("unique") || m.contains("duplicate key") => {
                ApiError::conflict(format!("already exists: {m}"))
            }
            StoreError::Database(m) => ApiError::new(ApiErrorKind::Internal, m),
        }
    }
}

impl From<ChatOpError> for ApiError {
    fn from(e: ChatOpError) -> Self {
        match e.kind {
            ChatOpErrorKind::Invalid => ApiError::invalid(e.message),
            ChatOpErrorKind::Unavailable => ApiError::new(ApiErrorKind::Unavailable, e.message),
            ChatOpErrorKind::Store => ApiError::new(ApiErrorKind::Internal, e.message),
            ChatOpErrorKind::Conflict => ApiError::conflict(e.message),
            ChatOpErrorKind::NotFound => ApiError::new(ApiErrorKind::NotFound, e.message),
        }
    }
}

/// Turns extractor failures (bad JSON, bad path or query) into the error body.
pub fn extractor_error(err: impl std::fmt::Display) -> actix_web::Error {
    ApiError::invalid(err.to_string()).into()
}
