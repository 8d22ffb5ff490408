//! Property tests: frame and channel-name parsing never panic on arbitrary input, and
//! what they accept is well-formed.

use proptest::prelude::*;
use protocol::{CLIENT_FRAME_TYPES, Channel, ClientMessage};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn channel_parse_never_panics(s in ".{0,300}") {
        if let Ok(ch) = Channel::parse(&s) {
            prop_assert_eq!(ch.to_string(), s.clone());
            prop_assert!(ch.name.len() <= 128 && !ch.name.is_empty());
            prop_assert!(ch.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        }
    }

    #[test]
    fn channel_parse_accepts_every_valid_name(ns in "[a-z0-9_-]{1,64}", name in "[A-Za-z0-9_-]{1,128}") {
        let ch = Channel::parse(&format!("{ns}:{name}")).unwrap();
        prop_assert_eq!((ch.namespace, ch.name), (ns, name));
    }

    #[test]
    fn frame_parse_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = ClientMessage::parse(&bytes);
    }

    #[test]
    fn frame_parse_never_panics_on_near_valid_json(
        kind in prop_oneof![
            proptest::sample::select(CLIENT_FRAME_TYPES.to_vec()).prop_map(str::to_owned),
            ".{0,20}",
        ],
        id in prop_oneof![
            Just(serde_json::Value::Null),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,80}".prop_map(serde_json::Value::from),
            Just(serde_json::json!([1])),
        ],
        fields in proptest::collection::btree_map("[a-z_]{1,12}", prop_oneof![
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
            Just(serde_json::json!(null)),
            Just(serde_json::json!({"a": [1, {"b": "c"}]})),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
        ], 0..6),
    ) {
        let mut obj = serde_json::Map::new();
        obj.insert("type".into(), kind.into());
        obj.insert("id".into(), id);
        for (k, v) in fields {
            obj.insert(k, v);
        }
        let text = serde_json::Value::Object(obj).to_string();
        match ClientMessage::parse(text.as_bytes()) {
            Ok(m) => prop_assert!(CLIENT_FRAME_TYPES.contains(&m.frame.kind())),
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
    }
}
