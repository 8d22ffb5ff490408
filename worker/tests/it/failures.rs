//! Failures: worker death, LLM errors before and after the first token, timeouts,
//! delivery exhaustion, a NATS restart.

use std::time::Duration;

use async_nats::jetstream::AckKind;
use futures_util::StreamExt;
use testkit::llm::{End, Reply, Script};
use tokio::time::Instant;

use crate::common::*;

#[tokio::test]
async fn a_killed_workers_request_completes_on_another_worker_recorded_once() {
    let env = Env::start().await;
    let reply = Reply::numbered(24).token_delay(Duration::from_millis(40));
    env.llm.set_default(Script::Reply(reply.clone()));
    let a = env.worker(|c| c.ack_wait_secs = Some(1)).await;
    let req = request(&unique("u"), "long one");
    let mut frames = env.frames(&req.user_id).await;
    env.publish(&req).await;

    // Worker A streams a little, then dies mid-stream.
    let first = frames.next().await;
    assert_eq!(
        (first["type"].as_str(), first["seq"].as_u64()),
        (Some("chat.chunk"), Some(0))
    );
    a.kill().await;
    assert!(
        env.llm.wait_for(WAIT, |s| s.disconnects() == 1).await,
        "the dead worker's upstream connection closes"
    );
    let b = env.worker(|c| c.ack_wait_secs = Some(1)).await;

    // B gets it after the ack wait and streams it again from seq 0.
    let mut restarted = false;
    let last = loop {
        let f = frames.next().await;
        match f["type"].as_str() {
            Some("chat.chunk") => {
                if f["seq"] == 0 {
                    restarted = true;
                }
            }
            _ => break f,
        }
    };
    assert!(restarted, "the second attempt starts at seq 0");
    assert_eq!(last["type"], "chat.complete", "{last}");
    assert_eq!(last["content"], reply.text());
    let h = env.history(&req).await;
    assert_eq!(h.len(), 2, "recorded exactly once: {h:?}");
    assert_eq!(h[1].content, reply.text());
    assert_eq!(env.llm.request_count(), 2);
    env.wait_queue_empty().await;
    let m = b.metrics().await;
    assert!(m.contains("switchboard_worker_redeliveries_total"), "{m}");
}

#[tokio::test]
async fn retries_after_429_honouring_retry_after_then_after_5xx() {
    let env = Env::start().await;
    env.llm.push(Script::rate_limited("1"));
    let _w = env.worker(|_| {}).await;
    let req = request(&unique("u"), "busy?");
    let mut frames = env.frames(&req.user_id).await;
    env.publish(&req).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.kind(), "chat.complete", "{:?}", seen.last);
    let sent = env.llm.requests();
    assert_eq!(sent.len(), 2);
    let waited = sent[1].at - sent[0].at;
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_millis(2500),
        "Retry-After: 1 honoured, waited {waited:?}"
    );

    // 500 and 503 before the first token: retried with backoff (20 ms base here).
    env.llm.push(Script::status(500));
    env.llm.push(Script::status(503));
    let req = request(&req.user_id, "again");
    env.publish(&req).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.kind(), "chat.complete", "{:?}", seen.last);
    assert_eq!(env.llm.request_count(), 5);
    assert_eq!(env.history(&req).await.len(), 2);
}

#[tokio::test]
async fn exhausted_and_permanent_llm_errors_are_reported_without_redelivery() {
    let env = Env::start().await;
    let _w = env.worker(|c| c.llm_max_attempts = Some(2)).await;
    let user = unique("u");
    let mut frames = env.frames(&user).await;

    env.llm.set_default(Script::status(502));
    let req = request(&user, "down?");
    env.publish(&req).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.kind(), "chat.error");
    assert_eq!(seen.last["code"], "UNAVAILABLE");
    assert_eq!(seen.last["retryable"], true);
    assert_eq!(env.llm.request_count(), 2, "two attempts");

    env.llm.set_default(Script::status(400));
    let req = request(&user, "bad?");
    env.publish(&req).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.last["code"], "BAD_REQUEST");
    assert_eq!(seen.last["retryable"], false);
    assert_eq!(env.llm.request_count(), 3, "400 is not retried");

    env.wait_queue_empty().await;
    frames.expect_silence(Duration::from_millis(300)).await;
    assert!(env.history(&req).await.is_empty());
}

#[tokio::test]
async fn a_stream_failing_after_tokens_is_a_retryable_error_and_not_retried() {
    let env = Env::start().await;
    let _w = env.worker(|_| {}).await;
    let user = unique("u");
    let mut frames = env.frames(&user).await;

    for end in [End::Cut, End::Error("engine overloaded".into())] {
        env.llm.set_default(Script::Reply(
            Reply::numbered(10)
                .token_delay(Duration::from_millis(10))
                .stop_after(4, end.clone()),
        ));
        let before = env.llm.request_count();
        let req = request(&user, "go");
        env.publish(&req).await;
        let seen = frames.until_end().await;
        assert_eq!(seen.chunk_text(), "t0 t1 t2 t3 ", "{end:?}");
        assert_eq!(seen.kind(), "chat.error", "{end:?}: {:?}", seen.last);
        assert_eq!(seen.last["code"], "UNAVAILABLE");
        assert_eq!(seen.last["retryable"], true);
        assert_eq!(env.llm.request_count(), before + 1, "no retry after tokens");
        assert!(env.history(&req).await.is_empty());
    }
    // Acked: nothing comes back after the ack wait.
    env.wait_queue_empty().await;
    frames
        .expect_silence(Duration::from_secs(ACK_WAIT_SECS) + Duration::from_millis(500))
        .await;
    assert_eq!(env.llm.request_count(), 2);
}

#[tokio::test]
async fn a_hanging_stream_hits_the_idle_timeout_and_pings_do_not_count_as_tokens() {
    let env = Env::start().await;
    let _w = env
        .worker(|c| {
            c.llm_idle_timeout_ms = Some(300);
            c.llm_first_token_timeout_ms = Some(400);
        })
        .await;
    let user = unique("u");
    let mut frames = env.frames(&user).await;

    env.llm
        .set_default(Script::Reply(Reply::numbered(10).stop_after(2, End::Hang)));
    let req = request(&user, "hang");
    env.publish(&req).await;
    let first = frames.next().await;
    assert_eq!(first["type"], "chat.chunk");
    let since = Instant::now();
    let seen = frames.until_end().await;
    let waited = since.elapsed();
    assert_eq!(seen.kind(), "chat.error", "{:?}", seen.last);
    assert_eq!(seen.last["retryable"], true);
    assert!(
        seen.last["message"]
            .as_str()
            .unwrap()
            .contains("stopped responding"),
        "{}",
        seen.last
    );
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_millis(1500),
        "idle timeout after ~300 ms, took {waited:?}"
    );
    assert!(
        env.llm.wait_for(WAIT, |s| s.disconnects() == 1).await,
        "the hung connection is closed"
    );

    // Keep-alive comments every 100 ms do not stop the first-token timeout (400 ms).
    env.llm.set_default(Script::Reply(
        Reply::numbered(3)
            .first_token_delay(Duration::from_secs(3))
            .keepalive(Duration::from_millis(100)),
    ));
    let req = request(&user, "slow start");
    let since = Instant::now();
    env.publish(&req).await;
    let seen = frames.until_end().await;
    assert!(seen.chunks.is_empty());
    assert_eq!(seen.kind(), "chat.error");
    assert!(
        seen.last["message"]
            .as_str()
            .unwrap()
            .contains("did not answer in time"),
        "{}",
        seen.last
    );
    assert!(since.elapsed() < Duration::from_millis(2000));
}

#[tokio::test]
async fn after_max_deliver_the_user_gets_a_final_error_and_the_request_is_dropped() {
    let env = Env::start().await;
    let req = request(&unique("u"), "poison");
    env.publish(&req).await;
    // Play MAX_DELIVER workers that each failed it.
    let consumer = env.consumer().await;
    for attempt in 1..=MAX_DELIVER {
        let mut batch = consumer
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .unwrap();
        let msg = batch.next().await.expect("delivery").unwrap();
        assert_eq!(msg.info().unwrap().delivered, attempt);
        msg.ack_with(AckKind::Nak(None)).await.unwrap();
    }
    let mut frames = env.frames(&req.user_id).await;
    let _w = env.worker(|_| {}).await;
    let seen = frames.until_end().await;
    assert!(seen.chunks.is_empty());
    assert_eq!(seen.kind(), "chat.error");
    assert_eq!(seen.last["retryable"], false);
    assert_eq!(seen.last["request_id"], req.request_id.as_str());
    assert_eq!(
        env.llm.request_count(),
        0,
        "the extra delivery is never processed"
    );
    env.wait_queue_empty().await;
    frames.expect_silence(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn the_worker_recovers_from_a_nats_restart() {
    let mut env = Env::start().await;
    let w = env.worker(|_| {}).await;
    env.nats.stop();
    w.wait_ready(false).await;
    env.nats.start_again().expect("nats start");
    // The worker reconnects and sets the consumer up again by itself.
    w.wait_ready(true).await;
    let req = request(&unique("u"), "still there?");
    let mut frames = env.frames(&req.user_id).await;
    env.publish(&req).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.kind(), "chat.complete", "{:?}", seen.last);
    assert_eq!(env.history(&req).await.len(), 2);
}

#[tokio::test]
async fn a_reply_that_ended_while_nats_was_down_is_echoed_to_late_subscribers() {
    let mut env = Env::start().await;
    // About 2 s of streaming: it ends while NATS is down.
    let reply = Reply::numbered(40).token_delay(Duration::from_millis(50));
    env.llm.set_default(Script::Reply(reply.clone()));
    let w = env.worker(|_| {}).await;
    let req = request(&unique("u"), "talk through the outage");
    let mut frames = env.frames(&req.user_id).await;
    env.publish(&req).await;
    let first = frames.next().await;
    assert_eq!(first["type"], "chat.chunk", "{first}");
    drop(frames);
    env.nats.stop();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    env.nats.start_again().expect("nats start");
    w.wait_ready(true).await;
    // A gateway re-subscribes up to its reconnect backoff after the worker is back,
    // when the worker has already flushed the `chat.complete` it buffered: that copy
    // reached nobody. The echo comes after the subscription exists.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let nc = async_nats::connect(env.nats.url()).await.unwrap();
    let mut late = nc.subscribe(env.subjects.user(&req.user_id)).await.unwrap();
    nc.flush().await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(10), late.next())
        .await
        .expect("chat.complete sent again after the link came back")
        .unwrap();
    let echoed: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(
        (echoed["type"].as_str(), echoed["request_id"].as_str()),
        (Some("chat.complete"), Some(req.request_id.as_str())),
        "{echoed}"
    );
    assert_eq!(echoed["content"], reply.text());
    assert_eq!(env.history(&req).await.len(), 2, "recorded once");
    let m = w.metrics().await;
    assert!(
        m.contains(r#"switchboard_worker_echoes_total{result="sent"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn progress_acks_keep_a_long_reply_from_being_redelivered() {
    let env = Env::start().await;
    // About 2.5 s of streaming against a 1 s ack wait.
    let reply = Reply::numbered(50).token_delay(Duration::from_millis(50));
    env.llm.set_default(Script::Reply(reply.clone()));
    let _a = env.worker(|c| c.ack_wait_secs = Some(1)).await;
    let _b = env.worker(|c| c.ack_wait_secs = Some(1)).await;
    let req = request(&unique("u"), "a long answer please");
    let mut frames = env.frames(&req.user_id).await;
    env.publish(&req).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.kind(), "chat.complete");
    assert_eq!(seen.last["content"], reply.text());
    let seqs = seen.seqs();
    assert_eq!(
        seqs,
        (0..seqs.len() as u64).collect::<Vec<_>>(),
        "one attempt only"
    );
    assert_eq!(
        env.llm.request_count(),
        1,
        "never redelivered while streaming"
    );
    env.wait_queue_empty().await;
}

#[tokio::test]
async fn malformed_requests_are_terminated_without_side_effects() {
    let env = Env::start().await;
    let _w = env.worker(|_| {}).await;
    let mut bad = request(&unique("u"), "hi");
    bad.user_id = "a.b".into();
    env.publish(&bad).await;
    env.js()
        .publish(env.subjects.chat_requests(), "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    env.wait_queue_empty().await;
    assert_eq!(env.llm.request_count(), 0);
    // The worker is still healthy and serves the next request.
    let req = request(&unique("u"), "hi");
    let mut frames = env.frames(&req.user_id).await;
    env.publish(&req).await;
    assert_eq!(frames.until_end().await.kind(), "chat.complete");
}
