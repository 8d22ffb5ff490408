//! The NATS header names of a channel publication or event as gateways publish it
//! to each other (`channels.rs` writes them, the multiplexer reads them): one place
//! for both sides, so neither depends on the other for a name.

/// NATS header carrying a publication's channel offset.
pub const HEADER_OFFSET: &str = "Sb-Offset";
/// NATS header carrying the epoch a publication's offset counts in.
pub const HEADER_EPOCH: &str = "Sb-Epoch";
/// NATS header carrying the publish time (unix ms), for the fan-out latency metric.
pub const HEADER_TS: &str = "Sb-Ts";
/// NATS header naming the user an ephemeral event comes from (typing, read...).
pub const HEADER_FROM: &str = "Sb-From";
/// NATS header marking an event the sender's own connections should not get.
pub const HEADER_SKIP_SENDER: &str = "Sb-Skip-Sender";
/// NATS header naming the channel of a publication or event carried on a user
/// subject: a user's own `user:<id>` channel rides on `sb.user.<id>`, so a node needs
/// one subscription per user, not two.
pub const HEADER_CHANNEL: &str = "Sb-Channel";
