//! Carrying out what a call's response context decides (RFC 3261 §16.7): start branches,
//! send responses upstream, cancel branches (§16.10), arm Timer C (§16.8), and ask the router's
//! failure hooks when branches fail (§16.7 step 6's "choose the best response" moment).

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::time::Instant;

use super::timers::{apply_timers, STALE_TIMER_C_SLACK};
use super::{Relay, RelayAction, RelayActions};
use crate::proxy::response_context::ContextAction;
use crate::proxy::router::FailureDecision;
use crate::transaction::layer::TxId;

impl Relay {
    pub(super) fn apply(
        &mut self,
        server: TxId,
        actions: Vec<ContextAction>,
        now: Instant,
        out: &mut RelayActions,
    ) {
        let mut queue: VecDeque<ContextAction> = actions.into();
        while let Some(action) = queue.pop_front() {
            let mut more = Vec::new();
            match action {
                ContextAction::StartBranch { branch, target } => {
                    self.start_branch(server, branch, &target, now, out, &mut more)
                }
                ContextAction::ForwardUpstream(response)
                | ContextAction::FinalUpstream(response) => {
                    if let (Some(dialogs), Some(call)) = (&self.dialogs, self.calls.get(&server)) {
                        dialogs.on_upstream_response(&call.request, &response, now);
                        self.dialogs_after_router();
                    }
                    let status = response.status().unwrap_or(500);
                    out.push(RelayAction::ServerRespond {
                        tx: server,
                        status,
                        response: response.to_bytes(),
                    });
                }
                ContextAction::Cancel(branches) => {
                    for branch in branches {
                        self.cancel_branch(server, branch, out);
                    }
                }
                ContextAction::StartTimerC { branch, at } => {
                    self.timer_c_queue.push(Reverse((at, server, branch.0)));
                    if self.timer_c_queue.len() > 4 * self.calls.len() + STALE_TIMER_C_SLACK {
                        self.compact_timer_c();
                    }
                }
                ContextAction::BranchSetFailed { best } => {
                    let Some(call) = self.calls.get_mut(&server) else {
                        continue;
                    };
                    let outcomes = match call.handle {
                        Some(_) => call.context.outcomes(),
                        None => Vec::new(),
                    };
                    let request = call.failover_request.as_ref().unwrap_or(&call.request);
                    match self
                        .router
                        .on_failure(call.handle, request, &best, &outcomes)
                    {
                        FailureDecision::Targets {
                            targets,
                            timers,
                            request,
                        } if !targets.is_empty() => {
                            apply_timers(call, timers);
                            if let Some(request) = request {
                                call.failover_request = Some(*request);
                            }
                            call.context.add_targets(targets, now, &mut more)
                        }
                        FailureDecision::Reply {
                            code,
                            reason,
                            headers,
                        } => call.context.send_reply(code, &reason, &headers, &mut more),
                        _ => call.context.send_final(&mut more),
                    }
                }
                ContextAction::BranchFailed(branch) => {
                    let Some(call) = self.calls.get(&server) else {
                        continue;
                    };
                    let (Some(handle), Some(outcome)) = (call.handle, call.context.outcome(branch))
                    else {
                        continue;
                    };
                    let response = || call.context.branch_response(branch);
                    self.router
                        .on_branch_failure(handle, &call.request, &outcome, &response);
                }
            }
            queue.extend(more);
        }
        self.settle(server);
        let kept = self.calls.get(&server).map_or(0, |call| call.footprint());
        out.push(RelayAction::ChargeServer {
            tx: server,
            bytes: kept,
        });
    }
}
