//! Signed Record-Route: how this proxy recognises the Route entries it issued itself.
//!
//! Every Record-Route URI the proxy writes (RFC 3261 §16.6 step 4, both entries of an RFC 5658
//! double Record-Route) carries `;mrs=<16 hex digits>`: the first 8 bytes of
//! HMAC-SHA256(key, Call-ID ‖ 0x00 ‖ From-tag) of the request being record-routed. The
//! in-dialog requests of that dialog come back with it in Route (§12.2.1.1) and carry the
//! original caller's tag in From (caller → callee) or in To (callee → caller), so a Route is
//! ours when its signature matches HMAC(Call-ID, From-tag) or HMAC(Call-ID, To-tag).
//!
//! Without it, anyone can write `Route: <sip:proxy;lr>` and a To tag and have the proxy relay a
//! request to any host (an open relay through `loose_route()`). The key is the server key
//! (`crate::secret`), so signatures survive restarts and are shared by servers with one key.

use ring::hmac;

use crate::auth::digest::hex;

/// The URI parameter holding the signature.
pub const SIGNATURE_PARAM: &str = "mrs";

/// Bytes of the HMAC kept (16 hex digits: 64 bits, beyond guessing over the network).
const SIGNATURE_BYTES: usize = 8;

/// Label separating this use of the server key from its others (digest nonces).
const KEY_LABEL: &[u8] = b"moonroute record-route v1";

/// Signs and verifies Record-Route entries with one key.
#[derive(Clone)]
pub struct RouteSigner {
    key: hmac::Key,
}

impl std::fmt::Debug for RouteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteSigner(..)")
    }
}

impl RouteSigner {
    /// A signer whose key is derived from the server key (`crate::secret::server_key`).
    pub fn new(server_key: &[u8]) -> RouteSigner {
        let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, server_key), KEY_LABEL);
        RouteSigner {
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    /// A signer with a random key: its signatures die with the process (tests, labs).
    pub fn random() -> RouteSigner {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .unwrap_or_else(|_| hmac::Key::new(hmac::HMAC_SHA256, &process_entropy()));
        RouteSigner { key }
    }

    /// The signature for a dialog: 16 lowercase hex digits over Call-ID and the caller's tag.
    pub fn sign(&self, call_id: &[u8], caller_tag: &[u8]) -> String {
        hex(&self.mac(call_id, caller_tag)[..SIGNATURE_BYTES])
    }

    /// Whether `signature` was issued for this Call-ID and one of `tags` (From and To tag of an
    /// in-dialog request). Compared in constant time; hex digits in either case.
    pub fn verify(&self, signature: &[u8], call_id: &[u8], tags: &[&[u8]]) -> bool {
        let Some(given) = decode_signature(signature) else {
            return false;
        };
        tags.iter().any(|tag| {
            let expected = self.mac(call_id, tag);
            constant_time_eq(&expected[..SIGNATURE_BYTES], &given)
        })
    }

    fn mac(&self, call_id: &[u8], tag: &[u8]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(call_id);
        ctx.update(&[0]);
        ctx.update(tag);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }
}

/// The signature's bytes, when it is exactly 16 hex digits.
fn decode_signature(signature: &[u8]) -> Option<[u8; SIGNATURE_BYTES]> {
    if signature.len() != SIGNATURE_BYTES * 2 {
        return None;
    }
    let mut out = [0u8; SIGNATURE_BYTES];
    for (byte, pair) in out.iter_mut().zip(signature.chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Equality whose time does not depend on where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Key material when the system's random source fails (it does not on Linux): the process's
/// randomly seeded hasher state, so the key is still unpredictable from outside.
fn process_entropy() -> [u8; 32] {
    use std::hash::{BuildHasher, RandomState};
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&RandomState::new().hash_one(i).to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_16_hex_digits_and_verifies_with_either_tag() {
        let signer = RouteSigner::new(b"key");
        let sig = signer.sign(b"call-1@host", b"caller");
        assert_eq!(sig.len(), 16);
        assert!(sig.bytes().all(|b| b.is_ascii_hexdigit()));
        // Caller → callee: the caller's tag is in From.
        assert!(signer.verify(sig.as_bytes(), b"call-1@host", &[b"caller", b"callee"]));
        // Callee → caller: it is in To.
        assert!(signer.verify(sig.as_bytes(), b"call-1@host", &[b"callee", b"caller"]));
        assert!(signer.verify(sig.to_uppercase().as_bytes(), b"call-1@host", &[b"caller"]));
    }

    #[test]
    fn other_dialogs_keys_and_tampering_are_refused() {
        let signer = RouteSigner::new(b"key");
        let sig = signer.sign(b"call-1@host", b"caller");
        assert!(!signer.verify(sig.as_bytes(), b"call-2@host", &[b"caller"]));
        assert!(!signer.verify(sig.as_bytes(), b"call-1@host", &[b"stranger"]));
        assert!(!RouteSigner::new(b"other").verify(sig.as_bytes(), b"call-1@host", &[b"caller"]));
        let mut tampered = sig.clone().into_bytes();
        tampered[15] = if tampered[15] == b'0' { b'1' } else { b'0' };
        assert!(!signer.verify(&tampered, b"call-1@host", &[b"caller"]));
        assert!(!signer.verify(&sig.as_bytes()[..15], b"call-1@host", &[b"caller"]));
        assert!(!signer.verify(b"", b"call-1@host", &[b"caller"]));
        assert!(!signer.verify(b"zzzzzzzzzzzzzzzz", b"call-1@host", &[b"caller"]));
        // Call-ID and tag are separated: moving bytes between them changes the signature.
        assert!(!signer.verify(sig.as_bytes(), b"call-1@hostc", &[b"aller"]));
    }

    #[test]
    fn the_same_server_key_gives_the_same_signatures() {
        let sig = RouteSigner::new(b"key").sign(b"c", b"t");
        assert!(RouteSigner::new(b"key").verify(sig.as_bytes(), b"c", &[b"t"]));
        let random = RouteSigner::random();
        let sig = random.sign(b"c", b"t");
        assert!(random.verify(sig.as_bytes(), b"c", &[b"t"]));
    }
}
