//! `mint-token`: an HS256 token for local use (the cluster's secret, one user), signed
//! by the same code as the tests' and the load generator's tokens (`testkit::tokens`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;

/// Default lifetime: an hour, long enough for a local session and well under the
/// gateway's default cap on token lifetime (a day).
const DEFAULT_TTL_SECS: i64 = 3600;

#[derive(Parser, Debug)]
#[command(
    name = "mint-token",
    about = "Prints an HS256 JWT (claims sub, exp, iat, jti) for one user",
    allow_negative_numbers = true
)]
struct Args {
    /// The `sub` claim.
    user: String,
    /// Lifetime in seconds; negative for an already expired token.
    #[arg(long, default_value_t = DEFAULT_TTL_SECS)]
    ttl: i64,
    /// The gateway's HS256 secret.
    #[arg(
        long,
        env = "SB_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "secret_file"
    )]
    secret: Option<String>,
    /// A file holding the secret (e.g. `.run/cluster/secret`); surrounding whitespace
    /// is ignored.
    #[arg(long)]
    secret_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let secret = match (a.secret, &a.secret_file) {
        (Some(s), _) => s,
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("--secret-file {}", path.display()))?
            .trim()
            .to_owned(),
        (None, None) => bail!("give --secret, SB_JWT_SECRET or --secret-file"),
    };
    if secret.len() < shared::auth::MIN_HS256_SECRET_BYTES {
        bail!(
            "the secret has {} bytes; the gateway requires at least {}",
            secret.len(),
            shared::auth::MIN_HS256_SECRET_BYTES
        );
    }
    let claims = testkit::tokens::claims(&a.user, a.ttl);
    println!("{}", testkit::tokens::hs256(&secret, &claims));
    Ok(())
}
