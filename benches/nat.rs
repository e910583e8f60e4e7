//! What NAT keep-alives cost event loop 0 with 10k and 100k NATed bindings in a memory
//! store: reading the NATed bindings, the scheduler's bookkeeping, and building the OPTIONS
//! (the bytes the shell then sends).
//! - `keepalive_tick`: one tick, what the loop does at once (`[nat] keepalive_batch` = 100
//!   AORs, 100 probes here).
//! - `keepalive_pass`: every tick of one interval, the total work per interval.
//!
//! Before the rounds were spread (commit 0c9ca41) a round did all the work of a pass at once:
//! this file then measured 30.6 ms (10k) and 379 ms (100k) per round.
//!
//! Run with `cargo bench --bench nat -- --warm-up-time 1 --measurement-time 5`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use moonroute::location::{Binding, LocationStore, MemoryLocation};
use moonroute::nat::keepalive::{self, Action, Scheduler, Settings};
use moonroute::proxy::identity::SentBy;
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

/// The answer every probe of `actions` gets (a healthy deployment: bindings stay), after
/// building its OPTIONS; the bytes built.
fn send_and_answer(scheduler: &mut Scheduler, actions: Vec<Action>) -> usize {
    let mut bytes = 0;
    for action in actions {
        if let Action::SendOptions { peer, seq } = action {
            let branch = moonroute::proxy::via_branch::keepalive(0, seq);
            let source = SentBy::of_socket(peer.local.expect("local"));
            bytes += keepalive::options_request(&peer, &source, &branch, seq, 7).len();
            scheduler.on_response(seq);
        }
    }
    bytes
}

fn bench_keepalives(c: &mut Criterion) {
    let interval = Duration::from_secs(30);
    let settings = Settings {
        interval,
        max_failures: 3,
        batch: 100,
    };
    let mut group = c.benchmark_group("keepalive_tick");
    for n in [10_000, 100_000] {
        let store = store_with(n);
        let start = Instant::now();
        let mut scheduler = Scheduler::new(settings, start);
        group.bench_function(format!("{n}_bindings"), |b| {
            b.iter(|| {
                // The next tick, whenever it is due (passes follow one another).
                let now = scheduler.next_deadline();
                let mut actions = Vec::new();
                scheduler.on_tick(now, &store, SystemTime::now(), &mut actions);
                black_box(send_and_answer(&mut scheduler, actions))
            })
        });
    }
    group.finish();
    let mut group = c.benchmark_group("keepalive_pass");
    group.sample_size(10);
    for n in [10_000, 100_000] {
        let store = store_with(n);
        let start = Instant::now();
        let mut scheduler = Scheduler::new(settings, start);
        group.bench_function(format!("{n}_bindings"), |b| {
            b.iter(|| {
                let pass_start = scheduler.next_deadline();
                let mut bytes = 0;
                let mut now = pass_start;
                // Every tick until the next pass is due.
                while now < pass_start + interval {
                    let mut actions = Vec::new();
                    scheduler.on_tick(now, &store, SystemTime::now(), &mut actions);
                    bytes += send_and_answer(&mut scheduler, actions);
                    now = scheduler.next_deadline();
                }
                black_box(bytes)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_keepalives);
criterion_main!(benches);
