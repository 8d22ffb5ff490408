//! Property tests for the hostile-input surfaces in `shared` (docs/fuzzing.md): channel names
//! as NATS subjects, and the JWT validator (never panics, never accepts a token that
//! was not signed with the key, user ids always safe for subjects and keys). The
//! frame and channel-name parsers have theirs in `protocol/tests/prop_parsers.rs`.
//! Bounded to a few seconds; the cargo-fuzz targets in `fuzz/` run the same surfaces
//! for longer.

use std::sync::LazyLock;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};
use shared::auth::{AuthError, JwtAlgorithm, JwtSettings, KeySource, Validator};
use shared::protocol::Channel;
use shared::subjects::Subjects;

#[path = "../../protocol/tests/common/json.rs"]
mod json;
use json::json_value;

// === channel subjects ===

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Every accepted channel (the parser accepts exactly this grammar, see the
    /// protocol crate's tests) makes a four-token NATS subject with no wildcard.
    #[test]
    fn channel_subjects_have_no_wildcards(s in "[a-z0-9_-]{1,64}:[A-Za-z0-9_-]{1,128}") {
        let ch = Channel::parse(&s).map_err(TestCaseError::fail)?;
        let subject = Subjects::new("sb").channel(&ch.namespace, &ch.name);
        let tokens: Vec<&str> = subject.split('.').collect();
        prop_assert_eq!(tokens.len(), 4);
        prop_assert!(tokens.iter().all(|t| !t.is_empty() && *t != "*" && *t != ">"));
    }
}

// === JWT ===

/// A 32+ byte HS256 secret, like testkit's.
const SECRET: &[u8] = b"prop-test-secret-prop-test-secret-0123456789";
const RSA_PRIVATE: &[u8] = include_bytes!("../../testkit/keys/rsa_private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../../testkit/keys/rsa_public.pem");
/// Far enough ahead that the tokens below never expire while the tests run.
const AN_HOUR: u64 = 3600;

static HS: LazyLock<Validator> = LazyLock::new(|| {
    Validator::new(&JwtSettings::new(
        JwtAlgorithm::Hs256,
        KeySource::Secret(SECRET.to_vec()),
    ))
    .unwrap()
});
static RS: LazyLock<Validator> = LazyLock::new(|| {
    Validator::new(&JwtSettings::new(
        JwtAlgorithm::Rs256,
        KeySource::PublicKeyPem(RSA_PUBLIC.to_vec()),
    ))
    .unwrap()
});

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn hs256(claims: &Value) -> String {
    shared::auth::install_crypto_provider();
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let mut buf = [0u8; 3];
        buf[..chunk.len()].copy_from_slice(chunk);
        let n = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// One edit of a token's text.
#[derive(Debug, Clone)]
enum Edit {
    Replace(prop::sample::Index, char),
    Insert(prop::sample::Index, char),
    Delete(prop::sample::Index),
    /// The payload of another (genuinely signed) token, with this token's signature.
    SwapPayload,
    /// The header re-encoded with another `alg`, signature kept.
    Alg(&'static str),
    /// A third-party signature: the same header and payload signed with another key.
    OtherKey,
}

fn edit() -> impl Strategy<Value = Edit> {
    let c = prop_oneof![
        select(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".to_vec())
            .prop_map(char::from),
        select(vec!['.', '=', '+', '/', ' ', '%', 'é']),
    ];
    prop_oneof![
        4 => (any::<prop::sample::Index>(), c.clone()).prop_map(|(i, c)| Edit::Replace(i, c)),
        2 => (any::<prop::sample::Index>(), c).prop_map(|(i, c)| Edit::Insert(i, c)),
        2 => any::<prop::sample::Index>().prop_map(Edit::Delete),
        1 => Just(Edit::SwapPayload),
        1 => select(vec!["none", "None", "hs256", "HS384", "HS512", "RS256", "ES256", "", "HS256 "]).prop_map(Edit::Alg),
        1 => Just(Edit::OtherKey),
    ]
}

fn apply(token: &str, edit: &Edit, claims: &Value) -> String {
    // An earlier edit may have removed a dot: a missing part is empty (the token stays
    // broken, and must still be refused).
    let split: Vec<&str> = token.split('.').collect();
    let parts: [&str; 3] = std::array::from_fn(|i| split.get(i).copied().unwrap_or(""));
    match edit {
        Edit::Replace(i, c) | Edit::Insert(i, c) => {
            let mut chars: Vec<char> = token.chars().collect();
            let at = i.index(chars.len());
            if matches!(edit, Edit::Replace(..)) {
                chars[at] = *c;
            } else {
                chars.insert(at, *c);
            }
            chars.into_iter().collect()
        }
        Edit::Delete(i) => {
            let mut chars: Vec<char> = token.chars().collect();
            chars.remove(i.index(chars.len()));
            chars.into_iter().collect()
        }
        Edit::SwapPayload => {
            let mut other = claims.clone();
            other["sub"] = json!("someone-else");
            let forged = hs256(&other);
            let payload = forged.split('.').nth(1).unwrap();
            format!("{}.{payload}.{}", parts[0], parts[2])
        }
        Edit::Alg(alg) => {
            let header = b64url(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes());
            format!("{header}.{}.{}", parts[1], parts[2])
        }
        Edit::OtherKey => jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(b"another-secret-another-secret-0123456789"),
        )
        .unwrap(),
    }
}

/// What a claim holding a user id may look like.
fn id_claim() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        Just(Some(json!(""))),
        "[A-Za-z0-9_-]{1,128}".prop_map(|s| Some(json!(s))),
        "[A-Za-z0-9_-]{129,140}".prop_map(|s| Some(json!(s))),
        ".{1,20}".prop_map(|s| Some(json!(s))),
        any::<i64>().prop_map(|n| Some(json!(n))),
        Just(Some(json!(1.5))),
        Just(Some(json!(true))),
        Just(Some(json!({"id": "x"}))),
        Just(Some(json!(["x"]))),
    ]
}

/// The rule of `Claims::user_id`: the first of `sub`, `user_id`, `userId`, `id`
/// that is present, not null and not empty decides; a string or an integer must
/// match `[A-Za-z0-9_-]{1,128}`; anything else is refused.
fn expected_user_id(ids: &[Option<Value>]) -> Option<String> {
    for v in ids.iter().flatten() {
        let id = match v {
            Value::Null => continue,
            Value::String(s) if s.is_empty() => continue,
            Value::String(s) => s.clone(),
            Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => return None,
        };
        let safe = id.len() <= 128
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        return safe.then_some(id);
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any text at all, and three-segment tokens of arbitrary JSON: no panic, no
    /// acceptance (none of them is signed with the key).
    #[test]
    fn arbitrary_tokens_are_refused(
        raw in ".{0,300}",
        header in json_value(),
        payload in json_value(),
        sig in "[A-Za-z0-9_-]{0,90}",
        alg in select(vec!["HS256", "RS256", "none"]),
    ) {
        prop_assert!(HS.validate(&raw).is_err());
        prop_assert!(RS.validate(&raw).is_err());
        let mut h = header;
        if let Value::Object(m) = &mut h {
            m.insert("alg".into(), json!(alg));
        }
        let token = format!(
            "{}.{}.{sig}",
            b64url(h.to_string().as_bytes()),
            b64url(payload.to_string().as_bytes())
        );
        prop_assert!(HS.validate(&token).is_err());
        prop_assert!(RS.validate(&token).is_err());
    }

    /// A genuine token with any edit, a swapped payload, another `alg` or another
    /// key's signature is refused; the genuine one is accepted.
    #[test]
    fn edited_tokens_are_refused(
        sub in "[A-Za-z0-9_-]{1,40}",
        extra in proptest::collection::btree_map("[a-z]{1,6}", json_value(), 0..3),
        edits in proptest::collection::vec(edit(), 1..3),
    ) {
        let mut claims = json!({"sub": sub, "exp": now() + AN_HOUR});
        for (k, v) in extra {
            if !matches!(k.as_str(), "exp" | "nbf" | "iat" | "aud" | "iss" | "sub" | "id") {
                claims[k] = v;
            }
        }
        let genuine = hs256(&claims);
        prop_assert_eq!(HS.validate(&genuine).map(|c| c.user_id), Ok(sub));
        let mut token = genuine.clone();
        for e in &edits {
            token = apply(&token, e, &claims);
        }
        prop_assume!(token != genuine);
        let verdict = HS.validate(&token);
        prop_assert!(verdict.is_err(), "accepted an edited token: {:?} -> {}", edits, token);
        prop_assert!(RS.validate(&token).is_err());
    }

    /// The classic key confusion: an HS256 token whose "secret" is the RS256 public
    /// key PEM. An RS256 deployment refuses it, whatever the claims.
    #[test]
    fn hmac_with_the_public_key_is_refused(sub in "[A-Za-z0-9_-]{1,40}", kid in proptest::option::of("[a-z0-9-]{1,8}")) {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid;
        let token = jsonwebtoken::encode(
            &header,
            &json!({"sub": sub, "exp": now() + AN_HOUR}),
            &EncodingKey::from_secret(RSA_PUBLIC),
        )
        .unwrap();
        prop_assert_eq!(RS.validate(&token).unwrap_err(), AuthError::AlgorithmNotAllowed);
    }

    /// Genuinely signed tokens with arbitrary id claims: accepted exactly when the
    /// id rule allows, and then the id is safe as a NATS subject token.
    #[test]
    fn user_ids_are_always_subject_safe(ids in proptest::collection::vec(id_claim(), 4)) {
        let mut claims = json!({"exp": now() + AN_HOUR});
        for (name, v) in ["sub", "user_id", "userId", "id"].iter().zip(&ids) {
            if let Some(v) = v {
                claims[*name] = v.clone();
            }
        }
        let token = hs256(&claims);
        let got = HS.validate(&token).map(|c| c.user_id).ok();
        prop_assert_eq!(&got, &expected_user_id(&ids));
        if let Some(id) = got {
            let subject = Subjects::new("sb").user(&id);
            prop_assert_eq!(subject.split('.').count(), 3);
        }
    }
}

proptest! {
    // RSA signing costs a millisecond or two per case.
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A genuine RS256 token is accepted; the same token with one signature
    /// character changed is not.
    #[test]
    fn rs256_signature_edits_are_refused(sub in "[A-Za-z0-9_-]{1,20}", at in any::<prop::sample::Index>(), c in select(b"ABCdef019-_".to_vec())) {
        shared::auth::install_crypto_provider();
        let genuine = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &json!({"sub": sub, "exp": now() + AN_HOUR}),
            &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
        )
        .unwrap();
        prop_assert!(RS.validate(&genuine).is_ok());
        let sig_start = genuine.rfind('.').unwrap() + 1;
        let mut bytes = genuine.clone().into_bytes();
        let i = sig_start + at.index(bytes.len() - sig_start);
        prop_assume!(bytes[i] != c);
        bytes[i] = c;
        let token = String::from_utf8(bytes).unwrap();
        prop_assert!(RS.validate(&token).is_err());
    }
}
