//! The registrar (RFC 3261 §10.3) as sans-IO rules.
//!
//! [`process`] is the whole of §10.3's binding logic as a pure function: its input is the
//! REGISTER, where it came from ([`Meta`]), the AOR's current bindings, the [`Rules`] and an
//! explicit `now`; its output ([`Outcome`]) is the AOR's new complete binding list, or the
//! error response to send. [`ok_response`] builds the 200 (OK) of step 8. [`Registrar`] ties
//! them to a [`LocationStore`] for the Lua engine's `req:save()` and `req:lookup()`.
//!
//! Which §10.3 steps live where:
//!
//! 1. the Request-URI names a domain this server is responsible for (else forward it): the
//!    script's decision, before it calls `save()`;
//! 2. `Require` is checked by the server core (420) before the script runs;
//! 3. and 4. authentication and authorization (401, 403): the script's;
//! 5. the AOR is taken from To and normalized ([`aor_of`]; the port of our own domains is
//!    dropped, [`AorRule`]); a To that does not parse is a 400, a To that is not a
//!    `sip:`/`sips:` URI a 404 (it cannot be an AOR here). Whether the AOR belongs to the
//!    Request-URI's domain is again the script's policy;
//! 6. `Contact: *` (with `Expires: 0` and nothing else, else 400) removes every binding,
//!    subject to the Call-ID/CSeq rule of step 7;
//! 7. each contact is added, refreshed or removed ([`process`] documents the details);
//! 8. the 200 lists every current binding ([`ok_response`]).
//!
//! All binding updates of one request apply together or not at all (§10.3: "committed if and
//! only if all binding updates and additions succeed").
//!
//! Outbound (RFC 5626 §6, RFC 7118 §5): a Contact with both `+sip.instance` and `reg-id`, in a
//! REGISTER whose first hop is this server (one Via) or an edge proxy that supports outbound
//! (`ob` in the last Path URI, [`outbound_applies`]), names a flow: it replaces the binding
//! of the same instance and reg-id whatever its Contact URI (a phone that re-registers over
//! a new connection, the old one being dead), the binding is tied to the connection it came
//! over (the lookup reaches it only there, `script::Services::location_lookup`), and the
//! 200 carries `Require: outbound`. Elsewhere reg-id is ignored, not stored (plain RFC 3261
//! bindings; no 439).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::location::{AorKeys, Binding, Commit, LocationStore, StoreError};
use crate::metrics::Counter;
use crate::proxy::identity::LocalIdentity;
use crate::sip::{scan, Contact, HeaderName, Message, Method, NameAddr, ResponseBuilder, Uri};
use crate::transport::Meta;

/// The most bindings one AOR may have, and the most contacts one REGISTER may carry. Not an
/// RFC number: it bounds the work of one REGISTER (each contact is compared with each binding)
/// and the fan-out of a forked request. Beyond it: 403.
pub const MAX_BINDINGS_PER_AOR: usize = 100;

/// Expiry given to a malformed `expires` Contact parameter or Expires header field (RFC 3261
/// §10.2.1.1: "Malformed values SHOULD be treated as equivalent to 3600").
const MALFORMED_EXPIRES: u32 = 3600;

/// §10.3 step 7: 423 only for intervals shorter than one hour.
const ONE_HOUR: u32 = 3600;

/// Expiry limits (RFC 3261 §10.3 step 7), all in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Expiry of a contact when the REGISTER names none.
    pub default_expires: u32,
    /// Shorter non-zero intervals get 423 Interval Too Brief (when also under one hour).
    pub min_expires: u32,
    /// Longer intervals are lowered to this.
    pub max_expires: u32,
}

impl Default for Rules {
    /// An hour when the REGISTER names none, at least a minute, at most a day (the
    /// `[registrar]` defaults).
    fn default() -> Rules {
        Rules {
            default_expires: 3600,
            min_expires: 60,
            max_expires: 86400,
        }
    }
}

/// What [`process`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answer 200 (OK) listing `bindings`, the AOR's new complete list (unexpired, in
    /// registration order). `changed` is false when nothing needs storing: a query (no
    /// Contact) or a retransmission.
    Updated {
        bindings: Vec<Binding>,
        changed: bool,
    },
    /// Answer with this status and these extra header fields; the bindings stay as they were.
    Refused {
        code: u16,
        reason: &'static str,
        headers: Vec<(String, String)>,
    },
}

fn refuse(code: u16, reason: &'static str) -> Outcome {
    Outcome::Refused {
        code,
        reason,
        headers: Vec::new(),
    }
}

/// The address-of-record of a To URI, normalized as RFC 3261 §10.3 step 5 asks ("all URI
/// parameters MUST be removed (including the user-param), and any escaped characters MUST be
/// converted to their unescaped form"), so that every spelling of one AOR finds the same
/// bindings. `home` says which host:port names this server ([`LocalIdentity::is_myself`]).
///
/// - `sip:` or `sips:`, lower-cased; the two stay distinct AORs (§19.1.4: a SIP and a SIPS URI
///   are never equivalent). Any other scheme (`tel:`, ...) is not an AOR: `None`;
/// - the user part is kept case-sensitive (§19.1.4) and unescaped; characters that may not
///   appear bare in a user part (§25.1) are escaped again (upper-case hex), so the key stays a
///   valid URI that [`aor_of`] maps to itself, and `%61lice` and `alice` give one key;
/// - the password is dropped: it is not part of the identity (§19.1.1 calls it NOT
///   RECOMMENDED) and must not end up in a storage key or a log line;
/// - the host is lower-cased (§19.1.4); IPv6 addresses are written in their canonical form;
/// - the port is dropped when the URI names this server (`home`: one of our domains on any
///   port, or one of our listen addresses on its port), kept otherwise. For a domain we are
///   responsible for (§10.3 step 1), the host:port that names us *is* the domain: the port
///   says how to reach us, not who the user is, so with a listener on 127.0.0.1:5060
///   `sip:bob@127.0.0.1` and `sip:bob@127.0.0.1:5060` are one AOR, `sip:bob@127.0.0.1`
///   (Kamailio's and OpenSIPS's usrloc key on user@domain alike; SIPp's stock UAC dials
///   `sip:service@host:port`, and many phones put the port in their AOR). For any other
///   domain §19.1.4 stands: `sip:bob@example.org:5070` is not `sip:bob@example.org` (an
///   absent port is not the same as 5060), so they stay different AORs;
/// - URI parameters and headers are dropped (§10.3 step 5).
pub fn aor_of(uri: &Uri, home: &LocalIdentity) -> Option<String> {
    let sip = uri.as_sip()?;
    let mut aor = String::with_capacity(sip.raw().len());
    aor.push_str(if sip.secure { "sips:" } else { "sip:" });
    if let Some(user) = sip.user {
        push_user(&mut aor, &scan::unescape(user));
        aor.push('@');
    }
    let host = aor.len();
    sip.host.with_text(|text| aor.push_str(text));
    aor[host..].make_ascii_lowercase();
    if let Some(port) = sip.port {
        if !home.is_myself(uri) {
            aor.push(':');
            aor.push_str(scan::decimal(u64::from(port), &mut [0; 20]));
        }
    }
    Some(aor)
}

/// How this server names an address-of-record: [`aor_of`] with the domains it is responsible
/// for (its configured `domains` and listen addresses). The one rule behind `req:save()`,
/// `req:lookup()`, `req:check_from()`, `moonroute ctl ul` and the location store's keys, so
/// every path finds the same bindings for one user. The default has no home domain: every
/// port is kept (the strict §19.1.4 reading).
#[derive(Clone, Debug, Default)]
pub struct AorRule {
    home: LocalIdentity,
}

impl AorRule {
    /// The rule for a server named by `home` (its configured domains and listen addresses).
    pub fn new(home: LocalIdentity) -> AorRule {
        AorRule { home }
    }

    /// The server identity whose AORs are port-free.
    pub fn home(&self) -> &LocalIdentity {
        &self.home
    }

    /// The normalized AOR of `uri` ([`aor_of`]).
    pub fn of(&self, uri: &Uri) -> Option<String> {
        aor_of(uri, &self.home)
    }

    /// The normalized AOR of `text`, a URI (`sip:alice@x`) or a name-addr (`<sip:alice@x>`,
    /// `"Alice" <sip:alice@x>`), surrounding white space ignored; `None` for anything else.
    pub fn of_text(&self, text: &str) -> Option<String> {
        let text = text.trim().as_bytes();
        match Uri::parse(text) {
            Ok(uri) => self.of(&uri),
            Err(_) => NameAddr::parse(text).ok().and_then(|n| self.of(&n.uri)),
        }
    }
}

impl AorRule {
    /// The AOR of a subscriber `user@domain` (as `moonroute ctl user add` names one) in the
    /// `sips:` scheme when `secure`, else `sip:`; `None` when `domain` is no host.
    pub fn of_user(&self, secure: bool, user: &str, domain: &str) -> Option<String> {
        let mut uri = String::with_capacity(user.len() + domain.len() + 6);
        uri.push_str(if secure { "sips:" } else { "sip:" });
        push_user(&mut uri, user.as_bytes());
        uri.push('@');
        uri.push_str(domain);
        Uri::parse(uri.as_bytes()).ok().and_then(|u| self.of(&u))
    }
}

impl AorKeys for AorRule {
    fn key_of(&self, aor: &str) -> Option<String> {
        self.of_text(aor)
    }

    fn merge(&self, kept: Vec<Binding>, moved: Vec<Binding>) -> Vec<Binding> {
        merge_bindings(kept, moved)
    }
}

/// The bindings of two spellings of one AOR as one list, for the location store's key
/// migration (two keys stored before [`aor_of`] dropped our port, `sip:bob@127.0.0.1` and
/// `sip:bob@127.0.0.1:5060`, are one AOR now; neither list may be lost): `kept`'s bindings in
/// order, then `moved`'s whose contact none of them has. Contacts compare as a REGISTER's do
/// (§19.1.4, [`same_contact`]); of two bindings of one contact the one written last takes the
/// first one's place: with one Call-ID, the higher CSeq (so the UA's next REGISTER is not
/// refused as out of order, §10.3 step 7), else the later expiry. The result may hold more
/// than [`MAX_BINDINGS_PER_AOR`]: such an AOR can still be refreshed and cleaned up.
pub fn merge_bindings(kept: Vec<Binding>, moved: Vec<Binding>) -> Vec<Binding> {
    let mut merged = kept;
    for binding in moved {
        let uri = Uri::parse(binding.contact.as_bytes()).ok();
        let twin = merged.iter().position(|old| match &uri {
            Some(uri) => {
                let old_uri = Uri::parse(old.contact.as_bytes()).ok();
                stored_matches(old, old_uri.as_ref(), uri)
            }
            None => old.contact == binding.contact,
        });
        match twin {
            Some(at) if written_after(&binding, &merged[at]) => merged[at] = binding,
            Some(_) => {}
            None => merged.push(binding),
        }
    }
    merged
}

/// Whether `a` was written after `b`, two bindings of one contact ([`merge_bindings`]).
fn written_after(a: &Binding, b: &Binding) -> bool {
    if a.call_id == b.call_id {
        a.cseq > b.cseq
    } else {
        a.expires_at > b.expires_at
    }
}

/// Appends the user part `user` (unescaped bytes), escaping what may not appear bare (§25.1)
/// in upper-case hex.
fn push_user(out: &mut String, user: &[u8]) {
    for &b in user {
        if is_bare_user_char(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// unreserved / user-unreserved (RFC 3261 §25.1): what a user part may contain unescaped.
fn is_bare_user_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.!~*'()&=+$,;?/".contains(&b)
}

/// How a request's Call-ID and CSeq compare with those stored in a binding (§10.3 step 7).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Another Call-ID, or the same with a higher CSeq: the request may update the binding.
    Newer,
    /// The same Call-ID and CSeq: the request that wrote the binding, again.
    Same,
    /// The same Call-ID and a lower CSeq: an out-of-order request.
    Stale,
}

fn order(b: &Binding, call_id: &str, cseq: u32) -> Order {
    if b.call_id != call_id || cseq > b.cseq {
        Order::Newer
    } else if cseq == b.cseq {
        Order::Same
    } else {
        Order::Stale
    }
}

/// §19.1.4 equivalence for SIP URIs; other schemes (whose own comparison rules are not
/// implemented) compare byte for byte.
fn same_contact(a: &Uri<'_>, b: &Uri<'_>) -> bool {
    match (a, b) {
        (Uri::Sip(a), Uri::Sip(b)) => a.equivalent(b),
        _ => a.raw() == b.raw(),
    }
}

fn stored_matches(stored: &Binding, parsed: Option<&Uri<'_>>, uri: &Uri<'_>) -> bool {
    match parsed {
        Some(p) => same_contact(p, uri),
        None => stored.contact.as_bytes() == uri.raw(),
    }
}

/// One Contact of the request, checked and with its expiry decided.
struct Requested<'m> {
    uri: Uri<'m>,
    contact: String,
    expires: u32,
    q: u16,
    instance: Option<String>,
    reg_id: Option<u32>,
}

impl Requested<'_> {
    /// The flow this contact names (RFC 5626 §6): its instance and reg-id, when it has both.
    fn flow(&self) -> Option<(&str, u32)> {
        Some((self.instance.as_deref()?, self.reg_id?))
    }
}

/// Whether `stored` is the binding of the flow `(instance, reg_id)` (RFC 5626 §6: "the
/// registrar MUST ... replace" a binding with the same instance-id and reg-id).
fn same_flow(stored: &Binding, (instance, reg_id): (&str, u32)) -> bool {
    stored.reg_id == Some(reg_id) && stored.instance.as_deref() == Some(instance)
}

/// Whether outbound's flow rules apply to this REGISTER (RFC 5626 §6): this server is its first
/// hop (a single Via value) or the last Path URI carries `ob` (the edge proxy that added it
/// keeps the flow). A REGISTER relayed by a proxy unaware of outbound gets plain RFC 3261
/// bindings: its flow would not be the one the phone's connection ends on.
pub fn outbound_applies(req: &Message) -> bool {
    if req.values(HeaderName::Via).take(2).count() == 1 {
        return true;
    }
    req.paths()
        .last()
        .and_then(Result::ok)
        .and_then(|p| p.uri.as_sip().map(|u| u.params.has("ob")))
        .unwrap_or(false)
}

/// Whether the 200 to `req` carries `Require: outbound` (RFC 5626 §6: "the registrar MUST
/// include the 'outbound' option-tag in a Require header field in its response" when it
/// applied outbound to a Contact with `reg-id` and `+sip.instance`).
fn uses_outbound(req: &Message) -> bool {
    outbound_applies(req)
        && req.contacts().filter_map(Result::ok).any(|c| match c {
            Contact::Addr(addr) => addr.params.has("reg-id") && addr.params.has("+sip.instance"),
            Contact::Star => false,
        })
}

/// A current binding's fate.
enum Slot {
    Keep,
    Remove,
    Replace(Box<Binding>),
}

/// Applies a REGISTER to the bindings of its AOR (RFC 3261 §10.3 steps 5 to 7).
///
/// `current` are the AOR's bindings as stored; expired ones are ignored (and dropped from the
/// result). The rules, in the order they are checked:
///
/// - not a REGISTER: 500 (a script error, not the client's);
/// - To malformed: 400; To not `sip:`/`sips:`: 404 (step 5); else its AOR by `aors`;
/// - Call-ID, CSeq or Contact malformed: 400;
/// - no Contact: a query, the bindings are returned unchanged (§10.2.3, step 6);
/// - `Contact: *` needs `Expires: 0` and no other Contact, else 400; it removes every binding
///   (step 6);
/// - more than [`MAX_BINDINGS_PER_AOR`] contacts: 403;
/// - Path malformed, a Contact URI that is not text or a bad `q` parameter: 400;
/// - expiry per contact (step 7): its `expires` parameter, else the Expires header field,
///   else `rules.default_expires`; a malformed value counts as 3600 (§10.2.1.1). 0 removes
///   the binding. A value `e` with `0 < e < min_expires` and `e < 3600` gets 423 with a
///   `Min-Expires` header field; §10.3 allows 423 only under one hour, so with a
///   `min_expires` above 3600 a value between 3600 and `min_expires` is accepted as asked
///   (the registrar may lower an interval, never raise it). Above `max_expires` it is
///   lowered to `max_expires`;
/// - each contact is matched against the current bindings by URI equivalence (§19.1.4); a
///   binding stored with another Call-ID, or with the request's Call-ID and a lower CSeq, is
///   updated (or removed); one stored with the request's Call-ID and a higher CSeq makes the
///   request out of order: 500 and nothing changes ("the update MUST be aborted and the
///   request fails", with the 500 of §10.3's commit rule). The same for `*` against every
///   binding;
/// - the same Call-ID with the *same* CSeq is taken for a retransmission of the request that
///   wrote the binding (CSeq numbers are unique per request within a Call-ID, §8.1.1.5):
///   nothing changes and the 200 lists the bindings again. §10.3 would fail it, assuming the
///   server transaction absorbed every retransmission (§17.2.2); one that arrives after the
///   transaction ended (a late copy, or a path through another loop) is answered as that
///   transaction would have answered it, where a 500 would tell a UA whose 200 was lost that
///   its registration failed;
/// - a result of more than [`MAX_BINDINGS_PER_AOR`] bindings: 403.
///
/// Every stored binding records the request's Call-ID and CSeq (step 7), its source
/// transport and address and our local address from `meta`, the Path values (RFC 3327 §5.3;
/// stored whether or not the UA sent `Supported: path`, as edge proxies commonly serve UAs
/// that do not), the `+sip.instance` Contact parameter, its `reg-id` when
/// [`outbound_applies`] (RFC 5626 §6; ignored otherwise) and User-Agent. With outbound, a
/// contact with both also matches the binding of the same instance and reg-id (the new flow
/// replaces the old one), under the same Call-ID/CSeq rule. A contact listed twice in one
/// request: the later one wins.
pub fn process(
    req: &Message,
    meta: &Meta,
    aors: &AorRule,
    current: &[Binding],
    rules: &Rules,
    now: SystemTime,
) -> Outcome {
    process_from(req, meta, false, aors, current, rules, now)
}

/// [`process`] for a REGISTER whose sender is behind a NAT when `nated`: the bindings it
/// writes are marked [`Binding::nated`] (reached through their received address, kept alive).
pub fn process_from(
    req: &Message,
    meta: &Meta,
    nated: bool,
    aors: &AorRule,
    current: &[Binding],
    rules: &Rules,
    now: SystemTime,
) -> Outcome {
    match request_aor(req, aors) {
        Ok(aor) => process_for_aor(req, meta, nated, &aor, current, rules, now),
        Err(refusal) => refusal,
    }
}

/// Step 5: the normalized AOR of a REGISTER's To, or the refusal (a request that is not a
/// REGISTER first, as in [`process_for_aor`]).
fn request_aor(req: &Message, aors: &AorRule) -> Result<String, Outcome> {
    if req.method() != Some(&Method::Register) {
        return Err(refuse(
            500,
            "Server Internal Error (registrar: not a REGISTER)",
        ));
    }
    let Ok(to) = req.to() else {
        return Err(refuse(400, "Bad Request (To: malformed)"));
    };
    aors.of(&to.uri)
        .ok_or_else(|| refuse(404, "Not Found (To: not a sip or sips address-of-record)"))
}

/// [`process_from`] once step 5 has given `aor`, the normalized AOR of the request's To (the
/// [`Registrar`] has it already: it is the store key).
fn process_for_aor(
    req: &Message,
    meta: &Meta,
    nated: bool,
    aor: &str,
    current: &[Binding],
    rules: &Rules,
    now: SystemTime,
) -> Outcome {
    if req.method() != Some(&Method::Register) {
        return refuse(500, "Server Internal Error (registrar: not a REGISTER)");
    }
    let Ok(call_id) = req.call_id() else {
        return refuse(400, "Bad Request (Call-ID: malformed)");
    };
    let call_id = String::from_utf8_lossy(call_id).into_owned();
    let Ok(cseq) = req.cseq() else {
        return refuse(400, "Bad Request (CSeq: malformed)");
    };
    let cseq = cseq.seq;
    let Ok(contacts) = req.contacts().collect::<Result<Vec<Contact<'_>>, _>>() else {
        return refuse(400, "Bad Request (Contact: malformed)");
    };
    let live: Vec<Binding> = current.iter().filter(|b| b.is_live(now)).cloned().collect();

    if contacts.is_empty() {
        return Outcome::Updated {
            bindings: live,
            changed: false,
        };
    }
    if contacts.iter().any(|c| matches!(c, Contact::Star)) {
        return remove_all(req, contacts.len(), live, &call_id, cseq);
    }
    if contacts.len() > MAX_BINDINGS_PER_AOR {
        return refuse(403, "Forbidden (too many contacts)");
    }
    let path = match path_values(req) {
        Ok(path) => path,
        Err(outcome) => return outcome,
    };

    // Step 7, first half: every contact's expiry, all checked before anything changes.
    let header_expires = match (req.has(HeaderName::Expires), req.expires()) {
        (_, Some(e)) => Some(e),
        (true, None) => Some(MALFORMED_EXPIRES),
        (false, None) => None,
    };
    let mut requested = Vec::with_capacity(contacts.len());
    for c in &contacts {
        let Contact::Addr(addr) = c else { continue };
        match requested_contact(c, addr, header_expires, rules) {
            Ok(r) => requested.push(r),
            Err(outcome) => return outcome,
        }
    }
    if requested
        .iter()
        .any(|r| r.expires > 0 && r.expires < ONE_HOUR && r.expires < rules.min_expires)
    {
        return Outcome::Refused {
            code: 423,
            reason: "Interval Too Brief",
            headers: vec![("Min-Expires".to_owned(), rules.min_expires.to_string())],
        };
    }

    // Step 7, second half: match against the current bindings, then commit all or nothing.
    let outbound = outbound_applies(req);
    let parsed: Vec<Option<Uri<'_>>> = live
        .iter()
        .map(|b| Uri::parse(b.contact.as_bytes()).ok())
        .collect();
    let mut slots: Vec<Slot> = live.iter().map(|_| Slot::Keep).collect();
    let mut added: Vec<(Uri<'_>, Binding)> = Vec::new();
    let mut retransmission = false;
    let user_agent = req
        .header(HeaderName::UserAgent)
        .map(|ua| String::from_utf8_lossy(ua).into_owned());
    for r in requested {
        let flow = r
            .flow()
            .filter(|_| outbound)
            .map(|(i, id)| (i.to_owned(), id));
        let binding = (r.expires > 0).then(|| Binding {
            aor: aor.to_owned(),
            contact: r.contact,
            // SystemTime spans far more than 2^32 seconds: the fallback is unreachable.
            expires_at: now
                .checked_add(Duration::from_secs(u64::from(r.expires)))
                .unwrap_or(now),
            q: r.q,
            call_id: call_id.clone(),
            cseq,
            received: Some((meta.kind, meta.source)),
            local: Some(meta.local),
            path: path.clone(),
            instance: r.instance,
            // RFC 5626 §6: without outbound, the registrar ignores reg-id.
            reg_id: r.reg_id.filter(|_| outbound),
            user_agent: user_agent.clone(),
            nated,
            // Stamped by the registrar of a node of a cluster ([`Registrar::with_node`]).
            node: None,
            owner_route: None,
        });
        let matches: Vec<usize> = (0..live.len())
            .filter(|&i| {
                stored_matches(&live[i], parsed[i].as_ref(), &r.uri)
                    || flow
                        .as_ref()
                        .is_some_and(|(instance, id)| same_flow(&live[i], (instance, *id)))
            })
            .collect();
        for &i in &matches {
            match order(&live[i], &call_id, cseq) {
                Order::Newer => {}
                Order::Same => retransmission = true,
                Order::Stale => {
                    return refuse(500, "Server Internal Error (out-of-order REGISTER)");
                }
            }
        }
        if let Some((&first, rest)) = matches.split_first() {
            slots[first] = binding.map_or(Slot::Remove, |b| Slot::Replace(Box::new(b)));
            for &i in rest {
                slots[i] = Slot::Remove;
            }
            continue;
        }
        // Not bound yet: a contact repeated in this request replaces its earlier copy.
        added.retain(|(uri, _)| !same_contact(uri, &r.uri));
        if let Some(b) = binding {
            added.push((r.uri, b));
        }
    }
    if retransmission {
        return Outcome::Updated {
            bindings: live,
            changed: false,
        };
    }
    let mut bindings = Vec::with_capacity(live.len() + added.len());
    for (slot, old) in slots.into_iter().zip(&live) {
        match slot {
            Slot::Keep => bindings.push(old.clone()),
            Slot::Remove => {}
            Slot::Replace(b) => bindings.push(*b),
        }
    }
    bindings.extend(added.into_iter().map(|(_, b)| b));
    // Only a request that adds bindings is refused, so an AOR over the limit (a fixture, a
    // lowered limit) can still be refreshed and cleaned up.
    if bindings.len() > MAX_BINDINGS_PER_AOR && bindings.len() > live.len() {
        return refuse(
            403,
            "Forbidden (too many bindings for this address-of-record)",
        );
    }
    let changed = bindings != live;
    Outcome::Updated { bindings, changed }
}

/// Step 6: `Contact: *`.
fn remove_all(
    req: &Message,
    contact_count: usize,
    live: Vec<Binding>,
    call_id: &str,
    cseq: u32,
) -> Outcome {
    if contact_count != 1 || req.expires() != Some(0) {
        return refuse(
            400,
            "Bad Request (Contact: * needs Expires: 0 and no other Contact)",
        );
    }
    let mut retransmission = false;
    for b in &live {
        match order(b, call_id, cseq) {
            Order::Newer => {}
            Order::Same => retransmission = true,
            Order::Stale => return refuse(500, "Server Internal Error (out-of-order REGISTER)"),
        }
    }
    if retransmission {
        return Outcome::Updated {
            bindings: live,
            changed: false,
        };
    }
    Outcome::Updated {
        changed: !live.is_empty(),
        bindings: Vec::new(),
    }
}

/// The Path header field values, in order (RFC 3327 §5.3), each as written.
fn path_values(req: &Message) -> Result<Vec<String>, Outcome> {
    let bad = || refuse(400, "Bad Request (Path: malformed)");
    if req.paths().any(|p| p.is_err()) {
        return Err(bad());
    }
    req.values(HeaderName::Path)
        .map(|v| {
            v.ok()
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_owned)
                .ok_or_else(bad)
        })
        .collect()
}

fn requested_contact<'m>(
    c: &Contact<'m>,
    addr: &NameAddr<'m>,
    header_expires: Option<u32>,
    rules: &Rules,
) -> Result<Requested<'m>, Outcome> {
    let Ok(contact) = std::str::from_utf8(addr.uri.raw()) else {
        return Err(refuse(400, "Bad Request (Contact: URI is not text)"));
    };
    let q = match c.q() {
        None => 1000,
        Some(Ok(q)) => q,
        Some(Err(_)) => return Err(refuse(400, "Bad Request (Contact: bad q parameter)")),
    };
    let expires = match c.expires() {
        Some(Ok(e)) => e,
        Some(Err(_)) => MALFORMED_EXPIRES,
        None => header_expires.unwrap_or(rules.default_expires),
    };
    let instance = addr.params.value("+sip.instance").map(|v| {
        let v = v
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(v);
        String::from_utf8_lossy(v).into_owned()
    });
    let reg_id = addr
        .params
        .value("reg-id")
        .and_then(|v| scan::parse_decimal(v, u64::from(u32::MAX)))
        .map(|v| v as u32);
    Ok(Requested {
        uri: addr.uri,
        contact: contact.to_owned(),
        expires: expires.min(rules.max_expires),
        q,
        instance,
        reg_id,
    })
}

/// The 200 (OK) to a REGISTER (RFC 3261 §10.3 step 8), built from [`ok_headers`]. `to_tag` is
/// added to To when it has none (§8.2.6.2).
pub fn ok_response(req: &Message, bindings: &[Binding], now: SystemTime, to_tag: &[u8]) -> Bytes {
    build_response(req, 200, "OK", &ok_headers(req, bindings, now), to_tag)
}

/// The header fields of the 200 (OK) to a REGISTER beyond those copied from the request
/// (§8.2.6.2), in order: one `Contact: <uri>;expires=N[;q=Q]` per unexpired binding (§10.3
/// step 8: "a complete list of bindings"; N the seconds left, rounded up; q only when not 1),
/// the request's Path values echoed in one `Path` field when it had any (RFC 3327 §5.3),
/// `Require: outbound` when a Contact's flow was bound with outbound's rules (RFC 5626 §6), and
/// a `Date` (§20.17; a UA may use it to set its clock).
pub fn ok_headers(req: &Message, bindings: &[Binding], now: SystemTime) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = bindings
        .iter()
        .filter(|b| b.is_live(now))
        .map(|b| ("Contact".to_owned(), contact_value(b, now)))
        .collect();
    let path: Vec<String> = req
        .values(HeaderName::Path)
        .filter_map(Result::ok)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    if !path.is_empty() {
        headers.push(("Path".to_owned(), path.join(", ")));
    }
    if uses_outbound(req) {
        headers.push(("Require".to_owned(), "outbound".to_owned()));
    }
    headers.push(("Date".to_owned(), cached_date(now)));
    headers
}

/// [`rfc1123_date`] of `now`, formatted once per second per thread: every 200 to a REGISTER
/// carries one.
fn cached_date(now: SystemTime) -> String {
    thread_local! {
        static LAST: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    LAST.with_borrow_mut(|(at, date)| {
        if *at != secs {
            *date = rfc1123_date(now);
            *at = secs;
        }
        date.clone()
    })
}

fn build_response(
    req: &Message,
    code: u16,
    reason: &str,
    headers: &[(String, String)],
    to_tag: &[u8],
) -> Bytes {
    let mut builder = ResponseBuilder::new(req, code, reason).to_tag(to_tag);
    for (name, value) in headers {
        builder = builder.header(name, value.as_bytes());
    }
    builder.build()
}

fn contact_value(b: &Binding, now: SystemTime) -> String {
    let secs = b.seconds_left(now).min(u64::from(u32::MAX));
    let mut v = String::with_capacity(b.contact.len() + 24);
    v.push('<');
    v.push_str(&b.contact);
    v.push_str(">;expires=");
    v.push_str(scan::decimal(secs, &mut [0; 20]));
    if b.q < 1000 {
        v.push_str(";q=");
        v.push_str(&format_q(b.q));
    }
    v
}

/// A q-value in thousandths as a qvalue (§25.1): 500 → `0.5`, 0 → `0`, 1000 → `1`.
pub fn format_q(q: u16) -> String {
    if q >= 1000 {
        return "1".to_owned();
    }
    let frac = format!("{q:03}");
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        "0".to_owned()
    } else {
        format!("0.{frac}")
    }
}

/// `t` as an RFC 1123 date in GMT, the only form SIP allows (RFC 3261 §20.17, §25.1):
/// `Sat, 13 Nov 2010 23:29:00 GMT`. Times before 1970 are written as 1970-01-01.
pub fn rfc1123_date(t: SystemTime) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let (year, month, day) = civil_from_days(days);
    let weekday = WEEKDAYS[(days % 7) as usize];
    let month = MONTHS[(month - 1) as usize % 12];
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    format!("{weekday}, {day:02} {month} {year:04} {h:02}:{m:02}:{s:02} GMT")
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// What [`Registrar::save`] did: the response to send, in parts (status, reason, the header
/// fields beyond those copied from the request), plus what was stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveResult {
    /// 200 when the bindings were updated (or queried), else the error status.
    pub code: u16,
    pub reason: String,
    /// The header fields the response needs besides those a response copies from its request
    /// (`ResponseBuilder`): for a 200 the Contact list, Path and Date of [`ok_headers`]; for
    /// a 423 the `Min-Expires`.
    pub headers: Vec<(String, String)>,
    /// The normalized AOR, when the To header field gave one.
    pub aor: Option<String>,
    /// With a 200: the AOR's bindings after the update (what the Contact fields list).
    pub bindings: Vec<Binding>,
    /// With a 200: whether the store was written.
    pub changed: bool,
    /// With a 200: when what the response lists is durable. The 200 must not be sent before
    /// (the registrar's promise: an acknowledged binding survives a crash).
    pub commit: Commit,
}

impl SaveResult {
    pub fn is_success(&self) -> bool {
        self.code == 200
    }

    /// The complete response to `req` (the REGISTER given to `save`). `to_tag` is added to To
    /// when it has none (§8.2.6.2).
    pub fn response(&self, req: &Message, to_tag: &[u8]) -> Bytes {
        build_response(req, self.code, &self.reason, &self.headers, to_tag)
    }

    fn refused(
        aor: Option<String>,
        code: u16,
        reason: String,
        headers: Vec<(String, String)>,
    ) -> Self {
        SaveResult {
            code,
            reason,
            headers,
            aor,
            bindings: Vec::new(),
            changed: false,
            commit: Commit::Done,
        }
    }
}

/// Retry-After (seconds) of the 503 a REGISTER gets while a shared location store is
/// unreachable: long enough for a Redis restart, short enough that phones come back soon.
pub const UNREACHABLE_RETRY_AFTER: u32 = 5;

/// The registrar: [`process`] over a [`LocationStore`].
#[derive(Clone)]
pub struct Registrar {
    store: Arc<dyn LocationStore>,
    rules: Rules,
    /// How AORs are named (the store's keys).
    aors: AorRule,
    /// REGISTERs answered 200 (`moonroute_registrations_total`).
    registrations: Counter,
    /// This node, when the store is shared by several.
    node: Option<Arc<dyn ClusterNode>>,
}

/// This server as one node of several sharing the location store (the shell's cluster): it
/// stamps the bindings registered through it with itself and, when only it can reach them
/// (a connection, a NAT pinhole), the route other nodes reach them by.
pub trait ClusterNode: Send + Sync {
    fn stamp(&self, binding: &mut Binding);
}

impl Registrar {
    /// A registrar whose AORs keep every port ([`AorRule::default`]) until
    /// [`Registrar::with_aor_rule`] names the server's domains.
    pub fn new(store: Arc<dyn LocationStore>, rules: Rules) -> Registrar {
        Registrar {
            store,
            rules,
            aors: AorRule::default(),
            registrations: Counter::default(),
            node: None,
        }
    }

    /// Bindings registered here record `node` as theirs ([`ClusterNode::stamp`]).
    pub fn with_node(mut self, node: Arc<dyn ClusterNode>) -> Registrar {
        self.node = Some(node);
        self
    }

    /// AORs named by `aors`: the rule the store's keys were migrated to when it opened.
    pub fn with_aor_rule(mut self, aors: AorRule) -> Registrar {
        self.aors = aors;
        self
    }

    /// Counts every REGISTER answered 200 (retransmissions included) into `counter`.
    pub fn with_registrations_counter(mut self, counter: Counter) -> Registrar {
        self.registrations = counter;
        self
    }

    pub fn store(&self) -> &Arc<dyn LocationStore> {
        &self.store
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// How this registrar names AORs.
    pub fn aor_rule(&self) -> &AorRule {
        &self.aors
    }

    /// Handles a REGISTER (RFC 3261 §10.3 steps 5 to 8): reads the AOR's bindings, applies
    /// [`process`] and stores the result in one [`LocationStore::update`], so the whole
    /// request commits or nothing does. A store that refuses (e.g. full) gives 500, as §10.3
    /// requires when a commit fails. Does not send anything: the caller answers with
    /// [`SaveResult::response`], or with its code, reason and headers.
    pub fn save(&self, req: &Message, meta: &Meta, now: SystemTime) -> SaveResult {
        self.save_from(req, meta, false, now)
    }

    /// [`Registrar::save`] of a REGISTER whose sender is behind a NAT when `nated`
    /// ([`process_from`]).
    pub fn save_from(
        &self,
        req: &Message,
        meta: &Meta,
        nated: bool,
        now: SystemTime,
    ) -> SaveResult {
        let result = self.update_from(req, meta, nated, now);
        if result.is_success() {
            self.registrations.inc();
        }
        result
    }

    fn update_from(&self, req: &Message, meta: &Meta, nated: bool, now: SystemTime) -> SaveResult {
        let aor = req.to().ok().and_then(|to| self.aors.of(&to.uri));
        let Some(key) = aor.clone() else {
            // No AOR: `process` refuses at step 5 without looking at bindings.
            let refusal = process(req, meta, &self.aors, &[], &self.rules, now);
            return Self::result(req, now, None, refusal);
        };
        let mut outcome = None;
        // What marks the bindings this request writes (those read back keep their node).
        let this_request = (req.call_id().ok(), req.cseq().ok().map(|c| c.seq));
        let written_here = |b: &Binding| {
            b.node.is_none()
                && this_request.0 == Some(b.call_id.as_bytes())
                && this_request.1 == Some(b.cseq)
        };
        let stored = self.store.update_parked(&key, now, &mut |current| {
            let mut o = process_for_aor(req, meta, nated, &key, &current, &self.rules, now);
            if let (Some(node), Outcome::Updated { bindings, .. }) = (&self.node, &mut o) {
                for b in bindings.iter_mut().filter(|b| written_here(b)) {
                    node.stamp(b);
                }
            }
            let write = match &o {
                Outcome::Updated {
                    bindings,
                    changed: true,
                } => Some(bindings.clone()),
                _ => None,
            };
            outcome = Some(o);
            write
        });
        match (stored, outcome) {
            // A shared store that cannot be reached: try again later, or another node
            // (§21.5.4); the bindings are unchanged.
            (Err(e), _) if !self.store.reachable() => SaveResult::refused(
                aor,
                503,
                format!("Service Unavailable (location store: {e})"),
                vec![(
                    "Retry-After".to_owned(),
                    UNREACHABLE_RETRY_AFTER.to_string(),
                )],
            ),
            (Err(e), _) => SaveResult::refused(
                aor,
                500,
                format!("Server Internal Error (location store: {e})"),
                Vec::new(),
            ),
            (Ok(commit), Some(o)) => SaveResult {
                commit,
                ..Self::result(req, now, aor, o)
            },
            (Ok(_), None) => SaveResult::refused(
                aor,
                500,
                "Server Internal Error (location store did not run the update)".to_owned(),
                Vec::new(),
            ),
        }
    }

    fn result(req: &Message, now: SystemTime, aor: Option<String>, outcome: Outcome) -> SaveResult {
        match outcome {
            Outcome::Updated { bindings, changed } => SaveResult {
                code: 200,
                reason: "OK".to_owned(),
                headers: ok_headers(req, &bindings, now),
                aor,
                bindings,
                changed,
                commit: Commit::Done,
            },
            Outcome::Refused {
                code,
                reason,
                headers,
            } => SaveResult::refused(aor, code, reason.to_owned(), headers),
        }
    }

    /// The unexpired bindings of an AOR, highest q first. `aor_uri` is a URI (`sip:alice@x`)
    /// or a name-addr (`<sip:alice@x>`), normalized by the [`AorRule`] first (so a Request-URI
    /// `sip:bob@127.0.0.1:5060` finds the bindings of `sip:bob@127.0.0.1` when that names us);
    /// anything else has no bindings.
    pub fn lookup(&self, aor_uri: &str, now: SystemTime) -> Vec<Binding> {
        self.aors
            .of_text(aor_uri)
            .map_or_else(Vec::new, |aor| self.store.lookup(&aor, now))
    }

    /// [`Registrar::lookup`], or an error when the store could not answer (a shared store
    /// that is unreachable): not the same as no bindings.
    pub fn try_lookup(&self, aor_uri: &str, now: SystemTime) -> Result<Vec<Binding>, StoreError> {
        match self.aors.of_text(aor_uri) {
            Some(aor) => self.store.try_lookup(&aor, now),
            None => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests;
