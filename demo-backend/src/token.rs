//! Demo login tokens: HS256 JWTs signed with the cluster's shared secret, carrying the
//! claims the gateway reads (`sub`, `exp`, `iat`, `jti`, `email`, `role`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::user::UserName;

/// Every demo user gets this role; the gateway only echoes it.
pub const DEMO_ROLE: &str = "member";
/// Mail domain of demo users: `.invalid` (RFC 2606) never delivers anywhere.
pub const DEMO_EMAIL_DOMAIN: &str = "demo.invalid";

/// A signed token and its expiry.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Why a token could not be signed (a crypto-provider failure; never expected).
#[derive(Debug, thiserror::Error)]
#[error("cannot sign the token: {0}")]
pub struct TokenError(#[from] jsonwebtoken::errors::Error);

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
    email: String,
    role: &'static str,
}

/// Signs demo tokens.
pub struct Issuer {
    key: EncodingKey,
    ttl: Duration,
}

impl Issuer {
    pub fn new(secret: &[u8], ttl: Duration) -> Issuer {
        shared::auth::install_crypto_provider();
        Issuer {
            key: EncodingKey::from_secret(secret),
            ttl,
        }
    }

    /// A token for `user`, valid from now for the configured lifetime.
    pub fn issue(&self, user: &UserName) -> Result<Issued, TokenError> {
        let now = unix_now();
        let expires_at = now + self.ttl.as_secs();
        let claims = Claims {
            sub: user.as_str(),
            iat: now,
            exp: expires_at,
            // Unique per token so one can be revoked (`sb:revoked:<jti>`).
            jti: format!("{:032x}", rand::random::<u128>()),
            email: format!("{user}@{DEMO_EMAIL_DOMAIN}"),
            role: DEMO_ROLE,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)?;
        Ok(Issued { token, expires_at })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::auth::{JwtAlgorithm, JwtSettings, KeySource, Validator};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn tokens_verify_with_the_gateway_validator() {
        let issuer = Issuer::new(SECRET, Duration::from_secs(180));
        let alice = UserName::parse("alice").unwrap();
        let a = issuer.issue(&alice).unwrap();
        let b = issuer.issue(&alice).unwrap();
        let v = Validator::new(&JwtSettings::new(
            JwtAlgorithm::Hs256,
            KeySource::Secret(SECRET.to_vec()),
        ))
        .unwrap();
        let ca = v.validate(&a.token).unwrap();
        let cb = v.validate(&b.token).unwrap();
        assert_eq!(ca.user_id, "alice");
        assert_eq!(ca.exp, a.expires_at);
        assert_eq!(ca.exp - ca.iat.unwrap(), 180);
        assert_eq!(ca.email.as_deref(), Some("alice@demo.invalid"));
        assert_eq!(ca.role.as_deref(), Some(DEMO_ROLE));
        assert_ne!(ca.jti, cb.jti, "every token has its own jti");

        let other = Validator::new(&JwtSettings::new(
            JwtAlgorithm::Hs256,
            KeySource::Secret(b"another-secret-another-secret-000".to_vec()),
        ))
        .unwrap();
        assert!(other.validate(&a.token).is_err());
    }
}
