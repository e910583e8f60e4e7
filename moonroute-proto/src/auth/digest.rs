//! Digest credentials: parsing `Authorization` / `Proxy-Authorization` values and computing
//! the response a client should have sent.
//!
//! Owns the grammar of RFC 3261 §25.1 (`credentials`, `digest-response`, `dig-resp`), which is
//! RFC 2617 §3.2.2's, and the computation of RFC 2617 §3.2.2.1-§3.2.2.3 with the algorithms of
//! RFC 8760 (`MD5` and `SHA-256`): with `qop=auth`,
//! `response = H(HA1 ":" nonce ":" nc ":" cnonce ":" qop ":" HA2)`, and without qop (RFC 2069
//! compatibility, RFC 2617 §3.2.2.1) `response = H(HA1 ":" nonce ":" HA2)`, where
//! `HA2 = H(method ":" digest-uri)` (RFC 3261 §22.4: the method is the request's).
//!
//! `-sess` algorithms and `qop=auth-int` are refused: they are never offered. Parsing is
//! hostile-input safe: bounded lengths and parameter counts, duplicates refused, every error
//! a value, never a panic.

use md5::{Digest as _, Md5};
use ring::digest::{digest, SHA256};
use std::borrow::Cow;

/// Longest credentials value accepted (a real one is a few hundred bytes).
pub const MAX_CREDENTIALS_LEN: usize = 4096;
/// Most auth-params in one credentials value.
pub const MAX_PARAMS: usize = 32;
/// Longest single parameter value (after unquoting).
pub const MAX_VALUE_LEN: usize = 1024;

/// A digest algorithm offered and accepted (RFC 8760 §2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    /// The token as written in `algorithm=` (RFC 8760 §2.2).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    /// Parses an algorithm token (case-insensitive, RFC 2617 §3.2.1); `-sess` variants are
    /// not supported and give `None`.
    pub fn parse(token: &str) -> Option<Algorithm> {
        if token.eq_ignore_ascii_case("MD5") {
            Some(Algorithm::Md5)
        } else if token.eq_ignore_ascii_case("SHA-256") {
            Some(Algorithm::Sha256)
        } else {
            None
        }
    }

    /// Lowercase hex of H(data) (RFC 2617 §3.2.1 `H`, RFC 8760 §2.3 for SHA-256).
    pub fn hash_hex(self, data: &[u8]) -> String {
        match self {
            Algorithm::Md5 => hex(&Md5::digest(data)),
            Algorithm::Sha256 => hex(digest(&SHA256, data).as_ref()),
        }
    }

    /// Length of a response in hex digits.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Md5 => 32,
            Algorithm::Sha256 => 64,
        }
    }

    /// HA1 = H(username ":" realm ":" password) (RFC 2617 §3.2.2.2), what the subscriber
    /// table stores instead of the password.
    pub fn ha1(self, username: &str, realm: &str, password: &str) -> String {
        self.hash_hex(format!("{username}:{realm}:{password}").as_bytes())
    }
}

/// Lowercase hex (RFC 2617 §3.1.3 LHEX).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Decodes hex (either case); `None` on an odd length or a non-hex digit.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let bytes = text.as_bytes();
    if bytes.len() % 2 != 0 {
        return None;
    }
    bytes
        .chunks(2)
        .map(|pair| Some((digit(pair[0])? << 4) | digit(pair[1])?))
        .collect()
}

/// Equality that takes the same time whatever the contents (lengths are not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The quality of protection a credential used (RFC 2617 §3.2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QopAuth {
    /// `nc`, the nonce count (8 hex digits, RFC 2617 §3.2.2), as sent (for the hash) and its
    /// value.
    pub nc_text: String,
    pub nc: u32,
    pub cnonce: String,
}

/// Digest credentials as sent by a client (RFC 2617 §3.2.2, RFC 3261 §25.1 `digest-response`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    pub uri: String,
    pub response: String,
    /// `algorithm`, `None` when absent (MD5, RFC 2617 §3.2.1); the token as sent.
    pub algorithm: Option<String>,
    pub opaque: Option<String>,
    /// `qop=auth` with its `nc` and `cnonce`; `None` without qop.
    pub qop: Option<QopAuth>,
}

/// Why a credentials value could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not the `Digest` scheme (e.g. `Basic`): not ours to check.
    NotDigest,
    /// Broken syntax, a missing or duplicate parameter, or a value out of bounds.
    Malformed(&'static str),
    /// `qop` other than `auth` (`auth-int` is never offered).
    UnsupportedQop,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::NotDigest => f.write_str("not Digest credentials"),
            ParseError::Malformed(why) => write!(f, "malformed credentials: {why}"),
            ParseError::UnsupportedQop => f.write_str("unsupported qop"),
        }
    }
}

impl std::error::Error for ParseError {}

/// The realm named in a Digest credentials value, cheaply, to pick the value for a realm
/// without judging the rest (a malformed value for another realm is not ours to refuse).
pub fn realm_of(value: &[u8]) -> Option<Cow<'_, str>> {
    let params = split_params(value).ok()?;
    params
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("realm"))
        .map(|(_, v)| v)
}

/// Parses one `Authorization`/`Proxy-Authorization` value (RFC 3261 §25.1 `credentials`).
pub fn parse(value: &[u8]) -> Result<Credentials, ParseError> {
    let params = split_params(value)?;
    let mut username = None;
    let mut realm = None;
    let mut nonce = None;
    let mut uri = None;
    let mut response = None;
    let mut algorithm = None;
    let mut opaque = None;
    let mut qop = None;
    let mut nc = None;
    let mut cnonce = None;
    for (index, (name, value)) in params.iter().enumerate() {
        if params[..index]
            .iter()
            .any(|(earlier, _)| earlier.eq_ignore_ascii_case(name))
        {
            return Err(ParseError::Malformed("a parameter is repeated"));
        }
        let mut buf = [0u8; 16];
        // Longer names are auth-param extensions: ignored like the others below.
        let Some(lower) = lowercase_short(name, &mut buf) else {
            continue;
        };
        let slot = match lower {
            "username" => &mut username,
            "realm" => &mut realm,
            "nonce" => &mut nonce,
            "uri" => &mut uri,
            "response" => &mut response,
            "algorithm" => &mut algorithm,
            "opaque" => &mut opaque,
            "qop" => &mut qop,
            "nc" => &mut nc,
            "cnonce" => &mut cnonce,
            // auth-param extensions are ignored (RFC 2617 §3.2.2).
            _ => continue,
        };
        *slot = Some(value.clone().into_owned());
    }
    let required = |v: Option<String>, what: &'static str| v.ok_or(ParseError::Malformed(what));
    let qop = match qop {
        None => None,
        Some(q) if q.eq_ignore_ascii_case("auth") => {
            let nc_text = required(nc, "qop without nc")?;
            let cnonce = required(cnonce, "qop without cnonce")?;
            if nc_text.len() != 8 {
                return Err(ParseError::Malformed("nc is not 8 hex digits"));
            }
            let nc = u32::from_str_radix(&nc_text, 16)
                .map_err(|_| ParseError::Malformed("nc is not 8 hex digits"))?;
            if nc == 0 || !nc_text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ParseError::Malformed("nc is not a count from 1"));
            }
            Some(QopAuth {
                nc_text,
                nc,
                cnonce,
            })
        }
        Some(_) => return Err(ParseError::UnsupportedQop),
    };
    Ok(Credentials {
        username: required(username, "no username")?,
        realm: required(realm, "no realm")?,
        nonce: required(nonce, "no nonce")?,
        uri: required(uri, "no uri")?,
        response: required(response, "no response")?,
        algorithm,
        opaque,
        qop,
    })
}

/// `name` in lowercase in `buf` without allocating, `None` when longer than `buf`.
fn lowercase_short<'b>(name: &str, buf: &'b mut [u8; 16]) -> Option<&'b str> {
    let out = buf.get_mut(..name.len())?;
    out.copy_from_slice(name.as_bytes());
    out.make_ascii_lowercase();
    std::str::from_utf8(out).ok()
}

/// `Digest` and its `name=value` pairs, values unquoted (RFC 2617 §3.2.2, RFC 3261 §25.1
/// `auth-param`, `quoted-string` with `\` escapes).
fn split_params(value: &[u8]) -> Result<Vec<(&str, Cow<'_, str>)>, ParseError> {
    if value.len() > MAX_CREDENTIALS_LEN {
        return Err(ParseError::Malformed("too long"));
    }
    let text = std::str::from_utf8(value).map_err(|_| ParseError::Malformed("not UTF-8"))?;
    let text = text.trim_matches(|c| c == ' ' || c == '\t');
    let (scheme, rest) = text
        .split_once([' ', '\t'])
        .ok_or(ParseError::Malformed("no parameters"))?;
    if !scheme.eq_ignore_ascii_case("Digest") {
        return Err(ParseError::NotDigest);
    }
    let mut cursor = Cursor {
        bytes: rest.as_bytes(),
        at: 0,
    };
    let mut params = Vec::new();
    loop {
        cursor.skip_lws();
        let name = cursor
            .token()
            .ok_or(ParseError::Malformed("a parameter name"))?;
        cursor.skip_lws();
        if !cursor.eat(b'=') {
            return Err(ParseError::Malformed("a parameter without ="));
        }
        cursor.skip_lws();
        let value = if cursor.peek() == Some(b'"') {
            cursor.quoted()?
        } else {
            Cow::Borrowed(
                cursor
                    .token()
                    .ok_or(ParseError::Malformed("a parameter value"))?,
            )
        };
        if value.len() > MAX_VALUE_LEN {
            return Err(ParseError::Malformed("a parameter value is too long"));
        }
        params.push((name, value));
        if params.len() > MAX_PARAMS {
            return Err(ParseError::Malformed("too many parameters"));
        }
        cursor.skip_lws();
        match cursor.peek() {
            None => break,
            Some(b',') => cursor.at += 1,
            Some(_) => return Err(ParseError::Malformed("junk after a parameter")),
        }
    }
    Ok(params)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.at += 1;
            return true;
        }
        false
    }

    fn skip_lws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.at += 1;
        }
    }

    /// A token (RFC 3261 §25.1), borrowed.
    fn token(&mut self) -> Option<&'a str> {
        let start = self.at;
        while self.peek().is_some_and(crate::sip::scan::is_token_char) {
            self.at += 1;
        }
        // Token characters are ASCII, so the slice is valid UTF-8.
        (self.at > start)
            .then(|| std::str::from_utf8(&self.bytes[start..self.at]).ok())
            .flatten()
    }

    /// A quoted-string, unescaped (`\` quotes the next character, RFC 3261 §25.1
    /// `quoted-pair`): borrowed when it has no escapes, as nearly every value does.
    fn quoted(&mut self) -> Result<Cow<'a, str>, ParseError> {
        let body = &self.bytes[self.at + 1..];
        if let Some(end) = memchr::memchr2(b'"', b'\\', body) {
            if body[end] == b'"' {
                self.at += end + 2;
                return std::str::from_utf8(&body[..end])
                    .map(Cow::Borrowed)
                    .map_err(|_| ParseError::Malformed("not UTF-8"));
            }
        }
        self.quoted_with_escapes().map(Cow::Owned)
    }

    fn quoted_with_escapes(&mut self) -> Result<String, ParseError> {
        self.at += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(ParseError::Malformed("an unterminated quoted string")),
                Some(b'"') => {
                    self.at += 1;
                    break;
                }
                Some(b'\\') => {
                    let escaped = self
                        .bytes
                        .get(self.at + 1)
                        .copied()
                        .ok_or(ParseError::Malformed("an unterminated quoted string"))?;
                    if escaped == b'\r' || escaped == b'\n' {
                        return Err(ParseError::Malformed("an escaped line break"));
                    }
                    out.push(escaped);
                    self.at += 2;
                }
                Some(b) => {
                    out.push(b);
                    self.at += 1;
                }
            }
            if out.len() > MAX_VALUE_LEN {
                return Err(ParseError::Malformed("a parameter value is too long"));
            }
        }
        String::from_utf8(out).map_err(|_| ParseError::Malformed("not UTF-8"))
    }
}

/// The response a client knowing HA1 computes (RFC 2617 §3.2.2.1; RFC 8760 §2.4 for
/// SHA-256).
pub fn expected_response(
    algorithm: Algorithm,
    ha1: &str,
    method: &str,
    credentials: &Credentials,
) -> String {
    let ha2 = algorithm.hash_hex(format!("{method}:{}", credentials.uri).as_bytes());
    let input = match &credentials.qop {
        Some(q) => format!(
            "{ha1}:{}:{}:{}:auth:{ha2}",
            credentials.nonce, q.nc_text, q.cnonce
        ),
        None => format!("{ha1}:{}:{ha2}", credentials.nonce),
    };
    algorithm.hash_hex(input.as_bytes())
}

/// What a client needs to answer a challenge (the UAC side of RFC 2617 §3.2.2), for tests.
#[derive(Clone, Debug)]
pub struct Answer<'a> {
    pub username: &'a str,
    pub password: &'a str,
    pub method: &'a str,
    pub uri: &'a str,
    /// The nonce count (`nc`), used when the challenge offers `qop="auth"`.
    pub nc: u32,
    pub cnonce: &'a str,
}

/// Why [`answer`] could not answer a challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnswerError {
    /// The challenge's parameters do not parse.
    Challenge(ParseError),
    NoRealm,
    NoNonce,
    /// An `algorithm` this server does not know (RFC 8760 §2.1 names them).
    UnsupportedAlgorithm(String),
    /// `nc` is 0: the nonce count starts at 1 (RFC 2617 §3.2.2).
    NcZero,
}

impl std::fmt::Display for AnswerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnswerError::Challenge(error) => write!(f, "the challenge: {error}"),
            AnswerError::NoRealm => f.write_str("the challenge has no realm"),
            AnswerError::NoNonce => f.write_str("the challenge has no nonce"),
            AnswerError::UnsupportedAlgorithm(token) => {
                write!(f, "unsupported algorithm {token:?}")
            }
            AnswerError::NcZero => f.write_str("nc counts from 1"),
        }
    }
}

impl From<ParseError> for AnswerError {
    fn from(error: ParseError) -> Self {
        AnswerError::Challenge(error)
    }
}

impl std::error::Error for AnswerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AnswerError::Challenge(error) => Some(error),
            _ => None,
        }
    }
}

/// The `Authorization`/`Proxy-Authorization` value answering `challenge` (a
/// `WWW-Authenticate`/`Proxy-Authenticate` value, RFC 3261 §25.1 `challenge`): its realm,
/// nonce, algorithm (MD5 when absent, RFC 2617 §3.2.1) and opaque, `qop=auth` with `nc` and
/// `cnonce` when the challenge offers it (RFC 2617 §3.2.2), and the response computed as
/// [`expected_response`] does. What a UA does; the server never needs it (offline tests do).
pub fn answer(challenge: &[u8], answer: &Answer<'_>) -> Result<String, AnswerError> {
    let params = split_params(challenge)?;
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    };
    let realm = param("realm").ok_or(AnswerError::NoRealm)?;
    let nonce = param("nonce").ok_or(AnswerError::NoNonce)?;
    let algorithm = match param("algorithm") {
        None => Algorithm::Md5,
        Some(token) => Algorithm::parse(token)
            .ok_or_else(|| AnswerError::UnsupportedAlgorithm(token.to_owned()))?,
    };
    // qop-options is a quoted, comma-separated list (RFC 2617 §3.2.1).
    let offers_auth = param("qop").is_some_and(|options| {
        options
            .split(',')
            .any(|option| option.trim().eq_ignore_ascii_case("auth"))
    });
    if answer.nc == 0 {
        return Err(AnswerError::NcZero);
    }
    let credentials = Credentials {
        username: answer.username.to_owned(),
        realm: realm.to_owned(),
        nonce: nonce.to_owned(),
        uri: answer.uri.to_owned(),
        response: String::new(),
        algorithm: Some(algorithm.name().to_owned()),
        opaque: param("opaque").map(str::to_owned),
        qop: offers_auth.then(|| QopAuth {
            nc_text: format!("{:08x}", answer.nc),
            nc: answer.nc,
            cnonce: answer.cnonce.to_owned(),
        }),
    };
    let ha1 = algorithm.ha1(answer.username, realm, answer.password);
    let response = expected_response(algorithm, &ha1, answer.method, &credentials);
    let quoted = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut value = format!(
        "Digest username={}, realm={}, nonce={}, uri={}, response=\"{response}\", algorithm={}",
        quoted(answer.username),
        quoted(realm),
        quoted(nonce),
        quoted(answer.uri),
        algorithm.name()
    );
    if let Some(qop) = &credentials.qop {
        value.push_str(&format!(
            ", qop=auth, nc={}, cnonce={}",
            qop.nc_text,
            quoted(&qop.cnonce)
        ));
    }
    if let Some(opaque) = &credentials.opaque {
        value.push_str(&format!(", opaque={}", quoted(opaque)));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_the_rfc_2617_example_challenge() {
        // RFC 2617 §3.5: the challenge and the response it gives.
        let challenge = br#"Digest realm="testrealm@host.com", qop="auth,auth-int",
            nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41""#;
        let answer = Answer {
            username: "Mufasa",
            password: "Circle Of Life",
            method: "GET",
            uri: "/dir/index.html",
            nc: 1,
            cnonce: "0a4f113b",
        };
        let value = super::answer(challenge, &answer).unwrap();
        let credentials = parse(value.as_bytes()).unwrap();
        assert_eq!(credentials.response, "6629fae49393a05397450978507c4ef1");
        assert_eq!(
            credentials.opaque.as_deref(),
            Some("5ccc069c403ebaf9f0171e9517f40e41")
        );
        assert_eq!(credentials.qop.unwrap().nc_text, "00000001");
        // SHA-256, no qop (RFC 2069 form), quotes escaped.
        let value = super::answer(
            br#"Digest realm="a\"b", nonce="n", algorithm=SHA-256"#,
            &Answer {
                username: "u\\x",
                ..answer.clone()
            },
        )
        .unwrap();
        let credentials = parse(value.as_bytes()).unwrap();
        assert_eq!(
            (credentials.realm.as_str(), credentials.username.as_str()),
            ("a\"b", "u\\x")
        );
        assert_eq!(credentials.qop, None);
        let ha1 = Algorithm::Sha256.ha1("u\\x", "a\"b", "Circle Of Life");
        assert_eq!(
            credentials.response,
            expected_response(Algorithm::Sha256, &ha1, "GET", &credentials)
        );
        // `moonroute.digest` puts these texts in its Lua error.
        for (bad, why) in [
            (&b"Basic x"[..], "the challenge: not Digest credentials"),
            (b"Digest nonce=n", "the challenge has no realm"),
            (b"Digest realm=r", "the challenge has no nonce"),
            (
                b"Digest realm=r, nonce=n, algorithm=MD5-sess",
                "unsupported algorithm \"MD5-sess\"",
            ),
        ] {
            assert_eq!(super::answer(bad, &answer).unwrap_err().to_string(), why);
        }
        let error = super::answer(challenge, &Answer { nc: 0, ..answer }).unwrap_err();
        assert_eq!(
            (error.clone(), error.to_string().as_str()),
            (AnswerError::NcZero, "nc counts from 1")
        );
    }

    #[test]
    fn rfc_2617_example_response() {
        // RFC 2617 §3.5 (method GET, password "Circle Of Life").
        let credentials = parse(
            br#"Digest username="Mufasa", realm="testrealm@host.com",
            nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", qop=auth,
            nc=00000001, cnonce="0a4f113b", response="6629fae49393a05397450978507c4ef1",
            opaque="5ccc069c403ebaf9f0171e9517f40e41""#,
        )
        .unwrap();
        let ha1 = Algorithm::Md5.ha1("Mufasa", "testrealm@host.com", "Circle Of Life");
        assert_eq!(
            expected_response(Algorithm::Md5, &ha1, "GET", &credentials),
            "6629fae49393a05397450978507c4ef1"
        );
        assert_eq!(credentials.qop.as_ref().unwrap().nc, 1);
    }

    #[test]
    fn rfc_7616_sha256_example_response() {
        // RFC 7616 §3.9.1: the SHA-256 variant of the same exchange.
        let credentials = parse(
            br#"Digest username="Mufasa", realm="http-auth@example.org", uri="/dir/index.html",
            algorithm=SHA-256, nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", nc=00000001,
            cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", qop=auth,
            response="753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS""#,
        )
        .unwrap();
        let ha1 = Algorithm::Sha256.ha1("Mufasa", "http-auth@example.org", "Circle of Life");
        assert_eq!(
            expected_response(Algorithm::Sha256, &ha1, "GET", &credentials),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
    }

    #[test]
    fn sipp_3_6_1_credentials_as_sent() {
        // SIPp 3.6.1's [authentication] answer to a moonroute 401 (bench/register_auth_uac.xml,
        // captured with -trace_msg): no space after the commas, qop and nc unquoted,
        // algorithm last. User r1, realm 127.0.0.1, password bench-pw, method REGISTER.
        let credentials = parse(
            b"Digest username=\"r1\",realm=\"127.0.0.1\",cnonce=\"6b8b4567\",nc=00000001,\
              qop=auth,uri=\"sip:127.0.0.1:15460\",\
              nonce=\"000000006b016a10da68f85021463f70f7a30c88d90dac7894f213d618db1a6f\",\
              response=\"605fd9988e6a8ef3a6c289210b5d7dba\",algorithm=MD5",
        )
        .unwrap();
        assert_eq!(credentials.username, "r1");
        assert_eq!(credentials.uri, "sip:127.0.0.1:15460");
        assert_eq!(credentials.algorithm.as_deref(), Some("MD5"));
        assert_eq!(credentials.qop.as_ref().unwrap().cnonce, "6b8b4567");
        let ha1 = Algorithm::Md5.ha1("r1", "127.0.0.1", "bench-pw");
        assert_eq!(
            expected_response(Algorithm::Md5, &ha1, "REGISTER", &credentials),
            credentials.response
        );
    }

    #[test]
    fn names_are_case_insensitive_and_escapes_unquoted() {
        let c = parse(br#"digest USERNAME="a\"b", Realm=r, NONCE="n", Uri="sip:x", Response="00""#)
            .unwrap();
        assert_eq!(c.username, "a\"b");
        assert_eq!(c.realm, "r");
        assert!(c.qop.is_none());
    }

    #[test]
    fn hostile_input_is_an_error() {
        let bad: &[&[u8]] = &[
            b"",
            b"Digest",
            b"Digest ",
            b"Digest username",
            b"Digest username=",
            b"Digest username=\"unterminated",
            b"Digest username=\"a\\",
            b"Digest username=a username=b",
            b"Digest username=a, username=b, realm=r, nonce=n, uri=u, response=r",
            b"Digest username=a, USERNAME=b, realm=r, nonce=n, uri=u, response=r",
            b"Digest username=a, realm=r, nonce=n, uri=u, response=r, Some-Extension=1, some-extension=2",
            b"Digest username=a, realm=r, nonce=n, uri=u",
            b"Digest username=a, realm=r, nonce=n, uri=u, response=r, qop=auth",
            b"Digest username=a, realm=r, nonce=n, uri=u, response=r, qop=auth, nc=1, cnonce=c",
            b"Digest username=a, realm=r, nonce=n, uri=u, response=r, qop=auth, nc=0000000g, cnonce=c",
            b"Digest username=a, realm=r, nonce=n, uri=u, response=r, qop=auth, nc=00000000, cnonce=c",
            b"Digest username=a, realm=r, nonce=n, uri=u, response=r, qop=auth, nc=+0000001, cnonce=c",
            b"Digest \xff=1",
        ];
        for input in bad {
            assert!(
                matches!(parse(input), Err(ParseError::Malformed(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(input),
                parse(input)
            );
        }
        assert_eq!(parse(b"Basic QWxhZGRpbjpvcGVu"), Err(ParseError::NotDigest));
        assert_eq!(
            parse(b"Digest username=a, realm=r, nonce=n, uri=u, response=r, qop=auth-int, nc=00000001, cnonce=c"),
            Err(ParseError::UnsupportedQop)
        );
        let long = format!("Digest username=\"{}\"", "a".repeat(MAX_VALUE_LEN + 1));
        assert!(parse(long.as_bytes()).is_err());
        let many = format!("Digest {}", vec!["x=1"; MAX_PARAMS + 1].join(","));
        assert!(parse(many.as_bytes()).is_err());
        assert!(parse(&vec![b'a'; MAX_CREDENTIALS_LEN + 1]).is_err());
    }

    #[test]
    fn algorithms_and_hex() {
        assert_eq!(Algorithm::parse("sha-256"), Some(Algorithm::Sha256));
        assert_eq!(Algorithm::parse("MD5-sess"), None);
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00ABff"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_eq!(
            realm_of(b"Digest realm=\"x.org\", nonce=1").as_deref(),
            Some("x.org")
        );
    }
}
