//! The dispatcher as scripts and the shell use it: selection with states, failover, probing
//! with simulated time, reload.

use std::io::Write;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

const A: &str = "sip:127.0.0.1:5071";
const B: &str = "sip:127.0.0.1:5072";
const C: &str = "sip:127.0.0.1:5073";

fn destination(uri: &str, weight: u32, priority: i32) -> DestinationConfig {
    DestinationConfig {
        uri: uri.to_owned(),
        weight,
        priority,
        attrs: String::new(),
    }
}

fn three(weights: [u32; 3]) -> Vec<SetConfig> {
    vec![SetConfig {
        id: 1,
        destinations: [A, B, C]
            .iter()
            .zip(weights)
            .map(|(uri, w)| destination(uri, w, 0))
            .collect(),
    }]
}

/// A dispatcher whose destinations are all `active` (probing on, first probes answered).
fn active(sets: Vec<SetConfig>) -> Dispatcher {
    let dispatcher = Dispatcher::new(Rules::default(), sets, None).unwrap();
    let now = Instant::now();
    for uri in dispatcher.due_probes(now) {
        dispatcher.probe_answered(&uri, ProbeOutcome::Reply(200), now);
    }
    dispatcher
}

fn counts(dispatcher: &Dispatcher, algorithm: Algorithm, calls: usize) -> [usize; 3] {
    let mut counts = [0; 3];
    for call in 0..calls {
        let key = format!("call-{call}@10.1.2.3");
        let first = dispatcher
            .select(1, algorithm, Some(key.as_bytes()))
            .unwrap()[0]
            .clone();
        counts[[A, B, C].iter().position(|u| **u == *first).unwrap()] += 1;
    }
    counts
}

#[test]
fn every_algorithm_spreads_3000_calls_as_it_should() {
    let calls = 3000;
    let expect = |counts: [usize; 3], expected: [f64; 3], tolerance: f64| {
        for (count, want) in counts.iter().zip(expected) {
            assert!(
                (*count as f64 - want).abs() <= want * tolerance,
                "{counts:?} vs {expected:?}"
            );
        }
    };
    let even = active(three([1, 1, 1]));
    expect(
        counts(&even, Algorithm::RoundRobin, calls),
        [1000.0; 3],
        0.0,
    );
    expect(counts(&even, Algorithm::CallId, calls), [1000.0; 3], 0.1);
    expect(counts(&even, Algorithm::Random, calls), [1000.0; 3], 0.1);
    expect(counts(&even, Algorithm::CallLoad, calls), [1000.0; 3], 0.0);
    let weighted = active(three([1, 2, 3]));
    expect(
        counts(&weighted, Algorithm::Weighted, calls),
        [500.0, 1000.0, 1500.0],
        0.0,
    );
    expect(
        counts(&weighted, Algorithm::CallId, calls),
        [500.0, 1000.0, 1500.0],
        0.12,
    );
    let mut sets = three([1, 1, 1]);
    sets[0].destinations[1].priority = 10;
    let by_priority = active(sets);
    assert_eq!(counts(&by_priority, Algorithm::Priority, 100), [0, 100, 0]);
}

#[test]
fn the_failover_order_holds_every_other_usable_destination() {
    let dispatcher = active(three([1, 1, 1]));
    let order = dispatcher.select(1, Algorithm::RoundRobin, None).unwrap();
    assert_eq!(order.len(), 3);
    let mut remaining = order[1..].to_vec();
    dispatcher.mark(&order[1], State::Inactive, "test").unwrap();
    // The second one went down meanwhile: ds_next skips it.
    let next = dispatcher.next(Some(&order[0]), &mut remaining);
    assert_eq!(next.as_deref(), Some(&*order[2]));
    assert!(remaining.is_empty());
    assert_eq!(dispatcher.next(Some(&order[2]), &mut remaining), None);
    let views = dispatcher.list(Some(1), Instant::now());
    let view = |uri: &str| views.iter().find(|v| v.uri == uri).unwrap().clone();
    assert_eq!(view(&order[0]).failovers, 1);
    assert_eq!(view(&order[0]).sent, 1);
    assert_eq!(view(&order[2]).sent, 1);
}

#[test]
fn down_destinations_get_no_calls_and_probing_ones_only_as_a_last_resort() {
    let dispatcher = Dispatcher::new(Rules::default(), three([1, 1, 1]), None).unwrap();
    // Never probed: all `probing`, still usable.
    assert!(dispatcher
        .list(None, Instant::now())
        .iter()
        .all(|v| v.state == State::Probing));
    assert_eq!(
        dispatcher
            .select(1, Algorithm::CallId, Some(b"x"))
            .unwrap()
            .len(),
        3
    );
    dispatcher.mark(B, State::Active, "test").unwrap();
    dispatcher.mark(C, State::Inactive, "test").unwrap();
    for call in 0..50 {
        let key = format!("{call}");
        let order = dispatcher
            .select(1, Algorithm::CallId, Some(key.as_bytes()))
            .unwrap();
        assert_eq!(order.iter().map(|u| &**u).collect::<Vec<_>>(), vec![B, A]);
    }
    dispatcher.mark(A, State::Disabled, "test").unwrap();
    dispatcher.mark(B, State::Inactive, "test").unwrap();
    assert_eq!(
        dispatcher.select(1, Algorithm::RoundRobin, None),
        Err(SelectError::NoneUsable(1))
    );
    assert_eq!(
        dispatcher.select(7, Algorithm::RoundRobin, None),
        Err(SelectError::UnknownSet(7))
    );
}

#[test]
fn a_hash_keeps_its_destination_while_others_fail() {
    let dispatcher = active(three([1, 1, 1]));
    let first = |key: &str| {
        dispatcher
            .select(1, Algorithm::CallId, Some(key.as_bytes()))
            .unwrap()[0]
            .clone()
    };
    let before: Vec<Arc<str>> = (0..300).map(|i| first(&format!("k{i}"))).collect();
    dispatcher.mark(C, State::Inactive, "test").unwrap();
    for (i, was) in before.iter().enumerate() {
        let now = first(&format!("k{i}"));
        if **was != *C {
            assert_eq!(now, *was, "key k{i} moved although its destination is up");
        } else {
            assert_ne!(&*now, C);
        }
    }
}

#[test]
fn probes_take_a_destination_down_within_one_interval_and_bring_it_back() {
    let rules = Rules {
        interval: Some(Duration::from_secs(10)),
        timeout: Duration::from_secs(4),
        down_after: 1,
        up_after: 2,
        ..Rules::default()
    };
    let dispatcher = Dispatcher::new(rules, three([1, 1, 1]), None).unwrap();
    let start = Instant::now();
    let at = |s: u64| start + Duration::from_secs(s);
    // Round 1 at 0 s: everyone answers.
    let due = dispatcher.due_probes(at(0));
    assert_eq!(due.len(), 3);
    for uri in &due {
        dispatcher.probe_answered(uri, ProbeOutcome::Reply(200), at(0));
    }
    assert!(dispatcher.due_probes(at(9)).is_empty());
    // Round 2 at 10 s: C is silent, and is down at 14 s (one timeout later).
    let due = dispatcher.due_probes(at(10));
    for uri in due.iter().filter(|u| ***u != *C) {
        dispatcher.probe_answered(uri, ProbeOutcome::Reply(200), at(10));
    }
    assert_eq!(dispatcher.state(C), Some(State::Active));
    dispatcher.due_probes(at(14));
    assert_eq!(dispatcher.state(C), Some(State::Inactive));
    for _ in 0..30 {
        let order = dispatcher.select(1, Algorithm::RoundRobin, None).unwrap();
        assert!(!order.iter().any(|u| &**u == C));
    }
    // Back: two alive answers in a row.
    for (second, expected) in [(20, State::Inactive), (30, State::Active)] {
        let due = dispatcher.due_probes(at(second));
        assert!(due.iter().any(|u| &**u == C));
        dispatcher.probe_answered(C, ProbeOutcome::Reply(404), at(second));
        assert_eq!(dispatcher.state(C), Some(expected));
    }
    let view = dispatcher
        .list(Some(1), at(33))
        .into_iter()
        .find(|v| v.uri == C)
        .unwrap();
    assert_eq!(view.probes_failed, 1);
    assert_eq!(
        view.last_probe,
        Some((ProbeOutcome::Reply(404), Duration::from_secs(3)))
    );
}

#[test]
fn call_failures_mark_the_destination_when_configured() {
    let dispatcher = active(three([1, 1, 1]));
    dispatcher.call_failed(A, 486);
    assert_eq!(dispatcher.state(A), Some(State::Active));
    dispatcher.call_failed(A, 503);
    assert_eq!(dispatcher.state(A), Some(State::Inactive));
    dispatcher.call_failed("sip:unknown", 503);
}

#[test]
fn call_load_follows_calls_in_progress() {
    let dispatcher = active(three([1, 1, 1]));
    let a1 = dispatcher.count_call(A).unwrap();
    let a2 = dispatcher.count_call(A).unwrap();
    let _b = dispatcher.count_call(B).unwrap();
    assert!(dispatcher.count_call("sip:unknown").is_none());
    for _ in 0..5 {
        let order = dispatcher.select(1, Algorithm::CallLoad, None).unwrap();
        assert_eq!(&*order[0], C);
    }
    drop(a1);
    drop(a2);
    let views = dispatcher.list(Some(1), Instant::now());
    assert_eq!(
        views.iter().map(|v| v.calls).collect::<Vec<_>>(),
        vec![0, 1, 0]
    );
}

#[test]
fn is_from_list_matches_ip_literals_of_the_set() {
    let mut sets = three([1, 1, 1]);
    sets.push(SetConfig {
        id: 2,
        destinations: vec![
            destination("sip:[::1]:5080", 1, 0),
            destination("sip:gw.example.com", 1, 0),
        ],
    });
    let dispatcher = active(sets);
    let v4: IpAddr = "127.0.0.1".parse().unwrap();
    let v6: IpAddr = "::1".parse().unwrap();
    assert!(dispatcher.is_from_list(v4, Some(1)));
    assert!(dispatcher.is_from_list(v4, None));
    assert!(!dispatcher.is_from_list(v4, Some(2)));
    assert!(dispatcher.is_from_list(v6, Some(2)));
    assert!(dispatcher.is_from_list("::ffff:127.0.0.1".parse().unwrap(), Some(1)));
    assert!(!dispatcher.is_from_list("127.0.0.9".parse().unwrap(), None));
}

#[test]
fn a_reload_keeps_states_and_a_bad_file_keeps_the_old_sets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dispatcher.toml");
    let write = |text: &str| {
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(text.as_bytes()).unwrap();
    };
    write(&format!(
        "[[set]]\nid = 5\ndestinations = [{{ uri = \"{A}\" }}, {{ uri = \"{B}\" }}]\n"
    ));
    let dispatcher = Dispatcher::new(Rules::default(), Vec::new(), Some(path.clone())).unwrap();
    dispatcher.mark(A, State::Disabled, "test").unwrap();
    write(&format!(
        "[[set]]\nid = 5\ndestinations = [{{ uri = \"{A}\" }}, {{ uri = \"{C}\", weight = 4 }}]\n"
    ));
    assert_eq!(dispatcher.reload(), Ok((1, 2)));
    let views = dispatcher.list(None, Instant::now());
    assert_eq!(views[0].state, State::Disabled, "A kept its state");
    assert_eq!((views[1].uri.as_str(), views[1].weight), (C, 4));
    assert_eq!(dispatcher.state(B), None);

    write("[[set]]\nid = 5\ndestinations = [{ uri = \"http://x\" }]\n");
    let error = dispatcher.reload().unwrap_err();
    assert!(error.contains("set 5"), "{error}");
    write("[[set]\n");
    assert!(dispatcher.reload().unwrap_err().contains("dispatcher.toml"));
    assert_eq!(
        dispatcher.list(None, Instant::now()).len(),
        2,
        "old sets still serve"
    );
}

#[test]
fn hash_keys_come_from_the_request() {
    let request = Message::parse(bytes::Bytes::from_static(
        b"INVITE sip:+15551234@Proxy.Example.com:5060;user=phone SIP/2.0\r\n\
          Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\n\
          From: \"A\" <sip:alice@Example.com>;tag=1\r\n\
          To: <sip:bob@example.org>\r\n\
          Call-ID: abc@10.0.0.1\r\n\
          CSeq: 1 INVITE\r\n\
          Max-Forwards: 70\r\n\
          Content-Length: 0\r\n\r\n",
    ))
    .unwrap();
    let key = |a| hash_key(a, &request).map(|k| String::from_utf8(k).unwrap());
    assert_eq!(key(Algorithm::CallId).as_deref(), Some("abc@10.0.0.1"));
    assert_eq!(
        key(Algorithm::FromUri).as_deref(),
        Some("alice@example.com")
    );
    assert_eq!(key(Algorithm::ToUri).as_deref(), Some("bob@example.org"));
    assert_eq!(
        key(Algorithm::RequestUri).as_deref(),
        Some("+15551234@proxy.example.com")
    );
    assert_eq!(key(Algorithm::RoundRobin), None);
    let ruri = request.request_uri_bytes();
    assert_eq!(
        target_uri("sip:127.0.0.1:5071;transport=tcp", ruri),
        "sip:+15551234@127.0.0.1:5071;transport=tcp"
    );
    assert_eq!(target_uri("sip:ivr@127.0.0.1", ruri), "sip:ivr@127.0.0.1");
    assert_eq!(target_uri(A, None), A);
}

#[test]
fn metrics_show_each_destination_once_with_its_state_and_counters() {
    let mut sets = three([1, 1, 1]);
    sets.push(SetConfig {
        id: 2,
        destinations: vec![destination(A, 1, 0)],
    });
    let dispatcher = Arc::new(active(sets));
    dispatcher.mark(B, State::Inactive, "test").unwrap();
    let mut order = dispatcher.select(1, Algorithm::Priority, None).unwrap();
    let first = order.remove(0);
    let _call = dispatcher.count_call(&first).unwrap();
    dispatcher.next(Some(&first), &mut order);
    let registry = crate::metrics::Registry::new();
    register_metrics(&registry, &dispatcher);
    let text = registry.render();
    let line = |prefix: &str| {
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
        assert_eq!(lines.len(), 1, "{prefix} in\n{text}");
        lines[0].rsplit(' ').next().unwrap().to_owned()
    };
    let sample = |name: &str, uri: &str| line(&format!("{name}{{destination=\"{uri}\"}}"));
    assert_eq!(sample("moonroute_dispatcher_calls", &first), "1");
    assert_eq!(sample("moonroute_dispatcher_sent_total", &first), "1");
    assert_eq!(sample("moonroute_dispatcher_failovers_total", &first), "1");
    assert_eq!(sample("moonroute_dispatcher_probes_failed_total", A), "0");
    let state = |uri: &str, state: &str| {
        line(&format!(
            "moonroute_dispatcher_state{{destination=\"{uri}\",state=\"{state}\"}}"
        ))
    };
    assert_eq!(state(B, "inactive"), "1");
    assert_eq!(state(B, "active"), "0");
    assert_eq!(state(C, "active"), "1");
    assert!(text.contains("# TYPE moonroute_dispatcher_failovers_total counter"));
}
