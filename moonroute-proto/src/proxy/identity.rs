//! Who this server is: which URIs name it (Kamailio's `myself`), and what it writes about
//! itself for each local socket (Via sent-by, RFC 3261 §18.1.1 and §16.6 step 8; Record-Route,
//! §16.6 step 4; the source of NAT keep-alives).
//!
//! A listener advertises its socket address, or what its `advertise=` names
//! ([`crate::transport::advertise`]): a wildcard listener has no address of its own, and one
//! behind a NAT or a container's port mapping has one its peers cannot reach. A stream
//! connection accepted by a wildcard listener has a local address of its own, but it writes
//! what the listener advertises, so that the peer's next request comes to the address it was
//! told about.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::sip::{Host, Uri};
use crate::transport::{ListenAddr, TransportKind};

/// This server's product token, written in the Server and User-Agent headers of what it
/// originates (RFC 3261 §20.35, §20.41).
pub const SERVER: &str = concat!("moonroute ", env!("CARGO_PKG_VERSION"));

/// Which URIs name this server (Kamailio's `myself`): a configured domain, one of the listen
/// addresses (any port when listening on port 0; a wildcard listener matches any IP of its
/// family), or an advertised address at its port. IP addresses compare as addresses, so
/// `[::1]`, `[0:0:0:0:0:0:0:1]` and `[::ffff:127.0.0.1]` / `127.0.0.1` (RFC 5118 §4.9) are
/// each one address. A configured domain that is an IP literal (`192.0.2.1`, `2001:db8::1` or
/// `[2001:db8::1]`, e.g. a public address in front of a NAT) names this server on any port, as
/// a domain name does.
#[derive(Clone, Debug, Default)]
pub struct LocalIdentity {
    domains: Vec<String>,
    /// The domains that are IP literals, parsed.
    domain_ips: Vec<IpAddr>,
    listen: Vec<SocketAddr>,
    /// The listeners with their transports and what they advertise; empty when the identity
    /// was made from addresses alone ([`LocalIdentity::new`]).
    listeners: Vec<ListenAddr>,
    /// By listener: the host part of [`SentBy::of_socket`] of its address, written once here
    /// rather than formatted for each Via and Record-Route (five times per relayed call).
    listener_hosts: Vec<String>,
}

impl LocalIdentity {
    /// An identity from domains and socket addresses, advertising nothing.
    pub fn new(domains: &[String], listen: impl IntoIterator<Item = SocketAddr>) -> Self {
        LocalIdentity {
            domains: domains.to_vec(),
            domain_ips: domains.iter().filter_map(|d| ip_literal(d)).collect(),
            listen: listen.into_iter().collect(),
            listeners: Vec::new(),
            listener_hosts: Vec::new(),
        }
    }

    /// An identity from domains and the listeners as bound (port 0 resolved), with what they
    /// advertise.
    pub fn of_listeners(domains: &[String], listeners: &[ListenAddr]) -> Self {
        LocalIdentity {
            listeners: listeners.to_vec(),
            listener_hosts: listeners.iter().map(|l| socket_host(l.addr.ip())).collect(),
            ..LocalIdentity::new(domains, listeners.iter().map(|l| l.addr))
        }
    }

    pub fn is_myself(&self, uri: &Uri<'_>) -> bool {
        let Some(sip) = uri.as_sip() else {
            return false;
        };
        let default_port = if sip.secure { 5061 } else { 5060 };
        self.is_my_host_port(&sip.host, sip.port.unwrap_or(default_port))
    }

    /// Whether `host`:`port` names this server: one of its domains (any port), the address
    /// and port of one of its listeners (`localhost` for a loopback listener), or what a
    /// listener advertises.
    pub fn is_my_host_port(&self, host: &Host<'_>, port: u16) -> bool {
        match host.ip() {
            Some(ip) => {
                let ip = ip.to_canonical();
                self.domain_ips.contains(&ip)
                    || self
                        .listen
                        .iter()
                        .any(|l| ip_matches(l.ip(), ip) && port_matches(l.port(), port))
                    || self.advertises(port, |advertised| advertised.ip() == Some(ip))
            }
            None => {
                let name = match *host {
                    Host::Domain(name) => name,
                    Host::Ip(_) => return false,
                };
                let is_domain = self.domains.iter().any(|d| d.eq_ignore_ascii_case(name));
                let is_localhost = name.eq_ignore_ascii_case("localhost")
                    && self
                        .listen
                        .iter()
                        .any(|l| l.ip().is_loopback() && port_matches(l.port(), port));
                is_domain
                    || is_localhost
                    || self.advertises(port, |advertised| {
                        advertised.ip().is_none() && advertised.host().eq_ignore_ascii_case(name)
                    })
            }
        }
    }

    /// Whether a listener advertises, at `port`, an address `names` accepts.
    fn advertises(&self, port: u16, names: impl Fn(&crate::transport::Advertise) -> bool) -> bool {
        self.listeners.iter().any(|l| {
            l.advertise
                .as_ref()
                .is_some_and(|a| a.port_for(l.addr.port()) == port && names(a))
        })
    }

    /// What this server writes about itself for the local socket `local` of transport `kind`
    /// (Via sent-by, Record-Route host, keep-alive source): what its listener advertises, else
    /// the socket address. `local` is the listener's address, or a stream connection's own
    /// local address (then the wildcard listener that accepted it is found by its port).
    /// `None` (a binding that does not know the socket it came in on): the first listener of
    /// `kind` in the family of `peer`.
    pub fn sent_by(
        &self,
        kind: TransportKind,
        local: Option<SocketAddr>,
        peer: SocketAddr,
    ) -> SentBy<'_> {
        let listener = match local {
            Some(local) => self.listener_of(kind, local),
            None => self
                .listeners
                .iter()
                .position(|l| l.kind == kind && l.addr.is_ipv4() == peer.is_ipv4()),
        };
        let advertised = listener.and_then(|i| {
            let l = &self.listeners[i];
            Some((l, l.advertise.as_ref()?))
        });
        let listener_addr = listener.map(|i| (i, self.listeners[i].addr));
        match (advertised, local.or(listener_addr.map(|(_, addr)| addr))) {
            (Some((listener, advertise)), _) => SentBy {
                host: Cow::Borrowed(advertise.host()),
                port: advertise.port_for(listener.addr.port()),
            },
            // The listener's own socket (every UDP message): its text written at start.
            (None, Some(addr)) => match listener_addr {
                Some((i, listener_addr)) if listener_addr == addr => SentBy {
                    host: Cow::Borrowed(&self.listener_hosts[i]),
                    port: addr.port(),
                },
                _ => SentBy::of_socket(addr),
            },
            // No socket at all: the family's wildcard, as the socket that sends would be.
            (None, None) => SentBy::of_socket(match peer {
                SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
                SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
            }),
        }
    }

    /// The listener a message on `local` belongs to: the one bound there, else the wildcard
    /// listener of that family and port (a stream connection it accepted), else for a stream a
    /// listener of that family on its IP or the wildcard (a connection this server opened,
    /// from an ephemeral port: the peer reaches us at the listener, not there).
    fn listener_of(&self, kind: TransportKind, local: SocketAddr) -> Option<usize> {
        let same_kind = || {
            self.listeners
                .iter()
                .enumerate()
                .filter(move |(_, l)| l.kind == kind && l.addr.is_ipv4() == local.is_ipv4())
        };
        let covers = |l: &ListenAddr| l.addr.ip() == local.ip() || l.addr.ip().is_unspecified();
        same_kind()
            .find(|(_, l)| l.addr == local)
            .or_else(|| same_kind().find(|(_, l)| covers(l) && l.addr.port() == local.port()))
            .or_else(|| same_kind().find(|(_, l)| kind.is_stream() && covers(l)))
            .map(|(i, _)| i)
    }
}

/// A SIP `hostport` (RFC 3261 §25.1) this server writes about itself: an advertised host, or
/// a socket address (IPv6 in brackets). Display gives `host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentBy<'a> {
    pub host: Cow<'a, str>,
    pub port: u16,
}

impl SentBy<'_> {
    /// A socket address as a hostport: `192.0.2.1:5060`, `[2001:db8::1]:5060`. The scope of a
    /// link-local IPv6 address is not part of the grammar and is left out.
    pub fn of_socket(addr: SocketAddr) -> SentBy<'static> {
        SentBy {
            host: Cow::Owned(socket_host(addr.ip())),
            port: addr.port(),
        }
    }
}

/// The host part of [`SentBy::of_socket`]: IPv4 written without `fmt`, IPv6 in brackets
/// without its scope.
fn socket_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => Host::Ip(ip).with_text(str::to_owned),
        IpAddr::V6(ip) => format!("[{ip}]"),
    }
}

impl fmt::Display for SentBy<'_> {
    /// `host:port`, without `fmt`'s argument machinery: written for every Via and
    /// Record-Route this server adds.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut port = [0u8; 20];
        f.write_str(&self.host)?;
        f.write_str(":")?;
        f.write_str(crate::sip::scan::decimal(u64::from(self.port), &mut port))
    }
}

/// `ip` (canonical: an IPv4-mapped IPv6 address is its IPv4 address) is a listener's address,
/// or the listener is the wildcard of its family (IPv6 listeners are IPv6-only).
fn ip_matches(listen: IpAddr, ip: IpAddr) -> bool {
    let listen = listen.to_canonical();
    listen == ip || (listen.is_unspecified() && listen.is_ipv4() == ip.is_ipv4())
}

/// A configured domain that is an IP address, IPv6 with or without brackets; canonical.
fn ip_literal(domain: &str) -> Option<IpAddr> {
    let bare = domain
        .strip_prefix('[')
        .and_then(|d| d.strip_suffix(']'))
        .unwrap_or(domain);
    bare.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

fn port_matches(listen: u16, port: u16) -> bool {
    listen == 0 || listen == port
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(domains: &[&str], listen: &[&str]) -> LocalIdentity {
        let domains: Vec<String> = domains.iter().map(|d| d.to_string()).collect();
        LocalIdentity::new(&domains, listen.iter().map(|l| l.parse().unwrap()))
    }

    fn listening(listeners: &[&str]) -> LocalIdentity {
        let listeners: Vec<ListenAddr> = listeners.iter().map(|l| l.parse().unwrap()).collect();
        LocalIdentity::of_listeners(&[], &listeners)
    }

    fn is_myself(id: &LocalIdentity, uri: &str) -> bool {
        id.is_myself(&Uri::parse(uri.as_bytes()).unwrap())
    }

    fn sent_by(id: &LocalIdentity, kind: TransportKind, local: &str) -> String {
        let peer = "192.0.2.99:5060".parse().unwrap();
        id.sent_by(kind, Some(local.parse().unwrap()), peer)
            .to_string()
    }

    #[test]
    fn listen_addresses_and_domains_are_myself() {
        let id = identity(&["Example.COM"], &["127.0.0.1:5060", "[::1]:5070"]);
        assert!(is_myself(&id, "sip:127.0.0.1"));
        assert!(is_myself(&id, "sip:alice@127.0.0.1:5060;transport=tcp"));
        assert!(!is_myself(&id, "sip:127.0.0.1:5080"));
        assert!(is_myself(&id, "sip:[::1]:5070"));
        assert!(!is_myself(&id, "sip:[::1]"));
        assert!(
            is_myself(&id, "sip:bob@example.com"),
            "domains compare case-insensitively"
        );
        assert!(!is_myself(&id, "sip:bob@example.org"));
        assert!(
            is_myself(&id, "sip:localhost"),
            "localhost names a loopback listener"
        );
        assert!(!is_myself(&id, "tel:+15551234"));
    }

    #[test]
    fn ipv6_addresses_compare_as_addresses() {
        let id = identity(&[], &["[::1]:5060", "127.0.0.1:5070"]);
        for uri in [
            "sip:[::1]",
            "sip:[::1]:5060",
            "sip:[0:0:0:0:0:0:0:1]:5060;lr",
            "sip:[0::0:1];transport=tcp",
            "sip:alice@[::1]:5060",
            // RFC 5118 §4.9: an IPv4-mapped IPv6 address is the IPv4 address.
            "sip:[::ffff:127.0.0.1]:5070",
        ] {
            assert!(is_myself(&id, uri), "{uri}");
        }
        for uri in [
            "sip:[::1]:5070",
            "sip:[::2]:5060",
            "sip:[::ffff:127.0.0.1]:5060",
        ] {
            assert!(!is_myself(&id, uri), "{uri}");
        }
    }

    #[test]
    fn ip_literal_domains_match_with_or_without_brackets() {
        let id = identity(
            &["[2001:DB8::1]", "2001:db8::2", "192.0.2.1"],
            &["[::1]:5060"],
        );
        for uri in [
            "sip:alice@[2001:db8::1]",
            "sip:[2001:db8:0:0:0:0:0:1]:5080",
            "sip:alice@[2001:db8::2]",
            "sip:192.0.2.1:5062",
            "sip:[::ffff:192.0.2.1]",
        ] {
            assert!(is_myself(&id, uri), "{uri}");
        }
        assert!(!is_myself(&id, "sip:[2001:db8::3]"));
        assert!(!is_myself(&id, "sip:example.com"));
    }

    #[test]
    fn a_wildcard_listener_matches_only_its_family() {
        let id = identity(&[], &["[::]:5060"]);
        assert!(is_myself(&id, "sip:[2001:db8::7]"));
        assert!(!is_myself(&id, "sip:192.0.2.10"));
        let id = identity(&[], &["0.0.0.0:5060"]);
        assert!(is_myself(&id, "sip:192.0.2.10"));
        assert!(!is_myself(&id, "sip:[2001:db8::7]"));
    }

    #[test]
    fn wildcard_address_and_port_zero_match_broadly() {
        let id = identity(&[], &["0.0.0.0:5060", "127.0.0.1:0"]);
        assert!(is_myself(&id, "sip:192.0.2.10"));
        assert!(!is_myself(&id, "sip:192.0.2.10:5080"));
        assert!(is_myself(&id, "sip:127.0.0.1:40000"));
        assert!(!is_myself(&id, "sip:example.com"));
    }

    #[test]
    fn an_advertised_address_names_us_at_its_port() {
        let id = listening(&[
            "udp:10.0.0.5:5060,advertise=SIP.example.com",
            "tls:10.0.0.5:5061,advertise=[2001:db8::7]:443",
            "tcp:[::1]:5070,advertise=203.0.113.7:5080",
        ]);
        for uri in [
            "sip:sip.example.com",
            "sip:alice@Sip.Example.Com:5060;transport=udp",
            "sip:[2001:db8::7]:443;transport=tls",
            "sips:[2001:db8:0::7]:443",
            "sip:203.0.113.7:5080",
            "sip:[::ffff:203.0.113.7]:5080",
            // The sockets themselves still name us.
            "sip:10.0.0.5",
            "sip:[::1]:5070",
        ] {
            assert!(is_myself(&id, uri), "{uri}");
        }
        for uri in [
            "sip:sip.example.com:5080",
            "sip:example.com",
            "sip:[2001:db8::7]",
            "sip:203.0.113.7",
            "sip:203.0.113.8:5080",
        ] {
            assert!(!is_myself(&id, uri), "{uri}");
        }
    }

    #[test]
    fn sent_by_is_what_the_listener_advertises() {
        let id = listening(&[
            "udp:0.0.0.0:5060,advertise=sip.example.com",
            "tcp:0.0.0.0:5060,advertise=sip.example.com:5070",
            "udp:127.0.0.1:5062",
            "tcp:[::]:5060",
        ]);
        let udp = TransportKind::Udp;
        let tcp = TransportKind::Tcp;
        assert_eq!(sent_by(&id, udp, "0.0.0.0:5060"), "sip.example.com:5060");
        // A connection the wildcard listener accepted has its own local address.
        assert_eq!(sent_by(&id, tcp, "192.0.2.1:5060"), "sip.example.com:5070");
        assert_eq!(sent_by(&id, udp, "127.0.0.1:5062"), "127.0.0.1:5062");
        // Advertising nothing: the socket's own address (a connection's, not the wildcard).
        assert_eq!(
            sent_by(&id, tcp, "[2001:db8::1]:5060"),
            "[2001:db8::1]:5060"
        );
        // A connection this server opened (from an ephemeral port): its listener's address.
        assert_eq!(sent_by(&id, tcp, "192.0.2.1:40000"), "sip.example.com:5070");
        assert_eq!(
            sent_by(&id, tcp, "[2001:db8::1]:40000"),
            "[2001:db8::1]:40000"
        );
        assert_eq!(sent_by(&id, udp, "192.0.2.1:40000"), "192.0.2.1:40000");
        // Not knowing the socket: the first listener of the transport and family.
        let v4_peer = "192.0.2.99:5060".parse().unwrap();
        assert_eq!(
            id.sent_by(udp, None, v4_peer).to_string(),
            "sip.example.com:5060"
        );
        let v6_peer = "[2001:db8::99]:5060".parse().unwrap();
        assert_eq!(id.sent_by(tcp, None, v6_peer).to_string(), "[::]:5060");
        assert_eq!(id.sent_by(udp, None, v6_peer).to_string(), "[::]:0");
    }

    #[test]
    fn a_socket_address_is_a_sip_hostport() {
        let link_local = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap(),
            5060,
            0,
            3,
        ));
        assert_eq!(SentBy::of_socket(link_local).to_string(), "[fe80::1]:5060");
        let v4 = "127.0.0.1:5060".parse().unwrap();
        assert_eq!(SentBy::of_socket(v4).to_string(), "127.0.0.1:5060");
    }
}
