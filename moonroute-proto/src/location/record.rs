//! The on-disk form of one AOR's bindings (a [`super::SledLocation`] record, and the value of
//! a [`super::RedisLocation`] key).
//!
//! Key: the normalized AOR (UTF-8). Value: the magic `MRB3` (moonroute bindings, version 3),
//! a `u16` binding count, then per binding, in registration order, its fields in
//! [`super::Binding`]'s order: a flags byte (bit 0: `nated`) is what version 2 added, the
//! owning node and its route (two optional strings, `moonroute::cluster`) what version 3 added.
//! Version 1 records (`MRB1`, written before NAT traversal, without the flags byte) and
//! version 2 records (`MRB2`, before clusters) are still read, as bindings without what they
//! lack; they are rewritten as version 3 when changed. Strings are a `u32` length plus UTF-8 bytes; optional fields a
//! presence byte (0 or 1) then the value; integers big-endian; the expiry in milliseconds since
//! the Unix epoch; socket addresses as text (`1.2.3.4:5060`, `[::1]:5060`).
//!
//! Decoding checks everything (magic, lengths, UTF-8, addresses, no trailing bytes), so a
//! corrupt or foreign record is an error to report and skip, never a panic or a half-read
//! binding. A new layout gets a new magic; old records stay readable by matching on it.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Binding;
use crate::sip::scan::decimal;
use crate::sip::Host;
use crate::transport::TransportKind;

const MAGIC: &[u8; 4] = b"MRB3";
const MAGIC_V2: &[u8; 4] = b"MRB2";
const MAGIC_V1: &[u8; 4] = b"MRB1";

/// Bit 0 of the flags byte: the binding was registered from behind a NAT.
const FLAG_NATED: u8 = 1;

/// Longest string field accepted when decoding: far beyond any real contact or Path, small
/// enough that a corrupt length cannot ask for gigabytes.
const MAX_FIELD: usize = 64 * 1024;

pub fn encode(bindings: &[Binding]) -> Vec<u8> {
    encode_version(bindings, 3)
}

/// The record in format `version` (1 and 2 only to test that old records stay readable).
fn encode_version(bindings: &[Binding], version: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + bindings.len() * 256);
    out.extend_from_slice(match version {
        1 => MAGIC_V1,
        2 => MAGIC_V2,
        _ => MAGIC,
    });
    put_u16(&mut out, bindings.len().min(usize::from(u16::MAX)) as u16);
    for b in bindings.iter().take(usize::from(u16::MAX)) {
        put_str(&mut out, &b.contact);
        let millis = b
            .expires_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64);
        out.extend_from_slice(&millis.to_be_bytes());
        put_u16(&mut out, b.q);
        put_str(&mut out, &b.call_id);
        out.extend_from_slice(&b.cseq.to_be_bytes());
        put_opt(&mut out, b.received.as_ref(), |out, (kind, addr)| {
            put_str(out, kind.via_name());
            put_addr(out, addr);
        });
        put_opt(&mut out, b.local.as_ref(), put_addr);
        put_u16(&mut out, b.path.len().min(usize::from(u16::MAX)) as u16);
        for p in b.path.iter().take(usize::from(u16::MAX)) {
            put_str(&mut out, p);
        }
        put_opt(&mut out, b.instance.as_ref(), |out, s| put_str(out, s));
        put_opt(&mut out, b.reg_id.as_ref(), |out, id| {
            out.extend_from_slice(&id.to_be_bytes())
        });
        put_opt(&mut out, b.user_agent.as_ref(), |out, s| put_str(out, s));
        if version >= 2 {
            out.push(if b.nated { FLAG_NATED } else { 0 });
        }
        if version >= 3 {
            put_opt(&mut out, b.node.as_ref(), |out, s| put_str(out, s));
            put_opt(&mut out, b.owner_route.as_ref(), |out, s| put_str(out, s));
        }
    }
    out
}

/// What is wrong with a record ([`decode`]); its text names the fault for the log line that
/// skips the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    KeyNotUtf8,
    /// Neither `MRB3`, `MRB2` nor `MRB1`: not a moonroute record, or a newer layout.
    BadMagic,
    EndsEarly,
    /// A string field longer than any a binding holds.
    FieldTooLong(usize),
    FieldNotUtf8,
    /// An optional field's presence byte is neither 0 nor 1.
    BadPresence(u8),
    BadAddress(String),
    /// A q-value above 1000 thousandths.
    BadQ(u16),
    BadTransport(String),
    /// Flag bits this version does not define.
    UnknownFlags(u8),
    /// Bytes after the last binding.
    TrailingBytes(usize),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::KeyNotUtf8 => f.write_str("key is not UTF-8"),
            DecodeError::BadMagic => f.write_str("not a moonroute binding record (bad magic)"),
            DecodeError::EndsEarly => f.write_str("record ends early"),
            DecodeError::FieldTooLong(len) => write!(f, "field of {len} bytes"),
            DecodeError::FieldNotUtf8 => f.write_str("field is not UTF-8"),
            DecodeError::BadPresence(byte) => write!(f, "bad presence byte {byte}"),
            DecodeError::BadAddress(text) => write!(f, "bad socket address {text:?}"),
            DecodeError::BadQ(q) => write!(f, "bad q {q}"),
            DecodeError::BadTransport(name) => write!(f, "bad transport {name:?}"),
            DecodeError::UnknownFlags(flags) => write!(f, "unknown binding flags {flags:#04x}"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} trailing bytes"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// The bindings stored under `key`, or what is wrong with the record.
pub fn decode(key: &[u8], value: &[u8]) -> Result<Vec<Binding>, DecodeError> {
    let aor = std::str::from_utf8(key)
        .map_err(|_| DecodeError::KeyNotUtf8)?
        .to_owned();
    let mut r = Reader { data: value };
    let version = match r.take(4)? {
        m if m == MAGIC => 3,
        m if m == MAGIC_V2 => 2,
        m if m == MAGIC_V1 => 1,
        _ => return Err(DecodeError::BadMagic),
    };
    let count = r.u16()?;
    let mut bindings = Vec::with_capacity(usize::from(count).min(1024));
    for _ in 0..count {
        bindings.push(r.binding(&aor, version)?);
    }
    if !r.data.is_empty() {
        return Err(DecodeError::TrailingBytes(r.data.len()));
    }
    Ok(bindings)
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A socket address as `SocketAddr`'s text (`1.2.3.4:5060`, `[::1]:5060`); an IPv4 one, what
/// nearly every binding stores twice, without `fmt`.
fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    let SocketAddr::V4(v4) = addr else {
        return put_str(out, &addr.to_string());
    };
    let mut digits = [0; 20];
    let port = decimal(u64::from(v4.port()), &mut digits);
    Host::Ip(IpAddr::V4(*v4.ip())).with_text(|ip| {
        out.extend_from_slice(&((ip.len() + 1 + port.len()) as u32).to_be_bytes());
        out.extend_from_slice(ip.as_bytes());
        out.push(b':');
        out.extend_from_slice(port.as_bytes());
    });
}

fn put_opt<T>(out: &mut Vec<u8>, v: Option<&T>, put: impl FnOnce(&mut Vec<u8>, &T)) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put(out, v);
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.data.len() < n {
            return Err(DecodeError::EndsEarly);
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        if len > MAX_FIELD {
            return Err(DecodeError::FieldTooLong(len));
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::FieldNotUtf8)
    }

    fn opt_string(&mut self) -> Result<Option<String>, DecodeError> {
        if self.present()? {
            Ok(Some(self.string()?))
        } else {
            Ok(None)
        }
    }

    fn present(&mut self) -> Result<bool, DecodeError> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::BadPresence(other)),
        }
    }

    fn addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let text = self.string()?;
        text.parse().map_err(|_| DecodeError::BadAddress(text))
    }

    fn binding(&mut self, aor: &str, version: u8) -> Result<Binding, DecodeError> {
        let contact = self.string()?;
        let expires_at = UNIX_EPOCH + Duration::from_millis(self.u64()?);
        let q = self.u16()?;
        if q > 1000 {
            return Err(DecodeError::BadQ(q));
        }
        let call_id = self.string()?;
        let cseq = self.u32()?;
        let received = if self.present()? {
            let name = self.string()?;
            let kind =
                TransportKind::from_name(name.as_bytes()).ok_or(DecodeError::BadTransport(name))?;
            Some((kind, self.addr()?))
        } else {
            None
        };
        let local = if self.present()? {
            Some(self.addr()?)
        } else {
            None
        };
        let path = (0..self.u16()?)
            .map(|_| self.string())
            .collect::<Result<Vec<_>, _>>()?;
        let instance = if self.present()? {
            Some(self.string()?)
        } else {
            None
        };
        let reg_id = if self.present()? {
            Some(self.u32()?)
        } else {
            None
        };
        let user_agent = self.opt_string()?;
        let flags = if version >= 2 { self.take(1)?[0] } else { 0 };
        if flags & !FLAG_NATED != 0 {
            return Err(DecodeError::UnknownFlags(flags));
        }
        let (node, owner_route) = if version >= 3 {
            (self.opt_string()?, self.opt_string()?)
        } else {
            (None, None)
        };
        Ok(Binding {
            aor: aor.to_owned(),
            contact,
            expires_at,
            q,
            call_id,
            cseq,
            received,
            local,
            path,
            instance,
            reg_id,
            user_agent,
            nated: flags & FLAG_NATED != 0,
            node,
            owner_route,
        })
    }
}

/// Milliseconds are what the record keeps; a binding read back compares equal to one whose
/// expiry was rounded the same way.
pub fn to_stored_precision(t: SystemTime) -> SystemTime {
    let millis = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    UNIX_EPOCH + Duration::from_millis(millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Binding {
        Binding {
            aor: "sip:alice@example.com".to_owned(),
            contact: "sip:alice@192.0.2.1:5070;transport=tcp".to_owned(),
            expires_at: to_stored_precision(SystemTime::now() + Duration::from_secs(600)),
            q: 500,
            call_id: "abc@host".to_owned(),
            cseq: 42,
            received: Some((TransportKind::Tcp, "192.0.2.1:40000".parse().unwrap())),
            local: Some("[::1]:5060".parse().unwrap()),
            path: vec![
                "<sip:edge1.example.com;lr>".to_owned(),
                "<sip:e2;lr>".to_owned(),
            ],
            instance: Some("<urn:uuid:00000000-0000-1000-8000-000A95A0E128>".to_owned()),
            reg_id: Some(1),
            user_agent: Some("softphone/1.0".to_owned()),
            nated: true,
            node: Some("sip:192.0.2.5:5060;transport=tcp".to_owned()),
            owner_route: Some("<sip:192.0.2.5:5060;transport=tcp;lr;mr-flow=x>".to_owned()),
        }
    }

    fn bare() -> Binding {
        Binding {
            contact: "sip:alice@198.51.100.7".to_owned(),
            q: 1000,
            received: None,
            local: None,
            path: Vec::new(),
            instance: None,
            reg_id: None,
            user_agent: None,
            nated: false,
            node: None,
            owner_route: None,
            ..full()
        }
    }

    #[test]
    fn bindings_round_trip() {
        let bindings = vec![full(), bare()];
        let data = encode(&bindings);
        assert_eq!(decode(b"sip:alice@example.com", &data).unwrap(), bindings);
        assert_eq!(decode(b"sip:x@y", &encode(&[])).unwrap(), Vec::new());
    }

    #[test]
    fn addresses_are_stored_as_their_standard_text() {
        for text in [
            "192.0.2.1:40000",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::1]:5060",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            let mut out = Vec::new();
            put_addr(&mut out, &addr);
            let mut expected = Vec::new();
            put_str(&mut expected, &addr.to_string());
            assert_eq!(out, expected, "{text}");
        }
    }

    #[test]
    fn version_1_records_stay_readable() {
        // One value of each for both sides: full() and bare() read the clock, and two readings
        // can straddle a tick of the stored precision on a busy machine.
        let full = full();
        let bare = bare();
        let old = encode_version(&[full.clone(), bare.clone()], 1);
        assert_eq!(&old[..4], b"MRB1");
        let read = decode(b"sip:alice@example.com", &old).unwrap();
        let expected = vec![
            Binding {
                nated: false,
                node: None,
                owner_route: None,
                ..full.clone()
            },
            bare.clone(),
        ];
        assert_eq!(read, expected, "a version 1 binding has no flags");
        // Written back, it is a version 3 record.
        let new = encode(&read);
        assert_eq!(&new[..4], b"MRB3");
        assert_eq!(decode(b"sip:alice@example.com", &new).unwrap(), expected);
        for n in 0..old.len() {
            assert!(decode(b"sip:a@b", &old[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn version_2_records_stay_readable_without_an_owner() {
        let (full, bare) = (full(), bare());
        let old = encode_version(&[full.clone(), bare.clone()], 2);
        assert_eq!(&old[..4], b"MRB2");
        let expected = vec![
            Binding {
                node: None,
                owner_route: None,
                ..full
            },
            bare,
        ];
        assert_eq!(decode(b"sip:alice@example.com", &old).unwrap(), expected);
        for n in 0..old.len() {
            assert!(decode(b"sip:a@b", &old[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn unknown_flags_are_an_error() {
        // In version 2 the flags byte ends a binding.
        let mut data = encode_version(&[bare()], 2);
        *data.last_mut().unwrap() = 0x80;
        assert_eq!(
            decode(b"sip:a@b", &data),
            Err(DecodeError::UnknownFlags(0x80))
        );
        let mut data = encode(&[bare()]);
        let flags = data.len() - 3;
        data[flags] = 0x80;
        let error = decode(b"sip:a@b", &data).unwrap_err();
        assert_eq!(error.to_string(), "unknown binding flags 0x80");
    }

    /// The log line that skips a bad record says what is wrong in these words.
    #[test]
    fn decode_errors_say_what_is_wrong() {
        let data = encode(&[bare()]);
        let text = |key: &[u8], value: &[u8]| decode(key, value).unwrap_err().to_string();
        assert_eq!(
            text(b"sip:a@b", b"{\"json\": true}"),
            "not a moonroute binding record (bad magic)"
        );
        assert_eq!(text(&[0xff, 0xfe], &data), "key is not UTF-8");
        assert_eq!(text(b"sip:a@b", &data[..6]), "record ends early");
        let mut longer = data.clone();
        longer.extend_from_slice(b"xy");
        assert_eq!(text(b"sip:a@b", &longer), "2 trailing bytes");
        let bad_q = encode(&[Binding { q: 1001, ..bare() }]);
        assert_eq!(text(b"sip:a@b", &bad_q), "bad q 1001");
        assert_eq!(
            DecodeError::BadAddress("x".to_owned()).to_string(),
            "bad socket address \"x\""
        );
        assert_eq!(
            DecodeError::BadTransport("quic".to_owned()).to_string(),
            "bad transport \"quic\""
        );
        assert_eq!(DecodeError::FieldTooLong(9).to_string(), "field of 9 bytes");
        assert_eq!(DecodeError::FieldNotUtf8.to_string(), "field is not UTF-8");
        assert_eq!(
            DecodeError::BadPresence(7).to_string(),
            "bad presence byte 7"
        );
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let data = encode(&[full(), bare()]);
        for n in 0..data.len() {
            assert!(decode(b"sip:a@b", &data[..n]).is_err(), "prefix {n}");
        }
        let mut longer = data.clone();
        longer.push(0);
        assert!(decode(b"sip:a@b", &longer).is_err());
        for i in 0..data.len() {
            let mut bad = data.clone();
            bad[i] ^= 0xff;
            let _ = decode(b"sip:a@b", &bad);
        }
        assert!(decode(b"sip:a@b", b"{\"json\": true}").is_err());
        assert!(decode(&[0xff, 0xfe], &data).is_err());
    }
}
