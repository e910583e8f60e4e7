//! Parse and validation errors of the codec.
//!
//! An error says what is wrong in words an operator can act on and which SIP status a server
//! should answer with when it can answer at all (RFC 3261 §8.2, §16.3, §21.4).

use std::fmt;

/// Why a message (or one of its parts) was refused.
///
/// `context` names the part (a header name, "Request-URI", "start line") and `detail` what is
/// wrong with it. Both are static so building an error never allocates on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError {
    status: u16,
    context: &'static str,
    detail: &'static str,
}

impl ParseError {
    /// A malformed part: answered with 400 Bad Request (§21.4.1).
    pub const fn bad(context: &'static str, detail: &'static str) -> Self {
        ParseError {
            status: 400,
            context,
            detail,
        }
    }

    /// An error answered with a specific status (505 for an unknown SIP version, 413, ...).
    pub const fn with_status(status: u16, context: &'static str, detail: &'static str) -> Self {
        ParseError {
            status,
            context,
            detail,
        }
    }

    /// Re-labels an error found inside a header value with the header's name.
    pub const fn in_context(self, context: &'static str) -> Self {
        ParseError { context, ..self }
    }

    /// The status a server answers with when the message is a request it can answer.
    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn context(&self) -> &'static str {
        self.context
    }

    pub fn detail(&self) -> &'static str {
        self.detail
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.context.is_empty() {
            f.write_str(self.detail)
        } else {
            write!(f, "{}: {}", self.context, self.detail)
        }
    }
}

impl std::error::Error for ParseError {}

pub type Result<T> = std::result::Result<T, ParseError>;
