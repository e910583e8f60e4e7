//! NAT keep-alives: OPTIONS pings over UDP (RFC 3261 §11, as Kamailio's nathelper `sipping`)
//! and CRLF pings on streams (RFC 5626 §4.4.1). The first loop runs the rounds, which probe
//! the NATed bindings of the location store and remove those that stop answering, and
//! consumes the answers to its OPTIONS before the transaction layer (which never saw the
//! requests). The schedule itself is `nat::keepalive`.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use tracing::{debug, warn};

use super::Core;
use crate::location::LocationStore;
use crate::nat::keepalive::{self, Action as KeepaliveAction, Peer, Scheduler};
use crate::proxy::via_branch;
use crate::sip::Message;
use crate::transport::{Destination, Output};

impl Core {
    /// A response to one of this loop's keep-alive OPTIONS (any status proves the binding
    /// alive); consumed here, before the transaction layer, which never saw the request.
    pub(super) fn is_keepalive_answer(&mut self, response: &Message) -> bool {
        let Some(keepalive) = &mut self.keepalive else {
            return false;
        };
        let seq = response
            .top_via()
            .ok()
            .and_then(|via| via.branch().and_then(via_branch::keepalive_seq));
        match seq {
            Some(seq) => {
                if !keepalive.scheduler.on_response(seq) {
                    debug!(seq, "keep-alive answer for no current probe: ignored");
                }
                true
            }
            None => false,
        }
    }

    /// Runs a keep-alive tick when one is due: probes the NATed bindings of the next slice of
    /// the store, and removes those whose probes failed too often (one log line each).
    pub(super) fn keepalive_round(&mut self, now: Instant, out: &mut Vec<Output>) {
        let Some(keepalive) = &mut self.keepalive else {
            return;
        };
        if now < keepalive.scheduler.next_deadline() {
            return;
        }
        let wall = SystemTime::now();
        let mut actions = Vec::new();
        keepalive
            .scheduler
            .on_tick(now, &*keepalive.store, wall, &mut actions);
        for action in actions {
            match action {
                KeepaliveAction::SendOptions { peer, seq } => {
                    let source = self.identity.sent_by(peer.kind, peer.local, peer.addr);
                    let branch = via_branch::keepalive(self.loop_index, seq);
                    let data =
                        keepalive::options_request(&peer, &source, &branch, seq, keepalive.nonce);
                    out.push(Output::Send {
                        dest: keepalive_destination(&peer, false),
                        data,
                    });
                }
                KeepaliveAction::SendPing { peer } => out.push(Output::Send {
                    dest: keepalive_destination(&peer, true),
                    data: Bytes::from_static(b"\r\n\r\n"),
                }),
                KeepaliveAction::Remove { peer, failures } => {
                    let removed = keepalive::remove_binding(&*keepalive.store, &peer, wall);
                    match removed {
                        Ok(true) => {
                            warn!(aor = %peer.aor, contact = %peer.contact, received = %peer.addr, transport = %peer.kind, failures, "NAT keep-alives failed: binding removed")
                        }
                        Ok(false) => {}
                        Err(error) => {
                            warn!(aor = %peer.aor, contact = %peer.contact, %error, "NAT keep-alives failed but the binding could not be removed")
                        }
                    }
                }
            }
        }
    }
}

/// The keep-alives one loop sends: the schedule, and the store it reads and prunes.
pub(super) struct Keepalives {
    pub(super) scheduler: Scheduler,
    pub(super) store: Arc<dyn LocationStore>,
    /// Makes the keep-alives' Call-IDs and From tags differ across restarts.
    pub(super) nonce: u64,
}

/// Where a keep-alive goes: the binding's received address, from the socket it registered
/// on; a stream ping only on an open connection.
fn keepalive_destination(peer: &Peer, stream: bool) -> Destination {
    Destination {
        kind: peer.kind,
        addr: peer.addr,
        conn: None,
        local: peer.local,
        tls_name: None,
        reuse_only: stream,
    }
}
