//! The transaction layer's counters (RFC 3261 §17): transactions created and timed out by
//! kind, retransmissions, 503 refusals by limit, and the live count and memory charge shared
//! by every event loop. Plain atomics: the shell only reads them for its exposition.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use crate::metrics::{counter_family, Counter, Registry};

/// The four transaction machines of RFC 3261 §17, as the `kind` label names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionKind {
    InviteServer,
    NonInviteServer,
    InviteClient,
    NonInviteClient,
}

impl TransactionKind {
    const ALL: [TransactionKind; 4] = [
        TransactionKind::InviteServer,
        TransactionKind::NonInviteServer,
        TransactionKind::InviteClient,
        TransactionKind::NonInviteClient,
    ];

    fn label(self) -> &'static str {
        match self {
            TransactionKind::InviteServer => "invite_server",
            TransactionKind::NonInviteServer => "non_invite_server",
            TransactionKind::InviteClient => "invite_client",
            TransactionKind::NonInviteClient => "non_invite_client",
        }
    }
}

/// Why a new request was refused with 503 (RFC 3261 §21.5.4): the configuration key of the
/// limit that was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverloadReason {
    /// `limits.transaction_memory_mb`.
    TransactionMemory,
    /// `limits.max_transactions` (deprecated).
    MaxTransactions,
    /// `limits.max_backlog`.
    MaxBacklog,
    /// `limits.overload_after_ms`: an event loop saturated (see `server::overload`).
    Saturated,
}

impl OverloadReason {
    const ALL: [OverloadReason; 4] = [
        OverloadReason::TransactionMemory,
        OverloadReason::MaxTransactions,
        OverloadReason::MaxBacklog,
        OverloadReason::Saturated,
    ];

    fn label(self) -> &'static str {
        match self {
            OverloadReason::TransactionMemory => "transaction_memory_mb",
            OverloadReason::MaxTransactions => "max_transactions",
            OverloadReason::MaxBacklog => "max_backlog",
            OverloadReason::Saturated => "overload_after_ms",
        }
    }
}

/// The counters of the transaction layer (RFC 3261 §17), one set per server.
#[derive(Clone, Debug, Default)]
pub struct TransactionMetrics {
    created: [Counter; 4],
    timed_out: [Counter; 4],
    /// Retransmitted requests absorbed by a live server transaction (§17.2.1, §17.2.2).
    pub retransmissions_received: Counter,
    /// Requests and responses a transaction sent again (Timers A, E, G; a response repeated
    /// for a retransmitted request).
    pub retransmissions_sent: Counter,
    /// Live transactions of every loop (each layer adds what it creates and subtracts what
    /// it frees).
    live: Arc<AtomicI64>,
    /// Bytes the live transactions of every loop are charged against
    /// `limits.transaction_memory_mb` (see `transaction::layer`).
    memory: Arc<AtomicI64>,
    overload: [Counter; 4],
}

impl TransactionMetrics {
    pub fn created(&self, kind: TransactionKind) {
        self.created[kind as usize].inc();
        self.live.fetch_add(1, Ordering::Relaxed);
    }

    /// `count` transactions of this layer were freed.
    pub fn ended(&self, count: usize) {
        self.live
            .fetch_sub(i64::try_from(count).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// A transaction's charge changed from `before` to `now` bytes.
    pub fn charge_memory(&self, before: usize, now: usize) {
        let delta = i64::try_from(now).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(0);
        self.memory.fetch_add(delta, Ordering::Relaxed);
    }

    /// Transactions charged `bytes` in all were freed.
    pub fn release_memory(&self, bytes: usize) {
        self.charge_memory(bytes, 0);
    }

    /// Bytes charged to the live transactions of every loop.
    pub fn memory_bytes(&self) -> u64 {
        u64::try_from(self.memory.load(Ordering::Relaxed)).unwrap_or(0)
    }

    pub fn timed_out(&self, kind: TransactionKind) {
        self.timed_out[kind as usize].inc();
    }

    pub fn overloaded(&self, reason: OverloadReason) {
        self.overload[reason as usize].inc();
    }

    /// Live transactions over all loops of the server.
    pub fn live(&self) -> u64 {
        u64::try_from(self.live.load(Ordering::Relaxed)).unwrap_or(0)
    }

    pub fn created_count(&self, kind: TransactionKind) -> u64 {
        self.created[kind as usize].get()
    }

    pub fn timed_out_count(&self, kind: TransactionKind) -> u64 {
        self.timed_out[kind as usize].get()
    }

    pub fn overload_count(&self, reason: OverloadReason) -> u64 {
        self.overload[reason as usize].get()
    }

    /// The layer's counters, registered as the server's `moonroute_transactions_*`,
    /// `moonroute_retransmissions_total` and `moonroute_overload_rejections_total`.
    pub fn register(registry: &Registry) -> TransactionMetrics {
        let created = counter_family(
            registry,
            "moonroute_transactions_created_total",
            "SIP transactions started (RFC 3261 section 17), by kind.",
            "kind",
        );
        let timed_out = counter_family(
            registry,
            "moonroute_transactions_timed_out_total",
            "Transactions that timed out: client transactions without a final response (Timer B/F), INVITE server transactions without the ACK of their error response (Timer H).",
            "kind",
        );
        let retransmissions = counter_family(
            registry,
            "moonroute_retransmissions_total",
            "Retransmissions: requests received again by a live server transaction, and requests or responses a transaction sent again.",
            "direction",
        );
        let overload = counter_family(
            registry,
            "moonroute_overload_rejections_total",
            "New requests refused with 503 and Retry-After because a limit was reached, by limit (the limits.* key).",
            "reason",
        );
        let metrics = TransactionMetrics {
            created: TransactionKind::ALL.map(|kind| created.with(&[kind.label()])),
            timed_out: TransactionKind::ALL.map(|kind| timed_out.with(&[kind.label()])),
            retransmissions_received: retransmissions.with(&["received"]),
            retransmissions_sent: retransmissions.with(&["sent"]),
            live: Arc::default(),
            memory: Arc::default(),
            overload: OverloadReason::ALL.map(|reason| overload.with(&[reason.label()])),
        };
        let live = Arc::clone(&metrics.live);
        registry.gauge_fn(
            "moonroute_transactions_live",
            "Live SIP transactions, client and server, over all event loops.",
            move || live.load(Ordering::Relaxed).max(0) as f64,
        );
        let memory = Arc::clone(&metrics.memory);
        registry.gauge_fn(
            "moonroute_transactions_memory_bytes",
            "Bytes held by the live transactions of all event loops, as charged against limits.transaction_memory_mb (new requests get 503 beyond it).",
            move || memory.load(Ordering::Relaxed).max(0) as f64,
        );
        metrics
    }
}
