//! The conversation sent to the LLM: the system prompt, as much recent history as the
//! token budget allows (oldest dropped first), and the new user message. Tokens are
//! estimated as characters / 4, which is close for English with BPE tokenizers and
//! needs no tokenizer per model.

use shared::protocol::HistoryMessage;

use crate::llm::Message;

/// Estimated tokens of a text: one per four characters, rounded up.
pub fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4)
}

/// Builds the prompt. System prompt and user message are always sent; history
/// messages are kept newest first while `budget` (for everything together) allows,
/// so the oldest are the ones dropped. Messages of `request_id` itself and roles
/// other than `user`/`assistant` are skipped.
pub fn build_prompt(
    system: Option<&str>,
    history: &[HistoryMessage],
    request_id: &str,
    user: &str,
    budget: usize,
) -> Vec<Message> {
    let fixed = system.map(estimate_tokens).unwrap_or(0) + estimate_tokens(user);
    let mut left = budget.saturating_sub(fixed);
    let mut kept = Vec::new();
    for m in history.iter().rev() {
        if m.request_id.as_deref() == Some(request_id) {
            continue;
        }
        let msg = match m.role.as_str() {
            "user" => Message::user(m.content.clone()),
            "assistant" => Message::assistant(m.content.clone()),
            _ => continue,
        };
        let cost = estimate_tokens(&m.content);
        if cost > left {
            break;
        }
        left -= cost;
        kept.push(msg);
    }
    let mut out = Vec::with_capacity(kept.len() + 2);
    if let Some(s) = system {
        out.push(Message::system(s));
    }
    out.extend(kept.into_iter().rev());
    out.push(Message::user(user));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Role;

    fn msg(role: &str, content: &str, rid: &str) -> HistoryMessage {
        HistoryMessage {
            role: role.into(),
            content: content.into(),
            ts: 0,
            request_id: Some(rid.into()),
        }
    }

    #[test]
    fn estimates_round_up() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abc"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(estimate_tokens("ééééé"), 2);
    }

    #[test]
    fn oldest_history_is_dropped_first() {
        let h: Vec<_> = (0..6)
            .map(|i| {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                msg(
                    role,
                    &format!("{i}{}", "x".repeat(39)),
                    &format!("r{}", i / 2),
                )
            })
            .collect();
        // Each history message is 10 tokens; system 1, user 1: 22 leaves room for two.
        let p = build_prompt(Some("sys"), &h, "new", "hi", 22);
        assert_eq!(p.len(), 4);
        assert_eq!(p[0].role, Role::System);
        assert!(p[1].content.starts_with('4'));
        assert!(p[2].content.starts_with('5'));
        assert_eq!(p[3], Message::user("hi"));
        // No room at all: history dropped, user message still sent.
        let p = build_prompt(None, &h, "new", &"y".repeat(100), 10);
        assert_eq!(p, vec![Message::user("y".repeat(100))]);
        // Everything fits.
        assert_eq!(build_prompt(None, &h, "new", "hi", 1000).len(), 7);
    }

    #[test]
    fn the_request_itself_and_unknown_roles_are_skipped() {
        let h = vec![
            msg("user", "old", "r0"),
            msg("tool", "x", "r0"),
            msg("user", "again", "now"),
        ];
        let p = build_prompt(None, &h, "now", "again", 1000);
        assert_eq!(p, vec![Message::user("old"), Message::user("again")]);
    }
}
