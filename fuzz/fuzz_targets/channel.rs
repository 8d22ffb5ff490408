//! Arbitrary strings into the channel-name parser, checked against the grammar of
//! PROTOCOL.md section 3 written out independently: accepted exactly when it
//! matches, and what it accepts makes a NATS subject of exactly four tokens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::protocol::Channel;
use shared::subjects::Subjects;

fuzz_target!(|s: &str| {
    let parsed = Channel::parse(s);
    assert_eq!(parsed.is_ok(), matches_grammar(s), "{s:?}: {parsed:?}");
    if let Ok(ch) = parsed {
        assert_eq!(ch.to_string(), s);
        let subject = Subjects::new("sb").channel(&ch.namespace, &ch.name);
        let tokens: Vec<&str> = subject.split('.').collect();
        assert_eq!(tokens.len(), 4, "{subject}");
        assert!(
            tokens
                .iter()
                .all(|t| !t.is_empty() && *t != "*" && *t != ">")
        );
    }
});

/// `[a-z0-9_-]{1,64}:[A-Za-z0-9_-]{1,128}`, the whole string.
fn matches_grammar(s: &str) -> bool {
    let Some(colon) = s.find(':') else {
        return false;
    };
    let (ns, name) = (&s[..colon], &s[colon + 1..]);
    (1..=64).contains(&ns.len())
        && ns
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
        && (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-'))
}
