//! NAT traversal primitives over [`crate::nat`] (RFC 3581; Kamailio's nathelper):
//! `req:nat_detect()`, `req:fix_nated_contact()` and `req:force_rport()`, all for
//! `on_request` only.
//!
//! `nat_detect` and `fix_nated_contact` on a REGISTER mark the request (`ScriptMsg::nated`),
//! so that `req:save()` stores its bindings as NATed: reached through the address the
//! REGISTER came from, and kept alive (Kamailio's `fix_nated_register` + `nat_bflag`).

use mlua::{Lua, Table, UserDataMethods};
use tracing::debug;

use super::{runtime, Role, ScriptMsg};
use crate::sip::{HeaderName, Method};

pub(super) fn add_methods<M: UserDataMethods<ScriptMsg>>(methods: &mut M) {
    methods.add_method_mut("nat_detect", |_, m, ()| {
        m.require(&[Role::Request], "nat_detect")?;
        let meta = m
            .meta
            .ok_or_else(|| runtime("nat_detect: no transport information"))?;
        let check = crate::nat::detect(&m.msg, meta.source, meta.kind);
        if check.is_nated() {
            debug!(source = %meta.source, reasons = %check.reasons(), "sender is behind a NAT");
            m.nated = true;
        }
        Ok(check.is_nated())
    });
    methods.add_method_mut("fix_nated_contact", |_, m, ()| {
        m.require(&[Role::Request], "fix_nated_contact")?;
        let meta = m
            .meta
            .ok_or_else(|| runtime("fix_nated_contact: no transport information"))?;
        if m.msg.method() == Some(&Method::Register) {
            // The registered Contact stays as the UA wrote it (it is the Request-URI of the
            // requests that reach it); the binding records where it is really reached.
            m.nated = true;
            return Ok(true);
        }
        let Some(Ok(first)) = m.msg.values(HeaderName::Contact).next() else {
            return Ok(false);
        };
        let Some(fixed) = crate::nat::contact_with_source(first, meta.source) else {
            return Ok(false);
        };
        let msg = m.edit("fix_nated_contact")?;
        msg.set_first_value(HeaderName::Contact, &fixed)
            .map_err(|e| runtime(format!("fix_nated_contact: {e}")))
    });
    methods.add_method_mut("force_rport", |_, m, ()| {
        m.require(&[Role::Request], "force_rport")?;
        let meta = m
            .meta
            .ok_or_else(|| runtime("force_rport: no transport information"))?;
        let msg = m.edit("force_rport")?;
        msg.stamp_received_rport(meta.source, true)
            .map_err(|e| runtime(format!("force_rport: {e}")))?;
        Ok(())
    });
}

/// Adds this module's functions to the `sip` table (none yet: every NAT primitive works on a
/// request).
pub(super) fn install(_lua: &Lua, _sip: &Table) -> mlua::Result<()> {
    Ok(())
}
