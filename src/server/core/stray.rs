//! Responses that are not this loop's: those whose client transaction another loop owns (the
//! loop index in our branch, see `proxy::via_branch::owner_loop`) are handed over; those that
//! match no transaction are forwarded statelessly when their branch proves a stateless forward
//! of this process (RFC 3261 §16.11, §18.2.2), and dropped otherwise.

use tracing::info;

use super::Core;
use crate::logging::{self, REFUSED};
use crate::proxy::is_our_stateless_branch;
use crate::proxy::via_branch;
use crate::sip::{HeaderName, Message, Uri, Via};
use crate::transaction::layer::LayerOutput;
use crate::transport::{Destination, Meta, TransportKind};

impl Core {
    /// The loop owning the client transaction of a response, when it is not this one.
    pub(super) fn owner_elsewhere(&self, response: &Message) -> Option<usize> {
        let via = response.top_via().ok()?;
        let owner = via_branch::owner_loop(via.branch()?)?;
        (owner != self.loop_index && owner < self.loops).then_some(owner)
    }

    /// §16.11: a response that matches no transaction is forwarded statelessly when its top Via
    /// is ours and its branch proves the request went out through a stateless forward of this
    /// process: that Via is removed and the response goes where the next one says (§18.2.2).
    /// Anything else is dropped (forged responses are not reflected).
    pub(super) fn forward_stray_response(
        &self,
        mut response: Message,
        meta: &Meta,
        next: &mut Vec<LayerOutput>,
    ) {
        let ours = response.top_via().is_ok_and(|via| {
            let uri = match via.port {
                Some(port) => format!("sip:{}:{port}", via.host),
                None => format!("sip:{}", via.host),
            };
            Uri::parse(uri.as_bytes()).is_ok_and(|u| self.identity.is_myself(&u))
        });
        let ours = ours && is_our_stateless_branch(&response);
        let status = response.status().unwrap_or(0);
        let dropped = |response: &Message, reason: &str| {
            info!(target: REFUSED, call_id = %logging::call_id(response), source = %meta.source, transport = %meta.kind, status, reason, "response dropped");
        };
        if !ours || !matches!(response.remove_first_value(HeaderName::Via), Ok(true)) {
            return dropped(&response, "no transaction matches it and its top Via is not a stateless forward of this server");
        }
        self.relay.sign_stray_response(&mut response);
        let Ok(via) = response.top_via() else {
            return dropped(
                &response,
                "addressed to this server, which sent no such request",
            );
        };
        let Some(dest) = stateless_response_destination(&via) else {
            return dropped(&response, "its next Via names no address to forward it to");
        };
        next.push(LayerOutput::Send {
            dest,
            data: response.to_bytes(),
        });
    }
}

/// Where a statelessly forwarded response goes (§18.2.2): the Via's received/rport when the
/// previous hop recorded them, else its sent-by, which must be an IP literal: a host name is
/// not resolved here (§18.2.2's RFC 3263 §5 lookup), so such a response is dropped.
/// A reliable transport reuses the connection the request came in on when it is still open.
fn stateless_response_destination(via: &Via<'_>) -> Option<Destination> {
    let kind = TransportKind::from_name(via.transport)?;
    let default_port = kind.default_port();
    let addr = via.recorded_response_addr(default_port)?;
    Some(Destination {
        kind,
        addr,
        conn: None,
        local: None,
        tls_name: None,
        reuse_only: false,
    })
}
