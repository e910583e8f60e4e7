//! The transaction layer (RFC 3261 §17, with the RFC 6026 Accepted states): sans-IO, no sockets,
//! no clock.
//!
//! Owns the four state machines — INVITE client (§17.1.1, figure 5 as amended by RFC 6026
//! figure 3), non-INVITE client (§17.1.2, figure 6), INVITE server (§17.2.1, figure 7 as amended
//! by RFC 6026 figure 4) and non-INVITE server (§17.2.2, figure 8) — and the rules that match a
//! message to its transaction (§17.1.3, §17.2.3).
//!
//! Every machine takes events with an explicit `now` and pushes [`Action`]s: send these bytes
//! on the transaction's transport, start a timer that fires at an instant, deliver an event to
//! the transaction user (the proxy core), or report that the transaction has terminated.
//! Timers are never cancelled: a machine ignores a timer that fires in a state where it no
//! longer applies, so the driver needs no cancellation bookkeeping. Retransmission timers run
//! only over unreliable transports (§17.1.1.2, §17.1.2.2, §17.2.1, §17.2.2).

pub mod client_invite;
pub mod client_non_invite;
pub mod key;
pub mod layer;
pub mod metrics;
pub mod server_invite;
pub mod server_non_invite;
#[cfg(test)]
mod sim;

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::sip::Message;

/// The timer values of §17.1.1.1 and table 4 (Appendix A).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerValues {
    /// RTT estimate, default 500 ms.
    pub t1: Duration,
    /// Maximum retransmit interval for non-INVITE requests and INVITE responses, default 4 s.
    pub t2: Duration,
    /// Maximum duration a message remains in the network, default 5 s.
    pub t4: Duration,
}

impl Default for TimerValues {
    fn default() -> Self {
        TimerValues {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl TimerValues {
    /// 64*T1: timers B, F, H, J, L and M (§17, RFC 6026).
    pub fn t1x64(&self) -> Duration {
        self.t1 * 64
    }
}

/// The timers of RFC 3261 table 4 plus RFC 6026's L and M. C (proxy INVITE timeout) belongs to
/// the proxy core, not to a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Timer {
    /// INVITE request retransmit (client, unreliable).
    A,
    /// INVITE transaction timeout (client).
    B,
    /// Wait time for response retransmits (INVITE client, Completed).
    D,
    /// Non-INVITE request retransmit (client, unreliable).
    E,
    /// Non-INVITE transaction timeout (client).
    F,
    /// INVITE response retransmit (server, unreliable).
    G,
    /// Wait time for ACK receipt (INVITE server, Completed).
    H,
    /// Wait time for ACK retransmits (INVITE server, Confirmed).
    I,
    /// Wait time for non-INVITE request retransmits (server, Completed).
    J,
    /// Wait time for response retransmits (non-INVITE client, Completed).
    K,
    /// Wait time for accepted INVITE request retransmits (server, Accepted; RFC 6026).
    L,
    /// Wait time for retransmission of 2xx to INVITE (client, Accepted; RFC 6026).
    M,
}

/// What a transaction tells its user (the proxy core).
#[derive(Debug)]
pub enum Event {
    /// A response for a client transaction (provisional or final; for INVITE, every 2xx
    /// including retransmissions while Accepted, RFC 6026 §8.4).
    Response(Message),
    /// Timer B or F fired: no final response (§17.1.1.2, §17.1.2.2). The proxy turns this into
    /// a 408 for the branch (§16.7 step 2... §16.8).
    Timeout,
    /// The transport reported a failure sending on this transaction (§17.1.4, §17.2.4).
    TransportError,
    /// An ACK for a 2xx reached an INVITE server transaction in the Accepted state: passed to
    /// the user, not absorbed (RFC 6026 §8.7).
    Ack(Message),
    /// Timer H fired: the ACK for a non-2xx final response never came (§17.2.1).
    AckTimeout,
}

/// One thing the driver must do, in order.
#[derive(Debug)]
pub enum Action {
    /// Send these bytes to the transaction's peer over its transport.
    Send(Bytes),
    /// Fire `timer` at `at` by calling the machine's `on_timer`.
    StartTimer { timer: Timer, at: Instant },
    /// Hand an event to the transaction user.
    Deliver(Event),
    /// The machine reached Terminated: forget it. It ignores every later input.
    Terminated,
}
