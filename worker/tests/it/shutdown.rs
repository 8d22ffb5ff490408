//! SIGTERM: stop pulling, finish in-flight requests within the grace period, give
//! the rest back for redelivery, return.

use std::time::Duration;

use testkit::llm::{Reply, Script};
use tokio::time::Instant;

use crate::common::*;

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_takes_no_new_ones() {
    let env = Env::start().await;
    let reply = Reply::numbered(20).token_delay(Duration::from_millis(40));
    env.llm.set_default(Script::Reply(reply.clone()));
    let w = env.worker(|_| {}).await;
    let user = unique("u");
    let req = request(&user, "finish me");
    let mut frames = env.frames(&user).await;
    env.publish(&req).await;
    assert_eq!(frames.next().await["type"], "chat.chunk");

    w.terminate();
    w.wait_ready(false).await;
    // Published during the drain: not taken by the stopping worker.
    let later = request(&user, "after the drain");
    env.publish(&later).await;

    let seen = frames.until_end().await;
    assert_eq!(seen.kind(), "chat.complete");
    assert_eq!(seen.last["content"], reply.text());
    assert_eq!(seen.last["request_id"], req.request_id.as_str());
    tokio::time::timeout(Duration::from_secs(3), w.join())
        .await
        .expect("run returns once in-flight work is done");
    assert_eq!(env.history(&req).await.len(), 2);
    assert_eq!(env.llm.request_count(), 1);

    // The next worker gets the later request, and not the finished one again.
    let _next = env.worker(|_| {}).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.last["request_id"], later.request_id.as_str());
    assert_eq!(seen.kind(), "chat.complete");
    env.wait_queue_empty().await;
    assert_eq!(env.llm.request_count(), 2);
}

#[tokio::test]
async fn requests_still_running_after_the_grace_period_are_given_back() {
    let env = Env::start().await;
    let reply = Reply::numbered(40).token_delay(Duration::from_millis(50));
    env.llm.set_default(Script::Reply(reply.clone()));
    // Long ack wait: only the nak can bring the request back quickly.
    let w = env
        .worker(|c| {
            c.shutdown_grace_secs = Some(0);
            c.ack_wait_secs = Some(30);
        })
        .await;
    let req = request(&unique("u"), "too long for the grace");
    let mut frames = env.frames(&req.user_id).await;
    env.publish(&req).await;
    assert_eq!(frames.next().await["type"], "chat.chunk");

    let stopping = Instant::now();
    w.terminate();
    tokio::time::timeout(Duration::from_secs(3), w.join())
        .await
        .expect("run returns after the grace period");
    assert!(stopping.elapsed() < Duration::from_secs(2));
    assert!(
        env.llm.wait_for(WAIT, |s| s.disconnects() == 1).await,
        "the abandoned stream is closed"
    );
    assert!(env.history(&req).await.is_empty());

    let started = Instant::now();
    let _b = env.worker(|c| c.ack_wait_secs = Some(30)).await;
    let last = loop {
        let f = frames.next().await;
        if f["type"] != "chat.chunk" {
            break f;
        }
    };
    assert_eq!(last["type"], "chat.complete");
    assert_eq!(last["content"], reply.text());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "redelivered at once, not after the 30 s ack wait"
    );
    assert_eq!(env.history(&req).await.len(), 2);
}
