//! Starting and stopping the event loops (the model is explained in [`crate::server`]).
//!
//! Owns binding every listen address once per loop (SO_REUSEPORT), the loop threads and their
//! single-threaded runtimes, and shutdown. Sockets are bound on the calling thread before any
//! loop starts, so [`Server::start`] reports a bad or busy address directly, and returns the
//! addresses actually bound (port 0 becomes the port the kernel chose).

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::thread;

use tokio::sync::watch;
use tokio::task::LocalSet;
use tracing::error;

use crate::config::Config;
use crate::transport::dispatch::{LoopContext, LoopDns, Shared, UdpEndpoint};
use crate::transport::metrics::ShellMetrics;
use crate::transport::registry::ConnectionRegistry;
use crate::transport::tls::TlsContext;
use crate::transport::ws::WsSettings;
use crate::transport::{
    load, tcp, udp, Input, ListenAddr, TransportKind, TransportLimits, WorkerFactory,
};

/// Starts servers. See [`Server::start`].
pub struct Server;

/// A running server: its bound addresses, and the way to stop it. Dropping the handle also
/// stops the server.
pub struct ServerHandle {
    listen_addrs: Vec<ListenAddr>,
    registry: Arc<ConnectionRegistry>,
    shutdown: watch::Sender<bool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Server {
    /// Binds every address of `config.listen` once per event loop and starts the loops,
    /// each with a Worker from `factory`. Returns once every loop is running. Fails with a
    /// message naming the problem for an address that cannot be listened on and for TLS
    /// files (`[tls]`) that cannot be used.
    pub fn start(config: &Config, factory: Arc<dyn WorkerFactory>) -> io::Result<ServerHandle> {
        let workers = config.worker_count();
        let limits = TransportLimits::from(&config.limits);
        let listens_tls = config.listen.iter().any(|l| l.kind.is_secure());
        let websocket = Arc::new(WsSettings::new(&config.websocket));
        let tls = Arc::new(TlsContext::new(&config.tls, listens_tls)?);
        let (listen_addrs, per_loop) = bind_all(&config.listen, workers)?;
        let registry = Arc::new(ConnectionRegistry::new(limits.connections));
        if let Some(flows) = factory.flows() {
            flows.attach(&registry);
        }
        let metrics = Arc::new(factory.metrics().unwrap_or_else(ShellMetrics::detached));
        let open = Arc::downgrade(&registry);
        metrics.connections_open(move |kind| open.upgrade().map_or(0, |r| r.count_of(kind)));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = mpsc::channel();
        let (hand_over, mut hand_over_queues) = hand_over_channels(workers);
        let mut handle = ServerHandle {
            listen_addrs,
            registry: Arc::clone(&registry),
            shutdown,
            threads: Vec::with_capacity(workers),
        };
        for (index, sockets) in per_loop.into_iter().enumerate() {
            let setup = LoopSetup {
                index,
                sockets,
                factory: Arc::clone(&factory),
                registry: Arc::clone(&registry),
                limits,
                tls: Arc::clone(&tls),
                websocket: Arc::clone(&websocket),
                shutdown: shutdown_rx.clone(),
                ready: ready_tx.clone(),
                hand_over: Arc::clone(&hand_over),
                hand_over_queue: hand_over_queues.remove(0),
                bound: handle.listen_addrs.clone(),
                loops: workers,
                dns: config.dns.clone(),
                metrics: Arc::clone(&metrics),
            };
            let thread = thread::Builder::new()
                .name(format!("moonroute-loop-{index}"))
                .spawn(move || run_loop(setup))?;
            handle.threads.push(thread);
        }
        // Only the loops hold senders now: if one dies before reporting, recv fails.
        drop(ready_tx);
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(error),
                Err(_) => return Err(io::Error::other("an event loop failed to start")),
            }
        }
        Ok(handle)
    }
}

impl ServerHandle {
    /// The addresses listened on, as bound (port 0 replaced by the chosen port), in the order
    /// of the configuration.
    pub fn listen_addrs(&self) -> &[ListenAddr] {
        &self.listen_addrs
    }

    /// The first bound address of transport `kind`.
    pub fn local_addr(&self, kind: TransportKind) -> Option<SocketAddr> {
        self.listen_addrs
            .iter()
            .find(|listen| listen.kind == kind)
            .map(|listen| listen.addr)
    }

    /// The number of event loops.
    pub fn worker_count(&self) -> usize {
        self.threads.len()
    }

    /// Open stream connections, inbound and outbound.
    pub fn connection_count(&self) -> usize {
        self.registry.len()
    }

    /// Stops every loop (closing sockets and connections) and waits for their threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shutdown.send_replace(true);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                error!("an event loop thread panicked");
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The sockets one loop gets: one of each listen address, with the address it was bound to.
#[derive(Default)]
struct LoopSockets {
    udp: Vec<(SocketAddr, std::net::UdpSocket)>,
    /// TCP, TLS and WebSocket listeners (all over TCP), with their transport.
    streams: Vec<(TransportKind, SocketAddr, std::net::TcpListener)>,
}

/// Binds every listen address `workers` times. Returns the bound addresses and each loop's
/// sockets.
fn bind_all(
    listen: &[ListenAddr],
    workers: usize,
) -> io::Result<(Vec<ListenAddr>, Vec<LoopSockets>)> {
    check_listen_addrs(listen)?;
    let mut per_loop: Vec<LoopSockets> = (0..workers).map(|_| LoopSockets::default()).collect();
    let mut bound_addrs = Vec::with_capacity(listen.len());
    for listen in listen {
        let bound = match listen.kind {
            TransportKind::Udp => {
                let (bound, sockets) =
                    udp::bind_group(listen.addr, workers).map_err(|e| bind_error(listen, e))?;
                for (sockets_of_loop, socket) in per_loop.iter_mut().zip(sockets) {
                    sockets_of_loop.udp.push((bound, socket));
                }
                bound
            }
            TransportKind::Tcp | TransportKind::Tls | TransportKind::Ws | TransportKind::Wss => {
                let (bound, listeners) =
                    tcp::bind_group(listen.addr, workers).map_err(|e| bind_error(listen, e))?;
                for (sockets_of_loop, listener) in per_loop.iter_mut().zip(listeners) {
                    sockets_of_loop.streams.push((listen.kind, bound, listener));
                }
                bound
            }
        };
        bound_addrs.push(ListenAddr {
            addr: bound,
            ..listen.clone()
        });
    }
    Ok((bound_addrs, per_loop))
}

/// Refuses what binding with SO_REUSEPORT would not: no addresses, duplicates (both would
/// bind and split the traffic; `tcp:` and `tls:` on one address too, both being TCP), and a
/// fixed port another program already holds. Probes
/// every address before binding any, so our own overlapping listeners cannot trip it.
fn check_listen_addrs(listen: &[ListenAddr]) -> io::Result<()> {
    if listen.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no listen address configured",
        ));
    }
    for (index, addr) in listen.iter().enumerate() {
        if addr.addr.port() != 0 && listen[..index].iter().any(|l| l.same_socket(addr)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is listed twice", addr.socket()),
            ));
        }
        let shares_tcp_port = |other: &ListenAddr| {
            other.addr == addr.addr && other.kind.is_stream() && other.kind != addr.kind
        };
        if addr.addr.port() != 0
            && addr.kind.is_stream()
            && listen[..index].iter().any(shares_tcp_port)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: and {}: cannot both listen on {} (both are TCP)",
                    listen[..index]
                        .iter()
                        .find(|l| shares_tcp_port(l))
                        .map_or("tcp", |l| l.kind.scheme()),
                    addr.kind.scheme(),
                    addr.addr
                ),
            ));
        }
    }
    for addr in listen.iter().filter(|addr| addr.addr.port() != 0) {
        let probe = match addr.kind {
            TransportKind::Udp => udp::ensure_not_in_use(addr.addr),
            _ => tcp::ensure_not_in_use(addr.addr),
        };
        probe.map_err(|e| bind_error(addr, e))?;
    }
    Ok(())
}

fn bind_error(listen: &ListenAddr, error: io::Error) -> io::Error {
    let socket = listen.socket();
    io::Error::new(error.kind(), format!("cannot listen on {socket}: {error}"))
}

/// Everything a loop thread needs.
struct LoopSetup {
    index: usize,
    sockets: LoopSockets,
    factory: Arc<dyn WorkerFactory>,
    registry: Arc<ConnectionRegistry>,
    limits: TransportLimits,
    tls: Arc<TlsContext>,
    websocket: Arc<WsSettings>,
    shutdown: watch::Receiver<bool>,
    ready: mpsc::Sender<io::Result<()>>,
    hand_over: Arc<[tokio::sync::mpsc::Sender<Input>]>,
    hand_over_queue: tokio::sync::mpsc::Receiver<Input>,
    bound: Vec<ListenAddr>,
    loops: usize,
    dns: crate::config::Dns,
    metrics: Arc<ShellMetrics>,
}

/// Inputs one loop may hold for another before hand-overs are dropped: bounds memory when a
/// loop falls behind.
const HAND_OVER_QUEUE: usize = 4096;

fn hand_over_channels(
    workers: usize,
) -> (
    Arc<[tokio::sync::mpsc::Sender<Input>]>,
    Vec<tokio::sync::mpsc::Receiver<Input>>,
) {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..workers)
        .map(|_| tokio::sync::mpsc::channel(HAND_OVER_QUEUE))
        .unzip();
    (senders.into(), receivers)
}

/// The body of a loop thread: a single-threaded runtime running this loop's tasks until
/// shutdown. The runtime tells `transport::load` when the loop goes idle and wakes.
fn run_loop(setup: LoopSetup) {
    load::on_unpark();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(load::on_park)
        .on_thread_unpark(load::on_unpark)
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = setup.ready.send(Err(error));
            return;
        }
    };
    let tasks = LocalSet::new();
    tasks.block_on(&runtime, serve_until_shutdown(setup));
    // Dropping the tasks closes their sockets and unregisters their connections, which
    // needs the runtime's context.
    let _context = runtime.enter();
    drop(tasks);
}

async fn serve_until_shutdown(setup: LoopSetup) {
    let LoopSetup {
        index,
        sockets,
        factory,
        registry,
        limits,
        tls,
        websocket,
        mut shutdown,
        ready,
        hand_over,
        hand_over_queue,
        bound,
        loops,
        dns,
        metrics,
    } = setup;
    let worker = factory.make_bound_worker(index, loops, &bound);
    let mut supported: Vec<TransportKind> = Vec::new();
    // Nothing resolves to a WebSocket transport: its clients are reached on their own
    // connections only (RFC 7118 §5).
    for listen in bound.iter().filter(|l| !l.kind.is_websocket()) {
        if !supported.contains(&listen.kind) {
            supported.push(listen.kind);
        }
    }
    let dns = LoopDns::new(dns, supported, metrics.dns.clone());
    let shared = Shared {
        registry,
        limits,
        tls,
        websocket,
        hand_over,
        metrics,
    };
    let started = start_transports(index, sockets, worker, shared, hand_over_queue, dns);
    let running = started.is_ok();
    // The receiver is gone only if start already failed elsewhere; we stop below anyway.
    let _ = ready.send(started);
    drop(ready);
    if running {
        // An error means the handle is gone, which also means stop.
        let _ = shutdown.wait_for(|stop| *stop).await;
    }
}

/// Makes this loop's Worker and spawns a receive task per UDP socket and an accept task per
/// TCP or TLS listener.
fn start_transports(
    index: usize,
    sockets: LoopSockets,
    worker: Box<dyn crate::transport::Worker>,
    shared: Shared,
    hand_over_queue: tokio::sync::mpsc::Receiver<Input>,
    dns: LoopDns,
) -> io::Result<()> {
    let udp = sockets
        .udp
        .into_iter()
        .map(|(local, socket)| {
            let socket = tokio::net::UdpSocket::from_std(socket)?;
            Ok(Rc::new(UdpEndpoint { local, socket }))
        })
        .collect::<io::Result<Vec<_>>>()?;
    let streams = sockets
        .streams
        .into_iter()
        .map(|(kind, local, listener)| {
            Ok((kind, local, tokio::net::TcpListener::from_std(listener)?))
        })
        .collect::<io::Result<Vec<_>>>()?;
    let ctx = Rc::new(LoopContext::new(index, worker, udp.clone(), shared, dns));
    for endpoint in udp {
        tokio::task::spawn_local(udp::run_receiver(Rc::clone(&ctx), endpoint));
    }
    for (kind, local, listener) in streams {
        tokio::task::spawn_local(tcp::run_acceptor(Rc::clone(&ctx), listener, local, kind));
    }
    tokio::task::spawn_local(Rc::clone(&ctx).run_hand_overs(hand_over_queue));
    tokio::task::spawn_local(Rc::clone(&ctx).run_hand_over_sender());
    if let Some(signal) = ctx.wake_signal() {
        tokio::task::spawn_local(Rc::clone(&ctx).run_wakes(signal));
    }
    tokio::task::spawn_local(Rc::clone(&ctx).run_load_sampler());
    tokio::task::spawn_local(ctx.run_timers());
    Ok(())
}
