//! The next hop to locate and what locating it gives (RFC 3263): the types the proxy
//! exchanges with the shell's resolver, and the parts that need no DNS: the answer for an IP
//! literal, and which transport and port a URI asks for (§4.1, §4.2).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use crate::transport::TransportKind;

/// The transports an IP-literal URI may name: UDP, TCP, TLS and WebSocket (RFC 7118 §5.2,
/// `transport=ws`), which only an open connection reaches (`transport::ws`) and which DNS
/// never offers.
pub(crate) const NUMERIC: [TransportKind; 5] = crate::transport::TRANSPORTS;

/// The default port of a transport (RFC 3261 §19.1.2): 5061 for TLS, 5060 otherwise.
pub fn default_port(kind: TransportKind) -> u16 {
    kind.default_port()
}

/// The transport a `transport` parameter asks for, as the URI's scheme allows.
///
/// For a `sips:` URI (RFC 3261 §26.2.2: every hop secured with TLS) `transport=tcp` means TLS
/// over TCP (RFC 3263 §4.1 speaks of "TCP for a SIPS URI"; RFC 5630 §3.1.3 deprecates
/// `transport=tls` in favour of `sips:` with `transport=tcp`), and `transport=udp` is refused:
/// no silent downgrade to an unsecured hop.
pub fn given_transport(query: &Query) -> Result<Option<TransportKind>, ResolveError> {
    match (query.transport, query.secure) {
        (None, _) => Ok(None),
        (Some(TransportKind::Udp), true) => Err(ResolveError::NoUsableTransport),
        (Some(kind), true) if kind.is_websocket() => Ok(Some(TransportKind::Wss)),
        (Some(_), true) => Ok(Some(TransportKind::Tls)),
        (Some(kind), false) => Ok(Some(kind)),
    }
}

/// The transport used when neither the URI nor DNS names one (§4.1: "UDP for a SIP URI, and TCP
/// for a SIPS URI", the latter meaning TLS over TCP), among `supported`. When UDP is not
/// supported a `sip:` URI falls back to TCP, which §4.1 allows ("another transport, such as TCP,
/// MAY be used"); never to TLS, as a port meant for UDP/TCP would not speak it.
pub fn default_kind(secure: bool, supported: &[TransportKind]) -> Option<TransportKind> {
    let preferred: &[TransportKind] = if secure {
        &[TransportKind::Tls]
    } else {
        &[TransportKind::Udp, TransportKind::Tcp]
    };
    preferred.iter().copied().find(|k| supported.contains(k))
}

/// What to locate: the next hop of RFC 3261 §16.6 step 7 / §8.1.2 (host = maddr or URI host,
/// IPv6 without brackets).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Query {
    /// Domain name or IP literal (IPv6 without brackets; brackets are tolerated).
    pub host: String,
    /// The URI's explicit port, if any.
    pub port: Option<u16>,
    /// The URI's `transport` parameter, if any.
    pub transport: Option<TransportKind>,
    /// A `sips:` URI: TLS only (RFC 3261 §26.2.2).
    pub secure: bool,
}

/// One place to try, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The transport to send on.
    pub kind: TransportKind,
    /// Where to send.
    pub addr: SocketAddr,
    /// For TLS: the SIP domain the certificate must match (RFC 5922 §4: the host of the URI, NOT
    /// the SRV target; for an IP literal, that literal); None otherwise.
    pub tls_name: Option<Arc<str>>,
}

/// Why no candidate could be given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolveError {
    /// DNS says there is nothing: no such name, or no usable records at any step (or SRV
    /// records saying "service not available", target `.`).
    NotFound {
        /// The host that was looked up.
        host: String,
    },
    /// The URI asks for a transport this server cannot use: `sips:` with `transport=udp`, a
    /// `transport` it has no listener for, or (for `sips:`) no TLS at all.
    NoUsableTransport,
    /// The host is not a valid domain name.
    InvalidHost {
        /// The host as given.
        host: String,
    },
    /// DNS could not answer: timeouts, server failures, the lookup or time budget spent, or a
    /// configuration that cannot be used.
    Failed(String),
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::NotFound { host } => write!(f, "no address found for {host}"),
            ResolveError::NoUsableTransport => {
                f.write_str("no transport usable for this URI on this server")
            }
            ResolveError::InvalidHost { host } => write!(f, "invalid host name {host:?}"),
            ResolveError::Failed(reason) => write!(f, "DNS failure: {reason}"),
        }
    }
}

impl std::error::Error for ResolveError {}

/// The host as an IP address, if it is a literal (brackets tolerated) or `localhost`, with the
/// host without brackets.
/// The addresses an IP literal (or `localhost`: 127.0.0.1, then ::1, so a server listening
/// only on IPv6 still reaches it) stands for, and the host as written without brackets. An
/// IPv4-mapped IPv6 address is its IPv4 address (RFC 5118 §4.9).
fn literal(host: &str) -> Option<(Vec<IpAddr>, &str)> {
    if host.eq_ignore_ascii_case("localhost") {
        let both = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ];
        return Some((both, host));
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip: IpAddr = bare.parse().ok()?;
    Some((vec![ip.to_canonical()], bare))
}

/// No DNS needed: `host` is an IP literal (or "localhost" → 127.0.0.1 then ::1). Returns
/// Some(result) with the candidate (transport: the given one, else TLS for
/// secure, else UDP; port: given, else 5061 for TLS else 5060), or None when DNS is needed.
///
/// For `sips:`, `transport=tcp` gives TLS and `transport=udp` is an error (see
/// [`ResolveError::NoUsableTransport`]). It does not know which transports the server has:
/// [`Resolver::locate`] checks that (and, without a `transport` parameter, uses TCP for a
/// `sip:` URI when the server has no UDP, RFC 3263 §4.1).
pub fn numeric(query: &Query) -> Option<Result<Vec<Candidate>, ResolveError>> {
    numeric_among(query, &NUMERIC)
}

pub fn numeric_among(
    query: &Query,
    supported: &[TransportKind],
) -> Option<Result<Vec<Candidate>, ResolveError>> {
    let (ips, bare) = literal(&query.host)?;
    let kind = match given_transport(query) {
        Err(e) => return Some(Err(e)),
        Ok(Some(kind)) => Some(kind),
        Ok(None) => default_kind(query.secure, supported),
    };
    let Some(kind) = kind.filter(|k| supported.contains(k)) else {
        return Some(Err(ResolveError::NoUsableTransport));
    };
    let port = query.port.unwrap_or(default_port(kind));
    let tls_name: Option<Arc<str>> = (kind == TransportKind::Tls).then(|| Arc::from(bare));
    let candidates = ips
        .into_iter()
        .map(|ip| Candidate {
            kind,
            addr: SocketAddr::new(ip, port),
            tls_name: tls_name.clone(),
        })
        .collect();
    Some(Ok(candidates))
}
