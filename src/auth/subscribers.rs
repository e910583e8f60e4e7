//! The subscriber table: who may authenticate, with what (Kamailio's `subscriber` table).
//!
//! A sled database of its own at `<data_dir>/subscribers` (separate from the location store).
//! Key `user@domain` (domain lowercased, user as given: user parts are case-sensitive, RFC
//! 3261 §19.1.4); value a small checked text record: the realm and the HA1 for each algorithm,
//! `H(user ":" realm ":" password)` (RFC 2617 §3.2.2.2, RFC 8760 §2.3). The password itself is
//! never stored, nor sent to the server (the `ctl` client computes the HA1s).
//!
//! A second tree indexes `user@realm` → `user@domain`, since credentials name a user and a
//! realm (RFC 2617 §3.2.2) and the realm may differ from the domain. Reads come from sled's
//! cache; writes are flushed before `add`/`remove` return.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use moonroute_proto::auth::subscriber::{split_user, Subscriber, SubscriberTable};

const RECORD_MAGIC: &str = "moonroute-subscriber 1";

fn encode(subscriber: &Subscriber) -> String {
    format!(
        "{RECORD_MAGIC}\n{}\n{}\n{}\n",
        subscriber.realm, subscriber.ha1_md5, subscriber.ha1_sha256
    )
}

fn decode(bytes: &[u8]) -> Option<Subscriber> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.split('\n');
    if lines.next()? != RECORD_MAGIC {
        return None;
    }
    let subscriber = Subscriber {
        realm: lines.next()?.to_owned(),
        ha1_md5: lines.next()?.to_owned(),
        ha1_sha256: lines.next()?.to_owned(),
    };
    subscriber.validate().ok()?;
    Some(subscriber)
}

/// The table.
pub struct Subscribers {
    db: sled::Db,
    by_realm: sled::Tree,
}

impl Subscribers {
    /// Opens (creating) the table at `path` (`<data_dir>/subscribers`): a directory and files
    /// only its owner can read, whatever the umask (HA1s are password equivalents;
    /// `crate::file_modes`).
    pub fn open(path: &Path) -> Result<Subscribers, String> {
        crate::file_modes::prepare_store(path)
            .map_err(|e| format!("subscriber table {}: {e}", path.display()))?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(4 * 1024 * 1024)
            // Every write is flushed before it returns: no background flusher, which would
            // also hold the file lock for a while after the table is dropped.
            .flush_every_ms(None)
            .open()
            .map_err(|e| format!("subscriber table {}: {e}", path.display()))?;
        let by_realm = db
            .open_tree("by_realm")
            .map_err(|e| format!("subscriber table {}: {e}", path.display()))?;
        crate::file_modes::seal_store(path);
        Ok(Subscribers { db, by_realm })
    }

    /// A table of its own in a temporary sled database, deleted when dropped: what an offline
    /// run (`moonroute test --subscribers`) loads its fixture into. The same table as the
    /// server's, not a second backend: lookups and the one-user-per-realm rule are the same.
    pub fn temporary() -> Result<Subscribers, String> {
        let db = sled::Config::new()
            .temporary(true)
            .cache_capacity(1024 * 1024)
            .flush_every_ms(None)
            .open()
            .map_err(|e| format!("temporary subscriber table: {e}"))?;
        let by_realm = db
            .open_tree("by_realm")
            .map_err(|e| format!("temporary subscriber table: {e}"))?;
        Ok(Subscribers { db, by_realm })
    }

    /// A temporary table (see [`Subscribers::temporary`]) holding a test fixture: one
    /// `USER@DOMAIN PASSWORD [REALM]` per line (the realm defaults to the domain), blank lines
    /// and `#` comments ignored. Plaintext passwords: for test fixtures only, never a server.
    pub fn from_fixture(text: &str) -> Result<Subscribers, String> {
        let table = Subscribers::temporary()?;
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = strip_comment(line);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (user_at_domain, password, realm) = match fields[..] {
                [] => continue,
                [user, password] => (user, password, None),
                [user, password, realm] => (user, password, Some(realm)),
                _ => {
                    return Err(format!(
                        "line {number}: expected USER@DOMAIN PASSWORD [REALM]"
                    ))
                }
            };
            let (user, domain) =
                split_user(user_at_domain).map_err(|e| format!("line {number}: {e}"))?;
            let realm = realm.unwrap_or(&domain);
            let subscriber = Subscriber::with_password(&user, realm, password);
            if table
                .add(user_at_domain, &subscriber)
                .map_err(|e| format!("line {number}: {e}"))?
            {
                return Err(format!("line {number}: {user}@{domain} is listed twice"));
            }
        }
        Ok(table)
    }

    /// The table at `path`, shared with any other user of the same path in this process
    /// (sled locks its files: two servers of one process on one data directory, as tests
    /// run them, share the table instead of failing). Closed when the last user drops it.
    pub fn open_shared(path: &Path) -> Result<Arc<Subscribers>, String> {
        static OPEN: Mutex<Vec<(PathBuf, Weak<Subscribers>)>> = Mutex::new(Vec::new());
        crate::file_modes::prepare_store(path)
            .map_err(|e| format!("subscriber table {}: {e}", path.display()))?;
        let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, table)| table.strong_count() > 0);
        if let Some(table) = open
            .iter()
            .find(|(p, _)| *p == key)
            .and_then(|(_, t)| t.upgrade())
        {
            return Ok(table);
        }
        let table = Arc::new(Self::open_when_released(path)?);
        open.push((key, Arc::downgrade(&table)));
        Ok(table)
    }

    /// Opens the table, waiting up to a second for a previous user of this process whose last
    /// reference was just dropped: its `Db` may still be closing and holding sled's file lock.
    /// Another process holding the lock is reported once that second is over.
    fn open_when_released(path: &Path) -> Result<Subscribers, String> {
        const TRIES: u32 = 50;
        let mut tries = 0;
        loop {
            match Subscribers::open(path) {
                Err(e) if e.contains("lock") && tries < TRIES => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// Adds or replaces `user@domain`; returns whether it replaced one.
    pub fn add(&self, user_at_domain: &str, subscriber: &Subscriber) -> Result<bool, String> {
        let (user, domain) = split_user(user_at_domain)?;
        subscriber.validate()?;
        let key = format!("{user}@{domain}");
        // A digest response names only user and realm (RFC 2617 §3.2.2), so they must name one
        // subscriber: another domain's user of the same name cannot share the realm.
        let index = format!("{user}@{}", subscriber.realm);
        if let Some(holder) = self.by_realm.get(index.as_bytes()).map_err(db_error)? {
            if holder.as_ref() != key.as_bytes() {
                return Err(format!(
                    "{user} in realm {} is already {}: use another realm (--realm)",
                    subscriber.realm,
                    String::from_utf8_lossy(&holder)
                ));
            }
        }
        let old = self.remove_index(&key)?;
        self.db
            .insert(key.as_bytes(), encode(subscriber).as_bytes())
            .map_err(db_error)?;
        self.by_realm
            .insert(
                format!("{user}@{}", subscriber.realm).as_bytes(),
                key.as_bytes(),
            )
            .map_err(db_error)?;
        self.db.flush().map_err(db_error)?;
        Ok(old)
    }

    /// Removes `user@domain`; returns whether it existed.
    pub fn remove(&self, user_at_domain: &str) -> Result<bool, String> {
        let (user, domain) = split_user(user_at_domain)?;
        let key = format!("{user}@{domain}");
        let existed = self.remove_index(&key)?;
        self.db.remove(key.as_bytes()).map_err(db_error)?;
        self.db.flush().map_err(db_error)?;
        Ok(existed)
    }

    /// How many subscribers there are.
    pub fn count(&self) -> usize {
        self.db.len()
    }

    /// Every subscriber as `(user@domain, realm)`, sorted by key.
    pub fn list(&self) -> Vec<(String, String)> {
        self.db
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, value)| {
                let key = String::from_utf8(key.to_vec()).ok()?;
                Some((key, decode(&value)?.realm))
            })
            .collect()
    }

    /// The credentials of `username` in `realm` (what a digest response names).
    pub fn find(&self, username: &str, realm: &str) -> Option<Subscriber> {
        self.find_with_domain(username, realm)
            .map(|(_, subscriber)| subscriber)
    }

    /// Removes the realm index entry of `key`; returns whether `key` had a record.
    fn remove_index(&self, key: &str) -> Result<bool, String> {
        let Some(old) = self.db.get(key.as_bytes()).map_err(db_error)? else {
            return Ok(false);
        };
        if let (Some(old), Some((user, _))) = (decode(&old), key.rsplit_once('@')) {
            self.by_realm
                .remove(format!("{user}@{}", old.realm).as_bytes())
                .map_err(db_error)?;
        }
        Ok(true)
    }
}

/// `line` without a `#` comment (at the start or after white space, as in the location
/// fixture: a `#` inside a password is kept).
fn strip_comment(line: &str) -> &str {
    let mut previous_blank = true;
    for (at, c) in line.char_indices() {
        if c == '#' && previous_blank {
            return &line[..at];
        }
        previous_blank = c.is_whitespace();
    }
    line
}

fn db_error(e: sled::Error) -> String {
    format!("subscriber table: {e}")
}

impl SubscriberTable for Subscribers {
    /// The credentials of `username` in `realm` and the subscriber's domain (lowercase): the
    /// host its AOR must have, which is not the realm when it was added with `--realm`.
    fn find_with_domain(&self, username: &str, realm: &str) -> Option<(String, Subscriber)> {
        let key = self
            .by_realm
            .get(format!("{username}@{realm}").as_bytes())
            .ok()??;
        let subscriber = decode(&self.db.get(&key).ok()??)?;
        let (_, domain) = std::str::from_utf8(&key).ok()?.rsplit_once('@')?;
        (subscriber.realm == realm).then(|| (domain.to_owned(), subscriber))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_user_name_per_realm() {
        let dir = tempfile::TempDir::new().unwrap();
        let table = Subscribers::open(&dir.path().join("subscribers")).unwrap();
        let in_voip = Subscriber::with_password("bob", "voip", "pw");
        table.add("bob@a.example", &in_voip).unwrap();
        let refused = table.add("bob@b.example", &in_voip).unwrap_err();
        assert!(refused.contains("already bob@a.example"), "{refused}");
        // Replacing the holder itself is fine, and so is another realm.
        assert!(table.add("bob@a.example", &in_voip).unwrap());
        let own_realm = Subscriber::with_password("bob", "b.example", "pw");
        table.add("bob@b.example", &own_realm).unwrap();
        assert_eq!(
            table.find_with_domain("bob", "voip").unwrap().0,
            "a.example"
        );
    }

    #[test]
    fn add_find_list_remove() {
        let dir = tempfile::TempDir::new().unwrap();
        let table = Subscribers::open(&dir.path().join("subscribers")).unwrap();
        let alice = Subscriber::with_password("alice", "example.com", "secret");
        assert!(!table.add("alice@Example.COM", &alice).unwrap());
        assert_eq!(table.find("alice", "example.com"), Some(alice.clone()));
        assert_eq!(
            table.find("Alice", "example.com"),
            None,
            "users are case-sensitive"
        );
        // Another realm than the domain.
        let bob = Subscriber::with_password("bob", "voip", "pw");
        table.add("sip:bob@example.com", &bob).unwrap();
        assert_eq!(table.find("bob", "voip"), Some(bob.clone()));
        assert_eq!(
            table.find_with_domain("bob", "voip"),
            Some(("example.com".to_owned(), bob))
        );
        assert_eq!(table.find("bob", "example.com"), None);
        // Replacing moves the realm index.
        let bob2 = Subscriber::with_password("bob", "example.com", "pw2");
        assert!(table.add("bob@example.com", &bob2).unwrap());
        assert_eq!(table.find("bob", "voip"), None);
        assert_eq!(table.find("bob", "example.com"), Some(bob2));
        assert_eq!(
            table.list(),
            vec![
                ("alice@example.com".to_owned(), "example.com".to_owned()),
                ("bob@example.com".to_owned(), "example.com".to_owned())
            ]
        );
        assert!(table.remove("alice@example.com").unwrap());
        assert!(!table.remove("alice@example.com").unwrap());
        assert_eq!(table.find("alice", "example.com"), None);
        drop(table);
        // Durable.
        let table = Subscribers::open(&dir.path().join("subscribers")).unwrap();
        assert_eq!(table.list().len(), 1);
    }

    #[test]
    fn fixtures_load_into_a_temporary_table() {
        let table = Subscribers::from_fixture(
            "# user@domain  password  [realm]\n\
             alice@Example.com  s3cret\n\
             \n\
             bob@example.com    pa#ss   voip   # a comment\n",
        )
        .unwrap();
        assert_eq!(
            table.find("alice", "example.com"),
            Some(Subscriber::with_password("alice", "example.com", "s3cret"))
        );
        assert_eq!(
            table.find_with_domain("bob", "voip"),
            Some((
                "example.com".to_owned(),
                Subscriber::with_password("bob", "voip", "pa#ss")
            ))
        );
        let error = |text: &str| Subscribers::from_fixture(text).err().unwrap();
        assert!(error("alice@x").starts_with("line 1: expected"));
        assert!(error("\nalice@x a b c").starts_with("line 2: expected"));
        assert!(error("alice pw").contains("not USER@DOMAIN"));
        assert!(error("a@x p\na@x q").contains("listed twice"));
        assert!(error("a@x p r\na@y q r").contains("already a@x"));
    }

    #[test]
    fn bad_names_and_records_are_refused() {
        for bad in ["alice", "@x", "alice@", "a b@x", "alice@x:5060", "a@b@"] {
            assert!(split_user(bad).is_err(), "{bad}");
        }
        assert_eq!(
            split_user("sip:Al@X.org").unwrap(),
            ("Al".to_owned(), "x.org".to_owned())
        );
        let mut s = Subscriber::with_password("a", "r", "p");
        s.ha1_md5 = "zz".into();
        assert!(s.validate().is_err());
        assert_eq!(decode(b"garbage"), None);
        let good = Subscriber::with_password("a", "r", "p");
        assert_eq!(decode(encode(&good).as_bytes()), Some(good));
        // The password never appears in the record.
        assert!(!encode(&Subscriber::with_password("a", "r", "hunter2")).contains("hunter2"));
    }
}
