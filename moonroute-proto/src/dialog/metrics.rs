//! The dialog metrics, shared by every event loop's table: calls up by state, created, ended
//! by reason, refused (table full), and per profile the live calls and distinct values.
//! Profile values (users, trunks) are not labels: their number is unbounded.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::cdr::EndReason;
use super::profiles::Profiles;
use crate::metrics::{Counter, Gauge, Kind, Registry};

pub struct DialogMetrics {
    pub early: Gauge,
    pub confirmed: Gauge,
    pub created: Counter,
    pub refused: Counter,
    pub ended: [Counter; EndReason::COUNT],
    /// Bytes the tables hold (`[dialog] memory_mb` counts them per loop).
    pub memory: Gauge,
}

impl DialogMetrics {
    /// Registers the families in `registry` (again: the same families), the profile
    /// families reading `profiles` at each scrape.
    pub fn register(registry: &Registry, profiles: &Arc<Profiles>) -> Arc<DialogMetrics> {
        let states = registry
            .gauge_family(
                "moonroute_dialogs",
                "Calls tracked (req:dlg_manage()) by state: early (no answer yet) or confirmed.",
                &["state"],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let ended = registry
            .counter_family(
                "moonroute_dialogs_ended_total",
                "Tracked calls ended, by reason (caller_bye, callee_bye, cancelled, failed, timeout, max_duration, ctl).",
                &["reason"],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let read = Arc::clone(profiles);
        registry.collect(
            "moonroute_dialog_profile_calls",
            "Live calls counted in each dialog profile (sip.dlg.profile_add), all values together.",
            Kind::Gauge,
            Box::new(move |out| {
                for (name, (calls, _)) in by_profile(&read) {
                    out.sample(
                        "moonroute_dialog_profile_calls",
                        &[("profile", &name)],
                        calls,
                    );
                }
            }),
        );
        let read = Arc::clone(profiles);
        registry.collect(
            "moonroute_dialog_profile_values",
            "Distinct values with live calls in each dialog profile (e.g. users on a call).",
            Kind::Gauge,
            Box::new(move |out| {
                for (name, (_, values)) in by_profile(&read) {
                    out.sample(
                        "moonroute_dialog_profile_values",
                        &[("profile", &name)],
                        values,
                    );
                }
            }),
        );
        Arc::new(DialogMetrics {
            early: states.with(&["early"]),
            confirmed: states.with(&["confirmed"]),
            created: registry.counter(
                "moonroute_dialogs_created_total",
                "Calls tracked since start (req:dlg_manage()).",
            ),
            refused: registry.counter(
                "moonroute_dialogs_refused_total",
                "req:dlg_manage() refusals: the dialog table full ([dialog] max_dialogs, memory_mb).",
            ),
            ended: EndReason::ALL.map(|reason| ended.with(&[reason.as_str()])),
            memory: registry.gauge(
                "moonroute_dialogs_memory_bytes",
                "Bytes held by the tracked calls of all event loops, as counted against [dialog] memory_mb.",
            ),
        })
    }

    /// Handles counting into a registry nobody serves (tests, offline runs).
    pub fn detached() -> Arc<DialogMetrics> {
        DialogMetrics::register(&Registry::new(), &Profiles::new())
    }
}

/// Per profile name: live calls and distinct values.
fn by_profile(profiles: &Profiles) -> BTreeMap<String, (f64, f64)> {
    let mut totals: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (name, _, count) in profiles.entries() {
        let entry = totals.entry(name).or_default();
        entry.0 += f64::from(count);
        entry.1 += 1.0;
    }
    totals
}
