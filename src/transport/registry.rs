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
//! It also enforces the connection limits ([`ConnectionLimits`]), so that no peer can take
//! every slot:
//! - `max_connections` bounds all connections; accepted ones are also bounded by
//!   `max_inbound_connections`, so the rest of the table stays free for the connections this
//!   server opens (to registered contacts, next hops), however many clients connect;
//! - per source address (IPv4 address, or IPv6 /64 prefix: one end site), accepted
//!   connections are bounded by `max_connections_per_ip`, and those not yet proven, whose TLS
//!   handshake or first SIP message is still in progress ([`Registration::proven`]), by
//!   `max_pending_connections_per_ip`. Until its first message a connection has shown nothing
//!   the script could judge (pike never sees it), so an address may hold only a few such
//!   connections; the stream deadlines (`message_clock`) bound how long each is held.
//!
//! The per-source counts exist only for addresses with an accepted connection open, so their
//! memory is bounded by the connection limit.
//!
//! A handle carries a bounded outbound queue: when a peer stops reading and its queue fills,
//! the connection is aborted rather than buffering without end. A connection is removed when
//! its `Registration` is dropped, which happens when its task ends for any reason (including
//! cancellation at shutdown).
//!
//! The map sits behind a mutex; it is touched once per stream send and per connection
//! open/close (and once more when an accepted connection delivers its first message), never
//! per datagram, so contention between loops stays low.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use super::{ConnectionId, TransportKind};

/// The open WebSocket connections of one server as the location service sees them: a binding
/// registered over WebSocket is reachable only through its connection (RFC 7118 §5; RFC 5626
/// §5.3 flows), so a lookup skips it once that has closed. Made before the server (the script
/// host holds it), attached to the server's registry when it starts.
#[derive(Debug, Default)]
pub struct Flows(std::sync::OnceLock<std::sync::Weak<ConnectionRegistry>>);

impl Flows {
    /// Binds these flows to `registry` (the first server started with them).
    pub(crate) fn attach(&self, registry: &Arc<ConnectionRegistry>) {
        // A second server keeps the first one's: one script host serves one server.
        let _ = self.0.set(Arc::downgrade(registry));
    }

    /// Whether the WebSocket connection from `peer` is still open; `true` when no running
    /// server is attached (an offline test run: nothing to judge by).
    pub fn websocket_open(&self, peer: SocketAddr) -> bool {
        match self.0.get().and_then(std::sync::Weak::upgrade) {
            Some(registry) => registry.has_websocket(peer),
            None => true,
        }
    }

    /// Whether the connection over `kind` from `peer` (an outbound flow a binding was
    /// registered over, RFC 5626 §5.3) is still open; `true` when no running server is
    /// attached.
    pub fn open(&self, kind: TransportKind, peer: SocketAddr) -> bool {
        if kind.is_websocket() {
            return self.websocket_open(peer);
        }
        match self.0.get().and_then(std::sync::Weak::upgrade) {
            Some(registry) => registry.has_peer(kind, peer),
            None => true,
        }
    }
}

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

/// The bounds on open connections (from `[limits]`; see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// All connections, inbound and outbound.
    pub max_connections: usize,
    /// Accepted connections.
    pub max_inbound: usize,
    /// Accepted connections from one [`Source`].
    pub max_per_source: usize,
    /// Accepted connections from one [`Source`] that are not [proven](Registration::proven).
    pub max_pending_per_source: usize,
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections,
    InboundConnections,
    ConnectionsPerIp,
    PendingConnectionsPerIp,
}

impl Limit {
    /// The `[limits]` key, as metric label and in log lines.
    pub fn key(self) -> &'static str {
        match self {
            Limit::Connections => "max_connections",
            Limit::InboundConnections => "max_inbound_connections",
            Limit::ConnectionsPerIp => "max_connections_per_ip",
            Limit::PendingConnectionsPerIp => "max_pending_connections_per_ip",
        }
    }
}

/// Why a connection could not be registered: `limit`, whose value is `value`, is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitReached {
    pub limit: Limit,
    pub value: usize,
}

impl fmt::Display for LimitReached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "limits.{} ({}) reached", self.limit.key(), self.value)
    }
}

/// Where accepted connections are counted from: an IPv4 address, or the /64 prefix of an
/// IPv6 address (one end site's subnet: a host there can use any address of it). An
/// IPv4-mapped IPv6 address counts as its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        Source(match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
            },
        })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Accepted connections open from one [`Source`].
#[derive(Default)]
struct SourceCount {
    open: usize,
    /// Of which not yet proven.
    pending: usize,
}

#[derive(Default)]
struct Tables {
    by_id: HashMap<ConnectionId, ConnectionHandle>,
    by_peer: HashMap<(TransportKind, SocketAddr), ConnectionId>,
    by_name: HashMap<(TransportKind, SocketAddr, Arc<str>), ConnectionId>,
    /// Accepted connections open.
    inbound: usize,
    /// Only sources with an accepted connection open.
    by_source: HashMap<Source, SourceCount>,
}

impl Tables {
    /// The limit an accepted connection from `source` would exceed; those of the address
    /// first, as the ones it is to blame for.
    fn inbound_refusal(&self, limits: &ConnectionLimits, source: Source) -> Option<LimitReached> {
        let count = self.by_source.get(&source);
        let pending = count.map_or(0, |count| count.pending);
        let open = count.map_or(0, |count| count.open);
        let reached = |limit, value| Some(LimitReached { limit, value });
        if pending >= limits.max_pending_per_source {
            reached(
                Limit::PendingConnectionsPerIp,
                limits.max_pending_per_source,
            )
        } else if open >= limits.max_per_source {
            reached(Limit::ConnectionsPerIp, limits.max_per_source)
        } else if self.inbound >= limits.max_inbound {
            reached(Limit::InboundConnections, limits.max_inbound)
        } else if self.by_id.len() >= limits.max_connections {
            reached(Limit::Connections, limits.max_connections)
        } else {
            None
        }
    }
}

/// The table of open stream connections shared by all event loops. See the module docs.
pub struct ConnectionRegistry {
    limits: ConnectionLimits,
    tables: Mutex<Tables>,
}

impl ConnectionRegistry {
    pub fn new(limits: ConnectionLimits) -> Self {
        ConnectionRegistry {
            limits,
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

    /// Accepted connections open.
    pub fn inbound_len(&self) -> usize {
        self.lock().inbound
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

    /// Whether a WebSocket connection (plain or secure) from `peer` is open.
    pub fn has_websocket(&self, peer: SocketAddr) -> bool {
        let tables = self.lock();
        [TransportKind::Ws, TransportKind::Wss]
            .into_iter()
            .any(|kind| tables.by_peer.contains_key(&(kind, peer)))
    }

    /// Whether a connection over `kind` from or to `peer` is open.
    pub fn has_peer(&self, kind: TransportKind, peer: SocketAddr) -> bool {
        self.lock().by_peer.contains_key(&(kind, peer))
    }

    /// The most recently registered open connection to `peer` over `kind` that was opened
    /// for `name` (as given to [`ConnectionRegistry::register_outbound`], lower case).
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

    /// Registers a connection accepted from `peer`, with an outbound queue of `queue_len`
    /// messages, unless a limit is reached (every limit applies; see the module docs). It is
    /// pending until [`Registration::proven`]. Dropping the [`Registration`] unregisters it.
    pub(crate) fn register_inbound(
        self: &Arc<Self>,
        kind: TransportKind,
        peer: SocketAddr,
        queue_len: usize,
    ) -> Result<Registration, LimitReached> {
        let source = Source::of(peer.ip());
        let mut tables = self.lock();
        if let Some(reached) = tables.inbound_refusal(&self.limits, source) {
            return Err(reached);
        }
        tables.inbound += 1;
        let count = tables.by_source.entry(source).or_default();
        count.open += 1;
        count.pending += 1;
        let inbound = Some(Inbound {
            source,
            pending: true,
        });
        Ok(self.insert(&mut tables, kind, peer, queue_len, None, inbound))
    }

    /// Registers a connection this server opens to `peer`, unless `max_connections` is
    /// reached (outbound connections may use the slots accepted ones may not); with `name`,
    /// one to a peer that must prove that name (TLS, RFC 5922), found again with
    /// [`ConnectionRegistry::find_named`]. Dropping the [`Registration`] unregisters it.
    pub(crate) fn register_outbound(
        self: &Arc<Self>,
        kind: TransportKind,
        peer: SocketAddr,
        queue_len: usize,
        name: Option<Arc<str>>,
    ) -> Result<Registration, LimitReached> {
        let mut tables = self.lock();
        if tables.by_id.len() >= self.limits.max_connections {
            return Err(LimitReached {
                limit: Limit::Connections,
                value: self.limits.max_connections,
            });
        }
        Ok(self.insert(&mut tables, kind, peer, queue_len, name, None))
    }

    fn insert(
        self: &Arc<Self>,
        tables: &mut Tables,
        kind: TransportKind,
        peer: SocketAddr,
        queue_len: usize,
        name: Option<Arc<str>>,
        inbound: Option<Inbound>,
    ) -> Registration {
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
        Registration {
            registry: Arc::clone(self),
            handle,
            queue,
            inbound,
        }
    }

    /// An accepted connection from `source` delivered its first message.
    fn prove(&self, source: Source) {
        let mut tables = self.lock();
        if let Some(count) = tables.by_source.get_mut(&source) {
            count.pending = count.pending.saturating_sub(1);
        }
    }

    fn unregister(&self, handle: &ConnectionHandle, inbound: Option<Inbound>) {
        let mut tables = self.lock();
        if let Some(Inbound { source, pending }) = inbound {
            tables.inbound = tables.inbound.saturating_sub(1);
            if let Some(count) = tables.by_source.get_mut(&source) {
                count.open = count.open.saturating_sub(1);
                if pending {
                    count.pending = count.pending.saturating_sub(1);
                }
                if count.open == 0 {
                    tables.by_source.remove(&source);
                }
            }
        }
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

/// What the registry counts for an accepted connection.
#[derive(Debug, Clone, Copy)]
struct Inbound {
    source: Source,
    /// Not yet proven: counts toward `max_pending_per_source`.
    pending: bool,
}

/// A connection's membership in the registry, owned by the connection's task. Holds the
/// receiving end of the outbound queue; dropping it unregisters the connection.
pub(crate) struct Registration {
    registry: Arc<ConnectionRegistry>,
    handle: ConnectionHandle,
    queue: mpsc::Receiver<Outbound>,
    /// `Some` for an accepted connection.
    inbound: Option<Inbound>,
}

impl Registration {
    /// The connection delivered a whole SIP message: if it was accepted, it no longer counts
    /// as pending for its source. Takes the registry's lock only the first time.
    pub(crate) fn proven(&mut self) {
        if let Some(inbound) = self.inbound.as_mut().filter(|inbound| inbound.pending) {
            inbound.pending = false;
            self.registry.prove(inbound.source);
        }
    }

    /// Whether the connection was accepted and has not delivered a message yet.
    pub(crate) fn is_pending(&self) -> bool {
        self.inbound.is_some_and(|inbound| inbound.pending)
    }

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
        self.registry.unregister(&self.handle, self.inbound);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the overall limit (every connection may be inbound, from any one address).
    fn total(max_connections: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            max_inbound: max_connections,
            max_per_source: max_connections,
            max_pending_per_source: max_connections,
        }
    }

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn from(ip: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), port)
    }

    fn refusal(result: Result<Registration, LimitReached>) -> Option<Limit> {
        result.err().map(|reached| reached.limit)
    }

    const LIMITS: ConnectionLimits = ConnectionLimits {
        max_connections: 8,
        max_inbound: 6,
        max_per_source: 3,
        max_pending_per_source: 2,
    };

    #[test]
    fn registers_looks_up_and_unregisters_on_drop() {
        let registry = Arc::new(ConnectionRegistry::new(total(4)));
        let registration = registry
            .register_inbound(TransportKind::Tcp, peer(1), 2)
            .unwrap();
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
        let registry = Arc::new(ConnectionRegistry::new(total(4)));
        let a: Arc<str> = Arc::from("a.example");
        let b: Arc<str> = Arc::from("b.example");
        let inbound = registry
            .register_inbound(TransportKind::Tls, peer(1), 1)
            .unwrap();
        let named = registry
            .register_outbound(TransportKind::Tls, peer(1), 1, Some(Arc::clone(&a)))
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
        let registry = Arc::new(ConnectionRegistry::new(total(2)));
        let _a = registry
            .register_inbound(TransportKind::Tcp, peer(1), 1)
            .unwrap();
        let b = registry
            .register_outbound(TransportKind::Tcp, peer(2), 1, None)
            .unwrap();
        assert_eq!(
            registry
                .register_outbound(TransportKind::Tcp, peer(3), 1, None)
                .err(),
            Some(LimitReached {
                limit: Limit::Connections,
                value: 2
            })
        );
        drop(b);
        assert!(registry
            .register_inbound(TransportKind::Tcp, peer(3), 1)
            .is_ok());
    }

    #[test]
    fn ids_are_unique() {
        let registry = Arc::new(ConnectionRegistry::new(total(8)));
        let a = registry
            .register_inbound(TransportKind::Tcp, peer(1), 1)
            .unwrap();
        let b = registry
            .register_inbound(TransportKind::Tcp, peer(1), 1)
            .unwrap();
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
        let registry = Arc::new(ConnectionRegistry::new(total(1)));
        let mut registration = registry
            .register_inbound(TransportKind::Tcp, peer(1), 1)
            .unwrap();
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
        let registry = Arc::new(ConnectionRegistry::new(total(1)));
        let registration = registry
            .register_inbound(TransportKind::Tcp, peer(1), 1)
            .unwrap();
        let handle = registration.handle().clone();
        drop(registration);
        assert_eq!(handle.send(Bytes::new()), Err(QueueError::Closed));
    }

    #[test]
    fn one_source_may_hold_only_a_few_pending_connections() {
        let registry = Arc::new(ConnectionRegistry::new(LIMITS));
        let tcp = TransportKind::Tcp;
        let mut first = registry
            .register_inbound(tcp, from("127.0.0.2", 1), 1)
            .unwrap();
        let _second = registry
            .register_inbound(tcp, from("127.0.0.2", 2), 1)
            .unwrap();
        assert!(first.is_pending());
        assert_eq!(
            refusal(registry.register_inbound(tcp, from("127.0.0.2", 3), 1)),
            Some(Limit::PendingConnectionsPerIp)
        );
        // Another address is not affected.
        let _other = registry
            .register_inbound(tcp, from("127.0.0.3", 1), 1)
            .unwrap();
        // A connection that delivered a message frees its pending place, once.
        first.proven();
        first.proven();
        assert!(!first.is_pending());
        let _third = registry
            .register_inbound(tcp, from("127.0.0.2", 3), 1)
            .unwrap();
        // Three open and two pending from 127.0.0.2: the pending cap is named first.
        assert_eq!(
            refusal(registry.register_inbound(tcp, from("127.0.0.2", 4), 1)),
            Some(Limit::PendingConnectionsPerIp)
        );
        drop(first);
        assert_eq!(
            refusal(registry.register_inbound(tcp, from("127.0.0.2", 4), 1)),
            Some(Limit::PendingConnectionsPerIp),
            "the two pending ones are still there"
        );
    }

    #[test]
    fn one_source_may_hold_only_its_share_of_connections() {
        let registry = Arc::new(ConnectionRegistry::new(LIMITS));
        let tls = TransportKind::Tls;
        let mut held = Vec::new();
        for port in 1..=3 {
            let mut registration = registry.register_inbound(tls, from("127.0.0.2", port), 1);
            registration.as_mut().unwrap().proven();
            held.push(registration.unwrap());
        }
        assert_eq!(
            refusal(registry.register_inbound(tls, from("127.0.0.2", 4), 1)),
            Some(Limit::ConnectionsPerIp)
        );
        held.pop();
        assert!(registry
            .register_inbound(tls, from("127.0.0.2", 4), 1)
            .is_ok());
        drop(held);
        assert_eq!(registry.inbound_len(), 0);
        assert!(
            registry.lock().by_source.is_empty(),
            "no count is left behind"
        );
    }

    #[test]
    fn outbound_connections_keep_the_slots_inbound_ones_may_not_take() {
        let registry = Arc::new(ConnectionRegistry::new(LIMITS));
        let tcp = TransportKind::Tcp;
        let inbound: Vec<_> = (2..8)
            .map(|host| {
                let peer = from(&format!("127.0.0.{host}"), 1);
                registry.register_inbound(tcp, peer, 1).unwrap()
            })
            .collect();
        assert_eq!(registry.inbound_len(), 6);
        assert_eq!(
            refusal(registry.register_inbound(tcp, from("127.0.0.9", 1), 1)),
            Some(Limit::InboundConnections)
        );
        let out: Vec<_> = (1..=2)
            .map(|port| registry.register_outbound(tcp, from("127.0.0.10", port), 1, None))
            .collect::<Result<_, _>>()
            .expect("the reserved slots are free for outbound connections");
        assert_eq!(
            refusal(registry.register_outbound(tcp, from("127.0.0.10", 3), 1, None)),
            Some(Limit::Connections)
        );
        drop(inbound);
        // Outbound connections do not count toward the inbound limits.
        assert_eq!(registry.inbound_len(), 0);
        assert!(registry
            .register_inbound(tcp, from("127.0.0.10", 9), 1)
            .is_ok());
        drop(out);
    }

    #[test]
    fn ipv6_sources_are_counted_per_64_prefix() {
        let registry = Arc::new(ConnectionRegistry::new(LIMITS));
        let tcp = TransportKind::Tcp;
        let _a = registry
            .register_inbound(tcp, from("2001:db8:1:2::a", 1), 1)
            .unwrap();
        let _b = registry
            .register_inbound(tcp, from("2001:db8:1:2:ffff::b", 1), 1)
            .unwrap();
        assert_eq!(
            refusal(registry.register_inbound(tcp, from("2001:db8:1:2::c", 1), 1)),
            Some(Limit::PendingConnectionsPerIp)
        );
        assert!(registry
            .register_inbound(tcp, from("2001:db8:1:3::a", 1), 1)
            .is_ok());
        let source = Source::of("2001:db8:1:2:3:4:5:6".parse().unwrap());
        assert_eq!(source.to_string(), "2001:db8:1:2::/64");
        let mapped = Source::of("::ffff:192.0.2.7".parse().unwrap());
        assert_eq!(mapped, Source::of("192.0.2.7".parse().unwrap()));
        assert_eq!(mapped.to_string(), "192.0.2.7");
    }

    #[test]
    fn a_limit_reached_names_its_key() {
        let reached = LimitReached {
            limit: Limit::PendingConnectionsPerIp,
            value: 4,
        };
        assert_eq!(
            reached.to_string(),
            "limits.max_pending_connections_per_ip (4) reached"
        );
    }
}
