//! The process-wide registry of open stream connections.
//!
//! Owns two lookups shared by every event loop:
//! - [`ConnectionId`] → handle, so a response goes back on the connection its request arrived
//!   on (RFC 3261 §18.2.2), whichever loop produces it;
//! - (transport, peer address) → [`ConnectionId`], so a request to a peer that already has an
//!   open connection reuses it instead of opening another (RFC 3261 §18.1.1 leaves this to the
//!   implementation; RFC 5923 describes the same reuse for servers);
//! - (transport, peer address, verified name) → [`ConnectionId`] for TLS connections this
//!   server opened: a request that needs the peer to be a given SIP domain (RFC 5922) reuses
//!   only a connection whose certificate was checked against that domain.
//!
//! It also enforces the connection limit. A handle carries a bounded outbound queue: when a
//! peer stops reading and its queue fills, the connection is aborted rather than buffering
//! without end. A connection is removed when its `Registration` is dropped, which happens
//! when its task ends for any reason (including cancellation at shutdown).
//!
//! The map sits behind a mutex; it is touched once per stream send and per connection
//! open/close, never per datagram, so contention between loops stays low.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use super::{ConnectionId, TransportKind};

/// Ids are unique per process, even across several servers in one process (tests).
static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// What a connection's task is asked to do, in order.
#[derive(Debug)]
pub(crate) enum Outbound {
    Data(Bytes),
    /// Close once everything queued before this has been written.
    Close,
}

/// Why a message could not be queued on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// The connection has closed.
    Closed,
    /// The peer is not reading fast enough: the connection is being aborted.
    Full,
}

/// Lets any thread ask a connection's task to stop at once.
#[derive(Debug, Default)]
pub(crate) struct AbortSignal {
    aborted: AtomicBool,
    wake: Notify,
}

impl AbortSignal {
    pub(crate) fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        // notify_one keeps a permit if the task is not waiting right now, so no wake-up is lost.
        self.wake.notify_one();
    }

    pub(crate) fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// Completes once [`AbortSignal::abort`] has been called.
    pub(crate) async fn aborted(&self) {
        while !self.is_aborted() {
            self.wake.notified().await;
        }
    }
}

/// A cheap, cloneable handle to one open connection.
#[derive(Clone, Debug)]
pub struct ConnectionHandle {
    id: ConnectionId,
    kind: TransportKind,
    peer: SocketAddr,
    /// TLS connections we open: the name the peer's certificate is verified against
    /// (lower case). `None` for accepted connections and plain TCP.
    name: Option<Arc<str>>,
    queue: mpsc::Sender<Outbound>,
    abort: Arc<AbortSignal>,
}

impl ConnectionHandle {
    pub fn id(&self) -> ConnectionId {
        self.id
    }

    pub fn kind(&self) -> TransportKind {
        self.kind
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The name the peer's certificate is (being) verified against, for TLS connections this
    /// server opened.
    pub fn verified_name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Queues `data` for sending. A full queue means the peer is not reading: the connection
    /// is aborted so that it cannot pin memory.
    pub fn send(&self, data: Bytes) -> Result<(), QueueError> {
        self.enqueue(Outbound::Data(data))
    }

    /// Closes the connection after what is already queued; aborts it if the queue is full.
    pub fn close(&self) {
        // Either outcome is final: Closed needs nothing, Full has already aborted.
        let _ = self.enqueue(Outbound::Close);
    }

    /// Closes the connection at once, discarding anything queued.
    pub fn abort(&self) {
        self.abort.abort();
    }

    pub(crate) fn abort_signal(&self) -> &AbortSignal {
        &self.abort
    }

    fn enqueue(&self, item: Outbound) -> Result<(), QueueError> {
        if self.abort.is_aborted() {
            return Err(QueueError::Closed);
        }
        match self.queue.try_send(item) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(QueueError::Closed),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.abort.abort();
                Err(QueueError::Full)
            }
        }
    }
}

/// Why a connection could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitReached {
    pub limit: usize,
}

#[derive(Default)]
struct Tables {
    by_id: HashMap<ConnectionId, ConnectionHandle>,
    by_peer: HashMap<(TransportKind, SocketAddr), ConnectionId>,
    by_name: HashMap<(TransportKind, SocketAddr, Arc<str>), ConnectionId>,
}

/// The table of open stream connections shared by all event loops. See the module docs.
pub struct ConnectionRegistry {
    max_connections: usize,
    tables: Mutex<Tables>,
}

impl ConnectionRegistry {
    pub fn new(max_connections: usize) -> Self {
        ConnectionRegistry {
            max_connections,
            tables: Mutex::new(Tables::default()),
        }
    }

    /// Open connections, inbound and outbound.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Open connections of one transport (walks the table: for statistics, not the hot path).
    pub fn count_of(&self, kind: TransportKind) -> usize {
        self.lock()
            .by_id
            .values()
            .filter(|handle| handle.kind == kind)
            .count()
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// The open connection with this id.
    pub fn get(&self, id: ConnectionId) -> Option<ConnectionHandle> {
        self.lock().by_id.get(&id).cloned()
    }

    /// The most recently registered open connection to `peer` over `kind`.
    pub fn find_peer(&self, kind: TransportKind, peer: SocketAddr) -> Option<ConnectionHandle> {
        let tables = self.lock();
        let id = tables.by_peer.get(&(kind, peer))?;
        tables.by_id.get(id).cloned()
    }

    /// The most recently registered open connection to `peer` over `kind` that was opened
    /// for `name` (as given to [`ConnectionRegistry::register_named`], lower case).
    pub fn find_named(
        &self,
        kind: TransportKind,
        peer: SocketAddr,
        name: &Arc<str>,
    ) -> Option<ConnectionHandle> {
        let tables = self.lock();
        let id = tables.by_name.get(&(kind, peer, Arc::clone(name)))?;
        tables.by_id.get(id).cloned()
    }

    /// Registers a new connection with an outbound queue of `queue_len` messages, unless the
    /// connection limit is reached. Dropping the [`Registration`] unregisters it.
    pub(crate) fn register(
        self: &Arc<Self>,
        kind: TransportKind,
        peer: SocketAddr,
        queue_len: usize,
    ) -> Result<Registration, LimitReached> {
        self.register_named(kind, peer, queue_len, None)
    }

    /// [`ConnectionRegistry::register`] for a connection opened to a peer that must prove
    /// `name` (TLS, RFC 5922); found again with [`ConnectionRegistry::find_named`].
    pub(crate) fn register_named(
        self: &Arc<Self>,
        kind: TransportKind,
        peer: SocketAddr,
        queue_len: usize,
        name: Option<Arc<str>>,
    ) -> Result<Registration, LimitReached> {
        let mut tables = self.lock();
        if tables.by_id.len() >= self.max_connections {
            return Err(LimitReached {
                limit: self.max_connections,
            });
        }
        let id = ConnectionId(NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed));
        let (sender, queue) = mpsc::channel(queue_len.max(1));
        let handle = ConnectionHandle {
            id,
            kind,
            peer,
            name: name.clone(),
            queue: sender,
            abort: Arc::default(),
        };
        tables.by_id.insert(id, handle.clone());
        tables.by_peer.insert((kind, peer), id);
        if let Some(name) = name {
            tables.by_name.insert((kind, peer, name), id);
        }
        Ok(Registration {
            registry: Arc::clone(self),
            handle,
            queue,
        })
    }

    fn unregister(&self, handle: &ConnectionHandle) {
        let mut tables = self.lock();
        tables.by_id.remove(&handle.id);
        let key = (handle.kind, handle.peer);
        if tables.by_peer.get(&key) == Some(&handle.id) {
            tables.by_peer.remove(&key);
        }
        if let Some(name) = &handle.name {
            let key = (handle.kind, handle.peer, Arc::clone(name));
            if tables.by_name.get(&key) == Some(&handle.id) {
                tables.by_name.remove(&key);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A panic elsewhere cannot leave the maps half-updated (each update is one insert or
        // remove), so a poisoned lock is still safe to use.
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A connection's membership in the registry, owned by the connection's task. Holds the
/// receiving end of the outbound queue; dropping it unregisters the connection.
pub(crate) struct Registration {
    registry: Arc<ConnectionRegistry>,
    handle: ConnectionHandle,
    queue: mpsc::Receiver<Outbound>,
}

impl Registration {
    pub(crate) fn handle(&self) -> &ConnectionHandle {
        &self.handle
    }

    pub(crate) fn id(&self) -> ConnectionId {
        self.handle.id
    }

    pub(crate) fn queue(&mut self) -> &mut mpsc::Receiver<Outbound> {
        &mut self.queue
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.unregister(&self.handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn registers_looks_up_and_unregisters_on_drop() {
        let registry = Arc::new(ConnectionRegistry::new(4));
        let registration = registry.register(TransportKind::Tcp, peer(1), 2).unwrap();
        let id = registration.id();
        assert_eq!(registry.get(id).map(|h| h.peer()), Some(peer(1)));
        assert_eq!(
            registry
                .find_peer(TransportKind::Tcp, peer(1))
                .map(|h| h.id()),
            Some(id)
        );
        assert!(registry.find_peer(TransportKind::Tls, peer(1)).is_none());
        drop(registration);
        assert!(registry.get(id).is_none());
        assert!(registry.find_peer(TransportKind::Tcp, peer(1)).is_none());
        assert!(registry.is_empty());
    }

    #[test]
    fn named_connections_are_found_by_name_and_address() {
        let registry = Arc::new(ConnectionRegistry::new(4));
        let a: Arc<str> = Arc::from("a.example");
        let b: Arc<str> = Arc::from("b.example");
        let inbound = registry.register(TransportKind::Tls, peer(1), 1).unwrap();
        let named = registry
            .register_named(TransportKind::Tls, peer(1), 1, Some(Arc::clone(&a)))
            .unwrap();
        assert_eq!(named.handle().verified_name(), Some("a.example"));
        let found = registry.find_named(TransportKind::Tls, peer(1), &a);
        assert_eq!(found.map(|h| h.id()), Some(named.id()));
        assert!(registry
            .find_named(TransportKind::Tls, peer(1), &b)
            .is_none());
        assert!(registry
            .find_named(TransportKind::Tls, peer(2), &a)
            .is_none());
        // By address alone, the newest connection of either kind.
        let newest = registry.find_peer(TransportKind::Tls, peer(1));
        assert_eq!(newest.map(|h| h.id()), Some(named.id()));
        drop(named);
        assert!(registry
            .find_named(TransportKind::Tls, peer(1), &a)
            .is_none());
        drop(inbound);
        assert!(registry.is_empty());
    }

    #[test]
    fn refuses_beyond_the_limit() {
        let registry = Arc::new(ConnectionRegistry::new(2));
        let _a = registry.register(TransportKind::Tcp, peer(1), 1).unwrap();
        let b = registry.register(TransportKind::Tcp, peer(2), 1).unwrap();
        assert_eq!(
            registry.register(TransportKind::Tcp, peer(3), 1).err(),
            Some(LimitReached { limit: 2 })
        );
        drop(b);
        assert!(registry.register(TransportKind::Tcp, peer(3), 1).is_ok());
    }

    #[test]
    fn ids_are_unique() {
        let registry = Arc::new(ConnectionRegistry::new(8));
        let a = registry.register(TransportKind::Tcp, peer(1), 1).unwrap();
        let b = registry.register(TransportKind::Tcp, peer(1), 1).unwrap();
        assert_ne!(a.id(), b.id());
        // The newest connection to a peer is the one reused; dropping the older one keeps it.
        drop(a);
        assert_eq!(
            registry
                .find_peer(TransportKind::Tcp, peer(1))
                .map(|h| h.id()),
            Some(b.id())
        );
    }

    #[test]
    fn a_full_queue_aborts_the_connection() {
        let registry = Arc::new(ConnectionRegistry::new(1));
        let mut registration = registry.register(TransportKind::Tcp, peer(1), 1).unwrap();
        let handle = registration.handle().clone();
        assert_eq!(handle.send(Bytes::from_static(b"a")), Ok(()));
        assert_eq!(handle.send(Bytes::from_static(b"b")), Err(QueueError::Full));
        assert!(handle.abort_signal().is_aborted());
        assert_eq!(
            handle.send(Bytes::from_static(b"c")),
            Err(QueueError::Closed)
        );
        assert!(matches!(
            registration.queue().try_recv(),
            Ok(Outbound::Data(_))
        ));
    }

    #[test]
    fn sending_to_a_closed_connection_fails() {
        let registry = Arc::new(ConnectionRegistry::new(1));
        let registration = registry.register(TransportKind::Tcp, peer(1), 1).unwrap();
        let handle = registration.handle().clone();
        drop(registration);
        assert_eq!(handle.send(Bytes::new()), Err(QueueError::Closed));
    }
}
