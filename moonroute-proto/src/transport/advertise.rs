//! The address a listener tells peers to reach it at, when that is not its socket address:
//! Kamailio's `listen=udp:0.0.0.0:5060 advertise sip.example.com:5060`.
//!
//! What a server writes about itself must be an address its peers can send to: the sent-by of
//! its Via (RFC 3261 §18.1.1, §16.6 step 8: the callee answers there), the URI of its
//! Record-Route (§16.6 step 4: the next requests of the dialog come there) and the source of
//! its NAT keep-alives (their Via, From and Call-ID). A listener on a wildcard address
//! (`0.0.0.0`, `[::]`) has no such address of its own, and one behind a NAT or a container's
//! port mapping has the wrong one: it advertises `HOST[:PORT]` instead (`host` and `port` of
//! §25.1 `hostport`: a name, an IPv4 address, or an IPv6 address in brackets). Without a
//! port, the listener's own (bound) port is advertised. The advertised name names this server
//! too (`is_myself`), at that port.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use crate::sip::uri::parse_hostport;
use crate::sip::Host;

/// `HOST[:PORT]` advertised for a listener (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Advertise {
    /// As written: a host name, an IPv4 address or a bracketed IPv6 address.
    host: Arc<str>,
    /// The host when it is an IP address (canonical: IPv4-mapped IPv6 is IPv4).
    ip: Option<IpAddr>,
    /// `None`: the listener's own port.
    port: Option<u16>,
}

impl Advertise {
    /// The host as written in Via and Record-Route (IPv6 in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The host when it is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.ip
    }

    /// The port advertised for a listener bound to `bound_port`.
    pub fn port_for(&self, bound_port: u16) -> u16 {
        self.port.unwrap_or(bound_port)
    }
}

/// Why an advertised address was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseAdvertiseError {
    input: String,
    reason: &'static str,
}

impl fmt::Display for ParseAdvertiseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid advertised address '{}': {} (expected HOST[:PORT], e.g. \
             sip.example.com:5060, 203.0.113.7 or [2001:db8::7]:5060)",
            self.input, self.reason
        )
    }
}

impl std::error::Error for ParseAdvertiseError {}

impl FromStr for Advertise {
    type Err = ParseAdvertiseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = |reason| ParseAdvertiseError {
            input: s.to_owned(),
            reason,
        };
        if s.bytes().filter(|&b| b == b':').count() > 1 && !s.starts_with('[') {
            return Err(error("an IPv6 address goes in brackets"));
        }
        let (host, port) = parse_hostport(s.as_bytes()).map_err(|_| error("not a host[:port]"))?;
        if port == Some(0) {
            return Err(error("port 0 is not an address peers can send to"));
        }
        let ip = host.ip().map(|ip| ip.to_canonical());
        if ip.is_some_and(|ip| ip.is_unspecified() || ip.is_multicast()) {
            return Err(error("a wildcard or multicast address cannot be reached"));
        }
        if let Host::Domain(name) = host {
            // A name of digits and dots that is not an IPv4 address (`1.2.3`, `999.1.1.1`) is
            // a typo, not a host name (RFC 1123 §2.1: a top label is never all digits).
            let last = name.trim_end_matches('.').rsplit('.').next().unwrap_or("");
            if last.bytes().all(|b| b.is_ascii_digit()) {
                return Err(error("neither an IPv4 address nor a host name"));
            }
        }
        let host_text = match port {
            Some(_) => s.rsplit_once(':').map_or(s, |(host, _)| host),
            None => s,
        };
        Ok(Advertise {
            host: Arc::from(host_text),
            ip,
            port,
        })
    }
}

impl fmt::Display for Advertise {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Advertise {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Advertise {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_addresses_and_ports_parse() {
        let name: Advertise = "sip.example.com:5080".parse().unwrap();
        assert_eq!(
            (name.host(), name.ip(), name.port_for(5060)),
            ("sip.example.com", None, 5080)
        );
        let v4: Advertise = "203.0.113.7".parse().unwrap();
        assert_eq!(v4.host(), "203.0.113.7");
        assert_eq!(v4.ip(), Some("203.0.113.7".parse().unwrap()));
        assert_eq!(v4.port_for(5062), 5062, "no port: the listener's own");
        let v6: Advertise = "[2001:db8::7]:5060".parse().unwrap();
        assert_eq!(v6.host(), "[2001:db8::7]");
        assert_eq!(v6.ip(), Some("2001:db8::7".parse().unwrap()));
        let mapped: Advertise = "[::ffff:192.0.2.1]".parse().unwrap();
        assert_eq!(mapped.ip(), Some("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "sip.example.com:5080",
            "203.0.113.7",
            "[2001:db8::7]:5060",
            "edge",
        ] {
            assert_eq!(text.parse::<Advertise>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn what_peers_cannot_reach_or_headers_cannot_carry_is_refused() {
        for bad in [
            "",
            "0.0.0.0",
            "[::]:5060",
            "224.0.0.1",
            "sip.example.com:0",
            "sip.example.com:70000",
            "sip.example.com:",
            "2001:db8::7",
            "[2001:db8::7",
            "sip example.com",
            "sip.example.com;lr",
            "sip.example.com>,<sip:evil",
            "sip.example.com\r\nX: y",
            "1.2.3",
            "999.1.1.1",
        ] {
            let error = bad.parse::<Advertise>().unwrap_err();
            assert!(
                error.to_string().contains("expected HOST[:PORT]"),
                "{bad}: {error}"
            );
        }
    }
}
