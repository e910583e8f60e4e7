//! `sip.kv` on a Redis server shared by several nodes (`[kv] backend = "redis"`): a counter
//! incremented on two nodes counts both, a ban set on one node holds on all.
//!
//! Each entry is one Redis string under `moonroute:kv:<key>`: an integer as its decimal text
//! (so `INCRBY` works on it), a string as `s:` then its text (never mistaken for an integer).
//! Expiry is Redis's (`PX`): the `now` the callers pass is not used, Redis's clock decides, so
//! every node sees one expiry. The semantics are [`super::kv`]'s, with one difference: an
//! `incr` past `i64::MAX` is refused rather than saturated (Redis refuses the overflow).
//! `incr` is one Lua script, atomic on the server: a missing key starts at 0 and takes the TTL,
//! a live key keeps its expiry. Bounds on key and value sizes are checked before sending;
//! the number of keys is Redis's to bound (`maxmemory` with an eviction policy such as
//! `volatile-ttl`).

use std::sync::Arc;
use std::time::Duration;

use super::kv::{KvError, KvValue};
use crate::redis_link::{LinkError, RedisLink};

const PREFIX: &str = "moonroute:kv:";
const STRING_TAG: &str = "s:";

/// KEYS: the entry. ARGV: the increment, the TTL in ms ("" for none). Returns `{1, value}`, or
/// `{0, reason}` when the entry is not an integer or the add overflows.
const INCR: &str = r"
local current = redis.call('GET', KEYS[1])
if current and not string.match(current, '^-?%d+$') then return {0, 'not an integer'} end
local ok, value = pcall(redis.call, 'INCRBY', KEYS[1], ARGV[1])
if not ok then return {0, 'overflow'} end
if not current and ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {1, value}
";

/// `sip.kv`'s entries on Redis.
pub struct RedisKv {
    link: Arc<RedisLink>,
    incr: redis::Script,
}

impl std::fmt::Debug for RedisKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKv").field("link", &self.link).finish()
    }
}

fn unavailable(error: LinkError) -> KvError {
    KvError::Unavailable(error.to_string())
}

fn key_of(key: &str) -> String {
    format!("{PREFIX}{key}")
}

fn millis(ttl: Duration) -> u64 {
    ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64
}

/// `text` matched literally in a Redis glob pattern (SCAN MATCH): `*`, `?`, `[`, `]` and `\\`
/// escaped, so a prefix typed by an operator never matches more than itself.
fn glob_escaped(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// The value a stored text stands for.
fn decode(text: String) -> KvValue {
    if let Some(s) = text.strip_prefix(STRING_TAG) {
        return KvValue::Str(s.to_owned());
    }
    match text.parse() {
        Ok(n) => KvValue::Int(n),
        // Written by something else than moonroute: a string as it is.
        Err(_) => KvValue::Str(text),
    }
}

impl RedisKv {
    pub fn new(link: Arc<RedisLink>) -> RedisKv {
        RedisKv {
            link,
            incr: redis::Script::new(INCR),
        }
    }

    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    pub fn get(&self, key: &str) -> Result<Option<KvValue>, KvError> {
        let text: Option<String> = self
            .link
            .query(redis::cmd("GET").arg(key_of(key)).clone())
            .map_err(unavailable)?;
        Ok(text.map(decode))
    }

    pub fn set(&self, key: &str, value: KvValue, ttl: Option<Duration>) -> Result<(), KvError> {
        let text = match value {
            KvValue::Int(n) => n.to_string(),
            KvValue::Str(s) => format!("{STRING_TAG}{s}"),
        };
        let mut cmd = redis::cmd("SET");
        cmd.arg(key_of(key)).arg(text);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(millis(ttl));
        }
        self.link.query::<()>(cmd).map_err(unavailable)
    }

    pub fn incr(&self, key: &str, by: i64, ttl: Option<Duration>) -> Result<i64, KvError> {
        let by = by.to_string();
        let ttl = ttl.map_or_else(String::new, |t| millis(t).to_string());
        let key = key_of(key);
        let (ok, value): (i64, redis::Value) = self
            .link
            .script(
                &self.incr,
                &[key.as_bytes()],
                &[by.as_bytes(), ttl.as_bytes()],
            )
            .map_err(unavailable)?;
        match (ok, value) {
            (1, redis::Value::Int(n)) => Ok(n),
            (_, redis::Value::BulkString(reason)) if reason == b"overflow" => Err(
                KvError::Unavailable("the counter would overflow".to_owned()),
            ),
            _ => Err(KvError::NotAnInteger),
        }
    }

    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        let removed: i64 = self
            .link
            .query(redis::cmd("DEL").arg(key_of(key)).clone())
            .map_err(unavailable)?;
        Ok(removed > 0)
    }

    /// The live entries whose key starts with `prefix`, sorted, at most `limit`, and whether
    /// more matched (`moonroute ctl kv list` on a shared store): SCAN with the prefix as a
    /// glob-escaped MATCH, so Redis is never blocked the way KEYS would block it.
    pub fn list(&self, prefix: &str, limit: usize) -> Result<super::kv::KvListing, KvError> {
        let pattern = format!("{}*", glob_escaped(&key_of(prefix)));
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .link
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .clone(),
                )
                .map_err(unavailable)?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 || keys.len() > limit {
                break;
            }
        }
        keys.sort();
        let more = keys.len() > limit;
        keys.truncate(limit);
        let mut found = Vec::with_capacity(keys.len());
        for stored in keys {
            let Some(key) = stored.strip_prefix(PREFIX) else {
                continue;
            };
            // An entry that expired between SCAN and GET is simply not listed.
            if let Some(value) = self.get(key)? {
                found.push((key.to_owned(), value, self.ttl(key)?));
            }
        }
        Ok((found, more))
    }

    pub fn ttl(&self, key: &str) -> Result<Option<Duration>, KvError> {
        let left: i64 = self
            .link
            .query(redis::cmd("PTTL").arg(key_of(key)).clone())
            .map_err(unavailable)?;
        // -2: absent, -1: no expiry.
        Ok((left >= 0).then(|| Duration::from_millis(left as u64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_prefix_matches_only_itself() {
        assert_eq!(glob_escaped("ban:1.2.3.4"), "ban:1.2.3.4");
        assert_eq!(glob_escaped("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn stored_text_decodes_to_the_value_written() {
        assert_eq!(decode("42".to_owned()), KvValue::Int(42));
        assert_eq!(decode("-7".to_owned()), KvValue::Int(-7));
        assert_eq!(decode("s:42".to_owned()), KvValue::Str("42".to_owned()));
        assert_eq!(decode("s:".to_owned()), KvValue::Str(String::new()));
        // Written by another program: a string as it is.
        assert_eq!(decode("hello".to_owned()), KvValue::Str("hello".to_owned()));
    }
}
