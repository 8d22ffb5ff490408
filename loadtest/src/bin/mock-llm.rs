//! `mock-llm`: a STUB OpenAI-compatible streaming server (and Ollama `/api/chat`) for
//! local runs, tests and benchmarks. It is not a model: it streams a canned reply
//! with a configurable first-token delay and token rate, and injects errors on
//! request (429 with Retry-After, 500, a cut stream, a hang). `GET /stub/config`
//! describes its settings, so that `loadtest --llm-stub` can subtract the stub's own
//! time from what a chat client sees.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use testkit::llm::{End, LlmStub, Reply, Script};

/// Words the canned reply is made of.
const WORDS: &[&str] = &[
    "This",
    " is",
    " a",
    " stubbed",
    " reply",
    " from",
    " mock-llm,",
    " not",
    " a",
    " model.",
    " It",
    " streams",
    " one",
    " token",
    " at",
    " a",
    " time",
    " so",
    " the",
    " chat",
    " pipeline",
    " can",
    " be",
    " exercised",
    " end",
    " to",
    " end.",
];

#[derive(Parser, Debug)]
#[command(
    name = "mock-llm",
    about = "STUB OpenAI-compatible streaming LLM (not a model)"
)]
struct Args {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:18090")]
    listen: String,
    /// Delay before the first token, ms.
    #[arg(long, default_value_t = 300)]
    first_token_ms: u64,
    /// Tokens per second after the first.
    #[arg(long, default_value_t = 50.0)]
    tokens_per_sec: f64,
    /// Tokens per reply.
    #[arg(long, default_value_t = 60)]
    reply_tokens: usize,
    /// Share of requests answered 429 with Retry-After.
    #[arg(long, default_value_t = 0.0)]
    p_429: f64,
    /// Retry-After of those 429s, seconds.
    #[arg(long, default_value = "1")]
    retry_after: String,
    /// Share of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    p_500: f64,
    /// Share of streams cut half-way without a finish.
    #[arg(long, default_value_t = 0.0)]
    p_truncate: f64,
    /// Share of streams that stop sending half-way and hang.
    #[arg(long, default_value_t = 0.0)]
    p_hang: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    for (name, p) in [
        ("--p-429", a.p_429),
        ("--p-500", a.p_500),
        ("--p-truncate", a.p_truncate),
        ("--p-hang", a.p_hang),
    ] {
        anyhow::ensure!((0.0..=1.0).contains(&p), "{name} must be between 0 and 1");
    }
    anyhow::ensure!(a.tokens_per_sec > 0.0, "--tokens-per-sec must be positive");
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("--listen {}", a.listen))?;
    let tokens: Vec<String> = (0..a.reply_tokens)
        .map(|i| WORDS[i % WORDS.len()].to_owned())
        .collect();
    let reply = Reply::new(tokens)
        .first_token_delay(Duration::from_millis(a.first_token_ms))
        .token_delay(Duration::from_secs_f64(1.0 / a.tokens_per_sec))
        .usage(true);
    let half = a.reply_tokens / 2;
    let stub = LlmStub::start_on(listener);
    // The first token comes `first_token_ms` after the request, the last one
    // `reply_tokens - 1` token delays later.
    let stream_ms = (a.reply_tokens.saturating_sub(1) as f64 * 1000.0 / a.tokens_per_sec).round();
    stub.set_info(serde_json::json!({
        "stub": "mock-llm",
        "first_token_ms": a.first_token_ms,
        "stream_ms": stream_ms as u64,
        "tokens_per_sec": a.tokens_per_sec,
        "reply_tokens": a.reply_tokens,
        "p_429": a.p_429,
        "retry_after": a.retry_after,
        "p_500": a.p_500,
        "p_truncate": a.p_truncate,
        "p_hang": a.p_hang,
    }));
    stub.set_default(Script::Reply(reply.clone()));
    stub.set_mix(vec![
        (a.p_429, Script::rate_limited(&a.retry_after)),
        (a.p_500, Script::status(500)),
        (
            a.p_truncate,
            Script::Reply(reply.clone().stop_after(half, End::Cut)),
        ),
        (a.p_hang, Script::Reply(reply.stop_after(half, End::Hang))),
    ]);
    println!(
        "mock-llm (a STUB, not a model) listening: OpenAI base {} , Ollama base {}",
        stub.base_url(),
        stub.root_url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
