//! A small authoritative DNS server on 127.0.0.1 for tests: it answers A, AAAA, SRV and NAPTR
//! queries from records the test gives, over UDP and TCP on the same port, and counts queries.
//!
//! ```ignore
//! let dns = DnsServer::start(vec![
//!     Record::naptr("example.test", 10, 10, "s", "SIP+D2T", "", "_sip._tcp.example.test", 60),
//!     Record::srv("_sip._tcp.example.test", 10, 0, 5070, "pbx.example.test", 60),
//!     Record::a("pbx.example.test", Ipv4Addr::new(127, 0, 0, 1), 60),
//! ]);
//! let resolver = moonroute::dns::Resolver::from_config(&dns.config(500))?;
//! // ... locate, then:
//! assert_eq!(dns.queries("_sip._tcp.example.test", RecordType::SRV), 1);
//! ```
//!
//! Behaviour, per query (the first question of the message; names compare without case and
//! without the final dot):
//! - a name with records of the asked type: NOERROR, authoritative, those records in the answer
//!   section in the order given to [`DnsServer::start`]. For SRV, the A/AAAA records of the
//!   targets are added to the additional section (as BIND does), unless
//!   [`DnsServer::set_srv_additionals`]`(false)`.
//! - a name with records, none of that type: NOERROR with an empty answer (NODATA);
//! - an unknown name: NXDOMAIN.
//!
//!   Negative answers carry an SOA in the authority section (owner: the last label of the name,
//!   e.g. `test.`) whose TTL and minimum are [`DnsServer::set_negative_ttl`] (default 300 s), so
//!   resolvers can cache them (RFC 2308; hickory caches no negative answer without SOA).
//! - a [silenced](DnsServer::silence) name: no answer at all (to test timeouts); still counted.
//! - over UDP, an answer larger than 512 bytes (or the EDNS size the query advertises) is sent
//!   truncated (TC bit, no records), so the client retries over TCP.
//!
//! Every query is counted per (name, type), UDP and TCP alike: [`DnsServer::queries`],
//! [`DnsServer::total_queries`], [`DnsServer::wait_queries`] (bounded wait, no sleeping).
//! Records can be replaced while running ([`DnsServer::set_records`]).
//!
//! The server runs on plain threads (no tokio runtime), so it works from any test, sync or
//! async, whatever the runtime flavour. Dropping it stops it.

#![allow(dead_code)] // each test binary uses a different part of the server

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_resolver::proto::op::{Edns, Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, NAPTR, SOA, SRV};
/// Record types, for [`DnsServer::queries`]: `RecordType::A`, `AAAA`, `SRV`, `NAPTR`.
pub use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::proto::rr::{Name, RData, Record as WireRecord};

/// One resource record of the test zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Owner name, e.g. `example.test` (final dot optional, case ignored).
    pub name: String,
    /// Time to live, seconds.
    pub ttl: u32,
    /// Type and data.
    pub data: Data,
}

/// The data of a [`Record`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        /// Target host; `.` means "service not available" (RFC 2782).
        target: String,
    },
    Naptr {
        order: u16,
        preference: u16,
        flags: String,
        service: String,
        regexp: String,
        /// Replacement (an SRV name for flags `s`); `.` for none.
        replacement: String,
    },
}

impl Record {
    /// `name A ip`.
    pub fn a(name: &str, ip: Ipv4Addr, ttl: u32) -> Record {
        Record::new(name, ttl, Data::A(ip))
    }

    /// `name AAAA ip`.
    pub fn aaaa(name: &str, ip: Ipv6Addr, ttl: u32) -> Record {
        Record::new(name, ttl, Data::Aaaa(ip))
    }

    /// `name SRV priority weight port target`.
    pub fn srv(
        name: &str,
        priority: u16,
        weight: u16,
        port: u16,
        target: &str,
        ttl: u32,
    ) -> Record {
        Record::new(
            name,
            ttl,
            Data::Srv {
                priority,
                weight,
                port,
                target: target.to_owned(),
            },
        )
    }

    /// `name NAPTR order preference "flags" "service" "regexp" replacement`.
    #[allow(clippy::too_many_arguments)]
    pub fn naptr(
        name: &str,
        order: u16,
        preference: u16,
        flags: &str,
        service: &str,
        regexp: &str,
        replacement: &str,
        ttl: u32,
    ) -> Record {
        Record::new(
            name,
            ttl,
            Data::Naptr {
                order,
                preference,
                flags: flags.to_owned(),
                service: service.to_owned(),
                regexp: regexp.to_owned(),
                replacement: replacement.to_owned(),
            },
        )
    }

    fn new(name: &str, ttl: u32, data: Data) -> Record {
        Record {
            name: name.to_owned(),
            ttl,
            data,
        }
    }

    fn record_type(&self) -> RecordType {
        match self.data {
            Data::A(_) => RecordType::A,
            Data::Aaaa(_) => RecordType::AAAA,
            Data::Srv { .. } => RecordType::SRV,
            Data::Naptr { .. } => RecordType::NAPTR,
        }
    }

    fn to_wire(&self) -> WireRecord {
        let rdata = match &self.data {
            Data::A(ip) => RData::A(A(*ip)),
            Data::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
            Data::Srv {
                priority,
                weight,
                port,
                target,
            } => RData::SRV(SRV::new(*priority, *weight, *port, fqdn(target))),
            Data::Naptr {
                order,
                preference,
                flags,
                service,
                regexp,
                replacement,
            } => RData::NAPTR(NAPTR::new(
                *order,
                *preference,
                flags.as_bytes().into(),
                service.as_bytes().into(),
                regexp.as_bytes().into(),
                fqdn(replacement),
            )),
        };
        WireRecord::from_rdata(fqdn(&self.name), self.ttl, rdata)
    }
}

/// `name` as an absolute DNS name (panics on a malformed name: a bug in the test).
fn fqdn(name: &str) -> Name {
    if name == "." || name.is_empty() {
        return Name::root();
    }
    let mut n = Name::from_ascii(name).unwrap_or_else(|e| panic!("bad test name {name:?}: {e}"));
    n.set_fqdn(true);
    n
}

/// Lower case, without the final dot: the form names are compared and counted in.
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

struct Zone {
    records: Vec<Record>,
    silent: HashSet<String>,
    srv_additionals: bool,
    negative_ttl: u32,
}

struct Shared {
    zone: Mutex<Zone>,
    counts: Mutex<HashMap<(String, RecordType), usize>>,
    counted: Condvar,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running server. See the module documentation.
pub struct DnsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Binds UDP and TCP on one free port of 127.0.0.1 and serves `records`.
    pub fn start(records: Vec<Record>) -> DnsServer {
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            zone: Mutex::new(Zone {
                records,
                silent: HashSet::new(),
                srv_additionals: true,
                negative_ttl: 300,
            }),
            counts: Mutex::new(HashMap::new()),
            counted: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let udp_shared = shared.clone();
        let udp_thread = std::thread::Builder::new()
            .name("test-dns-udp".into())
            .spawn(move || serve_udp(udp, &udp_shared))
            .expect("spawn");
        let tcp_shared = shared.clone();
        let tcp_thread = std::thread::Builder::new()
            .name("test-dns-tcp".into())
            .spawn(move || serve_tcp(tcp, &tcp_shared))
            .expect("spawn");
        DnsServer {
            addr,
            shared,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    /// Where it listens (UDP and TCP): `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `[dns]` configuration using only this server, with `timeout_ms` per query and the
    /// other fields at their defaults.
    pub fn config(&self, timeout_ms: u64) -> moonroute::config::Dns {
        moonroute::config::Dns {
            nameservers: vec![self.addr],
            timeout_ms,
            ..moonroute::config::Dns::default()
        }
    }

    /// Queries received so far for (`name`, `rtype`) (case and final dot ignored).
    pub fn queries(&self, name: &str, rtype: RecordType) -> usize {
        lock(&self.shared.counts)
            .get(&(key(name), rtype))
            .copied()
            .unwrap_or(0)
    }

    /// Queries received so far, all names and types.
    pub fn total_queries(&self) -> usize {
        lock(&self.shared.counts).values().sum()
    }

    /// Every (name, type) asked so far with its count, sorted (for failure messages).
    pub fn query_log(&self) -> Vec<(String, RecordType, usize)> {
        let mut log: Vec<_> = lock(&self.shared.counts)
            .iter()
            .map(|((n, t), c)| (n.clone(), *t, *c))
            .collect();
        log.sort_by(|a, b| (&a.0, u16::from(a.1)).cmp(&(&b.0, u16::from(b.1))));
        log
    }

    /// Forgets the counts.
    pub fn reset_counts(&self) {
        lock(&self.shared.counts).clear();
    }

    /// Waits until at least `n` queries for (`name`, `rtype`) have arrived, at most `timeout`.
    /// Returns whether they did.
    pub fn wait_queries(&self, name: &str, rtype: RecordType, n: usize, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let k = (key(name), rtype);
        let mut counts = lock(&self.shared.counts);
        loop {
            if counts.get(&k).copied().unwrap_or(0) >= n {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            counts = self
                .shared
                .counted
                .wait_timeout(counts, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// From now on, queries for `name` (any type) get no answer.
    pub fn silence(&self, name: &str) {
        lock(&self.shared.zone).silent.insert(key(name));
    }

    /// Answers queries for `name` again.
    pub fn unsilence(&self, name: &str) {
        lock(&self.shared.zone).silent.remove(&key(name));
    }

    /// Replaces every record.
    pub fn set_records(&self, records: Vec<Record>) {
        lock(&self.shared.zone).records = records;
    }

    /// Whether SRV answers carry the targets' A/AAAA records (default: yes).
    pub fn set_srv_additionals(&self, on: bool) {
        lock(&self.shared.zone).srv_additionals = on;
    }

    /// The negative TTL (SOA TTL and minimum) of NXDOMAIN/NODATA answers (default: 300 s).
    pub fn set_negative_ttl(&self, secs: u32) {
        lock(&self.shared.zone).negative_ttl = secs;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking receive and accept.
        if let Ok(s) = UdpSocket::bind("127.0.0.1:0") {
            let _ = s.send_to(&[0], self.addr);
        }
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// UDP and TCP sockets on the same free port.
fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("addr").port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            return (udp, tcp);
        }
    }
    panic!("no free port for both UDP and TCP on 127.0.0.1");
}

fn serve_udp(socket: UdpSocket, shared: &Shared) {
    let mut buf = [0u8; 4096];
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if let Some(reply) = answer(shared, &buf[..len], true) {
            let _ = socket.send_to(&reply, from);
        }
    }
}

fn serve_tcp(listener: TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let shared = shared.clone();
        // Detached: a client may keep its connection open; it ends with the process, or within
        // a second of the server being dropped.
        let _ = std::thread::Builder::new()
            .name("test-dns-conn".into())
            .spawn(move || serve_connection(stream, &shared));
    }
}

/// RFC 1035 §4.2.2: each message preceded by its length on two bytes.
fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    loop {
        let mut len = [0u8; 2];
        match read_full(&mut stream, &mut len, shared) {
            Some(true) => {}
            _ => return,
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if read_full(&mut stream, &mut msg, shared) != Some(true) {
            return;
        }
        if let Some(reply) = answer(shared, &msg, false) {
            let Ok(len) = u16::try_from(reply.len()) else {
                return;
            };
            if stream.write_all(&len.to_be_bytes()).is_err() || stream.write_all(&reply).is_err() {
                return;
            }
        }
    }
}

/// Fills `buf`; Some(false) at a clean end of stream, None on error or server stop.
fn read_full(stream: &mut TcpStream, buf: &mut [u8], shared: &Shared) -> Option<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        if shared.stop.load(Ordering::SeqCst) {
            return None;
        }
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return if filled == 0 { Some(false) } else { None },
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
    Some(true)
}

/// The encoded reply to one query message, or None to stay silent.
fn answer(shared: &Shared, request: &[u8], udp: bool) -> Option<Vec<u8>> {
    let request = Message::from_vec(request).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let query = request.queries.first()?.clone();
    let qname = key(&query.name().to_ascii());
    let qtype = query.query_type();
    {
        let mut counts = lock(&shared.counts);
        *counts.entry((qname.clone(), qtype)).or_insert(0) += 1;
        shared.counted.notify_all();
    }
    let zone = lock(&shared.zone);
    if zone.silent.contains(&qname) {
        return None;
    }

    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(query.clone());
    if let Some(edns) = &request.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(edns.max_payload().max(512));
        reply.set_edns(ours);
    }

    let owned: Vec<&Record> = zone
        .records
        .iter()
        .filter(|r| key(&r.name) == qname)
        .collect();
    let matching: Vec<&Record> = owned
        .iter()
        .copied()
        .filter(|r| r.record_type() == qtype)
        .collect();
    if matching.is_empty() {
        if owned.is_empty() {
            reply.metadata.response_code = ResponseCode::NXDomain;
        }
        reply.add_authority(soa(&qname, zone.negative_ttl));
    } else {
        for r in &matching {
            reply.add_answer(r.to_wire());
        }
        if qtype == RecordType::SRV && zone.srv_additionals {
            for r in &matching {
                let Data::Srv { target, .. } = &r.data else {
                    continue;
                };
                let target = key(target);
                for glue in zone.records.iter().filter(|g| {
                    key(&g.name) == target && matches!(g.data, Data::A(_) | Data::Aaaa(_))
                }) {
                    reply.add_additional(glue.to_wire());
                }
            }
        }
    }
    drop(zone);

    let bytes = reply.to_vec().ok()?;
    let limit = request
        .edns
        .as_ref()
        .map_or(512, |e| usize::from(e.max_payload()).max(512));
    if udp && bytes.len() > limit {
        return reply.truncate().to_vec().ok();
    }
    Some(bytes)
}

/// The SOA of a negative answer: owner the last label of `qname` (the "zone" of the test).
fn soa(qname: &str, negative_ttl: u32) -> WireRecord {
    let apex = qname.rsplit('.').next().unwrap_or("test");
    let owner = fqdn(apex);
    let mname = fqdn(&format!("ns.{apex}"));
    let rname = fqdn(&format!("hostmaster.{apex}"));
    WireRecord::from_rdata(
        owner,
        negative_ttl,
        RData::SOA(SOA::new(mname, rname, 1, 3600, 600, 86400, negative_ttl)),
    )
}
