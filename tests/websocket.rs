//! SIP over WebSocket end to end (RFC 7118, `src/transport/ws.rs`): the real server with `ws:`,
//! `wss:` and `udp:` listeners, routed by the shipped `scripts/default.lua` (digest auth off,
//! as in the other routing tests), and test user agents speaking SIP over tokio-tungstenite as
//! a browser stack does: `.invalid` Via and Contact hosts, one message per WebSocket message.
//!
//! Covered: the Upgrade's checks (the `sip` subprotocol, the `Origin` allow-list), REGISTER
//! and a call between two WebSocket clients (Via `WS`, one Record-Route with `transport=ws`,
//! the callee's BYE back to the caller on its connection), a WebSocket caller and a UDP phone
//! (double Record-Route, Via on both legs), secure WebSocket, a binding whose connection
//! closed (reachable no more), the handshake deadline, the message size limit, the per-IP
//! connection cap, and digest authentication under the shipped policy; a real phone,
//! baresip over UDP, called by a WebSocket client (`a_websocket_client_calls_baresip`).
//!
//! Nothing sleeps: every wait is for a message or a close, bounded by a timeout.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use common::ua::{header_text, websocket_request, TestUa, WAIT};
use moonroute::config::{Config, LocationBackend};
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::{HeaderName, Message};
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;
use tokio::net::TcpStream;

const DOMAIN: &str = "moonroute.test";
const PAGE_ORIGIN: &str = "https://phone.moonroute.test";

struct Running {
    server: ServerHandle,
    host: Arc<ScriptHost>,
    /// The `ws:` listener; the `wss:` one for a server without `ws:`.
    ws: SocketAddr,
    udp: SocketAddr,
    _dir: TempDir,
}

impl Running {
    fn wss(&self) -> SocketAddr {
        self.server
            .local_addr(TransportKind::Wss)
            .expect("a wss: listener")
    }
}

fn aor(user: &str) -> String {
    format!("sip:{user}@{DOMAIN}")
}

/// Two event loops on `udp:` and `ws:` of 127.0.0.1 (and whatever `edit` adds), the shipped
/// default script without digest auth, sled in a fresh directory, pages of [`PAGE_ORIGIN`]
/// allowed.
fn start(edit: impl FnOnce(&mut Config, &std::path::Path)) -> Running {
    let dir = TempDir::new().unwrap();
    let mut config = Config {
        listen: vec![
            "udp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
            "ws:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
        ],
        domains: vec![DOMAIN.to_owned()],
        workers: 2,
        script: common::default_script_without_auth(),
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Sled;
    config.websocket.allowed_origins = vec![PAGE_ORIGIN.to_owned()];
    edit(&mut config, dir.path());
    config.validate().unwrap();
    let host = ScriptHost::from_config(&config).expect("the script and the store load");
    let factory = CoreFactory::with_router(&config, host.router_factory())
        .with_flows(Arc::clone(&host.services().flows));
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    Running {
        ws: server
            .local_addr(TransportKind::Ws)
            .or_else(|| server.local_addr(TransportKind::Wss))
            .expect("a ws: (or, without one, a wss:) listener"),
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        server,
        host,
        _dir: dir,
    }
}

async fn register(ua: &mut TestUa, user: &str) -> Message {
    ua.request("REGISTER", &aor(user))
        .header("Expires", "600")
        .await;
    ua.expect_final(200).await
}

fn vias(m: &Message) -> Vec<String> {
    m.values(HeaderName::Via)
        .map(|v| String::from_utf8_lossy(v.unwrap()).into_owned())
        .collect()
}

fn record_routes(m: &Message) -> Vec<String> {
    m.values(HeaderName::RecordRoute)
        .map(|v| common::without_signature(&String::from_utf8_lossy(v.unwrap())))
        .collect()
}

/// The callee of `invite` (answered with `answer`) hangs up: the BYE reaches the caller on its
/// connection with moonroute's Via `via` (`SIP/2.0/WS` or `SIP/2.0/WSS`) on top, and the
/// caller's 200 gets back.
async fn callee_hangs_up(
    callee: &mut TestUa,
    caller: &mut TestUa,
    invite: &Message,
    answer: &Message,
    via: &str,
) {
    let mut dialog = common::ua::Dialog::from_uas(invite, answer);
    callee.bye(&mut dialog).await;
    let bye = caller.expect_request("BYE").await;
    assert!(
        vias(&bye)[0].starts_with(&format!("{via} 127.0.0.1:")),
        "{:?}",
        vias(&bye)
    );
    caller.respond(&bye, 200, "OK").await;
    callee.expect_final(200).await;
}

/// The HTTP answer to a WebSocket Upgrade that `request` makes to `server`.
async fn upgrade_status(
    server: SocketAddr,
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> Result<(), u16> {
    let stream = TcpStream::connect(server).await.unwrap();
    let upgraded =
        tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream)).await;
    match upgraded.expect("the server answers the Upgrade in time") {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(other) => panic!("unexpected Upgrade failure: {other}"),
    }
}

#[tokio::test]
async fn the_upgrade_needs_the_sip_subprotocol_and_an_allowed_origin() {
    let running = start(|_, _| {});
    let url = format!("ws://{}/", running.ws);
    // RFC 7118 §4: no `sip` subprotocol, no SIP.
    assert_eq!(
        upgrade_status(running.ws, websocket_request(&url, None, None)).await,
        Err(400)
    );
    assert_eq!(
        upgrade_status(running.ws, websocket_request(&url, Some("xmpp"), None)).await,
        Err(400)
    );
    // A page of another site may not use a visitor's browser to reach the server.
    let evil = websocket_request(&url, Some("sip"), Some("https://evil.example"));
    assert_eq!(upgrade_status(running.ws, evil).await, Err(403));
    // The listed origin, and a client that is no web page.
    let page = websocket_request(&url, Some("sip"), Some(PAGE_ORIGIN));
    assert_eq!(upgrade_status(running.ws, page).await, Ok(()));
    let node = websocket_request(&url, Some("sip"), None);
    assert_eq!(upgrade_status(running.ws, node).await, Ok(()));
}

#[tokio::test]
async fn two_websocket_clients_register_and_call_each_other() {
    let running = start(|_, _| {});
    let mut alice = TestUa::websocket("alice", running.ws, None, Some(PAGE_ORIGIN)).await;
    let mut bob = TestUa::websocket("bob", running.ws, None, None).await;
    let ok = register(&mut alice, "alice").await;
    assert!(
        header_text(&ok, "Contact")
            .unwrap_or_default()
            .contains(".invalid;transport=ws"),
        "the binding keeps the client's Contact: {:?}",
        header_text(&ok, "Contact")
    );
    register(&mut bob, "bob").await;

    alice.invite(&aor("bob")).await;
    alice.expect_response(100).await;
    let invite = bob.expect_request("INVITE").await;
    // Reached on its own connection, with its registered (.invalid) contact as Request-URI.
    let ruri = String::from_utf8_lossy(invite.request_uri_bytes().unwrap()).into_owned();
    assert!(ruri.ends_with(".invalid;transport=ws"), "{ruri}");
    let via = vias(&invite);
    assert!(via[0].starts_with("SIP/2.0/WS 127.0.0.1:"), "{via:?}");
    assert!(
        via[1].starts_with("SIP/2.0/WS alice") && via[1].contains(".invalid;"),
        "{via:?}"
    );
    assert!(via[1].contains("received=127.0.0.1"), "{via:?}");
    // Both legs on the same listener: one Record-Route entry, `transport=ws` (RFC 7118 §5.2).
    assert_eq!(
        record_routes(&invite),
        vec![format!("<sip:{};transport=ws;lr>", running.ws)]
    );
    bob.respond(&invite, 180, "Ringing").await;
    alice.expect_response(180).await;
    bob.respond(&invite, 200, "OK").await;
    let answer = alice.expect_final(200).await;
    let mut alice_dialog = alice.ack_2xx(&answer).await;
    bob.expect_request("ACK").await;

    // The callee hangs up: the BYE reaches the caller on its connection (its Contact was
    // rewritten to the connection's address: WebSocket clients count as NATed).
    callee_hangs_up(&mut bob, &mut alice, &invite, &answer, "SIP/2.0/WS").await;

    // And a MESSAGE back the other way, out of dialog.
    alice
        .request("MESSAGE", &aor("bob"))
        .body("text/plain", "hello over WebSocket")
        .await;
    let message = bob.expect_request("MESSAGE").await;
    assert_eq!(&message.body()[..], b"hello over WebSocket");
    bob.respond(&message, 200, "OK").await;
    alice.expect_final(200).await;
    let _ = &mut alice_dialog;
}

#[tokio::test]
async fn a_websocket_client_calls_a_udp_phone_through_two_record_routes() {
    let running = start(|_, _| {});
    let mut alice = TestUa::websocket("alice", running.ws, None, None).await;
    let mut carol = TestUa::udp("carol").await.via_proxy(running.udp);
    register(&mut alice, "alice").await;
    register(&mut carol, "carol").await;

    alice.invite(&aor("carol")).await;
    let invite = carol.expect_request("INVITE").await;
    let via = vias(&invite);
    assert!(
        via[0].starts_with(&format!("SIP/2.0/UDP {};", running.udp)),
        "{via:?}"
    );
    assert!(via[1].starts_with("SIP/2.0/WS alice"), "{via:?}");
    // One entry per leg (RFC 5658): the UDP side on top, the WebSocket side below.
    assert_eq!(
        record_routes(&invite),
        vec![
            format!("<sip:{};transport=udp;lr>", running.udp),
            format!("<sip:{};transport=ws;lr>", running.ws),
        ]
    );
    carol.respond(&invite, 200, "OK").await;
    let answer = alice.expect_final(200).await;
    // The caller sees the route set the other way round.
    assert_eq!(
        record_routes(&answer),
        vec![
            format!("<sip:{};transport=udp;lr>", running.udp),
            format!("<sip:{};transport=ws;lr>", running.ws),
        ]
    );
    alice.ack_2xx(&answer).await;
    carol.expect_request("ACK").await;

    callee_hangs_up(&mut carol, &mut alice, &invite, &answer, "SIP/2.0/WS").await;
}

#[tokio::test]
async fn a_binding_is_gone_with_its_connection() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    let running = start(|_, _| {});
    // A browser tab registers (without Content-Length: the WebSocket message delimits the
    // SIP message, RFC 7118 §5), then is closed.
    let url = format!("ws://{}/", running.ws);
    let stream = TcpStream::connect(running.ws).await.unwrap();
    let request = websocket_request(&url, Some("sip"), Some(PAGE_ORIGIN));
    let (mut tab, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    let register = format!(
        "REGISTER sip:{DOMAIN} SIP/2.0\r\n\
         Via: SIP/2.0/WS df7jal23ls0d.invalid;branch=z9hG4bK56sdasks\r\n\
         Max-Forwards: 70\r\n\
         To: <{0}>\r\nFrom: <{0}>;tag=5hxf9\r\n\
         Call-ID: ws-closed-1\r\nCSeq: 1 REGISTER\r\n\
         Contact: <sip:alice@df7jal23ls0d.invalid;transport=ws>;expires=600\r\n\r\n",
        aor("alice")
    );
    tab.send(WsMessage::text(register)).await.unwrap();
    let answer = tokio::time::timeout(WAIT, tab.next()).await.unwrap();
    let answer = answer.unwrap().unwrap().into_text().unwrap();
    assert!(answer.starts_with("SIP/2.0 200 "), "{answer}");
    let open = running.server.connection_count();
    tab.close(None).await.unwrap();
    drop(tab);
    // The server notices the close: wait for it, bounded.
    let deadline = tokio::time::Instant::now() + WAIT;
    while running.server.connection_count() >= open {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection closed"
        );
        tokio::task::yield_now().await;
    }
    let mut carol = TestUa::udp("carol").await.via_proxy(running.udp);
    carol.invite(&aor("alice")).await;
    let response = loop {
        let response = carol.recv_response(WAIT).await;
        if response.status().unwrap() >= 200 {
            break response;
        }
    };
    // The lookup skips the binding whose connection closed (RFC 5626 §5.3 flow gone): no
    // contact, and never a connection opened towards an `.invalid` host.
    assert_eq!(
        response.status(),
        Some(404),
        "{}",
        common::ua::show(&response)
    );
}

#[tokio::test]
async fn secure_websocket_uses_the_tls_identity() {
    let ca = common::certs::Ca::new();
    let running = start(|config, dir| {
        config
            .listen
            .push("wss:127.0.0.1:0".parse::<ListenAddr>().unwrap());
        let (cert, key) = ca.localhost_files(dir);
        config.tls.certificate = cert;
        config.tls.private_key = key;
    });
    let wss = running.wss();
    let mut alice =
        TestUa::websocket("alice", wss, Some((ca.connector(), "localhost")), None).await;
    let mut bob = TestUa::websocket("bob", running.ws, None, None).await;
    register(&mut alice, "alice").await;
    register(&mut bob, "bob").await;

    bob.invite(&aor("alice")).await;
    let invite = alice.expect_request("INVITE").await;
    let via = vias(&invite);
    assert!(via[0].starts_with("SIP/2.0/WSS 127.0.0.1:"), "{via:?}");
    // Two listeners, two entries; both say `transport=ws` (RFC 7118 §5.2).
    assert_eq!(
        record_routes(&invite),
        vec![
            format!("<sip:{wss};transport=ws;lr>"),
            format!("<sip:{};transport=ws;lr>", running.ws),
        ]
    );
    alice.respond(&invite, 486, "Busy Here").await;
    bob.expect_final(486).await;
}

/// A server with `wss:` and no `ws:` listener (the usual deployment): the clients' Contacts,
/// rewritten to their connections' addresses, say `transport=ws` as RFC 7118 §5.2 has it for
/// secure WebSocket too, and in-dialog requests to them (the ACK, forwarded statelessly, and
/// the BYE) leave from the `wss:` listener on the callee's connection.
#[tokio::test]
async fn a_call_between_secure_websocket_clients_without_a_ws_listener() {
    let ca = common::certs::Ca::new();
    let running = start(|config, dir| {
        config.listen = vec![
            "udp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
            "wss:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
        ];
        let (cert, key) = ca.localhost_files(dir);
        config.tls.certificate = cert;
        config.tls.private_key = key;
    });
    let wss = running.wss();
    let tls = || Some((ca.connector(), "localhost"));
    let mut alice = TestUa::websocket("alice", wss, tls(), Some(PAGE_ORIGIN)).await;
    let mut bob = TestUa::websocket("bob", wss, tls(), Some(PAGE_ORIGIN)).await;
    register(&mut alice, "alice").await;
    register(&mut bob, "bob").await;

    alice.invite(&aor("bob")).await;
    let invite = bob.expect_request("INVITE").await;
    assert!(vias(&invite)[0].starts_with("SIP/2.0/WSS 127.0.0.1:"));
    bob.respond(&invite, 200, "OK").await;
    let answer = alice.expect_final(200).await;
    let contact = header_text(&answer, "Contact").unwrap_or_default();
    assert!(contact.contains(";transport=ws"), "{contact}");
    alice.ack_2xx(&answer).await;
    let ack = bob.expect_request("ACK").await;
    assert!(
        vias(&ack)[0].starts_with("SIP/2.0/WSS 127.0.0.1:"),
        "{:?}",
        vias(&ack)
    );

    callee_hangs_up(&mut bob, &mut alice, &invite, &answer, "SIP/2.0/WSS").await;
}

#[tokio::test]
async fn slow_openings_and_oversized_messages_close_the_connection() {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    let running = start(|config, _| {
        config.websocket.handshake_timeout_ms = 200;
        config.limits.max_message_size = 4096;
    });
    // A client that connects and never sends its Upgrade is dropped at the deadline.
    let mut silent = TcpStream::connect(running.ws).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed at the handshake deadline: {read:?}"
    );

    // A WebSocket message larger than limits.max_message_size ends the connection.
    let url = format!("ws://{}/", running.ws);
    let stream = TcpStream::connect(running.ws).await.unwrap();
    let request = websocket_request(&url, Some("sip"), None);
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    let huge = format!(
        "OPTIONS sip:{DOMAIN} SIP/2.0\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(8192)
    );
    // The server may close before taking it all: a send error is a close too.
    let _ = ws.send(WsMessage::text(huge)).await;
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the server closed the connection");
}

#[tokio::test]
async fn websocket_connections_count_toward_the_per_ip_cap() {
    let running = start(|config, _| {
        config.limits.max_connections_per_ip = Some(1);
    });
    let mut first = TestUa::websocket("first", running.ws, None, None).await;
    register(&mut first, "first").await;
    // The address's one connection is taken: the next is closed before its Upgrade.
    let url = format!("ws://{}/", running.ws);
    let stream = TcpStream::connect(running.ws).await.unwrap();
    let request = websocket_request(&url, Some("sip"), None);
    let second = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
        .await
        .expect("the server answers in time");
    assert!(
        second.is_err(),
        "a second connection from 127.0.0.1 is refused"
    );
}

#[tokio::test]
async fn a_websocket_phone_registers_with_digest_auth_under_the_shipped_policy() {
    use common::auth::{answer_challenge, Answer, Challenge};
    let running = start(|config, _| {
        // As shipped: AUTHENTICATE = true.
        config.script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/default.lua");
    });
    let auth = running
        .host
        .services()
        .auth
        .clone()
        .expect("an authenticator");
    auth.subscribers()
        .add(
            &format!("alice@{DOMAIN}"),
            &moonroute::auth::Subscriber::with_password("alice", DOMAIN, "alice-pw"),
        )
        .unwrap();
    let mut alice = TestUa::websocket("alice", running.ws, None, Some(PAGE_ORIGIN)).await;
    alice.from_domain = Some(DOMAIN.to_owned());
    let first = alice
        .request("REGISTER", &aor("alice"))
        .header("Expires", "600")
        .await;
    let challenge = alice.expect_final(401).await;
    let challenge =
        Challenge::parse(&header_text(&challenge, "WWW-Authenticate").expect("a challenge"));
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
    alice
        .request("REGISTER", &aor("alice"))
        .retry_of(&first)
        .header("Expires", "600")
        .header("Authorization", &credentials)
        .await;
    alice.expect_final(200).await;
}

/// A headless baresip (UDP) registered as bob through `running`: SIP on 127.0.0.1:44710 (and
/// 44711, its TLS), its ctrl_tcp on 44715, RTP on 44720-44739, auto-answer, its SIP trace
/// (`-s`) in `trace`. Killed when dropped.
struct Baresip {
    child: std::process::Child,
    events: tokio::io::BufReader<TcpStream>,
    seen: String,
}

const BARESIP_SIP: u16 = 44710;
const BARESIP_CTRL: u16 = 44715;

impl Baresip {
    async fn start(running: &Running, dir: &std::path::Path, trace: &std::path::Path) -> Baresip {
        let conf = dir.join("baresip");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("config"),
            format!(
                "sip_listen 127.0.0.1:{BARESIP_SIP}\nnet_interface 127.0.0.1\n\
                 rtp_ports 44720-44739\npoll_method epoll\n\
                 audio_player aubridge,nil\naudio_alert aubridge,nil\naudio_source ausine,440\n\
                 ausrc_srate 48000\nausrc_channels 2\nauplay_srate 48000\n\
                 module_path /usr/lib/baresip/modules\nmodule g711.so\nmodule ausine.so\n\
                 module aubridge.so\nmodule_app account.so\nmodule_app menu.so\n\
                 module_app ctrl_tcp.so\nctrl_tcp_listen 127.0.0.1:{BARESIP_CTRL}\n"
            ),
        )
        .unwrap();
        // Its registrar and outbound proxy: moonroute's UDP listener; no digest (the script
        // here authenticates nobody).
        std::fs::write(
            conf.join("accounts"),
            format!(
                "<sip:bob@{DOMAIN}>;outbound=\"sip:{};transport=udp\";answermode=auto;regint=600\n",
                running.udp
            ),
        )
        .unwrap();
        let log = std::fs::File::create(trace).unwrap();
        let child = std::process::Command::new("baresip")
            .arg("-f")
            .arg(&conf)
            .args(["-s", "-t", "60"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("baresip starts");
        // Its control socket appears once it has started: connect, bounded.
        let deadline = tokio::time::Instant::now() + WAIT;
        let ctrl = loop {
            match TcpStream::connect(("127.0.0.1", BARESIP_CTRL)).await {
                Ok(stream) => break stream,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "baresip ctrl_tcp: {e}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        };
        Baresip {
            child,
            events: tokio::io::BufReader::new(ctrl),
            seen: String::new(),
        }
    }

    /// Waits (bounded) for the ctrl_tcp event `kind` (`"type":"KIND"` in its JSON).
    async fn expect_event(&mut self, kind: &str) {
        use tokio::io::AsyncReadExt;
        let needle = format!("\"type\":\"{kind}\"");
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.seen.contains(&needle) {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.events.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {kind} from baresip; its events: {}", self.seen))
                .expect("baresip's ctrl_tcp");
            assert!(
                n > 0,
                "baresip closed ctrl_tcp before {kind}: {}",
                self.seen
            );
            self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }

    /// One ctrl_tcp command (a netstring).
    async fn command(&mut self, json: &str) {
        use tokio::io::AsyncWriteExt;
        let netstring = format!("{}:{json},", json.len());
        self.events
            .get_mut()
            .write_all(netstring.as_bytes())
            .await
            .unwrap();
    }
}

impl Drop for Baresip {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The header lines of the first `METHOD` baresip's SIP trace shows it received.
fn traced_request(trace: &std::path::Path, method: &str) -> Vec<String> {
    let text = std::fs::read_to_string(trace).unwrap_or_default();
    let start = text
        .find(&format!("{method} sip:"))
        .unwrap_or_else(|| panic!("no {method} in baresip's trace:\n{text}"));
    text[start..]
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(|line| line.trim().to_owned())
        .collect()
}

/// The issue's interop item: a WebSocket client (RFC 7118) calls a real phone, baresip 1.0 on
/// UDP, registered through the shipped policy. The INVITE reaches baresip with moonroute's
/// UDP Via on top of the client's WS Via and one Record-Route per leg (RFC 5658: the UDP one
/// on top, the `transport=ws` one below, as baresip's SIP trace shows); baresip auto-answers,
/// the ACK follows the route set to it, and its BYE comes back on the client's WebSocket
/// connection. Signalling only (WebRTC media to RTP needs a media relay).
///
/// Needs `baresip` (Debian `baresip-core`): without it the test says so and passes, unless
/// `MOONROUTE_REQUIRE_BARESIP=1` (set by `.ci/interop ws_baresip`) makes that a failure. Uses
/// 127.0.0.1 ports 44710-44739 for baresip.
#[tokio::test]
async fn a_websocket_client_calls_baresip() {
    if std::process::Command::new("baresip")
        .arg("-h")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("MOONROUTE_REQUIRE_BARESIP").is_none(),
            "baresip is not installed (apt-get install baresip-core)"
        );
        eprintln!("SKIPPED a_websocket_client_calls_baresip: baresip is not installed");
        return;
    }
    let running = start(|_, _| {});
    let dir = TempDir::new().unwrap();
    let trace = dir.path().join("baresip.log");
    let mut bob = Baresip::start(&running, dir.path(), &trace).await;
    // baresip registers as it starts, maybe before its control socket took our connection
    // (so its REGISTER_OK event can be missed): wait for the binding itself, bounded.
    let deadline = tokio::time::Instant::now() + WAIT;
    while running
        .host
        .services()
        .location_lookup(&aor("bob"), std::time::SystemTime::now())
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "baresip did not register:\n{}",
            std::fs::read_to_string(&trace).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let mut alice = TestUa::websocket("alice", running.ws, None, None).await;
    register(&mut alice, "alice").await;
    alice.invite(&aor("bob")).await;
    let answer = alice.expect_final(200).await;
    // baresip copied the INVITE's Record-Route into its 200 (RFC 3261 §12.1.1).
    assert_eq!(
        record_routes(&answer),
        vec![
            format!("<sip:{};transport=udp;lr>", running.udp),
            format!("<sip:{};transport=ws;lr>", running.ws),
        ]
    );
    let invite = traced_request(&trace, "INVITE");
    let via: Vec<&String> = invite.iter().filter(|l| l.starts_with("Via:")).collect();
    assert!(
        via.len() == 2
            && via[0].starts_with(&format!("Via: SIP/2.0/UDP {};", running.udp))
            && via[1].starts_with("Via: SIP/2.0/WS alice"),
        "the INVITE's Vias at baresip: {via:?}"
    );
    let record_route: Vec<&String> = invite
        .iter()
        .filter(|l| l.starts_with("Record-Route:"))
        .collect();
    assert!(
        record_route.len() == 2
            && record_route[0].contains(&format!("<sip:{};transport=udp;lr", running.udp))
            && record_route[1].contains(&format!("<sip:{};transport=ws;lr", running.ws)),
        "the INVITE's Record-Routes at baresip: {record_route:?}"
    );

    alice.ack_2xx(&answer).await;
    bob.expect_event("CALL_ESTABLISHED").await;
    let ack = traced_request(&trace, "ACK");
    assert!(
        ack.iter()
            .any(|l| l.starts_with(&format!("Via: SIP/2.0/UDP {};", running.udp))),
        "the ACK reached baresip through moonroute: {ack:?}"
    );

    // baresip hangs up: its BYE follows the route set back to the WebSocket connection.
    bob.command(r#"{"command":"hangup","token":"hangup"}"#)
        .await;
    let bye = alice.expect_request("BYE").await;
    let bye_via = vias(&bye);
    assert!(
        bye_via.len() == 2
            && bye_via[0].starts_with("SIP/2.0/WS 127.0.0.1:")
            && bye_via[1].starts_with(&format!("SIP/2.0/UDP 127.0.0.1:{BARESIP_SIP}")),
        "{bye_via:?}"
    );
    alice.respond(&bye, 200, "OK").await;
    bob.expect_event("CALL_CLOSED").await;
}

/// Reads one SIP message from a raw stream (RFC 3261 §18.3 framing), bounded by [`WAIT`].
async fn read_message(
    stream: &mut TcpStream,
    framer: &mut moonroute::transport::framing::StreamFramer,
) -> Message {
    use moonroute::transport::framing::Frame;
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(Frame::Message(bytes)) = framer.next_frame().expect("a framable stream") {
            return Message::parse(bytes).expect("a SIP message");
        }
        let n = tokio::time::timeout_at(deadline, stream.read_buf(framer.read_space(4096)))
            .await
            .expect("a message in time")
            .expect("the connection reads");
        assert!(n > 0, "the server closed the connection");
    }
}

/// A REGISTER of alice over a raw TCP connection with outbound's Contact parameters (RFC 5626
/// §4.2): `+sip.instance`, `reg-id`, `;ob`, and a Contact address nothing listens on (a phone
/// that accepts no connection).
fn outbound_register(local: SocketAddr, call_id: &str, cseq: u32) -> String {
    format!(
        "REGISTER sip:{DOMAIN} SIP/2.0\r\n\
         Via: SIP/2.0/TCP {local};branch=z9hG4bK-ob-{call_id}-{cseq}\r\n\
         Max-Forwards: 70\r\n\
         To: <{0}>\r\nFrom: <{0}>;tag=ob{cseq}\r\n\
         Call-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\n\
         Supported: outbound, path\r\n\
         Contact: <sip:alice@127.0.0.1:44790;transport=tcp;ob>;reg-id=1;\
         +sip.instance=\"<urn:uuid:00000000-0000-1000-8000-00000000a11c>\"\r\n\
         Expires: 600\r\nContent-Length: 0\r\n\r\n",
        aor("alice")
    )
}

/// RFC 5626 over TCP: the 200 to an outbound REGISTER carries `Require: outbound`; a request
/// for the AOR goes over the connection the REGISTER came on (not to the Contact's address);
/// re-registering the same instance and reg-id over a new connection replaces the flow; once
/// that connection is closed the binding is skipped.
#[tokio::test]
async fn an_outbound_tcp_flow_is_reached_over_its_connection_and_replaced() {
    use moonroute::transport::framing::StreamFramer;
    use tokio::io::AsyncWriteExt;
    let running = start(|config, _| {
        config
            .listen
            .push("tcp:127.0.0.1:0".parse::<ListenAddr>().unwrap())
    });
    let tcp = running.server.local_addr(TransportKind::Tcp).unwrap();
    let mut carol = TestUa::udp("carol").await.via_proxy(running.udp);

    let mut flows = Vec::new();
    for (n, call_id) in ["ob-1", "ob-2"].into_iter().enumerate() {
        let mut stream = TcpStream::connect(tcp).await.unwrap();
        let local = stream.local_addr().unwrap();
        let mut framer = StreamFramer::new(65536);
        stream
            .write_all(outbound_register(local, call_id, 1).as_bytes())
            .await
            .unwrap();
        let ok = read_message(&mut stream, &mut framer).await;
        assert_eq!(ok.status(), Some(200));
        assert_eq!(header_text(&ok, "Require").as_deref(), Some("outbound"));
        // One binding: the second connection's flow replaced the first (§6).
        assert_eq!(ok.values(HeaderName::Contact).count(), 1, "{n}");

        carol
            .request("MESSAGE", &aor("alice"))
            .body("text/plain", "over the flow")
            .await;
        let message = read_message(&mut stream, &mut framer).await;
        assert_eq!(&message.body()[..], b"over the flow");
        let answer = moonroute::sip::ResponseBuilder::new(&message, 200, "OK")
            .to_tag(b"ob")
            .build();
        stream.write_all(&answer).await.unwrap();
        carol.expect_final(200).await;
        flows.push(stream);
    }
    // The flow's connection closes: the binding is skipped (no attempt on its Contact).
    let open = running.server.connection_count();
    drop(flows);
    let deadline = tokio::time::Instant::now() + WAIT;
    while running.server.connection_count() + 1 >= open {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server saw no close"
        );
        tokio::task::yield_now().await;
    }
    carol.request("MESSAGE", &aor("alice")).await;
    // No contact left (the shipped policy's 404), and no connection tried to 127.0.0.1:44790.
    let refused = carol.recv_response(WAIT).await;
    assert_eq!(
        refused.status(),
        Some(404),
        "{}",
        common::ua::show(&refused)
    );
}
