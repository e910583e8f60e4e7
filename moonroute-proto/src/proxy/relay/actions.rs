//! What the relay asks of the layers around it: its only output. Every [`Relay`](super::Relay)
//! entry point pushes [`RelayAction`]s into the [`RelayActions`] it is given; the event loop's
//! core carries them out, in order, against its transaction layer (RFC 3261 §17) and its
//! shell, and reports a client transaction it started back with
//! [`Relay::on_client_started`](super::Relay::on_client_started). The relay itself holds no
//! transaction layer, so it can be driven alone with explicit `now`s.

use std::borrow::Cow;
use std::collections::VecDeque;

use bytes::Bytes;

use super::Attempt;
use crate::dialog::Bye;
use crate::dns::target as dns;
use crate::location::CommitTicket;
use crate::sip::Message;
use crate::transaction::layer::TxId;
use crate::transport::{Destination, Meta};

/// One thing the relay asks for.
#[derive(Debug)]
pub enum RelayAction {
    /// Send `response` upstream through server transaction `tx` (§16.7 step 10, §17.2).
    ServerRespond {
        tx: TxId,
        status: u16,
        response: Bytes,
    },
    /// Answer the request of server transaction `tx` here (§8.2.6, §16.3: a refusal or the
    /// router's own answer); the core builds the response from `request`, the request as the
    /// answer has to mirror it.
    Reply {
        tx: TxId,
        request: Message,
        meta: Meta,
        reply: Reply,
    },
    /// Send the responses of server transaction `tx` to `dest` (the router changed its top
    /// Via, e.g. `force_rport`: §18.2.2 reads the edited one).
    SetResponseDestination { tx: TxId, dest: Destination },
    /// Forget server transaction `tx`: its request was forwarded statelessly (§16.11) or
    /// dropped, so no response will go through it.
    AbandonServer { tx: TxId },
    /// The relay keeps `bytes` for server transaction `tx` (its call): charge them to the
    /// transaction's share of the memory budget.
    ChargeServer { tx: TxId, bytes: usize },
    /// Start a client transaction for `request` towards `dest` (§16.6 step 10, §17.1); its
    /// outcome goes back to [`Relay::on_client_started`](super::Relay::on_client_started)
    /// with `purpose`, before the next action.
    StartClient {
        request: Message,
        dest: Destination,
        purpose: ClientPurpose,
    },
    /// Cancel client transaction `client` (an INVITE branch): a CANCEL built from its request
    /// (§9.1) in a transaction of its own, to `dest`, where the INVITE went.
    CancelClient { client: TxId, dest: Destination },
    /// Client transaction `client` cannot reach its next hop (§17.1.4): its transport error
    /// comes back as the client's event.
    FailClient { client: TxId },
    /// Send `data` to `dest` with no transaction (§16.11: a stateless forward, an ACK for a
    /// 2xx).
    SendStateless { dest: Destination, data: Bytes },
    /// Resolve `query` (RFC 3263) and answer with [`Relay::on_resolved`](super::Relay::on_resolved)
    /// and this `id`.
    Resolve { id: u64, query: dns::Query },
}

/// An answer the relay wants sent to a request it will not relay.
#[derive(Debug)]
pub struct Reply {
    pub code: u16,
    pub reason: Cow<'static, str>,
    /// The option tags the 420 lists (§20.40).
    pub unsupported: Option<String>,
    pub headers: Vec<(String, String)>,
    /// Send it only once this write is on disk.
    pub wait_for: Option<CommitTicket>,
}

impl Reply {
    pub(super) fn new(code: u16, reason: &'static str) -> Reply {
        Reply {
            code,
            reason: Cow::Borrowed(reason),
            unsupported: None,
            headers: Vec::new(),
            wait_for: None,
        }
    }
}

/// Why the relay started a client transaction: what its outcome goes to.
#[derive(Debug)]
pub enum ClientPurpose {
    /// An attempt of a branch of a relayed call.
    Branch(Attempt),
    /// A BYE the proxy sends to end a call (`crate::dialog`); `end` is the control request it
    /// answers, if any.
    Bye { bye: Box<Bye>, end: Option<u64> },
}

/// The relay's outputs, in the order they are to be carried out. The core keeps one and
/// reuses it: cleared, not reallocated, per message.
#[derive(Debug, Default)]
pub struct RelayActions(VecDeque<RelayAction>);

impl RelayActions {
    pub fn push(&mut self, action: RelayAction) {
        self.0.push_back(action);
    }

    /// The next action to carry out.
    pub fn pop(&mut self) -> Option<RelayAction> {
        self.0.pop_front()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &RelayAction> {
        self.0.iter()
    }
}
