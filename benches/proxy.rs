//! Proxy path costs of signed Record-Route (`moonroute-proto/src/proxy/route_sign.rs`): one HMAC when a
//! request is record-routed, one when a response's Record-Route is re-signed for the caller
//! (§16.7 step 8), one when an in-dialog request's Route is checked.
//!
//! Run with `cargo bench --bench proxy -- --warm-up-time 1 --measurement-time 3`. Each group
//! counts one request per iteration.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::SystemTime;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use moonroute::proxy::identity::LocalIdentity;
use moonroute::proxy::{
    forward_copy, preprocess_routes, ForwardSpec, ProxyIdentity, RouteSigner, Verdict,
};
use moonroute::sip::Message;
use moonroute::transport::TransportKind;

const US: &str = "127.0.0.1:5060";
const CALL_ID: &str = "a84b4c76e66710@127.0.0.1";

fn me() -> ProxyIdentity {
    let addr: SocketAddr = US.parse().unwrap();
    ProxyIdentity::new(LocalIdentity::new(&[], [addr])).with_signer(RouteSigner::new(b"bench"))
}

fn message(text: String) -> Message {
    Message::parse(Bytes::from(text)).expect("bench message parses")
}

fn invite() -> Message {
    message(format!(
        "INVITE sip:bob@127.0.0.1:5080 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK776a;rport\r\n\
         Max-Forwards: 70\r\n\
         To: <sip:bob@example.com>\r\n\
         From: <sip:alice@example.com>;tag=1928301774\r\n\
         Call-ID: {CALL_ID}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:alice@127.0.0.1:5062>\r\n\
         Content-Length: 0\r\n\r\n"
    ))
}

/// The callee's 200 as it comes back: our Record-Route (the callee's copy) echoed.
fn ok(signature: &str) -> Message {
    message(format!(
        "SIP/2.0 200 OK\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK776a;rport\r\n\
         Record-Route: <sip:{US};transport=udp;lr;mrs={signature}>\r\n\
         To: <sip:bob@example.com>;tag=b77\r\n\
         From: <sip:alice@example.com>;tag=1928301774\r\n\
         Call-ID: {CALL_ID}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:bob@127.0.0.1:5080>\r\n\
         Content-Length: 0\r\n\r\n"
    ))
}

/// The callee's BYE: to the caller's Contact, the caller's tag in To (the callee's copy).
fn bye(signature: &str) -> Message {
    message(format!(
        "BYE sip:alice@127.0.0.1:5062 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bK9981\r\n\
         Max-Forwards: 70\r\n\
         Route: <sip:{US};transport=udp;lr;mrs={signature}>\r\n\
         From: <sip:bob@example.com>;tag=b77\r\n\
         To: <sip:alice@example.com>;tag=1928301774\r\n\
         Call-ID: {CALL_ID}\r\n\
         CSeq: 1 BYE\r\n\
         Content-Length: 0\r\n\r\n"
    ))
}

fn bench(c: &mut Criterion) {
    let me = me();
    let udp: SocketAddr = US.parse().unwrap();
    let mut group = c.benchmark_group("proxy");
    group.throughput(Throughput::Elements(1));

    let signer = RouteSigner::new(b"bench");
    let request = invite();
    let now = SystemTime::now();
    group.bench_function("sign", |b| {
        b.iter(|| signer.sign_request(black_box(&request), now))
    });

    for record_route in [false, true] {
        let spec = ForwardSpec {
            target: b"sip:bob@127.0.0.1:5080",
            record_route,
            tracked: false,
            inbound: (TransportKind::Udp, udp),
            outbound: (TransportKind::Udp, udp),
            branch: "z9hG4bKbench",
            me: &me,
            now,
        };
        let name = if record_route {
            "forward_copy_record_routed"
        } else {
            "forward_copy"
        };
        group.bench_function(name, |b| {
            b.iter(|| forward_copy(black_box(&request), &spec).unwrap())
        });
    }

    let signature = signer.sign_request(&request, now);
    let answered = ok(&signature);
    group.bench_function("sign_response", |b| {
        b.iter_batched(
            || answered.clone(),
            |mut m| assert!(me.sign_response_record_route(&mut m, now)),
            BatchSize::SmallInput,
        )
    });

    let check = |m: &mut Message| {
        let done = preprocess_routes(m, &me).unwrap();
        me.check_route(m, &done, now)
    };
    let signed = bye(&signature);
    group.bench_function("preprocess_signed_route", |b| {
        b.iter_batched(
            || signed.clone(),
            |mut m| assert_eq!(check(&mut m), Verdict::Valid),
            BatchSize::SmallInput,
        )
    });
    let forged = bye("q6553f100.0123456789abcdef");
    group.bench_function("preprocess_forged_route", |b| {
        b.iter_batched(
            || forged.clone(),
            |mut m| assert_eq!(check(&mut m), Verdict::Mismatch),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
