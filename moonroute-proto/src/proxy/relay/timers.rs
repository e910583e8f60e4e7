//! The relay's timers: Timer C of INVITE branches (RFC 3261 §16.8, `fr_inv_timer`) and the
//! failure timer of each attempt (Kamailio's `fr_timer`): an attempt that hears nothing in
//! time moves to its next address or is given up as a 408 (§16.7 step 2's timeout).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use tracing::info;

use super::{Call, Relay, RelayActions};
use crate::dialog::DialogTracker;
use crate::memory::shrink_heap_if_sparse;
use crate::proxy::response_context::BranchId;
use crate::proxy::router::FailureTimers;
use crate::transaction::layer::TxId;

/// Timer C entries kept beyond four per call before the queue is compacted.
pub(super) const STALE_TIMER_C_SLACK: usize = 1024;

/// The failure timers a failure route set for the branches it adds (`t_set_fr` in
/// `on_failure`), from now on.
pub(super) fn apply_timers(call: &mut Call, timers: FailureTimers) {
    if let Some(no_answer) = timers.no_answer {
        call.context.set_timer_c(no_answer);
    }
    if let Some(no_response) = timers.no_response {
        call.fr_timer = Some(no_response);
    }
}

impl Relay {
    pub fn next_deadline(&self) -> Option<Instant> {
        let timer_c = self.timer_c_queue.peek().map(|Reverse((at, _, _))| *at);
        let fr = self.fr_queue.peek().map(|Reverse((at, ..))| *at);
        let dialogs = self.dialogs.as_ref().and_then(DialogTracker::next_deadline);
        timer_c.into_iter().chain(fr).chain(dialogs).min()
    }

    pub fn on_timer(&mut self, now: Instant, out: &mut RelayActions) {
        while let Some(Reverse((at, server, branch))) = self.timer_c_queue.peek().copied() {
            if at > now {
                break;
            }
            self.timer_c_queue.pop();
            let mut actions = Vec::new();
            let mut span = None;
            if let Some(call) = self.calls.get_mut(&server) {
                span = Some(crate::logging::message_span(&call.request));
                call.context.on_timer_c(BranchId(branch), now, &mut actions);
            }
            let _entered = span.as_ref().map(tracing::Span::enter);
            self.apply(server, actions, now, out);
        }
        shrink_heap_if_sparse(&mut self.timer_c_queue);
        while let Some(Reverse((at, server, branch, client))) = self.fr_queue.peek().copied() {
            if at > now {
                break;
            }
            self.fr_queue.pop();
            self.on_fr_timer(server, BranchId(branch), client, now, out);
        }
        shrink_heap_if_sparse(&mut self.fr_queue);
        if let Some(dialogs) = &self.dialogs {
            let byes = dialogs.on_timer(now);
            self.send_byes(byes, None, out);
            self.dialogs_after_router();
        }
    }

    /// The failure timer of attempt `client` of `branch` fired: if the attempt is still the
    /// branch's and has heard nothing, the branch moves on to its next address (RFC 3263
    /// §4.3, as on a timeout) or, with none left, is given up as a 408.
    fn on_fr_timer(
        &mut self,
        server: TxId,
        branch: BranchId,
        client: TxId,
        now: Instant,
        out: &mut RelayActions,
    ) {
        let Some(call) = self.calls.get(&server) else {
            return;
        };
        let current = call
            .branches
            .get(branch.0)
            .and_then(|run| run.as_ref()?.current.as_ref());
        let Some((_, dest)) = current.filter(|(tx, _)| *tx == client) else {
            return;
        };
        if !call.context.awaits_response(branch) {
            return;
        }
        let span = crate::logging::message_span(&call.request);
        let _entered = span.enter();
        info!(target: "moonroute::proxy::relay::timers", addr = %dest.addr, transport = %dest.kind, after_ms = call.fr_timer.map_or(0, |d| d.as_millis() as u64), "no response within the failure timer (fr_timer)");
        if self.fail_over(server, branch, client, now, out) {
            return;
        }
        let mut actions = Vec::new();
        if let Some(call) = self.calls.get_mut(&server) {
            call.context.give_up(branch, now, &mut actions);
        }
        self.apply(server, actions, now, out);
    }

    /// Timer C is never cancelled (§16.8 resets it on every provisional, and a call ends long
    /// before its 3 minutes): entries of calls gone or of an earlier reset are dropped once
    /// they outnumber the calls, or at 1,000 calls/s the queue would hold 180,000 of them.
    pub(super) fn compact_timer_c(&mut self) {
        let calls = &self.calls;
        let due: Vec<_> = std::mem::take(&mut self.timer_c_queue)
            .into_iter()
            .filter(|Reverse((at, server, branch))| {
                calls
                    .get(server)
                    .is_some_and(|call| call.context.timer_c_at(BranchId(*branch)) == Some(*at))
            })
            .collect();
        self.timer_c_queue = BinaryHeap::from(due);
        shrink_heap_if_sparse(&mut self.timer_c_queue);
    }
}
