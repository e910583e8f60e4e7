//! Digest authentication primitives (`req:auth_challenge`, `req:authorize`,
//! `req:consume_credentials`, `req:check_from`) over [`crate::auth`].
//!
//! Kamailio's `auth_challenge`/`www_challenge`/`proxy_challenge`, `auth_check`/
//! `pv_auth_check`, `consume_credentials` and `db_check_from`/`db_check_to`. The role follows
//! the method (RFC 3261 §22.1-§22.3): REGISTER is the registrar's (401, `WWW-Authenticate`,
//! `Authorization`), every other request the proxy's (407, `Proxy-Authenticate`,
//! `Proxy-Authorization`). Only `on_request` may use them.

use mlua::{Lua, MultiValue, Table, UserDataMethods, Value};
use std::borrow::Cow;
use tracing::{debug, info};

use super::{env, runtime, Role, ScriptMsg};
use crate::auth::{self, Verdict};
use crate::proxy::router::Decision;
use crate::registrar::AorRule;
use crate::sip::Method;

/// `auth_challenge(realm, algorithms)`: both optional.
type ChallengeArgs = (Option<String>, Option<Table>);

pub(super) fn add_methods<M: UserDataMethods<ScriptMsg>>(methods: &mut M) {
    methods.add_method_mut("auth_challenge", auth_challenge);
    methods.add_method_mut("authorize", |lua, m, realm: Option<String>| {
        m.require(&[Role::Request], "authorize")?;
        let realm = realm_or_default(m, realm, "authorize")?;
        let services = &env(lua, "authorize")?.services;
        let verdict = match &services.auth {
            Some(authenticator) => authenticator.authorize(&m.msg, &realm, services.now()),
            None => Verdict::Refused("no authenticator (a script run without a server)"),
        };
        log_verdict(m, &realm, &verdict);
        let result = match &verdict {
            Verdict::Authorized { user, realm, .. } => MultiValue::from_vec(vec![Value::String(
                lua.create_string(format!("{user}@{realm}"))?,
            )]),
            other => MultiValue::from_vec(vec![
                Value::Nil,
                Value::String(lua.create_string(other.reason())?),
            ]),
        };
        m.auth = Some(verdict);
        Ok(result)
    });
    methods.add_method_mut("consume_credentials", |_, m, ()| {
        m.require(&[Role::Request], "consume_credentials")?;
        let Some(Verdict::Authorized { realm, .. }) = m.auth.clone() else {
            return Ok(0);
        };
        let header = auth::Role::of(m.msg.method()).credentials_header();
        let (ours, others): (Vec<Vec<u8>>, Vec<Vec<u8>>) = m
            .msg
            .headers_named(header)
            .map(<[u8]>::to_vec)
            .partition(|value| auth::digest::realm_of(value).is_some_and(|r| r == realm));
        if ours.is_empty() {
            return Ok(0);
        }
        let msg = m.edit("consume_credentials")?;
        msg.remove_headers(header);
        // Credentials for other realms are for other proxies (§22.3): they stay.
        for value in &others {
            msg.append_header(header, value)
                .map_err(|e| runtime(format!("consume_credentials: {e}")))?;
        }
        Ok(ours.len())
    });
    methods.add_method("check_from", |lua, m, ()| {
        m.require(&[Role::Request], "check_from")?;
        let Some(Verdict::Authorized { user, domain, .. }) = &m.auth else {
            return Ok(false);
        };
        let name_addr = match m.msg.method() {
            Some(Method::Register) => m.msg.to(),
            _ => m.msg.from(),
        };
        let Ok(name_addr) = name_addr else {
            return Ok(false);
        };
        let Some(uri) = name_addr.uri.as_sip() else {
            return Ok(false);
        };
        // The AOR claimed and the subscriber's, named as the registrar names them: user parts
        // unescaped and case-sensitive, hosts not (RFC 3261 §19.1.4), our own port dropped.
        // The subscriber's domain, not the realm, is its AOR's host (they differ for a
        // subscriber added with --realm).
        let env = env(lua, "check_from")?;
        let own_rule;
        let aors = match &env.services.registrar {
            Some(registrar) => registrar.aor_rule(),
            None => {
                own_rule = AorRule::new(env.identity.clone());
                &own_rule
            }
        };
        let claimed = aors.of(&name_addr.uri);
        Ok(claimed.is_some() && claimed == aors.of_user(uri.secure, user, domain))
    });
}

/// Adds this module's functions to the `sip` table.
pub(super) fn install(_lua: &Lua, _sip: &Table) -> mlua::Result<()> {
    Ok(())
}

/// `req:auth_challenge(realm, algorithms)`: the 401/407 decision (RFC 3261 §22.1-§22.3).
fn auth_challenge(
    lua: &Lua,
    m: &mut ScriptMsg,
    (realm, algorithms): ChallengeArgs,
) -> mlua::Result<()> {
    m.require(&[Role::Request], "auth_challenge")?;
    if matches!(m.msg.method(), Some(Method::Ack | Method::Cancel)) {
        // §22.1: ACK and CANCEL are never challenged (they cannot be resubmitted).
        return Err(runtime(
            "auth_challenge: an ACK or CANCEL cannot be challenged (RFC 3261 §22.1)",
        ));
    }
    let realm = realm_or_default(m, realm, "auth_challenge")?;
    let wanted = algorithms.map(algorithm_list).transpose()?;
    let role = auth::Role::of(m.msg.method());
    let stale = m.auth == Some(Verdict::Stale);
    let services = &env(lua, "auth_challenge")?.services;
    let now = services.now();
    let challenge = match (&services.auth, &wanted) {
        (Some(authenticator), None) => authenticator.challenge(&realm, role, stale, now),
        (Some(authenticator), Some(wanted)) => {
            authenticator.challenge_offering(wanted, &realm, role, stale, now)
        }
        (None, wanted) => auth::offline_challenge(wanted.as_deref(), &realm, role, stale, now),
    };
    m.decide(
        Decision::Reply {
            code: challenge.code,
            reason: Cow::Borrowed(challenge.reason),
            headers: challenge.headers,
            wait_for: None,
        },
        "auth_challenge",
    )
}

/// `realm`, or the default: the To host for REGISTER, the From host otherwise (Kamailio's).
fn realm_or_default(m: &ScriptMsg, realm: Option<String>, primitive: &str) -> mlua::Result<String> {
    if let Some(realm) = realm {
        if realm.is_empty() || realm.chars().any(|c| c.is_control()) {
            return Err(runtime(format!("{primitive}: {realm:?} is not a realm")));
        }
        return Ok(realm);
    }
    let name_addr = match m.msg.method() {
        Some(Method::Register) => m.msg.to(),
        _ => m.msg.from(),
    };
    name_addr
        .ok()
        .and_then(|n| {
            n.uri
                .as_sip()
                .map(|u| u.host.to_string().to_ascii_lowercase())
        })
        .ok_or_else(|| {
            runtime(format!(
                "{primitive}: no realm given and the {} URI has no host",
                if m.msg.method() == Some(&Method::Register) {
                    "To"
                } else {
                    "From"
                }
            ))
        })
}

/// `auth_challenge`'s list of algorithm names (`{"MD5"}`): a non-empty sequence of
/// `"SHA-256"` or `"MD5"` (case-insensitive, RFC 2617 §3.2.1), anything else an error.
fn algorithm_list(names: Table) -> mlua::Result<Vec<auth::Algorithm>> {
    let mut algorithms = Vec::new();
    for name in names.sequence_values::<Value>() {
        let algorithm = match name? {
            Value::String(name) => name.to_str().ok().and_then(|n| auth::Algorithm::parse(&n)),
            _ => None,
        };
        match algorithm {
            Some(algorithm) => algorithms.push(algorithm),
            None => {
                return Err(runtime(
                    "auth_challenge: algorithms must be a list of \"SHA-256\" or \"MD5\"",
                ))
            }
        }
    }
    if algorithms.is_empty() {
        return Err(runtime(
            "auth_challenge: an empty list of algorithms (omit it to offer [auth] algorithms)",
        ));
    }
    Ok(algorithms)
}

/// Refusals at info (an operator looks for them), the ordinary first round at debug. The
/// credentials are never logged.
fn log_verdict(m: &ScriptMsg, realm: &str, verdict: &Verdict) {
    let source = m
        .meta
        .map(|meta| meta.source.to_string())
        .unwrap_or_default();
    let method = m.msg.method().map(Method::as_str).unwrap_or_default();
    match verdict {
        Verdict::Refused(reason) => {
            info!(%source, method, realm, reason, "authentication refused")
        }
        Verdict::Authorized {
            user, algorithm, ..
        } => debug!(%source, method, realm, user, algorithm = algorithm.name(), "authorized"),
        other => debug!(%source, method, realm, reason = other.reason(), "not authorized"),
    }
}
