//! A per-source request rate limiter in the manner of Kamailio's `pike` module: requests are
//! counted per source address in a sampling window; a source that sends more than
//! `max_requests` in one window is *flagged*, and stays flagged until a whole window passes in
//! which it sent no more than `max_requests` (the script decides what a flag means: usually a
//! ban in `sip.kv`, see `docs/scripting.md`).
//!
//! Sans-IO: every call takes the current instant, so the tests drive time explicitly. Shared
//! by every event loop: the table is split into [`SHARDS`] mutexes by a keyed hash of the
//! source, so two loops rarely wait for each other and a sender cannot pick its shard's key
//! collisions (the hash is randomly seeded per process).
//!
//! Sources: an IPv4 address, or an IPv6 /64 prefix. A /64 is what one subscriber line or one
//! host gets (RFC 6177, RFC 4291 §2.5.4's 64-bit interface identifiers), so a single attacker
//! controls 2^64 addresses of it: counting per /128 would be trivial to evade and would let
//! one host fill the table. An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) counts as its
//! IPv4 address.
//!
//! Bounded memory: at most `max_tracked_ips` sources are tracked (split evenly over the shards;
//! 40 bytes each, 50 to 100 with the hash table's spare room). A source that is new when its
//! shard is full first makes the shard drop its idle entries (those whose state is the same as
//! an untracked source's: no request in the current window and not flagged), at most twice
//! per window. If the shard is still full, the
//! new source is *not tracked* and its requests pass (`pike_check` is false): the limiter fails
//! open, so a flood of spoofed addresses cannot make it refuse legitimate sources; the flagged
//! sources already tracked stay flagged. Such requests are counted and logged (rate-limited).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::metrics::Counter;

/// Mutexes the table is split into.
pub const SHARDS: usize = 32;

/// The limiter's settings (`[pike]` in the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PikeRules {
    /// The sampling window.
    pub window: Duration,
    /// Requests a source may send in one window; one more flags it.
    pub max_requests: u32,
    /// Sources tracked at once, across all shards.
    pub max_tracked: usize,
}

impl Default for PikeRules {
    fn default() -> Self {
        PikeRules {
            window: Duration::from_secs(2),
            max_requests: 200,
            max_tracked: 100_000,
        }
    }
}

/// What the limiter counts requests by: an IPv4 address or an IPv6 /64 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    V4(u32),
    V6Prefix(u64),
}

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => Source::V6Prefix((u128::from(v6) >> 64) as u64),
        }
    }
}

/// One tracked source.
#[derive(Clone, Copy, Debug)]
struct Entry {
    window_start: Instant,
    /// Requests in the window starting at `window_start`.
    count: u32,
    flagged: bool,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            window_start: now,
            count: 0,
            flagged: false,
        }
    }

    /// Moves the entry to the window holding `now`. The window that just ended decides
    /// whether a flag is lifted: it is when that window stayed within the limit, or when a
    /// whole empty window followed it.
    fn roll(&mut self, now: Instant, rules: &PikeRules) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < rules.window {
            return;
        }
        let windows = elapsed.as_nanos() / rules.window.as_nanos().max(1);
        if windows >= 2 || self.count <= rules.max_requests {
            self.flagged = false;
        }
        self.count = 0;
        let into_current =
            Duration::from_nanos((elapsed.as_nanos() % rules.window.as_nanos().max(1)) as u64);
        self.window_start = now - into_current;
    }

    /// Counts one request at `now`; true when the source is over the limit.
    fn count_one(&mut self, now: Instant, rules: &PikeRules) -> bool {
        self.roll(now, rules);
        self.count = self.count.saturating_add(1);
        if self.count > rules.max_requests {
            self.flagged = true;
        }
        self.flagged
    }

    /// The entry says nothing an absent one would not (no request this window, no flag).
    fn is_idle(&mut self, now: Instant, rules: &PikeRules) -> bool {
        self.roll(now, rules);
        self.count == 0 && !self.flagged
    }
}

struct Shard {
    entries: HashMap<Source, Entry>,
    capacity: usize,
    /// A full shard sweeps its idle entries at most once per half window, so a stream of new
    /// sources hitting a full table costs a comparison each, not a scan each.
    next_sweep: Option<Instant>,
}

impl Shard {
    /// Counts a request of `source`; `None` when the source cannot be tracked (shard full).
    fn check(&mut self, source: Source, now: Instant, rules: &PikeRules) -> Option<bool> {
        if let Some(entry) = self.entries.get_mut(&source) {
            return Some(entry.count_one(now, rules));
        }
        if self.entries.len() >= self.capacity && !self.make_room(now, rules) {
            return None;
        }
        let mut entry = Entry::new(now);
        let over = entry.count_one(now, rules);
        self.entries.insert(source, entry);
        Some(over)
    }

    /// Drops idle entries; true when there is room afterwards.
    fn make_room(&mut self, now: Instant, rules: &PikeRules) -> bool {
        if self.next_sweep.is_some_and(|at| now < at) {
            return false;
        }
        self.entries.retain(|_, entry| !entry.is_idle(now, rules));
        self.next_sweep = Some(now + rules.window / 2);
        self.entries.len() < self.capacity
    }
}

/// The shared rate limiter. See the module docs.
pub struct Pike {
    rules: PikeRules,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Requests of sources that could not be tracked (the table was full).
    untracked: AtomicU64,
    /// Checks that found the source over the limit (`moonroute_pike_blocks_total`).
    blocks: Counter,
}

impl Pike {
    pub fn new(rules: PikeRules) -> Pike {
        let capacity = rules.max_tracked.div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    entries: HashMap::new(),
                    capacity,
                    next_sweep: None,
                })
            })
            .collect();
        Pike {
            rules,
            shards,
            hasher: RandomState::new(),
            untracked: AtomicU64::new(0),
            blocks: Counter::default(),
        }
    }

    /// Counts every check that finds its source over the limit into `counter`.
    pub fn with_blocks_counter(mut self, counter: Counter) -> Pike {
        self.blocks = counter;
        self
    }

    pub fn rules(&self) -> &PikeRules {
        &self.rules
    }

    /// Counts one request from `ip` at `now`. True when the source is over the limit: it sent
    /// more than `max_requests` in this window, or in an earlier one and has not yet spent a
    /// whole window within the limit (Kamailio's `pike_check_req` returns -1 then).
    pub fn check(&self, ip: IpAddr, now: Instant) -> bool {
        let source = Source::of(ip);
        let shard = &self.shards[self.hasher.hash_one(source) as usize % SHARDS];
        let verdict =
            shard
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .check(source, now, &self.rules);
        match verdict {
            Some(over) => {
                if over {
                    self.blocks.inc();
                }
                over
            }
            None => {
                self.note_untracked(ip);
                false
            }
        }
    }

    /// Sources tracked now (all shards; takes every lock: for tests and statistics).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entries
                    .len()
            })
            .sum()
    }

    /// Requests let through untracked because the table was full.
    pub fn untracked(&self) -> u64 {
        self.untracked.load(Ordering::Relaxed)
    }

    fn note_untracked(&self, ip: IpAddr) {
        let so_far = self.untracked.fetch_add(1, Ordering::Relaxed) + 1;
        // One line per 10,000: a table full of spoofed sources must not flood the log too.
        if so_far % 10_000 == 1 {
            warn!(
                source = %ip,
                max_tracked_ips = self.rules.max_tracked,
                untracked_so_far = so_far,
                "pike: source table full, request not rate-limited (raise pike.max_tracked_ips)"
            );
        }
    }
}

impl Default for Pike {
    fn default() -> Self {
        Pike::new(PikeRules::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const MS: Duration = Duration::from_millis(1);

    fn rules(max_requests: u32, max_tracked: usize) -> PikeRules {
        PikeRules {
            window: Duration::from_millis(1000),
            max_requests,
            max_tracked,
        }
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    /// Sends `n` requests from `ip` at `at`; whether the last one was over the limit.
    fn burst(pike: &Pike, ip: IpAddr, n: u32, at: Instant) -> bool {
        (0..n).fold(false, |_, _| pike.check(ip, at))
    }

    #[test]
    fn a_source_within_the_limit_is_never_flagged() {
        let pike = Pike::new(rules(10, 100));
        let t0 = Instant::now();
        for window in 0..5 {
            let at = t0 + window * 1000 * MS;
            assert!(!burst(&pike, v4(1), 10, at), "window {window}");
        }
    }

    #[test]
    fn one_request_over_the_limit_flags_the_source_and_only_it() {
        let pike = Pike::new(rules(10, 100));
        let t0 = Instant::now();
        assert!(!burst(&pike, v4(1), 10, t0));
        assert!(pike.check(v4(1), t0 + 999 * MS), "the 11th in the window");
        assert!(
            !pike.check(v4(2), t0 + 999 * MS),
            "another source is not affected"
        );
    }

    #[test]
    fn every_over_limit_verdict_counts_one_block() {
        let blocks = Counter::default();
        let pike = Pike::new(rules(10, 100)).with_blocks_counter(blocks.clone());
        let t0 = Instant::now();
        assert!(!burst(&pike, v4(1), 10, t0));
        assert_eq!(blocks.get(), 0, "within the limit");
        assert!(burst(&pike, v4(1), 3, t0));
        assert_eq!(blocks.get(), 3, "the 11th, 12th and 13th requests");
    }

    #[test]
    fn the_flag_stays_until_a_window_passes_within_the_limit() {
        let pike = Pike::new(rules(10, 100));
        let t0 = Instant::now();
        assert!(burst(&pike, v4(1), 50, t0));
        // The next window: the source keeps flooding, and stays flagged even for its first
        // request there, since the window that ended was over the limit.
        assert!(pike.check(v4(1), t0 + 1000 * MS));
        assert!(burst(&pike, v4(1), 30, t0 + 1500 * MS));
        // Quieter now: within the limit in [2000, 3000), still flagged until that window ends.
        assert!(
            pike.check(v4(1), t0 + 2000 * MS),
            "previous window was over"
        );
        assert!(burst(&pike, v4(1), 5, t0 + 2500 * MS));
        // The window [2000, 3000) stayed within the limit: released.
        assert!(!pike.check(v4(1), t0 + 3000 * MS));
    }

    #[test]
    fn a_whole_silent_window_releases_the_source() {
        let pike = Pike::new(rules(10, 100));
        let t0 = Instant::now();
        assert!(burst(&pike, v4(1), 20, t0));
        assert!(!pike.check(v4(1), t0 + 2000 * MS));
    }

    #[test]
    fn windows_are_aligned_to_the_first_request() {
        let pike = Pike::new(rules(3, 100));
        let t0 = Instant::now();
        assert!(!burst(&pike, v4(1), 3, t0 + 900 * MS));
        // 2.5 windows later: the window is [t0+2900, t0+3900), so 3 more fit up to t0+3899.
        assert!(!burst(&pike, v4(1), 3, t0 + 3400 * MS));
        assert!(pike.check(v4(1), t0 + 3899 * MS));
    }

    #[test]
    fn ipv6_sources_are_counted_per_64_prefix() {
        let pike = Pike::new(rules(10, 100));
        let t0 = Instant::now();
        let host = |n: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, n));
        for n in 0..10 {
            assert!(!pike.check(host(n), t0));
        }
        assert!(pike.check(host(99), t0), "another address of the same /64");
        let other = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 0, 0, 0, 1));
        assert!(!pike.check(other, t0), "another /64");
        assert_eq!(pike.tracked(), 2);
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        let pike = Pike::new(rules(1, 100));
        let t0 = Instant::now();
        assert!(!pike.check(v4(7), t0));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert!(pike.check(mapped, t0));
    }

    #[test]
    fn the_table_is_bounded_and_idle_entries_make_room() {
        // One entry per shard: the table holds SHARDS sources at most.
        let pike = Pike::new(rules(1, SHARDS));
        let t0 = Instant::now();
        let sources: Vec<IpAddr> = (0..=255u8).map(v4).collect();
        for ip in &sources {
            pike.check(*ip, t0);
        }
        assert!(pike.tracked() <= SHARDS);
        assert!(pike.untracked() > 0, "some sources found their shard full");
        // Two windows later every entry is idle: new sources take their places.
        let later = t0 + 2000 * MS;
        for ip in &sources {
            pike.check(*ip, later);
        }
        assert!(pike.tracked() <= SHARDS);
        let passed = (0..=255u8)
            .map(|n| IpAddr::V4(Ipv4Addr::new(198, 51, 100, n)))
            .filter(|ip| !pike.check(*ip, later + 3000 * MS))
            .count();
        assert_eq!(passed, 256, "new sources pass, tracked or not (fail open)");
    }

    #[test]
    fn a_full_table_keeps_flagged_sources_flagged() {
        let pike = Pike::new(rules(2, SHARDS));
        let t0 = Instant::now();
        assert!(burst(&pike, v4(1), 5, t0));
        // Fill every shard with other sources, then flood with new ones.
        for n in 0..=255u8 {
            pike.check(IpAddr::V4(Ipv4Addr::new(198, 51, 100, n)), t0 + 500 * MS);
        }
        assert!(pike.check(v4(1), t0 + 600 * MS), "still flagged");
    }

    #[test]
    fn a_full_shard_sweeps_at_most_twice_per_window() {
        let pike = Pike::new(rules(100, SHARDS));
        let t0 = Instant::now();
        // Enough sources that every shard is full (a shard missing all 4096: ~1e-55).
        for n in 0..4096u32 {
            pike.check(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), t0);
        }
        let before = pike.untracked();
        // Within half a window of the first sweep nothing is swept: all refused untracked,
        // even though the entries would be idle by then.
        pike.check(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), t0 + 100 * MS);
        assert_eq!(pike.untracked(), before + 1);
    }

    #[test]
    fn time_going_backwards_does_not_panic() {
        let pike = Pike::new(rules(1, 10));
        let t0 = Instant::now() + Duration::from_secs(10);
        pike.check(v4(1), t0);
        pike.check(v4(1), t0 - Duration::from_secs(5));
    }
}
