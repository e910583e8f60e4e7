//! The `[dispatcher]` section of the configuration, owned by the dispatcher: `crate::config`
//! reads it with the rest of the file and checks it; [`DispatcherConfig::rules`] turns it into
//! the health [`Rules`] the dispatcher runs on.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{health, Rules, SetConfig};

/// The dispatcher (`src/dispatcher/`): destination sets, the probes that watch them and when
/// a failed call takes a destination out. Kamailio's `dispatcher` module parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatcherConfig {
    /// A file of `[[set]]` tables (same shape as `[[dispatcher.set]]`), read at start and
    /// again by `moonroute ctl ds reload`; a bad file is refused and the old sets keep
    /// serving. Relative to the working directory. Default: none.
    pub sets_file: Option<PathBuf>,
    /// Seconds between probes of each destination; 0 turns probing off (destinations are
    /// then trusted: they start `active`). Default: 10.
    pub probe_interval_secs: u64,
    /// The interval in milliseconds instead, when not 0 (tests and labs). Default: 0.
    pub probe_interval_ms: u64,
    /// A probe without a final answer after this many milliseconds failed (its transaction's
    /// retransmissions, RFC 3261 §17.1.2.2, cover a lost datagram well before). At most the
    /// interval. Default: 4000.
    pub probe_timeout_ms: u64,
    /// The probe request's method (Kamailio's `ds_ping_method`). Default: `OPTIONS`.
    pub probe_method: String,
    /// Failed probes in a row that take an `active` destination down (Kamailio's
    /// `ds_probing_threshhold`). Default: 1.
    pub down_after: u32,
    /// Alive answers in a row that bring an `inactive` destination back (Kamailio's
    /// `ds_inactive_threshhold`): a gateway that just rebooted often answers OPTIONS before
    /// it takes calls. Default: 2.
    pub up_after: u32,
    /// Probe answers that prove a destination alive: codes (`"404"`) or classes (`"2xx"`)
    /// (Kamailio's `ds_ping_reply_codes`). Default: `["2xx", "401", "403", "404", "405",
    /// "407", "501"]`: a SIP stack that answers at all, but not 408, 480, 503 or 6xx.
    pub alive_codes: Vec<String>,
    /// Call failures that take the destination down at once (the script reports them with
    /// `req:ds_next(res.status)` or `sip.ds.mark`): codes, classes or `"timeout"` (a 408).
    /// Default: `["timeout", "503"]`.
    pub mark_on: Vec<String>,
    /// The destination sets. Default: none.
    pub set: Vec<SetConfig>,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            sets_file: None,
            probe_interval_secs: 10,
            probe_interval_ms: 0,
            probe_timeout_ms: 4000,
            probe_method: "OPTIONS".to_owned(),
            down_after: 1,
            up_after: 2,
            alive_codes: health::DEFAULT_ALIVE.map(str::to_owned).to_vec(),
            mark_on: health::DEFAULT_MARK_ON.map(str::to_owned).to_vec(),
            set: Vec::new(),
        }
    }
}

impl DispatcherConfig {
    /// The probe interval, `None` when probing is off.
    pub fn probe_interval(&self) -> Option<std::time::Duration> {
        let interval = match self.probe_interval_ms {
            0 => std::time::Duration::from_secs(self.probe_interval_secs),
            ms => std::time::Duration::from_millis(ms),
        };
        (!interval.is_zero()).then_some(interval)
    }

    /// The health rules of `src/dispatcher/health.rs`.
    pub fn rules(&self) -> Result<Rules, String> {
        let codes = |key: &str, items: &[String]| {
            health::CodeSet::parse(items).map_err(|e| format!("dispatcher.{key}: {e}"))
        };
        Ok(Rules {
            interval: self.probe_interval(),
            timeout: std::time::Duration::from_millis(self.probe_timeout_ms),
            down_after: self.down_after,
            up_after: self.up_after,
            alive: codes("alive_codes", &self.alive_codes)?,
            mark_on: codes("mark_on", &self.mark_on)?,
            method: self.probe_method.clone(),
        })
    }
}
