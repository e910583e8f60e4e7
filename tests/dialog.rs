//! A CDR's times (issue 22, `moonroute-proto/src/dialog/`) end to end: the shipped `scripts/default.lua`
//! (digest authentication off), real UDP sockets of 127.0.0.1, CDRs in a temporary data
//! directory. The rest of dialog tracking, call limits and CDRs is checked in the harness
//! (`tests/protocol/dialog.rs`); this one stays on the real clocks because a call's start is
//! stamped by the script's `dlg_manage` with the real wall clock, its answer and end by the
//! event loop's `now`, and the test compares them.
//!
//! Hosts: alice (our user) on 127.0.0.2, bob (registered) on 127.0.0.3.
//!
//! Nothing sleeps: every wait is for a message, bounded by a timeout. A CDR is written before
//! the message that ends its call is relayed, so it is on file once that message arrives.

#[path = "common/cdr.rs"]
mod cdr;
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cdr::{field, number};
use common::ua::{Dialog, TestUa};
use moonroute::config::{Config, LocationBackend};
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::Message;
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;

const DOMAIN: &str = "moonroute.test";
const ALICE_IP: [u8; 4] = [127, 0, 0, 2];
const BOB_IP: [u8; 4] = [127, 0, 0, 3];

struct Running {
    _server: ServerHandle,
    _host: Arc<ScriptHost>,
    udp: SocketAddr,
    dir: TempDir,
}

/// `script` on UDP of 127.0.0.1, two event loops, data (registrations, CDRs) in a fresh
/// directory.
fn start(script: &Path) -> Running {
    let dir = TempDir::new().unwrap();
    let mut config = Config {
        listen: vec!["udp:127.0.0.1:0".parse::<ListenAddr>().unwrap()],
        domains: vec![DOMAIN.to_owned()],
        workers: 2,
        script: script.to_path_buf(),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Memory;
    config.validate().unwrap();
    let host = ScriptHost::from_config(&config).expect("the script loads");
    let factory = CoreFactory::with_router(&config, host.router_factory());
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        _server: server,
        _host: host,
        dir,
    }
}

/// The CDR lines written so far.
fn cdrs(proxy: &Running) -> Vec<String> {
    cdr::lines(proxy.dir.path())
}

fn aor(user: &str) -> String {
    format!("sip:{user}@{DOMAIN}")
}

async fn phone(name: &str, ip: [u8; 4], proxy: &Running, domain: &str) -> TestUa {
    let mut ua = TestUa::udp_on(name, SocketAddr::from((ip, 0))).await;
    ua.from_domain = Some(domain.to_owned());
    ua.outbound = Some(proxy.udp);
    ua
}

async fn registered_bob(proxy: &Running) -> TestUa {
    let mut bob = phone("bob", BOB_IP, proxy, DOMAIN).await;
    bob.request("REGISTER", &aor("bob"))
        .header("Expires", "600")
        .await;
    bob.expect_final(200).await;
    bob
}

/// `caller` calls `callee` at `uri`: INVITE, 180, 200, ACK. The caller's dialog and the
/// callee's.
async fn answered_call(caller: &mut TestUa, callee: &mut TestUa, uri: &str) -> (Dialog, Dialog) {
    caller.invite(uri).await;
    let incoming = callee.expect_request("INVITE").await;
    callee.respond(&incoming, 180, "Ringing").await;
    let answer = callee.respond(&incoming, 200, "OK").await;
    let ok = caller.expect_final(200).await;
    let dialog = caller.ack_2xx(&ok).await;
    callee.expect_request("ACK").await;
    (dialog, Dialog::from_uas(&incoming, &answer))
}

/// A BYE from `from` reaching `to` through the proxy, answered 200.
async fn hang_up(from: &mut TestUa, dialog: &mut Dialog, to: &mut TestUa) -> Message {
    from.bye(dialog).await;
    let bye = to.expect_request("BYE").await;
    to.respond(&bye, 200, "OK").await;
    from.expect_final(200).await;
    bye
}

#[tokio::test]
async fn a_call_hung_up_by_either_side_gives_one_cdr_with_sane_times() {
    let proxy = start(&common::default_script_without_auth());
    let mut bob = registered_bob(&proxy).await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;

    let (mut alices, _) = answered_call(&mut alice, &mut bob, &aor("bob")).await;
    assert!(cdrs(&proxy).is_empty(), "no CDR while the call is up");
    hang_up(&mut alice, &mut alices, &mut bob).await;
    let (_, mut bobs) = answered_call(&mut alice, &mut bob, &aor("bob")).await;
    hang_up(&mut bob, &mut bobs, &mut alice).await;

    let lines = cdrs(&proxy);
    assert_eq!(lines.len(), 2, "one CDR per call: {lines:#?}");
    for (line, (reason, who)) in lines.iter().zip([
        ("\"caller_bye\"", "\"caller\""),
        ("\"callee_bye\"", "\"callee\""),
    ]) {
        assert_eq!(field(line, "reason"), reason, "{line}");
        assert_eq!(field(line, "hangup"), who, "{line}");
        assert_eq!(field(line, "status"), "200", "{line}");
        assert_eq!(
            field(line, "from_uri"),
            format!("\"{}\"", aor("alice")),
            "{line}"
        );
        assert_eq!(field(line, "ruri"), format!("\"{}\"", aor("bob")), "{line}");
        assert!(field(line, "src").starts_with("\"udp:127.0.0.2:"), "{line}");
        let (start, answer, end) = (
            number(line, "start"),
            number(line, "answer"),
            number(line, "end"),
        );
        assert!(start <= answer && answer <= end, "{line}");
        assert!(end - start < 60.0, "the test's calls last seconds: {line}");
        let duration = number(line, "duration");
        assert!((duration - (end - answer)).abs() < 0.002, "{line}");
    }
}
