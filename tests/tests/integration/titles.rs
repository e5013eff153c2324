//! Titles: generated from the first message by one short call to the configured title model; a
//! title the user gave is kept; titles stay editable.

use agentplane_schema::api::{ChatStatus, CreateChat, CreateModel, PatchChat};
use agentplane_schema::message::Part;
use agentplane_tests::{RecordedRequest, Reply, ScriptedLlm};

use crate::common::{Db, TestEnv, WAIT};

fn is_title_request(r: &RecordedRequest) -> bool {
    r.system_prompt().is_some_and(|s| s.contains("short, specific titles"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn titles_come_from_the_title_model_and_stay_editable() {
    let responder = |r: &RecordedRequest| {
        // The title answer takes a moment, so a rename can come first.
        if is_title_request(r) {
            Reply::text("\"Fixing the Flaky CI Build\"").delay(std::time::Duration::from_millis(300))
        } else {
            Reply::text("on it")
        }
    };
    let mut env =
        TestEnv::start_full(ScriptedLlm::with_responder(responder), Db::Sqlite, |s| s.agent.generate_titles = true)
            .await;
    let provider = env.admin.list_providers().await.expect("providers").pop().expect("provider");
    let cheap = env
        .admin
        .create_model(&CreateModel {
            provider_id: provider.id,
            model: "cheap-titles".into(),
            display_name: None,
            context_window: 8000,
            max_output_tokens: None,
            vision: false,
            enabled: true,
            is_default: false,
            compaction_threshold: None,
            prices: Default::default(),
            settings: serde_json::Value::Null,
        })
        .await
        .expect("cheap model");
    env.settings.agent.title_model_id = cheap.id.clone();
    env.restart_server().await;

    let chat = env.create_chat("my CI build fails randomly; help me find the flaky test").await;
    let titled = env
        .admin
        .wait_until_chat(&chat.id, |c| c.title.as_deref() == Some("Fixing the Flaky CI Build"), WAIT)
        .await
        .expect("generated title");
    assert_eq!(titled.title.as_deref(), Some("Fixing the Flaky CI Build"));
    let title_requests: Vec<RecordedRequest> = env.llm.requests().into_iter().filter(is_title_request).collect();
    assert_eq!(title_requests.len(), 1);
    assert!(title_requests[0].last_user_text().unwrap_or_default().contains("flaky test"));
    assert!(title_requests[0].tool_names().is_empty(), "a title call offers no tools");
    assert_eq!(title_requests[0].model(), Some("cheap-titles"), "the configured title model is used");
    let chat_requests: Vec<RecordedRequest> = env.llm.requests().into_iter().filter(|r| !is_title_request(r)).collect();
    assert!(chat_requests.iter().all(|r| r.model() == Some("scripted-1")), "the chat itself uses its own model");

    // Editable, and a title the user gives is kept (no title call for it).
    let renamed = env
        .admin
        .patch_chat(&chat.id, &PatchChat { title: Some("CI flakes".into()), archived: None })
        .await
        .expect("patch");
    assert_eq!(renamed.title.as_deref(), Some("CI flakes"));
    let mine = env
        .admin
        .create_chat(&CreateChat {
            content: vec![Part::text("hello")],
            model_id: None,
            workspace_id: None,
            title: Some("Mine".into()),
        })
        .await
        .expect("chat");
    env.admin.wait_until_chat(&mine.id, |c| c.status == ChatStatus::Idle, WAIT).await.expect("idle");
    assert_eq!(env.llm.requests().into_iter().filter(is_title_request).count(), 1);
    assert_eq!(env.admin.get_chat(&mine.id).await.expect("chat").chat.title.as_deref(), Some("Mine"));

    // Renamed while its title is being generated: the user's name stays, and no title event
    // announces the generated one.
    let raced = env.create_chat("another flaky test question").await;
    let mut stream =
        agentplane_tests::EventStream::connect(&env.base_url(), &raced.id, crate::common::ADMIN_TOKEN, Some(0))
            .await
            .expect("ws");
    env.admin
        .patch_chat(&raced.id, &PatchChat { title: Some("My own name".into()), archived: None })
        .await
        .expect("patch");
    let deadline = std::time::Instant::now() + WAIT;
    while env.llm.requests().into_iter().filter(is_title_request).count() < 2 {
        assert!(std::time::Instant::now() < deadline, "the second title request was sent");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    env.llm.wait_until_idle(WAIT).await.expect("title answered");
    // The chat's actor handles its mailbox in order: once this turn is done, the generated title
    // (sent to it when the answer ended) has been considered.
    env.send(&raced.id, "next").await;
    env.admin.wait_until_chat(&raced.id, |c| c.status == ChatStatus::Idle, WAIT).await.expect("idle");
    let events = stream
        .wait_for(
            |e| matches!(&e.body, agentplane_schema::event::EventBody::Title { title } if title == "My own name"),
            WAIT,
        )
        .await
        .expect("rename event");
    assert!(
        events.iter().all(
            |e| !matches!(&e.body, agentplane_schema::event::EventBody::Title { title } if title.contains("Flaky"))
        )
    );
    let after = env.admin.get_chat(&raced.id).await.expect("chat").chat;
    assert_eq!(after.title.as_deref(), Some("My own name"));
}
