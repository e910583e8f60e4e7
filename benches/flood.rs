//! What `req:pike_check()` costs in the rate limiter itself ([`moonroute::flood::Pike`]): one
//! check of a source already tracked, checks spread over 10,000 sources (a table bigger than
//! the caches), and the same with several threads checking at once (the event loops share the
//! limiter through its 32 mutex shards). Also `req:sanity()`'s checks on an INVITE.
//!
//! Run with `cargo bench --bench flood -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use moonroute::flood::{Pike, PikeRules};
use moonroute::sip::Message;

const SOURCES: u32 = 10_000;

fn source(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

/// A limit no benchmark reaches, so every check takes the common path.
fn pike() -> Pike {
    Pike::new(PikeRules {
        window: Duration::from_secs(2),
        max_requests: u32::MAX,
        max_tracked: 100_000,
    })
}

fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("pike");
    group.throughput(Throughput::Elements(1));
    let limiter = pike();
    let now = Instant::now();
    group.bench_function("check_one_source", |b| {
        b.iter(|| black_box(limiter.check(black_box(source(1)), now)))
    });
    let limiter = pike();
    let mut n = 0u32;
    group.bench_function("check_10k_sources", |b| {
        b.iter(|| {
            n = (n + 1) % SOURCES;
            black_box(limiter.check(source(n), now))
        })
    });
    group.finish();
}

/// `threads` threads each checking `per_thread` requests over the 10,000 sources at once;
/// the time is the wall time of the slowest, per check of one thread.
fn contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("pike_contended");
    group.throughput(Throughput::Elements(1));
    for threads in [2usize, 4] {
        group.bench_function(format!("{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                let limiter = Arc::new(pike());
                let start = Arc::new(Barrier::new(threads + 1));
                let workers: Vec<_> = (0..threads)
                    .map(|t| {
                        let limiter = limiter.clone();
                        let start = start.clone();
                        std::thread::spawn(move || {
                            let now = Instant::now();
                            start.wait();
                            for i in 0..iters {
                                let n = (i as u32).wrapping_mul(7919).wrapping_add(t as u32);
                                black_box(limiter.check(source(n % SOURCES), now));
                            }
                        })
                    })
                    .collect();
                start.wait();
                let began = Instant::now();
                for worker in workers {
                    worker.join().unwrap();
                }
                began.elapsed()
            })
        });
    }
    group.finish();
}

const INVITE: &[u8] = b"INVITE sip:uas@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK776a;rport=5070;received=127.0.0.1\r\n\
Max-Forwards: 70\r\n\
To: <sip:uas@127.0.0.1:5060>\r\n\
From: <sip:uac@127.0.0.1:5070>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:uac@127.0.0.1:5070>\r\n\
Content-Length: 0\r\n\r\n";

fn sanity(c: &mut Criterion) {
    let message = Message::parse(Bytes::from_static(INVITE)).unwrap();
    c.bench_function("sanity_invite", |b| {
        b.iter(|| black_box(moonroute::flood::sanity::check(black_box(&message))))
    });
}

criterion_group!(benches, single_thread, contended, sanity);
criterion_main!(benches);
