//! The DNS metric families (RFC 3263 lookups and failures, by record type), owned by the
//! resolver that counts into them; `crate::metrics::engine` registers them with the others.

use crate::metrics::{counter_family, Counter, Registry};

/// DNS record types looked up by RFC 3263 resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsType {
    Naptr,
    Srv,
    A,
    Aaaa,
}

impl DnsType {
    const ALL: [DnsType; 4] = [DnsType::Naptr, DnsType::Srv, DnsType::A, DnsType::Aaaa];

    fn label(self) -> &'static str {
        match self {
            DnsType::Naptr => "NAPTR",
            DnsType::Srv => "SRV",
            DnsType::A => "A",
            DnsType::Aaaa => "AAAA",
        }
    }
}

/// DNS lookups (RFC 3263), by record type.
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    lookups: [Counter; 4],
    failures: [Counter; 4],
}

impl DnsMetrics {
    pub fn lookup(&self, rtype: DnsType) {
        self.lookups[rtype as usize].inc();
    }

    /// A lookup that got no answer (timeout, server failure); NXDOMAIN and NODATA are answers.
    pub fn failure(&self, rtype: DnsType) {
        self.failures[rtype as usize].inc();
    }
}

/// Registers the DNS families in `registry` (once per server) and returns the handles.
pub fn register(registry: &Registry) -> DnsMetrics {
    let lookups = counter_family(
        registry,
        "moonroute_dns_lookups_total",
        "DNS lookups issued to locate next hops (RFC 3263), cache hits included, by record type.",
        "type",
    );
    let failures = counter_family(
        registry,
        "moonroute_dns_failures_total",
        "DNS lookups that got no answer (timeout, server failure); NXDOMAIN and empty answers are not failures.",
        "type",
    );
    DnsMetrics {
        lookups: DnsType::ALL.map(|rtype| lookups.with(&[rtype.label()])),
        failures: DnsType::ALL.map(|rtype| failures.with(&[rtype.label()])),
    }
}
