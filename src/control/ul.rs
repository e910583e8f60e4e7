//! `moonroute ctl ul ...`: the operator's commands for the location database (Kamailio's
//! `kamctl ul`).
//!
//! [`command`] is the whole of it, a function of the arguments, the [`Registrar`] (its store
//! and its expiry rules) and an explicit `now`; `moonroute`'s control handler calls it for
//! `ul`. Commands:
//!
//! - `ul show` lists every AOR with its unexpired bindings, sorted by AOR; at most
//!   [`MAX_LISTED_AORS`] AORs (and about [`MAX_LISTING_BYTES`]), then a line
//!   `... N more AORs not listed (ul show AOR shows one)`. With no binding at all the body
//!   is `no bindings`;
//! - `ul show AOR` lists one AOR (normalized by the registrar's [`AorRule`], as a REGISTER's
//!   To is, so `sip:Alice@EXAMPLE.com` finds `sip:Alice@example.com`, and with a listener on
//!   127.0.0.1:5060 `sip:bob@127.0.0.1:5060` finds `sip:bob@127.0.0.1`); an error
//!   `AOR ... not found` when it has no binding;
//! - `ul rm AOR [CONTACT]` removes every binding of the AOR, or the one whose contact is
//!   equivalent to CONTACT (RFC 3261 §19.1.4); an error when nothing matched;
//! - `ul add AOR CONTACT [EXPIRES]` adds a binding, or replaces the one with an equivalent
//!   contact. EXPIRES defaults to `registrar.default_expires` and is lowered to
//!   `registrar.max_expires`; 0 removes the binding (an error when there is none). The binding
//!   gets q 1, Call-ID `ctl-...`, CSeq 1 and no source or local address;
//! - `ul count`: `aors: N` and `bindings: N` lines (unexpired only).
//!
//! AOR and CONTACT are URIs, optionally in `<>` (so a contact can be copied from `ul show`).
//!
//! # `ul show` format
//!
//! ```text
//! AOR: sip:alice@example.com
//!   Contact: <sip:alice@192.0.2.10:5060;transport=tcp>;expires=3597;q=0.5
//!     Call-ID: a84b4c76e66710@pc33.example.com
//!     CSeq: 314159
//!     Received: tcp:192.0.2.10:40312
//!     Socket: tcp:198.51.100.1:5060
//!     Path: <sip:edge.example.com;lr>
//!     +sip.instance: <urn:uuid:00000000-0000-1000-8000-000a95a0e128>
//!     reg-id: 1
//!     User-Agent: softphone/1.0
//!   Contact: <sip:alice@192.0.2.20>;expires=600;q=1
//!     Call-ID: ctl-1735689600000-1
//!     CSeq: 1
//! ```
//!
//! One `AOR:` line per AOR, then one block per binding, highest q first (as a proxy forks to
//! them): the `Contact:` line (expires = seconds left, rounded up; q always written), then,
//! indented, `Call-ID:` and `CSeq:`, and only when known `Received:` (transport and source
//! address of the REGISTER), `Socket:` (our address it arrived on), `Path:` (the Path values,
//! comma-separated), `+sip.instance:`, `reg-id:` and `User-Agent:`. Control characters in
//! values are shown as spaces, so every field stays on its line.
//!
//! # Durability
//!
//! Every change is one [`LocationStore::update`] (atomic per AOR, like a REGISTER) and is
//! answered only once its [`Commit`] is durable, waiting at most [`COMMIT_TIMEOUT`]. That wait
//! blocks the calling thread: the control server runs handlers on tokio's blocking pool
//! (`spawn_blocking`), never on an event loop, so this is harmless. Reads (`show`, `count`)
//! come from memory and do not wait: they may list a REGISTER's binding whose flush is still
//! under way.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Reply;
use crate::location::{Binding, Commit, LocationStore};
use crate::registrar::{format_q, AorRule, Registrar, MAX_BINDINGS_PER_AOR};
use crate::sip::name_addr::parse_delta_seconds;
use crate::sip::Uri;

/// The most AORs an unfiltered `ul show` lists.
pub const MAX_LISTED_AORS: usize = 1000;

/// An unfiltered `ul show` stops listing once its reply is this large (the client accepts at
/// most 16 MiB).
pub const MAX_LISTING_BYTES: usize = 4 * 1024 * 1024;

/// How long a change waits for the disk before the command answers with an error.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `ul` commands, for usage and error messages.
pub const USAGE: &str =
    "ul show [AOR] | ul rm AOR [CONTACT] | ul add AOR CONTACT [EXPIRES] | ul count";

/// Numbers the Call-IDs of bindings added by `ul add`.
static ADDED: AtomicU64 = AtomicU64::new(0);

/// Runs `ul ARGS...`: `args` are the arguments after `ul` (`["show", "sip:alice@example.com"]`).
/// May block up to [`COMMIT_TIMEOUT`] waiting for the disk (see the module documentation).
pub fn command(args: &[String], registrar: &Registrar, now: SystemTime) -> Reply {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let store = registrar.store().as_ref();
    let result = match args.as_slice() {
        ["show"] => Ok(show_all(store, now, MAX_LISTED_AORS, MAX_LISTING_BYTES)),
        ["show", aor] => show_one(registrar, aor, now),
        ["rm", aor] => remove(registrar, aor, None, now),
        ["rm", aor, contact] => remove(registrar, aor, Some(contact), now),
        ["add", aor, contact] => add(registrar, aor, contact, None, now),
        ["add", aor, contact, expires] => add(registrar, aor, contact, Some(expires), now),
        ["count"] => Ok(count(store, now)),
        [sub @ ("show" | "rm" | "add" | "count"), ..] => Err(format!(
            "wrong number of arguments for ul {sub}; usage: {}",
            usage_of(sub)
        )),
        [other, ..] => Err(format!("unknown ul command {other:?}; commands: {USAGE}")),
        [] => Err(format!("ul needs a command: {USAGE}")),
    };
    match result {
        Ok(text) => Reply::ok(text),
        Err(text) => Reply::error(text),
    }
}

fn usage_of(sub: &str) -> &'static str {
    match sub {
        "show" => "ul show [AOR]",
        "rm" => "ul rm AOR [CONTACT]",
        "add" => "ul add AOR CONTACT [EXPIRES]",
        _ => "ul count",
    }
}

/// Every AOR with unexpired bindings, in order, at most `max_aors` of them and stopping once
/// the text reaches `max_bytes`.
fn show_all(
    store: &dyn LocationStore,
    now: SystemTime,
    max_aors: usize,
    max_bytes: usize,
) -> String {
    let mut out = String::new();
    let mut listed = 0;
    let mut more = 0;
    for aor in store.aors() {
        let bindings = store.lookup(&aor, now);
        if bindings.is_empty() {
            // Expired, not yet swept.
            continue;
        }
        if listed >= max_aors || out.len() >= max_bytes {
            more += 1;
            continue;
        }
        write_aor(&mut out, &aor, &bindings, now);
        listed += 1;
    }
    if listed == 0 {
        out.push_str("no bindings\n");
    }
    if more > 0 {
        let _ = writeln!(
            out,
            "... {more} more AOR{} not listed (ul show AOR shows one)",
            plural(more)
        );
    }
    out
}

fn show_one(registrar: &Registrar, aor: &str, now: SystemTime) -> Result<String, String> {
    let key = parse_aor(registrar.aor_rule(), aor)?;
    let bindings = registrar.store().lookup(&key, now);
    if bindings.is_empty() {
        return Err(format!("AOR {key} not found"));
    }
    let mut out = String::new();
    write_aor(&mut out, &key, &bindings, now);
    Ok(out)
}

fn write_aor(out: &mut String, aor: &str, bindings: &[Binding], now: SystemTime) {
    let _ = writeln!(out, "AOR: {}", clean(aor));
    for b in bindings {
        write_binding(out, b, now);
    }
}

fn write_binding(out: &mut String, b: &Binding, now: SystemTime) {
    let _ = writeln!(out, "  Contact: {}", contact_line(b, now));
    let _ = writeln!(out, "    Call-ID: {}", clean(&b.call_id));
    let _ = writeln!(out, "    CSeq: {}", b.cseq);
    if let Some((kind, addr)) = &b.received {
        // A NATed binding is reached there (and kept alive), not at its contact's address.
        let nat = if b.nated { " (NAT: routed here)" } else { "" };
        let _ = writeln!(out, "    Received: {}:{addr}{nat}", kind.scheme());
    }
    if let Some(local) = &b.local {
        // The REGISTER arrived on our socket of the transport it came over.
        match &b.received {
            Some((kind, _)) => {
                let _ = writeln!(out, "    Socket: {}:{local}", kind.scheme());
            }
            None => {
                let _ = writeln!(out, "    Socket: {local}");
            }
        }
    }
    if !b.path.is_empty() {
        let _ = writeln!(out, "    Path: {}", clean(&b.path.join(", ")));
    }
    if let Some(node) = &b.node {
        // The node of a cluster it registered through; another node reaches a connection or
        // NAT pinhole only through it (`crate::cluster`).
        let through = if b.owner_route.is_some() {
            " (other nodes route through it)"
        } else {
            ""
        };
        let _ = writeln!(out, "    Node: {}{through}", clean(node));
    }
    if let Some(instance) = &b.instance {
        let _ = writeln!(out, "    +sip.instance: {}", clean(instance));
    }
    if let Some(reg_id) = b.reg_id {
        let _ = writeln!(out, "    reg-id: {reg_id}");
    }
    if let Some(ua) = &b.user_agent {
        let _ = writeln!(out, "    User-Agent: {}", clean(ua));
    }
}

/// `<uri>;expires=SECONDS_LEFT;q=Q`, the seconds rounded up as in a REGISTER's 200.
fn contact_line(b: &Binding, now: SystemTime) -> String {
    format!(
        "<{}>;expires={};q={}",
        clean(&b.contact),
        b.seconds_left(now),
        format_q(b.q)
    )
}

/// `text` with control characters (a folded header's line break...) shown as spaces.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `bindings: N` and `aors: N`, unexpired only.
fn count(store: &dyn LocationStore, now: SystemTime) -> String {
    let (mut aors, mut bindings) = (0usize, 0usize);
    for aor in store.aors() {
        let n = store.lookup(&aor, now).len();
        if n > 0 {
            aors += 1;
            bindings += n;
        }
    }
    format!("aors: {aors}\nbindings: {bindings}\n")
}

/// `text` without surrounding `<>`, when it has both.
fn unbracket(text: &str) -> &str {
    let text = text.trim();
    text.strip_prefix('<')
        .and_then(|t| t.strip_suffix('>'))
        .unwrap_or(text)
}

/// The normalized AOR of `text` (a URI or a name-addr), as a REGISTER's To gives it.
fn parse_aor(aors: &AorRule, text: &str) -> Result<String, String> {
    aors.of_text(text)
        .ok_or_else(|| format!("{text:?} is not a sip: or sips: address-of-record"))
}

/// CONTACT checked: the bare URI (no `<>`) and its parse.
fn parse_contact(text: &str) -> Result<(&str, Uri<'_>), String> {
    let bare = unbracket(text);
    Uri::parse(bare.as_bytes())
        .map(|uri| (bare, uri))
        .map_err(|e| format!("{text:?} is not a valid contact URI ({e})"))
}

/// Whether a stored contact is `wanted`: RFC 3261 §19.1.4 equivalence for SIP URIs, byte
/// equality for other schemes (as the registrar matches a REGISTER's contacts).
fn same_contact(stored: &str, wanted: &Uri<'_>) -> bool {
    match (Uri::parse(stored.as_bytes()), wanted) {
        (Ok(Uri::Sip(a)), Uri::Sip(b)) => a.equivalent(b),
        _ => stored.as_bytes() == wanted.raw(),
    }
}

/// Waits until the change is on disk; `done` is the reply once it is.
fn durable(commit: Commit, aor: &str, done: String) -> Result<String, String> {
    match commit.wait(COMMIT_TIMEOUT) {
        Ok(()) => Ok(done),
        Err(e) => Err(format!(
            "{aor}: changed in memory, but the write to disk is not confirmed ({e})"
        )),
    }
}

fn remove(
    registrar: &Registrar,
    aor: &str,
    contact: Option<&str>,
    now: SystemTime,
) -> Result<String, String> {
    let key = parse_aor(registrar.aor_rule(), aor)?;
    let wanted = contact.map(parse_contact).transpose()?;
    let mut removed = 0;
    let commit = store_update(registrar.store().as_ref(), &key, now, &mut |current| {
        let before = current.len();
        let kept: Vec<Binding> = match &wanted {
            None => Vec::new(),
            Some((_, uri)) => current
                .into_iter()
                .filter(|b| !same_contact(&b.contact, uri))
                .collect(),
        };
        removed = before - kept.len();
        (removed > 0).then_some(kept)
    })?;
    if removed == 0 {
        return Err(match &wanted {
            Some((bare, _)) => format!("AOR {key} has no binding for {bare}"),
            None => format!("AOR {key} not found"),
        });
    }
    durable(
        commit,
        &key,
        format!("{key}: removed {removed} binding{}\n", plural(removed)),
    )
}

fn add(
    registrar: &Registrar,
    aor: &str,
    contact: &str,
    expires: Option<&str>,
    now: SystemTime,
) -> Result<String, String> {
    let key = parse_aor(registrar.aor_rule(), aor)?;
    let (bare, uri) = parse_contact(contact)?;
    let rules = registrar.rules();
    let asked = match expires {
        None => rules.default_expires,
        Some(text) => parse_delta_seconds(text.trim().as_bytes())
            .ok_or_else(|| format!("{text:?} is not an expiry in seconds"))?,
    };
    if asked == 0 {
        return remove(registrar, aor, Some(contact), now);
    }
    let expires = asked.min(rules.max_expires);
    let call_id = format!(
        "ctl-{}-{}",
        now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()),
        ADDED.fetch_add(1, Ordering::Relaxed) + 1
    );
    let expires_at = now
        .checked_add(Duration::from_secs(u64::from(expires)))
        .unwrap_or(now);
    let binding = Binding::new(&key, bare, expires_at, 1000, call_id, 1);
    let line = contact_line(&binding, now);
    let mut replaced = false;
    let mut full = false;
    let commit = store_update(registrar.store().as_ref(), &key, now, &mut |mut current| {
        match current.iter().position(|b| same_contact(&b.contact, &uri)) {
            Some(at) => {
                // Keep the binding's place; drop any other equivalent copy.
                current[at] = binding.clone();
                let mut index = 0;
                current.retain(|b| {
                    let keep = index == at || !same_contact(&b.contact, &uri);
                    index += 1;
                    keep
                });
                replaced = true;
            }
            None if current.len() >= MAX_BINDINGS_PER_AOR => {
                full = true;
                return None;
            }
            None => current.push(binding.clone()),
        }
        Some(current)
    })?;
    if full {
        return Err(format!(
            "AOR {key} already has {MAX_BINDINGS_PER_AOR} bindings, the most one AOR may have"
        ));
    }
    let mut done = format!(
        "{key}: {} {line}",
        if replaced { "replaced" } else { "added" }
    );
    if expires < asked {
        let _ = write!(
            done,
            " (expires lowered from {asked} to registrar.max_expires)"
        );
    }
    done.push('\n');
    durable(commit, &key, done)
}

/// [`LocationStore::update`] of `key`, atomic for the AOR; a refusal as the error reply.
fn store_update(
    store: &dyn LocationStore,
    key: &str,
    now: SystemTime,
    f: &mut dyn FnMut(Vec<Binding>) -> Option<Vec<Binding>>,
) -> Result<Commit, String> {
    store
        .update(key, now, f)
        .map_err(|e| format!("{key}: location store: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::location::{MemoryLocation, SledLocation};
    use crate::registrar::Rules;
    use crate::transport::TransportKind;
    use std::sync::Arc;

    const ALICE: &str = "sip:alice@example.com";

    fn rules() -> Rules {
        Rules {
            default_expires: 3600,
            min_expires: 60,
            max_expires: 7200,
        }
    }

    fn memory() -> Registrar {
        Registrar::new(Arc::new(MemoryLocation::new(1000)), rules())
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_750_000_000)
    }

    fn ul(registrar: &Registrar, args: &[&str]) -> Reply {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        command(&args, registrar, now())
    }

    fn ok(registrar: &Registrar, args: &[&str]) -> String {
        let reply = ul(registrar, args);
        assert!(reply.ok, "ul {args:?}: {}", reply.text);
        reply.text
    }

    fn err(registrar: &Registrar, args: &[&str]) -> String {
        let reply = ul(registrar, args);
        assert!(!reply.ok, "ul {args:?} should fail: {}", reply.text);
        reply.text
    }

    /// The `Contact:` lines of a `ul show` reply, without the `<>` and parameters.
    fn contacts(show: &str) -> Vec<String> {
        show.lines()
            .filter_map(|l| l.strip_prefix("  Contact: <"))
            .map(|l| l.split_once('>').unwrap().0.to_owned())
            .collect()
    }

    fn full_binding() -> Binding {
        Binding {
            aor: ALICE.to_owned(),
            contact: "sip:alice@192.0.2.10:5060;transport=tcp".to_owned(),
            expires_at: now() + Duration::from_millis(3_596_200),
            q: 500,
            call_id: "a84b4c76e66710@pc33.example.com".to_owned(),
            cseq: 314159,
            received: Some((TransportKind::Tcp, "192.0.2.10:40312".parse().unwrap())),
            local: Some("198.51.100.1:5060".parse().unwrap()),
            path: vec!["<sip:edge.example.com;lr>".to_owned()],
            instance: Some("<urn:uuid:00000000-0000-1000-8000-000a95a0e128>".to_owned()),
            reg_id: Some(1),
            user_agent: Some("softphone/1.0\r\n x".to_owned()),
            nated: false,
            node: None,
            owner_route: None,
        }
    }

    #[test]
    fn show_prints_one_block_per_binding_with_what_is_known() {
        let r = memory();
        r.store().replace(ALICE, vec![full_binding()]).unwrap();
        ok(&r, &["add", ALICE, "sip:alice@192.0.2.20", "600"]);
        let show = ok(&r, &["show", ALICE]);
        let call_id = show
            .lines()
            .filter_map(|l| l.strip_prefix("    Call-ID: ctl-"))
            .next()
            .expect("a ctl Call-ID");
        assert_eq!(
            show,
            format!(
                "AOR: sip:alice@example.com\n\
                 \x20 Contact: <sip:alice@192.0.2.20>;expires=600;q=1\n\
                 \x20   Call-ID: ctl-{call_id}\n\
                 \x20   CSeq: 1\n\
                 \x20 Contact: <sip:alice@192.0.2.10:5060;transport=tcp>;expires=3597;q=0.5\n\
                 \x20   Call-ID: a84b4c76e66710@pc33.example.com\n\
                 \x20   CSeq: 314159\n\
                 \x20   Received: tcp:192.0.2.10:40312\n\
                 \x20   Socket: tcp:198.51.100.1:5060\n\
                 \x20   Path: <sip:edge.example.com;lr>\n\
                 \x20   +sip.instance: <urn:uuid:00000000-0000-1000-8000-000a95a0e128>\n\
                 \x20   reg-id: 1\n\
                 \x20   User-Agent: softphone/1.0   x\n"
            )
        );
        assert!(call_id.starts_with("1750000000000-"), "{call_id}");
    }

    #[test]
    fn show_normalizes_the_aor_and_reports_an_unknown_one() {
        let r = memory();
        ok(&r, &["add", "sip:Alice@example.com", "sip:a@192.0.2.1"]);
        let show = ok(&r, &["show", "sip:Alice@EXAMPLE.com;transport=udp"]);
        assert!(show.starts_with("AOR: sip:Alice@example.com\n"), "{show}");
        assert_eq!(contacts(&show), ["sip:a@192.0.2.1"]);
        let show = ok(&r, &["show", "<sip:Alice@example.COM>"]);
        assert_eq!(contacts(&show), ["sip:a@192.0.2.1"]);
        // The user part is case-sensitive (RFC 3261 §19.1.4).
        assert_eq!(
            err(&r, &["show", "sip:alice@example.com"]),
            "AOR sip:alice@example.com not found"
        );
    }

    #[test]
    fn show_all_lists_every_aor_in_order_and_caps_the_listing() {
        let r = memory();
        assert_eq!(ok(&r, &["show"]), "no bindings\n");
        for user in ["carol", "alice", "bob"] {
            ok(
                &r,
                &[
                    "add",
                    &format!("sip:{user}@example.com"),
                    &format!("sip:{user}@192.0.2.1"),
                ],
            );
        }
        ok(&r, &["add", ALICE, "sip:alice@192.0.2.2"]);
        let show = ok(&r, &["show"]);
        let aors: Vec<&str> = show
            .lines()
            .filter_map(|l| l.strip_prefix("AOR: "))
            .collect();
        assert_eq!(
            aors,
            [
                "sip:alice@example.com",
                "sip:bob@example.com",
                "sip:carol@example.com"
            ]
        );
        assert_eq!(contacts(&show).len(), 4);

        let capped = show_all(r.store().as_ref(), now(), 2, MAX_LISTING_BYTES);
        assert_eq!(capped.lines().filter(|l| l.starts_with("AOR: ")).count(), 2);
        assert!(
            capped.ends_with("\n... 1 more AOR not listed (ul show AOR shows one)\n"),
            "{capped}"
        );
        let by_size = show_all(r.store().as_ref(), now(), 1000, 1);
        assert_eq!(
            by_size.lines().filter(|l| l.starts_with("AOR: ")).count(),
            1
        );
        assert!(by_size.contains("... 2 more AORs not listed"), "{by_size}");
    }

    #[test]
    fn expired_bindings_are_neither_shown_nor_counted() {
        let r = memory();
        ok(&r, &["add", ALICE, "sip:alice@192.0.2.1", "60"]);
        ok(
            &r,
            &["add", "sip:bob@example.com", "sip:bob@192.0.2.1", "600"],
        );
        let later = vec!["show".to_owned()];
        let show = command(&later, &r, now() + Duration::from_secs(60)).text;
        assert_eq!(contacts(&show), ["sip:bob@192.0.2.1"]);
        let count = command(&["count".to_owned()], &r, now() + Duration::from_secs(60));
        assert_eq!(count, Reply::ok("aors: 1\nbindings: 1\n"));
    }

    #[test]
    fn add_replaces_an_equivalent_contact_in_place() {
        let r = memory();
        assert!(ok(&r, &["add", ALICE, "sip:alice@host.example.com;transport=tcp", "100"])
            .starts_with("sip:alice@example.com: added <sip:alice@host.example.com;transport=tcp>;expires=100;q=1"));
        ok(&r, &["add", ALICE, "sip:alice@192.0.2.9"]);
        // Host case and parameter case do not matter (§19.1.4); the new spelling is kept.
        assert_eq!(
            ok(&r, &["add", ALICE, "<sip:alice@HOST.example.com;Transport=TCP>", "200"]),
            "sip:alice@example.com: replaced <sip:alice@HOST.example.com;Transport=TCP>;expires=200;q=1\n"
        );
        let show = ok(&r, &["show", ALICE]);
        assert_eq!(
            contacts(&show),
            [
                "sip:alice@HOST.example.com;Transport=TCP",
                "sip:alice@192.0.2.9"
            ]
        );
        assert!(show.contains(";expires=200;"), "{show}");
        // Another user is another contact.
        ok(
            &r,
            &["add", ALICE, "sip:bob@host.example.com;transport=tcp"],
        );
        assert_eq!(contacts(&ok(&r, &["show", ALICE])).len(), 3);
    }

    #[test]
    fn add_expiry_defaults_and_is_lowered_to_the_maximum() {
        let r = memory();
        assert_eq!(
            ok(&r, &["add", ALICE, "sip:a@192.0.2.1"]),
            "sip:alice@example.com: added <sip:a@192.0.2.1>;expires=3600;q=1\n"
        );
        assert_eq!(
            ok(&r, &["add", ALICE, "sip:b@192.0.2.1", "999999999999"]),
            "sip:alice@example.com: added <sip:b@192.0.2.1>;expires=7200;q=1 (expires lowered from 4294967295 to registrar.max_expires)\n"
        );
        assert_eq!(
            err(&r, &["add", ALICE, "sip:c@192.0.2.1", "soon"]),
            "\"soon\" is not an expiry in seconds"
        );
        assert_eq!(
            err(&r, &["add", ALICE, "sip:c@192.0.2.1", "-5"]),
            "\"-5\" is not an expiry in seconds"
        );
    }

    #[test]
    fn add_with_zero_expires_removes_the_binding() {
        let r = memory();
        ok(&r, &["add", ALICE, "sip:a@192.0.2.1"]);
        ok(&r, &["add", ALICE, "sip:b@192.0.2.1"]);
        assert_eq!(
            ok(&r, &["add", ALICE, "<sip:%61@192.0.2.1>", "0"]),
            "sip:alice@example.com: removed 1 binding\n"
        );
        assert_eq!(contacts(&ok(&r, &["show", ALICE])), ["sip:b@192.0.2.1"]);
        assert_eq!(
            err(&r, &["add", ALICE, "sip:a@192.0.2.1", "0"]),
            "AOR sip:alice@example.com has no binding for sip:a@192.0.2.1"
        );
    }

    #[test]
    fn rm_one_contact_by_equivalence_then_all() {
        let r = memory();
        for c in ["sip:a@192.0.2.1:5060", "sip:b@192.0.2.1", "tel:+15551234"] {
            ok(&r, &["add", ALICE, c]);
        }
        assert_eq!(
            ok(
                &r,
                &["rm", "sip:alice@EXAMPLE.com", "<sip:%61@192.0.2.1:5060>"]
            ),
            "sip:alice@example.com: removed 1 binding\n"
        );
        assert_eq!(
            err(&r, &["rm", ALICE, "sip:a@192.0.2.1"]),
            "AOR sip:alice@example.com has no binding for sip:a@192.0.2.1"
        );
        ok(&r, &["rm", ALICE, "tel:+15551234"]);
        assert_eq!(contacts(&ok(&r, &["show", ALICE])), ["sip:b@192.0.2.1"]);
        ok(&r, &["add", ALICE, "sip:c@192.0.2.1"]);
        assert_eq!(
            ok(&r, &["rm", ALICE]),
            "sip:alice@example.com: removed 2 bindings\n"
        );
        assert_eq!(
            err(&r, &["rm", ALICE]),
            "AOR sip:alice@example.com not found"
        );
        assert_eq!(ok(&r, &["count"]), "aors: 0\nbindings: 0\n");
    }

    #[test]
    fn count_counts_aors_and_bindings() {
        let r = memory();
        assert_eq!(ok(&r, &["count"]), "aors: 0\nbindings: 0\n");
        ok(&r, &["add", ALICE, "sip:a@192.0.2.1"]);
        ok(&r, &["add", ALICE, "sip:b@192.0.2.1"]);
        ok(&r, &["add", "sips:bob@example.com", "sips:bob@192.0.2.1"]);
        assert_eq!(ok(&r, &["count"]), "aors: 2\nbindings: 3\n");
    }

    #[test]
    fn bad_aors_and_contacts_are_refused_with_a_reason() {
        let r = memory();
        for aor in [
            "tel:+15551234",
            "alice@example.com",
            "sip:",
            "<sip:alice@example.com",
        ] {
            assert_eq!(
                err(&r, &["add", aor, "sip:a@192.0.2.1"]),
                format!("{aor:?} is not a sip: or sips: address-of-record")
            );
            assert!(err(&r, &["show", aor]).contains("is not a sip: or sips: address-of-record"));
            assert!(err(&r, &["rm", aor]).contains("is not a sip: or sips: address-of-record"));
        }
        for contact in ["192.0.2.1:5060", "*", "sip:a b@192.0.2.1", "sip:a@"] {
            let e = err(&r, &["add", ALICE, contact]);
            assert!(
                e.starts_with(&format!("{contact:?} is not a valid contact URI (")),
                "{e}"
            );
            assert!(err(&r, &["rm", ALICE, contact]).contains("is not a valid contact URI"));
        }
        assert_eq!(ok(&r, &["count"]), "aors: 0\nbindings: 0\n");
    }

    #[test]
    fn unknown_commands_and_wrong_arity_are_refused() {
        let r = memory();
        assert_eq!(
            err(&r, &["list"]),
            format!("unknown ul command \"list\"; commands: {USAGE}")
        );
        assert_eq!(err(&r, &[]), format!("ul needs a command: {USAGE}"));
        assert_eq!(
            err(&r, &["add", ALICE]),
            "wrong number of arguments for ul add; usage: ul add AOR CONTACT [EXPIRES]"
        );
        assert_eq!(
            err(&r, &["show", ALICE, "x"]),
            "wrong number of arguments for ul show; usage: ul show [AOR]"
        );
        assert_eq!(
            err(&r, &["rm"]),
            "wrong number of arguments for ul rm; usage: ul rm AOR [CONTACT]"
        );
        assert_eq!(
            err(&r, &["count", "all"]),
            "wrong number of arguments for ul count; usage: ul count"
        );
    }

    #[test]
    fn an_aor_is_limited_and_a_full_store_refuses() {
        let r = memory();
        for i in 0..MAX_BINDINGS_PER_AOR {
            ok(&r, &["add", ALICE, &format!("sip:a{i}@192.0.2.1")]);
        }
        assert_eq!(
            err(&r, &["add", ALICE, "sip:one-more@192.0.2.1"]),
            format!("AOR sip:alice@example.com already has {MAX_BINDINGS_PER_AOR} bindings, the most one AOR may have")
        );
        // Replacing one is still possible.
        ok(&r, &["add", ALICE, "sip:a0@192.0.2.1", "60"]);

        let tiny = Registrar::new(Arc::new(MemoryLocation::new(1)), rules());
        ok(&tiny, &["add", ALICE, "sip:a@192.0.2.1"]);
        assert_eq!(
            err(&tiny, &["add", "sip:bob@example.com", "sip:b@192.0.2.1"]),
            "sip:bob@example.com: location store: location store full (1 bindings)"
        );
    }

    #[test]
    fn sled_store_changes_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let (store, _) = SledLocation::open(dir.path(), 1000, 1 << 20, now()).unwrap();
            Registrar::new(Arc::new(store), rules())
        };
        {
            let r = open();
            ok(&r, &["add", ALICE, "sip:a@192.0.2.1"]);
            ok(&r, &["add", ALICE, "sip:b@192.0.2.1", "600"]);
            ok(&r, &["add", "sip:bob@example.com", "sip:bob@192.0.2.2"]);
            ok(&r, &["add", "sip:carol@example.com", "sip:carol@192.0.2.3"]);
            assert_eq!(ok(&r, &["count"]), "aors: 3\nbindings: 4\n");
            ok(&r, &["rm", ALICE, "sip:a@192.0.2.1"]);
            ok(&r, &["rm", "sip:carol@example.com"]);
            ok(
                &r,
                &["add", "sip:bob@example.com", "sip:bob@192.0.2.2", "0"],
            );
            assert!(err(&r, &["add", ALICE, "sip:x@"]).contains("not a valid contact URI"));
            assert_eq!(
                err(&r, &["show", "tel:1"]),
                "\"tel:1\" is not a sip: or sips: address-of-record"
            );
            assert!(err(&r, &["frobnicate"]).starts_with("unknown ul command"));
        }
        // What the commands answered is what a restarted server finds.
        let r = open();
        assert_eq!(ok(&r, &["count"]), "aors: 1\nbindings: 1\n");
        let show = ok(&r, &["show"]);
        assert!(show.starts_with("AOR: sip:alice@example.com\n"), "{show}");
        assert_eq!(contacts(&show), ["sip:b@192.0.2.1"]);
        assert!(show.contains(";expires=600;q=1\n"), "{show}");
        assert_eq!(
            err(&r, &["show", "sip:bob@example.com"]),
            "AOR sip:bob@example.com not found"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn end_to_end_over_the_control_socket() {
        use crate::control::{send, ControlServer, Handler};
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = SledLocation::open(
            &dir.path().join("location"),
            1000,
            1 << 20,
            SystemTime::now(),
        )
        .unwrap();
        let registrar = Arc::new(Registrar::new(Arc::new(store), rules()));
        let handler: Handler = {
            let registrar = Arc::clone(&registrar);
            Arc::new(
                move |args: &[String]| match args.first().map(String::as_str) {
                    Some("ul") => command(&args[1..], &registrar, SystemTime::now()),
                    _ => Reply::error("unknown command"),
                },
            )
        };
        let path = dir.path().join("moonroute.ctl");
        let _server = ControlServer::bind(&path, handler).await.unwrap();
        let ask = |args: &[&str]| {
            let path = path.clone();
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            tokio::task::spawn_blocking(move || {
                send(&path, &args, Duration::from_secs(20)).unwrap()
            })
        };
        let reply = ask(&[
            "ul",
            "add",
            "sip:Alice@EXAMPLE.com",
            "sip:alice@192.0.2.1",
            "120",
        ])
        .await
        .unwrap();
        assert_eq!(
            reply,
            Reply::ok("sip:Alice@example.com: added <sip:alice@192.0.2.1>;expires=120;q=1\n")
        );
        let reply = ask(&["ul", "show"]).await.unwrap();
        assert!(reply.ok);
        assert_eq!(contacts(&reply.text), ["sip:alice@192.0.2.1"]);
        let expires: u64 = reply
            .text
            .split(";expires=")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!((119..=120).contains(&expires), "{}", reply.text);
        assert_eq!(
            ask(&["ul", "count"]).await.unwrap(),
            Reply::ok("aors: 1\nbindings: 1\n")
        );
        assert_eq!(
            ask(&["ul", "rm", "sip:Alice@example.com"]).await.unwrap(),
            Reply::ok("sip:Alice@example.com: removed 1 binding\n")
        );
        assert_eq!(
            ask(&["ul", "show", "sip:Alice@example.com"]).await.unwrap(),
            Reply::error("AOR sip:Alice@example.com not found")
        );
    }
}
