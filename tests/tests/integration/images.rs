//! Images: uploaded once through the files API (checked by their bytes), referenced from message
//! parts, refused before anything is stored when the model cannot see them.

use agentplane_schema::api::{ChatStatus, CreateChat, PatchModel, SendMessage};
use agentplane_schema::message::{Part, Role};
use agentplane_tests::{Error, Reply};
use reqwest::StatusCode;

use crate::common::{TestEnv, WAIT};

/// A 1×1 PNG.
pub const PNG: &[u8] = &[
    0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1F, 0x15, 0xC4, 0x89, 0x00, 0x00, 0x00, 0x0D, 0x49,
    0x44, 0x41, 0x54, 0x78, 0x9C, 0x63, 0xF8, 0xCF, 0xC0, 0xF0, 0x1F, 0x00, 0x05, 0x00, 0x01, 0xFF, 0x89, 0x99, 0x3D,
    0x1D, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82,
];

fn api_status(e: &Error) -> (Option<StatusCode>, String) {
    (e.status(), e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_checked_by_their_bytes_and_belong_to_their_owner() {
    let env = TestEnv::start().await;
    // The declared type does not matter; the bytes do.
    let file = env.admin.upload_file(PNG.to_vec(), "application/octet-stream").await.expect("png");
    assert_eq!((file.content_type.as_str(), file.size), ("image/png", PNG.len() as i64));
    let jpeg =
        env.admin.upload_file([&[0xFF, 0xD8, 0xFF, 0xE0][..], &[0; 64]].concat(), "image/png").await.expect("jpeg");
    assert_eq!(jpeg.content_type, "image/jpeg");
    let gif = env.admin.upload_file(b"GIF89a\x01\x00\x01\x00rest".to_vec(), "image/gif").await.expect("gif");
    assert_eq!(gif.content_type, "image/gif");
    let webp = env.admin.upload_file(b"RIFF\x24\0\0\0WEBPVP8 rest".to_vec(), "image/webp").await.expect("webp");
    assert_eq!(webp.content_type, "image/webp");

    let (status, message) = api_status(&env.admin.upload_file(b"<svg/>".to_vec(), "image/png").await.expect_err("svg"));
    assert_eq!(status, Some(StatusCode::UNSUPPORTED_MEDIA_TYPE), "{message}");
    let (status, _) = api_status(&env.admin.upload_file(Vec::new(), "image/png").await.expect_err("empty"));
    assert_eq!(status, Some(StatusCode::BAD_REQUEST));
    let big = [PNG, &vec![0u8; 10 * 1024 * 1024]].concat();
    let (status, message) = api_status(&env.admin.upload_file(big, "image/png").await.expect_err("too big"));
    assert_eq!(status, Some(StatusCode::PAYLOAD_TOO_LARGE), "{message}");
    // Exactly 10 MiB is fine.
    let limit = [PNG, &vec![0u8; 10 * 1024 * 1024 - PNG.len()]].concat();
    env.admin.upload_file(limit, "image/png").await.expect("10 MiB");

    let (status, body) =
        env.admin.raw(reqwest::Method::GET, &format!("/api/v1/files/{}", file.id), None).await.expect("info");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["sha256"], file.sha256);

    // Another user sees neither the file nor can reference it.
    let member = env
        .admin
        .create_user(&agentplane_schema::api::CreateUser {
            name: "eve".into(),
            role: agentplane_schema::api::UserRole::Member,
        })
        .await
        .expect("member");
    let eve = env.admin.with_token(member.token);
    let (status, _) =
        eve.raw(reqwest::Method::GET, &format!("/api/v1/files/{}/content", file.id), None).await.expect("test");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let err = eve
        .create_chat(&CreateChat {
            content: vec![Part::Image { file_id: file.id.clone() }],
            model_id: None,
            workspace_id: None,
            title: None,
        })
        .await
        .expect_err("not eve's file");
    assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_for_a_model_without_vision_is_refused_before_anything_happens() {
    let env = TestEnv::start().await;
    let (chat, mut stream) = env.idle_chat("hello").await;
    let requests_before = env.llm.request_count();
    let file = env.admin.upload_file(PNG.to_vec(), "image/png").await.expect("png");

    let image_only = vec![Part::Image { file_id: file.id.clone() }];
    let err = env
        .admin
        .send(&chat.id, &SendMessage { content: image_only.clone(), busy_behavior: Default::default() })
        .await
        .expect_err("refused");
    assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));
    assert!(err.to_string().contains("does not accept images"), "{err}");
    let err = env
        .admin
        .create_chat(&CreateChat { content: image_only.clone(), model_id: None, workspace_id: None, title: None })
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("does not accept images"), "{err}");
    // Nothing stored, no model called.
    assert_eq!(env.messages(&chat.id).await.len(), 2);
    assert_eq!(env.admin.list_chats().await.expect("test").len(), 1);
    assert_eq!(env.llm.request_count(), requests_before);

    // Marked `vision`, the same image-only message goes through and reaches the model.
    let model = env.admin.list_models().await.expect("test").remove(0);
    env.admin.patch_model(&model.id, &PatchModel { vision: Some(true), ..Default::default() }).await.expect("vision");
    env.llm.push(Reply::text("a single pixel"));
    env.admin
        .send(&chat.id, &SendMessage { content: image_only, busy_behavior: Default::default() })
        .await
        .expect("accepted");
    stream.wait_for_status(ChatStatus::Idle, WAIT).await.expect("idle");
    let messages = env.messages(&chat.id).await;
    assert_eq!(messages[2].role, Role::User);
    assert_eq!(*messages[2].parts, [Part::Image { file_id: file.id.clone() }]);
    assert_eq!(messages.last().expect("test").text(), "a single pixel");
    // Chat Completions carries it as a data URL in an `image_url` part.
    let request = env.llm.requests().pop().expect("request");
    let user = request.messages().iter().rev().find(|m| m["role"] == "user").expect("user message").clone();
    let url = user["content"][0]["image_url"]["url"].as_str().unwrap_or_default().to_string();
    let expected = format!("data:image/png;base64,{}", data_encoding::BASE64.encode(PNG));
    assert_eq!(url, expected, "{user}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_only_first_message_gets_no_title_call() {
    let env = TestEnv::start_with(crate::common::Db::Sqlite, |s| s.agent.generate_titles = true).await;
    let model = env.admin.list_models().await.expect("models").remove(0);
    env.admin.patch_model(&model.id, &PatchModel { vision: Some(true), ..Default::default() }).await.expect("vision");
    let file = env.admin.upload_file(PNG.to_vec(), "image/png").await.expect("png");
    env.llm.push(Reply::text("a pixel"));
    let chat = env
        .admin
        .create_chat(&CreateChat {
            content: vec![Part::Image { file_id: file.id }],
            model_id: None,
            workspace_id: None,
            title: None,
        })
        .await
        .expect("created");
    let chat = env.admin.wait_until_chat(&chat.id, |c| c.status == ChatStatus::Idle, WAIT).await.expect("idle");
    assert_eq!(chat.title, None);
    // Only the turn's model call: no title was asked for an image.
    assert_eq!(env.llm.request_count(), 1);
}
