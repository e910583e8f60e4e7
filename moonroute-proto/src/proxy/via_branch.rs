//! The Via branch IDs this server writes, and what it reads back from them. Every branch
//! starts with the magic cookie `z9hG4bK` (RFC 3261 §8.1.1.7), which is all the RFC asks; the
//! rest is our layout, and this module is the one place that knows it:
//!
//! - a stateful proxy attempt (§16.6 step 8): `z9hG4bK<hash>.<loop>.<n>`: the loop-detection
//!   hash of the request as received (§16.3 item 4, 16 hex digits, see [`loop_hash`]), the
//!   event loop that owns the client transaction and a counter unique in that loop. The BYEs
//!   the proxy sends and the dispatcher's probes use the same layout with a hash of their own
//!   ([`Stateful`]). [`owner_loop`] reads the loop back, so a response the kernel delivered to
//!   another loop is handed to its transaction's loop.
//! - a NAT keep-alive OPTIONS: the same layout with the fixed hash `6b656570616c6976`
//!   ("keepaliv" in hex, [`KEEPALIVE_PREFIX`]): it finds its loop like the others, and
//!   [`keepalive_seq`] recognises it.
//! - a stateless forward (§16.11): `z9hG4bK<hash>.<mac>.sl`: a hash of the request fields its
//!   retransmissions, CANCEL and non-2xx ACK share, and a keyed hash proving this process wrote
//!   it ([`stateless`], [`stateless_mac`]).
//!
//! The hashes themselves are the proxy's (`proxy::request`): this module only formats and
//! reads them.

use std::fmt;

use crate::sip::scan;
use crate::sip::via::MAGIC_COOKIE;

/// The RFC 3261 magic cookie as text (`MAGIC_COOKIE` is its bytes).
const COOKIE: &str = "z9hG4bK";

/// The start of every keep-alive branch: the magic cookie and "keepaliv" in hex, 16 hex
/// digits as a stateful branch's hash has, so the loop index and sequence number follow as in
/// every stateful branch (`<prefix><loop>.<seq>`).
pub const KEEPALIVE_PREFIX: &str = "z9hG4bK6b656570616c6976.";

/// The stateful branches of one request: the magic cookie, `loop_hash` (the request's
/// §16.3 item 4 hash), `.`; each attempt appends its loop and counter ([`attempt`]).
/// Characters of `unique` outside token are dropped so the branch stays a token (§20.42).
pub fn with_loop_hash(loop_hash: &str, unique: &str) -> String {
    let mut b = String::with_capacity(COOKIE.len() + loop_hash.len() + 1 + unique.len());
    b.push_str(COOKIE);
    b.push_str(loop_hash);
    b.push('.');
    b.extend(
        unique
            .chars()
            .filter(|c| c.is_ascii() && scan::is_token_char(*c as u8)),
    );
    b
}

/// The branch of one attempt: `base` (from [`with_loop_hash`] with an empty `unique`, or
/// [`random_base`]), then the owning loop and a counter unique in it.
pub fn attempt(base: &str, loop_index: usize, unique: u64) -> String {
    format!("{base}{loop_index}.{unique}")
}

/// The base of the branches of a request this proxy originates (a BYE ending a call), where
/// no received request gives a loop hash: `hash` takes its place.
pub fn random_base(hash: u64) -> String {
    format!("{COOKIE}{hash:016x}.")
}

/// A stateful branch written in place (`z9hG4bK<hash>.<loop>.<n>`), for a request built as
/// text without an intermediate `String` (the dispatcher's probes).
pub struct Stateful {
    pub hash: u64,
    pub loop_index: usize,
    pub unique: u64,
}

impl fmt::Display for Stateful {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Stateful {
            hash,
            loop_index,
            unique,
        } = self;
        write!(f, "{COOKIE}{hash:016x}.{loop_index}.{unique}")
    }
}

/// The event loop in a stateful branch this server wrote (an attempt, a BYE, a probe or a
/// keep-alive), `None` for any other branch.
pub fn owner_loop(branch: &[u8]) -> Option<usize> {
    let rest = branch.strip_prefix(MAGIC_COOKIE)?;
    let mut parts = rest.split(|&b| b == b'.');
    let hash = parts.next()?;
    let owner = parts.next()?;
    let counter = parts.next()?;
    let is_hex = hash.len() == 16 && hash.iter().all(u8::is_ascii_hexdigit);
    let is_number = |p: &[u8]| !p.is_empty() && p.iter().all(u8::is_ascii_digit);
    if !is_hex || !is_number(owner) || !is_number(counter) || parts.next().is_some() {
        return None;
    }
    std::str::from_utf8(owner).ok()?.parse().ok()
}

/// The loop-detection hash a branch carries after the magic cookie (§16.3 item 4): the part
/// before the first `.`. Only meaningful in a Via this proxy wrote.
pub fn loop_hash(branch: &[u8]) -> Option<&[u8]> {
    branch
        .strip_prefix(MAGIC_COOKIE)
        .and_then(|rest| rest.split(|&c| c == b'.').next())
}

/// The branch of keep-alive `seq` sent by event loop `loop_index`.
pub fn keepalive(loop_index: usize, seq: u64) -> String {
    format!("{KEEPALIVE_PREFIX}{loop_index}.{seq}")
}

/// The sequence number of a keep-alive branch, `None` for any other branch.
pub fn keepalive_seq(branch: &[u8]) -> Option<u64> {
    let rest = branch.strip_prefix(KEEPALIVE_PREFIX.as_bytes())?;
    let rest = std::str::from_utf8(rest).ok()?;
    let (_loop, seq) = rest.split_once('.')?;
    seq.parse().ok()
}

/// The branch of a stateless forward (§16.11): `hash` of what the request's retransmissions
/// share, `mac` proving this process wrote it.
pub fn stateless(hash: u64, mac: u64) -> String {
    format!("{COOKIE}{hash:016x}.{mac:016x}.sl")
}

/// The proof in a stateless-forward branch ([`stateless`]), `None` for any other branch.
pub fn stateless_mac(branch: &[u8]) -> Option<u64> {
    branch
        .strip_prefix(MAGIC_COOKIE)
        .and_then(|b| b.strip_suffix(b".sl"))
        .and_then(|b| b.get(17..))
        .and_then(|m| std::str::from_utf8(m).ok())
        .and_then(|m| u64::from_str_radix(m, 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stateful_branches_name_their_loop() {
        assert_eq!(owner_loop(b"z9hG4bK0123456789abcdef.1.42"), Some(1));
        assert_eq!(owner_loop(b"z9hG4bK0123456789abcdef.0.7"), Some(0));
        assert_eq!(owner_loop(b"z9hG4bK0123456789abcdef.ack"), None);
        assert_eq!(owner_loop(b"z9hG4bKsomebodyelse"), None);
        assert_eq!(owner_loop(b"z9hG4bK0123456789abcdex.1.2"), None);
        assert_eq!(owner_loop(b"z9hG4bK0123456789abcdef.1.2.3"), None);
        assert_eq!(owner_loop(b"0123456789abcdef.1.2"), None, "no magic cookie");
    }

    #[test]
    fn every_stateful_layout_reads_back() {
        let base = with_loop_hash("0123456789abcdef", "");
        assert_eq!(base, "z9hG4bK0123456789abcdef.");
        let branch = attempt(&base, 3, 9);
        assert_eq!(branch, "z9hG4bK0123456789abcdef.3.9");
        assert_eq!(owner_loop(branch.as_bytes()), Some(3));
        assert_eq!(loop_hash(branch.as_bytes()), Some(&b"0123456789abcdef"[..]));

        let bye = attempt(&random_base(0xabc), 1, 2);
        assert_eq!(bye, "z9hG4bK0000000000000abc.1.2");
        assert_eq!(owner_loop(bye.as_bytes()), Some(1));

        let probe = Stateful {
            hash: 0xfeed,
            loop_index: 0,
            unique: 5,
        }
        .to_string();
        assert_eq!(probe, "z9hG4bK000000000000feed.0.5");
        assert_eq!(owner_loop(probe.as_bytes()), Some(0));
    }

    #[test]
    fn unique_parts_stay_tokens() {
        assert_eq!(with_loop_hash("00", "x y;z"), "z9hG4bK00.xyz");
    }

    #[test]
    fn keepalives_are_recognised_and_find_their_loop() {
        let b = keepalive(1, 42);
        assert_eq!(keepalive_seq(b.as_bytes()), Some(42));
        assert_eq!(keepalive_seq(b"z9hG4bK0123456789abcdef.1.42"), None);
        assert_eq!(keepalive_seq(b"z9hG4bK6b656570616c6976.1.x"), None);
        assert_eq!(
            owner_loop(b.as_bytes()),
            Some(1),
            "the answer is handed to the loop that sent the keep-alive"
        );
    }

    #[test]
    fn stateless_branches_carry_their_proof_and_no_loop() {
        let b = stateless(0x1234, 0xdead_beef);
        assert_eq!(b, "z9hG4bK0000000000001234.00000000deadbeef.sl");
        assert_eq!(stateless_mac(b.as_bytes()), Some(0xdead_beef));
        assert_eq!(owner_loop(b.as_bytes()), None);
        assert_eq!(stateless_mac(b"z9hG4bK0123456789abcdef.1.42"), None);
        assert_eq!(keepalive_seq(b.as_bytes()), None);
    }
}
