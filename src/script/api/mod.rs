//! What a script sees: the message object passed to the hooks (`req`, `res`, `branch`) and the
//! global `sip` table. Every primitive is documented, with an example, in `docs/scripting.md`;
//! the names follow Kamailio's (`t_relay`, `record_route`, `loose_route`, `lookup`, `save`,
//! `has_totag`...) so a route block translates line by line.
//!
//! A message object lives for one hook call: the engine moves the message in, calls the hook,
//! and takes it back out, so a script that keeps `req` in a global finds it empty later
//! (an error, not a dangling pointer). Decisions (`reply`, `t_relay`, `forward`, `redirect`,
//! `drop`...) are recorded here and carried out by the engine after the hook returns; a
//! second decision in the same call is an error, so a forgotten `return` cannot relay a
//! request that was already answered.

use std::borrow::Cow;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mlua::{Lua, Table, UserData, UserDataFields, UserDataMethods, Value, Variadic};
use tracing::{debug, error, info, warn};

mod auth;
pub mod dialog;
pub(crate) mod dispatcher;
mod flood;
mod metrics;
pub mod names;
mod nat;
pub mod re;
pub mod time;
pub(crate) mod tm;

use super::engine::{Env, LogSink};
use super::kv::{KvError, KvValue};
use crate::proxy::response_context::Target;
use crate::proxy::router::{Decision, FailureTimers, RouteInfo};
use crate::proxy::Verdict;
use crate::sip::{Host, Message, Method, Uri};
use crate::transport::Meta;

/// Which hook a message object belongs to: what it may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `req` in `on_request`: every primitive.
    Request,
    /// `req` in `on_failure`: may add targets (`t_relay`, `fork`, `lookup`), answer with a
    /// failure of its own (`reply` 300-699), and edit the Request-URI and headers the new
    /// branches copy.
    Failure,
    /// `req` in `on_reply` and `on_branch`: read-only.
    View,
    /// `branch` in `on_branch`: Request-URI and header edits, `drop`.
    Branch,
    /// `res` in `on_reply` and `on_failure`: read-only, `drop` (provisional only); in
    /// `on_reply` also `fix_nated_contact`.
    Response,
}

/// The message object of one hook call.
pub struct ScriptMsg {
    pub msg: Message,
    pub role: Role,
    pub meta: Option<Meta>,
    pub info: RouteInfo,
    pub vars: Option<Table>,
    /// What the script decided, and which primitive decided it (for the error message).
    pub decision: Option<(Decision, &'static str)>,
    /// The target set (§16.5): `lookup` fills it, `t_relay()` relays to it.
    pub targets: Vec<Target>,
    pub record_route: bool,
    /// The message was edited (a branch copy is only rebuilt when it was).
    pub edited: bool,
    /// `drop()` on a response or branch.
    pub dropped: bool,
    /// What `req:authorize` found in this call (digest authentication, `auth`).
    pub auth: Option<crate::auth::Verdict>,
    /// `req:nat_detect()` found the sender behind a NAT in this call (`nat`).
    pub nated: bool,
    /// `res` in `on_reply`: where its branch's request was sent (`res:nat_detect()`).
    pub sent_to: Option<std::net::SocketAddr>,
    /// `req` in `on_request`: the Route values the request had when the hook began (after
    /// §16.4), unless they continue a route set this server issued (`loose_route()`): a route
    /// the sender pre-loaded. The engine does not follow it unless the script calls
    /// `req:follow_preloaded_route()` (`script::router`, `proxy::request::remove_preloaded_route`).
    pub preloaded_route: Vec<Bytes>,
    /// `req:follow_preloaded_route()` was called.
    pub follows_preloaded_route: bool,
    /// `req:t_set_fr()`: the failure timers of the branches the decision starts (`tm`).
    pub timers: FailureTimers,
    /// `req.du`: where the branches the decision starts are sent (`tm`).
    pub du: Option<Bytes>,
    /// `res` in `on_failure`: how each branch ended (`res.branches`, `tm`).
    pub branches: Option<Vec<crate::proxy::response_context::BranchOutcome>>,
    /// `res` in `on_branch_failure`: how its branch ended (`res.branch`, `tm`).
    pub branch: Option<crate::proxy::response_context::BranchOutcome>,
}

impl ScriptMsg {
    pub fn new(msg: Message, role: Role) -> ScriptMsg {
        ScriptMsg {
            msg,
            role,
            meta: None,
            info: RouteInfo::default(),
            vars: None,
            decision: None,
            targets: Vec::new(),
            record_route: false,
            edited: false,
            dropped: false,
            auth: None,
            nated: false,
            sent_to: None,
            preloaded_route: Vec::new(),
            follows_preloaded_route: false,
            timers: FailureTimers::default(),
            du: None,
            branches: None,
            branch: None,
        }
    }

    fn decide(&mut self, decision: Decision, primitive: &'static str) -> mlua::Result<()> {
        if let Some((_, earlier)) = &self.decision {
            return Err(runtime(format!(
                "req:{primitive}: the request was already handled by req:{earlier} (return after a decision)"
            )));
        }
        self.decision = Some((decision, primitive));
        Ok(())
    }

    fn require(&self, allowed: &[Role], primitive: &str) -> mlua::Result<()> {
        if allowed.contains(&self.role) {
            return Ok(());
        }
        let place = match self.role {
            Role::Request => "on_request",
            Role::Failure => "on_failure",
            Role::View => "this hook (the request is read-only here)",
            Role::Branch => "on_branch (use it on req in on_request)",
            Role::Response => "a response",
        };
        Err(runtime(format!("{primitive} is not available in {place}")))
    }

    fn edit(&mut self, primitive: &str) -> mlua::Result<&mut Message> {
        self.require(&[Role::Request, Role::Failure, Role::Branch], primitive)?;
        self.edited = true;
        Ok(&mut self.msg)
    }

    /// `test` of the URI `text` (false when it does not parse). The shipped script asks
    /// `req:is_myself(req.ruri)` and `req:is_myself(req.from_uri)`: when `text` is the
    /// message's own Request-URI or From URI, the parse the message keeps is used instead of
    /// parsing the text again.
    fn uri_is(&self, text: &[u8], test: impl FnOnce(&Uri<'_>) -> bool) -> bool {
        if self.msg.request_uri_bytes() == Some(text) {
            if let Ok(uri) = self.msg.request_uri() {
                return test(&uri);
            }
        } else if let Ok(from) = self.msg.from() {
            if from.uri.raw() == text {
                return test(&from.uri);
            }
        }
        Uri::parse(text).is_ok_and(|uri| test(&uri))
    }

    fn ruri_parts(&self) -> Option<RuriParts> {
        let uri = self.msg.request_uri().ok()?;
        let sip = uri.as_sip()?;
        Some(RuriParts {
            secure: sip.secure,
            user: sip.user.map(|u| String::from_utf8_lossy(u).into_owned()),
            password: sip
                .password
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            host: sip.host.to_string(),
            port: sip.port,
            params: String::from_utf8_lossy(sip.params.raw()).into_owned(),
            headers: sip.headers.map(|h| String::from_utf8_lossy(h).into_owned()),
        })
    }

    fn set_ruri(&mut self, uri: &str, primitive: &str) -> mlua::Result<()> {
        let uri = sip_uri(uri, primitive)?;
        self.edit(primitive)?
            .set_request_uri(&uri)
            .map_err(|e| runtime(format!("{primitive}: {e}")))
    }

    fn edit_ruri(
        &mut self,
        primitive: &str,
        change: impl FnOnce(&mut RuriParts),
    ) -> mlua::Result<()> {
        let mut parts = self
            .ruri_parts()
            .ok_or_else(|| runtime(format!("{primitive}: the Request-URI is not a SIP URI")))?;
        change(&mut parts);
        self.set_ruri(&parts.to_string(), primitive)
    }
}

/// A SIP Request-URI taken apart for `req.ruri_user = ...` and friends.
struct RuriParts {
    secure: bool,
    user: Option<String>,
    password: Option<String>,
    host: String,
    port: Option<u16>,
    params: String,
    headers: Option<String>,
}

impl std::fmt::Display for RuriParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.secure { "sips:" } else { "sip:" })?;
        if let Some(user) = &self.user {
            f.write_str(user)?;
            if let Some(password) = &self.password {
                write!(f, ":{password}")?;
            }
            f.write_str("@")?;
        }
        f.write_str(&self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        f.write_str(&self.params)?;
        if let Some(headers) = &self.headers {
            write!(f, "?{headers}")?;
        }
        Ok(())
    }
}

/// The state's [`Env`], set by [`install`].
fn env<'a>(lua: &'a Lua, primitive: &str) -> mlua::Result<mlua::AppDataRef<'a, Env>> {
    lua.app_data_ref::<Env>()
        .ok_or_else(|| runtime(format!("{primitive}: no engine environment")))
}

pub fn runtime(message: impl Into<String>) -> mlua::Error {
    mlua::Error::runtime(message.into())
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks that `uri` is a sip: or sips: URI; returns it as bytes.
fn sip_uri(uri: &str, primitive: &str) -> mlua::Result<Vec<u8>> {
    let uri = uri.trim();
    let trimmed = uri
        .strip_prefix('<')
        .and_then(|u| u.strip_suffix('>'))
        .unwrap_or(uri);
    match Uri::parse(trimmed.as_bytes()) {
        Ok(parsed) if parsed.as_sip().is_some() => Ok(trimmed.as_bytes().to_vec()),
        _ => Err(runtime(format!(
            "{primitive}: {uri:?} is not a sip: or sips: URI"
        ))),
    }
}

/// Headers the engine owns: editing them would break transaction matching (§17.2.3),
/// response routing (§18.2.2) or framing.
const MANAGED_HEADERS: &[&str] = &[
    "via",
    "v",
    "call-id",
    "i",
    "cseq",
    "from",
    "f",
    "to",
    "t",
    "content-length",
    "l",
    "max-forwards",
];

fn editable_header(name: &str, primitive: &str) -> mlua::Result<()> {
    let valid = !name.is_empty() && name.bytes().all(crate::sip::scan::is_token_char);
    if !valid {
        return Err(runtime(format!(
            "{primitive}: {name:?} is not a header name"
        )));
    }
    if MANAGED_HEADERS.iter().any(|m| m.eq_ignore_ascii_case(name)) {
        return Err(runtime(format!(
            "{primitive}: {name} is managed by the engine and cannot be changed"
        )));
    }
    Ok(())
}

fn header_value(value: &str, primitive: &str) -> mlua::Result<()> {
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(runtime(format!(
            "{primitive}: a header value may not contain CR, LF or NUL"
        )));
    }
    Ok(())
}

/// Targets from a Lua value: a URI string, a list of URIs, or a list of `{uri=, q=}`.
fn targets_from(value: Value, primitive: &str) -> mlua::Result<Vec<Target>> {
    let one = |uri: &str, q: u16| -> mlua::Result<Target> {
        Ok(Target::new(Bytes::from(sip_uri(uri, primitive)?), q))
    };
    match value {
        Value::Nil => Ok(Vec::new()),
        Value::String(s) => Ok(vec![one(&s.to_str()?, 1000)?]),
        Value::Table(list) => {
            let mut targets = Vec::new();
            for item in list.sequence_values::<Value>() {
                match item? {
                    Value::String(s) => targets.push(one(&s.to_str()?, 1000)?),
                    Value::Table(t) => {
                        let uri: String = t.get("uri")?;
                        let q: Option<f64> = t.get("q")?;
                        let q = q.map_or(1000, |q| (q.clamp(0.0, 1.0) * 1000.0).round() as u16);
                        targets.push(one(&uri, q)?);
                    }
                    other => {
                        return Err(runtime(format!(
                            "{primitive}: a target must be a URI string or {{uri=..., q=...}}, not a {}",
                            other.type_name()
                        )))
                    }
                }
            }
            Ok(targets)
        }
        other => Err(runtime(format!(
            "{primitive}: expected a URI or a list of URIs, not a {}",
            other.type_name()
        ))),
    }
}

/// `q` as the decimal of a Contact parameter (§20.10).
fn q_param(q: u16) -> String {
    let mut s = format!("{:.3}", f64::from(q) / 1000.0);
    while s.ends_with('0') {
        s.pop();
    }
    if s.ends_with('.') {
        s.push('0');
    }
    s
}

fn extra_headers(value: Option<Table>, primitive: &str) -> mlua::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    let Some(table) = value else {
        return Ok(headers);
    };
    for pair in table.pairs::<String, String>() {
        let (name, value) = pair?;
        editable_header(&name, primitive)?;
        header_value(&value, primitive)?;
        headers.push((name, value));
    }
    headers.sort();
    Ok(headers)
}

impl UserData for ScriptMsg {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("method", |_, m| {
            Ok(m.msg.method().map(|x| x.as_str().to_owned()))
        });
        fields.add_field_method_get("status", |_, m| Ok(m.msg.status()));
        fields.add_field_method_get("reason", |_, m| Ok(m.msg.reason().map(lossy)));
        fields.add_field_method_get("ruri", |_, m| Ok(m.msg.request_uri_bytes().map(lossy)));
        fields.add_field_method_set("ruri", |_, m, uri: String| m.set_ruri(&uri, "req.ruri"));
        fields.add_field_method_get("ruri_user", |_, m| Ok(m.ruri_parts().and_then(|p| p.user)));
        fields.add_field_method_set("ruri_user", |_, m, user: Option<String>| {
            m.edit_ruri("req.ruri_user", |p| {
                p.user = user;
                if p.user.is_none() {
                    p.password = None;
                }
            })
        });
        fields.add_field_method_get("ruri_host", |_, m| Ok(m.ruri_parts().map(|p| p.host)));
        fields.add_field_method_set("ruri_host", |_, m, host: String| {
            m.edit_ruri("req.ruri_host", |p| p.host = host)
        });
        fields.add_field_method_get("ruri_port", |_, m| Ok(m.ruri_parts().and_then(|p| p.port)));
        fields.add_field_method_set("ruri_port", |_, m, port: Option<u16>| {
            m.edit_ruri("req.ruri_port", |p| p.port = port)
        });
        fields.add_field_method_get("from_uri", |_, m| {
            Ok(m.msg.from().ok().map(|n| lossy(n.uri.raw())))
        });
        fields.add_field_method_get("from_user", |_, m| {
            Ok(m.msg.from().ok().and_then(|n| uri_user(&n.uri)))
        });
        fields.add_field_method_get("from_domain", |_, m| {
            Ok(m.msg.from().ok().and_then(|n| uri_domain(&n.uri)))
        });
        fields.add_field_method_get("from_tag", |_, m| Ok(m.msg.from_tag().map(lossy)));
        fields.add_field_method_get("to_uri", |_, m| {
            Ok(m.msg.to().ok().map(|n| lossy(n.uri.raw())))
        });
        fields.add_field_method_get("to_user", |_, m| {
            Ok(m.msg.to().ok().and_then(|n| uri_user(&n.uri)))
        });
        fields.add_field_method_get("to_domain", |_, m| {
            Ok(m.msg.to().ok().and_then(|n| uri_domain(&n.uri)))
        });
        fields.add_field_method_get("to_tag", |_, m| Ok(m.msg.to_tag().map(lossy)));
        fields.add_field_method_get("call_id", |_, m| Ok(m.msg.call_id().ok().map(lossy)));
        fields.add_field_method_get("cseq", |_, m| Ok(m.msg.cseq().ok().map(|c| c.seq)));
        fields.add_field_method_get("cseq_method", |_, m| {
            Ok(m.msg.cseq().ok().map(|c| c.method.as_str().to_owned()))
        });
        fields.add_field_method_get("src_ip", |lua, m| {
            m.meta
                .map(|x| match x.source.ip() {
                    // Read for every request by the shipped script: written without `fmt`.
                    ip @ IpAddr::V4(_) => Host::Ip(ip).with_text(|text| lua.create_string(text)),
                    ip => lua.create_string(ip.to_string()),
                })
                .transpose()
        });
        fields.add_field_method_get("src_port", |_, m| Ok(m.meta.map(|x| x.source.port())));
        fields.add_field_method_get("transport", |_, m| {
            Ok(m.meta.map(|x| x.kind.scheme().to_owned()))
        });
        fields.add_field_method_get("body", |lua, m| lua.create_string(m.msg.body().as_ref()));
        fields.add_field_method_get("vars", |_, m| Ok(m.vars.clone()));
        tm::add_fields(fields);
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        add_accessors(methods);
        add_edits(methods);
        add_decisions(methods);
        add_location(methods);
        auth::add_methods(methods);
        nat::add_methods(methods);
        flood::add_methods(methods);
        dialog::add_methods(methods);
        dispatcher::add_methods(methods);
        tm::add_methods(methods);
    }
}

fn add_accessors<M: UserDataMethods<ScriptMsg>>(methods: &mut M) {
    methods.add_method("header", |_, m, name: String| {
        Ok(m.msg.headers_named(&name).next().map(lossy))
    });
    methods.add_method("headers", |lua, m, name: String| {
        lua.create_sequence_from(m.msg.headers_named(&name).map(lossy))
    });
    methods.add_method("has_to_tag", |_, m, ()| Ok(m.msg.to_tag().is_some()));
    methods.add_method("is_method", |_, m, names: Variadic<String>| {
        let method = m.msg.method().map(Method::as_str).unwrap_or_default();
        Ok(names.iter().any(|n| n.eq_ignore_ascii_case(method)))
    });
    methods.add_method("is_myself", |lua, m, uri: String| {
        let env = env(lua, "is_myself")?;
        let trimmed = uri.trim().trim_start_matches('<').trim_end_matches('>');
        Ok(m.uri_is(trimmed.as_bytes(), |u| env.identity.is_myself(u)))
    });
    methods.add_method("targets", |lua, m, ()| {
        let list = lua.create_table()?;
        for target in &m.targets {
            let t = lua.create_table()?;
            t.set("uri", lossy(&target.uri))?;
            t.set("q", f64::from(target.q) / 1000.0)?;
            list.push(t)?;
        }
        Ok(list)
    });
    methods.add_meta_method("__tostring", |_, m, ()| {
        Ok(String::from_utf8_lossy(m.msg.start_line()).into_owned())
    });
    // Reached only when no field or method has the name (mlua looks in those first): a
    // misspelt field is an error at the script's line, not a silent nil.
    methods.add_meta_method(mlua::MetaMethod::Index, |_, m, key: Value| {
        Err::<(), _>(names::unknown_field(m.role, &key))
    });
}

/// The user part of a From/To URI (Kamailio's `$fU`/`$tU`): a SIP URI's user, or a tel URI's
/// number (RFC 3966), as written (no unescaping).
fn uri_user(uri: &Uri<'_>) -> Option<String> {
    match uri {
        Uri::Sip(sip) => sip.user.map(lossy),
        Uri::Tel(tel) => Some(lossy(tel.number)),
        _ => None,
    }
}

/// The host part of a From/To SIP URI (`$fd`/`$td`), without port.
fn uri_domain(uri: &Uri<'_>) -> Option<String> {
    uri.as_sip().map(|sip| sip.host.to_string())
}

fn add_edits<M: UserDataMethods<ScriptMsg>>(methods: &mut M) {
    methods.add_method_mut("append_header", |_, m, (name, value): (String, String)| {
        editable_header(&name, "append_header")?;
        header_value(&value, "append_header")?;
        m.edit("append_header")?
            .append_header(&name, value.as_bytes())
            .map_err(|e| runtime(format!("append_header: {e}")))
    });
    methods.add_method_mut("set_header", |_, m, (name, value): (String, String)| {
        editable_header(&name, "set_header")?;
        header_value(&value, "set_header")?;
        m.edit("set_header")?
            .set_header(&name, value.as_bytes())
            .map_err(|e| runtime(format!("set_header: {e}")))
    });
    methods.add_method_mut("remove_header", |_, m, name: String| {
        editable_header(&name, "remove_header")?;
        Ok(m.edit("remove_header")?.remove_headers(&name))
    });
    methods.add_method_mut("record_route", |_, m, ()| {
        m.require(&[Role::Request], "record_route")?;
        m.record_route = true;
        Ok(())
    });
    methods.add_method("loose_route", |_, m, ()| {
        m.require(&[Role::Request], "loose_route")?;
        Ok(loose_route(m))
    });
    methods.add_method_mut("follow_preloaded_route", |_, m, ()| {
        m.require(&[Role::Request], "follow_preloaded_route")?;
        m.follows_preloaded_route = true;
        Ok(!m.preloaded_route.is_empty())
    });
}

/// `loose_route()`: true only when the request came with a Route set this proxy issued for
/// its dialog: §16.4 removed our entry, and its signature (`proxy::route_sign`) matches this
/// request's dialog, Request-URI host and port and remaining Route, and has not expired (an
/// expired one still routes a BYE, so the dialog can end). A Route naming us without such a
/// signature is not followed (else anyone could relay anywhere with a To tag and
/// `Route: <sip:us;lr>`), and one `info` line says why. A Route set that does not start with us
/// is not ours to follow either.
fn loose_route(m: &ScriptMsg) -> bool {
    let info = m.info;
    let call_id = String::from_utf8_lossy(m.msg.call_id().unwrap_or_default());
    match (info.signature, info.own_route_signed) {
        (Verdict::Expired { ago_secs }, true) => info!(
            %call_id, ago_secs,
            "loose_route: Record-Route signature expired {ago_secs} s ago; the BYE is still routed so the dialog can end"
        ),
        (Verdict::Legacy { .. }, true) => info!(
            %call_id,
            "loose_route: Record-Route signature in the old format (no expiry, no target); the BYE is routed during the upgrade grace period"
        ),
        (_, true) => {}
        (Verdict::Expired { ago_secs }, false) => info!(
            %call_id, ago_secs,
            "loose_route: Record-Route signature expired {ago_secs} s ago ([proxy] record_route_lifetime_secs): not loose-routed, only a BYE would be"
        ),
        (Verdict::Legacy { in_grace }, false) => info!(
            %call_id, in_grace,
            "loose_route: Record-Route signature in the old format (no expiry, no target): not loose-routed, only a BYE would be, and only within record_route_lifetime_secs of the server's start"
        ),
        (Verdict::Mismatch, false) => info!(
            %call_id,
            "loose_route: Route signature does not match this request's dialog, Request-URI host and port or remaining Route (forged, another dialog's, or its peer moved by a target refresh): not loose-routed"
        ),
        (Verdict::Unsigned, false) => info!(
            %call_id,
            "loose_route: Route names this server without a signature, not issued by us: not loose-routed"
        ),
        (Verdict::NotOurs | Verdict::Valid, false) => {
            if info.had_route {
                debug!(
                    %call_id,
                    "loose_route: the top Route does not name this proxy, not loose-routed"
                );
            }
        }
    }
    info.own_route_signed
}

fn add_decisions<M: UserDataMethods<ScriptMsg>>(methods: &mut M) {
    methods.add_method_mut(
        "reply",
        |_, m, (code, reason, headers): (u16, Option<String>, Option<Table>)| {
            m.require(&[Role::Request, Role::Failure], "reply")?;
            final_status(code)?;
            if m.role == Role::Failure && code < 300 {
                // §16.7 step 6: the proxy may choose the final it sends for a failed branch
                // set, but a 2xx (or a provisional) would claim a call no branch accepted.
                return Err(runtime(format!(
                    "reply: on_failure answers with a failure (300-699), not {code}"
                )));
            }
            if m.msg.method() == Some(&Method::Ack) {
                return Err(runtime("reply: an ACK is never answered (§17.1.1.3)"));
            }
            let reason = reason.unwrap_or_else(|| default_reason(code).to_owned());
            header_value(&reason, "reply")?;
            let headers = extra_headers(headers, "reply")?;
            m.decide(
                Decision::Reply {
                    code,
                    reason: Cow::Owned(reason),
                    headers,
                    wait_for: None,
                },
                "reply",
            )
        },
    );
    methods.add_method_mut("t_relay", |_, m, targets: Value| {
        m.require(&[Role::Request, Role::Failure], "t_relay")?;
        let mut targets = targets_from(targets, "t_relay")?;
        if targets.is_empty() {
            targets = m.targets.clone();
        }
        if targets.is_empty() && m.role == Role::Failure {
            // In a failure route the Request-URI may have been rewritten (voicemail...).
            let uri = m.msg.request_uri_bytes().map(|u| m.msg.share(u));
            targets.extend(uri.map(|uri| Target::new(uri, 1000)));
        }
        let record_route = m.record_route;
        m.decide(
            Decision::Relay {
                targets,
                record_route,
                timers: FailureTimers::default(),
            },
            "t_relay",
        )
    });
    methods.add_method_mut("fork", |_, m, (uris, options): (Value, Option<Table>)| {
        m.require(&[Role::Request, Role::Failure], "fork")?;
        let mode: Option<String> = match &options {
            Some(o) => o.get("mode")?,
            None => None,
        };
        let mut targets = targets_from(uris, "fork")?;
        if targets.is_empty() {
            return Err(runtime("fork: no targets given"));
        }
        match mode.as_deref().unwrap_or("parallel") {
            "parallel" => targets.iter_mut().for_each(|t| t.q = 1000),
            "serial" => {
                // Decreasing q values: one target per serial group (§8.1.3.4 grouping).
                for (i, target) in targets.iter_mut().enumerate() {
                    target.q = 1000u16.saturating_sub(i as u16).max(1);
                }
            }
            other => {
                return Err(runtime(format!(
                    "fork: mode must be \"parallel\" or \"serial\", not {other:?}"
                )))
            }
        }
        let record_route = m.record_route;
        m.decide(
            Decision::Relay {
                targets,
                record_route,
                timers: FailureTimers::default(),
            },
            "fork",
        )
    });
    methods.add_method_mut("forward", |_, m, uri: Option<String>| {
        m.require(&[Role::Request], "forward")?;
        // forward(uri): `uri` is the next hop only (Kamailio's $du), the Request-URI stays.
        // forward() after lookup(): the first contact becomes the Request-URI, as t_relay does.
        let target = match uri {
            Some(uri) => Some(Bytes::from(sip_uri(&uri, "forward")?)),
            None => {
                if let Some(first) = m.targets.first().map(|t| t.uri.clone()) {
                    m.set_ruri(&String::from_utf8_lossy(&first), "forward")?;
                }
                None
            }
        };
        let record_route = m.record_route;
        m.decide(
            Decision::Forward {
                target,
                record_route,
            },
            "forward",
        )
    });
    methods.add_method_mut("redirect", |_, m, code: Option<u16>| {
        m.require(&[Role::Request], "redirect")?;
        let code = code.unwrap_or(302);
        if !(300..=399).contains(&code) {
            return Err(runtime(format!("redirect: {code} is not a 3xx code")));
        }
        if m.targets.is_empty() {
            return Err(runtime(
                "redirect: the target set is empty (check what req:lookup() returned)",
            ));
        }
        let mut targets = m.targets.clone();
        targets.sort_by_key(|t| std::cmp::Reverse(t.q));
        let headers = targets
            .iter()
            .map(|t| {
                let uri = String::from_utf8_lossy(&t.uri);
                let value = match t.q {
                    1000 => format!("<{uri}>"),
                    q => format!("<{uri}>;q={}", q_param(q)),
                };
                ("Contact".to_owned(), value)
            })
            .collect();
        m.decide(
            Decision::Reply {
                code,
                reason: Cow::Borrowed(default_reason(code)),
                headers,
                wait_for: None,
            },
            "redirect",
        )
    });
    methods.add_method_mut("drop", |_, m, reason: Option<String>| match m.role {
        Role::Request => {
            if let Some(reason) = &reason {
                header_value(reason, "drop")?;
            }
            let reason = reason.map(Cow::Owned);
            m.decide(Decision::Drop { reason }, "drop")
        }
        Role::Response | Role::Branch => {
            m.dropped = true;
            Ok(())
        }
        _ => Err(runtime("drop is not available here")),
    });
}

fn add_location<M: UserDataMethods<ScriptMsg>>(methods: &mut M) {
    methods.add_method_mut(
        "lookup",
        |lua, m, (_table, uri): (Option<String>, Option<String>)| {
            m.require(&[Role::Request, Role::Failure], "lookup")?;
            let env = env(lua, "lookup")?;
            let aor = match uri {
                Some(uri) => uri,
                None => m.msg.request_uri_bytes().map(lossy).unwrap_or_default(),
            };
            // -1: the location store could not answer (a shared Redis unreachable); the
            // script answers 503, never a 404 that would make the caller give up.
            match env.services.try_location_lookup(&aor, env.services.now()) {
                Ok(bindings) => {
                    m.targets = bindings;
                    Ok(m.targets.len() as i64)
                }
                Err(error) => {
                    tracing::debug!(target: "moonroute::location", %aor, %error, "lookup: the location store could not answer");
                    m.targets = Vec::new();
                    Ok(-1)
                }
            }
        },
    );
    methods.add_method_mut("save", |lua, m, _table: Option<String>| {
        m.require(&[Role::Request], "save")?;
        if m.msg.method() != Some(&Method::Register) {
            return Err(runtime("save: only a REGISTER can be saved"));
        }
        let env = env(lua, "save")?;
        let meta = m
            .meta
            .ok_or_else(|| runtime("save: no transport information"))?;
        let decision = env
            .services
            .registrar_save(&m.msg, &meta, m.nated, env.services.now());
        let code = match &decision {
            Decision::Reply { code, .. } => *code,
            _ => 500,
        };
        m.decide(decision, "save")?;
        Ok(code)
    });
}

/// The status codes `req:reply` takes: a final answer, 200-699 (RFC 3261 §21). The reply is
/// the request's decision, its only answer from here: a provisional one (§21.1) would leave
/// the caller without a final response and the server transaction in Proceeding, which no
/// timer ends (§17.2.1, §17.2.2). The transaction layer sends `100 Trying` itself (§16.2,
/// §17.2.1); ringing and progress (18x) come from the callee through `req:t_relay()`.
fn final_status(code: u16) -> mlua::Result<()> {
    match code {
        200..=699 => Ok(()),
        100 => Err(runtime(
            "reply: 100 Trying is the transaction layer's: the engine sends it for every relayed INVITE",
        )),
        101..=199 => Err(runtime(format!(
            "reply: {code} is provisional, and req:reply is the request's only answer: give a final one (200-699); the callee's 18x pass through req:t_relay()"
        ))),
        _ => Err(runtime(format!(
            "reply: {code} is not a final status code (200-699)"
        ))),
    }
}

/// The reason phrases of RFC 3261 §21 for the codes a script is likely to send.
pub fn default_reason(code: u16) -> &'static str {
    match code {
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        182 => "Queued",
        183 => "Session Progress",
        200 => "OK",
        202 => "Accepted",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Moved Temporarily",
        305 => "Use Proxy",
        380 => "Alternative Service",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        410 => "Gone",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        423 => "Interval Too Brief",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        484 => "Address Incomplete",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        600 => "Busy Everywhere",
        603 => "Decline",
        604 => "Does Not Exist Anywhere",
        606 => "Not Acceptable",
        _ => match code / 100 {
            1 => "Trying",
            2 => "OK",
            3 => "Redirection",
            4 => "Client Error",
            5 => "Server Error",
            _ => "Global Failure",
        },
    }
}

// ----- the `sip` table ---------------------------------------------------------------------

/// Installs `sip` (log, kv) and replaces `print` with `sip.log("info", ...)`.
pub fn install(lua: &Lua, script: Rc<str>, env: Env) -> mlua::Result<()> {
    let sip = lua.create_table()?;
    let log_script = script.clone();
    let log = lua.create_function(move |lua, (level, parts): (String, Variadic<Value>)| {
        write_log(lua, &log_script, &level, &parts)
    })?;
    sip.set("log", log)?;
    let print_script = script.clone();
    let print = lua.create_function(move |lua, parts: Variadic<Value>| {
        write_log(lua, &print_script, "info", &parts)
    })?;
    lua.globals().set("print", print)?;
    sip.set("kv", kv_table(lua)?)?;
    sip.set("resolve", resolve_function(lua)?)?;
    auth::install(lua, &sip)?;
    nat::install(lua, &sip)?;
    flood::install(lua, &sip)?;
    dialog::install(lua, &sip)?;
    metrics::install(lua, &sip)?;
    dispatcher::install(lua, &sip)?;
    re::install(lua, &sip)?;
    time::install(lua, &sip)?;
    lua.globals().set("sip", sip)?;
    lua.set_app_data(env);
    Ok(())
}

/// A DNS query `sip.resolve` hands to the engine by yielding it (see [`resolve_function`]).
pub struct ResolveRequest(pub crate::dns::Query);

impl UserData for ResolveRequest {}

/// `sip.resolve(uri)`: the ordered RFC 3263 targets of `uri`'s next hop. The query is built in
/// Rust (a bad URI is an error at the script's line) and yielded to the engine, which
/// suspends the hook without blocking the loop and resumes it with the answer: a list of
/// `{transport, host, port, uri}` tables, or `nil, message`. Only `on_request` may call it,
/// since only it runs in a coroutine the engine owns.
fn resolve_function(lua: &Lua) -> mlua::Result<mlua::Function> {
    let query = lua.create_function(|_, uri: mlua::LuaString| {
        let hop = crate::proxy::request::next_hop_of_uri(&uri.as_bytes()).map_err(|e| {
            mlua::Error::runtime(format!("sip.resolve: not a SIP URI with a host: {e}"))
        })?;
        Ok(ResolveRequest(crate::dns::Query {
            host: hop.host,
            port: hop.port,
            transport: hop.transport,
            secure: hop.secure,
        }))
    })?;
    lua.load(
        r#"
        local query, yield, yieldable = ...
        return function(uri)
            if not yieldable() then
                error("sip.resolve: only on_request may resolve (it waits for DNS)", 2)
            end
            return yield(query(uri))
        end
        "#,
    )
    .set_name("=sip.resolve")
    .call((
        query,
        lua.globals()
            .get::<Table>("coroutine")?
            .get::<mlua::Function>("yield")?,
        lua.globals()
            .get::<Table>("coroutine")?
            .get::<mlua::Function>("isyieldable")?,
    ))
}

/// What `sip.resolve` returns for `answer`: a list of target tables, or `nil, message`.
pub fn resolve_answer(
    lua: &Lua,
    answer: &Result<Vec<crate::dns::Candidate>, crate::dns::ResolveError>,
) -> mlua::Result<mlua::MultiValue> {
    let candidates = match answer {
        Ok(candidates) => candidates,
        Err(error) => {
            return Ok(mlua::MultiValue::from_vec(vec![
                Value::Nil,
                Value::String(lua.create_string(error.to_string())?),
            ]))
        }
    };
    let list = lua.create_table_with_capacity(candidates.len(), 0)?;
    for candidate in candidates {
        let entry = lua.create_table_with_capacity(0, 4)?;
        let transport = candidate.kind.scheme();
        entry.set("transport", transport)?;
        entry.set("host", candidate.addr.ip().to_string())?;
        entry.set("port", candidate.addr.port())?;
        // SocketAddr's Display brackets IPv6, as a SIP hostport needs (RFC 3261 §25.1).
        let uri = format!("sip:{};transport={transport}", candidate.addr);
        entry.set("uri", uri)?;
        if let Some(name) = &candidate.tls_name {
            entry.set("tls_name", name.as_ref())?;
        }
        list.push(entry)?;
    }
    Ok(mlua::MultiValue::from_vec(vec![Value::Table(list)]))
}

fn write_log(lua: &Lua, script: &str, level: &str, parts: &[Value]) -> mlua::Result<()> {
    let mut text = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(&part.to_string()?);
    }
    let line = lua
        .inspect_stack(1, |d| d.current_line())
        .flatten()
        .unwrap_or(0);
    let place = format!("{script}:{line}");
    let sink = lua
        .app_data_ref::<Env>()
        .map(|e| e.log.clone())
        .unwrap_or_default();
    match sink {
        LogSink::Capture(lines) => lines.borrow_mut().push(format!("{level} {place}: {text}")),
        LogSink::Tracing => match level {
            "debug" => debug!(script = %place, "{text}"),
            "info" | "notice" => info!(script = %place, "{text}"),
            "warn" | "warning" => warn!(script = %place, "{text}"),
            "err" | "error" | "crit" => error!(script = %place, "{text}"),
            other => {
                return Err(runtime(format!(
                    "sip.log: level must be debug, info, warn or error, not {other:?}"
                )))
            }
        },
    }
    Ok(())
}

fn kv_error(e: KvError) -> mlua::Error {
    runtime(format!("sip.kv: {e}"))
}

fn ttl_of(seconds: Option<f64>) -> mlua::Result<Option<Duration>> {
    match seconds {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 => Ok(Some(Duration::from_secs_f64(s.min(1e9)))),
        Some(s) => Err(runtime(format!(
            "sip.kv: ttl must be a positive number of seconds, not {s}"
        ))),
    }
}

fn kv_table(lua: &Lua) -> mlua::Result<Table> {
    let kv = lua.create_table()?;
    let store = |lua: &Lua| -> mlua::Result<std::sync::Arc<super::kv::KvStore>> {
        lua.app_data_ref::<Env>()
            .map(|e| e.services.kv.clone())
            .ok_or_else(|| runtime("sip.kv: no engine environment"))
    };
    kv.set(
        "get",
        lua.create_function(move |lua, key: String| {
            Ok(
                match store(lua)?
                    .try_get(&key, Instant::now())
                    .map_err(kv_error)?
                {
                    Some(KvValue::Int(i)) => Value::Integer(i),
                    Some(KvValue::Str(s)) => Value::String(lua.create_string(&s)?),
                    None => Value::Nil,
                },
            )
        })?,
    )?;
    kv.set(
        "set",
        lua.create_function(
            move |lua, (key, value, ttl): (String, Value, Option<f64>)| {
                let value = match value {
                    Value::Integer(i) => KvValue::Int(i),
                    Value::Number(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
                        KvValue::Int(n as i64)
                    }
                    Value::String(s) => KvValue::Str(s.to_str()?.to_owned()),
                    Value::Boolean(b) => KvValue::Int(i64::from(b)),
                    other => {
                        return Err(runtime(format!(
                            "sip.kv.set: values are integers or strings, not {}",
                            other.type_name()
                        )))
                    }
                };
                store(lua)?
                    .set(&key, value, ttl_of(ttl)?, Instant::now())
                    .map_err(kv_error)
            },
        )?,
    )?;
    kv.set(
        "incr",
        lua.create_function(
            move |lua, (key, by, ttl): (String, Option<i64>, Option<f64>)| {
                store(lua)?
                    .incr(&key, by.unwrap_or(1), ttl_of(ttl)?, Instant::now())
                    .map_err(kv_error)
            },
        )?,
    )?;
    kv.set(
        "delete",
        lua.create_function(move |lua, key: String| {
            store(lua)?.try_delete(&key).map_err(kv_error)
        })?,
    )?;
    kv.set(
        "ttl",
        lua.create_function(move |lua, key: String| {
            Ok(store(lua)?
                .try_ttl(&key, Instant::now())
                .map_err(kv_error)?
                .map(|d| d.as_secs_f64()))
        })?,
    )?;
    Ok(kv)
}
