//! What the Lua engine costs per request: `ScriptRouter::route` (the `on_request` hook with a
//! userdata request, per-transaction vars and the decision read back) for a proxy script in
//! the style of bench/relay.lua, and for the smallest possible script as a floor; and what a
//! `sip.metrics` counter adds to the floor, cached at top level or looked up per call.
//!
//! Run with `cargo bench --bench script -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use moonroute::proxy::router::{RouteInfo, Router};
use moonroute::script::{Limits, ScriptHost, ScriptRouter, Services};
use moonroute::server::core::LocalIdentity;
use moonroute::sip::Message;
use moonroute::transport::{Meta, TransportKind};

const INVITE: &[u8] = b"INVITE sip:uas@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK776a;rport=5070;received=127.0.0.1\r\n\
Max-Forwards: 70\r\n\
To: <sip:uas@127.0.0.1:5060>\r\n\
From: <sip:uac@127.0.0.1:5070>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:uac@127.0.0.1:5070>\r\n\
Content-Length: 0\r\n\r\n";

const PROXY: &str = r#"
function on_request(req)
  if req:has_to_tag() then
    if req:loose_route() then return req:t_relay() end
    return req:reply(404, "Not Here")
  end
  if req:is_method("MESSAGE") and req.ruri_user == "version" then
    return req:reply(200, "v1")
  end
  req:record_route()
  return req:t_relay("sip:127.0.0.1:5080")
end
"#;

const MINIMAL: &str = "function on_request(req) return req:drop() end";

/// `sip.metrics`: a handle created at top level and incremented in the hook (the documented
/// way), against the same counter looked up in every call.
const METRICS_CACHED: &str = r#"
local seen = sip.metrics.counter("bench_requests_total", {dir = "in"})
function on_request(req) seen:inc() return req:drop() end
"#;

const METRICS_LOOKUP: &str = r#"
function on_request(req)
  sip.metrics.counter("bench_requests_total", {dir = "in"}):inc()
  return req:drop()
end
"#;

fn router(dir: &tempfile::TempDir, name: &str, text: &str) -> ScriptRouter {
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .expect("script written");
    let host = ScriptHost::load(&path, Limits::default(), Arc::new(Services::default()), &[])
        .expect("script loads");
    let identity = LocalIdentity::new(&[], ["127.0.0.1:5060".parse().expect("addr")]);
    ScriptRouter::new(host, identity, 0)
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let invite = Message::parse(Bytes::from_static(INVITE)).expect("parses");
    let meta = Meta {
        kind: TransportKind::Udp,
        source: "127.0.0.1:5070".parse().expect("addr"),
        local: "127.0.0.1:5060".parse().expect("addr"),
        conn: None,
        worker: 0,
    };
    let mut group = c.benchmark_group("script");
    group.throughput(Throughput::Elements(1));
    for (name, text) in [
        ("proxy", PROXY),
        ("minimal", MINIMAL),
        ("metrics_cached", METRICS_CACHED),
        ("metrics_lookup", METRICS_LOOKUP),
    ] {
        let mut router = router(&dir, &format!("{name}.lua"), text);
        group.bench_function(format!("route_{name}"), |b| {
            b.iter(|| {
                let mut request = invite.clone();
                black_box(router.route(&mut request, &meta, RouteInfo::default()))
            })
        });
    }
    group.bench_function("message_clone", |b| b.iter(|| black_box(invite.clone())));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
