//! A bounded, loopback-only TLS load generator for `bench/tls.sh` (Debian's SIPp has no TLS).
//!
//! ```text
//! tls_load certs --out DIR                                   # ca.pem, server.pem, server.key
//! tls_load handshakes --server 127.0.0.1:5061 --ca DIR/ca.pem --count 2000 --concurrency 50
//! tls_load calls --server 127.0.0.1:5061 --ca DIR/ca.pem --uas 127.0.0.1:5080 \
//!     --calls 2000 --concurrency 20 [--transport tls|udp]
//! tls_load idle --server 127.0.0.1:5061 --ca DIR/ca.pem --connections 1000 [--transport tls|tcp] \
//!     [--hold-secs 30]
//! ```
//!
//! - `certs`: a throwaway CA and a server leaf for `localhost` and 127.0.0.1 (rcgen, ECDSA P-256).
//! - `handshakes`: COUNT TLS connections, CONCURRENCY at a time: connect, full handshake (no
//!   session resumption unless `--resume`), close_notify, then wait for the server to close
//!   (so each connection's server-side work is over when it is counted). Prints handshakes/s.
//! - `calls`: a UAC over ONE TLS connection (or one UDP socket with `--transport udp`) to the
//!   proxy, CONCURRENCY calls in flight, each INVITE → (100) → 180 → 200 → ACK → BYE → 200; ACK
//!   and BYE go to the 200's Contact with the 200's Record-Route reversed as Route set. An
//!   in-process UAS on UDP (`--uas`, where the proxy's static route points) answers INVITE with
//!   180 and 200 and BYE with 200, so only the UAC leg differs between `tls` and `udp` runs.
//!   Over UDP, INVITE and BYE are retransmitted (T1 = 500 ms, doubling, 4 s cap).
//! - `idle`: CONNECTIONS connections (TLS, handshake done; or plain `--transport tcp`), nothing
//!   sent after the handshake, held until a line on stdin or `--hold-secs` (default 30), so a
//!   script can read the server's RSS meanwhile. Prints `holding N connections` when all are up.
//!
//! Bounds: every connection, handshake and transaction has its own timeout (`--op-timeout`,
//! default 8 s) and the whole run stops after `--timeout` seconds (default 60; exit 1).
//! Loopback only: `--server` and `--uas` must be 127.0.0.0/8 or ::1. The client verifies the
//! server certificate against `--ca` for `--name` (default `localhost`).
//! Exit status: 0 when nothing failed, 1 otherwise, 2 on usage errors.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use moonroute::sip::{Contact, HeaderName, Message};

#[path = "common/load.rs"]
mod load;

const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    Tls,
    Udp,
    Tcp,
}

#[derive(Clone, Debug)]
struct Args {
    mode: String,
    server: Option<SocketAddr>,
    uas: Option<SocketAddr>,
    ca: Option<PathBuf>,
    name: String,
    out: Option<PathBuf>,
    count: usize,
    concurrency: usize,
    transport: Option<Transport>,
    hold: Duration,
    op_timeout: Duration,
    timeout: Duration,
    resume: bool,
}

const USAGE: &str = "usage: tls_load certs --out DIR
       tls_load handshakes --server 127.0.0.1:PORT --ca CA.pem [--count N] [--concurrency C] [--resume]
       tls_load calls --server 127.0.0.1:PORT [--ca CA.pem] --uas 127.0.0.1:PORT [--calls N] [--concurrency C] [--transport tls|udp]
       tls_load idle --server 127.0.0.1:PORT [--ca CA.pem] [--connections N] [--concurrency C] [--transport tls|tcp] [--hold-secs S]
common: [--name localhost] [--op-timeout SECS (8)] [--timeout SECS (60)]";

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("tls_load: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.mode == "certs" {
        return match write_certs(args.out.as_deref().expect("checked")) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tls_load certs: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let limit = args.timeout;
    load::run_bounded("tls_load", limit, run(args))
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mode = it.next().ok_or("missing the mode")?;
    if !["certs", "handshakes", "calls", "idle"].contains(&mode.as_str()) {
        return Err(format!("unknown mode '{mode}'"));
    }
    let mut args = Args {
        mode,
        server: None,
        uas: None,
        ca: None,
        name: "localhost".into(),
        out: None,
        count: 1000,
        concurrency: 20,
        transport: None,
        hold: Duration::from_secs(30),
        op_timeout: Duration::from_secs(8),
        timeout: Duration::from_secs(60),
        resume: false,
    };
    let loopback = |v: String| -> Result<SocketAddr, String> {
        let addr: SocketAddr = v.parse().map_err(|_| format!("'{v}' is not IP:PORT"))?;
        if !addr.ip().is_loopback() {
            return Err(format!("refusing {addr}: loopback addresses only"));
        }
        Ok(addr)
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
            "--server" => args.server = Some(loopback(value()?)?),
            "--uas" => args.uas = Some(loopback(value()?)?),
            "--ca" => args.ca = Some(PathBuf::from(value()?)),
            "--name" => args.name = value()?,
            "--out" => args.out = Some(PathBuf::from(value()?)),
            "--count" | "--calls" | "--connections" => args.count = number(value()?)?,
            "--concurrency" => args.concurrency = number(value()?)?,
            "--transport" => {
                args.transport = Some(match value()?.to_ascii_lowercase().as_str() {
                    "tls" => Transport::Tls,
                    "udp" => Transport::Udp,
                    "tcp" => Transport::Tcp,
                    other => return Err(format!("unknown transport '{other}'")),
                })
            }
            "--hold-secs" => args.hold = Duration::from_secs(number(value()?)? as u64),
            "--op-timeout" => args.op_timeout = Duration::from_secs(number(value()?)? as u64),
            "--timeout" => args.timeout = Duration::from_secs(number(value()?)? as u64),
            "--resume" => args.resume = true,
            "-h" | "--help" => return Err("help".into()),
            other => return Err(format!("unexpected argument '{other}'")),
        }
    }
    let transport = args.transport.unwrap_or(Transport::Tls);
    let allowed: &[Transport] = match args.mode.as_str() {
        "certs" => {
            if args.out.is_none() {
                return Err("certs needs --out DIR".into());
            }
            return Ok(args);
        }
        "handshakes" => &[Transport::Tls],
        "calls" => &[Transport::Tls, Transport::Udp],
        _ => &[Transport::Tls, Transport::Tcp],
    };
    if !allowed.contains(&transport) {
        return Err(format!("{} does not run over {transport:?}", args.mode));
    }
    args.transport = Some(transport);
    if args.server.is_none() {
        return Err(format!("{} needs --server 127.0.0.1:PORT", args.mode));
    }
    if transport == Transport::Tls && args.ca.is_none() {
        return Err("TLS needs --ca CA.pem".into());
    }
    if args.mode == "calls" && args.uas.is_none() {
        return Err("calls needs --uas 127.0.0.1:PORT (where the proxy routes)".into());
    }
    Ok(args)
}

async fn run(args: Args) -> Result<bool, String> {
    match args.mode.as_str() {
        "handshakes" => handshakes(&args).await,
        "calls" => calls(&args).await,
        "idle" => idle(&args).await,
        _ => unreachable!("checked by parse_args"),
    }
}

// ----- certificates ---------------------------------------------------------------------------

fn write_certs(dir: &Path) -> Result<(), String> {
    let err = |e: rcgen::Error| e.to_string();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "moonroute bench CA");
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_pem = ca.self_signed(&ca_key).map_err(err)?.pem();

    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into().map_err(err)?),
        SanType::IpAddress("127.0.0.1".parse().expect("IP")),
    ];
    leaf.distinguished_name
        .push(DnType::CommonName, "moonroute bench");
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf_key = KeyPair::generate().map_err(err)?;
    let issuer = Issuer::from_params(&ca, &ca_key);
    let leaf_pem = leaf.signed_by(&leaf_key, &issuer).map_err(err)?.pem();

    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, contents) in [
        ("ca.pem", ca_pem),
        ("server.pem", leaf_pem),
        ("server.key", leaf_key.serialize_pem()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, contents).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!(
        "wrote {0}/ca.pem, {0}/server.pem, {0}/server.key (localhost, 127.0.0.1)",
        dir.display()
    );
    Ok(())
}

fn connector(args: &Args) -> Result<TlsConnector, String> {
    let mut config = load::trusting(args.ca.as_ref().expect("checked"))?;
    if !args.resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(TlsConnector::from(Arc::new(config)))
}

fn server_name(args: &Args) -> Result<ServerName<'static>, String> {
    ServerName::try_from(args.name.clone()).map_err(|e| format!("--name {}: {e}", args.name))
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect_tls(
    connector: &TlsConnector,
    name: &ServerName<'static>,
    server: SocketAddr,
) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(server).await?;
    tcp.set_nodelay(true)?;
    connector.connect(name.clone(), tcp).await
}

/// Counts failures and keeps the first few distinct error texts.
#[derive(Default)]
struct Failures {
    count: AtomicUsize,
    samples: Mutex<Vec<String>>,
}

impl Failures {
    fn add(&self, error: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 5 && !samples.contains(&error) {
            samples.push(error);
        }
    }

    fn report(&self) -> usize {
        let n = self.count.load(Ordering::Relaxed);
        for sample in self.samples.lock().unwrap().iter() {
            eprintln!("  failure: {sample}");
        }
        n
    }
}

/// Runs `job(i)` for i in 0..count, `concurrency` at a time.
async fn for_each<F, Fut>(count: usize, concurrency: usize, job: F)
where
    F: Fn(usize) -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let local = tokio::task::LocalSet::new();
    for _ in 0..concurrency.min(count) {
        let (next, job) = (Arc::clone(&next), job.clone());
        local.spawn_local(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                job(i).await;
            }
        });
    }
    local.await;
}

// ----- handshakes -----------------------------------------------------------------------------

async fn handshakes(args: &Args) -> Result<bool, String> {
    let connector = connector(args)?;
    let name = server_name(args)?;
    let server = args.server.expect("checked");
    let op = args.op_timeout;
    let failures = Arc::new(Failures::default());
    let lingering = Arc::new(Failures::default());
    let started = Instant::now();
    {
        let (failures, lingering) = (Arc::clone(&failures), Arc::clone(&lingering));
        for_each(args.count, args.concurrency, move |_| {
            let (connector, name) = (connector.clone(), name.clone());
            let (failures, lingering) = (Arc::clone(&failures), Arc::clone(&lingering));
            async move {
                let mut tls =
                    match tokio::time::timeout(op, connect_tls(&connector, &name, server)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => return failures.add(format!("handshake: {e}")),
                        Err(_) => return failures.add("handshake: timed out".into()),
                    };
                // close_notify, then wait for the server to close its side.
                let closed = tokio::time::timeout(op, async {
                    tls.shutdown().await?;
                    let mut buf = [0u8; 1024];
                    while tls.read(&mut buf).await? > 0 {}
                    Ok::<_, std::io::Error>(())
                })
                .await;
                match closed {
                    Ok(Ok(())) => {}
                    // The server closing the TCP connection without its own close_notify.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                    Ok(Err(e)) => lingering.add(format!("close: {e}")),
                    Err(_) => lingering.add("close: the server kept the connection open".into()),
                }
            }
        })
        .await;
    }
    let wall = started.elapsed().as_secs_f64();
    let failed = failures.report();
    let ok = args.count - failed;
    println!(
        "handshakes ok: {ok}  failed: {failed}  wall: {wall:.3} s  rate: {:.1} handshakes/s  \
         (concurrency {}, resumption {}, unclean closes: {})",
        ok as f64 / wall,
        args.concurrency,
        if args.resume { "on" } else { "off" },
        lingering.report()
    );
    Ok(failed == 0)
}

// ----- idle connections -----------------------------------------------------------------------

enum Held {
    // Kept only to hold the connection open.
    Tls(#[allow(dead_code)] Box<Tls>),
    Tcp(#[allow(dead_code)] TcpStream),
}

async fn idle(args: &Args) -> Result<bool, String> {
    let tls = args.transport == Some(Transport::Tls);
    let connector = if tls { Some(connector(args)?) } else { None };
    let name = server_name(args)?;
    let server = args.server.expect("checked");
    let op = args.op_timeout;
    let failures = Arc::new(Failures::default());
    let held = Arc::new(Mutex::new(Vec::with_capacity(args.count)));
    let started = Instant::now();
    {
        let (failures, held) = (Arc::clone(&failures), Arc::clone(&held));
        for_each(args.count, args.concurrency, move |_| {
            let (connector, name) = (connector.clone(), name.clone());
            let (failures, held) = (Arc::clone(&failures), Arc::clone(&held));
            async move {
                let opened = tokio::time::timeout(op, async {
                    match &connector {
                        Some(c) => Ok(Held::Tls(Box::new(connect_tls(c, &name, server).await?))),
                        None => {
                            Ok::<_, std::io::Error>(Held::Tcp(TcpStream::connect(server).await?))
                        }
                    }
                })
                .await;
                match opened {
                    Ok(Ok(conn)) => held.lock().unwrap().push(conn),
                    Ok(Err(e)) => failures.add(format!("connect: {e}")),
                    Err(_) => failures.add("connect: timed out".into()),
                }
            }
        })
        .await;
    }
    let failed = failures.report();
    let open = held.lock().unwrap().len();
    println!(
        "holding {open} {} connections ({failed} failed), opened in {:.3} s; until a line on stdin or {} s",
        if tls { "TLS" } else { "TCP" },
        started.elapsed().as_secs_f64(),
        args.hold.as_secs()
    );
    std::io::stdout().flush().ok();
    let stdin_line = async {
        let mut line = String::new();
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
        match stdin.read_line(&mut line).await {
            Ok(n) if n > 0 => {}
            // EOF (e.g. </dev/null) or an error: only the timer ends the hold.
            _ => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = stdin_line => {}
        _ = tokio::time::sleep(args.hold) => {}
    }
    held.lock().unwrap().clear();
    println!("closed {open} connections");
    Ok(failed == 0)
}

// ----- calls ----------------------------------------------------------------------------------

/// Messages for each call in flight, by Call-ID.
type Routes = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Message>>>>;

/// The UAC's one connection or socket to the proxy.
enum Leg {
    Tls(mpsc::UnboundedSender<Bytes>),
    Udp(Arc<UdpSocket>, SocketAddr),
}

impl Leg {
    async fn send(&self, message: &str) -> Result<(), String> {
        match self {
            Leg::Tls(writer) => writer
                .send(Bytes::copy_from_slice(message.as_bytes()))
                .map_err(|_| "the TLS connection is gone".to_string()),
            Leg::Udp(socket, proxy) => socket
                .send_to(message.as_bytes(), proxy)
                .await
                .map(drop)
                .map_err(|e| format!("send: {e}")),
        }
    }
}

struct CallCtx {
    leg: Leg,
    routes: Routes,
    local: SocketAddr,
    via_transport: &'static str,
    uas: SocketAddr,
    op_timeout: Duration,
    retransmit: bool,
}

async fn calls(args: &Args) -> Result<bool, String> {
    let server = args.server.expect("checked");
    let uas_addr = args.uas.expect("checked");
    let transport = args.transport.expect("checked");
    let uas = Arc::new(Uas::default());
    let uas_socket = UdpSocket::bind(uas_addr)
        .await
        .map_err(|e| format!("UAS bind {uas_addr}: {e}"))?;
    tokio::spawn(Arc::clone(&uas).serve(uas_socket, uas_addr));

    let routes: Routes = Arc::default();
    let stray = Arc::new(AtomicUsize::new(0));
    let (leg, local, via_transport) = match transport {
        Transport::Tls => {
            let connector = connector(args)?;
            let name = server_name(args)?;
            let tls = tokio::time::timeout(args.op_timeout, connect_tls(&connector, &name, server))
                .await
                .map_err(|_| "TLS connect: timed out".to_string())?
                .map_err(|e| format!("TLS connect {server}: {e}"))?;
            let local = tls.get_ref().0.local_addr().map_err(|e| e.to_string())?;
            let (mut read, mut write) = tokio::io::split(tls);
            let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
            tokio::spawn(async move {
                while let Some(first) = rx.recv().await {
                    // Coalesce what is queued into one write (fewer TLS records).
                    let mut out = BytesMut::from(&first[..]);
                    while let Ok(more) = rx.try_recv() {
                        out.extend_from_slice(&more);
                    }
                    if write.write_all(&out).await.is_err() || write.flush().await.is_err() {
                        return;
                    }
                }
            });
            let (routes, stray) = (Arc::clone(&routes), Arc::clone(&stray));
            tokio::spawn(async move {
                let mut buf = BytesMut::with_capacity(16 * 1024);
                loop {
                    while let Some(frame) = next_frame(&mut buf) {
                        dispatch(frame, &routes, &stray);
                    }
                    match read.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            });
            (Leg::Tls(tx), local, "TLS")
        }
        _ => {
            let socket = Arc::new(
                UdpSocket::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| format!("UAC bind: {e}"))?,
            );
            let local = socket.local_addr().map_err(|e| e.to_string())?;
            let (reader, routes, stray) =
                (Arc::clone(&socket), Arc::clone(&routes), Arc::clone(&stray));
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, _)) = reader.recv_from(&mut buf).await {
                    dispatch(Bytes::copy_from_slice(&buf[..n]), &routes, &stray);
                }
            });
            (Leg::Udp(socket, server), local, "UDP")
        }
    };
    let ctx = Arc::new(CallCtx {
        leg,
        routes,
        local,
        via_transport,
        uas: uas_addr,
        op_timeout: args.op_timeout,
        retransmit: transport == Transport::Udp,
    });
    let failures = Arc::new(Failures::default());
    let tag = std::process::id();
    let started = Instant::now();
    {
        let (ctx, failures) = (Arc::clone(&ctx), Arc::clone(&failures));
        for_each(args.count, args.concurrency, move |i| {
            let (ctx, failures) = (Arc::clone(&ctx), Arc::clone(&failures));
            async move {
                if let Err(e) = one_call(&ctx, &format!("tl{tag}-{i}")).await {
                    failures.add(e);
                }
            }
        })
        .await;
    }
    let wall = started.elapsed().as_secs_f64();
    let failed = failures.report();
    let ok = args.count - failed;
    println!(
        "calls ok: {ok}  failed: {failed}  wall: {wall:.3} s  rate: {:.1} calls/s  \
         (UAC over {via_transport}, concurrency {}; UAS saw INVITE {} ACK {} BYE {}; stray messages {})",
        ok as f64 / wall,
        args.concurrency,
        uas.invites.load(Ordering::Relaxed),
        uas.acks.load(Ordering::Relaxed),
        uas.byes.load(Ordering::Relaxed),
        stray.load(Ordering::Relaxed),
    );
    Ok(failed == 0)
}

fn dispatch(frame: Bytes, routes: &Routes, stray: &AtomicUsize) {
    let Ok(message) = Message::parse(frame) else {
        stray.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let call_id = message
        .call_id()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .unwrap_or_default();
    let sent = routes
        .lock()
        .unwrap()
        .get(&call_id)
        .map(|tx| tx.send(message).is_ok());
    if sent != Some(true) {
        stray.fetch_add(1, Ordering::Relaxed);
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn one_call(ctx: &CallCtx, call_id: &str) -> Result<(), String> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    ctx.routes.lock().unwrap().insert(call_id.to_owned(), tx);
    let result = call_steps(ctx, call_id, &mut rx).await;
    ctx.routes.lock().unwrap().remove(call_id);
    result
}

async fn call_steps(
    ctx: &CallCtx,
    call_id: &str,
    rx: &mut mpsc::UnboundedReceiver<Message>,
) -> Result<(), String> {
    let local = ctx.local;
    let transport = ctx.via_transport;
    let lower = transport.to_ascii_lowercase();
    let from = format!("<sip:uac@{local}>;tag=f{call_id}");
    let to = format!("<sip:uas@{}>", ctx.uas);
    let sdp = "v=0\r\no=uac 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
               m=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
    let invite = format!(
        "INVITE sip:uas@{uas} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {local};branch=z9hG4bK-{call_id}-1;rport\r\n\
         Max-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n\
         Contact: <sip:uac@{local};transport={lower}>\r\nUser-Agent: tls_load\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len(),
        uas = ctx.uas,
    );
    let answer = transaction(ctx, rx, &invite, "INVITE").await?;
    let status = answer.status().unwrap_or(0);
    if !(200..300).contains(&status) {
        return Err(format!("INVITE answered {status}"));
    }
    let to_tagged = text(answer.header(HeaderName::To).ok_or("200 without To")?);
    let target = match answer.contacts().next() {
        Some(Ok(Contact::Addr(addr))) => text(addr.uri.raw()),
        _ => return Err("200 without a Contact".into()),
    };
    // §12.1.2: the route set is the 200's Record-Route in reverse order.
    let mut route_set: Vec<String> = answer
        .values(HeaderName::RecordRoute)
        .filter_map(|v| v.ok().map(text))
        .collect();
    route_set.reverse();
    let routes: String = route_set
        .iter()
        .map(|r| format!("Route: {r}\r\n"))
        .collect();
    let in_dialog = |method: &str, cseq: u32, branch: u32| {
        format!(
            "{method} {target} SIP/2.0\r\n\
             Via: SIP/2.0/{transport} {local};branch=z9hG4bK-{call_id}-{branch};rport\r\n\
             {routes}Max-Forwards: 70\r\nFrom: {from}\r\nTo: {to_tagged}\r\nCall-ID: {call_id}\r\n\
             CSeq: {cseq} {method}\r\nContact: <sip:uac@{local};transport={lower}>\r\n\
             Content-Length: 0\r\n\r\n"
        )
    };
    ctx.leg.send(&in_dialog("ACK", 1, 2)).await?;
    let bye_answer = transaction(ctx, rx, &in_dialog("BYE", 2, 3), "BYE").await?;
    match bye_answer.status() {
        Some(200..=299) => Ok(()),
        other => Err(format!("BYE answered {other:?}")),
    }
}

/// Sends `request` and returns its final response (a 2xx to INVITE again is ignored: only the
/// first counts); over UDP retransmits until a response (INVITE: any; others: a final one).
async fn transaction(
    ctx: &CallCtx,
    rx: &mut mpsc::UnboundedReceiver<Message>,
    request: &str,
    method: &str,
) -> Result<Message, String> {
    let deadline = tokio::time::Instant::now() + ctx.op_timeout;
    let mut interval = T1;
    let mut retransmit = ctx.retransmit;
    let mut next_send = tokio::time::Instant::now() + interval;
    ctx.leg.send(request).await?;
    loop {
        let wake = if retransmit {
            next_send.min(deadline)
        } else {
            deadline
        };
        tokio::select! {
            message = rx.recv() => {
                let message = message.ok_or("call channel closed")?;
                let Some(status) = message.status() else { continue };
                let for_us = message
                    .cseq()
                    .map(|c| c.method.as_str() == method)
                    .unwrap_or(false);
                if !for_us {
                    continue;
                }
                if status >= 200 {
                    return Ok(message);
                }
                if method == "INVITE" {
                    retransmit = false;
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!("{method}: no final response within {} s", ctx.op_timeout.as_secs()));
                }
                ctx.leg.send(request).await?;
                interval = (interval * 2).min(T2);
                next_send = tokio::time::Instant::now() + interval;
            }
        }
    }
}

/// Takes one whole message off the front of `buf` (CRLF keep-alives skipped), or `None` until
/// one has fully arrived. A message without Content-Length counts as bodiless.
fn next_frame(buf: &mut BytesMut) -> Option<Bytes> {
    while buf.starts_with(b"\r\n") {
        buf.advance(2);
    }
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let body_len = header_lines(&buf[..head_end])
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length") || name == "l")
        .and_then(|(_, value)| value.parse::<usize>().ok())
        .unwrap_or(0);
    if buf.len() < head_end + body_len {
        return None;
    }
    Some(buf.split_to(head_end + body_len).freeze())
}

/// (name, value) of each header line of a message head (start line skipped, names trimmed
/// and not case-folded).
fn header_lines(head: &[u8]) -> impl Iterator<Item = (String, String)> + '_ {
    head.split(|&b| b == b'\n').skip(1).filter_map(|line| {
        let line = String::from_utf8_lossy(line);
        let (name, value) = line.split_once(':')?;
        Some((name.trim().to_owned(), value.trim().to_owned()))
    })
}

// ----- the in-process UAS ---------------------------------------------------------------------

#[derive(Default)]
struct Uas {
    invites: AtomicUsize,
    acks: AtomicUsize,
    byes: AtomicUsize,
}

impl Uas {
    async fn serve(self: Arc<Self>, socket: UdpSocket, local: SocketAddr) {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let request = &buf[..n];
            let method = request.split(|&b| b == b' ').next().unwrap_or(b"");
            let replies: Vec<String> = match method {
                b"INVITE" => {
                    self.invites.fetch_add(1, Ordering::Relaxed);
                    vec![
                        respond(request, "180 Ringing", None),
                        respond(request, "200 OK", Some(local)),
                    ]
                }
                b"ACK" => {
                    self.acks.fetch_add(1, Ordering::Relaxed);
                    vec![]
                }
                b"BYE" => {
                    self.byes.fetch_add(1, Ordering::Relaxed);
                    vec![respond(request, "200 OK", None)]
                }
                _ if method.starts_with(b"SIP/") => vec![],
                _ => vec![respond(request, "200 OK", None)],
            };
            for reply in replies {
                let _ = socket.send_to(reply.as_bytes(), peer).await;
            }
        }
    }
}

/// A response to `request`: its Via, From, To (tagged), Call-ID, CSeq and (for a 200 to
/// INVITE, `contact` set) Record-Route, Contact and an SDP answer.
fn respond(request: &[u8], status: &str, contact: Option<SocketAddr>) -> String {
    let head_end = request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(request.len(), |p| p + 4);
    let mut out = format!("SIP/2.0 {status}\r\n");
    let is_invite = request.starts_with(b"INVITE ");
    for (name, value) in header_lines(&request[..head_end]) {
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "via" | "v" | "from" | "f" | "call-id" | "i" | "cseq" => {
                out.push_str(&format!("{name}: {value}\r\n"))
            }
            "record-route" if is_invite => out.push_str(&format!("{name}: {value}\r\n")),
            "to" | "t" if value.contains(";tag=") => out.push_str(&format!("{name}: {value}\r\n")),
            "to" | "t" => out.push_str(&format!("{name}: {value};tag=uas1\r\n")),
            _ => {}
        }
    }
    match contact {
        Some(local) => {
            let sdp = "v=0\r\no=uas 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
                       m=audio 6002 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
            out.push_str(&format!(
                "Contact: <sip:uas@{local}>\r\nContent-Type: application/sdp\r\n\
                 Content-Length: {}\r\n\r\n{sdp}",
                sdp.len()
            ));
        }
        None => out.push_str("Content-Length: 0\r\n\r\n"),
    }
    out
}
