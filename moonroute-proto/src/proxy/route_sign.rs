//! Signed Record-Route: how this proxy recognises the Route entries it issued, for which dialog,
//! toward which of its parties, and until when (RFC 3261 §16.6 step 4, §16.7 step 8, §16.12.1.3).
//!
//! Without a signature anyone could write a To tag and `Route: <sip:proxy;lr>` on a request for
//! any host and have it relayed: in-dialog routing comes before authentication (an ACK cannot be
//! challenged), so that would be an open relay. A signature that only named the dialog would
//! still let a party of any dialog (a stranger who rang one of our users) send requests with its
//! Route to any host. So a signature binds where its holder's requests may go.
//!
//! ## The two copies of an entry
//!
//! A dialog's two parties hold different copies of our Record-Route entry (§12.1.1, §12.1.2):
//! the callee the one in the request we forwarded, the caller the one in the response, which a
//! proxy may rewrite before forwarding it (§16.7 step 8, example in §16.12.1.3). Each copy is
//! signed for its holder:
//!
//! | copy | written | holder | binds |
//! |------|---------|--------|-------|
//! | `q` | in the request, §16.6 step 4 | the callee | Call-ID, the caller's tag (To of the callee's requests), the caller's Contact as forwarded (host and port), the Route entries after ours (the request's Record-Route below ours) |
//! | `s` | in every response, §16.7 step 8 | the caller | Call-ID, the caller's tag (From), the callee's tag (To), the callee's Contact as forwarded (after `fix_nated_contact`), the Route entries after ours (the response's Record-Route above ours, reversed) |
//!
//! and both an expiry: the route set is fixed when the dialog starts (§12.2.1.2), so the
//! signature's lifetime bounds how long the dialog can be routed through this proxy.
//!
//! The value is `;mrs=<copy><expiry>.<mac>`: the copy letter (`q` or `s`; `t` or `u` for a
//! call the script tracks, see below), the expiry in Unix
//! seconds as 8 hex digits, and the first 8 bytes (16 hex digits, 64 bits) of an HMAC-SHA256,
//! keyed from the server key (`moonroute::secret`), over the copy, the expiry and the bound fields.
//! E.g. `;mrs=s66f0a3b1.0f8e2d7c6b5a4938`. Servers sharing the key check each other's
//! signatures (the clocks need only agree to within minutes of a lifetime).
//!
//! ## Checking an in-dialog request (after §16.4 removed our entries)
//!
//! One HMAC over: the copy letter and expiry from the signature, the request's Call-ID, its tags
//! as that copy's holder writes them, its Request-URI (the remote target: `maddr` if present,
//! else host, and port) and the Route entries left after ours, each URI compared ignoring case.
//! A request with a matching signature past its expiry is routed only if it is a BYE, so a
//! dialog can still be ended; anything else is refused.
//!
//! The target is bound by host and port, not by the whole URI: a target refresh (§12.2.1.2,
//! re-INVITE or UPDATE with a new Contact) that changes the user part or parameters keeps
//! working, one that moves a party to another host or port does not (its peer's requests are
//! refused, the mover's own still route).
//!
//! ## Tracked calls
//!
//! For a call the script tracks (`req:dlg_manage()`, `crate::dialog`) the copies are `t`
//! (callee's) and `u` (caller's) instead of `q` and `s`; the letter is under the MAC. A request
//! whose route set says its call was tracked by this server since it started, but whose call
//! the dialog table no longer knows, belongs to a call that ended: `req:dlg_known()` says
//! `ended` rather than `untracked` ([`RouteSigner::signed_for_tracked_call`]), long after the
//! dialog's linger. The time of writing is the expiry less the lifetime, so this reads right
//! while `record_route_lifetime_secs` is unchanged.
//!
//! ## Owner routes
//!
//! Nodes sharing a location store (`moonroute::cluster`) reach a binding that only its own node
//! can (a TCP/TLS/WebSocket connection, a NAT pinhole) through that node: at REGISTER time the
//! node stores with the binding a Route to itself carrying a flow token,
//! `<sip:node;transport=udp;lr;mr-flow=tcp:192.0.2.1:40312:0f8e2d7c6b5a4938>`, the flow (the
//! transport and the address the REGISTER came from) and 64 bits of an HMAC-SHA256 over it,
//! keyed from the server key with a label of its own. Another node's lookup puts it in the
//! branch's Route (RFC 3327 §5.3: as a Path would be); the owner, consuming its own entry
//! (§16.4), finds a flow it signed itself and delivers the request on that flow (RFC 5626
//! §5.3, as an edge proxy does with its flow token). Only the owner checks its token, so the
//! nodes need not share a key. A token names a flow, not a dialog: whoever learns one can
//! reach that registered contact through its node, as any caller can by its AOR.
//!
//! ## Old signatures
//!
//! Before this format a signature was 16 hex digits over Call-ID and caller tag, with no expiry
//! and no target. Such a signature (dialogs outlive an upgrade) routes a BYE only, and only for
//! one lifetime after the server started; nothing else.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use tracing::info;

use crate::auth::digest::hex;
use crate::sip::scan::{push_unfolded, split_commas};
use crate::sip::{Contact, HeaderName, Host, Message, Method, NameAddr, ParseError, Uri};
use crate::transport::TransportKind;

/// The URI parameter holding the signature.
pub const SIGNATURE_PARAM: &str = "mrs";

/// How long a signature routes its dialog by default: 12 hours, the dialog timeout Kamailio's
/// and OpenSIPS's dialog modules default to (`[proxy] record_route_lifetime_secs`).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

/// Bytes of the HMAC kept (16 hex digits: 64 bits, beyond guessing over the network).
const MAC_BYTES: usize = 8;

/// `<copy letter><8 hex digits>.<16 hex digits>`.
const TOKEN_LEN: usize = 1 + 8 + 1 + MAC_BYTES * 2;

/// Labels separating the uses of the server key (digest nonces, and each signature format).
const KEY_LABEL: &[u8] = b"moonroute record-route v2";
const LEGACY_KEY_LABEL: &[u8] = b"moonroute record-route v1";
const FLOW_KEY_LABEL: &[u8] = b"moonroute owner flow v1";

/// The URI parameter of an owner route ([`RouteSigner::sign_flow`]) holding its flow token.
pub const FLOW_PARAM: &str = "mr-flow";

/// Whose route set a copy of our Record-Route entry is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// The copy in the forwarded request (`q`): the callee's requests go to the caller.
    Callee,
    /// The copy in a forwarded response (`s`): the caller's requests go to the callee.
    Caller,
}

impl Holder {
    /// The copy letter: `q`/`s`, or `t`/`u` for a tracked call.
    fn letter(self, tracked: bool) -> u8 {
        match (self, tracked) {
            (Holder::Callee, false) => b'q',
            (Holder::Caller, false) => b's',
            (Holder::Callee, true) => b't',
            (Holder::Caller, true) => b'u',
        }
    }

    /// The holder and whether the call is tracked.
    fn from_letter(letter: u8) -> Option<(Holder, bool)> {
        match letter.to_ascii_lowercase() {
            b'q' => Some((Holder::Callee, false)),
            b's' => Some((Holder::Caller, false)),
            b't' => Some((Holder::Callee, true)),
            b'u' => Some((Holder::Caller, true)),
            _ => None,
        }
    }
}

/// An `mrs` parameter value, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signature {
    Current {
        holder: Holder,
        /// Written for a call the script tracks (`t`, `u`).
        tracked: bool,
        /// Unix seconds.
        expires: u32,
        mac: [u8; MAC_BYTES],
    },
    /// The format before expiry and targets: 16 hex digits over Call-ID and caller tag.
    Legacy { mac: [u8; MAC_BYTES] },
    /// Not a signature this proxy writes.
    Malformed,
}

impl Signature {
    /// Parses a value (hex digits in either case).
    pub fn parse(value: &[u8]) -> Signature {
        if let Some(mac) = decode_hex::<MAC_BYTES>(value) {
            return Signature::Legacy { mac };
        }
        if value.len() != TOKEN_LEN || value[9] != b'.' {
            return Signature::Malformed;
        }
        let holder = Holder::from_letter(value[0]);
        let expires = decode_hex::<4>(&value[1..9]);
        let mac = decode_hex::<MAC_BYTES>(&value[10..]);
        match (holder, expires, mac) {
            (Some((holder, tracked)), Some(expires), Some(mac)) => Signature::Current {
                holder,
                tracked,
                expires: u32::from_be_bytes(expires),
                mac,
            },
            _ => Signature::Malformed,
        }
    }

    /// The signature a URI carries; `None` without an `mrs` parameter.
    pub fn of(uri: &Uri<'_>) -> Option<Signature> {
        uri.as_sip()?.param(SIGNATURE_PARAM).map(Signature::parse)
    }
}

/// What checking the Route of an in-dialog request found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verdict {
    /// No Route entry of ours was consumed (§16.4): not ours to judge.
    #[default]
    NotOurs,
    /// Our entry without a signature: not written by us.
    Unsigned,
    /// A signature that does not match this request's dialog, tags, Request-URI host and port
    /// or remaining Route (forged, tampered, another dialog's, another key's, or its holder's
    /// peer moved to another host by a target refresh).
    Mismatch,
    /// Ours, for this request.
    Valid,
    /// Ours for this request, but it expired `ago_secs` seconds ago.
    Expired { ago_secs: u64 },
    /// Ours in the old format (no expiry, no target); `in_grace`: within one lifetime of the
    /// server's start.
    Legacy { in_grace: bool },
}

impl Verdict {
    /// Whether a request with this verdict follows the route set: a valid signature; an
    /// expired one or an old-format one in its grace period for a BYE only (ending a dialog is
    /// always allowed, nothing else).
    pub fn routes(self, method: Option<&Method>) -> bool {
        match self {
            Verdict::Valid => true,
            Verdict::Expired { .. } | Verdict::Legacy { in_grace: true } => {
                method == Some(&Method::Bye)
            }
            _ => false,
        }
    }
}

/// What one copy's signature binds (see the module doc), but the Route entries after ours,
/// which are passed separately as they come from different headers.
#[derive(Clone, Copy, Debug)]
pub struct Binding<'a> {
    pub holder: Holder,
    /// A call the script tracks (`t`/`u` copies).
    pub tracked: bool,
    pub call_id: &'a [u8],
    pub caller_tag: &'a [u8],
    /// Empty in the callee's copy: the callee's tag is not known when the request is forwarded.
    pub callee_tag: &'a [u8],
    /// Where the holder's requests go: the peer's Contact URI (their Request-URI).
    pub target: Option<Uri<'a>>,
}

/// Signs and checks Record-Route entries with one key.
#[derive(Clone)]
pub struct RouteSigner {
    key: hmac::Key,
    legacy_key: hmac::Key,
    /// Signs the flow tokens of owner routes ("Owner routes" in the module doc).
    flow_key: hmac::Key,
    lifetime: Duration,
    /// Unix seconds when the server started: old-format signatures route BYE for one lifetime
    /// after it.
    started: u64,
}

impl std::fmt::Debug for RouteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RouteSigner(lifetime {:?})", self.lifetime)
    }
}

impl RouteSigner {
    /// A signer whose keys are derived from the server key (`moonroute::secret::server_key`), with
    /// the default lifetime, started now.
    pub fn new(server_key: &[u8]) -> RouteSigner {
        let master = hmac::Key::new(hmac::HMAC_SHA256, server_key);
        RouteSigner {
            key: derive(&master, KEY_LABEL),
            legacy_key: derive(&master, LEGACY_KEY_LABEL),
            flow_key: derive(&master, FLOW_KEY_LABEL),
            lifetime: DEFAULT_LIFETIME,
            started: unix_seconds(SystemTime::now()),
        }
    }

    /// A signer with a random key: its signatures die with the process (tests, labs).
    pub fn random() -> RouteSigner {
        let rng = ring::rand::SystemRandom::new();
        let random_key = || {
            hmac::Key::generate(hmac::HMAC_SHA256, &rng)
                .unwrap_or_else(|_| hmac::Key::new(hmac::HMAC_SHA256, &process_entropy()))
        };
        RouteSigner {
            key: random_key(),
            legacy_key: random_key(),
            flow_key: random_key(),
            lifetime: DEFAULT_LIFETIME,
            started: unix_seconds(SystemTime::now()),
        }
    }

    /// The same keys, with signatures valid for `lifetime` from when they are written.
    pub fn with_lifetime(mut self, lifetime: Duration) -> RouteSigner {
        self.lifetime = lifetime;
        self
    }

    /// The same keys, as if the server had started at `at` (the old-format grace period).
    pub fn started_at(mut self, at: SystemTime) -> RouteSigner {
        self.started = unix_seconds(at);
        self
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The expiry of a signature written at `now`.
    pub fn expiry(&self, now: SystemTime) -> u64 {
        unix_seconds(now).saturating_add(self.lifetime.as_secs())
    }

    /// The `mrs` value for `binding` and the Route entries after ours (`rest`, URIs in the
    /// order the holder writes them), valid until `expires` (Unix seconds).
    pub fn sign<'r>(
        &self,
        binding: &Binding<'_>,
        rest: impl IntoIterator<Item = &'r [u8]>,
        expires: u64,
    ) -> String {
        let expires = u32::try_from(expires).unwrap_or(u32::MAX);
        let mac = self.mac(binding, expires, rest);
        format!(
            "{}{expires:08x}.{}",
            char::from(binding.holder.letter(binding.tracked)),
            hex(&mac[..MAC_BYTES])
        )
    }

    /// The callee's copy (`q`) for the Record-Route entries of `request`, about to be forwarded
    /// (§16.6 step 4): over its Call-ID, From tag, first Contact and Record-Route so far.
    pub fn sign_request(&self, request: &Message, now: SystemTime) -> String {
        self.sign_request_for(request, false, now)
    }

    /// [`RouteSigner::sign_request`], for a call the script tracks when `tracked`.
    pub fn sign_request_for(&self, request: &Message, tracked: bool, now: SystemTime) -> String {
        let from = request.from().ok();
        let binding = Binding {
            holder: Holder::Callee,
            tracked,
            call_id: request.call_id().unwrap_or_default(),
            caller_tag: from.as_ref().and_then(NameAddr::tag).unwrap_or_default(),
            callee_tag: b"",
            target: first_contact(request),
        };
        let rest = request
            .values(HeaderName::RecordRoute)
            .filter_map(|value| uri_of_route(value.ok()?));
        self.sign(&binding, rest, self.expiry(now))
    }

    /// §16.7 step 8: in a response about to be forwarded upstream, the topmost group of our
    /// entries carrying a callee's copy (`q`; two for a double Record-Route) is re-signed as the
    /// caller's copy (`s`), bound to this response's tags and Contact and to the entries above
    /// it. Only the topmost group: in a spiral through this proxy the inner pass's response
    /// context sees the response first, and its entries are the higher ones. `is_mine` says
    /// whether a URI names this proxy. Returns whether the response changed.
    ///
    /// A Record-Route list that does not parse is removed, so no callee's copy of ours can
    /// reach the caller: with it the caller could reach its own Contact.
    pub fn sign_response(
        &self,
        response: &mut Message,
        is_mine: impl Fn(&Uri<'_>) -> bool,
        now: SystemTime,
    ) -> bool {
        let fields = match self.resigned_fields(response, is_mine, now) {
            Ok(fields) => fields,
            Err(error) => {
                info!(target: "moonroute::proxy::route_sign", %error, "a response's Record-Route does not parse: removed before forwarding it");
                return response.remove_headers("Record-Route") > 0;
            }
        };
        for (index, value) in &fields {
            if response
                .set_nth_header(HeaderName::RecordRoute, *index, value)
                .is_err()
            {
                return response.remove_headers("Record-Route") > 0;
            }
        }
        !fields.is_empty()
    }

    /// The Record-Route fields of `response` that hold our topmost callee's copies, by their
    /// index among the Record-Route fields, with those re-signed (the other values of the
    /// field kept, the field lines kept apart as the callee wrote them).
    fn resigned_fields(
        &self,
        response: &Message,
        is_mine: impl Fn(&Uri<'_>) -> bool,
        now: SystemTime,
    ) -> Result<Vec<(usize, Vec<u8>)>, ParseError> {
        // Every value, with the index of its field.
        let mut values: Vec<(usize, &[u8])> = Vec::new();
        let fields = response
            .headers()
            .filter(|h| h.name == HeaderName::RecordRoute);
        for (field, header) in fields.enumerate() {
            for value in split_commas(header.value) {
                values.push((field, value?));
            }
        }
        // Our entries: (index in `values`, where the signature starts in the value).
        let mut ours: Vec<(usize, usize)> = Vec::new();
        let mut group: Option<&[u8]> = None;
        let mut tracked = false;
        for (index, (_, value)) in values.iter().enumerate() {
            let na = NameAddr::parse(value)?;
            let callees_copy = na
                .uri
                .as_sip()
                .filter(|_| is_mine(&na.uri))
                .and_then(|sip| sip.param(SIGNATURE_PARAM))
                .filter(|s| {
                    matches!(
                        Signature::parse(s),
                        Signature::Current {
                            holder: Holder::Callee,
                            ..
                        }
                    )
                });
            let signature = match (group, callees_copy) {
                (None, None) => continue,
                (None, Some(signature)) => signature,
                // The second half of a double Record-Route (RFC 5658): the same signature.
                (Some(first), Some(signature)) if signature.eq_ignore_ascii_case(first) => {
                    signature
                }
                (Some(_), _) => break,
            };
            group = Some(signature);
            tracked = matches!(
                Signature::parse(signature),
                Signature::Current { tracked: true, .. }
            );
            ours.push((index, signature.as_ptr() as usize - value.as_ptr() as usize));
            if ours.len() == 2 {
                break;
            }
        }
        let Some(&(first, _)) = ours.first() else {
            return Ok(Vec::new());
        };
        let from = response.from().ok();
        let to = response.to().ok();
        let binding = Binding {
            holder: Holder::Caller,
            tracked,
            call_id: response.call_id().unwrap_or_default(),
            caller_tag: from.as_ref().and_then(NameAddr::tag).unwrap_or_default(),
            callee_tag: to.as_ref().and_then(NameAddr::tag).unwrap_or_default(),
            target: first_contact(response),
        };
        let rest: Vec<&[u8]> = values[..first]
            .iter()
            .rev()
            .map(|(_, value)| {
                uri_of_route(value).ok_or(ParseError::bad("Record-Route", "bad value"))
            })
            .collect::<Result<_, _>>()?;
        let token = self.sign(&binding, rest, self.expiry(now));
        let mut fields: Vec<(usize, Vec<u8>)> = Vec::with_capacity(2);
        for &(index, _) in &ours {
            let field = values[index].0;
            if fields.iter().all(|(f, _)| *f != field) {
                fields.push((field, Vec::new()));
            }
        }
        for (field, text) in &mut fields {
            let in_field = values.iter().enumerate().filter(|(_, (f, _))| f == field);
            for (n, (index, (_, value))) in in_field.enumerate() {
                if n > 0 {
                    text.extend_from_slice(b", ");
                }
                match ours.iter().find(|(i, _)| *i == index) {
                    Some(&(_, offset)) => {
                        push_unfolded(text, &value[..offset]);
                        text.extend_from_slice(token.as_bytes());
                        push_unfolded(text, &value[offset + TOKEN_LEN..]);
                    }
                    None => push_unfolded(text, value),
                }
            }
        }
        Ok(fields)
    }

    /// The flow token of an owner route for a binding that arrived over `kind` from `addr`
    /// ("Owner routes" in the module doc): `tcp:192.0.2.1:40312:0f8e2d7c6b5a4938`.
    pub fn sign_flow(&self, kind: TransportKind, addr: SocketAddr) -> String {
        let flow = format!("{}:{addr}", kind.scheme());
        let mac = hmac::sign(&self.flow_key, flow.as_bytes());
        format!("{flow}:{}", hex(&mac.as_ref()[..MAC_BYTES]))
    }

    /// The flow a token of [`RouteSigner::sign_flow`] names, if this server signed it.
    pub fn check_flow(&self, token: &[u8]) -> Option<(TransportKind, SocketAddr)> {
        let token = std::str::from_utf8(token).ok()?;
        let (flow, mac) = token.rsplit_once(':')?;
        let expected = hmac::sign(&self.flow_key, flow.as_bytes());
        if !constant_time_eq(
            hex(&expected.as_ref()[..MAC_BYTES]).as_bytes(),
            mac.as_bytes(),
        ) {
            return None;
        }
        let (kind, addr) = flow.split_once(':')?;
        Some((
            TransportKind::from_name(kind.as_bytes())?,
            addr.parse().ok()?,
        ))
    }

    /// Judges an in-dialog request after §16.4 consumed our Route entries: `signature` is what
    /// they (or the Request-URI a strict router wrote) carried, `None` for none. Reads the
    /// request's Call-ID, tags, Request-URI and remaining Route.
    pub fn check(
        &self,
        request: &Message,
        signature: Option<Signature>,
        now: SystemTime,
    ) -> Verdict {
        let Some(signature) = signature else {
            return Verdict::Unsigned;
        };
        let call_id = request.call_id().unwrap_or_default();
        let from = request.from().ok();
        let to = request.to().ok();
        let from_tag = from.as_ref().and_then(NameAddr::tag).unwrap_or_default();
        let to_tag = to.as_ref().and_then(NameAddr::tag).unwrap_or_default();
        let now = unix_seconds(now);
        match signature {
            Signature::Malformed => Verdict::Mismatch,
            Signature::Legacy { mac } => {
                let matches = [from_tag, to_tag]
                    .iter()
                    .any(|tag| constant_time_eq(&self.legacy_mac(call_id, tag)[..MAC_BYTES], &mac));
                match matches {
                    true => Verdict::Legacy {
                        in_grace: now < self.started.saturating_add(self.lifetime.as_secs()),
                    },
                    false => Verdict::Mismatch,
                }
            }
            Signature::Current {
                holder,
                tracked,
                expires,
                mac,
            } => {
                let (caller_tag, callee_tag) = match holder {
                    Holder::Callee => (to_tag, &b""[..]),
                    Holder::Caller => (from_tag, to_tag),
                };
                let binding = Binding {
                    holder,
                    tracked,
                    call_id,
                    caller_tag,
                    callee_tag,
                    target: request.request_uri().ok(),
                };
                let malformed_route = Cell::new(false);
                let rest = request.values(HeaderName::Route).filter_map(|value| {
                    let uri = value.ok().and_then(uri_of_route);
                    malformed_route.set(malformed_route.get() || uri.is_none());
                    uri
                });
                let expected = self.mac(&binding, expires, rest);
                if malformed_route.get() || !constant_time_eq(&expected[..MAC_BYTES], &mac) {
                    return Verdict::Mismatch;
                }
                match now.checked_sub(u64::from(expires)) {
                    Some(ago_secs) if ago_secs > 0 => Verdict::Expired { ago_secs },
                    _ => Verdict::Valid,
                }
            }
        }
    }

    /// Whether `signature` (one that [`RouteSigner::check`] found valid) was written by this
    /// server, since it started, for a call the script tracked: then a call its dialog table
    /// no longer knows has ended (see the module doc).
    pub fn signed_for_tracked_call(&self, signature: Option<Signature>) -> bool {
        match signature {
            Some(Signature::Current {
                tracked: true,
                expires,
                ..
            }) => {
                // Strictly after: a copy written in the second this run started may be the
                // previous run's (seconds are all a token carries); judged untracked, as
                // before this check existed.
                u64::from(expires).saturating_sub(self.lifetime.as_secs()) > self.started
            }
            _ => false,
        }
    }

    fn mac<'r>(
        &self,
        binding: &Binding<'_>,
        expires: u32,
        rest: impl IntoIterator<Item = &'r [u8]>,
    ) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&[binding.holder.letter(binding.tracked)]);
        ctx.update(&expires.to_be_bytes());
        field(&mut ctx, binding.call_id);
        field(&mut ctx, binding.caller_tag);
        field(&mut ctx, binding.callee_tag);
        target(&mut ctx, binding.target.as_ref());
        for uri in rest {
            ctx.update(b"R");
            lowercase_field(&mut ctx, uri);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// The old format's MAC: HMAC(Call-ID ‖ 0x00 ‖ caller tag).
    fn legacy_mac(&self, call_id: &[u8], tag: &[u8]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.legacy_key);
        ctx.update(call_id);
        ctx.update(&[0]);
        ctx.update(tag);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// An old-format signature (tests of the upgrade path only: this proxy no longer writes
    /// them).
    pub fn sign_legacy(&self, call_id: &[u8], caller_tag: &[u8]) -> String {
        hex(&self.legacy_mac(call_id, caller_tag)[..MAC_BYTES])
    }
}

fn derive(master: &hmac::Key, label: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(master, label).as_ref())
}

/// A length-prefixed field: no two different field lists feed the same bytes.
fn field(ctx: &mut hmac::Context, bytes: &[u8]) {
    ctx.update(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    ctx.update(bytes);
}

/// [`field`], ASCII-lowercased on the way (through a small buffer: no allocation).
fn lowercase_field(ctx: &mut hmac::Context, bytes: &[u8]) {
    ctx.update(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    let mut buf = [0u8; 64];
    for chunk in bytes.chunks(buf.len()) {
        let lower = &mut buf[..chunk.len()];
        lower.copy_from_slice(chunk);
        lower.make_ascii_lowercase();
        ctx.update(lower);
    }
}

/// Where requests to `uri` go: `maddr` if present, else the host (an IP address by its value,
/// a name ignoring case), and the port as written (absent differs from 5060: a name without a
/// port is looked up by SRV, RFC 3263).
fn target(ctx: &mut hmac::Context, uri: Option<&Uri<'_>>) {
    let Some(sip) = uri.and_then(Uri::as_sip) else {
        ctx.update(b"N");
        return;
    };
    let maddr = sip.maddr().filter(|m| !m.is_empty());
    let host = match maddr {
        Some(m) => Host::parse(m).ok(),
        None => Some(sip.host),
    };
    match host {
        Some(Host::Ip(IpAddr::V4(v4))) => {
            ctx.update(b"4");
            ctx.update(&v4.octets());
        }
        Some(Host::Ip(IpAddr::V6(v6))) => {
            ctx.update(b"6");
            ctx.update(&v6.octets());
        }
        Some(Host::Domain(name)) => {
            ctx.update(b"D");
            lowercase_field(ctx, name.as_bytes());
        }
        None => {
            ctx.update(b"M");
            lowercase_field(ctx, maddr.unwrap_or_default());
        }
    }
    match sip.port {
        Some(port) => {
            ctx.update(b"P");
            ctx.update(&port.to_be_bytes());
        }
        None => ctx.update(b"-"),
    }
}

/// The URI of the first Contact: the remote target a dialog-creating message declares (§12.1).
fn first_contact(message: &Message) -> Option<Uri<'_>> {
    match message.contacts().next()?.ok()? {
        Contact::Addr(addr) => Some(addr.uri),
        Contact::Star => None,
    }
}

/// The URI of a Route or Record-Route value (the name-addr's brackets and header parameters are
/// not part of the route set, §12.1.1).
fn uri_of_route(value: &[u8]) -> Option<&[u8]> {
    NameAddr::parse(value).ok().map(|na| na.uri.raw())
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `N` bytes from exactly `2N` hex digits (either case).
fn decode_hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Equality whose time does not depend on where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Key material when the system's random source fails (it does not on Linux): the process's
/// randomly seeded hasher state, so the key is still unpredictable from outside.
fn process_entropy() -> [u8; 32] {
    use std::hash::{BuildHasher, RandomState};
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&RandomState::new().hash_one(i).to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const US: &str = "127.0.0.1:5060";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// When the test dialogs are set up.
    const T0: u64 = 1_700_000_000;

    fn signer() -> RouteSigner {
        RouteSigner::new(b"key").started_at(at(T0))
    }

    fn parse(text: String) -> Message {
        Message::parse(Bytes::from(text)).expect("test message parses")
    }

    fn is_us(uri: &Uri<'_>) -> bool {
        uri.as_sip().is_some_and(|sip| {
            sip.host.ip() == Some([127, 0, 0, 1].into()) && sip.port == Some(5060)
        })
    }

    /// The INVITE as alice (tag a1, Contact 192.0.2.1:5062) sends it, through an upstream proxy
    /// that Record-Routed (`up.example.com`).
    fn invite() -> Message {
        parse(
            "INVITE sip:bob@192.0.2.2:5080 SIP/2.0\r\n\
             Via: SIP/2.0/UDP 192.0.2.1:5062;branch=z9hG4bK1\r\n\
             Record-Route: <sip:up.example.com;lr>\r\n\
             From: <sip:alice@example.com>;tag=a1\r\n\
             To: <sip:bob@example.com>\r\n\
             Call-ID: call-1\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:alice@192.0.2.1:5062;transport=udp>\r\n\r\n"
                .to_owned(),
        )
    }

    /// Bob's 200 as it reaches us: our entry (the callee's copy `q_sig`) below a downstream
    /// proxy's, above the upstream one; bob's tag b1 and Contact 192.0.2.2:5080.
    fn ok(q_sig: &str) -> Message {
        parse(format!(
            "SIP/2.0 200 OK\r\n\
             Via: SIP/2.0/UDP 192.0.2.1:5062;branch=z9hG4bK1\r\n\
             Record-Route: <sip:down.example.com;lr>\r\n\
             Record-Route: <sip:{US};transport=udp;lr;mrs={q_sig}>;x=1, <sip:up.example.com;lr>\r\n\
             From: <sip:alice@example.com>;tag=a1\r\n\
             To: <sip:bob@example.com>;tag=b1\r\n\
             Call-ID: call-1\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:bob@192.0.2.2:5080>\r\n\r\n"
        ))
    }

    /// An in-dialog request after §16.4 removed our entry: `from_tag`/`to_tag`, Request-URI,
    /// remaining Route values.
    fn in_dialog(method: &str, ruri: &str, from_tag: &str, to_tag: &str, rest: &[&str]) -> Message {
        let mut text = format!(
            "{method} {ruri} SIP/2.0\r\n\
             Via: SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bK2\r\n\
             From: <sip:x@example.com>;tag={from_tag}\r\n\
             To: <sip:y@example.com>;tag={to_tag}\r\n\
             Call-ID: call-1\r\n\
             CSeq: 2 {method}\r\n"
        );
        for route in rest {
            text.push_str(&format!("Route: {route}\r\n"));
        }
        text.push_str("\r\n");
        parse(text)
    }

    fn signature(text: &str) -> Option<Signature> {
        Some(Signature::parse(text.as_bytes()))
    }

    /// The callee's copy for [`invite`] and the caller's for [`ok`], both written at T0.
    fn both_copies() -> (String, String) {
        copies(false, T0)
    }

    /// [`both_copies`] for a tracked call or not, written at `secs`.
    fn copies(tracked: bool, secs: u64) -> (String, String) {
        let signer = signer();
        let q = signer.sign_request_for(&invite(), tracked, at(secs));
        let mut response = ok(&q);
        assert!(signer.sign_response(&mut response, is_us, at(secs)));
        let ours = response
            .values(HeaderName::RecordRoute)
            .nth(1)
            .unwrap()
            .unwrap()
            .to_vec();
        let ours = String::from_utf8(ours).unwrap();
        let start = ours.find("mrs=").unwrap() + 4;
        (q, ours[start..start + TOKEN_LEN].to_owned())
    }

    #[test]
    fn the_copies_are_compact_tokens() {
        let (q, s) = both_copies();
        for (token, letter) in [(&q, 'q'), (&s, 's')] {
            assert_eq!(token.len(), TOKEN_LEN, "{token}");
            assert!(token.starts_with(letter), "{token}");
            let expires = u64::from_str_radix(&token[1..9], 16).unwrap();
            assert_eq!(expires, T0 + DEFAULT_LIFETIME.as_secs());
            assert!(matches!(
                Signature::parse(token.as_bytes()),
                Signature::Current { .. }
            ));
        }
    }

    #[test]
    fn a_tracked_call_s_copies_say_so_and_only_this_run_calls_them_its_own() {
        let signer = signer();
        let (t, u) = copies(true, T0 + 10);
        assert!(t.starts_with('t'), "{t}");
        assert!(u.starts_with('u'), "{u}");
        // Alice's BYE with her (caller's) copy: valid, and the call was tracked by this run.
        let bye = in_dialog(
            "BYE",
            "sip:bob@192.0.2.2:5080",
            "a1",
            "b1",
            &["<sip:down.example.com;lr>"],
        );
        let now = at(T0 + 60);
        assert_eq!(signer.check(&bye, signature(&u), now), Verdict::Valid);
        assert!(signer.signed_for_tracked_call(signature(&u)));
        // The letter is under the MAC: turned into an untracked copy, it no longer matches.
        let relabelled = format!("s{}", &u[1..]);
        assert_eq!(
            signer.check(&bye, signature(&relabelled), now),
            Verdict::Mismatch
        );
        // An untracked call's copy, and a tracked one written before this run started (a
        // restart forgot its calls: untracked, not ended), are not this run's tracked calls.
        let (_, s) = both_copies();
        assert!(!signer.signed_for_tracked_call(signature(&s)));
        let restarted = RouteSigner::new(b"key").started_at(at(T0 + 10));
        assert_eq!(restarted.check(&bye, signature(&u), now), Verdict::Valid);
        assert!(!restarted.signed_for_tracked_call(signature(&u)));
    }

    #[test]
    fn each_party_routes_to_the_other_only() {
        let (q, s) = both_copies();
        let signer = signer();
        let now = at(T0 + 60);
        const UP: &[&str] = &["<sip:up.example.com;lr>"];
        const DOWN: &[&str] = &["<sip:down.example.com;lr>"];
        let alices = |method, ruri, to_tag, rest| in_dialog(method, ruri, "a1", to_tag, rest);
        let bobs = "sip:bob@192.0.2.2:5080";
        let cases: [(&str, &String, Message, Verdict); 14] = [
            // Bob (callee) → alice: her Contact, her tag in To, then the upstream proxy.
            (
                "bob's BYE",
                &q,
                in_dialog(
                    "BYE",
                    "sip:alice@192.0.2.1:5062;transport=udp",
                    "b1",
                    "a1",
                    UP,
                ),
                Verdict::Valid,
            ),
            // Alice (caller) → bob: his Contact, her tag in From, his in To, then downstream.
            (
                "alice's BYE",
                &s,
                alices("BYE", bobs, "b1", DOWN),
                Verdict::Valid,
            ),
            // The probe: alice with her copy to a host that is not bob's.
            (
                "the probe",
                &s,
                alices("MESSAGE", "sip:+15551234567@127.0.0.9", "b1", DOWN),
                Verdict::Mismatch,
            ),
            // Bob's host with another port, or a maddr elsewhere: not bob.
            (
                "another port",
                &s,
                alices("INVITE", "sip:bob@192.0.2.2:5081", "b1", DOWN),
                Verdict::Mismatch,
            ),
            (
                "no port",
                &s,
                alices("INVITE", "sip:bob@192.0.2.2", "b1", DOWN),
                Verdict::Mismatch,
            ),
            (
                "a maddr",
                &s,
                alices(
                    "INVITE",
                    "sip:bob@192.0.2.2:5080;maddr=127.0.0.9",
                    "b1",
                    DOWN,
                ),
                Verdict::Mismatch,
            ),
            // Another user or parameters on bob's host and port: a target refresh may do that.
            (
                "a refreshed target",
                &s,
                alices(
                    "INVITE",
                    "sip:bob-2@192.0.2.2:5080;transport=tcp;ob",
                    "b1",
                    DOWN,
                ),
                Verdict::Valid,
            ),
            // Another route after ours, one more, or none: not the dialog's route set.
            (
                "another route",
                &s,
                alices("MESSAGE", bobs, "b1", &["<sip:127.0.0.9;lr>"]),
                Verdict::Mismatch,
            ),
            (
                "one more route",
                &s,
                alices("MESSAGE", bobs, "b1", &[DOWN[0], "<sip:127.0.0.9;lr>"]),
                Verdict::Mismatch,
            ),
            (
                "no route",
                &s,
                alices("MESSAGE", bobs, "b1", &[]),
                Verdict::Mismatch,
            ),
            // The same route in another case is the same route.
            (
                "a route in capitals",
                &s,
                alices("BYE", bobs, "b1", &["<sip:DOWN.example.com;LR>"]),
                Verdict::Valid,
            ),
            // Another tag: another dialog.
            (
                "another tag",
                &s,
                alices("BYE", bobs, "b2", DOWN),
                Verdict::Mismatch,
            ),
            // Each copy only in its holder's direction.
            (
                "the wrong copy",
                &q,
                alices("BYE", bobs, "b1", DOWN),
                Verdict::Mismatch,
            ),
            (
                "bob with alice's copy",
                &s,
                in_dialog("BYE", "sip:alice@192.0.2.1:5062", "b1", "a1", UP),
                Verdict::Mismatch,
            ),
        ];
        for (what, copy, request, expected) in cases {
            assert_eq!(
                signer.check(&request, signature(copy), now),
                expected,
                "{what}"
            );
        }
    }

    #[test]
    fn tampered_forged_and_foreign_signatures_do_not_match() {
        let (_, s) = both_copies();
        let bye = in_dialog(
            "BYE",
            "sip:bob@192.0.2.2:5080",
            "a1",
            "b1",
            &["<sip:down.example.com;lr>"],
        );
        let now = at(T0 + 60);
        assert_eq!(
            signer().check(&bye, signature(&s.to_uppercase()), now),
            Verdict::Valid
        );
        assert_eq!(
            RouteSigner::new(b"other").check(&bye, signature(&s), now),
            Verdict::Mismatch
        );
        // A later expiry with the same MAC.
        let later = format!("s{:08x}{}", T0 + 999_999, &s[9..]);
        // One MAC digit changed.
        let last = if s.ends_with('0') { '1' } else { '0' };
        let flipped = format!("{}{last}", &s[..TOKEN_LEN - 1]);
        for bad in [
            later.as_str(),
            &flipped,
            "",
            "0123456789abcdef0123456789",
            "zzzzzzzzzzzzzzzz",
        ] {
            assert_eq!(
                signer().check(&bye, signature(bad), now),
                Verdict::Mismatch,
                "{bad}"
            );
        }
        assert_eq!(signer().check(&bye, None, now), Verdict::Unsigned);
    }

    #[test]
    fn an_expired_signature_routes_bye_only() {
        let (_, s) = both_copies();
        let signer = signer();
        let end = T0 + DEFAULT_LIFETIME.as_secs();
        let message = in_dialog(
            "MESSAGE",
            "sip:bob@192.0.2.2:5080",
            "a1",
            "b1",
            &["<sip:down.example.com;lr>"],
        );
        assert_eq!(
            signer.check(&message, signature(&s), at(end)),
            Verdict::Valid
        );
        let expired = signer.check(&message, signature(&s), at(end + 30));
        assert_eq!(expired, Verdict::Expired { ago_secs: 30 });
        assert!(!expired.routes(Some(&Method::Message)));
        assert!(!expired.routes(Some(&Method::Invite)));
        assert!(!expired.routes(Some(&Method::Ack)));
        assert!(expired.routes(Some(&Method::Bye)));
        assert!(Verdict::Valid.routes(Some(&Method::Invite)));
        for refused in [Verdict::NotOurs, Verdict::Unsigned, Verdict::Mismatch] {
            assert!(!refused.routes(Some(&Method::Bye)));
        }
    }

    #[test]
    fn the_lifetime_is_the_signers() {
        let short = signer().with_lifetime(Duration::from_secs(120));
        let q = short.sign_request(&invite(), at(T0));
        let bye = in_dialog(
            "INFO",
            "sip:alice@192.0.2.1:5062;transport=udp",
            "b1",
            "a1",
            &["<sip:up.example.com;lr>"],
        );
        assert_eq!(
            short.check(&bye, signature(&q), at(T0 + 120)),
            Verdict::Valid
        );
        assert_eq!(
            short.check(&bye, signature(&q), at(T0 + 121)),
            Verdict::Expired { ago_secs: 1 }
        );
    }

    #[test]
    fn old_format_signatures_route_bye_for_one_lifetime_after_the_start() {
        let signer = signer();
        let old = signer.sign_legacy(b"call-1", b"a1");
        assert_eq!(old.len(), 16);
        let anywhere = in_dialog("BYE", "sip:x@127.0.0.9", "b1", "a1", &[]);
        let in_grace = signer.check(&anywhere, signature(&old), at(T0 + 3600));
        assert_eq!(in_grace, Verdict::Legacy { in_grace: true });
        assert!(in_grace.routes(Some(&Method::Bye)));
        assert!(!in_grace.routes(Some(&Method::Message)));
        let later = signer.check(
            &anywhere,
            signature(&old),
            at(T0 + DEFAULT_LIFETIME.as_secs()),
        );
        assert_eq!(later, Verdict::Legacy { in_grace: false });
        assert!(!later.routes(Some(&Method::Bye)));
        // The old key is still a derived one: another Call-ID does not match.
        let other = signer.sign_legacy(b"call-2", b"a1");
        assert_eq!(
            signer.check(&anywhere, signature(&other), at(T0)),
            Verdict::Mismatch
        );
    }

    #[test]
    fn response_rewrite_touches_only_our_topmost_callee_copies() {
        let signer = signer();
        let q = signer.sign_request(&invite(), at(T0));
        let mut response = ok(&q);
        assert!(signer.sign_response(&mut response, is_us, at(T0)));
        let values: Vec<String> = response
            .values(HeaderName::RecordRoute)
            .map(|v| String::from_utf8(v.unwrap().to_vec()).unwrap())
            .collect();
        assert_eq!(values.len(), 3);
        assert_eq!(values[0], "<sip:down.example.com;lr>");
        assert!(
            values[1].starts_with(&format!("<sip:{US};transport=udp;lr;mrs=s")),
            "{}",
            values[1]
        );
        assert!(
            values[1].ends_with(">;x=1"),
            "header parameters kept: {}",
            values[1]
        );
        assert_eq!(values[2], "<sip:up.example.com;lr>");
        let fields: Vec<&[u8]> = response.headers_named("Record-Route").collect();
        assert_eq!(fields.len(), 2, "the field lines are kept apart");
        assert_eq!(fields[0], b"<sip:down.example.com;lr>");
        // Done once: a caller's copy is not rewritten again.
        assert!(!signer.sign_response(&mut response, is_us, at(T0)));
        // Not ours, or not a callee's copy of ours: untouched.
        let mut foreign = ok(&q);
        assert!(!signer.sign_response(&mut foreign, |_| false, at(T0)));
        let mut legacy = ok(&signer.sign_legacy(b"call-1", b"a1"));
        assert!(!signer.sign_response(&mut legacy, is_us, at(T0)));
    }

    #[test]
    fn response_rewrite_of_a_double_record_route_and_a_spiral() {
        let signer = signer();
        let inner = "q6553f100.0000000000000001";
        let outer = "q6553f100.0000000000000002";
        let mut response = parse(format!(
            "SIP/2.0 200 OK\r\n\
             Via: SIP/2.0/UDP 192.0.2.1:5062;branch=z9hG4bK1\r\n\
             Record-Route: <sip:{US};transport=tcp;lr;mrs={inner}>\r\n\
             Record-Route: <sip:{US};transport=udp;lr;mrs={inner}>\r\n\
             Record-Route: <sip:{US};transport=udp;lr;mrs={outer}>\r\n\
             From: <sip:alice@example.com>;tag=a1\r\n\
             To: <sip:bob@example.com>;tag=b1\r\n\
             Call-ID: call-1\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:bob@192.0.2.2:5080>\r\n\r\n"
        ));
        assert!(signer.sign_response(&mut response, is_us, at(T0)));
        let values: Vec<String> = response
            .values(HeaderName::RecordRoute)
            .map(|v| String::from_utf8(v.unwrap().to_vec()).unwrap())
            .collect();
        let sig = |v: &str| v[v.find("mrs=").unwrap() + 4..v.len() - 1].to_owned();
        assert!(sig(&values[0]).starts_with('s'));
        assert_eq!(
            sig(&values[0]),
            sig(&values[1]),
            "both halves, one signature"
        );
        assert_eq!(sig(&values[2]), outer, "the outer pass rewrites its own");
        // The outer pass's context then rewrites its entry, bound to the entries above it.
        assert!(signer.sign_response(&mut response, is_us, at(T0)));
        let rewritten = response.values(HeaderName::RecordRoute).nth(2).unwrap();
        let outer_sig = sig(std::str::from_utf8(rewritten.unwrap()).unwrap());
        assert!(outer_sig.starts_with('s'));
        // The caller's request at the outer pass: the inner pass's entries (reversed) remain.
        let (inner_tcp, inner_udp) = (&values[0], &values[1]);
        let bye = in_dialog(
            "BYE",
            "sip:bob@192.0.2.2:5080",
            "a1",
            "b1",
            &[inner_udp, inner_tcp],
        );
        assert_eq!(
            signer.check(&bye, signature(&outer_sig), at(T0)),
            Verdict::Valid
        );
    }

    #[test]
    fn a_record_route_that_does_not_parse_is_removed() {
        let signer = signer();
        let mut response = parse(
            "SIP/2.0 200 OK\r\n\
             Via: SIP/2.0/UDP 192.0.2.1:5062;branch=z9hG4bK1\r\n\
             Record-Route: <sip:127.0.0.1:5060;lr;mrs=q6553f100.0000000000000001>, <not a uri\r\n\
             From: <sip:alice@example.com>;tag=a1\r\n\
             To: <sip:bob@example.com>;tag=b1\r\n\
             Call-ID: call-1\r\n\
             CSeq: 1 INVITE\r\n\r\n"
                .to_owned(),
        );
        assert!(signer.sign_response(&mut response, is_us, at(T0)));
        assert!(!response.has(HeaderName::RecordRoute));
    }

    #[test]
    fn servers_with_one_key_check_each_others_signatures() {
        let (_, s) = both_copies();
        let bye = in_dialog(
            "BYE",
            "sip:bob@192.0.2.2:5080",
            "a1",
            "b1",
            &["<sip:down.example.com;lr>"],
        );
        let other_server = RouteSigner::new(b"key");
        assert_eq!(
            other_server.check(&bye, signature(&s), at(T0 + 1)),
            Verdict::Valid
        );
        let random = RouteSigner::random();
        let q = random.sign_request(&invite(), at(T0));
        let back = in_dialog(
            "BYE",
            "sip:alice@192.0.2.1:5062",
            "b1",
            "a1",
            &["<sip:up.example.com;lr>"],
        );
        assert_eq!(random.check(&back, signature(&q), at(T0)), Verdict::Valid);
        assert_eq!(
            signer().check(&back, signature(&q), at(T0)),
            Verdict::Mismatch
        );
    }
}
