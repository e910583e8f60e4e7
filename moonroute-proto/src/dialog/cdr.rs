//! Accounting: the call detail record of an ended dialog (Kamailio's `acc` with `acc_extra`),
//! one JSON object per line, and the [`CdrWriter`] it is handed to (the shell appends it to
//! `cdr.jsonl`).
//!
//! Fields (times are Unix seconds with milliseconds; `answer` is null for a failed attempt):
//! `call_id`, `from_uri`, `from_tag`, `to_uri`, `to_tag`, `src` (the caller's transport,
//! address and port), `ruri` (the INVITE's Request-URI), `dst` (where the answered branch went),
//! `start`, `answer`, `end`, `duration` (answer to end), `setup` (start to answer or end),
//! `status` (the INVITE's final status), `reason` (see [`EndReason`]), `hangup` (`caller`,
//! `callee`, `proxy`, or null for an unanswered call) and `extra` (the dialog variables marked
//! for accounting).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use super::table::{Dialog, Side};
use crate::sip::Host;
use crate::transport::TransportKind;

/// Why a dialog ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// A BYE from this party.
    Bye(Side),
    /// CANCELled before the answer.
    Cancelled,
    /// A final failure response to the INVITE.
    Failed,
    /// Its max duration (`req:dlg_set_timeout`) cut it: the proxy sent BYEs.
    MaxDuration,
    /// No answer within the early lifetime, or no BYE within the dialog lifetime.
    Timeout,
    /// `moonroute ctl dlg end`.
    Control,
}

impl EndReason {
    pub const COUNT: usize = 7;

    pub const ALL: [EndReason; EndReason::COUNT] = [
        EndReason::Bye(Side::Caller),
        EndReason::Bye(Side::Callee),
        EndReason::Cancelled,
        EndReason::Failed,
        EndReason::MaxDuration,
        EndReason::Timeout,
        EndReason::Control,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Bye(Side::Caller) => "caller_bye",
            EndReason::Bye(Side::Callee) => "callee_bye",
            EndReason::Cancelled => "cancelled",
            EndReason::Failed => "failed",
            EndReason::MaxDuration => "max_duration",
            EndReason::Timeout => "timeout",
            EndReason::Control => "ctl",
        }
    }

    pub fn index(self) -> usize {
        EndReason::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or(EndReason::COUNT - 1)
    }

    /// Who ended an answered call.
    pub fn hangup(self) -> &'static str {
        match self {
            EndReason::Bye(side) => side.as_str(),
            _ => "proxy",
        }
    }
}

/// The record of one ended dialog (see the module doc for the fields).
#[derive(Clone, Debug, PartialEq)]
pub struct Cdr {
    pub call_id: String,
    pub from_uri: String,
    pub from_tag: String,
    pub to_uri: String,
    pub to_tag: Option<String>,
    pub src: String,
    pub ruri: String,
    pub dst: Option<String>,
    pub start: SystemTime,
    pub answer: Option<SystemTime>,
    pub end: SystemTime,
    pub status: u16,
    pub reason: EndReason,
    pub extra: Vec<(String, String)>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `udp:192.0.2.4:5060`: the transport and address a call came from (the CDR's and `ctl
/// dlg`'s `src`). IPv4 is written without `fmt` (one record per call).
pub(super) fn source_text(kind: TransportKind, addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(v4) => {
            let mut out = String::with_capacity(32);
            out.push_str(kind.scheme());
            out.push(':');
            Host::Ip(IpAddr::V4(*v4.ip())).with_text(|ip| out.push_str(ip));
            out.push(':');
            out.push_str(crate::sip::scan::decimal(
                u64::from(v4.port()),
                &mut [0u8; 20],
            ));
            out
        }
        SocketAddr::V6(_) => format!("{}:{addr}", kind.scheme()),
    }
}

impl Cdr {
    /// The record of `dialog`, which has ended.
    pub fn of(dialog: &Dialog) -> Cdr {
        let end = dialog.ended.map_or_else(SystemTime::now, |e| e.wall);
        Cdr {
            call_id: text(&dialog.call_id),
            from_uri: text(&dialog.from_uri),
            from_tag: text(&dialog.from_tag),
            to_uri: text(&dialog.to_uri),
            to_tag: dialog.to_tag.as_deref().map(text),
            src: source_text(dialog.caller_transport, dialog.caller_source),
            ruri: text(&dialog.request_uri),
            dst: dialog.callee_target.as_deref().map(text),
            start: dialog.created.wall,
            answer: dialog.answered.map(|a| a.wall),
            end,
            status: dialog.status,
            reason: dialog.end_reason.unwrap_or(EndReason::Timeout),
            extra: dialog
                .vars
                .iter()
                .filter(|v| v.acc)
                .map(|v| (v.name.to_string(), v.value.to_string()))
                .collect(),
        }
    }

    pub fn answered(&self) -> bool {
        self.answer.is_some()
    }

    /// Answer to end, in seconds (0 for an unanswered call).
    pub fn duration(&self) -> f64 {
        self.answer.map_or(0.0, |a| seconds_between(a, self.end))
    }

    /// Start to answer (or to end for an unanswered call), in seconds.
    pub fn setup(&self) -> f64 {
        seconds_between(self.start, self.answer.unwrap_or(self.end))
    }

    /// The JSON Lines record, newline included. Written straight into one buffer (no string
    /// per number, strings escaped by runs): one record per ended call.
    pub fn to_json_line(&self) -> String {
        let mut out = String::with_capacity(512);
        out.push('{');
        field_str(&mut out, "call_id", &self.call_id);
        field_str(&mut out, "from_uri", &self.from_uri);
        field_str(&mut out, "from_tag", &self.from_tag);
        field_str(&mut out, "to_uri", &self.to_uri);
        field_opt(&mut out, "to_tag", self.to_tag.as_deref());
        field_str(&mut out, "src", &self.src);
        field_str(&mut out, "ruri", &self.ruri);
        field_opt(&mut out, "dst", self.dst.as_deref());
        field_name(&mut out, "start");
        push_epoch(&mut out, self.start);
        field_name(&mut out, "answer");
        match self.answer {
            Some(answer) => push_epoch(&mut out, answer),
            None => out.push_str("null,"),
        }
        field_name(&mut out, "end");
        push_epoch(&mut out, self.end);
        field_name(&mut out, "duration");
        let _ = write!(out, "{:.3},", self.duration());
        field_name(&mut out, "setup");
        let _ = write!(out, "{:.3},", self.setup());
        field_name(&mut out, "status");
        push_decimal(&mut out, u64::from(self.status));
        out.push(',');
        field_str(&mut out, "reason", self.reason.as_str());
        let hangup = self.answered().then(|| self.reason.hangup());
        field_opt(&mut out, "hangup", hangup);
        out.push_str("\"extra\":{");
        for (i, (name, value)) in self.extra.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            json_string(&mut out, name);
            out.push(':');
            json_string(&mut out, value);
        }
        out.push_str("}}\n");
        out
    }
}

fn seconds_between(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from).unwrap_or_default().as_secs_f64()
}

/// Unix seconds with milliseconds (`1700000000.250`) and a comma.
fn push_epoch(out: &mut String, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    push_decimal(out, d.as_secs());
    out.push('.');
    let millis = d.subsec_millis();
    for digit in [millis / 100, millis / 10 % 10, millis % 10] {
        out.push(char::from(b'0' + digit as u8));
    }
    out.push(',');
}

fn push_decimal(out: &mut String, v: u64) {
    out.push_str(crate::sip::scan::decimal(v, &mut [0u8; 20]));
}

/// `"name":`
fn field_name(out: &mut String, name: &str) {
    json_string(out, name);
    out.push(':');
}

fn field_str(out: &mut String, name: &str, value: &str) {
    field_name(out, name);
    json_string(out, value);
    out.push(',');
}

fn field_opt(out: &mut String, name: &str, value: Option<&str>) {
    match value {
        Some(v) => field_str(out, name, v),
        None => {
            field_name(out, name);
            out.push_str("null,");
        }
    }
}

/// A JSON string (RFC 8259 §7): quotes, backslashes and control characters escaped, so no
/// header value can break a record or forge a line; U+2028 and U+2029 too (JavaScript reads
/// them as line ends). The text between escapes is copied a run at a time.
fn json_string(out: &mut String, s: &str) {
    /// Control characters, `"`, `\` and 0xE2, the first byte of U+2028 and U+2029.
    const MAY_ESCAPE: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 0x20 {
            table[b] = true;
            b += 1;
        }
        table[b'"' as usize] = true;
        table[b'\\' as usize] = true;
        table[0xe2] = true;
        table
    };
    out.push('"');
    let bytes = s.as_bytes();
    let (mut run, mut i) = (0, 0);
    while i < bytes.len() {
        let (escaped, width): (&str, usize) = match bytes[i] {
            b'"' => ("\\\"", 1),
            b'\\' => ("\\\\", 1),
            b'\n' => ("\\n", 1),
            b'\r' => ("\\r", 1),
            b'\t' => ("\\t", 1),
            b @ 0..=0x1f => {
                out.push_str(&s[run..i]);
                let hex = |n: u8| char::from(b"0123456789abcdef"[usize::from(n)]);
                out.push_str("\\u00");
                out.push(hex(b >> 4));
                out.push(hex(b & 0xf));
                i += 1;
                run = i;
                continue;
            }
            // U+2028 and U+2029: E2 80 A8 and E2 80 A9 in UTF-8.
            0xe2 if bytes.get(i + 1) == Some(&0x80) && bytes.get(i + 2) == Some(&0xa8) => {
                ("\\u2028", 3)
            }
            0xe2 if bytes.get(i + 1) == Some(&0x80) && bytes.get(i + 2) == Some(&0xa9) => {
                ("\\u2029", 3)
            }
            _ => {
                // Up to the next byte that may need escaping.
                i += 1;
                while i < bytes.len() && !MAY_ESCAPE[usize::from(bytes[i])] {
                    i += 1;
                }
                continue;
            }
        };
        out.push_str(&s[run..i]);
        out.push_str(escaped);
        i += width;
        run = i;
    }
    out.push_str(&s[run..]);
    out.push('"');
}

/// Where ended dialogs' records go (`[dialog] cdr`): the shell's CDR file.
pub trait CdrWriter: Send + Sync {
    /// Appends `cdr`; a failure is the writer's to log and count, the call goes on.
    fn write(&self, cdr: &Cdr);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sample() -> Cdr {
        let start = UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        Cdr {
            call_id: "abc@host".into(),
            from_uri: "sip:alice@example.com".into(),
            from_tag: "1".into(),
            to_uri: "sip:bob@example.com".into(),
            to_tag: Some("2".into()),
            src: "udp:127.0.0.1:5070".into(),
            ruri: "sip:bob@example.com".into(),
            dst: Some("sip:bob@127.0.0.1:5080".into()),
            start,
            answer: Some(start + Duration::from_millis(1500)),
            end: start + Duration::from_millis(61_500),
            status: 200,
            reason: EndReason::Bye(Side::Callee),
            extra: vec![("tenant".into(), "a\"b\n{".into())],
        }
    }

    #[test]
    fn a_record_is_one_line_of_json_with_times_duration_and_who_hung_up() {
        let line = sample().to_json_line();
        assert_eq!(
            line,
            "{\"call_id\":\"abc@host\",\"from_uri\":\"sip:alice@example.com\",\"from_tag\":\"1\",\
             \"to_uri\":\"sip:bob@example.com\",\"to_tag\":\"2\",\"src\":\"udp:127.0.0.1:5070\",\
             \"ruri\":\"sip:bob@example.com\",\"dst\":\"sip:bob@127.0.0.1:5080\",\
             \"start\":1700000000.250,\"answer\":1700000001.750,\"end\":1700000061.750,\
             \"duration\":60.000,\"setup\":1.500,\"status\":200,\"reason\":\"callee_bye\",\
             \"hangup\":\"callee\",\"extra\":{\"tenant\":\"a\\\"b\\n{\"}}\n"
        );
    }

    #[test]
    fn a_failed_attempt_has_no_answer_and_nobody_hung_up() {
        let mut cdr = sample();
        cdr.answer = None;
        cdr.status = 487;
        cdr.reason = EndReason::Cancelled;
        cdr.extra.clear();
        let line = cdr.to_json_line();
        assert!(line.contains("\"answer\":null,"), "{line}");
        assert!(line.contains("\"duration\":0.000,\"setup\":61.500,\"status\":487,\"reason\":\"cancelled\",\"hangup\":null"), "{line}");
    }

    #[test]
    fn control_characters_cannot_forge_a_line() {
        let mut cdr = sample();
        cdr.call_id = "x\u{1}\r\n{\"forged\":1}".into();
        let line = cdr.to_json_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.contains("x\\u0001\\r\\n{\\\"forged\\\":1}"));
    }

    #[test]
    fn the_source_is_transport_address_and_port() {
        let v4: SocketAddr = "192.0.2.4:5060".parse().unwrap();
        assert_eq!(source_text(TransportKind::Udp, v4), "udp:192.0.2.4:5060");
        let v4: SocketAddr = "10.0.0.255:7".parse().unwrap();
        assert_eq!(source_text(TransportKind::Wss, v4), "wss:10.0.0.255:7");
        let v6: SocketAddr = "[2001:db8::1]:5061".parse().unwrap();
        assert_eq!(
            source_text(TransportKind::Tls, v6),
            "tls:[2001:db8::1]:5061"
        );
    }

    #[test]
    fn strings_escape_as_character_by_character() {
        fn by_char(s: &str) -> String {
            let mut out = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                        out.push_str(&format!("\\u{:04x}", c as u32))
                    }
                    c => out.push(c),
                }
            }
            out + "\""
        }
        for s in [
            "",
            "plain",
            "a\"b\\c\n\r\t\u{0}\u{1f}\u{7f}",
            "caf\u{e9} \u{2028}x\u{2029}\u{2027}\u{202a}\u{20ac}\u{1f600}",
            "\u{2028}",
            "\u{e2}\u{80}",
        ] {
            let mut out = String::new();
            json_string(&mut out, s);
            assert_eq!(out, by_char(s), "{s:?}");
        }
    }
}
