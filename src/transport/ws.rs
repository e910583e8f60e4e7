//! SIP over WebSocket and secure WebSocket (RFC 7118), server side, with tokio-tungstenite.
//!
//! Owns the `ws:` and `wss:` listeners' connections, from accept to close:
//! - accepting: a connection is registered at once under the registry's limits, like a TCP one
//!   (`max_connections`, `max_inbound_connections`, `max_connections_per_ip`, and
//!   `max_pending_connections_per_ip` until its first SIP message); a `wss:` one then does its
//!   TLS handshake with the `[tls]` certificate (one of the loop's `tls.max_handshakes`
//!   slots), then the HTTP Upgrade (RFC 6455 §4.2). Both together must finish within
//!   `websocket.handshake_timeout_ms`, else one `moonroute::refused` line and the connection
//!   closes;
//! - the Upgrade must offer the `sip` subprotocol (RFC 7118 §4: the server "MUST" refuse
//!   otherwise; we answer 400) and come from no web page or one of
//!   `websocket.allowed_origins` (403 otherwise: cross-site WebSocket hijacking, RFC 6455
//!   §10.2);
//! - framing: one SIP message per WebSocket message, text or binary (RFC 7118 §5); a message
//!   or frame over `limits.max_message_size` closes the connection (tungstenite refuses it
//!   before buffering more). Messages we send go as text frames when they are UTF-8 (as SIP
//!   is, in practice), binary otherwise;
//! - keep-alive: a WebSocket Ping after `websocket.ping_interval_secs` of silence from the
//!   client; Pings from the client are answered by tungstenite. Only whole WebSocket
//!   messages (Pongs included) count as traffic: a client trickling one frame forever is
//!   closed after `limits.tcp_idle_timeout_secs`; an accepted connection owes its first SIP
//!   message within `limits.tcp_header_timeout_ms` of being ready, like TCP;
//! - sending: a WebSocket client can only be reached over the connection it opened (RFC 7118
//!   §5: its Contact and Via hosts are `.invalid` names; RFC 5626 flow semantics), so a
//!   message goes on `Destination::conn` or an open connection from that address, and is
//!   otherwise reported unreachable: this server never opens WebSocket connections.
//!
//! Also owns `[websocket]` ([`WsConfig`], read by `crate::config`).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

use super::dispatch::LoopContext;
use super::message_clock::MessageClock;
use super::metrics::{ConnectionRefusal, StreamTimeout};
use super::registry::{ConnectionHandle, Outbound, Registration};
use super::tls::HandshakeSlot;
use super::{tcp, Destination, Input, Meta, TransportKind};
use crate::logging::REFUSED;

/// The CRLF keep-alive ping of a stream flow (RFC 5626 §3.5.1).
const KEEPALIVE_PING: &[u8] = b"\r\n\r\n";

/// The WebSocket subprotocol of SIP (RFC 7118 §4, registered in §7.1).
const SIP_SUBPROTOCOL: &str = "sip";

/// SIP over WebSocket (RFC 7118): what `ws:` and `wss:` listeners accept. A `wss:` listener
/// presents the `[tls]` certificate. Message sizes, idle timeout, send queue and per-IP
/// connection caps are those of `[limits]`, as for TCP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WsConfig {
    /// Web origins whose pages may open a connection (the `Origin` header of the HTTP
    /// Upgrade, RFC 6455 §10.2), e.g. `https://phone.example.com`; `*` allows every origin.
    /// A request without `Origin` does not come from a browser page and is accepted. A page
    /// from an origin not listed is refused (403): otherwise any web page a phone user opens
    /// could use their browser, and its network address, to talk SIP to this server
    /// (cross-site WebSocket hijacking). Default: empty (no browser page allowed).
    pub allowed_origins: Vec<String>,
    /// Longest the opening of a connection may take, TLS handshake (`wss:`) and HTTP Upgrade
    /// together, in milliseconds. Default: 5000.
    pub handshake_timeout_ms: u64,
    /// A WebSocket Ping is sent after this many seconds without traffic from the client, so
    /// NATs keep the flow and a dead client is noticed (its connection then closes after
    /// `limits.tcp_idle_timeout_secs` of silence). 0: no pings. Default: 30.
    pub ping_interval_secs: u64,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            allowed_origins: Vec::new(),
            handshake_timeout_ms: 5000,
            ping_interval_secs: 30,
        }
    }
}

/// What `ws:` and `wss:` listeners accept (`[websocket]`), shared by the event loops.
#[derive(Clone, Debug)]
pub(crate) struct WsSettings {
    /// Allowed `Origin` values, lower case, without a trailing `/`.
    allowed_origins: Vec<String>,
    any_origin: bool,
    handshake_timeout: Duration,
    /// `None`: no pings.
    ping_interval: Option<Duration>,
}

impl WsSettings {
    pub(crate) fn new(config: &WsConfig) -> WsSettings {
        let origins: Vec<String> = config
            .allowed_origins
            .iter()
            .map(|o| normalize_origin(o))
            .collect();
        WsSettings {
            any_origin: origins.iter().any(|o| o == "*"),
            allowed_origins: origins,
            handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
            ping_interval: (config.ping_interval_secs > 0)
                .then(|| Duration::from_secs(config.ping_interval_secs)),
        }
    }

    /// Whether a request with this `Origin` (if any) may open a connection.
    fn origin_allowed(&self, origin: Option<&[u8]>) -> bool {
        let Some(origin) = origin else {
            // No web page behind it (JsSIP on Node, a SIP phone): browsers always send one.
            return true;
        };
        if self.any_origin {
            return true;
        }
        let Ok(origin) = std::str::from_utf8(origin) else {
            return false;
        };
        let origin = normalize_origin(origin);
        self.allowed_origins.contains(&origin)
    }
}

impl Default for WsSettings {
    fn default() -> Self {
        WsSettings::new(&WsConfig::default())
    }
}

/// Origins compare as ASCII lower case (RFC 6454 §6.2 serialization), without a trailing `/`.
fn normalize_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// Why an HTTP Upgrade was refused: the status answered and the reason logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpgradeRefusal {
    status: StatusCode,
    reason: String,
}

/// RFC 7118 §4 and RFC 6455 §4.2.2 on the Upgrade request `headers` (tungstenite has checked
/// the WebSocket parts): the `sip` subprotocol must be offered, and a browser's `Origin` must
/// be allowed. Returns the subprotocol to confirm.
pub(crate) fn check_upgrade(
    settings: &WsSettings,
    headers: &tokio_tungstenite::tungstenite::http::HeaderMap,
) -> Result<&'static str, UpgradeRefusal> {
    let offers_sip = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|protocol| protocol.trim().eq_ignore_ascii_case(SIP_SUBPROTOCOL));
    if !offers_sip {
        return Err(UpgradeRefusal {
            status: StatusCode::BAD_REQUEST,
            reason: "the Upgrade does not offer the 'sip' WebSocket subprotocol (RFC 7118 §4)"
                .to_owned(),
        });
    }
    let origin = headers.get(header::ORIGIN).map(HeaderValue::as_bytes);
    if !settings.origin_allowed(origin) {
        let shown = origin.map(String::from_utf8_lossy).unwrap_or_default();
        return Err(UpgradeRefusal {
            status: StatusCode::FORBIDDEN,
            reason: format!(
                "Origin {shown:?} is not in websocket.allowed_origins (cross-site WebSocket hijacking)"
            ),
        });
    }
    Ok(SIP_SUBPROTOCOL)
}

/// Capacity of a connection's read buffer. tungstenite allocates it up front (128 KiB by
/// default) and zero-fills its free part before each read: 128 KiB per idle connection, and
/// a memset of that size per message received. A SIP message over WebSocket is usually 1-4
/// KiB; the buffer still grows for a larger one (up to `max_message_size`).
/// `bench/ws.sh` measured 158 KiB per idle wss connection with the default, against 26 KiB
/// for TLS.
const READ_BUFFER_SIZE: usize = 8 * 1024;

/// The WebSocket limits of a connection: no message or frame beyond the SIP message limit,
/// and a small read buffer ([`READ_BUFFER_SIZE`]).
fn ws_config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_SIZE)
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

// ----- accepting ---------------------------------------------------------------------------

/// A connection accepted on a `ws:` or `wss:` listener (`kind`): registered, then served once
/// its handshakes are done. Dropping `stream` closes a refused one.
pub(crate) fn accept(
    ctx: &Rc<LoopContext>,
    stream: TcpStream,
    peer: SocketAddr,
    kind: TransportKind,
) {
    let queue_len = ctx.limits().tcp_send_queue;
    let registration = match ctx.registry().register_inbound(kind, peer, queue_len) {
        Ok(registration) => registration,
        Err(reached) => return tcp::refuse_limit(ctx, kind, peer, reached),
    };
    let slot = match kind {
        TransportKind::Wss => match HandshakeSlot::take_or_refuse(ctx, kind, peer) {
            Some(slot) => Some(slot),
            None => return,
        },
        _ => None,
    };
    ctx.metrics().transport.connection_opened(kind, true);
    debug!(conn = %registration.id(), %peer, %kind, worker = ctx.index(), "accepted WebSocket connection");
    let task = open_and_serve(Rc::clone(ctx), stream, kind, registration, slot);
    tokio::task::spawn_local(task);
}

async fn open_and_serve(
    ctx: Rc<LoopContext>,
    stream: TcpStream,
    kind: TransportKind,
    registration: Registration,
    slot: Option<HandshakeSlot>,
) {
    let handle = registration.handle().clone();
    let Some(local) = tcp::prepare(&stream, &handle) else {
        return;
    };
    let timeout = ctx.websocket().handshake_timeout;
    let deadline = Instant::now() + timeout;
    let peer = handle.peer();
    let opened = async {
        match kind {
            TransportKind::Wss => {
                let Some(acceptor) = ctx.tls().acceptor() else {
                    warn!(%peer, "refusing WSS connection: no server certificate configured");
                    return Err(());
                };
                let tls = match acceptor.accept(stream).await {
                    Ok(tls) => tls,
                    Err(error) => {
                        debug!(conn = %handle.id(), %peer, %error, "TLS handshake failed; closing");
                        return Err(());
                    }
                };
                drop(slot);
                let ws = upgrade(&ctx, tls, &handle).await.ok_or(())?;
                Ok(Opened::Tls(Box::new(ws)))
            }
            _ => {
                let ws = upgrade(&ctx, stream, &handle).await.ok_or(())?;
                Ok(Opened::Plain(Box::new(ws)))
            }
        }
    };
    let opened = tokio::select! {
        opened = tokio::time::timeout_at(deadline, opened) => opened,
        () = handle.abort_signal().aborted() => {
            debug!(conn = %handle.id(), "connection aborted during the WebSocket handshake");
            return;
        }
    };
    match opened {
        Ok(Ok(Opened::Plain(ws))) => serve(ctx, *ws, kind, local, registration).await,
        Ok(Ok(Opened::Tls(ws))) => serve(ctx, *ws, kind, local, registration).await,
        // Failed: logged already.
        Ok(Err(())) => {}
        Err(_) => {
            // The address's pending place is free once this is logged.
            drop(registration);
            ctx.metrics()
                .transport
                .connection_timed_out(kind, StreamTimeout::Handshake);
            warn!(
                target: REFUSED,
                source = %peer,
                transport = %kind,
                conn = %handle.id(),
                reason = %format_args!(
                    "WebSocket handshake not finished within {} ms (websocket.handshake_timeout_ms); connection closed",
                    timeout.as_millis()
                ),
                "connection dropped"
            );
        }
    }
}

/// A connection opened, over plain TCP or over TLS (boxed: the stream states are large, and
/// the future holding this lives only during the opening).
enum Opened {
    Plain(Box<WebSocketStream<TcpStream>>),
    Tls(Box<WebSocketStream<tokio_rustls::server::TlsStream<TcpStream>>>),
}

/// The HTTP Upgrade (RFC 6455 §4.2) with the checks of [`check_upgrade`]; a refused one is
/// answered with its status and logged as refused (`None` then, and on any failure).
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Rc<LoopContext>,
    stream: S,
    handle: &ConnectionHandle,
) -> Option<WebSocketStream<S>> {
    let settings = Arc::clone(ctx.websocket());
    let mut refusal = None;
    let callback = |request: &Request, mut response: Response| match check_upgrade(
        &settings,
        request.headers(),
    ) {
        Ok(protocol) => {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
            Ok(response)
        }
        Err(refused) => {
            let mut answer = ErrorResponse::new(Some(refused.reason.clone()));
            *answer.status_mut() = refused.status;
            refusal = Some(refused);
            Err(answer)
        }
    };
    let config = ws_config(ctx.limits().max_message_size);
    let upgraded =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await;
    let kind = handle.kind();
    match (upgraded, refusal) {
        (Ok(ws), _) => {
            debug!(conn = %handle.id(), peer = %handle.peer(), %kind, "WebSocket connection open");
            Some(ws)
        }
        (Err(_), Some(refused)) => {
            ctx.metrics()
                .transport
                .connection_refused(kind, ConnectionRefusal::Upgrade);
            warn!(
                target: REFUSED,
                source = %handle.peer(),
                transport = %kind,
                conn = %handle.id(),
                reason = %format_args!("{}; answered {}, connection closed", refused.reason, refused.status.as_u16()),
                "connection refused"
            );
            None
        }
        (Err(error), None) => {
            debug!(conn = %handle.id(), peer = %handle.peer(), %kind, %error, "WebSocket handshake failed; closing");
            None
        }
    }
}

// ----- serving -----------------------------------------------------------------------------

/// Why a WebSocket connection was closed.
#[derive(Debug)]
enum CloseReason {
    PeerClosed,
    IdleTimeout,
    /// The first SIP message did not come in time.
    NoFirstMessage,
    CloseRequested,
    Aborted,
    ReadFailed(WsError),
    WriteFailed(WsError),
    WriteStalled,
}

enum Event {
    Aborted,
    Outbound(Option<Outbound>),
    Read(Option<Result<Message, WsError>>),
    Ping,
    Idle,
    FirstMessageOverdue,
}

struct Connection<S> {
    ctx: Rc<LoopContext>,
    ws: WebSocketStream<S>,
    handle: ConnectionHandle,
    registration: Registration,
    meta: Meta,
    /// When the client was last heard from (a whole WebSocket message of any kind).
    heard_at: Instant,
    /// Whether a Ping went out since the client was last heard from.
    pinged: bool,
    clock: MessageClock,
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: Rc<LoopContext>,
    ws: WebSocketStream<S>,
    kind: TransportKind,
    local: SocketAddr,
    registration: Registration,
) {
    let handle = registration.handle().clone();
    let meta = tcp::connection_meta(&ctx, kind, local, &handle);
    let now = Instant::now();
    let clock = MessageClock::inbound(ctx.limits().message_timeouts, now.into_std());
    let mut connection = Connection {
        ctx,
        ws,
        handle,
        registration,
        meta,
        heard_at: now,
        pinged: false,
        clock,
    };
    let reason = connection.serve().await;
    connection.log_close(&reason);
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    async fn serve(&mut self) -> CloseReason {
        loop {
            match self.next_event().await {
                Event::Aborted => return CloseReason::Aborted,
                Event::Idle => return CloseReason::IdleTimeout,
                Event::FirstMessageOverdue => return CloseReason::NoFirstMessage,
                Event::Ping => {
                    self.pinged = true;
                    if let Err(reason) = self.write(Message::Ping(Bytes::new())).await {
                        return reason;
                    }
                }
                Event::Outbound(Some(Outbound::Data(data))) => {
                    if let Err(reason) = self.write(frame_of(data)).await {
                        return reason;
                    }
                }
                Event::Outbound(Some(Outbound::Close) | None) => {
                    // Best effort: the client learns why; the TCP close follows either way.
                    let _ = self.write(Message::Close(None)).await;
                    return CloseReason::CloseRequested;
                }
                Event::Read(None) => return CloseReason::PeerClosed,
                Event::Read(Some(Err(error))) => return CloseReason::ReadFailed(error),
                Event::Read(Some(Ok(message))) => {
                    self.heard_at = Instant::now();
                    self.pinged = false;
                    match message {
                        Message::Text(text) => self.deliver(Bytes::from(text)).await,
                        Message::Binary(data) => self.deliver(data).await,
                        // tungstenite queued the Pong: send it now, not with the next message.
                        Message::Ping(_) => {
                            if let Err(error) = self.ws.flush().await {
                                return CloseReason::WriteFailed(error);
                            }
                        }
                        Message::Pong(_) | Message::Frame(_) => {}
                        // tungstenite answers the Close; the stream ends next.
                        Message::Close(_) => {}
                    }
                    if self.handle.abort_signal().is_aborted() {
                        return CloseReason::Aborted;
                    }
                }
            }
        }
    }

    /// Waits for the next thing to do. Queued writes go before reads, so a client that sends
    /// faster than it reads is slowed down rather than buffered.
    async fn next_event(&mut self) -> Event {
        let idle_at = self.heard_at + self.ctx.limits().tcp_idle_timeout;
        let (wake_at, timer) = match self.ctx.websocket().ping_interval {
            Some(interval) if !self.pinged && self.heard_at + interval < idle_at => {
                (self.heard_at + interval, Event::Ping)
            }
            _ => (idle_at, Event::Idle),
        };
        let (wake_at, timer) = match self.clock.deadline() {
            Some((due, _)) if Instant::from_std(due) < wake_at => {
                (Instant::from_std(due), Event::FirstMessageOverdue)
            }
            _ => (wake_at, timer),
        };
        tokio::select! {
            biased;
            () = self.handle.abort_signal().aborted() => Event::Aborted,
            item = self.registration.queue().recv() => Event::Outbound(item),
            read = self.ws.next() => Event::Read(read),
            () = tokio::time::sleep_until(wake_at) => timer,
        }
    }

    /// Hands one SIP message to the Worker (RFC 7118 §5: each WebSocket message is one).
    async fn deliver(&mut self, data: Bytes) {
        // A bare CRLF keep-alive (RFC 5626 §3.5.1) that some clients send over WebSocket too.
        if data.iter().all(|b| matches!(b, b'\r' | b'\n' | b' ')) {
            return;
        }
        let meta = self.meta;
        self.clock.message_received();
        self.registration.proven();
        self.ctx.metrics().transport.message_in(meta.kind);
        self.ctx.handle(Input::Message { data, meta }).await;
    }

    /// Writes `message`, giving up if the connection is aborted or the client does not take
    /// it within the idle timeout.
    async fn write(&mut self, message: Message) -> Result<(), CloseReason> {
        let deadline = Instant::now() + self.ctx.limits().tcp_idle_timeout;
        let written = tokio::select! {
            biased;
            () = self.handle.abort_signal().aborted() => return Err(CloseReason::Aborted),
            written = tokio::time::timeout_at(deadline, self.ws.send(message)) => written,
        };
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(CloseReason::WriteFailed(error)),
            Err(_) => Err(CloseReason::WriteStalled),
        }
    }

    fn log_close(&self, reason: &CloseReason) {
        let conn = self.handle.id();
        let peer = self.handle.peer();
        let kind = self.meta.kind;
        match reason {
            CloseReason::PeerClosed => debug!(%conn, %peer, %kind, "peer closed the connection"),
            CloseReason::IdleTimeout => debug!(
                %conn, %peer, %kind,
                idle_secs = self.ctx.limits().tcp_idle_timeout.as_secs(),
                "closing idle WebSocket connection"
            ),
            CloseReason::NoFirstMessage => {
                let timeout = self.ctx.limits().message_timeouts.header;
                self.ctx.metrics().transport.connection_timed_out(
                    kind,
                    StreamTimeout::Message(super::message_clock::Overdue::Header),
                );
                warn!(
                    target: REFUSED,
                    source = %peer,
                    transport = %kind,
                    %conn,
                    reason = %format_args!(
                        "no SIP message within {} ms of the WebSocket opening (limits.tcp_header_timeout_ms); connection closed",
                        timeout.as_millis()
                    ),
                    "connection dropped"
                );
            }
            CloseReason::CloseRequested => {
                debug!(%conn, %peer, %kind, "connection closed on request")
            }
            CloseReason::Aborted => debug!(%conn, %peer, %kind, "connection aborted"),
            CloseReason::ReadFailed(WsError::Capacity(error)) => warn!(
                target: REFUSED,
                source = %peer,
                transport = %kind,
                %conn,
                reason = %format_args!("{error} (limits.max_message_size is {}); connection closed", self.ctx.limits().max_message_size),
                "message dropped"
            ),
            CloseReason::ReadFailed(error) => {
                info!(%conn, %peer, %kind, %error, "WebSocket connection closed: read failed")
            }
            CloseReason::WriteFailed(error) => {
                info!(%conn, %peer, %kind, %error, "WebSocket connection closed: write failed")
            }
            CloseReason::WriteStalled => warn!(
                %conn, %peer, %kind,
                "closing WebSocket connection: the client took no data for the idle timeout"
            ),
        }
    }
}

/// A SIP message as a WebSocket message: text when it is UTF-8 (what browser stacks expect),
/// binary otherwise (RFC 7118 §5 allows both).
fn frame_of(data: Bytes) -> Message {
    // Cloning a `Bytes` only counts a reference.
    match tokio_tungstenite::tungstenite::Utf8Bytes::try_from(data.clone()) {
        Ok(text) => Message::Text(text),
        Err(_) => Message::Binary(data),
    }
}

// ----- sending -----------------------------------------------------------------------------

/// Sends `data` to a WebSocket client: on `dest.conn` if it is still open, else on an open
/// connection from `dest.addr`; else it is unreachable (RFC 7118 §5: never a new connection).
pub(crate) fn send(ctx: &Rc<LoopContext>, dest: Destination, data: Bytes) {
    if data.as_ref() == KEEPALIVE_PING {
        // A NATed binding's CRLF keep-alive (RFC 5626 §3.5.1) is no SIP message to a
        // WebSocket stack; the connection's own Pings keep the flow instead.
        return;
    }
    // `transport=ws` names secure WebSocket too (RFC 7118 §5.2): either kind will do.
    let connection = tcp::connection_by_id(ctx, &dest)
        .or_else(|| ctx.registry().find_peer(dest.kind, dest.addr))
        .or_else(|| {
            ctx.registry()
                .find_peer(other_websocket(dest.kind), dest.addr)
        });
    match connection {
        Some(connection) => tcp::queue_on(&connection, data),
        None => tcp::no_connection(ctx, &dest),
    }
}

fn other_websocket(kind: TransportKind) -> TransportKind {
    match kind {
        TransportKind::Ws => TransportKind::Wss,
        _ => TransportKind::Ws,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::http::HeaderMap;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn settings(origins: &[&str]) -> WsSettings {
        WsSettings::new(&WsConfig {
            allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
            ..WsConfig::default()
        })
    }

    #[test]
    fn the_sip_subprotocol_is_required() {
        let none = settings(&[]);
        assert_eq!(
            check_upgrade(&none, &headers(&[("sec-websocket-protocol", "SIP")])),
            Ok("sip")
        );
        assert_eq!(
            check_upgrade(&none, &headers(&[("sec-websocket-protocol", "xmpp, sip")])),
            Ok("sip")
        );
        for offered in [&[][..], &[("sec-websocket-protocol", "xmpp")][..]] {
            let refused = check_upgrade(&none, &headers(offered)).unwrap_err();
            assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn browser_origins_must_be_listed() {
        let sip = ("sec-websocket-protocol", "sip");
        let none = settings(&[]);
        // No Origin: not a web page.
        assert!(check_upgrade(&none, &headers(&[sip])).is_ok());
        let evil = headers(&[sip, ("origin", "https://evil.example")]);
        let refused = check_upgrade(&none, &evil).unwrap_err();
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert!(
            refused.reason.contains("evil.example"),
            "{}",
            refused.reason
        );

        let listed = settings(&["https://Phone.example.com/"]);
        let ok = headers(&[sip, ("origin", "https://phone.example.com")]);
        assert!(check_upgrade(&listed, &ok).is_ok());
        assert!(check_upgrade(&listed, &evil).is_err());
        let other_port = headers(&[sip, ("origin", "https://phone.example.com:8443")]);
        assert!(check_upgrade(&listed, &other_port).is_err());

        let any = settings(&["*"]);
        assert!(check_upgrade(&any, &evil).is_ok());
    }

    #[test]
    fn sip_goes_out_as_text_unless_it_is_not_utf8() {
        assert!(matches!(
            frame_of(Bytes::from_static(b"OPTIONS sip:a SIP/2.0\r\n\r\n")),
            Message::Text(_)
        ));
        assert!(matches!(
            frame_of(Bytes::from_static(b"\xff\xfe")),
            Message::Binary(_)
        ));
    }
}
