//! The log an operator reads: the real `moonroute` binary with `--log-format json` (and the
//! human format), test user agents on 127.0.0.1 registering and calling through it, and a
//! malformed datagram. Asserts that every line is one JSON object, that every per-message line
//! of a call carries its Call-ID (a grep of the Call-ID shows the whole call), and that a
//! refused message gets exactly one `moonroute::refused` line with a reason. Nothing sleeps:
//! stderr lines are read as they come, each wait bounded by a timeout.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use common::ua::{TestUa, WAIT};
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::UdpSocket;

/// The routing script: registrar and record-routing proxy, logging each request from Lua.
const SCRIPT: &str = r#"
local seen = sip.metrics.counter("logtest_requests_total")
function on_request(req)
  seen:inc()
  sip.log("info", "script sees", req.method)
  if req:loose_route() then return req:t_relay() end
  if req:is_method("REGISTER") then return req:save("location") end
  if req:is_method("INVITE") then req:record_route() end
  if req:lookup("location") == 0 then return req:reply(404, "Not Found") end
  return req:t_relay()
end
"#;

/// `moonroute run` on an ephemeral UDP port of 127.0.0.1, one event loop, its stderr lines
/// delivered to `lines` as they are written.
struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far, in order.
    seen: Vec<String>,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Server {
    /// `port` 0: an ephemeral port, read from the `listening` line (which `level` must show).
    fn start(format: &str, level: &str, port: u16) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("route.lua");
        std::fs::write(&script, SCRIPT).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_moonroute"))
            .arg("run")
            .arg("--listen")
            .arg(format!("udp:127.0.0.1:{port}"))
            .args(["--workers", "1"])
            .arg("--script")
            .arg(&script)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--control-socket")
            .arg(dir.path().join("ctl"))
            .args(["--log-format", format])
            .args(["--log-level", level])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start moonroute");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child,
            lines,
            seen: Vec::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        };
        if port != 0 {
            return server;
        }
        let listening = server.wait_for("the listening line", |l| {
            l.contains("listening") && l.contains("udp:127.0.0.1:")
        });
        let port = listening
            .rsplit("udp:127.0.0.1:")
            .next()
            .and_then(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u16>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no port in {listening}"));
        server.addr.set_port(port);
        server
    }

    /// Reads lines until one matches (bounded by [`WAIT`]); returns it.
    fn wait_for(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line for {what} within {WAIT:?}; the log so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Call-ID a JSON line carries: its own `call_id` field or its span's.
fn call_id_of(line: &Value) -> Option<&str> {
    line.get("call_id")
        .or_else(|| line.get("span").and_then(|s| s.get("call_id")))
        .and_then(Value::as_str)
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"))
}

/// Sends OPTIONS to the server (answered statelessly) until one is answered: it is up.
/// Bounded: 50 probes, each waiting at most 200 ms for its answer.
async fn wait_until_answering(server: SocketAddr) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let from = socket.local_addr().unwrap();
    for n in 0..50 {
        let probe = format!(
            "OPTIONS sip:{server} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {from};branch=z9hG4bK-probe-{n}\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:probe@127.0.0.1>;tag=p{n}\r\n\
             To: <sip:{server}>\r\n\
             Call-ID: probe-{n}\r\n\
             CSeq: 1 OPTIONS\r\n\
             Content-Length: 0\r\n\r\n"
        );
        // A refused send (nothing bound yet) is what is being waited out.
        let _ = socket.send_to(probe.as_bytes(), server).await;
        let mut buf = [0u8; 2048];
        let answer = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            socket.recv_from(&mut buf),
        )
        .await;
        if matches!(answer, Ok(Ok(_))) {
            return;
        }
    }
    panic!("the server at {server} never answered OPTIONS");
}

/// A REGISTER of `ua`'s contact for `aor`, with `call_id`; returns the status.
async fn register(ua: &mut TestUa, server: SocketAddr, aor: &str, call_id: &str) -> u16 {
    let request = format!(
        "REGISTER sip:{server} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {};branch=z9hG4bK-{call_id};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <{aor}>;tag=r1\r\n\
         To: <{aor}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 REGISTER\r\n\
         Contact: <{}>\r\n\
         Expires: 3600\r\n\
         Content-Length: 0\r\n\r\n",
        ua.local,
        ua.uri()
    );
    ua.send_raw(request.as_bytes(), server).await;
    ua.recv_response(WAIT).await.status().unwrap_or(0)
}

/// A request with a CSeq that does not parse: salvageable, so it is answered 400.
fn malformed(call_id: &str, from: SocketAddr) -> String {
    format!(
        "OPTIONS sip:nobody@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch=z9hG4bK-{call_id}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:x@127.0.0.1>;tag=m1\r\n\
         To: <sip:nobody@127.0.0.1>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: one OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// Sends `malformed` then a second one whose refused line proves the first was fully logged
/// (one event loop handles them in order); returns the lines logged meanwhile.
async fn send_malformed(server: &mut Server, call_id: &str) -> Vec<String> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let from = socket.local_addr().unwrap();
    let start = server.seen.len();
    let marker = format!("{call_id}-marker");
    for id in [call_id, &marker] {
        socket
            .send_to(malformed(id, from).as_bytes(), server.addr)
            .await
            .unwrap();
    }
    server.wait_for("the marker's refusal", |l| {
        l.contains(&marker) && l.contains("moonroute::refused")
    });
    server.seen[start..].to_vec()
}

#[tokio::test]
async fn json_lines_carry_the_call_id_and_one_refusal_line_per_malformed_message() {
    let mut server = Server::start("json", "debug", 0);
    let proxy = server.addr;
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let mut bob = TestUa::udp("bob").await;
    let bob_aor = format!("sip:bob@{proxy}");

    let before_register = server.seen.len();
    assert_eq!(
        register(&mut bob, proxy, &bob_aor, "logtest-register").await,
        200
    );
    server.wait_for("the script's line about the REGISTER", |l| {
        l.contains("script sees REGISTER")
    });

    // A call: INVITE, 180, 200, ACK, BYE, 200, all through the proxy.
    let invite = alice.invite(&bob_aor).await;
    let call_id = String::from_utf8_lossy(invite.call_id().unwrap()).into_owned();
    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 180, "Ringing").await;
    bob.respond(&incoming, 200, "OK").await;
    alice.expect_response(100).await;
    alice.expect_response(180).await;
    let answer = alice.expect_response(200).await;
    let mut dialog = alice.ack_2xx(&answer).await;
    bob.expect_request("ACK").await;
    alice.bye(&mut dialog).await;
    let bye = bob.expect_request("BYE").await;
    bob.respond(&bye, 200, "OK").await;
    alice.expect_response(200).await;
    server.wait_for("the script's line about the BYE", |l| {
        l.contains("script sees BYE")
    });

    let refused = send_malformed(&mut server, "logtest-malformed").await;

    // Every line is one JSON object with the standard keys.
    let lines: Vec<Value> = server.seen.iter().map(|l| parse(l)).collect();
    for line in &lines {
        for key in ["timestamp", "level", "target"] {
            assert!(line.get(key).is_some(), "no {key}: {line}");
        }
    }
    // Every line of the engine's per-message modules, from the REGISTER on, names the Call-ID
    // of its message; the call's lines name the call's.
    let per_message = [
        "moonroute::server::core",
        "moonroute::proxy",
        "moonroute::transaction",
        "moonroute::script::api",
        "moonroute::refused",
        "moonroute::registrar",
    ];
    for line in &lines[before_register..] {
        let target = line["target"].as_str().unwrap_or("");
        if per_message.iter().any(|t| target.starts_with(t)) {
            assert!(call_id_of(line).is_some(), "no call_id: {line}");
        }
    }
    let about_call: Vec<&Value> = lines
        .iter()
        .filter(|l| call_id_of(l) == Some(call_id.as_str()))
        .collect();
    for method in ["INVITE", "ACK", "BYE"] {
        let message = format!("script sees {method}");
        assert!(
            about_call
                .iter()
                .any(|l| l["message"].as_str() == Some(message.as_str())),
            "no `{message}` line with call_id {call_id}; lines:\n{}",
            server.seen.join("\n")
        );
    }
    // The Lua line is at the script's place.
    let lua = about_call
        .iter()
        .find(|l| l["message"] == "script sees INVITE")
        .unwrap();
    assert!(
        lua["script"]
            .as_str()
            .is_some_and(|s| s.contains("route.lua:")),
        "{lua}"
    );

    // The malformed datagram: exactly one refusal line, with its reason and answer.
    let about_malformed: Vec<Value> = refused
        .iter()
        .map(|l| parse(l))
        .filter(|l| call_id_of(l) == Some("logtest-malformed"))
        .collect();
    let refusals: Vec<&Value> = about_malformed
        .iter()
        .filter(|l| l["target"] == "moonroute::refused")
        .collect();
    assert_eq!(refusals.len(), 1, "{about_malformed:?}");
    let refusal = refusals[0];
    assert_eq!(refusal["code"], 400, "{refusal}");
    assert_eq!(refusal["transport"], "udp", "{refusal}");
    assert!(
        refusal["reason"]
            .as_str()
            .is_some_and(|r| r.contains("CSeq")),
        "{refusal}"
    );
    assert!(
        refusal["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("127.0.0.1:")),
        "{refusal}"
    );
}

#[tokio::test]
async fn human_lines_can_be_grepped_by_call_id() {
    // Only warnings, the script's lines and the refusals: the `sip` span (and its Call-ID)
    // is there whatever the level.
    // A free port (the `listening` line is not shown at this level); the REGISTER is
    // retransmitted until the server answers.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Server::start(
        "human",
        "warn,moonroute::script=info,moonroute::refused=info",
        port,
    );
    wait_until_answering(server.addr).await;
    let proxy = server.addr;
    let mut bob = TestUa::udp("bob").await;
    assert_eq!(
        register(
            &mut bob,
            proxy,
            &format!("sip:bob@{proxy}"),
            "human-register"
        )
        .await,
        200
    );
    let line = server.wait_for("the script's line", |l| l.contains("script sees REGISTER"));
    assert!(line.contains("human-register"), "{line}");
    assert!(
        serde_json::from_str::<Value>(&line).is_err(),
        "human, not JSON: {line}"
    );

    // Unknown user: the script answers 404, the one refusal line says so.
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let invite = alice.invite(&format!("sip:nobody@{proxy}")).await;
    alice.expect_final(404).await;
    let call_id = String::from_utf8_lossy(invite.call_id().unwrap()).into_owned();
    let refusal = server.wait_for("the 404's refusal line", |l| {
        l.contains("moonroute::refused") && l.contains(&call_id)
    });
    assert!(
        refusal.contains("code=404") && refusal.contains("answered 404 Not Found"),
        "{refusal}"
    );

    let refused = send_malformed(&mut server, "human-malformed").await;
    let grep: Vec<&String> = refused
        .iter()
        .filter(|l| l.contains("human-malformed") && !l.contains("marker"))
        .collect();
    assert_eq!(grep.len(), 1, "{grep:?}");
    assert!(
        grep[0].contains("moonroute::refused") && grep[0].contains("reason="),
        "{}",
        grep[0]
    );
}

/// An in-dialog request whose Record-Route signature expired (`moonroute-proto/src/proxy/route_sign.rs`) gets
/// one `info` line saying so, with how long ago and its Call-ID, then the one refusal line of
/// the script's answer. The signature is written here with the key the server made in its data
/// directory, as the server would have written it 90 s too early.
#[tokio::test]
async fn an_expired_route_signature_is_logged_with_its_age() {
    use moonroute::proxy::route_sign::{Binding, Holder};
    use moonroute::proxy::RouteSigner;
    use std::time::{SystemTime, UNIX_EPOCH};

    let mut server = Server::start("json", "info", 0);
    wait_until_answering(server.addr).await;
    let key = moonroute::secret::load_or_create(&server._dir.path().join("data")).unwrap();
    let target = "sip:bob@127.0.0.1:9";
    let binding = Binding {
        holder: Holder::Caller,
        tracked: false,
        call_id: b"logtest-expired",
        caller_tag: b"a1",
        callee_tag: b"b1",
        target: Some(moonroute::sip::Uri::parse(target.as_bytes()).unwrap()),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let signature = RouteSigner::new(&key).sign(&binding, [], now - 90);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let from = socket.local_addr().unwrap();
    let message = format!(
        "MESSAGE {target} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch=z9hG4bK-expired;rport\r\n\
         Max-Forwards: 70\r\n\
         Route: <sip:{};transport=udp;lr;mrs={signature}>\r\n\
         From: <sip:alice@127.0.0.1>;tag=a1\r\n\
         To: <sip:bob@127.0.0.1>;tag=b1\r\n\
         Call-ID: logtest-expired\r\n\
         CSeq: 2 MESSAGE\r\n\
         Content-Length: 0\r\n\r\n",
        server.addr
    );
    socket
        .send_to(message.as_bytes(), server.addr)
        .await
        .unwrap();
    let start = server.seen.len();
    server.wait_for("the refusal of the MESSAGE", |l| {
        l.contains("logtest-expired") && l.contains("moonroute::refused")
    });
    let about: Vec<Value> = server.seen[start..]
        .iter()
        .map(|l| parse(l))
        .filter(|l| call_id_of(l) == Some("logtest-expired"))
        .collect();
    let expired: Vec<&Value> = about
        .iter()
        .filter(|l| l["message"].as_str().is_some_and(|m| m.contains("expired")))
        .collect();
    assert_eq!(expired.len(), 1, "{about:?}");
    let line = expired[0];
    assert_eq!(line["level"], "INFO", "{line}");
    assert!(
        line["message"]
            .as_str()
            .is_some_and(|m| m.contains("record_route_lifetime_secs")),
        "{line}"
    );
    let ago = line["ago_secs"].as_u64().unwrap_or(0);
    assert!((90..=150).contains(&ago), "{line}");
    assert_eq!(
        about
            .iter()
            .filter(|l| l["target"] == "moonroute::refused")
            .count(),
        1,
        "{about:?}"
    );
}
