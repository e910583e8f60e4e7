//! Crash safety of the durable location store, against the real `moonroute` binary: a
//! REGISTER's 200 (OK) is the registrar's promise that the binding is stored (RFC 3261 §10.3),
//! so every binding whose 200 reached the client must survive a `kill -9` of the server.
//!
//! Each round registers fresh AORs over UDP as fast as the server answers (up to `WINDOW`
//! REGISTERs in flight, spread over a few client sockets so both event loops work, nothing
//! retransmitted: a lost REGISTER simply never gets its 200), kills the server with SIGKILL
//! partway through while REGISTERs are still in flight, restarts it on the same data
//! directory and checks with queries (REGISTER without Contact) that every acknowledged
//! binding of this round and of the earlier ones is there. Run with `--nocapture` to see the
//! figures.
//!
//! Nothing sleeps: every wait is for a datagram, bounded by a timeout, and every loop is
//! bounded in iterations and time.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moonroute::sip::{Contact, Message};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Rounds of register, kill, restart, verify (same data directory throughout).
const ROUNDS: usize = 3;
/// AORs each round may register (it is killed well before it gets through them).
const AORS_PER_ROUND: usize = 2000;
/// The server is killed once this many 200s of the round have arrived.
const KILL_AFTER: [usize; ROUNDS] = [500, 750, 1000];
/// REGISTERs in flight at most. The server's UDP sockets keep the kernel's default receive
/// buffer (about 208 KiB, some 100 small datagrams on loopback), so with 200 in flight a few
/// REGISTERs may be dropped by the kernel: they count as lost (never acknowledged).
const WINDOW: usize = 200;
/// Queries in flight at most: few enough that the kernel drops none (a dropped one is sent
/// again, which only costs `QUERY_RETRY`).
const QUERY_WINDOW: usize = 50;
/// New requests sent at most between two reads, so the window fills in steps rather than
/// one burst.
const BURST: usize = 20;
/// Client sockets: the server's event loops share its port (SO_REUSEPORT), and the kernel
/// spreads datagrams over them by source address.
const CLIENT_SOCKETS: usize = 4;
/// A REGISTER without an answer after this is counted as lost (its slot in the window freed).
const LOST_AFTER: Duration = Duration::from_secs(3);
/// A query without an answer after this is sent again (queries change nothing).
const QUERY_RETRY: Duration = Duration::from_secs(1);
const QUERY_ATTEMPTS: u32 = 4;
/// Bound on each registration phase and each verification phase.
const PHASE_LIMIT: Duration = Duration::from_secs(20);
/// Bound on a server start (loading the database included).
const START_LIMIT: Duration = Duration::from_secs(15);
const EXPIRES: u32 = 3600;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A free UDP port on 127.0.0.1: bound, read, released.
fn free_udp_port() -> u16 {
    let socket = StdUdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    socket.local_addr().unwrap().port()
}

/// The configuration file of the server under test.
fn write_config(dir: &Path, port: u16, data_dir: &Path) -> PathBuf {
    // scripts/default.lua without authentication (the REGISTERs carry no credentials).
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/default.lua");
    let text = std::fs::read_to_string(shipped).expect("scripts/default.lua");
    assert!(text.contains("local AUTHENTICATE = true"));
    let script = dir.join("default-without-auth.lua");
    std::fs::write(
        &script,
        text.replacen("local AUTHENTICATE = true", "local AUTHENTICATE = false", 1),
    )
    .expect("write the script copy");
    let toml = format!(
        "listen = [\"udp:127.0.0.1:{port}\"]\n\
         workers = 2\n\
         script = {script:?}\n\
         data_dir = {data_dir:?}\n\
         log_level = \"warn\"\n\
         \n\
         [control]\n\
         socket = \"\"\n\
         \n\
         [lua]\n\
         watch = false\n\
         \n\
         [location]\n\
         store = \"sled\"\n\
         \n\
         # Bursts of 200 REGISTERs at a debug build on a busy machine can keep a loop\n\
         # behind its UDP queue for 500 ms; this test is about durability, not shedding.\n\
         [limits]\n\
         overload_after_ms = 0\n\
         \n\
         # The REGISTERs all come from 127.0.0.1, which default.lua does not exempt from\n\
         # flood protection: a round is thousands of them in seconds.\n\
         [pike]\n\
         max_requests = 1000000\n",
        script = script.display().to_string(),
        data_dir = data_dir.display().to_string(),
    );
    let path = dir.join("moonroute.toml");
    std::fs::write(&path, toml).expect("write the configuration");
    path
}

/// The server process. Dropping it kills it (so a failing test leaves nothing running).
struct ServerProcess {
    child: Child,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `moonroute run --config CONFIG`, its output in `log`.
    fn spawn(config: &Path, log: PathBuf) -> ServerProcess {
        let out = File::create(&log).expect("create the server log");
        let err = out.try_clone().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_moonroute"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start moonroute");
        ServerProcess { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics, with the server's output, if the process has exited.
    fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.child.try_wait().expect("query the server process") {
            panic!(
                "the server exited ({status}) {when}; its output:\n{}",
                self.log_text()
            );
        }
    }

    /// SIGKILL, and reap it. Asserts it was running until then (it died of the SIGKILL).
    fn kill(&mut self) {
        self.child.kill().expect("kill -9 the server");
        let status = self.child.wait().expect("reap the server");
        assert_eq!(
            status.signal(),
            Some(9),
            "the server should have been running until the kill, it ended with {status}; \
             its output:\n{}",
            self.log_text()
        );
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one client socket heard: a response's Call-ID, status and listed contact URIs.
struct Reply {
    call_id: String,
    status: u16,
    contacts: Vec<String>,
}

/// The client: a few UDP sockets towards the server, their responses merged into one channel.
struct Client {
    sockets: Vec<Arc<UdpSocket>>,
    replies: mpsc::UnboundedReceiver<Reply>,
    server: SocketAddr,
}

impl Client {
    async fn new(server: SocketAddr) -> Client {
        let (tx, replies) = mpsc::unbounded_channel();
        let mut sockets = Vec::new();
        for _ in 0..CLIENT_SOCKETS {
            let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP"));
            let (reader, tx) = (Arc::clone(&socket), tx.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65535];
                while let Ok((n, _)) = reader.recv_from(&mut buf).await {
                    let Ok(m) = Message::parse(Bytes::copy_from_slice(&buf[..n])) else {
                        continue;
                    };
                    let (Some(status), Ok(call_id)) = (m.status(), m.call_id()) else {
                        continue;
                    };
                    let contacts = m
                        .contacts()
                        .filter_map(|c| match c {
                            Ok(Contact::Addr(a)) => Some(text(a.uri.raw())),
                            _ => None,
                        })
                        .collect();
                    let reply = Reply {
                        call_id: text(call_id),
                        status,
                        contacts,
                    };
                    if tx.send(reply).is_err() {
                        return;
                    }
                }
            });
            sockets.push(socket);
        }
        Client {
            sockets,
            replies,
            server,
        }
    }

    fn socket_for(&self, n: usize) -> &Arc<UdpSocket> {
        &self.sockets[n % self.sockets.len()]
    }

    /// A REGISTER (with `contact`) or a query (without) for `aor`, from socket `n % sockets`.
    async fn send_register(&self, n: usize, call_id: &str, aor: &str, contact: Option<&str>) {
        let socket = self.socket_for(n);
        let local = socket.local_addr().unwrap();
        let server = self.server;
        let contact = contact.map_or_else(String::new, |c| {
            format!("Contact: <{c}>\r\nExpires: {EXPIRES}\r\n")
        });
        // The branch is a token: the Call-ID without its `@host`.
        let branch = call_id.split('@').next().unwrap_or(call_id);
        let request = format!(
            "REGISTER sip:{server} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK-{branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <{aor}>;tag=t-{n}\r\n\
             To: <{aor}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 1 REGISTER\r\n\
             {contact}\
             Content-Length: 0\r\n\r\n"
        );
        socket
            .send_to(request.as_bytes(), server)
            .await
            .expect("UDP send to the server");
    }

    /// Sends OPTIONS every 100 ms until one is answered (at most `START_LIMIT`).
    async fn wait_until_answering(&mut self, server: &mut ServerProcess) {
        let deadline = Instant::now() + START_LIMIT;
        // One attempt per 100 ms at most: START_LIMIT / 100 ms attempts.
        let attempts = START_LIMIT.as_millis() / 100;
        for attempt in 0..=attempts {
            server.assert_running("while starting");
            assert!(
                Instant::now() < deadline,
                "the server did not answer OPTIONS within {START_LIMIT:?}; its output:\n{}",
                server.log_text()
            );
            let socket = self.socket_for(0);
            let local = socket.local_addr().unwrap();
            let target = self.server;
            let options = format!(
                "OPTIONS sip:{target} SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {local};branch=z9hG4bK-ready-{attempt};rport\r\n\
                 Max-Forwards: 70\r\n\
                 From: <sip:probe@{local}>;tag=ready\r\n\
                 To: <sip:{target}>\r\n\
                 Call-ID: ready-{attempt}@127.0.0.1\r\n\
                 CSeq: 1 OPTIONS\r\n\
                 Content-Length: 0\r\n\r\n"
            );
            socket
                .send_to(options.as_bytes(), target)
                .await
                .expect("UDP send");
            let answered = tokio::time::timeout(Duration::from_millis(100), async {
                while let Some(reply) = self.replies.recv().await {
                    if reply.call_id.starts_with("ready-") && reply.status == 200 {
                        return true;
                    }
                }
                false
            })
            .await;
            if answered == Ok(true) {
                return;
            }
        }
        panic!(
            "the server did not answer OPTIONS within {START_LIMIT:?}; its output:\n{}",
            server.log_text()
        );
    }
}

/// One registration: its AOR and the contact it binds.
#[derive(Clone)]
struct Registration {
    aor: String,
    contact: String,
}

/// What a registration phase did.
struct Registered {
    sent: Vec<Registration>,
    /// Indexes (into `sent`) whose 200 arrived, before or after the kill.
    acked: Vec<usize>,
    /// REGISTERs sent and not yet answered when the server was killed.
    in_flight_at_kill: usize,
    /// 200s that were read after the kill (sent by the server before it died).
    acked_after_kill: usize,
    elapsed: Duration,
}

/// Registers fresh AORs of round `round` until `kill_after` 200s arrived, then kills the
/// server; collects the 200s it had already sent.
async fn register_until_killed(
    client: &mut Client,
    server: &mut ServerProcess,
    round: usize,
    port: u16,
    kill_after: usize,
) -> Registered {
    let started = Instant::now();
    let deadline = started + PHASE_LIMIT;
    let mut sent: Vec<Registration> = Vec::new();
    let mut outstanding: HashMap<usize, Instant> = HashMap::new();
    let mut acked: Vec<usize> = Vec::new();
    let mut acked_set: HashSet<usize> = HashSet::new();
    let call_id = |i: usize| format!("crash-{round}-{i}@127.0.0.1");
    let index_of = |call_id: &str| -> Option<usize> {
        let rest = call_id.strip_prefix(&format!("crash-{round}-"))?;
        rest.strip_suffix("@127.0.0.1")?.parse().ok()
    };
    // Takes note of a response to one of this round's REGISTERs (others are ignored).
    let mut record = |reply: Reply,
                      sent: &[Registration],
                      outstanding: &mut HashMap<usize, Instant>,
                      acked: &mut Vec<usize>| {
        let Some(i) = index_of(&reply.call_id) else {
            return;
        };
        outstanding.remove(&i);
        assert_eq!(
            reply.status, 200,
            "REGISTER {i} of round {round} refused ({})",
            reply.status
        );
        assert!(
            reply.contacts.contains(&sent[i].contact),
            "the 200 of REGISTER {i} lists its contact {}: {:?}",
            sent[i].contact,
            reply.contacts
        );
        if acked_set.insert(i) {
            acked.push(i);
        }
    };

    // Send while there is room in the window, read what came back; kill once enough 200s
    // arrived. Bounded by the number of AORs and by PHASE_LIMIT.
    loop {
        assert!(
            Instant::now() < deadline,
            "round {round}: only {} of {kill_after} REGISTERs answered within {PHASE_LIMIT:?}",
            acked.len()
        );
        let burst_end = sent.len() + BURST;
        while outstanding.len() < WINDOW && sent.len() < AORS_PER_ROUND.min(burst_end) {
            let i = sent.len();
            let registration = Registration {
                aor: format!("sip:u{round}-{i:04}@127.0.0.1:{port}"),
                contact: format!("sip:u{round}-{i:04}@127.0.0.1:{}", 40000 + i),
            };
            client
                .send_register(
                    i,
                    &call_id(i),
                    &registration.aor,
                    Some(&registration.contact),
                )
                .await;
            sent.push(registration);
            outstanding.insert(i, Instant::now());
        }
        assert!(
            !outstanding.is_empty(),
            "round {round}: every AOR was registered before {kill_after} 200s arrived"
        );
        match tokio::time::timeout(Duration::from_millis(200), client.replies.recv()).await {
            Ok(Some(reply)) => record(reply, &sent, &mut outstanding, &mut acked),
            Ok(None) => panic!("the client's readers stopped"),
            Err(_) => server.assert_running("while registering"),
        }
        // Kill as soon as the count is reached: the later the kill, the more of the last
        // acknowledged writes a server that answered before flushing would have flushed.
        if acked.len() >= kill_after {
            break;
        }
        let now = Instant::now();
        outstanding.retain(|_, at| now.duration_since(*at) < LOST_AFTER);
    }
    let in_flight_at_kill = outstanding.len();
    server.kill();

    // The 200s the server sent before it died are in the client's sockets (or on their way
    // through the readers): read until nothing came for 300 ms (at most one per REGISTER
    // still outstanding, plus a few).
    let before = acked.len();
    for _ in 0..=in_flight_at_kill + WINDOW {
        match tokio::time::timeout(Duration::from_millis(300), client.replies.recv()).await {
            Ok(Some(reply)) => record(reply, &sent, &mut outstanding, &mut acked),
            _ => break,
        }
    }
    Registered {
        acked_after_kill: acked.len() - before,
        sent,
        acked,
        in_flight_at_kill,
        elapsed: started.elapsed(),
    }
}

/// What [`query_all`] found.
struct Queried {
    /// Per registration: whether the 200 to its query listed its contact.
    found: Vec<bool>,
    /// Queries sent again for want of an answer.
    resent: usize,
}

impl Queried {
    fn count(&self) -> usize {
        self.found.iter().filter(|&&f| f).count()
    }
}

/// Queries every registration in `expected` (REGISTER without Contact). A query without an
/// answer is sent again (up to `QUERY_ATTEMPTS` in all).
async fn query_all(client: &mut Client, tag: &str, expected: &[Registration]) -> Queried {
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut found: Vec<Option<bool>> = vec![None; expected.len()];
    let mut outstanding: HashMap<usize, (Instant, u32)> = HashMap::new();
    let mut next = 0;
    let mut answered = 0;
    let mut resent = 0;
    let call_id = |i: usize| format!("query-{tag}-{i}@127.0.0.1");
    let prefix = format!("query-{tag}-");
    while answered < expected.len() {
        assert!(
            Instant::now() < deadline,
            "{tag}: only {answered} of {} queries answered within {PHASE_LIMIT:?}",
            expected.len()
        );
        let burst_end = next + BURST;
        while outstanding.len() < QUERY_WINDOW && next < expected.len().min(burst_end) {
            let r = &expected[next];
            client
                .send_register(next, &call_id(next), &r.aor, None)
                .await;
            outstanding.insert(next, (Instant::now(), 1));
            next += 1;
        }
        if let Ok(reply) =
            tokio::time::timeout(Duration::from_millis(100), client.replies.recv()).await
        {
            let reply = reply.expect("the client's readers run");
            let index = reply
                .call_id
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix("@127.0.0.1"))
                .and_then(|i| i.parse::<usize>().ok());
            if let Some(i) = index {
                assert_eq!(reply.status, 200, "{tag}: query {i} refused");
                if outstanding.remove(&i).is_some() {
                    found[i] = Some(reply.contacts.contains(&expected[i].contact));
                    answered += 1;
                }
            }
        }
        // Unanswered queries go again (the same request: a retransmission).
        let now = Instant::now();
        let mut again = Vec::new();
        for (&i, (at, attempts)) in outstanding.iter_mut() {
            if now.duration_since(*at) >= QUERY_RETRY {
                assert!(
                    *attempts < QUERY_ATTEMPTS,
                    "{tag}: query {i} never answered"
                );
                *at = now;
                *attempts += 1;
                again.push(i);
            }
        }
        resent += again.len();
        for i in again {
            client
                .send_register(i, &call_id(i), &expected[i].aor, None)
                .await;
        }
    }
    Queried {
        found: found.into_iter().map(|f| f == Some(true)).collect(),
        resent,
    }
}

#[tokio::test]
async fn acknowledged_registrations_survive_kill_9() {
    let test_started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let port = free_udp_port();
    let config = write_config(dir.path(), port, &data_dir);
    let server_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut client = Client::new(server_addr).await;

    let mut server = ServerProcess::spawn(&config, dir.path().join("server-0.log"));
    client.wait_until_answering(&mut server).await;

    // Every acknowledged registration so far, all rounds.
    let mut acknowledged: Vec<Registration> = Vec::new();
    for (round, &kill_after) in KILL_AFTER.iter().enumerate() {
        let round = round + 1;
        let registered =
            register_until_killed(&mut client, &mut server, round, port, kill_after).await;
        assert!(
            registered.in_flight_at_kill > 0,
            "round {round}: the kill should catch REGISTERs in flight"
        );
        let this_round: Vec<Registration> = registered
            .acked
            .iter()
            .map(|&i| registered.sent[i].clone())
            .collect();
        acknowledged.extend(this_round.iter().cloned());

        // Restart on the same data directory (the same port: the AORs name it).
        let restart = Instant::now();
        server = ServerProcess::spawn(&config, dir.path().join(format!("server-{round}.log")));
        client.wait_until_answering(&mut server).await;
        let restart_elapsed = restart.elapsed();

        let verify = Instant::now();
        let queried = query_all(&mut client, &format!("r{round}"), &acknowledged).await;
        let verify_elapsed = verify.elapsed();
        let missing: Vec<&str> = acknowledged
            .iter()
            .zip(&queried.found)
            .filter(|(_, &f)| !f)
            .map(|(r, _)| r.aor.as_str())
            .collect();
        let verified = queried.count();

        // Sent but never acknowledged: either outcome is allowed; how many made it is
        // shown (those whose write was flushed before the kill, their 200 not yet sent).
        let acked: HashSet<usize> = registered.acked.iter().copied().collect();
        let unacked: Vec<Registration> = (0..registered.sent.len())
            .filter(|i| !acked.contains(i))
            .map(|i| registered.sent[i].clone())
            .collect();
        let unacked_stored = query_all(&mut client, &format!("u{round}"), &unacked)
            .await
            .count();

        println!(
            "round {round}: sent {sent}, acknowledged {acked} ({after} read after the kill), \
             in flight at kill {in_flight}, registering took {reg:?}; restart {restart:?}; \
             verified {verified}/{total} acknowledged bindings (all rounds) in {verify:?} \
             ({resent} queries sent again); unacknowledged but stored {unacked_stored}/{unacked}",
            sent = registered.sent.len(),
            acked = registered.acked.len(),
            after = registered.acked_after_kill,
            in_flight = registered.in_flight_at_kill,
            reg = registered.elapsed,
            restart = restart_elapsed,
            verify = verify_elapsed,
            total = acknowledged.len(),
            unacked = unacked.len(),
            resent = queried.resent,
        );
        assert!(
            missing.is_empty(),
            "round {round}: {} acknowledged bindings lost after kill -9, e.g. {:?}; server output:\n{}",
            missing.len(),
            &missing[..missing.len().min(10)],
            server.log_text()
        );
    }
    server.assert_running("at the end");
    drop(server);
    println!(
        "crash test: {ROUNDS} rounds, {} acknowledged bindings verified, total {:?}",
        acknowledged.len(),
        test_started.elapsed()
    );
}
