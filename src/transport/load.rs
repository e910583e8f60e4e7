//! Measuring how busy an event loop is, for its Worker's overload control.
//!
//! Owns the counters behind [`LoadSample`]. The loop's runtime calls [`on_park`] when it runs
//! out of work (every task waiting: its UDP sockets, its hand-over queue, its TCP
//! connections and timers all drained) and [`on_unpark`] when it wakes (tokio's
//! `on_thread_park` / `on_thread_unpark` hooks): the time between is exactly the time the loop
//! had work, whatever the work was, at the cost of one clock read per wake-up and none per
//! message. Time the thread was runnable but another thread held the CPU counts as busy: it is
//! time the loop could not serve its queues. Linux tells that time apart
//! (`/proc/thread-self/schedstat`), which the overload log line reports.
//!
//! The counters live in the loop thread's thread-local storage; [`sample`] reads them from a
//! task of the same loop.

use std::cell::Cell;
use std::time::{Duration, Instant};

use super::LoadSample;

/// How often a loop's counters are sampled for its Worker.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy)]
struct Meter {
    /// Busy time up to `woke`.
    busy: Duration,
    idles: u64,
    /// When the loop last woke, `None` while parked.
    woke: Option<Instant>,
}

thread_local! {
    static METER: Cell<Meter> = const {
        Cell::new(Meter { busy: Duration::ZERO, idles: 0, woke: None })
    };
}

/// The loop goes idle: every queue drained.
pub(crate) fn on_park() {
    let now = Instant::now();
    METER.with(|meter| {
        let mut m = meter.get();
        if let Some(woke) = m.woke.take() {
            m.busy += now.saturating_duration_since(woke);
        }
        m.idles += 1;
        meter.set(m);
    });
}

/// The loop wakes with work to do (also called once when the loop starts).
pub(crate) fn on_unpark() {
    let now = Instant::now();
    METER.with(|meter| {
        let mut m = meter.get();
        m.woke = Some(now);
        meter.set(m);
    });
}

/// This thread's counters at `now`.
pub(crate) fn sample(now: Instant) -> LoadSample {
    let m = METER.with(Cell::get);
    let busy = m.busy
        + m.woke
            .map_or(Duration::ZERO, |w| now.saturating_duration_since(w));
    let mut sample = LoadSample::new(now, busy, m.idles);
    if let Some((cpu, cpu_wait)) = schedstat() {
        sample.cpu = Some(cpu);
        sample.cpu_wait = Some(cpu_wait);
    }
    sample
}

/// This thread's time on a CPU and time runnable waiting for one (Linux; `None` elsewhere or
/// without CONFIG_SCHED_INFO).
fn schedstat() -> Option<(Duration, Duration)> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    parse_schedstat(&text)
}

fn parse_schedstat(text: &str) -> Option<(Duration, Duration)> {
    let mut fields = text.split_ascii_whitespace().map(str::parse::<u64>);
    let run = fields.next()?.ok()?;
    let wait = fields.next()?.ok()?;
    Some((Duration::from_nanos(run), Duration::from_nanos(wait)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_runs_from_wake_up_to_park() {
        // A fresh thread: its own counters.
        std::thread::spawn(|| {
            let start = Instant::now();
            on_unpark();
            let before_park = sample(Instant::now());
            assert_eq!(before_park.idles, 0);
            on_park();
            let parked = sample(start + Duration::from_secs(3600));
            assert_eq!(parked.idles, 1);
            assert!(
                parked.busy < Duration::from_secs(60),
                "no time counted while parked"
            );
            assert!(parked.busy >= before_park.busy);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn schedstat_lines_are_parsed() {
        assert_eq!(
            parse_schedstat("123456 789 10\n"),
            Some((Duration::from_nanos(123_456), Duration::from_nanos(789)))
        );
        assert_eq!(parse_schedstat("garbage"), None);
        assert_eq!(parse_schedstat(""), None);
    }
}
