//! The happy path: streaming, coalescing, completion, history, prompt building.

use std::time::Duration;

use shared::protocol::HistoryMessage;
use testkit::llm::{Reply, Script};
use tokio::time::Instant;

use crate::common::*;

#[tokio::test]
async fn streams_ordered_coalesced_chunks_then_completes_and_records_history_once() {
    let env = Env::start().await;
    let reply = Reply::numbered(40);
    env.llm.set_default(Script::Reply(reply.clone()));
    let w = env
        .worker(|c| {
            c.llm_api_key = Some("sk-test-key".into());
            c.llm_model = Some("test-model".into());
        })
        .await;
    let req = request(&unique("u"), "hello there");
    let mut frames = env.frames(&req.user_id).await;
    env.publish(&req).await;

    let seen = frames.until_end().await;
    assert_eq!(seen.kind(), "chat.complete", "{:?}", seen.last);
    // seq 0, 1, 2.. without gaps, in order, for this request.
    let seqs = seen.seqs();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    for c in &seen.chunks {
        assert_eq!(c["request_id"], req.request_id.as_str());
        assert_eq!(c["session_id"], req.session_id.as_str());
    }
    assert_eq!(seen.chunk_text(), reply.text());
    assert_eq!(seen.last["content"], reply.text());
    // 40 tokens sent back to back (160 chars): coalesced into chunks of ~64 chars.
    assert!(
        seen.chunks.len() <= 8,
        "not coalesced: {} chunks",
        seen.chunks.len()
    );
    assert_eq!(seen.last["usage"]["completion_tokens"], 40);
    assert_eq!(seen.last["usage"]["prompt_tokens"], 7);

    // The LLM got a streaming request with usage, key, model and the message.
    let sent = env.llm.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].path, "/v1/chat/completions");
    assert_eq!(sent[0].authorization.as_deref(), Some("Bearer sk-test-key"));
    assert_eq!(sent[0].body["model"], "test-model");
    assert_eq!(sent[0].body["stream"], true);
    assert_eq!(sent[0].body["stream_options"]["include_usage"], true);
    let msgs = sent[0].messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[0]["content"], "hello there");

    // History: the user message and the reply, once, tagged with the request.
    let h = env.history(&req).await;
    assert_eq!(h.len(), 2, "{h:?}");
    assert_eq!(
        (h[0].role.as_str(), h[0].content.as_str()),
        ("user", "hello there")
    );
    assert_eq!(h[1].role, "assistant");
    assert_eq!(h[1].content, reply.text());
    assert!(
        h.iter()
            .all(|m| m.request_id.as_deref() == Some(&req.request_id))
    );
    env.wait_queue_empty().await;
    frames.expect_silence(Duration::from_millis(200)).await;

    let m = w.metrics().await;
    assert!(
        m.contains("switchboard_worker_requests_total{outcome=\"completed\"}"),
        "{m}"
    );
    assert!(
        m.contains("switchboard_worker_llm_first_token_seconds"),
        "{m}"
    );
}

#[tokio::test]
async fn slow_tokens_go_out_as_they_come() {
    let env = Env::start().await;
    let reply = Reply::new(["one ", "two ", "three ", "four ", "five"])
        .token_delay(Duration::from_millis(80))
        .crlf()
        .usage(false);
    env.llm.set_default(Script::Reply(reply.clone()));
    let _w = env.worker(|_| {}).await;
    let req = request(&unique("u"), "count");
    let mut frames = env.frames(&req.user_id).await;
    env.publish(&req).await;

    let first = frames.next().await;
    let first_at = Instant::now();
    assert_eq!(first["type"], "chat.chunk");
    assert_eq!(first["seq"], 0);
    assert_eq!(first["content"], "one ");
    let seen = frames.until_end().await;
    // The first token was sent ~4 token delays before the end, not held back.
    assert!(first_at.elapsed() >= Duration::from_millis(250));
    assert_eq!(seen.kind(), "chat.complete");
    assert_eq!(format!("one {}", seen.chunk_text()), reply.text());
    // One chunk per token: each goes out as it comes, 80 ms apart.
    assert!(seen.chunks.len() >= 3, "{:?}", seen.chunks);
    assert!(
        seen.last.get("usage").is_none(),
        "no usage from this server"
    );
}

#[tokio::test]
async fn system_prompt_and_history_within_the_token_budget() {
    let env = Env::start().await;
    let _w = env
        .worker(|c| {
            c.llm_system_prompt = Some("You are terse.".into()); // 14 chars: 4 tokens
            c.token_budget = Some(60);
        })
        .await;
    let user = unique("u");
    let mut req = request(&user, "q"); // 1 token
    // Six earlier messages of 40 characters (10 tokens each), three turns.
    for turn in 0..3 {
        let rid = format!("{}-old{turn}", req.request_id);
        let msgs: Vec<HistoryMessage> = ["user", "assistant"]
            .iter()
            .enumerate()
            .map(|(i, role)| HistoryMessage {
                role: role.to_string(),
                content: format!("{}{}", turn * 2 + i, "x".repeat(39)),
                ts: 1,
                request_id: Some(rid.clone()),
            })
            .collect();
        env.store
            .append_history(&req.session_id, &req.user_id, &rid, &msgs, 100)
            .await
            .unwrap();
    }
    req.message = "q".into();
    let mut frames = env.frames(&user).await;
    env.publish(&req).await;
    assert_eq!(frames.until_end().await.kind(), "chat.complete");

    // 60 - 4 - 1 = 55 tokens for history: the newest five messages; the oldest goes.
    let msgs = env.llm.requests()[0].messages();
    let roles: Vec<&str> = msgs.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(
        roles,
        [
            "system",
            "assistant",
            "user",
            "assistant",
            "user",
            "assistant",
            "user"
        ]
    );
    assert_eq!(msgs[0]["content"], "You are terse.");
    let firsts: Vec<char> = msgs[1..6]
        .iter()
        .map(|m| m["content"].as_str().unwrap().chars().next().unwrap())
        .collect();
    assert_eq!(firsts, ['1', '2', '3', '4', '5']);
    assert_eq!(msgs[6]["content"], "q");
    // The session now holds eight messages.
    assert_eq!(env.history(&req).await.len(), 8);
}

#[tokio::test]
async fn ollama_native_protocol_streams_ndjson() {
    let env = Env::start().await;
    let reply = Reply::numbered(12);
    env.llm.set_default(Script::Reply(reply.clone()));
    let _w = env
        .worker(|c| {
            c.llm_protocol = Some(worker::config::LlmProtocol::Ollama);
            c.llm_base_url = Some(env.llm.root_url());
            c.llm_model = Some("llama3.2".into());
            c.llm_max_tokens = Some(64);
        })
        .await;
    let req = request(&unique("u"), "hi");
    let mut frames = env.frames(&req.user_id).await;
    env.publish(&req).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.kind(), "chat.complete", "{:?}", seen.last);
    assert_eq!(seen.last["content"], reply.text());
    assert_eq!(seen.chunk_text(), reply.text());
    assert_eq!(seen.last["usage"]["completion_tokens"], 12);
    let sent = &env.llm.requests()[0];
    assert_eq!(sent.path, "/api/chat");
    assert_eq!(sent.body["model"], "llama3.2");
    assert_eq!(sent.body["options"]["num_predict"], 64);
}

#[tokio::test]
async fn a_request_already_in_history_only_republishes_complete() {
    let env = Env::start().await;
    let req = request(&unique("u"), "again?");
    let recorded = [
        HistoryMessage {
            role: "user".into(),
            content: "again?".into(),
            ts: 1,
            request_id: Some(req.request_id.clone()),
        },
        HistoryMessage {
            role: "assistant".into(),
            content: "the earlier reply".into(),
            ts: 2,
            request_id: Some(req.request_id.clone()),
        },
    ];
    env.store
        .append_history(
            &req.session_id,
            &req.user_id,
            &req.request_id,
            &recorded,
            100,
        )
        .await
        .unwrap();
    // Play a worker that completed it but died before its ack: deliver once, nak.
    env.publish(&req).await;
    let consumer = env.consumer().await;
    let mut batch = consumer
        .batch()
        .max_messages(1)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let msg = futures_util::StreamExt::next(&mut batch)
        .await
        .unwrap()
        .unwrap();
    msg.ack_with(async_nats::jetstream::AckKind::Nak(None))
        .await
        .unwrap();
    drop(batch);

    let mut frames = env.frames(&req.user_id).await;
    let _w = env.worker(|_| {}).await;
    let seen = frames.until_end().await;
    assert!(seen.chunks.is_empty(), "no chunks: {:?}", seen.chunks);
    assert_eq!(seen.kind(), "chat.complete");
    assert_eq!(seen.last["content"], "the earlier reply");
    assert_eq!(env.llm.request_count(), 0, "the LLM is not asked again");
    assert_eq!(env.history(&req).await.len(), 2);
    env.wait_queue_empty().await;
}
