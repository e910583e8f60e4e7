//! One transaction, one dialog, one event loop (RFC 3261 §17.2.3: a request matches its server
//! transaction by branch, sent-by and method, whatever port or connection it comes from): the
//! real server with 2 and 4 event loops relaying to a callee, and copies of a caller's requests
//! sent from other real sockets (other ports, other TCP connections), which the kernel spreads
//! over the loops.
//!
//! Nothing sleeps. Where a test must show that something was *not* forwarded, each copy is
//! followed, from the same socket, by a MESSAGE of the same Call-ID (a barrier): the copy and
//! its barrier take the same path through the server (the same receiving loop, the same
//! hand-over queue, the same owner), so when the callee has received every barrier, anything
//! the copies caused has reached it first.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use common::ua::{derived_request, expect_status, next_frame, show, TestUa, WAIT};
use moonroute::config::Config;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::{HeaderName, Message};
use moonroute::transport::{ListenAddr, TransportKind};

/// Sockets (so source ports) the copies come from.
const OTHER_PORTS: usize = 8;

/// The proxy as an open relay to the Request-URI, with `loops` event loops, on UDP and TCP.
fn start(loops: usize) -> ServerHandle {
    let mut config = Config {
        listen: vec![
            "udp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
            "tcp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
        ],
        workers: loops,
        ..Config::default()
    };
    config.proxy.relay_to_request_uri = true;
    Server::start(&config, Arc::new(CoreFactory::new(&config))).expect("server starts")
}

async fn other_sockets() -> Vec<UdpSocket> {
    let mut sockets = Vec::with_capacity(OTHER_PORTS);
    for _ in 0..OTHER_PORTS {
        sockets.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    sockets
}

/// A MESSAGE to `callee` in the Call-ID of `original`, from `local` (its Via): a new
/// transaction the proxy relays, numbered `n`.
fn barrier(original: &Message, callee: &str, local: SocketAddr, n: usize) -> String {
    let call_id = String::from_utf8_lossy(original.call_id().unwrap()).into_owned();
    format!(
        "MESSAGE {callee} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-barrier-{n}-{};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:copier@{local}>;tag=b{n}\r\nTo: <{callee}>\r\n\
         Call-ID: {call_id}\r\nCSeq: {} MESSAGE\r\nContent-Length: 0\r\n\r\n",
        local.port(),
        100 + n
    )
}

/// Sends `copy` to `proxy` from every socket, each followed by a barrier; the callee must then
/// receive the barriers and nothing else (each answered 200).
async fn copies_then_barriers(
    copy: &[u8],
    original: &Message,
    proxy: SocketAddr,
    callee: &mut TestUa,
) {
    let sockets = other_sockets().await;
    for (n, socket) in sockets.iter().enumerate() {
        socket.send_to(copy, proxy).await.unwrap();
        let barrier = barrier(original, &callee.uri(), socket.local_addr().unwrap(), n);
        socket.send_to(barrier.as_bytes(), proxy).await.unwrap();
    }
    for _ in 0..OTHER_PORTS {
        let request = callee.recv_request(WAIT).await;
        assert_eq!(
            request.method().unwrap().as_str(),
            "MESSAGE",
            "{}: only the barriers reach the callee, got\n{}",
            callee.name,
            show(&request)
        );
        callee.respond(&request, 200, "OK").await;
    }
}

async fn retransmissions_from_other_ports_reach_the_callee_once(loops: usize) {
    let server = start(loops);
    let proxy = server.local_addr(TransportKind::Udp).unwrap();
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let mut bob = TestUa::udp("bob").await;
    bob.absorb_retransmissions = false;

    let invite = alice.invite(&bob.uri()).await;
    let incoming = bob.expect_request("INVITE").await;
    copies_then_barriers(invite.source_bytes(), &invite, proxy, &mut bob).await;

    // The call goes on as if nothing had happened.
    bob.respond(&incoming, 200, "OK").await;
    let answer = alice.expect_final(200).await;
    let mut dialog = alice.ack_2xx(&answer).await;
    bob.expect_request("ACK").await;
    alice.bye(&mut dialog).await;
    let bye = bob.expect_request("BYE").await;
    bob.respond(&bye, 200, "OK").await;
    alice.expect_final(200).await;
    server.shutdown();
}

#[tokio::test]
async fn retransmissions_from_8_ports_reach_the_callee_once_with_1_loop() {
    retransmissions_from_other_ports_reach_the_callee_once(1).await;
}

#[tokio::test]
async fn retransmissions_from_8_ports_reach_the_callee_once_with_2_loops() {
    retransmissions_from_other_ports_reach_the_callee_once(2).await;
}

#[tokio::test]
async fn retransmissions_from_8_ports_reach_the_callee_once_with_4_loops() {
    retransmissions_from_other_ports_reach_the_callee_once(4).await;
}

async fn stray_acks_from_other_ports_are_absorbed(loops: usize) {
    let server = start(loops);
    let proxy = server.local_addr(TransportKind::Udp).unwrap();
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    alice.auto_ack = false;
    let mut bob = TestUa::udp("bob").await;

    let invite = alice.invite(&bob.uri()).await;
    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 486, "Busy Here").await;
    let busy = alice.expect_final(486).await;
    // The proxy's own ACK of the 486, hop by hop (§17.1.1.3).
    let hop_ack = bob.expect_request("ACK").await;
    assert_eq!(
        hop_ack.top_via().unwrap().branch(),
        incoming.top_via().unwrap().branch()
    );

    // The caller's ACK of the 486 (same branch as its INVITE), from 8 other ports: each one
    // matches the INVITE's server transaction and ends there.
    let ack = derived_request(&invite, "ACK", busy.header(HeaderName::To));
    copies_then_barriers(ack.as_bytes(), &invite, proxy, &mut bob).await;
    server.shutdown();
}

#[tokio::test]
async fn stray_acks_from_8_ports_are_absorbed_with_2_loops() {
    stray_acks_from_other_ports_are_absorbed(2).await;
}

#[tokio::test]
async fn stray_acks_from_8_ports_are_absorbed_with_4_loops() {
    stray_acks_from_other_ports_are_absorbed(4).await;
}

/// Calls per CANCEL test: each CANCEL comes from a new port or connection, which the kernel
/// puts on a loop other than the INVITE's with probability (loops-1)/loops each time.
const CANCEL_ROUNDS: usize = 4;

/// An INVITE from `alice` to `bob` through the proxy, ringing: the INVITE sent and as received.
async fn ringing_call(alice: &mut TestUa, bob: &mut TestUa) -> (Message, Message) {
    let invite = alice.invite(&bob.uri()).await;
    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 180, "Ringing").await;
    alice.expect_response(100).await;
    alice.expect_response(180).await;
    (invite, incoming)
}

/// The rest of a call cancelled from elsewhere, once the canceller got `ok`: it is the 200 to
/// the CANCEL; the callee gets the CANCEL, answers it 200 and the INVITE 487 (§9.2), and gets
/// the proxy's ACK of the 487; the caller gets the 487.
async fn cancel_completes(
    ok: &Message,
    alice: &mut TestUa,
    bob: &mut TestUa,
    incoming_invite: &Message,
) {
    expect_status(ok, 200);
    assert_eq!(ok.cseq().unwrap().method.as_str(), "CANCEL");
    let cancel = bob.expect_request("CANCEL").await;
    bob.respond(&cancel, 200, "OK").await;
    bob.respond(incoming_invite, 487, "Request Terminated")
        .await;
    bob.expect_request("ACK").await;
    alice.expect_final(487).await;
}

async fn cancel_from_another_port(loops: usize) {
    let server = start(loops);
    let proxy = server.local_addr(TransportKind::Udp).unwrap();
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let mut bob = TestUa::udp("bob").await;
    for _ in 0..CANCEL_ROUNDS {
        let (invite, incoming) = ringing_call(&mut alice, &mut bob).await;
        let canceller = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let cancel = derived_request(&invite, "CANCEL", invite.header(HeaderName::To));
        canceller.send_to(cancel.as_bytes(), proxy).await.unwrap();
        // The CANCEL's Via asks for rport: its 200 goes to the port it came from (RFC 3581).
        let mut buf = vec![0u8; 65535];
        let (len, _) = tokio::time::timeout(WAIT, canceller.recv_from(&mut buf))
            .await
            .expect("a 200 to the CANCEL from its own port")
            .unwrap();
        let ok = Message::parse(Bytes::copy_from_slice(&buf[..len])).unwrap();
        cancel_completes(&ok, &mut alice, &mut bob, &incoming).await;
    }
    server.shutdown();
}

#[tokio::test]
async fn cancel_from_another_port_gets_200_and_487_with_2_loops() {
    cancel_from_another_port(2).await;
}

#[tokio::test]
async fn cancel_from_another_port_gets_200_and_487_with_4_loops() {
    cancel_from_another_port(4).await;
}

/// Reads one framed message from `stream`.
async fn read_message(stream: &mut TcpStream, buf: &mut BytesMut) -> Message {
    let read = async {
        loop {
            if let Some(frame) = next_frame(buf) {
                return Message::parse(frame).expect("a framed message parses");
            }
            let n = stream.read_buf(buf).await.expect("read");
            assert!(n > 0, "the proxy closed the connection");
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("a message on the connection")
}

async fn cancel_on_another_connection(loops: usize) {
    let server = start(loops);
    let proxy = server.local_addr(TransportKind::Tcp).unwrap();
    let mut alice = TestUa::tcp("alice", proxy).await;
    let mut bob = TestUa::udp("bob").await;
    for _ in 0..CANCEL_ROUNDS {
        let (invite, incoming) = ringing_call(&mut alice, &mut bob).await;
        let mut second = TcpStream::connect(proxy).await.unwrap();
        let cancel = derived_request(&invite, "CANCEL", invite.header(HeaderName::To));
        second.write_all(cancel.as_bytes()).await.unwrap();
        // §18.2.2: the 200 goes back on the connection the CANCEL came in on.
        let ok = read_message(&mut second, &mut BytesMut::new()).await;
        // The 487 comes on the INVITE's connection.
        cancel_completes(&ok, &mut alice, &mut bob, &incoming).await;
    }
    server.shutdown();
}

#[tokio::test]
async fn cancel_on_another_tcp_connection_gets_200_and_487_with_2_loops() {
    cancel_on_another_connection(2).await;
}

#[tokio::test]
async fn cancel_on_another_tcp_connection_gets_200_and_487_with_4_loops() {
    cancel_on_another_connection(4).await;
}
