//! What `broadcast` publishes and how subscribers read it back: each publication's
//! `data` is `{"ts":<unix micros at publish>,"x":"<padding>"}`, so that every
//! subscriber computes delivery latency as receive time minus publish time (one
//! machine, one clock). Subscribers read `message` frames on a fast path that knows
//! the gateway's layout (`{"type":"message","channel":..,"offset":..,"data":..}`,
//! keys in that order, no spaces) and fall back to a full JSON parse for anything else,
//! so another gateway's formatting costs speed, never correctness.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// Microseconds since the unix epoch, now.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The `data` of one publication, about `payload_bytes` long (never shorter than the
/// timestamp needs). Keys are in sorted order, so a gateway that re-serialises the
/// object with sorted keys keeps `ts` first and the fast path working.
pub fn data(ts_us: u64, payload_bytes: usize) -> String {
    let head = format!(r#"{{"ts":{ts_us},"x":""#);
    let pad = payload_bytes.saturating_sub(head.len() + 2);
    let mut s = String::with_capacity(head.len() + pad + 2);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// The body of `POST /v1/publish`.
pub fn api_body(channel: &str, data: &str) -> String {
    format!(r#"{{"channel":{},"data":{data}}}"#, json_str(channel))
}

/// A client `publish` frame with a numeric `id` (echoed by the `ack` or `error`).
pub fn publish_frame(id: u64, channel: &str, data: &str) -> String {
    format!(
        r#"{{"type":"publish","id":{id},"channel":{},"data":{data}}}"#,
        json_str(channel)
    )
}

/// A client `subscribe` frame.
pub fn subscribe_frame(channel: &str) -> String {
    format!(
        r#"{{"type":"subscribe","id":"sub","channel":{}}}"#,
        json_str(channel)
    )
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// Size of `data` for a requested payload size (for the report): the request, or
/// the 30 bytes a bare timestamp takes when less was asked for.
pub fn data_len(payload_bytes: usize) -> usize {
    data(1_700_000_000_000_000, payload_bytes).len()
}

/// One `message` frame as a subscriber sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery<'a> {
    pub channel: Cow<'a, str>,
    pub offset: u64,
    /// The publish timestamp, when `data` carries one.
    pub ts_us: Option<u64>,
}

/// Any other server frame: its type and, for `error`, its code; for `subscribed`, the
/// channel's offset; for `ack`, the offset and id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Other {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    #[serde(default)]
    pub message: Option<String>,
}

/// A server frame, sorted for the subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Message(Delivery<'a>),
    Other(Other),
    /// Not JSON, or not an object with a string `type`.
    Invalid,
}

const MESSAGE_PREFIX: &str = r#"{"type":"message","channel":""#;
const OFFSET_KEY: &str = r#"","offset":"#;
const DATA_KEY: &str = r#","data":"#;
const TS_KEY: &str = r#"{"ts":"#;

/// Leading decimal digits of `s` as a number, and the rest.
fn number(s: &str) -> Option<(u64, &str)> {
    let end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    if end == 0 || end > 19 {
        return None;
    }
    Some((s[..end].parse().ok()?, &s[end..]))
}

/// The fast path: the gateway's exact layout, or `None`.
fn fast(text: &str) -> Option<Delivery<'_>> {
    let rest = text.strip_prefix(MESSAGE_PREFIX)?;
    let quote = rest.find('"')?;
    let channel = &rest[..quote];
    if channel.contains('\\') {
        return None;
    }
    let (offset, rest) = number(rest[quote..].strip_prefix(OFFSET_KEY)?)?;
    let data = rest.strip_prefix(DATA_KEY)?;
    let ts_us = match data.strip_prefix(TS_KEY) {
        Some(ts) => {
            let (ts, after) = number(ts)?;
            // `ts` must be the whole value (`,` or `}` follows), not a prefix of a float.
            if !after.starts_with([',', '}']) {
                return None;
            }
            Some(ts)
        }
        // Someone else's data on our channel: a delivery without a timestamp.
        None => None,
    };
    Some(Delivery {
        channel: Cow::Borrowed(channel),
        offset,
        ts_us,
    })
}

#[derive(Deserialize)]
struct Data {
    #[serde(default)]
    ts: Option<u64>,
}

#[derive(Deserialize)]
struct Slow<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    data: Option<serde_json::Value>,
}

/// Sorts one text frame.
pub fn parse(text: &str) -> Frame<'_> {
    if let Some(d) = fast(text) {
        return Frame::Message(d);
    }
    match serde_json::from_str::<Slow<'_>>(text) {
        Ok(Slow {
            kind,
            channel: Some(channel),
            offset: Some(offset),
            data,
        }) if kind == "message" => {
            let ts_us = data
                .and_then(|d| serde_json::from_value::<Data>(d).ok())
                .and_then(|d| d.ts);
            Frame::Message(Delivery {
                channel,
                offset,
                ts_us,
            })
        }
        Ok(_) => match serde_json::from_str::<Other>(text) {
            Ok(other) => Frame::Other(other),
            Err(_) => Frame::Invalid,
        },
        Err(_) => Frame::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_has_the_requested_size_and_parses() {
        for size in [0, 10, 32, 100, 1000] {
            let d = data(1_700_000_000_123_456, size);
            let v: serde_json::Value = serde_json::from_str(&d).unwrap();
            assert_eq!(v["ts"], 1_700_000_000_123_456u64);
            if size >= 40 {
                assert_eq!(d.len(), size, "{d}");
            }
            assert!(d.len() >= 30);
        }
        assert_eq!(data_len(100), 100);
        let body: serde_json::Value =
            serde_json::from_str(&api_body("bench:0", &data(5, 50))).unwrap();
        assert_eq!(body["channel"], "bench:0");
        assert_eq!(body["data"]["ts"], 5);
        let frame: serde_json::Value =
            serde_json::from_str(&publish_frame(9, "bench:1", &data(5, 50))).unwrap();
        assert_eq!(
            (frame["type"].as_str(), frame["id"].as_u64()),
            (Some("publish"), Some(9))
        );
        let sub: serde_json::Value = serde_json::from_str(&subscribe_frame("bench:2")).unwrap();
        assert_eq!(sub["channel"], "bench:2");
    }

    /// The frame exactly as the gateway builds it (`channels::publish`).
    fn gateway_frame(channel: &str, offset: u64, data: &str) -> String {
        format!(
            r#"{{"type":"message","channel":"{channel}","offset":{offset},"data":{data},"from":"server"}}"#
        )
    }

    #[test]
    fn gateway_frames_take_the_fast_path() {
        let text = gateway_frame("bench:0", 42, &data(1_700_000_000_000_001, 100));
        let d = fast(&text).unwrap();
        assert_eq!(d.channel, "bench:0");
        assert!(matches!(d.channel, Cow::Borrowed(_)));
        assert_eq!((d.offset, d.ts_us), (42, Some(1_700_000_000_000_001)));
        assert_eq!(parse(&text), Frame::Message(d));
    }

    #[test]
    fn other_layouts_take_the_slow_path_with_the_same_answer() {
        let spaced = r#"{ "type": "message", "offset": 7, "channel": "bench:3",
            "from": "u", "data": { "x": "pad", "ts": 99 } }"#;
        assert!(fast(spaced).is_none());
        assert_eq!(
            parse(spaced),
            Frame::Message(Delivery {
                channel: Cow::Borrowed("bench:3"),
                offset: 7,
                ts_us: Some(99),
            })
        );
        // Foreign data: a delivery without a timestamp, on either path.
        let foreign = gateway_frame("bench:0", 3, r#""hello""#);
        assert_eq!(
            parse(&foreign),
            Frame::Message(Delivery {
                channel: Cow::Borrowed("bench:0"),
                offset: 3,
                ts_us: None,
            })
        );
        let float_ts = gateway_frame("bench:0", 3, r#"{"ts":1.5}"#);
        assert!(fast(&float_ts).is_none());
        assert!(matches!(
            parse(&float_ts),
            Frame::Message(Delivery { ts_us: None, .. })
        ));
        let escaped = gateway_frame("b\\u0065nch:0", 4, "{}");
        assert!(
            matches!(parse(&escaped), Frame::Message(Delivery { channel, .. }) if channel == "bench:0")
        );
    }

    #[test]
    fn other_frames_and_garbage() {
        match parse(
            r#"{"type":"subscribed","channel":"bench:0","offset":12,"recovered":false,"id":"sub"}"#,
        ) {
            Frame::Other(o) => {
                assert_eq!(o.kind, "subscribed");
                assert_eq!(o.offset, Some(12));
                assert_eq!(o.channel.as_deref(), Some("bench:0"));
            }
            other => panic!("{other:?}"),
        }
        match parse(
            r#"{"type":"error","code":"FORBIDDEN","message":"no","retryable":false,"id":3}"#,
        ) {
            Frame::Other(o) => {
                assert_eq!(o.code.as_deref(), Some("FORBIDDEN"));
                assert_eq!(o.id, Some(serde_json::json!(3)));
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "",
            "nope",
            "[]",
            r#"{"type":1}"#,
            r#"{"type":"message","channel":"c","offset":99999999999999999999999}"#,
        ] {
            assert!(
                matches!(parse(bad), Frame::Invalid | Frame::Other(_)),
                "{bad}"
            );
        }
        // Truncated fast-path candidates never panic.
        let full = gateway_frame("bench:0", 42, &data(1, 60));
        for cut in 0..full.len() {
            let _ = parse(&full[..cut]);
        }
    }
}
