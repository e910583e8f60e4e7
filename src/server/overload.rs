//! Overload control of one event loop: when, and how much of, the new work to refuse.
//!
//! Owns the decision behind `limits.overload_after_ms`; the refusal itself (a stateless 503
//! with Retry-After, RFC 3261 §21.5.4) is the transaction layer's
//! ([`crate::transaction::TransactionLayer::set_shedding`]). Sans-IO: the shell measures the
//! loop and reports a cumulative [`LoadSample`] every [`SAMPLE_INTERVAL`] or so; the decision
//! depends on those samples only (their `at` is the clock), so it is tested in simulated time.
//!
//! Why these rules (RFC 6357 §4, RFC 7339 §5):
//! - **The signal is sustained saturation.** A loop that went idle (parked with every queue
//!   drained) during an interval had capacity to spare then, whatever one datagram waited.
//!   Only a loop that has worked `limits.overload_after_ms` without idling once is
//!   overloaded. One late sample or a burst refuses nothing. Hand-overs from other loops,
//!   timers and TCP are work of the loop like its UDP socket: idle means all of them drained.
//! - **A loop catching up is not overloaded.** Where the shell tells the bytes waiting in the
//!   loop's receive queues, an interval in which they shrank by [`CATCHING_UP`] or more counts
//!   as catching up: it adds nothing to the saturation (a backlog shrinking slower than that
//!   would keep requests waiting past T1 for seconds). After a stall (another process holding
//!   the CPU, a burst) the loop drains what piled up without refusing.
//! - **Time another process holds the CPU is not the loop's saturation.** Where the system
//!   tells the thread's CPU time, saturation is counted in it, not in wall time: a loop
//!   stalled for a second by a CPU hog next to it, then catching up, has worked a fraction of
//!   that second. A machine too busy to give the loop what it needs still overloads it, more
//!   slowly.
//! - **A share is refused, not everything** (RFC 7339's loss-based algorithm). Refusing all
//!   new requests the moment a threshold is crossed turns a late sample into a 503 storm and
//!   leaves the loop idle right after. Instead a fraction `p` of new out-of-dialog requests is
//!   refused.
//! - **The share follows the loop's rates, not fixed steps.** Where the backlog is known, in
//!   each saturated interval the admitted share `1 - p` is scaled by what the loop handled
//!   over what arrived (handled plus the backlog's growth, in messages), less a fifth of the
//!   backlog ([`DRAIN`]): the share meets the excess of the offered load within an interval
//!   or two of the start, and as the backlog left by the start shrinks, the share comes down
//!   with it instead of holding its peak until the backlog is gone (which let the share swing
//!   between 20 % and 98 % with a loop sharing its CPU, and requests wait past T1). At most
//!   halved or raised by half per interval ([`SCALE_RANGE`]). Where the backlog is not known
//!   it starts at [`STEP`] and grows by [`STEP`] for each saturated interval (in proportion to
//!   the CPU the loop got), by [`FINE_STEP`] once the loop had idle time since shedding
//!   started.
//! - **A loop starved of CPU sheds too.** Twice `limits.overload_after_ms` of wall time
//!   without idling (and without catching up) starts the shedding however little CPU the loop
//!   got: its clients' requests wait all the same.
//! - **Recovery is proportional to the spare time.** In an interval with idle time, busy a
//!   fraction `u`, the admitted load is scaled towards [`TARGET_BUSY`]:
//!   `1 - p' = (1 - p) * TARGET_BUSY / u`, so a load that fell away ends the shedding in one
//!   interval, and one just below capacity keeps `p` near where it balances. `p` never grows
//!   in an interval with idle time (hysteresis: growth needs saturation, shrinking needs
//!   slack), and below [`MIN_SHED`] shedding ends.
//! - **What is never refused** (the layer's job): ACK, CANCEL, retransmissions, responses and
//!   requests inside a dialog: they complete work already accepted, and refusing them makes
//!   the clients retransmit, which is how overloaded servers collapse (RFC 6357 §4).

use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::transport::LoadSample;

/// How often the shell samples a loop.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// What the refused fraction grows by for each interval a shedding loop is still saturated
/// (and where it starts).
const STEP: f64 = 0.1;

/// What it grows by once the loop had idle time while shedding (the balance is near).
const FINE_STEP: f64 = 0.02;

/// The busy fraction the admitted load is scaled towards in an interval with idle time.
const TARGET_BUSY: f64 = 0.99;

/// Below this the loop stops shedding.
const MIN_SHED: f64 = 0.01;

/// How much of the queued bytes must go in an interval for a saturated loop to count as
/// catching up (a backlog at least halves in 1.4 s).
const CATCHING_UP: f64 = 0.05;

/// Whether the backlog shrank enough from `before` to `now` (see [`CATCHING_UP`]).
fn catching_up(before: Option<u64>, now: Option<u64>) -> bool {
    match (before, now) {
        (Some(before), Some(now)) => {
            (now as f64) <= before as f64 * (1.0 - CATCHING_UP) && now < before
        }
        _ => false,
    }
}

/// The most ever refused: the loop keeps admitting some new work, so the shedding can see it
/// end.
const MAX_SHED: f64 = 0.98;

/// What one waiting datagram counts for in a receive queue's bytes: the kernel charges a
/// socket a buffer's `truesize`, 2,304 bytes for a 500-1,500 byte datagram on Linux loopback
/// (1,280 below that), whatever its length. Only converts the backlog into messages for
/// [`rate_scale`]; an error in it slows or speeds the correction, the feedback still settles.
const QUEUED_MESSAGE_BYTES: f64 = 2304.0;

/// The share of the backlog a shedding loop aims to work off in each interval: a backlog left
/// by the start of the overload is gone in about half a second, well within T1.
const DRAIN: f64 = 0.2;

/// The most the admitted share changes by in one interval from the rates (see
/// [`rate_scale`]): halved at most, raised by half at most, so one noisy sample cannot swing
/// it.
const SCALE_RANGE: (f64, f64) = (0.5, 1.5);

/// How much of the admitted load a saturated loop keeps so that its backlog stops growing and
/// shrinks by [`DRAIN`]: the messages it handled in the interval over those that arrived
/// (handled plus the backlog's growth) and the share of the backlog to drain, within
/// [`SCALE_RANGE`]. `None` without a backlog measure or a message handled. (Scaling the
/// admitted new requests scales the work of the calls they start; responses and in-dialog
/// requests follow them.)
fn rate_scale(before: Option<u64>, now: Option<u64>, handled: u64) -> Option<f64> {
    let (before, now) = (before? as f64, now? as f64);
    if handled == 0 {
        return None;
    }
    let handled = handled as f64;
    let (waiting_before, waiting) = (before / QUEUED_MESSAGE_BYTES, now / QUEUED_MESSAGE_BYTES);
    let arrived = (handled + waiting - waiting_before).max(1.0);
    let wanted = handled - DRAIN * waiting;
    Some((wanted / arrived).clamp(SCALE_RANGE.0, SCALE_RANGE.1))
}

/// One loop's overload detector. See the module docs.
pub struct Overload {
    /// `limits.overload_after_ms`; `None`: off.
    after: Option<Duration>,
    loop_index: usize,
    last: Option<LoadSample>,
    /// The time worked since the loop last idled (CPU time where known).
    saturated: Duration,
    /// The fraction of new requests refused now.
    shed: f64,
    /// Whether the loop idled since shedding started: the share is near the balance (used when
    /// the backlog is not known).
    settled: bool,
    /// Since when, and the largest fraction, for the line logged when shedding ends.
    shedding_since: Option<Instant>,
    peak: f64,
    /// Messages the loop handled, in all and at the last sample (the rate the backlog is
    /// compared with).
    handled: u64,
    handled_at_last: u64,
    /// Wall time worked since the loop last idled, not counting intervals that caught up.
    saturated_wall: Duration,
}

impl Overload {
    /// A detector that sheds after `after` of saturation (`None`: never).
    pub fn new(after: Option<Duration>, loop_index: usize) -> Overload {
        Overload {
            after,
            loop_index,
            last: None,
            saturated: Duration::ZERO,
            shed: 0.0,
            settled: false,
            shedding_since: None,
            peak: 0.0,
            handled: 0,
            handled_at_last: 0,
            saturated_wall: Duration::ZERO,
        }
    }

    /// Counts one message the loop handled (received, or handed over by another loop).
    pub fn on_message(&mut self) {
        self.handled += 1;
    }

    /// The fraction of new out-of-dialog requests to refuse now, 0 when not overloaded.
    pub fn shed_fraction(&self) -> f64 {
        self.shed
    }

    /// Takes the loop's counters at `sample.at` and updates the decision.
    pub fn on_sample(&mut self, sample: LoadSample) {
        let Some(after) = self.after else { return };
        let handled = self.handled - std::mem::replace(&mut self.handled_at_last, self.handled);
        let Some(last) = self.last.replace(sample) else {
            return;
        };
        let elapsed = sample.at.saturating_duration_since(last.at);
        if elapsed.is_zero() {
            return;
        }
        let busy = sample.busy.saturating_sub(last.busy).as_secs_f64() / elapsed.as_secs_f64();
        let busy = busy.clamp(0.0, 1.0);
        let idled = sample.idles > last.idles;
        let scale = rate_scale(last.queued, sample.queued, handled);
        if self.shed > 0.0 {
            debug!(
                loop_index = self.loop_index,
                busy_pct = (busy * 100.0).round() as u64,
                idled,
                queued = sample.queued,
                handled,
                refused_pct = (self.shed * 100.0).round() as u64,
                "overload sample"
            );
        }
        if idled {
            self.saturated = Duration::ZERO;
            self.saturated_wall = Duration::ZERO;
            if self.shed > 0.0 {
                self.settled = true;
                self.relieve(busy, sample.at);
            }
            return;
        }
        let catching_up = catching_up(last.queued, sample.queued);
        // The loop worked the whole interval: for as long as it had a CPU.
        let worked = match (last.cpu, sample.cpu) {
            (Some(before), Some(after)) => after.saturating_sub(before).min(elapsed),
            _ => elapsed,
        };
        if self.shed > 0.0 {
            match scale {
                Some(scale) => self.scale_admitted(scale),
                None if catching_up => {}
                None => self.step_up(&last, &sample, worked, elapsed),
            }
            return;
        }
        if catching_up {
            return;
        }
        self.saturated += worked;
        self.saturated_wall += elapsed;
        // A loop kept from its CPU by other processes still holds its clients' requests:
        // past twice the limit in wall time it sheds too, however little CPU it got.
        if self.saturated >= after || self.saturated_wall >= 2 * after {
            self.start(&last, &sample);
            if let Some(scale) = scale {
                self.shed = (1.0 - scale).clamp(STEP, MAX_SHED);
                self.peak = self.shed;
            }
        }
    }

    /// A saturated interval while shedding, the rates known: the admitted share times `scale`
    /// (see [`rate_scale`]). It never ends the shedding: that needs an interval with idle
    /// time (hysteresis).
    fn scale_admitted(&mut self, scale: f64) {
        self.shed = (1.0 - (1.0 - self.shed) * scale).clamp(MIN_SHED, MAX_SHED);
        self.peak = self.peak.max(self.shed);
    }

    /// A saturated interval while shedding, the rates unknown: the share grows by a step, in
    /// proportion to the CPU the loop had.
    fn step_up(
        &mut self,
        last: &LoadSample,
        sample: &LoadSample,
        worked: Duration,
        elapsed: Duration,
    ) {
        let step = match (last.queued, sample.queued) {
            (Some(before), Some(now)) if now <= before => FINE_STEP,
            (Some(_), Some(_)) => STEP,
            _ if self.settled => FINE_STEP,
            _ => STEP,
        };
        let share = worked.as_secs_f64() / elapsed.as_secs_f64();
        self.shed = (self.shed + step * share).min(MAX_SHED);
        self.peak = self.peak.max(self.shed);
    }

    fn start(&mut self, last: &LoadSample, sample: &LoadSample) {
        self.shed = STEP;
        self.peak = STEP;
        self.settled = false;
        self.shedding_since = Some(sample.at);
        // Whether the loop's own work fills its CPU or other threads hold it: the same answer
        // (the loop cannot keep up), a different fix for the operator.
        let share = |of: fn(&LoadSample) -> Option<Duration>| {
            let elapsed = sample.at.saturating_duration_since(last.at).as_secs_f64();
            match (of(last), of(sample)) {
                (Some(before), Some(after)) if elapsed > 0.0 => {
                    format!(
                        "{:.0}%",
                        100.0 * after.saturating_sub(before).as_secs_f64() / elapsed
                    )
                }
                _ => "unknown".to_owned(),
            }
        };
        warn!(
            loop_index = self.loop_index,
            saturated_ms = self.saturated.as_millis() as u64,
            on_cpu = %share(|s| s.cpu),
            waiting_for_cpu = %share(|s| s.cpu_wait),
            "event loop overloaded (never idle for limits.overload_after_ms): refusing a share \
             of new requests 503 with Retry-After"
        );
    }

    /// An interval with idle time while shedding: scale the admitted share towards
    /// [`TARGET_BUSY`], never up.
    fn relieve(&mut self, busy: f64, now: Instant) {
        let admitted = (1.0 - self.shed) * TARGET_BUSY / busy.max(f64::EPSILON);
        self.shed = (1.0 - admitted).clamp(0.0, self.shed);
        if self.shed < MIN_SHED {
            self.shed = 0.0;
            let lasted = self.shedding_since.take().map_or(0, |since| {
                now.saturating_duration_since(since).as_millis() as u64
            });
            info!(
                loop_index = self.loop_index,
                lasted_ms = lasted,
                peak_refused_pct = (self.peak * 100.0).round() as u64,
                "event loop no longer overloaded: serving every new request"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop served by one CPU, in 1 ms steps, with the detector deciding: new requests
    /// arrive at `rate` per second and wait in one queue; an admitted one costs `cost` of CPU,
    /// a refused one `refusal_cost`. While `hogged` says so another process holds the CPU: the
    /// loop has work but does not run (busy, not idle). Samples every [`SAMPLE_INTERVAL`].
    struct Sim {
        overload: Overload,
        now: Instant,
        start: Instant,
        cost: f64,
        refusal_cost: f64,
        queue: f64,
        busy: Duration,
        /// Time the loop ran: busy but not hogged.
        cpu: Duration,
        /// Whether the samples tell the queue (its bytes: [`QUEUED_MESSAGE_BYTES`] per
        /// request) and the detector counts the messages handled.
        queue_known: bool,
        /// Requests served but not yet counted as whole messages.
        uncounted: f64,
        idles: u64,
        admitted: f64,
        refused: f64,
        /// The CPU time left over from the last step's unfinished request.
        credit: f64,
        longest_wait: f64,
    }

    const MS: Duration = Duration::from_millis(1);

    impl Sim {
        fn new(after_ms: u64, cost: Duration, refusal_cost: Duration) -> Sim {
            let now = Instant::now();
            let mut overload = Overload::new(Some(Duration::from_millis(after_ms)), 0);
            overload.on_sample(LoadSample::new(now, Duration::ZERO, 0));
            Sim {
                overload,
                now,
                start: now,
                cost: cost.as_secs_f64(),
                refusal_cost: refusal_cost.as_secs_f64(),
                queue: 0.0,
                busy: Duration::ZERO,
                cpu: Duration::ZERO,
                queue_known: true,
                idles: 0,
                admitted: 0.0,
                refused: 0.0,
                credit: 0.0,
                longest_wait: 0.0,
                uncounted: 0.0,
            }
        }

        /// Runs `duration` at `rate` requests/s; `hogged(t)` (t from the start of the
        /// simulation) tells when the CPU is taken.
        fn run(&mut self, duration: Duration, rate: f64, hogged: impl Fn(Duration) -> bool) {
            let steps = duration.as_millis() as u64;
            for _ in 0..steps {
                self.step(rate, hogged(self.now - self.start));
            }
        }

        fn step(&mut self, rate: f64, hogged: bool) {
            self.queue += rate * MS.as_secs_f64();
            if hogged {
                if self.queue > 0.0 {
                    self.busy += MS;
                }
            } else {
                let p = self.overload.shed_fraction();
                let each = (1.0 - p) * self.cost + p * self.refusal_cost;
                let cpu = MS.as_secs_f64() + self.credit;
                let served = (cpu / each).min(self.queue);
                self.queue -= served;
                self.admitted += served * (1.0 - p);
                self.refused += served * p;
                if self.queue_known {
                    self.uncounted += served;
                    while self.uncounted >= 1.0 {
                        self.uncounted -= 1.0;
                        self.overload.on_message();
                    }
                }
                let used = served * each;
                if self.queue <= 0.0 {
                    // Drained within the step: the loop idles for the rest of it.
                    self.credit = 0.0;
                    let worked = Duration::from_secs_f64(used.min(MS.as_secs_f64()));
                    self.busy += worked;
                    self.cpu += worked;
                    self.idles += 1;
                } else {
                    self.credit = cpu - used;
                    self.busy += MS;
                    self.cpu += MS;
                }
            }
            // What the last request in the queue waits: the queue's work at full speed.
            self.longest_wait = self.longest_wait.max(self.queue * self.cost);
            self.now += MS;
            if (self.now - self.start).as_millis() % SAMPLE_INTERVAL.as_millis() == 0 {
                let mut sample = LoadSample::new(self.now, self.busy, self.idles);
                sample.cpu = Some(self.cpu);
                sample.queued = self
                    .queue_known
                    .then_some((self.queue * QUEUED_MESSAGE_BYTES) as u64);
                self.overload.on_sample(sample);
            }
        }

        fn counts(&mut self) -> (f64, f64) {
            let counts = (self.admitted, self.refused);
            self.admitted = 0.0;
            self.refused = 0.0;
            counts
        }
    }

    const COST: Duration = Duration::from_micros(500); // 2,000 new requests/s per loop
    const REFUSAL: Duration = Duration::from_micros(40);
    const CAPACITY: f64 = 2000.0;

    fn never(_: Duration) -> bool {
        false
    }

    #[test]
    fn a_loop_below_capacity_refuses_nothing() {
        let mut sim = Sim::new(1000, COST, REFUSAL);
        // 97% of capacity, in bursts: 4 s at 90%, 0.5 s at 110%, repeated.
        for _ in 0..4 {
            sim.run(Duration::from_secs(4), 0.9 * CAPACITY, never);
            sim.run(Duration::from_millis(500), 1.1 * CAPACITY, never);
        }
        let (admitted, refused) = sim.counts();
        assert_eq!(refused, 0.0);
        assert!(admitted > 0.9 * CAPACITY * 18.0, "{admitted}");
    }

    #[test]
    fn a_one_second_cpu_hog_refuses_no_more_than_a_handful() {
        let second = Duration::from_secs(3)..Duration::from_secs(4);
        // Another process takes the loop's CPU for a second...
        let stalled = |t: Duration| second.contains(&t);
        // ...or half of it (it shares the core: 5 ms of every 10).
        let shared = |t: Duration| second.contains(&t) && t.as_millis() % 10 < 5;
        type Hog<'a> = &'a dyn Fn(Duration) -> bool;
        let hogs: [(&str, Hog, &[f64]); 2] = [
            ("stalled", &stalled, &[0.3, 0.5]),
            ("shared", &shared, &[0.3, 0.5, 0.7]),
        ];
        for (name, hog, loads) in hogs {
            for &load in loads {
                let mut sim = Sim::new(1000, COST, REFUSAL);
                sim.run(Duration::from_secs(10), load * CAPACITY, hog);
                let (admitted, refused) = sim.counts();
                assert!(
                    refused <= 0.01 * (admitted + refused),
                    "{name} at load {load}: {refused} refused of {}",
                    admitted + refused
                );
                assert_eq!(
                    sim.overload.shed_fraction(),
                    0.0,
                    "{name} {load}: recovered"
                );
            }
        }
    }

    #[test]
    fn a_burst_refuses_nothing_when_the_loop_catches_up_within_the_limit() {
        let mut sim = Sim::new(1000, COST, REFUSAL);
        sim.run(Duration::from_secs(2), 0.5 * CAPACITY, never);
        // 0.2 s at 3x: 0.4 s of work queued, drained at 0.5 s of work per second: saturated
        // for about a second in all.
        sim.run(Duration::from_millis(200), 3.0 * CAPACITY, never);
        sim.run(Duration::from_secs(3), 0.5 * CAPACITY, never);
        assert_eq!(sim.counts().1, 0.0);
    }

    #[test]
    fn a_machine_too_busy_for_the_loop_overloads_it_too() {
        // Another process holds the CPU half of every 10 ms: the loop has half a CPU, and
        // 0.7 of a full one is offered.
        let mut sim = Sim::new(1000, COST, REFUSAL);
        let half = |t: Duration| t.as_millis() % 10 < 5;
        sim.run(Duration::from_secs(20), 0.7 * CAPACITY, half);
        assert!(sim.overload.shed_fraction() > 0.0);
        let (admitted, _) = sim.counts();
        assert!(admitted / 20.0 > 0.4 * CAPACITY, "{}", admitted / 20.0);
    }

    #[test]
    fn sustained_overload_keeps_goodput_near_capacity() {
        for factor in [1.5, 2.0, 4.0] {
            let mut sim = Sim::new(1000, COST, REFUSAL);
            sim.run(Duration::from_secs(5), factor * CAPACITY, never);
            let (_, early_refused) = sim.counts();
            assert!(early_refused > 0.0, "{factor}x: shedding started");
            sim.run(Duration::from_secs(20), factor * CAPACITY, never);
            let (admitted, refused) = sim.counts();
            let goodput = admitted / 20.0;
            // The most a loop can admit while refusing the rest, refusals costing CPU too.
            let r = REFUSAL.as_secs_f64() / COST.as_secs_f64();
            let best = CAPACITY * (1.0 - factor * r) / (1.0 - r);
            assert!(
                goodput >= 0.95 * best,
                "{factor}x: goodput {goodput:.0}/s, best {best:.0}/s"
            );
            let excess = 1.0 - 1.0 / factor;
            let share = refused / (admitted + refused);
            assert!(
                share >= excess - 0.05 && share <= excess + 0.1,
                "{factor}x: {share:.2} refused, excess {excess:.2}"
            );
        }
    }

    #[test]
    fn shedding_bounds_the_wait_below_retransmission_timers() {
        let mut sim = Sim::new(1000, COST, REFUSAL);
        sim.run(Duration::from_secs(3), 2.0 * CAPACITY, never);
        sim.longest_wait = 0.0;
        sim.run(Duration::from_secs(20), 2.0 * CAPACITY, never);
        // Once settled, requests wait well under T1 (500 ms): no retransmission storm.
        assert!(sim.longest_wait < 0.5, "{:.3} s", sim.longest_wait);
    }

    /// The refused share at each sample over `duration`, and the longest wait then.
    fn trace(
        sim: &mut Sim,
        duration: Duration,
        rate: f64,
        hogged: impl Fn(Duration) -> bool,
    ) -> (Vec<f64>, f64) {
        sim.longest_wait = 0.0;
        let mut shares = Vec::new();
        for _ in 0..duration.as_millis() / SAMPLE_INTERVAL.as_millis() {
            sim.run(SAMPLE_INTERVAL, rate, &hogged);
            shares.push(sim.overload.shed_fraction());
        }
        (shares, sim.longest_wait)
    }

    #[test]
    fn the_share_settles_at_the_excess_without_oscillating() {
        for factor in [1.5, 2.0] {
            let mut sim = Sim::new(1000, COST, REFUSAL);
            sim.run(Duration::from_secs(4), factor * CAPACITY, never);
            let (shares, wait) = trace(&mut sim, Duration::from_secs(10), factor * CAPACITY, never);
            let (low, high) = shares
                .iter()
                .fold((1.0f64, 0.0f64), |(l, h), &s| (l.min(s), h.max(s)));
            assert!(
                high - low < 0.1,
                "{factor}x: share between {low:.2} and {high:.2}"
            );
            assert!(wait < 0.3, "{factor}x: waited {wait:.3} s");
        }
    }

    #[test]
    fn a_loop_sharing_its_cpu_with_a_neighbour_keeps_requests_within_t1() {
        // A neighbour (a compiler) takes 60% of the loop's CPU, on and off every 3 s; 1.5x
        // what the loop carries with the whole CPU is offered.
        let neighbour = |t: Duration| (t.as_secs() / 3) % 2 == 1 && t.as_millis() % 10 < 6;
        let mut sim = Sim::new(1000, COST, REFUSAL);
        sim.run(Duration::from_secs(3), 1.5 * CAPACITY, neighbour);
        let (shares, wait) = trace(&mut sim, Duration::from_secs(18), 1.5 * CAPACITY, neighbour);
        // The loop's CPU: all of it half the time, 40% the other half.
        let (admitted, _) = sim.counts();
        let r = REFUSAL.as_secs_f64() / COST.as_secs_f64();
        let best = CAPACITY * 0.7 * (1.0 - 1.5 * r) / (1.0 - r);
        assert!(
            admitted / 18.0 >= 0.9 * best,
            "goodput {:.0}/s, best {best:.0}/s, shares {shares:.2?}",
            admitted / 18.0
        );
        assert!(wait < 0.5, "waited {wait:.3} s, shares {shares:.2?}");
    }

    #[test]
    fn shedding_ends_soon_after_the_load_falls() {
        let mut sim = Sim::new(1000, COST, REFUSAL);
        sim.run(Duration::from_secs(10), 2.0 * CAPACITY, never);
        assert!(sim.overload.shed_fraction() > 0.3);
        sim.run(Duration::from_secs(2), 0.5 * CAPACITY, never);
        assert_eq!(sim.overload.shed_fraction(), 0.0);
        sim.counts();
        sim.run(Duration::from_secs(5), 0.9 * CAPACITY, never);
        assert_eq!(sim.counts().1, 0.0);
    }

    #[test]
    fn hysteresis_an_idle_interval_never_raises_the_share_and_saturation_never_lowers_it() {
        let t0 = Instant::now();
        let mut overload = Overload::new(Some(Duration::from_millis(300)), 0);
        let mut busy = Duration::ZERO;
        let mut at = t0;
        let mut feed = |overload: &mut Overload, busy_ms: u64, idles: u64| {
            at += SAMPLE_INTERVAL;
            busy += Duration::from_millis(busy_ms);
            overload.on_sample(LoadSample::new(at, busy, idles));
        };
        feed(&mut overload, 100, 0);
        feed(&mut overload, 100, 0);
        assert_eq!(overload.shed_fraction(), 0.0, "200 ms saturated");
        feed(&mut overload, 100, 0);
        feed(&mut overload, 100, 0);
        assert_eq!(overload.shed_fraction(), STEP, "past 300 ms");
        feed(&mut overload, 100, 0);
        assert!((overload.shed_fraction() - 2.0 * STEP).abs() < 1e-9);
        // Idle, but busy 99%: above the target, yet the share does not grow.
        feed(&mut overload, 99, 1);
        assert!((overload.shed_fraction() - 2.0 * STEP).abs() < 1e-9);
        // Busy 90%: admitted share scaled by 0.95/0.9.
        feed(&mut overload, 90, 2);
        let expected = 1.0 - 0.8 * TARGET_BUSY / 0.9;
        assert!((overload.shed_fraction() - expected).abs() < 1e-9);
        // Half idle: over.
        feed(&mut overload, 50, 3);
        assert_eq!(overload.shed_fraction(), 0.0);
    }

    #[test]
    fn off_never_sheds() {
        let t0 = Instant::now();
        let mut overload = Overload::new(None, 0);
        for n in 0..100u32 {
            overload.on_sample(LoadSample::new(
                t0 + SAMPLE_INTERVAL * n,
                SAMPLE_INTERVAL * n,
                0,
            ));
        }
        assert_eq!(overload.shed_fraction(), 0.0);
    }
}
