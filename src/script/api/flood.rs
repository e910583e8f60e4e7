//! Flood and abuse protection primitives over [`crate::flood`]:
//! - `sip.pike_check(ip)` and `req:pike_check()`: count one request of a source in the shared
//!   rate limiter ([`crate::flood::pike`]); true when the source is over the limit.
//! - `req:sanity([flags])`: the request checks of [`crate::flood::sanity`] (Kamailio's
//!   defaults), plus the stricter ones `flags` turns on (`{invite_contact = true,
//!   via_branch = true}`); `true`, or `false, reason, code`.

use std::net::IpAddr;
use std::time::Instant;

use mlua::{Lua, MultiValue, Table, UserDataMethods, Value};

use super::{env, runtime, Role, ScriptMsg};
use crate::flood::sanity::Strict;

pub(super) fn add_methods<M: UserDataMethods<ScriptMsg>>(methods: &mut M) {
    methods.add_method("pike_check", |lua, m, ()| {
        // Only on_request counts: the other hooks see the same request again.
        m.require(&[Role::Request], "pike_check")?;
        let source = m
            .meta
            .ok_or_else(|| runtime("pike_check: no transport information"))?
            .source;
        let env = env(lua, "pike_check")?;
        Ok(env.services.pike.check(source.ip(), Instant::now()))
    });
    methods.add_method("sanity", |lua, m, flags: Option<Table>| {
        if !m.msg.is_request() {
            return Err(runtime("sanity: only requests are checked"));
        }
        let strict = flags.map(strict_checks).transpose()?.unwrap_or_default();
        Ok(match crate::flood::sanity::check_with(&m.msg, strict) {
            Ok(()) => MultiValue::from_vec(vec![Value::Boolean(true)]),
            Err(insane) => MultiValue::from_vec(vec![
                Value::Boolean(false),
                Value::String(lua.create_string(&insane.reason)?),
                Value::Integer(i64::from(insane.code)),
            ]),
        })
    });
}

/// `{invite_contact = true, via_branch = true}` as [`Strict`]; anything else in the table is
/// an error (a misspelt flag must not silently check less).
fn strict_checks(flags: Table) -> mlua::Result<Strict> {
    let mut strict = Strict::default();
    for pair in flags.pairs::<Value, Value>() {
        let (name, value) = pair?;
        let name = match &name {
            Value::String(s) => s.to_str()?.to_owned(),
            other => {
                return Err(runtime(format!(
                    "sanity: flags are named (sanity{{invite_contact = true}}), not {}",
                    other.type_name()
                )))
            }
        };
        let Value::Boolean(on) = value else {
            return Err(runtime(format!(
                "sanity: {name} is true or false, not {}",
                value.type_name()
            )));
        };
        match name.as_str() {
            "invite_contact" => strict.invite_contact = on,
            "via_branch" => strict.via_branch = on,
            _ => {
                return Err(runtime(format!(
                    "sanity: unknown flag {name:?} (invite_contact, via_branch)"
                )))
            }
        }
    }
    Ok(strict)
}

/// Adds this module's functions to the `sip` table.
pub(super) fn install(lua: &Lua, sip: &Table) -> mlua::Result<()> {
    let pike_check = lua.create_function(|lua, ip: String| {
        let ip = ip_address(&ip)?;
        let env = env(lua, "sip.pike_check")?;
        Ok(env.services.pike.check(ip, Instant::now()))
    })?;
    sip.set("pike_check", pike_check)
}

/// An IP address as `req.src_ip` gives it, IPv6 with or without brackets.
fn ip_address(text: &str) -> mlua::Result<IpAddr> {
    let trimmed = text.trim();
    let bare = trimmed
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(trimmed);
    bare.parse()
        .map_err(|_| runtime(format!("sip.pike_check: {text:?} is not an IP address")))
}
