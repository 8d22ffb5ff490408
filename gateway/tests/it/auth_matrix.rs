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
