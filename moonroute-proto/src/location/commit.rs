//! Group commit: when a write to a durable store is on disk.
//!
//! The registrar promises that a 200 (OK) to a REGISTER is sent only once the bindings it lists
//! are stored durably (a crash must not lose an acknowledged registration). Flushing per
//! request would cap registrations at the disk's flush rate, so writes are numbered and one
//! flusher thread makes them durable in batches: every write that completed before a flush
//! started is covered by it, and those arriving during a flush share the next one.
//!
//! A writer gets a [`CommitTicket`] (its write's number). The event loop that holds the answer
//! parks it, subscribes its wake signal ([`CommitTicket::subscribe`]), and sends the answer
//! once [`CommitTicket::state`] says durable. Blocking callers (the control socket) use
//! [`CommitTicket::wait`].
//!
//! A store on a remote server (Redis) has no flush: a write is acknowledged when the server
//! answers it. Its tickets come from an [`Acknowledgement`] the store settles when the answer
//! arrives, and the event loop parks the answer on them the same way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::wake::WakeSignal;

/// Where a write stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CommitState {
    /// Written, not yet flushed.
    #[default]
    Pending,
    /// On disk.
    Durable,
    /// The flush covering it failed: the write may be lost.
    Failed(String),
    /// A remote store could not be reached to confirm the write: the client should try again
    /// later (RFC 3261 §21.5.4, 503 with Retry-After), not give up as on a failure.
    Unavailable(String),
}

/// Why a write was not confirmed durable ([`CommitTicket::wait`]). Its text is the store's
/// own, as the shell logs and answers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitError {
    /// The flush covering it failed: the write may be lost ([`CommitState::Failed`]).
    Failed(String),
    /// A remote store could not be reached to confirm it ([`CommitState::Unavailable`]).
    Unavailable(String),
    /// Neither came within the wait.
    TimedOut(&'static str),
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommitError::Failed(reason) | CommitError::Unavailable(reason) => f.write_str(reason),
            CommitError::TimedOut(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for CommitError {}

/// What a store write needs before it may be acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Nothing more: the store is not durable, or nothing was written.
    Done,
    /// Durable once this ticket says so.
    Pending(CommitTicket),
}

impl Commit {
    /// The ticket to wait for, if any.
    pub fn ticket(self) -> Option<CommitTicket> {
        match self {
            Commit::Done => None,
            Commit::Pending(ticket) => Some(ticket),
        }
    }

    /// Blocks until durable (at most `timeout`); for callers that are not event loops.
    pub fn wait(&self, timeout: Duration) -> Result<(), CommitError> {
        match self {
            Commit::Done => Ok(()),
            Commit::Pending(ticket) => ticket.wait(timeout),
        }
    }
}

/// A write that is not acknowledged yet: a numbered write of a [`CommitLog`] (a disk flush),
/// or one [`Acknowledgement`] (a remote store's answer).
#[derive(Clone)]
pub struct CommitTicket {
    inner: Ticket,
}

#[derive(Clone)]
enum Ticket {
    Flush { seq: u64, log: Arc<CommitLog> },
    Answer(Arc<Acknowledgement>),
}

impl std::fmt::Debug for CommitTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Ticket::Flush { seq, .. } => f.debug_struct("CommitTicket").field("seq", seq).finish(),
            Ticket::Answer(_) => f
                .debug_struct("CommitTicket")
                .field("answer", &self.state())
                .finish(),
        }
    }
}

impl PartialEq for CommitTicket {
    fn eq(&self, other: &Self) -> bool {
        match (&self.inner, &other.inner) {
            (Ticket::Flush { seq: a, log: x }, Ticket::Flush { seq: b, log: y }) => {
                a == b && Arc::ptr_eq(x, y)
            }
            (Ticket::Answer(a), Ticket::Answer(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for CommitTicket {}

impl CommitTicket {
    pub fn state(&self) -> CommitState {
        match &self.inner {
            Ticket::Flush { seq, log } => log.state_of(*seq),
            Ticket::Answer(answer) => answer.lock().0.clone(),
        }
    }

    /// Asks for `signal` to be notified when the write may have become durable: after every
    /// flush of the log from now on (once per signal: an event loop subscribes its one signal
    /// the first time it parks an answer), or when the remote store answers.
    pub fn subscribe(&self, signal: &Arc<WakeSignal>) {
        match &self.inner {
            Ticket::Flush { log, .. } => log.subscribe(signal),
            Ticket::Answer(answer) => {
                let mut state = answer.lock();
                if state.0 == CommitState::Pending {
                    state.1.push(Arc::clone(signal));
                } else {
                    signal.wake();
                }
            }
        }
    }

    /// Blocks until the write is durable, its flush failed, or `timeout` passed.
    pub fn wait(&self, timeout: Duration) -> Result<(), CommitError> {
        let deadline = Instant::now() + timeout;
        let (seq, log) = match &self.inner {
            Ticket::Flush { seq, log } => (*seq, log),
            Ticket::Answer(answer) => return answer.wait(deadline),
        };
        wait_until(
            log.lock(),
            &log.flushed,
            deadline,
            "timed out waiting for the disk flush",
            |progress| log.state_locked(seq, progress),
        )
    }
}

/// The acknowledgement of one write to a remote store (Redis): pending until the store answers,
/// then durable or failed. The side that sends the write keeps it and calls
/// [`Acknowledgement::settle`]; the event loop holding the answer parks on its
/// [`Acknowledgement::ticket`] as it does on a disk flush.
#[derive(Default)]
pub struct Acknowledgement {
    state: Mutex<(CommitState, Vec<Arc<WakeSignal>>)>,
    settled: Condvar,
}

impl Acknowledgement {
    pub fn new() -> Arc<Acknowledgement> {
        Arc::new(Acknowledgement::default())
    }

    pub fn ticket(self: &Arc<Self>) -> CommitTicket {
        CommitTicket {
            inner: Ticket::Answer(Arc::clone(self)),
        }
    }

    /// The store answered: `Ok` durable, `Err` failed (its text is what the state keeps).
    /// Wakes whoever parked on it.
    pub fn settle<E: std::fmt::Display>(&self, result: Result<(), E>) {
        self.settle_as(match result {
            Ok(()) => CommitState::Durable,
            Err(error) => CommitState::Failed(error.to_string()),
        });
    }

    /// The store could not be reached to answer: the parked request is asked to retry later.
    pub fn settle_unavailable(&self, error: impl std::fmt::Display) {
        self.settle_as(CommitState::Unavailable(error.to_string()));
    }

    fn settle_as(&self, settled: CommitState) {
        let subscribers = {
            let mut state = self.lock();
            state.0 = settled;
            std::mem::take(&mut state.1)
        };
        self.settled.notify_all();
        for signal in subscribers {
            signal.wake();
        }
    }

    fn lock(&self) -> MutexGuard<'_, (CommitState, Vec<Arc<WakeSignal>>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait(&self, deadline: Instant) -> Result<(), CommitError> {
        wait_until(
            self.lock(),
            &self.settled,
            deadline,
            "timed out waiting for the store's answer",
            |state| state.0.clone(),
        )
    }
}

/// Waits on `condvar` (with `guard` held between checks) until `state` is no longer pending or
/// `deadline` passes.
fn wait_until<T>(
    mut guard: MutexGuard<'_, T>,
    condvar: &Condvar,
    deadline: Instant,
    timed_out: &'static str,
    state: impl Fn(&T) -> CommitState,
) -> Result<(), CommitError> {
    loop {
        match state(&guard) {
            CommitState::Durable => return Ok(()),
            CommitState::Failed(e) => return Err(CommitError::Failed(e)),
            CommitState::Unavailable(e) => return Err(CommitError::Unavailable(e)),
            CommitState::Pending => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CommitError::TimedOut(timed_out));
        }
        guard = condvar
            .wait_timeout(guard, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// What the flusher has done so far.
#[derive(Default)]
struct Progress {
    /// Every write numbered up to this is durable.
    durable: u64,
    /// Writes up to this number were covered by a failed flush, with its error.
    failed: Option<(u64, String)>,
    /// Set when the store closes: the flusher does one last flush and exits.
    closing: bool,
    /// The flusher is waiting on `wanted` (not flushing, not spacing its flushes): only then
    /// does a write need to wake it.
    flusher_idle: bool,
}

/// The numbering of writes and the flusher's progress, shared by the store, its flusher thread
/// and every ticket.
#[derive(Default)]
pub struct CommitLog {
    /// The number of the last completed write.
    written: AtomicU64,
    progress: Mutex<Progress>,
    /// Signalled when a write wants a flush (or the store closes).
    wanted: Condvar,
    /// Signalled after every flush.
    flushed: Condvar,
    subscribers: Mutex<Vec<Arc<WakeSignal>>>,
    flushes: AtomicU64,
}

impl CommitLog {
    pub fn new() -> Arc<CommitLog> {
        Arc::new(CommitLog::default())
    }

    /// Numbers a write that has just completed (call it after the write, so a flush that
    /// starts later covers it) and wakes the flusher.
    pub fn written(self: &Arc<Self>) -> CommitTicket {
        let seq = self.written.fetch_add(1, Ordering::AcqRel) + 1;
        // Under the lock, the flusher is either waiting (idle: wake it) or will check
        // `written` before it waits again (after the flush it is doing or spacing), so the
        // wake-up, a system call, is spent only when one is needed: under load, one per
        // batch instead of one per write.
        if self.lock().flusher_idle {
            self.wanted.notify_one();
        }
        CommitTicket {
            inner: Ticket::Flush {
                seq,
                log: Arc::clone(self),
            },
        }
    }

    /// A ticket for every write completed so far (none when nothing was ever written): what a
    /// reader waits for before acknowledging what it read.
    pub fn barrier(self: &Arc<Self>) -> Option<CommitTicket> {
        let seq = self.written.load(Ordering::Acquire);
        (seq > 0).then(|| CommitTicket {
            inner: Ticket::Flush {
                seq,
                log: Arc::clone(self),
            },
        })
    }

    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state_of(&self, seq: u64) -> CommitState {
        let progress = self.lock();
        self.state_locked(seq, &progress)
    }

    fn state_locked(&self, seq: u64, progress: &Progress) -> CommitState {
        if seq <= progress.durable {
            return CommitState::Durable;
        }
        match &progress.failed {
            Some((through, error)) if seq <= *through => CommitState::Failed(error.clone()),
            _ => CommitState::Pending,
        }
    }

    fn subscribe(&self, signal: &Arc<WakeSignal>) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        if !subscribers.iter().any(|s| Arc::ptr_eq(s, signal)) {
            subscribers.push(Arc::clone(signal));
        }
    }

    /// The flusher's body: waits for unflushed writes, flushes them with `flush` (which must
    /// make every write completed before it was called durable), publishes the result, and
    /// repeats until [`CommitLog::close`]. Writes arriving during a flush share the next one;
    /// flushes start at least `min_interval` apart. A failed flush's error is logged and its
    /// text kept in [`CommitState::Failed`] for the writes it covered.
    pub fn run_flusher<E: std::fmt::Display>(
        &self,
        min_interval: Duration,
        mut flush: impl FnMut() -> Result<(), E>,
    ) {
        let mut last_start = None;
        loop {
            let (target, closing) = {
                let mut progress = self.lock();
                loop {
                    let written = self.written.load(Ordering::Acquire);
                    let covered = progress
                        .durable
                        .max(progress.failed.as_ref().map_or(0, |f| f.0));
                    if written > covered || progress.closing {
                        break (written, progress.closing);
                    }
                    progress.flusher_idle = true;
                    progress = self
                        .wanted
                        .wait(progress)
                        .unwrap_or_else(|p| p.into_inner());
                    progress.flusher_idle = false;
                }
            };
            // Under load, writes keep coming while a flush runs; flushing again at once would
            // cover a handful each. Spacing flush starts by `min_interval` lets a batch grow
            // (a quiet store flushes at once: its last flush is long past).
            if let Some(wait) =
                last_start.and_then(|t: Instant| min_interval.checked_sub(t.elapsed()))
            {
                std::thread::sleep(wait);
            }
            last_start = Some(Instant::now());
            self.flushes.fetch_add(1, Ordering::Relaxed);
            let result = flush();
            {
                let mut progress = self.lock();
                match result {
                    Ok(()) => progress.durable = progress.durable.max(target),
                    Err(error) => {
                        tracing::error!(target: "moonroute::location::commit", %error, "location store: flush to disk failed; the registrations waiting for it get 500");
                        progress.failed = Some((target, error.to_string()));
                    }
                }
            }
            self.flushed.notify_all();
            let subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
            for signal in subscribers.iter() {
                signal.wake();
            }
            if closing {
                return;
            }
        }
    }

    /// Flushes done so far, and writes numbered: their ratio is the average batch.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.flushes.load(Ordering::Relaxed),
            self.written.load(Ordering::Relaxed),
        )
    }

    /// Makes the flusher do a last flush and return.
    pub fn close(&self) {
        self.lock().closing = true;
        self.wanted.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wake::tests::block_on;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn writes_are_durable_after_the_flush_that_follows_them() {
        let log = CommitLog::new();
        let flushes = Arc::new(AtomicUsize::new(0));
        let flusher = {
            let (log, flushes) = (Arc::clone(&log), Arc::clone(&flushes));
            std::thread::spawn(move || {
                log.run_flusher(Duration::ZERO, || {
                    flushes.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), String>(())
                })
            })
        };
        let tickets: Vec<CommitTicket> = (0..100).map(|_| log.written()).collect();
        for t in &tickets {
            t.wait(Duration::from_secs(10)).unwrap();
            assert_eq!(t.state(), CommitState::Durable);
        }
        log.close();
        flusher.join().unwrap();
        let n = flushes.load(Ordering::SeqCst);
        assert!((1..=101).contains(&n), "{n} flushes");
    }

    /// Writes made while a flush runs do not wake the flusher (it is not waiting): it must
    /// still see them when that flush ends and flush again without being asked.
    #[test]
    fn writes_made_during_a_flush_get_the_next_one_unasked() {
        let log = CommitLog::new();
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let flusher = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                log.run_flusher(Duration::ZERO, move || {
                    entered_tx.send(()).ok();
                    release_rx.recv_timeout(Duration::from_secs(10)).ok();
                    Ok::<(), String>(())
                })
            })
        };
        let first = log.written();
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(!log.lock().flusher_idle);
        let during: Vec<CommitTicket> = (0..3).map(|_| log.written()).collect();
        release.send(()).unwrap();
        first.wait(Duration::from_secs(10)).unwrap();
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        release.send(()).unwrap();
        for t in &during {
            t.wait(Duration::from_secs(10)).unwrap();
        }
        log.close();
        release.send(()).ok();
        flusher.join().unwrap();
    }

    #[test]
    fn a_failed_flush_fails_its_writes_and_later_ones_can_succeed() {
        let log = CommitLog::new();
        let first = log.written();
        let mut calls = 0;
        let flusher = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                log.run_flusher(Duration::ZERO, move || {
                    calls += 1;
                    if calls == 1 {
                        Err("disk full".to_owned())
                    } else {
                        Ok(())
                    }
                })
            })
        };
        assert_eq!(
            first.wait(Duration::from_secs(10)).unwrap_err(),
            CommitError::Failed("disk full".to_owned())
        );
        let second = log.written();
        second.wait(Duration::from_secs(10)).unwrap();
        log.close();
        flusher.join().unwrap();
    }

    #[test]
    fn subscribers_are_notified_after_a_flush() {
        let log = CommitLog::new();
        let signal = WakeSignal::new();
        let ticket = log.written();
        ticket.subscribe(&signal);
        ticket.subscribe(&signal);
        assert_eq!(log.subscribers.lock().unwrap().len(), 1);
        let flusher = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || log.run_flusher(Duration::ZERO, || Ok::<(), String>(())))
        };
        block_on(async {
            while ticket.state() != CommitState::Durable {
                signal.woken().await;
            }
        });
        log.close();
        flusher.join().unwrap();
    }

    #[test]
    fn an_acknowledgement_settles_its_tickets_and_wakes_their_loops() {
        let ack = Acknowledgement::new();
        let ticket = ack.ticket();
        assert_eq!(ticket.state(), CommitState::Pending);
        let signal = WakeSignal::new();
        ticket.subscribe(&signal);
        let settler = {
            let ack = Arc::clone(&ack);
            std::thread::spawn(move || ack.settle(Ok::<(), String>(())))
        };
        block_on(signal.woken());
        settler.join().unwrap();
        assert_eq!(ticket.state(), CommitState::Durable);
        ticket.wait(Duration::ZERO).unwrap();

        let failed = Acknowledgement::new();
        failed.settle(Err("changed meanwhile".to_owned()));
        let late = failed.ticket();
        let signal = WakeSignal::new();
        late.subscribe(&signal);
        assert_eq!(
            late.wait(Duration::ZERO).unwrap_err(),
            CommitError::Failed("changed meanwhile".to_owned())
        );
    }

    /// A store lost before it confirmed the write is "try later" (503), not "failed" (500).
    #[test]
    fn an_unreachable_store_settles_as_unavailable_not_failed() {
        let ack = Acknowledgement::new();
        let ticket = ack.ticket();
        ack.settle_unavailable("Redis unreachable: connection refused".to_owned());
        assert_eq!(
            ticket.state(),
            CommitState::Unavailable("Redis unreachable: connection refused".to_owned())
        );
        let unavailable = ticket.wait(Duration::ZERO).unwrap_err();
        assert_eq!(
            unavailable,
            CommitError::Unavailable("Redis unreachable: connection refused".to_owned())
        );
        assert_eq!(
            unavailable.to_string(),
            "Redis unreachable: connection refused"
        );
    }
}
