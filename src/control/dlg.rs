//! `moonroute ctl dlg ...`: the calls the event loops track (Kamailio's `kamcmd dlg.list`,
//! `dlg.dlg_list`), read from the shared [`Directory`]. [`command`] is a function of the
//! arguments, the directory and an explicit `now`. Commands:
//!
//! - `dlg list [FILTER]`: a count line, then one line per live call (early or confirmed),
//!   oldest first, those whose Call-ID, From, To or source contains FILTER when given; at most
//!   [`MAX_LISTED`], then `... N more calls not listed`:
//!
//!   ```text
//!   calls: 2 (1 early, 1 confirmed)
//!   a84b4c76e66710 confirmed 62s sip:alice@example.com -> sip:bob@example.com from udp:192.0.2.4:5060
//!   f81d4fae7dec11 early 3s sip:carol@example.com -> sip:bob@example.com from tcp:192.0.2.7:40311
//!   ```
//!
//!   The age is since the INVITE. Ended calls kept a few seconds for their BYE's retries are
//!   not listed.
//! - `dlg show CALL-ID`: every detail of the calls with that Call-ID, ended ones included; an
//!   error when there is none.
//! - `dlg count`: `early: N` and `confirmed: N` lines.
//! - `dlg end CALL-ID`: ends the confirmed calls with that Call-ID as Kamailio's `dlg.end_dlg`
//!   does: the loop owning each call (the request is queued to it and wakes it) sends a BYE
//!   to both parties and writes a CDR with reason `ctl`. One line per call, `CALL-ID: ended:
//!   BYE sent to caller and callee`, once the BYEs are sent (not answered). An early call is
//!   left alone (the caller may CANCEL it), said so in an error.
//!
//! Control characters in values are shown as spaces, so every field stays on its line.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Reply;
use crate::dialog::{Directory, State, Summary};

/// Most calls `dlg list` prints.
pub const MAX_LISTED: usize = 1000;

pub fn command(args: &[String], directory: &Directory, now: SystemTime) -> Reply {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["list"] => list(directory, None, now),
        ["list", filter] => list(directory, Some(filter), now),
        ["show", call_id] => show(directory, call_id, now),
        ["end", call_id] => end(directory, call_id),
        ["count"] => {
            let (early, confirmed) = counts(&directory.list());
            Reply::ok(format!("early: {early}\nconfirmed: {confirmed}\n"))
        }
        _ => Reply::error(
            "usage: dlg list [FILTER] | dlg show CALL-ID | dlg end CALL-ID | dlg count",
        ),
    }
}

fn counts(calls: &[Summary]) -> (usize, usize) {
    let of = |state| calls.iter().filter(|c| c.state == state).count();
    (of(State::Early), of(State::Confirmed))
}

fn list(directory: &Directory, filter: Option<&str>, now: SystemTime) -> Reply {
    let live: Vec<Summary> = directory
        .list()
        .into_iter()
        .filter(|c| c.state != State::Terminated)
        .filter(|c| {
            filter.is_none_or(|f| {
                [&c.call_id, &c.from_uri, &c.to_uri, &c.src]
                    .iter()
                    .any(|field| field.contains(f))
            })
        })
        .collect();
    let (early, confirmed) = counts(&live);
    let mut out = format!(
        "calls: {} ({early} early, {confirmed} confirmed)\n",
        live.len()
    );
    for call in live.iter().take(MAX_LISTED) {
        let _ = writeln!(
            out,
            "{} {} {} {} -> {} from {}",
            clean(&call.call_id),
            call.state.as_str(),
            age(call.created, now),
            clean(&call.from_uri),
            clean(&call.to_uri),
            call.src
        );
    }
    if live.len() > MAX_LISTED {
        let _ = writeln!(
            out,
            "... {} more calls not listed (dlg list FILTER narrows it)",
            live.len() - MAX_LISTED
        );
    }
    Reply::ok(out)
}

/// How long `dlg end` waits for a loop to send its BYEs: a loop answers at its next wake-up,
/// in milliseconds even under load; a stuck one is reported, not waited for.
const END_WAIT: Duration = Duration::from_secs(5);

fn end(directory: &Directory, call_id: &str) -> Reply {
    let calls: Vec<Summary> = directory
        .list()
        .into_iter()
        .filter(|c| c.call_id == call_id && c.state != State::Terminated)
        .collect();
    if calls.is_empty() {
        return Reply::error(format!("no live call with Call-ID {call_id:?} is tracked"));
    }
    let mut out = String::new();
    let mut failed = false;
    for call in &calls {
        let answer = match directory.request_end(call) {
            Ok(answer) => match answer.recv_timeout(END_WAIT) {
                Ok(Ok(ended)) => Ok(ended.to_string()),
                Ok(Err(why)) => Err(why.to_string()),
                Err(_) => Err("its event loop did not answer in 5 s".to_owned()),
            },
            Err(why) => Err(why.to_string()),
        };
        let line = match answer {
            Ok(done) => done,
            Err(why) => {
                failed = true;
                format!("not ended: {why}")
            }
        };
        let _ = writeln!(out, "{}: {line}", clean(&call.call_id));
    }
    match failed {
        true => Reply::error(out.trim_end().to_owned()),
        false => Reply::ok(out),
    }
}

fn show(directory: &Directory, call_id: &str, now: SystemTime) -> Reply {
    let calls: Vec<Summary> = directory
        .list()
        .into_iter()
        .filter(|c| c.call_id == call_id)
        .collect();
    if calls.is_empty() {
        return Reply::error(format!("no call with Call-ID {call_id:?} is tracked"));
    }
    let mut out = String::new();
    for call in calls {
        let _ = writeln!(out, "Call-ID: {}", clean(&call.call_id));
        let _ = writeln!(out, "  State: {}", call.state.as_str());
        let _ = writeln!(
            out,
            "  From: <{}>;tag={}",
            clean(&call.from_uri),
            clean(&call.from_tag)
        );
        let to_tag = call.to_tag.as_deref().map(clean).unwrap_or_default();
        let _ = writeln!(out, "  To: <{}>;tag={to_tag}", clean(&call.to_uri));
        let _ = writeln!(out, "  Source: {}", call.src);
        if let Some(contact) = &call.callee_contact {
            let _ = writeln!(out, "  Callee: {}", clean(contact));
        }
        let _ = writeln!(
            out,
            "  Started: {} ({} ago)",
            epoch(call.created),
            age(call.created, now)
        );
        if let Some(answered) = call.answered {
            let _ = writeln!(
                out,
                "  Answered: {} ({} ago)",
                epoch(answered),
                age(answered, now)
            );
        }
        if let Some(ended) = call.ended {
            let _ = writeln!(out, "  Ended: {} ({} ago)", epoch(ended), age(ended, now));
        }
        if !call.profiles.is_empty() {
            let profiles: Vec<String> = call.profiles.iter().map(|p| clean(p)).collect();
            let _ = writeln!(out, "  Profiles: {}", profiles.join(", "));
        }
        let _ = writeln!(out, "  Event loop: {}", call.loop_index);
    }
    Reply::ok(out)
}

fn age(since: SystemTime, now: SystemTime) -> String {
    format!(
        "{}s",
        now.duration_since(since).unwrap_or_default().as_secs()
    )
}

fn epoch(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}

fn clean(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialog::{DialogTable, Limits, NewDialog, Profiles, Stamp};
    use crate::transport::TransportKind;
    use bytes::Bytes;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// alice's INVITE to bob from udp:127.0.0.1:5070 as a new dialog; `call_id` as given,
    /// even with characters no parsed message has (the listing must escape them).
    fn invite(call_id: &str) -> NewDialog {
        NewDialog {
            call_id: Bytes::copy_from_slice(call_id.as_bytes()),
            from_uri: Bytes::from_static(b"sip:alice@example.com"),
            from_tag: Bytes::from_static(b"ftag"),
            to_uri: Bytes::from_static(b"sip:bob@example.com"),
            caller_contact: Some(Bytes::from_static(b"sip:alice@127.0.0.1:5070")),
            caller_cseq: 1,
            source: "127.0.0.1:5070".parse().unwrap(),
            transport: TransportKind::Udp,
            conn: None,
            request_uri: Bytes::from_static(b"sip:bob@example.com"),
        }
    }

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn list_show_and_count_read_every_loops_calls() {
        let directory = Directory::new();
        let profiles = Profiles::new();
        let start = Stamp {
            at: Instant::now(),
            wall: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        };
        let mut first = DialogTable::new(Limits::default(), Arc::clone(&profiles))
            .with_directory(Arc::clone(&directory), 0);
        let mut second = DialogTable::new(Limits::default(), Arc::clone(&profiles))
            .with_directory(Arc::clone(&directory), 1);
        let up = first.manage(invite("up\r\n@x"), start).unwrap();
        first.join_profile(up, "caller", "alice", None).unwrap();
        first.on_invite_response(
            up,
            200,
            Some(b"tt"),
            Some(Bytes::from_static(b"sip:bob@192.0.2.5")),
            Vec::new(),
            None,
            start.after(Duration::from_secs(2)),
        );
        second
            .manage(invite("ringing"), start.after(Duration::from_secs(5)))
            .unwrap();
        let now = start.wall + Duration::from_secs(62);

        let reply = command(&args(&["list"]), &directory, now);
        assert!(reply.ok);
        assert_eq!(
            reply.text,
            "calls: 2 (1 early, 1 confirmed)\n\
             up  @x confirmed 62s sip:alice@example.com -> sip:bob@example.com from udp:127.0.0.1:5070\n\
             ringing early 57s sip:alice@example.com -> sip:bob@example.com from udp:127.0.0.1:5070\n"
        );
        let reply = command(&args(&["list", "ring"]), &directory, now);
        assert!(
            reply.text.starts_with("calls: 1 (1 early, 0 confirmed)\n"),
            "{}",
            reply.text
        );

        let reply = command(&args(&["show", "up\r\n@x"]), &directory, now);
        assert!(reply.ok);
        for line in [
            "  State: confirmed\n",
            "  To: <sip:bob@example.com>;tag=tt\n",
            "  From: <sip:alice@example.com>;tag=ftag\n",
            "  Callee: sip:bob@192.0.2.5\n",
            "  Answered: 1700000002.000 (60s ago)\n",
            "  Profiles: caller=alice\n",
            "  Event loop: 0\n",
        ] {
            assert!(reply.text.contains(line), "{line:?} in\n{}", reply.text);
        }
        assert!(!command(&args(&["show", "nope"]), &directory, now).ok);
        assert_eq!(
            command(&args(&["count"]), &directory, now).text,
            "early: 1\nconfirmed: 1\n"
        );
        assert!(!command(&args(&["end"]), &directory, now).ok);

        // A loop's calls leave the directory with it.
        drop(second);
        assert_eq!(
            command(&args(&["count"]), &directory, now).text,
            "early: 0\nconfirmed: 1\n"
        );
    }
}
