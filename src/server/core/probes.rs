//! The dispatcher's destination probes (Kamailio's `ds_ping_interval`), sent from the first
//! loop through client transactions of its transaction layer; the probing itself is
//! `dispatcher::probe`.

use std::time::Instant;

use super::Core;
use crate::transport::Output;

impl Core {
    /// Sends the dispatcher's due probes and fails those past their timeout.
    pub(super) fn probe_round(&mut self, now: Instant, out: &mut Vec<Output>) {
        let Some(probes) = &mut self.probes else {
            return;
        };
        if now < probes.next_deadline() {
            return;
        }
        let (mut pending, mut resolves) = (std::mem::take(&mut self.pending), Vec::new());
        let layer = &mut self.transactions;
        probes.on_tick(now, &self.identity, layer, &mut pending, &mut resolves);
        self.drain(pending, now, out);
        for (id, query) in resolves {
            out.push(Output::Resolve { id, query });
        }
    }
}
