//! Proxy request path costs of signed Record-Route (`src/proxy/route_sign.rs`): one HMAC when
//! a request is record-routed, one or two when an in-dialog request's Route is checked.
//!
//! Run with `cargo bench --bench proxy -- --warm-up-time 1 --measurement-time 3`. Each group
//! counts one request per iteration.

use std::hint::black_box;
use std::net::SocketAddr;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use moonroute::proxy::{forward_copy, preprocess_routes, ForwardSpec, ProxyIdentity, RouteSigner};
use moonroute::server::core::LocalIdentity;
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

/// The callee's BYE: the caller's tag is in To, so verification tries From first, then To.
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
    group.bench_function("sign", |b| {
        b.iter(|| signer.sign(black_box(CALL_ID.as_bytes()), black_box(b"1928301774")))
    });

    let request = invite();
    for record_route in [false, true] {
        let spec = ForwardSpec {
            target: b"sip:bob@127.0.0.1:5080",
            record_route,
            inbound: (TransportKind::Udp, udp),
            outbound: (TransportKind::Udp, udp),
            branch: "z9hG4bKbench",
            me: &me,
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

    let signature = signer.sign(CALL_ID.as_bytes(), b"1928301774");
    let signed = bye(&signature);
    group.bench_function("preprocess_signed_route", |b| {
        b.iter_batched(
            || signed.clone(),
            |mut m| assert!(preprocess_routes(&mut m, &me).unwrap().signed),
            BatchSize::SmallInput,
        )
    });
    let forged = bye("0123456789abcdef");
    group.bench_function("preprocess_forged_route", |b| {
        b.iter_batched(
            || forged.clone(),
            |mut m| assert!(!preprocess_routes(&mut m, &me).unwrap().signed),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
