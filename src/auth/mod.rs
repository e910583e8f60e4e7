//! Digest authentication, server side: RFC 3261 §22 (with §22.4's rules for SIP) over
//! RFC 2617 and RFC 8760 (SHA-256).
//!
//! Owns the challenges (`WWW-Authenticate` in a 401 for the registrar/UAS role,
//! `Proxy-Authenticate` in a 407 for the proxy role), nonces that are verified statelessly
//! (an HMAC over their timestamp with a server secret) and expire (`stale=true`), replay
//! protection by nonce-count, verifying `Authorization`/`Proxy-Authorization` credentials
//! against the subscriber table (HA1 values in sled under the data directory, never
//! plaintext passwords), in constant time.

/// The outcome of checking a request's credentials for one realm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The credentials are valid: the authenticated user and realm.
    Authorized { user: String, realm: String },
}
