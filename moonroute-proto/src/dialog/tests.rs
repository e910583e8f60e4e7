//! The dialog table driven through whole calls with simulated time.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::table::{MAX_VARS, MAX_VAR_VALUE};
use super::*;
use crate::transport::TransportKind;

const CALLER: &str = "sip:alice@127.0.0.1:5070";
const CALLEE: &str = "sip:bob@127.0.0.1:5080";

/// The same instant in every call, so simulated times compare exactly.
fn t0() -> Stamp {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    Stamp {
        at: *BASE.get_or_init(Instant::now),
        wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    }
}

/// The INVITE of alice (127.0.0.1:5070, From tag `ftag`) to bob, as a new dialog.
pub(crate) fn invite(call_id: &str) -> NewDialog {
    NewDialog {
        call_id: Bytes::copy_from_slice(call_id.as_bytes()),
        from_uri: Bytes::from_static(b"sip:alice@example.com"),
        from_tag: Bytes::from_static(b"ftag"),
        to_uri: Bytes::from_static(b"sip:bob@example.com"),
        caller_contact: Some(Bytes::from_static(CALLER.as_bytes())),
        caller_cseq: 1,
        source: "127.0.0.1:5070".parse().unwrap(),
        transport: TransportKind::Udp,
        conn: None,
        request_uri: Bytes::from_static(b"sip:bob@example.com"),
    }
}

fn table() -> DialogTable {
    DialogTable::new(Limits::default(), Profiles::new())
}

fn answer(table: &mut DialogTable, id: DialogId, tag: &str, now: Stamp) -> Option<Cdr> {
    table.on_invite_response(
        id,
        200,
        Some(tag.as_bytes()),
        Some(Bytes::from_static(CALLEE.as_bytes())),
        vec![Bytes::from_static(b"<sip:127.0.0.1;lr>")],
        Some(Bytes::from_static(CALLEE.as_bytes())),
        now,
    )
}

fn respond(
    table: &mut DialogTable,
    id: DialogId,
    status: u16,
    tag: &str,
    now: Stamp,
) -> Option<Cdr> {
    table.on_invite_response(
        id,
        status,
        Some(tag.as_bytes()),
        None,
        Vec::new(),
        None,
        now,
    )
}

/// An established call: managed at t0, answered 2 s later by tag "ttag".
fn established(table: &mut DialogTable, call_id: &str) -> DialogId {
    let id = table.manage(invite(call_id), t0()).unwrap();
    assert!(respond(table, id, 180, "ttag", t0().after(Duration::from_secs(1))).is_none());
    assert!(answer(table, id, "ttag", t0().after(Duration::from_secs(2))).is_none());
    id
}

#[test]
fn a_call_ended_by_the_caller_gives_one_cdr_with_sane_times() {
    let mut table = table();
    let id = established(&mut table, "c1");
    assert_eq!(table.get(id).unwrap().state, State::Confirmed);
    let end = t0().after(Duration::from_secs(62));
    let cdr = table
        .on_request(b"c1", b"ftag", b"ttag", true, 2, end)
        .expect("the BYE ends the call");
    assert_eq!(cdr.reason, EndReason::Bye(Side::Caller));
    assert_eq!(cdr.status, 200);
    assert_eq!(cdr.duration(), 60.0);
    assert_eq!(cdr.setup(), 2.0);
    assert_eq!(cdr.to_tag.as_deref(), Some("ttag"));
    assert!(cdr.to_json_line().contains("\"hangup\":\"caller\""));
    // The BYE's retry (after a 407, or from another port) ends nothing more.
    assert!(table
        .on_request(b"c1", b"ftag", b"ttag", true, 3, end)
        .is_none());
    assert_eq!(
        table.counters().ended[EndReason::Bye(Side::Caller).index()],
        1
    );
    // Kept for the linger, then gone.
    assert_eq!(
        table.next_deadline(),
        Some(end.at + Limits::default().linger)
    );
    assert!(table
        .on_timer(end.after(Limits::default().linger))
        .is_empty());
    assert!(table.is_empty());
    assert_eq!(table.memory(), 0);
}

#[test]
fn a_call_ended_by_the_callee_names_the_callee() {
    let mut table = table();
    established(&mut table, "c1");
    // The callee's BYE: its own tag in From, the caller's in To (§12.2.1.1).
    let cdr = table
        .on_request(
            b"c1",
            b"ttag",
            b"ftag",
            true,
            1,
            t0().after(Duration::from_secs(5)),
        )
        .unwrap();
    assert_eq!(cdr.reason, EndReason::Bye(Side::Callee));
    assert!(cdr.to_json_line().contains("\"hangup\":\"callee\""));
}

#[test]
fn forked_early_dialogs_count_once_and_a_second_2xx_is_let_through_without_ending_the_call() {
    let mut table = table();
    let id = table.manage(invite("fork"), t0()).unwrap();
    respond(&mut table, id, 180, "a", t0());
    respond(&mut table, id, 183, "b", t0());
    assert_eq!(table.count(State::Early), 1);
    assert_eq!(table.len(), 1);
    answer(&mut table, id, "a", t0());
    answer(&mut table, id, "b", t0());
    assert_eq!(table.count(State::Confirmed), 1);
    // The caller's BYE to the second fork passes the check but the call goes on.
    let known = table.known(b"fork", b"ftag", b"b", true, b"sip:bob@elsewhere");
    assert_eq!(known, Known::Yes(Side::Caller));
    assert!(table
        .on_request(b"fork", b"ftag", b"b", true, 2, t0())
        .is_none());
    assert_eq!(table.get(id).unwrap().state, State::Confirmed);
    assert!(table
        .on_request(b"fork", b"ftag", b"a", true, 3, t0())
        .is_some());
}

#[test]
fn a_cancelled_call_and_a_refused_call_give_failed_attempt_records() {
    let mut table = table();
    let id = table.manage(invite("cancelled"), t0()).unwrap();
    respond(&mut table, id, 180, "t", t0());
    table.on_cancel(id);
    let cdr = respond(&mut table, id, 487, "t", t0().after(Duration::from_secs(3))).unwrap();
    assert_eq!(
        (cdr.reason, cdr.status, cdr.answered()),
        (EndReason::Cancelled, 487, false)
    );
    assert_eq!(cdr.setup(), 3.0);
    assert!(cdr.to_json_line().contains("\"hangup\":null"));

    let id = table.manage(invite("busy"), t0()).unwrap();
    let cdr = respond(&mut table, id, 486, "t", t0()).unwrap();
    assert_eq!((cdr.reason, cdr.status), (EndReason::Failed, 486));
    // A retry of the same INVITE (same Call-ID and From tag, after a 401) is a new dialog.
    let retry = table.manage(invite("busy"), t0()).unwrap();
    assert_ne!(retry, id);
    assert_eq!(table.get(retry).unwrap().state, State::Early);
}

#[test]
fn a_per_user_limit_of_two_refuses_the_third_call_and_admits_it_after_a_hangup() {
    let profiles = Profiles::new();
    // Two loops sharing the profiles, as the event loops do.
    let mut first_loop = DialogTable::new(Limits::default(), Arc::clone(&profiles));
    let mut second_loop = DialogTable::new(Limits::default(), Arc::clone(&profiles));
    let a = established(&mut first_loop, "a");
    first_loop
        .join_profile(a, "caller", "alice", Some(2))
        .unwrap();
    let b = established(&mut second_loop, "b");
    second_loop
        .join_profile(b, "caller", "alice", Some(2))
        .unwrap();
    let c = first_loop.manage(invite("c"), t0()).unwrap();
    assert_eq!(
        first_loop.join_profile(c, "caller", "alice", Some(2)),
        Err(Refusal::ProfileFull { count: 2 })
    );
    respond(&mut first_loop, c, 486, "x", t0());
    assert_eq!(profiles.count("caller", "alice"), 2);
    // The callee of "b" hangs up: its slot is free at once, not after the linger.
    second_loop.on_request(b"b", b"ttag", b"ftag", true, 1, t0());
    assert_eq!(profiles.count("caller", "alice"), 1);
    let d = first_loop.manage(invite("d"), t0()).unwrap();
    first_loop
        .join_profile(d, "caller", "alice", Some(2))
        .unwrap();
    assert_eq!(profiles.count("caller", "alice"), 2);
    // Dropping a table (a loop stopping) releases its calls.
    drop(first_loop);
    assert_eq!(profiles.count("caller", "alice"), 0);
}

#[test]
fn max_duration_cuts_the_call_with_a_bye_to_each_party() {
    let mut table = table();
    let id = established(&mut table, "long");
    table
        .set_max_duration(
            id,
            Duration::from_secs(60),
            t0().after(Duration::from_secs(2)).at,
        )
        .unwrap();
    // The caller sent CSeq 5 since (a re-INVITE); the callee nothing.
    let later = t0().after(Duration::from_secs(10));
    assert!(table
        .on_request(b"long", b"ftag", b"ttag", false, 5, later)
        .is_none());
    let due = t0().after(Duration::from_secs(2 + 60));
    assert_eq!(table.next_deadline(), Some(due.at));
    assert!(table
        .on_timer(t0().after(Duration::from_secs(61)))
        .is_empty());
    let expired = table.on_timer(due);
    assert_eq!(expired.len(), 1);
    let byes = &expired[0].byes;
    assert_eq!(byes.len(), 2);
    let to_caller = byes.iter().find(|b| b.to_side == Side::Caller).unwrap();
    assert_eq!(to_caller.request_uri.as_deref(), Some(CALLER.as_bytes()));
    assert_eq!(
        (&to_caller.from_tag[..], &to_caller.to_tag[..]),
        (&b"ttag"[..], &b"ftag"[..])
    );
    assert_eq!(to_caller.cseq, 1);
    let to_caller_at = to_caller.destination.as_ref().unwrap();
    assert_eq!(
        (to_caller_at.kind, to_caller_at.addr),
        (TransportKind::Udp, "127.0.0.1:5070".parse().unwrap())
    );
    let to_callee = byes.iter().find(|b| b.to_side == Side::Callee).unwrap();
    assert_eq!(to_callee.request_uri.as_deref(), Some(CALLEE.as_bytes()));
    assert_eq!(
        (&to_callee.from_tag[..], &to_callee.to_tag[..]),
        (&b"ftag"[..], &b"ttag"[..])
    );
    assert_eq!(to_callee.cseq, 6);
    assert_eq!(
        to_callee.route_set,
        vec![Bytes::from_static(b"<sip:127.0.0.1;lr>")]
    );
    let line = expired[0].cdr.to_json_line();
    assert!(line.contains("\"reason\":\"max_duration\""), "{line}");
    assert!(line.contains("\"duration\":60.000"), "{line}");
    assert!(line.contains("\"hangup\":\"proxy\""), "{line}");
    assert_eq!(table.get(id).unwrap().state, State::Terminated);
}

#[test]
fn the_in_dialog_check_admits_the_parties_only() {
    let mut table = table();
    established(&mut table, "c1");
    // The caller to the callee's target, the callee to the caller's (equivalent URIs match).
    assert_eq!(
        table.known(b"c1", b"ftag", b"ttag", false, CALLEE.as_bytes()),
        Known::Yes(Side::Caller)
    );
    assert_eq!(
        table.known(
            b"c1",
            b"ttag",
            b"ftag",
            false,
            b"sip:alice@127.0.0.1:5070;x=y"
        ),
        Known::Yes(Side::Callee)
    );
    // A captured Route sent by a stranger: other tags, or the dialog's tags to another host.
    assert_eq!(
        table.known(b"c1", b"evil", b"ttag", true, CALLEE.as_bytes()),
        Known::Unknown
    );
    assert_eq!(
        table.known(b"other", b"ftag", b"ttag", true, CALLEE.as_bytes()),
        Known::Untracked
    );
    assert_eq!(
        table.known(b"c1", b"ftag", b"ttag", false, b"sip:victim@127.0.0.9"),
        Known::WrongTarget
    );
    assert!(!Known::WrongTarget.admits());
    // The user part and parameters may change (a target refresh); host and port may not.
    assert_eq!(
        table.known(
            b"c1",
            b"ftag",
            b"ttag",
            false,
            b"sip:other@127.0.0.1:5080;ob"
        ),
        Known::Yes(Side::Caller)
    );
    assert_eq!(
        table.known(b"c1", b"ftag", b"ttag", false, b"sip:bob@127.0.0.1:5081"),
        Known::WrongTarget
    );
    table.refresh_target(
        b"c1",
        b"ttag",
        b"ftag",
        true,
        Bytes::from_static(b"sip:bob@127.0.0.1:5081"),
    );
    assert_eq!(
        table.known(b"c1", b"ftag", b"ttag", false, b"sip:bob@127.0.0.1:5081"),
        Known::Yes(Side::Caller)
    );
    // After the BYE: only a BYE passes, during the linger; then nothing.
    let end = t0().after(Duration::from_secs(9));
    table.on_request(b"c1", b"ftag", b"ttag", true, 2, end);
    assert_eq!(
        table.known(b"c1", b"ftag", b"ttag", false, CALLEE.as_bytes()),
        Known::Ended
    );
    assert_eq!(
        table.known(b"c1", b"ttag", b"ftag", true, CALLER.as_bytes()),
        Known::EndedBye(Side::Callee)
    );
    table.on_timer(end.after(Limits::default().linger));
    assert_eq!(
        table.known(b"c1", b"ftag", b"ttag", true, CALLEE.as_bytes()),
        Known::Untracked
    );
}

#[test]
fn the_table_refuses_past_its_count_and_memory_caps() {
    let limits = Limits {
        max_dialogs: 2,
        ..Limits::default()
    };
    let mut table = DialogTable::new(limits, Profiles::new());
    table.manage(invite("1"), t0()).unwrap();
    table.manage(invite("2"), t0()).unwrap();
    assert_eq!(table.manage(invite("3"), t0()), Err(Refusal::TooMany));
    assert_eq!(table.counters().refused, 1);

    let one = table.get(DialogId(1)).unwrap().footprint();
    let limits = Limits {
        memory_budget: one * 3 / 2,
        ..Limits::default()
    };
    let mut table = DialogTable::new(limits, Profiles::new());
    let id = table.manage(invite("1"), t0()).unwrap();
    assert_eq!(table.memory(), one);
    assert_eq!(table.manage(invite("2"), t0()), Err(Refusal::OutOfMemory));
    let big = "v".repeat(MAX_VAR_VALUE);
    let mut refused = false;
    for i in 0..MAX_VARS {
        match table.set_var(id, &format!("v{i}"), &big, false) {
            Ok(()) => {}
            Err(e) => {
                assert_eq!(e, Refusal::OutOfMemory);
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "variables are counted in the budget");
    assert!(table.memory() <= one * 3 / 2);
    assert_eq!(
        table.set_var(id, "x", &"v".repeat(MAX_VAR_VALUE + 1), false),
        Err(Refusal::TooLarge)
    );
}

#[test]
fn variables_marked_for_accounting_go_into_the_cdr() {
    let mut table = table();
    let id = established(&mut table, "c1");
    table.set_var(id, "tenant", "acme", true).unwrap();
    table.set_var(id, "secret", "x", false).unwrap();
    table.set_var(id, "tenant", "acme2", false).unwrap();
    assert_eq!(table.get(id).unwrap().var("tenant"), Some("acme2"));
    let cdr = table
        .on_request(b"c1", b"ftag", b"ttag", true, 2, t0())
        .unwrap();
    assert_eq!(cdr.extra, vec![("tenant".to_owned(), "acme2".to_owned())]);
}

#[test]
fn lost_byes_and_unanswered_calls_are_forgotten_by_their_lifetimes() {
    let limits = Limits::default();
    let mut table = table();
    let confirmed = established(&mut table, "lost-bye");
    let early = table.manage(invite("no-answer"), t0()).unwrap();
    let expired = table.on_timer(t0().after(limits.early_lifetime));
    assert_eq!(expired.len(), 1);
    assert_eq!(
        (expired[0].cdr.reason, expired[0].cdr.status),
        (EndReason::Timeout, 408)
    );
    assert_eq!(table.get(early).unwrap().state, State::Terminated);
    assert_eq!(table.get(confirmed).unwrap().state, State::Confirmed);
    let expired = table.on_timer(t0().after(limits.lifetime));
    assert_eq!(expired.len(), 1);
    assert!(expired[0].byes.is_empty(), "a lifetime end sends no BYE");
    assert_eq!(expired[0].cdr.reason, EndReason::Timeout);
}

#[test]
fn ctl_end_sends_byes_for_an_answered_call() {
    let mut table = table();
    let id = established(&mut table, "c1");
    let ended = table.end(id, t0()).unwrap();
    assert_eq!(ended.byes.len(), 2);
    assert_eq!(ended.cdr.reason, EndReason::Control);
    assert!(table.end(id, t0()).is_none());
}

/// `ctl dlg end` prints these texts after the Call-ID.
#[test]
fn end_answers_keep_their_texts() {
    use super::directory::{EndError, Ended};
    let ended = Ended {
        parties: vec!["caller", "callee"],
    };
    assert_eq!(ended.to_string(), "ended: BYE sent to caller and callee");
    let texts = [
        (
            EndError::LoopTakesNoCommands,
            "its event loop takes no commands",
        ),
        (
            EndError::TooManyWaiting,
            "its event loop has too many end requests waiting",
        ),
        (EndError::NoSuchCall, "no such call (it ended)"),
        (
            EndError::NotAnswered,
            "the call is not answered yet (only the caller can cancel it)",
        ),
    ];
    for (error, text) in texts {
        assert_eq!(error.to_string(), text);
    }
}

#[test]
fn an_invite_is_read_into_a_new_dialog() {
    let raw = "INVITE sip:bob@example.com SIP/2.0\r\n\
        Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
        From: \"Alice\" <sip:alice@example.com>;tag=ft\r\n\
        To: <sip:bob@example.com>\r\n\
        Call-ID: cid@host\r\n\
        CSeq: 7 INVITE\r\n\
        Contact: <sip:alice@127.0.0.1:5070>\r\n\
        Max-Forwards: 70\r\n\
        Content-Length: 0\r\n\r\n";
    let message = crate::sip::Message::parse(Bytes::from(raw)).unwrap();
    let meta = crate::transport::Meta {
        kind: TransportKind::Tcp,
        source: "127.0.0.1:40000".parse().unwrap(),
        local: "127.0.0.1:5060".parse().unwrap(),
        conn: None,
        worker: 0,
    };
    let new = new_dialog(&message, &meta).unwrap();
    assert_eq!(&new.call_id[..], b"cid@host");
    assert_eq!(&new.from_uri[..], b"sip:alice@example.com");
    assert_eq!(&new.from_tag[..], b"ft");
    assert_eq!(
        new.caller_contact.as_deref(),
        Some(&b"sip:alice@127.0.0.1:5070"[..])
    );
    assert_eq!(new.caller_cseq, 7);
    assert_eq!(new.transport, TransportKind::Tcp);
    let without_tag = raw.replace(";tag=ft", "");
    let message = crate::sip::Message::parse(Bytes::from(without_tag)).unwrap();
    assert!(new_dialog(&message, &meta).is_none());
}

#[test]
fn metrics_count_calls_by_state_and_reason_and_profiles_without_their_values() {
    let registry = crate::metrics::Registry::new();
    let profiles = Profiles::new();
    let metrics = DialogMetrics::register(&registry, &profiles);
    let mut table =
        DialogTable::new(Limits::default(), Arc::clone(&profiles)).with_metrics(metrics);
    let up = established(&mut table, "up");
    table.join_profile(up, "caller", "alice", None).unwrap();
    let ringing = table.manage(invite("ringing"), t0()).unwrap();
    table.join_profile(ringing, "caller", "bob", None).unwrap();
    let done = established(&mut table, "done");
    table.on_request(b"done", b"ttag", b"ftag", true, 1, t0());
    let text = registry.render();
    for line in [
        "moonroute_dialogs{state=\"early\"} 1",
        "moonroute_dialogs{state=\"confirmed\"} 1",
        "moonroute_dialogs_created_total 3",
        "moonroute_dialogs_ended_total{reason=\"callee_bye\"} 1",
        "moonroute_dialog_profile_calls{profile=\"caller\"} 2",
        "moonroute_dialog_profile_values{profile=\"caller\"} 2",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    assert!(!text.contains("alice"), "values are not labels");
    let _ = done;
    drop(table);
    let text = registry.render();
    assert!(
        text.contains("moonroute_dialogs{state=\"early\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("moonroute_dialogs{state=\"confirmed\"} 0"),
        "{text}"
    );
}

#[test]
fn a_typical_call_is_counted_about_two_kibibytes() {
    let mut table = table();
    let id = established(&mut table, "a84b4c76e66710@pc33.example.com");
    table
        .join_profile(id, "caller", "sip:alice@example.com", Some(2))
        .unwrap();
    table.set_var(id, "tenant", "acme", true).unwrap();
    let footprint = table.get(id).unwrap().footprint();
    assert_eq!(table.memory(), footprint);
    assert!((1024..3072).contains(&footprint), "{footprint} bytes");
}

#[test]
fn max_duration_counts_from_the_answer_or_from_when_it_is_set_on_an_answered_call() {
    let mut table = table();
    // Set on the INVITE: counted from the answer (t0 + 2 s).
    let id = table.manage(invite("before"), t0()).unwrap();
    table
        .set_max_duration(id, Duration::from_secs(30), t0().at)
        .unwrap();
    assert_eq!(
        table.next_deadline(),
        Some(t0().after(Duration::from_secs(300)).at)
    );
    answer(&mut table, id, "ttag", t0().after(Duration::from_secs(2)));
    assert_eq!(
        table.next_deadline(),
        Some(t0().after(Duration::from_secs(32)).at)
    );
    // Set again 10 s into the call (a re-INVITE's hook): 30 s from then.
    table
        .set_max_duration(
            id,
            Duration::from_secs(30),
            t0().after(Duration::from_secs(12)).at,
        )
        .unwrap();
    assert_eq!(
        table.next_deadline(),
        Some(t0().after(Duration::from_secs(42)).at)
    );
    // Zero removes it: the lifetime is what is left.
    table
        .set_max_duration(id, Duration::ZERO, t0().after(Duration::from_secs(12)).at)
        .unwrap();
    assert_eq!(
        table.next_deadline(),
        Some(t0().at + Limits::default().lifetime)
    );
}
