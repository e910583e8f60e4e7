//! Codec throughput: what one core can parse, validate, edit and serialize per second.
//!
//! Run with `cargo bench --bench codec -- --warm-up-time 1 --measurement-time 3`. Every group
//! counts one message per iteration, so criterion reports messages/s next to the time.

use std::hint::black_box;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use moonroute::sip::Message;

mod messages;
use messages::{invite, SDP};

/// A UA registering one contact (RFC 5626 instance id), before any authentication.
fn register() -> Bytes {
    Bytes::from_static(
        b"REGISTER sip:registrar.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKnashds7;rport\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@example.com>\r\n\
From: Bob <sip:bob@example.com>;tag=456248\r\n\
Call-ID: 843817637684230@998sdasdh09\r\n\
CSeq: 1826 REGISTER\r\n\
Contact: <sip:bob@127.0.0.1:5062;transport=udp>;expires=3600;\
+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\"\r\n\
Expires: 3600\r\n\
User-Agent: bench-phone/1.0\r\n\
Content-Length: 0\r\n\
\r\n",
    )
}

const PEER: &str = "127.0.0.1:5060";
const OUR_VIA: &[u8] = b"SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK.bench.0001";
const OUR_RR: &[u8] = b"<sip:127.0.0.1:5070;lr>";
const NEXT_HOP: &[u8] = b"sip:bob@127.0.0.1:5080";

/// The per-request work of a forwarding proxy (RFC 3261 §16.6, §18.2.1), ending with the bytes
/// ready for the socket in a buffer that is reused across requests.
fn proxy(data: &Bytes, peer: SocketAddr, out: &mut BytesMut) {
    let mut m = Message::parse(data.clone()).unwrap();
    m.validate().unwrap();
    m.stamp_received(peer).unwrap();
    let hops = m.max_forwards().map_or(Ok(70), |r| r).unwrap();
    m.prepend_header("Via", OUR_VIA).unwrap();
    m.prepend_header("Record-Route", OUR_RR).unwrap();
    let mut digits = [0u8; 3];
    m.set_header("Max-Forwards", decimal(hops.saturating_sub(1), &mut digits))
        .unwrap();
    m.set_request_uri(NEXT_HOP).unwrap();
    out.clear();
    m.write_to(out);
}

/// Formats without the allocation of `to_string`, which is not the codec's cost.
fn decimal(n: u8, buf: &mut [u8; 3]) -> &[u8] {
    let mut i = 3;
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + n % 10;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

fn codec(c: &mut Criterion) {
    let invite = invite();
    let register = register();
    eprintln!(
        "INVITE: {} bytes (body {}), REGISTER: {} bytes",
        invite.len(),
        SDP.len(),
        register.len()
    );
    assert!((650..=750).contains(&invite.len()), "{}", invite.len());
    assert!((400..=500).contains(&register.len()), "{}", register.len());
    let peer: SocketAddr = PEER.parse().unwrap();

    // The proxied form must be a valid message, or the benchmark measures an error path.
    let mut out = BytesMut::with_capacity(2048);
    proxy(&invite, peer, &mut out);
    let forwarded = Message::parse(out.clone().freeze()).unwrap();
    forwarded.validate().unwrap();
    assert_eq!(forwarded.request_uri_bytes(), Some(NEXT_HOP));
    Message::parse(register.clone())
        .unwrap()
        .validate()
        .unwrap();

    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("invite", |b| {
        b.iter(|| Message::parse(black_box(invite.clone())).unwrap())
    });
    g.bench_function("register", |b| {
        b.iter(|| Message::parse(black_box(register.clone())).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("parse_validate");
    g.throughput(Throughput::Elements(1));
    g.bench_function("invite", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(invite.clone())).unwrap();
            m.validate().unwrap();
            m
        })
    });
    g.finish();

    let mut g = c.benchmark_group("proxy");
    g.throughput(Throughput::Elements(1));
    g.bench_function("invite", |b| {
        b.iter(|| {
            proxy(black_box(&invite), peer, &mut out);
            black_box(out.len())
        })
    });
    g.finish();

    let parsed = Message::parse(invite.clone()).unwrap();
    let mut g = c.benchmark_group("serialize");
    g.throughput(Throughput::Elements(1));
    g.bench_function("unedited", |b| b.iter(|| black_box(&parsed).to_bytes()));
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
