//! Answers held until the registrar write they report is durable (RFC 3261 §10.3: a 200 to a
//! REGISTER lists the bindings the registrar now holds, so it is sent only once they would
//! survive a crash). A write that fails, times out or loses its remote store turns the answer
//! into a 500 or a 503 with Retry-After.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::warn;

use super::Core;
use crate::location::{CommitState, CommitTicket};
use crate::logging::Lossy;
use crate::registrar::UNREACHABLE_RETRY_AFTER;
use crate::sip::Message;
use crate::transaction::layer::{LayerOutput, TxId};

impl Core {
    /// Sends the parked answers whose writes are on disk; those whose flush failed or timed
    /// out get 500 instead (the bindings may not survive a crash, so no 200 may promise it).
    pub(super) fn release_parked(&mut self, now: Instant, next: &mut Vec<LayerOutput>) {
        let mut index = 0;
        while index < self.parked.len() {
            // Failed (or not on disk in time): 500, the bindings may be lost. Unavailable: the
            // remote store went away before it confirmed; 503 asks the phone to come back.
            let failure = match self.parked[index].ticket.state() {
                CommitState::Durable => None,
                CommitState::Failed(error) => Some((500, error)),
                CommitState::Unavailable(error) => Some((503, error)),
                CommitState::Pending if now >= self.parked[index].deadline => {
                    Some((500, "disk flush timed out".to_owned()))
                }
                CommitState::Pending => {
                    index += 1;
                    continue;
                }
            };
            let Some(parked) = self.parked.remove(index) else {
                break;
            };
            let Some((code, error)) = failure else {
                self.send_answer(
                    parked.tx,
                    &parked.request,
                    parked.code,
                    parked.response,
                    now,
                    next,
                );
                continue;
            };
            let call_id = Lossy(parked.request.call_id().unwrap_or(b""));
            let retry_after = UNREACHABLE_RETRY_AFTER.to_string();
            let (reason, headers): (String, &[(&str, &str)]) = if code == 503 {
                warn!(%call_id, %error, "location store unreachable before it confirmed the write: answering 503");
                let reason = format!("Service Unavailable (location store: {error})");
                (reason, &[("Retry-After", retry_after.as_str())])
            } else {
                warn!(%call_id, %error, "location store write not durable: answering 500");
                (
                    format!("Server Internal Error (location store: {error})"),
                    &[],
                )
            };
            let response = self.build_response(&parked.request, code, &reason, headers);
            self.send_answer(parked.tx, &parked.request, code, response, now, next);
        }
    }
}

/// An answer held until the write it reports is on disk (a registrar's 200, RFC 3261 §10.3).
pub(super) struct Parked {
    pub(super) tx: TxId,
    pub(super) request: Message,
    pub(super) code: u16,
    pub(super) response: Bytes,
    pub(super) ticket: CommitTicket,
    /// After this the answer becomes a 500: the disk is not keeping up.
    pub(super) deadline: Instant,
}

/// How long an answer may wait for its disk flush before the request gets 500 instead; far
/// beyond a flush's milliseconds, well within a client's Timer F (64*T1).
pub(super) const PARK_TIMEOUT: Duration = Duration::from_secs(10);
