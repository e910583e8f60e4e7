//! Log conventions shared by the engine: the `sip` span that gives every event about one
//! message its `call_id`, and the `moonroute::refused` target of the one line each dropped or
//! refused message gets.
//!
//! An operator greps a Call-ID and sees the whole call: every event logged while a message is
//! processed (parsing, transaction layer, relay, script hooks, registrar, Lua `sip.log`) runs
//! inside [`message_span`], whose `call_id` field the human format prints as
//! `sip{call_id=...}:` and the JSON format as `"span":{"call_id":...}`. Work that is not
//! driven by a received message (transaction timers, Timer C, DNS answers, parked answers)
//! enters the span of the message it concerns, or names `call_id` explicitly.
//!
//! Dropped or refused messages (unparsable, malformed, too large, loops, responses with no
//! transaction, overload 503, the script's drops and refusals) are logged exactly once, with
//! target [`REFUSED`], fields `source`, `transport`, `code` when answered, `call_id` when
//! known, and a `reason` sentence; `log_level = "info,moonroute::refused=warn"` quietens them.
//! What a peer keeps doing wrong but is worked around is logged once per peer per period
//! ([`Throttle`]).
//!
//! The protocol crate's events name their target (`target: "moonroute::proxy::relay"`): the
//! module path they had before the protocol became a crate of its own, so an operator's
//! `log_level` filter (`moonroute::proxy=debug`) and the JSON `target` field are unchanged.

use crate::sip::Message;

/// The target of the one line per dropped or refused message.
pub const REFUSED: &str = "moonroute::refused";

/// Bytes from the wire shown in a log field (lossy UTF-8), formatted only if the event or
/// span is recorded.
pub struct Lossy<'a>(pub &'a [u8]);

impl std::fmt::Display for Lossy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::str::from_utf8(self.0) {
            Ok(text) => f.write_str(text),
            Err(_) => f.write_str(&String::from_utf8_lossy(self.0)),
        }
    }
}

/// The Call-ID of `message` as a log field value (empty when it has none).
pub fn call_id(message: &Message) -> Lossy<'_> {
    Lossy(message.call_id().unwrap_or(b""))
}

/// The span of one message's processing: `sip{call_id=...}`. At level ERROR so that it is
/// enabled whatever `log_level` lets through (a span's level only decides whether the span
/// exists, not which events inside it are shown): with `log_level = "warn"` the warnings
/// about a message still carry its Call-ID. Off only with `log_level = "off"`.
pub fn message_span(message: &Message) -> tracing::Span {
    tracing::error_span!(target: "moonroute::logging", "sip", call_id = %call_id(message))
}

/// [`message_span`] for a Call-ID already extracted.
pub fn call_span(call_id: &[u8]) -> tracing::Span {
    tracing::error_span!(target: "moonroute::logging", "sip", call_id = %Lossy(call_id))
}

/// At most one line per key per `period`, for what a peer keeps doing wrong (a callee's
/// malformed answers): the first occurrence is logged, the repeats within the period are not,
/// so a busy peer cannot flood the log. Sans-IO: the caller gives `now`. At most `capacity`
/// keys are remembered; when full, those logged more than a period ago are forgotten, and if
/// none is, new keys are not logged until one is (memory stays bounded whatever the peers).
#[derive(Debug)]
pub struct Throttle<K> {
    period: std::time::Duration,
    capacity: usize,
    logged_at: std::collections::HashMap<K, std::time::Instant>,
}

impl<K: std::hash::Hash + Eq> Throttle<K> {
    pub fn new(period: std::time::Duration, capacity: usize) -> Throttle<K> {
        Throttle {
            period,
            capacity,
            logged_at: std::collections::HashMap::new(),
        }
    }

    /// Whether a line about `key` is due at `now` (then it is counted as logged).
    pub fn allow(&mut self, key: K, now: std::time::Instant) -> bool {
        let period = self.period;
        let recent = |at: &std::time::Instant| now.saturating_duration_since(*at) < period;
        if self.logged_at.get(&key).is_some_and(recent) {
            return false;
        }
        if !self.logged_at.contains_key(&key) && self.logged_at.len() >= self.capacity {
            self.logged_at.retain(|_, at| recent(at));
            if self.logged_at.len() >= self.capacity {
                return false;
            }
        }
        self.logged_at.insert(key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_key_is_logged_once_per_period() {
        let mut throttle = Throttle::new(Duration::from_secs(60), 8);
        let t0 = Instant::now();
        assert!(throttle.allow("a", t0));
        assert!(!throttle.allow("a", t0 + Duration::from_secs(59)));
        assert!(throttle.allow("b", t0 + Duration::from_secs(1)));
        assert!(throttle.allow("a", t0 + Duration::from_secs(60)));
        assert!(!throttle.allow("a", t0 + Duration::from_secs(61)));
    }

    #[test]
    fn memory_stays_bounded() {
        let mut throttle = Throttle::new(Duration::from_secs(60), 2);
        let t0 = Instant::now();
        assert!(throttle.allow(1, t0));
        assert!(throttle.allow(2, t0));
        // Full of recent keys: a new one is not logged (nor remembered).
        assert!(!throttle.allow(3, t0 + Duration::from_secs(1)));
        assert_eq!(throttle.logged_at.len(), 2);
        // Once the old ones are a period old, they make room.
        assert!(throttle.allow(3, t0 + Duration::from_secs(60)));
        assert_eq!(throttle.logged_at.len(), 1);
    }
}
