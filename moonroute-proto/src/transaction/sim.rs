//! A deterministic simulated-time driver shared by the state-machine tests: applies a
//! machine's actions, keeps its pending timers, and moves a fake clock to the earliest deadline
//! to fire it. Nothing sleeps, and timers are never removed except by firing.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::client_invite::InviteClient;
use super::client_non_invite::NonInviteClient;
use super::server_invite::InviteServer;
use super::server_non_invite::NonInviteServer;
use super::{Action, Event, Timer};
use crate::sip::Message;

/// The inputs every transaction machine shares; the rest are fed through [`Sim::step`].
pub(crate) trait Machine {
    fn on_timer(&mut self, timer: Timer, now: Instant, out: &mut Vec<Action>);
    fn on_transport_error(&mut self, out: &mut Vec<Action>);
}

macro_rules! machine {
    ($($ty:ty),*) => {$(
        impl Machine for $ty {
            fn on_timer(&mut self, timer: Timer, now: Instant, out: &mut Vec<Action>) {
                <$ty>::on_timer(self, timer, now, out)
            }

            fn on_transport_error(&mut self, out: &mut Vec<Action>) {
                <$ty>::on_transport_error(self, out)
            }
        }
    )*};
}

machine!(InviteClient, NonInviteClient, InviteServer, NonInviteServer);

pub(crate) struct Sim<M> {
    pub start: Instant,
    pub now: Instant,
    /// Pending timers in the order they were started (ties fire in that order).
    pub pending: Vec<(Instant, Timer)>,
    /// Every timer ever started, with its deadline as time since start.
    pub started: Vec<(Duration, Timer)>,
    /// Every Send, with its time since start.
    pub sends: Vec<(Duration, Bytes)>,
    pub events: Vec<Event>,
    pub terminations: usize,
    pub tx: M,
}

impl<M: Machine> Sim<M> {
    /// Starts the clock, builds the machine with `init` at that instant and applies what it
    /// asked for.
    pub fn start_with(init: impl FnOnce(Instant, &mut Vec<Action>) -> M) -> Self {
        let start = Instant::now();
        let mut out = Vec::new();
        let tx = init(start, &mut out);
        let mut sim = Sim {
            start,
            now: start,
            pending: Vec::new(),
            started: Vec::new(),
            sends: Vec::new(),
            events: Vec::new(),
            terminations: 0,
            tx,
        };
        sim.apply(out);
        sim
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    pub fn apply(&mut self, out: Vec<Action>) {
        for action in out {
            match action {
                Action::Send(bytes) => self.sends.push((self.elapsed(), bytes)),
                Action::StartTimer { timer, at } => {
                    assert!(at >= self.now, "{timer:?} started in the past");
                    self.started.push((at - self.start, timer));
                    self.pending.push((at, timer));
                }
                Action::Deliver(event) => self.events.push(event),
                Action::Terminated => self.terminations += 1,
            }
        }
    }

    /// Feeds one input at the current time and applies its actions.
    pub fn step(&mut self, input: impl FnOnce(&mut M, Instant, &mut Vec<Action>)) {
        let mut out = Vec::new();
        input(&mut self.tx, self.now, &mut out);
        self.apply(out);
    }

    pub fn transport_error(&mut self) {
        self.step(|tx, _, out| tx.on_transport_error(out));
    }

    /// Fires `timer` now, whether or not it is pending.
    pub fn fire(&mut self, timer: Timer) {
        self.step(|tx, now, out| tx.on_timer(timer, now, out));
    }

    /// Fires the earliest pending timer (ties in the order they were started); None when none
    /// is left.
    pub fn fire_next(&mut self) -> Option<Timer> {
        let index = (0..self.pending.len()).min_by_key(|&i| (self.pending[i].0, i))?;
        let (at, timer) = self.pending.remove(index);
        self.now = at;
        self.fire(timer);
        Some(timer)
    }

    /// Fires every timer due up to `offset` after start, then sets the clock there.
    pub fn advance_to(&mut self, offset: Duration) {
        let until = self.start + offset;
        while self.pending.iter().any(|&(at, _)| at <= until) {
            self.fire_next();
        }
        self.now = until;
    }

    /// Fires every pending timer, stale ones included, until none is left.
    pub fn run_all(&mut self) {
        for _ in 0..10_000 {
            if self.fire_next().is_none() {
                return;
            }
        }
        panic!("timers never stop");
    }

    /// The deadlines (since start) of the pending `timer`s.
    pub fn pending(&self, timer: Timer) -> Vec<Duration> {
        self.pending
            .iter()
            .filter(|&&(_, t)| t == timer)
            .map(|&(at, _)| at - self.start)
            .collect()
    }

    pub fn started_count(&self, timer: Timer) -> usize {
        self.started.iter().filter(|(_, t)| *t == timer).count()
    }

    pub fn send_times(&self) -> Vec<Duration> {
        self.sends.iter().map(|(t, _)| *t).collect()
    }

    /// The status codes of the sends, which must all be responses.
    pub fn statuses(&self) -> Vec<u16> {
        self.sends
            .iter()
            .map(|(_, bytes)| status_of(bytes))
            .collect()
    }

    pub fn send_times_of(&self, status: u16) -> Vec<Duration> {
        let sent = self.sends.iter().filter(|(_, b)| status_of(b) == status);
        sent.map(|(at, _)| *at).collect()
    }

    pub fn delivered_statuses(&self) -> Vec<u16> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Response(r) => r.status(),
                _ => None,
            })
            .collect()
    }

    pub fn timeouts(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Timeout))
            .count()
    }

    pub fn ack_timeouts(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::AckTimeout))
            .count()
    }
}

fn status_of(bytes: &Bytes) -> u16 {
    Message::parse(bytes.clone())
        .expect("sent response parses")
        .status()
        .expect("sent message is a response")
}
