//! Dialog tracking (RFC 3261 §12), call limits and accounting: what Kamailio's `dialog` and
//! `acc` modules do.
//!
//! - `table`: one event loop's dialogs, sans-IO (events with an explicit [`Stamp`] in, ended
//!   calls and deadlines out): states early / confirmed / terminated, the parties' targets,
//!   CSeqs and route set, per-dialog variables, max duration and lifetime timers, a memory
//!   cap, and the in-dialog check behind `req:dlg_known()`.
//! - `profiles`: counts of live dialogs per (profile, value), shared by every loop, for
//!   concurrent-call limits per user, trunk or tenant.
//! - `cdr`: the record of an ended dialog, as a JSON line, and where it is written.
//! - `directory`: the summaries of every loop's calls, for `moonroute ctl dlg`.
//! - `metrics`: calls by state, created, ended by reason, refused, profile sizes.
//! - `bye`: the BYEs the proxy sends to end a call (max duration, `ctl dlg end`).
//! - `tracker`: what the relay calls: relayed messages in, CDRs and BYEs out.
//!
//! The messages themselves are read by [`new_dialog`] and [`tags`], so the table needs no
//! codec.

pub mod bye;
pub mod cdr;
pub mod directory;
pub mod metrics;
pub mod profiles;
pub mod table;
pub mod tracker;

#[cfg(test)]
pub(crate) mod tests;

pub use cdr::{Cdr, CdrWriter, EndReason};
pub use directory::{Directory, Summary};
pub use metrics::DialogMetrics;
pub use profiles::{Membership, Profiles};
pub use table::{
    Bye, Dialog, DialogId, DialogTable, Expired, Known, Limits, NewDialog, Refusal, Side, Stamp,
    State,
};
pub use tracker::{DialogTracker, SharedTable};

use bytes::Bytes;

use crate::sip::name_addr::Contact;
use crate::sip::Message;
use crate::transport::Meta;

/// The caller's side of the dialog an initial INVITE would create (what
/// [`DialogTable::manage`] takes). Its fields are copies: a slice shared with the received
/// packet would keep the whole packet for the dialog's life, unaccounted. `None` for a request without From tag (§8.1.1.3), with a
/// To tag (not initial, §12.1), or with unreadable From/To/Call-ID/CSeq.
pub fn new_dialog(invite: &Message, meta: &Meta) -> Option<NewDialog> {
    let from = invite.from().ok()?;
    let to = invite.to().ok()?;
    if to.tag().is_some() {
        return None;
    }
    let from_tag = from.tag().filter(|t| !t.is_empty())?;
    let contact = invite
        .contacts()
        .next()
        .and_then(Result::ok)
        .and_then(|c| match c {
            Contact::Addr(addr) => Some(Bytes::copy_from_slice(addr.uri.raw())),
            Contact::Star => None,
        });
    Some(NewDialog {
        call_id: Bytes::copy_from_slice(invite.call_id().ok()?),
        from_uri: Bytes::copy_from_slice(from.uri.raw()),
        from_tag: Bytes::copy_from_slice(from_tag),
        to_uri: Bytes::copy_from_slice(to.uri.raw()),
        caller_contact: contact,
        caller_cseq: invite.cseq().ok()?.seq,
        source: meta.source,
        transport: meta.kind,
        conn: meta.conn,
        request_uri: Bytes::copy_from_slice(invite.request_uri_bytes()?),
    })
}

/// Call-ID, From tag and To tag of an in-dialog message (`None` without all three).
pub fn tags(message: &Message) -> Option<(&[u8], &[u8], &[u8])> {
    let from = message.from().ok()?.tag()?;
    let to = message.to().ok()?.tag()?;
    Some((message.call_id().ok()?, from, to))
}
