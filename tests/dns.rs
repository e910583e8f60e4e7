//! RFC 3263 server location end to end: the real `moonroute::dns::Resolver` (hickory) against
//! the test DNS server of `common::dns_server` on 127.0.0.1. Names like `example.test` exist
//! only there; addresses in answers (192.0.2.x, 2001:db8::x) are never contacted.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dns_server::{DnsServer, Record, RecordType};
use moonroute::dns::{Candidate, Query, ResolveError, Resolver, MAX_CANDIDATES, MAX_QUERIES};
use moonroute::transport::TransportKind::{self, Tcp, Tls, Udp};

const ALL: &[TransportKind] = &[Udp, Tcp, Tls];
/// Bound on every locate of these tests (the DNS server is on loopback).
const WAIT: Duration = Duration::from_secs(10);

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, last)
}

fn v6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)
}

fn query(host: &str) -> Query {
    Query {
        host: host.to_owned(),
        port: None,
        transport: None,
        secure: false,
    }
}

fn cand(kind: TransportKind, addr: &str) -> Candidate {
    Candidate {
        kind,
        addr: addr.parse().unwrap(),
        tls_name: None,
    }
}

fn tls(addr: &str, name: &str) -> Candidate {
    Candidate {
        kind: Tls,
        addr: addr.parse().unwrap(),
        tls_name: Some(Arc::from(name)),
    }
}

fn resolver(dns: &DnsServer) -> Resolver {
    Resolver::from_config(&dns.config(500)).expect("resolver")
}

async fn locate(
    r: &Resolver,
    q: &Query,
    supported: &[TransportKind],
) -> Result<Vec<Candidate>, ResolveError> {
    tokio::time::timeout(WAIT, r.locate(q, supported))
        .await
        .expect("locate did not finish in time")
}

/// A zone with everything: NAPTR → SRV (TLS, TCP, UDP) → A/AAAA.
fn full_zone() -> Vec<Record> {
    vec![
        Record::naptr(
            "example.test",
            30,
            10,
            "s",
            "SIP+D2U",
            "",
            "_sip._udp.example.test",
            60,
        ),
        Record::naptr(
            "example.test",
            10,
            10,
            "s",
            "SIPS+D2T",
            "",
            "_sips._tcp.example.test",
            60,
        ),
        Record::naptr(
            "example.test",
            20,
            10,
            "s",
            "SIP+D2T",
            "",
            "_sip._tcp.example.test",
            60,
        ),
        Record::srv(
            "_sips._tcp.example.test",
            10,
            0,
            5061,
            "tls1.example.test",
            60,
        ),
        Record::srv(
            "_sip._tcp.example.test",
            20,
            0,
            5071,
            "pbx2.example.test",
            60,
        ),
        Record::srv(
            "_sip._tcp.example.test",
            10,
            0,
            5070,
            "pbx1.example.test",
            60,
        ),
        Record::srv(
            "_sip._udp.example.test",
            10,
            0,
            5080,
            "pbx1.example.test",
            60,
        ),
        Record::a("pbx1.example.test", v4(1), 60),
        Record::aaaa("pbx1.example.test", v6(1), 60),
        Record::a("pbx2.example.test", v4(2), 60),
        Record::a("tls1.example.test", v4(3), 60),
    ]
}

#[tokio::test]
async fn naptr_then_srv_then_addresses_in_order() {
    let dns = DnsServer::start(full_zone());
    let r = resolver(&dns);
    let found = locate(&r, &query("example.test"), ALL).await.unwrap();
    assert_eq!(
        found,
        vec![
            tls("192.0.2.3:5061", "example.test"),
            cand(Tcp, "192.0.2.1:5070"),
            cand(Tcp, "[2001:db8::1]:5070"),
            cand(Tcp, "192.0.2.2:5071"),
            cand(Udp, "192.0.2.1:5080"),
            cand(Udp, "[2001:db8::1]:5080"),
        ]
    );
    // The targets' addresses came in the SRV answers' additional sections.
    assert_eq!(
        dns.queries("pbx1.example.test", RecordType::A),
        0,
        "{:?}",
        dns.query_log()
    );
    // NAPTR was usable: no SRV guessing, no A/AAAA of the domain.
    assert_eq!(dns.queries("example.test", RecordType::A), 0);
}

#[tokio::test]
async fn naptr_skips_unsupported_transports() {
    let dns = DnsServer::start(full_zone());
    let r = resolver(&dns);
    let found = locate(&r, &query("example.test"), &[Udp]).await.unwrap();
    assert_eq!(
        found,
        vec![cand(Udp, "192.0.2.1:5080"), cand(Udp, "[2001:db8::1]:5080")]
    );
    assert_eq!(dns.queries("_sips._tcp.example.test", RecordType::SRV), 0);
    assert_eq!(dns.queries("_sip._tcp.example.test", RecordType::SRV), 0);
}

#[tokio::test]
async fn srv_without_naptr() {
    let dns = DnsServer::start(vec![
        Record::a("example.test", v4(9), 60),
        Record::srv(
            "_sip._tcp.example.test",
            10,
            0,
            5070,
            "pbx1.example.test",
            60,
        ),
        Record::srv(
            "_sip._udp.example.test",
            10,
            0,
            5080,
            "pbx2.example.test",
            60,
        ),
        Record::a("pbx1.example.test", v4(1), 60),
        Record::a("pbx2.example.test", v4(2), 60),
    ]);
    let r = resolver(&dns);
    let found = locate(&r, &query("example.test"), ALL).await.unwrap();
    // UDP, TCP, TLS order of the SRV step; no TLS SRV; the domain's own A is not used.
    assert_eq!(
        found,
        vec![cand(Udp, "192.0.2.2:5080"), cand(Tcp, "192.0.2.1:5070")]
    );
    // NAPTR was NODATA (the name exists), `_sips._tcp` NXDOMAIN: both fell through.
    assert_eq!(dns.queries("example.test", RecordType::NAPTR), 1);
    assert_eq!(dns.queries("_sips._tcp.example.test", RecordType::SRV), 1);
    assert_eq!(dns.queries("example.test", RecordType::A), 0);
}

#[tokio::test]
async fn addresses_only() {
    let dns = DnsServer::start(vec![
        Record::a("example.test", v4(1), 60),
        Record::a("example.test", v4(2), 60),
        Record::aaaa("example.test", v6(1), 60),
    ]);
    let r = resolver(&dns);
    let found = locate(&r, &query("example.test"), ALL).await.unwrap();
    assert_eq!(
        found,
        vec![
            cand(Udp, "192.0.2.1:5060"),
            cand(Udp, "192.0.2.2:5060"),
            cand(Udp, "[2001:db8::1]:5060"),
        ]
    );
    // A server without UDP uses TCP (RFC 3263 §4.1 allows it).
    let found = locate(&r, &query("example.test"), &[Tcp]).await.unwrap();
    assert_eq!(found[0], cand(Tcp, "192.0.2.1:5060"));
    // sips: TLS on 5061, the certificate name is the host.
    let secure = Query {
        secure: true,
        ..query("example.test")
    };
    let found = locate(&r, &secure, ALL).await.unwrap();
    assert_eq!(found[0], tls("192.0.2.1:5061", "example.test"));
    assert_eq!(found.len(), 3);
}

#[tokio::test]
async fn explicit_port_skips_naptr_and_srv() {
    let dns = DnsServer::start(full_zone());
    dns.set_records(
        full_zone()
            .into_iter()
            .chain([Record::a("example.test", v4(7), 60)])
            .collect(),
    );
    let r = resolver(&dns);
    let q = Query {
        port: Some(5090),
        ..query("example.test")
    };
    let found = locate(&r, &q, ALL).await.unwrap();
    assert_eq!(found, vec![cand(Udp, "192.0.2.7:5090")]);
    assert_eq!(dns.queries("example.test", RecordType::NAPTR), 0);
    assert_eq!(dns.queries("_sip._udp.example.test", RecordType::SRV), 0);
    // With a transport too.
    let q = Query {
        port: Some(5090),
        transport: Some(Tcp),
        ..query("example.test")
    };
    assert_eq!(
        locate(&r, &q, ALL).await.unwrap(),
        vec![cand(Tcp, "192.0.2.7:5090")]
    );
}

#[tokio::test]
async fn explicit_transport_uses_its_srv_only() {
    let mut zone = full_zone();
    zone.push(Record::a("example.test", v4(7), 60));
    let dns = DnsServer::start(zone);
    let r = resolver(&dns);
    let q = Query {
        transport: Some(Tcp),
        ..query("example.test")
    };
    let found = locate(&r, &q, ALL).await.unwrap();
    assert_eq!(
        found,
        vec![
            cand(Tcp, "192.0.2.1:5070"),
            cand(Tcp, "[2001:db8::1]:5070"),
            cand(Tcp, "192.0.2.2:5071"),
        ]
    );
    assert_eq!(dns.queries("example.test", RecordType::NAPTR), 0);
    assert_eq!(dns.queries("_sip._udp.example.test", RecordType::SRV), 0);

    // No SRV for it: A/AAAA of the host with the transport's default port.
    let other = DnsServer::start(vec![Record::a("example.test", v4(7), 60)]);
    let r = resolver(&other);
    let q = Query {
        transport: Some(Tls),
        ..query("example.test")
    };
    assert_eq!(
        locate(&r, &q, ALL).await.unwrap(),
        vec![tls("192.0.2.7:5061", "example.test")]
    );
    assert_eq!(other.queries("_sips._tcp.example.test", RecordType::SRV), 1);
    let q = Query {
        transport: Some(Tcp),
        ..query("example.test")
    };
    assert_eq!(
        locate(&r, &q, ALL).await.unwrap(),
        vec![cand(Tcp, "192.0.2.7:5060")]
    );
    // A transport the server lacks: refused without DNS.
    let before = other.total_queries();
    assert_eq!(
        locate(&r, &q, &[Udp]).await,
        Err(ResolveError::NoUsableTransport)
    );
    assert_eq!(other.total_queries(), before);
}

#[tokio::test]
async fn sips_gets_only_tls_named_after_the_domain() {
    let dns = DnsServer::start(vec![
        Record::naptr(
            "example.test",
            10,
            10,
            "s",
            "SIP+D2U",
            "",
            "_sip._udp.example.test",
            60,
        ),
        Record::naptr(
            "example.test",
            20,
            10,
            "s",
            "SIPS+D2T",
            "",
            "_sips._tcp.example.test",
            60,
        ),
        Record::srv(
            "_sip._udp.example.test",
            10,
            0,
            5060,
            "pbx.example.test",
            60,
        ),
        Record::srv(
            "_sips._tcp.example.test",
            10,
            0,
            5061,
            "sbc.provider.test",
            60,
        ),
        Record::a("pbx.example.test", v4(1), 60),
        Record::a("sbc.provider.test", v4(2), 60),
    ]);
    let r = resolver(&dns);
    let secure = Query {
        secure: true,
        ..query("example.test")
    };
    // RFC 5922 §4: the certificate must match example.test, not sbc.provider.test.
    assert_eq!(
        locate(&r, &secure, ALL).await.unwrap(),
        vec![tls("192.0.2.2:5061", "example.test")]
    );
    assert_eq!(dns.queries("_sip._udp.example.test", RecordType::SRV), 0);

    // transport=tcp on sips means TLS; transport=udp is refused, without DNS.
    let tcp = Query {
        transport: Some(Tcp),
        ..secure.clone()
    };
    assert_eq!(
        locate(&r, &tcp, ALL).await.unwrap(),
        vec![tls("192.0.2.2:5061", "example.test")]
    );
    let before = dns.total_queries();
    let udp = Query {
        transport: Some(Udp),
        ..secure.clone()
    };
    assert_eq!(
        locate(&r, &udp, ALL).await,
        Err(ResolveError::NoUsableTransport)
    );
    // No TLS on this server: sips cannot be served.
    assert_eq!(
        locate(&r, &secure, &[Udp, Tcp]).await,
        Err(ResolveError::NoUsableTransport)
    );
    assert_eq!(dns.total_queries(), before);
}

#[tokio::test]
async fn empty_answers_fall_through_to_the_next_step() {
    // NAPTR names SRV names that do not exist (NXDOMAIN) and one that exists without SRV
    // (NODATA); the SRV step finds nothing either; the domain's A record is used.
    let dns = DnsServer::start(vec![
        Record::naptr(
            "example.test",
            10,
            10,
            "s",
            "SIP+D2U",
            "",
            "_sip._udp.gone.test",
            60,
        ),
        Record::naptr(
            "example.test",
            20,
            10,
            "s",
            "SIP+D2T",
            "",
            "host.example.test",
            60,
        ),
        Record::a("host.example.test", v4(5), 60),
        Record::a("example.test", v4(1), 60),
    ]);
    let r = resolver(&dns);
    assert_eq!(
        locate(&r, &query("example.test"), ALL).await.unwrap(),
        vec![cand(Udp, "192.0.2.1:5060")]
    );
    assert_eq!(dns.queries("_sip._udp.gone.test", RecordType::SRV), 1);
    assert_eq!(dns.queries("host.example.test", RecordType::SRV), 1);
    assert_eq!(dns.queries("_sip._tcp.example.test", RecordType::SRV), 1);
}

#[tokio::test]
async fn nxdomain_is_not_found() {
    let dns = DnsServer::start(full_zone());
    let r = resolver(&dns);
    assert_eq!(
        locate(&r, &query("nowhere.test"), ALL).await,
        Err(ResolveError::NotFound {
            host: "nowhere.test".into()
        })
    );
    assert_eq!(
        locate(&r, &query("bad..name"), ALL).await,
        Err(ResolveError::InvalidHost {
            host: "bad..name".into()
        })
    );
    // With an explicit port and transport too.
    let q = Query {
        port: Some(5060),
        transport: Some(Tcp),
        ..query("nowhere.test")
    };
    assert_eq!(
        locate(&r, &q, ALL).await,
        Err(ResolveError::NotFound {
            host: "nowhere.test".into()
        })
    );
}

#[tokio::test]
async fn srv_dot_target_means_not_available() {
    let dns = DnsServer::start(vec![
        Record::a("example.test", v4(1), 60),
        Record::srv("_sip._udp.example.test", 0, 0, 0, ".", 60),
    ]);
    let r = resolver(&dns);
    let q = Query {
        transport: Some(Udp),
        ..query("example.test")
    };
    // SRV records exist (saying "no service"): no fallback to the domain's A record.
    assert_eq!(
        locate(&r, &q, ALL).await,
        Err(ResolveError::NotFound {
            host: "example.test".into()
        })
    );
    assert_eq!(dns.queries("example.test", RecordType::A), 0);
}

#[tokio::test]
async fn srv_targets_without_additionals_are_looked_up() {
    let dns = DnsServer::start(full_zone());
    dns.set_srv_additionals(false);
    let r = resolver(&dns);
    let q = Query {
        transport: Some(Tcp),
        ..query("example.test")
    };
    assert_eq!(
        locate(&r, &q, ALL).await.unwrap(),
        vec![
            cand(Tcp, "192.0.2.1:5070"),
            cand(Tcp, "[2001:db8::1]:5070"),
            cand(Tcp, "192.0.2.2:5071"),
        ]
    );
    for host in ["pbx1.example.test", "pbx2.example.test"] {
        assert_eq!(dns.queries(host, RecordType::A), 1, "{:?}", dns.query_log());
        assert_eq!(dns.queries(host, RecordType::AAAA), 1);
    }
}

#[tokio::test]
async fn answers_are_cached_positive_and_negative() {
    let mut zone = full_zone();
    zone.push(Record::a("plain.test", v4(8), 60));
    let dns = DnsServer::start(zone);
    let r = resolver(&dns);
    for host in ["example.test", "plain.test", "nowhere.test"] {
        let first = locate(&r, &query(host), ALL).await;
        let asked = dns.total_queries();
        assert!(asked > 0);
        let second = locate(&r, &query(host), ALL).await;
        assert_eq!(first, second, "{host}");
        assert_eq!(dns.total_queries(), asked, "{host}: {:?}", dns.query_log());
        dns.reset_counts();
    }
    // Clones share the cache.
    let clone = r.clone();
    locate(&clone, &query("nowhere.test"), ALL)
        .await
        .unwrap_err();
    assert_eq!(dns.total_queries(), 0);
}

#[tokio::test]
async fn negative_ttl_caps_negative_caching() {
    let dns = DnsServer::start(Vec::new());
    let config = moonroute::config::Dns {
        negative_ttl_secs: 0,
        ..dns.config(500)
    };
    let r = Resolver::from_config(&config).unwrap();
    locate(&r, &query("nowhere.test"), ALL).await.unwrap_err();
    let asked = dns.total_queries();
    locate(&r, &query("nowhere.test"), ALL).await.unwrap_err();
    assert_eq!(dns.total_queries(), 2 * asked, "{:?}", dns.query_log());
}

#[tokio::test]
async fn silent_server_fails_in_bounded_time() {
    let dns = DnsServer::start(vec![Record::a("silent.test", v4(1), 60)]);
    for name in [
        "silent.test",
        "_sip._udp.silent.test",
        "_sip._tcp.silent.test",
        "_sips._tcp.silent.test",
    ] {
        dns.silence(name);
    }
    let r = Resolver::from_config(&dns.config(200)).unwrap();
    let started = Instant::now();
    let result = locate(&r, &query("silent.test"), ALL).await;
    let took = started.elapsed();
    assert!(
        matches!(result, Err(ResolveError::Failed(_))),
        "{result:?} {:?}",
        dns.query_log()
    );
    assert!(took <= r.deadline() + Duration::from_secs(1), "{took:?}");
    // Every step was tried: NAPTR, SRV, A/AAAA.
    assert!(
        dns.queries("silent.test", RecordType::A) >= 1,
        "{:?}",
        dns.query_log()
    );
    assert!(dns.queries("_sip._tcp.silent.test", RecordType::SRV) >= 1);
}

#[tokio::test]
async fn naptr_timeout_falls_through_to_srv() {
    let dns = DnsServer::start(full_zone());
    // Only the domain itself is silent (NAPTR): the SRV step still works.
    dns.silence("example.test");
    let r = Resolver::from_config(&dns.config(200)).unwrap();
    let found = locate(&r, &query("example.test"), ALL).await.unwrap();
    assert_eq!(
        found,
        vec![
            cand(Udp, "192.0.2.1:5080"),
            cand(Udp, "[2001:db8::1]:5080"),
            cand(Tcp, "192.0.2.1:5070"),
            cand(Tcp, "[2001:db8::1]:5070"),
            cand(Tcp, "192.0.2.2:5071"),
            tls("192.0.2.3:5061", "example.test"),
        ]
    );
}

#[tokio::test]
async fn silent_srv_target_fails_but_other_targets_are_used() {
    let dns = DnsServer::start(vec![
        Record::srv(
            "_sip._udp.example.test",
            10,
            0,
            5060,
            "slow.example.test",
            60,
        ),
        Record::srv(
            "_sip._udp.example.test",
            20,
            0,
            5060,
            "fast.example.test",
            60,
        ),
        Record::a("fast.example.test", v4(2), 60),
    ]);
    dns.set_srv_additionals(false);
    dns.silence("slow.example.test");
    let r = Resolver::from_config(&dns.config(200)).unwrap();
    let q = Query {
        transport: Some(Udp),
        ..query("example.test")
    };
    assert_eq!(
        locate(&r, &q, ALL).await.unwrap(),
        vec![cand(Udp, "192.0.2.2:5060")]
    );
}

#[tokio::test]
async fn hostile_zone_is_bounded() {
    // 20 SRV records (fitting in one UDP answer), each to its own target, no additionals: at
    // most MAX_QUERIES lookups.
    let mut zone = Vec::new();
    for i in 0..20u8 {
        let target = format!("t{i}.example.test");
        zone.push(Record::srv(
            "_sip._udp.example.test",
            10,
            1,
            5060,
            &target,
            60,
        ));
        zone.push(Record::a(&target, v4(i), 60));
    }
    let dns = DnsServer::start(zone.clone());
    dns.set_srv_additionals(false);
    let r = resolver(&dns);
    let q = Query {
        transport: Some(Udp),
        ..query("example.test")
    };
    let found = locate(&r, &q, ALL).await.unwrap();
    assert!(!found.is_empty() && found.len() <= MAX_CANDIDATES);
    assert!(
        dns.total_queries() <= MAX_QUERIES,
        "{}",
        dns.total_queries()
    );

    // 40 with additionals: the answer exceeds a UDP datagram, is truncated, retried over TCP;
    // the list stops at MAX_CANDIDATES.
    for i in 20..40u8 {
        let target = format!("t{i}.example.test");
        zone.push(Record::srv(
            "_sip._udp.example.test",
            10,
            1,
            5060,
            &target,
            60,
        ));
        zone.push(Record::a(&target, v4(i), 60));
    }
    let dns = DnsServer::start(zone);
    let r = resolver(&dns);
    let found = locate(&r, &q, ALL).await.unwrap();
    assert_eq!(found.len(), MAX_CANDIDATES);
    assert_eq!(dns.queries("t0.example.test", RecordType::A), 0);

    // NAPTR records naming 20 SRV names, none existing: bounded too.
    let mut zone = Vec::new();
    for i in 0..20u16 {
        zone.push(Record::naptr(
            "loop.test",
            i,
            0,
            "s",
            "SIP+D2U",
            "",
            &format!("_sip._udp.n{i}.loop.test"),
            60,
        ));
    }
    let dns = DnsServer::start(zone);
    let r = resolver(&dns);
    let result = locate(&r, &query("loop.test"), ALL).await;
    assert!(matches!(result, Err(ResolveError::Failed(_))), "{result:?}");
    assert!(
        dns.total_queries() <= MAX_QUERIES,
        "{}",
        dns.total_queries()
    );
}

#[tokio::test]
async fn ip_literals_need_no_dns() {
    let dns = DnsServer::start(Vec::new());
    let r = resolver(&dns);
    let q = Query {
        port: Some(5070),
        ..query("127.0.0.1")
    };
    assert_eq!(
        locate(&r, &q, ALL).await.unwrap(),
        vec![cand(Udp, "127.0.0.1:5070")]
    );
    assert_eq!(
        locate(&r, &query("::1"), &[Tcp]).await.unwrap(),
        vec![cand(Tcp, "[::1]:5060")]
    );
    assert_eq!(dns.total_queries(), 0);
}

#[test]
fn works_on_a_fresh_current_thread_runtime_per_loop() {
    let dns = DnsServer::start(full_zone());
    for _ in 0..2 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = resolver(&dns);
            let found = locate(&r, &query("example.test"), &[Tcp]).await.unwrap();
            assert_eq!(found[0], cand(Tcp, "192.0.2.1:5070"));
        });
    }
}

#[tokio::test]
async fn srv_weights_spread_the_first_choice() {
    let dns = DnsServer::start(vec![
        Record::srv("_sip._udp.example.test", 10, 50, 5060, "a.example.test", 60),
        Record::srv("_sip._udp.example.test", 10, 50, 5060, "b.example.test", 60),
        Record::a("a.example.test", v4(1), 60),
        Record::a("b.example.test", v4(2), 60),
    ]);
    let q = Query {
        transport: Some(Udp),
        ..query("example.test")
    };
    let order = |found: Vec<Candidate>| -> Vec<String> {
        found.iter().map(|c| c.addr.to_string()).collect()
    };
    // The same seed gives the same orders.
    let mut runs = Vec::new();
    for _ in 0..2 {
        let r = resolver(&dns).with_srv_seed(42);
        let mut orders = Vec::new();
        for _ in 0..20 {
            orders.push(order(locate(&r, &q, ALL).await.unwrap()));
        }
        runs.push(orders);
    }
    assert_eq!(runs[0], runs[1]);
    // Equal weights: each target comes first about half the time (answers from the cache).
    let r = resolver(&dns);
    let mut a_first = 0;
    for _ in 0..200 {
        let found = order(locate(&r, &q, ALL).await.unwrap());
        assert_eq!(found.len(), 2);
        if found[0] == "192.0.2.1:5060" {
            a_first += 1;
        }
    }
    assert!((50..=150).contains(&a_first), "{a_first}");
}

#[test]
fn locate_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let dns = DnsServer::start(Vec::new());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let r = resolver(&dns);
    let q = query("example.test");
    let future = r.locate(&q, ALL);
    assert_send(&future);
}
