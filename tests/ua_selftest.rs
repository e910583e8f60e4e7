//! The test user agent (`tests/common/ua.rs`) against itself, without the proxy: two UAs talk
//! directly over UDP and over TCP, so a proxy test that fails can be trusted to fail because of
//! the proxy.

mod common;

use std::time::Duration;

use common::ua::{expect_status, header_text, TestUa, WAIT};
use moonroute::sip::HeaderName;

/// INVITE / 180 / 200 / ACK / BYE / 200 between `alice` and `bob`, whatever the transport.
async fn basic_call(alice: &mut TestUa, bob: &mut TestUa) {
    let invite = alice.invite(&bob.uri()).await;

    let incoming = bob.expect_request("INVITE").await;
    assert_eq!(incoming.body(), invite.body(), "the SDP offer arrives");
    assert_eq!(incoming.max_forwards().unwrap().unwrap(), 70);
    let via = incoming.top_via().unwrap();
    assert!(via.is_rfc3261_branch());
    assert!(via.rport().is_some(), "the UAC asks for rport");
    bob.respond(&incoming, 180, "Ringing").await;
    let ok = bob.respond(&incoming, 200, "OK").await;

    let ringing = alice.expect_response(180).await;
    let answer = alice.expect_response(200).await;
    let to_tag = ok.to().unwrap().tag().unwrap().to_vec();
    assert_eq!(
        ringing.to().unwrap().tag(),
        Some(&to_tag[..]),
        "one To tag per dialog"
    );
    assert!(
        answer.body().starts_with(b"v=0"),
        "the 2xx carries an SDP answer"
    );
    let mut dialog = alice.ack_2xx(&answer).await;
    assert_eq!(dialog.remote_target, bob.uri());
    assert!(dialog.route_set.is_empty());

    let ack = bob.expect_request("ACK").await;
    assert_eq!(ack.cseq().unwrap().seq, invite.cseq().unwrap().seq);
    assert_ne!(
        ack.top_via().unwrap().branch(),
        invite.top_via().unwrap().branch(),
        "the ACK of a 2xx is a transaction of its own"
    );
    assert_eq!(ack.request_uri_bytes(), Some(bob.uri().as_bytes()));

    let bye = alice.bye(&mut dialog).await;
    let incoming_bye = bob.expect_request("BYE").await;
    assert_eq!(
        incoming_bye.cseq().unwrap().seq,
        invite.cseq().unwrap().seq + 1
    );
    assert_eq!(incoming_bye.to().unwrap().tag(), Some(&to_tag[..]));
    assert_eq!(incoming_bye.call_id().unwrap(), invite.call_id().unwrap());
    bob.respond(&incoming_bye, 200, "OK").await;
    let bye_ok = alice.expect_response(200).await;
    assert_eq!(bye_ok.cseq().unwrap(), bye.cseq().unwrap());
}

#[tokio::test]
async fn call_over_udp() {
    let mut alice = TestUa::udp("alice").await;
    let mut bob = TestUa::udp("bob").await;
    basic_call(&mut alice, &mut bob).await;
}

#[tokio::test]
async fn call_over_tcp() {
    let mut bob = TestUa::tcp_listener("bob").await;
    let mut alice = TestUa::tcp("alice", bob.local).await;
    basic_call(&mut alice, &mut bob).await;
}

#[tokio::test]
async fn callee_hangs_up_over_tcp_on_the_same_connection() {
    let mut bob = TestUa::tcp_listener("bob").await;
    let mut alice = TestUa::tcp("alice", bob.local).await;
    alice.invite(&bob.uri()).await;
    let invite = bob.expect_request("INVITE").await;
    let ok = bob.respond(&invite, 200, "OK").await;
    let answer = alice.expect_response(200).await;
    alice.ack_2xx(&answer).await;
    bob.expect_request("ACK").await;

    let mut dialog = common::ua::Dialog::from_uas(&invite, &ok);
    assert_eq!(dialog.remote_target, alice.uri());
    bob.bye(&mut dialog).await;
    let bye = alice.expect_request("BYE").await;
    assert_eq!(bye.from().unwrap().tag(), ok.to().unwrap().tag());
    alice.respond(&bye, 200, "OK").await;
    bob.expect_response(200).await;
}

#[tokio::test]
async fn cancel_of_a_ringing_call() {
    let mut alice = TestUa::udp("alice").await;
    let mut bob = TestUa::udp("bob").await;
    let invite = alice.invite(&bob.uri()).await;
    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 180, "Ringing").await;
    alice.expect_response(180).await;

    alice.cancel(&invite).await;
    let cancel = bob.expect_request("CANCEL").await;
    assert_eq!(
        cancel.top_via().unwrap().branch(),
        incoming.top_via().unwrap().branch()
    );
    assert_eq!(cancel.cseq().unwrap().seq, incoming.cseq().unwrap().seq);
    assert_eq!(cancel.request_uri_bytes(), incoming.request_uri_bytes());
    bob.respond(&cancel, 200, "OK").await;
    bob.respond(&incoming, 487, "Request Terminated").await;

    // The two answers travel in order on one socket: 200 (CANCEL), then 487 (INVITE).
    let cancel_ok = alice.expect_response(200).await;
    assert_eq!(cancel_ok.cseq().unwrap().method.as_str(), "CANCEL");
    let terminated = alice.expect_response(487).await;
    assert_eq!(terminated.cseq().unwrap().method.as_str(), "INVITE");

    let ack = bob.expect_request("ACK").await;
    assert_eq!(
        ack.top_via().unwrap().branch(),
        incoming.top_via().unwrap().branch()
    );
    assert_eq!(ack.to().unwrap().tag(), terminated.to().unwrap().tag());
}

#[tokio::test]
async fn busy_is_acked_automatically_and_its_retransmission_absorbed() {
    let mut alice = TestUa::udp("alice").await;
    let mut bob = TestUa::udp("bob").await;
    let invite = alice.invite(&bob.uri()).await;
    let incoming = bob.expect_request("INVITE").await;
    let busy = bob.respond(&incoming, 486, "Busy Here").await;
    alice.expect_response(486).await;
    let ack = bob.expect_request("ACK").await;
    assert_eq!(
        ack.top_via().unwrap().branch(),
        invite.top_via().unwrap().branch()
    );
    assert_eq!(ack.request_uri_bytes(), invite.request_uri_bytes());
    assert_eq!(ack.cseq().unwrap().seq, invite.cseq().unwrap().seq);

    // A retransmitted 486 is ACKed again but not handed to the test: the next response alice
    // sees is the answer to the OPTIONS she sends after it.
    bob.send_raw(busy.source_bytes(), alice.local).await;
    bob.absorb_retransmissions = false; // to see the repeated ACK
    alice.options(&bob.uri()).await;
    let options = bob.expect_request("OPTIONS").await;
    bob.respond_with(&options, 200, "OK", &[("Allow", "INVITE, ACK, BYE")])
        .await;
    let ok = alice.recv_response(WAIT).await;
    expect_status(&ok, 200);
    assert_eq!(ok.cseq().unwrap().method.as_str(), "OPTIONS");
    assert_eq!(
        header_text(&ok, "Allow").as_deref(),
        Some("INVITE, ACK, BYE")
    );
    assert!(ok.has(HeaderName::Contact), "a 2xx carries Contact");
    let ack_again = bob.expect_request("ACK").await;
    assert_eq!(
        ack_again.top_via().unwrap().branch(),
        invite.top_via().unwrap().branch()
    );
}

#[tokio::test]
async fn retransmitted_request_is_absorbed_and_answered_again() {
    let mut alice = TestUa::udp("alice").await;
    let mut bob = TestUa::udp("bob").await;
    let options = alice.options(&bob.uri()).await;
    let incoming = bob.expect_request("OPTIONS").await;
    bob.respond(&incoming, 200, "OK").await;
    alice.expect_response(200).await;

    alice.send_raw(options.source_bytes(), bob.local).await;
    // The retransmission is answered with the same 200, which alice absorbs as a repeat; the
    // next request bob sees is the MESSAGE sent after it.
    alice
        .request("MESSAGE", &bob.uri())
        .body("text/plain", "hi")
        .await;
    let message = bob.recv_request(Duration::from_secs(5)).await;
    assert_eq!(message.method().unwrap().as_str(), "MESSAGE");
    assert_eq!(&message.body()[..], b"hi");
}
