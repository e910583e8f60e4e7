//! What a refusal of overload control costs a loop, against serving the request: an INVITE
//! refused while the loop sheds (`server::overload`: parse, validation, the stateless 503 with
//! Retry-After, then its ACK absorbed), and the same INVITE and ACK served by
//! scripts/default.lua (no callee registered: the script's answer to an unknown user, about
//! the cheapest way a script ends a new call). Driven through the core, sans-IO: no sockets,
//! no system calls (a real loop adds a receive per datagram and a send per answer to both).
//!
//! The refused group sheds the most the detector ever does (98 %): 2 % of its INVITEs are
//! served. Each INVITE comes from its own address (10.x.y.z) so the script's `pike_check` never
//! trips.
//!
//! Run with `cargo bench --bench overload -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use moonroute::config::{Config, LocationBackend};
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::transport::{
    Input, ListenAddr, LoadSample, Meta, Output, TransportKind, Worker, WorkerFactory,
};

const DOMAIN: &str = "bench.example";

/// scripts/default.lua with digest authentication off, in a temporary file.
fn script(dir: &tempfile::TempDir) -> PathBuf {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/default.lua"))
        .expect("scripts/default.lua");
    let text = text.replacen("local AUTHENTICATE = true", "local AUTHENTICATE = false", 1);
    let path = dir.path().join("default.lua");
    std::fs::write(&path, text).expect("write the script");
    path
}

fn core(script: PathBuf) -> Box<dyn Worker> {
    let mut config = Config {
        listen: vec!["udp:127.0.0.1:5060".parse::<ListenAddr>().unwrap()],
        domains: vec![DOMAIN.to_owned()],
        workers: 1,
        script,
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Memory;
    let host = ScriptHost::from_config(&config).expect("the script loads");
    let factory = CoreFactory::with_router(&config, host.router_factory());
    factory.make_worker(0)
}

fn meta(n: u32) -> Meta {
    Meta {
        kind: TransportKind::Udp,
        source: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), 5062),
        local: "127.0.0.1:5060".parse().unwrap(),
        conn: None,
        worker: 0,
    }
}

fn invite(n: u32) -> Bytes {
    Bytes::from(format!(
        "INVITE sip:bob@{DOMAIN} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {source};branch=z9hG4bK-ovl-{n};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@{DOMAIN}>;tag=a{n}\r\n\
         To: <sip:bob@{DOMAIN}>\r\n\
         Call-ID: ovl-{n}@bench\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:alice@{source}>\r\n\
         Content-Length: 0\r\n\r\n",
        source = meta(n).source
    ))
}

/// The ACK of the final answer to `invite(n)`, whose To tag is `tag`.
fn ack(n: u32, tag: &str) -> Bytes {
    Bytes::from(format!(
        "ACK sip:bob@{DOMAIN} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {source};branch=z9hG4bK-ovl-{n};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@{DOMAIN}>;tag=a{n}\r\n\
         To: <sip:bob@{DOMAIN}>;tag={tag}\r\n\
         Call-ID: ovl-{n}@bench\r\n\
         CSeq: 1 ACK\r\n\
         Content-Length: 0\r\n\r\n",
        source = meta(n).source
    ))
}

/// The To tag of the one answer sent, if any.
fn answer_tag(out: &[Output]) -> Option<String> {
    out.iter().find_map(|o| match o {
        Output::Send { data, .. } => {
            let text = std::str::from_utf8(data).ok()?;
            let to = text.lines().find(|l| l.starts_with("To:"))?;
            Some(to.split_once(";tag=")?.1.trim().to_owned())
        }
        _ => None,
    })
}

/// One call attempt: the INVITE, then the ACK of its answer. The clock advances 1 ms per call
/// and the timers run every 1,000 calls, so finished transactions go (Timer H/I/J) and memory
/// stays bounded.
fn call(core: &mut dyn Worker, n: u32, now: &mut Instant, out: &mut Vec<Output>) {
    *now += Duration::from_millis(1);
    out.clear();
    let data = invite(n);
    core.on_input(
        Input::Message {
            data,
            meta: meta(n),
        },
        *now,
        out,
    );
    if let Some(tag) = answer_tag(out) {
        out.clear();
        core.on_input(
            Input::Message {
                data: ack(n, &tag),
                meta: meta(n),
            },
            *now,
            out,
        );
    }
    if n % 1000 == 0 {
        out.clear();
        core.on_timer(*now, out);
    }
    black_box(&out);
}

/// Saturated samples until the detector sheds its most (no backlog known: it steps up).
fn saturate(core: &mut dyn Worker, now: &mut Instant) {
    let start = *now;
    for interval in 0..=60u32 {
        let at = start + Duration::from_millis(100) * interval;
        core.on_load(LoadSample::new(at, at - start, 0));
    }
    *now = start + Duration::from_secs(6);
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let script = script(&dir);
    let mut group = c.benchmark_group("overload");
    group.throughput(Throughput::Elements(1));
    for (name, shedding) in [
        ("invite_served_by_script", false),
        ("invite_refused_503", true),
    ] {
        let mut core = core(script.clone());
        let mut now = Instant::now();
        if shedding {
            saturate(&mut *core, &mut now);
        }
        let mut out = Vec::new();
        let mut n = 0u32;
        group.bench_function(name, |b| {
            b.iter(|| {
                n = n.wrapping_add(1) % 0x00ff_ffff;
                call(&mut *core, n, &mut now, &mut out);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
