//! Flood and abuse protection primitives over [`crate::flood`]:
//! - `sip.pike_check(ip)` and `req:pike_check()`: count one request of a source in the shared
//!   rate limiter ([`crate::flood::pike`]); true when the source is over the limit.
//! - `req:sanity()`: the request checks of [`crate::flood::sanity`]; `true`, or
//!   `false, reason, code`.

use std::net::IpAddr;
use std::time::Instant;

use mlua::{Lua, MultiValue, Table, UserDataMethods, Value};

use super::{env, runtime, Role, ScriptMsg};

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
    methods.add_method("sanity", |lua, m, ()| {
        if !m.msg.is_request() {
            return Err(runtime("sanity: only requests are checked"));
        }
        Ok(match crate::flood::sanity::check(&m.msg) {
            Ok(()) => MultiValue::from_vec(vec![Value::Boolean(true)]),
            Err(insane) => MultiValue::from_vec(vec![
                Value::Boolean(false),
                Value::String(lua.create_string(&insane.reason)?),
                Value::Integer(i64::from(insane.code)),
            ]),
        })
    });
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
