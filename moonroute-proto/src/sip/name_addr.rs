//! name-addr / addr-spec values with header parameters (RFC 3261 §20.10, §25.1): From, To,
//! Contact, Route, Record-Route, Path, Reply-To.
//!
//! §20.10: when the URI is not enclosed in `<>`, parameters after it belong to the header, and a
//! URI containing `,`, `?` or `;` must be enclosed (RFC 4475 §3.1.2.13).

use std::borrow::Cow;

use super::error::{ParseError, Result};
use super::layout::{at, at_opt, place, place_opt, Place};
use super::params::Params;
use super::scan;
use super::uri::{Uri, UriLayout};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameAddr<'a> {
    /// The display name as written: a quoted-string (with its quotes) or tokens.
    pub display: Option<&'a [u8]>,
    pub uri: Uri<'a>,
    pub params: Params<'a>,
    /// True when the URI was written inside `<>` (name-addr form).
    pub angle: bool,
}

impl<'a> NameAddr<'a> {
    /// Parses one (already comma-split and trimmed) value.
    pub fn parse(s: &'a [u8]) -> Result<NameAddr<'a>> {
        if s.first() == Some(&b'"') {
            let end = scan::quoted_string_end(s, 0)?;
            let after = scan::skip_ws(s, end);
            if s.get(after) != Some(&b'<') {
                return Err(ParseError::bad("", "display name not followed by <URI>"));
            }
            return Self::parse_angle(Some(&s[..end]), &s[after..]);
        }
        match s.iter().position(|&b| b == b'<') {
            Some(lt) => {
                let display = scan::trim_ws(&s[..lt]);
                if !display
                    .split(|&b| scan::is_ws(b))
                    .all(|w| w.is_empty() || scan::is_token(w))
                {
                    return Err(ParseError::bad(
                        "",
                        "display name must be tokens or a quoted string",
                    ));
                }
                let display = (!display.is_empty()).then_some(display);
                Self::parse_angle(display, &s[lt..])
            }
            None => Self::parse_addr_spec(s),
        }
    }

    /// `s` starts at `<`.
    fn parse_angle(display: Option<&'a [u8]>, s: &'a [u8]) -> Result<NameAddr<'a>> {
        let gt = s
            .iter()
            .position(|&b| b == b'>')
            .ok_or(ParseError::bad("", "missing > after URI"))?;
        let uri = Uri::parse(&s[1..gt])?;
        let params = Params::parse_header(&s[gt + 1..])?;
        Ok(NameAddr {
            display,
            uri,
            params,
            angle: true,
        })
    }

    fn parse_addr_spec(s: &'a [u8]) -> Result<NameAddr<'a>> {
        let end = s
            .iter()
            .position(|&b| b == b';' || scan::is_ws(b))
            .unwrap_or(s.len());
        let uri_text = &s[..end];
        if uri_text.contains(&b'?') || uri_text.contains(&b',') {
            return Err(ParseError::bad(
                "",
                "URI with '?' or ',' must be enclosed in <>",
            ));
        }
        let uri = Uri::parse(uri_text)?;
        let params = Params::parse_header(&s[end..])?;
        Ok(NameAddr {
            display: None,
            uri,
            params,
            angle: false,
        })
    }

    /// The header parameters of a value [`NameAddr::parse`] accepts (of which they are the
    /// `params`), found without parsing the URI: after the `>` closing the URI in name-addr
    /// form, after the URI (its first `;` or white space) in addr-spec form.
    pub(crate) fn header_params_of_valid(s: &'a [u8]) -> &'a [u8] {
        let display_end = match s.first() {
            Some(b'"') => scan::quoted_string_end(s, 0).unwrap_or(s.len()),
            _ => 0,
        };
        match memchr::memchr(b'<', &s[display_end..]) {
            Some(lt) => {
                let uri_start = display_end + lt;
                match memchr::memchr(b'>', &s[uri_start..]) {
                    Some(gt) => &s[uri_start + gt + 1..],
                    None => b"",
                }
            }
            None => {
                let end = s
                    .iter()
                    .position(|&b| b == b';' || scan::is_ws(b))
                    .unwrap_or(s.len());
                &s[end..]
            }
        }
    }

    pub fn tag(&self) -> Option<&'a [u8]> {
        self.params.value("tag")
    }

    /// The display name with quotes removed and quoted-pairs unescaped.
    pub fn display_name(&self) -> Option<Cow<'a, str>> {
        let d = self.display?;
        let inner = match d.strip_prefix(b"\"").and_then(|r| r.strip_suffix(b"\"")) {
            Some(inner) => inner,
            None => return Some(String::from_utf8_lossy(d)),
        };
        if !inner.contains(&b'\\') {
            return Some(String::from_utf8_lossy(inner));
        }
        let mut out = Vec::with_capacity(inner.len());
        let mut it = inner.iter();
        while let Some(&b) = it.next() {
            if b == b'\\' {
                if let Some(&n) = it.next() {
                    out.push(n);
                }
            } else {
                out.push(b);
            }
        }
        Some(Cow::Owned(String::from_utf8_lossy(&out).into_owned()))
    }
}

/// A Contact value (§20.10): `*` (only in a REGISTER removing all bindings, §10.2.2) or an
/// address with `expires` and `q` parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contact<'a> {
    Star,
    Addr(NameAddr<'a>),
}

impl<'a> Contact<'a> {
    pub fn parse(s: &'a [u8]) -> Result<Contact<'a>> {
        if s == b"*" {
            return Ok(Contact::Star);
        }
        NameAddr::parse(s).map(Contact::Addr)
    }

    /// `expires` parameter in seconds (§20.10); values past 2^32-1 are clamped (§20.19).
    pub fn expires(&self) -> Option<Result<u32>> {
        let Contact::Addr(a) = self else { return None };
        let v = a.params.value("expires")?;
        Some(parse_delta_seconds(v).ok_or(ParseError::bad("Contact", "bad expires parameter")))
    }

    /// `q` parameter in thousandths (qvalue = "0" [ "." 0*3DIGIT ] / "1" [ "." 0*3("0") ]).
    pub fn q(&self) -> Option<Result<u16>> {
        let Contact::Addr(a) = self else { return None };
        let v = a.params.value("q")?;
        Some(parse_qvalue(v).ok_or(ParseError::bad("Contact", "bad q parameter")))
    }
}

/// Where the parts of a parsed [`NameAddr`] lie in its text (see [`super::layout`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct NameAddrLayout {
    display: Option<Place>,
    uri: UriLayout,
    params: Place,
    angle: bool,
}

impl<'a> NameAddr<'a> {
    /// The layout of this value, parsed from a slice of `base`.
    pub(crate) fn layout(&self, base: &[u8]) -> NameAddrLayout {
        NameAddrLayout {
            display: place_opt(base, self.display),
            uri: self.uri.layout(base),
            params: place(base, self.params.raw()),
            angle: self.angle,
        }
    }

    /// The value `layout` describes, over the same `base` it was taken from.
    pub(crate) fn rebuild(layout: &NameAddrLayout, base: &'a [u8]) -> NameAddr<'a> {
        NameAddr {
            display: at_opt(base, layout.display),
            uri: Uri::rebuild(&layout.uri, base),
            params: Params::from_validated(at(base, layout.params)),
            angle: layout.angle,
        }
    }
}

/// Where the parts of a parsed [`Contact`] lie in its text: `None` for `*`.
pub(crate) type ContactLayout = Option<NameAddrLayout>;

impl<'a> Contact<'a> {
    /// The layout of this value, parsed from a slice of `base`.
    pub(crate) fn layout(&self, base: &[u8]) -> ContactLayout {
        match self {
            Contact::Star => None,
            Contact::Addr(addr) => Some(addr.layout(base)),
        }
    }

    /// The value `layout` describes, over the same `base` it was taken from.
    pub(crate) fn rebuild(layout: &ContactLayout, base: &'a [u8]) -> Contact<'a> {
        match layout {
            None => Contact::Star,
            Some(addr) => Contact::Addr(NameAddr::rebuild(addr, base)),
        }
    }
}

/// delta-seconds, clamped to 2^32-1 as §20.19 and §10.2.1.1 allow for overlarge values.
pub fn parse_delta_seconds(v: &[u8]) -> Option<u32> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(scan::parse_decimal(v, u64::MAX).map_or(u32::MAX, |n| n.min(u64::from(u32::MAX)) as u32))
}

/// qvalue (§25.1) in thousandths: "0.5" → 500, "1" → 1000.
pub fn parse_qvalue(v: &[u8]) -> Option<u16> {
    let (int, frac) = match v.iter().position(|&b| b == b'.') {
        Some(dot) => (&v[..dot], &v[dot + 1..]),
        None => (v, &b""[..]),
    };
    if frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut thousandths: u16 = 0;
    for (i, d) in frac.iter().enumerate() {
        thousandths += u16::from(d - b'0') * [100, 10, 1][i];
    }
    match int {
        b"0" => Some(thousandths),
        b"1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_params_found_without_the_uri_are_the_parsed_ones() {
        let values: [&[u8]; 10] = [
            b"Alice <sip:alice@atlanta.example.com>;tag=1928301774",
            b"<sip:bob@biloxi.example.com>",
            b"\"A <quoted> \\\" name\" <sip:a@b;tag=uri-param>;tag=header ; x=1",
            b"sip:carol@chicago.example.com;tag=addr-spec",
            b"sip:carol@chicago.example.com ;tag = spaced",
            b"sip:carol@chicago.example.com",
            b"Bob Smith <sips:bob@[2001:db8::1]:5061;transport=tls>;tag=v6",
            b"<tel:+1-201-555-0123>;tag=tel",
            b"<sip:a@b>;TAG=upper",
            b"<sip:a@b>;x=\";tag=quoted\";tag=real",
        ];
        for v in values {
            let parsed = NameAddr::parse(v).unwrap();
            let fast = Params::from_validated(NameAddr::header_params_of_valid(v));
            assert_eq!(
                fast.value("tag"),
                parsed.tag(),
                "{}",
                String::from_utf8_lossy(v)
            );
            assert_eq!(fast, parsed.params);
        }
    }

    #[test]
    fn forms() {
        let a = NameAddr::parse(
            br#""J Rosenberg \\\""       <sip:jdrosen@example.com>
  ;
  tag = 98asjd8"#,
        )
        .unwrap();
        assert_eq!(a.tag(), Some(&b"98asjd8"[..]));
        assert_eq!(a.display_name().unwrap(), "J Rosenberg \\\"");
        let b =
            NameAddr::parse(b"sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n").unwrap();
        assert!(!b.angle);
        assert_eq!(b.tag(), Some(&b"1918181833n"[..]));
        let c = NameAddr::parse(b"caller<sip:caller@example.com>;tag=323").unwrap();
        assert_eq!(c.display, Some(&b"caller"[..]));
    }

    #[test]
    fn malformed() {
        assert!(NameAddr::parse(br#""Bell, Alexander <sip:a.g.bell@bell-tel.com>"#).is_err());
        assert!(NameAddr::parse(b"Bell, Alexander <sip:a.g.bell@bell-tel.com>").is_err());
        assert!(NameAddr::parse(b"\"Watson, Thomas\" < sip:t.watson@ieee.org >").is_err());
        assert!(NameAddr::parse(b"sip:user@example.com?Route=%3Csip:sip.example.com%3E").is_err());
        assert!(NameAddr::parse(b"<sip:user@example.com").is_err());
    }

    #[test]
    fn contact_values() {
        let c = Contact::parse(b"<sip:a@b>;expires=60;q=0.33").unwrap();
        assert_eq!(c.expires().unwrap().unwrap(), 60);
        assert_eq!(c.q().unwrap().unwrap(), 330);
        assert_eq!(Contact::parse(b"*").unwrap(), Contact::Star);
        assert_eq!(parse_qvalue(b"1.000"), Some(1000));
        assert_eq!(parse_qvalue(b"1.5"), None);
        assert_eq!(parse_delta_seconds(b"10000000000000000000"), Some(u32::MAX));
    }
}
