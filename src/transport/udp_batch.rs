//! UDP system-call batching: every datagram already queued on a socket in one `recvmmsg(2)`,
//! the datagrams a loop has to send in one `sendmmsg(2)` per socket.
//!
//! Owns moving datagrams between a loop's UDP sockets and memory, not what they mean: each
//! received datagram is still one whole message (RFC 3261 §18.3), handed to the Worker on its
//! own and in arrival order, and datagrams leave each socket in the order the Worker produced
//! them (§18.1.1, §18.2.2 say nothing of batches: to a peer a batch is the same datagrams).
//!
//! Why: in this server a system call costs about as much as parsing a message, and a relayed
//! call crosses the kernel 13 times one datagram at a time (6 in, 7 out), each receive also
//! paying a second call that finds the queue empty. A batch is only what is queued already:
//! receiving never waits for more datagrams to come, and sending flushes as soon as the
//! datagrams received together have been handled, so no datagram waits for traffic that has
//! not arrived. [`Inbox::receive`] learns that the queue is empty from a short batch and lets
//! tokio wait for readiness without the extra call.
//!
//! The system calls come through `nix` (`recvmmsg`) and `rustix` (`sendmmsg`, which reports
//! how many datagrams left); no `unsafe` here.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use bytes::Bytes;
use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// The largest UDP payload; a datagram cannot be bigger.
pub(crate) const MAX_DATAGRAM: usize = 65_535;

/// Datagrams taken from a socket per `recvmmsg`. Each has a [`MAX_DATAGRAM`] buffer, of which
/// the kernel only ever touches what a datagram fills: 2 MiB of address space per socket,
/// about 4 KiB resident per slot in use.
pub(crate) const RECV_BATCH: usize = 32;

/// Datagrams given to the kernel per `sendmmsg`.
pub(crate) const SEND_BATCH: usize = 32;

/// One received datagram: where it is in the [`Inbox`], and where it came from.
#[derive(Clone, Copy, Debug)]
struct Slot {
    len: usize,
    source: SocketAddr,
}

/// The receive side: [`RECV_BATCH`] datagram buffers and the headers `recvmmsg` fills.
pub(crate) struct Inbox {
    buffers: Vec<u8>,
    headers: MultiHeaders<SockaddrStorage>,
    received: Vec<Slot>,
    /// Whether the last batch filled every slot (more may be queued).
    full: bool,
}

impl Default for Inbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Inbox {
    pub(crate) fn new() -> Inbox {
        Inbox {
            // Zeroed memory comes from the system untouched: pages become resident only once
            // a datagram is written into them.
            buffers: vec![0; RECV_BATCH * MAX_DATAGRAM],
            headers: MultiHeaders::preallocate(RECV_BATCH, None),
            received: Vec::with_capacity(RECV_BATCH),
            full: false,
        }
    }

    /// Takes the datagrams queued on `socket` (at most [`RECV_BATCH`]), first waiting until
    /// there is one. An error is the socket's (say, an ICMP error queued for it); the socket
    /// stays usable.
    pub(crate) async fn receive(&mut self, socket: &UdpSocket) -> io::Result<()> {
        self.received.clear();
        self.full = false;
        loop {
            socket.readable().await?;
            match socket.try_io(Interest::READABLE, || self.receive_queued(socket)) {
                Ok(()) => return Ok(()),
                // A short batch: the kernel found the queue empty after it, which is what
                // WouldBlock tells tokio (readiness cleared: the next receive waits for the
                // socket instead of asking the kernel again).
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if !self.received.is_empty() {
                        return Ok(());
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// One `recvmmsg` without waiting. `Ok` only when every slot was filled; WouldBlock when
    /// the queue ran empty first (with what was received kept).
    fn receive_queued(&mut self, socket: &UdpSocket) -> io::Result<()> {
        let Inbox {
            buffers,
            headers,
            received,
            full,
        } = self;
        let mut chunks = buffers.chunks_exact_mut(MAX_DATAGRAM);
        let mut slices: [[IoSliceMut<'_>; 1]; RECV_BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
        let results = recvmmsg(
            socket.as_raw_fd(),
            headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        for message in results {
            // UDP sockets always name the sender; a datagram without one cannot be answered.
            if let Some(source) = message.address.as_ref().and_then(socket_addr) {
                received.push(Slot {
                    len: message.bytes,
                    source,
                });
            }
        }
        *full = received.len() == RECV_BATCH;
        if *full {
            Ok(())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    /// The datagrams of the last batch, in arrival order, with their senders.
    pub(crate) fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> + '_ {
        self.received.iter().enumerate().map(|(index, slot)| {
            let start = index * MAX_DATAGRAM;
            (&self.buffers[start..start + slot.len], slot.source)
        })
    }

    /// How many datagrams the last batch holds.
    pub(crate) fn len(&self) -> usize {
        self.received.len()
    }

    /// Whether the last batch filled every slot, so that more may be waiting.
    pub(crate) fn was_full(&self) -> bool {
        self.full
    }
}

fn socket_addr(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    address.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

/// A datagram to send: from which of the loop's sockets (by index), to where, what.
struct Queued {
    socket: usize,
    dest: SocketAddr,
    data: Bytes,
}

/// The send side: datagrams waiting for [`Outbox::send_queued`], in the order they were
/// produced.
#[derive(Default)]
pub(crate) struct Outbox {
    queue: VecDeque<Queued>,
}

/// What [`Outbox::send_queued`] could not do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flush {
    /// Everything queued was given to the kernel (or failed, see `failed`).
    Done,
    /// The socket with this index has no room: wait until it is writable and try again.
    Blocked(usize),
}

impl Outbox {
    /// Queues `data` for `dest` from socket `socket` (an index into the loop's sockets).
    pub(crate) fn push(&mut self, socket: usize, dest: SocketAddr, data: Bytes) {
        self.queue.push_back(Queued { socket, dest, data });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Sends what is queued, in order, a run of datagrams of one socket per system call.
    /// `sent(count)` is told each call's datagrams; `failed(dest, error)` each datagram the
    /// kernel refused (it is dropped: UDP promises nothing more). Stops at a full socket.
    pub(crate) fn send_queued<'s>(
        &mut self,
        socket_of: impl Fn(usize) -> Option<&'s UdpSocket>,
        mut sent: impl FnMut(usize),
        mut failed: impl FnMut(SocketAddr, io::Error),
    ) -> Flush {
        while let Some(front) = self.queue.front() {
            let index = front.socket;
            let Some(socket) = socket_of(index) else {
                // Not one of the loop's sockets: cannot happen, the index came from the loop.
                let dropped = self.queue.pop_front();
                if let Some(dropped) = dropped {
                    failed(dropped.dest, io::ErrorKind::NotFound.into());
                }
                continue;
            };
            let run = self
                .queue
                .iter()
                .take(SEND_BATCH)
                .take_while(|queued| queued.socket == index)
                .count();
            match self.send_run(socket, run) {
                Ok(count) => {
                    sent(count);
                    self.queue.drain(..count);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    return Flush::Blocked(index);
                }
                Err(error) => {
                    // The first datagram of the run was refused (the kernel reports an error
                    // only for the first; later ones are retried by the next call).
                    if let Some(dropped) = self.queue.pop_front() {
                        failed(dropped.dest, error);
                    }
                }
            }
        }
        Flush::Done
    }

    /// Sends the first `run` queued datagrams (all from `socket`); returns how many left.
    fn send_run(&self, socket: &UdpSocket, run: usize) -> io::Result<usize> {
        let first = self.queue.front().ok_or(io::ErrorKind::InvalidInput)?;
        if run == 1 {
            return socket.try_send_to(&first.data, first.dest).map(|_| 1);
        }
        let batch = self.queue.iter().take(run);
        let addrs: Vec<SocketAddrAny> = batch.clone().map(|q| q.dest.into()).collect();
        let slices: Vec<[IoSlice<'_>; 1]> = batch.map(|q| [IoSlice::new(&q.data)]).collect();
        let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
            (0..run).map(|_| SendAncillaryBuffer::default()).collect();
        let mut headers: Vec<MMsgHdr<'_>> = addrs
            .iter()
            .zip(&slices)
            .zip(controls.iter_mut())
            .map(|((addr, slice), control)| MMsgHdr::new_with_addr(addr, slice, control))
            .collect();
        socket.try_io(Interest::WRITABLE, || {
            sendmmsg(socket, &mut headers, SendFlags::DONTWAIT).map_err(io::Error::from)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket tokio knows to be writable (it learns so from the reactor, not at bind).
    async fn bound() -> UdpSocket {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.writable().await.unwrap();
        socket
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn queued_datagrams_come_in_one_batch_in_order() {
        runtime().block_on(async {
            let receiver = bound().await;
            let sender = bound().await;
            let to = receiver.local_addr().unwrap();
            for n in 0..5u8 {
                sender.send_to(&[b'a' + n; 3], to).await.unwrap();
            }
            let mut inbox = Inbox::new();
            // Loopback delivers at once; a batch is whatever is queued at the call.
            let mut got = Vec::new();
            while got.len() < 5 {
                inbox.receive(&receiver).await.unwrap();
                assert!(!inbox.was_full());
                for (data, source) in inbox.datagrams() {
                    assert_eq!(source, sender.local_addr().unwrap());
                    got.push(data.to_vec());
                }
            }
            let expected: Vec<Vec<u8>> = (0..5u8).map(|n| vec![b'a' + n; 3]).collect();
            assert_eq!(got, expected);
        });
    }

    #[test]
    fn more_than_a_batch_fills_it_and_leaves_the_rest_queued() {
        runtime().block_on(async {
            let receiver = bound().await;
            let sender = bound().await;
            let to = receiver.local_addr().unwrap();
            let total = RECV_BATCH + 3;
            for n in 0..total {
                sender.send_to(&n.to_be_bytes(), to).await.unwrap();
            }
            let mut inbox = Inbox::new();
            let mut next = 0usize;
            let mut full_batches = 0;
            while next < total {
                inbox.receive(&receiver).await.unwrap();
                full_batches += usize::from(inbox.was_full());
                for (data, _) in inbox.datagrams() {
                    assert_eq!(data, next.to_be_bytes());
                    next += 1;
                }
            }
            assert_eq!(full_batches, 1);
        });
    }

    #[test]
    fn outbox_sends_in_order_in_one_call_per_run() {
        runtime().block_on(async {
            let a = bound().await;
            let b = bound().await;
            let peer = bound().await;
            let to = peer.local_addr().unwrap();
            let mut outbox = Outbox::default();
            for n in 0..3u8 {
                outbox.push(0, to, Bytes::from(vec![n]));
            }
            outbox.push(1, to, Bytes::from_static(b"b"));
            outbox.push(0, to, Bytes::from_static(b"a"));
            let mut calls = Vec::new();
            let sockets = [&a, &b];
            let flush = outbox.send_queued(
                |index| sockets.get(index).copied(),
                |count| calls.push(count),
                |dest, error| panic!("{dest}: {error}"),
            );
            assert_eq!(flush, Flush::Done);
            assert!(outbox.is_empty());
            assert_eq!(calls, [3, 1, 1]);
            let mut buf = [0u8; 16];
            let mut got = Vec::new();
            for _ in 0..5 {
                let (len, from) = peer.recv_from(&mut buf).await.unwrap();
                got.push((buf[..len].to_vec(), from));
            }
            let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
            assert_eq!(
                got,
                [
                    (vec![0], a_addr),
                    (vec![1], a_addr),
                    (vec![2], a_addr),
                    (b"b".to_vec(), b_addr),
                    (b"a".to_vec(), a_addr),
                ]
            );
        });
    }

    #[test]
    fn a_refused_datagram_is_reported_and_the_rest_still_leave() {
        runtime().block_on(async {
            let socket = bound().await;
            let peer = bound().await;
            let to = peer.local_addr().unwrap();
            let mut outbox = Outbox::default();
            // An IPv6 destination from an IPv4 socket: the kernel refuses it.
            let v6: SocketAddr = "[::1]:9".parse().unwrap();
            outbox.push(0, v6, Bytes::from_static(b"x"));
            outbox.push(0, to, Bytes::from_static(b"y"));
            outbox.push(0, to, Bytes::from_static(b"z"));
            let mut failed = Vec::new();
            let flush = outbox.send_queued(
                |index| (index == 0).then_some(&socket),
                |_| {},
                |dest, _| failed.push(dest),
            );
            assert_eq!(flush, Flush::Done);
            assert_eq!(failed, [v6]);
            let mut buf = [0u8; 4];
            for expected in [b"y", b"z"] {
                let (len, _) = peer.recv_from(&mut buf).await.unwrap();
                assert_eq!(&buf[..len], expected);
            }
        });
    }
}
