//! Credentials for the simulated clients: HS256 tokens minted from the gateway's shared
//! secret (claims `sub`, `exp`, `iat`, `jti`; signed by `testkit::tokens`, the one
//! minter of the repository), or tokens read from a file, one a line.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde_json::json;

/// Prefix of minted user ids (`lt-0`, `lt-1`, ...): recognisable in gateway logs.
pub const USER_PREFIX: &str = "lt-";
/// Default lifetime of minted tokens: longer than any run should hold its connections,
/// so that no connection is closed with 4001 mid-run.
pub const DEFAULT_TTL_SECS: u64 = 3600;
/// Largest token file read: about a million tokens, far more than one machine can
/// connect, and a bound on what a wrong path (a disk image, say) makes us allocate.
const MAX_TOKEN_FILE_BYTES: u64 = 512 * 1024 * 1024;

/// Where each connection's token comes from.
#[derive(Clone)]
pub enum TokenSource {
    Mint(Arc<Minter>),
    File(Arc<Vec<String>>),
}

impl TokenSource {
    /// The token for connection `index` (0-based, global over all workers).
    pub fn token_for(&self, index: u64) -> Result<String> {
        match self {
            TokenSource::Mint(m) => m.mint(index),
            TokenSource::File(lines) => {
                let len = lines.len() as u64;
                // A file is never empty (checked when read); cycle through it.
                let i = usize::try_from(index % len.max(1)).unwrap_or(0);
                lines.get(i).cloned().context("token file is empty")
            }
        }
    }

    /// Reads one token per line; blank lines are skipped.
    pub fn from_file(path: &Path) -> Result<TokenSource> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("--token-file {}", path.display()))?;
        if meta.len() > MAX_TOKEN_FILE_BYTES {
            bail!(
                "--token-file {}: {} bytes is over the {MAX_TOKEN_FILE_BYTES}-byte limit",
                path.display(),
                meta.len()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--token-file {}", path.display()))?;
        Ok(TokenSource::File(Arc::new(
            parse_token_lines(&text).with_context(|| format!("--token-file {}", path.display()))?,
        )))
    }
}

fn parse_token_lines(text: &str) -> Result<Vec<String>> {
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() {
        bail!("no tokens (expected one per line)");
    }
    if let Some(bad) = tokens.iter().position(|t| t.contains(char::is_whitespace)) {
        bail!("line {} holds whitespace inside the token", bad + 1);
    }
    Ok(tokens)
}

/// Mints HS256 tokens for users `lt-0 .. lt-(users-1)`.
pub struct Minter {
    secret: String,
    users: u64,
    ttl_secs: u64,
    /// Distinguishes this run's `jti`s from other runs'.
    run_id: u64,
}

impl Minter {
    /// `users` distinct user ids; connection `i` is user `i % users`.
    pub fn new(secret: &str, users: u64, ttl_secs: u64, run_id: u64) -> Result<Minter> {
        if secret.len() < shared::auth::MIN_HS256_SECRET_BYTES {
            bail!(
                "the HS256 secret has {} bytes; the gateway requires at least {}",
                secret.len(),
                shared::auth::MIN_HS256_SECRET_BYTES
            );
        }
        if users == 0 {
            bail!("--users must be at least 1");
        }
        if ttl_secs == 0 {
            bail!("--ttl must be at least 1 second");
        }
        Ok(Minter {
            secret: secret.to_owned(),
            users,
            ttl_secs,
            run_id,
        })
    }

    /// The user id of connection `index`.
    pub fn user_for(&self, index: u64) -> String {
        format!("{USER_PREFIX}{}", index % self.users)
    }

    pub fn mint(&self, index: u64) -> Result<String> {
        let now = testkit::tokens::now();
        let claims = json!({
            "sub": self.user_for(index),
            "exp": now.saturating_add(self.ttl_secs),
            "iat": now,
            "jti": format!("{}-{index}", self.run_id),
        });
        Ok(testkit::tokens::hs256(&self.secret, &claims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
    use serde_json::Value;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn minted_tokens_carry_the_claims() {
        let m = Minter::new(SECRET, 3, 600, 42).unwrap();
        let token = TokenSource::Mint(Arc::new(m)).token_for(4).unwrap();
        let data = decode::<Value>(
            &token,
            &DecodingKey::from_secret(SECRET.as_bytes()),
            &Validation::new(Algorithm::HS256),
        )
        .unwrap();
        let c = data.claims;
        assert_eq!(c["sub"], "lt-1");
        assert_eq!(c["jti"], "42-4");
        let (exp, iat) = (c["exp"].as_u64().unwrap(), c["iat"].as_u64().unwrap());
        assert_eq!(exp - iat, 600);
        assert_eq!(data.header.alg, Algorithm::HS256);
    }

    #[test]
    fn bad_minter_settings_are_refused() {
        assert!(Minter::new("short", 1, 60, 0).is_err());
        assert!(Minter::new(SECRET, 0, 60, 0).is_err());
        assert!(Minter::new(SECRET, 1, 0, 0).is_err());
    }

    #[test]
    fn token_file_lines_cycle() {
        let tokens = parse_token_lines("a.b.c\n\n  d.e.f  \n").unwrap();
        let src = TokenSource::File(Arc::new(tokens));
        assert_eq!(src.token_for(0).unwrap(), "a.b.c");
        assert_eq!(src.token_for(1).unwrap(), "d.e.f");
        assert_eq!(src.token_for(2).unwrap(), "a.b.c");
        assert!(parse_token_lines("\n \n").is_err());
        assert!(parse_token_lines("a b\n").is_err());
    }

    #[test]
    fn missing_token_file_is_an_error() {
        assert!(TokenSource::from_file(Path::new("/nonexistent/tokens.txt")).is_err());
    }
}
