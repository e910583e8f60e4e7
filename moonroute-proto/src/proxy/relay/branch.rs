//! One branch of a relayed request (RFC 3261 §16.6, §16.7 steps 1-2): building its copy,
//! starting it through a client transaction, working through the addresses of its next hop
//! (RFC 3263 §4.3: a new attempt, with a new Via branch ID, after a transport error, a timeout
//! or a 503), giving it up as unreachable, and cancelling it (§9.1, §16.10).

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::stateless::{copy_for, first_copy, query_of, CopyParts};
use super::{wall_clock, ClientPurpose, Relay, RelayAction, RelayActions, Resolving};
use crate::dns::target::{self as dns, Candidate};
use crate::proxy::request::{next_hop, next_hop_of_uri, preload_route};
use crate::proxy::response_context::{BranchId, BranchState, ContextAction, Target};
use crate::proxy::router::BranchEdit;
use crate::proxy::via_branch;
use crate::sip::Message;
use crate::transaction::layer::{SendError, TxId};
use crate::transport::Destination;

/// One attempt of a branch: the branch of the call in server transaction `server`, and the
/// Via branch ID its copy carries (kept for the branch's next address if this one cannot be
/// used, RFC 3263 §4.3).
#[derive(Debug)]
pub struct Attempt {
    pub(super) server: TxId,
    pub(super) branch: BranchId,
    pub(super) branch_id: String,
}

/// The Via branch ID of a branch's next attempt, and the copy built for its first attempt
/// (reused when it leaves on the inbound transport).
pub(super) struct NextAttempt {
    pub(super) branch_id: String,
    pub(super) first: Option<Message>,
}

/// One branch working through the addresses of its next hop (RFC 3263 §4.3): one client
/// transaction at a time, each with a new branch ID; only the last outcome reaches the
/// response context.
pub(super) struct BranchRun {
    /// The branch's own copy of the request when the router edited it (else the call's).
    pub(super) request: Option<Message>,
    /// The branch's Request-URI (§16.6 step 2).
    pub(super) uri: Bytes,
    /// The current attempt's client transaction and destination; `None` while resolving, and
    /// from asking for an attempt ([`RelayAction::StartClient`]) until the core reports it
    /// started ([`Relay::on_client_started`], within the same input).
    pub(super) current: Option<(TxId, Destination)>,
    /// Addresses not tried yet, in order.
    pub(super) remaining: VecDeque<Candidate>,
    /// The target's destination override (a contact behind a NAT): sent there only, on an
    /// open connection for streams ([`Destination::reuse_only`]).
    pub(super) pinned: bool,
}

/// Room in a call's branch list for `branch`, exactly: most calls have one branch, and a
/// `Vec` left to grow by itself would allocate four (Rust's least capacity) and keep them for
/// the call's 32 s after its 2xx.
fn make_room(branches: &mut Vec<Option<BranchRun>>, branch: BranchId) {
    if branches.len() <= branch.0 {
        branches.reserve_exact(branch.0 + 1 - branches.len());
        branches.resize_with(branch.0 + 1, || None);
    }
}

/// `request` addressed to `uri` (the target's Request-URI, §16.6 step 2), for a branch copy
/// edited before its copy for an address is built (which then takes the Request-URI from it).
/// An unusable URI is left for the branch build to refuse.
fn with_request_uri(mut request: Message, uri: &[u8]) -> Message {
    let _ = request.set_request_uri(uri);
    request
}

/// What a branch to a target the router marked unavailable counts as (its owning node is
/// down): 480 (Temporarily Unavailable, §21.4.18), which goes upstream as it is when no branch
/// does better, where a 503 would become a 500 (§16.7 step 6).
const UNAVAILABLE: u16 = 480;

impl Relay {
    /// The outcome of `attempt`: on its way to `dest` through client transaction `started`,
    /// or to try the branch's next address.
    pub(super) fn branch_started(
        &mut self,
        attempt: Attempt,
        dest: Destination,
        started: Result<TxId, SendError>,
        now: Instant,
        out: &mut RelayActions,
    ) {
        let Attempt {
            server,
            branch,
            branch_id,
        } = attempt;
        match started {
            Ok(client) => {
                let Some(call) = self.calls.get_mut(&server) else {
                    return;
                };
                let Some(Some(run)) = call.branches.get_mut(branch.0) else {
                    return;
                };
                debug!(target: "moonroute::proxy::relay::branch", addr = %dest.addr, transport = %dest.kind, "branch sent");
                run.current = Some((client, dest));
                self.branch_of.insert(client, (server, branch));
                if let Some(fr) = call.fr_timer {
                    self.fr_queue
                        .push(Reverse((now + fr, server, branch.0, client)));
                }
            }
            Err(error) => {
                warn!(target: "moonroute::proxy::relay::branch", ?error, "cannot start a client transaction");
                let mut more = Vec::new();
                let next = NextAttempt {
                    branch_id,
                    first: None,
                };
                self.attempt(server, branch, next, now, out, &mut more);
                self.apply(server, more, now, out);
            }
        }
    }

    pub(super) fn start_branch(
        &mut self,
        server: TxId,
        branch: BranchId,
        target: &Target,
        now: Instant,
        out: &mut RelayActions,
        more: &mut Vec<ContextAction>,
    ) {
        let Some(call) = self.calls.get_mut(&server) else {
            return;
        };
        if let Some(why) = &target.unavailable {
            info!(target: "moonroute::proxy::relay::branch", target = %String::from_utf8_lossy(&target.uri), reason = %why, "branch not sent: 480");
            return call.context.on_branch_ended(branch, UNAVAILABLE, now, more);
        }
        let base = call.failover_request.as_ref().unwrap_or(&call.request);
        let edit = match call.handle {
            Some(handle) => self.router.on_branch(handle, base, target),
            None => BranchEdit::Unchanged,
        };
        // A branch of the failure route copies its request: kept with the branch, so that a
        // retry on the next DNS candidate copies the same one.
        let edit = match (edit, &call.failover_request) {
            (BranchEdit::Unchanged, Some(failover)) => {
                BranchEdit::Edited(with_request_uri(failover.clone(), &target.uri))
            }
            (edit, _) => edit,
        };
        let edit = match (edit, target.route.is_empty()) {
            (BranchEdit::Unchanged, false) => match preload_route(&call.request, &target.route) {
                Ok(request) => BranchEdit::Edited(with_request_uri(request, &target.uri)),
                Err(_) => BranchEdit::Skip,
            },
            (BranchEdit::Edited(request), false) => match preload_route(&request, &target.route) {
                Ok(request) => BranchEdit::Edited(request),
                Err(_) => BranchEdit::Skip,
            },
            (edit, _) => edit,
        };
        let (request, uri) = match edit {
            BranchEdit::Unchanged => (None, target.uri.clone()),
            BranchEdit::Edited(request) => {
                let uri = request
                    .request_uri_bytes()
                    .map(|u| request.share(u))
                    .unwrap_or_else(|| target.uri.clone());
                (Some(request), uri)
            }
            BranchEdit::Skip => {
                info!(target: "moonroute::proxy::relay::branch", target = %String::from_utf8_lossy(&target.uri), "branch skipped by the router");
                return call.context.on_branch_unreachable(branch, now, more);
            }
        };
        self.next_unique += 1;
        let branch_id = via_branch::attempt(&call.branch_base, self.loop_index, self.next_unique);
        let parts = CopyParts {
            request: request.as_ref().unwrap_or(&call.request),
            uri: &uri,
            branch: &branch_id,
            now: wall_clock(),
            tracked: call.tracked,
        };
        // The script's destination URI wins; then a Path (the route) over the received
        // address (RFC 5626 §5.3 order).
        let pinned = target
            .destination
            .filter(|_| target.route.is_empty() && target.next_hop_uri.is_none());
        if let Some((kind, addr)) = pinned {
            let first = first_copy(&self.me, &parts, call.inbound, call.record_route);
            make_room(&mut call.branches, branch);
            let only = Candidate {
                kind,
                addr,
                tls_name: None,
            };
            call.branches[branch.0] = Some(BranchRun {
                request,
                uri,
                current: None,
                remaining: VecDeque::from([only]),
                pinned: true,
            });
            return match first {
                Ok(first) => {
                    let next = NextAttempt {
                        branch_id,
                        first: Some(first),
                    };
                    self.attempt(server, branch, next, now, out, more)
                }
                Err(reason) => self.branch_unreachable(server, branch, reason, now, more),
            };
        }
        let planned =
            first_copy(&self.me, &parts, call.inbound, call.record_route).and_then(|first| {
                let hop = match &target.next_hop_uri {
                    // `req.du`: where to, whatever the Request-URI and Route say.
                    Some(uri) => next_hop_of_uri(uri)
                        .map_err(|_| "the destination URI (du) has no next hop")?,
                    None => next_hop(parts.request, parts.uri).map_err(|_| "no next hop")?,
                };
                Ok((hop, first))
            });
        make_room(&mut call.branches, branch);
        call.branches[branch.0] = Some(BranchRun {
            request,
            uri,
            current: None,
            remaining: VecDeque::new(),
            pinned: false,
        });
        let (hop, first) = match planned {
            Ok(planned) => planned,
            Err(reason) => return self.branch_unreachable(server, branch, reason, now, more),
        };
        let query = query_of(&hop);
        match dns::numeric(&query) {
            Some(Ok(candidates)) => {
                if let Some(run) = self.run_mut(server, branch) {
                    run.remaining = candidates.into();
                }
                let next = NextAttempt {
                    branch_id,
                    first: Some(first),
                };
                self.attempt(server, branch, next, now, out, more);
            }
            Some(Err(error)) => {
                info!(target: "moonroute::proxy::relay::branch", host = %hop.host, %error, "next hop unusable");
                self.branch_unreachable(server, branch, "next hop unusable", now, more)
            }
            None => {
                if self
                    .ask_resolve(query, Resolving::Branch { server, branch }, out)
                    .is_err()
                {
                    self.branch_unreachable(
                        server,
                        branch,
                        "too many DNS lookups in flight",
                        now,
                        more,
                    )
                }
            }
        }
    }

    pub(super) fn run_mut(&mut self, server: TxId, branch: BranchId) -> Option<&mut BranchRun> {
        self.calls
            .get_mut(&server)?
            .branches
            .get_mut(branch.0)?
            .as_mut()
    }

    pub(super) fn branch_unreachable(
        &mut self,
        server: TxId,
        branch: BranchId,
        reason: &str,
        now: Instant,
        more: &mut Vec<ContextAction>,
    ) {
        if let Some(call) = self.calls.get_mut(&server) {
            let uri = call
                .branches
                .get(branch.0)
                .and_then(Option::as_ref)
                .map(|run| &run.uri);
            info!(target: "moonroute::proxy::relay::branch", target = %String::from_utf8_lossy(uri.map_or(&b""[..], |u| u)), reason, "branch unreachable");
            call.context.on_branch_unreachable(branch, now, more);
        }
    }

    /// A new Via branch ID for the next attempt of a branch of the call in `server`.
    pub(super) fn next_attempt(&mut self, server: TxId) -> NextAttempt {
        self.next_unique += 1;
        let base = self
            .calls
            .get(&server)
            .map_or("", |c| c.branch_base.as_str());
        NextAttempt {
            branch_id: via_branch::attempt(base, self.loop_index, self.next_unique),
            first: None,
        }
    }

    /// Asks for the branch to be sent to the next of its remaining addresses that takes a
    /// copy (RFC 3263 §4.3), with `next`'s branch ID and, where it leaves that way, its copy
    /// built for the first attempt. With no address left the branch is unreachable (503).
    pub(super) fn attempt(
        &mut self,
        server: TxId,
        branch: BranchId,
        next: NextAttempt,
        now: Instant,
        out: &mut RelayActions,
        more: &mut Vec<ContextAction>,
    ) {
        let NextAttempt {
            branch_id,
            mut first,
        } = next;
        let (me, bound, now_wall) = (&self.me, &self.bound, wall_clock());
        let Some(call) = self.calls.get_mut(&server) else {
            return;
        };
        let Some(Some(run)) = call.branches.get_mut(branch.0) else {
            return;
        };
        while let Some(candidate) = run.remaining.pop_front() {
            let parts = CopyParts {
                request: run.request.as_ref().unwrap_or(&call.request),
                uri: &run.uri,
                branch: &branch_id,
                now: now_wall,
                tracked: call.tracked,
            };
            let built = copy_for(
                me,
                bound,
                &parts,
                first.take(),
                &candidate,
                call.inbound,
                call.record_route,
            );
            match built {
                Ok((copy, dest)) => {
                    let dest = Destination {
                        reuse_only: run.pinned && dest.kind.is_stream(),
                        ..dest
                    };
                    let purpose = ClientPurpose::Branch(Attempt {
                        server,
                        branch,
                        branch_id,
                    });
                    return out.push(RelayAction::StartClient {
                        request: copy,
                        dest,
                        purpose,
                    });
                }
                Err(reason) => {
                    debug!(target: "moonroute::proxy::relay::branch", addr = %candidate.addr, transport = %candidate.kind, reason, "skipping address");
                }
            }
        }
        let uri = String::from_utf8_lossy(&run.uri).into_owned();
        info!(target: "moonroute::proxy::relay::branch", target = %uri, "branch unreachable: no address of its next hop could be used");
        call.context.on_branch_unreachable(branch, now, more);
    }

    /// RFC 3263 §4.3: the current attempt of a branch failed (transport error, timeout or
    /// 503); if the branch has addresses left it moves on, unseen by the response context.
    /// False when there is nothing to fail over to: the outcome then goes to the context.
    pub(super) fn fail_over(
        &mut self,
        server: TxId,
        branch: BranchId,
        client: TxId,
        now: Instant,
        out: &mut RelayActions,
    ) -> bool {
        let Some(call) = self.calls.get_mut(&server) else {
            return false;
        };
        let open = matches!(
            call.context.branch_state(branch),
            Some(BranchState::Pending | BranchState::Proceeding)
        );
        let Some(Some(run)) = call.branches.get_mut(branch.0) else {
            return false;
        };
        let is_current = run.current.as_ref().is_some_and(|(tx, _)| *tx == client);
        if call.cancelled || !open || !is_current || run.remaining.is_empty() {
            return false;
        }
        if let Some((_, dest)) = run.current.take() {
            info!(target: "moonroute::proxy::relay::branch", addr = %dest.addr, transport = %dest.kind, left = run.remaining.len(), "next hop failed; trying its next address");
        }
        self.branch_of.remove(&client);
        let mut more = Vec::new();
        let next = self.next_attempt(server);
        self.attempt(server, branch, next, now, out, &mut more);
        self.apply(server, more, now, out);
        true
    }

    /// Cancels the current attempt of `branch`, if one was sent (§16.10).
    pub(super) fn cancel_branch(&mut self, server: TxId, branch: BranchId, out: &mut RelayActions) {
        let Some((client, dest)) = self
            .calls
            .get(&server)
            .and_then(|c| c.branches.get(branch.0))
            .and_then(|run| run.as_ref()?.current.clone())
        else {
            return;
        };
        out.push(RelayAction::CancelClient { client, dest });
    }
}
