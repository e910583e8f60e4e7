//! `moonroute ctl kv ...`: the `sip.kv` store from the command line (Kamailio's
//! `kamcmd htable.get|sets|delete|dump`), e.g. to lift a ban a script set without editing
//! the script. [`command`] is a function of the arguments, the store and an explicit `now`.
//!
//! - `kv get KEY`: the value (`KEY = 42 (ttl 51 s)`), or an error when absent or expired;
//! - `kv set KEY VALUE [TTL]`: stores VALUE, an integer when it reads as one (so a script's
//!   `sip.kv.incr` keeps counting it), else a string; TTL in seconds, none: never expires;
//! - `kv del KEY`: removes it (`ok` either way, the body says whether it was there);
//! - `kv list [PREFIX]`: the live entries whose key starts with PREFIX, sorted, at most
//!   [`LIST_LIMIT`], one `KEY = VALUE [(ttl N s)]` line each, strings quoted.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::Reply;
use crate::script::kv::{KvStore, KvValue};

/// The `kv` commands, for usage and error messages.
pub const USAGE: &str = "kv get KEY, kv set KEY VALUE [TTL], kv del KEY, kv list [PREFIX]";

/// The most entries `kv list` shows.
pub const LIST_LIMIT: usize = 1000;

/// Runs `kv ARGS...` (the arguments after `kv`).
pub fn command(args: &[String], store: &KvStore, now: Instant) -> Reply {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["get", key] => match store.get(key, now) {
            Some(value) => Reply::ok(line(key, &value, store.ttl(key, now))),
            None => Reply::error(format!("kv: {key:?} is not set")),
        },
        ["set", key, value] => set(store, key, value, None, now),
        ["set", key, value, ttl] => match ttl.parse::<u64>() {
            Ok(secs) if secs > 0 => set(store, key, value, Some(Duration::from_secs(secs)), now),
            _ => Reply::error(format!(
                "kv set: TTL must be a positive number of seconds, not {ttl:?}"
            )),
        },
        ["del", key] => Reply::ok(if store.delete(key) {
            format!("{key} deleted\n")
        } else {
            format!("{key} was not set\n")
        }),
        ["list"] => list(store, "", now),
        ["list", prefix] => list(store, prefix, now),
        _ => Reply::error(format!("usage: {USAGE}")),
    }
}

fn set(store: &KvStore, key: &str, value: &str, ttl: Option<Duration>, now: Instant) -> Reply {
    let value = match value.parse::<i64>() {
        Ok(n) => KvValue::Int(n),
        Err(_) => KvValue::Str(value.to_owned()),
    };
    match store.set(key, value.clone(), ttl, now) {
        Ok(()) => Reply::ok(line(key, &value, ttl)),
        Err(e) => Reply::error(format!("kv set: {e}")),
    }
}

fn list(store: &KvStore, prefix: &str, now: Instant) -> Reply {
    let (entries, more) = match store.list(prefix, LIST_LIMIT, now) {
        Ok(listing) => listing,
        Err(e) => return Reply::error(format!("kv list: {e}")),
    };
    let mut text = String::new();
    for (key, value, ttl) in &entries {
        text.push_str(&line(key, value, *ttl));
    }
    if more {
        let _ = writeln!(text, "(first {LIST_LIMIT} shown: give a longer prefix)");
    }
    Reply::ok(text)
}

fn line(key: &str, value: &KvValue, ttl: Option<Duration>) -> String {
    let value = match value {
        KvValue::Int(n) => n.to_string(),
        KvValue::Str(s) => format!("{s:?}"),
    };
    match ttl {
        Some(left) => format!("{key} = {value} (ttl {} s)\n", left.as_secs()),
        None => format!("{key} = {value}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a command line as typed after `moonroute ctl`: `kv list ban:`.
    fn run(store: &KvStore, line: &str, now: Instant) -> Reply {
        let args: Vec<String> = line.split_whitespace().skip(1).map(str::to_owned).collect();
        command(&args, store, now)
    }

    #[test]
    fn an_operator_lifts_a_ban() {
        let store = KvStore::new(100);
        let now = Instant::now();
        store
            .set(
                "ban:127.0.0.9",
                KvValue::Int(1),
                Some(Duration::from_secs(600)),
                now,
            )
            .unwrap();
        store
            .set("ban:127.0.0.8", KvValue::Str("auth".into()), None, now)
            .unwrap();
        store
            .set("fail:127.0.0.9", KvValue::Int(5), None, now)
            .unwrap();
        assert_eq!(
            run(&store, "kv list ban:", now),
            Reply::ok("ban:127.0.0.8 = \"auth\"\nban:127.0.0.9 = 1 (ttl 600 s)\n")
        );
        assert_eq!(
            run(&store, "kv get fail:127.0.0.9", now),
            Reply::ok("fail:127.0.0.9 = 5\n")
        );
        assert_eq!(
            run(&store, "kv del ban:127.0.0.9", now),
            Reply::ok("ban:127.0.0.9 deleted\n")
        );
        assert!(!run(&store, "kv get ban:127.0.0.9", now).ok);
        assert_eq!(
            run(&store, "kv del ban:127.0.0.9", now),
            Reply::ok("ban:127.0.0.9 was not set\n")
        );
        // Expired entries are not listed.
        let later = now + Duration::from_secs(601);
        assert_eq!(run(&store, "kv list", later).text.lines().count(), 2);
    }

    #[test]
    fn set_stores_integers_as_integers() {
        let store = KvStore::new(100);
        let now = Instant::now();
        assert_eq!(
            run(&store, "kv set limit:alice 10 60", now),
            Reply::ok("limit:alice = 10 (ttl 60 s)\n")
        );
        assert_eq!(store.incr("limit:alice", 1, None, now), Ok(11));
        run(&store, "kv set note hello", now);
        assert_eq!(store.get("note", now), Some(KvValue::Str("hello".into())));
        assert!(!run(&store, "kv set k v 0", now).ok);
        assert!(!run(&store, "kv frobnicate", now).ok);
    }
}
