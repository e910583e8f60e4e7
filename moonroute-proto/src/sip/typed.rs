//! Scalar header values: CSeq (§20.16, §8.1.1.5), Call-ID (§20.8), Max-Forwards (§20.22),
//! Date (§20.17).

use super::error::{ParseError, Result};
use super::method::Method;
use super::scan;

/// CSeq = 1*DIGIT LWS Method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CSeq {
    pub seq: u32,
    pub method: Method,
}

impl CSeq {
    /// The number must fit 32 bits (§8.1.1.5; RFC 4475 §3.1.2.4 overflows it).
    pub fn parse(v: &[u8]) -> Result<CSeq> {
        let v = scan::trim_ws(v);
        let digits_end = v
            .iter()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(v.len());
        let seq = scan::parse_decimal(&v[..digits_end], u64::from(u32::MAX)).ok_or(
            ParseError::bad("CSeq", "sequence number missing or too large"),
        )? as u32;
        let method_start = scan::skip_ws(v, digits_end);
        if method_start == digits_end {
            return Err(ParseError::bad("CSeq", "no method"));
        }
        let method = Method::parse(&v[method_start..]).map_err(|e| e.in_context("CSeq"))?;
        Ok(CSeq { seq, method })
    }
}

/// callid = word [ "@" word ].
pub fn parse_call_id(v: &[u8]) -> Result<&[u8]> {
    let v = scan::trim_ws(v);
    let mut parts = v.splitn(2, |&b| b == b'@');
    let ok_word = |w: &[u8]| !w.is_empty() && w.iter().all(|&b| scan::is_word_char(b));
    let first_ok = parts.next().is_some_and(ok_word);
    let second_ok = parts.next().is_none_or(ok_word);
    if first_ok && second_ok {
        Ok(v)
    } else {
        Err(ParseError::bad("Call-ID", "not a valid call identifier"))
    }
}

/// Max-Forwards = 1*DIGIT, in the range 0-255 (§20.22).
pub fn parse_max_forwards(v: &[u8]) -> Result<u8> {
    scan::parse_decimal(scan::trim_ws(v), 255)
        .map(|n| n as u8)
        .ok_or(ParseError::bad(
            "Max-Forwards",
            "not a number from 0 to 255",
        ))
}

/// Date = rfc1123-date: wkday "," SP 2DIGIT SP month SP 4DIGIT SP 2DIGIT ":" 2DIGIT ":" 2DIGIT
/// SP "GMT" (§20.17, §25.1; SIP allows GMT only, RFC 4475 §3.1.2.12).
pub fn check_date(v: &[u8]) -> Result<()> {
    const WKDAYS: [&[u8]; 7] = [b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun"];
    const MONTHS: [&[u8]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let v = scan::trim_ws(v);
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    let ok = v.len() == 29
        && WKDAYS.contains(&&v[0..3])
        && &v[3..5] == b", "
        && digits(&v[5..7])
        && v[7] == b' '
        && MONTHS.contains(&&v[8..11])
        && v[11] == b' '
        && digits(&v[12..16])
        && v[16] == b' '
        && digits(&v[17..19])
        && v[19] == b':'
        && digits(&v[20..22])
        && v[22] == b':'
        && digits(&v[23..25])
        && &v[25..] == b" GMT";
    if ok {
        Ok(())
    } else {
        Err(ParseError::bad("Date", "not an RFC 1123 date in GMT"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cseq() {
        let c = CSeq::parse(b"0009\r\n  INVITE").unwrap();
        assert_eq!((c.seq, c.method), (9, Method::Invite));
        assert!(CSeq::parse(b"36893488147419103232 REGISTER").is_err());
        assert!(CSeq::parse(b"1INVITE").is_err());
        assert!(CSeq::parse(b"-1 INVITE").is_err());
    }

    #[test]
    fn call_id_and_max_forwards() {
        assert!(parse_call_id(b"intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{").is_ok());
        assert!(parse_call_id(b"a b").is_err());
        assert!(parse_call_id(b"a@b@c").is_err());
        assert_eq!(parse_max_forwards(b"0068").unwrap(), 68);
        assert!(parse_max_forwards(b"300").is_err());
    }

    #[test]
    fn dates() {
        assert!(check_date(b"Sat, 13 Nov 2010 23:29:00 GMT").is_ok());
        assert!(check_date(b"Fri, 01 Jan 2010 16:00:00 EST").is_err());
        assert!(check_date(b"Fri, 1 Jan 2010 16:00:00 GMT").is_err());
    }
}
