//! RFC 3263 server location: turns a next hop URI into an ordered list of transport, address
//! and port candidates (NAPTR → SRV → A/AAAA), over hickory-resolver.
//!
//! [`numeric`] answers without DNS for IP literals; [`Resolver::locate`] does the rest:
//!
//! * RFC 3263 §4.1, transport: the URI's `transport` parameter if any; else, with an explicit
//!   port, UDP for `sip:` and TLS for `sips:`; else NAPTR records of the host (services
//!   `SIP+D2U`, `SIP+D2T`, `SIPS+D2T`, flags `s`, by order then preference), each naming an SRV
//!   name; else SRV lookups `_sip._udp`, `_sip._tcp`, `_sips._tcp` of the host (`sips:`: only
//!   `_sips._tcp`), tried in that order (UDP, TCP, TLS: the order is the client's choice in §4.1;
//!   UDP first as the `sip:` default); else A/AAAA of the host with UDP (`sips:`: TLS). Usable
//!   NAPTR records whose SRV names give no candidate fall through to the SRV step too. Without
//!   UDP listeners a `sip:` URI falls back to TCP rather than UDP.
//! * §4.2, port: with an explicit port no SRV is used (A/AAAA of the host, that port); SRV
//!   records give port and target; without SRV, 5060 (5061 for TLS).
//! * SRV records are ordered per RFC 2782 (priority, then weighted random choice), then each
//!   target is resolved to addresses (the SRV answer's additional section if it has them, else
//!   A and AAAA queries); candidates keep that order, IPv4 before IPv6 for one target.
//! * `sips:` (RFC 3261 §26.2.2) restricts everything to TLS. A TLS candidate carries the name
//!   the server certificate must match: the host of the URI, never the SRV target (RFC 5922 §4).
//!
//! An empty answer (NXDOMAIN, or NODATA: the name exists without records of that type) moves on
//! to the next step; so does a failure (timeout, SERVFAIL), remembered: when nothing is found
//! at all, a failure of the final address lookups gives [`ResolveError::Failed`], empty answers
//! give [`ResolveError::NotFound`].
//!
//! Bounds: one `locate` issues at most [`MAX_QUERIES`] lookups (cache hits included), returns
//! at most [`MAX_CANDIDATES`] candidates, and ends within [`Resolver::deadline`], so a hostile
//! zone cannot make it loop or grow without limit.
//!
//! Also owns `[dns]` ([`DnsConfig`], read by `crate::config`) and the lookup counters
//! ([`metrics`]).

pub mod metrics;
mod select;

pub use moonroute_proto::dns::target;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::config::{
    NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts, ServerOrderingStrategy,
};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use serde::{Deserialize, Serialize};

use self::metrics::{DnsMetrics, DnsType};
use crate::transport::TransportKind;
use select::{Candidates, Plan, XorShift};
use target::numeric_among;
pub use target::{numeric, Candidate, Query, ResolveError};

/// Most candidates one [`Resolver::locate`] returns.
pub const MAX_CANDIDATES: usize = 16;
/// Most DNS lookups (A and AAAA counted apart, cache hits included) one [`Resolver::locate`]
/// issues.
pub const MAX_QUERIES: usize = 20;

/// DNS resolution of next hops (RFC 3263), by [`crate::dns::Resolver`].
///
/// With `nameservers` set, names are absolute (no `search`/`ndots` of resolv.conf) and
/// `/etc/hosts` is not read; each query is tried twice (UDP, TCP when an answer is truncated).
/// One resolution of a next hop ends within 7 × `timeout_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers to ask, as `IP:PORT`. Empty: those of `/etc/resolv.conf`. Default: empty.
    pub nameservers: Vec<SocketAddr>,
    /// How long to wait for one answer, in milliseconds. Default: 2000.
    pub timeout_ms: u64,
    /// Most answers kept in the cache (entries live for their TTL). Default: 4096.
    pub cache_size: usize,
    /// Longest a negative answer (no such name or record) is cached, in seconds: the SOA's
    /// negative TTL (RFC 2308) capped at this; 0 disables negative caching. Default: 30.
    pub negative_ttl_secs: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout_ms: 2000,
            cache_size: 4096,
            negative_ttl_secs: 30,
        }
    }
}

/// RFC 3263 resolver: hickory's resolver and cache, plus the NAPTR/SRV/A logic.
///
/// Cheap to clone (an `Arc` inside). Its connections and background tasks belong to the tokio
/// runtime it is first used on: give each runtime (each event loop) its own `Resolver`.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    dns: TokioResolver,
    /// Names are absolute (configured name servers): no `search`/`ndots` expansion.
    absolute: bool,
    rng: Mutex<XorShift>,
    deadline: Duration,
    /// Lookups and failures by record type (`moonroute_dns_*`).
    metrics: DnsMetrics,
}

impl Resolver {
    /// Built from `[dns]`; must work when created and used inside a current_thread tokio runtime
    /// (each event loop creates its own).
    ///
    /// * `nameservers` empty: the system configuration (`/etc/resolv.conf`, with its `search`,
    ///   `ndots` and attempts, and `/etc/hosts`); an error if it cannot be read. Otherwise
    ///   exactly those servers, over UDP with TCP for truncated answers, 2 tries per query, names
    ///   taken as absolute (no `search`/`ndots`), no `/etc/hosts`.
    /// * `timeout_ms`: how long one query waits for an answer.
    /// * Cache: hickory's, of `cache_size` answers, positive answers kept for their TTL,
    ///   negative ones (NXDOMAIN/NODATA) for the SOA negative TTL (RFC 2308) capped at
    ///   `negative_ttl_secs` (`negative_max_ttl`). A negative answer without SOA is not cached.
    pub fn from_config(config: &DnsConfig) -> Result<Resolver, ResolveError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(|e| {
                ResolveError::Failed(format!(
                    "cannot read the system DNS configuration (/etc/resolv.conf): {e}; \
                     set [dns] nameservers"
                ))
            })?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            let mut builder = TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                provider,
            );
            let options = builder.options_mut();
            // hickory's `attempts` counts retries after the first try: 2 tries in all.
            options.attempts = 1;
            options.use_hosts_file = ResolveHosts::Never;
            options.server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
            builder
        };
        let options: &mut ResolverOpts = builder.options_mut();
        options.timeout = Duration::from_millis(config.timeout_ms.max(1));
        options.cache_size = config.cache_size as u64;
        options.negative_max_ttl = Some(Duration::from_secs(config.negative_ttl_secs));
        // Keep CNAMEs out of answers; we read only A/AAAA/SRV/NAPTR records anyway.
        options.preserve_intermediates = false;
        let tries = u32::try_from(options.attempts)
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        let timeout = options.timeout;
        let dns = builder
            .build()
            .map_err(|e| ResolveError::Failed(format!("cannot build the DNS resolver: {e}")))?;
        Ok(Resolver {
            inner: Arc::new(Inner {
                dns,
                absolute: !config.nameservers.is_empty(),
                rng: Mutex::new(XorShift::new(random_seed())),
                // Three rounds (NAPTR; SRVs in parallel; addresses in parallel) of up to
                // `tries` timeouts each, plus one timeout of slack.
                deadline: timeout.saturating_mul(tries.saturating_mul(3).saturating_add(1)),
                metrics: DnsMetrics::default(),
            }),
        })
    }

    /// The same resolver with its SRV weighted choice seeded with `seed` (for reproducible
    /// orders in tests). Call before cloning: clones share the generator.
    pub fn with_srv_seed(self, seed: u64) -> Resolver {
        *self.inner.rng.lock().unwrap_or_else(|e| e.into_inner()) = XorShift::new(seed);
        self
    }

    /// The same resolver counting its lookups into `metrics`. Call before cloning (clones
    /// made earlier keep counting into the previous handles).
    pub fn with_metrics(mut self, metrics: DnsMetrics) -> Resolver {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.metrics = metrics,
            None => tracing::debug!("DNS metrics set on a shared resolver: ignored"),
        }
        self
    }

    /// The longest one [`Resolver::locate`] takes: (3 × tries + 1) × timeout, i.e. 7 × timeout
    /// with configured name servers (2 tries per query). Past it, lookups still under way are
    /// abandoned as failed.
    pub fn deadline(&self) -> Duration {
        self.inner.deadline
    }

    /// RFC 3263 §4: the ordered candidate list. `supported` = transports this server can send on
    /// (has listeners for); others are skipped.
    pub async fn locate(
        &self,
        query: &Query,
        supported: &[TransportKind],
    ) -> Result<Vec<Candidate>, ResolveError> {
        if let Some(result) = numeric_among(query, supported) {
            return result;
        }
        let plan = select::plan(query, supported)?;
        let host = self
            .name(&query.host)
            .ok_or_else(|| ResolveError::InvalidHost {
                host: query.host.clone(),
            })?;
        let walk = Walk {
            inner: &self.inner,
            queries_left: AtomicUsize::new(MAX_QUERIES),
            deadline: tokio::time::Instant::now() + self.inner.deadline,
            state: Mutex::new(WalkState {
                out: Candidates::new(MAX_CANDIDATES),
                failure: None,
                address_failed: false,
            }),
            tls_name: Arc::from(query.host.trim_end_matches('.')),
        };
        match plan {
            Plan::Address { kind, port } => walk.host_addresses(&host, kind, port).await,
            Plan::Srv { kind } => {
                if !walk.srv_step(&[(kind, self.srv_name(kind, &host)?)]).await {
                    walk.host_addresses(&host, kind, select::default_port(kind))
                        .await;
                }
            }
            Plan::Discover {
                transports,
                fallback,
            } => {
                walk.naptr_step(&host, &transports).await;
                if walk.is_empty() {
                    let names = transports
                        .iter()
                        .map(|&k| Ok((k, self.srv_name(k, &host)?)))
                        .collect::<Result<Vec<_>, ResolveError>>()?;
                    if !walk.srv_step(&names).await {
                        walk.host_addresses(&host, fallback, select::default_port(fallback))
                            .await;
                    }
                }
            }
        }
        walk.finish(&query.host)
    }

    /// The DNS name of a host: absolute when the name servers are configured.
    fn name(&self, host: &str) -> Option<Name> {
        let mut name = Name::from_ascii(host).ok()?;
        if name.is_root() || name.num_labels() == 0 {
            return None;
        }
        if self.inner.absolute {
            name.set_fqdn(true);
        }
        Some(name)
    }

    /// `_sip._udp.<host>` and the like.
    fn srv_name(&self, kind: TransportKind, host: &Name) -> Result<Name, ResolveError> {
        Name::from_ascii(select::srv_prefix(kind))
            .and_then(|prefix| prefix.append_name(host))
            .map_err(|_| ResolveError::InvalidHost {
                host: host.to_string(),
            })
    }
}

/// A seed for the SRV choice: std's per-process random hash keys, plus the clock.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    hasher.finish()
}

/// The metrics label of the record types RFC 3263 resolution looks up.
fn dns_type(rtype: RecordType) -> Option<DnsType> {
    match rtype {
        RecordType::NAPTR => Some(DnsType::Naptr),
        RecordType::SRV => Some(DnsType::Srv),
        RecordType::A => Some(DnsType::A),
        RecordType::AAAA => Some(DnsType::Aaaa),
        _ => None,
    }
}

/// The outcome of one lookup.
enum Answer {
    Records(Lookup),
    /// NXDOMAIN or NODATA (hickory: "no records found").
    Empty,
    /// Timeout, server failure, budget spent.
    Failed,
}

/// One `locate` in progress. Shared (`&self`) by lookups run in parallel.
struct Walk<'a> {
    inner: &'a Inner,
    queries_left: AtomicUsize,
    deadline: tokio::time::Instant,
    state: Mutex<WalkState>,
    tls_name: Arc<str>,
}

struct WalkState {
    out: Candidates,
    /// The last failure, for [`ResolveError::Failed`].
    failure: Option<String>,
    /// An address lookup (the final step) failed (timeout, server failure, budget spent) rather
    /// than came back empty.
    address_failed: bool,
}

impl Walk<'_> {
    fn state(&self) -> std::sync::MutexGuard<'_, WalkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_empty(&self) -> bool {
        self.state().out.is_empty()
    }

    fn is_full(&self) -> bool {
        self.state().out.is_full()
    }

    fn fail(&self, reason: String) -> Answer {
        self.state().failure = Some(reason);
        Answer::Failed
    }

    async fn query(&self, name: &Name, rtype: RecordType) -> Answer {
        let spent = self
            .queries_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err();
        if spent {
            return self.fail(format!("more than {MAX_QUERIES} lookups needed"));
        }
        let counted = dns_type(rtype);
        if let Some(counted) = counted {
            self.inner.metrics.lookup(counted);
        }
        let lookup = self.inner.dns.lookup(name.clone(), rtype);
        let answer = match tokio::time::timeout_at(self.deadline, lookup).await {
            Ok(Ok(lookup)) => Answer::Records(lookup),
            Ok(Err(e)) if e.is_no_records_found() => Answer::Empty,
            Ok(Err(e)) => self.fail(format!("{name} {rtype}: {}", describe(&e))),
            Err(_) => self.fail(format!("{name} {rtype}: resolution took too long")),
        };
        if let (Answer::Failed, Some(counted)) = (&answer, counted) {
            self.inner.metrics.failure(counted);
        }
        answer
    }

    /// NAPTR of the host (§4.1), then the SRV records each usable one names.
    async fn naptr_step(&self, host: &Name, transports: &[TransportKind]) {
        let Answer::Records(lookup) = self.query(host, RecordType::NAPTR).await else {
            return;
        };
        let naptrs: Vec<_> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::NAPTR(naptr) => Some(naptr.clone()),
                _ => None,
            })
            .collect();
        let entries = select::order_naptr(&naptrs, transports);
        for (kind, name) in entries {
            if self.is_full() || self.queries_left.load(Ordering::Relaxed) == 0 {
                break;
            }
            if let Answer::Records(lookup) = self.query(&name, RecordType::SRV).await {
                self.srv_targets(kind, &lookup).await;
            }
        }
    }

    /// SRV lookups (in parallel) for `names`, then their targets in order. Whether any SRV
    /// record was found (then no A/AAAA fallback of the host, §4.2).
    async fn srv_step(&self, names: &[(TransportKind, Name)]) -> bool {
        let one = |i: usize| async move {
            match names.get(i) {
                Some((kind, name)) => Some((*kind, self.query(name, RecordType::SRV).await)),
                None => None,
            }
        };
        debug_assert!(names.len() <= 3);
        let (a, b, c) = tokio::join!(one(0), one(1), one(2));
        let mut found = false;
        for (kind, answer) in [a, b, c].into_iter().flatten() {
            if let Answer::Records(lookup) = answer {
                found |= self.srv_targets(kind, &lookup).await;
            }
        }
        found
    }

    /// The candidates of one SRV answer, in RFC 2782 order. Whether it held SRV records.
    async fn srv_targets(&self, kind: TransportKind, lookup: &Lookup) -> bool {
        let records: Vec<_> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some(srv.clone()),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return false;
        }
        let ordered = {
            let mut rng = self.inner.rng.lock().unwrap_or_else(|e| e.into_inner());
            select::order_srv(&records, &mut *rng)
        };
        for srv in ordered.into_iter().take(MAX_CANDIDATES) {
            if self.is_full() {
                break;
            }
            let glue = additional_addresses(lookup, &srv.target);
            let ips = if glue.is_empty() {
                self.addresses(&srv.target).await
            } else {
                glue
            };
            self.push(kind, &ips, srv.port);
        }
        true
    }

    /// A/AAAA of the host itself.
    async fn host_addresses(&self, host: &Name, kind: TransportKind, port: u16) {
        let ips = self.addresses(host).await;
        self.push(kind, &ips, port);
    }

    /// A and AAAA of `name` (in parallel), IPv4 first.
    async fn addresses(&self, name: &Name) -> Vec<IpAddr> {
        let (v4, v6) = tokio::join!(
            self.query(name, RecordType::A),
            self.query(name, RecordType::AAAA)
        );
        let failed = matches!(v4, Answer::Failed) || matches!(v6, Answer::Failed);
        let mut ips = Vec::new();
        for answer in [v4, v6] {
            if let Answer::Records(lookup) = answer {
                ips.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                    _ => None,
                }));
            }
        }
        if ips.is_empty() && failed {
            self.state().address_failed = true;
        }
        ips
    }

    fn push(&self, kind: TransportKind, ips: &[IpAddr], port: u16) {
        let tls_name = (kind == TransportKind::Tls).then(|| self.tls_name.clone());
        let mut state = self.state();
        for ip in ips {
            state.out.push(Candidate {
                kind,
                addr: SocketAddr::new(*ip, port),
                tls_name: tls_name.clone(),
            });
        }
    }

    fn finish(self, host: &str) -> Result<Vec<Candidate>, ResolveError> {
        let state = self.state.into_inner().unwrap_or_else(|e| e.into_inner());
        if !state.out.is_empty() {
            return Ok(state.out.into_vec());
        }
        // The final step (addresses) decides: failed (also when the lookup or time budget ran
        // out before it) or empty.
        if state.address_failed {
            let reason = state.failure.unwrap_or_else(|| "no answer".to_owned());
            return Err(ResolveError::Failed(reason));
        }
        Err(ResolveError::NotFound {
            host: host.to_owned(),
        })
    }
}

/// Addresses of `target` in an SRV answer's additional section (RFC 2782: servers may add them).
fn additional_addresses(lookup: &Lookup, target: &Name) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for want_v6 in [false, true] {
        ips.extend(
            lookup
                .additionals()
                .iter()
                .filter(|r| &r.name == target)
                .filter_map(|r| match &r.data {
                    RData::A(a) if !want_v6 => Some(IpAddr::V4(a.0)),
                    RData::AAAA(aaaa) if want_v6 => Some(IpAddr::V6(aaaa.0)),
                    _ => None,
                }),
        );
    }
    ips
}

/// A short description of a hickory error.
fn describe(e: &NetError) -> String {
    match e {
        NetError::Timeout => "timed out".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TransportKind::{Tcp, Tls, Udp};

    fn q(host: &str, port: Option<u16>, transport: Option<TransportKind>, secure: bool) -> Query {
        Query {
            host: host.to_owned(),
            port,
            transport,
            secure,
        }
    }

    fn cand(kind: TransportKind, addr: &str, tls_name: Option<&str>) -> Candidate {
        Candidate {
            kind,
            addr: addr.parse().unwrap(),
            tls_name: tls_name.map(Arc::from),
        }
    }

    #[test]
    fn numeric_literals() {
        assert_eq!(
            numeric(&q("192.0.2.1", None, None, false)),
            Some(Ok(vec![cand(Udp, "192.0.2.1:5060", None)]))
        );
        assert_eq!(
            numeric(&q("192.0.2.1", None, None, true)),
            Some(Ok(vec![cand(Tls, "192.0.2.1:5061", Some("192.0.2.1"))]))
        );
        assert_eq!(
            numeric(&q("2001:db8::1", Some(5070), Some(Tcp), false)),
            Some(Ok(vec![cand(Tcp, "[2001:db8::1]:5070", None)]))
        );
        assert_eq!(
            numeric(&q("[2001:db8::1]", None, Some(Tls), false)),
            Some(Ok(vec![cand(
                Tls,
                "[2001:db8::1]:5061",
                Some("2001:db8::1")
            )]))
        );
        assert_eq!(
            numeric(&q("LocalHost", Some(5080), None, false)),
            Some(Ok(vec![
                cand(Udp, "127.0.0.1:5080", None),
                cand(Udp, "[::1]:5080", None)
            ]))
        );
        // RFC 5118 §4.9: an IPv4-mapped address is the IPv4 address.
        assert_eq!(
            numeric(&q("[::ffff:192.0.2.1]", None, None, false)),
            Some(Ok(vec![cand(Udp, "192.0.2.1:5060", None)]))
        );
        assert_eq!(numeric(&q("example.test", None, None, false)), None);
        assert_eq!(
            numeric(&q("192.0.2.1.example.test", None, None, false)),
            None
        );
    }

    #[test]
    fn numeric_sips_rules() {
        assert_eq!(
            numeric(&q("192.0.2.1", None, Some(Udp), true)),
            Some(Err(ResolveError::NoUsableTransport))
        );
        assert_eq!(
            numeric(&q("192.0.2.1", None, Some(Tcp), true)),
            Some(Ok(vec![cand(Tls, "192.0.2.1:5061", Some("192.0.2.1"))]))
        );
    }

    #[test]
    fn numeric_among_supported() {
        assert_eq!(
            numeric_among(&q("192.0.2.1", None, None, false), &[Tcp]),
            Some(Ok(vec![cand(Tcp, "192.0.2.1:5060", None)]))
        );
        assert_eq!(
            numeric_among(&q("192.0.2.1", None, Some(Udp), false), &[Tcp]),
            Some(Err(ResolveError::NoUsableTransport))
        );
        assert_eq!(
            numeric_among(&q("192.0.2.1", None, None, true), &[Udp, Tcp]),
            Some(Err(ResolveError::NoUsableTransport))
        );
    }

    #[test]
    fn system_configuration_builds_or_says_why() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            match Resolver::from_config(&DnsConfig::default()) {
                Ok(r) => assert!(r.deadline() > Duration::ZERO),
                Err(ResolveError::Failed(why)) => assert!(why.contains("resolv.conf"), "{why}"),
                Err(other) => panic!("{other:?}"),
            }
        });
    }

    #[test]
    fn errors_display() {
        assert_eq!(
            ResolveError::NotFound {
                host: "example.test".into()
            }
            .to_string(),
            "no address found for example.test"
        );
        assert!(ResolveError::Failed("x".into()).to_string().contains('x'));
    }
}
