//! What `moonroute ctl dlg` reads: a summary of every tracked call of every event loop.
//!
//! A loop's table is confined to its thread; the control socket runs elsewhere. So each table
//! writes what `ctl dlg` shows of its calls here when one is created, answered, ends and is
//! removed: four short locked map updates per call (the dialog's strings shared, not copied),
//! in shards picked by hash so loops rarely meet, and nothing per in-dialog message.
//!
//! It also carries `ctl dlg end` to the loop owning the call: each loop's inbox of end
//! requests, and the loop's wake signal (the shell then gives its Worker an `Input::Wake`).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;

use super::table::{Dialog, DialogId, State};
use crate::transport::TransportKind;
use crate::wake::WakeSignal;

const SHARDS: usize = 16;

/// A call as `ctl dlg` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub loop_index: usize,
    /// Its handle in its loop's table (what `ctl dlg end` names).
    pub id: DialogId,
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

/// What the directory keeps of a call between its updates: the dialog's fields as they are
/// (its `Bytes` shared, not copied), turned into a [`Summary`] only when `ctl dlg` asks.
/// A call is published three times (created, answered, ended): building the summary's eight
/// strings each time cost more than the rest of the dialog tracking per call.
#[derive(Clone, Debug)]
struct Entry {
    id: DialogId,
    call_id: Bytes,
    from_uri: Bytes,
    from_tag: Bytes,
    to_uri: Bytes,
    to_tag: Option<Bytes>,
    state: State,
    caller_transport: TransportKind,
    caller_source: SocketAddr,
    callee_contact: Option<Bytes>,
    created: SystemTime,
    answered: Option<SystemTime>,
    ended: Option<SystemTime>,
    /// Profiles as `name=value` (none, and no allocation, for most calls).
    profiles: Vec<String>,
}

impl Entry {
    fn of(dialog: &Dialog) -> Entry {
        Entry {
            id: dialog.id,
            call_id: dialog.call_id.clone(),
            from_uri: dialog.from_uri.clone(),
            from_tag: dialog.from_tag.clone(),
            to_uri: dialog.to_uri.clone(),
            to_tag: dialog.to_tag.clone(),
            state: dialog.state,
            caller_transport: dialog.caller_transport,
            caller_source: dialog.caller_source,
            callee_contact: dialog.callee.contact.clone(),
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

    fn summary(&self, loop_index: usize) -> Summary {
        Summary {
            loop_index,
            id: self.id,
            call_id: text(&self.call_id),
            from_uri: text(&self.from_uri),
            from_tag: text(&self.from_tag),
            to_uri: text(&self.to_uri),
            to_tag: self.to_tag.as_deref().map(text),
            state: self.state,
            src: super::cdr::source_text(self.caller_transport, self.caller_source),
            callee_contact: self.callee_contact.as_deref().map(text),
            created: self.created,
            answered: self.answered,
            ended: self.ended,
            profiles: self.profiles.clone(),
        }
    }
}

type Key = (usize, DialogId);

/// The summaries of every loop's calls, and their inboxes (see the module doc).
pub struct Directory {
    shards: Vec<Mutex<HashMap<Key, Entry>>>,
    hasher: RandomState,
    /// By loop index: the loop's end requests and wake signal, once it started.
    inboxes: Mutex<Vec<Option<Inbox>>>,
}

struct Inbox {
    requests: Vec<EndRequest>,
    wake: Arc<WakeSignal>,
}

/// A `ctl dlg end` for a loop: the call, and where the loop says what it did (the BYEs sent,
/// or why not).
pub struct EndRequest {
    pub id: DialogId,
    pub reply: mpsc::Sender<EndAnswer>,
}

/// What a loop did with an [`EndRequest`].
pub type EndAnswer = Result<Ended, EndError>;

/// A call the proxy ended with its own BYEs (RFC 3261 §15.1.1, sent from the middle).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    /// The parties a BYE went to (`caller`, `callee`), in the order they were sent.
    pub parties: Vec<&'static str>,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ended: BYE sent to {}", self.parties.join(" and "))
    }
}

/// Why a call was not ended by `ctl dlg end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndError {
    /// The event loop owning the call takes no commands (not started, or stopped).
    LoopTakesNoCommands,
    /// The loop has [`MAX_END_REQUESTS`] requests waiting already.
    TooManyWaiting,
    /// The call ended meanwhile.
    NoSuchCall,
    /// The call is early: only its caller can end it, with a CANCEL (RFC 3261 §9.1).
    NotAnswered,
}

impl std::fmt::Display for EndError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EndError::LoopTakesNoCommands => "its event loop takes no commands",
            EndError::TooManyWaiting => "its event loop has too many end requests waiting",
            EndError::NoSuchCall => "no such call (it ended)",
            EndError::NotAnswered => "the call is not answered yet (only the caller can cancel it)",
        })
    }
}

impl std::error::Error for EndError {}

/// End requests one loop may have waiting (the control socket is local and serial; this only
/// bounds a runaway client).
const MAX_END_REQUESTS: usize = 1024;

impl Default for Directory {
    fn default() -> Self {
        Directory {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            inboxes: Mutex::default(),
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
        let entry = Entry::of(dialog);
        self.shard(&key).insert(key, entry);
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
            .flat_map(|shard| {
                lock(shard)
                    .iter()
                    .map(|(&(loop_index, _), entry)| entry.summary(loop_index))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by(|a, b| (a.created, &a.call_id).cmp(&(b.created, &b.call_id)));
        all
    }

    /// Loop `loop_index` takes end requests, and is woken by `wake` when one arrives.
    pub fn attach_loop(&self, loop_index: usize, wake: Arc<WakeSignal>) {
        let mut inboxes = lock(&self.inboxes);
        if inboxes.len() <= loop_index {
            inboxes.resize_with(loop_index + 1, || None);
        }
        inboxes[loop_index] = Some(Inbox {
            requests: Vec::new(),
            wake,
        });
    }

    /// Asks the loop owning `call` to end it; the answer comes on the returned channel.
    pub fn request_end(&self, call: &Summary) -> Result<mpsc::Receiver<EndAnswer>, EndError> {
        let mut inboxes = lock(&self.inboxes);
        let inbox = inboxes
            .get_mut(call.loop_index)
            .and_then(Option::as_mut)
            .ok_or(EndError::LoopTakesNoCommands)?;
        if inbox.requests.len() >= MAX_END_REQUESTS {
            return Err(EndError::TooManyWaiting);
        }
        let (reply, answer) = mpsc::channel();
        inbox.requests.push(EndRequest { id: call.id, reply });
        inbox.wake.wake();
        Ok(answer)
    }

    /// The end requests waiting for loop `loop_index` (none and no allocation, usually).
    pub fn take_end_requests(&self, loop_index: usize) -> Vec<EndRequest> {
        lock(&self.inboxes)
            .get_mut(loop_index)
            .and_then(Option::as_mut)
            .map(|inbox| std::mem::take(&mut inbox.requests))
            .unwrap_or_default()
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, HashMap<Key, Entry>> {
        lock(&self.shards[self.hasher.hash_one(key) as usize & (SHARDS - 1)])
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
