//! NAT traversal primitives over [`crate::nat`] (RFC 3581; Kamailio's nathelper):
//! `req:nat_detect()`, `req:fix_nated_contact()` and `req:force_rport()` in `on_request`;
//! `res:nat_detect()` and `res:fix_nated_contact()` in `on_reply`.
//!
//! `nat_detect` and `fix_nated_contact` on a REGISTER mark the request (`ScriptMsg::nated`),
//! so that `req:save()` stores its bindings as NATed: reached through the address the
//! REGISTER came from, and kept alive (Kamailio's `fix_nated_register` + `nat_bflag`).
//!
//! On a response (Kamailio's `onreply_route { if (nat_uac_test(...)) fix_nated_contact(); }`)
//! the Contact of a UAS behind a NAT becomes the address the response came from, so the
//! caller's ACK, BYE and re-INVITEs, loose-routed through us to that remote target (§12.2.1.1,
//! §16.4), reach the NAT's mapping. RFC 3261 §16.7 lets a proxy change a response before
//! forwarding only in its Via (step 9) and Record-Route (step 9 with §16.6 step 4); rewriting
//! the Contact goes beyond it, as every NAT-traversing proxy does: the UAS's own Contact is
//! unreachable, so the dialog would not work otherwise.

use mlua::{Lua, Table, UserDataMethods};
use tracing::debug;

use super::{runtime, Role, ScriptMsg};
use crate::sip::{HeaderName, Method};

pub(super) fn add_methods<M: UserDataMethods<ScriptMsg>>(methods: &mut M) {
    methods.add_method_mut("nat_detect", |_, m, ()| {
        if m.role == Role::Response {
            return response_nat_detect(m);
        }
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
        if m.role == Role::Response {
            return response_fix_nated_contact(m);
        }
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

/// The transport information of `res` in `on_reply` (not in `on_failure`, whose response is
/// the best of the branch set, not one packet).
fn reply_source(
    m: &ScriptMsg,
    primitive: &str,
) -> mlua::Result<(crate::transport::Meta, std::net::SocketAddr)> {
    match (m.meta, m.sent_to) {
        (Some(meta), Some(sent_to)) => Ok((meta, sent_to)),
        _ => Err(runtime(format!(
            "res:{primitive} is only available in on_reply"
        ))),
    }
}

/// `res:nat_detect()`: [`crate::nat::detect_response`].
fn response_nat_detect(m: &mut ScriptMsg) -> mlua::Result<bool> {
    let (meta, sent_to) = reply_source(m, "nat_detect")?;
    let check = crate::nat::detect_response(&m.msg, meta.source, meta.kind, sent_to);
    if check.is_nated() {
        debug!(source = %meta.source, %sent_to, reasons = %check.reasons(), "UAS is behind a NAT");
        m.nated = true;
    }
    Ok(check.is_nated())
}

/// `res:fix_nated_contact()`: the first Contact of a 1xx/2xx (not to a REGISTER) gets the
/// response's source address; the engine forwards the rewritten response.
fn response_fix_nated_contact(m: &mut ScriptMsg) -> mlua::Result<bool> {
    let (meta, _) = reply_source(m, "fix_nated_contact")?;
    if !crate::nat::response_contact_is_target(&m.msg) {
        return Ok(false);
    }
    let Some(Ok(first)) = m.msg.values(HeaderName::Contact).next() else {
        return Ok(false);
    };
    let Some(fixed) = crate::nat::contact_with_source(first, meta.source) else {
        return Ok(false);
    };
    m.msg
        .set_first_value(HeaderName::Contact, &fixed)
        .map_err(|e| runtime(format!("res:fix_nated_contact: {e}")))?;
    m.edited = true;
    Ok(true)
}

/// Adds this module's functions to the `sip` table (none yet: every NAT primitive works on a
/// request).
pub(super) fn install(_lua: &Lua, _sip: &Table) -> mlua::Result<()> {
    Ok(())
}
