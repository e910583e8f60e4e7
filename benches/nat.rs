//! What a NAT keep-alive round costs event loop 0 with 10k and 100k NATed bindings in a
//! memory store: reading the NATed bindings, the scheduler's bookkeeping, and building the
//! OPTIONS (the bytes the shell then sends), in time per round.
//!
//! Run with `cargo bench --bench nat -- --warm-up-time 1 --measurement-time 5`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use moonroute::location::{Binding, LocationStore, MemoryLocation};
use moonroute::nat::keepalive::{self, Action, Scheduler};
use moonroute::transport::TransportKind;

/// A memory store with `n` NATed UDP bindings, one per AOR, as `req:fix_nated_contact()`
/// + `req:save()` leave them.
fn store_with(n: usize) -> MemoryLocation {
    let store = MemoryLocation::new(n + 1);
    let expires = SystemTime::now() + Duration::from_secs(86_400);
    for user in 0..n {
        let aor = format!("sip:u{user}@example.com");
        let mut binding = Binding::new(
            &aor,
            &format!(
                "sip:u{user}@192.168.{}.{}:5060",
                user / 250 % 250,
                user % 250 + 1
            ),
            expires,
            1000,
            format!("reg-{user}"),
            1,
        );
        let port = 1024 + (user % 60_000) as u16;
        binding.received = Some((TransportKind::Udp, SocketAddr::from(([127, 0, 0, 2], port))));
        binding.local = Some(SocketAddr::from(([127, 0, 0, 1], 5060)));
        binding.nated = true;
        store.replace(&aor, vec![binding]).expect("fits");
    }
    store
}

fn bench_round(c: &mut Criterion) {
    let mut group = c.benchmark_group("keepalive_round");
    group.sample_size(10);
    for n in [10_000, 100_000] {
        let store = store_with(n);
        let interval = Duration::from_secs(30);
        let start = Instant::now();
        let mut scheduler = Scheduler::new(interval, 3, start);
        let mut now = start;
        group.bench_function(format!("{n}_bindings"), |b| {
            b.iter(|| {
                now += interval;
                let wall = SystemTime::now();
                let peers = keepalive::nated_peers(&store, wall);
                let mut actions = Vec::new();
                scheduler.on_round(now, peers, &mut actions);
                let mut bytes = 0;
                for action in actions {
                    if let Action::SendOptions { peer, seq } = action {
                        let branch = keepalive::branch(0, seq);
                        let local = peer.local.expect("local");
                        bytes += keepalive::options_request(&peer, local, &branch, seq, 7).len();
                        // Answered: the bindings stay, as in a healthy deployment.
                        scheduler.on_response(seq);
                    }
                }
                black_box(bytes)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_round);
criterion_main!(benches);
