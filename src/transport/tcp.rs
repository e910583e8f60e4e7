//! TCP: listeners, connection tasks and sending over connections. The connection task is
//! generic over the stream, so TLS connections (`tls`) are served by the same code once their
//! handshake is done.
//!
//! Owns RFC 3261 §18 over a stream transport:
//! - each event loop accepts on its own listener sharing the port (SO_REUSEPORT); beyond a
//!   connection limit of the registry (overall, inbound, per source address, pending per
//!   source address) a connection is accepted and closed at once, with one
//!   `moonroute::refused` line, and counted;
//! - one task per connection reads into a [`StreamFramer`] (§18.3) and hands each message to
//!   the loop's Worker; a CRLFCRLF keep-alive gets a CRLF pong (RFC 5626 §3.5.1); on a framing
//!   error the Worker gets [`Input::FramingError`], its replies are flushed, and the
//!   connection is closed (the stream position is lost);
//! - responses go back on the connection the request came in on (§18.2.2); a request to a
//!   peer reuses an open connection to that address or opens one (§18.1.1);
//! - memory per connection is bounded: the framer holds at most one message, the outbound
//!   queue at most `tcp_send_queue` messages, and a peer that lets the queue fill or does not
//!   read a write within the idle timeout is disconnected. Idle connections are closed;
//! - time per message is bounded ([`MessageClock`]): a message whose header block, or whole
//!   body, is not in within its deadline is dropped with its connection (one
//!   `moonroute::refused` line, counted), so a peer trickling bytes cannot hold a connection
//!   slot; an accepted connection must deliver its first message within the header deadline
//!   of being ready, and counts as pending for its source address until it does.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::dispatch::LoopContext;
use super::framing::{Frame, FramingFailure, StreamFramer};
use super::message_clock::{MessageClock, MessageProgress, Overdue};
use super::metrics::{ConnectionRefusal, StreamTimeout};
use super::registry::{ConnectionHandle, LimitReached, Outbound, QueueError, Registration};
use super::{share_port, socket_local_addr, Destination, FramingError, Input, Meta, TransportKind};
use crate::logging::REFUSED;

/// Most bytes read from a connection at once; bounds the framer's buffer growth per read.
const READ_CHUNK: usize = 16 * 1024;
const LISTEN_BACKLOG: i32 = 1024;
/// Pause after an accept error such as running out of file descriptors, which would
/// otherwise repeat at once and spin the loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// After a framing error: how long, and how many bytes, to keep reading and discarding so
/// that closing does not reset the connection before the peer has read our reply.
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
const LINGER_MAX_BYTES: usize = 64 * 1024;
/// The keep-alive pong (RFC 5626 §3.5.1).
const PONG: &[u8] = b"\r\n";

/// Binds `count` listeners to `addr`, sharing the port with SO_REUSEPORT. For port 0 the
/// first listener picks the port and the others join it. Returns the address actually bound.
pub(crate) fn bind_group(
    addr: SocketAddr,
    count: usize,
) -> io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let first = bind_one(addr, count)?;
    let bound = socket_local_addr(&first)?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(bind_one(bound, count)?);
    }
    let listeners = listeners
        .into_iter()
        .map(std::net::TcpListener::from)
        .collect();
    Ok((bound, listeners))
}

fn bind_one(addr: SocketAddr, group_size: usize) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // A restart must not wait for the previous run's connections in TIME_WAIT.
    socket.set_reuse_address(true)?;
    share_port(&socket, group_size)?;
    if addr.is_ipv6() {
        // Keep [::] from also taking IPv4 connections, which belong to IPv4 listeners.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

/// Fails if a socket outside this server already listens on `addr`: SO_REUSEPORT would
/// otherwise let two servers silently split the connections. Only meaningful for a fixed port.
pub(crate) fn ensure_not_in_use(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Tolerates leftovers in TIME_WAIT, but not a listener.
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    probe.bind(&addr.into())
}

/// Accepts connections on `listener` forever, one task per connection. `kind` is the
/// listener's transport: TCP connections are served at once, TLS ones after their handshake.
pub(crate) async fn run_acceptor(
    ctx: Rc<LoopContext>,
    listener: TcpListener,
    local: SocketAddr,
    kind: TransportKind,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match kind {
                TransportKind::Tls => super::tls::accept(&ctx, stream, peer),
                TransportKind::Ws | TransportKind::Wss => {
                    super::ws::accept(&ctx, stream, peer, kind)
                }
                _ => accept(&ctx, stream, peer),
            },
            Err(error) if is_per_connection(&error) => {
                debug!(%local, %error, %kind, "accept failed for one connection");
            }
            Err(error) => {
                warn!(%local, %error, %kind, "accept failed; pausing before the next accept");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Errors that concern only the connection being accepted, not the listener.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

fn accept(ctx: &Rc<LoopContext>, stream: TcpStream, peer: SocketAddr) {
    let queue_len = ctx.limits().tcp_send_queue;
    match ctx
        .registry()
        .register_inbound(TransportKind::Tcp, peer, queue_len)
    {
        Ok(registration) => {
            ctx.metrics()
                .transport
                .connection_opened(TransportKind::Tcp, true);
            debug!(conn = %registration.id(), %peer, worker = ctx.index(), "accepted TCP connection");
            tokio::task::spawn_local(run_connection(Rc::clone(ctx), stream, registration));
        }
        // Dropping the stream closes it.
        Err(reached) => refuse_limit(ctx, TransportKind::Tcp, peer, reached),
    }
}

/// Logs and counts an accepted connection that a registry limit refused; the caller closes it.
pub(crate) fn refuse_limit(
    ctx: &LoopContext,
    kind: TransportKind,
    peer: SocketAddr,
    reached: LimitReached,
) {
    refuse(
        ctx,
        kind,
        peer,
        ConnectionRefusal::Limit(reached.limit),
        &reached,
    );
}

/// Logs (the one `moonroute::refused` line) and counts an accepted connection closed at once
/// because of `refusal`, said in `reason`; the caller closes it.
pub(crate) fn refuse(
    ctx: &LoopContext,
    kind: TransportKind,
    peer: SocketAddr,
    refusal: ConnectionRefusal,
    reason: &dyn std::fmt::Display,
) {
    ctx.metrics().transport.connection_refused(kind, refusal);
    warn!(target: REFUSED, source = %peer, transport = %kind, reason = %format_args!("{reason}; connection closed at once"), "connection refused");
}

/// Sends `data` over TCP: on `dest.conn` if it is still open (RFC 3261 §18.2.2), else on an
/// open connection to `dest.addr`, else on a new connection to it.
pub(crate) fn send(ctx: &Rc<LoopContext>, dest: Destination, data: Bytes) {
    let connection = connection_by_id(ctx, &dest)
        .or_else(|| ctx.registry().find_peer(TransportKind::Tcp, dest.addr));
    match connection {
        Some(connection) => queue_on(&connection, data),
        None if dest.reuse_only => no_connection(ctx, &dest),
        None => {
            let Some(registration) =
                register_outbound(ctx, TransportKind::Tcp, dest.addr, None, data)
            else {
                return;
            };
            tokio::task::spawn_local(connect_and_run(Rc::clone(ctx), dest.addr, registration));
        }
    }
}

/// A message that may only use an open connection ([`Destination::reuse_only`]) found none:
/// the sender is told, as for a refused connection.
pub(crate) fn no_connection(ctx: &Rc<LoopContext>, dest: &Destination) {
    debug!(dest = %dest.addr, transport = %dest.kind, "no open connection to the peer (not opening one): unreachable");
    ctx.report_unreachable(dest.kind, dest.addr);
}

/// The connection `dest.conn` names, if it is still open.
pub(crate) fn connection_by_id(ctx: &LoopContext, dest: &Destination) -> Option<ConnectionHandle> {
    let id = dest.conn?;
    let connection = ctx.registry().get(id);
    if connection.is_none() {
        debug!(conn = %id, dest = %dest.addr, "connection closed; sending by address instead");
    }
    connection
}

pub(crate) fn queue_on(connection: &ConnectionHandle, data: Bytes) {
    match connection.send(data) {
        Ok(()) => {}
        Err(QueueError::Full) => warn!(
            conn = %connection.id(),
            peer = %connection.peer(),
            "send queue full (peer is not reading): dropping the message and closing the connection"
        ),
        Err(QueueError::Closed) => debug!(
            conn = %connection.id(),
            peer = %connection.peer(),
            "dropping outgoing message: connection closed"
        ),
    }
}

/// Registers a connection to `peer` at once, with `first` queued on it, so that messages sent
/// while it is being established queue on it instead of opening more. The caller connects in
/// a task of this loop. `None` (reported unreachable) at the connection limit.
pub(crate) fn register_outbound(
    ctx: &Rc<LoopContext>,
    kind: TransportKind,
    peer: SocketAddr,
    name: Option<std::sync::Arc<str>>,
    first: Bytes,
) -> Option<Registration> {
    let queue_len = ctx.limits().tcp_send_queue;
    match ctx
        .registry()
        .register_outbound(kind, peer, queue_len, name)
    {
        Ok(registration) => {
            queue_on(registration.handle(), first);
            Some(registration)
        }
        Err(reached) => {
            warn!(%peer, %kind, %reached, "dropping outgoing message: connection limit reached");
            ctx.report_unreachable(kind, peer);
            None
        }
    }
}

/// Opens the TCP connection of `registration` (a `kind` connection to `peer`) within the
/// connect timeout. On failure the queued messages are dropped and `peer` is reported
/// unreachable over `kind`; `None` then, and also when the connection is aborted meanwhile.
pub(crate) async fn connect(
    ctx: &Rc<LoopContext>,
    kind: TransportKind,
    peer: SocketAddr,
    registration: &mut Registration,
) -> Option<TcpStream> {
    let connect_timeout = ctx.limits().tcp_connect_timeout;
    let handle = registration.handle().clone();
    let connected = tokio::select! {
        connected = tokio::time::timeout(connect_timeout, TcpStream::connect(peer)) => connected,
        () = handle.abort_signal().aborted() => {
            debug!(conn = %handle.id(), %peer, "connection aborted while connecting");
            return None;
        }
    };
    let queued = registration.queue().len();
    match connected {
        Ok(Ok(stream)) => {
            ctx.metrics().transport.connection_opened(kind, false);
            debug!(conn = %handle.id(), %peer, %kind, worker = ctx.index(), "opened TCP connection");
            Some(stream)
        }
        Ok(Err(error)) => {
            warn!(%peer, %kind, %error, queued, "TCP connect failed; dropping the queued messages");
            ctx.report_unreachable(kind, peer);
            None
        }
        Err(_) => {
            warn!(
                %peer,
                %kind,
                timeout_secs = connect_timeout.as_secs(),
                queued,
                "TCP connect timed out; dropping the queued messages"
            );
            ctx.report_unreachable(kind, peer);
            None
        }
    }
}

async fn connect_and_run(ctx: Rc<LoopContext>, peer: SocketAddr, mut registration: Registration) {
    if let Some(stream) = connect(&ctx, TransportKind::Tcp, peer, &mut registration).await {
        run_connection(ctx, stream, registration).await;
    }
}

/// Serves one established TCP connection until it closes; the registration is dropped (and
/// the connection unregistered) when this returns or is cancelled.
pub(crate) async fn run_connection(
    ctx: Rc<LoopContext>,
    stream: TcpStream,
    registration: Registration,
) {
    if let Some(local) = prepare(&stream, registration.handle()) {
        serve_stream(ctx, stream, TransportKind::Tcp, local, registration).await;
    }
}

/// Readies a new TCP connection (TCP_NODELAY) and returns its local address; `None` when it
/// has already closed.
pub(crate) fn prepare(stream: &TcpStream, handle: &ConnectionHandle) -> Option<SocketAddr> {
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(error) => {
            debug!(conn = %handle.id(), %error, "connection closed before it could be served");
            return None;
        }
    };
    if let Err(error) = stream.set_nodelay(true) {
        // Only latency suffers; the connection still works.
        debug!(conn = %handle.id(), %error, "could not set TCP_NODELAY");
    }
    Some(local)
}

/// Serves one established stream connection of transport `kind` (a TCP stream, or TLS over
/// one) until it closes: framing, the send queue, keep-alive pongs, the idle timeout, the
/// message deadlines. `local` is the connection's own address. The registration is dropped
/// (and the connection unregistered) when this returns or is cancelled.
pub(crate) async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: Rc<LoopContext>,
    stream: S,
    kind: TransportKind,
    local: SocketAddr,
    registration: Registration,
) {
    let handle = registration.handle().clone();
    let meta = connection_meta(&ctx, kind, local, &handle);
    let now = Instant::now();
    let idle_deadline = now + ctx.limits().tcp_idle_timeout;
    let timeouts = ctx.limits().message_timeouts;
    // Only an accepted connection is pending here, and it owes its first message.
    let clock = match registration.is_pending() {
        true => MessageClock::inbound(timeouts, now.into_std()),
        false => MessageClock::outbound(timeouts),
    };
    let framer = StreamFramer::new(ctx.limits().max_message_size);
    let mut connection = Connection {
        ctx,
        stream,
        framer,
        handle,
        registration,
        meta,
        idle_deadline,
        clock,
    };
    let reason = connection.serve().await;
    connection.log_close(&reason);
}

/// Where the messages of connection `handle` (transport `kind`, our address `local`) come from.
pub(crate) fn connection_meta(
    ctx: &LoopContext,
    kind: TransportKind,
    local: SocketAddr,
    handle: &ConnectionHandle,
) -> Meta {
    Meta {
        kind,
        source: handle.peer(),
        local,
        conn: Some(handle.id()),
        worker: ctx.index(),
    }
}

/// Why a connection was closed.
#[derive(Debug)]
enum CloseReason {
    PeerClosed,
    IdleTimeout,
    /// A message did not arrive whole in time.
    Overdue(Overdue),
    /// `Output::Close`, after what was queued before it had been written.
    CloseRequested,
    /// Aborted: the send queue filled up or `abort` was called.
    Aborted,
    Framing(FramingError),
    ReadFailed(io::Error),
    WriteFailed(io::Error),
    WriteStalled,
}

/// What woke a connection's task.
enum Event {
    Aborted,
    Outbound(Option<Outbound>),
    Read(io::Result<usize>),
    Timer(Timer),
}

/// The timer a connection's task sleeps on: whichever comes first.
#[derive(Clone, Copy)]
enum Timer {
    Idle,
    Overdue(Overdue),
}

struct Connection<S> {
    ctx: Rc<LoopContext>,
    stream: S,
    framer: StreamFramer,
    handle: ConnectionHandle,
    registration: Registration,
    meta: Meta,
    idle_deadline: Instant,
    clock: MessageClock,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    async fn serve(&mut self) -> CloseReason {
        loop {
            match self.next_event().await {
                Event::Aborted => return CloseReason::Aborted,
                Event::Timer(Timer::Idle) => return CloseReason::IdleTimeout,
                Event::Timer(Timer::Overdue(overdue)) => return CloseReason::Overdue(overdue),
                Event::Outbound(Some(Outbound::Data(data))) => {
                    if let Err(reason) = self.write(&data).await {
                        return reason;
                    }
                }
                // The registration keeps a sender alive, so `None` cannot happen; treat it
                // like a close request anyway.
                Event::Outbound(Some(Outbound::Close) | None) => {
                    return CloseReason::CloseRequested
                }
                Event::Read(Ok(0)) => return CloseReason::PeerClosed,
                Event::Read(Ok(_)) => {
                    let arrived = self.touch();
                    if let Some(reason) = self.deliver_frames().await {
                        return reason;
                    }
                    // A message started by these bytes started when they arrived.
                    let progress = self.framer.progress();
                    self.clock.observe(progress, arrived.into_std());
                }
                Event::Read(Err(error)) => return CloseReason::ReadFailed(error),
            }
        }
    }

    /// Waits for the next thing to do. Queued writes go before reads, so a peer that sends
    /// faster than it reads is slowed down rather than buffered.
    async fn next_event(&mut self) -> Event {
        let (wake_at, timer) = self.next_timer();
        let mut read_space = self.framer.read_space(READ_CHUNK).limit(READ_CHUNK);
        tokio::select! {
            biased;
            () = self.handle.abort_signal().aborted() => Event::Aborted,
            item = self.registration.queue().recv() => Event::Outbound(item),
            read = self.stream.read_buf(&mut read_space) => Event::Read(read),
            () = tokio::time::sleep_until(wake_at) => Event::Timer(timer),
        }
    }

    /// The idle deadline, or the message deadline when that comes first.
    fn next_timer(&self) -> (Instant, Timer) {
        match self.clock.deadline() {
            Some((due, overdue)) if Instant::from_std(due) < self.idle_deadline => {
                (Instant::from_std(due), Timer::Overdue(overdue))
            }
            _ => (self.idle_deadline, Timer::Idle),
        }
    }

    /// Hands every complete message in the framer to the Worker.
    async fn deliver_frames(&mut self) -> Option<CloseReason> {
        loop {
            let frame = match self.framer.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return None,
                Err(failure) => return Some(self.fail(failure).await),
            };
            match frame {
                Frame::Message(data) => {
                    let meta = self.meta;
                    self.clock.message_received();
                    self.registration.proven();
                    self.ctx.metrics().transport.message_in(meta.kind);
                    self.ctx.handle(Input::Message { data, meta }).await;
                }
                Frame::KeepAlivePing => {
                    // Queued, so the pong cannot overtake replies queued before it.
                    if self.handle.send(Bytes::from_static(PONG)).is_err() {
                        return Some(CloseReason::Aborted);
                    }
                }
            }
            if self.handle.abort_signal().is_aborted() {
                return Some(CloseReason::Aborted);
            }
        }
    }

    /// Lets the Worker answer a framing failure, sends its replies, then closes.
    async fn fail(&mut self, failure: FramingFailure) -> CloseReason {
        // The Worker logs the one `moonroute::refused` line (with the answer it sends, if any).
        debug!(
            conn = %self.handle.id(),
            peer = %self.handle.peer(),
            error = %failure.error,
            "cannot frame the stream; closing the connection"
        );
        let error = failure.error.clone();
        let input = Input::FramingError {
            head: failure.head,
            error: failure.error,
            meta: self.meta,
        };
        self.ctx.handle(input).await;
        if let Err(reason) = self.flush_queue().await {
            return reason;
        }
        self.linger().await;
        CloseReason::Framing(error)
    }

    /// Writes what is queued now, up to one queue's worth, stopping at a close request.
    async fn flush_queue(&mut self) -> Result<(), CloseReason> {
        for _ in 0..self.ctx.limits().tcp_send_queue {
            match self.registration.queue().try_recv() {
                Ok(Outbound::Data(data)) => self.write(&data).await?,
                Ok(Outbound::Close) | Err(_) => break,
            }
        }
        Ok(())
    }

    /// Half-closes, then reads and discards what the peer still sends for a bounded time:
    /// closing with unread input would send a RST, and the peer could lose our last reply.
    async fn linger(&mut self) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let deadline = Instant::now() + LINGER_TIMEOUT;
        let mut scratch = [0u8; 4096];
        let mut discarded = 0;
        while discarded < LINGER_MAX_BYTES {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Ok(Ok(read)) if read > 0 => discarded += read,
                _ => break,
            }
        }
    }

    /// Writes `data`, giving up if the connection is aborted or the peer does not take it
    /// within the idle timeout. Flushes: a TLS stream may hold back part of a record
    /// otherwise (a plain TCP stream has nothing to flush).
    async fn write(&mut self, data: &[u8]) -> Result<(), CloseReason> {
        let deadline = Instant::now() + self.ctx.limits().tcp_idle_timeout;
        let stream = &mut self.stream;
        let write_and_flush = async move {
            stream.write_all(data).await?;
            stream.flush().await
        };
        let written = tokio::select! {
            biased;
            () = self.handle.abort_signal().aborted() => return Err(CloseReason::Aborted),
            written = tokio::time::timeout_at(deadline, write_and_flush) => written,
        };
        match written {
            Ok(Ok(())) => {
                self.touch();
                Ok(())
            }
            Ok(Err(error)) => Err(CloseReason::WriteFailed(error)),
            Err(_) => Err(CloseReason::WriteStalled),
        }
    }

    /// Restarts the idle timeout now, and returns now.
    fn touch(&mut self) -> Instant {
        let now = Instant::now();
        self.idle_deadline = now + self.ctx.limits().tcp_idle_timeout;
        now
    }

    fn log_close(&self, reason: &CloseReason) {
        let conn = self.handle.id();
        let peer = self.handle.peer();
        let partial = self.framer.buffered_len();
        match reason {
            CloseReason::PeerClosed if partial > 0 => debug!(
                %conn, %peer, discarded = partial,
                "peer closed the connection in the middle of a message"
            ),
            CloseReason::PeerClosed => debug!(%conn, %peer, "peer closed the connection"),
            CloseReason::IdleTimeout => debug!(
                %conn, %peer,
                idle_secs = self.ctx.limits().tcp_idle_timeout.as_secs(),
                "closing idle connection"
            ),
            CloseReason::Overdue(overdue) => self.report_overdue(*overdue),
            CloseReason::CloseRequested => debug!(%conn, %peer, "connection closed on request"),
            CloseReason::Aborted => debug!(%conn, %peer, "connection aborted"),
            CloseReason::Framing(error) => {
                debug!(%conn, %peer, %error, "connection closed after a framing error")
            }
            CloseReason::ReadFailed(error) => {
                info!(%conn, %peer, %error, "connection closed: read failed")
            }
            CloseReason::WriteFailed(error) => {
                info!(%conn, %peer, %error, "connection closed: write failed")
            }
            CloseReason::WriteStalled => warn!(
                %conn, %peer,
                "closing connection: the peer took no data for the idle timeout"
            ),
        }
    }

    /// The one `moonroute::refused` line, and the count, of a message that did not arrive
    /// whole in time.
    fn report_overdue(&self, overdue: Overdue) {
        let kind = self.meta.kind;
        let timeouts = self.ctx.limits().message_timeouts;
        let what = match (overdue, self.framer.progress()) {
            (Overdue::Header, MessageProgress::Between) => format!(
                "no SIP message within {} ms of connecting",
                timeouts.header.as_millis()
            ),
            (Overdue::Header, _) => format!(
                "header block not complete within {} ms of its first byte",
                timeouts.header.as_millis()
            ),
            (Overdue::Message, _) => format!(
                "message body not complete within {} ms of its first byte",
                timeouts.message.as_millis()
            ),
        };
        self.ctx
            .metrics()
            .transport
            .connection_timed_out(kind, StreamTimeout::Message(overdue));
        warn!(
            target: REFUSED,
            source = %self.meta.source,
            transport = %kind,
            conn = %self.handle.id(),
            reason = %format_args!(
                "{what} (limits.{}); {} bytes discarded, connection closed",
                overdue.key(),
                self.framer.buffered_len()
            ),
            "message dropped"
        );
    }
}
