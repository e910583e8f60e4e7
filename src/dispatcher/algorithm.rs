//! The selection algorithms: which destination of a set a request goes to first, and the
//! order of the others for failover. Pure functions over a snapshot of the candidates; the
//! shared counters they need (round robin position, smooth weighted round robin weights) are
//! passed in by [`super::Dispatcher`].
//!
//! Names and numbers follow Kamailio's `dispatcher` where the behaviour matches: 0 Call-ID
//! hash, 1 From URI hash, 2 To URI hash, 3 Request-URI hash, 4 round robin, 6 random,
//! 8 priority order, 9 weighted, 10 call load. The hashes are rendezvous hashes
//! (highest random weight, Thaler and Ravishankar 1998) weighted by each destination's
//! weight, so adding or removing one destination moves only the keys that go to it or came
//! from it, and every node running the same sets picks the same destination for a key.

use std::fmt;

/// A selection algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// 0: rendezvous hash over the Call-ID (every request of a dialog goes to one place).
    CallId,
    /// 1: rendezvous hash over the From URI's `user@host`.
    FromUri,
    /// 2: rendezvous hash over the To URI's `user@host`.
    ToUri,
    /// 3: rendezvous hash over the Request-URI's `user@host`.
    RequestUri,
    /// 4: each destination in turn.
    RoundRobin,
    /// 6: uniformly at random.
    Random,
    /// 8: highest priority first (config order among equals): active/backup.
    Priority,
    /// 9: in proportion to the weights (smooth weighted round robin, as nginx: exact over
    /// each cycle of `sum(weights)` calls, and interleaved rather than in bursts).
    Weighted,
    /// 10: fewest calls in progress relative to weight.
    CallLoad,
}

/// Every algorithm, for listings and tests.
pub const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::CallId,
    Algorithm::FromUri,
    Algorithm::ToUri,
    Algorithm::RequestUri,
    Algorithm::RoundRobin,
    Algorithm::Random,
    Algorithm::Priority,
    Algorithm::Weighted,
    Algorithm::CallLoad,
];

impl Algorithm {
    /// The name scripts use (`sip.ds.select(1, "round_robin")`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::CallId => "call_id",
            Algorithm::FromUri => "from_uri",
            Algorithm::ToUri => "to_uri",
            Algorithm::RequestUri => "ruri",
            Algorithm::RoundRobin => "round_robin",
            Algorithm::Random => "random",
            Algorithm::Priority => "priority",
            Algorithm::Weighted => "weighted",
            Algorithm::CallLoad => "call_load",
        }
    }

    /// Kamailio's `ds_select_dst` algorithm number.
    pub fn kamailio_number(self) -> u8 {
        match self {
            Algorithm::CallId => 0,
            Algorithm::FromUri => 1,
            Algorithm::ToUri => 2,
            Algorithm::RequestUri => 3,
            Algorithm::RoundRobin => 4,
            Algorithm::Random => 6,
            Algorithm::Priority => 8,
            Algorithm::Weighted => 9,
            Algorithm::CallLoad => 10,
        }
    }

    /// The algorithm named `name` (case-insensitive) or numbered as in Kamailio.
    pub fn parse(name: &str) -> Result<Algorithm, String> {
        let name = name.trim();
        let found = match name.parse::<u8>() {
            Ok(number) => ALGORITHMS
                .into_iter()
                .find(|a| a.kamailio_number() == number),
            Err(_) => ALGORITHMS
                .into_iter()
                .find(|a| a.name().eq_ignore_ascii_case(name)),
        };
        found.ok_or_else(|| {
            let known: Vec<String> = ALGORITHMS
                .iter()
                .map(|a| format!("{} ({})", a.name(), a.kamailio_number()))
                .collect();
            format!("unknown algorithm {name:?}; known: {}", known.join(", "))
        })
    }

    /// True for the algorithms that need a key taken from the request.
    pub fn is_hash(self) -> bool {
        matches!(
            self,
            Algorithm::CallId | Algorithm::FromUri | Algorithm::ToUri | Algorithm::RequestUri
        )
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an algorithm knows about one usable destination.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    /// Relative share (at least 1).
    pub weight: u32,
    /// Higher goes first with [`Algorithm::Priority`].
    pub priority: i32,
    /// Calls in progress.
    pub load: u64,
    /// A stable hash of the destination's URI ([`hash_bytes`]), the rendezvous seed.
    pub seed: u64,
}

/// The varying input of one selection.
#[derive(Clone, Copy, Debug)]
pub enum Draw {
    /// Hash algorithms: the key's hash ([`hash_bytes`]).
    Key(u64),
    /// Round robin, random, call load (tie-break): a position, taken modulo the candidates.
    Turn(u64),
    /// Weighted: the candidate the smooth weighted round robin chose.
    Chosen(usize),
}

/// The candidates in the order to try them: the selected one first, then the failover order.
/// Returns indices into `candidates`.
pub fn order(algorithm: Algorithm, candidates: &[Candidate], draw: Draw) -> Vec<usize> {
    let n = candidates.len();
    let mut indices: Vec<usize> = (0..n).collect();
    if n == 0 {
        return indices;
    }
    match (algorithm, draw) {
        (_, Draw::Key(key)) => {
            let scores: Vec<f64> = candidates.iter().map(|c| rendezvous(key, c)).collect();
            indices.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        }
        (Algorithm::Priority, _) => {
            indices.sort_by_key(|&i| std::cmp::Reverse(candidates[i].priority));
        }
        (Algorithm::CallLoad, Draw::Turn(turn)) => {
            // Least loaded relative to weight; among equals, take turns so an idle set is
            // not filled one destination at a time.
            let start = (turn % n as u64) as usize;
            indices.sort_by(|&a, &b| {
                let (ca, cb) = (&candidates[a], &candidates[b]);
                let left = u128::from(ca.load) * u128::from(cb.weight.max(1));
                let right = u128::from(cb.load) * u128::from(ca.weight.max(1));
                left.cmp(&right)
                    .then(((a + n - start) % n).cmp(&((b + n - start) % n)))
            });
        }
        (_, Draw::Turn(turn)) => {
            indices.rotate_left((turn % n as u64) as usize);
        }
        (_, Draw::Chosen(chosen)) => {
            // The chosen one, then the others by weight (config order among equals).
            indices.sort_by_key(|&i| (i != chosen, std::cmp::Reverse(candidates[i].weight)));
        }
    }
    indices
}

/// Smooth weighted round robin (nginx's): every candidate gains its weight, the largest
/// current value wins and pays the total. `current` is the set's running state, one value per
/// candidate (reset when the candidates change: see [`super::Dispatcher`]).
pub fn smooth_weighted(current: &mut [i64], candidates: &[Candidate]) -> usize {
    let mut best = 0;
    let mut total = 0i64;
    for (i, candidate) in candidates.iter().enumerate() {
        let weight = i64::from(candidate.weight.max(1));
        current[i] = current[i].saturating_add(weight);
        total += weight;
        if current[i] > current[best] {
            best = i;
        }
    }
    current[best] -= total;
    best
}

/// Weighted rendezvous score of `candidate` for `key`: `-weight / ln(u)` with `u` uniform in
/// (0, 1) from the mixed hashes (Schindelhauer and Schomaker's logarithmic method): each
/// candidate wins a key with probability proportional to its weight.
fn rendezvous(key: u64, candidate: &Candidate) -> f64 {
    let mixed = mix(key ^ candidate.seed.rotate_left(32));
    // 53 random bits, shifted away from 0 so ln(u) < 0.
    let u = ((mixed >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(candidate.weight.max(1)) / u.ln()
}

/// FNV-1a over `bytes`, finished with [`mix`]: the same on every node and every release (a
/// cluster of proxies must send a Call-ID to the same destination).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(hash)
}

/// SplitMix64's finaliser: spreads every input bit over the output.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Candidate {
                weight,
                priority: 0,
                load: 0,
                seed: hash_bytes(format!("sip:10.0.0.{i}").as_bytes()),
            })
            .collect()
    }

    #[test]
    fn names_and_kamailio_numbers_parse() {
        for algorithm in ALGORITHMS {
            assert_eq!(Algorithm::parse(algorithm.name()), Ok(algorithm));
            let number = algorithm.kamailio_number().to_string();
            assert_eq!(Algorithm::parse(&number), Ok(algorithm));
        }
        assert_eq!(Algorithm::parse("Round_Robin"), Ok(Algorithm::RoundRobin));
        let error = Algorithm::parse("5").unwrap_err();
        assert!(error.contains("round_robin (4)"), "{error}");
        assert!(Algorithm::parse("fastest").is_err());
    }

    #[test]
    fn hash_order_is_a_permutation_and_depends_only_on_the_key() {
        let set = candidates(&[1, 1, 1]);
        let a = order(Algorithm::CallId, &set, Draw::Key(hash_bytes(b"abc@host")));
        let b = order(Algorithm::CallId, &set, Draw::Key(hash_bytes(b"abc@host")));
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2]);
    }

    #[test]
    fn rendezvous_spreads_keys_by_weight() {
        let set = candidates(&[1, 1, 2]);
        let mut counts = [0u32; 3];
        for call in 0..12_000 {
            let key = hash_bytes(format!("call-{call}@example.com").as_bytes());
            counts[order(Algorithm::CallId, &set, Draw::Key(key))[0]] += 1;
        }
        // Expected 3000, 3000, 6000.
        for (count, expected) in counts.iter().zip([3000.0, 3000.0, 6000.0]) {
            let error = (f64::from(*count) - expected).abs() / expected;
            assert!(error < 0.06, "{counts:?}");
        }
    }

    #[test]
    fn adding_a_destination_moves_only_the_keys_it_takes() {
        let three = candidates(&[1, 1, 1]);
        let four = candidates(&[1, 1, 1, 1]);
        let (mut moved, mut to_new) = (0, 0);
        for call in 0..4000 {
            let key = hash_bytes(format!("call-{call}").as_bytes());
            let before = order(Algorithm::CallId, &three, Draw::Key(key))[0];
            let after = order(Algorithm::CallId, &four, Draw::Key(key))[0];
            if before != after {
                moved += 1;
                to_new += usize::from(after == 3);
            }
        }
        assert_eq!(moved, to_new, "a key moved between two old destinations");
        // About a quarter move (to the new one), never the 3/4 a modulo hash would move.
        assert!((800..1200).contains(&moved), "{moved} moved");
    }

    #[test]
    fn round_robin_rotates_and_keeps_the_ring_for_failover() {
        let set = candidates(&[1, 1, 1]);
        assert_eq!(
            order(Algorithm::RoundRobin, &set, Draw::Turn(4)),
            vec![1, 2, 0]
        );
    }

    #[test]
    fn priority_puts_the_highest_first_and_keeps_config_order_among_equals() {
        let mut set = candidates(&[1, 1, 1]);
        set[0].priority = 1;
        set[1].priority = 5;
        set[2].priority = 1;
        assert_eq!(
            order(Algorithm::Priority, &set, Draw::Turn(7)),
            vec![1, 0, 2]
        );
    }

    #[test]
    fn smooth_weighted_is_exact_per_cycle_and_interleaved() {
        let set = candidates(&[5, 1, 1]);
        let mut current = vec![0; 3];
        let picks: Vec<usize> = (0..7)
            .map(|_| smooth_weighted(&mut current, &set))
            .collect();
        // nginx's example: a a b a c a a.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(
            order(Algorithm::Weighted, &set, Draw::Chosen(2)),
            vec![2, 0, 1]
        );
    }

    #[test]
    fn call_load_prefers_the_least_loaded_per_weight_and_takes_turns_among_equals() {
        let mut set = candidates(&[1, 2, 1]);
        set[0].load = 3;
        set[1].load = 4; // 2 per unit of weight
        set[2].load = 1;
        assert_eq!(
            order(Algorithm::CallLoad, &set, Draw::Turn(0)),
            vec![2, 1, 0]
        );
        let idle = candidates(&[1, 1, 1]);
        assert_eq!(order(Algorithm::CallLoad, &idle, Draw::Turn(1))[0], 1);
        assert_eq!(order(Algorithm::CallLoad, &idle, Draw::Turn(2))[0], 2);
    }
}
