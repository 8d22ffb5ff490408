//! Property tests for the hostile-input surfaces in `shared` (issue 8): channel
//! names against the documented grammar, client frame parsing (valid frames come
//! back exactly, bad ones are refused with a reason and their `id`), and the JWT
//! validator (never panics, never accepts a token that was not signed with the
//! key, user ids always safe for subjects and keys). Bounded to a few seconds; the
//! cargo-fuzz targets in `fuzz/` run the same surfaces for longer.

use std::sync::LazyLock;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};
use shared::auth::{AuthError, JwtAlgorithm, JwtSettings, KeySource, Validator};
use shared::protocol::{
    CLIENT_FRAME_TYPES, Channel, ClientFrame, ClientMessage, FileAttachment, FrameId,
};
use shared::subjects::Subjects;

// === channel names ===

/// PROTOCOL.md section 3, written out on its own: `[a-z0-9_-]{1,64}` `:`
/// `[A-Za-z0-9_-]{1,128}`, the whole string.
fn matches_grammar(s: &str) -> bool {
    let mut parts = s.splitn(2, ':');
    let (Some(ns), Some(name)) = (parts.next(), parts.next()) else {
        return false;
    };
    let ns_ok = (1..=64).contains(&ns.chars().count())
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    let name_ok = (1..=128).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    ns_ok && name_ok
}

/// Channel-like strings: valid ones, ones at the length limits, valid ones with
/// one character inserted or replaced, and anything at all.
fn channel_like() -> impl Strategy<Value = String> {
    let valid = "[a-z0-9_-]{1,64}:[A-Za-z0-9_-]{1,128}";
    let odd = select(vec![
        ':', '.', '*', '>', ' ', '\t', '\n', 'A', 'Z', 'é', '\u{0}', '/', '\u{212A}', 'ı',
    ]);
    prop_oneof![
        valid,
        (1usize..=66, 1usize..=130).prop_map(|(n, m)| format!(
            "{}:{}",
            "a".repeat(n),
            "B".repeat(m)
        )),
        (
            valid,
            any::<prop::sample::Index>(),
            odd.clone(),
            any::<bool>()
        )
            .prop_map(|(s, at, c, replace)| {
                let mut chars: Vec<char> = s.chars().collect();
                let i = at.index(chars.len());
                if replace {
                    chars[i] = c;
                } else {
                    chars.insert(i, c);
                }
                chars.into_iter().collect()
            }),
        ".{0,200}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Accepted exactly when the grammar matches; an accepted name prints back as
    /// given and makes a four-token NATS subject with no wildcard.
    #[test]
    fn channel_accepted_iff_grammar(s in channel_like()) {
        let parsed = Channel::parse(&s);
        prop_assert_eq!(parsed.is_ok(), matches_grammar(&s), "{:?}: {:?}", s, parsed);
        if let Ok(ch) = parsed {
            prop_assert_eq!(ch.to_string(), s);
            let subject = Subjects::new("sb").channel(&ch.namespace, &ch.name);
            let tokens: Vec<&str> = subject.split('.').collect();
            prop_assert_eq!(tokens.len(), 4);
            prop_assert!(tokens.iter().all(|t| !t.is_empty() && *t != "*" && *t != ">"));
        } else if let Err(why) = parsed {
            prop_assert!(!why.is_empty());
        }
    }
}

// === client frames ===

fn frame_id() -> impl Strategy<Value = Option<FrameId>> {
    prop_oneof![
        Just(None),
        any::<i64>().prop_map(|i| Some(FrameId::Int(i))),
        ".{0,64}".prop_map(|s| Some(FrameId::Str(s))),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        // Quarters print and parse back exactly, whatever float parser serde_json uses.
        (-4000i32..4000).prop_map(|n| Value::from(f64::from(n) / 4.0)),
        ".{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid frame of every type, as the JSON a client sends and the value it must
/// parse to.
fn valid_frame() -> impl Strategy<Value = (Value, ClientFrame)> {
    let s = || ".{0,30}";
    let ch = "[a-z]{1,8}:[A-Za-z0-9]{1,12}";
    prop_oneof![
        s().prop_map(|token| (
            json!({"type": "auth", "token": token}),
            ClientFrame::Auth { token }
        )),
        s().prop_map(|token| (
            json!({"type": "refresh", "token": token}),
            ClientFrame::Refresh { token }
        )),
        Just((json!({"type": "ping"}), ClientFrame::Ping {})),
        (
            ch,
            proptest::option::of(any::<u64>()),
            proptest::option::of(s())
        )
            .prop_map(|(channel, since, epoch)| {
                let mut v = json!({"type": "subscribe", "channel": channel});
                if let Some(n) = since {
                    v["since"] = json!(n);
                }
                if let Some(e) = &epoch {
                    v["epoch"] = json!(e);
                }
                (
                    v,
                    ClientFrame::Subscribe {
                        channel,
                        since,
                        epoch,
                    },
                )
            }),
        ch.prop_map(|channel| (
            json!({"type": "unsubscribe", "channel": channel}),
            ClientFrame::Unsubscribe { channel }
        )),
        (ch, json_value()).prop_map(|(channel, data)| (
            json!({"type": "publish", "channel": channel, "data": data}),
            ClientFrame::Publish { channel, data }
        )),
        (
            s(),
            proptest::option::of(s()),
            proptest::collection::vec((s(), s(), s()), 0..3)
        )
            .prop_map(|(message, session_id, files)| {
                let files: Vec<FileAttachment> = files
                    .into_iter()
                    .map(|(name, content_type, data)| FileAttachment {
                        name,
                        content_type,
                        data,
                    })
                    .collect();
                let mut v = json!({"type": "chat.send", "message": message, "files": files.iter()
                    .map(|f| json!({"name": f.name, "type": f.content_type, "data": f.data}))
                    .collect::<Vec<_>>()});
                if let Some(sid) = &session_id {
                    v["session_id"] = json!(sid);
                }
                (
                    v,
                    ClientFrame::ChatSend {
                        message,
                        session_id,
                        files,
                    },
                )
            }),
        s().prop_map(|request_id| (
            json!({"type": "chat.cancel", "request_id": request_id}),
            ClientFrame::ChatCancel { request_id }
        )),
        (s(), proptest::option::of(any::<u32>())).prop_map(|(session_id, limit)| {
            let mut v = json!({"type": "history", "session_id": session_id});
            if let Some(l) = limit {
                v["limit"] = json!(l);
            }
            (v, ClientFrame::History { session_id, limit })
        }),
        ch.prop_map(|channel| (
            json!({"type": "presence", "channel": channel}),
            ClientFrame::Presence { channel }
        )),
        ch.prop_map(|channel| (
            json!({"type": "typing", "channel": channel}),
            ClientFrame::Typing { channel }
        )),
        (ch, any::<u64>()).prop_map(|(channel, offset)| (
            json!({"type": "read", "channel": channel, "offset": offset}),
            ClientFrame::Read { channel, offset }
        )),
    ]
}

fn with_id(mut v: Value, id: &Option<FrameId>) -> Value {
    if let Some(id) = id {
        v["id"] = serde_json::to_value(id).unwrap();
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every valid frame, with an id and unknown extra fields, parses to exactly
    /// what was sent (PROTOCOL.md section 2: unknown fields are ignored).
    #[test]
    fn valid_frames_parse_exactly(
        (v, frame) in valid_frame(),
        id in frame_id(),
        extra in proptest::collection::btree_map("x_[a-z]{1,6}", json_value(), 0..3),
    ) {
        let mut v = with_id(v, &id);
        for (k, x) in extra {
            v[k] = x;
        }
        let msg = ClientMessage::parse(v.to_string().as_bytes()).map_err(|e| e.message);
        prop_assert_eq!(msg, Ok(ClientMessage { id, frame }));
    }

    /// A known type with a required field removed or of the wrong type is refused
    /// with a reason naming the type, and the id comes back so the client can match
    /// the `BAD_REQUEST` to its frame.
    #[test]
    fn broken_frames_are_refused_with_their_id(
        (v, frame) in valid_frame(),
        id in frame_id(),
        victim in any::<prop::sample::Index>(),
        replacement in prop_oneof![Just(None), Just(Some(json!([1, 2]))), Just(Some(json!({"x": 1})))],
    ) {
        let mut v = with_id(v, &id);
        let required: Vec<String> = v
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| !matches!(k.as_str(), "type" | "id" | "since" | "epoch" | "session_id" | "files" | "limit" | "data"))
            .cloned()
            .collect();
        prop_assume!(!required.is_empty());
        let key = &required[victim.index(required.len())];
        match replacement {
            None => {
                v.as_object_mut().unwrap().remove(key);
            }
            Some(r) => v[key] = r,
        }
        let e = ClientMessage::parse(v.to_string().as_bytes()).unwrap_err();
        prop_assert_eq!(e.id, id);
        let needle = format!("invalid `{}` frame", frame.kind());
        prop_assert!(e.message.starts_with(&needle), "{}", e.message);
    }

    /// Deeply nested JSON (a stack-exhaustion attempt) is answered, never a crash.
    #[test]
    fn deep_nesting_is_refused_not_a_crash(
        depth in 1usize..5000,
        open in select(vec!["[", "{\"a\":"]),
        where_ in 0usize..3,
    ) {
        let close = if open == "[" { "]" } else { "}" };
        let nested = format!("{}1{}", open.repeat(depth), close.repeat(depth));
        let text = match where_ {
            0 => format!(r#"{{"type":"publish","channel":"a:b","data":{nested}}}"#),
            1 => format!(r#"{{"type":"ping","id":{nested}}}"#),
            _ => format!(r#"{{"type":"ping","x":{nested}}}"#),
        };
        match ClientMessage::parse(text.as_bytes()) {
            Ok(m) => prop_assert!(CLIENT_FRAME_TYPES.contains(&m.frame.kind())),
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
    }

    /// Arbitrary text: no panic; a refusal always says why.
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        match ClientMessage::parse(text.as_bytes()) {
            Ok(m) => prop_assert!(CLIENT_FRAME_TYPES.contains(&m.frame.kind())),
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
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
