//! NAT traversal primitives (`req:nat_detect`, `req:fix_nated_contact`, ...), RFC 3581.

use mlua::{Lua, Table, UserDataMethods};

use super::ScriptMsg;

pub(super) fn add_methods<M: UserDataMethods<ScriptMsg>>(_methods: &mut M) {}

/// Adds this module's functions to the `sip` table.
pub(super) fn install(_lua: &Lua, _sip: &Table) -> mlua::Result<()> {
    Ok(())
}
