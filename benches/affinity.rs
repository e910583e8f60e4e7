//! The receiving loop's part of loop affinity (`server::affinity`): finding a request's Call-ID
//! without parsing it (`sip::prescan`) and hashing it to its loop, against the full parse it
//! spares a loop that hands the request over. What the hand-over itself costs (queue, waking the
//! other loop) is measured on the real shell by `examples/hand_over_cost.rs`.
//!
//! Run with `cargo bench --bench affinity -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use moonroute::server::affinity::loop_of_call_id;
use moonroute::sip::{prescan, Message};

mod messages;
use messages::invite;

/// The `codec` bench's INVITE (Call-ID after six header lines) with its Call-ID moved last of
/// 16 header lines, in compact form: the longest search a realistic request makes.
fn invite_call_id_last() -> Bytes {
    let text = String::from_utf8(invite().to_vec()).unwrap();
    let text = text
        .replace("Call-ID: a84b4c76e66710@127.0.0.1\r\n", "")
        .replace(
            "Content-Length:",
            "i: a84b4c76e66710@127.0.0.1\r\nContent-Length:",
        );
    Bytes::from(text)
}

fn affinity(c: &mut Criterion) {
    let invite = invite();
    let late = invite_call_id_last();
    for message in [&invite, &late] {
        let parsed = Message::parse(message.clone()).unwrap();
        assert_eq!(prescan::call_id(message), Some(parsed.call_id().unwrap()));
    }
    let mut g = c.benchmark_group("affinity");
    g.throughput(Throughput::Elements(1));
    g.bench_function("prescan_call_id", |b| {
        b.iter(|| prescan::call_id(black_box(&invite)))
    });
    g.bench_function("prescan_call_id_last", |b| {
        b.iter(|| prescan::call_id(black_box(&late)))
    });
    g.bench_function("owner_of_invite_4_loops", |b| {
        b.iter(|| {
            let message = black_box(&invite);
            (!prescan::is_response(message))
                .then(|| prescan::call_id(message).map(|id| loop_of_call_id(id, 4)))
        })
    });
    g.bench_function("full_parse_spared", |b| {
        b.iter(|| Message::parse(black_box(invite.clone())).unwrap())
    });
    g.finish();
}

criterion_group!(benches, affinity);
criterion_main!(benches);
