//! What the Lua engine costs per request: `ScriptRouter::route` (the `on_request` hook with a
//! userdata request, per-transaction vars and the decision read back) for a proxy script in
//! the style of bench/relay.lua, and for the smallest possible script as a floor; and what a
//! `sip.metrics` counter adds to the floor, cached at top level or looked up per call; and a
//! REGISTER of a new AOR through the shipped `scripts/default.lua` without authentication (as
//! `bench/compare.sh` runs it: 127.0.0.1 trusted) into an in-memory registrar, the whole
//! `on_request` of a registration (flood and scanner checks, `req:sanity()`, `nat_detect`,
//! `is_myself`, `save`) without the network or the disk; and the rest of a call through that
//! script, as `bench/callgrind.sh calls` runs it (`default_*`): an INVITE to a registered
//! user (flood, scanner and sanity checks, `nat_detect`, `is_myself` twice, `record_route`,
//! `dlg_manage`, `lookup`, `t_relay`), the ACK and BYE loose-routed on our signed Route
//! (`loose_route`, `dlg_known`), and `on_reply` for the 180 and 200 (`res:nat_detect()`).
//!
//! Run with `cargo bench --bench script -- --warm-up-time 1 --measurement-time 3`.

use std::cell::RefCell;
use std::hint::black_box;
use std::io::Write;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use moonroute::dialog::{DialogTable, Limits as DialogLimits, Profiles, SharedTable};
use moonroute::location::MemoryLocation;
use moonroute::proxy::identity::LocalIdentity;
use moonroute::proxy::route_sign::Verdict;
use moonroute::proxy::router::{ReplySource, RouteInfo, Router};
use moonroute::registrar::{AorRule, Registrar, Rules};
use moonroute::script::{Limits, ScriptHost, ScriptRouter, Services};
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
/// Ten field reads and two method look-ups on `req` (the userdata's `__index`): what a field
/// read costs over [`MINIMAL`].
const FIELDS: &str = r#"
function on_request(req)
  local a, b, c, d, e = req.method, req.ruri_user, req.from_tag, req.call_id, req.cseq
  local f, g, h, i, j = req.src_port, req.transport, req.ruri_port, req.to_tag, req.cseq_method
  if req:has_to_tag() then return req:reply(500) end
  return req:drop()
end
"#;

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
    router_with(dir, name, text, Services::default())
}

fn router_with(
    dir: &tempfile::TempDir,
    name: &str,
    text: &str,
    services: Services,
) -> ScriptRouter {
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .expect("script written");
    let host =
        ScriptHost::load(&path, Limits::default(), Arc::new(services), &[]).expect("script loads");
    ScriptRouter::new(host, identity(), 0)
}

fn identity() -> LocalIdentity {
    LocalIdentity::new(&[], ["127.0.0.1:5060".parse().expect("addr")])
}

/// scripts/default.lua as bench/lib.sh's `default_script_without_auth` makes it.
fn default_without_auth() -> String {
    let text = include_str!("../scripts/default.lua");
    assert!(
        text.contains("\nlocal TRUSTED = {}\n") && text.contains("\nlocal AUTHENTICATE = true\n")
    );
    text.replace(
        "\nlocal TRUSTED = {}\n",
        "\nlocal TRUSTED = { [\"127.0.0.1\"] = true }\n",
    )
    .replace(
        "\nlocal AUTHENTICATE = true\n",
        "\nlocal AUTHENTICATE = false\n",
    )
}

/// A REGISTER of `sip:u<user>@127.0.0.1` (bench/register_uac.xml's).
fn register(user: u64) -> Message {
    let text = format!(
        "REGISTER sip:127.0.0.1:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-r{user};rport=5070;received=127.0.0.1\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:u{user}@127.0.0.1:5060>;tag=t{user}\r\n\
         To: <sip:u{user}@127.0.0.1:5060>\r\n\
         Call-ID: reg-{user}@127.0.0.1\r\n\
         CSeq: 1 REGISTER\r\n\
         Contact: <sip:u{user}@127.0.0.1:5070>\r\n\
         Expires: 3600\r\n\
         User-Agent: SIPp register bench\r\n\
         Content-Length: 0\r\n\r\n"
    );
    Message::parse(Bytes::from(text)).expect("parses")
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
        ("fields", FIELDS),
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

    let registrar = Registrar::new(Arc::new(MemoryLocation::new(10_000_000)), Rules::default())
        .with_aor_rule(AorRule::new(identity()));
    let services = Services {
        registrar: Some(Arc::new(registrar)),
        ..Services::default()
    };
    let mut router = router_with(&dir, "default.lua", &default_without_auth(), services);
    let mut user = 0;
    group.bench_function("route_default_register", |b| {
        b.iter_batched(
            || {
                // A new AOR each time (a write, as in bench/register.sh), parsed outside the
                // measurement.
                user += 1;
                register(user)
            },
            |mut request| black_box(router.route(&mut request, &meta, RouteInfo::default())),
            BatchSize::SmallInput,
        )
    });
    bench_default_call(&mut group, &dir, &meta);
    group.finish();
}

/// An in-dialog request of the call (`method`, CSeq `cseq`), with the To tag the callee gave.
fn in_dialog(method: &str, cseq: u32) -> Message {
    let text = format!(
        "{method} sip:uas@127.0.0.1:5080 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{method}{cseq};rport=5070;received=127.0.0.1\r\n\
         Max-Forwards: 70\r\n\
         To: <sip:uas@127.0.0.1:5060>;tag=callee-1\r\n\
         From: <sip:uac@127.0.0.1:5070>;tag=1928301774\r\n\
         Call-ID: a84b4c76e66710@127.0.0.1\r\n\
         CSeq: {cseq} {method}\r\n\
         Content-Length: 0\r\n\r\n"
    );
    Message::parse(Bytes::from(text)).expect("parses")
}

/// A response of the callee (127.0.0.1:5080) to [`INVITE`].
fn response(status: &str) -> Message {
    let text = format!(
        "SIP/2.0 {status}\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-proxy\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK776a;rport=5070;received=127.0.0.1\r\n\
         To: <sip:uas@127.0.0.1:5060>;tag=callee-1\r\n\
         From: <sip:uac@127.0.0.1:5070>;tag=1928301774\r\n\
         Call-ID: a84b4c76e66710@127.0.0.1\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:uas@127.0.0.1:5080>\r\n\
         Content-Length: 0\r\n\r\n"
    );
    Message::parse(Bytes::from(text)).expect("parses")
}

fn dialog_table() -> SharedTable {
    Rc::new(RefCell::new(DialogTable::new(
        DialogLimits::default(),
        Profiles::new(),
    )))
}

/// The requests and responses of one call through `default.lua` without auth, to `uas`
/// registered at 127.0.0.1:5080, with dialog tracking.
fn bench_default_call(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dir: &tempfile::TempDir,
    meta: &Meta,
) {
    let registrar = Registrar::new(Arc::new(MemoryLocation::new(1000)), Rules::default())
        .with_aor_rule(AorRule::new(identity()));
    let mut uas = register(0);
    uas = Message::parse(Bytes::from(
        String::from_utf8_lossy(&uas.to_bytes())
            .replace("u0@127.0.0.1:5070", "uas@127.0.0.1:5080")
            .replace("u0@", "uas@"),
    ))
    .expect("parses");
    let saved = registrar.save(&uas, meta, std::time::SystemTime::now());
    assert!(saved.is_success(), "uas registered");
    let services = Services {
        registrar: Some(Arc::new(registrar)),
        ..Services::default()
    };
    let mut router = router_with(dir, "default-call.lua", &default_without_auth(), services);
    router.attach_dialogs(dialog_table());
    let invite = Message::parse(Bytes::from_static(INVITE)).expect("parses");
    let mut calls = 0u64;
    group.bench_function("default_invite", |b| {
        b.iter_batched(
            || {
                // A new call each time (its own Call-ID, for dlg_manage); a fresh dialog table
                // before the limit of the default one.
                calls += 1;
                let text = String::from_utf8_lossy(INVITE)
                    .replace("a84b4c76e66710@", &format!("c{calls}@"));
                let fresh_table = calls % 50_000 == 0;
                (
                    Message::parse(Bytes::from(text)).expect("parses"),
                    fresh_table,
                )
            },
            |(mut request, fresh_table)| {
                if fresh_table {
                    router.attach_dialogs(dialog_table());
                }
                let routed = router.route(&mut request, meta, RouteInfo::default());
                if let Some(handle) = routed.handle {
                    router.release(handle);
                }
                black_box(routed.decision)
            },
            BatchSize::SmallInput,
        )
    });
    let signed = RouteInfo {
        had_route: true,
        consumed_own_route: true,
        own_route_signed: true,
        signature: Verdict::Valid,
        ..RouteInfo::default()
    };
    for (name, method, cseq) in [("default_ack", "ACK", 1), ("default_bye", "BYE", 2)] {
        let request = in_dialog(method, cseq);
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut request = request.clone();
                let routed = router.route(&mut request, meta, signed);
                if let Some(handle) = routed.handle {
                    router.release(handle);
                }
                black_box(routed.decision)
            })
        });
    }
    let mut request = invite.clone();
    let handle = router
        .route(&mut request, meta, RouteInfo::default())
        .handle
        .expect("on_reply keeps the INVITE's state");
    let source = ReplySource {
        meta: Meta {
            source: "127.0.0.1:5080".parse().expect("addr"),
            ..*meta
        },
        sent_to: "127.0.0.1:5080".parse().expect("addr"),
    };
    for (name, status) in [
        ("default_on_reply_180", "180 Ringing"),
        ("default_on_reply_200", "200 OK"),
    ] {
        let res = response(status);
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut res = res.clone();
                black_box(router.on_reply(handle, &request, &mut res, Some(source)))
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
