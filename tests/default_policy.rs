//! What the shipped `scripts/default.lua` refuses to do, end to end over real UDP and TCP on
//! loopback (issue 17, items 1 and 6; docs/scripting.md, "Securing a deployment"):
//!
//! - **No relay through a pre-loaded Route.** A stranger who knows a registered AOR sends it a
//!   MESSAGE or an INVITE with `Route: <sip:127.0.0.9...>` (127.0.0.9 stands in for a foreign
//!   host): loose (`;lr`), strict (no `lr`), `;transport=tcp` with a port (a port scan), a host
//!   name (resolved through the test DNS server), and behind an unsigned Route naming us. The
//!   stand-in host receives nothing (no datagram, no connection, no DNS query for its name);
//!   the request goes where its Request-URI says: the registered contact. With digest
//!   authentication on (as shipped) and off, from a stranger on UDP and on TCP. A script
//!   without any Route handling (copied from older docs) is protected by the engine itself.
//! - **The legitimate paths still work**: a contact registered through a Path (RFC 3327) is
//!   reached through it, and only through it; in-dialog requests follow the route set this
//!   server signed, including the hops after it; a peer listed in `ROUTE_PEERS` may pre-load
//!   a Route (loose, strict per RFC 3261 §16.6 steps 6-7, over TCP to a host name), and is
//!   the only one who may.
//! - **Scanners and the trust list**: well-known scanner user agents get no answer (the
//!   `OPTIONS sip:100@us` probe included) and are counted; 127.0.0.1 is not exempt from
//!   flood protection.
//!
//! Nothing sleeps to wait for behaviour: every wait is for a message, bounded by a timeout.
//! Waiting for the absence of a message (the stand-in host, a scanner) comes after the
//! request's fate is known (its answer arrived, from where the request really went), and is
//! bounded too: once per test for the stand-in host.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::auth::{answer_challenge, Answer, Challenge};
use common::dns_server::{DnsServer, Record, RecordType};
use common::flood::Flooder;
use common::ua::{header_text, show, Dialog, Outgoing, TestUa, WAIT};
use moonroute::auth::Subscriber;
use moonroute::config::{Config, LocationBackend};
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::{Message, ResponseBuilder};
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;

const DOMAIN: &str = "moonroute.test";
/// The foreign host's name in the test DNS server.
const FOREIGN_NAME: &str = "foreign.test";
const FOREIGN_IP: [u8; 4] = [127, 0, 0, 9];
const ALICE_IP: [u8; 4] = [127, 0, 0, 2];
const STRANGER_IP: [u8; 4] = [127, 0, 0, 4];
const PEER_IP: [u8; 4] = [127, 0, 0, 5];
const EDGE_IP: [u8; 4] = [127, 0, 0, 6];
const SCANNER_IP: [u8; 4] = [127, 0, 0, 7];
/// How long the stand-in host or a scanner is watched for traffic once the request it could
/// have caused has been answered.
const QUIET: Duration = Duration::from_millis(300);

struct Running {
    _server: ServerHandle,
    host: Arc<ScriptHost>,
    udp: SocketAddr,
    tcp: SocketAddr,
    dns: DnsServer,
    _dir: TempDir,
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn aor(user: &str) -> String {
    format!("sip:{user}@{DOMAIN}")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A server on UDP and TCP of 127.0.0.1 routed by `script`, sled in a fresh data directory,
/// alice provisioned (password `alice-pw`), the test DNS server knowing [`FOREIGN_NAME`];
/// `edit` adjusts the configuration.
fn start(script: &Path, edit: impl FnOnce(&mut Config)) -> Running {
    let dir = TempDir::new().unwrap();
    let dns = DnsServer::start(vec![Record::a(
        FOREIGN_NAME,
        Ipv4Addr::from(FOREIGN_IP),
        300,
    )]);
    let mut config = Config {
        listen: vec![
            "udp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
            "tcp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
        ],
        domains: vec![DOMAIN.to_owned()],
        workers: 2,
        script: script.to_path_buf(),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Sled;
    config.dns = dns.config(1000);
    edit(&mut config);
    config.validate().unwrap();
    let host = ScriptHost::from_config(&config).expect("the script and the stores load");
    let auth = host.services().auth.clone().expect("an authenticator");
    auth.subscribers()
        .add(
            &format!("alice@{DOMAIN}"),
            &Subscriber::with_password("alice", DOMAIN, "alice-pw"),
        )
        .unwrap();
    let factory = CoreFactory::with_router(&config, host.router_factory());
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        tcp: server.local_addr(TransportKind::Tcp).unwrap(),
        _server: server,
        host,
        dns,
        _dir: dir,
    }
}

/// `scripts/default.lua` with `replace` applied (each pair must match once), in `dir`.
fn default_script_with(dir: &TempDir, base: &Path, replace: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(base).unwrap();
    for (from, to) in replace {
        assert_eq!(
            text.matches(from).count(),
            1,
            "the script has `{from}` once"
        );
        text = text.replacen(from, to, 1);
    }
    let path = dir.path().join("policy.lua");
    std::fs::write(&path, text).unwrap();
    path
}

/// Alice on 127.0.0.2 (UDP), registered as `sip:alice@moonroute.test` with `extra` header
/// fields (a Path); answers the digest challenge when the script sends one.
async fn registered_alice(proxy: &Running, extra: &[(&str, &str)]) -> TestUa {
    let mut alice = TestUa::udp_on("alice", SocketAddr::from((ALICE_IP, 0))).await;
    alice.from_domain = Some(DOMAIN.to_owned());
    alice.outbound = Some(proxy.udp);
    let first = register(&mut alice, extra).await;
    let answer = alice.recv_response(WAIT).await;
    let answer = match answer.status() {
        Some(401) => {
            let challenge =
                Challenge::parse(&header_text(&answer, "WWW-Authenticate").expect("a challenge"));
            let credentials = answer_challenge(
                &challenge,
                &Answer {
                    user: "alice",
                    password: "alice-pw",
                    method: "REGISTER",
                    uri: &aor("alice"),
                    nc: 1,
                },
            );
            register(&mut alice, extra)
                .retry_of(&first)
                .header("Authorization", &credentials)
                .await;
            alice.expect_final(200).await
        }
        _ => answer,
    };
    assert_eq!(answer.status(), Some(200), "{}", show(&answer));
    alice
}

/// alice's REGISTER with `extra` header fields.
fn register<'a>(alice: &'a mut TestUa, extra: &[(&str, &str)]) -> Outgoing<'a> {
    let mut request = alice
        .request("REGISTER", &aor("alice"))
        .header("Expires", "600");
    for (name, value) in extra {
        request = request.header(name, value);
    }
    request
}

/// A caller from outside our domains: on 127.0.0.4 over UDP, or over a TCP connection to
/// the server.
async fn stranger(proxy: &Running, tcp: bool) -> TestUa {
    match tcp {
        false => TestUa::udp_on("stranger", SocketAddr::from((STRANGER_IP, 0)))
            .await
            .via_proxy(proxy.udp),
        true => TestUa::tcp("stranger", proxy.tcp).await,
    }
}

// ----- the stand-in foreign host -------------------------------------------------------------

/// Whatever reached the stand-in foreign host.
#[derive(Debug)]
#[allow(dead_code)] // read by Debug, in the failure message
enum Touch {
    Datagram(String),
    Connection(SocketAddr),
}

/// 127.0.0.9 listening on UDP and TCP, recording every datagram and connection.
struct ForeignHost {
    udp_port: u16,
    tcp_port: u16,
    touches: mpsc::UnboundedReceiver<Touch>,
}

impl ForeignHost {
    async fn bind() -> ForeignHost {
        let udp = UdpSocket::bind(SocketAddr::from((FOREIGN_IP, 0)))
            .await
            .unwrap();
        let tcp = TcpListener::bind(SocketAddr::from((FOREIGN_IP, 0)))
            .await
            .unwrap();
        let (udp_port, tcp_port) = (
            udp.local_addr().unwrap().port(),
            tcp.local_addr().unwrap().port(),
        );
        let (tx, touches) = mpsc::unbounded_channel();
        let udp_tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            while let Ok((n, _)) = udp.recv_from(&mut buf).await {
                if udp_tx.send(Touch::Datagram(text(&buf[..n]))).is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            while let Ok((_, peer)) = tcp.accept().await {
                if tx.send(Touch::Connection(peer)).is_err() {
                    return;
                }
            }
        });
        ForeignHost {
            udp_port,
            tcp_port,
            touches,
        }
    }

    /// The Route values a stranger pre-loads towards this host, by name for the failure
    /// message; `us` is the server's own address (an unsigned Route naming it goes first).
    fn routes(&self, us: SocketAddr) -> Vec<(&'static str, String)> {
        let (udp, tcp) = (self.udp_port, self.tcp_port);
        vec![
            ("loose", format!("<sip:127.0.0.9:{udp};lr>")),
            ("strict", format!("<sip:127.0.0.9:{udp}>")),
            (
                "tcp scan",
                format!("<sip:127.0.0.9:{tcp};transport=tcp;lr>"),
            ),
            (
                "strict tcp scan",
                format!("<sip:127.0.0.9:{tcp};transport=tcp>"),
            ),
            ("host name", format!("<sip:{FOREIGN_NAME}:{udp};lr>")),
            (
                "behind our unsigned Route",
                format!("<sip:{us};lr>, <sip:127.0.0.9:{udp};lr>"),
            ),
        ]
    }

    /// Nothing has reached it so far (no wait: attributes a touch to the request that just
    /// had its answer).
    fn assert_untouched_so_far(&mut self, what: &str) {
        if let Ok(touch) = self.touches.try_recv() {
            panic!("{what}: the foreign host was reached: {touch:?}");
        }
    }

    /// Nothing reached it, watched for [`QUIET`] more (once, after the last request).
    async fn assert_untouched(&mut self, what: &str) {
        if let Ok(Some(touch)) = tokio::time::timeout(QUIET, self.touches.recv()).await {
            panic!("{what}: the foreign host was reached: {touch:?}");
        }
    }
}

// ----- the attack -----------------------------------------------------------------------------

/// The stranger sends `method` for alice with `route` pre-loaded: alice (the Request-URI's
/// registered contact) receives it without that Route, answers, and the answer reaches the
/// stranger; nothing reaches the foreign host.
async fn preloaded_route_goes_nowhere(
    stranger: &mut TestUa,
    alice: &mut TestUa,
    foreign: &mut ForeignHost,
    method: &str,
    (name, route): (&str, &str),
) {
    let what = format!(
        "{method} over {} with a {name} Route {route}",
        stranger.name
    );
    let request = match method {
        "INVITE" => stranger.invite(&aor("alice")),
        _ => stranger
            .request(method, &aor("alice"))
            .body("text/plain", "hello"),
    };
    request.header("Route", route).await;
    let incoming = alice.expect_request(method).await;
    assert_eq!(
        incoming.request_uri_bytes(),
        Some(alice.uri().as_bytes()),
        "{what}: the registered contact is the Request-URI\n{}",
        show(&incoming)
    );
    assert!(
        incoming.headers_named("Route").next().is_none(),
        "{what}: the pre-loaded Route is not passed on\n{}",
        show(&incoming)
    );
    let code = if method == "INVITE" { 486 } else { 200 };
    alice.respond(&incoming, code, "Answered").await;
    if method == "INVITE" {
        alice.expect_request("ACK").await;
    }
    stranger.expect_final(code).await;
    foreign.assert_untouched_so_far(&what);
}

/// Every pre-loaded Route of [`ForeignHost::routes`], for MESSAGE and INVITE, from a stranger
/// on UDP and on TCP, against a server routed by `script`: nothing reaches the foreign host,
/// and its name is never even looked up.
async fn no_relay_through_preloaded_routes(script: &Path) {
    let proxy = start(script, |_| {});
    let mut alice = registered_alice(&proxy, &[]).await;
    let mut foreign = ForeignHost::bind().await;
    for tcp in [false, true] {
        let mut stranger = stranger(&proxy, tcp).await;
        stranger.name = if tcp { "tcp" } else { "udp" }.into();
        for method in ["MESSAGE", "INVITE"] {
            for (name, route) in foreign.routes(proxy.udp) {
                preloaded_route_goes_nowhere(
                    &mut stranger,
                    &mut alice,
                    &mut foreign,
                    method,
                    (name, &route),
                )
                .await;
            }
        }
    }
    foreign.assert_untouched("after every request").await;
    assert_eq!(
        proxy.dns.total_queries(),
        0,
        "no name was resolved: {:?}",
        proxy.dns.query_log()
    );
}

#[tokio::test]
async fn the_shipped_policy_never_follows_a_strangers_preloaded_route() {
    no_relay_through_preloaded_routes(&repo_path("scripts/default.lua")).await;
}

#[tokio::test]
async fn without_authentication_neither() {
    no_relay_through_preloaded_routes(&common::default_script_without_auth()).await;
}

/// A script as older docs suggested it (registrar, lookup, t_relay; no Route handling at
/// all): the engine does not follow the stranger's Route either, because the script did not
/// call `req:follow_preloaded_route()`.
#[tokio::test]
async fn a_script_without_route_policy_does_not_become_an_open_relay() {
    let dir = TempDir::new().unwrap();
    let script = dir.path().join("old.lua");
    std::fs::write(
        &script,
        r#"
function on_request(req)
  if req:has_to_tag() then
    if req:loose_route() then return req:t_relay() end
    return req:reply(404)
  end
  if req:is_method("REGISTER") then return req:save("location") end
  if req:lookup("location") == 0 then return req:reply(404) end
  return req:t_relay()
end
"#,
    )
    .unwrap();
    no_relay_through_preloaded_routes(&script).await;
}

// ----- what still works -----------------------------------------------------------------------

/// RFC 3327: alice registered through an edge proxy; a stranger's pre-loaded Route is
/// dropped, her Path is not: the MESSAGE reaches the edge with exactly the Path as Route.
#[tokio::test]
async fn a_registered_path_is_the_only_route_followed() {
    let proxy = start(&repo_path("scripts/default.lua"), |_| {});
    let mut edge = TestUa::udp_on("edge", SocketAddr::from((EDGE_IP, 0))).await;
    let path = format!("<sip:{};lr>", edge.local);
    let alice = registered_alice(&proxy, &[("Path", &path), ("Supported", "path")]).await;
    let mut foreign = ForeignHost::bind().await;
    let mut stranger = stranger(&proxy, false).await;
    for (name, route) in foreign.routes(proxy.udp) {
        stranger
            .request("MESSAGE", &aor("alice"))
            .header("Route", &route)
            .body("text/plain", "hello")
            .await;
        let at_edge = edge.expect_request("MESSAGE").await;
        assert_eq!(
            at_edge.request_uri_bytes(),
            Some(alice.uri().as_bytes()),
            "{name}: the contact is the Request-URI\n{}",
            show(&at_edge)
        );
        let routes: Vec<String> = at_edge.headers_named("Route").map(text).collect();
        assert_eq!(
            routes,
            std::slice::from_ref(&path),
            "{name}: the Path, and only it, is the Route\n{}",
            show(&at_edge)
        );
        edge.respond(&at_edge, 200, "OK").await;
        stranger.expect_final(200).await;
        foreign.assert_untouched_so_far(name);
    }
    foreign.assert_untouched("after every request").await;
}

/// In a dialog this server record-routed, the route set it signed is followed to the end,
/// including a hop after this server (here an edge proxy in front of alice, which
/// Record-Routed above us), for a caller from outside too; a hop the caller adds after ours is
/// not followed (the signature binds the rest of the route set, `moonroute-proto/src/proxy/route_sign.rs`). A
/// hand-written in-dialog request with a foreign Route (with or without an unsigned Route naming
/// us on top) is answered 404 and goes nowhere.
#[tokio::test]
async fn in_dialog_requests_follow_our_signed_route_set_and_nothing_else() {
    let proxy = start(&repo_path("scripts/default.lua"), |_| {});
    let mut alice = registered_alice(&proxy, &[]).await;
    let mut carol = stranger(&proxy, false).await;
    let mut edge = TestUa::udp_on("edge", SocketAddr::from((EDGE_IP, 0))).await;
    let mut foreign = ForeignHost::bind().await;

    carol.invite(&aor("alice")).await;
    let incoming = alice.expect_request("INVITE").await;
    // The 200 as it leaves the edge proxy: the edge's Record-Route above ours.
    let edge_route = format!("<sip:{};lr>", edge.local);
    let ours = header_text(&incoming, "Record-Route").unwrap();
    let ok = ResponseBuilder::new(&incoming, 200, "OK")
        .to_tag(b"alice-edge")
        .header("Record-Route", edge_route.as_bytes())
        .header("Record-Route", ours.as_bytes())
        .header("Contact", format!("<{}>", alice.uri()).as_bytes())
        .build();
    alice.send_raw(&ok, proxy.udp).await;
    let answered = carol.expect_final(200).await;
    let mut dialog = carol.ack_2xx(&answered).await;
    assert_eq!(dialog.route_set.len(), 2, "{:?}", dialog.route_set);
    assert!(
        dialog.route_set[0].contains(";mrs="),
        "{:?}",
        dialog.route_set
    );
    assert_eq!(dialog.route_set[1], edge_route);

    // The route set goes on past us: the ACK and the BYE are relayed to the next hop it names.
    let ack = edge.expect_request("ACK").await;
    assert_eq!(ack.request_uri_bytes(), Some(alice.uri().as_bytes()));
    let mut longer = dialog.clone();
    longer.route_set.push(format!("<sip:{};lr>", alice.local));
    carol.bye(&mut dialog).await;
    let bye = edge.expect_request("BYE").await;
    let routes: Vec<String> = bye.headers_named("Route").map(text).collect();
    assert_eq!(routes, [edge_route], "{}", show(&bye));
    assert_eq!(bye.request_uri_bytes(), Some(alice.uri().as_bytes()));
    edge.respond(&bye, 200, "OK").await;
    carol.expect_final(200).await;
    // A hop the caller added after the signed route set: not followed.
    longer.local_cseq = dialog.local_cseq;
    carol.bye(&mut longer).await;
    carol.expect_final(404).await;

    // A stranger's own "dialog": a To tag and a Route of its choosing, sent to us.
    for (n, (name, route)) in foreign.routes(proxy.udp).into_iter().enumerate() {
        let mut forged = Dialog {
            call_id: format!("forged-{n}@127.0.0.4"),
            local_tag: "mine".into(),
            remote_tag: "forged".into(),
            local: format!("<sip:carol@{}>;tag=mine", carol.local),
            remote: format!("<{}>;tag=forged", aor("alice")),
            route_set: Vec::new(),
            remote_target: alice.uri(),
            local_cseq: 1,
            remote_cseq: None,
        };
        carol
            .in_dialog("MESSAGE", &mut forged)
            .header("Route", &route)
            .body("text/plain", "hello")
            .to(proxy.udp)
            .await;
        carol.expect_final(404).await;
        foreign.assert_untouched_so_far(name);
    }
    foreign.assert_untouched("after every request").await;
}

/// `ROUTE_PEERS` opens the pre-loaded Route for one peer: its Route is followed after the
/// lookup (loose: the contact stays the Request-URI; strict: RFC 3261 §16.6 steps 6-7, the
/// strict router's URI becomes the Request-URI, the contact goes to the end of Route, and the
/// strict router is where it is sent; over TCP to a host name, resolved). A stranger sending
/// the same Route to the same server still reaches alice, not that host.
#[tokio::test]
async fn a_route_peer_may_preload_a_route_and_nobody_else_may() {
    let dir = TempDir::new().unwrap();
    let script = default_script_with(
        &dir,
        &repo_path("scripts/default.lua"),
        &[(
            "local ROUTE_PEERS = {}",
            r#"local ROUTE_PEERS = { ["127.0.0.5"] = true }"#,
        )],
    );
    let proxy = start(&script, |_| {});
    let mut alice = registered_alice(&proxy, &[]).await;
    let mut peer = TestUa::udp_on("peer", SocketAddr::from((PEER_IP, 0)))
        .await
        .via_proxy(proxy.udp);
    let mut next = TestUa::udp_on("next", SocketAddr::from((FOREIGN_IP, 0))).await;
    let mut next_tcp = TestUa::tcp_listener_on("next", SocketAddr::from((FOREIGN_IP, 0))).await;
    let routes = |m: &Message| -> Vec<String> { m.headers_named("Route").map(text).collect() };

    // Loose: the peer's next hop, alice's contact as the Request-URI.
    let loose = format!("<sip:{};lr>", next.local);
    peer.request("MESSAGE", &aor("alice"))
        .header("Route", &loose)
        .body("text/plain", "loose")
        .await;
    let at_next = next.expect_request("MESSAGE").await;
    assert_eq!(at_next.request_uri_bytes(), Some(alice.uri().as_bytes()));
    assert_eq!(routes(&at_next), [loose], "{}", show(&at_next));
    next.respond(&at_next, 200, "OK").await;
    peer.expect_final(200).await;

    // Strict: rewritten once, sent to the strict router (not past it to the contact).
    let strict = format!("sip:{}", next.local);
    peer.request("MESSAGE", &aor("alice"))
        .header("Route", &format!("<{strict}>"))
        .body("text/plain", "strict")
        .await;
    let at_next = next.expect_request("MESSAGE").await;
    assert_eq!(
        at_next.request_uri_bytes(),
        Some(strict.as_bytes()),
        "{}",
        show(&at_next)
    );
    assert_eq!(
        routes(&at_next),
        [format!("<{}>", alice.uri())],
        "{}",
        show(&at_next)
    );
    next.respond(&at_next, 200, "OK").await;
    peer.expect_final(200).await;

    // TCP to a host name: resolved through DNS, a connection opened.
    let port = next_tcp.local.port();
    let named = format!("<sip:{FOREIGN_NAME}:{port};transport=tcp;lr>");
    peer.request("MESSAGE", &aor("alice"))
        .header("Route", &named)
        .body("text/plain", "named")
        .await;
    let at_next = next_tcp.expect_request("MESSAGE").await;
    assert_eq!(at_next.request_uri_bytes(), Some(alice.uri().as_bytes()));
    next_tcp.respond(&at_next, 200, "OK").await;
    peer.expect_final(200).await;
    assert!(proxy.dns.queries(FOREIGN_NAME, RecordType::A) >= 1);

    // The same Routes from a stranger: removed, the MESSAGEs go to alice; the first message
    // she ever gets is the stranger's (none of the peer's reached her).
    let mut stranger = stranger(&proxy, false).await;
    for route in [loose_route_of(&next), format!("<{strict}>"), named] {
        stranger
            .request("MESSAGE", &aor("alice"))
            .header("Route", &route)
            .body("text/plain", "stranger")
            .await;
        let incoming = alice.expect_request("MESSAGE").await;
        assert_eq!(text(incoming.body()), "stranger", "{}", show(&incoming));
        assert!(routes(&incoming).is_empty(), "{}", show(&incoming));
        alice.respond(&incoming, 200, "OK").await;
        stranger.expect_final(200).await;
    }
}

fn loose_route_of(ua: &TestUa) -> String {
    format!("<sip:{};lr>", ua.local)
}

/// Requests whose User-Agent names a well-known scanner get no answer, whatever they are
/// (`OPTIONS sip:100@us` included: a user part makes it a request for the script, RFC 3261
/// §11), and each counts in `scanner_requests_dropped_total`; the same address with an
/// ordinary User-Agent is served (scanners are dropped, not banned: behind a gateway the
/// address is everyone's).
#[tokio::test]
async fn scanners_get_no_answer_and_are_counted() {
    // One event loop: the scanner's request is handled before the probe sent after it, so the
    // probe's answer proves the scanner's request has had its fate.
    let proxy = start(&repo_path("scripts/default.lua"), |c| c.workers = 1);
    let dropped = proxy.host.services().metrics.counter(
        "scanner_requests_dropped_total",
        "Requests from well-known SIP scanners (User-Agent) that scripts/default.lua dropped.",
    );
    let mut scanner = TestUa::udp_on("scanner", SocketAddr::from((SCANNER_IP, 0)))
        .await
        .via_proxy(proxy.udp);
    let server_uri = format!("sip:{}", proxy.udp);
    let probes = [
        (
            "OPTIONS",
            format!("sip:100@{}", proxy.udp),
            "friendly-scanner",
        ),
        ("REGISTER", aor("100"), "sipvicious"),
        ("INVITE", aor("alice"), "SIPVicious/0.3.4"),
        ("MESSAGE", aor("alice"), "VaxSIPUserAgent/3.1"),
        ("INVITE", aor("100"), "sipcli/v1.8"),
    ];
    for (n, (method, ruri, agent)) in probes.iter().enumerate() {
        scanner
            .request(method, ruri)
            .header("User-Agent", agent)
            .await;
        let probe = scanner.options(&server_uri).await;
        let answer = scanner.recv_response(WAIT).await;
        assert_eq!(
            answer.call_id().ok(),
            probe.call_id().ok(),
            "{agent}: its {method} was answered\n{}",
            show(&answer)
        );
        assert_eq!(answer.status(), Some(200));
        assert_eq!(dropped.get(), n as u64 + 1, "{agent}");
    }
    // An ordinary user agent on the same address: answered (404: nobody is registered).
    scanner
        .request("MESSAGE", &aor("100"))
        .header("User-Agent", "Linphone/5.2")
        .await;
    scanner.expect_final(404).await;
    assert_eq!(dropped.get(), probes.len() as u64);
}

/// The shipped trust list is empty: a source on 127.0.0.1 (where a local TLS terminator,
/// WebSocket gateway or SBC puts every client) is rate-limited and banned like any other.
#[tokio::test]
async fn loopback_is_not_exempt_from_flood_protection() {
    const LIMIT: u32 = 20;
    // One event loop: requests are handled in the order they arrive, so the witness's answer
    // (sent after the flood, from another address) proves the flood has been handled.
    let proxy = start(&repo_path("scripts/default.lua"), |c| {
        c.workers = 1;
        c.pike.max_requests = LIMIT;
        // One window for the whole test, however slow the machine.
        c.pike.window_ms = 60_000;
        // What is tested is the script's ban, not the engine's receive-lag shedding.
        c.limits.overload_after_ms = 0;
    });
    let mut guesser = Flooder::bind([127, 0, 0, 1], DOMAIN).await;
    for _ in 0..3 * LIMIT {
        guesser.send(proxy.udp, "alice").await;
    }
    let mut witness = Flooder::bind(STRANGER_IP, DOMAIN).await;
    witness.send(proxy.udp, "alice").await;
    assert_eq!(witness.answer(WAIT).await, Some(407));
    // Each request within the limit was challenged (407: the From claims our domain).
    for n in 0..LIMIT {
        let status = guesser.answer(WAIT).await;
        assert_eq!(status, Some(407), "answer {n}");
    }
    let ban = proxy
        .host
        .services()
        .kv
        .get("ipban:127.0.0.1", Instant::now());
    assert!(ban.is_some(), "127.0.0.1 is banned");
    assert_eq!(
        guesser.answer(QUIET).await,
        None,
        "nothing over the limit is answered"
    );
}
