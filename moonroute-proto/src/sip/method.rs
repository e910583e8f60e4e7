//! SIP request methods (RFC 3261 §7.1, §27.4). Any token is a legal method: unknown ones are
//! kept as they were received so a proxy can forward them.

use std::fmt;

use bytes::Bytes;

use super::error::{ParseError, Result};
use super::scan;

/// A request method. Methods are case-sensitive (§7.1): `invite` is an extension method, not
/// INVITE.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Register,
    Options,
    Info,
    Update,
    Prack,
    Subscribe,
    Notify,
    Refer,
    Message,
    Publish,
    /// An extension method; the bytes are a valid token (ASCII).
    Other(Bytes),
}

impl Method {
    /// Parses a method token. Known methods allocate nothing; an unknown one is copied once.
    pub fn parse(s: &[u8]) -> Result<Method> {
        Ok(match s {
            b"INVITE" => Method::Invite,
            b"ACK" => Method::Ack,
            b"BYE" => Method::Bye,
            b"CANCEL" => Method::Cancel,
            b"REGISTER" => Method::Register,
            b"OPTIONS" => Method::Options,
            b"INFO" => Method::Info,
            b"UPDATE" => Method::Update,
            b"PRACK" => Method::Prack,
            b"SUBSCRIBE" => Method::Subscribe,
            b"NOTIFY" => Method::Notify,
            b"REFER" => Method::Refer,
            b"MESSAGE" => Method::Message,
            b"PUBLISH" => Method::Publish,
            other if scan::is_token(other) => Method::Other(Bytes::copy_from_slice(other)),
            _ => return Err(ParseError::bad("method", "not a token")),
        })
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Register => "REGISTER",
            Method::Options => "OPTIONS",
            Method::Info => "INFO",
            Method::Update => "UPDATE",
            Method::Prack => "PRACK",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Refer => "REFER",
            Method::Message => "MESSAGE",
            Method::Publish => "PUBLISH",
            // A token is ASCII, so this never falls back.
            Method::Other(b) => std::str::from_utf8(b).unwrap_or("?"),
        }
    }

    /// True when `s` names this method (exact, case-sensitive comparison, §7.1).
    pub fn is(&self, s: &[u8]) -> bool {
        self.as_str().as_bytes() == s
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_unknown_and_invalid() {
        assert_eq!(Method::parse(b"INVITE").unwrap(), Method::Invite);
        assert!(matches!(
            Method::parse(b"invite").unwrap(),
            Method::Other(_)
        ));
        let weird = b"!interesting-Method0123456789_*+`.%indeed'~";
        assert_eq!(Method::parse(weird).unwrap().as_str().as_bytes(), weird);
        assert!(Method::parse(b"IN VITE").is_err());
        assert!(Method::parse(b"").is_err());
    }
}
