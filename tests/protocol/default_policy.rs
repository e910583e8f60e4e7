//! What the shipped `scripts/default.lua` refuses to do, in the harness over UDP and TCP
//! agents (issue 17, items 1 and 6; docs/scripting.md, "Securing a deployment"):
//!
//! - **No relay through a pre-loaded Route.** A stranger who knows a registered AOR sends it a
//!   MESSAGE or an INVITE with `Route: <sip:127.0.0.9...>` (127.0.0.9 stands in for a foreign
//!   host): loose (`;lr`), strict (no `lr`), `;transport=tcp` with a port (a port scan), a host
//!   name (in the harness's DNS), and behind an unsigned Route naming us. The stand-in host
//!   receives nothing (the server sends nothing there, no datagram, no connection, and never
//!   asks the DNS for its name); the request goes where its Request-URI says: the registered
//!   contact. With digest authentication on (as shipped) and off, from a stranger on UDP and
//!   on TCP. A script without any Route handling (copied from older docs) is protected by the
//!   engine itself.
//! - **The legitimate paths still work**: a contact registered through a Path (RFC 3327) is
//!   reached through it, and only through it; in-dialog requests follow the route set this
//!   server signed, including the hops after it; a peer listed in `ROUTE_PEERS` may pre-load
//!   a Route (loose, strict per RFC 3261 §16.6 steps 6-7, over TCP to a host name), and is
//!   the only one who may.
//! - **Scanners and the trust list**: well-known scanner user agents get no answer (the
//!   `OPTIONS sip:100@us` probe included) and are counted; 127.0.0.1 is not exempt from
//!   flood protection.
//!
//! The server keeps registrations in sled (a REGISTER is answered once on disk, which the
//! harness waits for) and alice's password in its subscriber store.

use std::net::SocketAddr;

use moonroute::auth::Subscriber;
use moonroute::sip::ResponseBuilder;

use super::common_auth::{answer_challenge, Answer, Challenge};
use super::common_ua::header_text;
use super::harness::{
    config, default_script_without_auth, show, Config, Harness, LocationBackend, Message, UaId,
};
use super::ua::Dialog;

const DOMAIN: &str = "moonroute.test";
/// The foreign host's name in the harness's DNS.
const FOREIGN_NAME: &str = "foreign.test";
/// The stand-in foreign host: a UDP agent and a TCP agent, which must receive nothing.
const FOREIGN_UDP: &str = "127.0.0.9:5060";
const FOREIGN_TCP: &str = "127.0.0.9:5061";
const ALICE: &str = "127.0.0.2:5060";
const STRANGER: &str = "127.0.0.4:5060";
const STRANGER_TCP: &str = "127.0.0.4:5070";
const PEER: &str = "127.0.0.5:5060";
const EDGE: &str = "127.0.0.6:5060";
const SCANNER: &str = "127.0.0.7:5060";

fn aor(user: &str) -> String {
    format!("sip:{user}@{DOMAIN}")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn shipped_script() -> String {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/default.lua");
    std::fs::read_to_string(shipped).expect("scripts/default.lua")
}

/// A server on UDP and TCP routed by `script`, sled in its data directory, alice provisioned
/// (password `alice-pw`), the DNS knowing [`FOREIGN_NAME`]; `edit` adjusts the
/// configuration.
fn start(script: &str, edit: impl FnOnce(&mut Config)) -> Harness {
    let mut config = config();
    config.domains = vec![DOMAIN.to_owned()];
    config.location.store = LocationBackend::Sled;
    edit(&mut config);
    config.validate().unwrap();
    let mut h = Harness::with_script(&config, script);
    let auth = h
        .script()
        .services()
        .auth
        .clone()
        .expect("an authenticator");
    auth.subscribers()
        .add(
            &format!("alice@{DOMAIN}"),
            &Subscriber::with_password("alice", DOMAIN, "alice-pw"),
        )
        .unwrap();
    h.dns_a
        .insert(FOREIGN_NAME.to_owned(), [127, 0, 0, 9].into());
    h
}

/// `scripts/default.lua` with `replace` applied (each pair must match once).
fn default_script_with(base: String, replace: &[(&str, &str)]) -> String {
    let mut text = base;
    for (from, to) in replace {
        assert_eq!(
            text.matches(from).count(),
            1,
            "the script has `{from}` once"
        );
        text = text.replacen(from, to, 1);
    }
    text
}

/// Alice on 127.0.0.2 (UDP), registered as `sip:alice@moonroute.test` with `extra` header
/// fields (a Path); answers the digest challenge when the script sends one.
fn registered_alice(h: &mut Harness, extra: &[(&str, &str)]) -> UaId {
    let alice = h.add_ua_via_proxy("alice", ALICE);
    h.ua(alice).from_domain = Some(DOMAIN.to_owned());
    let first = register(h, alice, extra, None);
    let answer = h.recv_response(alice);
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
            register(h, alice, extra, Some((&first, &credentials)));
            h.expect_final(alice, 200)
        }
        _ => answer,
    };
    assert_eq!(answer.status(), Some(200), "{}", show(&answer));
    alice
}

/// alice's REGISTER with `extra` header fields, sent; with `retry`, a retry of the first one
/// with its credentials.
fn register(
    h: &mut Harness,
    alice: UaId,
    extra: &[(&str, &str)],
    retry: Option<(&Message, &str)>,
) -> Message {
    let mut request = h
        .ua(alice)
        .request("REGISTER", &aor("alice"))
        .header("Expires", "600");
    for (name, value) in extra {
        request = request.header(name, value);
    }
    if let Some((first, credentials)) = retry {
        request = request.retry_of(first).header("Authorization", credentials);
    }
    request.send()
}

/// A caller from outside our domains: on 127.0.0.4 over UDP, or over TCP.
fn stranger(h: &mut Harness, tcp: bool) -> UaId {
    match tcp {
        false => h.add_ua_via_proxy("stranger", STRANGER),
        true => h.add_tcp_ua("stranger", STRANGER_TCP),
    }
}

// ----- the stand-in foreign host -------------------------------------------------------------

/// 127.0.0.9 with a UDP agent and a TCP agent, both to stay untouched.
struct ForeignHost {
    udp: UaId,
    tcp: UaId,
}

impl ForeignHost {
    fn bind(h: &mut Harness) -> ForeignHost {
        let udp = h.add_ua("foreign", FOREIGN_UDP);
        let tcp = h.add_tcp_ua("foreign-tcp", FOREIGN_TCP);
        ForeignHost { udp, tcp }
    }

    /// The Route values a stranger pre-loads towards this host, by name for the failure
    /// message; `us` is the server's own address (an unsigned Route naming it goes first).
    fn routes(&self, us: SocketAddr) -> Vec<(&'static str, String)> {
        let (udp, tcp) = (FOREIGN_UDP, FOREIGN_TCP);
        let udp_port = &udp[udp.find(':').unwrap() + 1..];
        vec![
            ("loose", format!("<sip:{udp};lr>")),
            ("strict", format!("<sip:{udp}>")),
            ("tcp scan", format!("<sip:{tcp};transport=tcp;lr>")),
            ("strict tcp scan", format!("<sip:{tcp};transport=tcp>")),
            ("host name", format!("<sip:{FOREIGN_NAME}:{udp_port};lr>")),
            (
                "behind our unsigned Route",
                format!("<sip:{us};lr>, <sip:{udp};lr>"),
            ),
        ]
    }

    /// Nothing has reached it so far: the server sent nothing to 127.0.0.9 (no datagram, no
    /// connection attempt), and neither agent there received anything.
    fn assert_untouched(&self, h: &mut Harness, what: &str) {
        let foreign_ip: std::net::IpAddr = [127, 0, 0, 9].into();
        let sent: Vec<String> = (h.sent_by_server.iter())
            .filter(|(_, to, _)| to.ip() == foreign_ip)
            .map(|(_, to, data)| format!("{to}: {}", text(data)))
            .collect();
        assert!(
            sent.is_empty(),
            "{what}: the foreign host was reached: {sent:#?}"
        );
        h.expect_nothing(self.udp);
        h.expect_nothing(self.tcp);
    }
}

// ----- the attack -----------------------------------------------------------------------------

/// The stranger sends `method` for alice with `route` pre-loaded: alice (the Request-URI's
/// registered contact) receives it without that Route, answers, and the answer reaches the
/// stranger; nothing reaches the foreign host.
fn preloaded_route_goes_nowhere(
    h: &mut Harness,
    (stranger, alice): (UaId, UaId),
    foreign: &ForeignHost,
    method: &str,
    (name, route): (&str, &str),
) {
    let what = format!(
        "{method} over {} with a {name} Route {route}",
        h.ua(stranger).name
    );
    let request = match method {
        "INVITE" => h.ua(stranger).invite_to(&aor("alice")),
        _ => h
            .ua(stranger)
            .request(method, &aor("alice"))
            .body("text/plain", "hello"),
    };
    request.header("Route", route).send();
    let incoming = h.expect_request(alice, method);
    let alice_uri = h.ua(alice).uri();
    assert_eq!(
        incoming.request_uri_bytes(),
        Some(alice_uri.as_bytes()),
        "{what}: the registered contact is the Request-URI\n{}",
        show(&incoming)
    );
    assert!(
        incoming.headers_named("Route").next().is_none(),
        "{what}: the pre-loaded Route is not passed on\n{}",
        show(&incoming)
    );
    let transport = if h.ua(stranger).stream { "TCP" } else { "UDP" };
    let vias: Vec<String> = incoming.headers_named("Via").map(text).collect();
    assert!(
        vias.last()
            .is_some_and(|via| via.starts_with(&format!("SIP/2.0/{transport} "))),
        "{what}: the stranger's Via at the bottom: {vias:?}"
    );
    let code = if method == "INVITE" { 486 } else { 200 };
    h.ua(alice).respond(&incoming, code, "Answered");
    if method == "INVITE" {
        h.expect_request(alice, "ACK");
    }
    h.expect_final(stranger, code);
    foreign.assert_untouched(h, &what);
}

/// Every pre-loaded Route of [`ForeignHost::routes`], for MESSAGE and INVITE, from a stranger
/// on UDP and on TCP, against a server routed by `script`: nothing reaches the foreign host,
/// and its name is never even looked up.
fn no_relay_through_preloaded_routes(script: &str) {
    let mut h = start(script, |_| {});
    let alice = registered_alice(&mut h, &[]);
    let foreign = ForeignHost::bind(&mut h);
    for tcp in [false, true] {
        let stranger = stranger(&mut h, tcp);
        h.ua(stranger).name = if tcp { "tcp" } else { "udp" }.into();
        for method in ["MESSAGE", "INVITE"] {
            for (name, route) in foreign.routes(h.proxy()) {
                preloaded_route_goes_nowhere(
                    &mut h,
                    (stranger, alice),
                    &foreign,
                    method,
                    (name, &route),
                );
            }
        }
    }
    foreign.assert_untouched(&mut h, "after every request");
    assert!(
        h.dns_queries.is_empty(),
        "no name was resolved: {:?}",
        h.dns_queries
    );
}

#[test]
fn the_shipped_policy_never_follows_a_strangers_preloaded_route() {
    no_relay_through_preloaded_routes(&shipped_script());
}

#[test]
fn without_authentication_neither() {
    no_relay_through_preloaded_routes(&default_script_without_auth());
}

/// A script as older docs suggested it (registrar, lookup, t_relay; no Route handling at
/// all): the engine does not follow the stranger's Route either, because the script did not
/// call `req:follow_preloaded_route()`.
#[test]
fn a_script_without_route_policy_does_not_become_an_open_relay() {
    no_relay_through_preloaded_routes(
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
    );
}

// ----- what still works -----------------------------------------------------------------------

/// RFC 3327: alice registered through an edge proxy; a stranger's pre-loaded Route is
/// dropped, her Path is not: the MESSAGE reaches the edge with exactly the Path as Route.
#[test]
fn a_registered_path_is_the_only_route_followed() {
    let mut h = start(&shipped_script(), |_| {});
    let edge = h.add_ua("edge", EDGE);
    let path = format!("<sip:{EDGE};lr>");
    let alice = registered_alice(&mut h, &[("Path", &path), ("Supported", "path")]);
    let alice_uri = h.ua(alice).uri();
    let foreign = ForeignHost::bind(&mut h);
    let stranger = stranger(&mut h, false);
    for (name, route) in foreign.routes(h.proxy()) {
        h.ua(stranger)
            .request("MESSAGE", &aor("alice"))
            .header("Route", &route)
            .body("text/plain", "hello")
            .send();
        let at_edge = h.expect_request(edge, "MESSAGE");
        assert_eq!(
            at_edge.request_uri_bytes(),
            Some(alice_uri.as_bytes()),
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
        h.ua(edge).respond(&at_edge, 200, "OK");
        h.expect_final(stranger, 200);
        foreign.assert_untouched(&mut h, name);
    }
    foreign.assert_untouched(&mut h, "after every request");
}

/// In a dialog this server record-routed, the route set it signed is followed to the end,
/// including a hop after this server (here an edge proxy in front of alice, which
/// Record-Routed above us), for a caller from outside too; a hop the caller adds after ours is
/// not followed (the signature binds the rest of the route set, `moonroute-proto/src/proxy/route_sign.rs`). A
/// hand-written in-dialog request with a foreign Route (with or without an unsigned Route naming
/// us on top) is answered 404 and goes nowhere.
#[test]
fn in_dialog_requests_follow_our_signed_route_set_and_nothing_else() {
    let mut h = start(&shipped_script(), |_| {});
    let proxy = h.proxy();
    let alice = registered_alice(&mut h, &[]);
    let alice_uri = h.ua(alice).uri();
    let carol = stranger(&mut h, false);
    let edge = h.add_ua("edge", EDGE);
    let foreign = ForeignHost::bind(&mut h);

    h.ua(carol).invite(&aor("alice"));
    let incoming = h.expect_request(alice, "INVITE");
    // The 200 as it leaves the edge proxy: the edge's Record-Route above ours.
    let edge_route = format!("<sip:{EDGE};lr>");
    let ours = header_text(&incoming, "Record-Route").unwrap();
    let ok = ResponseBuilder::new(&incoming, 200, "OK")
        .to_tag(b"alice-edge")
        .header("Record-Route", edge_route.as_bytes())
        .header("Record-Route", ours.as_bytes())
        .header("Contact", format!("<{alice_uri}>").as_bytes())
        .build();
    h.ua(alice).send_raw(&ok, proxy);
    let answered = h.expect_final(carol, 200);
    let mut dialog = h.ua(carol).ack_2xx(&answered);
    assert_eq!(dialog.route_set.len(), 2, "{:?}", dialog.route_set);
    assert!(
        dialog.route_set[0].contains(";mrs="),
        "{:?}",
        dialog.route_set
    );
    assert_eq!(dialog.route_set[1], edge_route);

    // The route set goes on past us: the ACK and the BYE are relayed to the next hop it names.
    let ack = h.expect_request(edge, "ACK");
    assert_eq!(ack.request_uri_bytes(), Some(alice_uri.as_bytes()));
    let mut longer = dialog.clone();
    longer.route_set.push(format!("<sip:{ALICE};lr>"));
    h.ua(carol).bye(&mut dialog);
    let bye = h.expect_request(edge, "BYE");
    let routes: Vec<String> = bye.headers_named("Route").map(text).collect();
    assert_eq!(routes, [edge_route], "{}", show(&bye));
    assert_eq!(bye.request_uri_bytes(), Some(alice_uri.as_bytes()));
    h.ua(edge).respond(&bye, 200, "OK");
    h.expect_final(carol, 200);
    // A hop the caller added after the signed route set: not followed.
    longer.local_cseq = dialog.local_cseq;
    h.ua(carol).bye(&mut longer);
    h.expect_final(carol, 404);

    // A stranger's own "dialog": a To tag and a Route of its choosing, sent to us.
    let carol_addr = h.ua(carol).local;
    for (n, (name, route)) in foreign.routes(proxy).into_iter().enumerate() {
        let mut forged = Dialog {
            call_id: format!("forged-{n}@127.0.0.4"),
            local_tag: "mine".into(),
            remote_tag: "forged".into(),
            local: format!("<sip:carol@{carol_addr}>;tag=mine"),
            remote: format!("<{}>;tag=forged", aor("alice")),
            route_set: Vec::new(),
            remote_target: alice_uri.clone(),
            local_cseq: 1,
            remote_cseq: None,
        };
        h.ua(carol)
            .in_dialog("MESSAGE", &mut forged)
            .header("Route", &route)
            .body("text/plain", "hello")
            .to(proxy)
            .send();
        h.expect_final(carol, 404);
        foreign.assert_untouched(&mut h, name);
    }
    foreign.assert_untouched(&mut h, "after every request");
}

/// `ROUTE_PEERS` opens the pre-loaded Route for one peer: its Route is followed after the
/// lookup (loose: the contact stays the Request-URI; strict: RFC 3261 §16.6 steps 6-7, the
/// strict router's URI becomes the Request-URI, the contact goes to the end of Route, and the
/// strict router is where it is sent; over TCP to a host name, resolved). A stranger sending
/// the same Route to the same server still reaches alice, not that host.
#[test]
fn a_route_peer_may_preload_a_route_and_nobody_else_may() {
    let script = default_script_with(
        shipped_script(),
        &[(
            "local ROUTE_PEERS = {}",
            r#"local ROUTE_PEERS = { ["127.0.0.5"] = true }"#,
        )],
    );
    let mut h = start(&script, |_| {});
    let alice = registered_alice(&mut h, &[]);
    let alice_uri = h.ua(alice).uri();
    let peer = h.add_ua_via_proxy("peer", PEER);
    let next = h.add_ua("next", FOREIGN_UDP);
    let next_tcp = h.add_tcp_ua("next", FOREIGN_TCP);
    let routes = |m: &Message| -> Vec<String> { m.headers_named("Route").map(text).collect() };

    // Loose: the peer's next hop, alice's contact as the Request-URI.
    let loose = format!("<sip:{FOREIGN_UDP};lr>");
    h.ua(peer)
        .request("MESSAGE", &aor("alice"))
        .header("Route", &loose)
        .body("text/plain", "loose")
        .send();
    let at_next = h.expect_request(next, "MESSAGE");
    assert_eq!(at_next.request_uri_bytes(), Some(alice_uri.as_bytes()));
    assert_eq!(
        routes(&at_next),
        std::slice::from_ref(&loose),
        "{}",
        show(&at_next)
    );
    h.ua(next).respond(&at_next, 200, "OK");
    h.expect_final(peer, 200);

    // Strict: rewritten once, sent to the strict router (not past it to the contact).
    let strict = format!("sip:{FOREIGN_UDP}");
    h.ua(peer)
        .request("MESSAGE", &aor("alice"))
        .header("Route", &format!("<{strict}>"))
        .body("text/plain", "strict")
        .send();
    let at_next = h.expect_request(next, "MESSAGE");
    assert_eq!(
        at_next.request_uri_bytes(),
        Some(strict.as_bytes()),
        "{}",
        show(&at_next)
    );
    assert_eq!(
        routes(&at_next),
        [format!("<{alice_uri}>")],
        "{}",
        show(&at_next)
    );
    h.ua(next).respond(&at_next, 200, "OK");
    h.expect_final(peer, 200);

    // TCP to a host name: resolved through DNS, a connection opened.
    let port = h.ua(next_tcp).local.port();
    let named = format!("<sip:{FOREIGN_NAME}:{port};transport=tcp;lr>");
    h.ua(peer)
        .request("MESSAGE", &aor("alice"))
        .header("Route", &named)
        .body("text/plain", "named")
        .send();
    let at_next = h.expect_request(next_tcp, "MESSAGE");
    assert_eq!(at_next.request_uri_bytes(), Some(alice_uri.as_bytes()));
    h.ua(next_tcp).respond(&at_next, 200, "OK");
    h.expect_final(peer, 200);
    assert!(h.dns_queries.iter().any(|name| name == FOREIGN_NAME));

    // The same Routes from a stranger: removed, the MESSAGEs go to alice; the first message
    // she ever gets is the stranger's (none of the peer's reached her).
    let stranger = stranger(&mut h, false);
    for route in [loose, format!("<{strict}>"), named] {
        h.ua(stranger)
            .request("MESSAGE", &aor("alice"))
            .header("Route", &route)
            .body("text/plain", "stranger")
            .send();
        let incoming = h.expect_request(alice, "MESSAGE");
        assert_eq!(text(incoming.body()), "stranger", "{}", show(&incoming));
        assert!(routes(&incoming).is_empty(), "{}", show(&incoming));
        h.ua(alice).respond(&incoming, 200, "OK");
        h.expect_final(stranger, 200);
    }
}

/// Requests whose User-Agent names a well-known scanner get no answer, whatever they are
/// (`OPTIONS sip:100@us` included: a user part makes it a request for the script, RFC 3261
/// §11), and each counts in `scanner_requests_dropped_total`; the same address with an
/// ordinary User-Agent is served (scanners are dropped, not banned: behind a gateway the
/// address is everyone's).
#[test]
fn scanners_get_no_answer_and_are_counted() {
    // One event loop: the scanner's request is handled before the probe sent after it, so the
    // probe's answer proves the scanner's request has had its fate.
    let mut h = start(&shipped_script(), |c| c.workers = 1);
    let dropped = h.script().services().metrics.counter(
        "scanner_requests_dropped_total",
        "Requests from well-known SIP scanners (User-Agent) that scripts/default.lua dropped.",
    );
    let proxy = h.proxy();
    let scanner = h.add_ua_via_proxy("scanner", SCANNER);
    let server_uri = format!("sip:{proxy}");
    let probes = [
        ("OPTIONS", format!("sip:100@{proxy}"), "friendly-scanner"),
        ("REGISTER", aor("100"), "sipvicious"),
        ("INVITE", aor("alice"), "SIPVicious/0.3.4"),
        ("MESSAGE", aor("alice"), "VaxSIPUserAgent/3.1"),
        ("INVITE", aor("100"), "sipcli/v1.8"),
    ];
    for (n, (method, ruri, agent)) in probes.iter().enumerate() {
        h.ua(scanner)
            .request(method, ruri)
            .header("User-Agent", agent)
            .send();
        let probe = h.ua(scanner).request("OPTIONS", &server_uri).send();
        let answer = h.recv_response(scanner);
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
    h.ua(scanner)
        .request("MESSAGE", &aor("100"))
        .header("User-Agent", "Linphone/5.2")
        .send();
    h.expect_final(scanner, 404);
    assert_eq!(dropped.get(), probes.len() as u64);
}

/// A bare MESSAGE `n` to alice from `ua`, claiming `flooder@moonroute.test` as its From (a new
/// transaction each time, as `tests/common/flood.rs` sends them).
fn flood_message(h: &mut Harness, ua: UaId, n: u32) {
    let local = h.ua(ua).local;
    let request = format!(
        "MESSAGE sip:alice@{DOMAIN} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-flood-{n};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:flooder@{DOMAIN}>;tag=f{n}\r\n\
         To: <sip:alice@{DOMAIN}>\r\n\
         Call-ID: flood-{n}-{}@{}\r\n\
         CSeq: 1 MESSAGE\r\n\
         Content-Length: 0\r\n\r\n",
        local.port(),
        local.ip()
    );
    let proxy = h.proxy();
    h.ua(ua).send_raw(request.as_bytes(), proxy);
}

/// The shipped trust list is empty: a source on 127.0.0.1 (where a local TLS terminator,
/// WebSocket gateway or SBC puts every client) is rate-limited and banned like any other.
#[test]
fn loopback_is_not_exempt_from_flood_protection() {
    const LIMIT: u32 = 20;
    // One event loop: requests are handled in the order they arrive, so the witness's answer
    // (sent after the flood, from another address) proves the flood has been handled.
    let mut h = start(&shipped_script(), |c| {
        c.workers = 1;
        c.pike.max_requests = LIMIT;
        // One window for the whole test, however slow the machine.
        c.pike.window_ms = 60_000;
        // What is tested is the script's ban, not the engine's receive-lag shedding.
        c.limits.overload_after_ms = 0;
    });
    let guesser = h.add_ua("guesser", "127.0.0.1:5070");
    for n in 0..3 * LIMIT {
        flood_message(&mut h, guesser, n);
    }
    let witness = h.add_ua("witness", STRANGER);
    flood_message(&mut h, witness, 0);
    assert_eq!(h.recv_response(witness).status(), Some(407));
    // Each request within the limit was challenged (407: the From claims our domain).
    for n in 0..LIMIT {
        let status = h.recv_response(guesser).status();
        assert_eq!(status, Some(407), "answer {n}");
    }
    let ban = h
        .script()
        .services()
        .kv
        .get("ipban:127.0.0.1", std::time::Instant::now());
    assert!(ban.is_some(), "127.0.0.1 is banned");
    h.expect_nothing(guesser);
}
