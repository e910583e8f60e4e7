//! OPTIONS addressed to this server (RFC 3261 §11), answered statelessly (§8.2.7) wherever they
//! land: 200 with what this server supports (§11.2), or the refusal §8.2.2 and §16.3 call for.

use bytes::Bytes;
use tracing::{debug, info};

use super::{Core, ALLOW_ALWAYS};
use crate::logging::{Lossy, REFUSED};
use crate::proxy::identity::SERVER;
use crate::sip::extensions::{self, SUPPORTED};
use crate::sip::{HeaderName, Message, Method};
use crate::transport::Meta;

impl Core {
    /// OPTIONS for this server (§11), or with Max-Forwards 0 (§16.3 step 3: answered as its
    /// final recipient). §11: "If the OPTIONS is addressed to a proxy server, the Request-URI
    /// is set without a user part"; one with a user part (`sip:100@us`, a scanner's favourite
    /// probe) asks about a user's UA and goes to the routing script like any request.
    pub(super) fn is_for_me_options(&self, request: &Message) -> bool {
        if request.method() != Some(&Method::Options) {
            return false;
        }
        let max_forwards_zero = matches!(request.max_forwards(), Some(Ok(0)));
        let for_me = request.request_uri().is_ok_and(|u| {
            u.as_sip().is_some_and(|sip| sip.user.is_none()) && self.identity.is_myself(&u)
        });
        max_forwards_zero || (for_me && !request.is_in_dialog())
    }

    /// The answer to an OPTIONS for this server ([`Core::is_for_me_options`]): its status and
    /// bytes.
    pub(super) fn answer(&self, req: &Message, meta: &Meta) -> (u16, Bytes) {
        // Log fields are formatted only when their level is enabled: nothing is built for them
        // on the per-request path.
        let call_id = Lossy(req.call_id().unwrap_or(b""));
        if let Some(refusal) = refusal(req) {
            let Refusal {
                code,
                reason,
                unsupported,
            } = refusal;
            let method = req.method().cloned().unwrap_or(Method::Options);
            info!(target: REFUSED, %call_id, %method, source = %meta.source, transport = %meta.kind, code, reason, "request refused");
            let extra: &[(&str, &str)] = match &unsupported {
                Some(tags) => &[("Unsupported", tags.as_str())],
                None => &[],
            };
            return (code, self.build_response(req, code, reason, extra));
        }
        debug!(%call_id, source = %meta.source, "answering OPTIONS");
        (
            200,
            self.build_response(req, 200, "OK", &self.options_headers()),
        )
    }

    /// §11.2: what an OPTIONS answer tells about this server.
    fn options_headers(&self) -> [(&'static str, &str); 6] {
        [
            ("Allow", ALLOW_ALWAYS),
            ("Accept", "*/*"),
            ("Accept-Encoding", "identity"),
            ("Accept-Language", "en"),
            ("Supported", &self.supported),
            ("Server", SERVER),
        ]
    }
}

/// Why an OPTIONS for this server is refused: status, reason phrase, and for 420 the option
/// tags to list in Unsupported (§8.2.2.3).
struct Refusal {
    code: u16,
    reason: &'static str,
    unsupported: Option<String>,
}

/// The checks of §8.2.2 an OPTIONS for this server must pass before its 200: a Request-URI
/// scheme this server serves (416, §8.2.2.1), and every extension it requires, by Require
/// (§8.2.2.3) or Proxy-Require (§16.3 item 5), supported (420). `None`: answer 200.
fn refusal(req: &Message) -> Option<Refusal> {
    let uri = req.request_uri().ok()?;
    if !uri.is_routable_scheme() {
        return Some(Refusal {
            code: 416,
            reason: "Unsupported URI Scheme",
            unsupported: None,
        });
    }
    let required = [HeaderName::Require, HeaderName::ProxyRequire];
    // Validated on receipt (`Message::check_valid`): every listed value is an option tag.
    let unsupported = extensions::unsupported(req, &required, SUPPORTED).unwrap_or(None)?;
    Some(Refusal {
        code: 420,
        reason: "Bad Extension",
        unsupported: Some(unsupported),
    })
}
