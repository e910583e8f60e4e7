//! A bounded, loopback-only load client for `bench/ws.sh`: the same REGISTERs and MESSAGEs over
//! secure WebSocket (RFC 7118) and over TLS (and plain `ws`/`tcp`), so the two transports are
//! compared with one client (SIPp has no WebSocket).
//!
//! ```text
//! ws_load register --server 127.0.0.1:P --transport wss|tls|ws|tcp [--ca CA.pem] \
//!     --connections N --count M --rate R
//! ws_load message  --server 127.0.0.1:P --transport wss|tls|ws|tcp [--ca CA.pem] \
//!     --connections N --count M --rate R
//! ws_load idle     --server 127.0.0.1:P --transport wss|tls|ws|tcp [--ca CA.pem] \
//!     --connections N [--concurrency C] [--hold-secs S]
//! ```
//!
//! - `register`: N connections, user `wl<i>` on connection i. M REGISTERs (Expires 3600)
//!   sent at R per second (open loop: the schedule does not wait for answers), round-robin over
//!   the connections, each a refresh of that connection's binding; counted when its 200
//!   arrives. A browser's REGISTER over WebSocket: Via `SIP/2.0/WSS <random>.invalid`, Contact
//!   `<sip:wl<i>@<random>.invalid;transport=ws>` (RFC 7118 §5); over TLS a phone behind a NAT
//!   (`192.168.x.y:5061`, `transport=tls`), whose binding the shipped policy ties to the
//!   connection (nat_detect, fix_nated_contact) as it ties a WebSocket binding to its flow.
//! - `message`: N connections (N even) register once each (setup, not counted); then M
//!   MESSAGEs at R per second, from the odd connection of pair p to the AOR of the even one
//!   (`sip:wl<2p>@DOMAIN`): the proxy looks the binding up and delivers on the receiver's
//!   connection, the receiver answers 200, which the proxy relays back. Counted when the 200
//!   reaches the sender.
//! - `idle`: N connections (TLS handshake and, for `ws`/`wss`, the HTTP Upgrade done), nothing
//!   sent, held until a line on stdin or `--hold-secs` (default 30); prints `holding N
//!   connections` when all are up, so a script can read the server's RSS meanwhile.
//!
//! Output (parsed by `bench/ws.sh`): `<mode> ok: X failed: Y rate: Z /s` (rate = ok over the
//! wall time from the first request to the last answer) and the latency percentiles.
//!
//! Bounds: every connection and transaction has its own timeout (`--op-timeout`, default 8 s),
//! the whole run stops after `--timeout` seconds (default 60; exit 1), and at most
//! `--max-outstanding` (default 5000) transactions are in flight (more count as failures).
//! Loopback only: `--server` must be 127.0.0.0/8 or ::1. TLS verifies the server certificate
//! against `--ca` for `--name` (default `localhost`; `tls_load certs` writes one).
//! Exit status: 0 when nothing failed, 1 otherwise, 2 on usage errors.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use moonroute::sip::Message;

#[path = "common/load.rs"]
mod load;
use moonroute::transport::framing::{Frame, StreamFramer};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    Wss,
    Ws,
    Tls,
    Tcp,
}

impl Transport {
    fn is_websocket(self) -> bool {
        matches!(self, Transport::Wss | Transport::Ws)
    }

    fn is_tls(self) -> bool {
        matches!(self, Transport::Wss | Transport::Tls)
    }

    /// The Via transport token (RFC 7118 §5 for WS/WSS).
    fn via(self) -> &'static str {
        match self {
            Transport::Wss => "WSS",
            Transport::Ws => "WS",
            Transport::Tls => "TLS",
            Transport::Tcp => "TCP",
        }
    }

    /// The Contact's `transport` parameter: `ws` for both WebSocket flavours (RFC 7118 §5).
    fn uri_param(self) -> &'static str {
        match self {
            Transport::Wss | Transport::Ws => "ws",
            Transport::Tls => "tls",
            Transport::Tcp => "tcp",
        }
    }
}

#[derive(Clone, Debug)]
struct Args {
    mode: String,
    server: SocketAddr,
    transport: Transport,
    ca: Option<PathBuf>,
    name: String,
    domain: String,
    connections: usize,
    count: usize,
    rate: f64,
    concurrency: usize,
    max_outstanding: usize,
    hold: Duration,
    /// The server's process, whose CPU time (utime+stime from /proc) the paced phase reports.
    server_pid: Option<u32>,
    op_timeout: Duration,
    timeout: Duration,
}

const USAGE: &str = "usage: ws_load register|message --server 127.0.0.1:PORT --transport wss|tls|ws|tcp [--ca CA.pem] [--connections N] [--count M] [--rate R]
       ws_load idle --server 127.0.0.1:PORT --transport wss|tls|ws|tcp [--ca CA.pem] [--connections N] [--concurrency C] [--hold-secs S]
common: [--name localhost] [--domain 127.0.0.1] [--server-pid PID] [--max-outstanding 5000] [--op-timeout SECS (8)] [--timeout SECS (60)]";

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("ws_load: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let limit = args.timeout;
    load::run_bounded("ws_load", limit, run(args))
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mode = it.next().ok_or("missing the mode")?;
    if !["register", "message", "idle"].contains(&mode.as_str()) {
        return Err(format!("unknown mode '{mode}'"));
    }
    let mut server = None;
    let mut transport = None;
    let mut args = Args {
        mode,
        server: SocketAddr::from(([127, 0, 0, 1], 0)),
        transport: Transport::Wss,
        ca: None,
        name: "localhost".into(),
        domain: "127.0.0.1".into(),
        connections: 10,
        count: 1000,
        rate: 500.0,
        concurrency: 50,
        max_outstanding: 5000,
        hold: Duration::from_secs(30),
        server_pid: None,
        op_timeout: Duration::from_secs(8),
        timeout: Duration::from_secs(60),
    };
    let number = |v: String| -> Result<usize, String> {
        v.parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or(format!("'{v}' is not a positive number"))
    };
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--server" => {
                let v = value()?;
                let addr: SocketAddr = v.parse().map_err(|_| format!("'{v}' is not IP:PORT"))?;
                if !addr.ip().is_loopback() {
                    return Err(format!("refusing {addr}: loopback addresses only"));
                }
                server = Some(addr);
            }
            "--transport" => {
                transport = Some(match value()?.to_ascii_lowercase().as_str() {
                    "wss" => Transport::Wss,
                    "ws" => Transport::Ws,
                    "tls" => Transport::Tls,
                    "tcp" => Transport::Tcp,
                    other => return Err(format!("unknown transport '{other}'")),
                })
            }
            "--ca" => args.ca = Some(PathBuf::from(value()?)),
            "--name" => args.name = value()?,
            "--domain" => args.domain = value()?,
            "--connections" => args.connections = number(value()?)?,
            "--count" => args.count = number(value()?)?,
            "--rate" => args.rate = number(value()?)? as f64,
            "--concurrency" => args.concurrency = number(value()?)?,
            "--max-outstanding" => args.max_outstanding = number(value()?)?,
            "--hold-secs" => args.hold = Duration::from_secs(number(value()?)? as u64),
            "--server-pid" => args.server_pid = Some(number(value()?)? as u32),
            "--op-timeout" => args.op_timeout = Duration::from_secs(number(value()?)? as u64),
            "--timeout" => args.timeout = Duration::from_secs(number(value()?)? as u64),
            "-h" | "--help" => return Err("help".into()),
            other => return Err(format!("unexpected argument '{other}'")),
        }
    }
    args.server = server.ok_or("--server 127.0.0.1:PORT is required")?;
    args.transport = transport.ok_or("--transport wss|tls|ws|tcp is required")?;
    if args.transport.is_tls() && args.ca.is_none() {
        return Err("wss and tls need --ca CA.pem".into());
    }
    if args.mode == "message" && (args.connections < 2 || args.connections % 2 != 0) {
        return Err(
            "message needs an even number of --connections (sender, receiver pairs)".into(),
        );
    }
    Ok(args)
}

async fn run(args: Args) -> Result<bool, String> {
    let dialer = Arc::new(Dialer::new(&args)?);
    match args.mode.as_str() {
        "register" => register(&args, dialer).await,
        "message" => message(&args, dialer).await,
        "idle" => idle(&args, dialer).await,
        _ => unreachable!("checked by parse_args"),
    }
}

/// A fresh unpredictable-enough number for branches, Call-IDs and `.invalid` hosts (no RNG
/// dependency for a bench tool: std's per-process random hash keys and a counter).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_usize(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

// ----- connections ----------------------------------------------------------------------------

/// Opens connections of one transport: TCP, then TLS (wss, tls), then the HTTP Upgrade with the
/// `sip` subprotocol (ws, wss; RFC 7118 §4).
struct Dialer {
    server: SocketAddr,
    transport: Transport,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

/// An open connection, before or after its reader/writer tasks start.
enum Opened {
    Stream(Box<dyn Io>),
    WebSocket(Box<tokio_tungstenite::WebSocketStream<Box<dyn Io>>>),
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

impl Dialer {
    fn new(args: &Args) -> Result<Dialer, String> {
        let tls = match &args.ca {
            Some(path) if args.transport.is_tls() => {
                let name = ServerName::try_from(args.name.clone())
                    .map_err(|e| format!("--name {}: {e}", args.name))?;
                Some((connector(path)?, name))
            }
            _ => None,
        };
        Ok(Dialer {
            server: args.server,
            transport: args.transport,
            tls,
        })
    }

    async fn open(&self) -> Result<Opened, String> {
        let tcp = TcpStream::connect(self.server)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let io: Box<dyn Io> = match &self.tls {
            Some((connector, name)) => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?,
            ),
            None => Box::new(tcp),
        };
        if !self.transport.is_websocket() {
            return Ok(Opened::Stream(io));
        }
        let scheme = if self.transport.is_tls() { "wss" } else { "ws" };
        let mut request = format!("{scheme}://{}/", self.server)
            .into_client_request()
            .map_err(|e| e.to_string())?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "sip".parse().expect("a header value"),
        );
        let (ws, _) = tokio_tungstenite::client_async(request, io)
            .await
            .map_err(|e| format!("WebSocket upgrade: {e}"))?;
        Ok(Opened::WebSocket(Box::new(ws)))
    }
}

fn connector(path: &std::path::Path) -> Result<TlsConnector, String> {
    Ok(TlsConnector::from(Arc::new(load::trusting(path)?)))
}

/// Where answers to the requests a connection sent are waited for, by Call-ID.
type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Message>>>>;

/// A connection with a user: its reader answers requests (200) and hands responses to
/// whoever waits for their Call-ID.
struct Link {
    index: usize,
    /// Via sent-by and Contact host: `<random>.invalid` over WebSocket (RFC 7118 §5), the
    /// connection's address otherwise.
    host: String,
    out: mpsc::UnboundedSender<String>,
    pending: Pending,
    sequence: AtomicUsize,
}

impl Link {
    async fn open(dialer: &Dialer, index: usize) -> Result<Arc<Link>, String> {
        let opened = dialer.open().await?;
        let (out, outgoing) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        let host = if dialer.transport.is_websocket() {
            format!("wl{index}x{:08x}.invalid", random() as u32)
        } else {
            // A phone behind a NAT, as TLS phones on the Internet are: its private address and
            // listening port in Via and Contact. The shipped policy's nat_detect() and
            // fix_nated_contact() make its binding reach it over this connection, as the flow
            // of a WebSocket binding does. (A Contact naming the connection's own address and
            // port would be taken at its word: the proxy would open a new connection to it.)
            format!("192.168.{}.{}:5061", index / 250, index % 250 + 1)
        };
        let link = Arc::new(Link {
            index,
            host,
            out,
            pending: Arc::clone(&pending),
            sequence: AtomicUsize::new(1),
        });
        let replies = link.out.clone();
        match opened {
            Opened::Stream(io) => {
                let (read, write) = tokio::io::split(io);
                tokio::spawn(write_stream(write, outgoing));
                tokio::spawn(read_stream(read, pending, replies));
            }
            Opened::WebSocket(ws) => {
                let (sink, stream) = (*ws).split();
                tokio::spawn(write_websocket(sink, outgoing));
                tokio::spawn(read_websocket(stream, pending, replies));
            }
        }
        Ok(link)
    }

    fn branch(&self) -> String {
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        format!("z9hG4bK-wl{}-{n}-{:08x}", self.index, random() as u32)
    }

    /// Sends `request` (with Call-ID `call_id`) and waits for its final response.
    async fn transaction(
        &self,
        call_id: String,
        request: String,
        op_timeout: Duration,
    ) -> Result<Message, String> {
        let (tx, mut rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(call_id.clone(), tx);
        let result = async {
            self.out.send(request).map_err(|_| "connection closed")?;
            loop {
                let response = (&mut rx).await.map_err(|_| "connection closed")?;
                if response.status().unwrap_or(0) >= 200 {
                    return Ok::<Message, &str>(response);
                }
                // A provisional answer: wait on for the final one.
                let (tx, next) = oneshot::channel();
                self.pending.lock().unwrap().insert(call_id.clone(), tx);
                rx = next;
            }
        };
        let outcome = match tokio::time::timeout(op_timeout, result).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no final response in time".to_owned()),
        };
        self.pending.lock().unwrap().remove(&call_id);
        outcome
    }

    fn register(&self, args: &Args) -> (String, String) {
        let user = format!("wl{}", self.index);
        let call_id = format!("reg-{}-{:016x}", self.index, random());
        let cseq = self.sequence.load(Ordering::Relaxed);
        let request = format!(
            "REGISTER sip:{domain} SIP/2.0\r\n\
             Via: SIP/2.0/{via} {host};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{user}@{domain}>;tag=f{index}\r\n\
             To: <sip:{user}@{domain}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <sip:{user}@{host};transport={param}>\r\n\
             Expires: 3600\r\n\
             User-Agent: moonroute-ws_load\r\n\
             Content-Length: 0\r\n\r\n",
            domain = args.domain,
            via = args.transport.via(),
            host = self.host,
            branch = self.branch(),
            index = self.index,
            param = args.transport.uri_param(),
        );
        (call_id, request)
    }

    fn message_to(&self, args: &Args, to_user: &str) -> (String, String) {
        let body = "moonroute ws_load: hello";
        let call_id = format!("msg-{}-{:016x}", self.index, random());
        let request = format!(
            "MESSAGE sip:{to_user}@{domain} SIP/2.0\r\n\
             Via: SIP/2.0/{via} {host};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:wl{index}@{domain}>;tag=m{index}\r\n\
             To: <sip:{to_user}@{domain}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 1 MESSAGE\r\n\
             Content-Type: text/plain\r\n\
             Content-Length: {len}\r\n\r\n{body}",
            domain = args.domain,
            via = args.transport.via(),
            host = self.host,
            branch = self.branch(),
            index = self.index,
            len = body.len(),
        );
        (call_id, request)
    }
}

async fn write_stream(
    mut write: impl AsyncWrite + Unpin,
    mut outgoing: mpsc::UnboundedReceiver<String>,
) {
    while let Some(message) = outgoing.recv().await {
        if write.write_all(message.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn write_websocket<S>(mut sink: S, mut outgoing: mpsc::UnboundedReceiver<String>)
where
    S: futures_util::Sink<WsMessage> + Unpin,
{
    // One SIP message per WebSocket text message (RFC 7118 §5), as browsers send them.
    while let Some(message) = outgoing.recv().await {
        if sink.send(WsMessage::text(message)).await.is_err() {
            return;
        }
    }
}

async fn read_stream(
    mut read: impl AsyncRead + Unpin,
    pending: Pending,
    replies: mpsc::UnboundedSender<String>,
) {
    let mut framer = StreamFramer::new(64 * 1024);
    loop {
        match read.read_buf(framer.read_space(16 * 1024)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            match framer.next_frame() {
                Ok(Some(Frame::Message(bytes))) => deliver(bytes, &pending, &replies),
                Ok(Some(Frame::KeepAlivePing)) => {
                    let _ = replies.send("\r\n".to_owned());
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

async fn read_websocket<S>(mut stream: S, pending: Pending, replies: mpsc::UnboundedSender<String>)
where
    S: futures_util::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>>
        + Unpin,
{
    while let Some(Ok(message)) = stream.next().await {
        match message {
            WsMessage::Text(text) => deliver(Bytes::from(text), &pending, &replies),
            WsMessage::Binary(bytes) => deliver(bytes, &pending, &replies),
            WsMessage::Close(_) => return,
            _ => {}
        }
    }
}

/// A response goes to whoever waits for its Call-ID; a request (a MESSAGE for this user) is
/// answered 200 on the same connection.
fn deliver(bytes: Bytes, pending: &Pending, replies: &mpsc::UnboundedSender<String>) {
    let Ok(message) = Message::parse(bytes.clone()) else {
        return;
    };
    if message.is_request() {
        if message.method().is_some_and(|m| m.as_str() != "ACK") {
            let _ = replies.send(ok_response(&bytes));
        }
        return;
    }
    let Ok(call_id) = message.call_id() else {
        return;
    };
    let call_id = String::from_utf8_lossy(call_id).into_owned();
    if let Some(waiter) = pending.lock().unwrap().remove(&call_id) {
        let _ = waiter.send(message);
    }
}

/// 200 OK to `request` (RFC 3261 §8.2.6): its Via, From, Call-ID and CSeq lines, its To with a
/// tag added.
fn ok_response(request: &[u8]) -> String {
    let text = String::from_utf8_lossy(request);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut response = String::from("SIP/2.0 200 OK\r\n");
    for line in head.split("\r\n").skip(1) {
        let name = line.split(':').next().unwrap_or("").trim();
        let copied = ["via", "v", "from", "f", "call-id", "i", "cseq", "to", "t"];
        if let Some(kind) = copied.iter().find(|c| name.eq_ignore_ascii_case(c)) {
            response.push_str(line);
            if (*kind == "to" || *kind == "t") && !line.contains(";tag=") {
                response.push_str(";tag=wl-answer");
            }
            response.push_str("\r\n");
        }
    }
    response.push_str("Content-Length: 0\r\n\r\n");
    response
}

/// Opens `args.connections` links, `args.concurrency` at a time.
async fn open_links(args: &Args, dialer: &Arc<Dialer>) -> Result<Vec<Arc<Link>>, String> {
    let mut links: Vec<Option<Arc<Link>>> = vec![None; args.connections];
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < args.connections || !set.is_empty() {
        while next < args.connections && set.len() < args.concurrency {
            let (dialer, op) = (Arc::clone(dialer), args.op_timeout);
            let index = next;
            set.spawn(async move {
                let link = tokio::time::timeout(op, Link::open(&dialer, index))
                    .await
                    .unwrap_or_else(|_| Err("connection: timed out".into()));
                (index, link)
            });
            next += 1;
        }
        if let Some(joined) = set.join_next().await {
            let (index, link) = joined.map_err(|e| e.to_string())?;
            links[index] = Some(link.map_err(|e| format!("connection {index}: {e}"))?);
        }
    }
    Ok(links
        .into_iter()
        .map(|l| l.expect("every link opened"))
        .collect())
}

// ----- the measured runs ----------------------------------------------------------------------

/// The outcome of a paced run: successes, failures (the first few reasons), latencies.
#[derive(Default)]
struct Tally {
    ok: usize,
    failed: usize,
    reasons: Vec<String>,
    latencies: Vec<Duration>,
}

impl Tally {
    fn record(&mut self, outcome: Result<Duration, String>) {
        match outcome {
            Ok(latency) => {
                self.ok += 1;
                self.latencies.push(latency);
            }
            Err(reason) => {
                self.failed += 1;
                if self.reasons.len() < 5 && !self.reasons.contains(&reason) {
                    self.reasons.push(reason);
                }
            }
        }
    }

    fn print(&mut self, mode: &str, wall: Duration, server_cpu: Option<Duration>) -> bool {
        for reason in &self.reasons {
            eprintln!("  failure: {reason}");
        }
        self.latencies.sort();
        let percentile = |p: f64| -> f64 {
            if self.latencies.is_empty() {
                return 0.0;
            }
            let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
            self.latencies[i].as_secs_f64() * 1000.0
        };
        println!(
            "{mode} ok: {} failed: {} rate: {:.1} /s (wall {:.2} s)  latency ms p50 {:.2} p99 {:.2} max {:.2}",
            self.ok,
            self.failed,
            self.ok as f64 / wall.as_secs_f64().max(1e-9),
            wall.as_secs_f64(),
            percentile(0.5),
            percentile(0.99),
            percentile(1.0),
        );
        if let Some(cpu) = server_cpu {
            let ms = cpu.as_secs_f64() * 1000.0;
            println!(
                "{mode} server CPU: {ms:.0} ms = {:.1} ms per 1000 ok",
                ms * 1000.0 / self.ok.max(1) as f64
            );
        }
        self.failed == 0
    }
}

/// utime + stime of process `pid` (fields 14 and 15 of /proc/PID/stat), in clock ticks of
/// 10 ms (the kernel's USER_HZ is 100 on Linux everywhere).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Runs `op(k)` for k in 0..count at `rate` per second (open loop), at most `max_outstanding`
/// in flight (an operation that would exceed it fails without being sent).
async fn paced<F, Fut>(args: &Args, mode: &str, op: F) -> bool
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let mut tally = Tally::default();
    let mut set = JoinSet::new();
    let cpu_before = args.server_pid.and_then(cpu_time);
    let started = tokio::time::Instant::now();
    let wall = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    for k in 0..args.count {
        tokio::time::sleep_until(started + interval.mul_f64(k as f64)).await;
        while let Some(joined) = set.try_join_next() {
            tally.record(joined.unwrap_or_else(|e| Err(e.to_string())));
        }
        if set.len() >= args.max_outstanding {
            tally.record(Err("too many outstanding transactions".into()));
            continue;
        }
        let future = op(k);
        set.spawn(async move {
            let sent = Instant::now();
            future.await.map(|()| sent.elapsed())
        });
    }
    while let Some(joined) = set.join_next().await {
        tally.record(joined.unwrap_or_else(|e| Err(e.to_string())));
    }
    let wall = wall.elapsed();
    let server_cpu = args
        .server_pid
        .and_then(cpu_time)
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    tally.print(mode, wall, server_cpu)
}

fn expect_2xx(response: Message, what: &str) -> Result<(), String> {
    match response.status() {
        Some(200..=299) => Ok(()),
        other => Err(format!("{what} answered {}", other.unwrap_or(0))),
    }
}

async fn register(args: &Args, dialer: Arc<Dialer>) -> Result<bool, String> {
    let links = open_links(args, &dialer).await?;
    println!("opened {} {:?} connections", links.len(), args.transport);
    let op_timeout = args.op_timeout;
    Ok(paced(args, "register", |k| {
        let link = Arc::clone(&links[k % links.len()]);
        let (call_id, request) = link.register(args);
        async move {
            let response = link.transaction(call_id, request, op_timeout).await?;
            expect_2xx(response, "REGISTER")
        }
    })
    .await)
}

async fn message(args: &Args, dialer: Arc<Dialer>) -> Result<bool, String> {
    let links = open_links(args, &dialer).await?;
    // Setup: every user registers once on its connection (not counted).
    let mut set = JoinSet::new();
    for link in &links {
        let (link, op) = (Arc::clone(link), args.op_timeout);
        let (call_id, request) = link.register(args);
        set.spawn(async move {
            let response = link.transaction(call_id, request, op).await?;
            expect_2xx(response, "REGISTER")
        });
    }
    while let Some(joined) = set.join_next().await {
        joined
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("setup: {e}"))?;
    }
    println!(
        "opened and registered {} {:?} connections ({} pairs)",
        links.len(),
        args.transport,
        links.len() / 2
    );
    let pairs = links.len() / 2;
    let op_timeout = args.op_timeout;
    Ok(paced(args, "message", |k| {
        let pair = k % pairs;
        let sender = Arc::clone(&links[2 * pair + 1]);
        let (call_id, request) = sender.message_to(args, &format!("wl{}", 2 * pair));
        async move {
            let response = sender.transaction(call_id, request, op_timeout).await?;
            expect_2xx(response, "MESSAGE")
        }
    })
    .await)
}

async fn idle(args: &Args, dialer: Arc<Dialer>) -> Result<bool, String> {
    let started = Instant::now();
    let mut held = Vec::with_capacity(args.connections);
    let mut set = JoinSet::new();
    let mut next = 0;
    let mut failed = 0;
    while next < args.connections || !set.is_empty() {
        while next < args.connections && set.len() < args.concurrency {
            let (dialer, op) = (Arc::clone(&dialer), args.op_timeout);
            set.spawn(async move {
                tokio::time::timeout(op, dialer.open())
                    .await
                    .unwrap_or_else(|_| Err("connection: timed out".into()))
            });
            next += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(opened))) => held.push(opened),
            Some(Ok(Err(e))) => {
                if failed == 0 {
                    eprintln!("  failure: {e}");
                }
                failed += 1;
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => {}
        }
    }
    println!(
        "holding {} {:?} connections (failed {failed}) opened in {:.2} s",
        held.len(),
        args.transport,
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let _ = tokio::time::timeout(args.hold, stdin.read_line(&mut line)).await;
    drop(held);
    Ok(failed == 0)
}
