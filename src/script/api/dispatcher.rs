//! Dispatcher primitives over [`crate::dispatcher`] (Kamailio's `dispatcher` module):
//! - `req:ds_select(set, algorithm)` (`ds_select_domain`): the selected destination becomes
//!   the target set (§16.5), the others are remembered, in failover order, in the
//!   transaction's script state; `req:ds_next([status])` in `on_failure` (`ds_next_domain`)
//!   replaces the target set with the next destination still usable, and with a status code
//!   reports the failure (`[dispatcher] mark_on`); `req:ds_destination()` is the destination
//!   the request was last sent to.
//! - `sip.ds.select(set, algorithm[, key])`: the ordered URIs only; `sip.ds.mark(uri, state)`
//!   (`ds_mark_dst`), `sip.ds.state(uri)`, `sip.ds.list([set])` (`ds_list`),
//!   `sip.ds.is_from_list(ip[, set])` (`ds_is_from_list`).
//!
//! The failover cursor lives in `req.vars` under a key only this module holds (a table in the
//! Lua registry), so it follows the transaction to `on_failure` like the script's own state
//! and cannot be overwritten by a script's `req.vars` key.
//!
//! An INVITE counts as a call at its destination (`call_load`) through a
//! [`CallSlot`]: the cursor holds it while the transaction is the only owner of the call; once
//! `on_request` relays a call it tracks (`req:dlg_manage()`), the dialog holds it
//! ([`bind_dialog`]) until the call ends, as Kamailio's alg 10 counts with the `dialog`
//! module.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use mlua::{AnyUserData, Lua, MultiValue, Table, UserData, UserDataMethods, Value};

use super::dialog as dialog_api;
use super::{env, runtime, Role, ScriptMsg};
use crate::dialog::DialogId;
use crate::dispatcher::{hash_key, target_uri, Algorithm, CallSlot, Dispatcher, State};
use crate::proxy::response_context::Target;

/// Registry name of the `req.vars` key holding the failover cursor.
const CURSOR_KEY: &str = "moonroute.dispatcher.cursor";

/// What `ds_select` left for `ds_next`: where the request went, what is left to try, and
/// who holds the call's count at `current` (`call_load`).
struct Cursor {
    current: Arc<str>,
    remaining: Vec<Arc<str>>,
    /// An INVITE: a call, counted at `current` wherever it goes.
    is_call: bool,
    /// The count while the transaction holds it: the call is not tracked as a dialog (or not
    /// yet: `on_request` is still running). Dropped when the transaction ends.
    call: Option<CallSlot>,
    /// The dialog tracking the call (`req:dlg_manage()`), bound when `on_request` relayed
    /// it ([`bind_dialog`]): from then on the dialog holds the count, until it terminates.
    dialog: Option<DialogId>,
}

impl Cursor {
    /// The call, if it is one, counts at `current`: in its dialog when it has one.
    fn count(&mut self, lua: &Lua, dispatcher: &Dispatcher) {
        if !self.is_call {
            return;
        }
        let Some(slot) = dispatcher.count_call(&self.current) else {
            return;
        };
        self.call = match self.dialog {
            Some(id) => dialog_api::count_dispatched(lua, id, slot),
            None => Some(slot),
        };
    }

    /// The call no longer counts at `current` (it failed there, or another selection
    /// replaces this one).
    fn uncount(&mut self, lua: &Lua) {
        self.call = None;
        if let Some(id) = self.dialog {
            dialog_api::release_dispatched(lua, id);
        }
    }
}

impl UserData for Cursor {}

pub(super) fn add_methods<M: UserDataMethods<ScriptMsg>>(methods: &mut M) {
    methods.add_method_mut("ds_select", |lua, m, (set, algorithm): (u32, Value)| {
        m.require(&[Role::Request, Role::Failure], "ds_select")?;
        let algorithm = algorithm_of(&algorithm, "ds_select")?;
        let dispatcher = dispatcher(lua, "ds_select")?;
        let key = hash_key(algorithm, &m.msg);
        let mut order = match dispatcher.select(set, algorithm, key.as_deref()) {
            Ok(order) => order,
            Err(e) => return nil_and(lua, &e.to_string()),
        };
        let first = order.remove(0);
        m.targets = vec![target(m, &first)];
        let mut dialog = None;
        if let Some(previous) = cursor(lua, m)? {
            let mut previous = previous.borrow_mut::<Cursor>()?;
            previous.uncount(lua);
            dialog = previous.dialog;
        }
        let mut cursor = Cursor {
            current: first.clone(),
            remaining: order,
            is_call: is_call(m),
            call: None,
            dialog,
        };
        cursor.count(lua, &dispatcher);
        store_cursor(lua, m, cursor)?;
        Ok(MultiValue::from_vec(vec![Value::String(
            lua.create_string(&*first)?,
        )]))
    });
    methods.add_method_mut("ds_next", |lua, m, status: Option<u16>| {
        m.require(&[Role::Failure], "ds_next")?;
        let dispatcher = dispatcher(lua, "ds_next")?;
        let Some(cursor) = cursor(lua, m)? else {
            return Err(runtime(
                "ds_next: no req:ds_select() in on_request for this call",
            ));
        };
        let mut cursor = cursor.borrow_mut::<Cursor>()?;
        if let Some(status) = status {
            dispatcher.call_failed(&cursor.current, status);
        }
        let current = cursor.current.clone();
        cursor.uncount(lua);
        match dispatcher.next(Some(&current), &mut cursor.remaining) {
            Some(next) => {
                m.targets = vec![target(m, &next)];
                cursor.current = next.clone();
                cursor.count(lua, &dispatcher);
                Ok(Some(next.to_string()))
            }
            None => Ok(None),
        }
    });
    methods.add_method("ds_destination", |lua, m, ()| {
        let Some(cursor) = cursor(lua, m)? else {
            return Ok(None);
        };
        let current = cursor.borrow::<Cursor>()?.current.to_string();
        Ok(Some(current))
    });
}

/// The target for `destination`: its URI with the Request-URI's user ([`target_uri`]).
fn target(m: &ScriptMsg, destination: &str) -> Target {
    let uri = target_uri(destination, m.msg.request_uri_bytes());
    Target::new(Bytes::from(uri), 1000)
}

fn cursor_key(lua: &Lua) -> mlua::Result<Table> {
    lua.named_registry_value(CURSOR_KEY)
}

/// Whether a state ever stored a cursor (app data). A script that never calls `ds_select`
/// (the shipped one) then skips the registry read of [`CURSOR_KEY`] that [`end_call`] and
/// [`bind_dialog`] would make for every request (a protected call: ~1k instructions each).
#[derive(Default)]
struct CursorsStored(Cell<bool>);

fn cursors_stored(lua: &Lua) -> bool {
    lua.app_data_ref::<CursorsStored>()
        .is_some_and(|stored| stored.0.get())
}

/// Keeps `cursor` in the transaction's vars; without vars (nothing would follow the
/// transaction) it is dropped, and with it the call's count.
fn store_cursor(lua: &Lua, m: &ScriptMsg, cursor: Cursor) -> mlua::Result<()> {
    let Some(vars) = &m.vars else {
        return Ok(());
    };
    let cursor = lua.create_userdata(cursor)?;
    vars.raw_set(cursor_key(lua)?, cursor)?;
    if let Some(stored) = lua.app_data_ref::<CursorsStored>() {
        stored.0.set(true);
    }
    Ok(())
}

/// A call is an INVITE; `call_load` counts it from its selection to the end of its dialog
/// when the script tracks it (`req:dlg_manage()`), else to the end of its transaction (RFC
/// 6026: 32 s after a 2xx). Other requests are routed but not counted.
fn is_call(m: &ScriptMsg) -> bool {
    m.msg.method() == Some(&crate::sip::Method::Invite)
}

fn cursor_of(lua: &Lua, vars: &Table) -> Option<AnyUserData> {
    if !cursors_stored(lua) {
        return None;
    }
    let key = cursor_key(lua).ok()?;
    vars.raw_get(key).ok().flatten()
}

/// Whether the transaction whose vars are `vars` holds a call's count itself: its state must
/// then be kept until the transaction ends, for [`end_call`].
pub(crate) fn holds_call(lua: &Lua, vars: &Table) -> bool {
    cursor_of(lua, vars)
        .and_then(|c| c.borrow::<Cursor>().ok().map(|c| c.call.is_some()))
        .unwrap_or(false)
}

/// `on_request` relayed the call whose vars are `vars`, tracked as dialog `id`
/// (`req:dlg_manage()`): the dialog holds its count from now on, so it counts until the call
/// ends (BYE, a failure, CANCEL, a timeout), as Kamailio's `call_load` does with `dialog`.
pub(crate) fn bind_dialog(lua: &Lua, vars: &Table, id: DialogId) {
    let Some(cursor) = cursor_of(lua, vars) else {
        return;
    };
    if let Ok(mut cursor) = cursor.borrow_mut::<Cursor>() {
        cursor.dialog = Some(id);
        if let Some(slot) = cursor.call.take() {
            cursor.call = dialog_api::count_dispatched(lua, id, slot);
        }
    }
}

/// The transaction whose vars are `vars` ended: the count it held, if any, ends (a dialog's
/// count goes on).
pub(crate) fn end_call(lua: &Lua, vars: &Table) {
    if let Some(mut cursor) = cursor_of(lua, vars).and_then(|c| c.borrow_mut::<Cursor>().ok()) {
        cursor.call = None;
    }
}

fn cursor(lua: &Lua, m: &ScriptMsg) -> mlua::Result<Option<AnyUserData>> {
    match &m.vars {
        Some(vars) if cursors_stored(lua) => vars.raw_get(cursor_key(lua)?),
        _ => Ok(None),
    }
}

fn dispatcher(lua: &Lua, primitive: &str) -> mlua::Result<Arc<Dispatcher>> {
    Ok(env(lua, primitive)?.services.dispatcher.clone())
}

/// An algorithm given by name (`"round_robin"`) or Kamailio number (`4`).
fn algorithm_of(value: &Value, primitive: &str) -> mlua::Result<Algorithm> {
    let name = match value {
        Value::String(s) => s.to_str()?.to_owned(),
        Value::Integer(n) => n.to_string(),
        other => {
            return Err(runtime(format!(
                "{primitive}: the algorithm is a name or a number, not {}",
                other.type_name()
            )))
        }
    };
    Algorithm::parse(&name).map_err(|e| runtime(format!("{primitive}: {e}")))
}

fn nil_and(lua: &Lua, reason: &str) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![
        Value::Nil,
        Value::String(lua.create_string(reason)?),
    ]))
}

/// Installs `sip.ds`.
pub(super) fn install(lua: &Lua, sip: &Table) -> mlua::Result<()> {
    lua.set_named_registry_value(CURSOR_KEY, lua.create_table()?)?;
    lua.set_app_data(CursorsStored::default());
    let ds = lua.create_table()?;
    ds.set(
        "select",
        lua.create_function(
            |lua, (set, algorithm, key): (u32, Value, Option<mlua::LuaString>)| {
                let algorithm = algorithm_of(&algorithm, "sip.ds.select")?;
                if algorithm.is_hash() && key.is_none() {
                    return Err(runtime(format!(
                        "sip.ds.select: {algorithm} needs the key to hash: sip.ds.select({set}, \"{algorithm}\", req.call_id)"
                    )));
                }
                let key = key.map(|k| k.as_bytes().to_vec());
                match dispatcher(lua, "sip.ds.select")?.select(set, algorithm, key.as_deref()) {
                    Ok(order) => Ok(MultiValue::from_vec(vec![Value::Table(
                        lua.create_sequence_from(order.iter().map(|u| u.to_string()))?,
                    )])),
                    Err(e) => nil_and(lua, &e.to_string()),
                }
            },
        )?,
    )?;
    ds.set(
        "mark",
        lua.create_function(|lua, (uri, state): (String, String)| {
            let state = State::parse(&state).map_err(|e| runtime(format!("sip.ds.mark: {e}")))?;
            dispatcher(lua, "sip.ds.mark")?
                .mark(&uri, state, "the script")
                .map_err(|e| runtime(format!("sip.ds.mark: {e}")))?;
            Ok(true)
        })?,
    )?;
    ds.set(
        "state",
        lua.create_function(|lua, uri: String| {
            Ok(dispatcher(lua, "sip.ds.state")?
                .state(&uri)
                .map(State::name))
        })?,
    )?;
    ds.set(
        "list",
        lua.create_function(|lua, set: Option<u32>| {
            let views = dispatcher(lua, "sip.ds.list")?.list(set, Instant::now());
            let list = lua.create_table()?;
            for view in views {
                let t = lua.create_table()?;
                t.set("set", view.set)?;
                t.set("uri", view.uri)?;
                t.set("state", view.state.name())?;
                t.set("weight", view.weight)?;
                t.set("priority", view.priority)?;
                t.set("attrs", view.attrs)?;
                t.set("calls", view.calls)?;
                t.set("sent", view.sent)?;
                t.set("failovers", view.failovers)?;
                t.set("probes_failed", view.probes_failed)?;
                if let Some((outcome, age)) = view.last_probe {
                    t.set("last_probe", outcome.to_string())?;
                    t.set("last_probe_age", age.as_secs_f64())?;
                }
                list.push(t)?;
            }
            Ok(list)
        })?,
    )?;
    ds.set(
        "is_from_list",
        lua.create_function(|lua, (ip, set): (String, Option<u32>)| {
            let ip: std::net::IpAddr = ip.trim().parse().map_err(|_| {
                runtime(format!(
                    "sip.ds.is_from_list: {ip:?} is not an IP address (req.src_ip is one)"
                ))
            })?;
            Ok(dispatcher(lua, "sip.ds.is_from_list")?.is_from_list(ip, set))
        })?,
    )?;
    sip.set("ds", ds)
}
