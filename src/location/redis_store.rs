//! [`RedisLocation`]: the location store shared by several nodes on one Redis server.
//!
//! # Data model
//!
//! - `moonroute:loc:<AOR>`: one string per AOR, the AOR's bindings in the record format of
//!   [`super::record`] (registration order kept; every binding carries its own expiry, so
//!   bindings expire one by one, not per AOR);
//! - `moonroute:loc:expiry`: a sorted set of AORs scored by the earliest expiry of their
//!   bindings (milliseconds since the Unix epoch): what a sweep visits;
//! - `moonroute:loc:aors`: a sorted set of AORs, all scored 0, so it is in name order: `ctl ul`
//!   and walks over the AORs ([`LocationStore::aors_page`]) resume after a name;
//! - `moonroute:loc:count`: the number of stored bindings (expired ones not yet swept
//!   included), for `ctl status` and the `max_bindings` bound.
//!
//! # Updates from several nodes (RFC 3261 §10.3)
//!
//! The §10.3 rules (Call-ID/CSeq ordering, `Contact: *`, expiry) are the registrar's, in Rust,
//! and stay in one place: an update reads the AOR's record, runs them, and writes the result
//! with a compare-and-set Lua script run atomically by Redis ([`CAS`]): it writes only if the
//! record is still the one read, else the update reads again and runs the rules again (at most
//! [`MAX_ATTEMPTS`] times). Two nodes registering one AOR at once therefore never lose one
//! another's bindings, and a stale CSeq is refused whichever node sees it. Within one node,
//! updates of one AOR also take a local lock (one of [`STRIPES`], by hash), so the event loops
//! of a node do not race one another: only nodes do, and a compare-and-set fails only when
//! another node wrote the AOR meanwhile.
//!
//! A REGISTER ([`LocationStore::update_parked`]) waits for the read only: the compare-and-set
//! is sent without waiting, the registrar's 200 is parked on its [`Acknowledgement`] (as a
//! sled write's is on its disk flush), and the event loop serves other requests meanwhile. If
//! another writer changed the AOR between the read and the write, that REGISTER gets 500 (a
//! commit that failed, §10.3) and the phone sends it again; within a node this happens only
//! for two REGISTERs of one AOR in the same round trip.
//!
//! # Durability
//!
//! The write is acknowledged when Redis answered the script, and only then does the
//! registrar's 200 go out. How much survives a Redis crash is Redis's persistence setting:
//! with `appendonly yes` and `appendfsync always` every acknowledged binding survives; with
//! `appendfsync everysec` (Redis's default, far cheaper) up to one second of them may be lost
//! with the Redis host (not with a moonroute node: a node killed with SIGKILL loses nothing,
//! its bindings are in Redis).
//!
//! # Redis unreachable
//!
//! Every call makes at most a few round trips through the node's [`RedisLink`]; one that
//! fails returns an error, [`LocationStore::reachable`] turns false, and the registrar answers
//! 503 with Retry-After, `req:lookup` returns -1 (the shipped script answers 503, never a
//! false 404). A REGISTER parked on a compare-and-set that Redis never confirmed (the
//! connection lost after the read) gets the same 503 with Retry-After
//! ([`CommitState::Unavailable`](super::CommitState::Unavailable)), not a 500.
//!
//! Each binding records the node it was registered through, and how other nodes reach it
//! when only that node can ([`crate::cluster`]). Not done yet: NAT keep-alives go out from
//! every node, not from the owner only.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{debug, warn};

use super::commit::{Acknowledgement, Commit};
use super::{live_sorted, record, AorCursor, Binding, LocationStore, StoreError};
use crate::redis_link::{LinkError, RedisLink};

const RECORD_PREFIX: &str = "moonroute:loc:";
const EXPIRY_KEY: &str = "moonroute:loc:expiry";
const AORS_KEY: &str = "moonroute:loc:aors";
const COUNT_KEY: &str = "moonroute:loc:count";

/// How many times an update reads and runs the rules again when another node wrote the AOR
/// between its read and its write.
const MAX_ATTEMPTS: usize = 32;

/// Local locks serialising one node's updates of an AOR (by hash of the AOR).
const STRIPES: usize = 64;

/// AORs a sweep takes from the expiry set per round trip.
const SWEEP_BATCH: usize = 500;

/// The compare-and-set of one AOR's record. KEYS: record, expiry set, AOR set, count.
/// ARGV: the record read ("" when absent), the new record ("" removes the AOR), the earliest
/// expiry of the new record (ms), the change in the number of bindings, the AOR, the bound on
/// the number of bindings. Returns 1 when written, 0 when the record changed since it was
/// read, -1 when the store is full.
const CAS: &str = r"
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[1] then return 0 end
local delta = tonumber(ARGV[4])
if delta > 0 then
  local total = tonumber(redis.call('GET', KEYS[4]) or '0')
  if total + delta > tonumber(ARGV[6]) then return -1 end
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[5])
  redis.call('ZREM', KEYS[3], ARGV[5])
else
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
  redis.call('ZADD', KEYS[3], 0, ARGV[5])
end
if delta ~= 0 then redis.call('INCRBY', KEYS[4], delta) end
return 1
";

/// The [`LocationStore`] on Redis (see the module documentation).
pub struct RedisLocation {
    link: Arc<RedisLink>,
    stripes: Vec<Mutex<()>>,
    hasher: RandomState,
    cas: redis::Script,
    max_bindings: usize,
}

impl std::fmt::Debug for RedisLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLocation")
            .field("link", &self.link)
            .finish()
    }
}

/// What an update read: the record as stored (to compare and set) and its bindings.
struct Read {
    raw: Vec<u8>,
    bindings: Vec<Binding>,
}

impl Read {
    /// The unexpired bindings, in registration order.
    fn live(&self, now: SystemTime) -> Vec<Binding> {
        self.bindings
            .iter()
            .filter(|b| b.is_live(now))
            .cloned()
            .collect()
    }
}

impl RedisLocation {
    /// The store on the server behind `link`, holding at most `max_bindings` bindings (all
    /// nodes together).
    pub fn new(link: Arc<RedisLink>, max_bindings: usize) -> RedisLocation {
        RedisLocation {
            link,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::new(),
            cas: redis::Script::new(CAS),
            max_bindings,
        }
    }

    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    /// This node's lock for updates of `aor` (a poisoned one is taken as it is: it guards
    /// no data).
    fn lock(&self, aor: &str) -> MutexGuard<'_, ()> {
        let index = (self.hasher.hash_one(aor) % STRIPES as u64) as usize;
        self.stripes[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record_key(aor: &str) -> String {
        format!("{RECORD_PREFIX}{aor}")
    }

    fn read(&self, aor: &str) -> Result<Read, StoreError> {
        let raw: Option<Vec<u8>> = self
            .link
            .query(redis::cmd("GET").arg(Self::record_key(aor)).clone())
            .map_err(unreachable)?;
        let raw = raw.unwrap_or_default();
        if raw.is_empty() {
            return Ok(Read {
                raw,
                bindings: Vec::new(),
            });
        }
        let bindings = record::decode(aor.as_bytes(), &raw).map_err(|e| {
            StoreError::Backend(format!("the record of {aor} in Redis is unreadable: {e}"))
        })?;
        Ok(Read { raw, bindings })
    }

    /// Writes `new` in place of what `read` found; `Ok(false)` when another node wrote first.
    fn compare_and_set(&self, aor: &str, read: &Read, new: &[Binding]) -> Result<bool, StoreError> {
        let (keys, args) = self.cas_input(aor, read, new);
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let answer: i64 = self
            .link
            .script(&self.cas, &keys, &args)
            .map_err(unreachable)?;
        self.cas_result(answer)
    }

    /// [`RedisLocation::compare_and_set`] without waiting: the returned ticket settles when
    /// Redis answers (failed when another node wrote first).
    fn compare_and_set_parked(&self, aor: &str, read: &Read, new: &[Binding]) -> Commit {
        let (keys, args) = self.cas_input(aor, read, new);
        let acknowledgement = Acknowledgement::new();
        let ticket = acknowledgement.ticket();
        let max_bindings = self.max_bindings;
        self.link
            .script_then::<i64>(&self.cas, keys, args, move |answer| match answer {
                Err(error) if error.is_unreachable() => {
                    acknowledgement.settle_unavailable(unreachable(error))
                }
                answer => acknowledgement.settle(
                    answer
                        .map_err(unreachable)
                        .and_then(|answer| cas_answer(answer, max_bindings))
                        .and_then(|written| match written {
                            true => Ok(()),
                            false => Err(StoreError::Backend(
                                "the AOR was changed by another node meanwhile".to_owned(),
                            )),
                        }),
                ),
            });
        Commit::Pending(ticket)
    }

    /// The keys and arguments of [`CAS`].
    fn cas_input(&self, aor: &str, read: &Read, new: &[Binding]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let encoded = if new.is_empty() {
            Vec::new()
        } else {
            record::encode(new)
        };
        let earliest = new
            .iter()
            .map(|b| millis(b.expires_at))
            .min()
            .unwrap_or(0)
            .to_string();
        let delta = (new.len() as i64 - read.bindings.len() as i64).to_string();
        let keys = vec![
            Self::record_key(aor).into_bytes(),
            EXPIRY_KEY.as_bytes().to_vec(),
            AORS_KEY.as_bytes().to_vec(),
            COUNT_KEY.as_bytes().to_vec(),
        ];
        let args = vec![
            read.raw.clone(),
            encoded,
            earliest.into_bytes(),
            delta.into_bytes(),
            aor.as_bytes().to_vec(),
            self.max_bindings.to_string().into_bytes(),
        ];
        (keys, args)
    }

    fn cas_result(&self, answer: i64) -> Result<bool, StoreError> {
        cas_answer(answer, self.max_bindings)
    }
}

/// What [`CAS`] answered: written, or not because the record changed; an error when full.
fn cas_answer(answer: i64, max_bindings: usize) -> Result<bool, StoreError> {
    match answer {
        1 => Ok(true),
        0 => Ok(false),
        _ => Err(StoreError::Full { max_bindings }),
    }
}

impl RedisLocation {
    /// Removes the expired bindings of `aor` (and so moves its score in the expiry set to
    /// its next expiry); returns how many.
    fn sweep_one(&self, aor: &str, now: SystemTime) -> Result<usize, StoreError> {
        let _local = self.lock(aor);
        for _ in 0..MAX_ATTEMPTS {
            let read = self.read(aor)?;
            let live = read.live(now);
            let gone = read.bindings.len() - live.len();
            if self.compare_and_set(aor, &read, &live)? {
                return Ok(gone);
            }
        }
        Err(StoreError::Backend(format!(
            "{aor} is being updated by other nodes"
        )))
    }
}

fn unreachable(error: LinkError) -> StoreError {
    StoreError::Backend(error.to_string())
}

/// Milliseconds since the Unix epoch (0 before it).
fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64)
}

impl LocationStore for RedisLocation {
    fn lookup(&self, aor: &str, now: SystemTime) -> Vec<Binding> {
        self.try_lookup(aor, now).unwrap_or_else(|error| {
            // The link logged the outage once; a line per lookup would flood the log.
            debug!(%aor, %error, "location lookup failed");
            Vec::new()
        })
    }

    fn try_lookup(&self, aor: &str, now: SystemTime) -> Result<Vec<Binding>, StoreError> {
        let read = self.read(aor)?;
        Ok(live_sorted(&read.bindings, now))
    }

    fn replace(&self, aor: &str, bindings: Vec<Binding>) -> Result<Commit, StoreError> {
        let _local = self.lock(aor);
        for _ in 0..MAX_ATTEMPTS {
            let read = self.read(aor)?;
            if self.compare_and_set(aor, &read, &bindings)? {
                return Ok(Commit::Done);
            }
        }
        Err(StoreError::Backend(format!(
            "{aor} is being updated by other nodes, try again"
        )))
    }

    /// Removes the expired bindings of the AORs whose earliest expiry has passed (every node
    /// may sweep: each AOR's write is a compare-and-set).
    fn sweep(&self, now: SystemTime) -> usize {
        let due: Vec<String> = match self.link.query(
            redis::cmd("ZRANGEBYSCORE")
                .arg(EXPIRY_KEY)
                .arg("-inf")
                .arg(millis(now))
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_BATCH)
                .clone(),
        ) {
            Ok(due) => due,
            Err(error) => {
                debug!(%error, "location sweep skipped");
                return 0;
            }
        };
        let mut removed = 0;
        for aor in due {
            match self.sweep_one(&aor, now) {
                Ok(gone) => removed += gone,
                Err(error) => warn!(%aor, %error, "location sweep: AOR not swept"),
            }
        }
        removed
    }

    fn count(&self) -> usize {
        self.link
            .query::<Option<i64>>(redis::cmd("GET").arg(COUNT_KEY).clone())
            .ok()
            .flatten()
            .map_or(0, |n| n.max(0) as usize)
    }

    fn aors(&self) -> Vec<String> {
        self.link
            .query(redis::cmd("ZRANGE").arg(AORS_KEY).arg(0).arg(-1).clone())
            .unwrap_or_default()
    }

    /// In name order (the AOR set is scored 0): a walk resumes after the last name listed.
    fn aors_page(&self, cursor: &AorCursor, limit: usize) -> (Vec<String>, Option<AorCursor>) {
        let limit = limit.max(1);
        let from = cursor
            .last_listed()
            .map_or_else(|| "-".to_owned(), |after| format!("({after}"));
        let page: Vec<String> = self
            .link
            .query(
                redis::cmd("ZRANGEBYLEX")
                    .arg(AORS_KEY)
                    .arg(from)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .clone(),
            )
            .unwrap_or_default();
        let next = (page.len() == limit).then(|| AorCursor::after(page.last().cloned()));
        (page, next)
    }

    /// Read, run `f`, compare-and-set; again from the read when another node wrote the AOR
    /// meanwhile. `f` may run several times: it is the registrar's sans-IO rules.
    fn update(
        &self,
        aor: &str,
        now: SystemTime,
        f: &mut dyn FnMut(Vec<Binding>) -> Option<Vec<Binding>>,
    ) -> Result<Commit, StoreError> {
        let _local = self.lock(aor);
        for _ in 0..MAX_ATTEMPTS {
            let read = self.read(aor)?;
            let live = read.live(now);
            let Some(new) = f(live) else {
                return Ok(Commit::Done);
            };
            if self.compare_and_set(aor, &read, &new)? {
                return Ok(Commit::Done);
            }
        }
        Err(StoreError::Backend(format!(
            "{aor} is being updated by other nodes, try again"
        )))
    }

    /// Reads (one round trip, waited for), runs `f`, and sends the compare-and-set without
    /// waiting: the registrar parks its 200 on the ticket, and the event loop serves other
    /// requests until Redis acknowledges the write.
    fn update_parked(
        &self,
        aor: &str,
        now: SystemTime,
        f: &mut dyn FnMut(Vec<Binding>) -> Option<Vec<Binding>>,
    ) -> Result<Commit, StoreError> {
        let read = self.read(aor)?;
        let Some(new) = f(read.live(now)) else {
            return Ok(Commit::Done);
        };
        Ok(self.compare_and_set_parked(aor, &read, &new))
    }

    fn reachable(&self) -> bool {
        self.link.is_up()
    }

    fn register_metrics(&self, registry: &crate::metrics::Registry) {
        self.link.register_metrics(registry, "location");
    }

    fn health(&self) -> Option<String> {
        Some(self.link.health())
    }
}
