//! URIs (RFC 3261 §19.1, §25.1): `sip:` and `sips:` fully parsed, `tel:` (RFC 3966) parsed
//! enough to route on, and any other scheme kept opaque so the proxy can answer 416 (§16.3
//! item 2) or forward it inside a header untouched.
//!
//! A [`Uri`] is a borrowed view over the message bytes: parsing allocates nothing. Comparison
//! follows the rules of §19.1.4 ([`SipUri::equivalent`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::error::{ParseError, Result};
use super::layout::{at, at_opt, place, place_opt, HostLayout, Place};
use super::params::Params;
use super::scan;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Uri<'a> {
    Sip(SipUri<'a>),
    Tel(TelUri<'a>),
    /// A scheme the engine does not interpret (absoluteURI, §25.1).
    Other {
        scheme: &'a [u8],
        raw: &'a [u8],
    },
}

/// A `sip:` or `sips:` URI (§19.1.1). Fields are the raw, still-escaped bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SipUri<'a> {
    pub secure: bool,
    pub user: Option<&'a [u8]>,
    pub password: Option<&'a [u8]>,
    pub host: Host<'a>,
    pub port: Option<u16>,
    pub params: Params<'a>,
    /// The `?`-headers part, without the `?`.
    pub headers: Option<&'a [u8]>,
    raw: &'a [u8],
}

/// A `tel:` URI (RFC 3966): the subscriber number and its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TelUri<'a> {
    pub number: &'a [u8],
    pub params: Params<'a>,
    raw: &'a [u8],
}

/// host = hostname / IPv4address / IPv6reference (§25.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host<'a> {
    Domain(&'a str),
    Ip(IpAddr),
}

impl<'a> Host<'a> {
    /// Parses a host as it appears in a URI or a Via sent-by (IPv6 inside brackets).
    pub fn parse(s: &'a [u8]) -> Result<Host<'a>> {
        if s.first() == Some(&b'[') {
            let inner = s
                .strip_prefix(b"[")
                .and_then(|r| r.strip_suffix(b"]"))
                .ok_or(ParseError::bad("host", "unterminated IPv6 reference"))?;
            return std::str::from_utf8(inner)
                .ok()
                .and_then(|t| t.parse::<Ipv6Addr>().ok())
                .map(|a| Host::Ip(IpAddr::V6(a)))
                .ok_or(ParseError::bad("host", "bad IPv6 address"));
        }
        if s.is_empty() || !s.iter().all(|&b| scan::is_hostname_char(b)) {
            return Err(ParseError::bad("host", "bad host name"));
        }
        if let Some(v4) = parse_ipv4(s) {
            return Ok(Host::Ip(IpAddr::V4(v4)));
        }
        // Hostname characters are ASCII, so this conversion cannot fail.
        let text = std::str::from_utf8(s).map_err(|_| ParseError::bad("host", "bad host name"))?;
        Ok(Host::Domain(text))
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ip(ip) => Some(*ip),
            Host::Domain(_) => None,
        }
    }

    /// Calls `f` with the host as [`fmt::Display`] writes it (an IPv6 address in brackets),
    /// without allocating: for hashes and keys made of a host's text on the per-message path.
    pub fn with_text<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        match self {
            Host::Domain(d) => f(d),
            Host::Ip(IpAddr::V4(a)) => {
                // At most "255.255.255.255".
                let mut buf = [0u8; 15];
                let mut len = 0;
                for (i, octet) in a.octets().into_iter().enumerate() {
                    if i > 0 {
                        buf[len] = b'.';
                        len += 1;
                    }
                    let digits = [octet / 100, octet / 10 % 10, octet % 10];
                    let skip = if octet >= 100 {
                        0
                    } else if octet >= 10 {
                        1
                    } else {
                        2
                    };
                    for d in &digits[skip..] {
                        buf[len] = b'0' + d;
                        len += 1;
                    }
                }
                f(std::str::from_utf8(&buf[..len]).unwrap_or_default())
            }
            Host::Ip(IpAddr::V6(_)) => {
                // "[" + at most 45 characters of an IPv6 address + "]".
                let mut buf = [0u8; 47];
                let mut rest = &mut buf[..];
                let len = match std::io::Write::write_fmt(&mut rest, format_args!("{self}")) {
                    Ok(()) => 47 - rest.len(),
                    Err(_) => 0,
                };
                f(std::str::from_utf8(&buf[..len]).unwrap_or_default())
            }
        }
    }

    /// §19.1.4: host comparison is case-insensitive; an IP equals only the same IP.
    pub fn eq_host(&self, other: &Host<'_>) -> bool {
        match (self, other) {
            (Host::Domain(a), Host::Domain(b)) => a.eq_ignore_ascii_case(b),
            (Host::Ip(a), Host::Ip(b)) => a == b,
            _ => false,
        }
    }
}

/// IPv4address (§25.1) as the standard library reads it (`"1.2.3.4".parse::<Ipv4Addr>()`: four
/// decimal octets of at most three digits, no leading zero, each at most 255), without going
/// through `str` and the general address parser: every host of every URI and Via is tried.
fn parse_ipv4(s: &[u8]) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split(|&b| b == b'.');
    for octet in &mut octets {
        let part = parts.next()?;
        let well_formed = !part.is_empty()
            && part.len() <= 3
            && (part.len() == 1 || part[0] != b'0')
            && part.iter().all(u8::is_ascii_digit);
        if !well_formed {
            return None;
        }
        let value = part
            .iter()
            .fold(0u16, |acc, &d| acc * 10 + u16::from(d - b'0'));
        *octet = u8::try_from(value).ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

impl fmt::Display for Host<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Domain(d) => f.write_str(d),
            Host::Ip(IpAddr::V4(a)) => write!(f, "{a}"),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
        }
    }
}

impl<'a> Uri<'a> {
    /// Parses a URI. Whitespace anywhere inside is an error (RFC 4475 §3.1.2.8).
    pub fn parse(s: &'a [u8]) -> Result<Uri<'a>> {
        let colon = memchr::memchr(b':', s).ok_or(ParseError::bad("URI", "no scheme"))?;
        let scheme = &s[..colon];
        if !is_scheme(scheme) {
            return Err(ParseError::bad("URI", "bad scheme"));
        }
        let rest = &s[colon + 1..];
        if scan::eq_ic(scheme, b"sip") || scan::eq_ic(scheme, b"sips") {
            let secure = scheme.len() == 4;
            return SipUri::parse(rest, secure, s).map(Uri::Sip);
        }
        if scan::eq_ic(scheme, b"tel") {
            return TelUri::parse(rest, s).map(Uri::Tel);
        }
        if rest.is_empty()
            || rest
                .iter()
                .any(|&b| b <= b' ' || b >= 0x7f || b"<>\"".contains(&b))
        {
            return Err(ParseError::bad("URI", "bad characters in URI"));
        }
        Ok(Uri::Other { scheme, raw: s })
    }

    pub fn raw(&self) -> &'a [u8] {
        match self {
            Uri::Sip(u) => u.raw,
            Uri::Tel(t) => t.raw,
            Uri::Other { raw, .. } => raw,
        }
    }

    pub fn as_sip(&self) -> Option<&SipUri<'a>> {
        match self {
            Uri::Sip(u) => Some(u),
            _ => None,
        }
    }

    /// True for the schemes a SIP proxy can route (sip, sips, tel).
    pub fn is_routable_scheme(&self) -> bool {
        !matches!(self, Uri::Other { .. })
    }
}

impl fmt::Display for Uri<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.raw()))
    }
}

/// scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
fn is_scheme(s: &[u8]) -> bool {
    s.first().is_some_and(u8::is_ascii_alphabetic)
        && s.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(b))
}

impl<'a> SipUri<'a> {
    fn parse(rest: &'a [u8], secure: bool, raw: &'a [u8]) -> Result<SipUri<'a>> {
        if rest.iter().any(|&b| b <= b' ' || b == 0x7f) {
            return Err(ParseError::bad(
                "URI",
                "whitespace or control character in URI",
            ));
        }
        // '@' is allowed neither in params nor headers, so the first one ends the userinfo.
        let (user, password, after_user) = match memchr::memchr(b'@', rest) {
            Some(at) => {
                let userinfo = &rest[..at];
                let (user, password) = match userinfo.iter().position(|&b| b == b':') {
                    Some(c) => (&userinfo[..c], Some(&userinfo[c + 1..])),
                    None => (userinfo, None),
                };
                if !scan::is_user(user) {
                    return Err(ParseError::bad("URI", "bad user part"));
                }
                if password.is_some_and(|p| !scan::is_password(p)) {
                    return Err(ParseError::bad("URI", "bad password"));
                }
                (Some(user), password, &rest[at + 1..])
            }
            None => (None, None, rest),
        };
        let (hostport, params_and_headers) = split_hostport(after_user)?;
        let (host, port) = parse_hostport(hostport)?;
        let (params_raw, headers) = match params_and_headers.iter().position(|&b| b == b'?') {
            Some(q) => (&params_and_headers[..q], Some(&params_and_headers[q + 1..])),
            None => (params_and_headers, None),
        };
        let params = Params::parse_uri(params_raw)?;
        if let Some(h) = headers {
            validate_uri_headers(h)?;
        }
        Ok(SipUri {
            secure,
            user,
            password,
            host,
            port,
            params,
            headers,
            raw,
        })
    }

    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// `transport` parameter, lower-cased comparison left to the caller.
    pub fn transport(&self) -> Option<&'a [u8]> {
        self.params.value("transport")
    }

    pub fn has_lr(&self) -> bool {
        self.params.has("lr")
    }

    /// The value of the URI parameter `name` (empty for a parameter without a value).
    pub fn param(&self, name: &str) -> Option<&'a [u8]> {
        self.params.value(name)
    }

    pub fn maddr(&self) -> Option<&'a [u8]> {
        self.params.value("maddr")
    }

    /// URI equivalence (§19.1.4): scheme, user and password (case-sensitive, after unescaping),
    /// host (case-insensitive), port (absent differs from explicit), the user, ttl, method, maddr
    /// and transport parameters must match if either side has them, other parameters only if
    /// both have them, and headers must match when present.
    pub fn equivalent(&self, other: &SipUri<'_>) -> bool {
        if self.secure != other.secure
            || !opt_unescaped_eq(self.user, other.user)
            || !opt_unescaped_eq(self.password, other.password)
            || !self.host.eq_host(&other.host)
            || self.port != other.port
        {
            return false;
        }
        const MUST_MATCH: [&str; 5] = ["user", "ttl", "method", "maddr", "transport"];
        for name in MUST_MATCH {
            match (self.params.get(name), other.params.get(name)) {
                (None, None) => {}
                (Some(a), Some(b)) if param_values_eq(a, b) => {}
                _ => return false,
            }
        }
        for p in self.params.iter() {
            if let Some(theirs) = other.params.iter().find(|q| scan::eq_ic(q.name, p.name)) {
                if !param_values_eq(p.value, theirs.value) {
                    return false;
                }
            }
        }
        headers_equivalent(self.headers, other.headers)
    }
}

fn opt_unescaped_eq(a: Option<&[u8]>, b: Option<&[u8]>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => scan::unescape(a) == scan::unescape(b),
        _ => false,
    }
}

fn param_values_eq(a: Option<&[u8]>, b: Option<&[u8]>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => scan::eq_ic(&scan::unescape(a), &scan::unescape(b)),
        _ => false,
    }
}

fn headers_equivalent(a: Option<&[u8]>, b: Option<&[u8]>) -> bool {
    let split = |h: &[u8]| -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut v: Vec<_> = h
            .split(|&c| c == b'&')
            .map(|kv| {
                let (k, val) = match kv.iter().position(|&c| c == b'=') {
                    Some(e) => (&kv[..e], &kv[e + 1..]),
                    None => (kv, &b""[..]),
                };
                (
                    scan::unescape(k).to_ascii_lowercase(),
                    scan::unescape(val).into_owned(),
                )
            })
            .collect();
        v.sort();
        v
    };
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => split(a) == split(b),
        _ => false,
    }
}

/// Splits `host[:port]` from what follows (`;params` or `?headers`), honouring `[v6]`.
fn split_hostport(s: &[u8]) -> Result<(&[u8], &[u8])> {
    let search_from = if s.first() == Some(&b'[') {
        s.iter()
            .position(|&b| b == b']')
            .ok_or(ParseError::bad("URI", "unterminated IPv6 reference"))?
    } else {
        0
    };
    let end = memchr::memchr2(b';', b'?', &s[search_from..]).map_or(s.len(), |p| p + search_from);
    Ok((&s[..end], &s[end..]))
}

/// hostport = host [ ":" port ] (§25.1).
pub fn parse_hostport(s: &[u8]) -> Result<(Host<'_>, Option<u16>)> {
    let host_end = if s.first() == Some(&b'[') {
        s.iter().position(|&b| b == b']').map_or(s.len(), |p| p + 1)
    } else {
        s.iter().position(|&b| b == b':').unwrap_or(s.len())
    };
    let host = Host::parse(&s[..host_end])?;
    let port = match &s[host_end..] {
        [] => None,
        [b':', digits @ ..] => Some(
            scan::parse_decimal(digits, u64::from(u16::MAX))
                .map(|p| p as u16)
                .ok_or(ParseError::bad("URI", "bad port"))?,
        ),
        _ => return Err(ParseError::bad("URI", "bad host")),
    };
    Ok((host, port))
}

fn validate_uri_headers(h: &[u8]) -> Result<()> {
    for kv in h.split(|&c| c == b'&') {
        let (k, v) = match kv.iter().position(|&c| c == b'=') {
            Some(e) => (&kv[..e], &kv[e + 1..]),
            None => return Err(ParseError::bad("URI", "bad header in URI")),
        };
        if k.is_empty() || !scan::is_hnv(k) || !scan::is_hnv(v) {
            return Err(ParseError::bad("URI", "bad header in URI"));
        }
    }
    Ok(())
}

impl<'a> TelUri<'a> {
    fn parse(rest: &'a [u8], raw: &'a [u8]) -> Result<TelUri<'a>> {
        let end = rest.iter().position(|&b| b == b';').unwrap_or(rest.len());
        let number = &rest[..end];
        let digits_ok = |b: &u8| b.is_ascii_hexdigit() || b"*#+-.()".contains(b);
        if number.is_empty() || !number.iter().all(digits_ok) {
            return Err(ParseError::bad("URI", "bad telephone number"));
        }
        let params = Params::parse_uri(&rest[end..])?;
        Ok(TelUri {
            number,
            params,
            raw,
        })
    }

    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }
}

/// Where the parts of a parsed [`Uri`] lie in its text (see [`super::layout`]).
#[derive(Clone, Copy, Debug)]
pub(crate) enum UriLayout {
    Sip {
        secure: bool,
        user: Option<Place>,
        password: Option<Place>,
        host: HostLayout,
        port: Option<u16>,
        params: Place,
        headers: Option<Place>,
        raw: Place,
    },
    Tel {
        number: Place,
        params: Place,
        raw: Place,
    },
    Other {
        scheme: Place,
        raw: Place,
    },
}

impl<'a> Uri<'a> {
    /// The layout of this URI, parsed from a slice of `base`.
    pub(crate) fn layout(&self, base: &[u8]) -> UriLayout {
        match self {
            Uri::Sip(u) => UriLayout::Sip {
                secure: u.secure,
                user: place_opt(base, u.user),
                password: place_opt(base, u.password),
                host: HostLayout::of(base, &u.host),
                port: u.port,
                params: place(base, u.params.raw()),
                headers: place_opt(base, u.headers),
                raw: place(base, u.raw),
            },
            Uri::Tel(t) => UriLayout::Tel {
                number: place(base, t.number),
                params: place(base, t.params.raw()),
                raw: place(base, t.raw),
            },
            Uri::Other { scheme, raw } => UriLayout::Other {
                scheme: place(base, scheme),
                raw: place(base, raw),
            },
        }
    }

    /// The URI `layout` describes, over the same `base` it was taken from.
    pub(crate) fn rebuild(layout: &UriLayout, base: &'a [u8]) -> Uri<'a> {
        match *layout {
            UriLayout::Sip {
                secure,
                user,
                password,
                host,
                port,
                params,
                headers,
                raw,
            } => Uri::Sip(SipUri {
                secure,
                user: at_opt(base, user),
                password: at_opt(base, password),
                host: host.rebuild(base),
                port,
                params: Params::from_validated(at(base, params)),
                headers: at_opt(base, headers),
                raw: at(base, raw),
            }),
            UriLayout::Tel {
                number,
                params,
                raw,
            } => Uri::Tel(TelUri {
                number: at(base, number),
                params: Params::from_validated(at(base, params)),
                raw: at(base, raw),
            }),
            UriLayout::Other { scheme, raw } => Uri::Other {
                scheme: at(base, scheme),
                raw: at(base, raw),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sip(s: &str) -> SipUri<'_> {
        match Uri::parse(s.as_bytes()).unwrap() {
            Uri::Sip(u) => u,
            other => panic!("not sip: {other:?}"),
        }
    }

    #[test]
    fn host_text_is_what_display_writes() {
        let hosts = [
            "0.0.0.0",
            "1.2.3.4",
            "10.20.30.40",
            "127.0.0.1",
            "255.255.255.255",
            "100.9.99.0",
            "[::1]",
            "[2001:db8::9:255]",
            "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]",
            "example.com",
        ];
        for text in hosts {
            let host = Host::parse(text.as_bytes()).unwrap();
            assert_eq!(host.with_text(str::to_owned), host.to_string(), "{text}");
        }
    }

    #[test]
    fn ipv4_hosts_read_as_the_standard_library_reads_them() {
        let cases = [
            "1.2.3.4",
            "0.0.0.0",
            "255.255.255.255",
            "256.1.1.1",
            "01.2.3.4",
            "1.2.3",
            "1.2.3.4.5",
            "1..3.4",
            ".1.2.3",
            "1.2.3.",
            "1234.1.1.1",
            "10.0.0.1",
            "127.000.0.1",
            "9.99.199.249",
            "",
            "1.2.3.4a",
        ];
        for case in cases {
            assert_eq!(
                parse_ipv4(case.as_bytes()),
                case.parse::<Ipv4Addr>().ok(),
                "{case:?}"
            );
        }
        // Every combination of short digit runs, against the standard parser.
        let parts = [
            "0", "00", "1", "9", "10", "99", "100", "255", "256", "300", "999", "0001",
        ];
        for a in parts {
            for b in parts {
                let text = format!("{a}.{b}.{a}.{b}");
                assert_eq!(
                    parse_ipv4(text.as_bytes()),
                    text.parse::<Ipv4Addr>().ok(),
                    "{text:?}"
                );
            }
        }
    }

    #[test]
    fn full_sip_uri() {
        let u =
            sip("sips:alice:secret@Example.COM:5061;transport=tls;lr?subject=x&priority=urgent");
        assert!(u.secure);
        assert_eq!(u.user, Some(&b"alice"[..]));
        assert_eq!(u.password, Some(&b"secret"[..]));
        assert_eq!(u.host, Host::Domain("Example.COM"));
        assert_eq!(u.port, Some(5061));
        assert_eq!(u.transport(), Some(&b"tls"[..]));
        assert!(u.has_lr());
        assert_eq!(u.headers, Some(&b"subject=x&priority=urgent"[..]));
    }

    #[test]
    fn torture_user_parts() {
        let u = sip("sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com");
        assert_eq!(
            u.user,
            Some(&b"1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"[..])
        );
        assert_eq!(
            u.password,
            Some(&b"&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"[..])
        );
        let u = sip("sip:user;par=u%40example.net@example.com");
        assert_eq!(&*scan::unescape(u.user.unwrap()), b"user;par=u@example.net");
        assert_eq!(u.host, Host::Domain("example.com"));
    }

    #[test]
    fn hosts_and_ports() {
        let u = sip("sip:[2001:db8::10]:5070;maddr=[::1]");
        assert_eq!(u.host, Host::Ip("2001:db8::10".parse().unwrap()));
        assert_eq!(u.port, Some(5070));
        assert_eq!(
            sip("sip:192.0.2.1").host,
            Host::Ip("192.0.2.1".parse().unwrap())
        );
        assert!(Uri::parse(b"sip:host:65536").is_err());
        assert!(Uri::parse(b"sip:host:").is_err());
        assert!(Uri::parse(b"sip:[::1").is_err());
        assert!(Uri::parse(b"sip:").is_err());
        assert!(Uri::parse(b"sip:user@example.com; lr").is_err());
    }

    #[test]
    fn other_schemes() {
        assert!(matches!(
            Uri::parse(b"tel:+1-972-555-2222;phone-context=x").unwrap(),
            Uri::Tel(_)
        ));
        let u = Uri::parse(b"soap.beep://192.0.2.103:3002").unwrap();
        assert!(!u.is_routable_scheme());
        assert!(Uri::parse(b"<sip:user@example.com>").is_err());
    }

    #[test]
    fn equivalence_rules_of_19_1_4() {
        let eq = |a: &str, b: &str| sip(a).equivalent(&sip(b));
        assert!(eq(
            "sip:%61lice@atlanta.com;transport=TCP",
            "sip:alice@AtLanTa.CoM;Transport=tcp"
        ));
        assert!(eq(
            "sip:carol@chicago.com",
            "sip:carol@chicago.com;newparam=5"
        ));
        assert!(eq(
            "sip:carol@chicago.com;security=on",
            "sip:carol@chicago.com;newparam=5"
        ));
        assert!(eq(
            "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
            "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com"
        ));
        assert!(!eq(
            "SIP:ALICE@AtLanTa.CoM;Transport=udp",
            "sip:alice@AtLanTa.CoM;Transport=UDP"
        ));
        assert!(!eq("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"));
        assert!(!eq(
            "sip:bob@biloxi.com",
            "sip:bob@biloxi.com;transport=udp"
        ));
        assert!(!eq(
            "sip:carol@chicago.com;newparam=5",
            "sip:carol@chicago.com;newparam=6"
        ));
    }
}
