//! The Via header (RFC 3261 §20.42, §18.2.1, RFC 3581): sent-protocol, sent-by, and the branch,
//! received, rport, maddr and ttl parameters.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};

use super::error::{ParseError, Result};
use super::layout::{at, place, HostLayout, Place};
use super::params::Params;
use super::scan;
use super::uri::{parse_hostport, Host};

/// The branch prefix of RFC 3261 transactions (§8.1.1.7).
pub const MAGIC_COOKIE: &[u8] = b"z9hG4bK";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Via<'a> {
    pub protocol: &'a [u8],
    pub version: &'a [u8],
    pub transport: &'a [u8],
    pub host: Host<'a>,
    pub port: Option<u16>,
    pub params: Params<'a>,
    raw: &'a [u8],
}

impl<'a> Via<'a> {
    /// Parses one via-parm: sent-protocol LWS sent-by *( SEMI via-params ), where SWS may
    /// surround the slashes, the colon and the parameters (§25.1).
    pub fn parse(s: &'a [u8]) -> Result<Via<'a>> {
        let bad = |d| ParseError::bad("Via", d);
        let (protocol, i) = token_at(s, 0).ok_or(bad("bad protocol name"))?;
        let i = expect_slash(s, i).ok_or(bad("bad sent-protocol"))?;
        let (version, i) = token_at(s, i).ok_or(bad("bad protocol version"))?;
        let i = expect_slash(s, i).ok_or(bad("bad sent-protocol"))?;
        let (transport, i) = token_at(s, i).ok_or(bad("bad transport"))?;
        let host_start = scan::skip_ws(s, i);
        if host_start == i {
            return Err(bad("missing space before sent-by"));
        }
        let host_end = sent_by_host_end(s, host_start);
        let mut j = scan::skip_ws(s, host_end);
        let mut port_text: &[u8] = b"";
        if s.get(j) == Some(&b':') {
            let p = scan::skip_ws(s, j + 1);
            let e = s[p..]
                .iter()
                .position(|b| !b.is_ascii_digit())
                .map_or(s.len(), |x| x + p);
            port_text = &s[p..e];
            if port_text.is_empty() {
                return Err(bad("bad sent-by port"));
            }
            j = e;
        }
        let (host, _) =
            parse_hostport(&s[host_start..host_end]).map_err(|e| e.in_context("Via"))?;
        let port = if port_text.is_empty() {
            None
        } else {
            Some(scan::parse_decimal(port_text, 65535).ok_or(bad("bad sent-by port"))? as u16)
        };
        let params = Params::parse_header(&s[j..]).map_err(|e| e.in_context("Via"))?;
        if params
            .get("branch")
            .is_some_and(|v| v.is_none_or(<[u8]>::is_empty))
        {
            return Err(bad("empty branch"));
        }
        Ok(Via {
            protocol,
            version,
            transport,
            host,
            port,
            params,
            raw: s,
        })
    }

    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    pub fn branch(&self) -> Option<&'a [u8]> {
        self.params.value("branch")
    }

    /// True when the branch starts with the RFC 3261 magic cookie (§17.2.3).
    pub fn is_rfc3261_branch(&self) -> bool {
        self.branch().is_some_and(|b| b.starts_with(MAGIC_COOKIE))
    }

    pub fn received(&self) -> Option<&'a [u8]> {
        self.params.value("received")
    }

    /// The `received` address as an IP. RFC 3261 §25.1 writes it bare (`received =
    /// IPv4address / IPv6address`), and so does [`Via::with_received`]; the bracketed IPv6
    /// reference some implementations write (`received=[2001:db8::9:255]`) is accepted too, as
    /// RFC 5118 §4.5 asks. `None` when absent or not an address.
    pub fn received_ip(&self) -> Option<IpAddr> {
        let value = self.received()?;
        let (inner, bracketed) = match value.strip_prefix(b"[").and_then(|v| v.strip_suffix(b"]")) {
            Some(inner) => (inner, true),
            None => (value, false),
        };
        let ip: IpAddr = std::str::from_utf8(inner).ok()?.parse().ok()?;
        (!bracketed || ip.is_ipv6()).then_some(ip)
    }

    /// RFC 3581: `Some(None)` for a bare `rport`, `Some(Some(port))` once filled in.
    pub fn rport(&self) -> Option<Option<u16>> {
        self.params.get("rport").map(|v| {
            v.and_then(|p| scan::parse_decimal(p, 65535))
                .map(|p| p as u16)
        })
    }

    pub fn maddr(&self) -> Option<&'a [u8]> {
        self.params.value("maddr")
    }

    /// Where the text of the parameters starts in `raw` (everything before it is kept verbatim
    /// when the received-side parameters are added).
    fn params_offset(&self) -> usize {
        self.raw.len() - self.params.raw().len()
    }

    /// §18.2.1 and RFC 3581 §4: the top Via value as the server must record it for a request
    /// received from `source`, or `None` when it needs no change. `received` is added when the
    /// sent-by host is a name or a different address, or when the client asked for `rport`
    /// (which is then filled with the source port).
    pub fn with_received(&self, source: SocketAddr) -> Option<Vec<u8>> {
        self.with_received_rport(source, false)
    }

    /// [`Via::with_received`], and with `force_rport` as if the client had asked for `rport`
    /// (Kamailio's `force_rport()`, for clients behind a NAT that do not implement RFC 3581):
    /// `received` and `rport=<source port>` are recorded, so the response goes back to the
    /// packet's source address and port. A value already filled in with the same port and
    /// address needs no change.
    pub fn with_received_rport(&self, source: SocketAddr, force_rport: bool) -> Option<Vec<u8>> {
        let host_differs = self.host.ip() != Some(source.ip());
        let default_port = if scan::eq_ic(self.transport, b"TLS") {
            5061
        } else {
            5060
        };
        // Forcing changes nothing for a client already where its Via says.
        let port_differs = self.port.unwrap_or(default_port) != source.port();
        let force_rport = force_rport && (host_differs || port_differs);
        let wants_rport = force_rport || self.rport().is_some();
        if !wants_rport && !host_differs {
            return None;
        }
        let already =
            self.rport() == Some(Some(source.port())) && self.received_ip() == Some(source.ip());
        if force_rport && already {
            return None;
        }
        let mut out = Vec::with_capacity(self.raw.len() + 40);
        scan::push_unfolded(&mut out, scan::trim_ws(&self.raw[..self.params_offset()]));
        for p in self.params.iter() {
            if scan::eq_ic(p.name, b"received") || scan::eq_ic(p.name, b"rport") {
                continue;
            }
            out.push(b';');
            out.extend_from_slice(p.name);
            if let Some(v) = p.value {
                out.push(b'=');
                scan::push_unfolded(&mut out, v);
            }
        }
        // via-received is a bare address, IPv6 without brackets (§25.1). Writing into a Vec
        // cannot fail.
        let _ = write!(out, ";received={}", source.ip());
        if wants_rport {
            let _ = write!(out, ";rport={}", source.port());
        }
        Some(out)
    }
}

/// Where the parts of a parsed [`Via`] lie in its value: kept by a message so that the top Via,
/// read by nearly every layer, is parsed once ([`Via::rebuild`] puts it back together).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ViaLayout {
    protocol: Place,
    version: Place,
    transport: Place,
    host: HostLayout,
    port: Option<u16>,
    params: Place,
    raw: Place,
}

impl<'a> Via<'a> {
    /// The layout of this Via, parsed from a slice of `base`.
    pub(crate) fn layout(&self, base: &[u8]) -> ViaLayout {
        ViaLayout {
            protocol: place(base, self.protocol),
            version: place(base, self.version),
            transport: place(base, self.transport),
            host: HostLayout::of(base, &self.host),
            port: self.port,
            params: place(base, self.params.raw()),
            raw: place(base, self.raw),
        }
    }

    /// The Via `layout` describes, over the same `base` it was taken from (the caller keeps
    /// the two together: a message keeps each layout with the place of its text).
    pub(crate) fn rebuild(layout: &ViaLayout, base: &'a [u8]) -> Via<'a> {
        Via {
            protocol: at(base, layout.protocol),
            version: at(base, layout.version),
            transport: at(base, layout.transport),
            host: layout.host.rebuild(base),
            port: layout.port,
            params: Params::from_validated(at(base, layout.params)),
            raw: at(base, layout.raw),
        }
    }
}

impl Via<'_> {
    /// Where a response to a request that arrived with this (top) Via from `source` goes over
    /// an unreliable transport (§18.2.2, RFC 3581 §4): the packet's source address (which is
    /// what `received` records), at the `rport` port when the client asked for it, else at the
    /// sent-by port or the transport default. `maddr` is deliberately not followed: on an open
    /// server it would let any sender reflect responses at a third party.
    pub fn response_addr(&self, source: SocketAddr, default_port: u16) -> SocketAddr {
        let port = match self.rport() {
            Some(_) => source.port(),
            None => self.port.unwrap_or(default_port),
        };
        SocketAddr::new(source.ip(), port)
    }

    /// Where a response goes by this Via alone, as a proxy that kept no state for the request
    /// must send it (§18.2.2, RFC 3581 §4): the `received` address when the previous hop
    /// recorded one, else the sent-by host (which must then be an IP literal: `None` for a
    /// name), at the filled-in `rport` port, else the sent-by port, else `default_port`.
    pub fn recorded_response_addr(&self, default_port: u16) -> Option<SocketAddr> {
        let ip = self.received_ip().or_else(|| self.host.ip())?;
        let port = match self.rport() {
            Some(Some(port)) => port,
            _ => self.port.unwrap_or(default_port),
        };
        Some(SocketAddr::new(ip, port))
    }
}

fn token_at(s: &[u8], i: usize) -> Option<(&[u8], usize)> {
    let start = scan::skip_ws(s, i);
    let end = scan::token_end(s, start);
    (end > start).then(|| (&s[start..end], end))
}

/// SLASH = SWS "/" SWS
fn expect_slash(s: &[u8], i: usize) -> Option<usize> {
    let j = scan::skip_ws(s, i);
    (s.get(j) == Some(&b'/')).then_some(j + 1)
}

fn sent_by_host_end(s: &[u8], start: usize) -> usize {
    if s.get(start) == Some(&b'[') {
        return s[start..]
            .iter()
            .position(|&b| b == b']')
            .map_or(s.len(), |p| start + p + 1);
    }
    s[start..]
        .iter()
        .position(|&b| b == b':' || b == b';' || scan::is_ws(b))
        .map_or(s.len(), |p| start + p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tortuous_via() {
        let v = Via::parse(
            b"SIP  / 2.0  / TCP     spindle.example.com   ;\r\n  branch  =   z9hG4bK9ikj8",
        )
        .unwrap();
        assert_eq!(v.transport, b"TCP");
        assert_eq!(v.host, Host::Domain("spindle.example.com"));
        assert_eq!(v.branch(), Some(&b"z9hG4bK9ikj8"[..]));
        assert!(v.is_rfc3261_branch());
        let v = Via::parse(b"SIP/2.0/UDP [2001:db8::9:1]:5070;branch=z9hG4bKas;rport").unwrap();
        assert_eq!(v.port, Some(5070));
        assert_eq!(v.rport(), Some(None));
        let v = Via::parse(b"SIP/2.0/UDP host : 5062 ;branch=x").unwrap();
        assert_eq!(v.port, Some(5062));
    }

    #[test]
    fn bad_vias() {
        for bad in [
            &b"SIP/2.0 host"[..],
            b"SIP/2.0/UDP",
            b"SIP/2.0/UDPhost",
            b"SIP/2.0/UDP host:99999",
            b"SIP/2.0/UDP host;branch=",
            b"SIP/2.0/UDP host junk",
        ] {
            assert!(Via::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn received_and_rport() {
        let src: SocketAddr = "192.0.2.7:6000".parse().unwrap();
        let v = Via::parse(b"SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK1").unwrap();
        assert_eq!(v.with_received(src), None);
        let v = Via::parse(b"SIP/2.0/UDP pc.example.com;rport;branch=z9hG4bK1").unwrap();
        assert_eq!(
            v.with_received(src).unwrap(),
            b"SIP/2.0/UDP pc.example.com;branch=z9hG4bK1;received=192.0.2.7;rport=6000"
        );
        let v = Via::parse(b"SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1").unwrap();
        assert_eq!(
            v.with_received(src).unwrap(),
            b"SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1;received=192.0.2.7"
        );
    }

    #[test]
    fn ipv6_received_is_written_bare_and_read_in_both_forms() {
        // §18.2.1 for an IPv6 source: the sent-by stays an IPv6 reference, received is the
        // bare IPv6address of §25.1 (RFC 5118 §4.5), rport the source port.
        let src: SocketAddr = "[::1]:6000".parse().unwrap();
        let v = Via::parse(b"SIP/2.0/UDP [2001:db8::9:1]:5070;branch=z9hG4bK1;rport").unwrap();
        let stamped = v.with_received(src).unwrap();
        assert_eq!(
            stamped,
            b"SIP/2.0/UDP [2001:db8::9:1]:5070;branch=z9hG4bK1;received=::1;rport=6000"
        );
        let v = Via::parse(&stamped).unwrap();
        assert_eq!(v.host, Host::Ip("2001:db8::9:1".parse().unwrap()));
        assert_eq!(v.received_ip(), Some(src.ip()));
        assert_eq!(v.recorded_response_addr(5060), Some(src));
        // The same address in another spelling needs no received (compared as addresses).
        let v = Via::parse(b"SIP/2.0/UDP [0:0:0:0:0:0:0:1]:6000;branch=z9hG4bK1").unwrap();
        assert_eq!(v.with_received(src), None);
        // RFC 5118 §4.5: both forms of received are accepted.
        for text in [
            &b"SIP/2.0/UDP [2001:db8::9:1];received=[2001:db8::9:255];branch=z9hG4bKas3-111"[..],
            b"SIP/2.0/UDP [2001:db8::9:1];received=2001:db8::9:255;branch=z9hG4bKas3",
        ] {
            let v = Via::parse(text).unwrap();
            assert_eq!(v.received_ip(), Some("2001:db8::9:255".parse().unwrap()));
            assert_eq!(
                v.recorded_response_addr(5060),
                Some("[2001:db8::9:255]:5060".parse().unwrap())
            );
        }
        // Restamping replaces a bracketed received by the bare form.
        let v = Via::parse(b"SIP/2.0/UDP [2001:db8::9:1];received=[2001:db8::9:255]").unwrap();
        assert_eq!(
            v.with_received(src).unwrap(),
            b"SIP/2.0/UDP [2001:db8::9:1];received=::1"
        );
        // Brackets around an IPv4 address, or no address at all, are not a received address.
        let v = Via::parse(b"SIP/2.0/UDP h;received=[192.0.2.1]").unwrap();
        assert_eq!(v.received_ip(), None);
        let v = Via::parse(b"SIP/2.0/UDP h;received=somehost").unwrap();
        assert_eq!(v.received_ip(), None);
        assert_eq!(v.recorded_response_addr(5060), None);
    }

    #[test]
    fn recorded_response_addr_follows_received_and_filled_rport() {
        // §18.2.2 / RFC 3581 §4 for a response routed by the Via alone.
        let v = Via::parse(b"SIP/2.0/UDP 10.0.0.1:5070;received=192.0.2.7;rport=6000").unwrap();
        assert_eq!(
            v.recorded_response_addr(5060),
            Some("192.0.2.7:6000".parse().unwrap())
        );
        let v = Via::parse(b"SIP/2.0/UDP 10.0.0.1:5070;received=192.0.2.7").unwrap();
        assert_eq!(
            v.recorded_response_addr(5060),
            Some("192.0.2.7:5070".parse().unwrap())
        );
        // A bare rport (never filled in) falls back to the sent-by port.
        let v = Via::parse(b"SIP/2.0/TLS [::1];rport").unwrap();
        assert_eq!(
            v.recorded_response_addr(5061),
            Some("[::1]:5061".parse().unwrap())
        );
        let v = Via::parse(b"SIP/2.0/UDP pc.example.com:5070").unwrap();
        assert_eq!(v.recorded_response_addr(5060), None);
    }
}
