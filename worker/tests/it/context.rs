//! The user-context RPC: teams and tasks from the backend, cached; degraded answers
//! from the cache when the backend is down; the circuit breaker.

use std::time::Duration;

use serde_json::json;
use shared::protocol::{UserContext, UserContextRequest};

use crate::common::*;

async fn ask(env: &Env, user_id: &str, token: &str) -> UserContext {
    ask_with(env, user_id, token, false).await
}

async fn ask_with(env: &Env, user_id: &str, token: &str, fresh: bool) -> UserContext {
    let body = serde_json::to_vec(&UserContextRequest {
        user_id: user_id.into(),
        token: (!token.is_empty()).then(|| token.into()),
        fresh,
    })
    .unwrap();
    let reply = tokio::time::timeout(
        Duration::from_secs(3),
        env.nc.request(env.subjects.user_context_rpc(), body.into()),
    )
    .await
    .expect("a reply in time")
    .expect("a reply");
    serde_json::from_slice(&reply.payload).expect("a UserContext")
}

#[tokio::test]
async fn context_comes_from_the_backend_with_the_users_token_and_is_cached() {
    let env = Env::start().await;
    env.backend
        .set_teams(json!([{"id": "t1", "name": "Red"}, {"id": "t2"}, {"no": "id"}]));
    let _w = env.worker(|_| {}).await;
    let user = unique("u");
    let ctx = ask(&env, &user, "user-jwt").await;
    assert!(!ctx.degraded);
    assert_eq!(
        ctx.teams,
        vec![json!({"id": "t1", "name": "Red"}), json!({"id": "t2"})]
    );
    assert_eq!(
        ctx.tasks,
        vec![json!({"id": "task-1", "title": "Write tests"})]
    );
    assert_eq!(env.backend.calls(), 2);
    let auth = env.backend.authorizations();
    assert!(
        auth.iter().all(|a| a.as_deref() == Some("Bearer user-jwt")),
        "{auth:?}"
    );
    let mut paths = env.backend.paths();
    paths.sort();
    assert_eq!(
        paths,
        [
            format!("/api/users/{user}/tasks"),
            format!("/api/users/{user}/teams")
        ]
    );
    let cached = env.store.cached_context(&user).await.unwrap().unwrap();
    assert_eq!(cached.teams, ctx.teams);
    assert!(!cached.degraded);
}

#[tokio::test]
async fn a_service_token_replaces_the_users() {
    let env = Env::start().await;
    let _w = env
        .worker(|c| c.backend_token = Some("service-secret".into()))
        .await;
    let ctx = ask(&env, &unique("u"), "user-jwt").await;
    assert!(!ctx.degraded);
    let auth = env.backend.authorizations();
    assert!(
        auth.iter()
            .all(|a| a.as_deref() == Some("Bearer service-secret")),
        "{auth:?}"
    );
}

#[tokio::test]
async fn backend_down_serves_the_cache_degraded_and_the_breaker_bounds_calls() {
    let env = Env::start().await;
    let w = env
        .worker(|c| {
            c.breaker_failures = Some(3);
            c.breaker_cooldown_ms = Some(600);
        })
        .await;
    let user = unique("u");
    let fresh = ask(&env, &user, "t").await;
    assert!(!fresh.degraded);

    env.backend.set_failing(true);
    let before = env.backend.calls();
    // `fresh`: a recent answer would be shared for a moment without asking.
    for _ in 0..10 {
        let ctx = ask_with(&env, &user, "t", true).await;
        assert!(ctx.degraded);
        assert_eq!(ctx.teams, fresh.teams, "the cached teams");
        assert_eq!(ctx.tasks, fresh.tasks);
    }
    // Three failing requests (two calls each) opened the breaker; then no calls.
    let during = env.backend.calls() - before;
    assert!(during <= 6, "{during} calls reached the dead backend");
    assert_eq!(w.readyz().await.1["breaker"], "open");
    // A user without a cached context gets empty lists, degraded.
    let other = ask(&env, &unique("u"), "t").await;
    assert!(other.degraded && other.teams.is_empty() && other.tasks.is_empty());
    assert_eq!(env.backend.calls() - before, during);

    // Recovery: after the cool-down one probe goes through and closes the breaker.
    env.backend.set_failing(false);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let ctx = ask_with(&env, &user, "t", true).await;
    assert!(!ctx.degraded, "the probe succeeded");
    assert_eq!(w.readyz().await.1["breaker"], "closed");
    assert!(!ask_with(&env, &user, "t", true).await.degraded);
    let m = w.metrics().await;
    assert!(m.contains("switchboard_worker_breaker_state 0"), "{m}");
    assert!(m.contains("switchboard_worker_backend_calls_total"), "{m}");
}

#[tokio::test]
async fn a_slow_backend_times_out_into_a_degraded_answer() {
    let env = Env::start().await;
    env.backend.set_latency(Duration::from_millis(1500));
    let _w = env.worker(|c| c.backend_timeout_ms = Some(200)).await;
    let start = tokio::time::Instant::now();
    let ctx = ask(&env, &unique("u"), "t").await;
    assert!(ctx.degraded);
    assert!(start.elapsed() < Duration::from_millis(1000));
}

#[tokio::test]
async fn without_a_backend_users_have_no_teams_and_are_not_degraded() {
    let env = Env::start().await;
    let _w = env.worker(|c| c.backend_url = None).await;
    let ctx = ask(&env, &unique("u"), "t").await;
    assert_eq!(ctx, UserContext::default());
    assert_eq!(env.backend.calls(), 0);
}

/// Denial, not outage: a backend 401/403/404 says the user has no access: no teams and not
/// degraded, and the kept copy no longer hands the old teams back in an outage.
#[tokio::test]
async fn a_backend_denial_is_no_teams_not_the_cached_ones() {
    let env = Env::start().await;
    let _w = env.worker(|_| {}).await;
    let user = unique("u");
    let before = ask(&env, &user, "t").await;
    assert!(!before.degraded && !before.teams.is_empty());
    for code in [403, 401, 404] {
        env.backend.set_status(code);
        let ctx = ask_with(&env, &user, "t", true).await;
        assert!(!ctx.degraded, "{code} is a denial, not an outage");
        assert!(
            ctx.teams.is_empty() && ctx.tasks.is_empty(),
            "{code}: {ctx:?}"
        );
    }
    let cached = env.store.cached_context(&user).await.unwrap().unwrap();
    assert!(cached.teams.is_empty(), "the kept copy says no teams too");
    // An outage afterwards serves the kept copy: still no teams.
    env.backend.set_status(503);
    let ctx = ask_with(&env, &user, "t", true).await;
    assert!(ctx.degraded && ctx.teams.is_empty(), "{ctx:?}");
}

/// Coalescing: concurrent requests for one user share one backend round, a recent
/// answer is shared for a moment, and `fresh` bypasses it.
#[tokio::test]
async fn requests_for_one_user_share_backend_calls_unless_fresh() {
    let env = Env::start().await;
    env.backend.set_latency(Duration::from_millis(300));
    let _w = env.worker(|_| {}).await;
    let user = unique("u");
    let asks: Vec<_> = (0..10).map(|_| ask(&env, &user, "t")).collect();
    for ctx in futures_util::future::join_all(asks).await {
        assert!(!ctx.degraded);
    }
    assert_eq!(
        env.backend.calls(),
        2,
        "one round (teams + tasks) for ten requests"
    );
    assert!(!ask(&env, &user, "t").await.degraded);
    assert_eq!(env.backend.calls(), 2, "a recent answer is shared");
    env.backend.set_teams(json!([{"id": "t-new"}]));
    let ctx = ask_with(&env, &user, "t", true).await;
    assert_eq!(env.backend.calls(), 4, "fresh goes to the backend");
    assert_eq!(ctx.teams, vec![json!({"id": "t-new"})]);
}
