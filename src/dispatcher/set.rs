//! Destination sets as written by the operator: `[[dispatcher.set]]` in the configuration or
//! `[[set]]` in the sets file (`[dispatcher] sets_file`), and their validation. A bad set is
//! refused whole with a message naming it, so a reload never half-applies.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::sip::Uri;

/// Sets at most (in the configuration and the file together).
pub const MAX_SETS: usize = 10_000;
/// Destinations one set holds at most (a selection walks them all).
pub const MAX_DESTINATIONS_PER_SET: usize = 256;
/// Largest weight: weights are relative, and 1000 is finer than any operator needs.
pub const MAX_WEIGHT: u32 = 1000;
/// Longest `attrs` string.
pub const MAX_ATTRS: usize = 1024;

/// One destination set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetConfig {
    /// What scripts name it by (`sip.ds.select(1, ...)`), Kamailio's set id.
    pub id: u32,
    pub destinations: Vec<DestinationConfig>,
}

/// One destination of a set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// A `sip:` or `sips:` URI: host, port and `transport` parameter say where calls go. With
    /// a user part it replaces the Request-URI whole; without, the Request-URI's user is kept.
    pub uri: String,
    /// Share of the calls with `weighted`, `call_load` and the hashes. 1-1000; default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Order with `priority`: the higher first (Kamailio's order). Default 0.
    #[serde(default)]
    pub priority: i32,
    /// Free text the script reads back (`sip.ds.list`), Kamailio's `attrs`. Default empty.
    #[serde(default)]
    pub attrs: String,
}

fn default_weight() -> u32 {
    1
}

/// The sets file: `[[set]]` tables, nothing else.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetsFile {
    #[serde(default)]
    pub set: Vec<SetConfig>,
}

impl SetsFile {
    /// Reads and parses `path` (validated with the configuration's sets by the caller).
    pub fn load(path: &Path) -> Result<Vec<SetConfig>, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let file: SetsFile = toml::from_str(&text)
            .map_err(|e| format!("{}: {}", path.display(), e.to_string().trim_end()))?;
        Ok(file.set)
    }
}

/// Checks what the types cannot: unique set ids, at least one destination per set, SIP URIs,
/// no URI twice in a set, weights and sizes in range.
pub fn validate(sets: &[SetConfig]) -> Result<(), String> {
    if sets.len() > MAX_SETS {
        return Err(format!("dispatcher: at most {MAX_SETS} sets"));
    }
    let mut ids = HashSet::new();
    for set in sets {
        let id = set.id;
        if !ids.insert(id) {
            return Err(format!("dispatcher set {id}: defined twice"));
        }
        if set.destinations.is_empty() {
            return Err(format!("dispatcher set {id}: no destinations"));
        }
        if set.destinations.len() > MAX_DESTINATIONS_PER_SET {
            return Err(format!(
                "dispatcher set {id}: at most {MAX_DESTINATIONS_PER_SET} destinations"
            ));
        }
        let mut uris = HashSet::new();
        for destination in &set.destinations {
            let uri = destination.uri.trim();
            check_uri(uri).map_err(|e| format!("dispatcher set {id}: {uri:?}: {e}"))?;
            if !uris.insert(uri) {
                return Err(format!("dispatcher set {id}: {uri} is listed twice"));
            }
            if !(1..=MAX_WEIGHT).contains(&destination.weight) {
                return Err(format!(
                    "dispatcher set {id}: {uri}: weight must be 1-{MAX_WEIGHT}"
                ));
            }
            if destination.attrs.len() > MAX_ATTRS {
                return Err(format!(
                    "dispatcher set {id}: {uri}: attrs longer than {MAX_ATTRS} bytes"
                ));
            }
        }
    }
    Ok(())
}

fn check_uri(uri: &str) -> Result<(), &'static str> {
    let parsed = Uri::parse(uri.as_bytes()).map_err(|_| "not a valid URI")?;
    let sip = parsed.as_sip().ok_or("not a sip: or sips: URI")?;
    if sip.headers.is_some() {
        return Err("URI headers (?...) are not allowed in a destination");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<SetConfig>, String> {
        let file: SetsFile = toml::from_str(text).map_err(|e| e.to_string())?;
        validate(&file.set)?;
        Ok(file.set)
    }

    #[test]
    fn a_sets_file_parses_with_defaults() {
        let sets = parse(
            r#"
            [[set]]
            id = 1
            destinations = [
              { uri = "sip:127.0.0.1:5070" },
              { uri = "sip:127.0.0.1:5071;transport=tcp", weight = 3, priority = 5, attrs = "gw=b" },
            ]
            "#,
        )
        .unwrap();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].destinations[0].weight, 1);
        assert_eq!(sets[0].destinations[0].priority, 0);
        assert_eq!(sets[0].destinations[1].attrs, "gw=b");
    }

    #[test]
    fn bad_sets_are_refused_with_their_id() {
        let cases = [
            ("[[set]]\nid = 1\ndestinations = []\n", "set 1: no destinations"),
            (
                "[[set]]\nid = 2\ndestinations = [{ uri = \"tel:+1555\" }]\n",
                "not a sip: or sips: URI",
            ),
            (
                "[[set]]\nid = 3\ndestinations = [{ uri = \"sip:a\" }, { uri = \"sip:a\" }]\n",
                "listed twice",
            ),
            (
                "[[set]]\nid = 4\ndestinations = [{ uri = \"sip:a\", weight = 0 }]\n",
                "weight must be",
            ),
            (
                "[[set]]\nid = 5\ndestinations = [{ uri = \"sip:a\" }]\n[[set]]\nid = 5\ndestinations = [{ uri = \"sip:b\" }]\n",
                "set 5: defined twice",
            ),
            (
                "[[set]]\nid = 6\ndestinations = [{ uri = \"sip:a\", wieght = 2 }]\n",
                "unknown field",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
