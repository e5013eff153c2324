//! Configuration routes: providers and users (admins), models and templates (admins write,
//! everyone reads), workspaces (each user their own).

use actix_web::{HttpResponse, web};
use agentplane_actors::ports::ProvisionError;
use agentplane_schema::api::{
    CreateModel, CreateProvider, CreateTemplate, CreateUser, CreateWorkspace, IssuedToken, ModelPrices, PatchModel,
    PatchProvider, PatchTemplate, ProviderType, Workspace, WorkspaceStatus,
};
use serde_json::json;

use super::error::{ApiError, ApiErrorKind};
use crate::auth::AuthUser;
use crate::provisioners::params;
use crate::state::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/providers").get(list_providers).post(create_provider))
        .service(web::resource("/providers/{id}").patch(patch_provider).delete(delete_provider))
        .service(web::resource("/models").get(list_models).post(create_model))
        .service(web::resource("/models/{id}").get(get_model).patch(patch_model).delete(delete_model))
        .service(web::resource("/templates").get(list_templates).post(create_template))
        .service(web::resource("/templates/{id}").get(get_template).patch(patch_template).delete(delete_template))
        .service(web::resource("/workspaces").get(list_workspaces).post(create_workspace))
        .service(web::resource("/workspaces/{id}").get(get_workspace).delete(delete_workspace))
        .service(web::resource("/workspaces/{id}/start").post(start_workspace))
        .service(web::resource("/workspaces/{id}/stop").post(stop_workspace))
        .service(web::resource("/users").post(create_user));
}

fn valid_url(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://")) && url.len() > "https://".len()
}

fn check_settings(settings: &serde_json::Value) -> Result<(), ApiError> {
    if settings.is_null() || settings.is_object() {
        Ok(())
    } else {
        Err(ApiError::invalid("`settings` must be an object"))
    }
}

/// Settings a provider type cannot work without, and secrets that belong in `api_key`.
fn check_provider(provider_type: ProviderType, base_url: &str, settings: &serde_json::Value) -> Result<(), ApiError> {
    check_settings(settings)?;
    if provider_type == ProviderType::Bedrock && settings.get("region").and_then(|r| r.as_str()).is_none() {
        return Err(ApiError::invalid("bedrock providers need `settings.region` (e.g. \"us-east-1\")"));
    }
    if !valid_url(base_url) {
        return Err(ApiError::invalid(match provider_type.default_base_url() {
            Some(_) => "`base_url` must be an http:// or https:// URL".to_string(),
            None if provider_type == ProviderType::Bedrock => {
                "`base_url` must be an http:// or https:// URL (leave it out to use the region's endpoint)".to_string()
            }
            None => {
                format!("`base_url` is required for {} providers (an http:// or https:// URL)", provider_type.as_str())
            }
        }));
    }
    for secret in ["secret_access_key", "session_token", "api_key", "password", "token"] {
        if settings.get(secret).is_some() {
            return Err(ApiError::invalid(format!(
                "`settings.{secret}` would be stored unencrypted: put the secret in `api_key`"
            )));
        }
    }
    Ok(())
}

/// The base URL a new provider gets: the given one, else its type's public endpoint, else (Bedrock)
/// the region's.
fn provider_base_url(body: &CreateProvider) -> String {
    let given = body.base_url.trim().trim_end_matches('/');
    if !given.is_empty() {
        return given.to_string();
    }
    match (body.provider_type.default_base_url(), body.settings.get("region").and_then(|r| r.as_str())) {
        (Some(url), _) => url.to_string(),
        (None, Some(region)) if body.provider_type == ProviderType::Bedrock => {
            format!("https://bedrock-runtime.{region}.amazonaws.com")
        }
        _ => String::new(),
    }
}

async fn create_provider(
    state: web::Data<AppState>,
    user: AuthUser,
    body: web::Json<CreateProvider>,
) -> Result<HttpResponse, ApiError> {
    user.require_admin()?;
    let mut body = body.into_inner();
    if body.name.trim().is_empty() {
        return Err(ApiError::invalid("`name` must not be empty"));
    }
    body.base_url = provider_base_url(&body);
    check_provider(body.provider_type, &body.base_url, &body.settings)?;
    let provider = state.store.create_provider(&body).await?;
    state
        .store
        .audit(Some(user.id()), "provider.created", "provider", Some(&provider.id), json!({"name": provider.name}))
        .await?;
    Ok(HttpResponse::Created().json(provider))
}

async fn patch_provider(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
    body: web::Json<PatchProvider>,
) -> Result<HttpResponse, ApiError> {
    user.require_admin()?;
    let current = state
        .store
        .list_providers()
        .await?
        .into_iter()
        .find(|p| p.id == *path)
        .ok_or_else(|| ApiError::not_found(format!("provider {path}")))?;
    if body.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(ApiError::invalid("`name` must not be empty"));
    }
    let base_url = body.base_url.clone().unwrap_or(current.base_url);
    let settings = body.settings.clone().unwrap_or(current.settings);
    check_provider(current.provider_type, &base_url, &settings)?;
    let provider = state
        .store
        .patch_provider(&path, &body)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("provider {path}")))?;
    // The audit names the fields changed, never the key itself.
    let fields: Vec<&str> = [
        ("name", body.name.is_some()),
        ("base_url", body.base_url.is_some()),
        ("api_key", body.api_key.is_some()),
        ("settings", body.settings.is_some()),
    ]
    .into_iter()
    .filter_map(|(f, set)| set.then_some(f))
    .collect();
    state
        .store
        .audit(Some(user.id()), "provider.updated", "provider", Some(&provider.id), json!({"fields": fields}))
        .await?;
    Ok(HttpResponse::Ok().json(provider))
}

async fn delete_provider(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    user.require_admin()?;
    if !state.store.delete_provider(&path).await? {
        return Err(ApiError::not_found(format!("provider {path}")));
    }
    state.store.audit(Some(user.id()), "provider.deleted", "provider", Some(&path), json!({})).await?;
    Ok(HttpResponse::NoContent().finish())
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
    check_model_fields(body.compaction_threshold, &body.prices, &body.settings)?;
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

fn check_model_fields(
    compaction_threshold: Option<f64>,
    prices: &ModelPrices,
    settings: &serde_json::Value,
) -> Result<(), ApiError> {
    if compaction_threshold.is_some_and(|t| !(t > 0.0 && t <= 1.0)) {
        return Err(ApiError::invalid("`compaction_threshold` must be a share of the context window in (0, 1]"));
    }
    let all = [prices.input_per_mtok, prices.output_per_mtok, prices.cache_read_per_mtok, prices.cache_write_per_mtok];
    if all.into_iter().flatten().any(|p| !(p.is_finite() && p >= 0.0)) {
        return Err(ApiError::invalid("prices must be finite and not negative (USD per million tokens)"));
    }
    check_settings(settings)
}

async fn get_model(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let model = state
        .store
        .get_model(&path)
        .await?
        .filter(|m| m.enabled || user.is_admin())
        .ok_or_else(|| ApiError::not_found(format!("model {path}")))?;
    Ok(HttpResponse::Ok().json(model))
}

async fn patch_model(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
    body: web::Json<PatchModel>,
) -> Result<HttpResponse, ApiError> {
    user.require_admin()?;
    if body.context_window.is_some_and(|c| c <= 0) {
        return Err(ApiError::invalid("`context_window` must be positive"));
    }
    if body.max_output_tokens.flatten().is_some_and(|m| m <= 0) {
        return Err(ApiError::invalid("`max_output_tokens` must be positive"));
    }
    check_model_fields(
        body.compaction_threshold.flatten(),
        &body.prices.unwrap_or_default(),
        body.settings.as_ref().unwrap_or(&serde_json::Value::Null),
    )?;
    let model =
        state.store.patch_model(&path, &body).await?.ok_or_else(|| ApiError::not_found(format!("model {path}")))?;
    state
        .store
        .audit(
            Some(user.id()),
            "model.updated",
            "model",
            Some(&model.id),
            serde_json::to_value(&*body).unwrap_or_default(),
        )
        .await?;
    Ok(HttpResponse::Ok().json(model))
}

async fn delete_model(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    user.require_admin()?;
    if !state.store.delete_model(&path).await? {
        return Err(ApiError::not_found(format!("model {path}")));
    }
    state.store.audit(Some(user.id()), "model.deleted", "model", Some(&path), json!({})).await?;
    Ok(HttpResponse::NoContent().finish())
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

async fn get_template(
    state: web::Data<AppState>,
    _user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let template =
        state.store.get_template(&path).await?.ok_or_else(|| ApiError::not_found(format!("template {path}")))?;
    Ok(HttpResponse::Ok().json(template))
}

async fn patch_template(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
    body: web::Json<PatchTemplate>,
) -> Result<HttpResponse, ApiError> {
    user.require_admin()?;
    let current =
        state.store.get_template(&path).await?.ok_or_else(|| ApiError::not_found(format!("template {path}")))?;
    if body.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(ApiError::invalid("`name` must not be empty"));
    }
    if let Some(parameters) = &body.parameters {
        crate::provisioners::params::check_spec(parameters).map_err(ApiError::invalid)?;
    }
    let template = state.store.update_template(&current.id, &body).await?;
    state
        .store
        .audit(Some(user.id()), "template.updated", "template", Some(&template.id), json!({"name": template.name}))
        .await?;
    Ok(HttpResponse::Ok().json(template))
}

async fn delete_template(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    user.require_admin()?;
    let current =
        state.store.get_template(&path).await?.ok_or_else(|| ApiError::not_found(format!("template {path}")))?;
    state.store.delete_template(&current.id).await?;
    state
        .store
        .audit(Some(user.id()), "template.deleted", "template", Some(&current.id), json!({"name": current.name}))
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn list_workspaces(state: web::Data<AppState>, user: AuthUser) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.store.list_workspaces(Some(user.id())).await?))
}

/// The caller's workspace; another user's is indistinguishable from none.
async fn own_workspace(state: &AppState, user: &AuthUser, id: &str) -> Result<Workspace, ApiError> {
    match state.store.get_workspace(id).await? {
        Some(ws) if ws.owner_id == user.id() && ws.status != WorkspaceStatus::Deleted => Ok(ws),
        _ => Err(ApiError::not_found(format!("workspace {id}"))),
    }
}

fn provision_error(e: ProvisionError) -> ApiError {
    ApiError::new(ApiErrorKind::Conflict, e.message)
}

async fn create_workspace(
    state: web::Data<AppState>,
    user: AuthUser,
    body: web::Json<CreateWorkspace>,
) -> Result<HttpResponse, ApiError> {
    let template = state
        .store
        .get_template(&body.template_id)
        .await?
        .ok_or_else(|| ApiError::invalid(format!("template `{}` does not exist", body.template_id)))?;
    params::validate(&template.parameters, &body.parameters).map_err(ApiError::invalid)?;
    let ws = state
        .workspaces
        .create(user.id(), &template, body.name.clone(), &body.parameters, "created over the API")
        .await
        .map_err(provision_error)?;
    state
        .store
        .audit(Some(user.id()), "workspace.created", "workspace", Some(&ws.id), json!({"template_id": template.id}))
        .await?;
    Ok(HttpResponse::Created().json(ws))
}

async fn get_workspace(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let ws = own_workspace(&state, &user, &path).await?;
    let detail = state.workspaces.detail(&ws.id).await.map_err(provision_error)?;
    Ok(HttpResponse::Ok().json(detail))
}

async fn start_workspace(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let ws = own_workspace(&state, &user, &path).await?;
    let ws = state.workspaces.start(&ws).await.map_err(provision_error)?;
    state.store.audit(Some(user.id()), "workspace.started", "workspace", Some(&ws.id), json!({})).await?;
    Ok(HttpResponse::Ok().json(ws))
}

async fn stop_workspace(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let ws = own_workspace(&state, &user, &path).await?;
    let ws = state.workspaces.stop(&ws).await.map_err(provision_error)?;
    state.store.audit(Some(user.id()), "workspace.stopped", "workspace", Some(&ws.id), json!({})).await?;
    Ok(HttpResponse::Ok().json(ws))
}

/// Deletes the workspace; chats that used it keep their history and provision a new one.
async fn delete_workspace(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let ws = own_workspace(&state, &user, &path).await?;
    state.workspaces.delete(&ws).await.map_err(provision_error)?;
    state.store.audit(Some(user.id()), "workspace.deleted", "workspace", Some(&ws.id), json!({})).await?;
    Ok(HttpResponse::NoContent().finish())
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
