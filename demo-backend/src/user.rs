//! A demo user name: what `POST /api/auth/login` accepts and the only user ids the
//! stand-in knows.

use std::fmt;

/// Longest demo user name: leaves room under the gateway's 128-character user id and
/// channel id limits for the derived personal team id.
pub const MAX_USER_CHARS: usize = 64;

/// A name matching `[A-Za-z0-9_-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserName(String);

/// Why a string is not a demo user name; safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserNameError {
    #[error("user name is empty")]
    Empty,
    #[error("user name is longer than {MAX_USER_CHARS} characters")]
    TooLong,
    #[error("user name may only contain letters, digits, '_' and '-'")]
    BadCharacter,
}

impl UserName {
    pub fn parse(s: &str) -> Result<UserName, UserNameError> {
        if s.is_empty() {
            return Err(UserNameError::Empty);
        }
        if s.len() > MAX_USER_CHARS {
            return Err(UserNameError::TooLong);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(UserNameError::BadCharacter);
        }
        Ok(UserName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(UserName::parse("alice_B-2").unwrap().as_str(), "alice_B-2");
        assert_eq!(UserName::parse(""), Err(UserNameError::Empty));
        assert_eq!(
            UserName::parse(&"a".repeat(65)),
            Err(UserNameError::TooLong)
        );
        assert!(UserName::parse(&"a".repeat(64)).is_ok());
        for bad in ["a b", "a/b", "../x", "é", "a.b", "a%2f"] {
            assert_eq!(
                UserName::parse(bad),
                Err(UserNameError::BadCharacter),
                "{bad}"
            );
        }
    }
}
