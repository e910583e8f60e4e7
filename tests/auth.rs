//! Digest authentication end to end (RFC 3261 §22, RFC 2617, RFC 8760): the real server
//! routed by the shipped `scripts/default.lua` (AUTHENTICATE = true), a sled subscriber table
//! and location store in a temporary data directory, users added through the API, and test
//! user agents on loopback UDP answering challenges with `tests/common/auth.rs`.
//!
//! Nothing sleeps: every wait is for a message, bounded by a timeout. The stale nonce is
//! built by the test with the secret it configured, issued ten minutes ago.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::auth::{answer_challenge, Answer, Challenge};
use common::ua::{expect_status, header_text, show, TestUa, WAIT};
use moonroute::auth::nonce::Nonces;
use moonroute::auth::Subscriber;
use moonroute::config::{Config, LocationBackend};
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::Message;
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;

const DOMAIN: &str = "moonroute.test";
const SECRET: &str = "the tests' nonce secret";

struct Running {
    _server: ServerHandle,
    host: Arc<ScriptHost>,
    udp: SocketAddr,
    _dir: TempDir,
}

/// The shipped default.lua over sled in a fresh data directory, with alice and bob
/// provisioned (passwords `alice-pw`, `bob-pw`).
fn start() -> Running {
    start_with_script("scripts/default.lua")
}

/// As [`start`], routed by `script` (relative to the crate root).
fn start_with_script(script: &str) -> Running {
    let dir = TempDir::new().unwrap();
    let mut config = Config {
        listen: vec!["udp:127.0.0.1:0".parse::<ListenAddr>().unwrap()],
        domains: vec![DOMAIN.to_owned()],
        workers: 2,
        script: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Sled;
    config.auth.secret = SECRET.to_owned();
    config.validate().unwrap();
    let host = ScriptHost::from_config(&config).expect("script and stores load");
    let auth = host.services().auth.clone().expect("an authenticator");
    for user in ["alice", "bob"] {
        auth.subscribers()
            .add(
                &format!("{user}@{DOMAIN}"),
                &Subscriber::with_password(user, DOMAIN, &format!("{user}-pw")),
            )
            .unwrap();
    }
    let factory = CoreFactory::with_router(&config, host.router_factory());
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        _server: server,
        host,
        _dir: dir,
    }
}

fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn aor(user: &str) -> String {
    format!("sip:{user}@{DOMAIN}")
}

/// A request's text: `from_user` in our domain, a fresh branch per call.
struct Request {
    method: &'static str,
    ruri: String,
    from_user: String,
    to: String,
    call_id: String,
    cseq: u32,
    contact: Option<String>,
    headers: Vec<(String, String)>,
}

impl Request {
    fn register(user: &str, ua: &TestUa, registrar: SocketAddr) -> Request {
        Request {
            method: "REGISTER",
            ruri: format!("sip:{registrar}"),
            from_user: user.to_owned(),
            to: aor(user),
            call_id: format!("auth-{}@127.0.0.1", unique()),
            cseq: 1,
            contact: Some(format!("<{}>", ua.uri())),
            headers: Vec::new(),
        }
    }

    fn text(&self, local: SocketAddr, branch: &str) -> String {
        let mut text = format!(
            "{method} {ruri} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <{from}>;tag=t-{tag}\r\n\
             To: <{to}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} {method}\r\n",
            method = self.method,
            ruri = self.ruri,
            from = aor(&self.from_user),
            to = self.to,
            call_id = self.call_id,
            tag = self.call_id.split('@').next().unwrap_or_default(),
            cseq = self.cseq,
        );
        if let Some(contact) = &self.contact {
            text += &format!("Contact: {contact}\r\nExpires: 600\r\n");
        }
        for (name, value) in &self.headers {
            text += &format!("{name}: {value}\r\n");
        }
        text + "Content-Length: 0\r\n\r\n"
    }

    /// Sends it with a fresh branch; returns the text sent and the final response.
    async fn send(&self, ua: &mut TestUa, to: SocketAddr) -> (String, Message) {
        let text = self.text(ua.local, &format!("z9hG4bK-auth-{}", unique()));
        ua.send_raw(text.as_bytes(), to).await;
        (text.clone(), final_response(ua).await)
    }

    /// The same request with credentials answering `challenge` as `user`/`password`.
    fn answered(&self, challenge: &Challenge, user: &str, password: &str, nc: u32) -> Request {
        let header = match self.method {
            "REGISTER" => "Authorization",
            _ => "Proxy-Authorization",
        };
        let credentials = answer_challenge(
            challenge,
            &Answer {
                user,
                password,
                method: self.method,
                uri: &self.ruri,
                nc,
            },
        );
        // Other headers (an INVITE's Contact) stay; earlier credentials are replaced.
        let mut headers: Vec<(String, String)> = self
            .headers
            .iter()
            .filter(|(name, _)| name != header)
            .cloned()
            .collect();
        headers.push((header.to_owned(), credentials));
        Request {
            cseq: self.cseq + 1,
            headers,
            method: self.method,
            ruri: self.ruri.clone(),
            from_user: self.from_user.clone(),
            to: self.to.clone(),
            call_id: self.call_id.clone(),
            contact: self.contact.clone(),
        }
    }
}

async fn final_response(ua: &mut TestUa) -> Message {
    loop {
        let response = ua.recv_response(WAIT).await;
        if response.status().unwrap() >= 200 {
            return response;
        }
    }
}

/// The challenges of a 401/407, in order.
fn challenges(response: &Message, header: &str) -> Vec<Challenge> {
    response
        .headers_named(header)
        .map(|v| Challenge::parse(&String::from_utf8_lossy(v)))
        .collect()
}

fn with_algorithm(list: &[Challenge], algorithm: &str) -> Challenge {
    list.iter()
        .find(|c| c.algorithm == algorithm)
        .unwrap_or_else(|| panic!("a {algorithm} challenge in {list:?}"))
        .clone()
}

fn bindings(running: &Running, user: &str) -> usize {
    running
        .host
        .services()
        .location_lookup(&aor(user), SystemTime::now())
        .len()
}

/// REGISTER challenged (401, SHA-256 then MD5), answered with `algorithm`: 200.
async fn register(running: &Running, ua: &mut TestUa, user: &str, algorithm: &str) -> Message {
    let request = Request::register(user, ua, running.udp);
    let (_, challenge) = request.send(ua, running.udp).await;
    expect_status(&challenge, 401);
    let list = challenges(&challenge, "WWW-Authenticate");
    let answered = request.answered(
        &with_algorithm(&list, algorithm),
        user,
        &format!("{user}-pw"),
        1,
    );
    let (_, ok) = answered.send(ua, running.udp).await;
    expect_status(&ok, 200);
    ok
}

#[tokio::test]
async fn register_is_challenged_and_accepted_with_sha256_and_md5() {
    let running = start();
    let mut ua = TestUa::udp("alice").await;
    let request = Request::register("alice", &ua, running.udp);
    let (_, challenge) = request.send(&mut ua, running.udp).await;
    expect_status(&challenge, 401);
    assert!(header_text(&challenge, "Proxy-Authenticate").is_none());
    let list = challenges(&challenge, "WWW-Authenticate");
    assert_eq!(list.len(), 2, "{}", show(&challenge));
    assert_eq!(
        list[0].algorithm, "SHA-256",
        "SHA-256 first (RFC 8760 §2.4)"
    );
    assert_eq!(list[1].algorithm, "MD5");
    for c in &list {
        assert_eq!(c.realm, DOMAIN);
        assert_eq!(c.qop.as_deref(), Some("auth"));
        assert!(!c.stale);
    }
    assert_eq!(
        bindings(&running, "alice"),
        0,
        "nothing saved before authentication"
    );

    let (_, ok) = request
        .answered(&list[0], "alice", "alice-pw", 1)
        .send(&mut ua, running.udp)
        .await;
    expect_status(&ok, 200);
    assert_eq!(bindings(&running, "alice"), 1);

    let mut bob = TestUa::udp("bob").await;
    register(&running, &mut bob, "bob", "MD5").await;
    assert_eq!(bindings(&running, "bob"), 1);
}

/// default.lua's MD5_ONLY_AGENTS: a phone that gives up on a challenge offering SHA-256
/// (baresip before 3.12) gets MD5 alone, and registers with it.
#[tokio::test]
async fn a_phone_without_sha256_is_challenged_with_md5_alone() {
    let running = start();
    let mut ua = TestUa::udp("alice").await;
    let mut request = Request::register("alice", &ua, running.udp);
    request.headers.push((
        "User-Agent".to_owned(),
        "baresip v1.0.0 (x86_64/linux)".to_owned(),
    ));
    let (_, challenge) = request.send(&mut ua, running.udp).await;
    expect_status(&challenge, 401);
    let list = challenges(&challenge, "WWW-Authenticate");
    assert_eq!(list.len(), 1, "{}", show(&challenge));
    assert_eq!(list[0].algorithm, "MD5");
    let (_, ok) = request
        .answered(&list[0], "alice", "alice-pw", 1)
        .send(&mut ua, running.udp)
        .await;
    expect_status(&ok, 200);
    assert_eq!(bindings(&running, "alice"), 1);
}

#[tokio::test]
async fn wrong_password_is_challenged_again_and_nothing_is_saved() {
    let running = start();
    let mut ua = TestUa::udp("alice").await;
    let request = Request::register("alice", &ua, running.udp);
    let (_, challenge) = request.send(&mut ua, running.udp).await;
    let list = challenges(&challenge, "WWW-Authenticate");
    let (_, again) = request
        .answered(&list[0], "alice", "not-the-password", 1)
        .send(&mut ua, running.udp)
        .await;
    expect_status(&again, 401);
    assert!(!challenges(&again, "WWW-Authenticate")[0].stale);
    assert_eq!(bindings(&running, "alice"), 0);
}

#[tokio::test]
async fn replayed_nonce_is_refused_but_a_retransmission_gets_the_same_200() {
    let running = start();
    let mut ua = TestUa::udp("alice").await;
    let request = Request::register("alice", &ua, running.udp);
    let (_, challenge) = request.send(&mut ua, running.udp).await;
    let list = challenges(&challenge, "WWW-Authenticate");
    let answered = request.answered(&list[0], "alice", "alice-pw", 1);
    let (sent, ok) = answered.send(&mut ua, running.udp).await;
    expect_status(&ok, 200);

    // A UDP retransmission of the accepted REGISTER: the registrar answers it again. (Sent
    // from a plain socket: the test UA absorbs a repeated final response; with `rport` the
    // answer comes back to this socket.)
    let raw = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    raw.send_to(sent.as_bytes(), running.udp).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(WAIT, raw.recv_from(&mut buf))
        .await
        .expect("an answer to the retransmission")
        .unwrap();
    let again = Message::parse(bytes::Bytes::copy_from_slice(&buf[..n])).unwrap();
    expect_status(&again, 200);

    // The same credentials (nonce and nc) on a new request: a replay.
    let replay = Request {
        cseq: answered.cseq + 1,
        ..answered
    };
    let (_, refused) = replay.send(&mut ua, running.udp).await;
    expect_status(&refused, 401);
}

#[tokio::test]
async fn stale_nonce_is_challenged_again_with_stale_true() {
    let running = start();
    let mut ua = TestUa::udp("alice").await;
    let request = Request::register("alice", &ua, running.udp);
    // A nonce this server issued ten minutes ago (the test knows the secret).
    let old = Nonces::new(SECRET.as_bytes(), Duration::from_secs(300))
        .issue(DOMAIN, SystemTime::now() - Duration::from_secs(600));
    let challenge = Challenge {
        realm: DOMAIN.to_owned(),
        nonce: old,
        algorithm: "SHA-256".to_owned(),
        qop: Some("auth".to_owned()),
        stale: false,
    };
    let (_, response) = request
        .answered(&challenge, "alice", "alice-pw", 1)
        .send(&mut ua, running.udp)
        .await;
    expect_status(&response, 401);
    let list = challenges(&response, "WWW-Authenticate");
    assert!(
        list.iter().all(|c| c.stale),
        "stale=true\n{}",
        show(&response)
    );
    // The client retries with the fresh nonce, without asking its user: accepted.
    let retry = Request {
        cseq: 10,
        ..Request::register("alice", &ua, running.udp)
    };
    let (_, ok) = retry
        .answered(&list[0], "alice", "alice-pw", 1)
        .send(&mut ua, running.udp)
        .await;
    expect_status(&ok, 200);
}

#[tokio::test]
async fn credentials_for_another_aor_or_uri_are_refused() {
    let running = start();
    let mut ua = TestUa::udp("alice").await;
    // alice's credentials registering bob's AOR: 403 (check_from).
    let request = Request::register("bob", &ua, running.udp);
    let (_, challenge) = request.send(&mut ua, running.udp).await;
    let list = challenges(&challenge, "WWW-Authenticate");
    let (_, forbidden) = request
        .answered(&list[0], "alice", "alice-pw", 1)
        .send(&mut ua, running.udp)
        .await;
    expect_status(&forbidden, 403);
    assert_eq!(bindings(&running, "bob"), 0);

    // A digest uri that is not the Request-URI: refused, challenged again.
    let request = Request::register("alice", &ua, running.udp);
    let (_, challenge) = request.send(&mut ua, running.udp).await;
    let list = challenges(&challenge, "WWW-Authenticate");
    let elsewhere = Request {
        ruri: "sip:elsewhere.example".to_owned(),
        ..Request::register("alice", &ua, running.udp)
    }
    .answered(&list[0], "alice", "alice-pw", 1);
    let mismatched = Request {
        ruri: request.ruri.clone(),
        ..elsewhere
    };
    let (_, refused) = mismatched.send(&mut ua, running.udp).await;
    expect_status(&refused, 401);
    assert_eq!(bindings(&running, "alice"), 0);
}

#[tokio::test]
async fn check_from_compares_the_subscribers_domain_not_the_realm() {
    // carol@moonroute.test authenticates in realm "voip" (`ctl user add --realm voip`): her
    // AOR's host is the subscriber's domain, not the realm.
    let running = start_with_script("tests/data/scripts/auth_realm.lua");
    running
        .host
        .services()
        .auth
        .as_ref()
        .unwrap()
        .subscribers()
        .add(
            &format!("carol@{DOMAIN}"),
            &Subscriber::with_password("carol", "voip", "carol-pw"),
        )
        .unwrap();
    let mut ua = TestUa::udp("carol").await;
    let request = Request::register("carol", &ua, running.udp);
    let (_, challenge) = request.send(&mut ua, running.udp).await;
    expect_status(&challenge, 401);
    let list = challenges(&challenge, "WWW-Authenticate");
    assert_eq!(list[0].realm, "voip");
    let (_, ok) = request
        .answered(&list[0], "carol", "carol-pw", 1)
        .send(&mut ua, running.udp)
        .await;
    expect_status(&ok, 200);
    assert_eq!(bindings(&running, "carol"), 1);

    // Her credentials for another AOR of the domain are still refused.
    let request = Request::register("bob", &ua, running.udp);
    let (_, challenge) = request.send(&mut ua, running.udp).await;
    let list = challenges(&challenge, "WWW-Authenticate");
    let (_, forbidden) = request
        .answered(&list[0], "carol", "carol-pw", 1)
        .send(&mut ua, running.udp)
        .await;
    expect_status(&forbidden, 403);
    assert_eq!(bindings(&running, "bob"), 0);
}

#[tokio::test]
async fn call_is_authenticated_by_407_and_relayed_without_credentials() {
    let running = start();
    let mut bob = TestUa::udp("bob").await;
    register(&running, &mut bob, "bob", "SHA-256").await;
    let mut alice = TestUa::udp("alice").await;
    let invite = Request {
        method: "INVITE",
        ruri: aor("bob"),
        from_user: "alice".to_owned(),
        to: aor("bob"),
        call_id: format!("call-{}@127.0.0.1", unique()),
        cseq: 1,
        contact: None,
        headers: vec![("Contact".to_owned(), format!("<{}>", alice.uri()))],
    };
    let (_, challenge) = invite.send(&mut alice, running.udp).await;
    expect_status(&challenge, 407);
    assert!(header_text(&challenge, "WWW-Authenticate").is_none());
    let list = challenges(&challenge, "Proxy-Authenticate");
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].algorithm, "SHA-256");
    ack_non_2xx(&mut alice, &invite, &challenge, running.udp).await;

    // bob's credentials with alice's From: 403.
    let as_bob = invite.answered(&list[0], "bob", "bob-pw", 1);
    let (_, forbidden) = as_bob.send(&mut alice, running.udp).await;
    expect_status(&forbidden, 403);
    ack_non_2xx(&mut alice, &as_bob, &forbidden, running.udp).await;

    let authenticated = Request {
        cseq: 3,
        ..invite.answered(&list[1], "alice", "alice-pw", 2)
    };
    authenticated.send_only(&mut alice, running.udp).await;
    let incoming = bob.expect_request("INVITE").await;
    assert!(
        header_text(&incoming, "Proxy-Authorization").is_none(),
        "credentials consumed\n{}",
        show(&incoming)
    );
    bob.respond(&incoming, 486, "Busy Here").await;
    let busy = final_response(&mut alice).await;
    expect_status(&busy, 486);
}

impl Request {
    async fn send_only(&self, ua: &mut TestUa, to: SocketAddr) {
        let text = self.text(ua.local, &format!("z9hG4bK-auth-{}", unique()));
        ua.send_raw(text.as_bytes(), to).await;
    }
}

/// The ACK of a non-2xx final response (§17.1.1.3): same branch, To with the response's tag.
async fn ack_non_2xx(ua: &mut TestUa, invite: &Request, response: &Message, to: SocketAddr) {
    let via = header_text(response, "Via").unwrap();
    let to_header = header_text(response, "To").unwrap();
    let ack = format!(
        "ACK {} SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\nFrom: <{}>;tag=t-{}\r\n\
         To: {to_header}\r\nCall-ID: {}\r\nCSeq: {} ACK\r\nContent-Length: 0\r\n\r\n",
        invite.ruri,
        aor(&invite.from_user),
        invite.call_id.split('@').next().unwrap_or_default(),
        invite.call_id,
        invite.cseq
    );
    ua.send_raw(ack.as_bytes(), to).await;
}

/// `moonroute run --config CONFIG` started through `sh` with `umask 022`, as from a shell in a
/// checkout (the README's `cargo run --release`); stopped when dropped. Its stderr is kept.
struct BinaryServer {
    child: std::process::Child,
    log: Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl BinaryServer {
    /// Starts the server and waits (bounded) for the log line saying its control socket is
    /// ready, which comes after the data directory, the key and both databases are open.
    fn start(config: &std::path::Path) -> BinaryServer {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut child = Command::new("sh")
            .args(["-c", "umask 022 && exec \"$0\" run --config \"$1\""])
            .arg(env!("CARGO_BIN_EXE_moonroute"))
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start moonroute");
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let ready = line.contains("control socket ready");
                lines.lock().unwrap().push_str(&(line + "\n"));
                if ready {
                    let _ = ready_tx.send(());
                }
            }
        });
        let mut server = BinaryServer {
            child,
            log,
            reader: Some(reader),
        };
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            panic!("the control socket is not ready:\n{}", server.stop());
        }
        server
    }

    /// Stops the server; returns everything it logged.
    fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log.lock().unwrap().clone()
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `moonroute ctl --socket SOCKET ARGS...` with `stdin` as its input: whether it succeeded,
/// and its output (stdout then stderr).
fn ctl(socket: &std::path::Path, args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_moonroute"))
        .arg("ctl")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// `moonroute ctl user add|list|rm` against a running `moonroute run`, over its control
/// socket: the password comes from stdin, the listing shows users and realms only.
#[test]
fn ctl_user_commands_over_the_control_socket() {
    let dir = TempDir::new().unwrap();
    let socket = dir.path().join("ctl.sock");
    let config = common::write_binary_config(dir.path(), &socket);
    let mut server = BinaryServer::start(&config);
    let (ok, out) = ctl(
        &socket,
        &["user", "add", "alice@Moonroute.test"],
        "s3cret\n",
    );
    assert!(ok, "{out}");
    assert!(out.contains("alice@moonroute.test added"), "{out}");
    let (ok, out) = ctl(
        &socket,
        &["user", "add", "bob@moonroute.test", "pw", "--realm", "voip"],
        "",
    );
    assert!(ok, "{out}");
    let (ok, out) = ctl(&socket, &["user", "list"], "");
    assert!(ok, "{out}");
    assert_eq!(
        out,
        "alice@moonroute.test realm=moonroute.test\nbob@moonroute.test realm=voip\n"
    );
    let (ok, out) = ctl(&socket, &["user", "rm", "bob@moonroute.test"], "");
    assert!(ok, "{out}");
    let (ok, _) = ctl(&socket, &["user", "rm", "bob@moonroute.test"], "");
    assert!(!ok, "a second rm finds nothing");
    let (ok, out) = ctl(&socket, &["status"], "");
    assert!(ok && out.contains("subscribers: 1\n"), "{out}");
    server.stop();
    // The HA1s computed by the ctl client are the right ones.
    let table =
        moonroute::auth::Subscribers::open(&dir.path().join("data").join("subscribers")).unwrap();
    assert_eq!(
        table.find("alice", DOMAIN),
        Some(Subscriber::with_password("alice", DOMAIN, "s3cret"))
    );
}

// ----- secrets on disk -----------------------------------------------------------------------

/// The permission bits of `path` and of everything under it (links not followed).
fn modes_under(path: &std::path::Path) -> Vec<(PathBuf, std::fs::FileType, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    let mut modes = vec![(
        path.to_path_buf(),
        meta.file_type(),
        meta.permissions().mode() & 0o7777,
    )];
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            modes.extend(modes_under(&entry.unwrap().path()));
        }
    }
    modes
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Issue 17: under umask 022, a first start and `ctl user add` leave nothing in the data
/// directory that another user can read: the directory, the databases (sled's own files
/// included) and their directories, the server key, the control socket.
#[test]
fn a_first_start_under_umask_022_keeps_the_data_directory_private() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    // As the default configuration has it: the control socket inside the data directory.
    let socket = data.join("moonroute.ctl");
    let config = common::write_binary_config(dir.path(), &socket);
    let mut server = BinaryServer::start(&config);
    let (ok, out) = ctl(
        &socket,
        &["user", "add", "alice@moonroute.test"],
        "s3cret\n",
    );
    assert!(ok, "{out}");
    let modes = modes_under(&data);
    let log = server.stop();

    for name in ["secret", "subscribers/db", "location/db", "moonroute.ctl"] {
        assert!(
            modes.iter().any(|(path, _, _)| *path == data.join(name)),
            "{name} exists: {modes:?}"
        );
    }
    for (path, kind, mode) in &modes {
        let private = if kind.is_dir() { 0o700 } else { 0o600 };
        // The socket was removed when the server stopped, after its mode was read.
        assert_eq!(*mode, private, "{} is {mode:04o}", path.display());
    }
    assert!(
        !log.contains("readable by"),
        "nothing to warn about:\n{log}"
    );
}

/// What earlier versions left under umask 022 (a 0755 data directory, an exposed subscriber
/// table) and a key an operator copied in with mode 0644: the table, moonroute's own, is made
/// private when opened, with a warning; the directory and the key, which the operator may
/// have set up so, are only warned about, each with the `chmod` that fixes it.
#[test]
fn exposed_files_left_by_an_earlier_version_are_fixed_or_reported() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    let table = data.join("subscribers");
    {
        let subscribers = moonroute::auth::Subscribers::open(&table).unwrap();
        let alice = Subscriber::with_password("alice", DOMAIN, "s3cret");
        subscribers.add("alice@moonroute.test", &alice).unwrap();
    }
    for (path, kind, _) in modes_under(&data) {
        set_mode(&path, if kind.is_dir() { 0o755 } else { 0o644 });
    }
    let key = data.join("secret");
    std::fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();
    set_mode(&key, 0o644);

    let socket = dir.path().join("ctl.sock");
    let config = common::write_binary_config(dir.path(), &socket);
    let mut server = BinaryServer::start(&config);
    let (ok, out) = ctl(&socket, &["user", "list"], "");
    assert!(ok && out.contains("alice@moonroute.test"), "{out}");
    let log = server.stop();

    for (path, kind, mode) in modes_under(&table) {
        let private = if kind.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, private, "{} is {mode:04o}", path.display());
    }
    assert!(
        log.contains("database directory was open to other users")
            && log.contains(&table.display().to_string()),
        "{log}"
    );
    let mode = |path: &std::path::Path| modes_under(path)[0].2;
    assert_eq!(mode(&data), 0o755, "the data directory keeps its mode");
    assert_eq!(mode(&key), 0o644, "the key keeps its mode");
    let data_dir_warning = format!(
        "is readable by other users (mode 0755): chmod 700 {}",
        data.display()
    );
    let key_warning = format!(
        "is readable by other users (mode 0644): chmod 600 {}",
        key.display()
    );
    assert!(log.contains(&data_dir_warning), "{log}");
    assert!(log.contains(&key_warning), "{log}");
}
