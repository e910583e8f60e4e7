//! OPTIONS addressed to this server (RFC 3261 §11), answered statelessly (§8.2.7) wherever they
//! land: 200 with what this server supports (§11.2), or the refusal §8.2.2 and §16.3 call for.

use bytes::Bytes;
use tracing::{debug, info};

use super::{Core, ALLOW, SERVER, SUPPORTED};
use crate::logging::{Lossy, REFUSED};
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
        let in_dialog = request.to_tag().is_some();
        max_forwards_zero || (for_me && !in_dialog)
    }

    /// The answer to a request delivered by the transaction layer: its status and bytes.
    pub(super) fn answer(&self, req: &Message, meta: &Meta) -> (u16, Bytes) {
        // Log fields are formatted only when their level is enabled: nothing is built for them
        // on the per-request path.
        let call_id = Lossy(req.call_id().unwrap_or(b""));
        let method = req.method().cloned().unwrap_or(Method::Options);
        if let Some(refusal) = self.check_request(req, &method) {
            let Refusal {
                code,
                reason,
                unsupported,
            } = refusal;
            info!(target: REFUSED, %call_id, %method, source = %meta.source, transport = %meta.kind, code, reason, "request refused");
            let extra: &[(&str, &str)] = match &unsupported {
                Some(tags) => &[("Unsupported", tags.as_str())],
                None if code == 501 => &[("Allow", ALLOW)],
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
            ("Allow", ALLOW),
            ("Accept", "*/*"),
            ("Accept-Encoding", "identity"),
            ("Accept-Language", "en"),
            ("Supported", &self.supported),
            ("Server", SERVER),
        ]
    }

    /// The checks of §8.2.2 and §16.3 that apply to a server that does not route yet; returns
    /// the refusal, or `None` for an OPTIONS addressed to this server.
    fn check_request(&self, req: &Message, method: &Method) -> Option<Refusal> {
        let refuse = |code, reason| {
            Some(Refusal {
                code,
                reason,
                unsupported: None,
            })
        };
        let uri = req.request_uri().ok()?;
        if !uri.is_routable_scheme() {
            return refuse(416, "Unsupported URI Scheme");
        }
        if let Some(tags) = unsupported_option_tags(req) {
            return Some(Refusal {
                code: 420,
                reason: "Bad Extension",
                unsupported: Some(tags),
            });
        }
        let for_me = self.identity.is_myself(&uri);
        let max_forwards_zero = matches!(req.max_forwards(), Some(Ok(0)));
        match method {
            // §16.3 step 3: an OPTIONS with Max-Forwards 0 may be answered as its final recipient.
            Method::Options if for_me || max_forwards_zero => None,
            _ if max_forwards_zero => refuse(483, "Too Many Hops"),
            _ => refuse(501, "Not Implemented"),
        }
    }
}

/// Why a request is refused: status, reason phrase, and for 420 the option tags to list in
/// Unsupported (§8.2.2.3).
struct Refusal {
    code: u16,
    reason: &'static str,
    unsupported: Option<String>,
}

/// Require and Proxy-Require tags this build does not support, comma-separated (§8.2.2.3,
/// §16.3 item 5), or `None` when all are supported.
fn unsupported_option_tags(req: &Message) -> Option<String> {
    let mut list = String::new();
    let tags = [HeaderName::Require, HeaderName::ProxyRequire]
        .into_iter()
        .flat_map(|h| req.option_tags(h))
        .filter_map(Result::ok);
    for tag in tags {
        if SUPPORTED
            .iter()
            .any(|s| s.as_bytes().eq_ignore_ascii_case(tag))
        {
            continue;
        }
        if !list.is_empty() {
            list.push_str(", ");
        }
        list.push_str(&String::from_utf8_lossy(tag));
    }
    (!list.is_empty()).then_some(list)
}
