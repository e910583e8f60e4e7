//! `sip.re`: regular expressions for scripts (Kamailio's `regex`/`pcre` modules), through the
//! `regex` crate: matching is linear in the subject's length whatever the pattern, so a
//! hostile header value cannot make a script's match run away (no backtracking).
//!
//! Patterns are compiled once per event loop and cached ([`MAX_CACHED`] patterns; a script
//! that builds patterns from message data empties the cache when it fills, so memory stays
//! bounded). Subjects are bytes: a header value need not be UTF-8.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use mlua::{Lua, LuaString, MultiValue, Table, Value};
use regex::bytes::{Regex, RegexBuilder};

use super::runtime;

/// Compiled patterns kept per Lua state.
pub const MAX_CACHED: usize = 256;
/// The longest pattern accepted, in bytes.
const MAX_PATTERN: usize = 4096;
/// The most memory one compiled pattern may take (the `regex` crate's size limit).
const MAX_COMPILED: usize = 1 << 20;

type Cache = Rc<RefCell<HashMap<Vec<u8>, Regex>>>;

/// Installs `sip.re.match` and `sip.re.find`.
pub fn install(lua: &Lua, sip: &Table) -> mlua::Result<()> {
    let cache: Cache = Rc::default();
    let re = lua.create_table()?;
    let matches = cache.clone();
    re.set(
        "match",
        lua.create_function(
            move |_, (pattern, subject): (LuaString, Option<LuaString>)| {
                let regex = compiled(&matches, &pattern.as_bytes(), "sip.re.match")?;
                Ok(subject.is_some_and(|s| regex.is_match(&s.as_bytes())))
            },
        )?,
    )?;
    re.set(
        "find",
        lua.create_function(
            move |lua, (pattern, subject): (LuaString, Option<LuaString>)| {
                let regex = compiled(&cache, &pattern.as_bytes(), "sip.re.find")?;
                let Some(subject) = subject else {
                    return Ok(MultiValue::from_vec(vec![Value::Nil]));
                };
                let subject = subject.as_bytes();
                let Some(captures) = regex.captures(&subject) else {
                    return Ok(MultiValue::from_vec(vec![Value::Nil]));
                };
                // As string.match: the captures when the pattern has groups, else the match.
                let wanted: Vec<Option<regex::bytes::Match<'_>>> = if captures.len() > 1 {
                    captures.iter().skip(1).collect()
                } else {
                    vec![captures.get(0)]
                };
                wanted
                    .into_iter()
                    .map(|m| match m {
                        Some(m) => lua.create_string(m.as_bytes()).map(Value::String),
                        None => Ok(Value::Nil),
                    })
                    .collect::<mlua::Result<Vec<Value>>>()
                    .map(MultiValue::from_vec)
            },
        )?,
    )?;
    sip.set("re", re)
}

fn compiled(cache: &Cache, pattern: &[u8], primitive: &str) -> mlua::Result<Regex> {
    if let Some(regex) = cache.borrow().get(pattern) {
        return Ok(regex.clone());
    }
    if pattern.len() > MAX_PATTERN {
        return Err(runtime(format!(
            "{primitive}: the pattern is longer than {MAX_PATTERN} bytes"
        )));
    }
    let text = std::str::from_utf8(pattern)
        .map_err(|_| runtime(format!("{primitive}: the pattern is not UTF-8")))?;
    let regex = RegexBuilder::new(text)
        .size_limit(MAX_COMPILED)
        .build()
        .map_err(|e| runtime(format!("{primitive}: bad pattern: {e}")))?;
    let mut cache = cache.borrow_mut();
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    cache.insert(pattern.to_vec(), regex.clone());
    Ok(regex)
}
