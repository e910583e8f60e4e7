//! Nonces that need no state to verify (RFC 2617 §3.2.1: "the contents of the nonce are
//! implementation dependent"; its suggestion of a time stamp and a private key is what this
//! is).
//!
//! A nonce is the hex of `timestamp (8 bytes, seconds since the epoch, big-endian) ‖ random
//! (8 bytes) ‖ HMAC-SHA256(secret, timestamp ‖ random ‖ realm)` truncated to 16 bytes: 64 hex
//! digits. Verifying it needs only the secret: it is authentic when the HMAC matches (for the
//! realm it is presented with), and stale once `expires` has passed since its timestamp, so
//! the server answers `stale=true` (RFC 2617 §3.2.1) and the client retries with a fresh one
//! without asking its user again. Replay within the lifetime is `replay`'s business.
//!
//! The secret comes from `[auth] secret` or is random for each process start (nonces issued
//! before a restart then come back stale, costing each client one more round trip).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use super::digest::{constant_time_eq, hex, unhex};

/// Bytes in a decoded nonce.
pub const NONCE_BYTES: usize = 8 + 8 + TAG_BYTES;
const TAG_BYTES: usize = 16;

/// How far in the future a nonce's timestamp may be (the clock stepped back) and still count.
const CLOCK_SKEW_SECS: u64 = 60;

/// A nonce decoded: its raw bytes (the replay table's key) and when it was issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nonce {
    pub bytes: [u8; NONCE_BYTES],
    pub issued: u64,
}

impl Nonce {
    /// Seconds since the epoch when it stops being fresh.
    pub fn expires_at(&self, lifetime: Duration) -> u64 {
        self.issued.saturating_add(lifetime.as_secs())
    }
}

/// What a presented nonce is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Fresh(Nonce),
    /// Authentic but expired: answer with a new challenge and `stale=true`.
    Stale(Nonce),
    /// Not issued by this server (or for another realm), or not a nonce at all.
    Forged,
}

/// Issues and verifies nonces with one secret.
pub struct Nonces {
    key: hmac::Key,
    rng: SystemRandom,
    lifetime: Duration,
    fallback: AtomicU64,
}

impl Nonces {
    /// `secret` empty: a random one (see the module documentation).
    pub fn new(secret: &[u8], lifetime: Duration) -> Nonces {
        let rng = SystemRandom::new();
        let key = if secret.is_empty() {
            let mut random = [0u8; 32];
            // The system's random source failing is fatal to any security; ring only fails
            // when the OS has none, which a server cannot run without.
            rng.fill(&mut random)
                .expect("the operating system's random number generator");
            hmac::Key::new(hmac::HMAC_SHA256, &random)
        } else {
            hmac::Key::new(hmac::HMAC_SHA256, secret)
        };
        Nonces {
            key,
            rng,
            lifetime,
            fallback: AtomicU64::new(0),
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// A new nonce for `realm`, issued at `now`.
    pub fn issue(&self, realm: &str, now: SystemTime) -> String {
        let mut bytes = [0u8; NONCE_BYTES];
        bytes[..8].copy_from_slice(&seconds(now).to_be_bytes());
        if self.rng.fill(&mut bytes[8..16]).is_err() {
            // Uniqueness only (the HMAC keeps it unforgeable): a counter will do.
            let count = self.fallback.fetch_add(1, Ordering::Relaxed);
            bytes[8..16].copy_from_slice(&count.to_be_bytes());
        }
        let tag = self.tag(&bytes[..16], realm);
        bytes[16..].copy_from_slice(&tag.as_ref()[..TAG_BYTES]);
        hex(&bytes)
    }

    /// Checks a nonce presented with credentials for `realm` at `now`.
    pub fn check(&self, nonce: &str, realm: &str, now: SystemTime) -> Check {
        if nonce.len() != NONCE_BYTES * 2 {
            return Check::Forged;
        }
        let Some(decoded) = unhex(nonce) else {
            return Check::Forged;
        };
        let mut bytes = [0u8; NONCE_BYTES];
        bytes.copy_from_slice(&decoded);
        let tag = self.tag(&bytes[..16], realm);
        if !constant_time_eq(&tag.as_ref()[..TAG_BYTES], &bytes[16..]) {
            return Check::Forged;
        }
        let mut stamp = [0u8; 8];
        stamp.copy_from_slice(&bytes[..8]);
        let nonce = Nonce {
            bytes,
            issued: u64::from_be_bytes(stamp),
        };
        let now = seconds(now);
        if nonce.issued > now.saturating_add(CLOCK_SKEW_SECS) {
            return Check::Forged;
        }
        if now >= nonce.expires_at(self.lifetime) {
            return Check::Stale(nonce);
        }
        Check::Fresh(nonce)
    }

    fn tag(&self, stamp_and_random: &[u8], realm: &str) -> hmac::Tag {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(stamp_and_random);
        context.update(realm.as_bytes());
        context.sign()
    }
}

/// Seconds since the epoch (0 before it).
pub fn seconds(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn issued_nonces_verify_until_they_expire() {
        let nonces = Nonces::new(b"secret", Duration::from_secs(300));
        let nonce = nonces.issue("example.com", at(1_000_000));
        assert_eq!(nonce.len(), 64);
        assert!(
            matches!(nonces.check(&nonce, "example.com", at(1_000_000)), Check::Fresh(n) if n.issued == 1_000_000)
        );
        assert!(matches!(
            nonces.check(&nonce, "example.com", at(1_000_299)),
            Check::Fresh(_)
        ));
        assert!(matches!(
            nonces.check(&nonce, "example.com", at(1_000_300)),
            Check::Stale(_)
        ));
        assert_ne!(
            nonce,
            nonces.issue("example.com", at(1_000_000)),
            "random part"
        );
    }

    #[test]
    fn forged_foreign_or_garbled_nonces_are_refused() {
        let nonces = Nonces::new(b"secret", Duration::from_secs(300));
        let nonce = nonces.issue("example.com", at(1_000_000));
        assert_eq!(
            nonces.check(&nonce, "other.org", at(1_000_000)),
            Check::Forged
        );
        let other = Nonces::new(b"another secret", Duration::from_secs(300));
        assert_eq!(
            other.check(&nonce, "example.com", at(1_000_000)),
            Check::Forged
        );
        let mut tampered = nonce.clone().into_bytes();
        tampered[15] = if tampered[15] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(
            nonces.check(&tampered, "example.com", at(1_000_000)),
            Check::Forged
        );
        for bad in ["", "xyz", &"g".repeat(64), &nonce[..62]] {
            assert_eq!(
                nonces.check(bad, "example.com", at(1_000_000)),
                Check::Forged
            );
        }
        // Far in the future: not ours (the clock may step back a little, not an hour).
        let future = nonces.issue("example.com", at(1_003_600));
        assert_eq!(
            nonces.check(&future, "example.com", at(1_000_000)),
            Check::Forged
        );
    }

    #[test]
    fn a_random_secret_differs_per_instance() {
        let a = Nonces::new(b"", Duration::from_secs(300));
        let b = Nonces::new(b"", Duration::from_secs(300));
        let nonce = a.issue("r", at(10));
        assert!(matches!(a.check(&nonce, "r", at(10)), Check::Fresh(_)));
        assert_eq!(b.check(&nonce, "r", at(10)), Check::Forged);
    }
}
