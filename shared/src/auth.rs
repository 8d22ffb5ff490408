//! The one JWT validator behind every credential source (header, subprotocol, query,
//! `auth` and `refresh` frames): algorithm pinned by config, keys checked once at
//! start-up, claims normalised into [`Claims`], failures reduced to client-safe
//! [`AuthError`]s.
//!
//! Algorithm confusion is closed before jsonwebtoken sees the token: the header's
//! `alg` must equal the configured algorithm exactly, and the key is chosen by the
//! configuration (for a JWK Set, by `kid` among keys usable for that algorithm),
//! never by anything else the token says.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, Validation};
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// Default clock-skew allowance between the IdP and the gateway. Kept small because the
/// gateway keeps a connection open until `exp + leeway`, so an accepted token is never
/// closed straight away, and every second of leeway extends every token's life.
pub const DEFAULT_LEEWAY_SECS: u64 = 5;
/// Default cap on a token's length: real tokens stay far below it, and it bounds the
/// base64, JSON and signature work an unauthenticated peer can make us do.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8192;
/// Largest accepted leeway: more means broken clocks, not skew (and jsonwebtoken
/// computes `now - leeway`, which must not underflow).
pub const MAX_LEEWAY_SECS: u64 = 300;
/// Shortest HS256 secret: RFC 7518 section 3.2 requires at least the hash size (256 bits).
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// Longest user id; ids become parts of Redis keys and NATS subjects.
pub const MAX_USER_ID_CHARS: usize = 128;
/// Default cap on a token's lifetime (`exp - iat`, or `exp - now` without `iat`): a
/// day covers every real session token, while a stolen token minted for years (an IdP
/// misconfiguration, or a leaked signing key used quietly) stops working within it.
/// 0 turns the check off.
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = 86_400;

/// RSA modulus sizes the aws-lc verifier accepts for RS256 (`RSA_PKCS1_2048_8192_SHA256`);
/// a key outside this range would reject every token, so it is refused at start-up.
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;
/// Claims that may carry the user id, in order of precedence.
const USER_ID_CLAIMS: [&str; 4] = ["sub", "user_id", "userId", "id"];

/// Installs jsonwebtoken's aws-lc crypto backend for the process. jsonwebtoken 11
/// panics at the first signature operation unless exactly one backend is active, and
/// Cargo feature unification can silently enable a second one, so the choice is made
/// explicitly. Idempotent; [`Validator::new`] calls it.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is all we need.
    let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
        &jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER,
    );
}

// === JwtAlgorithm ===

/// The one signature algorithm a deployment accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256 and a shared secret.
    Hs256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// ECDSA on P-256 with SHA-256.
    Es256,
}

impl JwtAlgorithm {
    /// The JOSE name, as it appears in a token header's `alg`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Hs256 => "HS256",
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }

    fn to_jsonwebtoken(self) -> Algorithm {
        match self {
            Self::Hs256 => Algorithm::HS256,
            Self::Rs256 => Algorithm::RS256,
            Self::Es256 => Algorithm::ES256,
        }
    }
}

impl fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configured algorithm name that is not HS256, RS256 or ES256.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported JWT algorithm `{0}`: expected HS256, RS256 or ES256")]
pub struct UnknownAlgorithm(pub String);

impl FromStr for JwtAlgorithm {
    type Err = UnknownAlgorithm;

    /// Case-insensitive, for config files; token headers are compared exactly.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Hs256, Self::Rs256, Self::Es256]
            .into_iter()
            .find(|alg| alg.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownAlgorithm(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for JwtAlgorithm {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

// === settings ===

/// Where the verification key comes from; the bytes were read from a file by the caller.
#[derive(Clone)]
pub enum KeySource {
    /// The HS256 shared secret, used as is (a trailing newline is part of it).
    Secret(Vec<u8>),
    /// An SPKI `BEGIN PUBLIC KEY` PEM (RSA for RS256, P-256 for ES256).
    PublicKeyPem(Vec<u8>),
    /// The JSON of a JWK Set (RFC 7517 section 5), as an IdP publishes it.
    Jwks(Vec<u8>),
}

impl fmt::Debug for KeySource {
    // Lengths only: secrets must never reach logs, and nothing here needs the bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, len) = match self {
            Self::Secret(bytes) => ("Secret", bytes.len()),
            Self::PublicKeyPem(bytes) => ("PublicKeyPem", bytes.len()),
            Self::Jwks(bytes) => ("Jwks", bytes.len()),
        };
        write!(f, "{kind}({len} bytes)")
    }
}

/// Everything [`Validator::new`] needs.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub algorithm: JwtAlgorithm,
    pub key: KeySource,
    /// When set, tokens must carry an `aud` containing it.
    pub audience: Option<String>,
    /// When set, tokens must carry exactly this `iss`.
    pub issuer: Option<String>,
    pub leeway_secs: u64,
    pub max_token_bytes: usize,
    /// Longest accepted token lifetime in seconds; 0 = no cap.
    pub max_lifetime_secs: u64,
}

impl JwtSettings {
    /// Settings with no audience or issuer check and the default leeway and size cap.
    pub fn new(algorithm: JwtAlgorithm, key: KeySource) -> Self {
        Self {
            algorithm,
            key,
            audience: None,
            issuer: None,
            leeway_secs: DEFAULT_LEEWAY_SECS,
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            max_lifetime_secs: DEFAULT_MAX_LIFETIME_SECS,
        }
    }
}

/// Why the configured key material or settings cannot be used. Start-up errors for
/// operators: they name the problem but never print key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the HS256 secret is empty")]
    EmptySecret,
    #[error("the HS256 secret is {len} bytes; at least {min} are required (RFC 7518 section 3.2)")]
    SecretTooShort { len: usize, min: usize },
    #[error(
        "HS256 needs a shared secret but was given a PEM key; verifying HMAC with a public \
         key lets anyone who has that key forge tokens"
    )]
    PemWithHmac,
    #[error("HS256 needs a shared secret, not a JWK Set")]
    JwksWithHmac,
    #[error("{0} needs a public key (PEM or JWK Set), not a shared secret")]
    SecretWithAsymmetric(JwtAlgorithm),
    #[error("the {0} key is not a valid `BEGIN PUBLIC KEY` PEM")]
    BadPem(JwtAlgorithm),
    #[error("the {0} key is a private key; give the gateway only the public key")]
    PrivateKeyPem(JwtAlgorithm),
    #[error("{algorithm} needs a {expected} key but the PEM holds a {found} key")]
    KeyTypeMismatch {
        algorithm: JwtAlgorithm,
        expected: &'static str,
        found: &'static str,
    },
    #[error("the RS256 key has {bits} bits; 2048 to 8192 are supported")]
    RsaKeySize { bits: usize },
    #[error("ES256 needs a key on curve P-256")]
    NotP256,
    #[error("the JWK Set cannot be parsed: {0}")]
    JwksParse(String),
    #[error("the JWK Set has no key usable for {0}")]
    NoUsableKey(JwtAlgorithm),
    #[error("the JWK Set has more than one {algorithm} key with kid `{kid}`")]
    DuplicateKid {
        algorithm: JwtAlgorithm,
        kid: String,
    },
    #[error("jwt leeway of {0} s is larger than the maximum of {MAX_LEEWAY_SECS} s")]
    LeewayTooLarge(u64),
    #[error("the configured {0} is empty; leave it unset to skip the check")]
    EmptySetting(&'static str),
}

// === claims and errors ===

/// The claims every part of Switchboard uses, whatever the IdP called them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// From `sub`, `user_id`, `userId` or `id` (first present and non-empty), matching
    /// `[A-Za-z0-9_-]{1,128}`, so it is safe in Redis keys and as a NATS subject token.
    pub user_id: String,
    /// `email` when it is a non-empty string.
    pub email: Option<String>,
    /// `role` when it is a non-empty string.
    pub role: Option<String>,
    /// `sid` (IdP session id) when it is a non-empty string.
    pub sid: Option<String>,
    /// `jti` (token id, the revocation key) when it is a non-empty string.
    pub jti: Option<String>,
    /// Expiry, unix seconds. The token stays usable until `exp + leeway`.
    pub exp: u64,
    pub nbf: Option<u64>,
    pub iat: Option<u64>,
}

/// Why a token was refused. Messages are safe to send to the client: they never
/// contain the token, a claim value or key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("invalid token signature")]
    InvalidSignature,
    #[error("token algorithm not allowed")]
    AlgorithmNotAllowed,
    #[error("token audience not accepted")]
    InvalidAudience,
    #[error("token issuer not accepted")]
    InvalidIssuer,
    #[error("token is missing the `{0}` claim")]
    MissingClaim(&'static str),
    #[error("token has an invalid `{0}` claim")]
    InvalidClaim(&'static str),
    #[error("token too large")]
    TooLarge,
    #[error("token lifetime exceeds the allowed maximum")]
    LifetimeTooLong,
    #[error("token signed with an unknown key")]
    UnknownKey,
    #[error("malformed token")]
    Malformed,
}

impl AuthError {
    /// True only for an expired token: the client should get a fresh token rather
    /// than retry with the same one.
    pub fn is_expired(&self) -> bool {
        matches!(self, Self::Expired)
    }

    /// A short snake_case label, bounded in number, for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::InvalidSignature => "bad_signature",
            Self::AlgorithmNotAllowed => "algorithm",
            Self::InvalidAudience => "audience",
            Self::InvalidIssuer => "issuer",
            Self::MissingClaim(_) => "missing_claim",
            Self::InvalidClaim(_) => "invalid_claim",
            Self::TooLarge => "too_large",
            Self::LifetimeTooLong => "lifetime",
            Self::UnknownKey => "unknown_key",
            Self::Malformed => "malformed",
        }
    }

    fn from_jsonwebtoken(err: &jsonwebtoken::errors::Error) -> Self {
        match err.kind() {
            ErrorKind::ExpiredSignature => Self::Expired,
            ErrorKind::ImmatureSignature => Self::NotYetValid,
            ErrorKind::InvalidSignature => Self::InvalidSignature,
            ErrorKind::InvalidAlgorithm
            | ErrorKind::MissingAlgorithm
            | ErrorKind::UnsupportedAlgorithm
            | ErrorKind::InvalidAlgorithmName => Self::AlgorithmNotAllowed,
            ErrorKind::InvalidAudience => Self::InvalidAudience,
            ErrorKind::InvalidIssuer => Self::InvalidIssuer,
            ErrorKind::InvalidSubject => Self::InvalidClaim("sub"),
            ErrorKind::MissingRequiredClaim(name) => Self::MissingClaim(spec_claim(name)),
            ErrorKind::InvalidClaimFormat(name) => Self::InvalidClaim(spec_claim(name)),
            ErrorKind::InvalidKeyFormat
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::Provider(_) => {
                // Keys are checked in `Validator::new`, so this is our bug or a
                // backend surprise, not the client's fault; make it visible.
                tracing::warn!(error = %err, "JWT verification failed inside the crypto backend");
                Self::Malformed
            }
            // Base64, JSON, UTF-8, shape, and whatever later versions add.
            _ => Self::Malformed,
        }
    }
}

/// jsonwebtoken reports claim names as `String`; ours are `&'static str`.
fn spec_claim(name: &str) -> &'static str {
    match name {
        "exp" => "exp",
        "nbf" => "nbf",
        "aud" => "aud",
        "iss" => "iss",
        "sub" => "sub",
        _ => "claim",
    }
}

// === Validator ===

/// Validates tokens against one configuration. Cheap to clone (an `Arc`), shareable
/// across tasks, no I/O per call.
#[derive(Clone)]
pub struct Validator {
    inner: Arc<Inner>,
}

struct Inner {
    algorithm: JwtAlgorithm,
    keys: Keys,
    validation: Validation,
    audience: Option<String>,
    issuer: Option<String>,
    leeway_secs: u64,
    max_token_bytes: usize,
    max_lifetime_secs: u64,
}

enum Keys {
    /// A secret or PEM key: the token's `kid` plays no part.
    Single(DecodingKey),
    /// A JWK Set reduced to the keys usable for the configured algorithm.
    Set {
        by_kid: HashMap<String, DecodingKey>,
        /// The only usable key, for tokens without a `kid`; `None` when there are several.
        sole: Option<DecodingKey>,
        /// Kids present in the set but unusable for the configured algorithm, so a
        /// token naming one is refused as an algorithm mismatch, not an unknown key.
        refused: HashSet<String>,
    },
}

impl Keys {
    fn select(&self, kid: Option<&str>) -> Result<&DecodingKey, AuthError> {
        match self {
            Self::Single(key) => Ok(key),
            Self::Set {
                by_kid,
                sole,
                refused,
            } => match kid {
                Some(kid) => by_kid.get(kid).ok_or(if refused.contains(kid) {
                    AuthError::AlgorithmNotAllowed
                } else {
                    AuthError::UnknownKey
                }),
                None => sole.as_ref().ok_or(AuthError::UnknownKey),
            },
        }
    }
}

impl fmt::Debug for Keys {
    // Kids are public identifiers; key bytes are not printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Single(_) => f.write_str("Single"),
            Self::Set { by_kid, sole, .. } => {
                let mut kids: Vec<&str> = by_kid.keys().map(String::as_str).collect();
                kids.sort_unstable();
                f.debug_struct("Set")
                    .field("kids", &kids)
                    .field("sole", &sole.is_some())
                    .finish()
            }
        }
    }
}

impl fmt::Debug for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        f.debug_struct("Validator")
            .field("algorithm", &inner.algorithm)
            .field("keys", &inner.keys)
            .field("audience", &inner.audience)
            .field("issuer", &inner.issuer)
            .field("leeway_secs", &inner.leeway_secs)
            .field("max_token_bytes", &inner.max_token_bytes)
            .field("max_lifetime_secs", &inner.max_lifetime_secs)
            .finish()
    }
}

/// The header fields we act on, read before any signature check: only to refuse a
/// foreign algorithm early and to pick the key.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<IgnoredAny>,
}

impl Validator {
    /// Checks the key material against the algorithm and prepares the validation rules.
    pub fn new(settings: &JwtSettings) -> Result<Self, KeyError> {
        install_crypto_provider();
        let algorithm = settings.algorithm;
        if settings.leeway_secs > MAX_LEEWAY_SECS {
            return Err(KeyError::LeewayTooLarge(settings.leeway_secs));
        }
        if settings.audience.as_deref() == Some("") {
            return Err(KeyError::EmptySetting("audience"));
        }
        if settings.issuer.as_deref() == Some("") {
            return Err(KeyError::EmptySetting("issuer"));
        }

        let keys = match (&settings.key, algorithm) {
            (KeySource::Secret(secret), JwtAlgorithm::Hs256) => Keys::Single(hmac_key(secret)?),
            (KeySource::Secret(_), alg) => return Err(KeyError::SecretWithAsymmetric(alg)),
            (KeySource::PublicKeyPem(_), JwtAlgorithm::Hs256) => return Err(KeyError::PemWithHmac),
            (KeySource::PublicKeyPem(pem), alg) => Keys::Single(pem_key(alg, pem)?),
            (KeySource::Jwks(_), JwtAlgorithm::Hs256) => return Err(KeyError::JwksWithHmac),
            (KeySource::Jwks(json), alg) => jwks_keys(alg, json)?,
        };

        let mut validation = Validation::new(algorithm.to_jsonwebtoken());
        validation.leeway = settings.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // jsonwebtoken checks `aud`/`iss` only when present unless they are required.
        let mut required = vec!["exp"];
        match &settings.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Otherwise jsonwebtoken refuses every token that carries an `aud`.
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &settings.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);

        Ok(Self {
            inner: Arc::new(Inner {
                algorithm,
                keys,
                validation,
                audience: settings.audience.clone(),
                issuer: settings.issuer.clone(),
                leeway_secs: settings.leeway_secs,
                max_token_bytes: settings.max_token_bytes,
                max_lifetime_secs: settings.max_lifetime_secs,
            }),
        })
    }

    /// Verifies the signature and the time, audience and issuer rules, then
    /// normalises the claims.
    pub fn validate(&self, token: &str) -> Result<Claims, AuthError> {
        let inner = &*self.inner;
        if token.len() > inner.max_token_bytes {
            return Err(AuthError::TooLarge);
        }
        let mut segments = token.split('.');
        let (Some(header), Some(_), Some(_), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(AuthError::Malformed);
        };
        let header: RawHeader = b64url_decode(header)
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(AuthError::Malformed)?;
        // Exact, case-sensitive: this is what refuses `none` and HS256-signed-with-the-
        // public-key tokens, whatever jsonwebtoken would make of them.
        if header.alg != inner.algorithm.as_str() {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        // RFC 7515 section 4.1.11: extensions listed in `crit` must be understood, and
        // we implement none of them.
        if header.crit.is_some() {
            return Err(AuthError::Malformed);
        }
        let key = inner.keys.select(header.kid.as_deref())?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &inner.validation)
            .map_err(|err| AuthError::from_jsonwebtoken(&err))?;
        let claims = normalise(&data.claims)?;
        check_lifetime(
            &claims,
            inner.max_lifetime_secs,
            inner.leeway_secs,
            jsonwebtoken::get_current_timestamp(),
        )?;
        Ok(claims)
    }

    pub fn algorithm(&self) -> JwtAlgorithm {
        self.inner.algorithm
    }

    /// The allowed clock skew; a connection may stay open until `exp` plus this.
    pub fn leeway_secs(&self) -> u64 {
        self.inner.leeway_secs
    }

    pub fn max_token_bytes(&self) -> usize {
        self.inner.max_token_bytes
    }

    /// The longest accepted token lifetime in seconds (0 = no cap).
    pub fn max_lifetime_secs(&self) -> u64 {
        self.inner.max_lifetime_secs
    }
}

/// Refuses tokens that live longer than `max` seconds (0 = no cap): by `exp - iat`
/// when the token says when it was issued, and in any case by what is left of it
/// (`exp - now`, with the leeway for clock skew), so an `iat` in the future cannot
/// stretch a token past the cap either.
fn check_lifetime(claims: &Claims, max: u64, leeway: u64, now: u64) -> Result<(), AuthError> {
    if max == 0 {
        return Ok(());
    }
    let issued_for = claims.iat.map(|iat| claims.exp.saturating_sub(iat));
    let left = claims.exp.saturating_sub(now);
    if issued_for.is_some_and(|d| d > max) || left > max.saturating_add(leeway) {
        return Err(AuthError::LifetimeTooLong);
    }
    Ok(())
}

// === key loading ===

fn hmac_key(secret: &[u8]) -> Result<DecodingKey, KeyError> {
    if secret.is_empty() {
        return Err(KeyError::EmptySecret);
    }
    // The classic misconfiguration: the secret file is the IdP's public key.
    if contains(secret, b"-----BEGIN") {
        return Err(KeyError::PemWithHmac);
    }
    if secret.len() < MIN_HS256_SECRET_BYTES {
        return Err(KeyError::SecretTooShort {
            len: secret.len(),
            min: MIN_HS256_SECRET_BYTES,
        });
    }
    Ok(DecodingKey::from_secret(secret))
}

fn pem_key(algorithm: JwtAlgorithm, pem: &[u8]) -> Result<DecodingKey, KeyError> {
    // jsonwebtoken would take the inner bytes of a private key and then reject every
    // signature; say what is wrong instead (and keep private keys off gateways).
    if contains(pem, b"PRIVATE KEY-----") {
        return Err(KeyError::PrivateKeyPem(algorithm));
    }
    let parsed = match algorithm {
        JwtAlgorithm::Rs256 => DecodingKey::from_rsa_pem(pem),
        _ => DecodingKey::from_ec_pem(pem),
    };
    let key = parsed.map_err(|_| {
        // Name the key type found when it is merely the wrong one, the usual mistake.
        let found = if DecodingKey::from_rsa_pem(pem).is_ok() {
            Some("RSA")
        } else if DecodingKey::from_ec_pem(pem).is_ok() {
            Some("EC")
        } else {
            None
        };
        match (found, algorithm) {
            (Some(found), JwtAlgorithm::Rs256) => KeyError::KeyTypeMismatch {
                algorithm,
                expected: "RSA",
                found,
            },
            (Some(found), _) => KeyError::KeyTypeMismatch {
                algorithm,
                expected: "EC",
                found,
            },
            (None, _) => KeyError::BadPem(algorithm),
        }
    })?;
    match algorithm {
        JwtAlgorithm::Rs256 => {
            // jsonwebtoken only unwraps the PEM; parse the DER now so a broken key fails
            // start-up instead of every login.
            let der = key
                .try_get_as_bytes()
                .map_err(|_| KeyError::BadPem(algorithm))?;
            let (n, _e) = (jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER
                .key_utils
                .rsa_pub_components_from_public_key)(der)
            .map_err(|_| KeyError::BadPem(algorithm))?;
            check_rsa_size(&n)?;
        }
        _ => {
            let point = key.try_get_as_bytes().map_err(|_| KeyError::NotP256)?;
            if !is_p256_point(point) {
                return Err(KeyError::NotP256);
            }
        }
    }
    Ok(key)
}

fn jwks_keys(algorithm: JwtAlgorithm, json: &[u8]) -> Result<Keys, KeyError> {
    let set: JwkSet =
        serde_json::from_slice(json).map_err(|err| KeyError::JwksParse(err.to_string()))?;
    let mut by_kid = HashMap::new();
    let mut refused = HashSet::new();
    let mut usable = Vec::new();
    for jwk in &set.keys {
        let kid = jwk.common.key_id.as_deref();
        match usable_jwk(algorithm, jwk) {
            Ok(key) => {
                if let Some(kid) = kid
                    && by_kid.insert(kid.to_owned(), key.clone()).is_some()
                {
                    return Err(KeyError::DuplicateKid {
                        algorithm,
                        kid: kid.to_owned(),
                    });
                }
                usable.push(key);
            }
            Err(why) => {
                // IdPs publish keys for other algorithms and uses; worth a line, not an error.
                tracing::info!(kid = kid.unwrap_or("-"), %algorithm, why, "JWK skipped");
                if let Some(kid) = kid {
                    refused.insert(kid.to_owned());
                }
            }
        }
    }
    // A kid shared by a usable key and an unusable one (e.g. `use: enc`) means the usable one.
    refused.retain(|kid| !by_kid.contains_key(kid));
    let sole = match usable.len() {
        0 => return Err(KeyError::NoUsableKey(algorithm)),
        1 => usable.pop(),
        _ => None,
    };
    Ok(Keys::Set {
        by_kid,
        sole,
        refused,
    })
}

/// The key for `jwk` if it may verify `algorithm` signatures, else why not.
fn usable_jwk(algorithm: JwtAlgorithm, jwk: &Jwk) -> Result<DecodingKey, &'static str> {
    let common = &jwk.common;
    if common
        .public_key_use
        .as_ref()
        .is_some_and(|key_use| *key_use != PublicKeyUse::Signature)
    {
        return Err("`use` is not `sig`");
    }
    if common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return Err("`key_ops` does not include `verify`");
    }
    if common
        .key_algorithm
        .is_some_and(|alg| alg != KeyAlgorithm::from(algorithm.to_jsonwebtoken()))
    {
        return Err("`alg` differs from the configured algorithm");
    }
    match (algorithm, &jwk.algorithm) {
        (JwtAlgorithm::Rs256, AlgorithmParameters::RSA(rsa)) => {
            let key = DecodingKey::from_rsa_components(&rsa.n, &rsa.e)
                .map_err(|_| "`n` or `e` is not base64url")?;
            if let DecodingKeyKind::RsaModulusExponent { n, .. } = key.kind() {
                check_rsa_size(n).map_err(|_| "RSA modulus outside 2048..=8192 bits")?;
            }
            Ok(key)
        }
        (JwtAlgorithm::Es256, AlgorithmParameters::EllipticCurve(ec)) => {
            let coordinate_ok = |c: &str| b64url_decode(c).is_some_and(|bytes| bytes.len() == 32);
            if ec.curve != EllipticCurve::P256 || !coordinate_ok(&ec.x) || !coordinate_ok(&ec.y) {
                return Err("not a P-256 point");
            }
            DecodingKey::from_ec_components(&ec.x, &ec.y).map_err(|_| "`x` or `y` is not base64url")
        }
        _ => Err("key type does not match the configured algorithm"),
    }
}

fn check_rsa_size(modulus: &[u8]) -> Result<(), KeyError> {
    let bits = match modulus.iter().position(|&byte| byte != 0) {
        // `leading_zeros` of a u8 is at most 7 here, so the subtraction cannot underflow.
        Some(first) => (modulus.len() - first) * 8 - modulus[first].leading_zeros() as usize,
        None => 0,
    };
    if RSA_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(KeyError::RsaKeySize { bits })
    }
}

/// An uncompressed SEC1 point of P-256's size (the curve OID is not in the bytes
/// jsonwebtoken keeps, but P-384 and P-521 points have other lengths).
fn is_p256_point(point: &[u8]) -> bool {
    point.len() == 65 && point[0] == 0x04
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Strict unpadded base64url (RFC 7515 section 2): no padding, whitespace or stray
/// low bits (the engine's defaults). Used for the header and JWK coordinates;
/// jsonwebtoken decodes the rest.
fn b64url_decode(input: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(input).ok()
}

// === claim normalisation ===

fn normalise(claims: &Map<String, Value>) -> Result<Claims, AuthError> {
    Ok(Claims {
        user_id: user_id(claims)?,
        email: string_claim(claims, "email"),
        role: string_claim(claims, "role"),
        sid: string_claim(claims, "sid"),
        jti: string_claim(claims, "jti"),
        // jsonwebtoken has already required and parsed `exp`; this cannot fail for a
        // token it accepted, but a parse error is still an error, not a panic.
        exp: claims
            .get("exp")
            .and_then(numeric_date)
            .ok_or(AuthError::InvalidClaim("exp"))?,
        nbf: claims.get("nbf").and_then(numeric_date),
        iat: claims.get("iat").and_then(numeric_date),
    })
}

fn user_id(claims: &Map<String, Value>) -> Result<String, AuthError> {
    for name in USER_ID_CLAIMS {
        let id = match claims.get(name) {
            None | Some(Value::Null) => continue,
            Some(Value::String(id)) if id.is_empty() => continue,
            Some(Value::String(id)) => id.clone(),
            // Integer ids from numeric databases; a float is not an id.
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            Some(_) => return Err(AuthError::InvalidClaim("sub")),
        };
        return if is_valid_user_id(&id) {
            Ok(id)
        } else {
            Err(AuthError::InvalidClaim("sub"))
        };
    }
    Err(AuthError::MissingClaim("sub"))
}

/// `[A-Za-z0-9_-]{1,128}`: no `.`, `*`, `>` or whitespace (NATS subject tokens), no
/// `:` (Redis key separator).
fn is_valid_user_id(id: &str) -> bool {
    (1..=MAX_USER_ID_CHARS).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

fn string_claim(claims: &Map<String, Value>, name: &str) -> Option<String> {
    claims
        .get(name)
        .and_then(Value::as_str)
        .filter(|value| !value.is_empty())
        .map(str::to_owned)
}

/// A NumericDate as jsonwebtoken reads it: a non-negative integer, or a float rounded.
fn numeric_date(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.round() as u64)
    })
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    macro_rules! fixture {
        ($name:literal) => {
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../testkit/keys/",
                $name
            ))
        };
    }

    const SECRET: &[u8] = b"unit-test-secret-unit-test-secret-0123";
    const RSA_PRIVATE: &[u8] = fixture!("rsa_private.pem");
    const RSA_PUBLIC: &[u8] = fixture!("rsa_public.pem");
    const EC_PRIVATE: &[u8] = fixture!("ec_private.pem");
    const EC_PUBLIC: &[u8] = fixture!("ec_public.pem");
    const JWKS: &[u8] = fixture!("jwks.json");

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    /// Claims for user `u1` valid for an hour, plus `extra`.
    fn claims_with(extra: Value) -> Value {
        let mut claims = json!({ "sub": "u1", "exp": now() + 3600, "iat": now() });
        if let (Some(map), Value::Object(extra)) = (claims.as_object_mut(), extra) {
            map.extend(extra);
        }
        claims
    }

    fn sign_with(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
        install_crypto_provider();
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).expect("test token signs")
    }

    fn hs256(claims: &Value) -> String {
        sign_with(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET),
            None,
            claims,
        )
    }

    fn rs256(kid: Option<&str>, claims: &Value) -> String {
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("RSA fixture");
        sign_with(Algorithm::RS256, &key, kid, claims)
    }

    fn es256(kid: Option<&str>, claims: &Value) -> String {
        let key = EncodingKey::from_ec_pem(EC_PRIVATE).expect("EC fixture");
        sign_with(Algorithm::ES256, &key, kid, claims)
    }

    fn settings(algorithm: JwtAlgorithm, key: KeySource) -> JwtSettings {
        JwtSettings::new(algorithm, key)
    }

    fn hs_settings() -> JwtSettings {
        settings(JwtAlgorithm::Hs256, KeySource::Secret(SECRET.to_vec()))
    }

    fn validator(settings: JwtSettings) -> Validator {
        Validator::new(&settings).expect("valid settings")
    }

    fn hs_validator() -> Validator {
        validator(hs_settings())
    }

    fn rs_validator() -> Validator {
        validator(settings(
            JwtAlgorithm::Rs256,
            KeySource::PublicKeyPem(RSA_PUBLIC.to_vec()),
        ))
    }

    fn es_validator() -> Validator {
        validator(settings(
            JwtAlgorithm::Es256,
            KeySource::PublicKeyPem(EC_PUBLIC.to_vec()),
        ))
    }

    fn jwks_validator(algorithm: JwtAlgorithm, jwks: &[u8]) -> Validator {
        validator(settings(algorithm, KeySource::Jwks(jwks.to_vec())))
    }

    fn b64url(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// `header.payload.signature` from JSON parts, for tokens jsonwebtoken will not build.
    fn raw_token(header: &Value, payload: &Value, signature: &str) -> String {
        format!(
            "{}.{}.{signature}",
            b64url(header.to_string().as_bytes()),
            b64url(payload.to_string().as_bytes())
        )
    }

    /// The same token with `payload` swapped in and the original header and signature kept.
    fn with_payload(token: &str, payload: &Value) -> String {
        let parts: Vec<&str> = token.split('.').collect();
        format!(
            "{}.{}.{}",
            parts[0],
            b64url(payload.to_string().as_bytes()),
            parts[2]
        )
    }

    fn signature(token: &str) -> &str {
        token.rsplit('.').next().expect("three segments")
    }

    // --- accepted tokens ---

    #[test]
    fn hs256_token_is_accepted_and_normalised() {
        let exp = now() + 600;
        let nbf = now() - 10;
        let token = hs256(&json!({
            "sub": "user_42", "email": "a@example.com", "role": "admin", "sid": "s-1",
            "jti": "j-1", "exp": exp, "nbf": nbf, "iat": nbf, "custom": {"x": 1},
        }));
        let claims = hs_validator().validate(&token).expect("valid token");
        assert_eq!(
            claims,
            Claims {
                user_id: "user_42".into(),
                email: Some("a@example.com".into()),
                role: Some("admin".into()),
                sid: Some("s-1".into()),
                jti: Some("j-1".into()),
                exp,
                nbf: Some(nbf),
                iat: Some(nbf),
            }
        );
    }

    #[test]
    fn rs256_pem_token_is_accepted() {
        let claims = rs_validator().validate(&rs256(None, &claims_with(json!({}))));
        assert_eq!(claims.expect("valid").user_id, "u1");
    }

    #[test]
    fn es256_pem_token_is_accepted() {
        let claims = es_validator().validate(&es256(None, &claims_with(json!({}))));
        assert_eq!(claims.expect("valid").user_id, "u1");
    }

    #[test]
    fn user_id_comes_from_sub_user_id_userid_or_id() {
        let v = hs_validator();
        let exp = now() + 60;
        let cases = [
            (json!({"sub": "s", "user_id": "u", "exp": exp}), "s"),
            (json!({"user_id": "u", "userId": "c", "exp": exp}), "u"),
            (json!({"userId": "c", "id": "i", "exp": exp}), "c"),
            (json!({"id": "i", "exp": exp}), "i"),
            (json!({"id": 12345, "exp": exp}), "12345"),
            (
                json!({"sub": 18446744073709551615u64, "exp": exp}),
                "18446744073709551615",
            ),
            (json!({"sub": "", "user_id": "u", "exp": exp}), "u"),
            (json!({"sub": null, "id": 7, "exp": exp}), "7"),
            (json!({"sub": "ab_C-9", "exp": exp}), "ab_C-9"),
        ];
        for (claims, expected) in cases {
            let got = v.validate(&hs256(&claims)).map(|c| c.user_id);
            assert_eq!(got.as_deref(), Ok(expected), "{claims}");
        }
    }

    #[test]
    fn numeric_and_string_ids_are_the_same_user() {
        // PROTOCOL.md section 3: an integer id is its decimal string, so `42` and
        // `"42"` name one user (one `user:42` channel, one connection count).
        let v = hs_validator();
        let exp = now() + 60;
        for claims in [
            json!({"sub": 42, "exp": exp}),
            json!({"sub": "42", "exp": exp}),
            json!({"user_id": 42, "exp": exp}),
            json!({"sub": "", "id": 42, "exp": exp}),
        ] {
            let got = v.validate(&hs256(&claims)).map(|c| c.user_id);
            assert_eq!(got.as_deref(), Ok("42"), "{claims}");
        }
        // Negative integers are ids too (the `-` is allowed); floats never are.
        let got = v.validate(&hs256(&json!({"sub": -7, "exp": exp})));
        assert_eq!(got.map(|c| c.user_id).as_deref(), Ok("-7"));
        let got = v.validate(&hs256(&json!({"sub": 42.0, "exp": exp})));
        assert_eq!(got, Err(AuthError::InvalidClaim("sub")));
    }

    #[test]
    fn missing_or_empty_user_id_is_missing_sub() {
        let v = hs_validator();
        let exp = now() + 60;
        for claims in [
            json!({"exp": exp}),
            json!({"sub": "", "user_id": "", "userId": null, "id": "", "exp": exp}),
        ] {
            let got = v.validate(&hs256(&claims));
            assert_eq!(got, Err(AuthError::MissingClaim("sub")), "{claims}");
        }
    }

    #[test]
    fn unsafe_user_ids_are_invalid_sub() {
        let v = hs_validator();
        let exp = now() + 60;
        let too_long = "a".repeat(MAX_USER_ID_CHARS + 1);
        for sub in [
            json!("a.b"),
            json!("a@b.c"),
            json!("a b"),
            json!("a*"),
            json!("a>"),
            json!("a:b"),
            json!("é"),
            json!(too_long),
            json!(1.5),
            json!(true),
        ] {
            let got = v.validate(&hs256(&json!({"sub": sub, "exp": exp})));
            assert_eq!(got, Err(AuthError::InvalidClaim("sub")), "{sub}");
        }
        // jsonwebtoken's own claim pre-parse cannot skip a non-scalar `sub` (serde_json
        // leaves it unconsumed), so these never reach our check; refused all the same.
        for sub in [json!({"id": 1}), json!(["u"])] {
            let got = v.validate(&hs256(&json!({"sub": sub, "exp": exp})));
            assert_eq!(got, Err(AuthError::Malformed), "{sub}");
        }
        // Under the other names they do reach our check.
        for id in [json!({"id": 1}), json!(["u"])] {
            let got = v.validate(&hs256(&json!({"user_id": id, "exp": exp})));
            assert_eq!(got, Err(AuthError::InvalidClaim("sub")), "{id}");
        }
        let longest = "a".repeat(MAX_USER_ID_CHARS);
        let ok = v.validate(&hs256(&json!({"sub": longest, "exp": exp})));
        assert_eq!(ok.map(|c| c.user_id.len()), Ok(MAX_USER_ID_CHARS));
    }

    #[test]
    fn non_string_optional_claims_are_ignored() {
        let token = hs256(&claims_with(json!({
            "email": 5, "role": ["admin"], "sid": {"a": 1}, "jti": "", "iat": "yesterday",
        })));
        let claims = hs_validator().validate(&token).expect("still valid");
        assert_eq!(
            (
                claims.email,
                claims.role,
                claims.sid,
                claims.jti,
                claims.iat
            ),
            (None, None, None, None, None)
        );
    }

    // --- algorithm confusion ---

    #[test]
    fn alg_none_is_refused() {
        let payload = claims_with(json!({}));
        let unsigned = raw_token(&json!({"alg": "none", "typ": "JWT"}), &payload, "");
        let hs_signed_sig = signature(&hs256(&payload)).to_owned();
        let with_sig = raw_token(&json!({"alg": "none"}), &payload, &hs_signed_sig);
        for v in [hs_validator(), rs_validator(), es_validator()] {
            assert_eq!(v.validate(&unsigned), Err(AuthError::AlgorithmNotAllowed));
            assert_eq!(v.validate(&with_sig), Err(AuthError::AlgorithmNotAllowed));
        }
        // Variants that lenient parsers have accepted.
        for alg in ["None", "NONE", "hs256", ""] {
            let token = raw_token(&json!({ "alg": alg }), &payload, "");
            assert_eq!(
                hs_validator().validate(&token),
                Err(AuthError::AlgorithmNotAllowed),
                "{alg}"
            );
        }
    }

    #[test]
    fn hs256_signed_with_rsa_public_key_is_refused_by_rs256_config() {
        // The classic confusion attack: the public key PEM used as the HMAC secret.
        let key = EncodingKey::from_secret(RSA_PUBLIC);
        let token = sign_with(Algorithm::HS256, &key, None, &claims_with(json!({})));
        assert_eq!(
            rs_validator().validate(&token),
            Err(AuthError::AlgorithmNotAllowed)
        );
        let jwks = jwks_validator(JwtAlgorithm::Rs256, JWKS);
        let token = sign_with(
            Algorithm::HS256,
            &key,
            Some("rsa-1"),
            &claims_with(json!({})),
        );
        assert_eq!(jwks.validate(&token), Err(AuthError::AlgorithmNotAllowed));
    }

    #[test]
    fn token_of_another_configured_family_is_refused() {
        let claims = claims_with(json!({}));
        assert_eq!(
            hs_validator().validate(&rs256(None, &claims)),
            Err(AuthError::AlgorithmNotAllowed)
        );
        assert_eq!(
            rs_validator().validate(&es256(None, &claims)),
            Err(AuthError::AlgorithmNotAllowed)
        );
        assert_eq!(
            es_validator().validate(&rs256(None, &claims)),
            Err(AuthError::AlgorithmNotAllowed)
        );
        // Same family, other hash: still not the configured algorithm.
        let hs512 = sign_with(
            Algorithm::HS512,
            &EncodingKey::from_secret(SECRET),
            None,
            &claims,
        );
        assert_eq!(
            hs_validator().validate(&hs512),
            Err(AuthError::AlgorithmNotAllowed)
        );
    }

    // --- signatures ---

    #[test]
    fn wrong_key_is_invalid_signature() {
        let other = EncodingKey::from_secret(b"another-secret-another-secret-0123456");
        let token = sign_with(Algorithm::HS256, &other, None, &claims_with(json!({})));
        assert_eq!(
            hs_validator().validate(&token),
            Err(AuthError::InvalidSignature)
        );
        // RS256/ES256: graft the signature of one genuine token onto another.
        let a = rs256(None, &claims_with(json!({"sub": "a"})));
        let b = rs256(None, &claims_with(json!({"sub": "b"})));
        let grafted = format!("{}.{}", a.rsplit_once('.').expect("jwt").0, signature(&b));
        assert_eq!(
            rs_validator().validate(&grafted),
            Err(AuthError::InvalidSignature)
        );
        let a = es256(None, &claims_with(json!({"sub": "a"})));
        let b = es256(None, &claims_with(json!({"sub": "b"})));
        let grafted = format!("{}.{}", a.rsplit_once('.').expect("jwt").0, signature(&b));
        assert_eq!(
            es_validator().validate(&grafted),
            Err(AuthError::InvalidSignature)
        );
    }

    #[test]
    fn tampered_payload_is_invalid_signature() {
        let forged = claims_with(json!({"sub": "admin"}));
        let cases = [
            (hs_validator(), hs256(&claims_with(json!({})))),
            (rs_validator(), rs256(None, &claims_with(json!({})))),
            (es_validator(), es256(None, &claims_with(json!({})))),
        ];
        for (v, token) in cases {
            assert_eq!(
                v.validate(&with_payload(&token, &forged)),
                Err(AuthError::InvalidSignature),
                "{:?}",
                v.algorithm()
            );
        }
    }

    // --- time ---

    #[test]
    fn expired_beyond_leeway_is_expired() {
        let token = hs256(&json!({"sub": "u1", "exp": now() - DEFAULT_LEEWAY_SECS - 30}));
        let err = hs_validator().validate(&token).expect_err("expired");
        assert_eq!(err, AuthError::Expired);
        assert!(err.is_expired());
    }

    #[test]
    fn expired_within_leeway_is_accepted() {
        let exp = now() - 2;
        let token = hs256(&json!({"sub": "u1", "exp": exp}));
        assert_eq!(hs_validator().validate(&token).map(|c| c.exp), Ok(exp));
    }

    #[test]
    fn nbf_in_the_future_is_not_yet_valid() {
        let token = hs256(&claims_with(json!({"nbf": now() + 120})));
        assert_eq!(hs_validator().validate(&token), Err(AuthError::NotYetValid));
        let within_leeway = hs256(&claims_with(json!({"nbf": now() + 2})));
        assert!(hs_validator().validate(&within_leeway).is_ok());
    }

    #[test]
    fn missing_or_unreadable_exp_is_missing_exp() {
        for exp in [
            None,
            Some(json!("tomorrow")),
            Some(json!(-5)),
            Some(json!(null)),
        ] {
            let mut claims = json!({"sub": "u1"});
            if let Some(exp) = &exp {
                claims["exp"] = exp.clone();
            }
            assert_eq!(
                hs_validator().validate(&hs256(&claims)),
                Err(AuthError::MissingClaim("exp")),
                "{exp:?}"
            );
        }
    }

    #[test]
    fn unreadable_nbf_is_invalid_nbf() {
        let token = hs256(&claims_with(json!({"nbf": "soon"})));
        assert_eq!(
            hs_validator().validate(&token),
            Err(AuthError::InvalidClaim("nbf"))
        );
    }

    // --- lifetime ---

    fn lifetime_validator(max: u64) -> Validator {
        validator(JwtSettings {
            max_lifetime_secs: max,
            ..hs_settings()
        })
    }

    #[test]
    fn lifetime_over_the_cap_is_refused() {
        let v = hs_validator();
        let max = DEFAULT_MAX_LIFETIME_SECS;
        let now = now();
        // Year 2200: accepted before the cap existed.
        let year_2200 = 7_258_118_400u64;
        let refused = [
            json!({"sub": "u1", "iat": now, "exp": year_2200}),
            json!({"sub": "u1", "exp": year_2200}),
            json!({"sub": "u1", "iat": now - 10, "exp": now - 10 + max + 1}),
            // No `iat`: what is left counts, beyond the leeway.
            json!({"sub": "u1", "exp": now + max + DEFAULT_LEEWAY_SECS + 60}),
            // An `iat` in the future does not stretch a token past the cap.
            json!({"sub": "u1", "iat": year_2200 - 60, "exp": year_2200}),
            // An unreadable `iat` is ignored, so the remaining time decides.
            json!({"sub": "u1", "iat": "yesterday", "exp": year_2200}),
        ];
        for claims in refused {
            assert_eq!(
                v.validate(&hs256(&claims)),
                Err(AuthError::LifetimeTooLong),
                "{claims}"
            );
        }
        let accepted = [
            json!({"sub": "u1", "iat": now, "exp": now + max}),
            json!({"sub": "u1", "iat": now - 100, "exp": now - 100 + max}),
            json!({"sub": "u1", "exp": now + max}),
            json!({"sub": "u1", "exp": now + 60}),
        ];
        for claims in accepted {
            assert!(v.validate(&hs256(&claims)).is_ok(), "{claims}");
        }
    }

    #[test]
    fn lifetime_cap_is_configurable_and_zero_turns_it_off() {
        let now = now();
        let long = hs256(&json!({"sub": "u1", "iat": now, "exp": 7_258_118_400u64}));
        assert!(lifetime_validator(0).validate(&long).is_ok());
        let hour = hs256(&json!({"sub": "u1", "iat": now, "exp": now + 3600}));
        assert_eq!(
            lifetime_validator(600).validate(&hour),
            Err(AuthError::LifetimeTooLong)
        );
        assert!(lifetime_validator(3600).validate(&hour).is_ok());
        assert_eq!(lifetime_validator(600).max_lifetime_secs(), 600);
    }

    #[test]
    fn lifetime_is_checked_after_the_signature_and_expiry() {
        // A forged long-lived token is a bad signature, not a lifetime problem, and an
        // expired one says expired: the cap never hides the more useful reason.
        let other = EncodingKey::from_secret(b"another-secret-another-secret-0123456");
        let forged = sign_with(
            Algorithm::HS256,
            &other,
            None,
            &json!({"sub": "u1", "exp": 7_258_118_400u64}),
        );
        assert_eq!(
            hs_validator().validate(&forged),
            Err(AuthError::InvalidSignature)
        );
        let expired = hs256(&json!({"sub": "u1", "iat": 0, "exp": now() - 600}));
        assert_eq!(hs_validator().validate(&expired), Err(AuthError::Expired));
    }

    // --- audience and issuer ---

    fn aud_iss_validator() -> Validator {
        validator(JwtSettings {
            audience: Some("switchboard".into()),
            issuer: Some("https://idp.example".into()),
            ..hs_settings()
        })
    }

    #[test]
    fn configured_audience_and_issuer_must_match() {
        let v = aud_iss_validator();
        let iss = "https://idp.example";
        let ok = [
            json!({"aud": "switchboard", "iss": iss}),
            json!({"aud": ["other", "switchboard"], "iss": iss}),
        ];
        for extra in ok {
            assert!(
                v.validate(&hs256(&claims_with(extra.clone()))).is_ok(),
                "{extra}"
            );
        }
        let refused = [
            (
                json!({"aud": "other", "iss": iss}),
                AuthError::InvalidAudience,
            ),
            (
                json!({"aud": ["a", "b"], "iss": iss}),
                AuthError::InvalidAudience,
            ),
            (json!({"aud": [], "iss": iss}), AuthError::InvalidAudience),
            (json!({"iss": iss}), AuthError::MissingClaim("aud")),
            (
                json!({"aud": "switchboard", "iss": "https://evil.example"}),
                AuthError::InvalidIssuer,
            ),
            (
                json!({"aud": "switchboard"}),
                AuthError::MissingClaim("iss"),
            ),
        ];
        for (extra, expected) in refused {
            let got = v.validate(&hs256(&claims_with(extra.clone())));
            assert_eq!(got, Err(expected), "{extra}");
        }
    }

    #[test]
    fn unconfigured_audience_and_issuer_accept_any() {
        let token = hs256(&claims_with(
            json!({"aud": "someone-else", "iss": "anyone"}),
        ));
        assert!(hs_validator().validate(&token).is_ok());
    }

    // --- shape and size ---

    #[test]
    fn oversized_token_is_too_large_before_parsing() {
        let v = validator(JwtSettings {
            max_token_bytes: 64,
            ..hs_settings()
        });
        assert_eq!(v.validate(&"x".repeat(65)), Err(AuthError::TooLarge));
        let padded = hs256(&claims_with(
            json!({"pad": "p".repeat(DEFAULT_MAX_TOKEN_BYTES)}),
        ));
        assert_eq!(hs_validator().validate(&padded), Err(AuthError::TooLarge));
        assert_eq!(
            hs_validator().validate(&"a".repeat(DEFAULT_MAX_TOKEN_BYTES + 1)),
            Err(AuthError::TooLarge)
        );
    }

    #[test]
    fn malformed_tokens_are_malformed() {
        let v = hs_validator();
        let good = hs256(&claims_with(json!({})));
        let not_json = format!("{}.e30.sig", b64url(b"not json"));
        // Signed properly: jsonwebtoken checks the signature before parsing the claims.
        let array_payload = hs256(&json!([1, 2]));
        for token in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "!!!.e30.sig",
            "eyJhbGciOiJIUzI1NiJ9=.e30.sig",
            &not_json,
            &array_payload,
            &format!("{good}.extra"),
            &format!("{good}!"),
        ] {
            assert_eq!(v.validate(token), Err(AuthError::Malformed), "{token}");
        }
    }

    #[test]
    fn critical_header_extensions_are_refused() {
        let header = json!({"alg": "HS256", "crit": ["b64"], "b64": false});
        let token = raw_token(&header, &claims_with(json!({})), "c2ln");
        assert_eq!(hs_validator().validate(&token), Err(AuthError::Malformed));
    }

    // --- JWKS ---

    #[test]
    fn jwks_selects_key_by_kid() {
        let rs = jwks_validator(JwtAlgorithm::Rs256, JWKS);
        let claims = rs.validate(&rs256(Some("rsa-1"), &claims_with(json!({}))));
        assert_eq!(claims.map(|c| c.user_id).as_deref(), Ok("u1"));
        let es = jwks_validator(JwtAlgorithm::Es256, JWKS);
        let claims = es.validate(&es256(Some("ec-1"), &claims_with(json!({}))));
        assert_eq!(claims.map(|c| c.user_id).as_deref(), Ok("u1"));
    }

    #[test]
    fn jwks_unknown_kid_is_unknown_key() {
        let v = jwks_validator(JwtAlgorithm::Rs256, JWKS);
        let token = rs256(Some("rsa-9"), &claims_with(json!({})));
        assert_eq!(v.validate(&token), Err(AuthError::UnknownKey));
    }

    #[test]
    fn jwks_without_kid_uses_the_only_usable_key() {
        // jwks.json holds one RS256 and one ES256 key: one usable key per algorithm.
        let v = jwks_validator(JwtAlgorithm::Rs256, JWKS);
        assert!(v.validate(&rs256(None, &claims_with(json!({})))).is_ok());
        let v = jwks_validator(JwtAlgorithm::Es256, JWKS);
        assert!(v.validate(&es256(None, &claims_with(json!({})))).is_ok());
    }

    #[test]
    fn jwks_without_kid_and_several_keys_is_unknown_key() {
        let v = jwks_validator(
            JwtAlgorithm::Rs256,
            &two_rsa_keys("RS256").to_string().into_bytes(),
        );
        let token = rs256(None, &claims_with(json!({})));
        assert_eq!(v.validate(&token), Err(AuthError::UnknownKey));
        assert!(
            v.validate(&rs256(Some("rsa-2"), &claims_with(json!({}))))
                .is_ok()
        );
    }

    /// jwks.json's RSA key, plus the same key again as `rsa-2` with the given `alg`.
    fn two_rsa_keys(second_alg: &str) -> Value {
        let mut jwks: Value = serde_json::from_slice(JWKS).expect("fixture JSON");
        let mut second = jwks["keys"][0].clone();
        second["kid"] = json!("rsa-2");
        second["alg"] = json!(second_alg);
        jwks["keys"]
            .as_array_mut()
            .expect("keys array")
            .push(second);
        jwks
    }

    #[test]
    fn jwk_with_mismatching_alg_is_refused() {
        let v = jwks_validator(
            JwtAlgorithm::Rs256,
            &two_rsa_keys("RS384").to_string().into_bytes(),
        );
        let token = rs256(Some("rsa-2"), &claims_with(json!({})));
        assert_eq!(v.validate(&token), Err(AuthError::AlgorithmNotAllowed));
        // A kid naming a key of another type (the EC key) is refused the same way.
        let token = rs256(Some("ec-1"), &claims_with(json!({})));
        assert_eq!(v.validate(&token), Err(AuthError::AlgorithmNotAllowed));
        // rsa-1 is still fine.
        assert!(
            v.validate(&rs256(Some("rsa-1"), &claims_with(json!({}))))
                .is_ok()
        );
    }

    #[test]
    fn jwks_without_usable_key_is_rejected_at_start() {
        let mut only_mismatched: Value = serde_json::from_slice(JWKS).expect("fixture JSON");
        only_mismatched["keys"][0]["alg"] = json!("PS256");
        only_mismatched["keys"][1]["use"] = json!("enc");
        let json = only_mismatched.to_string().into_bytes();
        for alg in [JwtAlgorithm::Rs256, JwtAlgorithm::Es256] {
            let err = Validator::new(&settings(alg, KeySource::Jwks(json.clone())));
            assert_eq!(err.err(), Some(KeyError::NoUsableKey(alg)));
        }
    }

    #[test]
    fn jwks_skips_unusable_and_unknown_keys() {
        let mut jwks: Value = serde_json::from_slice(JWKS).expect("fixture JSON");
        let keys = jwks["keys"].as_array_mut().expect("keys array");
        keys.push(json!({"kty": "OKP", "crv": "Ed448", "x": "AAAA", "kid": "ed"}));
        keys.push(json!({"kty": "EC", "crv": "P-384", "x": "AAAA", "y": "AAAA", "kid": "p384"}));
        keys.push(json!({"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "tiny"}));
        keys.push(json!({"kty": "weird", "kid": "w"}));
        let v = jwks_validator(JwtAlgorithm::Rs256, &jwks.to_string().into_bytes());
        assert!(
            v.validate(&rs256(Some("rsa-1"), &claims_with(json!({}))))
                .is_ok()
        );
        let token = rs256(Some("tiny"), &claims_with(json!({})));
        assert_eq!(v.validate(&token), Err(AuthError::AlgorithmNotAllowed));
    }

    // --- configuration errors ---

    #[test]
    fn bad_key_configuration_is_named() {
        use JwtAlgorithm::{Es256, Hs256, Rs256};
        let secret = |s: &[u8]| KeySource::Secret(s.to_vec());
        let pem = |s: &[u8]| KeySource::PublicKeyPem(s.to_vec());
        let jwks = |s: &[u8]| KeySource::Jwks(s.to_vec());
        let cases = [
            (Hs256, secret(b""), KeyError::EmptySecret),
            (
                Hs256,
                secret(b"short"),
                KeyError::SecretTooShort {
                    len: 5,
                    min: MIN_HS256_SECRET_BYTES,
                },
            ),
            (Hs256, pem(RSA_PUBLIC), KeyError::PemWithHmac),
            (Hs256, secret(RSA_PUBLIC), KeyError::PemWithHmac),
            (Hs256, jwks(JWKS), KeyError::JwksWithHmac),
            (Rs256, secret(SECRET), KeyError::SecretWithAsymmetric(Rs256)),
            (Es256, secret(SECRET), KeyError::SecretWithAsymmetric(Es256)),
            (Rs256, pem(b"not a pem"), KeyError::BadPem(Rs256)),
            (
                Es256,
                pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
                KeyError::BadPem(Es256),
            ),
            (Rs256, pem(RSA_PRIVATE), KeyError::PrivateKeyPem(Rs256)),
            (Es256, pem(EC_PRIVATE), KeyError::PrivateKeyPem(Es256)),
            (
                Rs256,
                pem(EC_PUBLIC),
                KeyError::KeyTypeMismatch {
                    algorithm: Rs256,
                    expected: "RSA",
                    found: "EC",
                },
            ),
            (
                Es256,
                pem(RSA_PUBLIC),
                KeyError::KeyTypeMismatch {
                    algorithm: Es256,
                    expected: "EC",
                    found: "RSA",
                },
            ),
        ];
        for (alg, key, expected) in cases {
            let described = format!("{alg} {key:?}");
            let err = Validator::new(&settings(alg, key)).err();
            assert_eq!(err, Some(expected), "{described}");
        }
        assert!(matches!(
            Validator::new(&settings(Rs256, jwks(b"{\"keys\": 5}"))),
            Err(KeyError::JwksParse(_))
        ));
        let mut dup: Value = serde_json::from_slice(JWKS).expect("fixture JSON");
        let first = dup["keys"][0].clone();
        dup["keys"].as_array_mut().expect("keys").push(first);
        assert_eq!(
            Validator::new(&settings(Rs256, jwks(dup.to_string().as_bytes()))).err(),
            Some(KeyError::DuplicateKid {
                algorithm: Rs256,
                kid: "rsa-1".into()
            })
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let leeway = JwtSettings {
            leeway_secs: MAX_LEEWAY_SECS + 1,
            ..hs_settings()
        };
        assert_eq!(
            Validator::new(&leeway).err(),
            Some(KeyError::LeewayTooLarge(MAX_LEEWAY_SECS + 1))
        );
        let audience = JwtSettings {
            audience: Some(String::new()),
            ..hs_settings()
        };
        assert_eq!(
            Validator::new(&audience).err(),
            Some(KeyError::EmptySetting("audience"))
        );
        let issuer = JwtSettings {
            issuer: Some(String::new()),
            ..hs_settings()
        };
        assert_eq!(
            Validator::new(&issuer).err(),
            Some(KeyError::EmptySetting("issuer"))
        );
    }

    #[test]
    fn rsa_key_size_is_measured_in_bits() {
        let mut n = vec![0u8; 257];
        n[1] = 0x80; // leading zero byte, then a 2048-bit modulus
        assert_eq!(check_rsa_size(&n), Ok(()));
        n[1] = 0x7f;
        assert_eq!(check_rsa_size(&n), Err(KeyError::RsaKeySize { bits: 2047 }));
    }

    // --- types ---

    #[test]
    fn algorithm_parses_case_insensitively() {
        assert_eq!("hs256".parse(), Ok(JwtAlgorithm::Hs256));
        assert_eq!("Rs256".parse(), Ok(JwtAlgorithm::Rs256));
        assert_eq!("ES256".parse(), Ok(JwtAlgorithm::Es256));
        for bad in ["HS512", "none", "", " HS256"] {
            assert_eq!(
                bad.parse::<JwtAlgorithm>(),
                Err(UnknownAlgorithm(bad.to_owned()))
            );
        }
        assert_eq!(JwtAlgorithm::Es256.to_string(), "ES256");
        let from_config: JwtAlgorithm = serde_json::from_value(json!("rs256")).expect("parses");
        assert_eq!(from_config, JwtAlgorithm::Rs256);
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let rendered = format!("{:?} {:?}", hs_validator(), hs_settings());
        assert!(!rendered.contains("unit-test-secret"), "{rendered}");
        let rendered = format!("{:?}", jwks_validator(JwtAlgorithm::Rs256, JWKS));
        assert!(
            rendered.contains("rsa-1") && !rendered.contains("AQAB"),
            "{rendered}"
        );
    }

    #[test]
    fn validator_is_cheap_to_share() {
        fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync_clone::<Validator>();
        let v = hs_validator();
        let clone = v.clone();
        assert!(Arc::ptr_eq(&v.inner, &clone.inner));
    }

    #[test]
    fn errors_have_metric_labels_and_safe_messages() {
        let token = hs256(&json!({"sub": "secret-user", "exp": now() - 600}));
        let err = hs_validator().validate(&token).expect_err("expired");
        assert!(!err.to_string().contains(&token) && !err.to_string().contains("secret-user"));
        let all = [
            (AuthError::Expired, "expired"),
            (AuthError::NotYetValid, "not_yet_valid"),
            (AuthError::InvalidSignature, "bad_signature"),
            (AuthError::AlgorithmNotAllowed, "algorithm"),
            (AuthError::InvalidAudience, "audience"),
            (AuthError::InvalidIssuer, "issuer"),
            (AuthError::MissingClaim("exp"), "missing_claim"),
            (AuthError::InvalidClaim("sub"), "invalid_claim"),
            (AuthError::TooLarge, "too_large"),
            (AuthError::LifetimeTooLong, "lifetime"),
            (AuthError::UnknownKey, "unknown_key"),
            (AuthError::Malformed, "malformed"),
        ];
        for (err, reason) in all {
            assert_eq!(err.reason(), reason);
            assert_eq!(err.is_expired(), err == AuthError::Expired);
        }
    }

    #[test]
    fn base64url_decoding_is_strict() {
        for (encoded, decoded) in [
            ("", &b""[..]),
            ("Zg", b"f"),
            ("Zm8", b"fo"),
            ("Zm9v", b"foo"),
            ("-_8", &[0xfb, 0xff]),
        ] {
            assert_eq!(
                b64url_decode(encoded).as_deref(),
                Some(decoded),
                "{encoded}"
            );
            assert_eq!(b64url(decoded), encoded);
        }
        for bad in ["Z", "Zg==", "Zh", "Zm9", "Zm+v", "Zm/v", "Zm9v\n"] {
            assert_eq!(b64url_decode(bad), None, "{bad:?}");
        }
    }
}
