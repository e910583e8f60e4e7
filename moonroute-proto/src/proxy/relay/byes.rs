//! The BYEs the proxy sends itself to end a call it tracks (`crate::dialog`: `ctl dlg end`,
//! a dialog's timeout; RFC 3261 §15.1.1 from the middle), and the answer to the control client
//! once they are sent.

use std::net::SocketAddr;
use std::time::Instant;

use tracing::{info, warn};

use super::{ClientPurpose, Relay, RelayAction, RelayActions};
use crate::dialog::directory::{EndAnswer, Ended};
use crate::dialog::Bye;
use crate::proxy::via_branch;
use crate::sip::Message;
use crate::transaction::layer::{SendError, TxId};

/// A `ctl dlg end` request waiting for its BYEs to be started.
pub(super) struct PendingEnd {
    pub(super) id: u64,
    pub(super) reply: std::sync::mpsc::Sender<EndAnswer>,
    /// The parties a BYE went to.
    pub(super) sent: Vec<&'static str>,
    /// BYEs not started yet.
    pub(super) waiting: usize,
}

impl Relay {
    /// Carries out the `ctl dlg end` requests waiting for this loop (the shell's wake-up):
    /// each confirmed call is ended with BYEs, and the control client told what was done
    /// once they are sent ([`Relay::on_client_started`]).
    pub fn on_wake(&mut self, now: Instant, out: &mut RelayActions) {
        let Some(dialogs) = &self.dialogs else {
            return;
        };
        for request in dialogs.take_end_requests() {
            let Some(dialogs) = &self.dialogs else {
                return;
            };
            match dialogs.end(request.id, now) {
                Ok(byes) => {
                    self.next_end += 1;
                    let end = self.next_end;
                    let waiting = self.send_byes(byes, Some(end), out);
                    self.ends.push(PendingEnd {
                        id: end,
                        reply: request.reply,
                        sent: Vec::new(),
                        waiting,
                    });
                    self.answer_end_if_done(end);
                }
                // The client may have given up waiting: nothing to tell then.
                Err(why) => drop(request.reply.send(Err(why))),
            }
        }
        self.dialogs_after_router();
    }

    /// Asks for the proxy's BYEs (`crate::dialog::bye`) to be sent through client
    /// transactions: to the party's recorded address, from our listener of that transport and
    /// family, along the route set on its side of us. Returns how many were asked for.
    pub(super) fn send_byes(
        &mut self,
        byes: Vec<crate::dialog::Bye>,
        end: Option<u64>,
        out: &mut RelayActions,
    ) -> usize {
        let mut asked = 0;
        for bye in byes {
            let call_id = String::from_utf8_lossy(&bye.call_id).into_owned();
            let party = bye.to_side.as_str();
            let Some(mut dest) = bye.destination.clone() else {
                warn!(target: "moonroute::proxy::relay::byes",
                    call_id,
                    party, "BYE not sent: no address known for the party"
                );
                continue;
            };
            let Some(local) = self
                .bound
                .iter()
                .find(|l| l.kind == dest.kind && l.addr.is_ipv4() == dest.addr.is_ipv4())
                .map(|l| l.addr)
            else {
                warn!(target: "moonroute::proxy::relay::byes", call_id, party, transport = %dest.kind, "BYE not sent: no listener for the party's transport");
                continue;
            };
            dest.local = Some(local);
            self.next_unique += 1;
            let base = via_branch::random_base(std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                (&bye.call_id, party),
            ));
            let via = format!(
                "SIP/2.0/{} {};branch={}",
                dest.kind.via_name(),
                self.me.local().sent_by(dest.kind, Some(local), dest.addr),
                via_branch::attempt(&base, self.loop_index, self.next_unique)
            );
            let me = &self.me;
            let routes = bye.routes(|value| {
                crate::sip::NameAddr::parse(value).is_ok_and(|na| me.is_myself(&na.uri))
            });
            let Some(message) = bye
                .render(&via, &routes)
                .and_then(|b| Message::parse(b).ok())
            else {
                warn!(target: "moonroute::proxy::relay::byes",
                    call_id,
                    party, "BYE not sent: no target URI known for the party"
                );
                continue;
            };
            out.push(RelayAction::StartClient {
                request: message,
                dest,
                purpose: ClientPurpose::Bye {
                    bye: Box::new(bye),
                    end,
                },
            });
            asked += 1;
        }
        asked
    }

    /// The outcome of one of the proxy's BYEs ([`Relay::send_byes`]).
    pub(super) fn bye_started(
        &mut self,
        bye: Box<Bye>,
        end: Option<u64>,
        addr: SocketAddr,
        started: Result<TxId, SendError>,
    ) {
        let call_id = String::from_utf8_lossy(&bye.call_id).into_owned();
        let party = bye.to_side.as_str();
        let sent = match started {
            Ok(tx) => {
                info!(target: "moonroute::proxy::relay::byes", call_id, party, %addr, "BYE sent");
                if let Some(dialogs) = &mut self.dialogs {
                    dialogs.bye_sent(tx, &bye);
                }
                true
            }
            Err(error) => {
                warn!(target: "moonroute::proxy::relay::byes", call_id, party, ?error, "BYE not sent");
                false
            }
        };
        let Some(end) = end else {
            return;
        };
        if let Some(pending) = self.ends.iter_mut().find(|p| p.id == end) {
            pending.waiting = pending.waiting.saturating_sub(1);
            if sent {
                pending.sent.push(party);
            }
        }
        self.answer_end_if_done(end);
    }

    /// Tells the control client of end request `end` which BYEs went, once all were tried.
    fn answer_end_if_done(&mut self, end: u64) {
        let Some(index) = self.ends.iter().position(|p| p.id == end && p.waiting == 0) else {
            return;
        };
        let done = self.ends.swap_remove(index);
        // The client may have given up waiting: nothing to tell then.
        let _ = done.reply.send(Ok(Ended { parties: done.sent }));
    }
}
