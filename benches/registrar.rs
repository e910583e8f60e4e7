//! What a registration costs the registrar and the location store, without the network:
//! `Registrar::save` (the §10.3 rules, the in-memory index, and for sled the write of the
//! AOR's record, not the flush: flushes are shared by many registrations, see
//! `bench/register.sh` for the end-to-end figure), and `lookup` (what routing an INVITE to a
//! registered user costs).
//!
//! Run with `cargo bench --bench registrar -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use moonroute::location::{LocationStore, MemoryLocation, SledLocation};
use moonroute::registrar::{Registrar, Rules};
use moonroute::sip::Message;
use moonroute::transport::{Meta, TransportKind};

/// Distinct AORs the benchmark cycles through (each save after the first round refreshes).
const USERS: usize = 10_000;

fn register(user: usize, cseq: u64) -> Message {
    let text = format!(
        "REGISTER sip:127.0.0.1:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK{user}x{cseq};rport=5070;received=127.0.0.1\r\n\
         Max-Forwards: 70\r\n\
         To: <sip:u{user}@127.0.0.1:5060>\r\n\
         From: <sip:u{user}@127.0.0.1:5060>;tag=r{user}\r\n\
         Call-ID: reg-{user}@127.0.0.1\r\n\
         CSeq: {cseq} REGISTER\r\n\
         Contact: <sip:u{user}@127.0.0.1:5070>;expires=3600\r\n\
         User-Agent: bench\r\n\
         Content-Length: 0\r\n\r\n"
    );
    Message::parse(Bytes::from(text)).expect("parses")
}

fn bench_store(c: &mut Criterion, name: &str, store: Arc<dyn LocationStore>) {
    let registrar = Registrar::new(store, Rules::default());
    let meta = Meta {
        kind: TransportKind::Udp,
        source: "127.0.0.1:5070".parse().expect("addr"),
        local: "127.0.0.1:5060".parse().expect("addr"),
        conn: None,
        worker: 0,
    };
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    let mut next = 0u64;
    group.bench_function("save", |b| {
        b.iter_batched(
            || {
                // Parsing is the codec benchmark's business: the request is built outside the
                // measurement. The CSeq grows, so every save is a write (a new binding in the
                // first round, a refresh after).
                next += 1;
                register(next as usize % USERS, next)
            },
            |request| {
                let result = registrar.save(&request, &meta, SystemTime::now());
                black_box(result.code)
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("lookup", |b| {
        let mut user = 0usize;
        b.iter(|| {
            user = (user + 1) % USERS;
            let aor = format!("sip:u{user}@127.0.0.1:5060");
            black_box(registrar.lookup(&aor, SystemTime::now()).len())
        })
    });
    group.finish();
}

fn bench(c: &mut Criterion) {
    bench_store(c, "memory", Arc::new(MemoryLocation::new(1_000_000)));
    let dir = tempfile::tempdir().expect("tempdir");
    let (sled, _) =
        SledLocation::open(dir.path(), 1_000_000, 16 << 20, SystemTime::now()).expect("opens");
    bench_store(c, "sled", Arc::new(sled));
}

criterion_group!(benches, bench);
criterion_main!(benches);
