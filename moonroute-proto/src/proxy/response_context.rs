//! The response context of a stateful proxy (RFC 3261 §16.7, amended by RFC 6026 for 2xx),
//! with forking order (§16.6, §8.1.3.4), Timer C (§16.8) and CANCEL handling (§16.10): sans-IO,
//! no sockets, no clock.
//!
//! One [`ResponseContext`] exists per proxied request. It owns the set of branches (one client
//! transaction each, run by the caller), decides which responses go upstream and when, and
//! which branches to start or cancel. Like the transaction machines it takes an explicit `now`
//! and pushes [`ContextAction`]s; Timer C is never cancelled: a firing that no longer applies
//! (the branch finished, or the timer was reset later) is ignored.
//!
//! Forking order: targets are grouped by q value; the highest group is tried in parallel and a
//! lower group only once every branch of the higher ones has failed — the "groups of decreasing
//! q-values serially, each group in parallel" approach of §8.1.3.4, which §16.6 leaves open
//! ("the proxy MAY process the targets in any order").
//!
//! When the last branch of the last group fails and new branches are still allowed, the context
//! does not answer upstream by itself: it emits [`ContextAction::BranchSetFailed`] so the core
//! (a script's failure route) may call [`ResponseContext::add_targets`] (serial forking /
//! failover), [`ResponseContext::send_final`] (which emits [`ContextAction::FinalUpstream`])
//! or [`ResponseContext::send_reply`] (the failure route's own final instead of the best).
//! After a 6xx (§16.7 step 5: "MUST NOT create any new branches") or an upstream CANCEL
//! (§16.10) no branch may be added, so the final goes upstream at once.

use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::sip::{HeaderName, Message, ResponseBuilder};

/// How long a branch that was CANCELled on Timer C (§16.8) may take to send its final response
/// before it counts as a 408: 64*T1 with the default T1, the same bound as Timers B and F.
/// Without it a downstream that never answers the CANCEL would keep the context alive forever,
/// since an INVITE client transaction in Proceeding has no timeout of its own (§17.1.1.2).
const CANCEL_GRACE: Duration = Duration::from_secs(32);

/// Index of a branch in its context, in the order the branches were started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BranchId(pub usize);

/// Where a branch stands, as the context sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchState {
    /// Request sent, nothing heard yet: a CANCEL may not be sent yet (§9.1).
    Pending,
    /// Got a provisional response (any 1xx, 100 included): CANCEL is allowed (§9.1).
    Proceeding,
    /// Got a final response, or counts as a 408 (Timer B/F, transport error, Timer C).
    Done,
}

/// One target of the target set (§16.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub uri: Bytes,
    /// The q value in thousandths (Contact "q" parameter, §20.10); 1000 when absent.
    pub q: u16,
    /// A pre-loaded route set for this target, Route values in order (top first): the Path
    /// a contact was registered through (RFC 3327 §5.3). Usually empty.
    pub route: Vec<Bytes>,
    /// Where to send the branch instead of where its Request-URI or route says (Kamailio's
    /// `$du`): the address a contact behind a NAT registered from, on the connection it
    /// registered on for TCP/TLS (never a new one). Ignored when `route` is not empty: a Path
    /// wins (RFC 3327 §5.3, RFC 5626 §5.3 order).
    pub destination: Option<(crate::transport::TransportKind, std::net::SocketAddr)>,
    /// The script's destination URI (`req.du`, Kamailio's `$du`): the branch goes to this
    /// URI's next hop (RFC 3263), its Request-URI and Route headers left as they are. Wins
    /// over `route` and `destination`. Set only by the router, never from the message.
    pub next_hop_uri: Option<Bytes>,
    /// Why this contact cannot be reached now (its owning node in a cluster is down,
    /// `moonroute::cluster`): its branch ends at once as 480 (Temporarily Unavailable), the other
    /// targets are forked as usual.
    pub unavailable: Option<String>,
}

impl Target {
    /// A target without a pre-loaded route.
    pub fn new(uri: Bytes, q: u16) -> Target {
        Target {
            uri,
            q,
            route: Vec::new(),
            destination: None,
            next_hop_uri: None,
            unavailable: None,
        }
    }
}

/// One thing the caller must do, in order.
#[derive(Debug)]
pub enum ContextAction {
    /// Start a client transaction for this target (the caller builds the copy, §16.6).
    StartBranch { branch: BranchId, target: Target },
    /// Forward this response upstream now (1xx except 100, every 2xx; §16.7 step 5, RFC 6026
    /// §8.2); its top Via is already removed (§16.7 step 3).
    ForwardUpstream(Message),
    /// Send CANCEL on these branches (§16.7 step 10 after a 2xx or a 6xx, §16.8 Timer C,
    /// §16.10 upstream CANCEL). Only branches that got a provisional response are listed
    /// (§9.1); the others are listed later, when their first provisional arrives.
    Cancel(Vec<BranchId>),
    /// Timer C for an INVITE branch (§16.8): call `on_timer_c(branch, now)` at `at`. A firing
    /// that no longer applies is ignored, so the caller never cancels it.
    StartTimerC { branch: BranchId, at: Instant },
    /// Every branch has failed, no 2xx went upstream and new branches are still allowed. The
    /// caller now calls `add_targets` (a new serial group) or `send_final`. `best` is the
    /// response `send_final` would send right now (§16.7 steps 6-7 applied), for inspection,
    /// except that a 503 is still a 503 (`send_final` turns it into a 500).
    BranchSetFailed { best: Message },
    /// The best final response goes upstream (§16.7 steps 6-9); the context sends no other
    /// final except 2xx to INVITE that still arrive (§16.7 step 5).
    FinalUpstream(Message),
    /// `branch` ended without a 2xx (a final 3xx-6xx, or the 408/503/487 it counts as): its
    /// outcome is [`ResponseContext::outcome`], the response [`ResponseContext::branch_response`]
    /// (Kamailio's `event_route[tm:branch-failure]`). Emitted before any `BranchSetFailed`
    /// the same event causes.
    BranchFailed(BranchId),
}

/// How one branch ended, as the router's failure hooks see it (`res.branches`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchOutcome {
    /// The branch's target (its Request-URI, §16.6 step 2).
    pub uri: Bytes,
    /// The final status; 0 while the branch is still waiting for one.
    pub code: u16,
    /// The reason phrase received, or the one of the response this proxy counts it as.
    pub reason: String,
    /// No final response in time (Timer B/F, Timer C, the failure timer of `t_set_fr`): the
    /// branch counts as a 408 of this proxy's making.
    pub timeout: bool,
    /// The code is this proxy's (408 timeout, 503 unreachable, 487 cancelled before it was
    /// sent), not a response the next hop sent.
    pub local: bool,
}

/// What ended a branch.
#[derive(Clone, Debug)]
enum Ending {
    /// A final response came, with this reason phrase.
    Received(Bytes),
    /// Nothing final in time: a 408 (§16.7 step 6, §16.8).
    TimedOut,
    /// The proxy's own 503 (unreachable) or 487 (cancelled before it was sent).
    Local,
}

struct Branch {
    /// The target's Request-URI (shared with the target, no copy).
    uri: Bytes,
    /// The final status and what ended the branch, once it is `Done`.
    ending: Option<(u16, Ending)>,
    state: BranchState,
    /// A CANCEL is wanted for this branch (step 10, §16.10) but may wait for a provisional.
    cancel_wanted: bool,
    cancel_sent: bool,
    /// The branch was given up without a final (Timer C with nothing heard): a provisional
    /// that still arrives is answered with a CANCEL so the callee stops ringing.
    abandoned: bool,
    /// The current Timer C deadline; earlier firings are stale (§16.8 resets it on 1xx).
    timer_c_at: Option<Instant>,
}

/// A final non-2xx response kept for choosing the best one (§16.7 step 4).
struct Stored {
    /// The branch it came from.
    branch: usize,
    code: u16,
    /// `None`: the branch counts as this code without a response of its own (408 for Timer
    /// B/F/C, 503 for an unreachable next hop); synthesized only if it is chosen.
    response: Option<Message>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Branches are running or about to be started.
    Running,
    /// `BranchSetFailed` was emitted; waiting for `add_targets`, `send_final` or `send_reply`.
    AwaitingDecision,
    /// A final response (a 2xx, the best non-2xx or the failure route's own) went upstream.
    FinalSent,
}

/// Whether [`ResponseContext::best_response`] applies §16.7 step 6's 503-to-500 conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upstream {
    /// The response goes upstream now.
    Convert503,
    /// The failure route inspects it (`BranchSetFailed`); it may still become a 500.
    Keep503,
}

/// The response context of one proxied request (§16.7).
pub struct ResponseContext {
    /// The request as received, for synthesized responses; let go once a final went
    /// upstream (see [`ResponseContext::shed`]).
    request: Option<Message>,
    is_invite: bool,
    timer_c: Duration,
    branches: Vec<Branch>,
    /// Serial groups not started yet, highest q first.
    groups: VecDeque<Vec<Target>>,
    stored: Vec<Stored>,
    /// A 6xx arrived or upstream CANCELled: no new branches (§16.7 step 5, §16.10).
    closed: bool,
    phase: Phase,
    /// A 2xx went upstream: its retransmissions, and 2xx of other forks, may still come
    /// (RFC 6026 §8.2) and go up too.
    answered: bool,
}

impl ResponseContext {
    /// Creates the context and starts the highest-q group of `targets` in parallel (§16.6,
    /// §8.1.3.4); lower groups follow serially. `is_invite` enables Timer C (§16.6 step 11,
    /// §16.8) and CANCELs (§9.1: non-INVITE requests are not cancelled). `request` is the
    /// request as received, used to synthesize 408 and 500 (§16.7 step 6). With no targets
    /// at all the set has failed at once: `BranchSetFailed` with a 408.
    pub fn new(
        request: Message,
        targets: Vec<Target>,
        is_invite: bool,
        timer_c: Duration,
        now: Instant,
        out: &mut Vec<ContextAction>,
    ) -> ResponseContext {
        let mut ctx = ResponseContext {
            request: Some(request),
            is_invite,
            timer_c,
            branches: Vec::new(),
            groups: VecDeque::new(),
            stored: Vec::new(),
            closed: false,
            phase: Phase::Running,
            answered: false,
        };
        ctx.groups.extend(group_by_q(targets));
        ctx.advance(now, out);
        ctx
    }

    /// A response arrived on `branch` from its client transaction (§16.7).
    ///
    /// The top Via is removed (step 3). A response that carries no other Via would be "meant
    /// for this element" (step 3), but this one matched a branch's client transaction, whose
    /// request carried the upstream Vias below ours: the callee answered with only our Via
    /// (e.g. a 487 built from our CANCEL's, which has only ours, §9.1). It goes on with the
    /// Vias of the request as received (the server transaction's, §16.7 step 9), its code
    /// kept; `true` is returned so the caller can log the callee's mistake. Then:
    /// 100 is absorbed (step 5); other 1xx reset Timer C (step 2) and go upstream until a final
    /// has been sent (step 5); every 2xx goes upstream, to INVITE even after a final (RFC 6026
    /// §8.2), and CANCELs the other branches (step 10); 3xx-6xx are stored (step 4), a 6xx also
    /// CANCELs the other branches and closes the set (steps 5, 10); once no branch is left the
    /// best response is chosen (step 6).
    pub fn on_response(
        &mut self,
        branch: BranchId,
        mut response: Message,
        now: Instant,
        out: &mut Vec<ContextAction>,
    ) -> bool {
        let Some(code) = response.status() else {
            return false;
        };
        let Some(state) = self.branches.get(branch.0).map(|b| b.state) else {
            return false;
        };
        let ours_removed = matches!(response.remove_first_value(HeaderName::Via), Ok(true));
        let only_ours = ours_removed && !response.has(HeaderName::Via);
        let repaired = only_ours && self.restore_vias(&mut response);
        let forwardable = ours_removed && (!only_ours || repaired);
        match code {
            100..=199 => self.on_provisional(branch, code, response, forwardable, now, out),
            200..=299 => {
                let reason = response_reason(&response);
                self.finish_branch(branch, code, Ending::Received(reason));
                // RFC 6026 §8.2: every 2xx to INVITE is forwarded, even after a final went
                // upstream; for other methods only until the first final (step 5).
                if forwardable && (self.is_invite || self.phase != Phase::FinalSent) {
                    out.push(ContextAction::ForwardUpstream(response));
                    self.answered = true;
                }
                self.phase = Phase::FinalSent;
                self.groups.clear();
                // Step 10: the call is answered, the other branches are no longer wanted.
                self.cancel_pending(out);
            }
            _ => {
                if state == BranchState::Done {
                    // A final was already counted for this branch (e.g. a 487 after Timer C).
                    return repaired;
                }
                let reason = response_reason(&response);
                self.finish_branch(branch, code, Ending::Received(reason));
                out.push(ContextAction::BranchFailed(branch));
                if forwardable {
                    self.stored.push(Stored {
                        branch: branch.0,
                        code,
                        response: Some(response),
                    });
                }
                if code >= 600 {
                    // Step 5: no new branches; step 10: SHOULD cancel the pending ones.
                    self.closed = true;
                    self.groups.clear();
                    self.cancel_pending(out);
                }
                self.advance(now, out);
            }
        }
        repaired
    }

    /// Gives `response`, left without any Via, the Vias of the request as received, in
    /// order; `false` if one could not be written, or the request was already let go (a
    /// late 2xx after the final went upstream): the response is then not forwarded.
    fn restore_vias(&self, response: &mut Message) -> bool {
        let Some(request) = self.request.as_ref() else {
            return false;
        };
        let vias: Vec<&[u8]> = request.headers_named("Via").collect();
        // Each goes above the previous one: inserted bottom first, they end up in order.
        !vias.is_empty()
            && vias
                .iter()
                .rev()
                .all(|via| response.prepend_header("Via", via).is_ok())
    }

    fn on_provisional(
        &mut self,
        branch: BranchId,
        code: u16,
        response: Message,
        forwardable: bool,
        now: Instant,
        out: &mut Vec<ContextAction>,
    ) {
        let (is_invite, timer_c) = (self.is_invite, self.timer_c);
        let Some(b) = self.branches.get_mut(branch.0) else {
            return;
        };
        if b.state == BranchState::Pending {
            b.state = BranchState::Proceeding;
        }
        // §9.1: a CANCEL wanted earlier could not be sent before a provisional arrived.
        if is_invite && (b.cancel_wanted || b.abandoned) && !b.cancel_sent {
            b.cancel_sent = true;
            out.push(ContextAction::Cancel(vec![branch]));
        }
        if b.state == BranchState::Done {
            return;
        }
        // §16.7 step 2: only 101-199 reset Timer C; a 100 says nothing about the callee.
        if is_invite && code > 100 && !b.cancel_sent {
            let at = now + timer_c;
            b.timer_c_at = Some(at);
            out.push(ContextAction::StartTimerC { branch, at });
        }
        // Step 5: 100 is hop-by-hop; other provisionals go up until a final has been sent.
        if code > 100 && forwardable && self.phase != Phase::FinalSent {
            out.push(ContextAction::ForwardUpstream(response));
        }
    }

    /// The branch's client transaction timed out (Timer B/F) or hit a transport error: the
    /// branch counts as a 408 (§16.7 step 6, §16.8, §17.1.4).
    pub fn on_branch_failed(
        &mut self,
        branch: BranchId,
        now: Instant,
        out: &mut Vec<ContextAction>,
    ) {
        if self.branch_state(branch) == Some(BranchState::Pending)
            || self.branch_state(branch) == Some(BranchState::Proceeding)
        {
            self.fail_as_408(branch, out);
            self.advance(now, out);
        }
    }

    /// Whether `branch` is still waiting for its first response: nothing heard on an INVITE
    /// branch (a provisional ends that wait, §17.1.1.2), no final on another. What the failure
    /// timer of [`ResponseContext::give_up`] applies to.
    pub fn awaits_response(&self, branch: BranchId) -> bool {
        match self.branch_state(branch) {
            Some(BranchState::Pending) => true,
            Some(BranchState::Proceeding) => !self.is_invite,
            _ => false,
        }
    }

    /// The failure timer of `branch` fired (Kamailio's `fr_timer`, `t_set_fr`): if it still
    /// [awaits a response](ResponseContext::awaits_response) it is given up and counts as a
    /// 408 (§16.7 step 6), as on Timer B/F but sooner. Its client transaction runs on and
    /// absorbs what still comes (§17.1): a provisional that arrives later is answered with a
    /// CANCEL (§9.1, as after Timer C), a 2xx still goes upstream (RFC 6026). False when the
    /// firing no longer applies.
    pub fn give_up(
        &mut self,
        branch: BranchId,
        now: Instant,
        out: &mut Vec<ContextAction>,
    ) -> bool {
        if !self.awaits_response(branch) {
            return false;
        }
        if let Some(b) = self.branches.get_mut(branch.0) {
            b.abandoned = true;
        }
        self.fail_as_408(branch, out);
        self.advance(now, out);
        true
    }

    /// The duration of Timer C for the branches started from now on and the resets to come
    /// (Kamailio's `fr_inv_timer`, the first argument of `t_set_fr`).
    pub fn set_timer_c(&mut self, timer_c: Duration) {
        self.timer_c = timer_c;
    }

    /// The branch could not be sent (no route to its next hop, or a transport error): it counts
    /// as a 503 (§8.1.3.1), which becomes a 500 if it is the best response (§16.7 step 6).
    pub fn on_branch_unreachable(
        &mut self,
        branch: BranchId,
        now: Instant,
        out: &mut Vec<ContextAction>,
    ) {
        self.on_branch_ended(branch, 503, now, out);
    }

    /// The branch ended without a response of its own and counts as `code`: 503 when it
    /// could not be sent, 487 when a CANCEL came before it was (§16.10).
    pub fn on_branch_ended(
        &mut self,
        branch: BranchId,
        code: u16,
        now: Instant,
        out: &mut Vec<ContextAction>,
    ) {
        if matches!(
            self.branch_state(branch),
            Some(BranchState::Pending | BranchState::Proceeding)
        ) {
            self.finish_branch(branch, code, Ending::Local);
            out.push(ContextAction::BranchFailed(branch));
            self.stored.push(Stored {
                branch: branch.0,
                code,
                response: None,
            });
            self.advance(now, out);
        }
    }

    /// Timer C fired for `branch` (§16.8). A stale firing is ignored. If the branch got a
    /// provisional it is CANCELled and given [`CANCEL_GRACE`] to send its final (the 487); if
    /// it got nothing, or the grace ran out, it counts as a 408.
    pub fn on_timer_c(&mut self, branch: BranchId, now: Instant, out: &mut Vec<ContextAction>) {
        let Some(b) = self.branches.get_mut(branch.0) else {
            return;
        };
        match b.timer_c_at {
            Some(at) if now >= at && b.state != BranchState::Done => {}
            _ => return,
        }
        if b.state == BranchState::Proceeding && !b.cancel_sent {
            b.cancel_wanted = true;
            b.cancel_sent = true;
            let at = now + CANCEL_GRACE;
            b.timer_c_at = Some(at);
            out.push(ContextAction::Cancel(vec![branch]));
            out.push(ContextAction::StartTimerC { branch, at });
            return;
        }
        // Nothing heard (§16.8: "as if the transaction received a 408"), or the CANCEL was
        // not answered in time.
        b.abandoned = true;
        self.fail_as_408(branch, out);
        self.advance(now, out);
    }

    /// A CANCEL matching the request arrived from upstream (§16.10): every pending branch is
    /// CANCELled and no new branch is started. The branches' finals (typically 487) then make
    /// up the best response as usual. If the core was still deciding after `BranchSetFailed`,
    /// the final goes upstream now.
    pub fn cancel_all(&mut self, out: &mut Vec<ContextAction>) {
        self.closed = true;
        self.groups.clear();
        self.cancel_pending(out);
        if self.phase == Phase::AwaitingDecision {
            self.send_final(out);
        }
    }

    /// Adds targets as new serial groups (grouped by q like in `new`), tried after the groups
    /// already queued. Ignored once a final went upstream or the set is closed (6xx, upstream
    /// CANCEL). After `BranchSetFailed` this starts the new group at once; with an empty
    /// `targets` the context keeps waiting for `send_final`.
    pub fn add_targets(
        &mut self,
        targets: Vec<Target>,
        now: Instant,
        out: &mut Vec<ContextAction>,
    ) {
        if self.closed || self.phase == Phase::FinalSent || targets.is_empty() {
            return;
        }
        self.groups.extend(group_by_q(targets));
        if self.phase == Phase::AwaitingDecision {
            self.phase = Phase::Running;
        }
        self.advance(now, out);
    }

    /// After `BranchSetFailed`: sends the best final response upstream (§16.7 steps 6-9).
    /// Does nothing in any other phase.
    pub fn send_final(&mut self, out: &mut Vec<ContextAction>) {
        if self.phase != Phase::AwaitingDecision {
            return;
        }
        self.phase = Phase::FinalSent;
        if let Some(best) = self.best_response(Upstream::Convert503) {
            out.push(ContextAction::FinalUpstream(best));
        }
    }

    /// After `BranchSetFailed`: sends this proxy's own final response upstream instead of the
    /// best one (§16.7 step 6 lets the proxy choose; Kamailio's `t_reply` in a failure route),
    /// built from the request per §8.2.6 (To tag, Via, Call-ID, CSeq, From). A 2xx is not a
    /// failure's answer (the router refuses it): it and anything outside 300-699 send the best
    /// response instead. Does nothing in any other phase.
    pub fn send_reply(
        &mut self,
        code: u16,
        reason: &str,
        headers: &[(String, String)],
        out: &mut Vec<ContextAction>,
    ) {
        if self.phase != Phase::AwaitingDecision {
            return;
        }
        if !(300..=699).contains(&code) {
            return self.send_final(out);
        }
        self.phase = Phase::FinalSent;
        let reply = self
            .synthesize_with(code, reason, headers)
            .or_else(|| self.best_response(Upstream::Convert503));
        if let Some(reply) = reply {
            out.push(ContextAction::FinalUpstream(reply));
        }
    }

    /// True once a final response went upstream and no branch is still waiting for its own
    /// final. 2xx retransmissions to INVITE may still arrive while the client transactions
    /// linger in Accepted (RFC 6026); the caller may keep feeding them until those terminate.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::FinalSent && self.branches.iter().all(|b| b.state == BranchState::Done)
    }

    /// True once nothing that can still arrive would make this context act: it is finished,
    /// and it is not an INVITE answered with a 2xx (whose retransmissions and other forks'
    /// 2xx still go up, RFC 6026 §8.2) nor has a branch given up on Timer C before any
    /// provisional (one that comes late gets its CANCEL, §16.8). Its state can then go: a
    /// late response of its branches is one the context would drop anyway.
    pub fn is_settled(&self) -> bool {
        let cancel_owed = self.branches.iter().any(|b| b.abandoned && !b.cancel_sent);
        self.is_finished() && !(self.is_invite && (self.answered || cancel_owed))
    }

    /// Lets go of what only choosing the final response needed (the stored responses, the
    /// groups not started, the request kept to synthesize one) once a final went upstream:
    /// an answered INVITE lingers with its 2xx forwarding for 64*T1 (RFC 6026), and need not
    /// keep them that long.
    pub fn shed(&mut self) {
        if self.phase == Phase::FinalSent {
            self.request = None;
            self.stored = Vec::new();
            self.groups = VecDeque::new();
        }
    }

    /// Heap bytes this context keeps (see the relay's memory budget charge).
    pub fn heap_bytes(&self) -> usize {
        let stored: usize = self
            .stored
            .iter()
            .map(|s| {
                std::mem::size_of::<Stored>() + s.response.as_ref().map_or(0, Message::heap_bytes)
            })
            .sum();
        let groups: usize = self
            .groups
            .iter()
            .map(|g| g.len() * std::mem::size_of::<Target>())
            .sum();
        self.request.as_ref().map_or(0, Message::heap_bytes)
            + self.branches.capacity() * std::mem::size_of::<Branch>()
            + stored
            + groups
    }

    /// When Timer C of `branch` is due now (earlier firings are stale).
    pub fn timer_c_at(&self, branch: BranchId) -> Option<Instant> {
        self.branches.get(branch.0).and_then(|b| b.timer_c_at)
    }

    pub fn branch_state(&self, branch: BranchId) -> Option<BranchState> {
        self.branches.get(branch.0).map(|b| b.state)
    }

    /// How each branch started so far ended, in the order they were started (`res.branches`).
    pub fn outcomes(&self) -> Vec<BranchOutcome> {
        (0..self.branches.len())
            .filter_map(|i| self.outcome(BranchId(i)))
            .collect()
    }

    /// How `branch` ended (code 0 while it has not).
    pub fn outcome(&self, branch: BranchId) -> Option<BranchOutcome> {
        let b = self.branches.get(branch.0)?;
        let (code, ending) = match &b.ending {
            Some((code, ending)) => (*code, Some(ending)),
            None => (0, None),
        };
        let reason = match ending {
            Some(Ending::Received(reason)) => String::from_utf8_lossy(reason).into_owned(),
            Some(_) => local_reason(code).to_owned(),
            None => String::new(),
        };
        Some(BranchOutcome {
            uri: b.uri.clone(),
            code,
            reason,
            timeout: matches!(ending, Some(Ending::TimedOut)),
            local: matches!(ending, Some(Ending::TimedOut | Ending::Local)),
        })
    }

    /// The final response `branch` ended with: the one received (its top Via removed), or
    /// the one this proxy counts it as (408, 503, 487), synthesized. `None` once the
    /// context let go of them ([`ResponseContext::shed`]) or while the branch runs.
    pub fn branch_response(&self, branch: BranchId) -> Option<Message> {
        let (code, _) = self.branches.get(branch.0)?.ending.as_ref()?;
        let stored = self.stored.iter().find(|s| s.branch == branch.0);
        match stored.and_then(|s| s.response.as_ref()) {
            Some(response) => Some(response.clone()),
            None => self.synthesize(*code, local_reason(*code)),
        }
    }

    fn finish_branch(&mut self, branch: BranchId, code: u16, ending: Ending) {
        if let Some(b) = self.branches.get_mut(branch.0) {
            b.state = BranchState::Done;
            b.ending = Some((code, ending));
        }
    }

    fn fail_as_408(&mut self, branch: BranchId, out: &mut Vec<ContextAction>) {
        self.finish_branch(branch, 408, Ending::TimedOut);
        out.push(ContextAction::BranchFailed(branch));
        self.stored.push(Stored {
            branch: branch.0,
            code: 408,
            response: None,
        });
    }

    /// Marks every unfinished branch as to be CANCELled and emits the CANCELs allowed now
    /// (§9.1: only after a provisional). Non-INVITE requests are never cancelled (§9.1).
    fn cancel_pending(&mut self, out: &mut Vec<ContextAction>) {
        let mut now_sendable = Vec::new();
        for (i, b) in self.branches.iter_mut().enumerate() {
            if b.state == BranchState::Done || b.cancel_wanted {
                continue;
            }
            b.cancel_wanted = true;
            if self.is_invite && b.state == BranchState::Proceeding {
                b.cancel_sent = true;
                now_sendable.push(BranchId(i));
            }
        }
        if !now_sendable.is_empty() {
            out.push(ContextAction::Cancel(now_sendable));
        }
    }

    /// Called whenever a branch may have ended: starts the next serial group when the current
    /// ones have all failed, or reports the failed set (§16.7 step 6: the final is sent only
    /// when every client transaction of the context is done).
    fn advance(&mut self, now: Instant, out: &mut Vec<ContextAction>) {
        if self.phase != Phase::Running
            || self.branches.iter().any(|b| b.state != BranchState::Done)
        {
            return;
        }
        if !self.closed {
            if let Some(group) = self.groups.pop_front() {
                self.start_group(group, now, out);
                return;
            }
        }
        if self.closed {
            self.phase = Phase::AwaitingDecision;
            self.send_final(out);
        } else if let Some(best) = self.best_response(Upstream::Keep503) {
            self.phase = Phase::AwaitingDecision;
            out.push(ContextAction::BranchSetFailed { best });
        } else {
            // The request cannot even yield a synthesized response (it parsed once, so this
            // is not expected): answer nothing rather than loop.
            self.phase = Phase::FinalSent;
        }
    }

    fn start_group(&mut self, group: Vec<Target>, now: Instant, out: &mut Vec<ContextAction>) {
        for target in group {
            let branch = BranchId(self.branches.len());
            let timer_c_at = self.is_invite.then(|| now + self.timer_c);
            self.branches.push(Branch {
                uri: target.uri.clone(),
                ending: None,
                state: BranchState::Pending,
                cancel_wanted: false,
                cancel_sent: false,
                abandoned: false,
                timer_c_at,
            });
            out.push(ContextAction::StartBranch { branch, target });
            // §16.6 step 11: Timer C starts with the INVITE branch.
            if let Some(at) = timer_c_at {
                out.push(ContextAction::StartTimerC { branch, at });
            }
        }
    }

    /// §16.7 steps 6-7: a 6xx if any (the first received); else the lowest class, within it
    /// the first received, except that in 4xx a response that helps resubmission (401, 407,
    /// 415, 420, 484) is preferred and in 5xx anything is preferred over 503. A chosen 503
    /// becomes a synthesized 500, none at all a synthesized 408. A 401/407 gets the
    /// WWW-Authenticate and Proxy-Authenticate values of every other 401/407 (step 7).
    /// The failure route sees a chosen 503 as it is ([`Upstream::Keep503`]): the conversion
    /// protects the upstream client, while a script deciding on failover (a gateway in
    /// maintenance, `[dispatcher] mark_on`) must tell 503 from 500, as Kamailio's
    /// `t_check_status("503")` does.
    fn best_response(&self, upstream: Upstream) -> Option<Message> {
        let ranked = |s: &Stored| rank(s.code);
        // min_by_key keeps the first of equal keys: first received wins ties.
        let Some((index, chosen)) = self
            .stored
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| ranked(s))
        else {
            return self.synthesize(408, "Request Timeout");
        };
        let mut best = match (&chosen.response, chosen.code) {
            (_, 503) if upstream == Upstream::Convert503 => {
                return self.synthesize(500, "Server Internal Error")
            }
            (None, 503) => return self.synthesize(503, "Service Unavailable"),
            (Some(response), _) => response.clone(),
            (None, 487) => return self.synthesize(487, "Request Terminated"),
            (None, code) => return self.synthesize(code, "Request Timeout"),
        };
        if matches!(chosen.code, 401 | 407) {
            for (i, other) in self.stored.iter().enumerate() {
                let Some(response) = other.response.as_ref().filter(|_| i != index) else {
                    continue;
                };
                if !matches!(other.code, 401 | 407) {
                    continue;
                }
                for name in ["WWW-Authenticate", "Proxy-Authenticate"] {
                    for value in response.headers_named(name) {
                        // The value came from a parsed message, so it has no line break;
                        // should it fail anyway, that one challenge is dropped.
                        let _ = best.append_header(name, value);
                    }
                }
            }
        }
        Some(best)
    }

    /// A response generated by this proxy (§16.7 step 6). Its To tag is derived from the
    /// request so that the same request always gets the same tag (§8.2.6.2).
    fn synthesize(&self, code: u16, reason: &str) -> Option<Message> {
        self.synthesize_with(code, reason, &[])
    }

    /// [`Self::synthesize`] with extra header fields (validated by the router).
    fn synthesize_with(
        &self,
        code: u16,
        reason: &str,
        headers: &[(String, String)],
    ) -> Option<Message> {
        let request = self.request.as_ref()?;
        let mut hasher = DefaultHasher::new();
        request.header(HeaderName::Via).hash(&mut hasher);
        request.header(HeaderName::CallId).hash(&mut hasher);
        request.header(HeaderName::From).hash(&mut hasher);
        let tag = format!("mr{:016x}", hasher.finish());
        let mut builder = ResponseBuilder::new(request, code, reason).to_tag(tag.as_bytes());
        for (name, value) in headers {
            builder = builder.header(name, value.as_bytes());
        }
        Message::parse(builder.build()).ok()
    }
}

/// The reason phrase of a response this proxy counts a branch as.
fn local_reason(code: u16) -> &'static str {
    match code {
        408 => "Request Timeout",
        487 => "Request Terminated",
        503 => "Service Unavailable",
        _ => "Server Internal Error",
    }
}

/// The reason phrase of a received response, shared with its bytes.
fn response_reason(response: &Message) -> Bytes {
    response
        .reason()
        .map(|r| response.share(r))
        .unwrap_or_default()
}

/// Sorts targets by decreasing q (stable, so equal q keep their order) and splits them into
/// groups of equal q (§8.1.3.4).
fn group_by_q(mut targets: Vec<Target>) -> Vec<Vec<Target>> {
    targets.sort_by_key(|t| std::cmp::Reverse(t.q));
    let mut groups: Vec<Vec<Target>> = Vec::new();
    for target in targets {
        match groups.last_mut() {
            Some(group) if group.first().is_some_and(|t| t.q == target.q) => group.push(target),
            _ => groups.push(vec![target]),
        }
    }
    groups
}

/// §16.7 step 6's order of final responses, lowest best: a 6xx, else the lowest class; in
/// 4xx one that helps resubmission (401, 407, 415, 420, 484) first, in 5xx a 503 last.
pub fn rank(code: u16) -> (u8, u8) {
    let class = if code >= 600 { 0 } else { (code / 100) as u8 };
    let preference = match code {
        401 | 407 | 415 | 420 | 484 => 0,
        503 => 2,
        _ => 1,
    };
    (class, preference)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &[u8] = b"INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKup1\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=a1\r\n\
To: <sip:bob@example.com>\r\n\
Call-ID: c1@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@127.0.0.1:5070>\r\n\
Content-Length: 0\r\n\r\n";

    const TIMER_C: Duration = Duration::from_secs(180);

    fn request() -> Message {
        Message::parse(Bytes::from_static(REQUEST)).unwrap()
    }

    /// A response from downstream: it carries the proxy's Via above the upstream one.
    fn resp(code: u16, extra: &[(&str, &[u8])]) -> Message {
        let mut forwarded = request();
        forwarded
            .prepend_header("Via", b"SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKproxy")
            .unwrap();
        let mut builder = ResponseBuilder::new(&forwarded, code, "Test").to_tag(b"down");
        for (name, value) in extra {
            builder = builder.header(name, value);
        }
        Message::parse(builder.build()).unwrap()
    }

    fn target(uri: &'static str, q: u16) -> Target {
        Target::new(Bytes::from_static(uri.as_bytes()), q)
    }

    fn invite(targets: Vec<Target>, now: Instant) -> (ResponseContext, Vec<ContextAction>) {
        let mut out = Vec::new();
        let ctx = ResponseContext::new(request(), targets, true, TIMER_C, now, &mut out);
        (ctx, out)
    }

    fn started(out: &[ContextAction]) -> Vec<(usize, &[u8])> {
        out.iter()
            .filter_map(|a| match a {
                ContextAction::StartBranch { branch, target } => Some((branch.0, &target.uri[..])),
                _ => None,
            })
            .collect()
    }

    fn forwarded(out: &[ContextAction]) -> Vec<u16> {
        out.iter()
            .filter_map(|a| match a {
                ContextAction::ForwardUpstream(m) => m.status(),
                _ => None,
            })
            .collect()
    }

    fn cancels(out: &[ContextAction]) -> Vec<usize> {
        out.iter()
            .filter_map(|a| match a {
                ContextAction::Cancel(b) => Some(b.iter().map(|b| b.0).collect::<Vec<_>>()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn branch_failures(out: &[ContextAction]) -> Vec<usize> {
        out.iter()
            .filter_map(|a| match a {
                ContextAction::BranchFailed(b) => Some(b.0),
                _ => None,
            })
            .collect()
    }

    /// The actions other than `BranchFailed`.
    fn others(out: &[ContextAction]) -> Vec<&ContextAction> {
        out.iter()
            .filter(|a| !matches!(a, ContextAction::BranchFailed(_)))
            .collect()
    }

    #[test]
    fn give_up_counts_a_silent_branch_as_a_timeout_and_cancels_a_late_provisional() {
        let t0 = Instant::now();
        let mut ctx = two_parallel(t0);
        let mut out = Vec::new();
        ctx.on_response(BranchId(1), resp(100, &[]), t0, &mut out);
        assert!(ctx.awaits_response(BranchId(0)));
        assert!(
            !ctx.awaits_response(BranchId(1)),
            "an INVITE branch heard a 100"
        );
        assert!(!ctx.give_up(BranchId(1), t0, &mut out));
        out.clear();
        assert!(ctx.give_up(BranchId(0), t0, &mut out));
        assert_eq!(branch_failures(&out), [0]);
        assert!(!ctx.give_up(BranchId(0), t0, &mut out), "once");
        let outcome = ctx.outcome(BranchId(0)).unwrap();
        assert_eq!(&outcome.uri[..], b"sip:a@127.0.0.1");
        assert_eq!(
            (outcome.code, outcome.timeout, outcome.local),
            (408, true, true)
        );
        assert_eq!(
            ctx.branch_response(BranchId(0)).and_then(|r| r.status()),
            Some(408)
        );
        out.clear();
        ctx.on_response(BranchId(0), resp(180, &[]), t0, &mut out);
        assert_eq!(
            cancels(&out),
            vec![0],
            "§9.1: the CANCEL waited for a provisional"
        );
        assert!(forwarded(&out).is_empty());
        ctx.on_response(BranchId(1), resp(486, &[]), t0, &mut out);
        let outcomes = ctx.outcomes();
        assert_eq!(outcomes.len(), 2);
        assert_eq!((outcomes[1].code, outcomes[1].local), (486, false));
        assert_eq!(outcomes[1].reason, "Test");
        assert_eq!(
            ctx.branch_response(BranchId(1)).and_then(|r| r.status()),
            Some(486)
        );
        assert_eq!(set_failed(&out).and_then(Message::status), Some(408));
    }

    #[test]
    fn a_non_invite_branch_awaits_its_final_after_a_provisional() {
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut ctx = ResponseContext::new(
            request(),
            vec![target("sip:a@127.0.0.1", 1000)],
            false,
            TIMER_C,
            t0,
            &mut out,
        );
        ctx.on_response(BranchId(0), resp(100, &[]), t0, &mut out);
        assert!(ctx.awaits_response(BranchId(0)));
        out.clear();
        assert!(ctx.give_up(BranchId(0), t0, &mut out));
        assert!(cancels(&out).is_empty(), "non-INVITE is never cancelled");
        assert_eq!(set_failed(&out).and_then(Message::status), Some(408));
    }

    #[test]
    fn unreachable_and_unsent_branches_are_the_proxys_own_outcomes() {
        let t0 = Instant::now();
        let mut ctx = two_parallel(t0);
        let mut out = Vec::new();
        ctx.on_branch_unreachable(BranchId(0), t0, &mut out);
        ctx.on_branch_ended(BranchId(1), 487, t0, &mut out);
        assert_eq!(branch_failures(&out), [0, 1]);
        let outcomes = ctx.outcomes();
        assert_eq!(
            outcomes
                .iter()
                .map(|o| (o.code, o.timeout, o.local, o.reason.as_str()))
                .collect::<Vec<_>>(),
            [
                (503, false, true, "Service Unavailable"),
                (487, false, true, "Request Terminated")
            ]
        );
    }

    #[test]
    fn set_timer_c_applies_to_the_resets_that_follow() {
        let t0 = Instant::now();
        let mut ctx = two_parallel(t0);
        ctx.set_timer_c(Duration::from_secs(5));
        let mut out = Vec::new();
        ctx.on_response(BranchId(0), resp(180, &[]), t0, &mut out);
        assert!(out.iter().any(|a| matches!(a,
            ContextAction::StartTimerC { at, .. } if *at == t0 + Duration::from_secs(5))));
    }

    fn set_failed(out: &[ContextAction]) -> Option<&Message> {
        out.iter().find_map(|a| match a {
            ContextAction::BranchSetFailed { best } => Some(best),
            _ => None,
        })
    }

    fn final_up(out: &[ContextAction]) -> Option<&Message> {
        out.iter().find_map(|a| match a {
            ContextAction::FinalUpstream(m) => Some(m),
            _ => None,
        })
    }

    fn two_parallel(now: Instant) -> ResponseContext {
        invite(
            vec![
                target("sip:a@127.0.0.1", 1000),
                target("sip:b@127.0.0.1", 1000),
            ],
            now,
        )
        .0
    }

    #[test]
    fn start_arms_timer_c_and_100_is_absorbed() {
        let t0 = Instant::now();
        let (mut ctx, out) = invite(vec![target("sip:a@127.0.0.1", 1000)], t0);
        assert_eq!(started(&out), vec![(0, &b"sip:a@127.0.0.1"[..])]);
        assert!(out.iter().any(|a| matches!(a,
            ContextAction::StartTimerC { branch: BranchId(0), at } if *at == t0 + TIMER_C)));
        let mut out = Vec::new();
        ctx.on_response(BranchId(0), resp(100, &[]), t0, &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(ctx.branch_state(BranchId(0)), Some(BranchState::Proceeding));
    }

    #[test]
    fn provisional_forwarded_without_top_via_and_resets_timer_c() {
        let t0 = Instant::now();
        let (mut ctx, _) = invite(vec![target("sip:a@127.0.0.1", 1000)], t0);
        let mut out = Vec::new();
        let t1 = t0 + Duration::from_secs(5);
        ctx.on_response(BranchId(0), resp(180, &[]), t1, &mut out);
        let Some(ContextAction::ForwardUpstream(m)) = out
            .iter()
            .find(|a| matches!(a, ContextAction::ForwardUpstream(_)))
        else {
            panic!("not forwarded: {out:?}");
        };
        assert_eq!(m.status(), Some(180));
        assert_eq!(m.vias().count(), 1);
        assert_eq!(m.top_via().unwrap().branch(), Some(&b"z9hG4bKup1"[..]));
        assert!(out.iter().any(|a| matches!(a,
            ContextAction::StartTimerC { at, .. } if *at == t1 + TIMER_C)));
    }

    #[test]
    fn a_2xx_is_forwarded_and_cancels_the_other_branches() {
        let t0 = Instant::now();
        let (mut ctx, _) = invite(
            vec![
                target("sip:a@127.0.0.1", 1000),
                target("sip:b@127.0.0.1", 1000),
                target("sip:c@127.0.0.1", 1000),
            ],
            t0,
        );
        let mut out = Vec::new();
        ctx.on_response(BranchId(1), resp(180, &[]), t0, &mut out);
        out.clear();
        ctx.on_response(BranchId(0), resp(200, &[]), t0, &mut out);
        assert_eq!(forwarded(&out), vec![200]);
        // Branch 2 heard nothing yet: its CANCEL waits for a provisional (§9.1).
        assert_eq!(cancels(&out), vec![1]);
        out.clear();
        ctx.on_response(BranchId(2), resp(180, &[]), t0, &mut out);
        assert_eq!(cancels(&out), vec![2]);
        assert!(forwarded(&out).is_empty(), "1xx after a final: {out:?}");
        out.clear();
        ctx.on_response(BranchId(1), resp(487, &[]), t0, &mut out);
        assert!(!ctx.is_finished());
        ctx.on_response(BranchId(2), resp(487, &[]), t0, &mut out);
        assert_eq!(branch_failures(&out), [1, 2]);
        assert!(
            others(&out).is_empty(),
            "no non-2xx final after a 2xx: {out:?}"
        );
        assert!(ctx.is_finished());
    }

    #[test]
    fn every_2xx_is_forwarded() {
        let t0 = Instant::now();
        let mut ctx = two_parallel(t0);
        let mut out = Vec::new();
        ctx.on_response(BranchId(0), resp(200, &[]), t0, &mut out);
        ctx.on_response(BranchId(1), resp(200, &[]), t0, &mut out);
        // A retransmitted 2xx on the same branch too (RFC 6026).
        ctx.on_response(BranchId(0), resp(200, &[]), t0, &mut out);
        assert_eq!(forwarded(&out), vec![200, 200, 200]);
        assert!(ctx.is_finished());
    }

    #[test]
    fn failed_set_picks_lowest_class_first_received() {
        let t0 = Instant::now();
        let (mut ctx, _) = invite(
            vec![
                target("sip:a@127.0.0.1", 1000),
                target("sip:b@127.0.0.1", 1000),
                target("sip:c@127.0.0.1", 1000),
            ],
            t0,
        );
        let mut out = Vec::new();
        ctx.on_response(BranchId(0), resp(500, &[]), t0, &mut out);
        ctx.on_response(BranchId(1), resp(486, &[]), t0, &mut out);
        assert!(others(&out).is_empty());
        ctx.on_response(BranchId(2), resp(404, &[]), t0, &mut out);
        assert_eq!(set_failed(&out).and_then(Message::status), Some(486));
        assert!(final_up(&out).is_none());
        out.clear();
        ctx.send_final(&mut out);
        assert_eq!(final_up(&out).and_then(Message::status), Some(486));
        assert!(ctx.is_finished());
    }

    #[test]
    fn a_6xx_wins_cancels_and_closes_the_set() {
        let t0 = Instant::now();
        let (mut ctx, _) = invite(
            vec![
                target("sip:a@127.0.0.1", 1000),
                target("sip:b@127.0.0.1", 1000),
                target("sip:c@127.0.0.1", 1000),
                target("sip:later@127.0.0.1", 500),
            ],
            t0,
        );
        let mut out = Vec::new();
        ctx.on_response(BranchId(0), resp(180, &[]), t0, &mut out);
        ctx.on_response(BranchId(1), resp(404, &[]), t0, &mut out);
        out.clear();
        ctx.on_response(BranchId(2), resp(603, &[]), t0, &mut out);
        assert!(forwarded(&out).is_empty(), "6xx is not forwarded at once");
        assert_eq!(cancels(&out), vec![0]);
        out.clear();
        ctx.on_response(BranchId(0), resp(487, &[]), t0, &mut out);
        assert!(started(&out).is_empty(), "no new branches after a 6xx");
        assert!(set_failed(&out).is_none());
        assert_eq!(final_up(&out).and_then(Message::status), Some(603));
        out.clear();
        ctx.add_targets(vec![target("sip:x@127.0.0.1", 1000)], t0, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn a_2xx_after_a_6xx_still_wins() {
        let t0 = Instant::now();
        let mut ctx = two_parallel(t0);
        let mut out = Vec::new();
        ctx.on_response(BranchId(0), resp(600, &[]), t0, &mut out);
        ctx.on_response(BranchId(1), resp(200, &[]), t0, &mut out);
        assert_eq!(forwarded(&out), vec![200]);
        assert!(final_up(&out).is_none());
        assert!(ctx.is_finished());
    }

    #[test]
    fn a_503_becomes_500() {
        let t0 = Instant::now();
        let (mut ctx, _) = invite(vec![target("sip:a@127.0.0.1", 1000)], t0);
        let mut out = Vec::new();
        ctx.on_response(BranchId(0), resp(503, &[]), t0, &mut out);
        // The failure route sees the 503 (failover decisions need it), upstream gets a 500.
        assert_eq!(set_failed(&out).unwrap().status(), Some(503));
        out.clear();
        ctx.send_final(&mut out);
        let best = final_up(&out).unwrap();
        assert_eq!(best.status(), Some(500));
        assert_eq!(best.top_via().unwrap().branch(), Some(&b"z9hG4bKup1"[..]));
        assert!(best.to().unwrap().tag().is_some());
    }

    #[test]
    fn challenges_of_all_401_and_407_are_aggregated() {
        let t0 = Instant::now();
        let (mut ctx, _) = invite(
            vec![
                target("sip:a@127.0.0.1", 1000),
                target("sip:b@127.0.0.1", 1000),
                target("sip:c@127.0.0.1", 1000),
            ],
            t0,
        );
        let mut out = Vec::new();
        ctx.on_response(BranchId(0), resp(404, &[]), t0, &mut out);
        let www: &[u8] = b"Digest realm=\"a.example.com\", nonce=\"1\"";
        let proxy: &[u8] = b"Digest realm=\"b.example.com\", nonce=\"2\"";
        ctx.on_response(
            BranchId(1),
            resp(401, &[("WWW-Authenticate", www)]),
            t0,
            &mut out,
        );
        ctx.on_response(
            BranchId(2),
            resp(407, &[("Proxy-Authenticate", proxy)]),
            t0,
            &mut out,
        );
        let best = set_failed(&out).unwrap();
        assert_eq!(best.status(), Some(401));
        assert_eq!(
            best.headers_named("WWW-Authenticate").collect::<Vec<_>>(),
            vec![www]
        );
        assert_eq!(
            best.headers_named("Proxy-Authenticate").collect::<Vec<_>>(),
            vec![proxy]
        );
    }

    #[test]
    fn timer_c_after_provisional_cancels_and_stale_firings_are_ignored() {
        let t0 = Instant::now();
        let (mut ctx, _) = invite(vec![target("sip:a@127.0.0.1", 1000)], t0);
        let mut out = Vec::new();
        let t1 = t0 + Duration::from_secs(10);
        ctx.on_response(BranchId(0), resp(180, &[]), t1, &mut out);
        out.clear();
        // The timer armed at the start is stale: the 180 reset it.
        ctx.on_timer_c(BranchId(0), t0 + TIMER_C, &mut out);
        assert!(out.is_empty(), "{out:?}");
        ctx.on_timer_c(BranchId(0), t1 + TIMER_C, &mut out);
        assert_eq!(cancels(&out), vec![0]);
        assert!(out.iter().any(|a| matches!(a,
            ContextAction::StartTimerC { at, .. } if *at == t1 + TIMER_C + CANCEL_GRACE)));
        out.clear();
        ctx.on_response(BranchId(0), resp(487, &[]), t1 + TIMER_C, &mut out);
        assert_eq!(set_failed(&out).and_then(Message::status), Some(487));
    }

    #[test]
    fn timer_c_without_provisional_counts_as_408() {
        let t0 = Instant::now();
        let (mut ctx, _) = invite(vec![target("sip:a@127.0.0.1", 1000)], t0);
        let mut out = Vec::new();
        ctx.on_timer_c(BranchId(0), t0 + TIMER_C, &mut out);
        let best = set_failed(&out).unwrap();
        assert_eq!(best.status(), Some(408));
        out.clear();
        // A late provisional is not forwarded; the abandoned branch is CANCELled.
        ctx.on_response(BranchId(0), resp(180, &[]), t0 + TIMER_C, &mut out);
        assert_eq!(cancels(&out), vec![0]);
        assert!(forwarded(&out).is_empty());
    }

    #[test]
    fn failed_branch_synthesizes_408() {
        let t0 = Instant::now();
        let (mut ctx, _) = invite(vec![target("sip:a@127.0.0.1", 1000)], t0);
        let mut out = Vec::new();
        ctx.on_branch_failed(BranchId(0), t0, &mut out);
        let best = set_failed(&out).unwrap();
        assert_eq!(best.status(), Some(408));
        assert_eq!(best.vias().count(), 1);
        assert_eq!(best.call_id().unwrap(), b"c1@127.0.0.1");
        assert!(best.to().unwrap().tag().is_some());
        // A second failure report for the same branch changes nothing.
        out.clear();
        ctx.on_branch_failed(BranchId(0), t0, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn lower_q_group_starts_only_after_higher_group_failed() {
        let t0 = Instant::now();
        let (mut ctx, out) = invite(
            vec![
                target("sip:low1@127.0.0.1", 500),
                target("sip:high1@127.0.0.1", 1000),
                target("sip:high2@127.0.0.1", 1000),
                target("sip:low2@127.0.0.1", 500),
            ],
            t0,
        );
        assert_eq!(
            started(&out),
            vec![
                (0, &b"sip:high1@127.0.0.1"[..]),
                (1, &b"sip:high2@127.0.0.1"[..])
            ]
        );
        let mut out = Vec::new();
        ctx.on_response(BranchId(0), resp(486, &[]), t0, &mut out);
        assert!(started(&out).is_empty());
        let t1 = t0 + Duration::from_secs(3);
        ctx.on_branch_failed(BranchId(1), t1, &mut out);
        assert_eq!(
            started(&out),
            vec![
                (2, &b"sip:low1@127.0.0.1"[..]),
                (3, &b"sip:low2@127.0.0.1"[..])
            ]
        );
        assert!(out.iter().any(|a| matches!(a,
            ContextAction::StartTimerC { branch: BranchId(3), at } if *at == t1 + TIMER_C)));
        assert!(set_failed(&out).is_none());
    }

    #[test]
    fn add_targets_after_failed_set_starts_a_new_group() {
        let t0 = Instant::now();
        let (mut ctx, _) = invite(vec![target("sip:a@127.0.0.1", 1000)], t0);
        let mut out = Vec::new();
        ctx.on_response(BranchId(0), resp(486, &[]), t0, &mut out);
        assert!(set_failed(&out).is_some());
        out.clear();
        ctx.add_targets(
            vec![target("sip:voicemail@example.com", 1000)],
            t0,
            &mut out,
        );
        assert_eq!(started(&out), vec![(1, &b"sip:voicemail@example.com"[..])]);
        out.clear();
        ctx.on_response(BranchId(1), resp(200, &[]), t0, &mut out);
        assert_eq!(forwarded(&out), vec![200]);
        assert!(ctx.is_finished());
    }

    #[test]
    fn upstream_cancel_cancels_pending_branches_and_487_goes_up() {
        let t0 = Instant::now();
        let (mut ctx, _) = invite(
            vec![
                target("sip:a@127.0.0.1", 1000),
                target("sip:b@127.0.0.1", 1000),
                target("sip:later@127.0.0.1", 500),
            ],
            t0,
        );
        let mut out = Vec::new();
        ctx.on_response(BranchId(0), resp(180, &[]), t0, &mut out);
        out.clear();
        ctx.cancel_all(&mut out);
        assert_eq!(cancels(&out), vec![0]);
        out.clear();
        ctx.on_response(BranchId(0), resp(487, &[]), t0, &mut out);
        assert!(others(&out).is_empty(), "{out:?}");
        ctx.on_response(BranchId(1), resp(180, &[]), t0, &mut out);
        assert_eq!(cancels(&out), vec![1]);
        out.clear();
        ctx.on_response(BranchId(1), resp(487, &[]), t0, &mut out);
        assert!(started(&out).is_empty(), "no new group after CANCEL");
        assert_eq!(final_up(&out).and_then(Message::status), Some(487));
        assert!(ctx.is_finished());
    }

    #[test]
    fn upstream_cancel_while_deciding_sends_the_final() {
        let t0 = Instant::now();
        let (mut ctx, _) = invite(vec![target("sip:a@127.0.0.1", 1000)], t0);
        let mut out = Vec::new();
        ctx.on_response(BranchId(0), resp(480, &[]), t0, &mut out);
        assert!(set_failed(&out).is_some());
        out.clear();
        ctx.cancel_all(&mut out);
        assert_eq!(final_up(&out).and_then(Message::status), Some(480));
    }

    #[test]
    fn non_invite_has_no_timer_c_or_cancel() {
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut ctx = ResponseContext::new(
            request(),
            vec![
                target("sip:a@127.0.0.1", 1000),
                target("sip:b@127.0.0.1", 1000),
            ],
            false,
            TIMER_C,
            t0,
            &mut out,
        );
        assert!(!out
            .iter()
            .any(|a| matches!(a, ContextAction::StartTimerC { .. })));
        out.clear();
        ctx.on_response(BranchId(0), resp(180, &[]), t0, &mut out);
        ctx.on_response(BranchId(0), resp(200, &[]), t0, &mut out);
        ctx.on_response(BranchId(1), resp(200, &[]), t0, &mut out);
        assert_eq!(forwarded(&out), vec![180, 200]);
        assert!(cancels(&out).is_empty());
    }

    #[test]
    fn no_targets_fails_with_408() {
        let (_, out) = invite(Vec::new(), Instant::now());
        assert_eq!(set_failed(&out).and_then(Message::status), Some(408));
    }

    /// A response carrying only the proxy's Via, as a callee builds it from our CANCEL.
    fn with_only_our_via(code: u16) -> Message {
        let mut ours = resp(code, &[]);
        ours.remove_headers("Via");
        ours.prepend_header("Via", b"SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKproxy")
            .unwrap();
        Message::parse(ours.to_bytes()).unwrap()
    }

    #[test]
    fn a_final_with_only_our_via_goes_up_with_the_requests_vias() {
        let t0 = Instant::now();
        // Three upstream Vias, two in one field: all go back, in order.
        let received = String::from_utf8(REQUEST.to_vec()).unwrap().replace(
            "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKup1\r\n",
            "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKup1;received=127.0.0.2;rport=5072, \
             SIP/2.0/TCP 192.0.2.1;branch=z9hG4bKup2\r\nv: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bKup3\r\n",
        );
        let request = Message::parse(Bytes::from(received)).unwrap();
        let upstream: Vec<String> = request
            .values(HeaderName::Via)
            .map(|v| String::from_utf8_lossy(v.unwrap()).into_owned())
            .collect();
        assert_eq!(upstream.len(), 3);
        let mut out = Vec::new();
        let targets = vec![target("sip:a@127.0.0.1", 1000)];
        let mut ctx = ResponseContext::new(request, targets, true, TIMER_C, t0, &mut out);
        out.clear();
        // A 180 the same way is repaired and forwarded too.
        assert!(ctx.on_response(BranchId(0), with_only_our_via(180), t0, &mut out));
        assert_eq!(forwarded(&out), vec![180]);
        ctx.cancel_all(&mut out);
        out.clear();
        assert!(ctx.on_response(BranchId(0), with_only_our_via(487), t0, &mut out));
        let up = final_up(&out).expect("the 487 goes up, not a synthesized 408");
        assert_eq!(up.status(), Some(487));
        let vias: Vec<String> = up
            .values(HeaderName::Via)
            .map(|v| String::from_utf8_lossy(v.unwrap()).into_owned())
            .collect();
        assert_eq!(vias, upstream);
        assert_eq!(
            up.header(HeaderName::To),
            resp(487, &[]).header(HeaderName::To)
        );
        // A well-formed response reports nothing.
        let (mut ctx, _) = invite(vec![target("sip:a@127.0.0.1", 1000)], t0);
        out.clear();
        assert!(!ctx.on_response(BranchId(0), resp(486, &[]), t0, &mut out));
        assert_eq!(
            final_up(&out)
                .or(set_failed(&out))
                .and_then(Message::status),
            Some(486)
        );
    }

    #[test]
    fn responses_for_unknown_branches_are_ignored() {
        let t0 = Instant::now();
        let (mut ctx, _) = invite(vec![target("sip:a@127.0.0.1", 1000)], t0);
        let mut out = Vec::new();
        ctx.on_response(BranchId(7), resp(200, &[]), t0, &mut out);
        ctx.on_timer_c(BranchId(7), t0 + TIMER_C, &mut out);
        ctx.on_branch_failed(BranchId(7), t0, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn unreachable_branch_counts_as_503_and_goes_up_as_500() {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut ctx = ResponseContext::new(
            request(),
            vec![Target::new(
                Bytes::from_static(b"sip:bob@127.0.0.1:5080"),
                1000,
            )],
            true,
            Duration::from_secs(181),
            now,
            &mut out,
        );
        out.clear();
        ctx.on_branch_unreachable(BranchId(0), now, &mut out);
        let best = out.iter().find_map(|a| match a {
            ContextAction::BranchSetFailed { best } => Some(best.status()),
            _ => None,
        });
        assert_eq!(best, Some(Some(503)), "the failure route sees the 503");
        out.clear();
        ctx.send_final(&mut out);
        let up = out.iter().find_map(|a| match a {
            ContextAction::FinalUpstream(best) => best.status(),
            _ => None,
        });
        assert_eq!(up, Some(500));
    }
}
