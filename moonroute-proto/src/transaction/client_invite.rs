//! The INVITE client transaction: RFC 3261 §17.1.1 (figure 5) as amended by RFC 6026 §8.4
//! (figure 3), which adds the Accepted state.
//!
//! Owns sending and retransmitting one INVITE (Timer A, unreliable transports only), giving up
//! on it (Timer B), building and sending the ACK for a non-2xx final response (§17.1.1.3) and
//! resending it for each retransmission of that response (Timer D bounds the wait), and passing
//! every 2xx to the transaction user while Accepted (Timer M). The ACK for a 2xx is not part of
//! the transaction (§17, §13.2.2.4): the transaction user sends it.
//!
//! ```text
//!  Calling    ──1xx──────────────────────▶ Proceeding
//!  Calling    ──300-699 / ACK, to TU─────▶ Completed   (Proceeding too)
//!  Calling    ──2xx / to TU──────────────▶ Accepted    (Proceeding too)
//!  Calling    ──Timer B or transport error / inform TU──▶ Terminated
//!  Completed  ──Timer D or transport error──▶ Terminated
//!  Accepted   ──Timer M──────────────────▶ Terminated
//! ```
//! ```

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Action, Event, Timer, TimerValues};
use crate::sip::scan;
use crate::sip::{HeaderName, Message, Method};

/// Timer D over unreliable transports. §17.1.1.2 asks for "at least 32 seconds" (table 4:
/// "> 32s for UDP"), the time a server keeps retransmitting its final response with default
/// timers; reliable transports use zero, i.e. terminate at once.
const TIMER_D_UNRELIABLE: Duration = Duration::from_secs(32);

/// The states of figure 5 plus RFC 6026's Accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InviteClientState {
    Calling,
    Proceeding,
    Completed,
    Accepted,
    Terminated,
}

/// One INVITE client transaction. Sans-IO: every input takes `now`, every output is an
/// [`Action`] pushed to `out`.
///
/// Lean once answered: the INVITE (parsed and serialized) is kept only while it may be sent
/// again or CANCELled (Calling, Proceeding); Completed keeps the ACK it resends, Accepted
/// nothing but the state (RFC 6026 §8.4 passes every 2xx up, which needs no request).
#[derive(Debug)]
pub struct InviteClient {
    /// The INVITE while no final response has arrived; boxed so that a transaction waiting
    /// in Completed or Accepted carries a pointer's worth of it.
    outgoing: Option<Box<Outgoing>>,
    reliable: bool,
    timers: TimerValues,
    state: InviteClientState,
    /// The interval the pending Timer A was armed with; it doubles on each firing (§17.1.1.2).
    retransmit_interval: Duration,
    /// The ACK sent for the non-2xx final response, resent for each retransmission of that
    /// response while Completed (§17.1.1.2).
    ack: Option<Bytes>,
}

/// A request a client transaction has sent and may send again.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) request: Message,
    /// The request as serialized once at start. A retransmission is "the message previously
    /// sent to the transport layer" passed once more (§17.1.1.2), so it is these very bytes.
    pub(super) wire: Bytes,
}

impl Outgoing {
    pub(super) fn new(request: Message) -> Box<Outgoing> {
        let wire = request.to_bytes();
        Box::new(Outgoing { request, wire })
    }

    /// Heap bytes it holds: the parsed request, and the serialized one unless it is a slice
    /// of the same buffer (an unedited request).
    pub(super) fn retained_bytes(&self) -> usize {
        let buf = self.request.source_bytes();
        let start = buf.as_ptr() as usize;
        let wire = self.wire.as_ptr() as usize;
        let shared = wire >= start && wire + self.wire.len() <= start + buf.len();
        let serialized = if shared { 0 } else { self.wire.len() };
        std::mem::size_of::<Outgoing>() + self.request.heap_bytes() + serialized
    }
}

impl InviteClient {
    /// Enters Calling (§17.1.1.2): sends the INVITE, starts Timer A at T1 on an unreliable
    /// transport only, and Timer B at 64*T1 on any transport.
    pub fn start(
        request: Message,
        reliable: bool,
        timers: TimerValues,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> InviteClient {
        let outgoing = Outgoing::new(request);
        out.push(Action::Send(outgoing.wire.clone()));
        if !reliable {
            out.push(start_timer(Timer::A, now + timers.t1));
        }
        out.push(start_timer(Timer::B, now + timers.t1x64()));
        InviteClient {
            outgoing: Some(outgoing),
            reliable,
            timers,
            state: InviteClientState::Calling,
            retransmit_interval: timers.t1,
            ack: None,
        }
    }

    /// A response matched to this transaction (§17.1.3). Responses that cannot belong to an
    /// INVITE transaction (no status, unparseable CSeq, CSeq method other than INVITE) are
    /// ignored rather than trusted.
    pub fn on_response(&mut self, response: Message, now: Instant, out: &mut Vec<Action>) {
        let Some(status) = invite_response_status(&response) else {
            return;
        };
        use InviteClientState::*;
        match (self.state, status) {
            (Calling | Proceeding, 100..=199) => self.proceed(response, out),
            (Calling | Proceeding, 200..=299) => self.accept(response, now, out),
            (Calling | Proceeding, 300..=699) => self.complete(response, now, out),
            (Completed, 300..=699) => self.resend_ack(out),
            (Accepted, 200..=299) => deliver(Event::Response(response), out),
            // Figure 5 and RFC 6026 figure 3 have no arrow for the rest (a provisional after a
            // final, a 2xx while Completed, a non-2xx while Accepted, anything once
            // Terminated): absorbed.
            _ => {}
        }
    }

    /// A timer started by this transaction fired. One that no longer applies in the current
    /// state is ignored (timers are never cancelled).
    pub fn on_timer(&mut self, timer: Timer, now: Instant, out: &mut Vec<Action>) {
        use InviteClientState::*;
        match (self.state, timer) {
            (Calling, Timer::A) if !self.reliable => self.retransmit(now, out),
            (Calling, Timer::B) => {
                // §17.1.1.2: Timer B in Calling means the request timed out. In Proceeding a
                // provisional proved the server alive; Timer C of the proxy core covers that.
                deliver(Event::Timeout, out);
                self.terminate(out);
            }
            (Completed, Timer::D) | (Accepted, Timer::M) => self.terminate(out),
            _ => {}
        }
    }

    /// The transport failed to send for this transaction (§17.1.4). Figure 5 (and RFC 6026
    /// figure 3) informs the TU and terminates from Calling (the INVITE) and Completed (the
    /// ACK). Proceeding and Accepted send nothing, so a failure reported there is a late
    /// report about an earlier send whose effect has since been proven; it is ignored.
    pub fn on_transport_error(&mut self, out: &mut Vec<Action>) {
        if matches!(
            self.state,
            InviteClientState::Calling | InviteClientState::Completed
        ) {
            deliver(Event::TransportError, out);
            self.terminate(out);
        }
    }

    pub fn state(&self) -> InviteClientState {
        self.state
    }

    /// The INVITE as sent, while no final response has arrived (the proxy builds CANCEL
    /// from it, §9.1; once answered there is nothing left to cancel).
    pub fn request(&self) -> Option<&Message> {
        self.outgoing.as_ref().map(|o| &o.request)
    }

    /// Heap bytes this transaction holds beyond its own struct (the memory budget's share of
    /// it, see `layer`).
    pub fn retained_bytes(&self) -> usize {
        let outgoing = self.outgoing.as_ref().map_or(0, |o| o.retained_bytes());
        outgoing + self.ack.as_ref().map_or(0, Bytes::len)
    }

    /// §17.1.1.2: a provisional response moves Calling to Proceeding (which stops
    /// retransmissions: Timer A is ignored there) and goes to the TU, as does every further one.
    fn proceed(&mut self, response: Message, out: &mut Vec<Action>) {
        self.state = InviteClientState::Proceeding;
        deliver(Event::Response(response), out);
    }

    /// RFC 6026 §8.4: a 2xx in Calling or Proceeding enters Accepted, goes to the TU and starts
    /// Timer M (64*T1), during which further 2xx (retransmissions, other forks) reach the TU too.
    fn accept(&mut self, response: Message, now: Instant, out: &mut Vec<Action>) {
        self.state = InviteClientState::Accepted;
        self.outgoing = None;
        deliver(Event::Response(response), out);
        out.push(start_timer(Timer::M, now + self.timers.t1x64()));
    }

    /// §17.1.1.2: a 300-699 in Calling or Proceeding is acknowledged (§17.1.1.3), goes to the
    /// TU, and enters Completed for Timer D to absorb its retransmissions; Timer D is zero on a
    /// reliable transport, so that case terminates at once.
    fn complete(&mut self, response: Message, now: Instant, out: &mut Vec<Action>) {
        let Some(outgoing) = self.outgoing.take() else {
            return;
        };
        let ack = ack_for_non_2xx(&outgoing.request, &response);
        out.push(Action::Send(ack.clone()));
        deliver(Event::Response(response), out);
        if self.reliable {
            self.terminate(out);
            return;
        }
        self.state = InviteClientState::Completed;
        self.ack = Some(ack);
        out.push(start_timer(Timer::D, now + TIMER_D_UNRELIABLE));
    }

    /// §17.1.1.2: a retransmitted final response in Completed is answered with the ACK again
    /// and not passed to the TU.
    fn resend_ack(&self, out: &mut Vec<Action>) {
        if let Some(ack) = &self.ack {
            out.push(Action::Send(ack.clone()));
        }
    }

    /// §17.1.1.2: Timer A resends the INVITE and is reset with twice its previous interval.
    fn retransmit(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Some(outgoing) = &self.outgoing {
            out.push(Action::Send(outgoing.wire.clone()));
        }
        self.retransmit_interval = self.retransmit_interval.saturating_mul(2);
        out.push(start_timer(Timer::A, now + self.retransmit_interval));
    }

    fn terminate(&mut self, out: &mut Vec<Action>) {
        if self.state != InviteClientState::Terminated {
            self.state = InviteClientState::Terminated;
            self.ack = None;
            self.outgoing = None;
            out.push(Action::Terminated);
        }
    }
}

/// The status of a response that can belong to an INVITE client transaction. The driver has
/// matched it already (§17.1.3), but a message off the network is checked, not trusted.
fn invite_response_status(response: &Message) -> Option<u16> {
    let status = response.status()?;
    let cseq = response.cseq().ok()?;
    (cseq.method == Method::Invite).then_some(status)
}

fn start_timer(timer: Timer, at: Instant) -> Action {
    Action::StartTimer { timer, at }
}

fn deliver(event: Event, out: &mut Vec<Action>) {
    out.push(Action::Deliver(event));
}

/// §17.1.1.3: the ACK for a non-2xx final response, built by the transaction (it shares the
/// INVITE's branch, so it follows the INVITE hop by hop).
///
/// Request-URI, Call-ID and From equal the request's; To equals the response's (with the tag
/// the server added); exactly one Via, equal to the top Via of the request; the CSeq number of
/// the request with method ACK; the request's Route header fields, in order. Max-Forwards is
/// 70 (§8.1.1.6) and there is no body. Fields are copied byte for byte as they were written.
/// A field missing from either message (which a well-formed pair never lacks) is left out
/// rather than invented.
pub fn ack_for_non_2xx(request: &Message, response: &Message) -> Bytes {
    same_hop_request("ACK", request, response)
}

/// §9.1: the CANCEL for `invite`: Request-URI, Call-ID, To, From and the CSeq number of the
/// INVITE (method CANCEL), exactly one Via equal to the INVITE's top Via (so it reaches the same
/// hop and matches its server transaction, §9.2), the INVITE's Route headers, Max-Forwards 70,
/// no body.
pub fn cancel_for(invite: &Message) -> Bytes {
    same_hop_request("CANCEL", invite, invite)
}

/// A request that follows `request` to the same next hop as part of its exchange (ACK for a
/// non-2xx final, CANCEL): its Request-URI, top Via alone, Route set, From, Call-ID and CSeq
/// number, with To taken from `to_source`.
fn same_hop_request(method: &str, request: &Message, to_source: &Message) -> Bytes {
    // Room for a typical request of this kind; it grows for long Route sets.
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(request.request_uri_bytes().unwrap_or_default());
    out.extend_from_slice(b" SIP/2.0\r\n");
    if let Some(Ok(top_via)) = request.values(HeaderName::Via).next() {
        out.extend_from_slice(b"Via: ");
        // The top Via may share its line with others or be folded; it goes alone, on one line.
        scan::push_unfolded(&mut out, top_via);
        out.extend_from_slice(b"\r\n");
    }
    for route in request.headers().filter(|h| h.name == HeaderName::Route) {
        push_line(&mut out, route.text);
    }
    out.extend_from_slice(b"Max-Forwards: 70\r\n");
    copy_field(&mut out, request, HeaderName::From);
    copy_field(&mut out, to_source, HeaderName::To);
    copy_field(&mut out, request, HeaderName::CallId);
    if let Ok(cseq) = request.cseq() {
        out.extend_from_slice(format!("CSeq: {} {method}\r\n", cseq.seq).as_bytes());
    }
    out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    Bytes::from(out)
}

/// Copies the first field called `name` as written (name spelling included).
fn copy_field(out: &mut Vec<u8>, message: &Message, name: HeaderName) {
    if let Some(field) = message.headers().find(|h| h.name == name) {
        push_line(out, field.text);
    }
}

fn push_line(out: &mut Vec<u8>, text: &[u8]) {
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::Bytes;

    use super::*;
    use crate::sip::ResponseBuilder;

    const INVITE: &str = "INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKclient1;rport, SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKupstream\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bKorigin\r\n\
Route: <sip:127.0.0.1:5090;lr>\r\n\
Route: <sip:proxy.example.com;lr>, <sip:edge.example.com;lr>\r\n\
Max-Forwards: 69\r\n\
From: Alice <sip:alice@example.com>;tag=from-tag\r\n\
To: Bob <sip:bob@example.com>\r\n\
Call-ID: call-1@127.0.0.1\r\n\
CSeq: 42 INVITE\r\n\
Contact: <sip:alice@127.0.0.1:5080>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\
\r\n\
v=0\n";

    fn parse(text: &[u8]) -> Message {
        Message::parse(Bytes::copy_from_slice(text)).expect("test message parses")
    }

    fn invite() -> Message {
        parse(INVITE.as_bytes())
    }

    /// A response as the next hop would send it back: the request's Vias, a To tag.
    fn response(code: u16, to_tag: &str) -> Message {
        let request = invite();
        parse(
            &ResponseBuilder::new(&request, code, "Test")
                .to_tag(to_tag.as_bytes())
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

    type Sim = crate::transaction::sim::Sim<InviteClient>;

    impl Sim {
        fn start(reliable: bool, timers: TimerValues) -> Sim {
            Sim::start_with(|now, out| InviteClient::start(invite(), reliable, timers, now, out))
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

        fn state(&self) -> InviteClientState {
            self.tx.state()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn is_timeout(e: &Event) -> bool {
        matches!(e, Event::Timeout)
    }

    #[test]
    fn start_sends_the_invite_and_arms_a_and_b_when_unreliable() {
        let sim = Sim::unreliable();
        assert_eq!(sim.state(), InviteClientState::Calling);
        assert_eq!(sim.sends.len(), 1);
        assert_eq!(sim.sends[0].1, invite().to_bytes());
        assert_eq!(sim.pending(Timer::A), vec![ms(500)]);
        assert_eq!(sim.pending(Timer::B), vec![ms(32_000)]);
        assert_eq!(sim.tx.request().unwrap().cseq().unwrap().seq, 42);
    }

    #[test]
    fn timer_a_doubles_until_timer_b_times_out_with_default_timers() {
        let mut sim = Sim::unreliable();
        sim.run_all();
        // Retransmission k goes out at (2^k - 1)*T1: T1, 3T1, 7T1, 15T1, 31T1, 63T1 all come
        // before B at 64*T1, the seventh (127T1) after it. So 6 retransmissions, 7 sends.
        let expected: Vec<Duration> = [0, 500, 1_500, 3_500, 7_500, 15_500, 31_500]
            .into_iter()
            .map(ms)
            .collect();
        assert_eq!(sim.send_times(), expected);
        assert!(sim.sends.iter().all(|(_, b)| *b == invite().to_bytes()));
        assert_eq!(sim.events.len(), 1);
        assert!(is_timeout(&sim.events[0]));
        assert_eq!(sim.terminations, 1);
        assert_eq!(sim.state(), InviteClientState::Terminated);
        assert_eq!(
            sim.elapsed(),
            ms(63_500),
            "the last stale Timer A fired and was ignored"
        );
    }

    #[test]
    fn timer_a_follows_custom_t1() {
        let mut sim = Sim::start(false, short_timers());
        assert_eq!(sim.pending(Timer::B), vec![ms(640)]);
        sim.run_all();
        let expected: Vec<Duration> = [0, 10, 30, 70, 150, 310, 630].into_iter().map(ms).collect();
        assert_eq!(sim.send_times(), expected);
        assert_eq!(sim.events.len(), 1);
        assert!(is_timeout(&sim.events[0]));
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn reliable_transport_never_retransmits_and_times_out_on_b() {
        let mut sim = Sim::reliable();
        assert!(sim.pending(Timer::A).is_empty());
        sim.run_all();
        assert_eq!(sim.send_times(), vec![ms(0)]);
        assert_eq!(sim.elapsed(), ms(32_000));
        assert_eq!(sim.events.len(), 1);
        assert!(is_timeout(&sim.events[0]));
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn provisional_stops_retransmissions_and_timer_b_no_longer_applies() {
        let mut sim = Sim::unreliable();
        sim.advance_to(ms(1_000));
        sim.receive(response(100, "t"));
        assert_eq!(sim.state(), InviteClientState::Proceeding);
        sim.receive(response(180, "t"));
        sim.receive(response(183, "t"));
        assert_eq!(sim.state(), InviteClientState::Proceeding);
        sim.run_all();
        assert_eq!(sim.send_times(), vec![ms(0), ms(500)]);
        assert_eq!(sim.delivered_statuses(), vec![100, 180, 183]);
        assert_eq!(sim.events.len(), 3, "Timer B in Proceeding is ignored");
        assert_eq!(sim.terminations, 0);
        assert_eq!(sim.state(), InviteClientState::Proceeding);
    }

    #[test]
    fn ack_for_486_follows_section_17_1_1_3() {
        let request = invite();
        let busy = response(486, "busy-tag");
        let ack = parse(&ack_for_non_2xx(&request, &busy));
        ack.validate().expect("the ACK is a valid request");
        assert_eq!(ack.method(), Some(&Method::Ack));
        assert_eq!(ack.request_uri_bytes(), request.request_uri_bytes());
        let vias: Vec<_> = ack.vias().map(|v| v.unwrap().raw().to_vec()).collect();
        assert_eq!(
            vias,
            vec![request.top_via().unwrap().raw().to_vec()],
            "exactly one Via: the request's top Via"
        );
        assert_eq!(
            ack.top_via().unwrap().branch(),
            Some(&b"z9hG4bKclient1"[..])
        );
        assert_eq!(ack.to().unwrap().tag(), Some(&b"busy-tag"[..]));
        assert_eq!(ack.header(HeaderName::To), busy.header(HeaderName::To));
        assert_eq!(
            ack.header(HeaderName::From),
            request.header(HeaderName::From)
        );
        assert_eq!(ack.call_id().unwrap(), request.call_id().unwrap());
        let cseq = ack.cseq().unwrap();
        assert_eq!((cseq.seq, cseq.method), (42, Method::Ack));
        let routes = |m: &Message| -> Vec<Vec<u8>> {
            m.values(HeaderName::Route)
                .map(|r| r.unwrap().to_vec())
                .collect()
        };
        assert_eq!(routes(&ack), routes(&request));
        assert_eq!(routes(&ack).len(), 3);
        assert_eq!(ack.max_forwards().unwrap().unwrap(), 70);
        assert_eq!(ack.content_length(), Some(0));
        assert!(ack.body().is_empty());
        assert!(!ack.has(HeaderName::Contact));
    }

    #[test]
    fn final_error_in_calling_acks_delivers_and_completes() {
        let mut sim = Sim::unreliable();
        sim.advance_to(ms(700));
        sim.receive(response(486, "busy-tag"));
        assert_eq!(sim.state(), InviteClientState::Completed);
        assert_eq!(sim.delivered_statuses(), vec![486]);
        assert_eq!(sim.sends.len(), 3, "INVITE, one retransmission, ACK");
        let ack = parse(&sim.sends[2].1);
        assert_eq!(ack.method(), Some(&Method::Ack));
        assert_eq!(sim.pending(Timer::D), vec![ms(700) + TIMER_D_UNRELIABLE]);
    }

    #[test]
    fn retransmitted_final_in_completed_resends_the_same_ack_only() {
        let mut sim = Sim::unreliable();
        sim.receive(response(486, "busy-tag"));
        sim.advance_to(ms(4_000));
        sim.receive(response(486, "busy-tag"));
        sim.receive(response(486, "busy-tag"));
        sim.receive(response(180, "busy-tag"));
        sim.receive(response(200, "other-tag"));
        assert_eq!(sim.delivered_statuses(), vec![486]);
        assert_eq!(
            sim.sends.len(),
            4,
            "INVITE, ACK, two resent ACKs; no retransmitted INVITE"
        );
        assert_eq!(sim.sends[2].1, sim.sends[1].1);
        assert_eq!(sim.sends[3].1, sim.sends[1].1);
        assert_eq!(sim.sends[2].0, ms(4_000));
        assert_eq!(sim.state(), InviteClientState::Completed);
    }

    #[test]
    fn timer_d_terminates_completed_and_stale_timers_are_ignored() {
        let mut sim = Sim::unreliable();
        sim.advance_to(ms(600));
        sim.receive(response(180, "t"));
        sim.advance_to(ms(2_000));
        sim.receive(response(603, "t"));
        sim.run_all();
        assert_eq!(sim.state(), InviteClientState::Terminated);
        assert_eq!(sim.terminations, 1);
        assert_eq!(sim.delivered_statuses(), vec![180, 603]);
        assert_eq!(
            sim.events.len(),
            2,
            "Timer B fired in Completed and was ignored"
        );
        assert_eq!(sim.send_times(), vec![ms(0), ms(500), ms(2_000)]);
        assert_eq!(sim.elapsed(), ms(34_000), "Timer D is 32 s after the 603");
    }

    #[test]
    fn final_error_on_reliable_transport_terminates_at_once() {
        let mut sim = Sim::reliable();
        sim.receive(response(180, "t"));
        sim.receive(response(500, "t"));
        assert_eq!(sim.state(), InviteClientState::Terminated);
        assert_eq!(sim.terminations, 1);
        assert_eq!(sim.delivered_statuses(), vec![180, 500]);
        assert_eq!(sim.sends.len(), 2, "INVITE and ACK");
        assert!(sim.pending(Timer::D).is_empty());
        sim.receive(response(500, "t"));
        sim.run_all();
        assert_eq!(
            sim.sends.len(),
            2,
            "a terminated transaction resends nothing"
        );
        assert_eq!(sim.events.len(), 2);
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn two_hundred_enters_accepted_and_every_2xx_reaches_the_tu() {
        let mut sim = Sim::unreliable();
        sim.advance_to(ms(100));
        sim.receive(response(200, "fork-1"));
        assert_eq!(sim.state(), InviteClientState::Accepted);
        assert_eq!(sim.pending(Timer::M), vec![ms(100) + ms(32_000)]);
        sim.advance_to(ms(600));
        sim.receive(response(200, "fork-1"));
        sim.receive(response(200, "fork-2"));
        sim.receive(response(486, "fork-3"));
        sim.receive(response(180, "fork-1"));
        assert_eq!(sim.delivered_statuses(), vec![200, 200, 200]);
        assert_eq!(
            sim.sends.len(),
            1,
            "no ACK for a 2xx and no retransmission after it"
        );
        sim.run_all();
        assert_eq!(sim.state(), InviteClientState::Terminated);
        assert_eq!(sim.terminations, 1);
        assert_eq!(sim.events.len(), 3, "Timer B in Accepted is ignored");
        assert_eq!(
            sim.elapsed(),
            ms(32_100),
            "Timer M, the last timer, terminated it"
        );
    }

    #[test]
    fn two_hundred_after_provisional_on_reliable_transport() {
        let mut sim = Sim::reliable();
        sim.receive(response(183, "t"));
        sim.receive(response(200, "t"));
        assert_eq!(sim.state(), InviteClientState::Accepted);
        sim.advance_to(ms(31_999));
        sim.receive(response(200, "t"));
        assert_eq!(sim.delivered_statuses(), vec![183, 200, 200]);
        sim.advance_to(ms(32_000));
        assert_eq!(sim.state(), InviteClientState::Terminated);
        assert_eq!(sim.terminations, 1);
        sim.receive(response(200, "t"));
        assert_eq!(sim.events.len(), 3, "nothing after Terminated");
    }

    #[test]
    fn timer_m_follows_custom_t1() {
        let mut sim = Sim::start(false, short_timers());
        sim.receive(response(200, "t"));
        assert_eq!(sim.pending(Timer::M), vec![ms(640)]);
        sim.run_all();
        assert_eq!(sim.send_times(), vec![ms(0)]);
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn transport_error_in_calling_informs_the_tu_and_terminates() {
        let mut sim = Sim::unreliable();
        sim.advance_to(ms(500));
        sim.transport_error();
        assert_eq!(sim.state(), InviteClientState::Terminated);
        assert!(matches!(sim.events.as_slice(), [Event::TransportError]));
        assert_eq!(sim.terminations, 1);
        sim.transport_error();
        sim.run_all();
        assert_eq!(sim.send_times(), vec![ms(0), ms(500)]);
        assert_eq!(sim.events.len(), 1);
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn transport_error_sending_the_ack_in_completed_terminates() {
        let mut sim = Sim::unreliable();
        sim.receive(response(404, "t"));
        sim.transport_error();
        assert_eq!(sim.state(), InviteClientState::Terminated);
        assert!(matches!(
            sim.events.as_slice(),
            [Event::Response(_), Event::TransportError]
        ));
        assert_eq!(sim.terminations, 1);
    }

    #[test]
    fn transport_error_is_ignored_where_nothing_is_sent() {
        let mut sim = Sim::reliable();
        sim.receive(response(180, "t"));
        sim.transport_error();
        assert_eq!(sim.state(), InviteClientState::Proceeding);
        sim.receive(response(200, "t"));
        sim.transport_error();
        assert_eq!(sim.state(), InviteClientState::Accepted);
        assert_eq!(sim.events.len(), 2);
        assert_eq!(sim.terminations, 0);
    }

    #[test]
    fn timers_out_of_place_are_ignored() {
        let mut sim = Sim::unreliable();
        let now = sim.now;
        let mut out = Vec::new();
        // Timers this transaction never started in Calling.
        for timer in [Timer::D, Timer::M, Timer::E, Timer::K, Timer::G] {
            sim.tx.on_timer(timer, now, &mut out);
        }
        assert!(out.is_empty());
        sim.receive(response(180, "t"));
        sim.tx.on_timer(Timer::A, now, &mut out);
        sim.tx.on_timer(Timer::B, now, &mut out);
        sim.tx.on_timer(Timer::D, now, &mut out);
        assert!(out.is_empty(), "A, B and D are stale in Proceeding");
        sim.receive(response(200, "t"));
        sim.tx.on_timer(Timer::A, now, &mut out);
        sim.tx.on_timer(Timer::D, now, &mut out);
        assert!(out.is_empty(), "A and D are stale in Accepted");
        assert_eq!(sim.state(), InviteClientState::Accepted);
    }

    #[test]
    fn timer_a_is_ignored_on_a_reliable_transport() {
        let mut sim = Sim::reliable();
        let mut out = Vec::new();
        sim.tx.on_timer(Timer::A, sim.now, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn responses_that_cannot_belong_to_an_invite_are_ignored() {
        let mut sim = Sim::unreliable();
        let no_cseq = parse(
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKclient1\r\n\
To: <sip:bob@example.com>;tag=1\r\nFrom: <sip:alice@example.com>;tag=from-tag\r\n\
Call-ID: call-1@127.0.0.1\r\nContent-Length: 0\r\n\r\n",
        );
        let bad_cseq = parse(
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKclient1\r\n\
CSeq: INVITE 42\r\nContent-Length: 0\r\n\r\n",
        );
        let cancel_200 = parse(
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKclient1\r\n\
CSeq: 42 CANCEL\r\nContent-Length: 0\r\n\r\n",
        );
        for message in [no_cseq, bad_cseq, cancel_200, invite()] {
            sim.receive(message);
        }
        assert!(sim.events.is_empty());
        assert_eq!(sim.state(), InviteClientState::Calling);
    }

    #[test]
    fn ack_from_a_request_missing_fields_does_not_panic() {
        let bare = parse(b"INVITE sip:bob@example.com SIP/2.0\r\n\r\n");
        let reply = parse(b"SIP/2.0 500 Oops\r\n\r\n");
        let ack = ack_for_non_2xx(&bare, &reply);
        assert!(ack.starts_with(b"ACK sip:bob@example.com SIP/2.0\r\n"));
        let mut out = Vec::new();
        let mut tx = InviteClient::start(
            bare,
            false,
            TimerValues::default(),
            Instant::now(),
            &mut out,
        );
        tx.on_response(reply, Instant::now(), &mut out);
        assert_eq!(tx.state(), InviteClientState::Calling, "no CSeq: ignored");
    }

    #[test]
    fn cancel_follows_section_9_1() {
        let invite = Message::parse(Bytes::from_static(
            b"INVITE sip:bob@127.0.0.1:5080 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKcancelme, SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKup\r\n\
Route: <sip:127.0.0.1:5090;lr>\r\nMax-Forwards: 69\r\nFrom: <sip:alice@example.com>;tag=a\r\n\
To: <sip:bob@example.com>\r\nCall-ID: c@127.0.0.1\r\nCSeq: 4 INVITE\r\nContent-Length: 0\r\n\r\n",
        ))
        .unwrap();
        let cancel = Message::parse(cancel_for(&invite)).unwrap();
        cancel.validate().unwrap();
        assert_eq!(cancel.method(), Some(&Method::Cancel));
        assert_eq!(cancel.request_uri_bytes(), invite.request_uri_bytes());
        assert_eq!(cancel.vias().count(), 1);
        assert_eq!(
            cancel.top_via().unwrap().branch(),
            Some(&b"z9hG4bKcancelme"[..])
        );
        assert_eq!(cancel.cseq().unwrap().seq, 4);
        assert_eq!(cancel.routes().count(), 1);
        assert_eq!(cancel.to().unwrap().tag(), None);
        assert_eq!(cancel.call_id().unwrap(), b"c@127.0.0.1");
    }
}
