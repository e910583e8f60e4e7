//! The parts of RFC 3263 that need no DNS: which transport and lookups a query calls for
//! (§4.1, §4.2), which NAPTR records are usable and in what order (§4.1, RFC 3403), and the
//! RFC 2782 ordering of SRV records. Pure functions, tested without sockets.

use hickory_resolver::proto::rr::rdata::{NAPTR, SRV};
use hickory_resolver::proto::rr::Name;

pub(crate) use super::target::{default_kind, default_port, given_transport};
use super::{Candidate, Query, ResolveError};
use crate::transport::TransportKind;

/// Every transport, in the order tried for a `sip:` URI when DNS does not decide (§4.1 leaves
/// the client's preference open): UDP first, as it is the default of a `sip:` URI (§4.1,
/// RFC 3261 §18), then TCP, then TLS.
pub(crate) const ALL: [TransportKind; 3] =
    [TransportKind::Udp, TransportKind::Tcp, TransportKind::Tls];

/// What RFC 3263 says to look up for a host that is not an IP literal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// A port is given: no NAPTR nor SRV, A/AAAA of the host with that port (§4.2), over the
    /// given transport or, without one, UDP for `sip:` / TLS for `sips:` (§4.1).
    Address { kind: TransportKind, port: u16 },
    /// A transport is given without a port: SRV for that transport, else A/AAAA with its
    /// default port (§4.1, §4.2).
    Srv { kind: TransportKind },
    /// Neither: NAPTR (among `transports`), else SRV for each of `transports` in this order,
    /// else A/AAAA with `fallback` and its default port (§4.1, §4.2).
    Discover {
        transports: Vec<TransportKind>,
        fallback: TransportKind,
    },
}

/// The plan for `query` given the transports this server can send on.
pub(crate) fn plan(query: &Query, supported: &[TransportKind]) -> Result<Plan, ResolveError> {
    let given = given_transport(query)?;
    if let Some(kind) = given {
        if !supported.contains(&kind) {
            return Err(ResolveError::NoUsableTransport);
        }
    }
    match (query.port, given) {
        (Some(port), Some(kind)) => Ok(Plan::Address { kind, port }),
        (Some(port), None) => default_kind(query.secure, supported)
            .map(|kind| Plan::Address { kind, port })
            .ok_or(ResolveError::NoUsableTransport),
        (None, Some(kind)) => Ok(Plan::Srv { kind }),
        (None, None) => {
            let transports: Vec<TransportKind> = ALL
                .into_iter()
                .filter(|k| supported.contains(k) && (!query.secure || *k == TransportKind::Tls))
                .collect();
            let fallback = default_kind(query.secure, supported)
                .or_else(|| transports.first().copied())
                .ok_or(ResolveError::NoUsableTransport)?;
            Ok(Plan::Discover {
                transports,
                fallback,
            })
        }
    }
}

/// The SRV service label of a transport (§4.1, RFC 2782): `_sip._udp`, `_sip._tcp`, and
/// `_sips._tcp` for TLS (also for a `sip:` URI reached over TLS, §4.1).
pub(crate) fn srv_prefix(kind: TransportKind) -> &'static str {
    match kind {
        TransportKind::Udp => "_sip._udp",
        TransportKind::Tcp => "_sip._tcp",
        TransportKind::Tls => "_sips._tcp",
        // Never looked up: a WebSocket peer is reached only on the connection it opened
        // (RFC 7118 §5), so resolution never offers these transports.
        TransportKind::Ws => "_sip._ws",
        TransportKind::Wss => "_sips._ws",
    }
}

/// The transport of a NAPTR service field (§4.1; RFC 3403: compared without case), if it is one
/// this module knows: `SIP+D2U`, `SIP+D2T`, `SIPS+D2T`. SCTP (`D2S`) and others are skipped.
fn naptr_service(service: &[u8]) -> Option<TransportKind> {
    [
        (&b"SIP+D2U"[..], TransportKind::Udp),
        (&b"SIP+D2T"[..], TransportKind::Tcp),
        (&b"SIPS+D2T"[..], TransportKind::Tls),
    ]
    .into_iter()
    .find(|(name, _)| name.eq_ignore_ascii_case(service))
    .map(|(_, kind)| kind)
}

/// The usable NAPTR records of a §4.1 lookup, as (transport, SRV name) in the order to try.
///
/// Kept: flags `s` (the replacement is an SRV name; RFC 3403 §4.1), an empty regexp (the
/// replacement and regexp fields are exclusive; §4.1 uses only the replacement), a
/// non-root replacement, a known service whose transport is in `transports` (for a `sips:` URI
/// that is TLS only; a `sip:` URI keeps `SIPS+D2T` too, as §4.1 says a client supporting TLS
/// SHOULD). Ordered by order, then preference (RFC 3403 §4.1), ties in answer order; duplicates
/// dropped.
pub(crate) fn order_naptr(
    records: &[NAPTR],
    transports: &[TransportKind],
) -> Vec<(TransportKind, Name)> {
    let mut usable: Vec<(u16, u16, TransportKind, &Name)> = records
        .iter()
        .filter(|r| r.flags.eq_ignore_ascii_case(b"s") && r.regexp.is_empty())
        .filter(|r| !r.replacement.is_root())
        .filter_map(|r| {
            let kind = naptr_service(&r.services)?;
            transports
                .contains(&kind)
                .then_some((r.order, r.preference, kind, &r.replacement))
        })
        .collect();
    usable.sort_by_key(|&(order, preference, _, _)| (order, preference));
    let mut out: Vec<(TransportKind, Name)> = Vec::with_capacity(usable.len());
    for (_, _, kind, name) in usable {
        if !out.iter().any(|(k, n)| *k == kind && n == name) {
            out.push((kind, name.clone()));
        }
    }
    out
}

/// A source of random numbers for the RFC 2782 weighted choice; injectable so tests are
/// deterministic.
pub(crate) trait Rng {
    /// A number drawn uniformly from `0..=max`.
    fn up_to(&mut self, max: u32) -> u32;
}

/// xorshift64*: small, fast, good enough to spread load over SRV targets (not for secrets).
#[derive(Clone, Debug)]
pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> XorShift {
        // The state must never be zero.
        XorShift(seed | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl Rng for XorShift {
    fn up_to(&mut self, max: u32) -> u32 {
        // Multiply-shift onto 0..=max: bias at most 2^-32, irrelevant here.
        // (< 2^32) * (<= 2^32) fits in u64.
        (((self.next_u64() >> 32) * (u64::from(max) + 1)) >> 32) as u32
    }
}

/// SRV records in the order to try (RFC 2782, "Usage rules"): ascending priority; within one
/// priority, repeatedly a weighted random choice among those left. Records of weight 0 are put
/// first and get chosen only when the draw is 0, so they have a small chance when others have
/// weight, and equal chances (answer order) when all have weight 0. Targets of `.` ("service
/// decidedly not available") are dropped.
pub(crate) fn order_srv(records: &[SRV], rng: &mut impl Rng) -> Vec<SRV> {
    let mut left: Vec<&SRV> = records.iter().filter(|r| !r.target.is_root()).collect();
    // Stable: within a priority, weight 0 first, otherwise answer order.
    left.sort_by_key(|r| (r.priority, r.weight != 0));
    let mut out = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let priority = left[0].priority;
        let group = left.iter().take_while(|r| r.priority == priority).count();
        let total: u32 = left[..group].iter().map(|r| u32::from(r.weight)).sum();
        let draw = rng.up_to(total);
        let mut sum = 0u32;
        let mut pick = group - 1;
        for (i, r) in left[..group].iter().enumerate() {
            sum += u32::from(r.weight);
            if sum >= draw {
                pick = i;
                break;
            }
        }
        out.push(left.remove(pick).clone());
    }
    out
}

/// The growing candidate list: no duplicate (transport, address), at most `cap` entries.
#[derive(Debug)]
pub(crate) struct Candidates {
    list: Vec<Candidate>,
    cap: usize,
}

impl Candidates {
    pub(crate) fn new(cap: usize) -> Candidates {
        Candidates {
            list: Vec::new(),
            cap,
        }
    }

    /// Adds `candidate` unless it is already there or the list is full.
    pub(crate) fn push(&mut self, candidate: Candidate) {
        if self.is_full()
            || self
                .list
                .iter()
                .any(|c| c.kind == candidate.kind && c.addr == candidate.addr)
        {
            return;
        }
        self.list.push(candidate);
    }

    pub(crate) fn is_full(&self) -> bool {
        self.list.len() >= self.cap
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(crate) fn into_vec(self) -> Vec<Candidate> {
        self.list
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

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

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn naptr(order: u16, pref: u16, flags: &str, service: &str, regexp: &str, repl: &str) -> NAPTR {
        NAPTR::new(
            order,
            pref,
            flags.as_bytes().into(),
            service.as_bytes().into(),
            regexp.as_bytes().into(),
            name(repl),
        )
    }

    fn srv(priority: u16, weight: u16, port: u16, target: &str) -> SRV {
        SRV::new(priority, weight, port, name(target))
    }

    /// Replays fixed draws (each taken modulo max + 1).
    struct Fixed(Vec<u32>, usize);

    impl Rng for Fixed {
        fn up_to(&mut self, max: u32) -> u32 {
            let v = self.0[self.1 % self.0.len()] % (max + 1);
            self.1 += 1;
            v
        }
    }

    #[test]
    fn transport_selection_table() {
        let all = &ALL[..];
        let h = "example.test";
        // RFC 3263 §4.2: a port skips SRV; §4.1: UDP for sip, TLS for sips.
        assert_eq!(
            plan(&q(h, Some(5070), None, false), all),
            Ok(Plan::Address {
                kind: Udp,
                port: 5070
            })
        );
        assert_eq!(
            plan(&q(h, Some(5070), None, true), all),
            Ok(Plan::Address {
                kind: Tls,
                port: 5070
            })
        );
        assert_eq!(
            plan(&q(h, Some(5070), Some(Tcp), false), all),
            Ok(Plan::Address {
                kind: Tcp,
                port: 5070
            })
        );
        // Transport, no port: SRV for it.
        assert_eq!(
            plan(&q(h, None, Some(Tcp), false), all),
            Ok(Plan::Srv { kind: Tcp })
        );
        assert_eq!(
            plan(&q(h, None, Some(Tls), false), all),
            Ok(Plan::Srv { kind: Tls })
        );
        // Neither: discovery, UDP, TCP, TLS for sip; TLS only for sips.
        assert_eq!(
            plan(&q(h, None, None, false), all),
            Ok(Plan::Discover {
                transports: vec![Udp, Tcp, Tls],
                fallback: Udp
            })
        );
        assert_eq!(
            plan(&q(h, None, None, true), all),
            Ok(Plan::Discover {
                transports: vec![Tls],
                fallback: Tls
            })
        );
        // Only what the server supports.
        assert_eq!(
            plan(&q(h, None, None, false), &[Tcp, Udp]),
            Ok(Plan::Discover {
                transports: vec![Udp, Tcp],
                fallback: Udp
            })
        );
        assert_eq!(
            plan(&q(h, None, None, false), &[Tcp]),
            Ok(Plan::Discover {
                transports: vec![Tcp],
                fallback: Tcp
            })
        );
        assert_eq!(
            plan(&q(h, None, None, false), &[Tls]),
            Ok(Plan::Discover {
                transports: vec![Tls],
                fallback: Tls
            })
        );
        assert_eq!(
            plan(&q(h, Some(5060), None, false), &[Tcp]),
            Ok(Plan::Address {
                kind: Tcp,
                port: 5060
            })
        );
        assert_eq!(
            plan(&q(h, None, Some(Tcp), false), &[Udp]),
            Err(ResolveError::NoUsableTransport)
        );
        assert_eq!(
            plan(&q(h, None, None, false), &[]),
            Err(ResolveError::NoUsableTransport)
        );
        assert_eq!(
            plan(&q(h, Some(5060), None, false), &[Tls]),
            Err(ResolveError::NoUsableTransport)
        );
    }

    #[test]
    fn sips_is_tls_only() {
        let all = &ALL[..];
        let h = "example.test";
        assert_eq!(
            plan(&q(h, None, Some(Udp), true), all),
            Err(ResolveError::NoUsableTransport)
        );
        assert_eq!(
            plan(&q(h, None, Some(Tcp), true), all),
            Ok(Plan::Srv { kind: Tls })
        );
        assert_eq!(
            plan(&q(h, Some(5071), Some(Tcp), true), all),
            Ok(Plan::Address {
                kind: Tls,
                port: 5071
            })
        );
        assert_eq!(
            plan(&q(h, None, None, true), &[Udp, Tcp]),
            Err(ResolveError::NoUsableTransport)
        );
        assert_eq!(
            plan(&q(h, Some(5061), None, true), &[Udp, Tcp]),
            Err(ResolveError::NoUsableTransport)
        );
    }

    #[test]
    fn naptr_filtering_and_order() {
        let records = vec![
            naptr(20, 10, "s", "SIP+D2U", "", "_sip._udp.example.test."),
            naptr(10, 20, "S", "sip+d2t", "", "_sip._tcp.example.test."),
            naptr(10, 10, "s", "SIPS+D2T", "", "_sips._tcp.example.test."),
            // Unknown service, SCTP, wrong flags, regexp, root replacement: skipped.
            naptr(1, 1, "s", "SIP+D2S", "", "_sip._sctp.example.test."),
            naptr(1, 1, "s", "E2U+sip", "", "_x.example.test."),
            naptr(1, 1, "a", "SIP+D2U", "", "a.example.test."),
            naptr(1, 1, "", "SIP+D2U", "", "b.example.test."),
            naptr(1, 1, "s", "SIP+D2U", "!^.*$!sip:x@y!", "c.example.test."),
            naptr(1, 1, "s", "SIP+D2U", "", "."),
            // Duplicate of the first.
            naptr(30, 10, "s", "SIP+D2U", "", "_sip._udp.example.test."),
        ];
        assert_eq!(
            order_naptr(&records, &ALL),
            vec![
                (Tls, name("_sips._tcp.example.test.")),
                (Tcp, name("_sip._tcp.example.test.")),
                (Udp, name("_sip._udp.example.test.")),
            ]
        );
        // A sips URI keeps only SIPS+D2T; unsupported transports are skipped.
        assert_eq!(
            order_naptr(&records, &[Tls]),
            vec![(Tls, name("_sips._tcp.example.test."))]
        );
        assert_eq!(
            order_naptr(&records, &[Udp]),
            vec![(Udp, name("_sip._udp.example.test."))]
        );
        assert!(order_naptr(&records[3..9], &ALL).is_empty());
        assert!(order_naptr(&[], &ALL).is_empty());
    }

    #[test]
    fn srv_priority_order() {
        let records = vec![
            srv(20, 0, 5, "e.test."),
            srv(10, 0, 1, "a.test."),
            srv(30, 5, 6, "f.test."),
            srv(10, 0, 2, "b.test."),
        ];
        let ordered = order_srv(&records, &mut Fixed(vec![0], 0));
        let ports: Vec<u16> = ordered.iter().map(|r| r.port).collect();
        assert_eq!(ports, vec![1, 2, 5, 6]);
    }

    #[test]
    fn srv_root_target_is_dropped() {
        let records = vec![srv(0, 0, 0, "."), srv(1, 0, 5060, "a.test.")];
        let ordered = order_srv(&records, &mut XorShift::new(7));
        assert_eq!(ordered, vec![srv(1, 0, 5060, "a.test.")]);
        assert!(order_srv(&[srv(0, 0, 0, ".")], &mut XorShift::new(7)).is_empty());
    }

    #[test]
    fn srv_weighted_choice_follows_rfc2782() {
        // Weight 0 first in the running sums: chosen only on a draw of 0.
        let records = vec![
            srv(10, 60, 1, "a.test."),
            srv(10, 0, 2, "z.test."),
            srv(10, 40, 3, "b.test."),
        ];
        let first = |draw| order_srv(&records, &mut Fixed(vec![draw, 0, 0], 0))[0].port;
        assert_eq!(first(0), 2); // sums: z=0, a=60, b=100
        assert_eq!(first(1), 1);
        assert_eq!(first(60), 1);
        assert_eq!(first(61), 3);
        assert_eq!(first(100), 3);
        // After a is taken, draws are over z=0, b=40.
        let ordered = order_srv(&records, &mut Fixed(vec![30, 0], 0));
        let ports: Vec<u16> = ordered.iter().map(|r| r.port).collect();
        assert_eq!(ports, vec![1, 2, 3]);
    }

    #[test]
    fn srv_weighted_distribution() {
        let records = vec![
            srv(10, 10, 1, "a.test."),
            srv(10, 30, 2, "b.test."),
            srv(10, 60, 3, "c.test."),
            srv(10, 0, 4, "z.test."),
            srv(20, 100, 9, "backup.test."),
        ];
        let mut rng = XorShift::new(0x5eed);
        let mut firsts = [0usize; 10];
        for _ in 0..1000 {
            let ordered = order_srv(&records, &mut rng);
            assert_eq!(ordered.len(), 5);
            // Priority 20 always last.
            assert_eq!(ordered[4].port, 9);
            firsts[usize::from(ordered[0].port)] += 1;
        }
        // Expected: 10/101, 30/101, 60/101, 1/101 of 1000; loose bounds.
        assert!((50..=150).contains(&firsts[1]), "{firsts:?}");
        assert!((230..=370).contains(&firsts[2]), "{firsts:?}");
        assert!((520..=680).contains(&firsts[3]), "{firsts:?}");
        assert!(firsts[4] <= 40, "{firsts:?}");
    }

    #[test]
    fn srv_all_weight_zero_keeps_answer_order() {
        let records = vec![srv(1, 0, 1, "a.test."), srv(1, 0, 2, "b.test.")];
        let ordered = order_srv(&records, &mut XorShift::new(99));
        let ports: Vec<u16> = ordered.iter().map(|r| r.port).collect();
        assert_eq!(ports, vec![1, 2]);
    }

    #[test]
    fn xorshift_draws_stay_in_range() {
        let mut rng = XorShift::new(0);
        let mut seen = [false; 4];
        for _ in 0..200 {
            let v = rng.up_to(3);
            assert!(v <= 3);
            seen[v as usize] = true;
        }
        assert_eq!(seen, [true; 4]);
        assert_eq!(rng.up_to(0), 0);
        let big = (0..100).map(|_| rng.up_to(u32::MAX)).max().unwrap();
        assert!(big > u32::MAX / 2);
    }

    #[test]
    fn candidates_dedup_and_bound() {
        let addr = |p: u16| -> SocketAddr { SocketAddr::from(([192, 0, 2, 1], p)) };
        let c = |kind, p| Candidate {
            kind,
            addr: addr(p),
            tls_name: None,
        };
        let mut list = Candidates::new(3);
        list.push(c(Udp, 1));
        list.push(c(Udp, 1));
        list.push(c(Tcp, 1));
        assert!(!list.is_full());
        list.push(c(Udp, 2));
        assert!(list.is_full());
        list.push(c(Udp, 3));
        assert_eq!(list.into_vec(), vec![c(Udp, 1), c(Tcp, 1), c(Udp, 2)]);
    }

    #[test]
    fn srv_labels_and_ports() {
        assert_eq!(srv_prefix(Udp), "_sip._udp");
        assert_eq!(srv_prefix(Tcp), "_sip._tcp");
        assert_eq!(srv_prefix(Tls), "_sips._tcp");
        assert_eq!(default_port(Udp), 5060);
        assert_eq!(default_port(Tcp), 5060);
        assert_eq!(default_port(Tls), 5061);
    }
}
