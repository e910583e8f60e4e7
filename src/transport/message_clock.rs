//! Sans-IO deadlines for receiving one message on a byte stream (TCP, TLS, and any later
//! stream transport such as WebSocket).
//!
//! RFC 3261 §18.3 frames stream messages by their header block and Content-Length, but says
//! nothing about how long a message may take to arrive. Without a bound, a peer that sends
//! one byte now and then keeps its connection (and its slot in the connection table) for as
//! long as it likes while nothing it sends ever reaches the core or the script. The clock
//! here bounds each message instead of each byte:
//! - the header block must be complete within `header` of the message's first byte;
//! - the whole message, body included, within `message` of its first byte;
//! - on an accepted connection, the first message's clock starts when the connection is
//!   ready, so a client that connects and says nothing, or only sends keep-alives, is bounded
//!   the same way.
//!
//! CRLF keep-alives between messages (RFC 5626 §3.5.1, and the CRLF that RFC 3261 §7.5
//! allows before a start-line) do not start the clock: a UA that sends a lone CRLF and the
//! rest of its ping much later is not cut off.
//!
//! The connection's task tells the clock what the framer holds after every read
//! ([`MessageClock::observe`]) and when a message was delivered
//! ([`MessageClock::message_received`]), each with an explicit `now`, and sleeps until
//! [`MessageClock::deadline`].

use std::time::{Duration, Instant};

/// Where the framer is in the message being received (see
/// [`super::framing::StreamFramer::progress`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageProgress {
    /// Nothing of a message is buffered (at most the start of a CRLF keep-alive).
    Between,
    /// Part of a header block is buffered.
    Head,
    /// The header block is complete; part of the body is still missing.
    Body,
}

/// How long a message may take to arrive (from `[limits]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageTimeouts {
    /// From a message's first byte to the end of its header block.
    pub header: Duration,
    /// From a message's first byte to the end of its body; at least `header`.
    pub message: Duration,
}

/// Which bound a message missed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overdue {
    /// The header block was not complete in time (or, on an accepted connection, no message
    /// started in time).
    Header,
    /// The header block was, the body was not.
    Message,
}

impl Overdue {
    /// The configuration key of the bound, as metric label and in log lines.
    pub fn key(self) -> &'static str {
        match self {
            Overdue::Header => "tcp_header_timeout_ms",
            Overdue::Message => "tcp_message_timeout_ms",
        }
    }
}

/// The receive deadline of one stream connection. See the module docs.
#[derive(Clone, Debug)]
pub struct MessageClock {
    timeouts: MessageTimeouts,
    /// When the message being received started; `None` between messages.
    started: Option<Instant>,
    progress: MessageProgress,
    /// An accepted connection that has not delivered a message yet: its clock runs from the
    /// moment it was ready, even between messages.
    awaiting_first: bool,
}

impl MessageClock {
    /// The clock of a connection this server opened: it runs only while a message is
    /// arriving.
    pub fn outbound(timeouts: MessageTimeouts) -> MessageClock {
        MessageClock {
            timeouts,
            started: None,
            progress: MessageProgress::Between,
            awaiting_first: false,
        }
    }

    /// The clock of an accepted connection that became ready at `now`: its first message is
    /// due as if its first byte had arrived then.
    pub fn inbound(timeouts: MessageTimeouts, now: Instant) -> MessageClock {
        MessageClock {
            timeouts,
            started: Some(now),
            progress: MessageProgress::Between,
            awaiting_first: true,
        }
    }

    /// What the framer holds at `now`, after it has cut every complete message out.
    pub fn observe(&mut self, progress: MessageProgress, now: Instant) {
        self.progress = progress;
        match progress {
            MessageProgress::Between if !self.awaiting_first => self.started = None,
            MessageProgress::Between => {}
            MessageProgress::Head | MessageProgress::Body => {
                self.started.get_or_insert(now);
            }
        }
    }

    /// A whole message was cut from the stream: the next one gets a clock of its own.
    pub fn message_received(&mut self) {
        self.awaiting_first = false;
        self.started = None;
        self.progress = MessageProgress::Between;
    }

    /// When the message being received is overdue, and which bound that is; `None` when no
    /// message is due.
    pub fn deadline(&self) -> Option<(Instant, Overdue)> {
        let started = self.started?;
        Some(match self.progress {
            MessageProgress::Between | MessageProgress::Head => {
                (started + self.timeouts.header, Overdue::Header)
            }
            MessageProgress::Body => (started + self.timeouts.message, Overdue::Message),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: MessageTimeouts = MessageTimeouts {
        header: Duration::from_secs(10),
        message: Duration::from_secs(20),
    };

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn an_outbound_connection_has_no_deadline_between_messages() {
        let t0 = Instant::now();
        let mut clock = MessageClock::outbound(TIMEOUTS);
        assert_eq!(clock.deadline(), None);
        clock.observe(MessageProgress::Between, at(t0, 100));
        assert_eq!(clock.deadline(), None);
    }

    #[test]
    fn the_header_block_is_due_from_the_first_byte_whatever_arrives_later() {
        let t0 = Instant::now();
        let mut clock = MessageClock::outbound(TIMEOUTS);
        clock.observe(MessageProgress::Head, at(t0, 1));
        // A byte every second does not move the deadline.
        for second in 2..10 {
            clock.observe(MessageProgress::Head, at(t0, second));
            assert_eq!(clock.deadline(), Some((at(t0, 11), Overdue::Header)));
        }
    }

    #[test]
    fn the_body_is_due_within_the_message_timeout_of_the_same_first_byte() {
        let t0 = Instant::now();
        let mut clock = MessageClock::outbound(TIMEOUTS);
        clock.observe(MessageProgress::Head, t0);
        clock.observe(MessageProgress::Body, at(t0, 9));
        assert_eq!(clock.deadline(), Some((at(t0, 20), Overdue::Message)));
    }

    #[test]
    fn each_message_gets_its_own_clock() {
        let t0 = Instant::now();
        let mut clock = MessageClock::outbound(TIMEOUTS);
        clock.observe(MessageProgress::Head, t0);
        clock.message_received();
        assert_eq!(clock.deadline(), None);
        // The same read held the start of the next message.
        clock.observe(MessageProgress::Head, at(t0, 8));
        assert_eq!(clock.deadline(), Some((at(t0, 18), Overdue::Header)));
        clock.message_received();
        clock.observe(MessageProgress::Between, at(t0, 9));
        assert_eq!(clock.deadline(), None);
    }

    #[test]
    fn an_accepted_connection_must_start_its_first_message_in_time() {
        let t0 = Instant::now();
        let mut clock = MessageClock::inbound(TIMEOUTS, t0);
        assert_eq!(clock.deadline(), Some((at(t0, 10), Overdue::Header)));
        // Keep-alives do not count as a message.
        clock.observe(MessageProgress::Between, at(t0, 5));
        assert_eq!(clock.deadline(), Some((at(t0, 10), Overdue::Header)));
        // Nor does a message started late get a fresh clock.
        clock.observe(MessageProgress::Head, at(t0, 6));
        assert_eq!(clock.deadline(), Some((at(t0, 10), Overdue::Header)));
        clock.observe(MessageProgress::Body, at(t0, 7));
        assert_eq!(clock.deadline(), Some((at(t0, 20), Overdue::Message)));
        // After its first message it is like any connection: keep-alives are fine.
        clock.message_received();
        clock.observe(MessageProgress::Between, at(t0, 500));
        assert_eq!(clock.deadline(), None);
    }

    #[test]
    fn the_keys_name_the_configuration() {
        assert_eq!(Overdue::Header.key(), "tcp_header_timeout_ms");
        assert_eq!(Overdue::Message.key(), "tcp_message_timeout_ms");
    }
}
