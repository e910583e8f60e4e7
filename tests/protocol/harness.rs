//! An in-process harness for the sans-IO core: one moonroute server's event loops (each a
//! [`Worker`] made by the public [`CoreFactory`], routed by a Lua script, a test [`Router`] or
//! the built-in router), simulated user agents ([`Ua`]) at addresses such as 127.0.0.1:5070 or
//! 127.0.0.9:5060, an in-memory network between them, DNS answered from a table, and a
//! simulated clock. Nothing is bound, nothing sleeps, no tokio runtime runs: the harness is
//! the event loop, and a test decides when time passes.
//!
//! The driving contract is the one the tokio shell (`transport::dispatch`) follows:
//! - every [`Output::Send`] is carried to whoever owns the destination address: a listener of
//!   the server (the datagram is given to one of its loops as an [`Input::Message`]) or a user
//!   agent. A stream send to an address nobody owns is refused like a TCP connect, answered
//!   with [`Input::Unreachable`] to the loop that sent (RFC 3261 §8.1.3.1, §17.1.4); a
//!   datagram to nobody is lost, and kept in [`Harness::lost`] for the test to look at.
//! - [`Output::HandOver`] gives the input to the named loop; [`Output::Resolve`] is answered
//!   with [`Input::Resolved`] from [`Harness::dns`] (RFC 3263 §4: a name absent from the
//!   table does not exist); [`Output::Close`] closes a stream connection.
//! - stream (TCP) agents ([`Harness::add_tcp_ua`]) talk to the server over connections: an
//!   agent's first message to the TCP listener opens one (owned by the loop a hash of its
//!   address picks, as the accepting loop), the server's send to a stream agent goes on the
//!   connection it names, else an open one to that address, else a new one from an
//!   ephemeral port (unless `reuse_only`), and a message on a connection arrives with its
//!   [`ConnectionId`], so responses go back on the request's connection (§18.2.2).
//! - [`Worker::next_deadline`] / [`Worker::on_timer`] are run when the simulated clock reaches
//!   them, and [`Worker::wake_signal`] is polled whenever nothing else moves. A durable write
//!   is flushed by the store's own thread, the one thing not simulated: when a test expects a
//!   message that has not come, the harness blocks on the wake signals (bounded by [`WAIT`],
//!   an event, not a sleep) and gives the woken loop [`Input::Wake`].
//!
//! [`Harness::run`] delivers until nothing moves without time passing; [`Harness::advance`]
//! moves the clock, stopping at each deadline on the way (Timer A's doubling, Timer C at
//! exactly 181 s). The network can drop, duplicate or delay what is sent to an address
//! ([`Fault`]). A datagram reaches the loop that a hash of its source picks, as
//! `SO_REUSEPORT` spreads flows, so two loops exercise the hand-over between loops.
//!
//! Every path into moonroute's internals used by the protocol tests is named in this file
//! (the `use moonroute::...` lines below), so a move of a type is fixed here.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use moonroute::config::{Config, LocationBackend};
pub use moonroute::dialog::Directory;
pub use moonroute::dns::{Candidate, Query, ResolveError};
pub use moonroute::proxy::response_context::{BranchOutcome, Target};
pub use moonroute::proxy::router::{
    Decision, FailureDecision, RouteHandle, RouteInfo, Routed, Router,
};
pub use moonroute::script::kv::KvValue;
pub use moonroute::script::ScriptHost;
pub use moonroute::server::core::CoreFactory;
pub use moonroute::sip::{HeaderName, Message};
use moonroute::transport::{ConnectionId, Destination, Worker, WorkerFactory};
pub use moonroute::transport::{Input, ListenAddr, Meta, Output, TransportKind};
use moonroute::wake::WakeSignal;

pub use super::common_ua::{expect_status, show};
use super::ua::Ua;

/// The server's UDP and TCP address in every harness test.
pub const PROXY: &str = "127.0.0.1:5060";

/// The longest a test may run the network without the clock moving: a loop between the
/// server and an agent shows up as a panic, not a hang.
const MAX_STEPS: usize = 100_000;

/// The longest a test waits, in real time, for another thread (a durable write) to finish.
const WAIT: Duration = Duration::from_secs(5);

/// A configuration for the harness: a UDP and a TCP listener on 127.0.0.1:5060, two event
/// loops, memory location store, no control socket, no CDR, no dispatcher probes.
pub fn config() -> Config {
    let mut config = Config {
        listen: vec![
            format!("udp:{PROXY}").parse::<ListenAddr>().unwrap(),
            format!("tcp:{PROXY}").parse::<ListenAddr>().unwrap(),
        ],
        workers: 2,
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Memory;
    config.dialog.cdr = false;
    config.dispatcher.probe_interval_secs = 0;
    config
}

/// Where the simulated clock starts: an hour behind the real one. The dialog table stamps an
/// event with the wall-clock time of the loop's `now` (`dialog::Stamp::at`: the real wall
/// clock less how long ago `now` was), so while the simulated clock stays behind the real one
/// a CDR's answer and end follow the simulated clock exactly: a call cut after 1 simulated
/// second lasts 1.000 s in its CDR. A call's start is not simulated: the script's
/// `dlg_manage` has no `now` and stamps it with the real clocks (`dialog::Stamp::now`), so it
/// is an hour after the answer here, and the tests comparing them stay on sockets
/// (`tests/dialog.rs`).
const CLOCK_BEHIND_REAL: Duration = Duration::from_secs(3600);

fn simulated_start() -> Instant {
    let real = Instant::now();
    real.checked_sub(CLOCK_BEHIND_REAL).unwrap_or(real)
}

/// The shipped `scripts/default.lua` with `AUTHENTICATE` off: "our users" are a From in our
/// domain, without digest authentication.
pub fn default_script_without_auth() -> String {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/default.lua");
    let text = std::fs::read_to_string(shipped).expect("scripts/default.lua");
    const FLAG: &str = "local AUTHENTICATE = true";
    assert_eq!(
        text.matches(FLAG).count(),
        1,
        "the script has `{FLAG}` once"
    );
    text.replacen(FLAG, "local AUTHENTICATE = false", 1)
}

/// Which user agent: an index into the harness's agents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UaId(usize);

/// What the network does to the next messages sent to one address.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Lose them.
    Drop,
    /// Deliver each twice.
    Duplicate,
    /// Deliver each this much later.
    Delay(Duration),
}

/// One message on the simulated wire.
#[derive(Clone, Debug)]
struct Packet {
    kind: TransportKind,
    from: SocketAddr,
    to: SocketAddr,
    data: Bytes,
    /// The loop that sent it (`None`: a user agent), told when a stream send is refused.
    sender: Option<usize>,
    /// The stream connection it travels on (an index into the harness's connections).
    conn: Option<usize>,
}

/// A stream (TCP) connection between the server and a stream user agent.
#[derive(Debug)]
struct Connection {
    ua: usize,
    /// The server's end: its listener (the agent connected) or an address of its own (the
    /// server connected, from an ephemeral port).
    server_end: SocketAddr,
    /// The loop that owns it: the one that accepted it, or the one that opened it.
    worker: usize,
    open: bool,
}

struct FaultRule {
    to: SocketAddr,
    fault: Fault,
    remaining: usize,
}

pub struct Harness {
    now: Instant,
    loops: Vec<Box<dyn Worker>>,
    /// Each loop's wake signal (a durable write done), polled after every step.
    wakes: Vec<Option<Arc<WakeSignal>>>,
    listeners: Vec<ListenAddr>,
    uas: Vec<Ua>,
    /// Inputs for a loop that do not come off the wire: hand-overs, DNS answers, refusals.
    inputs: VecDeque<(usize, Input)>,
    /// Messages on the wire, deliverable now.
    wire: VecDeque<Packet>,
    /// Messages a [`Fault::Delay`] holds until their instant.
    delayed: Vec<(Instant, Packet)>,
    faults: Vec<FaultRule>,
    /// Stream connections, by [`ConnectionId`] (its index), open or closed.
    connections: Vec<Connection>,
    /// DNS answers by host name; a name absent here does not exist.
    pub dns: HashMap<String, Vec<Candidate>>,
    /// Address records by host name: a name here is a host at that address, reached at the
    /// URI's port and transport (RFC 3263 §4.2, no NAPTR or SRV records).
    pub dns_a: HashMap<String, std::net::IpAddr>,
    /// Every host name the server asked the DNS for, in order (IP literals are not asked).
    pub dns_queries: Vec<String>,
    /// Datagrams sent to an address nobody owns (a foreign host), in order.
    pub lost: Vec<(SocketAddr, Bytes)>,
    /// Every message a loop sent, when and where, in order (a packet capture at the server).
    pub sent_by_server: Vec<(Instant, SocketAddr, Bytes)>,
    /// The script host when the server is routed by Lua.
    script: Option<Arc<ScriptHost>>,
    /// The calls every loop tracks, as `moonroute ctl dlg` reads them.
    dialogs: Arc<Directory>,
    /// The script's directory (its data directory is `data` in it), kept while the harness
    /// lives.
    dir: Option<tempfile::TempDir>,
    out: Vec<Output>,
}

impl Harness {
    /// A server routed by the built-in router (`[proxy]` of `config`).
    pub fn new(config: &Config) -> Harness {
        Harness::start(config, CoreFactory::new(config), None, None)
    }

    /// A server whose every loop routes with a clone of `router`.
    pub fn with_router<R: Router + Clone + Send + Sync + 'static>(
        config: &Config,
        router: R,
    ) -> Harness {
        let factory = CoreFactory::with_router(
            config,
            Arc::new(move |_loop_index, _: &_| Box::new(router.clone()) as Box<dyn Router>),
        );
        Harness::start(config, factory, None, None)
    }

    /// A server routed by the Lua script `text` (written to a temporary directory).
    pub fn with_script(config: &Config, text: &str) -> Harness {
        Harness::with_script_using(config, text, |factory, _| factory)
    }

    /// [`Harness::with_script`], the cores' factory finished by `finish` (given the
    /// configuration the server runs with: its data directory is the harness's), as
    /// `moonroute run` finishes it (a route signer from the server key, ...).
    pub fn with_script_using(
        config: &Config,
        text: &str,
        finish: impl FnOnce(CoreFactory, &Config) -> CoreFactory,
    ) -> Harness {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("route.lua");
        std::fs::write(&path, text).expect("write the script");
        let mut config = config.clone();
        config.script = path;
        config.data_dir = dir.path().join("data");
        let host = ScriptHost::from_config(&config).expect("the script loads");
        let factory = finish(
            CoreFactory::with_router(&config, host.router_factory()),
            &config,
        );
        Harness::start(&config, factory, Some(host), Some(dir))
    }

    fn start(
        config: &Config,
        factory: CoreFactory,
        script: Option<Arc<ScriptHost>>,
        dir: Option<tempfile::TempDir>,
    ) -> Harness {
        let listeners = config.listen.clone();
        let dialogs = factory.dialog_directory();
        let count = config.workers.max(1);
        let loops: Vec<Box<dyn Worker>> = (0..count)
            .map(|index| factory.make_bound_worker(index, count, &listeners))
            .collect();
        let wakes = loops.iter().map(|w| w.wake_signal()).collect();
        Harness {
            now: simulated_start(),
            loops,
            wakes,
            listeners,
            uas: Vec::new(),
            inputs: VecDeque::new(),
            wire: VecDeque::new(),
            delayed: Vec::new(),
            faults: Vec::new(),
            connections: Vec::new(),
            dns: HashMap::new(),
            dns_a: HashMap::new(),
            dns_queries: Vec::new(),
            lost: Vec::new(),
            sent_by_server: Vec::new(),
            script,
            dialogs,
            dir,
            out: Vec::new(),
        }
    }

    /// The simulated clock.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The server's UDP address.
    pub fn proxy(&self) -> SocketAddr {
        PROXY.parse().unwrap()
    }

    /// A user agent named `name` on UDP at `addr` (nothing is bound).
    pub fn add_ua(&mut self, name: &str, addr: &str) -> UaId {
        let addr: SocketAddr = addr.parse().expect("an IP address and port");
        assert!(
            self.owner(TransportKind::Udp, addr).is_none(),
            "{addr} is taken"
        );
        self.uas.push(Ua::new(name, addr, self.uas.len()));
        UaId(self.uas.len() - 1)
    }

    /// A user agent on TCP at `addr`: it accepts connections there, and opens one to where
    /// it sends when it has none (its port is the connection's, as a phone bound to its port
    /// would); its out-of-dialog requests go to the server's TCP listener.
    pub fn add_tcp_ua(&mut self, name: &str, addr: &str) -> UaId {
        let addr: SocketAddr = addr.parse().expect("an IP address and port");
        assert!(
            self.owner(TransportKind::Tcp, addr).is_none(),
            "{addr} is taken"
        );
        let mut ua = Ua::new(name, addr, self.uas.len());
        ua.stream = true;
        ua.outbound = Some(self.proxy());
        self.uas.push(ua);
        UaId(self.uas.len() - 1)
    }

    /// A user agent whose out-of-dialog requests go to the server.
    pub fn add_ua_via_proxy(&mut self, name: &str, addr: &str) -> UaId {
        let id = self.add_ua(name, addr);
        let proxy = self.proxy();
        self.ua(id).outbound = Some(proxy);
        id
    }

    pub fn ua(&mut self, id: UaId) -> &mut Ua {
        &mut self.uas[id.0]
    }

    /// The next `count` messages sent to `to` (by anyone) suffer `fault`.
    pub fn fault(&mut self, to: SocketAddr, fault: Fault, count: usize) {
        self.faults.push(FaultRule {
            to,
            fault,
            remaining: count,
        });
    }

    /// The script host of a server routed by Lua.
    pub fn script(&self) -> &ScriptHost {
        self.script.as_ref().expect("a server routed by a script")
    }

    /// The calls every loop tracks (what `moonroute ctl dlg` reads and ends calls through).
    pub fn dialogs(&self) -> Arc<Directory> {
        Arc::clone(&self.dialogs)
    }

    /// The data directory of a server routed by Lua (registrations, `cdr.jsonl`).
    pub fn data_dir(&self) -> PathBuf {
        let dir = self.dir.as_ref().expect("a server routed by a script");
        dir.path().join("data")
    }

    /// What the Lua script stored under `key` in `sip.kv`.
    pub fn kv(&self, key: &str) -> String {
        match self
            .script()
            .services()
            .kv
            .get(key, std::time::Instant::now())
        {
            Some(KvValue::Str(s)) => s,
            other => panic!("{key}: {other:?}"),
        }
    }

    // ----- driving --------------------------------------------------------------------------

    /// Delivers everything deliverable and runs every timer due, until nothing moves without
    /// the clock moving.
    pub fn run(&mut self) {
        for _ in 0..MAX_STEPS {
            if !self.step() {
                return;
            }
        }
        panic!("the network did not settle in {MAX_STEPS} steps: a message loop?");
    }

    /// Moves the clock by `by`, stopping at every deadline and delayed message on the way.
    pub fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        self.run();
        while let Some(next) = self.next_event().filter(|&at| at <= until) {
            self.now = self.now.max(next);
            self.run();
        }
        self.now = until;
        self.run();
    }

    /// The earliest instant at which something happens by itself.
    fn next_event(&self) -> Option<Instant> {
        let deadlines = self.loops.iter().filter_map(|w| w.next_deadline());
        let delayed = self.delayed.iter().map(|(at, _)| *at);
        deadlines.chain(delayed).min()
    }

    /// One round: agents' outboxes onto the wire, then one input to a loop or one delivery,
    /// else the due timers and wake signals. Whether anything happened.
    fn step(&mut self) -> bool {
        for i in 0..self.uas.len() {
            let from = self.uas[i].local;
            for (to, data) in self.uas[i].take_outbox() {
                let (kind, conn) = match self.uas[i].stream {
                    true => (TransportKind::Tcp, self.agent_connection(i, to)),
                    false => (TransportKind::Udp, None),
                };
                self.put_on_wire(Packet {
                    kind,
                    from,
                    to,
                    data,
                    sender: None,
                    conn,
                });
            }
        }
        let now = self.now;
        let due = self.delayed.iter().position(|(at, _)| *at <= now);
        if let Some(i) = due {
            let (_, packet) = self.delayed.remove(i);
            self.deliver(packet);
            return true;
        }
        if let Some((index, input)) = self.inputs.pop_front() {
            self.on_input(index, input);
            return true;
        }
        if let Some(packet) = self.wire.pop_front() {
            self.deliver(packet);
            return true;
        }
        let mut moved = false;
        for index in 0..self.loops.len() {
            if self.loops[index]
                .next_deadline()
                .is_some_and(|at| at <= now)
            {
                let mut out = std::mem::take(&mut self.out);
                self.loops[index].on_timer(now, &mut out);
                self.apply(index, &mut out);
                self.out = out;
                moved = true;
            }
            if self.woken(index) {
                self.on_input(index, Input::Wake);
                moved = true;
            }
        }
        moved
    }

    /// Whether loop `index`'s wake signal was notified since it was last looked at.
    fn woken(&self, index: usize) -> bool {
        self.wakes[index]
            .as_ref()
            .is_some_and(|signal| signal.take())
    }

    fn put_on_wire(&mut self, packet: Packet) {
        let rule = self
            .faults
            .iter_mut()
            .find(|r| r.to == packet.to && r.remaining > 0);
        let Some(rule) = rule else {
            self.wire.push_back(packet);
            return;
        };
        rule.remaining -= 1;
        match rule.fault {
            Fault::Drop => {}
            Fault::Duplicate => {
                self.wire.push_back(packet.clone());
                self.wire.push_back(packet);
            }
            Fault::Delay(by) => self.delayed.push((self.now + by, packet)),
        }
    }

    /// Who receives what is sent to `addr` over `kind`.
    fn owner(&self, kind: TransportKind, addr: SocketAddr) -> Option<Owner> {
        if self
            .listeners
            .iter()
            .any(|l| l.kind == kind && l.addr == addr)
        {
            return Some(Owner::Server);
        }
        self.uas
            .iter()
            .position(|ua| ua.local == addr && ua.stream == kind.is_stream())
            .map(Owner::Ua)
    }

    /// The open connection agent `ua` sends to `to` on: one it has with that end, else a new
    /// one to the server's TCP listener there (`None`: nobody listens, the send is lost).
    fn agent_connection(&mut self, ua: usize, to: SocketAddr) -> Option<usize> {
        let open =
            (self.connections.iter()).position(|c| c.open && c.ua == ua && c.server_end == to);
        if open.is_some() {
            return open;
        }
        let Some(Owner::Server) = self.owner(TransportKind::Tcp, to) else {
            return None;
        };
        let worker = self.loop_for(self.uas[ua].local);
        Some(self.connect(ua, to, worker))
    }

    fn connect(&mut self, ua: usize, server_end: SocketAddr, worker: usize) -> usize {
        self.connections.push(Connection {
            ua,
            server_end,
            worker,
            open: true,
        });
        self.connections.len() - 1
    }

    /// The connection a stream send of loop `index` to `dest` goes on: the one it names if
    /// still open, else an open one to that address, else (unless `reuse_only`) a new one
    /// to a stream agent listening there, from an ephemeral port of the server. `None`: the
    /// send is refused.
    fn server_connection(&mut self, index: usize, dest: &Destination) -> Option<usize> {
        let named = dest.conn.map(|ConnectionId(id)| id as usize);
        if let Some(id) = named.filter(|&id| self.connections.get(id).is_some_and(|c| c.open)) {
            return Some(id);
        }
        let to_addr = |c: &Connection| c.open && self.uas[c.ua].local == dest.addr;
        if let Some(id) = self.connections.iter().position(to_addr) {
            return Some(id);
        }
        if dest.reuse_only {
            return None;
        }
        let Some(Owner::Ua(ua)) = self.owner(dest.kind, dest.addr) else {
            return None;
        };
        let port = 40_000 + u16::try_from(self.connections.len()).expect("few connections");
        let ephemeral = SocketAddr::new(self.proxy().ip(), port);
        Some(self.connect(ua, ephemeral, index))
    }

    fn deliver(&mut self, packet: Packet) {
        if let Some(id) = packet.conn {
            return self.deliver_on(id, packet);
        }
        if packet.kind.is_stream() {
            return self.refuse(packet);
        }
        match self.owner(packet.kind, packet.to) {
            Some(Owner::Server) => {
                let index = self.loop_for(packet.from);
                let meta = Meta {
                    kind: packet.kind,
                    source: packet.from,
                    local: packet.to,
                    conn: None,
                    worker: index,
                };
                let input = Input::Message {
                    data: packet.data,
                    meta,
                };
                self.on_input(index, input);
            }
            Some(Owner::Ua(i)) => self.uas[i].receive(packet.data, packet.from),
            None => self.lost.push((packet.to, packet.data)),
        }
    }

    /// A stream message with no connection to travel on: a connection nobody accepts. The
    /// server's is refused, reported to the loop that sent it (§8.1.3.1); an agent's is lost.
    fn refuse(&mut self, packet: Packet) {
        match packet.sender {
            Some(index) => {
                let input = Input::Unreachable {
                    kind: packet.kind,
                    addr: packet.to,
                };
                self.inputs.push_back((index, input));
            }
            None => self.lost.push((packet.to, packet.data)),
        }
    }

    /// Delivers what travels on connection `id` to its other end (nothing once it closed).
    fn deliver_on(&mut self, id: usize, packet: Packet) {
        let connection = &self.connections[id];
        if !connection.open {
            return;
        }
        let (ua, server_end, worker) = (connection.ua, connection.server_end, connection.worker);
        if packet.sender.is_some() {
            return self.uas[ua].receive(packet.data, server_end);
        }
        let meta = Meta {
            kind: packet.kind,
            source: self.uas[ua].local,
            local: server_end,
            conn: Some(ConnectionId(id as u64)),
            worker,
        };
        let input = Input::Message {
            data: packet.data,
            meta,
        };
        self.on_input(worker, input);
    }

    /// The loop a datagram from `source` reaches: a hash of the flow, like SO_REUSEPORT.
    fn loop_for(&self, source: SocketAddr) -> usize {
        let ip: u32 = match source.ip() {
            std::net::IpAddr::V4(v4) => v4.into(),
            std::net::IpAddr::V6(v6) => v6.octets().iter().map(|&b| u32::from(b)).sum(),
        };
        (ip as usize + usize::from(source.port())) % self.loops.len()
    }

    fn on_input(&mut self, index: usize, input: Input) {
        let mut out = std::mem::take(&mut self.out);
        self.loops[index].on_input(input, self.now, &mut out);
        self.apply(index, &mut out);
        self.out = out;
    }

    /// Carries out what loop `index` asked for.
    fn apply(&mut self, index: usize, out: &mut Vec<Output>) {
        for output in out.drain(..) {
            match output {
                Output::Send { dest, data } => {
                    let from = self.listener_for(dest.kind, dest.local);
                    self.sent_by_server
                        .push((self.now, dest.addr, data.clone()));
                    let conn = match dest.kind.is_stream() {
                        true => self.server_connection(index, &dest),
                        false => None,
                    };
                    self.put_on_wire(Packet {
                        kind: dest.kind,
                        from,
                        to: dest.addr,
                        data,
                        sender: Some(index),
                        conn,
                    });
                }
                Output::HandOver { worker, input } => self.inputs.push_back((worker, input)),
                Output::Resolve { id, query } => {
                    let host = query.host.trim_start_matches('[').trim_end_matches(']');
                    if host.parse::<std::net::IpAddr>().is_err() {
                        self.dns_queries.push(host.to_owned());
                    }
                    let result = self.resolve(&query);
                    self.inputs
                        .push_back((index, Input::Resolved { id, result }));
                }
                Output::Close(ConnectionId(id)) => {
                    if let Some(connection) = self.connections.get_mut(id as usize) {
                        connection.open = false;
                    }
                }
            }
        }
    }

    /// The address a loop's message leaves from: the listener it names, else the first one of
    /// the transport.
    fn listener_for(&self, kind: TransportKind, local: Option<SocketAddr>) -> SocketAddr {
        let of_kind = || self.listeners.iter().filter(|l| l.kind == kind);
        of_kind()
            .find(|l| Some(l.addr) == local)
            .or_else(|| of_kind().next())
            .map(|l| l.addr)
            .unwrap_or_else(|| panic!("the server has no {kind} listener"))
    }

    fn resolve(&self, query: &Query) -> Result<Vec<Candidate>, ResolveError> {
        let host = query.host.trim_start_matches('[').trim_end_matches(']');
        let address = host.parse::<std::net::IpAddr>().ok();
        if let Some(ip) = address.or_else(|| self.dns_a.get(host).copied()) {
            let kind = query.transport.unwrap_or(TransportKind::Udp);
            let port = query.port.unwrap_or(kind.default_port());
            return Ok(vec![Candidate {
                kind,
                addr: SocketAddr::new(ip, port),
                tls_name: None,
            }]);
        }
        self.dns
            .get(host)
            .cloned()
            .ok_or_else(|| ResolveError::NotFound {
                host: host.to_owned(),
            })
    }

    // ----- what agents received -------------------------------------------------------------

    /// Runs the network until `id` holds a message `ready` accepts. When nothing more moves
    /// and none is there, a loop may be waiting for a durable write, which another thread
    /// reports through the loop's wake signal: that signal is waited for, up to [`WAIT`].
    fn settle_for(&mut self, id: UaId, ready: fn(&Ua) -> bool) {
        self.run();
        while !ready(&self.uas[id.0]) && self.wait_for_wake(WAIT) {
            self.run();
        }
    }

    /// Blocks until a loop's wake signal is notified (then gives that loop [`Input::Wake`])
    /// or `within` has passed; whether one was.
    fn wait_for_wake(&mut self, within: Duration) -> bool {
        self.wait_for_wake_or(within, &|| false)
    }

    /// [`Harness::wait_for_wake`], returning early (false) once `stop` holds; whoever makes
    /// it hold unparks this thread.
    fn wait_for_wake_or(&mut self, within: Duration, stop: &dyn Fn() -> bool) -> bool {
        let signals: Vec<(usize, Arc<WakeSignal>)> = (self.wakes.iter().enumerate())
            .filter_map(|(index, signal)| Some((index, Arc::clone(signal.as_ref()?))))
            .collect();
        let mut waits: Vec<_> = signals
            .iter()
            .map(|(index, signal)| (*index, Box::pin(signal.woken())))
            .collect();
        let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
        let mut context = Context::from_waker(&waker);
        let deadline = std::time::Instant::now() + within;
        loop {
            for (index, wait) in &mut waits {
                if wait.as_mut().poll(&mut context).is_ready() {
                    let index = *index;
                    self.on_input(index, Input::Wake);
                    return true;
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || stop() {
                return false;
            }
            std::thread::park_timeout(left);
        }
    }

    /// Runs `job` on another thread, as the control socket runs a command off the event loops,
    /// while the network runs here: a job that queues work for a loop (`ctl dlg end`) wakes
    /// it through its wake signal and waits for its answer. The job's result (it must finish
    /// within [`WAIT`]).
    pub fn off_loop<T: Send>(&mut self, job: impl FnOnce() -> T + Send) -> T {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let me = std::thread::current();
        std::thread::scope(|scope| {
            let finished = Arc::clone(&done);
            let worker = scope.spawn(move || {
                let result = job();
                finished.store(true, std::sync::atomic::Ordering::Release);
                me.unpark();
                result
            });
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                self.run();
                if done.load(std::sync::atomic::Ordering::Acquire) {
                    break;
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                assert!(
                    !left.is_zero(),
                    "the off-loop job did not finish in {WAIT:?}"
                );
                self.wait_for_wake_or(left, &|| done.load(std::sync::atomic::Ordering::Acquire));
            }
            worker.join().expect("the off-loop job")
        })
    }

    /// Runs the network, then the next response `id` received (panics when there is none).
    pub fn recv_response(&mut self, id: UaId) -> Message {
        self.settle_for(id, Ua::has_response);
        let ua = &mut self.uas[id.0];
        ua.take_response()
            .unwrap_or_else(|| panic!("{}: no response arrived", ua.name))
    }

    /// The next response, which must have status `code`.
    pub fn expect_response(&mut self, id: UaId, code: u16) -> Message {
        let response = self.recv_response(id);
        expect_status(&response, code);
        response
    }

    /// Responses until the final one (skipping provisionals), which must have status `code`.
    pub fn expect_final(&mut self, id: UaId, code: u16) -> Message {
        loop {
            let response = self.recv_response(id);
            if response.status().unwrap() >= 200 {
                expect_status(&response, code);
                return response;
            }
        }
    }

    /// Runs the network, then the next request `id` received, which must be a `method`.
    pub fn expect_request(&mut self, id: UaId, method: &str) -> Message {
        self.settle_for(id, Ua::has_request);
        let ua = &mut self.uas[id.0];
        let name = ua.name.clone();
        let request = ua
            .take_request()
            .unwrap_or_else(|| panic!("{name}: no request arrived (wanted {method})"));
        let got = request.method().unwrap().as_str();
        assert_eq!(
            got,
            method,
            "{name}: expected a {method}, got\n{}",
            show(&request)
        );
        request
    }

    /// Runs the network and asserts that `id` has received nothing it has not read.
    pub fn expect_nothing(&mut self, id: UaId) {
        self.run();
        let ua = &mut self.uas[id.0];
        if let Some(message) = ua.take_any() {
            panic!("{}: unexpected\n{}", ua.name, show(&message));
        }
    }

    /// Sends an OPTIONS from `id` to the server and asserts that the next response is its
    /// 200: whatever else the server sent `id` before (a stray or duplicate) fails the test.
    pub fn probe_is_next(&mut self, id: UaId) {
        let proxy = self.proxy();
        let options = self
            .ua(id)
            .request("OPTIONS", &format!("sip:{proxy}"))
            .to(proxy)
            .send();
        let answer = self.recv_response(id);
        assert_eq!(
            answer.call_id().unwrap(),
            options.call_id().unwrap(),
            "{}: the next response should answer the probe, got\n{}",
            self.uas[id.0].name,
            show(&answer)
        );
        expect_status(&answer, 200);
    }
}

enum Owner {
    Server,
    Ua(usize),
}

/// Wakes the test's thread when a wake signal is notified.
struct ThreadWaker(std::thread::Thread);

impl std::task::Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}
