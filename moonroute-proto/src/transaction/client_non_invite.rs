//! The non-INVITE client transaction: RFC 3261 §17.1.2 (figure 6).
//!
//! Owns sending one non-INVITE request (OPTIONS, BYE, CANCEL, REGISTER, ...), retransmitting it
//! over unreliable transports (Timer E: doubling from T1 up to T2 while Trying, every T2 once
//! Proceeding, §17.1.2.2), giving up on it (Timer F, 64*T1), passing provisional and final
//! responses to the transaction user, and absorbing retransmissions of the final response while
//! Completed (Timer K).
//!
//! ```text
//!  Trying ──1xx──▶ Proceeding ──200-699──▶ Completed ──Timer K──▶ Terminated
//!     └─────────200-699──────────────────────▲
//!  Trying, Proceeding ──Timer F or transport error / inform TU──▶ Terminated
//! ```

use std::time::{Duration, Instant};

use super::client_invite::Outgoing;
use super::{Action, Event, Timer, TimerValues};
use crate::sip::{Message, Method};

/// The states of figure 6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonInviteClientState {
    Trying,
    Proceeding,
    Completed,
    Terminated,
}

/// One non-INVITE client transaction. Sans-IO: every input takes `now`, every output is an
/// [`Action`] pushed to `out`.
///
/// Lean once answered: the request is kept only while it may be sent again (Trying,
/// Proceeding); Completed, which only absorbs retransmissions of the final response, keeps its
/// method alone.
#[derive(Debug)]
pub struct NonInviteClient {
    /// The request while no final response has arrived (boxed: see [`Outgoing`]).
    outgoing: Option<Box<Outgoing>>,
    /// The request's method, which every response's CSeq must name (§17.1.3).
    method: Option<Method>,
    reliable: bool,
    timers: TimerValues,
    state: NonInviteClientState,
    /// The interval the pending Timer E was armed with (§17.1.2.2: T1, then doubling, capped
    /// at T2).
    retransmit_interval: Duration,
}

impl NonInviteClient {
    /// Enters Trying (§17.1.2.2): sends the request, starts Timer E at T1 on an unreliable
    /// transport only, and Timer F at 64*T1 on any transport.
    pub fn start(
        request: Message,
        reliable: bool,
        timers: TimerValues,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> NonInviteClient {
        let method = request.method().cloned();
        let outgoing = Outgoing::new(request);
        out.push(Action::Send(outgoing.wire.clone()));
        if !reliable {
            out.push(start_timer(Timer::E, now + timers.t1));
        }
        out.push(start_timer(Timer::F, now + timers.t1x64()));
        NonInviteClient {
            outgoing: Some(outgoing),
            method,
            reliable,
            timers,
            state: NonInviteClientState::Trying,
            retransmit_interval: timers.t1,
        }
    }

    /// A response matched to this transaction (§17.1.3). A response whose status or CSeq is
    /// missing, or whose CSeq method is not the request's, is ignored rather than trusted.
    pub fn on_response(&mut self, response: Message, now: Instant, out: &mut Vec<Action>) {
        let Some(status) = self.response_status(&response) else {
            return;
        };
        use NonInviteClientState::*;
        match (self.state, status) {
            (Trying | Proceeding, 100..=199) => self.proceed(response, out),
            (Trying | Proceeding, 200..=699) => self.complete(response, now, out),
            // Completed absorbs retransmissions of the final response (and any stray
            // provisional); Terminated ignores everything.
            _ => {}
        }
    }

    /// A timer started by this transaction fired. One that no longer applies in the current
    /// state is ignored (timers are never cancelled).
    pub fn on_timer(&mut self, timer: Timer, now: Instant, out: &mut Vec<Action>) {
        use NonInviteClientState::*;
        match (self.state, timer) {
            (Trying | Proceeding, Timer::E) if !self.reliable => self.retransmit(now, out),
            (Trying | Proceeding, Timer::F) => {
                deliver(Event::Timeout, out);
                self.terminate(out);
            }
            (Completed, Timer::K) => self.terminate(out),
            _ => {}
        }
    }

    /// The transport failed to send for this transaction (§17.1.4). Figure 6 informs the TU
    /// and terminates from Trying and Proceeding, the states that send; Completed sends
    /// nothing, so a late report there is ignored.
    pub fn on_transport_error(&mut self, out: &mut Vec<Action>) {
        if matches!(
            self.state,
            NonInviteClientState::Trying | NonInviteClientState::Proceeding
        ) {
            deliver(Event::TransportError, out);
            self.terminate(out);
        }
    }

    pub fn state(&self) -> NonInviteClientState {
        self.state
    }

    /// The request as sent, while no final response has arrived.
    pub fn request(&self) -> Option<&Message> {
        self.outgoing.as_ref().map(|o| &o.request)
    }

    /// Heap bytes this transaction holds beyond its own struct (the memory budget's share of
    /// it, see `layer`).
    pub fn retained_bytes(&self) -> usize {
        self.outgoing.as_ref().map_or(0, |o| o.retained_bytes())
    }

    /// The status of a response that can belong to this transaction: it has a CSeq whose
    /// method is the request's (§17.1.3). The driver matched it already, but a message off the
    /// network is checked, not trusted.
    fn response_status(&self, response: &Message) -> Option<u16> {
        let status = response.status()?;
        let cseq = response.cseq().ok()?;
        match &self.method {
            Some(method) if *method != cseq.method => None,
            _ => Some(status),
        }
    }

    /// §17.1.2.2: a provisional response moves Trying to Proceeding and goes to the TU, as does
    /// every further one. Retransmissions continue (the request may still be lost upstream of a
    /// stateless element), now every T2.
    fn proceed(&mut self, response: Message, out: &mut Vec<Action>) {
        self.state = NonInviteClientState::Proceeding;
        deliver(Event::Response(response), out);
    }

    /// §17.1.2.2: a final response goes to the TU and enters Completed, where Timer K (T4)
    /// absorbs its retransmissions; Timer K is zero on a reliable transport, so that case
    /// terminates at once.
    fn complete(&mut self, response: Message, now: Instant, out: &mut Vec<Action>) {
        self.outgoing = None;
        deliver(Event::Response(response), out);
        if self.reliable {
            self.terminate(out);
            return;
        }
        self.state = NonInviteClientState::Completed;
        out.push(start_timer(Timer::K, now + self.timers.t4));
    }

    /// §17.1.2.2: Timer E resends the request. In Trying it is reset with MIN(2*interval, T2);
    /// in Proceeding with T2.
    fn retransmit(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Some(outgoing) = &self.outgoing {
            out.push(Action::Send(outgoing.wire.clone()));
        }
        self.retransmit_interval = match self.state {
            NonInviteClientState::Proceeding => self.timers.t2,
            _ => self
                .retransmit_interval
                .saturating_mul(2)
                .min(self.timers.t2),
        };
        out.push(start_timer(Timer::E, now + self.retransmit_interval));
    }

    fn terminate(&mut self, out: &mut Vec<Action>) {
        if self.state != NonInviteClientState::Terminated {
            self.state = NonInviteClientState::Terminated;
            self.outgoing = None;
            out.push(Action::Terminated);
        }
    }
}

fn start_timer(timer: Timer, at: Instant) -> Action {
    Action::StartTimer { timer, at }
}

fn deliver(event: Event, out: &mut Vec<Action>) {
    out.push(Action::Deliver(event));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::sip::ResponseBuilder;

    const OPTIONS: &str = "OPTIONS sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKnict1\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.com>;tag=from-tag\r\n\
To: <sip:bob@example.com>\r\n\
Call-ID: options-1@127.0.0.1\r\n\
CSeq: 7 OPTIONS\r\n\
Content-Length: 0\r\n\
\r\n";

    fn parse(text: &[u8]) -> Message {
        Message::parse(Bytes::copy_from_slice(text)).expect("test message parses")
    }

    fn options() -> Message {
        parse(OPTIONS.as_bytes())
    }

    fn response(code: u16) -> Message {
        let request = options();
        parse(
            &ResponseBuilder::new(&request, code, "Test")
                .to_tag(b"to-tag")
                .build(),
        )
    }

    fn short_timers() -> TimerValues {
        TimerValues {
            t1: Duration::from_millis(10),
            t2: Duration::from_millis(40),
            t4: Duration::from_millis(50),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn durations(millis: &[u64]) -> Vec<Duration> {
        millis.iter().copied().map(ms).collect()
    }

    type Sim = crate::transaction::sim::Sim<NonInviteClient>;

    impl Sim {
        fn start(reliable: bool, timers: TimerValues) -> Sim {
            Sim::start_with(|now, out| {
                NonInviteClient::start(options(), reliable, timers, now, out)
            })
        }

        fn unreliable() -> Sim {
            Sim::start(false, TimerValues::default())
        }

        fn reliable() -> Sim {
            Sim::start(true, TimerValues::default())
        }

        fn receive(&mut self, message: Message) {
            self.step(|tx, now, out| tx.on_response(message, now, out));
        }

        fn state(&self) -> NonInviteClientState {
            self.tx.state()
        }
    }

    #[test]
    fn start_sends_the_request_and_arms_e_and_f_when_unreliable() {
        let sim = Sim::unreliable();
        assert_eq!(sim.state(), NonInviteClientState::Trying);
        assert_eq!(sim.sends.len(), 1);
        assert_eq!(sim.sends[0].1, options().to_bytes());
        assert_eq!(sim.pending(Timer::E), vec![ms(500)]);
        assert_eq!(sim.pending(Timer::F), vec![ms(32_000)]);
        assert_eq!(sim.tx.request().unwrap().cseq().unwrap().seq, 7);
    }

    #[test]
    fn timer_e_doubles_up_to_t2_until_timer_f_times_out() {
        let mut sim = Sim::unreliable();
        sim.run_all();
        // Intervals 0.5, 1, 2, 4 s, then 4 s (T2) until F at 32 s: 10 retransmissions.
        let expected = durations(&[
            0, 500, 1_500, 3_500, 7_500, 11_500, 15_500, 19_500, 23_500, 27_500, 31_500,
        ]);
        assert_eq!(sim.send_times(), expected);
        assert!(sim.sends.iter().all(|(_, b)| *b == options().to_bytes()));
        assert_eq!(sim.timeouts(), 1);
        assert_eq!(sim.events.len(), 1);
        assert_eq!(sim.terminations, 1);
        assert_eq!(sim.state(), NonInviteClientState::Terminated);
        assert_eq!(
            sim.elapsed(),
            ms(35_500),
            "the last stale Timer E fired and was ignored"
        );
    }

    #[test]
    fn timer_e_follows_custom_timers() {
        let mut sim = Sim::start(false, short_timers());
        assert_eq!(sim.pending(Timer::F), vec![ms(640)]);
        sim.run_all();
        let mut expected = durations(&[0, 10, 30, 70]);
        expected.extend((1..=14).map(|k| ms(70 + 40 * k)));
        assert_eq!(sim.send_times(), expected, "capped at T2 = 40 ms");
        assert_eq!(sim.timeouts(), 1);
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn reliable_transport_never_retransmits_and_times_out_on_f() {
        let mut sim = Sim::reliable();
        assert!(sim.pending(Timer::E).is_empty());
        sim.run_all();
        assert_eq!(sim.send_times(), vec![ms(0)]);
        assert_eq!(sim.elapsed(), ms(32_000));
        assert_eq!(sim.timeouts(), 1);
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn proceeding_retransmits_every_t2_and_times_out_on_f() {
        let mut sim = Sim::unreliable();
        sim.advance_to(ms(600));
        sim.receive(response(100));
        assert_eq!(sim.state(), NonInviteClientState::Proceeding);
        sim.advance_to(ms(5_000));
        sim.receive(response(180));
        sim.run_all();
        // The E armed in Trying (at 1.5 s) fires in Proceeding; from then on every T2.
        let expected = durations(&[
            0, 500, 1_500, 5_500, 9_500, 13_500, 17_500, 21_500, 25_500, 29_500,
        ]);
        assert_eq!(sim.send_times(), expected);
        assert_eq!(sim.delivered_statuses(), vec![100, 180]);
        assert_eq!(sim.timeouts(), 1);
        assert_eq!(sim.terminations, 1);
        assert_eq!(sim.state(), NonInviteClientState::Terminated);
    }

    #[test]
    fn proceeding_on_reliable_transport_times_out_on_f() {
        let mut sim = Sim::reliable();
        sim.receive(response(100));
        sim.run_all();
        assert_eq!(sim.send_times(), vec![ms(0)]);
        assert_eq!(sim.delivered_statuses(), vec![100]);
        assert_eq!(sim.timeouts(), 1);
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn final_in_trying_completes_and_timer_k_terminates() {
        let mut sim = Sim::unreliable();
        sim.advance_to(ms(700));
        sim.receive(response(200));
        assert_eq!(sim.state(), NonInviteClientState::Completed);
        assert_eq!(sim.pending(Timer::K), vec![ms(5_700)]);
        sim.advance_to(ms(2_000));
        sim.receive(response(200));
        sim.receive(response(100));
        assert_eq!(
            sim.delivered_statuses(),
            vec![200],
            "Completed absorbs responses"
        );
        sim.run_all();
        assert_eq!(
            sim.send_times(),
            vec![ms(0), ms(500)],
            "no retransmission after the final"
        );
        assert_eq!(sim.state(), NonInviteClientState::Terminated);
        assert_eq!(sim.terminations, 1);
        assert_eq!(sim.timeouts(), 0, "Timer F in Completed is ignored");
    }

    #[test]
    fn final_in_proceeding_completes() {
        let mut sim = Sim::unreliable();
        sim.receive(response(180));
        sim.advance_to(ms(3_000));
        sim.receive(response(404));
        assert_eq!(sim.state(), NonInviteClientState::Completed);
        assert_eq!(sim.pending(Timer::K), vec![ms(8_000)]);
        sim.advance_to(ms(7_999));
        assert_eq!(sim.state(), NonInviteClientState::Completed);
        sim.advance_to(ms(8_000));
        assert_eq!(sim.state(), NonInviteClientState::Terminated);
        assert_eq!(sim.delivered_statuses(), vec![180, 404]);
        // The first E fired in Proceeding at T1 and was re-armed with T2 (4.5 s), after the 404.
        assert_eq!(sim.send_times(), vec![ms(0), ms(500)]);
    }

    #[test]
    fn timer_k_follows_custom_t4() {
        let mut sim = Sim::start(false, short_timers());
        sim.receive(response(503));
        assert_eq!(sim.pending(Timer::K), vec![ms(50)]);
        sim.advance_to(ms(50));
        assert_eq!(sim.state(), NonInviteClientState::Terminated);
    }

    #[test]
    fn final_on_reliable_transport_terminates_at_once() {
        let mut sim = Sim::reliable();
        sim.receive(response(100));
        sim.receive(response(486));
        assert_eq!(sim.state(), NonInviteClientState::Terminated);
        assert_eq!(sim.terminations, 1);
        assert!(sim.pending(Timer::K).is_empty());
        sim.receive(response(486));
        sim.run_all();
        assert_eq!(sim.delivered_statuses(), vec![100, 486]);
        assert_eq!(sim.events.len(), 2);
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn transport_error_in_trying_and_proceeding_informs_the_tu() {
        for provisional_first in [false, true] {
            let mut sim = Sim::unreliable();
            if provisional_first {
                sim.receive(response(100));
            }
            sim.transport_error();
            assert_eq!(sim.state(), NonInviteClientState::Terminated);
            assert!(matches!(sim.events.last(), Some(Event::TransportError)));
            assert_eq!(sim.terminations, 1);
            sim.transport_error();
            sim.run_all();
            assert_eq!(sim.send_times(), vec![ms(0)]);
            assert_eq!(sim.terminations, 1);
            assert_eq!(sim.timeouts(), 0);
        }
    }

    #[test]
    fn transport_error_in_completed_is_ignored() {
        let mut sim = Sim::unreliable();
        sim.receive(response(200));
        sim.transport_error();
        assert_eq!(sim.state(), NonInviteClientState::Completed);
        assert_eq!(sim.events.len(), 1);
    }

    #[test]
    fn timers_out_of_place_are_ignored() {
        let mut sim = Sim::unreliable();
        let now = sim.now;
        let mut out = Vec::new();
        for timer in [Timer::A, Timer::B, Timer::D, Timer::K, Timer::M] {
            sim.tx.on_timer(timer, now, &mut out);
        }
        assert!(out.is_empty(), "never started in Trying");
        sim.receive(response(200));
        sim.tx.on_timer(Timer::E, now, &mut out);
        sim.tx.on_timer(Timer::F, now, &mut out);
        assert!(out.is_empty(), "E and F are stale in Completed");
        assert_eq!(sim.state(), NonInviteClientState::Completed);

        let mut reliable = Sim::reliable();
        reliable.tx.on_timer(Timer::E, now, &mut out);
        assert!(out.is_empty(), "no retransmission on a reliable transport");
    }

    #[test]
    fn responses_for_another_method_or_without_cseq_are_ignored() {
        let mut sim = Sim::unreliable();
        let wrong_method = parse(
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKnict1\r\n\
CSeq: 7 INVITE\r\nContent-Length: 0\r\n\r\n",
        );
        let no_cseq = parse(
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKnict1\r\n\
Content-Length: 0\r\n\r\n",
        );
        for message in [wrong_method, no_cseq, options()] {
            sim.receive(message);
        }
        assert!(sim.events.is_empty());
        assert_eq!(sim.state(), NonInviteClientState::Trying);
    }
}
