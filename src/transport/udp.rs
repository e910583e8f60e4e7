//! UDP: binding one socket per event loop on a shared port, and the receive loop.
//!
//! Owns RFC 3261 §18.1.2 / §18.2.1 reception over UDP: each datagram is one whole message
//! (§18.3: no framing, Content-Length is optional). Datagrams larger than the configured
//! maximum message size are dropped, as are datagrams holding only CR/LF, which some user
//! agents send as keep-alives (RFC 5626 §4.4.1 specifies STUN for UDP instead; the CRLF form
//! is tolerated and ignored).
//!
//! Each event loop binds its own socket to the same address with SO_REUSEPORT, so the kernel
//! spreads datagrams over the loops by flow and no loop waits on another.
//!
//! The datagrams queued on a socket are received together, into reusable 64 KiB buffers
//! (`udp_batch`: one `recvmmsg` per batch), handled one by one in arrival order, and what they
//! make the loop send leaves together once the batch is handled. Each is handed on as a
//! compact copy: the core may keep a message for a whole transaction (up to 32 s, RFC 3261
//! §17.1.1.2), and a zero-copy slice would pin the entire receive buffer that long. Copying
//! ~1 KiB costs far less than the system call.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, warn};

use super::dispatch::{LoopContext, UdpEndpoint};
use super::udp_batch::Inbox;
use super::{Input, Meta, TransportKind};

/// Binds `count` UDP sockets to `addr`, sharing the port with SO_REUSEPORT. For port 0 the
/// first socket picks the port and the others join it. Returns the address actually bound.
pub(crate) fn bind_group(
    addr: SocketAddr,
    count: usize,
) -> io::Result<(SocketAddr, Vec<std::net::UdpSocket>)> {
    let first = bind_one(addr, count)?;
    let bound = super::socket_local_addr(&first)?;
    let mut sockets = vec![first];
    for _ in 1..count {
        sockets.push(bind_one(bound, count)?);
    }
    let sockets = sockets.into_iter().map(std::net::UdpSocket::from).collect();
    Ok((bound, sockets))
}

fn bind_one(addr: SocketAddr, group_size: usize) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    super::share_port(&socket, group_size)?;
    if addr.is_ipv6() {
        // Keep [::] from also taking IPv4 traffic, which belongs to IPv4 listeners.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Best effort: the kernel caps it at net.core.rmem_max (and doubles it for bookkeeping).
    // A failure leaves the default, which only makes bursts likelier to drop.
    let _ = socket.set_recv_buffer_size(RECV_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// The receive buffer asked for each UDP socket. The Linux default (~208 KiB, ~300 SIP
/// datagrams with their overhead) overflows when a loop pauses for a millisecond or two under
/// load (a hash map growing, a flush): every dropped datagram costs the sender a 500 ms
/// retransmission (T1). 4 MiB holds a few thousand datagrams; Kamailio raises its buffer for
/// the same reason.
const RECV_BUFFER: usize = 4 << 20;

/// Fails if a socket outside this server already holds `addr`: SO_REUSEPORT would otherwise
/// let two servers silently split the traffic. Only meaningful for a fixed port.
pub(crate) fn ensure_not_in_use(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    probe.bind(&addr.into())
}

/// Receives datagrams on `endpoint` forever, a batch of those queued at a time, handing each
/// to the loop's Worker and sending what it produced. (How busy this keeps the loop is
/// measured for the whole loop, see `transport::load`.)
pub(crate) async fn run_receiver(ctx: Rc<LoopContext>, endpoint: Rc<UdpEndpoint>) {
    let mut inbox = Inbox::new();
    loop {
        if let Err(error) = inbox.receive(&endpoint.socket).await {
            // Transient (e.g. a queued ICMP error); the socket itself stays usable.
            debug!(local = %endpoint.local, %error, "UDP receive error");
            continue;
        }
        ctx.metrics().transport.udp_received_batch(inbox.len());
        for (datagram, source) in inbox.datagrams() {
            handle_datagram(&ctx, &endpoint, datagram, source);
            // What it produced leaves before the next datagram is handled (one system call
            // for its outputs, e.g. a 100 and the relayed INVITE): holding all of a batch's
            // outputs to its end delayed the peers' answers, so the loop found its queue
            // empty and went to sleep more often (1.1-1.2 context switches per call instead
            // of 0.3-0.4 at 400 calls/s) and cost more CPU per call than it saved.
            ctx.flush_udp().await;
        }
        if inbox.was_full() {
            // Datagrams are still waiting, so the task would not suspend: give the loop's
            // other tasks (timers, hand-overs) their turn when the budget is spent, as if
            // each datagram had been one receive.
            for _ in 0..inbox.len() {
                tokio::task::coop::consume_budget().await;
            }
        }
    }
}

/// Passes one received datagram to the Worker (its outputs wait in the loop's outbox).
fn handle_datagram(
    ctx: &Rc<LoopContext>,
    endpoint: &UdpEndpoint,
    datagram: &[u8],
    source: SocketAddr,
) {
    if !accept_datagram(ctx, datagram, source) {
        return;
    }
    let meta = Meta {
        kind: TransportKind::Udp,
        source,
        local: endpoint.local,
        conn: None,
        worker: ctx.index(),
    };
    ctx.metrics().transport.message_in(TransportKind::Udp);
    let data = Bytes::copy_from_slice(datagram);
    ctx.process(Input::Message { data, meta });
}

/// Whether a datagram should reach the Worker; logs why not.
fn accept_datagram(ctx: &LoopContext, datagram: &[u8], source: SocketAddr) -> bool {
    let limit = ctx.limits().max_message_size;
    if datagram.len() > limit {
        warn!(
            target: crate::logging::REFUSED,
            %source,
            transport = "udp",
            len = datagram.len(),
            limit,
            reason = "datagram larger than limits.max_message_size",
            "message dropped"
        );
        return false;
    }
    if is_keepalive(datagram) {
        debug!(%source, "ignoring UDP keep-alive (empty or CR/LF only)");
        return false;
    }
    true
}

fn is_keepalive(datagram: &[u8]) -> bool {
    datagram.iter().all(|b| matches!(b, b'\r' | b'\n'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_only_datagrams_are_keepalives() {
        assert!(is_keepalive(b""));
        assert!(is_keepalive(b"\r\n\r\n"));
        assert!(is_keepalive(b"\r\n"));
        assert!(!is_keepalive(b"OPTIONS sip:a@b SIP/2.0\r\n"));
    }

    #[test]
    fn bind_group_shares_one_port_chosen_by_the_kernel() {
        let (bound, sockets) = bind_group(SocketAddr::from(([127, 0, 0, 1], 0)), 3).unwrap();
        assert_ne!(bound.port(), 0);
        assert_eq!(sockets.len(), 3);
        for socket in &sockets {
            assert_eq!(socket.local_addr().unwrap(), bound);
        }
        assert!(ensure_not_in_use(bound).is_err());
    }
}
