//! Digest authentication primitives (`req:auth_challenge`, `req:authorize`,
//! `req:consume_credentials`, `req:check_from`) over [`crate::auth`].

use mlua::{Lua, Table, UserDataMethods};

use super::ScriptMsg;

pub(super) fn add_methods<M: UserDataMethods<ScriptMsg>>(_methods: &mut M) {}

/// Adds this module's functions to the `sip` table.
pub(super) fn install(_lua: &Lua, _sip: &Table) -> mlua::Result<()> {
    Ok(())
}
