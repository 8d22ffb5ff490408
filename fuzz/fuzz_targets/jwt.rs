//! Tokens into the JWT validator: raw strings, and genuine tokens (HS256, and RS256
//! picked by `kid` from a JWK Set) with bytes replaced, inserted or deleted, or with
//! a segment swapped for fuzzer-chosen JSON. The validator must never panic, and it
//! must never accept a token whose signature does not verify over exactly its
//! `header.payload` with the configured key: a token it accepts was signed by us.
#![no_main]

use std::sync::LazyLock;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use shared::auth::{JwtAlgorithm, JwtSettings, KeySource, Validator};

/// testkit's HS256 secret (`testkit::tokens::TEST_SECRET`).
const SECRET: &[u8] = b"switchboard-test-secret-not-for-production";
const RSA_PRIVATE: &[u8] = include_bytes!("../../testkit/keys/rsa_private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../../testkit/keys/rsa_public.pem");
const JWKS: &[u8] = include_bytes!("../../testkit/keys/jwks.json");
/// 2100-01-01: the genuine tokens stay valid for as long as the corpus is kept.
const FAR_FUTURE: u64 = 4_102_444_800;

struct Case {
    validator: Validator,
    key: DecodingKey,
    algorithm: Algorithm,
    genuine: String,
}

static CASES: LazyLock<[Case; 2]> = LazyLock::new(|| {
    shared::auth::install_crypto_provider();
    let claims = serde_json::json!({
        "sub": "fuzz-user", "exp": FAR_FUTURE, "jti": "j1", "email": "f@example.com"
    });
    // The genuine tokens live until 2100: no lifetime cap here (this fuzzes parsing
    // and verification; the cap has its own tests in shared/src/auth.rs).
    let settings = |algorithm, key| {
        let mut s = JwtSettings::new(algorithm, key);
        s.max_lifetime_secs = 0;
        s
    };
    let hs = Validator::new(&settings(
        JwtAlgorithm::Hs256,
        KeySource::Secret(SECRET.to_vec()),
    ))
    .expect("HS256 settings");
    let rs = Validator::new(&settings(
        JwtAlgorithm::Rs256,
        KeySource::Jwks(JWKS.to_vec()),
    ))
    .expect("JWKS settings");
    let mut rs_header = Header::new(Algorithm::RS256);
    rs_header.kid = Some("rsa-1".into());
    [
        Case {
            validator: hs,
            key: DecodingKey::from_secret(SECRET),
            algorithm: Algorithm::HS256,
            genuine: jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET),
            )
            .expect("sign HS256"),
        },
        Case {
            validator: rs,
            key: DecodingKey::from_rsa_pem(RSA_PUBLIC).expect("RSA public key"),
            algorithm: Algorithm::RS256,
            genuine: jsonwebtoken::encode(
                &rs_header,
                &claims,
                &EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("RSA private key"),
            )
            .expect("sign RS256"),
        },
    ]
});

fuzz_target!(|data: &[u8]| {
    let cases = &*CASES;
    for case in cases {
        assert!(case.validator.validate(&case.genuine).is_ok());
    }
    let [mode, rest @ ..] = data else {
        return;
    };
    let case = &cases[usize::from(mode & 1)];
    let token = match mode >> 1 & 3 {
        0 => String::from_utf8_lossy(rest).into_owned(),
        1 => edit(&case.genuine, rest),
        2 => swap_segment(&case.genuine, 1, rest),
        _ => swap_segment(&case.genuine, 0, rest),
    };
    for case in cases {
        check(case, &token);
    }
});

/// Applies (operation, position, byte) triples to the token's bytes; bytes stay
/// ASCII so the token stays a string the way a header or frame would carry it.
fn edit(token: &str, ops: &[u8]) -> String {
    let mut bytes = token.as_bytes().to_vec();
    for op in ops.chunks_exact(3) {
        let at = usize::from(op[1]) * bytes.len() / 256;
        let b = op[2] & 0x7f;
        match op[0] % 3 {
            0 if at < bytes.len() => bytes[at] = b,
            1 => bytes.insert(at, b),
            2 if at < bytes.len() => {
                bytes.remove(at);
            }
            _ => {}
        }
    }
    String::from_utf8(bytes).expect("ASCII")
}

/// The token with segment `index` replaced by `json` base64url-encoded.
fn swap_segment(token: &str, index: usize, json: &[u8]) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[index] = b64url(json);
    parts.join(".")
}

fn check(case: &Case, token: &str) {
    let Ok(claims) = case.validator.validate(token) else {
        return;
    };
    let (message, signature) = token.rsplit_once('.').expect("three segments");
    let verified =
        jsonwebtoken::crypto::verify(signature, message.as_bytes(), &case.key, case.algorithm);
    assert!(
        matches!(verified, Ok(true)),
        "accepted a token not signed with the key: {token}"
    );
    assert!(
        claims
            .user_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    );
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
