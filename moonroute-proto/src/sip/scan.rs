//! Byte-level scanning shared by the codec's parsers: the character classes of the RFC 3261 §25.1
//! ABNF, linear white space, quoted strings, escapes, and top-level comma splitting.
//!
//! Header values handed to these functions may still contain line folds (CRLF followed by SP or
//! HTAB); the header splitter guarantees a CR or LF inside a value is always part of a fold, so
//! here CR and LF simply count as white space (§7.3.1: a fold is equivalent to one SP).

use super::error::{ParseError, Result};

const fn table(extra: &[u8], alphanum: bool) -> [bool; 256] {
    let mut t = [false; 256];
    if alphanum {
        let mut c = b'0';
        while c <= b'9' {
            t[c as usize] = true;
            c += 1;
        }
        c = b'a';
        while c <= b'z' {
            t[c as usize] = true;
            t[(c - 32) as usize] = true;
            c += 1;
        }
    }
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
}

/// token (§25.1): alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~"
static TOKEN: [bool; 256] = table(b"-.!%*_+`'~", true);
/// word (§25.1, used by Call-ID): token characters plus ( ) < > : \ DQUOTE / [ ] ? { }
static WORD: [bool; 256] = table(b"-.!%*_+`'~()<>:\\\"/[]?{}", true);
/// unreserved (alphanum / mark) plus user-unreserved (§25.1 `user`)
static USER: [bool; 256] = table(b"-_.!~*'()&=+$,;?/", true);
/// unreserved plus the characters `password` allows (§25.1)
static PASSWORD: [bool; 256] = table(b"-_.!~*'()&=+$,", true);
/// paramchar (§25.1): param-unreserved / unreserved
static PARAMCHAR: [bool; 256] = table(b"[]/:&+$-_.!~*'()", true);
/// hname/hvalue characters (§25.1): hnv-unreserved / unreserved
static HNV: [bool; 256] = table(b"[]/?:+$-_.!~*'()", true);
/// hostname characters, leniently: alphanum, "-", "." and "_" (seen in the wild)
static HOSTNAME: [bool; 256] = table(b"-._", true);

pub fn is_token_char(b: u8) -> bool {
    TOKEN[b as usize]
}

pub fn is_word_char(b: u8) -> bool {
    WORD[b as usize]
}

pub fn is_hostname_char(b: u8) -> bool {
    HOSTNAME[b as usize]
}

pub fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Every byte is a token character and there is at least one.
pub fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_token_char(b))
}

pub fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_ws(s[i]) {
        i += 1;
    }
    i
}

pub fn trim_ws(s: &[u8]) -> &[u8] {
    let start = skip_ws(s, 0);
    let mut end = s.len();
    while end > start && is_ws(s[end - 1]) {
        end -= 1;
    }
    &s[start..end]
}

/// Index just past the token starting at `i` (== `i` when there is none).
pub fn token_end(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_token_char(s[i]) {
        i += 1;
    }
    i
}

/// `s[i]` is a DQUOTE; returns the index just past the closing DQUOTE (§25.1 quoted-string:
/// qdtext and quoted-pair; a backslash may escape any octet but CR and LF).
pub fn quoted_string_end(s: &[u8], i: usize) -> Result<usize> {
    debug_assert_eq!(s.get(i), Some(&b'"'));
    let mut j = i + 1;
    while j < s.len() {
        match s[j] {
            b'"' => return Ok(j + 1),
            b'\\' => match s.get(j + 1) {
                Some(b'\r') | Some(b'\n') | None => {
                    return Err(ParseError::bad("", "bad escape in quoted string"))
                }
                Some(_) => j += 2,
            },
            _ => j += 1,
        }
    }
    Err(ParseError::bad("", "unterminated quoted string"))
}

/// Checks that `s` uses only characters allowed by `class` or valid %HH escapes (§19.1.2).
fn escaped_in(s: &[u8], class: &[bool; 256]) -> bool {
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        if b == b'%' {
            if i + 2 >= s.len() {
                return false;
            }
            if !(s[i + 1].is_ascii_hexdigit() && s[i + 2].is_ascii_hexdigit()) {
                return false;
            }
            i += 3;
        } else if class[b as usize] {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

pub fn is_user(s: &[u8]) -> bool {
    !s.is_empty() && escaped_in(s, &USER)
}

pub fn is_password(s: &[u8]) -> bool {
    escaped_in(s, &PASSWORD)
}

pub fn is_paramchars(s: &[u8]) -> bool {
    !s.is_empty() && escaped_in(s, &PARAMCHAR)
}

pub fn is_hnv(s: &[u8]) -> bool {
    escaped_in(s, &HNV)
}

/// Decodes %HH escapes (§19.1.2) for comparison; `s` must already have been validated.
pub fn unescape(s: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !s.contains(&b'%') {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex_val(s[i + 1]), hex_val(s[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    std::borrow::Cow::Owned(out)
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Splits a header value at commas that are not inside a quoted string or `<...>` (§7.3.1:
/// multiple values of a list header may be combined with commas). Elements are trimmed.
pub fn split_commas(s: &[u8]) -> CommaSplit<'_> {
    CommaSplit {
        s,
        pos: 0,
        done: false,
    }
}

pub struct CommaSplit<'a> {
    s: &'a [u8],
    pos: usize,
    done: bool,
}

impl<'a> Iterator for CommaSplit<'a> {
    type Item = Result<&'a [u8]>;

    /// Jumps between the bytes that matter (`memchr`) rather than looking at every byte: outside
    /// `<...>` a quote, `<` or `,`; inside it a quote or `>` (a `<` inside changes nothing).
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let start = self.pos;
        let mut i = start;
        let mut in_angle = false;
        loop {
            let rest = &self.s[i..];
            let found = if in_angle {
                memchr::memchr2(b'"', b'>', rest)
            } else {
                memchr::memchr3(b'"', b'<', b',', rest)
            };
            let Some(offset) = found else { break };
            i += offset;
            match self.s[i] {
                b'"' => match quoted_string_end(self.s, i) {
                    Ok(end) => {
                        i = end;
                        continue;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                },
                b'<' => in_angle = true,
                b'>' => in_angle = false,
                _ => {
                    self.pos = i + 1;
                    return Some(Ok(trim_ws(&self.s[start..i])));
                }
            }
            i += 1;
        }
        self.done = true;
        Some(Ok(trim_ws(&self.s[start..])))
    }
}

/// Appends `s` with each white-space run that holds a CR or LF replaced by one SP. A fold is
/// LWS, equivalent to one SP (§7.3.1), and a value the codec rewrites goes on one line, since
/// the edit refuses line breaks: RFC 4475 §3.1.1.1 folds its Via, which must still be editable.
pub fn push_unfolded(out: &mut Vec<u8>, s: &[u8]) {
    let mut i = 0;
    while i < s.len() {
        if is_ws(s[i]) {
            let end = skip_ws(s, i);
            if s[i..end].iter().any(|&b| b == b'\r' || b == b'\n') {
                out.push(b' ');
            } else {
                out.extend_from_slice(&s[i..end]);
            }
            i = end;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
}

/// Parses a non-negative decimal with at most `max` as value (no sign, no spaces).
pub fn parse_decimal(s: &[u8], max: u64) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    (v <= max).then_some(v)
}

/// `v` in decimal, the inverse of [`parse_decimal`], written into `buf` without `fmt` (for
/// numbers written on every message or stored binding: ports, expiry seconds).
pub fn decimal(v: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    let mut rest = v;
    loop {
        i -= 1;
        buf[i] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or_default()
}

/// ASCII case-insensitive equality.
pub fn eq_ic(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The byte-by-byte splitter `CommaSplit` replaced: what it must still agree with.
    fn split_commas_bytewise(s: &[u8]) -> Vec<Result<&[u8]>> {
        let mut out = Vec::new();
        let (mut start, mut i, mut in_angle) = (0, 0, false);
        while i < s.len() {
            match s[i] {
                b'"' => match quoted_string_end(s, i) {
                    Ok(end) => {
                        i = end;
                        continue;
                    }
                    Err(e) => {
                        out.push(Err(e));
                        return out;
                    }
                },
                b'<' => in_angle = true,
                b'>' => in_angle = false,
                b',' if !in_angle => {
                    out.push(Ok(trim_ws(&s[start..i])));
                    start = i + 1;
                }
                _ => {}
            }
            i += 1;
        }
        out.push(Ok(trim_ws(&s[start..])));
        out
    }

    proptest! {
        #[test]
        fn comma_split_agrees_with_the_bytewise_splitter(
            s in proptest::collection::vec(prop::sample::select(b"a,;\"<> \\=\r".to_vec()), 0..40)
        ) {
            let fast: Vec<_> = split_commas(&s).collect();
            prop_assert_eq!(fast, split_commas_bytewise(&s));
        }
    }

    #[test]
    fn commas_respect_quotes_and_angles() {
        let v: Vec<_> = split_commas(br#""a, b" <sip:x@y;p=1,2>, <sip:z>;q=0.5"#)
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(v, vec![&br#""a, b" <sip:x@y;p=1,2>"#[..], b"<sip:z>;q=0.5"]);
    }

    #[test]
    fn quoted_string_escapes() {
        let s = br#""J Rosenberg \\\"" x"#;
        assert_eq!(quoted_string_end(s, 0).unwrap(), 18);
        assert!(quoted_string_end(b"\"abc", 0).is_err());
    }

    #[test]
    fn escapes_checked_and_decoded() {
        assert!(is_user(b"null-%00-null"));
        assert!(!is_user(b"bad%zz"));
        assert!(!is_user(b"bad%2"));
        assert_eq!(&*unescape(b"%75se%72"), b"user");
        assert_eq!(&*unescape(b"100%"), b"100%");
    }

    #[test]
    fn decimals() {
        assert_eq!(parse_decimal(b"0068", 255), Some(68));
        assert_eq!(parse_decimal(b"300", 255), None);
        assert_eq!(parse_decimal(b"-1", 255), None);
        assert_eq!(parse_decimal(b"36893488147419103232", u64::MAX), None);
        let mut buf = [0; 20];
        for v in [0, 7, 10, 5060, 65535, 3600, u64::from(u32::MAX), u64::MAX] {
            assert_eq!(decimal(v, &mut buf), v.to_string());
            assert_eq!(parse_decimal(v.to_string().as_bytes(), u64::MAX), Some(v));
        }
    }
}
