//! What `moonroute ctl dlg` reads: a summary of every tracked call of every event loop.
//!
//! A loop's table is confined to its thread; the control socket runs elsewhere. So each table
//! writes a short summary of its calls here when one is created, answered, ends and is
//! removed: four short locked map updates per call, in shards picked by hash so loops rarely
//! meet, and nothing per in-dialog message.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use super::table::{Dialog, DialogId, State};

const SHARDS: usize = 16;

/// A call as `ctl dlg` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub loop_index: usize,
    pub call_id: String,
    pub from_uri: String,
    pub from_tag: String,
    pub to_uri: String,
    pub to_tag: Option<String>,
    pub state: State,
    /// `udp:192.0.2.4:5060`: where the INVITE came from.
    pub src: String,
    pub callee_contact: Option<String>,
    pub created: SystemTime,
    pub answered: Option<SystemTime>,
    pub ended: Option<SystemTime>,
    /// Profiles as `name=value`.
    pub profiles: Vec<String>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Summary {
    fn of(loop_index: usize, dialog: &Dialog) -> Summary {
        Summary {
            loop_index,
            call_id: text(&dialog.call_id),
            from_uri: text(&dialog.from_uri),
            from_tag: text(&dialog.from_tag),
            to_uri: text(&dialog.to_uri),
            to_tag: dialog.to_tag.as_deref().map(text),
            state: dialog.state,
            src: format!(
                "{}:{}",
                dialog.caller_transport.via_name().to_ascii_lowercase(),
                dialog.caller_source
            ),
            callee_contact: dialog.callee.contact.as_deref().map(text),
            created: dialog.created.wall,
            answered: dialog.answered.map(|a| a.wall),
            ended: dialog.ended.map(|e| e.wall),
            profiles: dialog
                .profiles
                .iter()
                .map(|m| format!("{}={}", m.name(), m.value()))
                .collect(),
        }
    }
}

type Key = (usize, DialogId);

/// The summaries of every loop's calls (see the module doc).
pub struct Directory {
    shards: Vec<Mutex<HashMap<Key, Summary>>>,
    hasher: RandomState,
}

impl Default for Directory {
    fn default() -> Self {
        Directory {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl Directory {
    pub fn new() -> Arc<Directory> {
        Arc::new(Directory::default())
    }

    /// Records (or updates) `dialog` of loop `loop_index`.
    pub fn publish(&self, loop_index: usize, dialog: &Dialog) {
        let key = (loop_index, dialog.id);
        self.shard(&key)
            .insert(key, Summary::of(loop_index, dialog));
    }

    pub fn remove(&self, loop_index: usize, id: DialogId) {
        let key = (loop_index, id);
        let mut shard = self.shard(&key);
        shard.remove(&key);
        crate::memory::shrink_if_sparse(&mut shard);
    }

    /// Every call, oldest first.
    pub fn list(&self) -> Vec<Summary> {
        let mut all: Vec<Summary> = self
            .shards
            .iter()
            .flat_map(|shard| lock(shard).values().cloned().collect::<Vec<_>>())
            .collect();
        all.sort_by(|a, b| (a.created, &a.call_id).cmp(&(b.created, &b.call_id)));
        all
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, HashMap<Key, Summary>> {
        lock(&self.shards[self.hasher.hash_one(key) as usize & (SHARDS - 1)])
    }
}

fn lock(shard: &Mutex<HashMap<Key, Summary>>) -> MutexGuard<'_, HashMap<Key, Summary>> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
