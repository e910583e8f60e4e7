//! The request side of a proxy (RFC 3261 §16.3, §16.4, §16.6): validation, route
//! preprocessing, the forwarded copy, its next hop, and the branch / loop-detection hash.
//!
//! Order of use for one received request: `Message::validate` (§16.3 item 1), [`check_request`]
//! (items 2, 3, 5), [`detect_loop`] (item 4), [`preprocess_routes`] (§16.4), target selection by
//! the caller (§16.5), then per target [`branch_for`] + [`forward_copy`] + [`next_hop`] (§16.6).
//! [`branch_for`] and [`detect_loop`] must see the request in the same state (as received, after
//! `stamp_received` if the caller stamps, before [`preprocess_routes`]), or a loop will not be
//! recognised: the hash covers the Route header, which preprocessing edits.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::time::SystemTime;

use super::route_sign::{RouteSigner, Signature, Verdict, FLOW_PARAM, SIGNATURE_PARAM};
use super::via_branch;
use crate::proxy::identity::LocalIdentity;
use crate::sip::header::HeaderName;
use crate::sip::scan;
use crate::sip::uri::Uri;
use crate::sip::{extensions, Host, Message, NameAddr, ParseError, Via};
use crate::transport::TransportKind;

/// Max-Forwards a proxy adds when the request has none (§16.6 step 3).
const DEFAULT_MAX_FORWARDS: u8 = 70;

/// What the proxy is, for these rules: which URIs and Via sent-bys name it and what it
/// writes into Record-Route and Via on each local interface (both the server's
/// [`LocalIdentity`]: an advertised address, never a wildcard one).
#[derive(Clone, Debug)]
pub struct ProxyIdentity {
    local: LocalIdentity,
    /// Signs our Record-Route entries and recognises them in Route (`route_sign`).
    signer: RouteSigner,
}

impl ProxyIdentity {
    /// A proxy whose Record-Route signatures use a random key (they do not survive the
    /// process); [`ProxyIdentity::with_signer`] gives it the server's persistent one.
    pub fn new(local: LocalIdentity) -> Self {
        ProxyIdentity {
            local,
            signer: RouteSigner::random(),
        }
    }

    /// Signs Record-Route with `signer` (from the server key, `moonroute::secret`).
    pub fn with_signer(mut self, signer: RouteSigner) -> Self {
        self.signer = signer;
        self
    }

    pub fn local(&self) -> &LocalIdentity {
        &self.local
    }

    /// Whether `uri` names this proxy (§16.4: Request-URI and Route checks).
    pub fn is_myself(&self, uri: &Uri<'_>) -> bool {
        self.local.is_myself(uri)
    }

    /// `host:port` this proxy writes for the interface (Via sent-by, Record-Route host).
    fn host_port(&self, kind: TransportKind, addr: SocketAddr) -> String {
        self.local.sent_by(kind, Some(addr), addr).to_string()
    }

    /// The URI this proxy puts into Record-Route for one interface, always with `lr`
    /// (§16.6 step 4: a proxy compliant with RFC 3261 is a loose router), with the transport
    /// spelled out so the next request in the dialog arrives on the same transport, and with
    /// the dialog's `signature` ([`ProxyIdentity::record_route_signature`]).
    pub fn record_route_uri(
        &self,
        kind: TransportKind,
        addr: SocketAddr,
        signature: &str,
    ) -> String {
        format!(
            "sip:{};transport={};lr;{SIGNATURE_PARAM}={signature}",
            self.host_port(kind, addr),
            kind.uri_param()
        )
    }

    /// The signature our Record-Route entries in the copy of `req` forwarded to the callee
    /// carry, written at `now`: the callee's copy (`route_sign`), over its Call-ID, From tag,
    /// Contact and Record-Route so far, with an expiry. A request without them (malformed, or
    /// RFC 2543 without a tag) is signed over what it has.
    pub fn record_route_signature(&self, req: &Message, now: SystemTime) -> String {
        self.signer.sign_request(req, now)
    }

    /// [`ProxyIdentity::record_route_signature`], marking a call the script tracks when
    /// `tracked` (`route_sign`, "Tracked calls").
    pub fn tracked_record_route_signature(
        &self,
        req: &Message,
        tracked: bool,
        now: SystemTime,
    ) -> String {
        self.signer.sign_request_for(req, tracked, now)
    }

    /// Whether the Route §16.4 consumed (`done`, found valid by [`ProxyIdentity::check_route`])
    /// was signed by this server, since it started, for a call the script tracked.
    pub fn signed_for_tracked_call(&self, done: &Preprocessed) -> bool {
        self.signer.signed_for_tracked_call(done.signature)
    }

    /// §16.7 step 8: re-signs our entries in the Record-Route of a response about to go
    /// upstream as the caller's copy (`route_sign`), bound to the response's tags and Contact
    /// (as the router left it, e.g. after `fix_nated_contact`). Returns whether it changed.
    pub fn sign_response_record_route(&self, response: &mut Message, now: SystemTime) -> bool {
        self.signer
            .sign_response(response, |uri| self.local.is_myself(uri), now)
    }

    /// Judges the route set of `req` after [`preprocess_routes`] returned `done` for it: whether
    /// what it consumed carried our signature for this request's dialog, Request-URI and
    /// remaining Route, valid at `now` (`route_sign`).
    pub fn check_route(&self, req: &Message, done: &Preprocessed, now: SystemTime) -> Verdict {
        if !done.consumed_own_route {
            return Verdict::NotOurs;
        }
        self.signer.check(req, done.signature, now)
    }

    /// Whether a Via sent-by names this proxy: `host:port` is one of our addresses or domains.
    fn is_my_via(&self, via: &Via<'_>) -> bool {
        let default_port = if via.transport.eq_ignore_ascii_case(b"TLS") {
            5061
        } else {
            5060
        };
        self.local
            .is_my_host_port(&via.host, via.port.unwrap_or(default_port))
    }
}

/// Why a request is refused before forwarding: the status and reason phrase to answer with, and
/// for 420 the value of the Unsupported header (§20.40).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub code: u16,
    pub reason: &'static str,
    pub unsupported: Option<String>,
}

impl Rejection {
    fn new(code: u16, reason: &'static str) -> Self {
        Rejection {
            code,
            reason,
            unsupported: None,
        }
    }
}

/// §16.3 items 2, 3 and 5. Item 1 (syntax) is `Message::validate`, item 4 (loops) is
/// [`detect_loop`], item 6 (authorization) is the caller's.
///
/// - item 2: a Request-URI scheme the proxy cannot route is answered 416 (sip, sips and tel
///   are routable).
/// - item 3: Max-Forwards 0 must not be forwarded: 483. For OPTIONS the proxy MAY instead answer
///   as the final recipient (§11); this still returns 483 so a caller that does not special-case
///   OPTIONS never forwards it, and the caller may check the method and answer 200 instead.
/// - item 5: every Proxy-Require option tag must be in `supported`, else 420 listing the
///   unsupported tags ([`extensions::unsupported`]).
pub fn check_request(req: &Message, supported: &[&str]) -> Result<(), Rejection> {
    let uri = req
        .request_uri()
        .map_err(|_| Rejection::new(400, "Bad Request-URI"))?;
    if !uri.is_routable_scheme() {
        return Err(Rejection::new(416, "Unsupported URI Scheme"));
    }
    if let Some(mf) = req.max_forwards() {
        let mf = mf.map_err(|_| Rejection::new(400, "Bad Max-Forwards"))?;
        if mf == 0 {
            return Err(Rejection::new(483, "Too Many Hops"));
        }
    }
    match extensions::unsupported(req, &[HeaderName::ProxyRequire], supported) {
        Ok(None) => Ok(()),
        Ok(Some(tags)) => Err(Rejection {
            code: 420,
            reason: "Bad Extension",
            unsupported: Some(tags),
        }),
        Err(_) => Err(Rejection::new(400, "Bad Proxy-Require")),
    }
}

/// All Route values, each as written (trimmed), in order.
fn route_values(req: &Message) -> Result<Vec<Vec<u8>>, ParseError> {
    req.values(HeaderName::Route)
        .map(|v| v.map(<[u8]>::to_vec).map_err(|e| e.in_context("Route")))
        .collect()
}

/// Replaces the whole Route list by `values`, in one field at the position of the first Route
/// field (relative order is all §7.3.1 requires), or removes Route when the list is empty.
fn set_routes(req: &mut Message, values: &[Vec<u8>]) -> Result<(), ParseError> {
    if values.is_empty() {
        req.remove_headers("Route");
        return Ok(());
    }
    req.set_header("Route", &values.join(&b", "[..]))
}

/// The URI of one Route value (for the Request-URI: name-addr brackets and header parameters
/// are not part of it).
fn route_uri(value: &[u8]) -> Result<Vec<u8>, ParseError> {
    let na = NameAddr::parse(value).map_err(|e| e.in_context("Route"))?;
    Ok(na.uri.raw().to_vec())
}

/// Whether a Request-URI is one this proxy placed in Record-Route and a strict router copied
/// there (§16.4): it names us, has no user part (our Record-Route URIs never do, so a request
/// for `bob@our-domain` is not mistaken for one) and carries `lr` (ours always do).
fn is_my_record_route(uri: &Uri<'_>, me: &ProxyIdentity) -> bool {
    match uri.as_sip() {
        Some(sip) => sip.user.is_none() && sip.has_lr() && me.is_myself(uri),
        None => false,
    }
}

/// What [`preprocess_routes`] did and found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Preprocessed {
    /// A Route entry naming this proxy was removed, or a strict router's rewrite undone: the
    /// request changed.
    pub consumed_own_route: bool,
    /// The signature (`route_sign`) of what was consumed, `None` when it carried none; whether
    /// it is ours for this request is [`ProxyIdentity::check_route`]'s to say.
    pub signature: Option<Signature>,
    /// The flow named by an owner route this server signed (`route_sign`, "Owner routes")
    /// among what was consumed: another node of the cluster sent the request here to be
    /// delivered on that flow.
    pub owner_flow: Option<(TransportKind, std::net::SocketAddr)>,
}

/// §16.4 route information preprocessing.
///
/// 1. If the Request-URI is a value this proxy placed in Record-Route, the previous hop was a
///    strict router: the real Request-URI is the last Route value; move it there and drop it
///    from Route.
/// 2. If the top Route names this proxy, remove it. When the value after it names this proxy
///    too but is a different URI with the same signature, it is the second half of a double
///    Record-Route (RFC 5658, one entry per interface) and is removed as well; the same URI
///    twice, or another signature (another pass's entry), is a spiral through this proxy and is
///    left for the next pass.
///
/// The signature of what was removed (or of the Request-URI a strict router wrote) is reported
/// in [`Preprocessed::signature`] for [`ProxyIdentity::check_route`]; the entries are removed
/// whatever it is, as §16.4 says.
///
/// `maddr` handling of §16.4 (Request-URI maddr naming us) is not implemented.
pub fn preprocess_routes(
    req: &mut Message,
    me: &ProxyIdentity,
) -> Result<Preprocessed, ParseError> {
    let mut routes = route_values(req)?;
    // Without a Route there is no saved Request-URI to restore: leave the request as it is.
    let request_uri = req.request_uri()?;
    let strict_prev_hop = is_my_record_route(&request_uri, me) && !routes.is_empty();
    // The signature of the entries consumed so far, once one is.
    let mut group = strict_prev_hop.then(|| Signature::of(&request_uri));
    if strict_prev_hop {
        if let Some(last) = routes.pop() {
            let uri = route_uri(&last)?;
            req.set_request_uri(&uri)?;
        }
    }
    let mut removed: Vec<Vec<u8>> = Vec::new();
    let mut owner_flow = None;
    while removed.len() < 2 {
        let Some(top) = routes.first() else { break };
        // Until a value is removed, the top one is still the message's first Route value,
        // whose parse the message keeps (validation took it).
        let na = match removed.is_empty().then(|| req.routes().next()).flatten() {
            Some(kept) => kept,
            None => NameAddr::parse(top).map_err(|e| e.in_context("Route")),
        }?;
        if !me.is_myself(&na.uri) {
            break;
        }
        let same_as_removed = removed.iter().any(|r| {
            NameAddr::parse(r).is_ok_and(|prev| match (prev.uri.as_sip(), na.uri.as_sip()) {
                (Some(a), Some(b)) => a.equivalent(b),
                _ => false,
            })
        });
        let signature = Signature::of(&na.uri);
        let another_pass = group.is_some_and(|first| first != signature);
        if same_as_removed || another_pass {
            break;
        }
        group.get_or_insert(signature);
        owner_flow = owner_flow.or_else(|| {
            let token = na.uri.as_sip()?.param(FLOW_PARAM)?;
            me.signer.check_flow(token)
        });
        removed.push(routes.remove(0));
    }
    let changed = strict_prev_hop || !removed.is_empty();
    if changed {
        set_routes(req, &routes)?;
    }
    Ok(Preprocessed {
        consumed_own_route: changed,
        signature: group.flatten(),
        owner_flow,
    })
}

/// The Route values of `req` as it is now, in order, sharing the message's bytes: what
/// [`remove_preloaded_route`] later recognises.
pub fn route_set(req: &Message) -> Result<Vec<bytes::Bytes>, ParseError> {
    req.values(HeaderName::Route)
        .map(|v| v.map(|v| req.share(v)).map_err(|e| e.in_context("Route")))
        .collect()
}

/// Removes a route set the sender pre-loaded from the top of `req`'s Route, so the request is
/// not sent where the sender chose (§16.6 step 7 would follow it: the top Route is the next
/// hop). `preloaded` is what [`route_set`] gave after §16.4 ([`preprocess_routes`]) removed
/// our own entries. Removed only while the request still starts with exactly those values: a
/// router that rewrote Route itself took the decision, and what it added below them stays.
/// Returns whether anything was removed.
///
/// RFC 3261 lets a proxy follow a pre-loaded Route (§16.4, §16.6 steps 6-7), and a proxy
/// relaying for anyone who asks becomes an open relay and a port scanner by it; Kamailio's
/// default configuration removes Route from initial requests for this reason
/// (`remove_hf("Route")`). Routing policy decides who may pre-load a route; this is the
/// mechanism.
pub fn remove_preloaded_route(
    req: &mut Message,
    preloaded: &[bytes::Bytes],
) -> Result<bool, ParseError> {
    if preloaded.is_empty() {
        return Ok(false);
    }
    let routes = route_values(req)?;
    let unchanged = routes.len() >= preloaded.len()
        && routes
            .iter()
            .zip(preloaded)
            .all(|(now, before)| now[..] == before[..]);
    if !unchanged {
        return Ok(false);
    }
    set_routes(req, &routes[preloaded.len()..])?;
    Ok(true)
}

/// What [`forward_copy`] needs for one target (§16.6).
#[derive(Clone, Copy, Debug)]
pub struct ForwardSpec<'a> {
    /// The new Request-URI (§16.6 step 2).
    pub target: &'a [u8],
    /// Insert Record-Route (step 4), e.g. for dialog-creating requests.
    pub record_route: bool,
    /// Its signature marks a call the script tracks (`route_sign`, "Tracked calls").
    pub tracked: bool,
    /// Transport and local address the request arrived on.
    pub inbound: (TransportKind, SocketAddr),
    /// Transport and local address the copy leaves from.
    pub outbound: (TransportKind, SocketAddr),
    /// From [`branch_for`]; must be a token (§20.42).
    pub branch: &'a str,
    pub me: &'a ProxyIdentity,
    /// The wall-clock time: a Record-Route signature expires a lifetime after it.
    pub now: SystemTime,
}

/// §16.6 steps 1-8 and 10: the copy of `req` forwarded to one target.
///
/// - step 1: copy; step 2: Request-URI = `target`.
/// - step 3: Max-Forwards decremented, or 70 added. A request with 0 is refused with 483
///   ([`check_request`] should have caught it).
/// - step 4: Record-Route with `lr` and our signature (the callee's copy, `route_sign`) on top
///   when asked; two entries (outbound interface above inbound, RFC 5658) when the interfaces'
///   URIs differ, so each side of the dialog routes to the interface it can reach.
/// - step 6: if the top Route has no `lr` the next hop is a strict router: the Request-URI goes
///   to the end of Route and the top Route becomes the Request-URI.
/// - step 8: our Via on top with `branch`.
/// - step 10: Content-Length added for a stream transport (§18.3).
///
/// Step 5 (extra headers) is the caller's; steps 7 and 9 are [`next_hop`] (of `req`, not of
/// the copy: see there) and the client transaction.
pub fn forward_copy(req: &Message, spec: &ForwardSpec) -> Result<Message, ParseError> {
    if !scan::is_token(spec.branch.as_bytes()) {
        return Err(ParseError::with_status(500, "Via", "branch is not a token"));
    }
    let mut out = req.clone();
    out.set_request_uri(spec.target)?;

    match req.max_forwards().transpose()? {
        Some(0) => {
            return Err(ParseError::with_status(
                483,
                "Max-Forwards",
                "request must not be forwarded",
            ))
        }
        Some(n) => out.set_header("Max-Forwards", (n - 1).to_string().as_bytes())?,
        None => out.append_header("Max-Forwards", DEFAULT_MAX_FORWARDS.to_string().as_bytes())?,
    }

    if spec.record_route {
        let (in_kind, in_addr) = spec.inbound;
        let (out_kind, out_addr) = spec.outbound;
        let signature = spec
            .me
            .tracked_record_route_signature(req, spec.tracked, spec.now);
        let inbound_uri = spec.me.record_route_uri(in_kind, in_addr, &signature);
        let outbound_uri = spec.me.record_route_uri(out_kind, out_addr, &signature);
        if inbound_uri != outbound_uri {
            out.prepend_header("Record-Route", format!("<{inbound_uri}>").as_bytes())?;
        }
        out.prepend_header("Record-Route", format!("<{outbound_uri}>").as_bytes())?;
    }

    let mut routes = route_values(&out)?;
    if let Some(top) = routes.first() {
        let na = NameAddr::parse(top).map_err(|e| e.in_context("Route"))?;
        let loose = na.uri.as_sip().is_some_and(|u| u.has_lr());
        if !loose {
            let new_ruri = na.uri.raw().to_vec();
            let old_ruri = out.request_uri_bytes().unwrap_or_default().to_vec();
            routes.remove(0);
            routes.push([&b"<"[..], &old_ruri, b">"].concat());
            out.set_request_uri(&new_ruri)?;
            set_routes(&mut out, &routes)?;
        }
    }

    let (out_kind, out_addr) = spec.outbound;
    let via = format!(
        "SIP/2.0/{} {};branch={}",
        out_kind.via_name(),
        spec.me.host_port(out_kind, out_addr),
        spec.branch
    );
    out.prepend_header("Via", via.as_bytes())?;

    if out_kind.is_stream() {
        out.ensure_content_length()?;
    }
    Ok(out)
}

/// `req` with `route` placed above its Route header fields, in order (the first value ends up
/// on top): the pre-loaded route set of a target, e.g. the Path a contact was registered
/// through (RFC 3327 §5.3: the proxy "MUST include the Path header field values as Route
/// header field values in the request, in the same order"). Each value must be a name-addr
/// (`<sip:edge.example.com;lr>`), as Path values are.
pub fn preload_route(req: &Message, route: &[bytes::Bytes]) -> Result<Message, ParseError> {
    let mut out = req.clone();
    for value in route.iter().rev() {
        NameAddr::parse(value).map_err(|e| e.in_context("Path"))?;
        out.prepend_header("Route", value)?;
    }
    Ok(out)
}

/// Where a forwarded copy goes first (§16.6 step 7): what RFC 3263 resolution starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// `maddr` when present (RFC 3263 §4), else the URI host; an IPv6 address without brackets.
    pub host: String,
    /// `None`: resolve (SRV) or use the default port.
    pub port: Option<u16>,
    /// The URI's `transport` parameter; `None` when absent.
    pub transport: Option<TransportKind>,
    /// A `sips:` URI: must be reached over TLS.
    pub secure: bool,
}

/// §16.6 step 7: where `req` goes first when it is forwarded to `target` (the new
/// Request-URI of step 2): the URI of its top Route if it has one, else `target`.
///
/// Call it on the request **before** [`forward_copy`]. A top Route without `lr` names a strict
/// router: step 6 moves that URI into the copy's Request-URI, and step 7 then says "the proxy
/// MUST apply those procedures to the Request-URI", which is the same URI. On the copy after
/// step 6 the top Route is the hop *after* the strict router, which must not be skipped.
///
/// Errors carry the status to answer with: 416 for a scheme that is not sip/sips, 404 for a
/// `tel:` URI with no Route (nothing says where to send it), 503 for a transport this proxy
/// does not speak.
pub fn next_hop(req: &Message, target: &[u8]) -> Result<NextHop, ParseError> {
    let routes = route_values(req)?;
    match routes.first() {
        Some(top) => next_hop_of_uri(&route_uri(top)?),
        None => next_hop_of_uri(target),
    }
}

/// The next hop named by one URI: a Route value, a Request-URI, or a destination set apart
/// from both (Kamailio's `$du`, used by a stateless `forward(uri)`).
pub fn next_hop_of_uri(raw: &[u8]) -> Result<NextHop, ParseError> {
    let uri = Uri::parse(raw)?;
    let sip = match uri {
        Uri::Sip(s) => s,
        Uri::Tel(_) => {
            return Err(ParseError::with_status(
                404,
                "Request-URI",
                "no route for a tel URI",
            ))
        }
        Uri::Other { .. } => {
            return Err(ParseError::with_status(
                416,
                "Request-URI",
                "unsupported URI scheme",
            ))
        }
    };
    let host = match sip.maddr() {
        Some(m) if !m.is_empty() => {
            let h = Host::parse(m).map_err(|e| e.in_context("maddr"))?;
            host_string(&h)
        }
        _ => host_string(&sip.host),
    };
    let transport = match sip.transport().map(TransportKind::from_name) {
        None => None,
        Some(Some(kind)) => Some(kind),
        Some(None) => {
            return Err(ParseError::with_status(
                503,
                "transport",
                "unsupported transport",
            ))
        }
    };
    Ok(NextHop {
        host,
        port: sip.port,
        transport,
        secure: sip.secure,
    })
}

fn host_string(h: &Host<'_>) -> String {
    match h.ip() {
        Some(ip) => ip.to_string(),
        None => h.to_string(),
    }
}

/// The loop-detection hash (§16.6 step 8) of `req`, taking `top_via` as the top Via it had when
/// received. Fields: To tag, From tag, Call-ID, CSeq number, Request-URI, top Via,
/// Proxy-Require, Proxy-Authorization and Route. Each is hashed with its length so adjacent
/// fields cannot run into each other. Of the top Via only sent-protocol transport, sent-by and
/// branch count: `received`/`rport` are added by the receiving proxy (§18.2.1) and must not turn
/// a loop into a spiral. The hash is SipHash with fixed keys: stable within one build, which is
/// what matching our own Vias needs.
fn loop_hash(req: &Message, top_via: Option<&Via<'_>>) -> String {
    let mut h = DefaultHasher::new();
    req.to_tag().hash(&mut h);
    req.from_tag().hash(&mut h);
    req.call_id().ok().hash(&mut h);
    req.cseq().ok().map(|c| c.seq).hash(&mut h);
    req.request_uri_bytes().hash(&mut h);
    // Hashed as (transport in upper case, host text, port, branch), borrowed: a `[u8]` hashes
    // as the `Vec<u8>` and a `str` as the `String` this once allocated, so branches are the
    // same as before.
    match top_via {
        Some(v) => v.host.with_text(|host| {
            let mut upper = [0u8; 16];
            match upper.get_mut(..v.transport.len()) {
                Some(upper) => {
                    upper.copy_from_slice(v.transport);
                    upper.make_ascii_uppercase();
                    Some((&*upper, host, v.port, v.branch())).hash(&mut h)
                }
                None => {
                    let upper = v.transport.to_ascii_uppercase();
                    Some((&upper[..], host, v.port, v.branch())).hash(&mut h)
                }
            }
        }),
        None => None::<()>.hash(&mut h),
    }
    for name in [
        HeaderName::ProxyRequire,
        HeaderName::ProxyAuthorization,
        HeaderName::Route,
    ] {
        name.as_str().hash(&mut h);
        for v in req.values(name) {
            v.ok().hash(&mut h);
        }
    }
    format!("{:016x}", h.finish())
}

/// §16.6 step 8: the branch for one forwarded copy: the magic cookie, the loop-detection hash of
/// the request (§16.3 item 4), `.`, then `unique`, which the caller makes unique per branch
/// (stateful) or derives from the request (stateless, §16.11, so a retransmission gets the same
/// branch). Characters of `unique` outside token are dropped so the branch stays a token.
pub fn branch_for(req: &Message, unique: &str) -> String {
    let top = req.top_via().ok();
    via_branch::with_loop_hash(&loop_hash(req, top.as_ref()), unique)
}

/// §16.11: the branch of a statelessly forwarded copy. It must be the same for every
/// retransmission, and the CANCEL (§9.1) and the ACK for a non-2xx (§17.1.1.3) of a forwarded
/// INVITE must get the INVITE's branch, or the next hop could not match them. All three carry
/// the INVITE's top Via branch, Call-ID and Request-URI, so the branch hashes those (and the
/// top Via's sent-by, as a branch is only unique per sender).
///
/// The branch also carries a keyed hash (a per-process secret) of the Via it sits above and
/// the Call-ID: a response that matches no transaction is relayed statelessly only when its
/// branch proves we forwarded the request ([`is_our_stateless_branch`]); otherwise anyone
/// could make the proxy reflect forged responses to a third party.
pub fn stateless_branch(req: &Message) -> String {
    let top = req.top_via().ok();
    let mut h = DefaultHasher::new();
    match &top {
        Some(v) => v
            .host
            .with_text(|host| Some((host, v.port, v.branch())).hash(&mut h)),
        None => None::<()>.hash(&mut h),
    }
    req.call_id().ok().hash(&mut h);
    req.request_uri_bytes().hash(&mut h);
    let mac = stateless_mac(top.as_ref(), req.call_id().ok());
    via_branch::stateless(h.finish(), mac)
}

/// True when the top Via of `response` carries a branch [`stateless_branch`] made for the Via
/// below it: the request went out through a stateless forward of this process.
pub fn is_our_stateless_branch(response: &Message) -> bool {
    let mut vias = response.vias();
    let Some(Ok(top)) = vias.next() else {
        return false;
    };
    let Some(mac) = top.branch().and_then(via_branch::stateless_mac) else {
        return false;
    };
    let below = match vias.next() {
        Some(Ok(via)) => via,
        _ => return false,
    };
    stateless_mac(Some(&below), response.call_id().ok()) == mac
}

fn stateless_mac(via: Option<&Via<'_>>, call_id: Option<&[u8]>) -> u64 {
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let key = KEY.get_or_init(std::collections::hash_map::RandomState::new);
    match via {
        Some(v) => v.host.with_text(|host| {
            std::hash::BuildHasher::hash_one(key, (Some((host, v.port, v.branch())), call_id))
        }),
        None => std::hash::BuildHasher::hash_one(
            key,
            (None::<(&str, Option<u16>, Option<&[u8]>)>, call_id),
        ),
    }
}

/// §16.3 item 4: true when the request has looped. For every Via this proxy inserted (sent-by
/// is ours) with one of our branches, the hash is recomputed with the Via below it as the top
/// Via — the one that was on top when we forwarded it — and compared with the hash in the
/// branch. Equal: same request, same routing fields: a loop (answer 482). Different: the
/// Request-URI or routing fields changed in between: a spiral, allowed.
pub fn detect_loop(req: &Message, me: &ProxyIdentity) -> bool {
    let vias: Vec<Via<'_>> = req.vias().filter_map(Result::ok).collect();
    for (i, via) in vias.iter().enumerate() {
        if !me.is_my_via(via) {
            continue;
        }
        let Some(hash) = via.branch().and_then(via_branch::loop_hash) else {
            continue;
        };
        if loop_hash(req, vias.get(i + 1)).as_bytes() == hash {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const US_UDP: (TransportKind, SocketAddr) = (
        TransportKind::Udp,
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5060),
    );
    const US_TCP: (TransportKind, SocketAddr) = (
        TransportKind::Tcp,
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5060),
    );

    /// The key of the test proxies' Record-Route signatures.
    const TEST_KEY: &[u8] = b"test key";

    /// The wall-clock time the tests run at.
    fn now() -> SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)
    }

    fn signer() -> RouteSigner {
        RouteSigner::new(TEST_KEY)
    }

    fn me() -> ProxyIdentity {
        ProxyIdentity::new(LocalIdentity::new(&[], [US_UDP.1])).with_signer(signer())
    }

    /// Our signature in the copy of `r` forwarded now (the callee's copy).
    fn sig_of(r: &Message) -> String {
        me().record_route_signature(r, now())
    }

    /// The caller's INVITE of the dialog the signature tests use: Contact alice@127.0.0.1:5070.
    fn invite_with_contact() -> Message {
        req(
            "INVITE",
            "sip:bob@example.com",
            &["Contact: <sip:alice@127.0.0.1:5070>"],
        )
    }

    /// The callee's request in that dialog (to alice's Contact, her tag a1 in To), with `route`.
    fn callees_request(method: &str, route: &str) -> Message {
        let text = req_text(method, "sip:alice@127.0.0.1:5070", &[route])
            .replace(
                "To: <sip:bob@example.com>",
                "To: <sip:alice@example.com>;tag=a1",
            )
            .replace(
                "From: <sip:alice@example.com>;tag=a1",
                "From: <sip:bob@example.com>;tag=b9",
            );
        parse(&text)
    }

    /// §16.4, then the check of what it consumed.
    fn preprocess_and_check(r: &mut Message, me: &ProxyIdentity) -> (Preprocessed, Verdict) {
        let done = preprocess_routes(r, me).unwrap();
        let verdict = me.check_route(r, &done, now());
        (done, verdict)
    }

    /// A request with `ruri`, the usual mandatory headers, then `extra` lines (CRLF-joined).
    fn req_text(method: &str, ruri: &str, extra: &[&str]) -> String {
        let mut s = format!(
            "{method} {ruri} SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKuac1\r\n\
             To: <sip:bob@example.com>\r\n\
             From: <sip:alice@example.com>;tag=a1\r\n\
             Call-ID: c1@127.0.0.1\r\n\
             CSeq: 1 {method}\r\n"
        );
        for e in extra {
            s.push_str(e);
            s.push_str("\r\n");
        }
        s.push_str("\r\n");
        s
    }

    fn parse(text: &str) -> Message {
        let m = Message::parse(Bytes::from(text.to_owned())).expect("test message parses");
        m.validate().expect("test message is valid");
        m
    }

    fn req(method: &str, ruri: &str, extra: &[&str]) -> Message {
        parse(&req_text(method, ruri, extra))
    }

    /// Where `r` goes forwarded to its own Request-URI.
    fn hop_of(r: &Message) -> Result<NextHop, ParseError> {
        next_hop(r, r.request_uri_bytes().unwrap())
    }

    fn routes(m: &Message) -> Vec<String> {
        m.values(HeaderName::Route)
            .map(|v| String::from_utf8_lossy(v.unwrap()).into_owned())
            .collect()
    }

    fn rruri(m: &Message) -> String {
        String::from_utf8_lossy(m.request_uri_bytes().unwrap()).into_owned()
    }

    fn spec<'a>(target: &'a str, me: &'a ProxyIdentity) -> ForwardSpec<'a> {
        ForwardSpec {
            target: target.as_bytes(),
            record_route: false,
            tracked: false,
            inbound: US_UDP,
            outbound: US_UDP,
            branch: "z9hG4bKtest",
            me,
            now: now(),
        }
    }

    // ----- check_request ------------------------------------------------------------------

    #[test]
    fn check_accepts_sip_and_tel() {
        let sip = req("INVITE", "sip:bob@example.com", &["Max-Forwards: 70"]);
        assert_eq!(check_request(&sip, &[]), Ok(()));
        let tel = req("INVITE", "tel:+15551234567", &[]);
        assert_eq!(check_request(&tel, &[]), Ok(()));
    }

    #[test]
    fn check_unknown_scheme_is_416() {
        let r = req("INVITE", "urn:service:sos", &[]);
        assert_eq!(check_request(&r, &[]).unwrap_err().code, 416);
    }

    #[test]
    fn check_max_forwards_zero_is_483() {
        let r = req("INVITE", "sip:bob@example.com", &["Max-Forwards: 0"]);
        let e = check_request(&r, &[]).unwrap_err();
        assert_eq!((e.code, e.reason), (483, "Too Many Hops"));
        let r = req("INVITE", "sip:bob@example.com", &["Max-Forwards: 1"]);
        assert_eq!(check_request(&r, &[]), Ok(()));
    }

    #[test]
    fn check_proxy_require_unknown_is_420_with_tags() {
        let r = req(
            "INVITE",
            "sip:bob@example.com",
            &["Proxy-Require: foo, bar", "Proxy-Require: baz, BAR"],
        );
        let e = check_request(&r, &["foo"]).unwrap_err();
        assert_eq!(e.code, 420);
        assert_eq!(e.unsupported.as_deref(), Some("bar, baz"));
        assert_eq!(check_request(&r, &["foo", "bar", "baz"]), Ok(()));
    }

    // ----- preprocess_routes --------------------------------------------------------------

    #[test]
    fn preprocess_removes_our_top_route() {
        let mut r = req(
            "INVITE",
            "sip:bob@example.com",
            &["Route: <sip:127.0.0.1:5060;lr>, <sip:127.0.0.1:5070;lr>"],
        );
        assert!(preprocess_routes(&mut r, &me()).unwrap().consumed_own_route);
        assert_eq!(routes(&r), ["<sip:127.0.0.1:5070;lr>"]);
        assert_eq!(rruri(&r), "sip:bob@example.com");
        // Nothing of ours left: no change.
        assert!(!preprocess_routes(&mut r, &me()).unwrap().consumed_own_route);
    }

    #[test]
    fn preprocess_removes_both_halves_of_double_record_route() {
        let mut r = req(
            "BYE",
            "sip:bob@example.com",
            &["Route: <sip:127.0.0.1:5060;transport=udp;lr>, \
               <sip:127.0.0.1:5060;transport=tcp;lr>, <sip:example.com;lr>"],
        );
        assert!(preprocess_routes(&mut r, &me()).unwrap().consumed_own_route);
        assert_eq!(routes(&r), ["<sip:example.com;lr>"]);
    }

    #[test]
    fn preprocess_strict_router_restores_request_uri() {
        let mut r = req(
            "BYE",
            "sip:127.0.0.1:5060;transport=udp;lr",
            &[
                "Route: <sip:127.0.0.1:5070;lr>",
                "Route: <sip:bob@example.com>",
            ],
        );
        assert!(preprocess_routes(&mut r, &me()).unwrap().consumed_own_route);
        assert_eq!(rruri(&r), "sip:bob@example.com");
        assert_eq!(routes(&r), ["<sip:127.0.0.1:5070;lr>"]);
        r.validate().unwrap();
    }

    #[test]
    fn preprocess_our_record_route_uri_without_route_is_unchanged() {
        let mut r = req("BYE", "sip:127.0.0.1:5060;transport=udp;lr", &[]);
        assert!(!preprocess_routes(&mut r, &me()).unwrap().consumed_own_route);
        assert_eq!(rruri(&r), "sip:127.0.0.1:5060;transport=udp;lr");
    }

    #[test]
    fn preprocess_leaves_requests_for_our_users_alone() {
        // Addressed to a user at our address: not a Record-Route value of ours.
        let mut r = req(
            "INVITE",
            "sip:bob@127.0.0.1:5060",
            &["Route: <sip:example.com;lr>"],
        );
        assert!(!preprocess_routes(&mut r, &me()).unwrap().consumed_own_route);
        assert_eq!(rruri(&r), "sip:bob@127.0.0.1:5060");
    }

    #[test]
    fn preprocess_reports_the_signature_and_check_route_judges_it() {
        let sig = sig_of(&invite_with_contact());
        let ours = format!("Route: <sip:127.0.0.1:5060;transport=udp;lr;mrs={sig}>");
        let mut bye = callees_request("BYE", &ours);
        let (done, verdict) = preprocess_and_check(&mut bye, &me());
        assert!(done.consumed_own_route);
        assert_eq!(done.signature, Some(Signature::parse(sig.as_bytes())));
        assert_eq!(verdict, Verdict::Valid);
        assert!(routes(&bye).is_empty());
        // The same Route on a request to another host: not for this dialog's party.
        let elsewhere = req_text("MESSAGE", "sip:victim@127.0.0.6:5060", &[&ours]).replace(
            "To: <sip:bob@example.com>",
            "To: <sip:alice@example.com>;tag=a1",
        );
        let (_, verdict) = preprocess_and_check(&mut parse(&elsewhere), &me());
        assert_eq!(verdict, Verdict::Mismatch);
        // Nothing of ours consumed: not ours to judge.
        let mut r = req(
            "BYE",
            "sip:bob@example.com",
            &["Route: <sip:example.com;lr>"],
        );
        let (done, verdict) = preprocess_and_check(&mut r, &me());
        assert_eq!(done, Preprocessed::default());
        assert_eq!(verdict, Verdict::NotOurs);
    }

    #[test]
    fn preprocess_removes_but_does_not_trust_unsigned_or_tampered_routes() {
        let sig = sig_of(&invite_with_contact());
        let last = if sig.ends_with('0') { '1' } else { '0' };
        let tampered = format!("{}{last}", &sig[..sig.len() - 1]);
        for (route, expected) in [
            (
                "Route: <sip:127.0.0.1:5060;lr>".to_owned(),
                Verdict::Unsigned,
            ),
            (
                format!("Route: <sip:127.0.0.1:5060;lr;mrs={tampered}>"),
                Verdict::Mismatch,
            ),
            (
                "Route: <sip:127.0.0.1:5060;lr;mrs>".to_owned(),
                Verdict::Mismatch,
            ),
        ] {
            let mut r = callees_request("MESSAGE", &route);
            let (done, verdict) = preprocess_and_check(&mut r, &me());
            assert!(done.consumed_own_route, "{route}");
            assert_eq!(verdict, expected, "{route}");
            assert!(routes(&r).is_empty());
        }
        // Another server's key.
        let stranger = ProxyIdentity::new(LocalIdentity::new(&[], [US_UDP.1]));
        let mut r = callees_request("BYE", &format!("Route: <sip:127.0.0.1:5060;lr;mrs={sig}>"));
        assert_eq!(preprocess_and_check(&mut r, &stranger).1, Verdict::Mismatch);
    }

    #[test]
    fn preprocess_leaves_another_passs_entry_for_the_next_pass() {
        // A spiral: two passes through us, each with its own signature, one after the other.
        let first = "<sip:127.0.0.1:5060;transport=udp;lr;mrs=q6553f100.0000000000000001>";
        let second = "<sip:127.0.0.1:5060;transport=tcp;lr;mrs=q6553f100.0000000000000002>";
        let mut r = req(
            "BYE",
            "sip:bob@example.com",
            &[&format!("Route: {first}, {second}")],
        );
        let done = preprocess_routes(&mut r, &me()).unwrap();
        assert!(done.consumed_own_route);
        assert_eq!(routes(&r), [second]);
        // The two halves of a double Record-Route share one signature: both go.
        let other_half = first.replace("transport=udp", "transport=tcp");
        let mut r = req(
            "BYE",
            "sip:bob@example.com",
            &[&format!("Route: {first}, {other_half}")],
        );
        preprocess_routes(&mut r, &me()).unwrap();
        assert!(routes(&r).is_empty());
    }

    #[test]
    fn preprocess_strict_router_signature_is_in_the_request_uri() {
        let sig = sig_of(&invite_with_contact());
        let mut r = callees_request("BYE", "Route: <sip:alice@127.0.0.1:5070>");
        r.set_request_uri(format!("sip:127.0.0.1:5060;transport=udp;lr;mrs={sig}").as_bytes())
            .unwrap();
        let (done, verdict) = preprocess_and_check(&mut r, &me());
        assert!(done.consumed_own_route);
        assert_eq!(verdict, Verdict::Valid);
        assert_eq!(rruri(&r), "sip:alice@127.0.0.1:5070");
    }

    #[test]
    fn a_record_route_we_write_is_one_we_accept() {
        let invite = invite_with_contact();
        let me = me();
        let mut s = spec("sip:bob@example.com", &me);
        s.record_route = true;
        let out = forward_copy(&invite, &s).unwrap();
        let rr = out
            .values(HeaderName::RecordRoute)
            .next()
            .unwrap()
            .unwrap()
            .to_vec();
        let route = format!("Route: {}", String::from_utf8_lossy(&rr));
        let mut bye = callees_request("BYE", &route);
        assert_eq!(preprocess_and_check(&mut bye, &me).1, Verdict::Valid);
    }

    // ----- forward_copy -------------------------------------------------------------------

    #[test]
    fn forward_rewrites_only_what_16_6_says() {
        let r = req(
            "INVITE",
            "sip:bob@example.com",
            &[
                "Max-Forwards: 70",
                "X-Custom:   odd   spacing",
                "Content-Length: 0",
            ],
        );
        let me = me();
        let mut s = spec("sip:bob@127.0.0.1:5080", &me);
        s.record_route = true;
        let out = forward_copy(&r, &s).unwrap();
        let text = String::from_utf8(out.to_bytes().to_vec()).unwrap();
        let sig = sig_of(&r);
        assert_eq!(
            text,
            format!(
                "INVITE sip:bob@127.0.0.1:5080 SIP/2.0\r\n\
             Record-Route: <sip:127.0.0.1:5060;transport=udp;lr;mrs={sig}>\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKtest\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKuac1\r\n\
             To: <sip:bob@example.com>\r\n\
             From: <sip:alice@example.com>;tag=a1\r\n\
             Call-ID: c1@127.0.0.1\r\n\
             CSeq: 1 INVITE\r\n\
             Max-Forwards: 69\r\n\
             X-Custom:   odd   spacing\r\n\
             Content-Length: 0\r\n\r\n"
            )
        );
        let reparsed = parse(&text);
        assert_eq!(
            reparsed.top_via().unwrap().branch(),
            Some(&b"z9hG4bKtest"[..])
        );
        // The original is untouched.
        assert_eq!(rruri(&r), "sip:bob@example.com");
    }

    #[test]
    fn forward_adds_max_forwards_70_when_absent() {
        let r = req("OPTIONS", "sip:bob@example.com", &[]);
        let me = me();
        let out = forward_copy(&r, &spec("sip:bob@example.com", &me)).unwrap();
        assert_eq!(out.max_forwards().unwrap().unwrap(), 70);
        assert!(out.record_routes().next().is_none());
    }

    #[test]
    fn forward_refuses_max_forwards_zero() {
        let r = req("OPTIONS", "sip:bob@example.com", &["Max-Forwards: 0"]);
        let me = me();
        let e = forward_copy(&r, &spec("sip:bob@example.com", &me)).unwrap_err();
        assert_eq!(e.status(), 483);
    }

    #[test]
    fn forward_double_record_route_when_transports_differ() {
        let r = req(
            "INVITE",
            "sip:bob@example.com",
            &["Record-Route: <sip:example.com;lr>"],
        );
        let me = me();
        let mut s = spec("sip:bob@example.com", &me);
        s.record_route = true;
        s.outbound = US_TCP;
        let out = forward_copy(&r, &s).unwrap();
        let rr: Vec<String> = out
            .values(HeaderName::RecordRoute)
            .map(|v| String::from_utf8_lossy(v.unwrap()).into_owned())
            .collect();
        let sig = sig_of(&r);
        assert_eq!(
            rr,
            [
                format!("<sip:127.0.0.1:5060;transport=tcp;lr;mrs={sig}>"),
                format!("<sip:127.0.0.1:5060;transport=udp;lr;mrs={sig}>"),
                "<sip:example.com;lr>".to_owned(),
            ]
        );
        // Our Via names the outbound transport; TCP needs Content-Length (absent before).
        let via = out.top_via().unwrap();
        assert_eq!(via.transport, b"TCP");
        assert!(r.content_length().is_none());
        assert_eq!(out.content_length(), Some(0));
    }

    #[test]
    fn forward_udp_does_not_add_content_length() {
        let r = req("MESSAGE", "sip:bob@example.com", &[]);
        let me = me();
        let out = forward_copy(&r, &spec("sip:bob@example.com", &me)).unwrap();
        assert!(out.content_length().is_none());
    }

    #[test]
    fn forward_strict_next_hop_route_postprocessing() {
        let r = req(
            "BYE",
            "sip:bob@example.com",
            &["Route: <sip:127.0.0.1:5070>, <sip:example.com;lr>"],
        );
        let me = me();
        let out = forward_copy(&r, &spec("sip:bob@example.com", &me)).unwrap();
        assert_eq!(rruri(&out), "sip:127.0.0.1:5070");
        assert_eq!(
            routes(&out),
            ["<sip:example.com;lr>", "<sip:bob@example.com>"]
        );
        // §16.6 step 7: after the rewrite the request goes to the strict router, not past it.
        let hop = next_hop(&r, b"sip:bob@example.com").unwrap();
        assert_eq!((hop.host.as_str(), hop.port), ("127.0.0.1", Some(5070)));
    }

    #[test]
    fn a_strict_route_to_a_new_target_is_rewritten_once_and_is_the_next_hop() {
        // A pre-loaded Route without `lr` in front of a registered contact: steps 6-7 together,
        // never half of them (the contact must not become the next hop with the strict
        // router's URI as its Request-URI).
        let r = req(
            "MESSAGE",
            "sip:alice@example.com",
            &["Route: <sip:127.0.0.9:5099;transport=tcp>"],
        );
        let me = me();
        let target = b"sip:alice@127.0.0.1:5090";
        let out = forward_copy(&r, &spec("sip:alice@127.0.0.1:5090", &me)).unwrap();
        assert_eq!(rruri(&out), "sip:127.0.0.9:5099;transport=tcp");
        assert_eq!(routes(&out), ["<sip:alice@127.0.0.1:5090>"]);
        let hop = next_hop(&r, target).unwrap();
        assert_eq!(
            hop,
            NextHop {
                host: "127.0.0.9".into(),
                port: Some(5099),
                transport: Some(TransportKind::Tcp),
                secure: false,
            }
        );
        // Without a Route the target is the next hop.
        let plain = req("MESSAGE", "sip:alice@example.com", &[]);
        let hop = next_hop(&plain, target).unwrap();
        assert_eq!((hop.host.as_str(), hop.port), ("127.0.0.1", Some(5090)));
    }

    #[test]
    fn preloaded_route_goes_on_top_in_order_and_sets_the_next_hop() {
        let r = req(
            "INVITE",
            "sip:bob@example.com",
            &["Route: <sip:192.0.2.9;lr>"],
        );
        let path = [
            Bytes::from_static(b"<sip:127.0.0.1:5090;lr>"),
            Bytes::from_static(b"<sip:edge2.example.com;lr>"),
        ];
        let me = me();
        let loaded = preload_route(&r, &path).unwrap();
        let out = forward_copy(&loaded, &spec("sip:bob@192.0.2.7:5062", &me)).unwrap();
        assert_eq!(rruri(&out), "sip:bob@192.0.2.7:5062");
        assert_eq!(
            routes(&out),
            [
                "<sip:127.0.0.1:5090;lr>",
                "<sip:edge2.example.com;lr>",
                "<sip:192.0.2.9;lr>"
            ]
        );
        let hop = next_hop(&loaded, b"sip:bob@192.0.2.7:5062").unwrap();
        assert_eq!((hop.host.as_str(), hop.port), ("127.0.0.1", Some(5090)));
        assert!(preload_route(&r, &[Bytes::from_static(b"<not a uri")]).is_err());
    }

    #[test]
    fn forward_loose_next_hop_keeps_routes() {
        let r = req(
            "BYE",
            "sip:bob@example.com",
            &["Route: <sip:127.0.0.1:5070;lr>"],
        );
        let me = me();
        let out = forward_copy(&r, &spec("sip:bob@example.com", &me)).unwrap();
        assert_eq!(rruri(&out), "sip:bob@example.com");
        assert_eq!(routes(&out), ["<sip:127.0.0.1:5070;lr>"]);
    }

    #[test]
    fn forward_refuses_a_non_token_branch() {
        let r = req("BYE", "sip:bob@example.com", &[]);
        let me = me();
        let mut s = spec("sip:bob@example.com", &me);
        s.branch = "z9hG4bK bad;x=1";
        assert!(forward_copy(&r, &s).is_err());
    }

    // ----- remove_preloaded_route -----------------------------------------------------------

    #[test]
    fn a_preloaded_route_is_removed_while_it_is_unchanged() {
        let mut r = req(
            "MESSAGE",
            "sip:alice@127.0.0.1",
            &[
                "Route: <sip:127.0.0.1:5060;lr>, <sip:127.0.0.9;lr>",
                "Route: <sip:127.0.0.8>",
            ],
        );
        let me = me();
        let (done, verdict) = preprocess_and_check(&mut r, &me);
        assert!(done.consumed_own_route && verdict == Verdict::Unsigned);
        let preloaded = route_set(&r).unwrap();
        assert_eq!(preloaded, ["<sip:127.0.0.9;lr>", "<sip:127.0.0.8>"]);

        // Untouched: all of it goes.
        let mut untouched = r.clone();
        assert!(remove_preloaded_route(&mut untouched, &preloaded).unwrap());
        assert!(routes(&untouched).is_empty());
        assert_eq!(hop_of(&untouched).unwrap().host, "127.0.0.1");

        // A Route the router appended below stays.
        let mut appended = r.clone();
        appended
            .append_header("Route", b"<sip:192.0.2.1;lr>")
            .unwrap();
        assert!(remove_preloaded_route(&mut appended, &preloaded).unwrap());
        assert_eq!(routes(&appended), ["<sip:192.0.2.1;lr>"]);

        // A router that replaced or removed Route decided: nothing more is removed.
        let mut replaced = r.clone();
        replaced.set_header("Route", b"<sip:192.0.2.1;lr>").unwrap();
        assert!(!remove_preloaded_route(&mut replaced, &preloaded).unwrap());
        assert_eq!(routes(&replaced), ["<sip:192.0.2.1;lr>"]);
        let mut removed = r.clone();
        removed.remove_headers("Route");
        assert!(!remove_preloaded_route(&mut removed, &preloaded).unwrap());

        // Nothing pre-loaded: nothing to do.
        assert!(!remove_preloaded_route(&mut r.clone(), &[]).unwrap());
    }

    // ----- next_hop -----------------------------------------------------------------------

    #[test]
    fn next_hop_from_top_route() {
        let r = req(
            "INVITE",
            "sip:bob@example.com",
            &["Route: <sip:example.com:5070;transport=TCP;lr>, <sip:127.0.0.1;lr>"],
        );
        let hop = hop_of(&r).unwrap();
        assert_eq!(
            hop,
            NextHop {
                host: "example.com".into(),
                port: Some(5070),
                transport: Some(TransportKind::Tcp),
                secure: false,
            }
        );
    }

    #[test]
    fn next_hop_from_request_uri() {
        let r = req("INVITE", "sips:bob@example.com", &[]);
        let hop = hop_of(&r).unwrap();
        assert_eq!(
            hop,
            NextHop {
                host: "example.com".into(),
                port: None,
                transport: None,
                secure: true,
            }
        );
        let r = req(
            "INVITE",
            "sip:bob@example.com;maddr=127.0.0.1;transport=udp",
            &[],
        );
        let hop = hop_of(&r).unwrap();
        assert_eq!(hop.host, "127.0.0.1");
        assert_eq!(hop.transport, Some(TransportKind::Udp));
    }

    #[test]
    fn next_hop_errors() {
        let tel = req("INVITE", "tel:+15551234567", &[]);
        assert_eq!(hop_of(&tel).unwrap_err().status(), 404);
        let sctp = req("INVITE", "sip:bob@example.com;transport=sctp", &[]);
        assert_eq!(hop_of(&sctp).unwrap_err().status(), 503);
    }

    // ----- IPv6 ---------------------------------------------------------------------------

    const V6_UDP: (TransportKind, SocketAddr) = (
        TransportKind::Udp,
        SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 5060),
    );

    fn me_v4_and_v6() -> ProxyIdentity {
        ProxyIdentity::new(LocalIdentity::new(&[], [US_UDP.1, V6_UDP.1])).with_signer(signer())
    }

    #[test]
    fn ipv6_via_and_record_route_are_ipv6_references() {
        let r = req("INVITE", "sip:bob@[::1]:5080", &[]);
        let me = me_v4_and_v6();
        let mut s = spec("sip:bob@[::1]:5080", &me);
        s.record_route = true;
        s.inbound = V6_UDP;
        s.outbound = V6_UDP;
        let out = forward_copy(&r, &s).unwrap();
        let text = String::from_utf8(out.to_bytes().to_vec()).unwrap();
        assert!(
            text.contains("\r\nVia: SIP/2.0/UDP [::1]:5060;branch=z9hG4bKtest\r\n"),
            "{text}"
        );
        assert_eq!(
            out.values(HeaderName::RecordRoute)
                .map(|v| String::from_utf8_lossy(v.unwrap()).into_owned())
                .collect::<Vec<_>>(),
            [format!(
                "<sip:[::1]:5060;transport=udp;lr;mrs={}>",
                sig_of(&r)
            )]
        );
        let reparsed = parse(&text);
        let via = reparsed.top_via().unwrap();
        assert_eq!(via.host, Host::Ip(V6_UDP.1.ip()));
        assert!(me.is_my_via(&via));
    }

    #[test]
    fn mixed_family_relay_record_routes_twice() {
        // In over IPv4, out over IPv6: the interfaces' URIs differ (§16.6 step 4, RFC 5658).
        let r = req(
            "INVITE",
            "sip:bob@[::1]:5080",
            &["Contact: <sip:alice@127.0.0.1:5070>"],
        );
        let me = me_v4_and_v6();
        let mut s = spec("sip:bob@[::1]:5080", &me);
        s.record_route = true;
        s.outbound = V6_UDP;
        let out = forward_copy(&r, &s).unwrap();
        let rr: Vec<String> = out
            .values(HeaderName::RecordRoute)
            .map(|v| String::from_utf8_lossy(v.unwrap()).into_owned())
            .collect();
        let sig = sig_of(&r);
        assert_eq!(
            rr,
            [
                format!("<sip:[::1]:5060;transport=udp;lr;mrs={sig}>"),
                format!("<sip:127.0.0.1:5060;transport=udp;lr;mrs={sig}>"),
            ]
        );
        // The callee's 2xx echoes both; going upstream both become the caller's copy (§16.7
        // step 8), bound to the callee's tag and Contact.
        let mut ok = parse(&format!(
            "SIP/2.0 200 OK\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKuac1\r\n\
             Record-Route: {}, {}\r\n\
             To: <sip:bob@example.com>;tag=b1\r\n\
             From: <sip:alice@example.com>;tag=a1\r\n\
             Call-ID: c1@127.0.0.1\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:bob@[::1]:5080>\r\n\r\n",
            rr[0], rr[1]
        ));
        assert!(me.sign_response_record_route(&mut ok, now()));
        let mut callers: Vec<String> = ok
            .values(HeaderName::RecordRoute)
            .map(|v| String::from_utf8_lossy(v.unwrap()).into_owned())
            .collect();
        assert_eq!(callers.len(), 2);
        assert!(callers.iter().all(|v| v.contains(";mrs=s")), "{callers:?}");
        // Coming back (the UAC's route set is the reverse, our IPv6 address spelled another
        // way), both halves are ours and removed, and the signature holds.
        callers.reverse();
        let route = format!("Route: {}", callers.join(", ")).replace("[::1]", "[0:0:0:0:0:0:0:1]");
        let text = req_text("BYE", "sip:bob@[::1]:5080", &[&route]).replace(
            "To: <sip:bob@example.com>",
            "To: <sip:bob@example.com>;tag=b1",
        );
        let mut back = parse(&text);
        let (done, verdict) = preprocess_and_check(&mut back, &me);
        assert!(done.consumed_own_route);
        assert_eq!(verdict, Verdict::Valid);
        assert!(routes(&back).is_empty());
    }

    #[test]
    fn preprocess_removes_our_ipv6_route_in_any_spelling() {
        let me = me_v4_and_v6();
        for ours in ["<sip:[::1]:5060;lr>", "<sip:[0::1]:5060;transport=udp;lr>"] {
            let mut r = req(
                "BYE",
                "sip:bob@[::1]:5080",
                &[&format!("Route: {ours}, <sip:[2001:db8::5];lr>")],
            );
            assert!(
                preprocess_routes(&mut r, &me).unwrap().consumed_own_route,
                "{ours}"
            );
            assert_eq!(routes(&r), ["<sip:[2001:db8::5];lr>"]);
            let hop = hop_of(&r).unwrap();
            assert_eq!((hop.host.as_str(), hop.port), ("2001:db8::5", None));
        }
        // Another port on our address is not us.
        let mut r = req("BYE", "sip:bob@[::1]:5080", &["Route: <sip:[::1]:5070;lr>"]);
        assert!(!preprocess_routes(&mut r, &me).unwrap().consumed_own_route);
        // A strict router put our IPv6 Record-Route into the Request-URI.
        let mut r = req(
            "BYE",
            "sip:[::1]:5060;transport=udp;lr",
            &["Route: <sip:bob@[::1]:5080>"],
        );
        assert!(preprocess_routes(&mut r, &me).unwrap().consumed_own_route);
        assert_eq!(rruri(&r), "sip:bob@[::1]:5080");
    }

    #[test]
    fn next_hop_of_an_ipv6_uri_is_the_bare_address() {
        let hop = hop_of(&req("INVITE", "sip:bob@[::1]:5080;transport=tcp", &[])).unwrap();
        assert_eq!(
            hop,
            NextHop {
                host: "::1".into(),
                port: Some(5080),
                transport: Some(TransportKind::Tcp),
                secure: false,
            }
        );
        let hop = hop_of(&req(
            "INVITE",
            "sip:bob@example.com;maddr=[2001:db8::9]",
            &[],
        ))
        .unwrap();
        assert_eq!((hop.host.as_str(), hop.port), ("2001:db8::9", None));
        let hop = hop_of(&req("INVITE", "sip:[0:0:0:0:0:0:0:1]", &[])).unwrap();
        assert_eq!(hop.host.parse::<std::net::IpAddr>().unwrap(), V6_UDP.1.ip());
    }

    #[test]
    fn detect_loop_over_ipv6() {
        let me = me_v4_and_v6();
        let r = req("INVITE", "sip:bob@example.com", &["Max-Forwards: 70"]);
        let branch = branch_for(&r, "1");
        let mut s = spec("sip:bob@example.com", &me);
        s.branch = &branch;
        s.outbound = V6_UDP;
        let out = forward_copy(&r, &s).unwrap();
        let back = parse(std::str::from_utf8(&out.to_bytes()).unwrap());
        assert!(detect_loop(&back, &me));
    }

    // ----- branch_for / detect_loop -------------------------------------------------------

    /// The branch hash as it was computed before it stopped allocating (host and transport as
    /// owned strings): branches, and so loop detection across a restart onto the new build, stay
    /// the same.
    #[test]
    fn loop_hash_hashes_what_the_allocating_form_hashed() {
        for via in [
            "SIP/2.0/udp 192.0.2.1:5060;branch=z9hG4bKabc",
            "SIP/2.0/TLS [2001:db8::1];branch=z9hG4bKdef",
            "SIP/2.0/tcp client.example.com:5070;branch=z9hG4bKxyz;rport",
        ] {
            let r = req("INVITE", "sip:bob@example.com", &[&format!("Via: {via}")]);
            // The Via under test is the second one (below the helper's own).
            let top = r.vias().nth(1).unwrap().unwrap();
            let mut h = DefaultHasher::new();
            r.to().ok().and_then(|n| n.tag()).hash(&mut h);
            r.from().ok().and_then(|n| n.tag()).hash(&mut h);
            r.call_id().ok().hash(&mut h);
            r.cseq().ok().map(|c| c.seq).hash(&mut h);
            r.request_uri_bytes().hash(&mut h);
            let transport = top.transport.to_ascii_uppercase();
            Some((transport, top.host.to_string(), top.port, top.branch())).hash(&mut h);
            for name in [
                HeaderName::ProxyRequire,
                HeaderName::ProxyAuthorization,
                HeaderName::Route,
            ] {
                name.as_str().hash(&mut h);
                for v in r.values(name) {
                    v.ok().hash(&mut h);
                }
            }
            assert_eq!(
                loop_hash(&r, Some(&top)),
                format!("{:016x}", h.finish()),
                "{via}"
            );
        }
    }

    #[test]
    fn branch_is_stable_across_retransmissions() {
        let text = req_text("INVITE", "sip:bob@example.com", &["Max-Forwards: 70"]);
        let a = branch_for(&parse(&text), "0");
        let b = branch_for(&parse(&text), "0");
        assert_eq!(a, b);
        assert!(a.starts_with("z9hG4bK"));
        assert!(scan::is_token(a.as_bytes()));
        // Max-Forwards is not a loop-detection field.
        let c = branch_for(
            &req("INVITE", "sip:bob@example.com", &["Max-Forwards: 12"]),
            "0",
        );
        assert_eq!(a, c);
    }

    #[test]
    fn branch_changes_with_request_uri_and_unique_part() {
        let a = branch_for(&req("INVITE", "sip:bob@example.com", &[]), "0");
        let b = branch_for(&req("INVITE", "sip:carol@example.com", &[]), "0");
        assert_ne!(a, b);
        let c = branch_for(&req("INVITE", "sip:bob@example.com", &[]), "1");
        assert_ne!(a, c);
        // Same loop hash, different unique part.
        assert_eq!(a.split('.').next(), c.split('.').next());
        // Characters outside token are dropped.
        let d = branch_for(&req("INVITE", "sip:bob@example.com", &[]), "x y;z");
        assert!(d.ends_with(".xyz"));
    }

    /// Forwards `r` unchanged in Request-URI, then lets another proxy at 127.0.0.1:5070 send it
    /// back to us with `ruri` (same = loop, different = spiral). With `stamp`, the top Via of
    /// `r` gets `received` after the branch was computed, as §18.2.1 stamping would.
    fn come_back(r: &Message, ruri: &str, stamp: bool) -> Message {
        let me = me();
        let branch = branch_for(r, "1");
        let mut r = r.clone();
        if stamp {
            assert!(r.stamp_received("127.0.0.2:5070".parse().unwrap()).unwrap());
        }
        let target = rruri(&r);
        let mut s = spec(&target, &me);
        s.branch = &branch;
        let mut out = forward_copy(&r, &s).unwrap();
        out.set_request_uri(ruri.as_bytes()).unwrap();
        out.prepend_header("Via", b"SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKother")
            .unwrap();
        parse(std::str::from_utf8(&out.to_bytes()).unwrap())
    }

    #[test]
    fn detect_loop_finds_a_loop() {
        let r = req("INVITE", "sip:bob@example.com", &["Max-Forwards: 70"]);
        assert!(!detect_loop(&r, &me()));
        let back = come_back(&r, "sip:bob@example.com", false);
        assert!(detect_loop(&back, &me()));
    }

    #[test]
    fn detect_loop_allows_a_spiral() {
        let r = req("INVITE", "sip:bob@example.com", &["Max-Forwards: 70"]);
        let back = come_back(&r, "sip:carol@example.com", false);
        assert!(!detect_loop(&back, &me()));
    }

    #[test]
    fn detect_loop_ignores_received_stamping() {
        let r = req("INVITE", "sip:bob@example.com", &["Max-Forwards: 70"]);
        let mut back = come_back(&r, "sip:bob@example.com", false);
        back.stamp_received("127.0.0.2:5070".parse().unwrap())
            .unwrap();
        assert!(detect_loop(&back, &me()));
    }
}
