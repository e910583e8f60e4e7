//! Nonce-count tracking: the same credentials are never accepted twice (RFC 2617 §3.2.2:
//! "the server can detect request replays by maintaining its own copy of this count").
//!
//! A bounded, sharded in-memory table keyed by nonce. Each entry holds the highest `nc`
//! accepted and a 64-entry window below it (IPsec's anti-replay window, RFC 4303 §3.4.3): an
//! `nc` above the highest moves the window; one inside it is accepted once; one below it is
//! refused. A credential without qop (no `nc`) makes its nonce one-time.
//!
//! One exception: a repeated `nc` is accepted when the request is an exact retransmission of
//! the request that first used it (same Call-ID, CSeq and top Via branch, RFC 3261 §17.2.3's
//! matching): a REGISTER answered by the registrar ends its transaction at once, so a UDP
//! retransmission of it runs the script again and must get the same 200, not a 401.
//!
//! Entries are dropped once their nonce expires (the nonce is stale from then on anyway) and,
//! at capacity, the oldest is evicted: a nonce issued no later than the newest evicted one and
//! absent from the table counts as stale, never as unused, so eviction cannot let credentials
//! be accepted twice.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Mutex;

use super::nonce::{Nonce, NONCE_BYTES};

const SHARDS: usize = 16;
const WINDOW: u32 = 64;
/// Fingerprints of recent first uses kept per nonce (retransmissions come within seconds).
const RECENT_USES: usize = 4;

/// What a use of a nonce amounts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// First use of this `nc`, or a retransmission of the request that first used it.
    Fresh,
    /// This `nc` was already used by another request (or is below the window).
    Replayed,
    /// The nonce's entry was evicted: its history is unknown, ask for a fresh nonce.
    Forgotten,
}

/// The identity of a request for the retransmission exception: Call-ID, CSeq, top Via branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint(u64);

struct Entry {
    expires_at: u64,
    highest: u32,
    /// Bit `i` set: `highest - i` was used.
    window: u64,
    /// No qop: the nonce may be used once.
    one_time: bool,
    recent: [(u32, Fingerprint); RECENT_USES],
    next_recent: usize,
}

#[derive(Default)]
struct Shard {
    entries: HashMap<[u8; NONCE_BYTES], Entry>,
    /// Insertion order, for dropping expired and evicting oldest entries.
    order: VecDeque<[u8; NONCE_BYTES]>,
    /// The issue time of the newest nonce evicted at capacity.
    evicted_up_to: Option<u64>,
}

/// The table (shared by all event loops; one short lock per authenticated request).
pub struct ReplayTable {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
    hasher: RandomState,
}

impl ReplayTable {
    /// A table holding at most about `capacity` nonces.
    pub fn new(capacity: usize) -> ReplayTable {
        ReplayTable {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    /// The fingerprint of a request.
    pub fn fingerprint(&self, call_id: &[u8], cseq: u32, branch: &[u8]) -> Fingerprint {
        let mut h = self.hasher.build_hasher();
        call_id.hash(&mut h);
        cseq.hash(&mut h);
        branch.hash(&mut h);
        Fingerprint(h.finish())
    }

    /// Records a use of `nonce` with `nc` (`None`: no qop) by the request `fingerprint`, at
    /// `now` (seconds); `expires_at` is when the nonce stops being fresh.
    pub fn record(
        &self,
        nonce: &Nonce,
        expires_at: u64,
        nc: Option<u32>,
        fingerprint: Fingerprint,
        now: u64,
    ) -> Use {
        let index = (self.hasher.hash_one(nonce.bytes) as usize) % SHARDS;
        let mut shard = self.shards[index].lock().unwrap_or_else(|e| e.into_inner());
        shard.drop_expired(now);
        if let Some(entry) = shard.entries.get_mut(&nonce.bytes) {
            return entry.record(nc, fingerprint);
        }
        if shard.evicted_up_to.is_some_and(|t| nonce.issued <= t) {
            return Use::Forgotten;
        }
        if shard.entries.len() >= self.per_shard {
            shard.evict_oldest();
        }
        let nc_value = nc.unwrap_or(1);
        let entry = Entry {
            expires_at,
            highest: nc_value,
            window: 1,
            one_time: nc.is_none(),
            recent: [(nc_value, fingerprint); RECENT_USES],
            next_recent: 1,
        };
        shard.entries.insert(nonce.bytes, entry);
        shard.order.push_back(nonce.bytes);
        Use::Fresh
    }

    /// Drops every expired entry (the periodic sweep; lookups drop them as they go).
    pub fn sweep(&self, now: u64) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.entries.retain(|_, entry| entry.expires_at > now);
            let Shard { entries, order, .. } = &mut *shard;
            order.retain(|key| entries.contains_key(key));
        }
    }

    /// Nonces tracked (for tests and status).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Shard {
    /// Drops entries from the front of the insertion order while they are expired (entries
    /// are inserted roughly in issue order, so this keeps memory to what is live).
    fn drop_expired(&mut self, now: u64) {
        while let Some(key) = self.order.front() {
            match self.entries.get(key) {
                Some(entry) if entry.expires_at > now => break,
                Some(_) => {
                    self.entries.remove(key);
                }
                None => {}
            }
            self.order.pop_front();
        }
    }

    fn evict_oldest(&mut self) {
        while let Some(key) = self.order.pop_front() {
            if self.entries.remove(&key).is_some() {
                let mut stamp = [0u8; 8];
                stamp.copy_from_slice(&key[..8]);
                let issued = u64::from_be_bytes(stamp);
                self.evicted_up_to = Some(self.evicted_up_to.map_or(issued, |t| t.max(issued)));
                return;
            }
        }
    }
}

impl Entry {
    fn record(&mut self, nc: Option<u32>, fingerprint: Fingerprint) -> Use {
        let nc_value = nc.unwrap_or(1);
        let retransmission = self
            .recent
            .iter()
            .any(|&(n, f)| n == nc_value && f == fingerprint);
        if self.one_time || nc.is_none() {
            return if retransmission && self.one_time && nc.is_none() {
                Use::Fresh
            } else {
                Use::Replayed
            };
        }
        if nc_value > self.highest {
            let shift = nc_value - self.highest;
            self.window = if shift >= WINDOW {
                0
            } else {
                self.window << shift
            } | 1;
            self.highest = nc_value;
        } else {
            let offset = self.highest - nc_value;
            if offset >= WINDOW {
                return Use::Replayed;
            }
            let bit = 1u64 << offset;
            if self.window & bit != 0 {
                return if retransmission {
                    Use::Fresh
                } else {
                    Use::Replayed
                };
            }
            self.window |= bit;
        }
        self.recent[self.next_recent] = (nc_value, fingerprint);
        self.next_recent = (self.next_recent + 1) % RECENT_USES;
        Use::Fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nonce(issued: u64, n: u8) -> Nonce {
        let mut bytes = [n; NONCE_BYTES];
        bytes[..8].copy_from_slice(&issued.to_be_bytes());
        Nonce { bytes, issued }
    }

    #[test]
    fn each_nc_is_accepted_once_except_for_retransmissions() {
        let table = ReplayTable::new(100);
        let n = nonce(1000, 1);
        let a = table.fingerprint(b"call-a", 1, b"z9hG4bK-a");
        let b = table.fingerprint(b"call-a", 2, b"z9hG4bK-b");
        let c = table.fingerprint(b"call-a", 3, b"z9hG4bK-c");
        assert_eq!(table.record(&n, 1300, Some(1), a, 1000), Use::Fresh);
        assert_eq!(
            table.record(&n, 1300, Some(1), a, 1001),
            Use::Fresh,
            "retransmission"
        );
        assert_eq!(table.record(&n, 1300, Some(1), b, 1001), Use::Replayed);
        assert_eq!(table.record(&n, 1300, Some(2), b, 1001), Use::Fresh);
        assert_eq!(table.record(&n, 1300, Some(2), c, 1001), Use::Replayed);
        // Out of order inside the window, once.
        assert_eq!(table.record(&n, 1300, Some(10), c, 1001), Use::Fresh);
        assert_eq!(table.record(&n, 1300, Some(5), c, 1001), Use::Fresh);
        assert_eq!(table.record(&n, 1300, Some(5), a, 1001), Use::Replayed);
        // Far ahead: the old ones fall out of the window and are refused.
        assert_eq!(table.record(&n, 1300, Some(200), a, 1001), Use::Fresh);
        assert_eq!(table.record(&n, 1300, Some(7), b, 1001), Use::Replayed);
        assert_eq!(table.record(&n, 1300, Some(137), b, 1001), Use::Fresh);
        assert_eq!(table.record(&n, 1300, Some(136), b, 1001), Use::Replayed);
    }

    #[test]
    fn a_nonce_without_qop_is_one_time() {
        let table = ReplayTable::new(100);
        let n = nonce(1000, 2);
        let a = table.fingerprint(b"x", 1, b"a");
        let b = table.fingerprint(b"x", 2, b"b");
        assert_eq!(table.record(&n, 1300, None, a, 1000), Use::Fresh);
        assert_eq!(
            table.record(&n, 1300, None, a, 1000),
            Use::Fresh,
            "retransmission"
        );
        assert_eq!(table.record(&n, 1300, None, b, 1000), Use::Replayed);
        assert_eq!(table.record(&n, 1300, Some(2), b, 1000), Use::Replayed);
    }

    #[test]
    fn expired_entries_go_and_eviction_forgets_safely() {
        let table = ReplayTable::new(SHARDS); // one per shard
        let f = table.fingerprint(b"x", 1, b"a");
        for i in 0..200u8 {
            let _ = table.record(&nonce(1000, i), 1300, Some(1), f, 1000);
        }
        assert!(table.len() <= SHARDS);
        // Every evicted nonce is forgotten (stale), never fresh again.
        let mut fresh = 0;
        for i in 0..200u8 {
            match table.record(&nonce(1000, i), 1300, Some(1), f, 1000) {
                Use::Fresh => fresh += 1,
                Use::Forgotten | Use::Replayed => {}
            }
        }
        assert!(
            fresh <= SHARDS,
            "only retransmissions of tracked ones: {fresh}"
        );
        // Once expired, entries are dropped as new ones arrive.
        let table = ReplayTable::new(1000);
        for i in 0..100u8 {
            let _ = table.record(&nonce(1000, i), 1300, Some(1), f, 1000);
        }
        for i in 100..132u8 {
            let _ = table.record(&nonce(1400, i), 1700, Some(1), f, 1400);
        }
        table.sweep(1400);
        assert_eq!(table.len(), 32);
    }
}
