//! Property tests for the protocol's hostile-input surfaces (docs/fuzzing.md): channel names
//! against the documented grammar, and client frame parsing (valid frames come back
//! exactly, bad ones are refused with a reason and their `id`). Bounded to a few
//! seconds; the cargo-fuzz targets in `fuzz/` run the same surfaces for longer.

use proptest::prelude::*;
use proptest::sample::select;
use protocol::{CLIENT_FRAME_TYPES, Channel, ClientFrame, ClientMessage, FileAttachment, FrameId};
use serde_json::{Value, json};

#[path = "common/json.rs"]
mod json;
use json::json_value;

// === channel names ===

/// PROTOCOL.md section 3, written out on its own: `[a-z0-9_-]{1,64}` `:`
/// `[A-Za-z0-9_-]{1,128}`, the whole string.
fn matches_grammar(s: &str) -> bool {
    let mut parts = s.splitn(2, ':');
    let (Some(ns), Some(name)) = (parts.next(), parts.next()) else {
        return false;
    };
    let ns_ok = (1..=64).contains(&ns.chars().count())
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    let name_ok = (1..=128).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    ns_ok && name_ok
}

/// Channel-like strings: valid ones, ones at the length limits, valid ones with
/// one character inserted or replaced, and anything at all.
fn channel_like() -> impl Strategy<Value = String> {
    let valid = "[a-z0-9_-]{1,64}:[A-Za-z0-9_-]{1,128}";
    let odd = select(vec![
        ':', '.', '*', '>', ' ', '\t', '\n', 'A', 'Z', 'é', '\u{0}', '/', '\u{212A}', 'ı',
    ]);
    prop_oneof![
        valid,
        (1usize..=66, 1usize..=130).prop_map(|(n, m)| format!(
            "{}:{}",
            "a".repeat(n),
            "B".repeat(m)
        )),
        (
            valid,
            any::<prop::sample::Index>(),
            odd.clone(),
            any::<bool>()
        )
            .prop_map(|(s, at, c, replace)| {
                let mut chars: Vec<char> = s.chars().collect();
                let i = at.index(chars.len());
                if replace {
                    chars[i] = c;
                } else {
                    chars.insert(i, c);
                }
                chars.into_iter().collect()
            }),
        ".{0,200}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Accepted exactly when the grammar matches; an accepted name prints back as
    /// given (its NATS subject is checked in `shared/tests/prop_parsers.rs`).
    #[test]
    fn channel_accepted_iff_grammar(s in channel_like()) {
        let parsed = Channel::parse(&s);
        prop_assert_eq!(parsed.is_ok(), matches_grammar(&s), "{:?}: {:?}", s, parsed);
        if let Ok(ch) = parsed {
            prop_assert_eq!(ch.to_string(), s);
        } else if let Err(why) = parsed {
            prop_assert!(!why.is_empty());
        }
    }
}

// === client frames ===

fn frame_id() -> impl Strategy<Value = Option<FrameId>> {
    prop_oneof![
        Just(None),
        any::<i64>().prop_map(|i| Some(FrameId::Int(i))),
        ".{0,64}".prop_map(|s| Some(FrameId::Str(s))),
    ]
}

/// A valid frame of every type, as the JSON a client sends and the value it must
/// parse to.
fn valid_frame() -> impl Strategy<Value = (Value, ClientFrame)> {
    let s = || ".{0,30}";
    let ch = "[a-z]{1,8}:[A-Za-z0-9]{1,12}";
    prop_oneof![
        s().prop_map(|token| (
            json!({"type": "auth", "token": token}),
            ClientFrame::Auth { token }
        )),
        s().prop_map(|token| (
            json!({"type": "refresh", "token": token}),
            ClientFrame::Refresh { token }
        )),
        Just((json!({"type": "ping"}), ClientFrame::Ping {})),
        (
            ch,
            proptest::option::of(any::<u64>()),
            proptest::option::of(s())
        )
            .prop_map(|(channel, since, epoch)| {
                let mut v = json!({"type": "subscribe", "channel": channel});
                if let Some(n) = since {
                    v["since"] = json!(n);
                }
                if let Some(e) = &epoch {
                    v["epoch"] = json!(e);
                }
                (
                    v,
                    ClientFrame::Subscribe {
                        channel,
                        since,
                        epoch,
                    },
                )
            }),
        ch.prop_map(|channel| (
            json!({"type": "unsubscribe", "channel": channel}),
            ClientFrame::Unsubscribe { channel }
        )),
        (ch, json_value()).prop_map(|(channel, data)| (
            json!({"type": "publish", "channel": channel, "data": data}),
            ClientFrame::Publish { channel, data }
        )),
        (
            s(),
            proptest::option::of(s()),
            proptest::collection::vec((s(), s(), s()), 0..3)
        )
            .prop_map(|(message, session_id, files)| {
                let files: Vec<FileAttachment> = files
                    .into_iter()
                    .map(|(name, content_type, data)| FileAttachment {
                        name,
                        content_type,
                        data,
                    })
                    .collect();
                let mut v = json!({"type": "chat.send", "message": message, "files": files.iter()
                    .map(|f| json!({"name": f.name, "type": f.content_type, "data": f.data}))
                    .collect::<Vec<_>>()});
                if let Some(sid) = &session_id {
                    v["session_id"] = json!(sid);
                }
                (
                    v,
                    ClientFrame::ChatSend {
                        message,
                        session_id,
                        files,
                    },
                )
            }),
        s().prop_map(|request_id| (
            json!({"type": "chat.cancel", "request_id": request_id}),
            ClientFrame::ChatCancel { request_id }
        )),
        (s(), proptest::option::of(any::<u32>())).prop_map(|(session_id, limit)| {
            let mut v = json!({"type": "history", "session_id": session_id});
            if let Some(l) = limit {
                v["limit"] = json!(l);
            }
            (v, ClientFrame::History { session_id, limit })
        }),
        ch.prop_map(|channel| (
            json!({"type": "presence", "channel": channel}),
            ClientFrame::Presence { channel }
        )),
        ch.prop_map(|channel| (
            json!({"type": "typing", "channel": channel}),
            ClientFrame::Typing { channel }
        )),
        (ch, any::<u64>()).prop_map(|(channel, offset)| (
            json!({"type": "read", "channel": channel, "offset": offset}),
            ClientFrame::Read { channel, offset }
        )),
    ]
}

fn with_id(mut v: Value, id: &Option<FrameId>) -> Value {
    if let Some(id) = id {
        v["id"] = serde_json::to_value(id).unwrap();
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every valid frame, with an id and unknown extra fields, parses to exactly
    /// what was sent (PROTOCOL.md section 2: unknown fields are ignored).
    #[test]
    fn valid_frames_parse_exactly(
        (v, frame) in valid_frame(),
        id in frame_id(),
        extra in proptest::collection::btree_map("x_[a-z]{1,6}", json_value(), 0..3),
    ) {
        let mut v = with_id(v, &id);
        for (k, x) in extra {
            v[k] = x;
        }
        let msg = ClientMessage::parse(v.to_string().as_bytes()).map_err(|e| e.message);
        prop_assert_eq!(msg, Ok(ClientMessage { id, frame }));
    }

    /// A known type with a required field removed or of the wrong type is refused
    /// with a reason naming the type, and the id comes back so the client can match
    /// the `BAD_REQUEST` to its frame.
    #[test]
    fn broken_frames_are_refused_with_their_id(
        (v, frame) in valid_frame(),
        id in frame_id(),
        victim in any::<prop::sample::Index>(),
        replacement in prop_oneof![Just(None), Just(Some(json!([1, 2]))), Just(Some(json!({"x": 1})))],
    ) {
        let mut v = with_id(v, &id);
        let required: Vec<String> = v
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| !matches!(k.as_str(), "type" | "id" | "since" | "epoch" | "session_id" | "files" | "limit" | "data"))
            .cloned()
            .collect();
        prop_assume!(!required.is_empty());
        let key = &required[victim.index(required.len())];
        match replacement {
            None => {
                v.as_object_mut().unwrap().remove(key);
            }
            Some(r) => v[key] = r,
        }
        let e = ClientMessage::parse(v.to_string().as_bytes()).unwrap_err();
        prop_assert_eq!(e.id, id);
        let needle = format!("invalid `{}` frame", frame.kind());
        prop_assert!(e.message.starts_with(&needle), "{}", e.message);
    }

    /// Deeply nested JSON (a stack-exhaustion attempt) is answered, never a crash.
    #[test]
    fn deep_nesting_is_refused_not_a_crash(
        depth in 1usize..5000,
        open in select(vec!["[", "{\"a\":"]),
        where_ in 0usize..3,
    ) {
        let close = if open == "[" { "]" } else { "}" };
        let nested = format!("{}1{}", open.repeat(depth), close.repeat(depth));
        let text = match where_ {
            0 => format!(r#"{{"type":"publish","channel":"a:b","data":{nested}}}"#),
            1 => format!(r#"{{"type":"ping","id":{nested}}}"#),
            _ => format!(r#"{{"type":"ping","x":{nested}}}"#),
        };
        match ClientMessage::parse(text.as_bytes()) {
            Ok(m) => prop_assert!(CLIENT_FRAME_TYPES.contains(&m.frame.kind())),
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
    }

    /// Arbitrary text: no panic; a refusal always says why.
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        match ClientMessage::parse(text.as_bytes()) {
            Ok(m) => prop_assert!(CLIENT_FRAME_TYPES.contains(&m.frame.kind())),
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
    }
}
