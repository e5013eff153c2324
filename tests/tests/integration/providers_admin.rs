//! The provider and model admin API: defaults, validation, write-only keys, updates, deletes,
//! and what members see.

use agentplane_schema::api::{
    CreateModel, CreateProvider, CreateUser, ModelPrices, PatchModel, PatchProvider, ProviderType, UserRole,
};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::TestEnv;

fn provider(provider_type: ProviderType, base_url: &str, settings: serde_json::Value) -> CreateProvider {
    CreateProvider {
        provider_type,
        name: format!("{}-{}", provider_type.as_str(), base_url.len()),
        base_url: base_url.into(),
        api_key: Some("sk-admin-test-key-123".into()),
        settings,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_get_default_endpoints_and_keys_stay_write_only() {
    let env = TestEnv::start().await;
    let anthropic =
        env.admin.create_provider(&provider(ProviderType::Anthropic, "", json!({}))).await.expect("created");
    assert_eq!(anthropic.base_url, "https://api.anthropic.com");
    assert!(anthropic.has_api_key);
    let bedrock = env
        .admin
        .create_provider(&provider(ProviderType::Bedrock, "", json!({"region": "eu-west-1", "access_key_id": "AKIA1"})))
        .await
        .expect("bedrock");
    assert_eq!(bedrock.base_url, "https://bedrock-runtime.eu-west-1.amazonaws.com");

    // What cannot work is refused with a reason.
    for (body, needle) in [
        (provider(ProviderType::Azure, "", json!({})), "`base_url` is required for azure"),
        (provider(ProviderType::Bedrock, "", json!({})), "settings.region"),
        (provider(ProviderType::Openai, "", json!({"secret_access_key": "x"})), "would be stored unencrypted"),
        (
            provider(ProviderType::Bedrock, "", json!({"region": "us-east-1", "session_token": "t"})),
            "would be stored unencrypted",
        ),
        (provider(ProviderType::Openai, "ftp://x", json!({})), "http:// or https://"),
        (provider(ProviderType::Openai, "", json!([1])), "must be an object"),
    ] {
        let err = env.admin.create_provider(&body).await.expect_err("refused");
        assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST), "{err}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
    let (status, body) = env
        .admin
        .raw(Method::POST, "/api/v1/providers", Some(json!({"type": "cohere", "name": "x", "base_url": "https://x"})))
        .await
        .expect("test");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Updates: the key can be replaced or removed, never read.
    let updated = env
        .admin
        .patch_provider(&anthropic.id, &PatchProvider { api_key: Some(None), ..Default::default() })
        .await
        .expect("key removed");
    assert!(!updated.has_api_key);
    let updated = env
        .admin
        .patch_provider(
            &anthropic.id,
            &PatchProvider {
                api_key: Some(Some("sk-new".into())),
                base_url: Some("https://proxy.internal/anthropic".into()),
                ..Default::default()
            },
        )
        .await
        .expect("key set");
    assert!(updated.has_api_key);
    assert_eq!(updated.base_url, "https://proxy.internal/anthropic");
    let (_, list) = env.admin.raw(Method::GET, "/api/v1/providers", None).await.expect("test");
    assert!(!list.to_string().contains("sk-"), "{list}");

    // A provider in use cannot be deleted; once its models are gone it can.
    let model = env
        .admin
        .create_model(&CreateModel {
            provider_id: anthropic.id.clone(),
            model: "claude-x".into(),
            display_name: None,
            context_window: 200_000,
            max_output_tokens: Some(8192),
            vision: true,
            enabled: false,
            is_default: false,
            compaction_threshold: Some(0.8),
            prices: ModelPrices { input_per_mtok: Some(3.0), output_per_mtok: Some(15.0), ..Default::default() },
            settings: json!({"thinking_budget_tokens": 2048}),
        })
        .await
        .expect("model");
    assert_eq!(model.compaction_threshold, Some(0.8));
    assert_eq!(model.settings["thinking_budget_tokens"], 2048);
    let err = env.admin.delete_provider(&anthropic.id).await.expect_err("in use");
    assert_eq!(err.status(), Some(StatusCode::CONFLICT));
    assert!(err.to_string().contains("claude-x"), "{err}");

    // Members see enabled models only, and cannot manage providers.
    let member = env.admin.create_user(&CreateUser { name: "m".into(), role: UserRole::Member }).await.expect("member");
    let member = env.admin.with_token(member.token);
    assert!(member.list_models().await.expect("test").iter().all(|m| m.id != model.id));
    let (status, _) = member.raw(Method::GET, &format!("/api/v1/models/{}", model.id), None).await.expect("test");
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(member.list_providers().await.expect_err("admin only").status(), Some(StatusCode::FORBIDDEN));
    let enabled = env
        .admin
        .patch_model(&model.id, &PatchModel { enabled: Some(true), is_default: Some(true), ..Default::default() })
        .await
        .expect("enabled");
    assert!(enabled.is_default);
    assert!(member.list_models().await.expect("test").iter().any(|m| m.id == model.id));
    // Only one default.
    assert_eq!(env.admin.list_models().await.expect("test").iter().filter(|m| m.is_default).count(), 1);
    let err = env
        .admin
        .patch_model(&model.id, &PatchModel { compaction_threshold: Some(Some(1.5)), ..Default::default() })
        .await
        .expect_err("bad threshold");
    assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));

    env.admin.delete_model(&model.id).await.expect("model deleted");
    env.admin.delete_provider(&anthropic.id).await.expect("provider deleted");
    assert!(env.admin.list_providers().await.expect("test").iter().all(|p| p.id != anthropic.id));
}

/// A rotated key is used by the very next model call (resolved models are cached per step, and
/// a change through the API empties that cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_used_by_the_next_call() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("first").await;
    assert_eq!(env.llm.requests().last().expect("call").header("authorization"), Some("Bearer sk-test-secret"));
    let provider = env.admin.list_providers().await.expect("providers").remove(0);
    env.admin
        .patch_provider(&provider.id, &PatchProvider { api_key: Some(Some("sk-rotated".into())), ..Default::default() })
        .await
        .expect("rotated");
    env.llm.push(agentplane_tests::Reply::text("second"));
    env.send(&chat.id, "again").await;
    stream.wait_for_status(agentplane_schema::api::ChatStatus::Idle, crate::common::WAIT).await.expect("idle");
    assert_eq!(env.llm.requests().last().expect("call").header("authorization"), Some("Bearer sk-rotated"));
}
