//! Dialog profiles (Kamailio's `set_dlg_profile` / `get_profile_size`): named sets of dialogs
//! keyed by a value (a user, a trunk, a tenant), counted so a script can limit concurrent
//! calls per value.
//!
//! One [`Profiles`] is shared by every event loop: a dialog lives on the loop owning its
//! Call-ID (`server::affinity`), but a user's calls have different Call-IDs and so land on
//! different loops, and the limit is on their sum. The counts sit in a few mutex-guarded shards
//! (picked by the key's hash), held only for one hash-map update: loops rarely meet on the same
//! shard, and a dialog touches them only when it joins or leaves a profile (not per message).
//!
//! A dialog's memberships are owned by the dialog (`table::Dialog`) as [`Membership`]s, which
//! leave their profile when dropped: whatever ends a dialog (BYE, failure, timeout, table
//! teardown on a script reload or shutdown), its counts go back down exactly once, and an entry
//! whose count falls to zero is removed, so the map holds only values with live dialogs.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

/// Number of shards; a power of two.
const SHARDS: usize = 16;

/// Longest profile name and value accepted (bytes): keys are script-chosen, often from
/// headers, and the map is shared.
pub const MAX_NAME_LEN: usize = 64;
pub const MAX_VALUE_LEN: usize = 256;

/// Why a dialog could not join a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinError {
    /// The name or value is empty or longer than [`MAX_NAME_LEN`] / [`MAX_VALUE_LEN`].
    BadKey,
    /// The profile already counts `limit` dialogs for this value.
    Full { count: u32 },
}

type Key = (Box<str>, Box<str>);

/// Profile counts shared by every event loop (see the module doc).
pub struct Profiles {
    shards: Vec<Mutex<HashMap<Key, u32>>>,
    hasher: RandomState,
}

impl Default for Profiles {
    fn default() -> Self {
        Profiles {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl std::fmt::Debug for Profiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profiles")
            .field("entries", &self.entries())
            .finish()
    }
}

impl Profiles {
    pub fn new() -> Arc<Profiles> {
        Arc::new(Profiles::default())
    }

    /// How many live dialogs are in profile `name` with `value` (`get_profile_size`).
    pub fn count(&self, name: &str, value: &str) -> u32 {
        if !valid(name, value) {
            return 0;
        }
        let shard = self.shard(name, value);
        let key: Key = (name.into(), value.into());
        shard.get(&key).copied().unwrap_or(0)
    }

    /// Adds one dialog to profile `name` with `value`, unless it already counts `limit` or
    /// more (`None`: no limit). Counting and adding happen under one lock, so two loops racing
    /// for a user's last free call cannot both win (a script's `count() < n then add()` can).
    pub fn join(
        self: &Arc<Self>,
        name: &str,
        value: &str,
        limit: Option<u32>,
    ) -> Result<Membership, JoinError> {
        if !valid(name, value) {
            return Err(JoinError::BadKey);
        }
        let key: Key = (name.into(), value.into());
        let mut shard = self.shard(name, value);
        let count = shard.entry(key.clone()).or_insert(0);
        if let Some(limit) = limit {
            if *count >= limit {
                let count = *count;
                if count == 0 {
                    shard.remove(&key);
                }
                return Err(JoinError::Full { count });
            }
        }
        *count += 1;
        drop(shard);
        Ok(Membership {
            profiles: Arc::clone(self),
            key,
        })
    }

    /// Every (name, value, count), for metrics and `ctl`; a snapshot shard by shard.
    pub fn entries(&self) -> Vec<(String, String, u32)> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let shard = lock(shard);
            all.extend(
                shard
                    .iter()
                    .map(|((n, v), c)| (n.to_string(), v.to_string(), *c)),
            );
        }
        all.sort();
        all
    }

    fn leave(&self, key: &Key) {
        let mut shard = self.shard(&key.0, &key.1);
        if let Some(count) = shard.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                shard.remove(key);
                crate::memory::shrink_if_sparse(&mut shard);
            }
        }
    }

    fn shard(&self, name: &str, value: &str) -> MutexGuard<'_, HashMap<Key, u32>> {
        let index = self.hasher.hash_one((name, value)) as usize & (SHARDS - 1);
        lock(&self.shards[index])
    }
}

/// A poisoned shard (a panic elsewhere while holding it) still holds consistent counts: every
/// update is a single map operation.
fn lock(shard: &Mutex<HashMap<Key, u32>>) -> MutexGuard<'_, HashMap<Key, u32>> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn valid(name: &str, value: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !value.is_empty()
        && value.len() <= MAX_VALUE_LEN
}

/// One dialog's place in one profile; leaves it when dropped.
pub struct Membership {
    profiles: Arc<Profiles>,
    key: Key,
}

impl Membership {
    pub fn name(&self) -> &str {
        &self.key.0
    }

    pub fn value(&self) -> &str {
        &self.key.1
    }

    /// Heap bytes this membership holds (for the table's memory accounting).
    pub fn footprint(&self) -> usize {
        std::mem::size_of::<Membership>() + self.key.0.len() + self.key.1.len()
    }
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key.0, self.key.1)
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.profiles.leave(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_memberships_and_empty_entries_disappear() {
        let profiles = Profiles::new();
        let a = profiles.join("caller", "alice", None).unwrap();
        let b = profiles.join("caller", "alice", None).unwrap();
        let _c = profiles.join("caller", "bob", None).unwrap();
        assert_eq!(profiles.count("caller", "alice"), 2);
        assert_eq!(profiles.count("caller", "bob"), 1);
        assert_eq!(profiles.count("trunk", "alice"), 0);
        drop(a);
        assert_eq!(profiles.count("caller", "alice"), 1);
        drop(b);
        assert_eq!(profiles.count("caller", "alice"), 0);
        assert_eq!(profiles.entries(), vec![("caller".into(), "bob".into(), 1)]);
    }

    #[test]
    fn a_limited_join_refuses_the_call_over_the_limit_and_admits_it_after_one_leaves() {
        let profiles = Profiles::new();
        let first = profiles.join("user", "alice", Some(2)).unwrap();
        let _second = profiles.join("user", "alice", Some(2)).unwrap();
        assert_eq!(
            profiles.join("user", "alice", Some(2)).unwrap_err(),
            JoinError::Full { count: 2 }
        );
        drop(first);
        assert!(profiles.join("user", "alice", Some(2)).is_ok());
        // A limit of 0 refuses without leaving an empty entry behind.
        assert!(profiles.join("user", "carol", Some(0)).is_err());
        assert_eq!(profiles.entries().len(), 1);
    }

    #[test]
    fn oversized_or_empty_keys_are_refused() {
        let profiles = Profiles::new();
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        assert_eq!(
            profiles.join("user", &long, None).unwrap_err(),
            JoinError::BadKey
        );
        assert_eq!(profiles.join("", "a", None).unwrap_err(), JoinError::BadKey);
        assert_eq!(profiles.count("user", &long), 0);
    }

    #[test]
    fn loops_racing_for_the_last_slot_admit_exactly_the_limit() {
        let profiles = Profiles::new();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let profiles = Arc::clone(&profiles);
                std::thread::spawn(move || {
                    (0..100)
                        .filter_map(|_| profiles.join("user", "alice", Some(50)).ok())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let held: Vec<Membership> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(held.len(), 50);
        assert_eq!(profiles.count("user", "alice"), 50);
        drop(held);
        assert_eq!(profiles.count("user", "alice"), 0);
    }
}
