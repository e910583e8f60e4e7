//! Parameter lists: `;name=value` sequences after a URI (§19.1.1 uri-parameters) or a header
//! value (§25.1 generic-param, with SWS allowed around `;` and `=`).
//!
//! `Params` is a view over the original bytes: validated once when the enclosing value is parsed,
//! then looked up by scanning, which for the handful of parameters a SIP value carries is cheaper
//! than building a map.

use super::error::{ParseError, Result};
use super::scan;

/// A validated parameter section, starting at its first `;` (or empty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Params<'a> {
    raw: &'a [u8],
}

/// One parameter; names compare case-insensitively (§19.1.4, §7.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param<'a> {
    pub name: &'a [u8],
    pub value: Option<&'a [u8]>,
}

impl<'a> Params<'a> {
    pub const EMPTY: Params<'static> = Params { raw: b"" };

    /// URI parameters: `raw` is everything from the first `;` up to `?` or the end.
    pub fn parse_uri(raw: &'a [u8]) -> Result<Params<'a>> {
        if raw.first().is_some_and(|&b| b != b';') {
            return Err(ParseError::bad("URI", "bad uri-parameter"));
        }
        let params = Params { raw };
        for p in params.iter() {
            let name_ok = scan::is_paramchars(p.name);
            let value_ok = p.value.is_none_or(scan::is_paramchars);
            if !name_ok || !value_ok {
                return Err(ParseError::bad("URI", "bad uri-parameter"));
            }
        }
        Ok(params)
    }

    /// Header parameters (generic-param: token [ EQUAL gen-value ]; gen-value is a token, a host
    /// or a quoted-string).
    pub fn parse_header(raw: &'a [u8]) -> Result<Params<'a>> {
        let first = scan::skip_ws(raw, 0);
        if first < raw.len() && raw[first] != b';' {
            return Err(ParseError::bad(
                "",
                "unexpected text where a ';' parameter belongs",
            ));
        }
        let params = Params { raw };
        for p in params.iter() {
            if !scan::is_token(p.name) {
                return Err(ParseError::bad("", "bad parameter name"));
            }
            if let Some(v) = p.value {
                if !is_gen_value(v) {
                    return Err(ParseError::bad("", "bad parameter value"));
                }
            }
        }
        Ok(params)
    }

    /// A parameter section already validated as part of its value (the value parsed before).
    pub(crate) fn from_validated(raw: &'a [u8]) -> Params<'a> {
        Params { raw }
    }

    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    pub fn iter(&self) -> ParamIter<'a> {
        ParamIter { rest: self.raw }
    }

    /// `Some(value)` when the parameter is present (`Some(None)` for a flag such as `lr`).
    pub fn get(&self, name: &str) -> Option<Option<&'a [u8]>> {
        self.iter()
            .find(|p| scan::eq_ic(p.name, name.as_bytes()))
            .map(|p| p.value)
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The value of a parameter, empty for a flag, `None` when absent.
    pub fn value(&self, name: &str) -> Option<&'a [u8]> {
        self.get(name).map(|v| v.unwrap_or(b""))
    }
}

fn is_gen_value(v: &[u8]) -> bool {
    match v.first() {
        Some(b'"') => scan::quoted_string_end(v, 0).is_ok_and(|end| end == v.len()),
        Some(b'[') => {
            v.last() == Some(&b']')
                && v[1..v.len() - 1]
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
        }
        // Unquoted values are tokens, leniently also allowing the ':' of an IPv6 `received`
        // (§18.2.1 via-received = IPv4address / IPv6address, written without brackets).
        Some(_) => v.iter().all(|&b| scan::is_token_char(b) || b == b':'),
        None => false,
    }
}

pub struct ParamIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for ParamIter<'a> {
    type Item = Param<'a>;

    fn next(&mut self) -> Option<Param<'a>> {
        let s = self.rest;
        let start = scan::skip_ws(s, 0);
        if start >= s.len() {
            return None;
        }
        // Skip the leading ';' of this parameter.
        let start = if s[start] == b';' { start + 1 } else { start };
        // The parameter ends at the next ';' outside a quoted string.
        let mut from = start;
        let i = loop {
            match memchr::memchr2(b';', b'"', &s[from..]) {
                None => break s.len(),
                Some(offset) if s[from + offset] == b';' => break from + offset,
                Some(offset) => {
                    from = scan::quoted_string_end(s, from + offset).unwrap_or(s.len());
                }
            }
        };
        self.rest = &s[i..];
        let item = &s[start..i];
        Some(match memchr::memchr(b'=', item) {
            Some(eq) => Param {
                name: scan::trim_ws(&item[..eq]),
                value: Some(scan::trim_ws(&item[eq + 1..])),
            },
            None => Param {
                name: scan::trim_ws(item),
                value: None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The byte-by-byte parameter splitter `ParamIter` replaced: what it must still agree with.
    fn params_bytewise(mut s: &[u8]) -> Vec<Param<'_>> {
        let mut out = Vec::new();
        loop {
            let start = scan::skip_ws(s, 0);
            if start >= s.len() {
                return out;
            }
            let start = if s[start] == b';' { start + 1 } else { start };
            let mut i = start;
            while i < s.len() && s[i] != b';' {
                if s[i] == b'"' {
                    i = scan::quoted_string_end(s, i).unwrap_or(s.len());
                } else {
                    i += 1;
                }
            }
            let item = &s[start..i];
            out.push(match item.iter().position(|&b| b == b'=') {
                Some(eq) => Param {
                    name: scan::trim_ws(&item[..eq]),
                    value: Some(scan::trim_ws(&item[eq + 1..])),
                },
                None => Param {
                    name: scan::trim_ws(item),
                    value: None,
                },
            });
            s = &s[i..];
        }
    }

    proptest! {
        #[test]
        fn param_iter_agrees_with_the_bytewise_splitter(
            s in proptest::collection::vec(prop::sample::select(b"a;=\" \\,\t".to_vec()), 0..40)
        ) {
            let fast: Vec<_> = Params { raw: &s }.iter().collect();
            prop_assert_eq!(fast, params_bytewise(&s));
        }
    }

    #[test]
    fn header_params_with_sws() {
        let p = Params::parse_header(b"   ;\r\n  branch  =   z9hG4bK9ikj8  ; rport").unwrap();
        assert_eq!(p.value("branch"), Some(&b"z9hG4bK9ikj8"[..]));
        assert_eq!(p.get("RPORT"), Some(None));
        assert_eq!(p.get("received"), None);
    }

    #[test]
    fn quoted_values_and_bad_names() {
        let p = Params::parse_header(br#";+sip.instance="<urn:uuid:1;2>";reg-id=1"#).unwrap();
        assert_eq!(p.value("reg-id"), Some(&b"1"[..]));
        assert_eq!(p.value("+sip.instance"), Some(&br#""<urn:uuid:1;2>""#[..]));
        assert!(Params::parse_header(b";a b=1").is_err());
        assert!(Params::parse_header(b";maddr=[::1]").is_ok());
    }

    #[test]
    fn uri_params() {
        let p = Params::parse_uri(b";lr;unknownwith=value;unknown-no-value").unwrap();
        assert!(p.has("lr"));
        assert!(Params::parse_uri(b";lr;;x").is_err());
        assert!(Params::parse_uri(b";%6C%72").is_ok());
    }
}
