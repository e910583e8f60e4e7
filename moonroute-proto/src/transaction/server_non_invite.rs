//! The non-INVITE server transaction: RFC 3261 §17.2.2 (figure 8), with the transport-error
//! rule of §17.2.4.
//!
//! Owns the responses this side sends for one non-INVITE request and when they are sent again.
//! Nothing here retransmits on a timer: the client retransmits its request, and each
//! retransmission is answered with the latest response (§17.2.2).
//!
//! ```text
//!   Trying     --request again: absorb; 1xx from TU: send------> Proceeding
//!   Proceeding --1xx from TU: send; request again: resend the 1xx
//!   Trying, Proceeding --200-699 from TU: send, J--------------> Completed
//!   Completed  --request again: resend the final; J (0 on reliable transports)--> Terminated
//!   any state  --transport error: tell TU----------------------> Terminated   (§17.2.4)
//! ```

use std::time::Instant;

use bytes::Bytes;

use super::{Action, Event, Timer, TimerValues};

/// The states of figure 8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonInviteServerState {
    Trying,
    Proceeding,
    Completed,
    Terminated,
}

/// A non-INVITE server transaction. Feed it inputs; it pushes [`Action`]s.
#[derive(Debug)]
pub struct NonInviteServer {
    phase: Phase,
    reliable: bool,
    timers: TimerValues,
}

/// The state together with the response that answers a retransmitted request in it.
#[derive(Debug)]
enum Phase {
    Trying,
    Proceeding { last_provisional: Bytes },
    Completed { final_response: Bytes },
    Terminated,
}

impl NonInviteServer {
    /// The transaction for a new request (already handed to the TU by the layer). It starts in
    /// Trying and sends nothing: §17.2.2 has no 100 Trying for non-INVITE requests.
    pub fn start(reliable: bool, timers: TimerValues) -> NonInviteServer {
        NonInviteServer {
            phase: Phase::Trying,
            reliable,
            timers,
        }
    }

    /// A response from the TU (already built; `status` is its code). Trying and Proceeding
    /// send a 1xx and stay or move to Proceeding, and send a final and move to Completed
    /// (§17.2.2). Completed discards everything from the TU ("any other final responses passed
    /// by the TU ... MUST be discarded"), as does Terminated; codes outside 100-699 are ignored.
    pub fn respond(&mut self, status: u16, response: Bytes, now: Instant, out: &mut Vec<Action>) {
        if !matches!(self.phase, Phase::Trying | Phase::Proceeding { .. }) {
            return;
        }
        match status {
            100..=199 => {
                out.push(Action::Send(response.clone()));
                self.phase = Phase::Proceeding {
                    last_provisional: response,
                };
            }
            200..=699 => {
                out.push(Action::Send(response.clone()));
                self.enter_completed(response, now, out);
            }
            _ => {}
        }
    }

    /// A retransmission of the request. Trying absorbs it (there is nothing to answer with
    /// yet); Proceeding resends the latest provisional and Completed the final (§17.2.2).
    pub fn on_retransmission(&mut self, _now: Instant, out: &mut Vec<Action>) {
        match &self.phase {
            Phase::Proceeding { last_provisional } => {
                out.push(Action::Send(last_provisional.clone()))
            }
            Phase::Completed { final_response } => out.push(Action::Send(final_response.clone())),
            Phase::Trying | Phase::Terminated => {}
        }
    }

    /// A timer this machine started: only J, and only in Completed (§17.2.2). Any other firing
    /// is stale and ignored.
    pub fn on_timer(&mut self, timer: Timer, _now: Instant, out: &mut Vec<Action>) {
        if let (Phase::Completed { .. }, Timer::J) = (&self.phase, timer) {
            self.terminate(out);
        }
    }

    /// The transport failed to send one of this transaction's responses (§17.2.4: inform the
    /// TU and terminate).
    pub fn on_transport_error(&mut self, out: &mut Vec<Action>) {
        if self.state() != NonInviteServerState::Terminated {
            out.push(Action::Deliver(Event::TransportError));
            self.terminate(out);
        }
    }

    /// Heap bytes this transaction holds beyond its own struct: the response it would send
    /// again (the memory budget's share of it, see `layer`).
    pub fn retained_bytes(&self) -> usize {
        match &self.phase {
            Phase::Proceeding {
                last_provisional: response,
            }
            | Phase::Completed {
                final_response: response,
            } => response.len(),
            Phase::Trying | Phase::Terminated => 0,
        }
    }

    pub fn state(&self) -> NonInviteServerState {
        match self.phase {
            Phase::Trying => NonInviteServerState::Trying,
            Phase::Proceeding { .. } => NonInviteServerState::Proceeding,
            Phase::Completed { .. } => NonInviteServerState::Completed,
            Phase::Terminated => NonInviteServerState::Terminated,
        }
    }

    /// §17.2.2: Timer J (64*T1) absorbs request retransmissions, which only unreliable
    /// transports produce; on a reliable transport J is zero, so the transaction ends at once.
    fn enter_completed(&mut self, final_response: Bytes, now: Instant, out: &mut Vec<Action>) {
        if self.reliable {
            self.terminate(out);
            return;
        }
        self.phase = Phase::Completed { final_response };
        out.push(Action::StartTimer {
            timer: Timer::J,
            at: now + self.timers.t1x64(),
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
    use std::time::Duration;

    use super::*;
    use crate::sip::{Message, ResponseBuilder};

    const OPTIONS: &str = "OPTIONS sip:bob@example.com SIP/2.0\r\n\
        Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-nist-1\r\n\
        Max-Forwards: 70\r\n\
        From: <sip:alice@example.com>;tag=a1\r\n\
        To: <sip:bob@example.com>\r\n\
        Call-ID: nist-1@127.0.0.1\r\n\
        CSeq: 7 OPTIONS\r\n\
        Content-Length: 0\r\n\r\n";

    fn response(status: u16) -> Bytes {
        let request =
            Message::parse(Bytes::from_static(OPTIONS.as_bytes())).expect("test OPTIONS parses");
        ResponseBuilder::new(&request, status, "Test")
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

    type Sim = crate::transaction::sim::Sim<NonInviteServer>;

    impl Sim {
        fn new(reliable: bool, timers: TimerValues) -> Sim {
            Sim::start_with(|_, _| NonInviteServer::start(reliable, timers))
        }

        fn respond(&mut self, status: u16) {
            let bytes = response(status);
            self.step(|tx, now, out| tx.respond(status, bytes, now, out));
        }

        fn retransmission(&mut self) {
            self.step(|tx, now, out| tx.on_retransmission(now, out));
        }
    }

    #[test]
    fn trying_sends_nothing_and_absorbs_retransmissions() {
        for reliable in [false, true] {
            let mut sim = Sim::new(reliable, TimerValues::default());
            assert_eq!(sim.tx.state(), NonInviteServerState::Trying);
            sim.retransmission();
            sim.retransmission();
            assert!(sim.sends.is_empty());
            assert!(sim.started.is_empty());
            assert_eq!(sim.tx.state(), NonInviteServerState::Trying);
        }
    }

    #[test]
    fn provisional_moves_to_proceeding_and_answers_retransmissions() {
        for reliable in [false, true] {
            let mut sim = Sim::new(reliable, TimerValues::default());
            sim.respond(100);
            assert_eq!(sim.tx.state(), NonInviteServerState::Proceeding);
            sim.retransmission();
            sim.respond(182);
            assert_eq!(sim.tx.state(), NonInviteServerState::Proceeding);
            sim.retransmission();
            assert_eq!(sim.statuses(), [100, 100, 182, 182]);
            assert!(sim.started.is_empty(), "provisionals start no timer");
        }
    }

    #[test]
    fn final_over_udp_completes_and_j_terminates_after_64_t1() {
        for provisional_first in [false, true] {
            let mut sim = Sim::new(false, TimerValues::default());
            if provisional_first {
                sim.respond(180);
            }
            sim.advance_to(ms(100));
            sim.respond(200);
            assert_eq!(sim.tx.state(), NonInviteServerState::Completed);
            assert_eq!(sim.started, [(ms(100 + 32_000), Timer::J)]);
            sim.advance_to(ms(32_099));
            assert_eq!(sim.tx.state(), NonInviteServerState::Completed);
            sim.advance_to(ms(32_100));
            assert_eq!(sim.tx.state(), NonInviteServerState::Terminated);
            assert_eq!(sim.terminations, 1);
            assert!(sim.events.is_empty());
        }
    }

    #[test]
    fn j_follows_custom_timer_values() {
        let mut sim = Sim::new(false, short_timers());
        sim.respond(404);
        assert_eq!(sim.started, [(ms(640), Timer::J)]);
        sim.advance_to(ms(640));
        assert_eq!(sim.tx.state(), NonInviteServerState::Terminated);
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn completed_resends_the_final_and_discards_tu_responses() {
        let mut sim = Sim::new(false, TimerValues::default());
        sim.respond(180);
        sim.respond(486);
        sim.retransmission();
        for status in [100, 180, 200, 486, 603] {
            sim.respond(status);
        }
        sim.retransmission();
        assert_eq!(sim.statuses(), [180, 486, 486, 486]);
        assert_eq!(sim.tx.state(), NonInviteServerState::Completed);
        assert_eq!(sim.started.len(), 1, "J only, once");
    }

    #[test]
    fn reliable_final_terminates_at_once() {
        for provisional_first in [false, true] {
            let mut sim = Sim::new(true, TimerValues::default());
            if provisional_first {
                sim.respond(100);
            }
            sim.respond(200);
            assert_eq!(sim.tx.state(), NonInviteServerState::Terminated, "J = 0");
            assert!(sim.started.is_empty());
            assert_eq!(sim.terminations, 1);
            sim.retransmission();
            sim.respond(500);
            sim.fire(Timer::J);
            sim.transport_error();
            let expected: &[u16] = if provisional_first {
                &[100, 200]
            } else {
                &[200]
            };
            assert_eq!(sim.statuses(), expected);
            assert!(sim.events.is_empty());
            assert_eq!(sim.terminations, 1);
        }
    }

    #[test]
    fn codes_outside_100_to_699_are_ignored() {
        let mut sim = Sim::new(false, TimerValues::default());
        for status in [0, 99, 700, 999] {
            sim.respond(status);
        }
        assert!(sim.sends.is_empty());
        assert!(sim.started.is_empty());
        assert_eq!(sim.tx.state(), NonInviteServerState::Trying);
    }

    #[test]
    fn transport_error_informs_the_tu_and_terminates_in_every_state() {
        type Setup = fn(&mut Sim);
        let setups: [(NonInviteServerState, Setup); 3] = [
            (NonInviteServerState::Trying, |_| {}),
            (NonInviteServerState::Proceeding, |sim| sim.respond(180)),
            (NonInviteServerState::Completed, |sim| sim.respond(200)),
        ];
        for (state, setup) in setups {
            let mut sim = Sim::new(false, TimerValues::default());
            setup(&mut sim);
            assert_eq!(sim.tx.state(), state);
            let sent_before = sim.sends.len();
            sim.transport_error();
            assert_eq!(sim.tx.state(), NonInviteServerState::Terminated);
            assert!(
                matches!(sim.events[..], [Event::TransportError]),
                "{state:?}"
            );
            sim.transport_error();
            sim.retransmission();
            sim.respond(200);
            sim.advance_to(ms(60_000));
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
        let others = [Timer::E, Timer::F, Timer::G, Timer::H, Timer::K];
        let mut sim = Sim::new(false, short_timers());
        sim.fire(Timer::J);
        assert_eq!(sim.tx.state(), NonInviteServerState::Trying);
        sim.respond(180);
        sim.fire(Timer::J);
        assert_eq!(sim.tx.state(), NonInviteServerState::Proceeding);
        sim.respond(200);
        for timer in others {
            sim.fire(timer);
        }
        assert_eq!(sim.tx.state(), NonInviteServerState::Completed);
        sim.advance_to(ms(640));
        sim.fire(Timer::J);
        assert_eq!(sim.terminations, 1);
        assert_eq!(sim.statuses(), [180, 200]);
        assert!(sim.events.is_empty());
    }
}
