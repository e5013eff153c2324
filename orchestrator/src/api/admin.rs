//! Configuration routes: providers and users (admins), models and templates (admins write,
//! everyone reads), workspaces (each user their own).

use actix_web::{HttpResponse, web};
use agentplane_schema::api::{CreateModel, CreateProvider, CreateTemplate, CreateUser, IssuedToken};
use serde_json::json;

use super::error::ApiError;
use crate::auth::AuthUser;
use crate::state::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/providers").get(list_providers).post(create_provider))
        .service(web::resource("/models").get(list_models).post(create_model))
        .service(web::resource("/templates").get(list_templates).post(create_template))
        .service(web::resource("/workspaces").get(list_workspaces))
        .service(web::resource("/users").post(create_user));
}

fn valid_url(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://")) && url.len() > "https://".len()
}

async fn create_provider(
    state: web::Data<AppState>,
    user: AuthUser,
    body: web::Json<CreateProvider>,
) -> Result<HttpResponse, ApiError> {
    user.require_admin()?;
    if body.name.trim().is_empty() {
        return Err(ApiError::invalid("`name` must not be empty"));
    }
    if !valid_url(&body.base_url) {
        return Err(ApiError::invalid("`base_url` must be an http:// or https:// URL"));
    }
    if !(body.settings.is_null() || body.settings.is_object()) {
        return Err(ApiError::invalid("`settings` must be an object"));
    }
    let provider = state.store.create_provider(&body).await?;
    state
        .store
        .audit(Some(user.id()), "provider.created", "provider", Some(&provider.id), json!({"name": provider.name}))
        .await?;
    Ok(HttpResponse::Created().json(provider))
}

async fn list_providers(state: web::Data<AppState>, user: AuthUser) -> Result<HttpResponse, ApiError> {
    user.require_admin()?;
    Ok(HttpResponse::Ok().json(state.store.list_providers().await?))
}

async fn create_model(
    state: web::Data<AppState>,
    user: AuthUser,
    body: web::Json<CreateModel>,
) -> Result<HttpResponse, ApiError> {
    user.require_admin()?;
    if body.model.trim().is_empty() {
        return Err(ApiError::invalid("`model` must not be empty"));
    }
    if body.context_window <= 0 {
        return Err(ApiError::invalid("`context_window` must be positive"));
    }
    if body.max_output_tokens.is_some_and(|m| m <= 0) {
        return Err(ApiError::invalid("`max_output_tokens` must be positive"));
    }
    if !state.store.provider_exists(&body.provider_id).await? {
        return Err(ApiError::invalid(format!("provider `{}` does not exist", body.provider_id)));
    }
    let model = state.store.create_model(&body).await?;
    state
        .store
        .audit(Some(user.id()), "model.created", "model", Some(&model.id), json!({"model": model.model}))
        .await?;
    Ok(HttpResponse::Created().json(model))
}

/// Members see enabled models only.
async fn list_models(state: web::Data<AppState>, user: AuthUser) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.store.list_models(!user.is_admin()).await?))
}

async fn create_template(
    state: web::Data<AppState>,
    user: AuthUser,
    body: web::Json<CreateTemplate>,
) -> Result<HttpResponse, ApiError> {
    user.require_admin()?;
    if body.name.trim().is_empty() {
        return Err(ApiError::invalid("`name` must not be empty"));
    }
    crate::provisioners::params::check_spec(&body.parameters).map_err(ApiError::invalid)?;
    let template = state.store.create_template(&body).await?;
    state
        .store
        .audit(Some(user.id()), "template.created", "template", Some(&template.id), json!({"name": template.name}))
        .await?;
    Ok(HttpResponse::Created().json(template))
}

async fn list_templates(state: web::Data<AppState>, _user: AuthUser) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.store.list_templates().await?))
}

async fn list_workspaces(state: web::Data<AppState>, user: AuthUser) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.store.list_workspaces(Some(user.id())).await?))
}

async fn create_user(
    state: web::Data<AppState>,
    user: AuthUser,
    body: web::Json<CreateUser>,
) -> Result<HttpResponse, ApiError> {
    user.require_admin()?;
    let name = body.name.trim();
    if name.is_empty() {
        return Err(ApiError::invalid("`name` must not be empty"));
    }
    if state.store.user_by_name(name).await?.is_some() {
        return Err(ApiError::conflict(format!("a user named `{name}` exists")));
    }
    let (created, token_id, token) = state.store.create_user_with_token(name, body.role, None).await?;
    state
        .store
        .audit(Some(user.id()), "user.created", "user", Some(&created.id), json!({"role": created.role}))
        .await?;
    Ok(HttpResponse::Created().json(IssuedToken { user: created, token_id, token }))
}
