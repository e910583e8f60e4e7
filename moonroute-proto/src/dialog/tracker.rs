//! The relay's side of dialog tracking: reads the messages the proxy relays (RFC 3261 §16)
//! into [`DialogTable`] events, and hands ended calls to the CDR sink. The relay calls it at
//! four points: a response going upstream, a CANCEL, an in-dialog request relayed, its timer.
//! It also ends calls itself (max duration, `ctl dlg end`): the relay sends the BYEs it returns
//! through client transactions and reports their outcome back ([`DialogTracker::bye_sent`],
//! [`DialogTracker::on_bye_response`]) for the log.
//!
//! The table is shared, on one event loop, with that loop's router (the script creates dialogs
//! with `req:dlg_manage()`): hence `Rc<RefCell<..>>`. No borrow is held across a call into the
//! router, so the two never meet.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tracing::{info, warn};

use super::directory::EndError;
use super::{Bye, Cdr, CdrWriter, DialogId, DialogTable, Expired, Side, Stamp, State};
use crate::id_map::IdMap;
use crate::sip::{Contact, HeaderName, Message, Method};
use crate::transaction::layer::TxId;
use crate::transport::Destination;

/// One event loop's dialog table, shared by its relay and its router.
pub type SharedTable = Rc<RefCell<DialogTable>>;

pub struct DialogTracker {
    table: SharedTable,
    sink: Option<Arc<dyn CdrWriter>>,
    /// The proxy's BYEs waiting for their final response: Call-ID and party, for the log.
    /// One entry per BYE for at most its transaction's life (Timer F, 32 s).
    byes: IdMap<TxId, (Bytes, Side)>,
}

fn stamp(now: Instant) -> Stamp {
    Stamp::at(now)
}

impl DialogTracker {
    pub fn new(table: SharedTable, sink: Option<Arc<dyn CdrWriter>>) -> DialogTracker {
        DialogTracker {
            table,
            sink,
            byes: IdMap::default(),
        }
    }

    pub fn table(&self) -> &SharedTable {
        &self.table
    }

    /// A response to the relayed `request` goes upstream: for a managed INVITE, its dialog
    /// becomes early (1xx with a To tag), confirmed (2xx) or ends (a failure, or the 487
    /// after a CANCEL).
    pub fn on_upstream_response(&self, request: &Message, response: &Message, now: Instant) {
        self.refresh_from_response(request, response);
        if request.method() != Some(&Method::Invite) {
            return;
        }
        let cdr = {
            let mut table = self.table.borrow_mut();
            let Some(id) = initial_key(request).and_then(|(c, f)| table.find(c, f)) else {
                return;
            };
            let status = response.status().unwrap_or(0);
            if (200..300).contains(&status) {
                table.set_caller_contact(id, first_contact(request));
            }
            let to_tag = response.to().ok().and_then(|to| to.tag());
            let contact = first_contact(response);
            let record_route = response
                .values(HeaderName::RecordRoute)
                .filter_map(Result::ok)
                .map(Bytes::copy_from_slice)
                .collect();
            table.on_invite_response(
                id,
                status,
                to_tag,
                contact.clone(),
                record_route,
                contact,
                stamp(now),
            )
        };
        self.defer(cdr);
    }

    /// The 2xx to an in-dialog target refresh carries the answerer's new target.
    fn refresh_from_response(&self, request: &Message, response: &Message) {
        if !is_target_refresh(request)
            || !response.status().is_some_and(|s| (200..300).contains(&s))
        {
            return;
        }
        let Some((call_id, from_tag, to_tag)) = super::tags(request) else {
            return;
        };
        let mut table = self.table.borrow_mut();
        if table.is_empty() {
            return;
        }
        if let Some(contact) = first_contact(response) {
            table.refresh_target(call_id, from_tag, to_tag, false, contact);
        }
    }

    /// Whether the dialog of initial INVITE `invite` is tracked (its Record-Route signature
    /// says so, `proxy::route_sign`).
    pub fn tracks(&self, invite: &Message) -> bool {
        let table = self.table.borrow();
        !table.is_empty() && initial_key(invite).is_some_and(|(c, f)| table.find(c, f).is_some())
    }

    /// A CANCEL matched the relayed `invite` (§16.10).
    pub fn on_cancel(&self, invite: &Message) {
        let mut table = self.table.borrow_mut();
        if let Some(id) = initial_key(invite).and_then(|(c, f)| table.find(c, f)) {
            table.on_cancel(id);
        }
    }

    /// An in-dialog request is relayed: a BYE ends its call.
    pub fn on_relayed_request(&self, request: &Message, now: Instant) {
        let Some((call_id, from_tag, to_tag)) = super::tags(request) else {
            return;
        };
        let cdr = {
            let mut table = self.table.borrow_mut();
            if table.is_empty() {
                return;
            }
            if is_target_refresh(request) {
                if let Some(contact) = first_contact(request) {
                    table.refresh_target(call_id, from_tag, to_tag, true, contact);
                }
            }
            let is_bye = request.method() == Some(&Method::Bye);
            let cseq = request.cseq().map_or(0, |c| c.seq);
            table.on_request(call_id, from_tag, to_tag, is_bye, cseq, stamp(now))
        };
        self.defer(cdr);
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.table.borrow_mut().next_deadline()
    }

    /// Runs the table's deadlines; returns the BYEs of calls cut by their max duration.
    pub fn on_timer(&self, now: Instant) -> Vec<Bye> {
        let expired = self.table.borrow_mut().on_timer(stamp(now));
        expired
            .into_iter()
            .flat_map(|e| self.ended_here(e))
            .collect()
    }

    /// Ends confirmed call `id` from outside (`ctl dlg end`): returns its BYEs, or why not.
    /// An early call is left alone (Kamailio's `dlg.end_dlg` too): a CANCEL is the caller's to
    /// send, and its INVITE ends by itself.
    pub fn end(&self, id: DialogId, now: Instant) -> Result<Vec<Bye>, EndError> {
        let state = self.table.borrow().get(id).map(|d| d.state);
        match state {
            None | Some(State::Terminated) => Err(EndError::NoSuchCall),
            Some(State::Early) => Err(EndError::NotAnswered),
            Some(State::Confirmed) => {
                let ended = self.table.borrow_mut().end(id, stamp(now));
                Ok(ended.map(|e| self.ended_here(e)).unwrap_or_default())
            }
        }
    }

    /// `ctl dlg end` requests for this loop (see `directory`).
    pub fn take_end_requests(&self) -> Vec<super::directory::EndRequest> {
        self.table.borrow().take_end_requests()
    }

    /// A call this proxy ended: logged, its CDR queued, its BYEs returned for the relay.
    fn ended_here(&self, ended: Expired) -> Vec<Bye> {
        if !ended.byes.is_empty() {
            info!(target: "moonroute::dialog::tracker", call_id = %ended.cdr.call_id, reason = ended.cdr.reason.as_str(), "dialog ended by the proxy: BYE to both parties");
        }
        self.defer(Some(ended.cdr));
        ended.byes
    }

    /// A 2xx to the managed `invite` came back through a branch sent to `hop`: a BYE to the
    /// callee will go there.
    pub fn on_answer_hop(&self, invite: &Message, hop: &Destination) {
        let mut table = self.table.borrow_mut();
        if table.is_empty() || invite.method() != Some(&Method::Invite) {
            return;
        }
        if let Some(id) = initial_key(invite).and_then(|(c, f)| table.find(c, f)) {
            table.set_callee_hop(id, hop.clone());
        }
    }

    /// The relay sent `bye` in client transaction `tx`.
    pub fn bye_sent(&mut self, tx: TxId, bye: &Bye) {
        self.byes.insert(tx, (bye.call_id.clone(), bye.to_side));
    }

    /// A response (or `None`: a timeout or transport error) to one of the proxy's BYEs.
    /// Returns false when `tx` is not one of them.
    pub fn on_bye_response(&mut self, tx: TxId, status: Option<u16>) -> bool {
        if status.is_some_and(|s| s < 200) {
            return self.byes.contains_key(&tx);
        }
        let Some((call_id, side)) = self.byes.remove(&tx) else {
            return false;
        };
        crate::memory::shrink_if_sparse(&mut self.byes);
        let call_id = String::from_utf8_lossy(&call_id);
        match status {
            Some(status) => {
                info!(target: "moonroute::dialog::tracker", call_id = %call_id, party = side.as_str(), status, "the proxy's BYE was answered")
            }
            None => {
                warn!(target: "moonroute::dialog::tracker", call_id = %call_id, party = side.as_str(), "the proxy's BYE got no answer (timeout or transport error)")
            }
        }
        true
    }

    /// Transaction `tx` ended (its BYE's answer may never have come).
    pub fn on_terminated(&mut self, tx: TxId) {
        if self.byes.remove(&tx).is_some() {
            crate::memory::shrink_if_sparse(&mut self.byes);
        }
    }

    /// The records of the calls ended since the last call, by the relay's events or by the
    /// router's decisions (see [`DialogTable::defer`]): the relay gives each to the router's
    /// `on_dialog_end`, then to [`DialogTracker::write`]. Empty (and no allocation) when none.
    pub fn take_ended(&self) -> Vec<Cdr> {
        self.table.borrow_mut().take_deferred()
    }

    /// Appends `cdr` to the CDR file (when `[dialog] cdr` is on).
    pub fn write(&self, cdr: &Cdr) {
        if let Some(sink) = &self.sink {
            sink.write(cdr);
        }
    }

    fn defer(&self, cdr: Option<Cdr>) {
        if let Some(cdr) = cdr {
            self.table.borrow_mut().defer(cdr);
        }
    }
}

/// Whether `request` may change its sender's target (§12.2.1.2: re-INVITE; RFC 3311 UPDATE).
fn is_target_refresh(request: &Message) -> bool {
    matches!(request.method(), Some(Method::Invite | Method::Update))
}

/// Call-ID and From tag of an initial request (no To tag): its dialog's key.
fn initial_key(request: &Message) -> Option<(&[u8], &[u8])> {
    if request.is_in_dialog() {
        return None;
    }
    Some((request.call_id().ok()?, request.from_tag()?))
}

/// A copy of the first Contact URI (not shared with the packet: see [`super::new_dialog`]).
fn first_contact(message: &Message) -> Option<Bytes> {
    match message.contacts().next()? {
        Ok(Contact::Addr(addr)) => Some(Bytes::copy_from_slice(addr.uri.raw())),
        Ok(Contact::Star) => None,
        Err(e) => {
            warn!(target: "moonroute::dialog::tracker", error = %e, "unreadable Contact in a dialog's message");
            None
        }
    }
}
