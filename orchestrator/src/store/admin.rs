//! Users, tokens, providers, models, templates, workspaces and the audit log.

use agentplane_actors::ports::StoreError;
use agentplane_schema::api::{
    CreateModel, CreateProvider, CreateTemplate, Model, ModelPrices, PatchModel, PatchProvider, PatchTemplate,
    Provider, ProviderType, ProvisionerSpec, Template, User, UserRole, Workspace, WorkspaceDetail, WorkspaceStatus,
};
use agentplane_schema::db::entities::{api_tokens, audit_events, models, providers, templates, users, workspaces};
use agentplane_schema::new_id;
use chrono::Utc;
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::{Expr, Query};
use sea_orm::{ColumnTrait, Condition, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder};
use sha2::{Digest, Sha256};

use super::convert::from_json;
use super::{DbStore, db_err};
use crate::secrets::SecretBox;

/// SHA-256 of a token, hex: what the database keeps instead of the token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random API token.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("ap_{}", hex::encode(bytes))
}

fn user_from_row(r: users::Model) -> User {
    User {
        id: r.id,
        name: r.name,
        role: UserRole::parse(&r.role).unwrap_or(UserRole::Member),
        created_at: r.created_at,
    }
}

fn provider_from_row(r: providers::Model) -> Option<Provider> {
    Some(Provider {
        provider_type: ProviderType::parse(&r.provider_type)?,
        id: r.id,
        name: r.name,
        base_url: r.base_url,
        has_api_key: r.api_key.is_some(),
        settings: r.settings,
        created_at: r.created_at,
    })
}

fn model_from_row(r: models::Model) -> Model {
    Model {
        id: r.id,
        provider_id: r.provider_id,
        model: r.model,
        display_name: r.display_name,
        context_window: r.context_window,
        max_output_tokens: r.max_output_tokens,
        vision: r.vision,
        enabled: r.enabled,
        is_default: r.is_default,
        compaction_threshold: r.compaction_threshold,
        prices: ModelPrices {
            input_per_mtok: r.input_price_per_mtok,
            output_per_mtok: r.output_price_per_mtok,
            cache_read_per_mtok: r.cache_read_price_per_mtok,
            cache_write_per_mtok: r.cache_write_price_per_mtok,
        },
        settings: r.settings.unwrap_or_else(|| serde_json::json!({})),
        created_at: r.created_at,
    }
}

fn settings_or_empty(settings: &serde_json::Value) -> serde_json::Value {
    if settings.is_null() { serde_json::json!({}) } else { settings.clone() }
}

fn template_from_row(r: templates::Model) -> Result<Template, StoreError> {
    Ok(Template {
        parameters: from_json(r.parameters, "template parameters")?,
        provisioner: from_json::<ProvisionerSpec>(r.provisioner, "template provisioner")?,
        id: r.id,
        name: r.name,
        description: r.description,
        created_at: r.created_at,
    })
}

pub fn workspace_from_row(r: workspaces::Model) -> Workspace {
    Workspace {
        id: r.id,
        name: r.name,
        template_id: r.template_id,
        owner_id: r.owner_id,
        status: WorkspaceStatus::parse(&r.status).unwrap_or(WorkspaceStatus::Failed),
        parameters: r.parameters,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

impl DbStore {
    pub async fn count_users(&self) -> Result<u64, StoreError> {
        users::Entity::find().count(&self.db).await.map_err(db_err)
    }

    /// Creates a user with one API token; returns the user, the token id and the token.
    pub async fn create_user_with_token(
        &self,
        name: &str,
        role: UserRole,
        token: Option<String>,
    ) -> Result<(User, String, String), StoreError> {
        let now = Utc::now();
        let user = users::Model { id: new_id(), name: name.to_string(), role: role.as_str().into(), created_at: now };
        let token = token.unwrap_or_else(new_token);
        let token_id = new_id();
        let txn = self.begin_write().await?;
        users::Entity::insert(users::ActiveModel::from(user.clone()))
            .exec_without_returning(&txn)
            .await
            .map_err(db_err)?;
        api_tokens::Entity::insert(api_tokens::ActiveModel {
            id: Set(token_id.clone()),
            user_id: Set(user.id.clone()),
            name: Set("default".into()),
            token_hash: Set(token_hash(&token)),
            created_at: Set(now),
            last_used_at: Set(None),
            revoked: Set(false),
        })
        .exec_without_returning(&txn)
        .await
        .map_err(db_err)?;
        txn.commit().await.map_err(db_err)?;
        Ok((user_from_row(user), token_id, token))
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<User>, StoreError> {
        Ok(users::Entity::find()
            .filter(users::Column::Name.eq(name))
            .one(&self.db)
            .await
            .map_err(db_err)?
            .map(user_from_row))
    }

    /// The user a (not revoked) token belongs to: one query, as every API request asks it, and
    /// none while the answer is recent (see [`super::TOKEN_CACHE_TTL`]).
    pub async fn user_by_token(&self, token: &str) -> Result<Option<User>, StoreError> {
        let hash = token_hash(token);
        let miss = match self.tokens.get(&hash) {
            Ok(user) => return Ok(Some(user)),
            Err(miss) => miss,
        };
        let token_owner = Query::select()
            .column(api_tokens::Column::UserId)
            .from(api_tokens::Entity)
            .and_where(api_tokens::Column::TokenHash.eq(hash.as_str()))
            .and_where(api_tokens::Column::Revoked.eq(false))
            .to_owned();
        let user = users::Entity::find()
            .filter(users::Column::Id.in_subquery(token_owner))
            .one(&self.db)
            .await
            .map_err(db_err)?
            .map(user_from_row);
        if let Some(user) = &user {
            self.tokens.put(miss, hash, user.clone());
        }
        Ok(user)
    }

    /// Adds a provider; its API key is stored sealed (see [`crate::secrets`]).
    pub async fn create_provider(&self, p: &CreateProvider) -> Result<Provider, StoreError> {
        let now = Utc::now();
        let id = new_id();
        let row = providers::Model {
            api_key: p.api_key.as_deref().filter(|k| !k.is_empty()).map(|k| self.secrets.seal(&id, k)),
            id,
            provider_type: p.provider_type.as_str().into(),
            name: p.name.clone(),
            base_url: p.base_url.clone(),
            settings: settings_or_empty(&p.settings),
            created_at: now,
            updated_at: now,
        };
        providers::Entity::insert(providers::ActiveModel::from(row.clone()))
            .exec_without_returning(&self.db)
            .await
            .map_err(db_err)?;
        self.forget_models();
        provider_from_row(row).ok_or_else(|| StoreError::Database("unknown provider type".into()))
    }

    pub async fn list_providers(&self) -> Result<Vec<Provider>, StoreError> {
        let rows =
            providers::Entity::find().order_by_asc(providers::Column::Name).all(&self.db).await.map_err(db_err)?;
        Ok(rows.into_iter().filter_map(provider_from_row).collect())
    }

    /// Changes the fields given; `None` when there is no such provider.
    pub async fn patch_provider(&self, id: &str, p: &PatchProvider) -> Result<Option<Provider>, StoreError> {
        let Some(row) = providers::Entity::find_by_id(id).one(&self.db).await.map_err(db_err)? else {
            return Ok(None);
        };
        let mut active = providers::ActiveModel::from(row);
        if let Some(name) = &p.name {
            active.name = Set(name.clone());
        }
        if let Some(url) = &p.base_url {
            active.base_url = Set(url.clone());
        }
        if let Some(key) = &p.api_key {
            active.api_key = Set(key.as_deref().filter(|k| !k.is_empty()).map(|k| self.secrets.seal(id, k)));
        }
        if let Some(settings) = &p.settings {
            active.settings = Set(settings_or_empty(settings));
        }
        active.updated_at = Set(Utc::now());
        let row = providers::Entity::update(active).exec(&self.db).await.map_err(db_err)?;
        self.forget_models();
        Ok(provider_from_row(row))
    }

    /// Deletes a provider that no model uses. `Err(Conflict)` names the models still using it.
    pub async fn delete_provider(&self, id: &str) -> Result<bool, StoreError> {
        let users: Vec<String> = models::Entity::find()
            .filter(models::Column::ProviderId.eq(id))
            .all(&self.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(|m| m.display_name)
            .collect();
        if !users.is_empty() {
            return Err(StoreError::Conflict(format!(
                "provider {id} is used by the models {}; delete or move them first",
                users.join(", ")
            )));
        }
        let result = providers::Entity::delete_by_id(id).exec(&self.db).await.map_err(db_err)?;
        self.forget_models();
        Ok(result.rows_affected > 0)
    }

    /// The decrypted API key of a provider row.
    pub(crate) fn provider_api_key(&self, row: &providers::Model) -> Result<Option<String>, StoreError> {
        let Some(stored) = row.api_key.as_deref() else { return Ok(None) };
        self.secrets
            .open(&row.id, stored)
            .map(Some)
            .map_err(|e| StoreError::Database(format!("the API key of provider `{}` {e}", row.name)))
    }

    /// Run at start: every stored API key must decrypt with the configured key (a wrong key
    /// fails here, not at the first model call); keys an older version stored in plaintext are
    /// sealed. Returns how many were sealed.
    pub async fn check_provider_keys(&self) -> Result<usize, StoreError> {
        let mut sealed = 0;
        for row in providers::Entity::find().all(&self.db).await.map_err(db_err)? {
            let Some(stored) = row.api_key.clone() else { continue };
            if SecretBox::is_sealed(&stored) {
                self.provider_api_key(&row)?;
                continue;
            }
            let id = row.id.clone();
            let mut active = providers::ActiveModel::from(row);
            active.api_key = Set(Some(self.secrets.seal(&id, &stored)));
            providers::Entity::update(active).exec(&self.db).await.map_err(db_err)?;
            sealed += 1;
        }
        Ok(sealed)
    }

    pub async fn provider_exists(&self, id: &str) -> Result<bool, StoreError> {
        Ok(providers::Entity::find_by_id(id).one(&self.db).await.map_err(db_err)?.is_some())
    }

    /// Adds a model; a new default takes the flag from the previous one.
    pub async fn create_model(&self, m: &CreateModel) -> Result<Model, StoreError> {
        let row = models::Model {
            id: new_id(),
            provider_id: m.provider_id.clone(),
            model: m.model.clone(),
            display_name: m.display_name.clone().unwrap_or_else(|| m.model.clone()),
            context_window: m.context_window,
            max_output_tokens: m.max_output_tokens,
            vision: m.vision,
            enabled: m.enabled,
            is_default: m.is_default,
            compaction_threshold: m.compaction_threshold,
            input_price_per_mtok: m.prices.input_per_mtok,
            output_price_per_mtok: m.prices.output_per_mtok,
            cache_read_price_per_mtok: m.prices.cache_read_per_mtok,
            cache_write_price_per_mtok: m.prices.cache_write_per_mtok,
            settings: Some(settings_or_empty(&m.settings)),
            created_at: Utc::now(),
        };
        let txn = self.begin_write().await?;
        if m.is_default {
            models::Entity::update_many()
                .col_expr(models::Column::IsDefault, Expr::value(false))
                .filter(models::Column::IsDefault.eq(true))
                .exec(&txn)
                .await
                .map_err(db_err)?;
        }
        models::Entity::insert(models::ActiveModel::from(row.clone()))
            .exec_without_returning(&txn)
            .await
            .map_err(db_err)?;
        txn.commit().await.map_err(db_err)?;
        self.forget_models();
        Ok(model_from_row(row))
    }

    pub async fn list_models(&self, enabled_only: bool) -> Result<Vec<Model>, StoreError> {
        let mut q = models::Entity::find();
        if enabled_only {
            q = q.filter(models::Column::Enabled.eq(true));
        }
        let rows = q.order_by_asc(models::Column::DisplayName).all(&self.db).await.map_err(db_err)?;
        Ok(rows.into_iter().map(model_from_row).collect())
    }

    /// Changes the fields given; a new default takes the flag from the previous one.
    pub async fn patch_model(&self, id: &str, p: &PatchModel) -> Result<Option<Model>, StoreError> {
        let txn = self.begin_write().await?;
        let Some(row) = models::Entity::find_by_id(id).one(&txn).await.map_err(db_err)? else {
            return Ok(None);
        };
        if p.is_default == Some(true) {
            models::Entity::update_many()
                .col_expr(models::Column::IsDefault, Expr::value(false))
                .filter(models::Column::IsDefault.eq(true))
                .exec(&txn)
                .await
                .map_err(db_err)?;
        }
        let mut active = models::ActiveModel::from(row);
        if let Some(v) = &p.display_name {
            active.display_name = Set(v.clone());
        }
        if let Some(v) = p.context_window {
            active.context_window = Set(v);
        }
        if let Some(v) = p.max_output_tokens {
            active.max_output_tokens = Set(v);
        }
        if let Some(v) = p.vision {
            active.vision = Set(v);
        }
        if let Some(v) = p.enabled {
            active.enabled = Set(v);
        }
        if let Some(v) = p.is_default {
            active.is_default = Set(v);
        }
        if let Some(v) = p.compaction_threshold {
            active.compaction_threshold = Set(v);
        }
        if let Some(prices) = p.prices {
            active.input_price_per_mtok = Set(prices.input_per_mtok);
            active.output_price_per_mtok = Set(prices.output_per_mtok);
            active.cache_read_price_per_mtok = Set(prices.cache_read_per_mtok);
            active.cache_write_price_per_mtok = Set(prices.cache_write_per_mtok);
        }
        if let Some(settings) = &p.settings {
            active.settings = Set(Some(settings_or_empty(settings)));
        }
        let row = models::Entity::update(active).exec(&txn).await.map_err(db_err)?;
        txn.commit().await.map_err(db_err)?;
        self.forget_models();
        Ok(Some(model_from_row(row)))
    }

    /// Deletes a model. A chat that named it gets a clear `config` error on its next turn.
    pub async fn delete_model(&self, id: &str) -> Result<bool, StoreError> {
        let result = models::Entity::delete_by_id(id).exec(&self.db).await.map_err(db_err)?;
        self.forget_models();
        Ok(result.rows_affected > 0)
    }

    pub async fn get_model(&self, id: &str) -> Result<Option<Model>, StoreError> {
        Ok(models::Entity::find_by_id(id).one(&self.db).await.map_err(db_err)?.map(model_from_row))
    }

    pub async fn create_template(&self, t: &CreateTemplate) -> Result<Template, StoreError> {
        let now = Utc::now();
        let row = templates::Model {
            id: new_id(),
            name: t.name.clone(),
            description: t.description.clone(),
            parameters: super::convert::to_json(&t.parameters)?,
            provisioner: super::convert::to_json(&t.provisioner)?,
            created_at: now,
            updated_at: now,
        };
        templates::Entity::insert(templates::ActiveModel::from(row.clone()))
            .exec_without_returning(&self.db)
            .await
            .map_err(db_err)?;
        template_from_row(row)
    }

    /// Applies a patch; returns the template as it is now.
    pub async fn update_template(&self, id: &str, patch: &PatchTemplate) -> Result<Template, StoreError> {
        let mut row = templates::ActiveModel { updated_at: Set(Utc::now()), ..Default::default() };
        if let Some(name) = &patch.name {
            row.name = Set(name.clone());
        }
        if let Some(description) = &patch.description {
            row.description = Set(description.clone());
        }
        if let Some(parameters) = &patch.parameters {
            row.parameters = Set(super::convert::to_json(parameters)?);
        }
        if let Some(provisioner) = &patch.provisioner {
            row.provisioner = Set(super::convert::to_json(provisioner)?);
        }
        templates::Entity::update_many()
            .set(row)
            .filter(templates::Column::Id.eq(id))
            .exec(&self.db)
            .await
            .map_err(db_err)?;
        self.get_template(id).await?.ok_or_else(|| StoreError::NotFound(format!("template {id}")))
    }

    /// Deletes a template; workspaces made from it keep running but cannot be restarted.
    pub async fn delete_template(&self, id: &str) -> Result<(), StoreError> {
        templates::Entity::delete_by_id(id).exec(&self.db).await.map_err(db_err)?;
        Ok(())
    }

    pub async fn list_templates(&self) -> Result<Vec<Template>, StoreError> {
        let rows =
            templates::Entity::find().order_by_asc(templates::Column::Name).all(&self.db).await.map_err(db_err)?;
        rows.into_iter().map(template_from_row).collect()
    }

    pub async fn count_templates(&self) -> Result<u64, StoreError> {
        templates::Entity::find().count(&self.db).await.map_err(db_err)
    }

    /// By id or by name.
    pub async fn get_template(&self, id_or_name: &str) -> Result<Option<Template>, StoreError> {
        templates::Entity::find()
            .filter(
                Condition::any().add(templates::Column::Id.eq(id_or_name)).add(templates::Column::Name.eq(id_or_name)),
            )
            .one(&self.db)
            .await
            .map_err(db_err)?
            .map(template_from_row)
            .transpose()
    }

    pub async fn insert_workspace(&self, ws: &Workspace) -> Result<(), StoreError> {
        workspaces::Entity::insert(workspaces::ActiveModel {
            id: Set(ws.id.clone()),
            name: Set(ws.name.clone()),
            template_id: Set(ws.template_id.clone()),
            owner_id: Set(ws.owner_id.clone()),
            status: Set(ws.status.as_str().into()),
            parameters: Set(ws.parameters.clone()),
            state: Set(serde_json::json!({})),
            logs: Set(String::new()),
            created_at: Set(ws.created_at),
            updated_at: Set(ws.updated_at),
        })
        .exec_without_returning(&self.db)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// Sets a workspace's status and appends a line to its provisioning log.
    pub async fn set_workspace_status(
        &self,
        id: &str,
        status: WorkspaceStatus,
        log_line: &str,
    ) -> Result<(), StoreError> {
        let Some(row) = workspaces::Entity::find_by_id(id).one(&self.db).await.map_err(db_err)? else {
            return Err(StoreError::NotFound(format!("workspace {id}")));
        };
        let mut logs = row.logs;
        logs.push_str(&format!("{} {}\n", Utc::now().to_rfc3339(), log_line));
        let update = workspaces::ActiveModel {
            status: Set(status.as_str().into()),
            logs: Set(logs),
            updated_at: Set(Utc::now()),
            ..Default::default()
        };
        workspaces::Entity::update_many()
            .set(update)
            .filter(workspaces::Column::Id.eq(id))
            .exec(&self.db)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// Appends lines to a workspace's provisioning log.
    pub async fn append_workspace_log(&self, id: &str, text: &str) -> Result<(), StoreError> {
        let Some(row) = workspaces::Entity::find_by_id(id).one(&self.db).await.map_err(db_err)? else {
            return Err(StoreError::NotFound(format!("workspace {id}")));
        };
        let mut logs = row.logs;
        for line in text.lines() {
            logs.push_str(&format!("{} {}\n", Utc::now().to_rfc3339(), line));
        }
        let update = workspaces::ActiveModel { logs: Set(logs), updated_at: Set(Utc::now()), ..Default::default() };
        workspaces::Entity::update_many()
            .set(update)
            .filter(workspaces::Column::Id.eq(id))
            .exec(&self.db)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    pub async fn workspace_detail(&self, id: &str) -> Result<Option<WorkspaceDetail>, StoreError> {
        Ok(workspaces::Entity::find_by_id(id)
            .one(&self.db)
            .await
            .map_err(db_err)?
            .map(|r| WorkspaceDetail { logs: r.logs.clone(), workspace: workspace_from_row(r) }))
    }

    pub async fn get_workspace(&self, id: &str) -> Result<Option<Workspace>, StoreError> {
        Ok(workspaces::Entity::find_by_id(id).one(&self.db).await.map_err(db_err)?.map(workspace_from_row))
    }

    /// Workspaces of an owner (all of them when `None`), not deleted.
    pub async fn list_workspaces(&self, owner_id: Option<&str>) -> Result<Vec<Workspace>, StoreError> {
        let mut q = workspaces::Entity::find().filter(workspaces::Column::Status.ne(WorkspaceStatus::Deleted.as_str()));
        if let Some(o) = owner_id {
            q = q.filter(workspaces::Column::OwnerId.eq(o));
        }
        let rows = q.order_by_desc(workspaces::Column::CreatedAt).all(&self.db).await.map_err(db_err)?;
        Ok(rows.into_iter().map(workspace_from_row).collect())
    }

    pub async fn audit(
        &self,
        user_id: Option<&str>,
        action: &str,
        target_type: &str,
        target_id: Option<&str>,
        details: serde_json::Value,
    ) -> Result<(), StoreError> {
        audit_events::Entity::insert(super::convert::audit_row(
            user_id.map(str::to_string),
            action,
            target_type,
            target_id.map(str::to_string),
            details,
        ))
        .exec_without_returning(&self.db)
        .await
        .map_err(db_err)?;
        Ok(())
    }
}
