//! Signed test tokens: HS256 with [`TEST_SECRET`], RS256 and ES256 with the committed
//! test-only keys in `testkit/keys/` (`jwks.json` publishes them as kids `rsa-1` and
//! `ec-1`). Helpers panic on failure: they only ever run inside tests.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The HS256 secret of test deployments; 32+ bytes as RFC 7518 requires for HS256.
pub const TEST_SECRET: &str = "switchboard-test-secret-not-for-production";

static RSA_KEY: LazyLock<EncodingKey> = LazyLock::new(|| {
    EncodingKey::from_rsa_pem(include_bytes!("../keys/rsa_private.pem"))
        .expect("testkit/keys/rsa_private.pem is a PKCS#8 RSA key")
});
static EC_KEY: LazyLock<EncodingKey> = LazyLock::new(|| {
    EncodingKey::from_ec_pem(include_bytes!("../keys/ec_private.pem"))
        .expect("testkit/keys/ec_private.pem is a PKCS#8 P-256 key")
});

/// `testkit/keys/`: the PEM files and `jwks.json`, for tests that configure a gateway.
pub fn keys_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("keys")
}

/// `claims` signed with HS256 and `secret` (no `kid`).
pub fn hs256(secret: &str, claims: &Value) -> String {
    sign(
        Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// `claims` signed with RS256 and `keys/rsa_private.pem`; the JWKS kid is `rsa-1`.
pub fn rs256(claims: &Value, kid: Option<&str>) -> String {
    sign(with_kid(Algorithm::RS256, kid), claims, &RSA_KEY)
}

/// `claims` signed with ES256 and `keys/ec_private.pem`; the JWKS kid is `ec-1`.
pub fn es256(claims: &Value, kid: Option<&str>) -> String {
    sign(with_kid(Algorithm::ES256, kid), claims, &EC_KEY)
}

/// Unix time in seconds, the clock `exp` is checked against.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("system clock after 1970")
        .as_secs()
}

/// `sub`, `exp = now + ttl_secs` (negative for an already expired token), `iat` and a
/// unique `jti`. Add claims with `value["role"] = json!("admin")`.
pub fn claims(sub: &str, ttl_secs: i64) -> Value {
    let now = now();
    json!({
        "sub": sub,
        "exp": now.saturating_add_signed(ttl_secs),
        "iat": now,
        "jti": unique_jti(),
    })
}

/// An HS256 token for `sub` signed with [`TEST_SECRET`], valid for `ttl_secs`.
pub fn token(sub: &str, ttl_secs: i64) -> String {
    hs256(TEST_SECRET, &claims(sub, ttl_secs))
}

fn with_kid(alg: Algorithm, kid: Option<&str>) -> Header {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    header
}

fn sign(header: Header, claims: &Value, key: &EncodingKey) -> String {
    // Tests sign before any validator exists, and jsonwebtoken panics without a backend.
    shared::auth::install_crypto_provider();
    jsonwebtoken::encode(&header, claims, key).expect("test token signs")
}

/// Unique within the process (counter) and unlikely to repeat across processes
/// (randomly keyed hash of time and pid), so revocation tests never collide.
fn unique_jti() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let hash = RandomState::new().hash_one((SystemTime::now(), std::process::id(), count));
    format!("{hash:016x}{count:04x}")
}

#[cfg(test)]
mod tests {
    use shared::auth::{JwtAlgorithm, JwtSettings, KeySource, Validator};

    use super::*;

    fn validator(algorithm: JwtAlgorithm, file: &str) -> Validator {
        let bytes = std::fs::read(keys_dir().join(file)).expect("fixture file");
        let key = match file {
            "jwks.json" => KeySource::Jwks(bytes),
            _ => KeySource::PublicKeyPem(bytes),
        };
        Validator::new(&JwtSettings::new(algorithm, key)).expect("fixture key loads")
    }

    #[test]
    fn token_validates_with_the_test_secret() {
        let settings = JwtSettings::new(
            JwtAlgorithm::Hs256,
            KeySource::Secret(TEST_SECRET.as_bytes().to_vec()),
        );
        let claims = Validator::new(&settings)
            .expect("secret loads")
            .validate(&token("alice", 60))
            .expect("valid");
        assert_eq!(claims.user_id, "alice");
        assert!(claims.jti.is_some());
        assert!(claims.exp >= now() + 59);
    }

    #[test]
    fn jwks_matches_the_pem_keys() {
        let claims = claims("bob", 60);
        for (alg, file) in [
            (JwtAlgorithm::Rs256, "rsa_public.pem"),
            (JwtAlgorithm::Rs256, "jwks.json"),
        ] {
            let got = validator(alg, file).validate(&rs256(&claims, Some("rsa-1")));
            assert_eq!(got.map(|c| c.user_id).as_deref(), Ok("bob"), "{file}");
        }
        for (alg, file) in [
            (JwtAlgorithm::Es256, "ec_public.pem"),
            (JwtAlgorithm::Es256, "jwks.json"),
        ] {
            let got = validator(alg, file).validate(&es256(&claims, Some("ec-1")));
            assert_eq!(got.map(|c| c.user_id).as_deref(), Ok("bob"), "{file}");
        }
    }

    #[test]
    fn negative_ttl_gives_an_expired_token() {
        let claims = claims("carol", -3600);
        assert!(claims["exp"].as_u64().expect("numeric exp") < now());
        let settings = JwtSettings::new(
            JwtAlgorithm::Hs256,
            KeySource::Secret(TEST_SECRET.as_bytes().to_vec()),
        );
        let err = Validator::new(&settings)
            .expect("secret loads")
            .validate(&hs256(TEST_SECRET, &claims))
            .expect_err("expired");
        assert!(err.is_expired());
    }

    #[test]
    fn jtis_are_unique() {
        let a = claims("dave", 60);
        let b = claims("dave", 60);
        assert_ne!(a["jti"], b["jti"]);
    }
}
