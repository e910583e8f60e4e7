use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::proxy::identity::LocalIdentity;
use crate::registrar::AorRule;

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn binding(aor: &str, contact: &str, q: u16, expires_in: u64) -> Binding {
    Binding::new(
        aor,
        contact,
        t0() + Duration::from_secs(expires_in),
        q,
        "c1".to_owned(),
        1,
    )
}

fn contacts(bindings: &[Binding]) -> Vec<&str> {
    bindings.iter().map(|b| b.contact.as_str()).collect()
}

const ALICE: &str = "sip:alice@example.com";

#[test]
fn lookup_orders_by_q_then_registration_order() {
    let store = MemoryLocation::default();
    store
        .replace(
            ALICE,
            vec![
                binding(ALICE, "sip:a@192.0.2.1", 500, 60),
                binding(ALICE, "sip:b@192.0.2.2", 1000, 60),
                binding(ALICE, "sip:c@192.0.2.3", 500, 60),
                binding(ALICE, "sip:d@192.0.2.4", 1000, 60),
                binding(ALICE, "sip:e@192.0.2.5", 0, 60),
            ],
        )
        .unwrap();
    assert_eq!(
        contacts(&store.lookup(ALICE, t0())),
        [
            "sip:b@192.0.2.2",
            "sip:d@192.0.2.4",
            "sip:a@192.0.2.1",
            "sip:c@192.0.2.3",
            "sip:e@192.0.2.5"
        ]
    );
    assert!(store.lookup("sip:bob@example.com", t0()).is_empty());
}

#[test]
fn lookup_filters_expired_bindings() {
    let store = MemoryLocation::default();
    store
        .replace(
            ALICE,
            vec![
                binding(ALICE, "sip:a@192.0.2.1", 1000, 10),
                binding(ALICE, "sip:b@192.0.2.2", 1000, 100),
            ],
        )
        .unwrap();
    let later = t0() + Duration::from_secs(10);
    assert_eq!(contacts(&store.lookup(ALICE, later)), ["sip:b@192.0.2.2"]);
    // Expired but not swept: still counted.
    assert_eq!(store.count(), 2);
    assert!(store
        .lookup(ALICE, t0() + Duration::from_secs(100))
        .is_empty());
}

#[test]
fn sweep_removes_expired_bindings_and_empty_aors() {
    let store = MemoryLocation::default();
    let bob = "sip:bob@example.com";
    store
        .replace(
            ALICE,
            vec![
                binding(ALICE, "sip:a@192.0.2.1", 1000, 10),
                binding(ALICE, "sip:b@192.0.2.2", 1000, 100),
            ],
        )
        .unwrap();
    store
        .replace(bob, vec![binding(bob, "sip:b@192.0.2.9", 1000, 5)])
        .unwrap();
    assert_eq!(store.count(), 3);
    assert_eq!(store.sweep(t0()), 0);
    assert_eq!(store.sweep(t0() + Duration::from_secs(10)), 2);
    assert_eq!(store.count(), 1);
    let total_aors: usize = store.shards.iter().map(|s| lock(s).len()).sum();
    assert_eq!(total_aors, 1, "bob's emptied AOR is gone");
    assert_eq!(store.sweep(t0() + Duration::from_secs(1000)), 1);
    assert_eq!(store.count(), 0);
}

#[test]
fn replace_with_empty_list_removes_the_aor() {
    let store = MemoryLocation::default();
    store
        .replace(ALICE, vec![binding(ALICE, "sip:a@192.0.2.1", 1000, 10)])
        .unwrap();
    assert_eq!(store.count(), 1);
    store.replace(ALICE, Vec::new()).unwrap();
    assert_eq!(store.count(), 0);
    assert!(store.lookup(ALICE, t0()).is_empty());
}

#[test]
fn capacity_limit_refuses_growth_only() {
    let store = MemoryLocation::new(2);
    let bob = "sip:bob@example.com";
    store
        .replace(
            ALICE,
            vec![
                binding(ALICE, "sip:a@192.0.2.1", 1000, 10),
                binding(ALICE, "sip:b@192.0.2.2", 1000, 10),
            ],
        )
        .unwrap();
    let err = store
        .replace(bob, vec![binding(bob, "sip:b@192.0.2.9", 1000, 5)])
        .unwrap_err();
    assert!(matches!(err, StoreError::Full { .. }), "{err}");
    assert!(err.to_string().contains("full"), "{err}");
    assert!(store.lookup(bob, t0()).is_empty());
    // Replacing without growing is always allowed, and shrinking frees room.
    store
        .replace(ALICE, vec![binding(ALICE, "sip:c@192.0.2.3", 1000, 10)])
        .unwrap();
    store
        .replace(bob, vec![binding(bob, "sip:b@192.0.2.9", 1000, 5)])
        .unwrap();
    assert_eq!(store.count(), 2);
}

#[test]
fn update_sees_live_bindings_and_can_leave_the_aor_alone() {
    let store = MemoryLocation::default();
    store
        .replace(
            ALICE,
            vec![
                binding(ALICE, "sip:a@192.0.2.1", 500, 5),
                binding(ALICE, "sip:b@192.0.2.2", 1000, 100),
            ],
        )
        .unwrap();
    let now = t0() + Duration::from_secs(5);
    let mut seen = Vec::new();
    store
        .update(ALICE, now, &mut |current| {
            seen = current;
            None
        })
        .unwrap();
    assert_eq!(contacts(&seen), ["sip:b@192.0.2.2"]);
    assert_eq!(store.count(), 2, "None leaves the AOR untouched");
    store
        .update(ALICE, now, &mut |mut current| {
            current.push(binding(ALICE, "sip:c@192.0.2.3", 1000, 100));
            Some(current)
        })
        .unwrap();
    assert_eq!(store.count(), 2, "the expired binding was dropped");
    assert_eq!(
        contacts(&store.lookup(ALICE, now)),
        ["sip:b@192.0.2.2", "sip:c@192.0.2.3"]
    );
}

#[test]
fn fixture_loader() {
    let text = "\
# registrations for the routing tests
sip:alice@EXAMPLE.com   sip:alice@192.0.2.10:5060   q=0.5 expires=600
sip:alice@example.com;transport=tcp  sip:alice@198.51.100.7:5070;transport=tcp

   sip:bob@example.com  tel:*21#   # a tel contact with a '#'
sip:carol@example.com sip:carol@192.0.2.30 expires=0
";
    let store = MemoryLocation::from_fixture(text, t0(), &AorRule::default()).unwrap();
    assert_eq!(store.count(), 4);
    let alice = store.lookup("sip:alice@example.com", t0());
    assert_eq!(
        contacts(&alice),
        [
            "sip:alice@198.51.100.7:5070;transport=tcp",
            "sip:alice@192.0.2.10:5060"
        ]
    );
    assert_eq!(alice[1].q, 500);
    assert_eq!(alice[1].expires_at, t0() + Duration::from_secs(600));
    assert_eq!(alice[0].q, 1000);
    assert_eq!(alice[0].expires_at, t0() + Duration::from_secs(3600));
    assert_eq!(alice[0].aor, "sip:alice@example.com");
    assert!(store.lookup("sip:Alice@example.com", t0()).is_empty());
    assert_eq!(
        contacts(&store.lookup("sip:bob@example.com", t0())),
        ["tel:*21#"]
    );
    assert!(store.lookup("sip:carol@example.com", t0()).is_empty());
}

#[test]
fn fixture_aors_follow_the_rule_given() {
    let text = "\
sip:alice@127.0.0.1:5060   sip:alice@192.0.2.10
sip:alice@127.0.0.1        sip:alice@192.0.2.11
sip:bob@127.0.0.1:5080     sip:bob@192.0.2.20
";
    let home = AorRule::new(LocalIdentity::new(&[], ["127.0.0.1:5060".parse().unwrap()]));
    let store = MemoryLocation::from_fixture(text, t0(), &home).unwrap();
    assert_eq!(
        store.aors(),
        ["sip:alice@127.0.0.1", "sip:bob@127.0.0.1:5080"]
    );
    assert_eq!(store.lookup("sip:alice@127.0.0.1", t0()).len(), 2);
}

/// Errors name the line; `moonroute test --location` prints these texts, which stay what
/// they were as strings.
#[test]
fn fixture_errors_name_the_line() {
    let cases = [
        (
            "tel:+123 sip:a@192.0.2.1",
            "line 1: 'tel:+123' is not a sip: or sips: address-of-record",
        ),
        ("sip:a@example.com", "line 1: missing CONTACT after the AOR"),
        (
            "sip:a@example.com <sip:a@192.0.2.1>",
            "line 1: '<sip:a@192.0.2.1>' is not a valid URI",
        ),
        (
            "\nsip:a@example.com sip:a@192.0.2.1 q=2",
            "line 2: bad q value '2' (0 to 1, 3 decimals)",
        ),
        (
            "sip:a@example.com sip:a@192.0.2.1 expires=-1",
            "line 1: bad expires '-1' (seconds)",
        ),
        (
            "sip:a@example.com sip:a@192.0.2.1 weight=3",
            "line 1: unknown option 'weight=3' (expected q=QVALUE or expires=SECONDS)",
        ),
        (
            "sip:a@example.com sip:a@192.0.2.1 expires=18446744073709551615",
            "line 1: expires=18446744073709551615 is too far in the future",
        ),
        (
            "sip:a@example.com sip:a@192.0.2.1\nsip:a@EXAMPLE.COM sip:a@192.0.2.1",
            "line 2: sip:a@192.0.2.1 is already bound to sip:a@example.com",
        ),
    ];
    for (text, expected) in cases {
        let err = MemoryLocation::from_fixture(text, t0(), &AorRule::default()).unwrap_err();
        assert_eq!(err.to_string(), expected, "{text:?}");
    }
    let err = MemoryLocation::from_fixture("sip:a@example.com", t0(), &AorRule::default());
    assert_eq!(
        err.unwrap_err(),
        FixtureError::Line {
            number: 1,
            problem: FixtureProblem::MissingContact
        }
    );
    assert_eq!(
        StoreError::Full { max_bindings: 3 }.to_string(),
        "location store full (3 bindings)"
    );
}

/// Walks `store` in pages of `limit`, returning the pages.
fn walk(store: &dyn LocationStore, limit: usize) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut cursor = AorCursor::default();
    loop {
        let (page, next) = store.aors_page(&cursor, limit);
        assert!(page.len() <= limit.max(1));
        pages.push(page);
        match next {
            Some(next) => cursor = next,
            None => return pages,
        }
    }
}

#[test]
fn a_paged_walk_lists_every_aor_once_in_bounded_pages() {
    let store = MemoryLocation::default();
    for i in 0..1000 {
        let aor = format!("sip:u{i}@example.com");
        store
            .replace(&aor, vec![binding(&aor, "sip:x@192.0.2.1", 1000, 60)])
            .unwrap();
    }
    for limit in [1, 7, 100, 5000] {
        let mut seen: Vec<String> = walk(&store, limit).into_iter().flatten().collect();
        seen.sort();
        assert_eq!(seen, store.aors(), "limit {limit}");
    }
    assert_eq!(
        walk(&MemoryLocation::default(), 10),
        vec![Vec::<String>::new()]
    );
}

#[test]
fn a_paged_walk_survives_changes_between_pages() {
    let store = MemoryLocation::default();
    for i in 0..200 {
        let aor = format!("sip:u{i}@example.com");
        store
            .replace(&aor, vec![binding(&aor, "sip:x@192.0.2.1", 1000, 60)])
            .unwrap();
    }
    let (first, mut cursor) = store.aors_page(&AorCursor::default(), 50);
    // The AOR the cursor stands on leaves, another one arrives: the walk goes on.
    let gone = first.last().unwrap().clone();
    store.replace(&gone, Vec::new()).unwrap();
    store
        .replace(
            "sip:new@example.com",
            vec![binding("sip:new@example.com", "sip:n@192.0.2.2", 1000, 60)],
        )
        .unwrap();
    let mut seen = first.clone();
    while let Some(at) = cursor {
        let (page, next) = store.aors_page(&at, 50);
        seen.extend(page);
        cursor = next;
    }
    let unique: std::collections::HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no AOR twice");
    for i in 0..200 {
        let aor = format!("sip:u{i}@example.com");
        assert!(seen.contains(&aor), "{aor} present throughout is listed");
    }
}
