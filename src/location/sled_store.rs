//! [`SledLocation`]: the durable location store.
//!
//! Memory serves every lookup ([`MemoryLocation`], sharded, no global lock); sled keeps one
//! record per AOR ([`super::record`]) in the tree `bindings`, written while the AOR's shard is
//! locked so the disk sees an AOR's versions in the order memory does. Writes are not flushed
//! one by one: a flusher thread flushes batches ([`super::commit`]) and the registrar's 200
//! (OK) waits for the flush that covers its write (RFC 3261 §10.3 makes the 200 the promise
//! that the bindings are stored).
//!
//! Opening loads every unexpired binding into memory before returning, so a server answers
//! nothing before its registrations are back; expired records are removed, corrupt or foreign
//! ones reported (with their key) and skipped, and left on disk for inspection.
//!
//! Opened with the registrar's [`AorKeys`] ([`SledLocation::open_rekeyed`]), loading also
//! moves every record stored under a key the rule now spells differently (a port of our own
//! domain, kept in keys written before the registrar dropped it) to its key, merged with the
//! bindings already there. Each move is one atomic sled batch (write the merged record, remove
//! the old key): a crash leaves every key either moved or not, and the next open finishes the
//! work; a store whose keys are all current is left as it is (idempotent).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use super::commit::{Commit, CommitLog};
use super::{record, AorCursor, AorKeys, Binding, LocationStore, MemoryLocation, StoreError};

/// The sled tree holding the records.
const TREE: &str = "bindings";

/// The shortest time between two flush starts. Measured with `bench/register.sh 4000 40000`
/// (one loop, SIPp on the other core): flushing again as soon as the last flush ended gave
/// ~3.4 registrations per flush (11816 flushes) and 86-101 CPU ms per 1000 REGISTERs, sled's
/// IO threads busy with tiny flushes; 500 µs apart gave 63.5-65 ms with every 200 under 5 ms.
/// Each flush costs a write and a `sync_file_range` (~0.2 ms of CPU; before the patch in
/// `vendor/sled` it also woke all 7 of sled's IO threads): at 3,000 REGISTER/s, 500 µs apart
/// still made ~4 registrations per flush. 2 ms apart (at most 500 flushes a second) makes the
/// batches several times larger for at most 2 ms more before a 200.
/// A quiet store is not delayed: its last flush is long past.
const MIN_FLUSH_INTERVAL: Duration = Duration::from_millis(2);

/// What opening found on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub aors: usize,
    pub bindings: usize,
    /// Bindings found expired and removed.
    pub expired: usize,
    /// Records that could not be read (reported and skipped).
    pub corrupt: usize,
    /// Records moved to the key the AOR rule gives them (merged with what was there).
    pub rekeyed: usize,
    pub elapsed: Duration,
}

/// The durable [`LocationStore`].
pub struct SledLocation {
    index: MemoryLocation,
    tree: sled::Tree,
    db: sled::Db,
    log: Arc<CommitLog>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
}

impl std::fmt::Debug for SledLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledLocation")
            .field("path", &self.path)
            .field("count", &self.index.count())
            .finish()
    }
}

/// How long opening waits for the database's file lock: a store just closed in this process
/// (or a server that is still exiting) lets go of it only when sled's last background thread
/// has finished, a moment after the close returned.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Opens sled at `dir`, waiting up to [`LOCK_WAIT`] while another instance still holds its
/// lock; a lock held for longer (another server on the same directory) is an error.
fn open_db(dir: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let opened = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // Our flusher decides when to flush; sled's own timer would only add flushes.
            .flush_every_ms(None)
            .open();
        match opened {
            // sled 0.34 reports a held lock as an `Other` I/O error with this text.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

impl SledLocation {
    /// Opens (or creates, mode 0700: `crate::file_modes`) the store in directory `dir`, loads
    /// it and starts the flusher; stored keys are used as they are.
    /// `max_bindings` bounds memory as for [`MemoryLocation::new`]; `cache_bytes` is sled's
    /// page cache. Fails when the directory cannot be opened (another process holds it, no
    /// permission, not a sled database); never because of a bad record.
    pub fn open(
        dir: &Path,
        max_bindings: usize,
        cache_bytes: u64,
        now: SystemTime,
    ) -> Result<(SledLocation, LoadReport), String> {
        Self::open_with(dir, max_bindings, cache_bytes, now, None)
    }

    /// [`SledLocation::open`], moving each record whose key `keys` spells differently to its
    /// key (see the module documentation).
    pub fn open_rekeyed(
        dir: &Path,
        max_bindings: usize,
        cache_bytes: u64,
        now: SystemTime,
        keys: &dyn AorKeys,
    ) -> Result<(SledLocation, LoadReport), String> {
        Self::open_with(dir, max_bindings, cache_bytes, now, Some(keys))
    }

    fn open_with(
        dir: &Path,
        max_bindings: usize,
        cache_bytes: u64,
        now: SystemTime,
        keys: Option<&dyn AorKeys>,
    ) -> Result<(SledLocation, LoadReport), String> {
        let started = Instant::now();
        // Private whatever the umask: who is registered where is nobody else's business.
        crate::file_modes::prepare_store(dir)
            .map_err(|e| format!("cannot open the location database {}: {e}", dir.display()))?;
        let db = open_db(dir, cache_bytes)
            .map_err(|e| format!("cannot open the location database {}: {e}", dir.display()))?;
        let tree = db
            .open_tree(TREE)
            .map_err(|e| format!("cannot open the location database {}: {e}", dir.display()))?;
        crate::file_modes::seal_store(dir);
        let index = MemoryLocation::new(max_bindings);
        let mut report = load(&tree, &index, now, keys);
        // Removals of expired records and moves of keys must not wait for the first
        // registration's flush.
        db.flush()
            .map_err(|e| format!("location database {}: {e}", dir.display()))?;
        report.elapsed = started.elapsed();
        info!(
            path = %dir.display(),
            aors = report.aors,
            bindings = report.bindings,
            expired = report.expired,
            corrupt = report.corrupt,
            rekeyed = report.rekeyed,
            ms = report.elapsed.as_millis() as u64,
            "location database loaded"
        );
        let log = CommitLog::new();
        let flusher = {
            let (log, db) = (Arc::clone(&log), db.clone());
            std::thread::Builder::new()
                .name("moonroute-location-flush".to_owned())
                .spawn(move || log.run_flusher(MIN_FLUSH_INTERVAL, || db.flush().map(drop)))
                .map_err(|e| format!("cannot start the location flusher: {e}"))?
        };
        let store = SledLocation {
            index,
            tree,
            db,
            log,
            flusher: Mutex::new(Some(flusher)),
            path: dir.to_owned(),
        };
        Ok((store, report))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one AOR's record (or removes it when `bindings` is empty).
    fn persist(tree: &sled::Tree, aor: &str, bindings: &[Binding]) -> Result<(), StoreError> {
        let result = if bindings.is_empty() {
            tree.remove(aor.as_bytes()).map(drop)
        } else {
            tree.insert(aor.as_bytes(), record::encode(bindings))
                .map(drop)
        };
        result.map_err(|e| StoreError::Backend(format!("write to disk failed: {e}")))
    }

    /// The commit a caller waits for: its own write, or with `wrote` false the last write
    /// made so far (what it may have read).
    fn commit(&self, wrote: bool) -> Commit {
        let ticket = if wrote {
            Some(self.log.written())
        } else {
            self.log.barrier()
        };
        match ticket {
            Some(t) if t.state() != super::CommitState::Durable => Commit::Pending(t),
            _ => Commit::Done,
        }
    }

    /// Bytes sled holds on disk (for operators' status output).
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

/// A record to move to another key once every record is loaded.
struct Move {
    from: String,
    to: String,
    live: Vec<Binding>,
}

/// Reads every record into `index`; removes expired bindings from disk; moves the records
/// whose key `keys` spells differently.
fn load(
    tree: &sled::Tree,
    index: &MemoryLocation,
    now: SystemTime,
    keys: Option<&dyn AorKeys>,
) -> LoadReport {
    let mut report = LoadReport::default();
    let mut moves = Vec::new();
    for entry in tree.iter() {
        let (key, value) = match entry {
            Ok(kv) => kv,
            Err(error) => {
                warn!(%error, "location database: unreadable entry skipped");
                report.corrupt += 1;
                continue;
            }
        };
        let key_text = String::from_utf8_lossy(&key).into_owned();
        let bindings = match record::decode(&key, &value) {
            Ok(b) => b,
            Err(error) => {
                warn!(key = %key_text, %error, "location database: corrupt or foreign record skipped (left on disk)");
                report.corrupt += 1;
                continue;
            }
        };
        let total = bindings.len();
        let live: Vec<Binding> = bindings.into_iter().filter(|b| b.is_live(now)).collect();
        report.expired += total - live.len();
        let new_key = keys
            .and_then(|k| k.key_of(&key_text))
            .filter(|new_key| *new_key != key_text);
        if let Some(to) = new_key {
            // Moved once the walk is over: its target may not be loaded yet.
            moves.push(Move {
                from: key_text,
                to,
                live,
            });
            continue;
        }
        if live.len() < total {
            if let Err(error) = SledLocation::persist(tree, &key_text, &live) {
                warn!(key = %key_text, %error, "location database: could not remove expired bindings");
            }
        }
        if live.is_empty() {
            continue;
        }
        let count = live.len();
        match index.replace(&key_text, live) {
            Ok(_) => {
                report.aors += 1;
                report.bindings += count;
            }
            Err(error) => {
                warn!(key = %key_text, %error, "location database: record not loaded");
            }
        }
    }
    if let Some(keys) = keys {
        for one in moves {
            move_record(tree, index, now, keys, one, &mut report);
        }
    }
    report
}

/// Moves one record to its key, merged with the target's live bindings, in one atomic batch;
/// then the target's merged list replaces what memory holds for it. A target record that
/// cannot be read leaves the record where it is (loaded under its old key, reported).
fn move_record(
    tree: &sled::Tree,
    index: &MemoryLocation,
    now: SystemTime,
    keys: &dyn AorKeys,
    one: Move,
    report: &mut LoadReport,
) {
    let Move { from, to, live } = one;
    let there = match tree.get(to.as_bytes()) {
        Ok(None) => Ok(Vec::new()),
        Ok(Some(value)) => record::decode(to.as_bytes(), &value).map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    let there: Vec<Binding> = match there {
        Ok(bindings) => bindings.into_iter().filter(|b| b.is_live(now)).collect(),
        Err(error) => {
            warn!(key = %from, to = %to, %error, "location database: record not moved to its key (the record there is unreadable); loaded as it is");
            if !live.is_empty() {
                if let Err(error) = index.replace(&from, live) {
                    warn!(key = %from, %error, "location database: record not loaded");
                }
            }
            return;
        }
    };
    let before = there.len();
    let mut merged = keys.merge(there, live);
    for b in &mut merged {
        b.aor.clone_from(&to);
    }
    let mut batch = sled::Batch::default();
    batch.remove(from.as_bytes());
    if merged.is_empty() {
        batch.remove(to.as_bytes());
    } else {
        batch.insert(to.as_bytes(), record::encode(&merged));
    }
    if let Err(error) = tree.apply_batch(batch) {
        warn!(key = %from, to = %to, %error, "location database: record not moved to its key");
        return;
    }
    report.rekeyed += 1;
    info!(key = %from, to = %to, bindings = merged.len(), "location database: record moved to its key");
    if merged.is_empty() {
        return;
    }
    let count = merged.len();
    match index.replace(&to, merged) {
        Ok(_) => {
            report.aors += usize::from(before == 0);
            report.bindings += count - before;
        }
        Err(error) => {
            warn!(key = %to, %error, "location database: record not loaded");
        }
    }
}

impl LocationStore for SledLocation {
    fn health(&self) -> Option<String> {
        Some("sled (this node only, durable)".to_owned())
    }

    fn lookup(&self, aor: &str, now: SystemTime) -> Vec<Binding> {
        self.index.lookup(aor, now)
    }

    fn replace(&self, aor: &str, bindings: Vec<Binding>) -> Result<Commit, StoreError> {
        let tree = &self.tree;
        self.index
            .replace_persisting(aor, bindings, &mut |aor, b| Self::persist(tree, aor, b))?;
        Ok(self.commit(true))
    }

    fn sweep(&self, now: SystemTime) -> usize {
        let tree = &self.tree;
        self.index
            .sweep_persisting(now, &mut |aor, b| Self::persist(tree, aor, b))
    }

    fn count(&self) -> usize {
        self.index.count()
    }

    fn aors(&self) -> Vec<String> {
        self.index.aors()
    }

    fn aors_page(&self, cursor: &AorCursor, limit: usize) -> (Vec<String>, Option<AorCursor>) {
        self.index.aors_page(cursor, limit)
    }

    fn update(
        &self,
        aor: &str,
        now: SystemTime,
        f: &mut dyn FnMut(Vec<Binding>) -> Option<Vec<Binding>>,
    ) -> Result<Commit, StoreError> {
        let tree = &self.tree;
        let wrote = self
            .index
            .update_persisting(aor, now, f, &mut |aor, b| Self::persist(tree, aor, b))?;
        Ok(self.commit(wrote))
    }
}

impl Drop for SledLocation {
    /// A last flush, then the flusher stops (so the directory can be opened again at once).
    fn drop(&mut self) {
        let (flushes, writes) = self.log.stats();
        info!(flushes, writes, "location database closing");
        self.log.close();
        let flusher = self
            .flusher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(flusher) = flusher {
            if flusher.join().is_err() {
                warn!("location flusher panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::location::CommitState;

    fn binding(aor: &str, contact: &str, secs: u64, now: SystemTime) -> Binding {
        Binding::new(
            aor,
            contact,
            record::to_stored_precision(now + Duration::from_secs(secs)),
            1000,
            "c".to_owned(),
            1,
        )
    }

    fn open(dir: &Path, now: SystemTime) -> (SledLocation, LoadReport) {
        SledLocation::open(dir, 1000, 1 << 20, now).unwrap()
    }

    #[test]
    fn bindings_survive_a_reopen_and_expired_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        {
            let (store, report) = open(dir.path(), now);
            assert_eq!(
                report,
                LoadReport {
                    elapsed: report.elapsed,
                    ..LoadReport::default()
                }
            );
            let a = "sip:a@example.com";
            let commit = store
                .replace(a, vec![binding(a, "sip:a@192.0.2.1", 600, now)])
                .unwrap();
            commit.wait(Duration::from_secs(10)).unwrap();
            let b = "sip:b@example.com";
            store
                .replace(
                    b,
                    vec![
                        binding(b, "sip:b@192.0.2.2", 600, now),
                        binding(b, "sip:b@192.0.2.3", 5, now),
                    ],
                )
                .unwrap()
                .wait(Duration::from_secs(10))
                .unwrap();
        }
        let later = now + Duration::from_secs(60);
        let (store, report) = open(dir.path(), later);
        assert_eq!(
            (report.aors, report.bindings, report.expired, report.corrupt),
            (2, 2, 1, 0)
        );
        assert_eq!(store.lookup("sip:a@example.com", later).len(), 1);
        assert_eq!(
            store.lookup("sip:b@example.com", later)[0].contact,
            "sip:b@192.0.2.2"
        );
        assert_eq!(store.aors(), ["sip:a@example.com", "sip:b@example.com"]);
    }

    #[test]
    fn a_corrupt_record_is_skipped_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        {
            let (store, _) = open(dir.path(), now);
            let a = "sip:a@example.com";
            store
                .replace(a, vec![binding(a, "sip:a@192.0.2.1", 600, now)])
                .unwrap()
                .wait(Duration::from_secs(10))
                .unwrap();
            store
                .tree
                .insert("sip:junk@example.com", &b"garbage"[..])
                .unwrap();
            store.tree.insert(&[0xff, 0x00][..], &b"MRB1"[..]).unwrap();
        }
        let (store, report) = open(dir.path(), now);
        assert_eq!((report.bindings, report.corrupt), (1, 2));
        assert_eq!(store.count(), 1);
    }

    /// Writes `records` (key, contacts) as an older server would have: keys as given.
    fn write_records(dir: &Path, now: SystemTime, records: &[(&str, &[&str])]) {
        let (store, _) = open(dir, now);
        for (key, contacts) in records {
            let bindings = contacts.iter().map(|c| binding(key, c, 600, now)).collect();
            store
                .replace(key, bindings)
                .unwrap()
                .wait(Duration::from_secs(10))
                .unwrap();
        }
    }

    fn home() -> crate::registrar::AorRule {
        crate::registrar::AorRule::new(crate::proxy::identity::LocalIdentity::new(
            &["example.com".to_owned()],
            ["127.0.0.1:5060".parse().unwrap()],
        ))
    }

    fn open_home(dir: &Path, now: SystemTime) -> (SledLocation, LoadReport) {
        SledLocation::open_rekeyed(dir, 1000, 1 << 20, now, &home()).unwrap()
    }

    fn contacts_of(store: &SledLocation, aor: &str, now: SystemTime) -> Vec<String> {
        let mut contacts: Vec<String> = store
            .lookup(aor, now)
            .into_iter()
            .map(|b| {
                assert_eq!(b.aor, aor);
                b.contact
            })
            .collect();
        contacts.sort();
        contacts
    }

    #[test]
    fn keys_with_our_port_move_to_their_aor_and_merge() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        write_records(
            dir.path(),
            now,
            &[
                ("sip:u@127.0.0.1", &["sip:u@192.0.2.1", "sip:u@192.0.2.2"]),
                (
                    "sip:u@127.0.0.1:5060",
                    &["sip:u@192.0.2.2", "sip:u@192.0.2.3"],
                ),
                ("sip:v@example.com:5060", &["sip:v@192.0.2.4"]),
                ("sip:v@example.com:5070", &["sip:v@192.0.2.5"]),
                ("sip:w@127.0.0.1:5080", &["sip:w@192.0.2.6"]),
            ],
        );
        let (store, report) = open_home(dir.path(), now);
        assert_eq!(
            (report.rekeyed, report.aors, report.bindings, report.corrupt),
            (3, 3, 6, 0)
        );
        assert_eq!(
            store.aors(),
            [
                "sip:u@127.0.0.1",
                "sip:v@example.com",
                "sip:w@127.0.0.1:5080"
            ]
        );
        assert_eq!(store.count(), 6);
        assert_eq!(
            contacts_of(&store, "sip:u@127.0.0.1", now),
            ["sip:u@192.0.2.1", "sip:u@192.0.2.2", "sip:u@192.0.2.3"]
        );
        assert_eq!(
            contacts_of(&store, "sip:v@example.com", now),
            ["sip:v@192.0.2.4", "sip:v@192.0.2.5"]
        );
        drop(store);

        // On disk too, and a second open has nothing left to move.
        let (store, report) = open_home(dir.path(), now);
        assert_eq!((report.rekeyed, report.aors, report.bindings), (0, 3, 6));
        assert_eq!(contacts_of(&store, "sip:u@127.0.0.1", now).len(), 3);
        let keys: Vec<String> = store
            .tree
            .iter()
            .keys()
            .map(|k| String::from_utf8(k.unwrap().to_vec()).unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "sip:u@127.0.0.1",
                "sip:v@example.com",
                "sip:w@127.0.0.1:5080"
            ]
        );
    }

    #[test]
    fn a_key_whose_target_is_unreadable_stays_where_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        write_records(
            dir.path(),
            now,
            &[("sip:u@127.0.0.1:5060", &["sip:u@192.0.2.1"])],
        );
        {
            let (store, _) = open(dir.path(), now);
            store
                .tree
                .insert("sip:u@127.0.0.1", &b"garbage"[..])
                .unwrap();
            store.db.flush().unwrap();
        }
        let (store, report) = open_home(dir.path(), now);
        assert_eq!((report.rekeyed, report.corrupt), (0, 1));
        // Loaded under its old key (listed by `ctl ul show`), the unreadable record kept.
        assert_eq!(store.aors(), ["sip:u@127.0.0.1:5060"]);
        assert!(store.tree.get("sip:u@127.0.0.1").unwrap().is_some());
    }

    #[test]
    fn update_waits_for_a_flush_and_sweep_reaches_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        {
            let (store, _) = open(dir.path(), now);
            let a = "sip:a@example.com";
            let commit = store
                .update(a, now, &mut |_| {
                    Some(vec![binding(a, "sip:a@192.0.2.1", 10, now)])
                })
                .unwrap();
            if let Commit::Pending(ticket) = &commit {
                ticket.wait(Duration::from_secs(10)).unwrap();
                assert_eq!(ticket.state(), CommitState::Durable);
            }
            // A read-only update after a durable write has nothing to wait for.
            assert!(matches!(
                store.update(a, now, &mut |_| None).unwrap(),
                Commit::Done
            ));
            assert_eq!(store.sweep(now + Duration::from_secs(11)), 1);
            assert_eq!(store.count(), 0);
        }
        let (_store, report) = open(dir.path(), now);
        assert_eq!((report.bindings, report.expired), (0, 0));
    }
}
