//! Flood and abuse protection primitives (`sip.pike_check`, `req:sanity`) over
//! [`crate::flood`].

use mlua::{Lua, Table, UserDataMethods};

use super::ScriptMsg;

pub(super) fn add_methods<M: UserDataMethods<ScriptMsg>>(_methods: &mut M) {}

/// Adds this module's functions to the `sip` table.
pub(super) fn install(_lua: &Lua, _sip: &Table) -> mlua::Result<()> {
    Ok(())
}
