//! What the dispatcher costs per call: `Dispatcher::select` for each algorithm over a set of
//! 3 and of 16 active destinations (the hash algorithms with the key taken from an INVITE by
//! `hash_key`), and `req:ds_select` + `req:t_relay()` in a script, or `sip.ds.select` with the
//! first URI as `req.du`, against the same script relaying to a fixed URI (the difference is
//! what the dispatcher adds to a routed call).
//!
//! Run with `cargo bench --bench dispatcher -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use moonroute::dispatcher::algorithm::ALGORITHMS;
use moonroute::dispatcher::{hash_key, DestinationConfig, Dispatcher, Rules, SetConfig};
use moonroute::proxy::identity::LocalIdentity;
use moonroute::proxy::router::{RouteInfo, Router};
use moonroute::script::{Limits, ScriptHost, ScriptRouter, Services};
use moonroute::sip::Message;
use moonroute::transport::{Meta, TransportKind};

const INVITE: &[u8] = b"INVITE sip:+15551234@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK776a;rport=5070;received=127.0.0.1\r\n\
Max-Forwards: 70\r\n\
To: <sip:+15551234@127.0.0.1:5060>\r\n\
From: <sip:uac@127.0.0.1:5070>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:uac@127.0.0.1:5070>\r\n\
Content-Length: 0\r\n\r\n";

const DS_SELECT: &str = r#"
function on_request(req)
  local destination = req:ds_select(1, "call_id")
  if not destination then return req:reply(503, "Service Unavailable") end
  return req:t_relay()
end
function on_failure(req, res)
  if req:ds_next(res.status) then return req:t_relay() end
end
"#;

/// `sip.ds.select` (the ordered URIs as a Lua table) with the first as `req.du`: Kamailio's
/// `ds_select_dst`, the Request-URI untouched.
const SIP_DS_SELECT: &str = r#"
function on_request(req)
  local order = sip.ds.select(1, "call_id", req.call_id)
  if not order then return req:reply(503, "Service Unavailable") end
  req.du = order[1]
  return req:t_relay()
end
function on_failure(req, res)
end
"#;

const FIXED: &str = r#"
function on_request(req)
  return req:t_relay("sip:127.0.0.1:5080")
end
function on_failure(req, res)
end
"#;

/// Probing off: every destination is active.
fn dispatcher(size: usize) -> Dispatcher {
    let rules = Rules {
        interval: None,
        ..Rules::default()
    };
    let set = SetConfig {
        id: 1,
        destinations: (0..size)
            .map(|i| DestinationConfig {
                uri: format!("sip:10.0.{}.{}:5060", i / 250, i % 250 + 1),
                weight: 1 + (i % 3) as u32,
                priority: (i % 4) as i32,
                attrs: String::new(),
            })
            .collect(),
    };
    Dispatcher::new(rules, vec![set], None).expect("valid set")
}

fn select(c: &mut Criterion) {
    let invite = Message::parse(Bytes::from_static(INVITE)).expect("parses");
    let mut group = c.benchmark_group("ds_select");
    group.throughput(Throughput::Elements(1));
    for size in [3, 16] {
        let dispatcher = dispatcher(size);
        for algorithm in ALGORITHMS {
            group.bench_function(format!("{}_{size}", algorithm.name()), |b| {
                b.iter(|| {
                    let key = hash_key(algorithm, black_box(&invite));
                    black_box(dispatcher.select(1, algorithm, key.as_deref()))
                })
            });
        }
    }
    group.finish();
}

fn router(dir: &tempfile::TempDir, name: &str, text: &str) -> ScriptRouter {
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .expect("script written");
    let services = Services {
        dispatcher: Arc::new(dispatcher(3)),
        ..Services::default()
    };
    let host = ScriptHost::load(&path, Limits::default(), Arc::new(services), &[]).expect("loads");
    let identity = LocalIdentity::new(&[], ["127.0.0.1:5060".parse().expect("addr")]);
    ScriptRouter::new(host, identity, 0)
}

fn script(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let invite = Message::parse(Bytes::from_static(INVITE)).expect("parses");
    let meta = Meta {
        kind: TransportKind::Udp,
        source: "127.0.0.1:5070".parse().expect("addr"),
        local: "127.0.0.1:5060".parse().expect("addr"),
        conn: None,
        worker: 0,
    };
    let mut group = c.benchmark_group("ds_script");
    group.throughput(Throughput::Elements(1));
    for (name, text) in [
        ("route_ds_select", DS_SELECT),
        ("route_sip_ds_select_du", SIP_DS_SELECT),
        ("route_fixed", FIXED),
    ] {
        let mut router = router(&dir, &format!("{name}.lua"), text);
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut request = invite.clone();
                let routed = router.route(&mut request, &meta, RouteInfo::default());
                // The relay releases the transaction's state when it ends (and the call
                // counted at the destination with it).
                if let Some(handle) = routed.handle {
                    router.release(handle);
                }
                black_box(routed.decision)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, select, script);
criterion_main!(benches);
