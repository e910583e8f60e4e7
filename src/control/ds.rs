//! `moonroute ctl ds ...`: the operator's commands for the dispatcher (Kamailio's
//! `kamcmd dispatcher.list|set_state|reload`).
//!
//! [`command`] is the whole of it, a function of the arguments, the [`Dispatcher`] and an
//! explicit `now`; `moonroute`'s control handler calls it for `ds`. Commands:
//!
//! - `ds list [SET]`: every destination of every set (or of SET), set by set in configured
//!   order, one line each:
//!
//!   ```text
//!   set 1
//!     sip:10.0.0.1:5060 state=active weight=1 priority=0 calls=3 sent=1200 failovers=0 probes_failed=0 last_probe=200 (2.1 s ago)
//!     sip:10.0.0.2:5060 state=inactive weight=1 priority=0 calls=0 sent=950 failovers=4 probes_failed=12 last_probe=timeout (0.4 s ago) attrs="gw=b"
//!   ```
//!
//!   `calls` is the INVITE transactions in progress through this node, `sent` the requests
//!   sent there first or on failover, `failovers` the failures there that moved a request on,
//!   `probes_failed` since start; `last_probe` is `never` before the first answer;
//! - `ds set URI STATE`: sets a destination's state: `active`, `inactive`, `disabled` (no
//!   probes, no calls until set again) or `probing` (probed at once, a last resort meanwhile);
//! - `ds reload`: reads the sets file again (`[dispatcher] sets_file`); a file that does not
//!   read, parse or validate is refused and the old sets keep serving. Destinations still
//!   listed keep their state and counters.

use std::fmt::Write as _;
use std::time::Instant;

use super::Reply;
use crate::dispatcher::{DestinationView, Dispatcher, State};

/// The `ds` commands, for usage and error messages.
pub const USAGE: &str = "ds list [SET], ds set URI active|inactive|disabled|probing, ds reload";

/// Runs `ds ARGS...` (the arguments after `ds`).
pub fn command(args: &[String], dispatcher: &Dispatcher, now: Instant) -> Reply {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["list"] => list(dispatcher, None, now),
        ["list", set] => match set.parse::<u32>() {
            Ok(id) if dispatcher.set_ids().contains(&id) => list(dispatcher, Some(id), now),
            Ok(id) => Reply::error(format!("ds list: no dispatcher set {id}")),
            Err(_) => Reply::error(format!("ds list: {set:?} is not a set id")),
        },
        ["set", uri, state] => {
            let state = match State::parse(state) {
                Ok(state) => state,
                Err(e) => return Reply::error(format!("ds set: {e}")),
            };
            match dispatcher.mark(uri, state, "moonroute ctl") {
                Ok(()) => Reply::ok(format!("{uri}: {state}")),
                Err(e) => Reply::error(format!("ds set: {e}")),
            }
        }
        ["reload"] => match dispatcher.reload() {
            Ok((sets, destinations)) => Reply::ok(format!(
                "dispatcher reloaded: {sets} sets, {destinations} destinations"
            )),
            Err(e) => Reply::error(format!(
                "dispatcher sets refused, the old sets keep serving: {e}"
            )),
        },
        _ => Reply::error(format!("usage: {USAGE}")),
    }
}

fn list(dispatcher: &Dispatcher, set: Option<u32>, now: Instant) -> Reply {
    let views = dispatcher.list(set, now);
    if views.is_empty() {
        return Reply::ok("no dispatcher sets\n");
    }
    let mut text = String::new();
    let mut current = None;
    for view in &views {
        if current != Some(view.set) {
            current = Some(view.set);
            let _ = writeln!(text, "set {}", view.set);
        }
        let _ = writeln!(text, "  {}", line(view));
    }
    Reply::ok(text)
}

/// One destination's line, without the indent.
fn line(view: &DestinationView) -> String {
    let mut line = format!(
        "{} state={} weight={} priority={} calls={} sent={} failovers={} probes_failed={} last_probe=",
        printable(&view.uri),
        view.state,
        view.weight,
        view.priority,
        view.calls,
        view.sent,
        view.failovers,
        view.probes_failed,
    );
    match view.last_probe {
        Some((outcome, age)) => {
            let _ = write!(line, "{outcome} ({:.1} s ago)", age.as_secs_f64());
        }
        None => line.push_str("never"),
    }
    if !view.attrs.is_empty() {
        let _ = write!(line, " attrs=\"{}\"", printable(&view.attrs));
    }
    line
}

/// Control characters as spaces: every destination stays on its line.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatcher::{DestinationConfig, ProbeOutcome, Rules, SetConfig};
    use std::time::Duration;

    fn dispatcher(file: Option<std::path::PathBuf>) -> Dispatcher {
        let set = SetConfig {
            id: 1,
            destinations: ["sip:127.0.0.2:5070", "sip:127.0.0.3:5070"]
                .iter()
                .map(|uri| DestinationConfig {
                    uri: (*uri).to_owned(),
                    weight: 2,
                    priority: 0,
                    attrs: if uri.contains(".3") {
                        "gw=b".to_owned()
                    } else {
                        String::new()
                    },
                })
                .collect(),
        };
        Dispatcher::new(Rules::default(), vec![set], file).unwrap()
    }

    fn run(dispatcher: &Dispatcher, args: &[&str], now: Instant) -> Reply {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        command(&args, dispatcher, now)
    }

    #[test]
    fn list_shows_states_counters_and_the_last_probe() {
        let ds = dispatcher(None);
        let start = Instant::now();
        assert_eq!(ds.due_probes(start).len(), 2);
        ds.probe_answered("sip:127.0.0.2:5070", ProbeOutcome::Reply(200), start);
        let reply = run(&ds, &["list"], start + Duration::from_millis(1500));
        assert!(reply.ok);
        assert_eq!(
            reply.text,
            "set 1\n  sip:127.0.0.2:5070 state=active weight=2 priority=0 calls=0 sent=0 failovers=0 probes_failed=0 last_probe=200 (1.5 s ago)\n  sip:127.0.0.3:5070 state=probing weight=2 priority=0 calls=0 sent=0 failovers=0 probes_failed=0 last_probe=never attrs=\"gw=b\"\n"
        );
        assert!(run(&ds, &["list", "1"], start).ok);
        assert!(run(&ds, &["list", "2"], start)
            .text
            .contains("no dispatcher set 2"));
        assert!(!run(&ds, &["list", "x"], start).ok);
    }

    #[test]
    fn set_changes_a_state_and_refuses_unknown_uris_and_states() {
        let ds = dispatcher(None);
        let now = Instant::now();
        let reply = run(&ds, &["set", "sip:127.0.0.3:5070", "inactive"], now);
        assert_eq!(reply, Reply::ok("sip:127.0.0.3:5070: inactive"));
        assert_eq!(ds.state("sip:127.0.0.3:5070"), Some(State::Inactive));
        assert!(!run(&ds, &["set", "sip:127.0.0.9", "active"], now).ok);
        let bad = run(&ds, &["set", "sip:127.0.0.3:5070", "up"], now);
        assert!(
            !bad.ok && bad.text.contains("unknown state"),
            "{}",
            bad.text
        );
        assert!(!run(&ds, &["set"], now).ok);
    }

    #[test]
    fn reload_refuses_a_bad_file_and_keeps_the_old_sets() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sets.toml");
        std::fs::write(
            &file,
            "[[set]]\nid = 2\ndestinations = [{ uri = \"sip:127.0.0.4\" }]\n",
        )
        .unwrap();
        let ds = dispatcher(Some(file.clone()));
        let now = Instant::now();
        std::fs::write(&file, "[[set]]\nid = 2\ndestinations = []\n").unwrap();
        let refused = run(&ds, &["reload"], now);
        assert!(!refused.ok);
        assert!(
            refused.text.contains("old sets keep serving"),
            "{}",
            refused.text
        );
        assert_eq!(ds.set_ids(), vec![1, 2]);
        std::fs::write(
            &file,
            "[[set]]\nid = 3\ndestinations = [{ uri = \"sip:127.0.0.5\" }, { uri = \"sip:127.0.0.6\" }]\n",
        )
        .unwrap();
        let accepted = run(&ds, &["reload"], now);
        assert_eq!(
            accepted,
            Reply::ok("dispatcher reloaded: 2 sets, 4 destinations")
        );
        assert_eq!(ds.set_ids(), vec![1, 3]);
    }
}
