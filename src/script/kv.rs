//! The shared key-value store behind the Lua `sip.kv` table.
//!
//! Every event-loop thread runs its own Lua state, so Lua globals cannot be
//! used for state that must be seen by all of them. `KvStore` fills that gap,
//! like Kamailio's `htable`: one store, shared as `Arc<KvStore>`, used by
//! routing scripts for counters (flood detection, per-source rate limits) and
//! for ban lists.
//!
//! # Semantics
//!
//! * Values are [`KvValue::Int`] (an `i64`) or [`KvValue::Str`].
//! * Every entry may have a time to live. `ttl: None` means the entry never
//!   expires; `Some(d)` means it expires `d` after the `now` passed with the
//!   write (a zero TTL makes an entry that is already expired). An entry is
//!   expired once `now >= expiry`. An expired entry behaves exactly like an
//!   absent one for [`KvStore::get`], [`KvStore::ttl`] and [`KvStore::incr`].
//! * [`KvStore::set`] replaces the value and the expiry.
//! * [`KvStore::incr`] is atomic: the read, the add and the write happen under
//!   one lock, so concurrent increments from different threads are never lost.
//!   A missing or expired key starts at 0 and takes the given `ttl`; a live key
//!   keeps its existing expiry and the `ttl` argument is ignored. That makes a
//!   fixed-window rate counter a single call:
//!   `incr("pike:1.2.3.4", 1, Some(1s), now)` counts requests in the second
//!   that started with the first one. The add saturates at `i64::MIN` /
//!   `i64::MAX`. Incrementing a string fails with [`KvError::NotAnInteger`].
//! * The module does no I/O and never reads the clock: every call that cares
//!   about time takes an explicit `now`, so tests drive time and the caller
//!   decides which clock is used.
//!
//! # Bounds
//!
//! Scripts may put attacker-controlled data (source addresses, user names) in
//! keys, so memory is bounded:
//!
//! * keys are at most [`MAX_KEY_LEN`] bytes ([`KvError::KeyTooLong`]);
//! * string values are at most [`MAX_VALUE_LEN`] bytes
//!   ([`KvError::ValueTooLong`]);
//! * the store holds at most `max_keys` entries in total. Creating a key when
//!   the store is full first sweeps the expired entries of that key's shard;
//!   if that frees no room the write fails with [`KvError::TooManyKeys`].
//!   Updating an existing key never fails for this reason.
//!
//! Expired entries are removed lazily (when a lookup finds one, or when a full
//! store needs room) and by [`KvStore::sweep`], which the server should call
//! periodically. Until then they still count towards `max_keys` and
//! [`KvStore::len`].
//!
//! # Why sharded
//!
//! Every event loop may touch the store for every request. A single mutex
//! would serialise all loops on it; instead keys are spread by a fast hash
//! over [`SHARDS`] independent `Mutex<HashMap>`s, so loops on different
//! threads rarely contend, and each operation holds exactly one shard lock
//! for a short, allocation-light critical section (except [`KvStore::sweep`],
//! which visits the shards one at a time). The global key count is an
//! `AtomicUsize`, so the `max_keys` bound is exact across shards without a
//! global lock. A poisoned shard mutex is recovered rather than propagated:
//! every critical section leaves its map consistent, so a panic elsewhere
//! must not take the store down.
//!
//! # Several nodes
//!
//! A store made with [`KvStore::on_redis`] keeps its entries on a Redis server shared by
//! several nodes instead ([`super::kv_redis`]); calls then fail with [`KvError::Unavailable`]
//! while Redis cannot be reached (the script's request gets 500).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the message of [`KvError::Unavailable`] starts with (the router answers 503 to a
/// request whose script failed with it).
pub const UNAVAILABLE: &str = "the shared store is unavailable";

/// Number of independently locked shards.
pub const SHARDS: usize = 64;

/// Longest accepted key, in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// Longest accepted string value, in bytes.
pub const MAX_VALUE_LEN: usize = 4096;

/// A value stored in the [`KvStore`].
#[derive(Clone, Debug, PartialEq)]
pub enum KvValue {
    /// A 64-bit signed integer; the only kind [`KvStore::incr`] accepts.
    Int(i64),
    /// A string of at most [`MAX_VALUE_LEN`] bytes.
    Str(String),
}

/// Why a [`KvStore`] write was refused.
#[derive(Debug, PartialEq)]
pub enum KvError {
    /// The store already holds `max_keys` live entries.
    TooManyKeys,
    /// A string value is longer than [`MAX_VALUE_LEN`] bytes.
    ValueTooLong,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    KeyTooLong,
    /// `incr` was called on a key holding a string.
    NotAnInteger,
    /// The shared store (Redis) could not be reached, or refused the command.
    Unavailable(String),
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::TooManyKeys => write!(f, "the key-value store is full"),
            KvError::ValueTooLong => write!(f, "the value is longer than {MAX_VALUE_LEN} bytes"),
            KvError::KeyTooLong => write!(f, "the key is longer than {MAX_KEY_LEN} bytes"),
            KvError::NotAnInteger => write!(f, "the stored value is not an integer"),
            KvError::Unavailable(e) => write!(f, "{UNAVAILABLE} ({e})"),
        }
    }
}

impl std::error::Error for KvError {}

#[derive(Debug)]
struct Entry {
    value: KvValue,
    /// `None`: never expires.
    expires: Option<Instant>,
}

impl Entry {
    fn is_live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| now < at)
    }
}

type Shard = HashMap<String, Entry>;

/// What `KvStore::list` finds: entries (key, value, time left) and whether more matched.
pub type KvListing = (Vec<(String, KvValue, Option<Duration>)>, bool);

/// A bounded, sharded key-value store with per-entry expiry, shared by all
/// event loops. See the [module documentation](self).
pub struct KvStore {
    shards: Box<[Mutex<Shard>]>,
    /// Entries currently stored (live or not yet swept), over all shards.
    /// Only changed while holding the lock of the shard being changed.
    count: AtomicUsize,
    max_keys: usize,
    /// Entries on Redis instead of in the shards.
    remote: Option<super::kv_redis::RedisKv>,
}

impl fmt::Debug for KvStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvStore")
            .field("len", &self.len())
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

/// Absolute expiry for a TTL; a TTL too large to represent never expires.
fn expiry(ttl: Option<Duration>, now: Instant) -> Option<Instant> {
    ttl.and_then(|d| now.checked_add(d))
}

/// FNV-1a: fast and good enough to spread keys over shards. The maps inside
/// the shards use the standard randomised hasher, so crafted keys can at
/// worst crowd one shard's lock, not degrade lookups.
fn shard_index(key: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Fold the high bits in: the low bits of FNV are the weakest.
    ((h ^ (h >> 32)) as usize) % SHARDS
}

fn check_key(key: &str) -> Result<(), KvError> {
    if key.len() > MAX_KEY_LEN {
        Err(KvError::KeyTooLong)
    } else {
        Ok(())
    }
}

fn check_value(value: &KvValue) -> Result<(), KvError> {
    match value {
        KvValue::Str(s) if s.len() > MAX_VALUE_LEN => Err(KvError::ValueTooLong),
        _ => Ok(()),
    }
}

impl KvStore {
    /// An empty store that holds at most `max_keys` entries.
    pub fn new(max_keys: usize) -> KvStore {
        KvStore {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            count: AtomicUsize::new(0),
            max_keys,
            remote: None,
        }
    }

    /// A store whose entries are on the Redis server behind `link`, shared with every node
    /// using that server.
    pub fn on_redis(link: std::sync::Arc<crate::redis_link::RedisLink>) -> KvStore {
        KvStore {
            remote: Some(super::kv_redis::RedisKv::new(link)),
            ..KvStore::new(0)
        }
    }

    /// Registers the shared store's metrics (`moonroute_kv_redis_*`); nothing in memory.
    pub fn register_metrics(&self, registry: &crate::metrics::Registry) {
        if let Some(remote) = &self.remote {
            remote.link().register_metrics(registry, "kv");
        }
    }

    /// One line on the store's health for `ctl status`: its backend, and for Redis the link's
    /// state.
    pub fn health(&self) -> String {
        match &self.remote {
            Some(remote) => remote.link().health(),
            None => "memory (this node only)".to_owned(),
        }
    }

    /// [`KvStore::get`], or why the shared store could not answer.
    pub fn try_get(&self, key: &str, now: Instant) -> Result<Option<KvValue>, KvError> {
        match &self.remote {
            Some(remote) => remote.get(key),
            None => Ok(self.get(key, now)),
        }
    }

    /// [`KvStore::ttl`], or why the shared store could not answer.
    pub fn try_ttl(&self, key: &str, now: Instant) -> Result<Option<Duration>, KvError> {
        match &self.remote {
            Some(remote) => remote.ttl(key),
            None => Ok(self.ttl(key, now)),
        }
    }

    /// [`KvStore::delete`], or why the shared store could not answer.
    pub fn try_delete(&self, key: &str) -> Result<bool, KvError> {
        match &self.remote {
            Some(remote) => remote.delete(key),
            None => Ok(self.delete(key)),
        }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        self.shards[shard_index(key)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Drop `key` from a locked shard if it is expired.
    fn remove_if_expired(&self, shard: &mut Shard, key: &str, now: Instant) {
        if shard.get(key).is_some_and(|e| !e.is_live(now)) {
            shard.remove(key);
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Remove the expired entries of one locked shard; returns how many.
    fn sweep_shard(&self, shard: &mut Shard, now: Instant) -> usize {
        let before = shard.len();
        shard.retain(|_, e| e.is_live(now));
        let removed = before - shard.len();
        if removed > 0 {
            self.count.fetch_sub(removed, Ordering::Relaxed);
        }
        removed
    }

    /// Reserve room for one new entry in `shard` (whose lock the caller
    /// holds), sweeping that shard if the store is full.
    fn reserve(&self, shard: &mut Shard, now: Instant) -> Result<(), KvError> {
        let take = |n: usize| (n < self.max_keys).then_some(n + 1);
        if self
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, take)
            .is_ok()
        {
            return Ok(());
        }
        if self.sweep_shard(shard, now) == 0 {
            return Err(KvError::TooManyKeys);
        }
        self.count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, take)
            .map(|_| ())
            .map_err(|_| KvError::TooManyKeys)
    }

    /// The value of `key`, or `None` if it is absent or expired.
    pub fn get(&self, key: &str, now: Instant) -> Option<KvValue> {
        let mut shard = self.shard(key);
        match shard.get(key) {
            Some(e) if e.is_live(now) => Some(e.value.clone()),
            Some(_) => {
                self.remove_if_expired(&mut shard, key, now);
                None
            }
            None => None,
        }
    }

    /// Store `value` under `key`, replacing any previous value and expiry.
    /// `ttl: None` means the entry never expires.
    ///
    /// # Errors
    ///
    /// [`KvError::KeyTooLong`], [`KvError::ValueTooLong`], or
    /// [`KvError::TooManyKeys`] if `key` is new and the store is full even
    /// after sweeping the key's shard. On error the store is unchanged.
    pub fn set(
        &self,
        key: &str,
        value: KvValue,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<(), KvError> {
        check_key(key)?;
        check_value(&value)?;
        if let Some(remote) = &self.remote {
            return remote.set(key, value, ttl);
        }
        let expires = expiry(ttl, now);
        let mut shard = self.shard(key);
        if let Some(e) = shard.get_mut(key) {
            *e = Entry { value, expires };
            return Ok(());
        }
        self.reserve(&mut shard, now)?;
        shard.insert(key.to_owned(), Entry { value, expires });
        Ok(())
    }

    /// Atomically add `by` to the integer under `key` and return the new
    /// value. A missing or expired key starts at 0 and expires after `ttl`; a
    /// live key keeps its expiry. The add saturates.
    ///
    /// # Errors
    ///
    /// [`KvError::KeyTooLong`], [`KvError::NotAnInteger`] if the live value
    /// is a string, or [`KvError::TooManyKeys`] if `key` is new and the store
    /// is full even after sweeping the key's shard. On error the store is
    /// unchanged.
    pub fn incr(
        &self,
        key: &str,
        by: i64,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<i64, KvError> {
        check_key(key)?;
        if let Some(remote) = &self.remote {
            return remote.incr(key, by, ttl);
        }
        let mut shard = self.shard(key);
        if let Some(e) = shard.get_mut(key) {
            if e.is_live(now) {
                return match &mut e.value {
                    KvValue::Int(n) => {
                        *n = n.saturating_add(by);
                        Ok(*n)
                    }
                    KvValue::Str(_) => Err(KvError::NotAnInteger),
                };
            }
            // Expired: start over in place, the slot is already counted.
            *e = Entry {
                value: KvValue::Int(by),
                expires: expiry(ttl, now),
            };
            return Ok(by);
        }
        self.reserve(&mut shard, now)?;
        shard.insert(
            key.to_owned(),
            Entry {
                value: KvValue::Int(by),
                expires: expiry(ttl, now),
            },
        );
        Ok(by)
    }

    /// Remove `key`. Returns whether an entry was removed (an expired entry
    /// not yet swept counts: without a `now` its expiry cannot be judged).
    pub fn delete(&self, key: &str) -> bool {
        let mut shard = self.shard(key);
        if shard.remove(key).is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Time left before `key` expires; `None` if it never expires, is absent
    /// or is already expired.
    pub fn ttl(&self, key: &str, now: Instant) -> Option<Duration> {
        let mut shard = self.shard(key);
        match shard.get(key) {
            Some(e) if e.is_live(now) => e.expires.map(|at| at.duration_since(now)),
            Some(_) => {
                self.remove_if_expired(&mut shard, key, now);
                None
            }
            None => None,
        }
    }

    /// The live entries whose key starts with `prefix`, sorted by key, at most `limit` of
    /// them, each with its time left (`None`: never expires); and whether more matched.
    /// Locks one shard at a time (`moonroute ctl kv list`), so loops keep working; on a
    /// shared store, asks Redis.
    pub fn list(&self, prefix: &str, limit: usize, now: Instant) -> Result<KvListing, KvError> {
        if let Some(remote) = &self.remote {
            return remote.list(prefix, limit);
        }
        let mut found = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            found.extend(
                shard
                    .iter()
                    .filter(|(key, e)| key.starts_with(prefix) && e.is_live(now))
                    .map(|(key, e)| {
                        let left = e.expires.map(|at| at.duration_since(now));
                        (key.clone(), e.value.clone(), left)
                    }),
            );
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let more = found.len() > limit;
        found.truncate(limit);
        Ok((found, more))
    }

    /// Number of stored entries, including expired ones not yet swept.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether the store holds no entries at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remove every expired entry; returns how many were removed. Locks one
    /// shard at a time, so other threads keep working meanwhile.
    pub fn sweep(&self, now: Instant) -> usize {
        self.shards
            .iter()
            .map(|m| {
                let mut shard = m.lock().unwrap_or_else(|e| e.into_inner());
                self.sweep_shard(&mut shard, now)
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const S: Duration = Duration::from_secs(1);

    fn int(n: i64) -> KvValue {
        KvValue::Int(n)
    }

    fn text(s: &str) -> KvValue {
        KvValue::Str(s.to_owned())
    }

    #[test]
    fn store_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<KvStore>();
        assert_send_sync::<Arc<KvStore>>();
    }

    #[test]
    fn get_set_delete() {
        let kv = KvStore::new(100);
        let t = Instant::now();
        assert!(kv.is_empty());
        assert_eq!(kv.get("a", t), None);

        kv.set("a", int(7), None, t).unwrap();
        kv.set("b", text("hello"), None, t).unwrap();
        assert_eq!(kv.get("a", t), Some(int(7)));
        assert_eq!(kv.get("b", t), Some(text("hello")));
        assert_eq!(kv.len(), 2);

        // Overwrite: new value, same count, may change type.
        kv.set("a", text("x"), None, t).unwrap();
        assert_eq!(kv.get("a", t), Some(text("x")));
        assert_eq!(kv.len(), 2);

        assert!(kv.delete("a"));
        assert!(!kv.delete("a"));
        assert_eq!(kv.get("a", t), None);
        assert_eq!(kv.len(), 1);
        assert!(kv.delete("b"));
        assert!(kv.is_empty());
    }

    #[test]
    fn ttl_expiry_with_explicit_time() {
        let kv = KvStore::new(100);
        let t0 = Instant::now();
        kv.set("ban:1.2.3.4", int(1), Some(10 * S), t0).unwrap();
        kv.set("forever", int(1), None, t0).unwrap();

        assert_eq!(kv.ttl("ban:1.2.3.4", t0), Some(10 * S));
        assert_eq!(kv.ttl("ban:1.2.3.4", t0 + 4 * S), Some(6 * S));
        assert_eq!(kv.get("ban:1.2.3.4", t0 + 9 * S), Some(int(1)));
        assert_eq!(kv.ttl("forever", t0), None);
        assert_eq!(kv.ttl("missing", t0), None);

        // Expired exactly at the deadline.
        assert_eq!(kv.get("ban:1.2.3.4", t0 + 10 * S), None);
        assert_eq!(kv.ttl("ban:1.2.3.4", t0 + 10 * S), None);
        assert_eq!(kv.get("forever", t0 + 1_000_000 * S), Some(int(1)));
        // The lookup removed the expired entry.
        assert_eq!(kv.len(), 1);

        // set replaces the expiry, including removing it.
        kv.set("k", int(1), Some(S), t0).unwrap();
        kv.set("k", int(2), None, t0).unwrap();
        assert_eq!(kv.get("k", t0 + 5 * S), Some(int(2)));
        kv.set("k", int(3), Some(2 * S), t0 + 5 * S).unwrap();
        assert_eq!(kv.ttl("k", t0 + 6 * S), Some(S));

        // A zero TTL is already expired; a huge one never expires.
        kv.set("zero", int(1), Some(Duration::ZERO), t0).unwrap();
        assert_eq!(kv.get("zero", t0), None);
        kv.set("huge", int(1), Some(Duration::MAX), t0).unwrap();
        assert_eq!(kv.get("huge", t0 + 1_000_000 * S), Some(int(1)));
    }

    #[test]
    fn incr_is_atomic_across_threads() {
        let kv = Arc::new(KvStore::new(100));
        let t = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let kv = Arc::clone(&kv);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        kv.incr("hits", 1, None, t).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(kv.get("hits", t), Some(int(40_000)));
        assert_eq!(kv.len(), 1);
    }

    #[test]
    fn incr_keeps_first_expiry_window_counter() {
        let kv = KvStore::new(100);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let key = "pike:1.2.3.4";

        assert_eq!(kv.incr(key, 1, Some(S), t0), Ok(1));
        assert_eq!(kv.incr(key, 1, Some(S), t0 + ms(300)), Ok(2));
        // The later call's TTL does not push the window out.
        assert_eq!(kv.incr(key, 1, Some(S), t0 + ms(900)), Ok(3));
        assert_eq!(kv.ttl(key, t0 + ms(900)), Some(ms(100)));
        // New window: starts at 0 again with a fresh TTL.
        assert_eq!(kv.incr(key, 1, Some(S), t0 + ms(1000)), Ok(1));
        assert_eq!(kv.ttl(key, t0 + ms(1000)), Some(S));
        assert_eq!(kv.len(), 1);

        // Missing key without TTL never expires; negative steps work.
        assert_eq!(kv.incr("n", -5, None, t0), Ok(-5));
        assert_eq!(kv.incr("n", 2, Some(S), t0), Ok(-3));
        assert_eq!(kv.ttl("n", t0), None);

        // Saturating add.
        kv.set("big", int(i64::MAX - 1), None, t0).unwrap();
        assert_eq!(kv.incr("big", 10, None, t0), Ok(i64::MAX));
        kv.set("small", int(i64::MIN + 1), None, t0).unwrap();
        assert_eq!(kv.incr("small", -10, None, t0), Ok(i64::MIN));
    }

    #[test]
    fn incr_on_string_errors() {
        let kv = KvStore::new(100);
        let t0 = Instant::now();
        kv.set("s", text("abc"), Some(S), t0).unwrap();
        assert_eq!(kv.incr("s", 1, None, t0), Err(KvError::NotAnInteger));
        assert_eq!(kv.get("s", t0), Some(text("abc")));
        // Once expired, the string is gone and the counter starts over.
        assert_eq!(kv.incr("s", 1, None, t0 + S), Ok(1));
    }

    #[test]
    fn max_keys_enforced_and_expired_keys_make_room() {
        let kv = KvStore::new(3);
        let t0 = Instant::now();
        kv.set("a", int(1), Some(S), t0).unwrap();
        kv.set("b", int(1), None, t0).unwrap();
        kv.incr("c", 1, None, t0).unwrap();
        assert_eq!(kv.len(), 3);

        assert_eq!(kv.set("d", int(1), None, t0), Err(KvError::TooManyKeys));
        assert_eq!(kv.incr("d", 1, None, t0), Err(KvError::TooManyKeys));
        // Updating existing keys still works when full.
        kv.set("b", text("x"), None, t0).unwrap();
        assert_eq!(kv.incr("c", 1, None, t0), Ok(2));
        assert_eq!(kv.len(), 3);

        // "a" expires; a new key in "a"'s shard takes its place. Find such a
        // key so the test does not depend on which shard "d" lands in.
        let t1 = t0 + S;
        let same_shard = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| shard_index(k) == shard_index("a"))
            .unwrap();
        kv.set(&same_shard, int(1), None, t1).unwrap();
        assert_eq!(kv.len(), 3);
        assert_eq!(kv.get("a", t1), None);
        assert_eq!(kv.set("d", int(1), None, t1), Err(KvError::TooManyKeys));

        // Deleting makes room too.
        assert!(kv.delete("b"));
        assert_eq!(kv.incr("d", 1, None, t1), Ok(1));
        assert_eq!(kv.len(), 3);

        // An expired key elsewhere is reclaimed by a full sweep.
        kv.set("c", int(0), Some(S), t1).unwrap();
        assert_eq!(kv.sweep(t1 + S), 1);
        kv.set("e", int(1), None, t1 + S).unwrap();
        assert_eq!(kv.len(), 3);

        let none = KvStore::new(0);
        assert_eq!(none.set("a", int(1), None, t0), Err(KvError::TooManyKeys));
        assert!(none.is_empty());
    }

    #[test]
    fn sweep_counts_expired_entries() {
        let kv = KvStore::new(1000);
        let t0 = Instant::now();
        for i in 0..100 {
            let ttl = match i % 3 {
                0 => None,
                1 => Some(S),
                _ => Some(10 * S),
            };
            kv.set(&format!("k{i}"), int(i), ttl, t0).unwrap();
        }
        assert_eq!(kv.len(), 100);
        assert_eq!(kv.sweep(t0), 0);
        assert_eq!(kv.sweep(t0 + S), 33);
        assert_eq!(kv.len(), 67);
        assert_eq!(kv.sweep(t0 + S), 0);
        assert_eq!(kv.sweep(t0 + 10 * S), 33);
        assert_eq!(kv.len(), 34);
        assert_eq!(kv.get("k0", t0 + 10 * S), Some(int(0)));
        assert_eq!(kv.get("k1", t0 + 10 * S), None);
    }

    #[test]
    fn long_key_and_value_refused() {
        let kv = KvStore::new(10);
        let t = Instant::now();
        let key_ok = "k".repeat(MAX_KEY_LEN);
        let key_long = "k".repeat(MAX_KEY_LEN + 1);
        let val_ok = "v".repeat(MAX_VALUE_LEN);
        let val_long = "v".repeat(MAX_VALUE_LEN + 1);

        kv.set(&key_ok, text(&val_ok), None, t).unwrap();
        assert_eq!(kv.get(&key_ok, t), Some(text(&val_ok)));
        assert_eq!(kv.set(&key_long, int(1), None, t), Err(KvError::KeyTooLong));
        assert_eq!(kv.incr(&key_long, 1, None, t), Err(KvError::KeyTooLong));
        assert_eq!(
            kv.set("k", text(&val_long), None, t),
            Err(KvError::ValueTooLong)
        );
        // A refused write leaves the old value alone.
        assert_eq!(
            kv.set(&key_ok, text(&val_long), None, t),
            Err(KvError::ValueTooLong)
        );
        assert_eq!(kv.get(&key_ok, t), Some(text(&val_ok)));
        assert_eq!(kv.len(), 1);
    }

    #[test]
    fn errors_display_as_sentences() {
        assert_eq!(
            KvError::TooManyKeys.to_string(),
            "the key-value store is full"
        );
        assert_eq!(
            KvError::KeyTooLong.to_string(),
            "the key is longer than 256 bytes"
        );
        assert_eq!(
            KvError::ValueTooLong.to_string(),
            "the value is longer than 4096 bytes"
        );
        assert_eq!(
            KvError::NotAnInteger.to_string(),
            "the stored value is not an integer"
        );
    }

    #[test]
    fn poisoned_shard_does_not_panic() {
        let kv = Arc::new(KvStore::new(10));
        let t = Instant::now();
        kv.set("a", int(1), None, t).unwrap();
        let kv2 = Arc::clone(&kv);
        let _ = std::thread::spawn(move || {
            let _guard = kv2.shard("a");
            panic!("poison the shard");
        })
        .join();
        assert!(kv.shards[shard_index("a")].is_poisoned());
        assert_eq!(kv.get("a", t), Some(int(1)));
        assert_eq!(kv.incr("a", 1, None, t), Ok(2));
        assert_eq!(kv.sweep(t), 0);
    }
}
