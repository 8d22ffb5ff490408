//! `chat.cancel`: stops the stream within 100 ms, closes the upstream connection,
//! completes with the partial text, records it; only the owner can cancel.

use std::time::Duration;

use testkit::llm::{Reply, Script};
use tokio::time::Instant;

use crate::common::*;

#[tokio::test]
async fn cancel_stops_the_stream_fast_closes_upstream_and_records_the_partial_reply() {
    let env = Env::start().await;
    env.llm.set_default(Script::Reply(
        Reply::numbered(200).token_delay(Duration::from_millis(30)),
    ));
    let _w = env.worker(|_| {}).await;
    let req = request(&unique("u"), "tell me everything");
    let mut frames = env.frames(&req.user_id).await;
    env.publish(&req).await;

    let mut seen = Seen::default();
    while seen.chunks.len() < 3 {
        let f = frames.next().await;
        assert_eq!(f["type"], "chat.chunk");
        seen.chunks.push(f);
    }
    // Someone else's cancel is ignored.
    env.cancel(&req.request_id, "mallory").await;
    let f = frames.next().await;
    assert_eq!(f["type"], "chat.chunk", "still streaming: {f}");
    seen.chunks.push(f);

    let sent = Instant::now();
    env.cancel(&req.request_id, &req.user_id).await;
    let last = loop {
        let f = frames.next().await;
        if f["type"] == "chat.chunk" {
            seen.chunks.push(f);
        } else {
            break f;
        }
    };
    let took = sent.elapsed();
    assert!(took <= Duration::from_millis(100), "stopped in {took:?}");
    assert_eq!(last["type"], "chat.complete", "{last}");
    let partial = last["content"].as_str().unwrap().to_owned();
    assert_eq!(
        partial,
        seen.chunk_text(),
        "complete carries what was streamed"
    );
    assert!(!partial.is_empty() && partial.len() < Reply::numbered(200).text().len());
    assert!(
        env.llm.wait_for(WAIT, |s| s.disconnects() == 1).await,
        "the upstream connection was closed"
    );
    assert_eq!(env.llm.active(), 0);

    let h = env.history(&req).await;
    assert_eq!(h.len(), 2);
    assert_eq!(h[1].content, partial);
    env.wait_queue_empty().await;
    frames.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_cancel_that_arrives_before_the_request_is_pulled_is_honoured() {
    let env = Env::start().await;
    let req = request(&unique("u"), "never mind");
    let mut frames = env.frames(&req.user_id).await;
    let _w = env.worker(|_| {}).await;
    // The worker hears the cancel before it sees the request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    env.cancel(&req.request_id, &req.user_id).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    env.publish(&req).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.kind(), "chat.complete");
    assert_eq!(seen.last["content"], "");
    assert_eq!(env.llm.request_count(), 0);
}
