//! Dialog primitives over [`crate::dialog`] (Kamailio's `dialog` module):
//! `req:dlg_manage()`, `req:dlg_known()` and `req:dlg_set_timeout(seconds)` in `on_request`,
//! and `sip.dlg`: `profile_add`,
//! `profile_count`, `vars`, `acc`.
//!
//! The *current dialog* is the one `req:dlg_manage()` created or `req:dlg_known()` matched
//! for the request being routed; `sip.dlg.profile_add`, `sip.dlg.vars` and `sip.dlg.acc` act
//! on it (as Kamailio's `set_dlg_profile` and `$dlg_var` act on the message's dialog). The
//! script router clears it before each `on_request` and settles, after the hook, a dialog the
//! script managed but did not relay (`settle_managed`).
//!
//! The table belongs to the event loop, not to the Lua state: dialogs, their variables and
//! profile counts survive a script reload.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use mlua::{Lua, MetaMethod, Table, UserData, UserDataMethods, Value};
use tracing::warn;

use super::{runtime, Role, ScriptMsg};
use crate::dialog::{DialogId, DialogTable, Known, Limits, Profiles, Refusal, SharedTable, Stamp};
use crate::dispatcher::CallSlot;
use crate::proxy::router::{Decision, Routed};
use crate::sip::Method;

/// The longest max duration `req:dlg_set_timeout` takes: 30 days (a dialog is forgotten after
/// `[dialog] lifetime_secs` anyway).
const MAX_TIMEOUT_SECS: f64 = 30.0 * 86_400.0;

/// A Lua state's view of its loop's dialog table (app data).
pub struct LoopDialogs {
    pub table: SharedTable,
    current: RefCell<Current>,
}

/// The current dialog, and whether this request created it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Current {
    pub id: Option<DialogId>,
    pub managed: bool,
}

impl LoopDialogs {
    pub fn new(table: SharedTable) -> LoopDialogs {
        LoopDialogs {
            table,
            current: RefCell::default(),
        }
    }
}

/// Gives `lua` the loop's table (the script router, for each state it loads).
pub fn attach(lua: &Lua, table: SharedTable) {
    lua.set_app_data(LoopDialogs::new(table));
}

/// The current dialog of `lua`, taken (left empty for the next request).
pub fn take_current(lua: &Lua) -> Current {
    lua.app_data_ref::<LoopDialogs>()
        .map(|d| d.current.take())
        .unwrap_or_default()
}

/// Makes `current` the current dialog again (a hook resumed after `sip.resolve`).
pub fn restore_current(lua: &Lua, current: Current) {
    if let Some(d) = lua.app_data_ref::<LoopDialogs>() {
        *d.current.borrow_mut() = current;
    }
}

/// After `on_request`: a dialog the script managed for a request it did not relay ends here.
/// Answered by the script with a failure, it is a failed call attempt (its CDR goes out with
/// the relay's next flush); dropped or forwarded statelessly, no call was attempted through
/// us and it is forgotten.
pub fn settle_managed(lua: &Lua, current: Current, routed: &Routed) {
    let (Some(id), true) = (current.id, current.managed) else {
        return;
    };
    let Some(dialogs) = lua.app_data_ref::<LoopDialogs>() else {
        return;
    };
    let mut table = dialogs.table.borrow_mut();
    match &routed.decision {
        Decision::Relay { .. } | Decision::Resolve { .. } => {}
        Decision::Reply { code, .. } if *code >= 300 => {
            let now = Stamp::now();
            if let Some(cdr) =
                table.on_invite_response(id, *code, None, None, Vec::new(), None, now)
            {
                table.defer(cdr);
            }
        }
        _ => table.abandon(id),
    }
}

/// Dialog `id` holds `slot`, the call's count at its dispatcher destination, until it
/// terminates; `slot` comes back when the dialog is gone or over.
pub(crate) fn count_dispatched(lua: &Lua, id: DialogId, slot: CallSlot) -> Option<CallSlot> {
    dialogs(lua)
        .table
        .borrow_mut()
        .count_dispatched(id, slot)
        .err()
}

/// Dialog `id` drops its count at its dispatcher destination (the call failed there).
pub(crate) fn release_dispatched(lua: &Lua, id: DialogId) {
    dialogs(lua).table.borrow_mut().release_dispatched(id);
}

/// The loop's table; a state without one (offline runs: `moonroute test`) gets its own.
fn dialogs(lua: &Lua) -> mlua::AppDataRef<'_, LoopDialogs> {
    if lua.app_data_ref::<LoopDialogs>().is_none() {
        let table = DialogTable::new(Limits::default(), Profiles::new());
        attach(lua, Rc::new(RefCell::new(table)));
    }
    lua.app_data_ref::<LoopDialogs>()
        .expect("the dialog table was just attached")
}

fn current(lua: &Lua, primitive: &str) -> mlua::Result<DialogId> {
    dialogs(lua).current.borrow().id.ok_or_else(|| {
        runtime(format!(
            "{primitive}: no current dialog (call req:dlg_manage() or req:dlg_known() first)"
        ))
    })
}

pub(super) fn add_methods<M: UserDataMethods<ScriptMsg>>(methods: &mut M) {
    methods.add_method("dlg_manage", |lua, m, ()| {
        m.require(&[Role::Request], "dlg_manage")?;
        if m.msg.method() != Some(&Method::Invite) {
            return Err(runtime("dlg_manage: only an initial INVITE starts a dialog"));
        }
        let meta = m
            .meta
            .ok_or_else(|| runtime("dlg_manage: no transport information"))?;
        let Some(new) = crate::dialog::new_dialog(&m.msg, &meta) else {
            return Ok((false, Some(Refusal::NoFromTag.as_str())));
        };
        let dialogs = dialogs(lua);
        let now = Stamp::now();
        let created = dialogs.table.borrow_mut().manage(new, now);
        match created {
            Ok(id) => {
                *dialogs.current.borrow_mut() = Current {
                    id: Some(id),
                    managed: true,
                };
                Ok((true, None))
            }
            Err(refusal) => {
                warn!(call_id = %crate::logging::call_id(&m.msg), reason = refusal.as_str(), "dialog not tracked");
                Ok((false, Some(refusal.as_str())))
            }
        }
    });
    methods.add_method("dlg_set_timeout", |lua, m, seconds: f64| {
        m.require(&[Role::Request], "dlg_set_timeout")?;
        if !(0.0..=MAX_TIMEOUT_SECS).contains(&seconds) {
            return Err(runtime(format!(
                "dlg_set_timeout: seconds must be from 0 (no limit) to {MAX_TIMEOUT_SECS}, not {seconds}"
            )));
        }
        let id = current(lua, "dlg_set_timeout")?;
        dialogs(lua)
            .table
            .borrow_mut()
            .set_max_duration(id, Duration::from_secs_f64(seconds), Instant::now())
            .map_err(|e| runtime(format!("dlg_set_timeout: {}", e.as_str())))
    });
    methods.add_method("dlg_known", |lua, m, ()| {
        m.require(&[Role::Request], "dlg_known")?;
        // `crate::dialog::tags`, through the tag lookups that skip parsing From's and To's
        // URIs in a message the engine validated (`Message::from_tag`).
        let tags = || Some((m.msg.call_id().ok()?, m.msg.from_tag()?, m.msg.to_tag()?));
        let Some((call_id, from_tag, to_tag)) = tags() else {
            return Ok((false, Some("not_in_dialog")));
        };
        let Some(uri) = m.msg.request_uri_bytes() else {
            return Ok((false, Some("not_in_dialog")));
        };
        let is_bye = m.msg.method() == Some(&Method::Bye);
        let dialogs = dialogs(lua);
        let table = dialogs.table.borrow();
        let mut known = table.known(call_id, from_tag, to_tag, is_bye, uri);
        if known == Known::Untracked && m.info.tracked_call {
            // Its route set says this server tracked the call since it started, and the
            // table forgot it after its linger: it ended (`proxy::route_sign`).
            known = Known::Ended;
        }
        if let Known::Yes(side) | Known::EndedBye(side) = known {
            let caller_tag = match side {
                crate::dialog::Side::Caller => from_tag,
                crate::dialog::Side::Callee => to_tag,
            };
            *dialogs.current.borrow_mut() = Current {
                id: table.find(call_id, caller_tag),
                managed: false,
            };
        }
        Ok(match known.admits() {
            true => (true, None),
            false => (false, Some(known.as_str())),
        })
    });
}

/// `sip.dlg.vars`: the current dialog's variables (`sip.dlg.vars.name = "value"`).
struct Vars;

impl UserData for Vars {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Index, |lua, _, name: String| {
            let id = current(lua, "sip.dlg.vars")?;
            let dialogs = dialogs(lua);
            let table = dialogs.table.borrow();
            Ok(table.get(id).and_then(|d| d.var(&name)).map(str::to_owned))
        });
        methods.add_meta_method(
            MetaMethod::NewIndex,
            |lua, _, (name, value): (String, Value)| {
                set_var(lua, "sip.dlg.vars", &name, value, false)
            },
        );
    }
}

fn set_var(lua: &Lua, primitive: &str, name: &str, value: Value, acc: bool) -> mlua::Result<()> {
    let id = current(lua, primitive)?;
    let value = match value {
        Value::String(s) => s.to_str()?.to_owned(),
        Value::Integer(i) => i.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Boolean(b) => b.to_string(),
        other => {
            return Err(runtime(format!(
                "{primitive}: values are strings, numbers or booleans, not {}",
                other.type_name()
            )))
        }
    };
    dialogs(lua)
        .table
        .borrow_mut()
        .set_var(id, name, &value, acc)
        .map_err(|e| runtime(format!("{primitive}: {name}: {}", e.as_str())))
}

/// The `dlg` given to `on_dialog_end(dlg)`: the CDR's fields (times as Unix seconds, `answer`
/// and `hangup` nil for an unanswered call, `extra` a table).
pub fn cdr_table(lua: &Lua, cdr: &crate::dialog::Cdr) -> mlua::Result<Table> {
    let seconds = |t: SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let dlg = lua.create_table()?;
    dlg.set("call_id", cdr.call_id.as_str())?;
    dlg.set("from_uri", cdr.from_uri.as_str())?;
    dlg.set("from_tag", cdr.from_tag.as_str())?;
    dlg.set("to_uri", cdr.to_uri.as_str())?;
    dlg.set("to_tag", cdr.to_tag.as_deref())?;
    dlg.set("src", cdr.src.as_str())?;
    dlg.set("ruri", cdr.ruri.as_str())?;
    dlg.set("dst", cdr.dst.as_deref())?;
    dlg.set("start", seconds(cdr.start))?;
    dlg.set("answer", cdr.answer.map(seconds))?;
    dlg.set("end", seconds(cdr.end))?;
    dlg.set("duration", cdr.duration())?;
    dlg.set("setup", cdr.setup())?;
    dlg.set("status", cdr.status)?;
    dlg.set("reason", cdr.reason.as_str())?;
    dlg.set("hangup", cdr.answered().then(|| cdr.reason.hangup()))?;
    let extra = lua.create_table()?;
    for (name, value) in &cdr.extra {
        extra.set(name.as_str(), value.as_str())?;
    }
    dlg.set("extra", extra)?;
    Ok(dlg)
}

pub(super) fn install(lua: &Lua, sip: &Table) -> mlua::Result<()> {
    let dlg = lua.create_table()?;
    dlg.set(
        "profile_add",
        lua.create_function(|lua, (name, value, limit): (String, String, Option<u32>)| {
            let id = current(lua, "sip.dlg.profile_add")?;
            let joined = dialogs(lua)
                .table
                .borrow_mut()
                .join_profile(id, &name, &value, limit);
            match joined {
                Ok(()) => Ok(true),
                Err(Refusal::ProfileFull { .. }) => Ok(false),
                Err(e) => Err(runtime(format!("sip.dlg.profile_add: {}", e.as_str()))),
            }
        })?,
    )?;
    dlg.set(
        "profile_count",
        lua.create_function(|lua, (name, value): (String, String)| {
            Ok(dialogs(lua).table.borrow().profiles().count(&name, &value))
        })?,
    )?;
    dlg.set(
        "acc",
        lua.create_function(|lua, (name, value): (String, Value)| {
            set_var(lua, "sip.dlg.acc", &name, value, true)
        })?,
    )?;
    dlg.set("vars", Vars)?;
    sip.set("dlg", dlg)
}
