//! The auth attack matrix, end to end: every refused token gets exactly one `error`
//! frame and the close code of PROTOCOL.md section 4, never a failed upgrade.

use base64_engine::b64;
use serde_json::json;
use testkit::tokens;

use crate::common::*;

mod base64_engine {
    /// URL-safe base64 without padding, enough to forge tokens.
    pub fn b64(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

async fn refused(gw: &Gw, token: &str, code: u16, error: &str) {
    let (mut ws, _) = connect(&gw.url(), Hs::bearer(token))
        .await
        .expect("upgrade happens");
    expect_refusal(&mut ws, code, error).await;
}

fn tamper(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let payload = json!({"sub": "admin", "exp": tokens::now() + 600}).to_string();
    format!("{}.{}.{}", parts[0], b64(payload.as_bytes()), parts[2])
}

#[tokio::test]
async fn hs256_matrix() {
    let deps = Deps::start();
    let gw = gateway(&deps, |c| {
        c.jwt_audience = Some("switchboard".into());
        c.jwt_issuer = Some("https://id.example.com".into());
    })
    .await;
    let now = tokens::now();
    let good = |extra: serde_json::Value| {
        let mut c = json!({"sub": "u1", "exp": now + 600, "aud": "switchboard", "iss": "https://id.example.com"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let sign = |c: &serde_json::Value| tokens::hs256(tokens::TEST_SECRET, c);

    // The control: a good token works.
    let (mut ws, _) = connect(&gw.url(), Hs::bearer(&sign(&good(json!({})))))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");

    let header_none = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64(good(json!({})).to_string().as_bytes());
    refused(
        &gw,
        &format!("{header_none}.{body}."),
        4503,
        "TOKEN_INVALID",
    )
    .await;
    refused(
        &gw,
        &tokens::rs256(&good(json!({})), None),
        4503,
        "TOKEN_INVALID",
    )
    .await;
    refused(
        &gw,
        &tokens::hs256("another-secret-another-secret-another", &good(json!({}))),
        4503,
        "TOKEN_INVALID",
    )
    .await;
    refused(&gw, &tamper(&sign(&good(json!({})))), 4503, "TOKEN_INVALID").await;
    refused(
        &gw,
        &sign(&good(json!({"exp": now - 120}))),
        4001,
        "TOKEN_EXPIRED",
    )
    .await;
    refused(
        &gw,
        &sign(&good(json!({"nbf": now + 300}))),
        4503,
        "TOKEN_INVALID",
    )
    .await;
    refused(
        &gw,
        &sign(&good(json!({"aud": "other"}))),
        4503,
        "TOKEN_INVALID",
    )
    .await;
    refused(
        &gw,
        &sign(&good(json!({"aud": null}))),
        4503,
        "TOKEN_INVALID",
    )
    .await;
    refused(
        &gw,
        &sign(&good(json!({"iss": "https://evil.example.com"}))),
        4503,
        "TOKEN_INVALID",
    )
    .await;
    refused(
        &gw,
        &sign(&good(json!({"exp": null}))),
        4503,
        "TOKEN_INVALID",
    )
    .await;
    refused(
        &gw,
        &sign(&good(json!({"pad": "x".repeat(9000)}))),
        4503,
        "TOKEN_INVALID",
    )
    .await;
    refused(&gw, "not-a-jwt", 4503, "TOKEN_INVALID").await;

    // Revoked jti (POST /v1/revoke; the list lives in Redis, each gateway holds it).
    let revoked = good(json!({"jti": "revoked-1"}));
    let r = api()
        .post(gw.http("/v1/revoke"))
        .bearer_auth(API_KEY)
        .json(&json!({"jti": "revoked-1", "exp": now + 600}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    refused(&gw, &sign(&revoked), 4503, "TOKEN_INVALID").await;

    // The same matrix applies to the in-band auth frame.
    let (mut ws, _) = connect(&gw.url(), Hs::default()).await.unwrap();
    send_json(
        &mut ws,
        json!({"type": "auth", "token": sign(&good(json!({"exp": now - 120})))}),
    )
    .await;
    expect_refusal(&mut ws, 4001, "TOKEN_EXPIRED").await;

    let m = gw.metrics().await;
    assert!(
        m.contains("switchboard_auth_failures_total{reason=\"revoked\"}"),
        "{m}"
    );
    assert!(m.contains("switchboard_closes_total{code=\"4503\"}"));
}

#[tokio::test]
async fn rs256_and_jwks_configs() {
    let deps = Deps::start();
    let keys = tokens::keys_dir();
    let gw = gateway(&deps, |c| {
        c.jwt_secret = None;
        c.jwt_public_key_file = Some(keys.join("rsa_public.pem"));
        c.jwt_algorithm = Some("RS256".into());
    })
    .await;
    let claims = tokens::claims("rs-user", 600);
    let (mut ws, _) = connect(&gw.url(), Hs::bearer(&tokens::rs256(&claims, None)))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["user"]["id"], "rs-user");
    // HS256 signed with the public key's bytes: the classic algorithm confusion.
    let pem = std::fs::read_to_string(keys.join("rsa_public.pem")).unwrap();
    refused(&gw, &tokens::hs256(&pem, &claims), 4503, "TOKEN_INVALID").await;
    refused(
        &gw,
        &tokens::hs256(tokens::TEST_SECRET, &claims),
        4503,
        "TOKEN_INVALID",
    )
    .await;
    refused(&gw, &tokens::es256(&claims, None), 4503, "TOKEN_INVALID").await;

    let gw = gateway(&deps, |c| {
        c.jwt_secret = None;
        c.jwt_jwks_file = Some(keys.join("jwks.json"));
        c.jwt_algorithm = Some("ES256".into());
    })
    .await;
    let (mut ws, _) = connect(&gw.url(), Hs::bearer(&tokens::es256(&claims, Some("ec-1"))))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["user"]["id"], "rs-user");
    refused(
        &gw,
        &tokens::es256(&claims, Some("nope")),
        4503,
        "TOKEN_INVALID",
    )
    .await;
    refused(
        &gw,
        &tokens::rs256(&claims, Some("rsa-1")),
        4503,
        "TOKEN_INVALID",
    )
    .await;
}

/// `SB_JWT_MAX_LIFETIME_SECS` (default a day): a token minted for longer is refused
/// at connect, in the `auth` frame and at refresh, whatever its signature.
#[tokio::test]
async fn token_lifetime_is_capped() {
    let deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let now = tokens::now();
    let year_2200 = 7_258_118_400u64;
    let sign = |c: serde_json::Value| tokens::hs256(tokens::TEST_SECRET, &c);

    // Accepted before the cap existed; refused with and without `iat`.
    for claims in [
        json!({"sub": "u1", "iat": now, "exp": year_2200}),
        json!({"sub": "u1", "exp": year_2200}),
        json!({"sub": "u1", "iat": now, "exp": now + 86_400 + 60}),
    ] {
        refused(&gw, &sign(claims), 4503, "TOKEN_INVALID").await;
    }
    let (mut ws, _) = connect(&gw.url(), Hs::default()).await.unwrap();
    send_json(
        &mut ws,
        json!({"type": "auth", "token": sign(json!({"sub": "u1", "exp": year_2200}))}),
    )
    .await;
    let e = expect_refusal(&mut ws, 4503, "TOKEN_INVALID").await;
    assert!(e["message"].as_str().unwrap().contains("lifetime"), "{e}");

    // A day exactly is fine; a refresh to a longer token is refused and the
    // connection stays on its current token.
    let day = sign(json!({"sub": "u1", "iat": now, "exp": now + 86_400}));
    let (mut ws, _) = connect(&gw.url(), Hs::bearer(&day)).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    send_json(
        &mut ws,
        json!({"type": "refresh", "id": "r", "token": sign(json!({"sub": "u1", "exp": year_2200}))}),
    )
    .await;
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("TOKEN_INVALID")),
        "{e}"
    );
    send_json(&mut ws, json!({"type": "ping", "id": "p"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    let m = gw.metrics().await;
    assert!(
        m.contains("switchboard_auth_failures_total{reason=\"lifetime\"}"),
        "{m}"
    );

    // 0 turns the cap off; a smaller cap refuses an hour's token.
    let off = gateway(&deps, |c| c.jwt_max_lifetime_secs = Some(0)).await;
    let (mut ws, _) = connect(
        &off.url(),
        Hs::bearer(&sign(json!({"sub": "u1", "exp": year_2200}))),
    )
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "authenticated");
    let short = gateway(&deps, |c| c.jwt_max_lifetime_secs = Some(600)).await;
    refused(&short, &tokens::token("u1", 3600), 4503, "TOKEN_INVALID").await;
}

/// PROTOCOL.md section 3: the user id is the first of `sub`, `user_id`, `userId`, `id`
/// that is present and not empty; an integer is its decimal string, so `42` and
/// `"42"` are one user.
#[tokio::test]
async fn numeric_and_string_user_ids_are_one_user() {
    let deps = Deps::start();
    let gw = gateway(&deps, |_| {}).await;
    let now = tokens::now();
    let sign = |c: serde_json::Value| tokens::hs256(tokens::TEST_SECRET, &c);
    let mut open = Vec::new();
    for claims in [
        json!({"sub": 42, "exp": now + 600}),
        json!({"sub": "42", "exp": now + 600}),
        json!({"sub": "", "user_id": 42, "exp": now + 600}),
    ] {
        let (mut ws, _) = connect(&gw.url(), Hs::bearer(&sign(claims.clone())))
            .await
            .unwrap();
        let a = next_json(&mut ws).await;
        assert_eq!(a["user"]["id"], "42", "{claims}: {a}");
        open.push(ws);
    }
    let r: serde_json::Value = api_get(&gw, "/v1/users/42/connections").await;
    assert_eq!(r["connections"].as_array().map(Vec::len), Some(3), "{r}");
    // A publication to `user:42` reaches every one of them.
    let r = api()
        .post(gw.http("/v1/publish"))
        .bearer_auth(API_KEY)
        .json(&json!({"channel": "user:42", "data": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for ws in &mut open {
        let m = next_matching(ws, |f| f["type"] == "message").await;
        assert_eq!(m["data"], "hi");
    }
}
