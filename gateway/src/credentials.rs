//! Where a token comes from in the upgrade request (PROTOCOL.md section 1), in the
//! protocol's precedence: `Authorization: Bearer`, a `bearer.<jwt>` subprotocol entry,
//! then `?token=`. Also picks the subprotocol to select, which never echoes a token.

use http::HeaderMap;
use http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use shared::protocol::{BEARER_SUBPROTOCOL_PREFIX, SUBPROTOCOL};

/// Which source a token came from (for logs and metrics; never the token itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Header,
    Subprotocol,
    Query,
    /// The `auth` frame after the upgrade.
    Frame,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Header => "header",
            Source::Subprotocol => "subprotocol",
            Source::Query => "query",
            Source::Frame => "frame",
        }
    }
}

/// What the handshake carried.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Handshake {
    /// The token and its source, or an explanation of a malformed credential.
    pub token: Option<Result<(String, Source), &'static str>>,
    /// Whether the client offered `switchboard.v1` (then the server selects it).
    pub select_subprotocol: bool,
}

/// Reads credentials and the subprotocol offer from request headers and query.
pub fn extract(headers: &HeaderMap, query: Option<&str>) -> Handshake {
    let mut offered_v1 = false;
    let mut bearer_proto: Option<String> = None;
    for value in headers.get_all(SEC_WEBSOCKET_PROTOCOL) {
        let Ok(list) = value.to_str() else { continue };
        for item in list.split(',').map(str::trim) {
            if item == SUBPROTOCOL {
                offered_v1 = true;
            } else if let Some(t) = item.strip_prefix(BEARER_SUBPROTOCOL_PREFIX)
                && bearer_proto.is_none()
            {
                bearer_proto = Some(t.to_owned());
            }
        }
    }

    let header = headers.get(AUTHORIZATION).map(|v| {
        v.to_str()
            .ok()
            .and_then(|s| {
                let (scheme, rest) = s.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| rest.trim().to_owned())
            })
            .filter(|t| !t.is_empty())
            .ok_or("Authorization header must be `Bearer <token>`")
    });

    let token = match (header, bearer_proto) {
        (Some(Ok(t)), _) => Some(Ok((t, Source::Header))),
        (Some(Err(e)), _) => Some(Err(e)),
        (None, Some(t)) if !t.is_empty() => Some(Ok((t, Source::Subprotocol))),
        (None, Some(_)) => Some(Err("empty bearer subprotocol")),
        (None, None) => query_token(query).map(|t| {
            if t.is_empty() {
                Err("empty token query parameter")
            } else {
                Ok((t, Source::Query))
            }
        }),
    };
    Handshake {
        token,
        select_subprotocol: offered_v1,
    }
}

/// The `token` query parameter, percent-decoded (JWTs are URL-safe, but clients may
/// still encode them).
fn query_token(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == "token").then(|| percent_decode(v))
    })
}

/// Form decoding: `+` is a space, then `%XX` sequences; a `%` without two hex digits
/// stays as it is.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&http::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn precedence_is_header_subprotocol_query() {
        let h = headers(&[
            (&AUTHORIZATION, "Bearer H"),
            (&SEC_WEBSOCKET_PROTOCOL, "switchboard.v1, bearer.S"),
        ]);
        assert_eq!(
            extract(&h, Some("token=Q")).token,
            Some(Ok(("H".into(), Source::Header)))
        );
        let h = headers(&[(&SEC_WEBSOCKET_PROTOCOL, "switchboard.v1, bearer.S")]);
        let hs = extract(&h, Some("token=Q"));
        assert_eq!(hs.token, Some(Ok(("S".into(), Source::Subprotocol))));
        assert!(hs.select_subprotocol);
        let hs = extract(&HeaderMap::new(), Some("a=1&token=Q%2Eb"));
        assert_eq!(hs.token, Some(Ok(("Q.b".into(), Source::Query))));
        let hs = extract(&HeaderMap::new(), Some("token=a+b%2Bc%zz"));
        assert_eq!(hs.token, Some(Ok(("a b+c%zz".into(), Source::Query))));
        assert!(!hs.select_subprotocol);
        assert_eq!(extract(&HeaderMap::new(), Some("a=1")).token, None);
        assert_eq!(extract(&HeaderMap::new(), None).token, None);
    }

    #[test]
    fn malformed_credentials_are_reported() {
        let h = headers(&[(&AUTHORIZATION, "Basic abc")]);
        assert!(matches!(extract(&h, None).token, Some(Err(_))));
        let h = headers(&[(&AUTHORIZATION, "Bearer ")]);
        assert!(matches!(extract(&h, None).token, Some(Err(_))));
        assert!(matches!(
            extract(&HeaderMap::new(), Some("token=")).token,
            Some(Err(_))
        ));
        // Odd percent sequences never panic.
        for q in [
            "token=%",
            "token=%4",
            "token=%zz",
            "token=%%%",
            "token=%e2%82",
        ] {
            let _ = extract(&HeaderMap::new(), Some(q));
        }
    }

    proptest::proptest! {
        #[test]
        fn extraction_never_panics(
            auth in proptest::option::of(".{0,200}"),
            proto in proptest::option::of(".{0,200}"),
            query in proptest::option::of(".{0,200}"),
        ) {
            let mut h = HeaderMap::new();
            if let Some(a) = auth.and_then(|a| HeaderValue::from_str(&a).ok()) {
                h.insert(AUTHORIZATION, a);
            }
            if let Some(p) = proto.and_then(|p| HeaderValue::from_str(&p).ok()) {
                h.insert(SEC_WEBSOCKET_PROTOCOL, p);
            }
            let hs = extract(&h, query.as_deref());
            if let Some(Ok((t, _))) = hs.token {
                proptest::prop_assert!(!t.is_empty());
            }
        }
    }
}
