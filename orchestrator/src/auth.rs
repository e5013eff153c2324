//! Authentication: every API route takes `Authorization: Bearer <token>`; the [`AuthUser`]
//! extractor resolves it to a user or answers 401.

use std::future::Future;
use std::pin::Pin;

use actix_web::{FromRequest, HttpRequest, web};
use agentplane_schema::api::{User, UserRole};

use crate::api::error::{ApiError, ApiErrorKind};
use crate::state::AppState;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct AuthUser(pub User);

impl AuthUser {
    pub fn is_admin(&self) -> bool {
        self.0.role == UserRole::Admin
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() { Ok(()) } else { Err(ApiError::forbidden("this needs an administrator")) }
    }

    pub fn id(&self) -> &str {
        &self.0.id
    }
}

fn bearer(req: &HttpRequest) -> Option<String> {
    let header = req.headers().get(actix_web::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string()).filter(|t| !t.is_empty())
}

impl FromRequest for AuthUser {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let token = bearer(req);
        let state = req.app_data::<web::Data<AppState>>().cloned();
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::new(ApiErrorKind::Internal, "application state missing"))?;
            let token = token.ok_or_else(|| {
                ApiError::new(ApiErrorKind::Unauthorized, "missing `Authorization: Bearer <token>` header")
            })?;
            match state.store.user_by_token(&token).await? {
                Some(user) => Ok(AuthUser(user)),
                None => Err(ApiError::new(ApiErrorKind::Unauthorized, "unknown or revoked token")),
            }
        })
    }
}
