//! The local control socket: what `moonroute ctl` talks to (the equivalent of Kamailio's
//! `kamcmd` and its `ctl` module).
//!
//! This module owns the Unix stream socket (by default `var/moonroute.ctl`, see
//! [`crate::config::Control`]), the wire protocol spoken on it, and both ends of it: the
//! [`ControlServer`] the running server listens with, and the blocking client ([`send`],
//! [`ctl_main`]) behind `moonroute ctl`. The socket itself does not know any command: what
//! `reload` or `status` mean is decided by the [`Handler`] the caller installs.
//!
//! - [`stats`]: `stats [PREFIX]`, the metric samples.
//! - [`dlg`]: `dlg list|show|count|end`, the calls the event loops track.
//! - [`ds`]: `ds list|set|reload`, the dispatcher's destinations (Kamailio's
//!   `dispatcher.list`, `dispatcher.set_state`, `dispatcher.reload`).
//! - [`kv`]: `kv get|set|del|list`, the `sip.kv` store (Kamailio's `htable.*` RPCs).
//! - [`ul`]: the `ul show|rm|add|count` commands on the location database (Kamailio's
//!   `kamctl ul`), which `moonroute`'s handler runs for `ul`.
//!
//! # Wire protocol
//!
//! One command per connection, in UTF-8 text:
//!
//! 1. The client connects and sends each argument on its own line (`\n`; a `\r\n` line end is
//!    accepted too), then an empty line. An argument can therefore neither contain a line break
//!    nor be empty. The request, empty line included, is at most [`MAX_REQUEST_BYTES`] and must
//!    arrive within [`READ_TIMEOUT`].
//! 2. The server answers with a first line `ok` or `error`, then free text (the reply body, which
//!    may span several lines or be empty), then closes the connection.
//!
//! ```text
//! client → server      server → client
//! reload\n             ok\n
//! \n                   script scripts/default.lua reloaded: version 4\n
//! ```
//!
//! A malformed request (too large, not UTF-8, cut short, too slow) is answered `error` with a
//! sentence saying what is wrong. The protocol is simple enough to drive by hand:
//! `printf 'status\n\n' | nc -U var/moonroute.ctl`.
//!
//! # Security
//!
//! The socket file is created with mode 0600, and the server also checks the peer's credentials
//! on every connection: only the socket's owner (and root) may send commands.

mod client;
pub mod dlg;
pub mod ds;
pub mod kv;
mod server;
pub mod stats;
pub mod ul;
pub mod user;

use std::sync::Arc;
use std::time::Duration;

pub use client::{ctl_main, send, ClientError, CTL_TIMEOUT};
pub use server::ControlServer;

/// The largest request the server reads, in bytes, the closing empty line included.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How long the server waits for a complete request after accepting a connection.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at the same time; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;

/// The answer to one command: its status line (`ok` or `error`) and its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// `true` for `ok`, `false` for `error`.
    pub ok: bool,
    /// The reply body: free text, possibly several lines, possibly empty.
    pub text: String,
}

impl Reply {
    /// A successful reply with this body.
    pub fn ok(text: impl Into<String>) -> Reply {
        Reply {
            ok: true,
            text: text.into(),
        }
    }

    /// A failed reply; the body says what went wrong.
    pub fn error(text: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            text: text.into(),
        }
    }
}

/// Runs one command: receives the request's arguments (the command name first) and returns the
/// reply. Called on a blocking thread (it may take milliseconds, e.g. to compile a Lua script),
/// possibly from several connections at once.
pub type Handler = Arc<dyn Fn(&[String]) -> Reply + Send + Sync>;

/// A duration as a reader wants it in a message: `5 s`, `250 ms`.
fn human_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// An I/O error as a sentence fragment, without the trailing `(os error N)`.
fn describe_io(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => text[..at].to_owned(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(Duration::from_secs(5)), "5 s");
        assert_eq!(human_duration(Duration::from_millis(250)), "250 ms");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1500 ms");
    }

    #[test]
    fn io_errors_lose_the_os_error_number() {
        let e = std::io::Error::from_raw_os_error(2);
        assert_eq!(describe_io(&e), "No such file or directory");
        let custom = std::io::Error::other("plain");
        assert_eq!(describe_io(&custom), "plain");
    }
}
