//! Transaction primitives (Kamailio's `tm` module) beyond the decisions themselves:
//! - `req:t_set_fr(fr_inv_ms [, fr_ms])` (`t_set_fr`, Kamailio's argument order): the failure timers of the
//!   branches the request's decision starts, and of those a failure route adds later
//!   ([`FailureTimers`]; `proxy::relay` runs them, RFC 3261 §16.7, §16.8);
//! - `req.du` (`$du`): the destination URI of those branches, where they are sent without
//!   rewriting the Request-URI or adding a Route ([`Target::next_hop_uri`]). It is the
//!   script's alone: nothing in the message sets it, and each hook call starts without one,
//!   so a failure route's new branch does not inherit the failed one's;
//! - `res.branches` in `on_failure` and `res.branch` in `on_branch_failure`: how each
//!   branch ended ([`BranchOutcome`]), the proxy's own 408/503 included.
//!
//! The timers and `du` are read when the hook returns ([`complete`]), like every edit made
//! after a decision.

use mlua::{Lua, Table, UserDataFields, UserDataMethods};

use super::{runtime, sip_uri, Role, ScriptMsg};
use crate::proxy::response_context::{BranchOutcome, Target};
use crate::proxy::router::{Decision, FailureTimers};

/// The longest failure timer a script may set: a day (beyond Timer B/C it only waits).
const MAX_TIMER_MS: u64 = 86_400_000;

pub(super) fn add_methods<M: UserDataMethods<ScriptMsg>>(methods: &mut M) {
    methods.add_method_mut(
        "t_set_fr",
        |_, m, (fr_inv_ms, fr_ms): (i64, Option<i64>)| {
            m.require(&[Role::Request, Role::Failure], "t_set_fr")?;
            // Kamailio's order: `t_set_fr(fr_inv_timeout [, fr_timeout])`, so a script ported
            // from a Kamailio config keeps its meaning.
            let no_answer = timer(fr_inv_ms, "fr_inv_ms")?;
            let no_response = fr_ms.map(|ms| timer(ms, "fr_ms")).transpose()?.flatten();
            m.timers = FailureTimers {
                no_response,
                no_answer,
            };
            Ok(())
        },
    );
}

/// A timer argument in milliseconds; 0 is the configured default (`None`), as in Kamailio.
fn timer(ms: i64, name: &str) -> mlua::Result<Option<std::time::Duration>> {
    match u64::try_from(ms) {
        Ok(0) => Ok(None),
        Ok(ms) if ms <= MAX_TIMER_MS => Ok(Some(std::time::Duration::from_millis(ms))),
        _ => Err(runtime(format!(
            "t_set_fr: {name} is a number of milliseconds from 0 (the default) to {MAX_TIMER_MS}, not {ms}"
        ))),
    }
}

pub(super) fn add_fields<F: UserDataFields<ScriptMsg>>(fields: &mut F) {
    fields.add_field_method_get("du", |_, m| {
        Ok(m.du
            .as_ref()
            .map(|du| String::from_utf8_lossy(du).into_owned()))
    });
    fields.add_field_method_set("du", |_, m, uri: Option<String>| {
        m.require(&[Role::Request, Role::Failure], "req.du")?;
        m.du = uri
            .map(|uri| sip_uri(&uri, "req.du").map(bytes::Bytes::from))
            .transpose()?;
        Ok(())
    });
    fields.add_field_method_get("branches", |lua, m| {
        m.branches
            .as_ref()
            .map(|list| {
                let table = lua.create_table_with_capacity(list.len(), 0)?;
                for outcome in list {
                    table.push(outcome_table(lua, outcome)?)?;
                }
                Ok(table)
            })
            .transpose()
    });
    fields.add_field_method_get("branch", |lua, m| {
        m.branch
            .as_ref()
            .map(|outcome| outcome_table(lua, outcome))
            .transpose()
    });
}

/// `{uri, code, reason, timeout, generated}` for one branch.
fn outcome_table(lua: &Lua, outcome: &BranchOutcome) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(0, 5)?;
    table.set("uri", lua.create_string(&outcome.uri)?)?;
    table.set("code", outcome.code)?;
    table.set("reason", outcome.reason.as_str())?;
    table.set("timeout", outcome.timeout)?;
    table.set("generated", outcome.local)?;
    Ok(table)
}

/// Carries what the script set on `state` into its decision when the hook returns: the
/// failure timers, and `du` as every target's destination (the Request-URI as the target
/// when the target set is empty), or as a stateless forward's next hop.
pub(crate) fn complete(state: &ScriptMsg, decision: &mut Decision) {
    match decision {
        Decision::Relay {
            targets, timers, ..
        } => {
            *timers = state.timers;
            let Some(du) = &state.du else {
                return;
            };
            if targets.is_empty() {
                let uri = state.msg.request_uri_bytes().map(|u| state.msg.share(u));
                targets.extend(uri.map(|uri| Target::new(uri, 1000)));
            }
            for target in targets {
                target.next_hop_uri = Some(du.clone());
            }
        }
        Decision::Forward { target, .. } if target.is_none() => target.clone_from(&state.du),
        _ => {}
    }
}
