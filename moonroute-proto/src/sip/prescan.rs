//! Reading the few fields that decide where a message is processed, before (and without) a full
//! parse: whether it is a response, its method, its Call-ID.
//!
//! Owns nothing the parser ([`crate::sip::Message::parse`]) does not also decide: these
//! functions follow its line rules (leading CRLFs skipped, §7.5; lines end in CRLF or a bare
//! LF; a line starting with SP or HTAB continues the previous header field, §7.3.1; the header
//! block ends at the first empty line, §7) and return the same bytes the parser would, so a
//! retransmission (the same bytes) always gets the same answer. They never allocate and never
//! fail loudly: on anything they cannot read they answer `None`, and the full parser, which
//! runs next, refuses the message with the proper error.
//!
//! The Call-ID is returned as its exact bytes: RFC 3261 §20.8 compares Call-IDs byte by byte
//! (case-sensitively), so no normalisation is needed for two copies of one request to agree.

use memchr::memchr;

use super::message::line_at;
use super::scan;

/// The number of CR and LF bytes the message starts with (§7.5: skipped by the parser).
fn leading_crlf_len(message: &[u8]) -> usize {
    message
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(message.len())
}

/// Whether `message` starts like a response: its first line begins with `SIP/` in any case
/// (§7.2, as the parser tells a Status-Line from a Request-Line).
pub fn is_response(message: &[u8]) -> bool {
    let start = &message[leading_crlf_len(message)..];
    start.len() >= 4 && scan::eq_ic(&start[..4], b"SIP/")
}

/// The method token of a request: the first line up to its first SP (§7.1; method names are
/// case-sensitive, so `OPTIONS` and `options` are different methods). For a response this is
/// its SIP-Version; `None` when the first line has no SP.
pub fn method(message: &[u8]) -> Option<&[u8]> {
    let start = leading_crlf_len(message);
    let (end, _) = line_at(message, start)?;
    let line = &message[start..end];
    memchr(b' ', line).map(|sp| &line[..sp])
}

/// The value of the first Call-ID header field (long form `Call-ID` or compact form `i`, any
/// case, §7.3.3, §20.8), trimmed of white space, continuation lines included; `None` when the
/// header block has none before a line the parser would refuse (one without an LF), or when
/// it is empty. One pass over the line ends; only the first bytes of each line are looked at.
pub fn call_id(message: &[u8]) -> Option<&[u8]> {
    let head = &message[leading_crlf_len(message)..];
    let mut line_ends = memchr::memchr_iter(b'\n', head);
    let mut line_start = line_ends.next()? + 1; // past the start line
    while let Some(lf) = line_ends.next() {
        let line = without_cr(&head[line_start..lf]);
        if line.is_empty() {
            return None; // the empty line ending the header block: the body is not searched
        }
        if let Some(value_start) = call_id_value_start(line) {
            // The value goes on over the continuation lines that follow (§7.3.1).
            let mut value_end = line_start + line.len();
            let mut next = lf + 1;
            while matches!(head.get(next), Some(b' ' | b'\t')) {
                let lf = line_ends.next()?;
                value_end = next + without_cr(&head[next..lf]).len();
                next = lf + 1;
            }
            let value = scan::trim_ws(&head[line_start + value_start..value_end]);
            return (!value.is_empty()).then_some(value);
        }
        line_start = lf + 1;
    }
    None
}

/// A line without the CR of its CRLF.
fn without_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Where the value of a Call-ID header line starts (just past the colon), or `None` when the
/// line is another header field or a continuation line. HCOLON allows SP and HTAB before the
/// colon (§7.3.1, §25.1); a name followed by anything else is another header (`Call-Info`,
/// `Call-IDx`, `id`).
fn call_id_value_start(line: &[u8]) -> Option<usize> {
    let name_len = match line.first()? {
        b'i' | b'I' => 1,
        b'c' | b'C' if line.len() >= 7 && scan::eq_ic(&line[..7], b"call-id") => 7,
        _ => return None,
    };
    let colon = name_len
        + line[name_len..]
            .iter()
            .position(|&b| b != b' ' && b != b'\t')?;
    (line[colon] == b':').then_some(colon + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::Message;
    use bytes::Bytes;

    /// The Call-ID the full parser finds, for comparison.
    fn parsed_call_id(message: &[u8]) -> Option<Vec<u8>> {
        let parsed = Message::parse(Bytes::copy_from_slice(message)).ok()?;
        parsed
            .header(crate::sip::HeaderName::CallId)
            .map(|v| scan::trim_ws(v).to_vec())
    }

    const INVITE: &[u8] = b"INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK776a;rport\r\n\
Max-Forwards: 70\r\n\
To: <sip:bob@example.com>\r\n\
From: <sip:alice@example.com>;tag=1928301774\r\n\
Call-Info: <http://example.com/x>\r\n\
CSeq: 1 INVITE\r\n\
Call-ID: a84b4c76e66710@127.0.0.1\r\n\
Contact: <sip:alice@127.0.0.1:5062>\r\n\
Content-Length: 0\r\n\r\n";

    #[test]
    fn finds_the_call_id_as_the_parser_does() {
        assert_eq!(call_id(INVITE), Some(&b"a84b4c76e66710@127.0.0.1"[..]));
        assert_eq!(
            parsed_call_id(INVITE).as_deref(),
            Some(&b"a84b4c76e66710@127.0.0.1"[..])
        );
        assert_eq!(method(INVITE), Some(&b"INVITE"[..]));
        assert!(!is_response(INVITE));
    }

    #[test]
    fn compact_form_any_case_spaces_before_the_colon_and_bare_lf() {
        for message in [
            &b"BYE sip:a@b SIP/2.0\r\ni: xyz@h\r\nCSeq: 2 BYE\r\n\r\n"[..],
            b"BYE sip:a@b SIP/2.0\r\nI  :\txyz@h  \r\n\r\n",
            b"BYE sip:a@b SIP/2.0\r\nCALL-ID: xyz@h\r\n\r\n",
            b"BYE sip:a@b SIP/2.0\ncall-id:xyz@h\n\n",
            b"\r\n\r\nBYE sip:a@b SIP/2.0\r\nCall-Id: xyz@h\r\n",
        ] {
            assert_eq!(
                call_id(message),
                Some(&b"xyz@h"[..]),
                "{}",
                String::from_utf8_lossy(message)
            );
            assert_eq!(
                parsed_call_id(message).as_deref(),
                Some(&b"xyz@h"[..]),
                "{}",
                String::from_utf8_lossy(message)
            );
        }
    }

    #[test]
    fn a_folded_value_runs_over_its_continuation_lines() {
        let message = b"ACK sip:a@b SIP/2.0\r\nCall-ID:\r\n  folded@h\r\n\tCSeq-like: no\r\nCSeq: 1 ACK\r\n\r\n";
        assert_eq!(call_id(message), Some(&b"folded@h\r\n\tCSeq-like: no"[..]));
        assert_eq!(
            parsed_call_id(message).as_deref(),
            call_id(message),
            "the same bytes as the parser"
        );
    }

    #[test]
    fn headers_that_only_look_alike_are_not_the_call_id() {
        for message in [
            // Call-Info, a continuation line, a body line, and an "i" parameter are not it.
            &b"INVITE sip:a@b SIP/2.0\r\nCall-Info: <http://x>\r\n i: fake\r\nIn-Reply-To: r@h\r\n\r\nCall-ID: body@h\r\n"[..],
            b"INVITE sip:a@b SIP/2.0\r\nCall-IDx: no@h\r\nid: no@h\r\n\r\n",
            b"MESSAGE sip:a@b SIP/2.0\r\nCall-ID:   \r\n\r\n",
            b"OPTIONS sip:a@b SIP/2.0",
            b"BYE sip:a@b SIP/2.0\r\nCall-ID: no-line-end@h",
            b"Call-ID: start-line@h\r\n\r\n",
            b"",
            b"\r\n\r\n",
        ] {
            assert_eq!(call_id(message), None, "{}", String::from_utf8_lossy(message));
        }
    }

    #[test]
    fn the_first_call_id_wins() {
        let message = b"BYE sip:a@b SIP/2.0\r\nCall-ID: first@h\r\ni: second@h\r\n\r\n";
        assert_eq!(call_id(message), Some(&b"first@h"[..]));
    }

    #[test]
    fn responses_and_methods() {
        assert!(is_response(b"SIP/2.0 200 OK\r\nCall-ID: x\r\n\r\n"));
        assert!(is_response(b"\r\nsip/2.0 180 Ringing\r\n\r\n"));
        assert!(!is_response(b"SIP"));
        assert_eq!(
            method(b"\r\nOPTIONS sip:a SIP/2.0\r\n"),
            Some(&b"OPTIONS"[..])
        );
        assert_eq!(method(b"options sip:a SIP/2.0\r\n"), Some(&b"options"[..]));
        assert_eq!(method(b"GARBAGE\r\n"), None);
        assert_eq!(method(b"OPTIONS sip:a SIP/2.0"), None, "no line end");
        assert_eq!(method(b""), None);
    }

    #[test]
    fn arbitrary_mixes_never_panic_and_agree_with_the_parser() {
        // Every short sequence of header lines and fragments that matter to the scanner (an
        // exhaustive sweep over the first 300,000 numbers written in base 12), ended by an empty
        // line: wherever the parser finds a Call-ID, the pre-scan finds the same bytes.
        let pieces: [&[u8]; 12] = [
            b"Call-ID: x@h\r\n",
            b"i :y@h\r\n",
            b"Call-Info: <sip:z>\r\n",
            b" folded@f\r\n",
            b"CSeq: 1 BYE\r\n",
            b"\r\n",
            b"Call-ID",
            b":",
            b" ",
            b"\t",
            b"\n",
            b"\r",
        ];
        let mut message = Vec::new();
        let mut compared = 0;
        for seed in 0u32..300_000 {
            message.clear();
            message.extend_from_slice(b"BYE sip:a@b SIP/2.0\r\n");
            let mut n = seed;
            while n > 0 {
                message.extend_from_slice(pieces[(n % 12) as usize]);
                n /= 12;
            }
            message.extend_from_slice(b"\r\n");
            let found = call_id(&message);
            if let Some(parsed) = parsed_call_id(&message).filter(|p| !p.is_empty()) {
                assert_eq!(
                    found,
                    Some(&parsed[..]),
                    "{:?}",
                    String::from_utf8_lossy(&message)
                );
                compared += 1;
            }
        }
        assert!(compared > 10_000, "the sweep reaches Call-IDs: {compared}");
    }
}
