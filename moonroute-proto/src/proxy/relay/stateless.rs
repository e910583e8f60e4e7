//! What the relay sends without a transaction of its own (RFC 3261 §16.11): the router's
//! `forward`, an ACK for a 2xx (§13.2.2.4), a CANCEL that matched no transaction (§16.10);
//! and the copy of a request for one address of its next hop (§16.6 steps 1-8), from our
//! listener of that transport and address family, which the branches use too.

use std::net::SocketAddr;
use std::time::SystemTime;

use bytes::Bytes;
use tracing::info;

use super::Reply;
use super::{wall_clock, Handled, Relay, RelayAction, RelayActions, Resolving};
use crate::dns::target::{self as dns, Candidate};
use crate::logging::{call_id, REFUSED};
use crate::proxy::request::{
    forward_copy, next_hop, next_hop_of_uri, stateless_branch, ForwardSpec, NextHop, ProxyIdentity,
};
use crate::proxy::router::Decision;
use crate::proxy::router::Routed;
use crate::sip::Message;
use crate::transaction::layer::TxId;
use crate::transport::{Destination, ListenAddr, Meta, TransportKind};

pub(super) struct StatelessForward {
    pub(super) request: Message,
    pub(super) uri: Bytes,
    pub(super) branch: String,
    pub(super) inbound: (TransportKind, SocketAddr),
    pub(super) record_route: bool,
    /// The wall-clock time it was routed (what its Record-Route signature counts from).
    pub(super) now: SystemTime,
}

/// What a forwarded copy is built from.
pub(super) struct CopyParts<'a> {
    pub(super) request: &'a Message,
    /// The new Request-URI (§16.6 step 2).
    pub(super) uri: &'a [u8],
    pub(super) branch: &'a str,
    /// The wall-clock time, for the Record-Route signature.
    pub(super) now: SystemTime,
    /// The signature marks a call the script tracks.
    pub(super) tracked: bool,
}

impl StatelessForward {
    pub(super) fn parts(&self) -> CopyParts<'_> {
        CopyParts {
            request: &self.request,
            uri: &self.uri,
            branch: &self.branch,
            now: self.now,
            tracked: false,
        }
    }
}

fn spec<'a>(
    me: &'a ProxyIdentity,
    parts: &'a CopyParts<'a>,
    inbound: (TransportKind, SocketAddr),
    outbound: (TransportKind, SocketAddr),
    record_route: bool,
) -> ForwardSpec<'a> {
    ForwardSpec {
        target: parts.uri,
        record_route,
        tracked: parts.tracked,
        inbound,
        outbound,
        branch: parts.branch,
        me,
        now: parts.now,
    }
}

/// The copy as it would leave on the inbound transport (§16.6 steps 1-8), sent when that is
/// how it leaves. Its next hop is [`next_hop`] of the request it was built from (step 6 may
/// have moved a strict router's URI from Route into its Request-URI).
pub(super) fn first_copy(
    me: &ProxyIdentity,
    parts: &CopyParts<'_>,
    inbound: (TransportKind, SocketAddr),
    record_route: bool,
) -> Result<Message, &'static str> {
    forward_copy(
        parts.request,
        &spec(me, parts, inbound, inbound, record_route),
    )
    .map_err(|_| "cannot build the forwarded copy")
}

/// The copy for one address of the next hop and where it goes: from our listener of that
/// transport and address family (its Via and Record-Route name it, §16.6 steps 4 and 8).
pub(super) fn copy_for(
    me: &ProxyIdentity,
    bound: &[ListenAddr],
    parts: &CopyParts<'_>,
    first: Option<Message>,
    candidate: &Candidate,
    inbound: (TransportKind, SocketAddr),
    record_route: bool,
) -> Result<(Message, Destination), &'static str> {
    let listener = listener_for(bound, candidate.kind, candidate.addr)
        .ok_or("no listener for the next hop's transport")?;
    let (kind, local) = (listener.kind, listener.addr);
    let outbound = (kind, local);
    let copy = match first {
        Some(first) if outbound == inbound => first,
        _ => forward_copy(
            parts.request,
            &spec(me, parts, inbound, outbound, record_route),
        )
        .map_err(|_| "cannot build the forwarded copy")?,
    };
    let dest = Destination {
        kind,
        addr: candidate.addr,
        conn: None,
        local: Some(local),
        tls_name: candidate.tls_name.clone(),
        reuse_only: false,
    };
    Ok((copy, dest))
}

/// Our listener for a next hop over `kind` at `to`, in its address family. A WebSocket hop may
/// leave from the listener of the other WebSocket kind: a URI says `transport=ws` for secure
/// WebSocket too (RFC 7118 §5.2), so a `wss:`-only server reaches a client whose Contact says
/// `transport=ws` (the ACK and BYE of its calls) on the client's connection, whichever kind
/// it is (the WebSocket transport sends on either).
pub(super) fn listener_for(
    bound: &[ListenAddr],
    kind: TransportKind,
    to: SocketAddr,
) -> Option<&ListenAddr> {
    let same_family = |l: &&ListenAddr| l.addr.is_ipv4() == to.is_ipv4();
    let mut usable = bound.iter().filter(same_family);
    usable
        .clone()
        .find(|l| l.kind == kind)
        .or_else(|| usable.find(|l| kind.is_websocket() && l.kind.is_websocket()))
}

pub(super) fn query_of(hop: &NextHop) -> dns::Query {
    dns::Query {
        host: hop.host.clone(),
        port: hop.port,
        transport: hop.transport,
        secure: hop.secure,
    }
}

/// The one line of a stateless forward (§16.11: an ACK for a 2xx, or the script's `forward`)
/// that could not be sent: the message is dropped.
pub(super) fn forward_failed(forward: &StatelessForward, destination: Option<&[u8]>, reason: &str) {
    let to = destination.unwrap_or(&forward.uri);
    info!(target: REFUSED, call_id = %call_id(&forward.request), to = %String::from_utf8_lossy(to), reason = %format_args!("cannot forward statelessly: {reason}"), "message dropped");
}

impl Relay {
    /// A decision that keeps no response context: a reply (through the server transaction),
    /// a stateless forward (§16.11) or a drop; the last two abandon the server transaction.
    pub(super) fn carry_out_stateless(
        &mut self,
        tx: TxId,
        decision: Decision,
        request: &Message,
        meta: &Meta,
        out: &mut RelayActions,
    ) -> Handled {
        match decision {
            Decision::Reply {
                code,
                reason,
                headers,
                wait_for,
            } => {
                return Handled::Reply(Reply {
                    code,
                    reason,
                    unsupported: None,
                    headers,
                    wait_for,
                })
            }
            Decision::Forward {
                target,
                record_route,
            } => self.forward_stateless(request, target, record_route, meta, out),
            Decision::Drop {
                reason: Some(reason),
            } => {
                info!(target: REFUSED, call_id = %call_id(request), source = %meta.source, transport = %meta.kind, reason = %format_args!("the routing script dropped it: {reason}"), "request dropped");
            }
            Decision::Drop { reason: None } | Decision::Relay { .. } | Decision::Resolve { .. } => {
                info!(target: REFUSED, call_id = %call_id(request), source = %meta.source, transport = %meta.kind, reason = "the routing script dropped it (no answer sent)", "request dropped");
            }
        }
        out.push(RelayAction::AbandonServer { tx });
        Handled::Done
    }

    /// §16.11: forwards `request` without a transaction, to `destination` when given (the
    /// Request-URI is left as it is, like Kamailio's `forward(uri)` / `$du`), else where its
    /// Route set or Request-URI says.
    fn forward_stateless(
        &mut self,
        request: &Message,
        destination: Option<Bytes>,
        record_route: bool,
        meta: &Meta,
        out: &mut RelayActions,
    ) {
        let Some(ruri) = self.request_uri_target(request).map(|t| t.uri).or_else(|| {
            // Addressed to us with nothing to follow: only an explicit destination helps.
            destination.as_ref()?;
            request.request_uri_bytes().map(|u| request.share(u))
        }) else {
            return info!(target: REFUSED, call_id = %call_id(request), source = %meta.source, transport = %meta.kind, reason = "addressed to this proxy with no Route to follow: nothing to forward it to", "request dropped");
        };
        let forward = StatelessForward {
            request: request.clone(),
            uri: ruri,
            branch: stateless_branch(request),
            inbound: (meta.kind, meta.local),
            record_route,
            now: wall_clock(),
        };
        let planned = first_copy(
            &self.me,
            &forward.parts(),
            forward.inbound,
            forward.record_route,
        )
        .and_then(|first| {
            let hop = match destination.as_deref() {
                Some(uri) => {
                    next_hop_of_uri(uri).map_err(|_| "the destination is not a SIP URI")?
                }
                None => next_hop(&forward.request, &forward.uri).map_err(|_| "no next hop")?,
            };
            Ok((first, hop))
        });
        let (first, hop) = match planned {
            Ok(planned) => planned,
            Err(reason) => return forward_failed(&forward, destination.as_deref(), reason),
        };
        let query = query_of(&hop);
        match dns::numeric(&query) {
            Some(Ok(candidates)) => self.send_stateless(&forward, Some(first), &candidates, out),
            Some(Err(error)) => {
                forward_failed(&forward, destination.as_deref(), &error.to_string())
            }
            None => {
                // Too many lookups in flight: already logged, and the sender retransmits.
                let _ = self.ask_resolve(query, Resolving::Forward(Box::new(forward)), out);
            }
        }
    }

    /// Sends a stateless forward to the first of `candidates` we have a listener for; `first`
    /// is the copy built for the inbound transport, reused when that is how it leaves.
    pub(super) fn send_stateless(
        &self,
        forward: &StatelessForward,
        mut first: Option<Message>,
        candidates: &[Candidate],
        out: &mut RelayActions,
    ) {
        for candidate in candidates {
            let built = copy_for(
                &self.me,
                &self.bound,
                &forward.parts(),
                first.take(),
                candidate,
                forward.inbound,
                forward.record_route,
            );
            if let Ok((copy, dest)) = built {
                out.push(RelayAction::SendStateless {
                    dest,
                    data: copy.to_bytes(),
                });
                return;
            }
        }
        forward_failed(forward, None, "no listener for any address of the next hop");
    }

    pub(super) fn cancel_routed(
        &mut self,
        tx: TxId,
        request: &Message,
        meta: &Meta,
        routed: Routed,
        out: &mut RelayActions,
    ) -> Handled {
        if let Some(handle) = routed.handle {
            self.router.release(handle);
        }
        let decision = match routed.decision {
            // Stateful relay of a CANCEL without its INVITE makes no sense: forward it.
            Decision::Relay { targets, .. } => Decision::Forward {
                target: targets
                    .into_iter()
                    .next()
                    .map(|t| t.next_hop_uri.unwrap_or(t.uri)),
                record_route: false,
            },
            other => other,
        };
        self.carry_out_stateless(tx, decision, request, meta, out)
    }

    pub(super) fn ack_routed(
        &mut self,
        ack: &Message,
        meta: &Meta,
        routed: Routed,
        out: &mut RelayActions,
    ) {
        if let Some(handle) = routed.handle {
            self.router.release(handle);
        }
        let (target, record_route) = match routed.decision {
            Decision::Relay {
                targets,
                record_route,
                ..
            } => (
                targets
                    .into_iter()
                    .next()
                    .map(|t| t.next_hop_uri.unwrap_or(t.uri)),
                record_route,
            ),
            Decision::Forward {
                target,
                record_route,
            } => (target, record_route),
            Decision::Drop {
                reason: Some(reason),
            } => {
                return info!(target: REFUSED, call_id = %call_id(ack), source = %meta.source, transport = %meta.kind, reason = %format_args!("the routing script dropped it: {reason}"), "ACK dropped");
            }
            Decision::Reply { .. } | Decision::Drop { .. } | Decision::Resolve { .. } => {
                return info!(target: REFUSED, call_id = %call_id(ack), source = %meta.source, transport = %meta.kind, reason = "the routing script dropped it", "ACK dropped");
            }
        };
        self.forward_stateless(ack, target, record_route, meta, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_websocket_hop_leaves_from_either_websocket_listener() {
        let listen = |s: &str| s.parse::<ListenAddr>().unwrap();
        let (udp, ws, wss) = (
            listen("udp:127.0.0.1:5060"),
            listen("ws:127.0.0.1:8080"),
            listen("wss:127.0.0.1:8443"),
        );
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let secure_only = [udp.clone(), wss.clone()];
        // `transport=ws` (RFC 7118 §5.2) names a wss: client too.
        assert_eq!(
            listener_for(&secure_only, TransportKind::Ws, client),
            Some(&wss)
        );
        assert_eq!(
            listener_for(&secure_only, TransportKind::Udp, client),
            Some(&udp)
        );
        assert_eq!(listener_for(&secure_only, TransportKind::Tcp, client), None);
        let v6: SocketAddr = "[::1]:40000".parse().unwrap();
        assert_eq!(listener_for(&secure_only, TransportKind::Ws, v6), None);
        // With both, each kind its own.
        let both = [wss.clone(), ws.clone()];
        assert_eq!(listener_for(&both, TransportKind::Ws, client), Some(&ws));
        assert_eq!(listener_for(&both, TransportKind::Wss, client), Some(&wss));
    }
}
