//! One event loop's glue between its sockets and its [`Worker`].
//!
//! Owns the loop-local state every transport task of the loop shares: the Worker, the loop's
//! UDP sockets and the limits. Every input received on the loop goes through
//! [`LoopContext::handle`] (or [`LoopContext::process`] then [`LoopContext::flush_udp`]): the
//! Worker turns it into outputs, which are carried out in order (RFC 3261 §18.1 for requests,
//! §18.2.2 for responses). UDP datagrams wait in the loop's outbox until the input has been
//! handled, and then leave in one system call per socket (`udp_batch`).
//!
//! Everything here lives on one thread (`Rc`, `RefCell`): the loop never shares its Worker, so
//! the hot path takes no lock. Only stream connections are reachable from other loops, through
//! the [`ConnectionRegistry`].

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, error, warn};

use super::metrics::{response_code, ShellMetrics};
use super::registry::ConnectionRegistry;
use super::timer_grid::TimerGrid;
use super::tls::TlsContext;
use super::udp_batch::{Flush, Outbox};
use super::ws::WsSettings;
use super::{
    load, tcp, tls, ws, Destination, Input, Output, TransportKind, TransportLimits, Worker,
};
use crate::dns::metrics::DnsMetrics;
use crate::dns::{DnsConfig, Query, ResolveError, Resolver};
use crate::wake::WakeSignal;

/// A UDP socket of this loop and the listen address it was bound to.
pub(crate) struct UdpEndpoint {
    pub(crate) local: SocketAddr,
    pub(crate) socket: UdpSocket,
}

/// Hand-overs a loop holds before sending them without waiting for its task to yield: bounds
/// the delay a long burst adds to the first of them (and what is held), while one wake-up of
/// the owning loop still serves many.
const HAND_OVER_BATCH: usize = 32;

/// What a hand-over waiting for a loop counts as in its backlog (see
/// [`LoopContext::run_load_sampler`]): about what a SIP datagram takes in a socket's queue.
const HAND_OVER_BYTES: u64 = 2048;

/// The state shared by the transport tasks of one event loop. See the module docs.
pub(crate) struct LoopContext {
    index: usize,
    worker: RefCell<Box<dyn Worker>>,
    /// The deadline the timer task sleeps for, so inputs only wake it when it must run sooner.
    armed_deadline: Cell<Option<Instant>>,
    /// Where the Worker's deadlines are rounded to, so timers due close together share a wake-up.
    timer_grid: TimerGrid,
    timer_changed: Notify,
    udp: Vec<Rc<UdpEndpoint>>,
    /// Datagrams to send from `udp`, waiting for [`LoopContext::flush_udp`].
    udp_outbox: RefCell<Outbox>,
    /// The UDP sockets as the kernel lists them, for their queues' load samples.
    udp_ids: Vec<load::UdpSocketId>,
    registry: Arc<ConnectionRegistry>,
    limits: TransportLimits,
    /// The server's TLS configurations, shared by every loop.
    tls: Arc<TlsContext>,
    /// TLS handshakes of accepted connections in progress on this loop.
    tls_handshakes: Cell<usize>,
    /// What `ws:` and `wss:` listeners accept, shared by every loop.
    websocket: Arc<WsSettings>,
    /// Every loop's hand-over queue, this one's included, by loop index.
    hand_over: Arc<[mpsc::Sender<Input>]>,
    /// Hand-overs decided while the current task runs, sent when it yields (see
    /// [`LoopContext::hand_over`]), and the signal that wakes the task sending them.
    hand_overs_waiting: RefCell<Vec<(usize, Input)>>,
    hand_overs_queued: Notify,
    dns: LoopDns,
    /// The server's metric handles (messages, responses sent, connections).
    metrics: Arc<ShellMetrics>,
}

/// This loop's DNS resolver (RFC 3263), made on first use so a server that never resolves a
/// name never reads the system's resolver configuration.
pub(crate) struct LoopDns {
    config: DnsConfig,
    /// The transports this server has listeners for: the only ones worth resolving to.
    supported: Vec<TransportKind>,
    resolver: std::cell::OnceCell<Result<Resolver, ResolveError>>,
    metrics: DnsMetrics,
}

impl LoopDns {
    pub(crate) fn new(
        config: DnsConfig,
        supported: Vec<TransportKind>,
        metrics: DnsMetrics,
    ) -> LoopDns {
        LoopDns {
            config,
            supported,
            resolver: std::cell::OnceCell::new(),
            metrics,
        }
    }

    fn resolver(&self) -> Result<Resolver, ResolveError> {
        self.resolver
            .get_or_init(|| {
                let made = Resolver::from_config(&self.config)
                    .map(|resolver| resolver.with_metrics(self.metrics.clone()));
                if let Err(error) = &made {
                    error!(%error, "cannot set up DNS resolution; host names cannot be reached");
                }
                made
            })
            .clone()
    }
}

/// What every event loop of a server shares.
pub(crate) struct Shared {
    pub(crate) registry: Arc<ConnectionRegistry>,
    pub(crate) limits: TransportLimits,
    pub(crate) tls: Arc<TlsContext>,
    pub(crate) websocket: Arc<WsSettings>,
    /// Every loop's hand-over queue, by loop index.
    pub(crate) hand_over: Arc<[mpsc::Sender<Input>]>,
    pub(crate) metrics: Arc<ShellMetrics>,
}

impl LoopContext {
    pub(crate) fn new(
        index: usize,
        worker: Box<dyn Worker>,
        udp: Vec<Rc<UdpEndpoint>>,
        shared: Shared,
        dns: LoopDns,
    ) -> Self {
        let Shared {
            registry,
            limits,
            tls,
            websocket,
            hand_over,
            metrics,
        } = shared;
        LoopContext {
            index,
            worker: RefCell::new(worker),
            armed_deadline: Cell::new(None),
            timer_grid: TimerGrid::new(Instant::now()),
            timer_changed: Notify::new(),
            udp_ids: udp
                .iter()
                .filter_map(|e| load::UdpSocketId::of(&e.socket, e.local.is_ipv6()))
                .collect(),
            udp,
            udp_outbox: RefCell::new(Outbox::default()),
            registry,
            limits,
            tls,
            tls_handshakes: Cell::new(0),
            websocket,
            hand_over,
            hand_overs_waiting: RefCell::new(Vec::new()),
            hand_overs_queued: Notify::new(),
            dns,
            metrics,
        }
    }

    /// This event loop's index.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// The connections of every loop, by id and by peer (RFC 3261 §18.2.2: a response goes
    /// back on its request's connection).
    pub(crate) fn registry(&self) -> &Arc<ConnectionRegistry> {
        &self.registry
    }

    pub(crate) fn limits(&self) -> &TransportLimits {
        &self.limits
    }

    pub(crate) fn tls(&self) -> &TlsContext {
        &self.tls
    }

    pub(crate) fn websocket(&self) -> &Arc<WsSettings> {
        &self.websocket
    }

    pub(crate) fn metrics(&self) -> &ShellMetrics {
        &self.metrics
    }

    /// Takes one of this loop's TLS handshake slots (`tls.max_handshakes`); `false` when all
    /// are busy. Give it back with [`LoopContext::end_handshake`].
    pub(crate) fn begin_handshake(&self) -> bool {
        let busy = self.tls_handshakes.get();
        if busy >= self.tls.max_handshakes() {
            return false;
        }
        self.tls_handshakes.set(busy + 1);
        true
    }

    pub(crate) fn end_handshake(&self) {
        self.tls_handshakes
            .set(self.tls_handshakes.get().saturating_sub(1));
    }

    /// Passes `input` to loop `worker`. Not at once: waking another loop's thread costs a
    /// system call and a context switch, so what a burst of received messages hands over goes
    /// in one go when the task that received them yields (its socket is drained, or its tokio
    /// budget spent), or once [`HAND_OVER_BATCH`] are waiting. The owning loop is woken once
    /// per batch (at most), not once per message. Order is kept.
    fn hand_over(&self, worker: usize, input: Input) {
        let waiting = {
            let mut waiting = self.hand_overs_waiting.borrow_mut();
            waiting.push((worker, input));
            waiting.len()
        };
        if waiting == 1 {
            self.hand_overs_queued.notify_one();
        } else if waiting >= HAND_OVER_BATCH {
            self.send_hand_overs();
        }
    }

    /// This loop's task sending the waiting hand-overs: runs when the task that queued them
    /// yields.
    pub(crate) async fn run_hand_over_sender(self: Rc<Self>) {
        loop {
            self.hand_overs_queued.notified().await;
            self.send_hand_overs();
        }
    }

    /// Puts the waiting hand-overs on their loops' queues; a full queue drops the input (UDP
    /// retransmissions recover it) with one log line.
    fn send_hand_overs(&self) {
        let mut batch = std::mem::take(&mut *self.hand_overs_waiting.borrow_mut());
        for (worker, input) in batch.drain(..) {
            let Some(queue) = self.hand_over.get(worker) else {
                warn!(
                    from = self.index,
                    to = worker,
                    "dropping hand-over to an event loop that does not exist"
                );
                continue;
            };
            match queue.try_send(input) {
                Ok(()) => self.metrics.transport.handed_over(),
                Err(error) => {
                    self.metrics.transport.hand_over_dropped();
                    warn!(target: crate::logging::REFUSED, from = self.index, to = worker, reason = %format_args!("hand-over to the event loop owning its transaction failed ({error})"), "message dropped");
                }
            }
        }
        // Keep the allocation for the next batch (nothing is queued while sending).
        let mut waiting = self.hand_overs_waiting.borrow_mut();
        if waiting.is_empty() {
            *waiting = batch;
        }
    }

    /// Feeds the Worker an [`Input::Wake`] each time its wake signal is notified.
    pub(crate) async fn run_wakes(self: Rc<Self>, signal: Arc<WakeSignal>) {
        loop {
            signal.woken().await;
            self.handle(Input::Wake).await;
        }
    }

    pub(crate) fn wake_signal(&self) -> Option<Arc<WakeSignal>> {
        self.worker.borrow().wake_signal()
    }

    /// Receives what other loops hand over and runs it through this loop's Worker. Handling
    /// them is work of this loop like its own socket's: the loop is idle only once this queue
    /// is drained too, so a loop falling behind the work handed to it is overloaded (see
    /// `server::overload`).
    pub(crate) async fn run_hand_overs(self: Rc<Self>, mut queue: mpsc::Receiver<Input>) {
        loop {
            let input = match queue.try_recv() {
                Ok(input) => {
                    // Like a UDP socket with datagrams waiting: let the loop's other tasks run.
                    tokio::task::coop::consume_budget().await;
                    input
                }
                Err(mpsc::error::TryRecvError::Empty) => match queue.recv().await {
                    Some(input) => input,
                    None => return,
                },
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            };
            self.handle(input).await;
        }
    }

    /// Gives the Worker the loop's load counters every [`load::SAMPLE_INTERVAL`] (see
    /// [`Worker::on_load`]). A saturated loop still runs it on time: tokio checks its timers
    /// between tasks.
    pub(crate) async fn run_load_sampler(self: Rc<Self>) {
        let mut ticks = tokio::time::interval(load::SAMPLE_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let mut sample = load::sample(Instant::now(), &self.udp_ids);
            if let (Some(queued), Some(own)) = (&mut sample.queued, self.hand_over.get(self.index))
            {
                // Hand-overs waiting for this loop are backlog too: counted at about what a
                // datagram holds in the kernel's accounting.
                let waiting = own.max_capacity() - own.capacity();
                *queued += waiting as u64 * HAND_OVER_BYTES;
            }
            self.worker.borrow_mut().on_load(sample);
        }
    }

    /// Runs `input` through the Worker and carries out the outputs, in order.
    pub(crate) async fn handle(self: &Rc<Self>, input: Input) {
        self.process(input);
        self.flush_udp().await;
    }

    /// Runs `input` through the Worker and carries out the outputs, in order, except that UDP
    /// datagrams wait in the outbox for [`LoopContext::flush_udp`].
    pub(crate) fn process(self: &Rc<Self>, input: Input) {
        let outputs =
            self.run_worker(|worker, outputs| worker.on_input(input, Instant::now(), outputs));
        self.rearm_timer_if_earlier();
        if let Some(outputs) = outputs {
            self.execute(outputs);
        }
    }

    /// Calls the Worker. The borrow ends before any await, so tasks of this loop never contend
    /// for it. A panicking Worker must not take down the task that feeds it (say, a UDP
    /// receive loop): its input and outputs are dropped and the loop goes on.
    fn run_worker(
        &self,
        call: impl FnOnce(&mut dyn Worker, &mut Vec<Output>),
    ) -> Option<Vec<Output>> {
        let mut outputs = Vec::new();
        let worked = panic::catch_unwind(AssertUnwindSafe(|| {
            call(&mut **self.worker.borrow_mut(), &mut outputs)
        }));
        if worked.is_err() {
            error!(
                worker = self.index,
                "the Worker panicked; dropping its input and outputs"
            );
            return None;
        }
        Some(outputs)
    }

    /// Wakes the timer task when the Worker now needs it sooner than it is sleeping for.
    fn rearm_timer_if_earlier(&self) {
        let wanted = self.next_wake();
        let armed = self.armed_deadline.get();
        if let Some(wanted) = wanted {
            if armed.is_none_or(|armed| wanted < armed) {
                self.armed_deadline.set(Some(wanted));
                self.timer_changed.notify_one();
            }
        }
    }

    /// When the timer task must wake for the Worker: its next deadline on the loop's grid.
    fn next_wake(&self) -> Option<Instant> {
        let deadline = self.worker.borrow().next_deadline()?;
        Some(self.timer_grid.wake_at(deadline))
    }

    /// This loop's timer task: sleeps until the Worker's next deadline, runs its timers, and
    /// starts over; wakes early when an input brings the deadline forward.
    pub(crate) async fn run_timers(self: Rc<Self>) {
        loop {
            let deadline = self.next_wake();
            self.armed_deadline.set(deadline);
            let Some(at) = deadline else {
                self.timer_changed.notified().await;
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep_until(at.into()) => {
                    let outputs = self.run_worker(|worker, outputs| worker.on_timer(Instant::now(), outputs));
                    if let Some(outputs) = outputs {
                        self.execute(outputs);
                        self.flush_udp().await;
                    }
                }
                () = self.timer_changed.notified() => {}
            }
        }
    }

    fn execute(self: &Rc<Self>, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { dest, data } => self.send(dest, data),
                Output::HandOver { worker, input } => self.hand_over(worker, input),
                Output::Close(id) => match self.registry.get(id) {
                    Some(connection) => connection.close(),
                    None => debug!(conn = %id, "close requested for a connection already closed"),
                },
                Output::Resolve { id, query } => self.resolve(id, query),
            }
        }
    }

    fn send(self: &Rc<Self>, dest: Destination, data: Bytes) {
        self.metrics.transport.message_out(dest.kind);
        if let Some(code) = response_code(&data) {
            self.metrics.responses_sent.inc(code);
        }
        match dest.kind {
            TransportKind::Udp => self.queue_udp(&dest, data),
            TransportKind::Tcp => tcp::send(self, dest, data),
            TransportKind::Tls => tls::send(self, dest, data),
            TransportKind::Ws | TransportKind::Wss => ws::send(self, dest, data),
        }
    }

    /// Locates `query` in a task of this loop, and hands the answer to the Worker.
    fn resolve(self: &Rc<Self>, id: u64, query: Query) {
        let ctx = Rc::clone(self);
        tokio::task::spawn_local(async move {
            let result = match ctx.dns.resolver() {
                Ok(resolver) => resolver.locate(&query, &ctx.dns.supported).await,
                Err(error) => Err(error),
            };
            if let Err(error) = &result {
                debug!(host = %query.host, %error, "next hop not resolved");
            }
            ctx.handle(Input::Resolved { id, result }).await;
        });
    }

    /// Tells this loop's Worker that `addr` could not be reached. Delivered from a task of its
    /// own, since it may be discovered while the Worker's outputs are being carried out.
    pub(crate) fn report_unreachable(self: &Rc<Self>, kind: TransportKind, addr: SocketAddr) {
        let ctx = Rc::clone(self);
        tokio::task::spawn_local(
            async move { ctx.handle(Input::Unreachable { kind, addr }).await },
        );
    }

    /// Queues a datagram for the socket bound to `dest.local` if this loop has one, else for
    /// the first UDP socket of the destination's address family; reports the destination
    /// unreachable when there is none.
    fn queue_udp(self: &Rc<Self>, dest: &Destination, data: Bytes) {
        let Some(socket) = self.udp_endpoint_for(dest) else {
            warn!(
                dest = %dest.addr,
                "dropping outgoing UDP message: no UDP listener of that address family"
            );
            self.report_unreachable(TransportKind::Udp, dest.addr);
            return;
        };
        self.udp_outbox.borrow_mut().push(socket, dest.addr, data);
    }

    /// Sends the datagrams waiting in the outbox, in order (see `udp_batch`); waits while a
    /// socket's send buffer is full. A datagram the kernel refuses is dropped with a log line
    /// and its destination reported unreachable to the Worker.
    pub(crate) async fn flush_udp(self: &Rc<Self>) {
        if self.udp_outbox.borrow().is_empty() {
            return;
        }
        loop {
            let flush = self.udp_outbox.borrow_mut().send_queued(
                |index| self.udp.get(index).map(|endpoint| &endpoint.socket),
                |count| self.metrics.transport.udp_sent_batch(count),
                |dest, error| {
                    warn!(%dest, %error, "UDP send failed");
                    self.report_unreachable(TransportKind::Udp, dest);
                },
            );
            let Flush::Blocked(index) = flush else { return };
            let Some(endpoint) = self.udp.get(index) else {
                return;
            };
            if let Err(error) = endpoint.socket.writable().await {
                warn!(local = %endpoint.local, %error, "UDP socket not writable");
                return;
            }
        }
    }

    /// The index in `udp` of the socket to send `dest` from.
    fn udp_endpoint_for(&self, dest: &Destination) -> Option<usize> {
        let by_local = dest
            .local
            .and_then(|local| self.udp.iter().position(|endpoint| endpoint.local == local));
        let by_family = || {
            self.udp
                .iter()
                .position(|endpoint| endpoint.local.is_ipv4() == dest.addr.is_ipv4())
        };
        by_local.or_else(by_family)
    }
}
