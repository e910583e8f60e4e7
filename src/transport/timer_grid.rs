//! When an event loop's timer task wakes: the Worker's deadlines rounded up to a grid of
//! [`GRANULARITY`], so the timers due within one step fire in one wake-up.
//!
//! Why: each time the loop's tokio timer fires and is armed again for the next deadline,
//! tokio's time driver sees a new earliest entry and unparks the driver (a `write` to its
//! eventfd, then an `epoll_wait` that returns at once), although it is this very thread. Under
//! load every call leaves several timers (RFC 3261 §17.1.1.2 Timers A/B/D, §17.1.2.2 E/F/K,
//! §17.2.1 G/H/I, §17.2.2 J, RFC 6026 L/M) expiring at scattered instants, so the loop woke
//! for them one by one (measured at 300 calls/s: 0.65 such unparks per call, and as many extra
//! wake-ups). On the grid a loop wakes for timers at most once per step, whatever the rate.
//!
//! Cost in precision: a timer fires up to one step late. RFC 3261's timers are lower bounds
//! (a retransmission "after T1", a transaction kept "for 64*T1"), and the step is small
//! against T1 = 500 ms (Kamailio's `tm` timers step by 1/16 s).

use std::time::{Duration, Instant};

/// The step of the grid.
pub(crate) const GRANULARITY: Duration = Duration::from_millis(5);

/// A loop's grid, anchored at the loop's start.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TimerGrid {
    origin: Instant,
}

impl TimerGrid {
    pub(crate) fn new(origin: Instant) -> Self {
        TimerGrid { origin }
    }

    /// The first instant of the grid at or after `deadline` (a deadline before the origin is
    /// kept as it is: it is due anyway).
    pub(crate) fn wake_at(&self, deadline: Instant) -> Instant {
        let Some(since) = deadline.checked_duration_since(self.origin) else {
            return deadline;
        };
        let step = GRANULARITY.as_nanos();
        let steps = since.as_nanos().div_ceil(step);
        let offset = steps.saturating_mul(step);
        match u64::try_from(offset) {
            Ok(nanos) => self
                .origin
                .checked_add(Duration::from_nanos(nanos))
                .unwrap_or(deadline),
            Err(_) => deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_is_rounded_up_to_the_next_step_never_down() {
        let origin = Instant::now();
        let grid = TimerGrid::new(origin);
        let ms = Duration::from_millis;
        assert_eq!(grid.wake_at(origin), origin);
        assert_eq!(grid.wake_at(origin + ms(1)), origin + GRANULARITY);
        assert_eq!(grid.wake_at(origin + GRANULARITY), origin + GRANULARITY);
        assert_eq!(
            grid.wake_at(origin + GRANULARITY + Duration::from_nanos(1)),
            origin + GRANULARITY * 2
        );
        let t1 = origin + ms(500) + Duration::from_micros(1);
        let woken = grid.wake_at(t1);
        assert!(woken >= t1 && woken - t1 < GRANULARITY);
    }

    #[test]
    fn deadlines_within_one_step_share_one_wake_up() {
        let origin = Instant::now();
        let grid = TimerGrid::new(origin);
        let base = origin + Duration::from_millis(32_000);
        let a = grid.wake_at(base + Duration::from_micros(100));
        let b = grid.wake_at(base + Duration::from_micros(4_000));
        assert_eq!(a, b);
    }

    #[test]
    fn a_deadline_before_the_origin_stays_due() {
        let origin = Instant::now() + Duration::from_secs(1);
        let grid = TimerGrid::new(origin);
        let past = origin - Duration::from_millis(3);
        assert_eq!(grid.wake_at(past), past);
    }
}
