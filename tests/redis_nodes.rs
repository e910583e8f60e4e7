//! Several nodes sharing one Redis (issue 19, first slice): the location store and `sip.kv` on
//! a real `redis-server` (started by the test on 127.0.0.1 with its data in a temporary
//! directory; skipped with a message when it is not installed), real nodes on UDP.
//!
//! - three nodes on 127.0.0.1:25061-25063: a phone registered on node 1 is called through
//!   nodes 2 and 3, and `ctl ul show` on node 3 lists it;
//! - Redis killed: REGISTER gets 503 with Retry-After, a call to a registered user 503 (never
//!   a false 404); Redis started again: service resumes without a restart of the node, and
//!   the binding acknowledged before the outage is still there;
//! - two nodes (two connections) updating one AOR at once lose no binding (§10.3 atomicity
//!   through the store's compare-and-set);
//! - `sip.kv.incr` from two nodes at once counts exactly;
//! - routing through the owning node (`moonroute::cluster`): a phone registered over TCP on
//!   node 1 is called through node 3 and the INVITE comes over its own connection, from node 1;
//!   a UDP phone registered on node 1 is called from node 2 directly;
//! - the owning node down: its TCP contact's branch is 480, the other contacts still ring.
//!
//! Nothing sleeps to wait for behaviour: every wait is for a message or a thread, bounded.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::redis_server::RedisServer;
use common::ua::{header_text, show, TestUa, WAIT};
use moonroute::config::{Config, KvBackend, LocationBackend};
use moonroute::location::{Binding, LocationStore, RedisLocation};
use moonroute::proxy::route_sign::RouteSigner;
use moonroute::redis_link::RedisLink;
use moonroute::script::kv::KvStore;
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::Message;
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;

const DOMAIN: &str = "moonroute.test";

/// One node: a server on UDP with the default policy (no authentication), its location
/// store and `sip.kv` on the Redis at `redis_url`.
struct Node {
    _server: ServerHandle,
    host: Arc<ScriptHost>,
    udp: SocketAddr,
    _dir: TempDir,
}

fn start_node(port: u16, redis_url: &str) -> Node {
    start_node_on(&[format!("udp:127.0.0.1:{port}")], redis_url)
}

/// A node listening on `listen` (its first address is its node URI).
fn start_node_on(listen: &[String], redis_url: &str) -> Node {
    let dir = TempDir::new().unwrap();
    let mut config = Config {
        listen: listen
            .iter()
            .map(|l| l.parse::<ListenAddr>().unwrap())
            .collect(),
        domains: vec![DOMAIN.to_owned()],
        workers: 1,
        script: common::default_script_without_auth(),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.control.socket = std::path::PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Redis;
    config.location.redis_url = redis_url.to_owned();
    config.kv.backend = KvBackend::Redis;
    config.kv.redis_url = redis_url.to_owned();
    config.validate().unwrap();
    let host = ScriptHost::from_config(&config).expect("the script and the stores load");
    // As `moonroute run` does: Record-Route and owner routes signed with the server key.
    let signer = RouteSigner::new(&config.server_key().unwrap());
    let factory =
        CoreFactory::with_router(&config, host.router_factory()).with_route_signer(signer);
    let server = Server::start(&config, Arc::new(factory)).expect("the node starts");
    Node {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        _server: server,
        host,
        _dir: dir,
    }
}

/// A phone of our domain on its own UDP socket, its requests sent to `node`.
async fn phone(user: &str, node: SocketAddr) -> TestUa {
    let mut ua = TestUa::udp(user).await;
    ua.from_domain = Some(DOMAIN.to_owned());
    ua.outbound = Some(node);
    ua
}

/// REGISTERs `ua` as `sip:<name>@moonroute.test` for 600 s; the final answer.
async fn register(ua: &mut TestUa) -> Message {
    let aor = format!("sip:{}@{DOMAIN}", ua.name);
    ua.request("REGISTER", &aor).header("Expires", "600").await;
    ua.recv_response(WAIT).await
}

/// `caller` INVITEs `callee` through its outbound node; `callee` answers 486 (Busy Here),
/// which must come back to the caller: the call was routed to the registered contact.
async fn call_reaches(caller: &mut TestUa, callee: &mut TestUa) {
    let uri = format!("sip:{}@{DOMAIN}", callee.name);
    caller.invite(&uri).await;
    let invite = callee.expect_request("INVITE").await;
    callee.respond(&invite, 486, "Busy Here").await;
    let answer = caller.expect_final(486).await;
    assert_eq!(answer.status(), Some(486), "{}", show(&answer));
    // The node's ACK of the 486 (§17.1.1.3), hop by hop.
    callee.expect_request("ACK").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_registered_on_node_1_is_called_through_nodes_2_and_3() {
    let Some(redis) = RedisServer::start(25379) else {
        return;
    };
    let nodes: Vec<Node> = (25061..=25063)
        .map(|port| start_node(port, &redis.url()))
        .collect();
    let mut alice = phone("alice", nodes[0].udp).await;
    let ok = register(&mut alice).await;
    assert_eq!(ok.status(), Some(200), "{}", show(&ok));
    for node in &nodes[1..] {
        let mut bob = phone("bob", node.udp).await;
        call_reaches(&mut bob, &mut alice).await;
    }
    // `ctl ul` on another node shows the binding, read from Redis.
    let registrar = nodes[2].host.services().registrar.clone().unwrap();
    let listing = moonroute::control::ul::command(
        &["show".to_owned(), format!("sip:alice@{DOMAIN}")],
        &registrar,
        SystemTime::now(),
    );
    assert!(listing.ok, "{}", listing.text);
    assert!(
        listing.text.contains(&alice.local.to_string()),
        "{}",
        listing.text
    );
    let health = registrar.store().health().unwrap();
    assert!(health.contains(" connected,"), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_gives_503_and_service_resumes_when_it_is_back() {
    let Some(mut redis) = RedisServer::start(25380) else {
        return;
    };
    let node = start_node(0, &redis.url());
    let mut alice = phone("alice", node.udp).await;
    let ok = register(&mut alice).await;
    assert_eq!(ok.status(), Some(200), "{}", show(&ok));

    redis.kill();
    let refused = register(&mut alice).await;
    assert_eq!(refused.status(), Some(503), "{}", show(&refused));
    assert_eq!(header_text(&refused, "Retry-After").as_deref(), Some("5"));
    let mut bob = phone("bob", node.udp).await;
    bob.invite(&format!("sip:alice@{DOMAIN}")).await;
    let answer = bob.expect_final(503).await;
    assert_eq!(answer.status(), Some(503), "{}", show(&answer));
    assert!(header_text(&answer, "Retry-After").is_some());
    let metrics = node.host.services().metrics.render();
    assert!(
        metrics.contains("\nmoonroute_location_redis_up 0\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("\nmoonroute_location_redis_errors_total 0\n"),
        "{metrics}"
    );

    redis.restart();
    // The link probes again with backoff (at most 5 s apart): REGISTER until it is back.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = register(&mut alice).await;
        match answer.status() {
            Some(200) => break,
            Some(503) if Instant::now() < deadline => {
                // As a phone does after a 503 with Retry-After (shortened): the pause paces
                // the client, the node's recovery is what the loop waits for.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => panic!("no 200 after Redis came back: {}", show(&answer)),
        }
    }
    call_reaches(&mut bob, &mut alice).await;
    let metrics = node.host.services().metrics.render();
    assert!(
        metrics.contains("\nmoonroute_location_redis_up 1\n"),
        "{metrics}"
    );
    let status = node
        .host
        .services()
        .registrar
        .as_ref()
        .unwrap()
        .store()
        .health()
        .unwrap();
    assert!(status.contains(" connected,"), "{status}");
    assert!(status.contains(", 1 reconnect, last error"), "{status}");
}

/// The sent-by (`host:port`) of every Via of `m`, top first.
fn via_sent_bys(m: &Message) -> Vec<String> {
    m.vias()
        .map(|via| {
            let via = via.unwrap();
            format!("{}:{}", via.host, via.port.unwrap_or(5060))
        })
        .collect()
}

/// `caller` INVITEs `callee`'s AOR; the INVITE `callee` receives (answered 486, which must
/// come back to the caller).
async fn call_and_get_invite(caller: &mut TestUa, callee: &mut TestUa, user: &str) -> Message {
    caller.invite(&format!("sip:{user}@{DOMAIN}")).await;
    let invite = callee.expect_request("INVITE").await;
    callee.respond(&invite, 486, "Busy Here").await;
    let answer = caller.expect_final(486).await;
    assert_eq!(answer.status(), Some(486), "{}", show(&answer));
    invite
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_phone_on_node_1_is_called_through_node_1_and_a_udp_phone_directly() {
    let Some(redis) = RedisServer::start(25385) else {
        return;
    };
    let nodes: Vec<Node> = (25081..=25083)
        .map(|port| {
            let listen = [
                format!("udp:127.0.0.1:{port}"),
                format!("tcp:127.0.0.1:{port}"),
            ];
            start_node_on(&listen, &redis.url())
        })
        .collect();
    let node_addr = |i: usize| nodes[i].udp.to_string();

    // Over TCP on node 1: only node 1 holds the connection (its Contact is the connection's
    // own address, where nothing listens).
    let mut tcp_phone = TestUa::tcp("tina", nodes[0].udp).await;
    tcp_phone.from_domain = Some(DOMAIN.to_owned());
    let ok = register(&mut tcp_phone).await;
    assert_eq!(ok.status(), Some(200), "{}", show(&ok));
    let mut caller = phone("bob", nodes[2].udp).await;
    let invite = call_and_get_invite(&mut caller, &mut tcp_phone, "tina").await;
    let vias = via_sent_bys(&invite);
    assert_eq!(
        vias[..2],
        [node_addr(0), node_addr(2)],
        "node 3 relayed to node 1, which relayed on the phone's connection: {}",
        show(&invite)
    );
    assert!(
        header_text(&invite, "Route").is_none(),
        "node 1 consumed its owner route: {}",
        show(&invite)
    );
    // Node 1 record-routed: the dialog's requests from the caller come back to the flow.
    let record_route = header_text(&invite, "Record-Route").unwrap_or_default();
    assert!(record_route.contains(&node_addr(0)), "{record_route}");

    // A UDP phone registered on node 1 is reached from node 2 directly.
    let mut udp_phone = phone("ursula", nodes[0].udp).await;
    let ok = register(&mut udp_phone).await;
    assert_eq!(ok.status(), Some(200), "{}", show(&ok));
    let mut caller = phone("bob", nodes[1].udp).await;
    let invite = call_and_get_invite(&mut caller, &mut udp_phone, "ursula").await;
    let vias = via_sent_bys(&invite);
    assert_eq!(vias.len(), 2, "{}", show(&invite));
    assert_eq!(vias[0], node_addr(1), "{}", show(&invite));

    // `ctl ul` on node 3 names the owning node of both.
    let registrar = nodes[2].host.services().registrar.clone().unwrap();
    let listing =
        moonroute::control::ul::command(&["show".to_owned()], &registrar, SystemTime::now());
    let owner = format!("Node: sip:{};transport=udp", node_addr(0));
    assert_eq!(listing.text.matches(&owner).count(), 2, "{}", listing.text);
    assert_eq!(
        listing
            .text
            .matches("(other nodes route through it)")
            .count(),
        1,
        "{}",
        listing.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_on_a_dead_node_gets_480_and_the_other_contacts_still_ring() {
    let Some(redis) = RedisServer::start(25386) else {
        return;
    };
    let listen = |port: u16| {
        [
            format!("udp:127.0.0.1:{port}"),
            format!("tcp:127.0.0.1:{port}"),
        ]
    };
    let node1 = start_node_on(&listen(25084), &redis.url());
    let node2 = start_node_on(&listen(25085), &redis.url());
    // carol: one phone over TCP on node 1, one over UDP on node 2; dave: only over TCP on 1.
    let mut carol_tcp = TestUa::tcp("carol", node1.udp).await;
    carol_tcp.from_domain = Some(DOMAIN.to_owned());
    let mut dave_tcp = TestUa::tcp("dave", node1.udp).await;
    dave_tcp.from_domain = Some(DOMAIN.to_owned());
    let mut carol_udp = phone("carol", node2.udp).await;
    for ua in [&mut carol_tcp, &mut dave_tcp, &mut carol_udp] {
        let ok = register(ua).await;
        assert_eq!(ok.status(), Some(200), "{}", show(&ok));
    }
    let alive = |node: &Node| node.host.services().cluster.as_ref().unwrap().alive().len();
    // Both heartbeats seen, then node 1 stops (its loops, its heartbeat).
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(&node2) < 2 {
        assert!(Instant::now() < deadline, "node 2 never saw node 1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(node1);
    while alive(&node2) > 1 {
        assert!(Instant::now() < deadline, "node 2 never saw node 1 go");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut caller = phone("bob", node2.udp).await;
    caller.invite(&format!("sip:dave@{DOMAIN}")).await;
    let answer = caller.expect_final(480).await;
    assert_eq!(answer.status(), Some(480), "{}", show(&answer));

    // carol's UDP phone rings and answers (a 200 beats the 480 of the dead node's branch).
    caller.invite(&format!("sip:carol@{DOMAIN}")).await;
    let invite = carol_udp.expect_request("INVITE").await;
    assert_eq!(via_sent_bys(&invite)[0], node2.udp.to_string());
    carol_udp.respond(&invite, 200, "OK").await;
    let answer = caller.expect_final(200).await;
    caller.ack_2xx(&answer).await;
    carol_udp.expect_request("ACK").await;
    let metrics = node2.host.services().metrics.render();
    assert!(
        metrics.contains("\nmoonroute_cluster_owner_down_total 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nmoonroute_cluster_nodes_alive 1\n"),
        "{metrics}"
    );
}

fn binding(aor: &str, contact: &str, cseq: u32) -> Binding {
    Binding::new(
        aor,
        contact,
        SystemTime::now() + Duration::from_secs(600),
        1000,
        format!("call-{contact}"),
        cseq,
    )
}

#[test]
fn two_nodes_updating_one_aor_at_once_lose_no_binding() {
    let Some(redis) = RedisServer::start(25381) else {
        return;
    };
    const PER_THREAD: usize = 20;
    let aor = "sip:carol@moonroute.test";
    let stores: Vec<Arc<RedisLocation>> = (0..2)
        .map(|_| {
            Arc::new(RedisLocation::new(
                RedisLink::open(&redis.url()).unwrap(),
                1000,
            ))
        })
        .collect();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = Arc::clone(&stores[t % 2]);
            std::thread::spawn(move || {
                for i in 0..PER_THREAD {
                    let contact = format!("sip:carol@192.0.2.{t}:{}", 5000 + i);
                    store
                        .update(aor, SystemTime::now(), &mut |mut live| {
                            live.push(binding(aor, &contact, 1));
                            Some(live)
                        })
                        .expect("the update is stored");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let bindings = stores[1].lookup(aor, SystemTime::now());
    assert_eq!(bindings.len(), 4 * PER_THREAD);
    assert_eq!(stores[0].count(), 4 * PER_THREAD);
    assert_eq!(stores[0].aors(), [aor]);
    // Expiry per binding: one expired binding is swept, the others stay.
    stores[0]
        .update(aor, SystemTime::now(), &mut |mut live| {
            live[0].expires_at = SystemTime::now() + Duration::from_secs(1);
            Some(live)
        })
        .unwrap();
    let later = SystemTime::now() + Duration::from_secs(2);
    assert_eq!(stores[1].lookup(aor, later).len(), 4 * PER_THREAD - 1);
    assert_eq!(stores[1].sweep(later), 1);
    assert_eq!(stores[0].count(), 4 * PER_THREAD - 1);
    stores[0].replace(aor, Vec::new()).unwrap();
    assert_eq!(stores[1].count(), 0);
    assert!(stores[1].aors().is_empty());
}

#[test]
fn kv_incr_from_two_nodes_at_once_counts_exactly() {
    let Some(redis) = RedisServer::start(25382) else {
        return;
    };
    const PER_THREAD: i64 = 250;
    let nodes: Vec<Arc<KvStore>> = (0..2)
        .map(|_| Arc::new(KvStore::on_redis(RedisLink::open(&redis.url()).unwrap())))
        .collect();
    let now = Instant::now;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let kv = Arc::clone(&nodes[t % 2]);
            std::thread::spawn(move || {
                for _ in 0..PER_THREAD {
                    kv.incr("calls", 1, Some(Duration::from_secs(60)), now())
                        .unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    use moonroute::script::kv::KvValue;
    assert_eq!(
        nodes[1].try_get("calls", now()).unwrap(),
        Some(KvValue::Int(4 * PER_THREAD))
    );
    // The TTL was set by the first incr and kept by the others.
    let ttl = nodes[0].try_ttl("calls", now()).unwrap().unwrap();
    assert!(ttl > Duration::from_secs(50) && ttl <= Duration::from_secs(60));
    // Strings stay strings, integers integers, and incr refuses a string.
    nodes[0]
        .set("greeting", KvValue::Str("42".to_owned()), None, now())
        .unwrap();
    assert_eq!(
        nodes[1].try_get("greeting", now()).unwrap(),
        Some(KvValue::Str("42".to_owned()))
    );
    assert!(nodes[1].incr("greeting", 1, None, now()).is_err());
    // `ctl kv list` on any node lists the shared entries (SCAN), a glob character literally.
    nodes[0].set("ban:*", KvValue::Int(1), None, now()).unwrap();
    let (listed, more) = nodes[1].list("", 10, now()).unwrap();
    let keys: Vec<&str> = listed.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!((keys, more), (vec!["ban:*", "calls", "greeting"], false));
    assert_eq!(nodes[1].list("ban:*", 10, now()).unwrap().0.len(), 1);
    assert_eq!(nodes[1].list("ban:x", 10, now()).unwrap().0.len(), 0);
    assert!(nodes[1].try_delete("greeting").unwrap());
    assert_eq!(nodes[0].try_get("greeting", now()).unwrap(), None);
}

// ----- docs/several-servers.md, run as written -------------------------------------------------

/// The doc's ports and what this test uses instead (in the range of this suite).
const DOC_PORTS: [(&str, &str); 3] = [("6379", "25383"), ("5061", "25071"), ("5062", "25072")];

/// The command lines of the fenced block after `<!-- several-servers: NAME -->` in
/// docs/several-servers.md, with the test's ports.
fn doc_commands(name: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/several-servers.md"),
    )
    .unwrap();
    let marker = format!("<!-- several-servers: {name} -->");
    let after = &doc[doc.find(&marker).expect("the doc has the marker") + marker.len()..];
    let block = after
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("a sh block after the marker");
    block
        .lines()
        .map(|line| {
            DOC_PORTS
                .iter()
                .fold(line.to_owned(), |line, (from, to)| line.replace(from, to))
        })
        .collect()
}

/// `line` as a process in `dir`: `cargo run --release --` is the moonroute binary cargo built
/// for the tests (the same program with the same arguments); other lines run as they are.
fn doc_command(line: &str, dir: &std::path::Path) -> std::process::Command {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (program, args) = match words.as_slice() {
        ["cargo", "run", "--release", "--", args @ ..] => (env!("CARGO_BIN_EXE_moonroute"), args),
        [program, args @ ..] => (*program, args),
        [] => panic!("an empty command line"),
    };
    let mut command = std::process::Command::new(program);
    command.args(args).current_dir(dir);
    command
}

/// A background process of the doc; dropped, it is killed.
struct Background(std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `line` in the background and waits (at most 20 s) for a line of its output holding
/// `ready`.
fn start_and_wait(line: &str, dir: &std::path::Path, ready: &str) -> Background {
    use std::io::BufRead;
    use std::process::Stdio;
    let mut child = doc_command(line, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{line}: {e}"));
    let (tx, rx) = std::sync::mpsc::channel();
    for output in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let (tx, ready) = (tx.clone(), ready.to_owned());
        std::thread::spawn(move || {
            for text in std::io::BufReader::new(output)
                .lines()
                .map_while(Result::ok)
            {
                if text.contains(&ready) {
                    let _ = tx.send(());
                }
            }
        });
    }
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("`{line}` did not print {ready:?}"));
    Background(child)
}

fn run_to_end(line: &str, dir: &std::path::Path) -> String {
    let output = doc_command(line, dir).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "`{line}` failed: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_several_servers_walkthrough_works_as_written() {
    if common::redis_server::binary().is_none() {
        return;
    }
    // The commands run in the repository (`scripts/default.lua`, `./var`): here a copy.
    let dir = TempDir::new().unwrap();
    std::fs::create_dir(dir.path().join("scripts")).unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/default.lua"),
        dir.path().join("scripts/default.lua"),
    )
    .unwrap();
    let start = doc_commands("start");
    assert_eq!(start.len(), 5, "{start:?}");
    let _redis = start_and_wait(&start[0], dir.path(), "Ready to accept connections");
    let _node1 = start_and_wait(&start[1], dir.path(), "moonroute running");
    let _node2 = start_and_wait(&start[2], dir.path(), "moonroute running");
    run_to_end(&start[3], dir.path());
    run_to_end(&start[4], dir.path());

    // alice's phone registers on node 1, with her password.
    let node1: SocketAddr = "127.0.0.1:25071".parse().unwrap();
    let node2: SocketAddr = "127.0.0.1:25072".parse().unwrap();
    let mut alice = TestUa::udp("alice").await;
    alice.from_domain = Some("example.com".to_owned());
    alice.outbound = Some(node1);
    let first = alice
        .request("REGISTER", "sip:alice@example.com")
        .header("Expires", "600")
        .await;
    let challenge = alice.expect_final(401).await;
    let challenge = common::auth::Challenge::parse(
        &header_text(&challenge, "WWW-Authenticate").expect("a challenge"),
    );
    let credentials = common::auth::answer_challenge(
        &challenge,
        &common::auth::Answer {
            user: "alice",
            password: "alice-pw",
            method: "REGISTER",
            uri: "sip:alice@example.com",
            nc: 1,
        },
    );
    alice
        .request("REGISTER", "sip:alice@example.com")
        .retry_of(&first)
        .header("Expires", "600")
        .header("Authorization", &credentials)
        .await;
    alice.expect_final(200).await;

    // A caller on node 2 reaches her.
    let mut bob = TestUa::udp("bob").await.via_proxy(node2);
    bob.invite("sip:alice@example.com").await;
    let invite = alice.expect_request("INVITE").await;
    alice.respond(&invite, 486, "Busy Here").await;
    bob.expect_final(486).await;

    // Node 2 lists her binding.
    let show = doc_commands("show");
    let listing = run_to_end(&show[0], dir.path());
    assert!(listing.contains("AOR: sip:alice@example.com"), "{listing}");
    assert!(listing.contains(&alice.local.to_string()), "{listing}");
    assert!(
        listing.contains("    Node: sip:127.0.0.1:25071;transport=udp\n"),
        "{listing}"
    );

    // `ctl status` names the backends, their health, and the nodes alive.
    let status_line = show[0].replace("ul show sip:alice@example.com", "status");
    let status = run_to_end(&status_line, dir.path());
    assert!(
        status.contains("bindings, redis redis://127.0.0.1:25383/0 connected, "),
        "{status}"
    );
    assert!(
        status.contains("\nkv: redis redis://127.0.0.1:25383/0 connected, "),
        "{status}"
    );
    assert!(
        status.contains("\ncluster: this node sip:127.0.0.1:25072;transport=udp, "),
        "{status}"
    );
}

// ----- SIGKILL of a node under registration load ----------------------------------------------

/// REGISTERs in flight at most, and how many 200s node 1 sends before it is killed.
const KILL_WINDOW: usize = 100;
const KILL_AFTER: usize = 400;

/// A REGISTER of `sip:u<i>@moonroute.test` from `local`.
fn numbered_register(i: usize, local: SocketAddr) -> String {
    format!(
        "REGISTER sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-kill-{i};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:u{i}@{DOMAIN}>;tag=k{i}\r\nTo: <sip:u{i}@{DOMAIN}>\r\n\
         Call-ID: kill-{i}\r\nCSeq: 1 REGISTER\r\nContact: <sip:u{i}@{local}>\r\n\
         Expires: 3600\r\nContent-Length: 0\r\n\r\n"
    )
}

/// The AOR number of a 200 to a [`numbered_register`].
fn acknowledged(datagram: &[u8]) -> Option<usize> {
    let message = Message::parse(bytes::Bytes::copy_from_slice(datagram)).ok()?;
    if message.status() != Some(200) {
        return None;
    }
    let call_id = String::from_utf8_lossy(message.call_id().ok()?).into_owned();
    call_id.strip_prefix("kill-")?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_registration_load_loses_no_acknowledged_binding() {
    use std::collections::HashSet;
    let Some(redis) = RedisServer::start(25384) else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("node1.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"udp:127.0.0.1:25073\"]\nworkers = 2\ndomains = [\"{DOMAIN}\"]\n\
             script = {script:?}\ndata_dir = {data:?}\nlog_level = \"info\"\n\
             [control]\nsocket = \"\"\n[lua]\nwatch = false\n\
             [location]\nstore = \"redis\"\nredis_url = \"{url}\"\n\
             [limits]\noverload_after_ms = 0\n[pike]\nmax_requests = 1000000\n",
            script = common::default_script_without_auth(),
            data = dir.path().join("data"),
            url = redis.url(),
        ),
    )
    .unwrap();
    let node1 = start_and_wait(
        &format!(
            "{} run --config {}",
            env!("CARGO_BIN_EXE_moonroute"),
            config.display()
        ),
        dir.path(),
        "moonroute running",
    );
    let node1_addr: SocketAddr = "127.0.0.1:25073".parse().unwrap();
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = client.local_addr().unwrap();
    let mut acked = HashSet::new();
    let mut sent = 0;
    let mut buf = vec![0u8; 65535];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut node1 = Some(node1);
    while node1.is_some() {
        assert!(
            Instant::now() < deadline,
            "{} of {KILL_AFTER} 200s",
            acked.len()
        );
        while sent < acked.len() + KILL_WINDOW {
            client
                .send_to(numbered_register(sent, local).as_bytes(), node1_addr)
                .await
                .unwrap();
            sent += 1;
        }
        let (n, _) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
            .await
            .expect("node 1 answers")
            .unwrap();
        acked.extend(acknowledged(&buf[..n]));
        if acked.len() >= KILL_AFTER {
            // SIGKILL, REGISTERs still in flight.
            drop(node1.take());
        }
    }
    // The 200s already delivered count too.
    while let Ok((n, _)) = client.try_recv_from(&mut buf) {
        acked.extend(acknowledged(&buf[..n]));
    }
    let node2 = start_node(0, &redis.url());
    let registrar = node2.host.services().registrar.clone().unwrap();
    let now = SystemTime::now();
    let lost: Vec<usize> = acked
        .iter()
        .copied()
        .filter(|i| {
            registrar
                .lookup(&format!("sip:u{i}@{DOMAIN}"), now)
                .is_empty()
        })
        .collect();
    eprintln!(
        "sent {sent} REGISTERs, {} acknowledged before the SIGKILL, {} lost",
        acked.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
}
