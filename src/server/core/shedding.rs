//! Load shedding: whether this loop refuses new requests now, and what share of them
//! (`limits.max_backlog`, `limits.overload_after_ms`). The transaction layer answers the shed
//! requests with 503 and Retry-After (RFC 3261 §21.5.4); requests inside a dialog and CANCELs
//! are never shed (see `transaction::layer`).

use tracing::debug;

use super::Core;
use crate::transaction::layer::Shedding;

impl Core {
    /// Why new requests are refused now, if they are, and what share: all of them while too
    /// much work waits outside the loop ([`Core::backlog`]); the share [`Overload`] decides
    /// while the loop itself is saturated (`limits.overload_after_ms`: serving every new
    /// request would only make every request late, and their clients retransmit).
    pub(super) fn shedding(&mut self) -> Option<Shedding> {
        let backlog = self.backlog();
        if backlog > self.backlog_high_water {
            self.backlog_high_water = backlog;
            // Each power of two once: how deep the queues get under a given load, cheaply.
            if backlog.is_power_of_two() {
                debug!(
                    loop_index = self.loop_index,
                    backlog,
                    limit = self.max_backlog,
                    "backlog high-water mark"
                );
            }
        }
        if backlog >= self.max_backlog {
            return Some(Shedding {
                reason: "limits.max_backlog reached (answers waiting for the disk, requests waiting for DNS)",
                fraction: 1.0,
            });
        }
        let fraction = self.overload.shed_fraction();
        (fraction > 0.0).then_some(Shedding {
            reason: "limits.overload_after_ms: the event loop is saturated",
            fraction,
        })
    }

    /// Requests this loop holds while waiting for something outside it: answers parked until
    /// their write is on disk, and requests or branches waiting for DNS. Either queue grows
    /// when what it waits for is slower than the arrival rate; past `limits.max_backlog` new
    /// requests are refused with 503 (see [`Core::shedding`]).
    pub(super) fn backlog(&self) -> usize {
        self.parked.len() + self.relay.resolving()
    }
}
