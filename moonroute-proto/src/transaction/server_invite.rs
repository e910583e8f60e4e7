//! The INVITE server transaction: RFC 3261 §17.2.1 (figure 7) as amended by RFC 6026 §7.1 and
//! §8 (figure 4), with the transport-error rule of §17.2.4.
//!
//! Owns the responses this side sends for one INVITE and when they are sent again: the 100
//! Trying, the TU's provisionals (resent on a retransmitted INVITE), the 2xx (sent, never
//! retransmitted here: a UAS core retransmits its own 2xx, §13.3.1.4, and a proxy forwards every
//! 2xx it receives, §16.7 step 5) and the non-2xx final (retransmitted by Timer G until the ACK).
//!
//! ```text
//!   Proceeding --1xx from TU: send, remember--> Proceeding   (INVITE again: resend the 1xx)
//!   Proceeding --2xx from TU: send, L---------> Accepted     (RFC 6026)
//!   Proceeding --300-699 from TU: send, G, H--> Completed
//!   Accepted   --2xx from TU: send; ACK: to TU; INVITE again: absorb; L--> Terminated
//!   Completed  --G: resend, double G up to T2; INVITE again: resend; H: tell TU--> Terminated
//!   Completed  --ACK: I (0 on reliable transports)--> Confirmed --I--> Terminated
//!   any state  --transport error: tell TU--> Terminated      (§17.2.4)
//! ```

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Action, Event, Timer, TimerValues};
use crate::sip::{Message, ResponseBuilder};

/// The states of figure 7 plus RFC 6026's Accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InviteServerState {
    Proceeding,
    Completed,
    Confirmed,
    Accepted,
    Terminated,
}

/// An INVITE server transaction. Feed it inputs; it pushes [`Action`]s.
#[derive(Debug)]
pub struct InviteServer {
    phase: Phase,
    reliable: bool,
    timers: TimerValues,
}

/// The state together with what only that state needs, so a Completed transaction always has
/// a final response to retransmit.
#[derive(Debug)]
enum Phase {
    /// `last_provisional` answers a retransmitted INVITE (§17.2.1).
    Proceeding {
        last_provisional: Option<Bytes>,
    },
    /// `g_interval` is the interval the pending Timer G was started with.
    Completed {
        final_response: Bytes,
        g_interval: Duration,
    },
    Confirmed,
    Accepted,
    Terminated,
}

/// How a status code moves the machine; codes outside 100-699 are not responses at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StatusClass {
    Provisional,
    Success,
    Failure,
}

impl StatusClass {
    fn of(status: u16) -> Option<StatusClass> {
        match status {
            100..=199 => Some(StatusClass::Provisional),
            200..=299 => Some(StatusClass::Success),
            300..=699 => Some(StatusClass::Failure),
            _ => None,
        }
    }
}

impl InviteServer {
    /// The transaction for a new INVITE (already handed to the TU by the layer). When
    /// `send_trying`, a 100 Trying built from the request is sent at once and kept as the last
    /// provisional (§17.2.1: MUST unless the TU answers within 200 ms; §16.2: a proxy always
    /// does for INVITE). Its To gets no tag: §17.2.1 downgrades the tag to SHOULD NOT.
    pub fn start(
        request: &Message,
        reliable: bool,
        timers: TimerValues,
        send_trying: bool,
        _now: Instant,
        out: &mut Vec<Action>,
    ) -> InviteServer {
        let last_provisional =
            send_trying.then(|| ResponseBuilder::new(request, 100, "Trying").build());
        if let Some(trying) = &last_provisional {
            out.push(Action::Send(trying.clone()));
        }
        InviteServer {
            phase: Phase::Proceeding { last_provisional },
            reliable,
            timers,
        }
    }

    /// A response from the TU (already built; `status` is its code). Only Proceeding takes
    /// every class (§17.2.1); Accepted takes further 2xx (RFC 6026 §7.1, §8.5). Anything else
    /// (a second final after a non-2xx, a 1xx after a final, a code outside 100-699) is
    /// ignored: the transaction has already told the peer how it ends.
    pub fn respond(&mut self, status: u16, response: Bytes, now: Instant, out: &mut Vec<Action>) {
        let Some(class) = StatusClass::of(status) else {
            return;
        };
        match (&mut self.phase, class) {
            (Phase::Proceeding { last_provisional }, StatusClass::Provisional) => {
                *last_provisional = Some(response.clone());
                out.push(Action::Send(response));
            }
            (Phase::Proceeding { .. }, StatusClass::Success) => {
                out.push(Action::Send(response));
                self.enter_accepted(now, out);
            }
            (Phase::Proceeding { .. }, StatusClass::Failure) => {
                out.push(Action::Send(response.clone()));
                self.enter_completed(response, now, out);
            }
            (Phase::Accepted, StatusClass::Success) => out.push(Action::Send(response)),
            _ => {}
        }
    }

    /// A retransmission of the INVITE. Proceeding resends the most recent provisional (none
    /// yet: nothing) and Completed the final (§17.2.1); Accepted absorbs it so it never
    /// reaches the TU as a new request (RFC 6026 §7.1, §8.6); Confirmed absorbs it too.
    pub fn on_retransmission(&mut self, _now: Instant, out: &mut Vec<Action>) {
        match &self.phase {
            Phase::Proceeding {
                last_provisional: Some(provisional),
            } => out.push(Action::Send(provisional.clone())),
            Phase::Completed { final_response, .. } => {
                out.push(Action::Send(final_response.clone()))
            }
            _ => {}
        }
    }

    /// An ACK matched this transaction. In Completed it acknowledges the non-2xx final
    /// (§17.2.1: go to Confirmed, which stops Timer G); in Accepted it is the ACK for a 2xx,
    /// which belongs to the TU (RFC 6026 §8.7). Confirmed absorbs ACK retransmissions; in
    /// Proceeding no final has been sent, so there is nothing to acknowledge.
    pub fn on_ack(&mut self, ack: Message, now: Instant, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Completed { .. } => self.enter_confirmed(now, out),
            Phase::Accepted => out.push(Action::Deliver(Event::Ack(ack))),
            _ => {}
        }
    }

    /// A timer this machine started. Each timer applies to one state only; a firing in any
    /// other state is stale (the state it was started for has been left) and is ignored.
    pub fn on_timer(&mut self, timer: Timer, now: Instant, out: &mut Vec<Action>) {
        match (&mut self.phase, timer) {
            (
                Phase::Completed {
                    final_response,
                    g_interval,
                },
                Timer::G,
            ) => {
                // §17.2.1: resend, then G = MIN(2*T1, T2), doubling on every firing up to T2.
                out.push(Action::Send(final_response.clone()));
                *g_interval = g_interval.saturating_mul(2).min(self.timers.t2);
                out.push(Action::StartTimer {
                    timer: Timer::G,
                    at: now + *g_interval,
                });
            }
            (Phase::Completed { .. }, Timer::H) => {
                // §17.2.1: the ACK never came; the TU learns of the failure.
                out.push(Action::Deliver(Event::AckTimeout));
                self.terminate(out);
            }
            (Phase::Confirmed, Timer::I) | (Phase::Accepted, Timer::L) => self.terminate(out),
            _ => {}
        }
    }

    /// The transport failed to send one of this transaction's responses: inform the TU and
    /// terminate (§17.2.4), except in Accepted, which RFC 6026 figure 4 keeps (Timer L still
    /// runs) so that a retransmitted INVITE is absorbed rather than taken for a new call.
    pub fn on_transport_error(&mut self, out: &mut Vec<Action>) {
        match self.state() {
            InviteServerState::Terminated => {}
            InviteServerState::Accepted => out.push(Action::Deliver(Event::TransportError)),
            _ => {
                out.push(Action::Deliver(Event::TransportError));
                self.terminate(out);
            }
        }
    }

    /// Heap bytes this transaction holds beyond its own struct: the response it would send
    /// again (the memory budget's share of it, see `layer`).
    pub fn retained_bytes(&self) -> usize {
        match &self.phase {
            Phase::Proceeding {
                last_provisional: Some(response),
            }
            | Phase::Completed {
                final_response: response,
                ..
            } => response.len(),
            _ => 0,
        }
    }

    pub fn state(&self) -> InviteServerState {
        match self.phase {
            Phase::Proceeding { .. } => InviteServerState::Proceeding,
            Phase::Completed { .. } => InviteServerState::Completed,
            Phase::Confirmed => InviteServerState::Confirmed,
            Phase::Accepted => InviteServerState::Accepted,
            Phase::Terminated => InviteServerState::Terminated,
        }
    }

    /// RFC 6026 §8.5: Timer L (64*T1, every transport) bounds how long retransmitted INVITEs
    /// and 2xx retransmissions from the TU are handled here.
    fn enter_accepted(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.phase = Phase::Accepted;
        out.push(Action::StartTimer {
            timer: Timer::L,
            at: now + self.timers.t1x64(),
        });
    }

    /// §17.2.1: Timer G (T1) retransmits the final only over unreliable transports, where it
    /// may be lost; Timer H (64*T1, every transport) bounds the wait for the ACK.
    fn enter_completed(&mut self, final_response: Bytes, now: Instant, out: &mut Vec<Action>) {
        if !self.reliable {
            out.push(Action::StartTimer {
                timer: Timer::G,
                at: now + self.timers.t1,
            });
        }
        out.push(Action::StartTimer {
            timer: Timer::H,
            at: now + self.timers.t1x64(),
        });
        self.phase = Phase::Completed {
            final_response,
            g_interval: self.timers.t1,
        };
    }

    /// §17.2.1: Timer I (T4) absorbs ACK retransmissions, which only unreliable transports
    /// produce; on a reliable transport I is zero, so the transaction ends at once.
    fn enter_confirmed(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.reliable {
            self.terminate(out);
            return;
        }
        self.phase = Phase::Confirmed;
        out.push(Action::StartTimer {
            timer: Timer::I,
            at: now + self.timers.t4,
        });
    }

    /// Enters Terminated, reporting it exactly once.
    fn terminate(&mut self, out: &mut Vec<Action>) {
        if !matches!(self.phase, Phase::Terminated) {
            self.phase = Phase::Terminated;
            out.push(Action::Terminated);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:bob@example.com SIP/2.0\r\n\
        Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-ist-1\r\n\
        Max-Forwards: 70\r\n\
        From: <sip:alice@example.com>;tag=a1\r\n\
        To: <sip:bob@example.com>\r\n\
        Call-ID: ist-1@127.0.0.1\r\n\
        CSeq: 1 INVITE\r\n\
        Contact: <sip:alice@127.0.0.1:5070>\r\n\
        Content-Length: 0\r\n\r\n";

    const ACK: &str = "ACK sip:bob@example.com SIP/2.0\r\n\
        Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-ist-1\r\n\
        Max-Forwards: 70\r\n\
        From: <sip:alice@example.com>;tag=a1\r\n\
        To: <sip:bob@example.com>;tag=b1\r\n\
        Call-ID: ist-1@127.0.0.1\r\n\
        CSeq: 1 ACK\r\n\
        Content-Length: 0\r\n\r\n";

    fn invite() -> Message {
        Message::parse(Bytes::from_static(INVITE.as_bytes())).expect("test INVITE parses")
    }

    fn ack() -> Message {
        Message::parse(Bytes::from_static(ACK.as_bytes())).expect("test ACK parses")
    }

    fn response(status: u16) -> Bytes {
        ResponseBuilder::new(&invite(), status, "Test")
            .to_tag(b"b1")
            .build()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn short_timers() -> TimerValues {
        TimerValues {
            t1: ms(10),
            t2: ms(40),
            t4: ms(50),
        }
    }

    type Sim = crate::transaction::sim::Sim<InviteServer>;

    impl Sim {
        fn new(reliable: bool, timers: TimerValues, send_trying: bool) -> Sim {
            Sim::start_with(|now, out| {
                InviteServer::start(&invite(), reliable, timers, send_trying, now, out)
            })
        }

        fn udp() -> Sim {
            Sim::new(false, TimerValues::default(), true)
        }

        fn respond(&mut self, status: u16) {
            let bytes = response(status);
            self.step(|tx, now, out| tx.respond(status, bytes, now, out));
        }

        fn retransmission(&mut self) {
            self.step(|tx, now, out| tx.on_retransmission(now, out));
        }

        fn ack(&mut self) {
            self.step(|tx, now, out| tx.on_ack(ack(), now, out));
        }
    }

    #[test]
    fn start_sends_100_trying_without_to_tag() {
        let mut out = Vec::new();
        let now = Instant::now();
        let tx = InviteServer::start(
            &invite(),
            false,
            TimerValues::default(),
            true,
            now,
            &mut out,
        );
        assert_eq!(tx.state(), InviteServerState::Proceeding);
        assert_eq!(out.len(), 1);
        let Action::Send(bytes) = &out[0] else {
            panic!("expected a send, got {out:?}");
        };
        let trying = Message::parse(bytes.clone()).expect("100 parses");
        assert_eq!(trying.status(), Some(100));
        assert_eq!(trying.to().expect("To parses").tag(), None);
        let cseq = trying.cseq().expect("CSeq parses");
        assert_eq!((cseq.seq, cseq.method), (1, crate::sip::Method::Invite));
    }

    #[test]
    fn start_without_trying_sends_nothing_and_retransmission_gets_nothing() {
        for reliable in [false, true] {
            let mut sim = Sim::new(reliable, TimerValues::default(), false);
            assert!(sim.sends.is_empty());
            assert!(sim.pending.is_empty());
            sim.retransmission();
            assert!(sim.sends.is_empty());
            assert_eq!(sim.tx.state(), InviteServerState::Proceeding);
        }
    }

    #[test]
    fn retransmitted_invite_gets_the_latest_provisional() {
        for reliable in [false, true] {
            let mut sim = Sim::new(reliable, TimerValues::default(), true);
            sim.retransmission();
            assert_eq!(sim.statuses(), [100, 100]);
            sim.respond(180);
            sim.respond(183);
            assert_eq!(sim.tx.state(), InviteServerState::Proceeding);
            sim.retransmission();
            sim.retransmission();
            assert_eq!(sim.statuses(), [100, 100, 180, 183, 183, 183]);
            assert!(sim.pending.is_empty(), "provisionals start no timer");
        }
    }

    #[test]
    fn non_2xx_over_udp_retransmits_on_g_schedule_until_h() {
        let mut sim = Sim::udp();
        sim.respond(486);
        assert_eq!(sim.tx.state(), InviteServerState::Completed);
        sim.run_all();
        // G: T1, 2*T1, 4*T1, then capped at T2 = 4 s, until H at 64*T1 = 32 s.
        let expected: Vec<Duration> = [0, 500, 1500, 3500, 7500, 11500, 15500]
            .into_iter()
            .chain([19500, 23500, 27500, 31500])
            .map(ms)
            .collect();
        assert_eq!(
            sim.send_times_of(486),
            expected,
            "1 send + 10 retransmissions"
        );
        assert_eq!(sim.ack_timeouts(), 1);
        assert_eq!(sim.terminations, 1);
        assert_eq!(sim.tx.state(), InviteServerState::Terminated);
        assert!(sim.started.contains(&(ms(32_000), Timer::H)));
    }

    #[test]
    fn g_schedule_follows_custom_timer_values() {
        let mut sim = Sim::new(false, short_timers(), true);
        sim.respond(603);
        sim.run_all();
        // T1 = 10 ms, T2 = 40 ms: 10, 30, 70, then every 40 ms until H at 640 ms.
        let mut expected = vec![ms(0), ms(10), ms(30)];
        expected.extend((70..640).step_by(40).map(ms));
        assert_eq!(sim.send_times_of(603), expected);
        assert_eq!(expected.len(), 18);
        assert_eq!(sim.ack_timeouts(), 1);
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn retransmitted_invite_in_completed_resends_the_final() {
        for reliable in [false, true] {
            let mut sim = Sim::new(reliable, TimerValues::default(), true);
            sim.respond(404);
            sim.retransmission();
            sim.retransmission();
            assert_eq!(sim.statuses(), [100, 404, 404, 404]);
            assert_eq!(sim.tx.state(), InviteServerState::Completed);
        }
    }

    #[test]
    fn ack_stops_g_and_confirmed_absorbs_until_i() {
        let mut sim = Sim::udp();
        sim.respond(486);
        sim.advance_to(ms(1000)); // G at 500 ms resent once
        sim.ack();
        assert_eq!(sim.tx.state(), InviteServerState::Confirmed);
        assert!(sim.started.contains(&(ms(1000 + 5000), Timer::I)), "I = T4");
        sim.ack();
        sim.retransmission();
        sim.respond(200);
        sim.advance_to(ms(5999));
        assert_eq!(sim.tx.state(), InviteServerState::Confirmed);
        assert!(sim.events.is_empty(), "ACKs are absorbed");
        sim.advance_to(ms(6000));
        assert_eq!(sim.tx.state(), InviteServerState::Terminated);
        sim.run_all(); // the stale G and H
        assert_eq!(sim.send_times_of(486), [ms(0), ms(500)]);
        assert_eq!(sim.terminations, 1);
        assert!(sim.events.is_empty(), "no AckTimeout after the ACK");
    }

    #[test]
    fn reliable_final_starts_no_g_and_ack_terminates_at_once() {
        let mut sim = Sim::new(true, TimerValues::default(), true);
        sim.respond(486);
        assert_eq!(sim.started_count(Timer::G), 0);
        assert_eq!(sim.started, [(ms(32_000), Timer::H)]);
        sim.advance_to(ms(2000));
        sim.ack();
        assert_eq!(sim.tx.state(), InviteServerState::Terminated, "I = 0");
        assert_eq!(sim.terminations, 1);
        assert_eq!(sim.started_count(Timer::I), 0);
        sim.ack();
        sim.run_all();
        assert_eq!(sim.statuses(), [100, 486]);
        assert!(sim.events.is_empty());
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn h_without_ack_delivers_ack_timeout_once_on_reliable() {
        let mut sim = Sim::new(true, short_timers(), false);
        sim.respond(500);
        sim.advance_to(ms(639));
        assert_eq!(sim.tx.state(), InviteServerState::Completed);
        sim.advance_to(ms(640));
        assert_eq!(sim.tx.state(), InviteServerState::Terminated);
        assert_eq!(sim.statuses(), [500], "no G on a reliable transport");
        assert_eq!(sim.ack_timeouts(), 1);
        assert_eq!(sim.events.len(), 1);
        assert_eq!(sim.terminations, 1);
        sim.ack();
        sim.transport_error();
        assert_eq!((sim.events.len(), sim.terminations), (1, 1));
    }

    #[test]
    fn two_xx_enters_accepted_and_absorbs_invite_retransmissions() {
        for reliable in [false, true] {
            let mut sim = Sim::new(reliable, TimerValues::default(), true);
            sim.respond(180);
            sim.respond(200);
            assert_eq!(sim.tx.state(), InviteServerState::Accepted);
            assert_eq!(sim.started, [(ms(32_000), Timer::L)], "L only, no G");
            sim.retransmission();
            sim.retransmission();
            assert_eq!(sim.statuses(), [100, 180, 200]);
            assert!(
                sim.events.is_empty(),
                "retransmitted INVITEs never reach the TU"
            );
        }
    }

    #[test]
    fn ack_in_accepted_is_delivered_to_the_tu() {
        let mut sim = Sim::udp();
        sim.respond(200);
        sim.ack();
        sim.ack();
        assert_eq!(sim.events.len(), 2);
        for event in &sim.events {
            let Event::Ack(ack) = event else {
                panic!("expected Event::Ack, got {event:?}");
            };
            assert_eq!(ack.method(), Some(&crate::sip::Method::Ack));
        }
        assert_eq!(sim.tx.state(), InviteServerState::Accepted);
    }

    #[test]
    fn accepted_sends_further_2xx_and_ignores_other_responses() {
        let mut sim = Sim::udp();
        sim.respond(200);
        sim.advance_to(ms(500));
        sim.respond(200);
        sim.respond(202);
        sim.respond(180);
        sim.respond(486);
        assert_eq!(sim.statuses(), [100, 200, 200, 202]);
        assert_eq!(sim.tx.state(), InviteServerState::Accepted);
    }

    #[test]
    fn timer_l_terminates_accepted() {
        for reliable in [false, true] {
            let mut sim = Sim::new(reliable, short_timers(), true);
            sim.respond(200);
            sim.advance_to(ms(639));
            assert_eq!(sim.tx.state(), InviteServerState::Accepted);
            sim.advance_to(ms(640));
            assert_eq!(sim.tx.state(), InviteServerState::Terminated);
            assert_eq!(sim.terminations, 1);
            assert!(sim.events.is_empty());
            sim.respond(200);
            sim.ack();
            sim.retransmission();
            assert_eq!(sim.statuses(), [100, 200], "Terminated ignores everything");
            assert!(sim.events.is_empty());
        }
    }

    #[test]
    fn responses_after_a_non_2xx_final_are_ignored() {
        for reliable in [false, true] {
            let mut sim = Sim::new(reliable, TimerValues::default(), false);
            sim.respond(486);
            for status in [100, 180, 200, 486, 603] {
                sim.respond(status);
            }
            assert_eq!(sim.statuses(), [486]);
            sim.ack();
            if !reliable {
                assert_eq!(sim.tx.state(), InviteServerState::Confirmed);
                sim.respond(200);
                sim.respond(500);
            }
            assert_eq!(sim.statuses(), [486]);
        }
    }

    #[test]
    fn codes_outside_100_to_699_are_ignored() {
        let mut sim = Sim::new(false, TimerValues::default(), false);
        for status in [0, 99, 700, 999] {
            sim.respond(status);
        }
        assert!(sim.sends.is_empty());
        assert!(sim.pending.is_empty());
        assert_eq!(sim.tx.state(), InviteServerState::Proceeding);
    }

    #[test]
    fn ack_in_proceeding_is_ignored() {
        let mut sim = Sim::udp();
        sim.ack();
        assert_eq!(sim.tx.state(), InviteServerState::Proceeding);
        assert!(sim.events.is_empty());
        assert!(sim.pending.is_empty());
    }

    #[test]
    fn accepted_survives_a_transport_error_and_still_absorbs_the_invite() {
        let mut sim = Sim::udp();
        sim.respond(200);
        let sent_before = sim.sends.len();
        sim.transport_error();
        assert_eq!(sim.tx.state(), InviteServerState::Accepted);
        assert!(matches!(sim.events[..], [Event::TransportError]));
        sim.retransmission();
        assert_eq!(sim.sends.len(), sent_before, "the INVITE is still absorbed");
        sim.run_all();
        assert_eq!(
            sim.tx.state(),
            InviteServerState::Terminated,
            "Timer L still ends it"
        );
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn transport_error_informs_the_tu_and_terminates_outside_accepted() {
        type Setup = fn(&mut Sim);
        let setups: [(InviteServerState, Setup); 3] = [
            (InviteServerState::Proceeding, |_| {}),
            (InviteServerState::Completed, |sim| sim.respond(486)),
            (InviteServerState::Confirmed, |sim| {
                sim.respond(486);
                sim.ack();
            }),
        ];
        for (state, setup) in setups {
            let mut sim = Sim::udp();
            setup(&mut sim);
            assert_eq!(sim.tx.state(), state);
            let sent_before = sim.sends.len();
            sim.transport_error();
            assert_eq!(sim.tx.state(), InviteServerState::Terminated);
            assert!(
                matches!(sim.events[..], [Event::TransportError]),
                "{state:?}"
            );
            sim.transport_error();
            sim.retransmission();
            sim.run_all();
            assert_eq!(sim.events.len(), 1, "{state:?}: informed once");
            assert_eq!(sim.terminations, 1, "{state:?}: terminated once");
            assert_eq!(
                sim.sends.len(),
                sent_before,
                "{state:?}: nothing sent after"
            );
        }
    }

    #[test]
    fn stale_timers_are_ignored() {
        let all = [Timer::G, Timer::H, Timer::I, Timer::L];
        let mut sim = Sim::udp();
        for timer in all {
            sim.step(|tx, now, out| tx.on_timer(timer, now, out));
        }
        assert_eq!(sim.tx.state(), InviteServerState::Proceeding);
        sim.respond(200);
        for timer in [Timer::G, Timer::H, Timer::I] {
            sim.step(|tx, now, out| tx.on_timer(timer, now, out));
        }
        assert_eq!(sim.tx.state(), InviteServerState::Accepted);
        assert_eq!(sim.statuses(), [100, 200]);
        assert!(sim.events.is_empty());

        let mut sim = Sim::udp();
        sim.respond(486);
        for timer in [Timer::I, Timer::L] {
            sim.step(|tx, now, out| tx.on_timer(timer, now, out));
        }
        assert_eq!(sim.tx.state(), InviteServerState::Completed);
        sim.ack();
        for timer in [Timer::G, Timer::H, Timer::L] {
            sim.step(|tx, now, out| tx.on_timer(timer, now, out));
        }
        assert_eq!(sim.tx.state(), InviteServerState::Confirmed);
        assert_eq!(sim.statuses(), [100, 486]);
        assert!(sim.events.is_empty());
        sim.run_all();
        for timer in all {
            sim.step(|tx, now, out| tx.on_timer(timer, now, out));
        }
        assert_eq!(sim.terminations, 1);
        assert_eq!(sim.statuses(), [100, 486]);
        assert!(sim.events.is_empty());
    }
}
