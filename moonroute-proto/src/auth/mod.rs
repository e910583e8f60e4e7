//! Digest authentication, server side: RFC 3261 §22 (with §22.4's rules for SIP) over
//! RFC 2617 and RFC 8760 (SHA-256).
//!
//! Owns the challenges (`WWW-Authenticate` in a 401 for the registrar/UAS role,
//! `Proxy-Authenticate` in a 407 for the proxy role), nonces that are verified statelessly
//! (an HMAC over their timestamp with a server secret) and expire (`stale=true`), replay
//! protection by nonce-count, verifying `Authorization`/`Proxy-Authorization` credentials
//! against a [`SubscriberTable`] (HA1 values, never plaintext passwords; the shell keeps the
//! table in sled), in constant time.
//!
//! - `digest`: the credentials grammar and the response computation (MD5, SHA-256);
//! - `nonce`: stateless nonces;
//! - `replay`: nonce-count tracking;
//! - `subscriber`: one subscriber's credentials and the table the authenticator reads;
//! - here, [`Authenticator`]: the challenge and the verdict on a request, sans-IO (an explicit
//!   `now`), shared by every event loop.

pub mod digest;
pub mod nonce;
pub mod replay;
pub mod subscriber;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::sip::{Message, Method, Uri};

pub use digest::Algorithm;
pub use subscriber::{Subscriber, SubscriberError, SubscriberTable};

/// The outcome of checking a request's credentials for one realm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The credentials are valid: the authenticated user, the realm they were checked for,
    /// the subscriber's domain (lowercase; the host of the user's AOR, which differs from
    /// the realm for a subscriber added with `--realm`), and the algorithm of the response
    /// (for logs: which phones still answer with MD5).
    Authorized {
        user: String,
        realm: String,
        domain: String,
        algorithm: Algorithm,
    },
    /// No Digest credentials for this realm in the request.
    NoCredentials,
    /// Valid credentials with an expired (or forgotten) nonce: challenge again with
    /// `stale=true` (RFC 2617 §3.2.1).
    Stale,
    /// The credentials are refused, and why (for logs, never sent to the client).
    Refused(&'static str),
}

impl Verdict {
    /// The reason a script gets with `nil` (and logs show).
    pub fn reason(&self) -> &'static str {
        match self {
            Verdict::Authorized { .. } => "authorized",
            Verdict::NoCredentials => "no credentials",
            Verdict::Stale => "stale nonce",
            Verdict::Refused(reason) => reason,
        }
    }
}

/// Who challenges (RFC 3261 §22.1-§22.3): the registrar/UAS answers 401 with
/// `WWW-Authenticate` and reads `Authorization`; a proxy answers 407 with
/// `Proxy-Authenticate` and reads `Proxy-Authorization`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Registrar,
    Proxy,
}

impl Role {
    /// REGISTER is the registrar's; every other method the proxy's.
    pub fn of(method: Option<&Method>) -> Role {
        match method {
            Some(Method::Register) => Role::Registrar,
            _ => Role::Proxy,
        }
    }

    pub fn status(self) -> (u16, &'static str) {
        match self {
            Role::Registrar => (401, "Unauthorized"),
            Role::Proxy => (407, "Proxy Authentication Required"),
        }
    }

    pub fn challenge_header(self) -> &'static str {
        match self {
            Role::Registrar => "WWW-Authenticate",
            Role::Proxy => "Proxy-Authenticate",
        }
    }

    pub fn credentials_header(self) -> &'static str {
        match self {
            Role::Registrar => "Authorization",
            Role::Proxy => "Proxy-Authorization",
        }
    }
}

/// A challenge to send: status, and one header per algorithm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub code: u16,
    pub reason: &'static str,
    pub headers: Vec<(String, String)>,
}

/// What the authenticator is built from (`[auth]`).
#[derive(Clone, Debug)]
pub struct Settings {
    pub secret: Vec<u8>,
    pub nonce_lifetime: Duration,
    /// In order of preference (RFC 8760 §2.4: the server lists its preferred first).
    pub algorithms: Vec<Algorithm>,
    pub max_tracked_nonces: usize,
}

/// Challenges and checks credentials; one per server, shared by the event loops.
pub struct Authenticator<S> {
    nonces: nonce::Nonces,
    replay: replay::ReplayTable,
    subscribers: Arc<S>,
    algorithms: Vec<Algorithm>,
}

impl<S: SubscriberTable> Authenticator<S> {
    pub fn new(settings: &Settings, subscribers: Arc<S>) -> Authenticator<S> {
        let mut algorithms = settings.algorithms.clone();
        if algorithms.is_empty() {
            algorithms = vec![Algorithm::Sha256, Algorithm::Md5];
        }
        Authenticator {
            nonces: nonce::Nonces::new(&settings.secret, settings.nonce_lifetime),
            replay: replay::ReplayTable::new(settings.max_tracked_nonces),
            subscribers,
            algorithms,
        }
    }

    pub fn subscribers(&self) -> &S {
        &self.subscribers
    }

    /// The challenge for `realm` (RFC 3261 §22.1, RFC 2617 §3.2.1, RFC 8760 §2.4): one header
    /// per configured algorithm, preferred (SHA-256) first, each with its own nonce, `qop="auth"`
    /// and `stale=true` when the last credentials were valid but their nonce stale.
    pub fn challenge(&self, realm: &str, role: Role, stale: bool, now: SystemTime) -> Challenge {
        challenge_with(&self.nonces, &self.algorithms, realm, role, stale, now)
    }

    /// The challenge for `realm` offering only `wanted`, in its order, as far as `[auth]
    /// algorithms` enables them (see [`offered`]): for phones that give up on a challenge
    /// offering an algorithm they lack, even beside one they have. What [`Self::authorize`]
    /// accepts is `[auth] algorithms` still: narrowing an offer changes no verdict.
    pub fn challenge_offering(
        &self,
        wanted: &[Algorithm],
        realm: &str,
        role: Role,
        stale: bool,
        now: SystemTime,
    ) -> Challenge {
        let algorithms = offered(&self.algorithms, wanted);
        challenge_with(&self.nonces, &algorithms, realm, role, stale, now)
    }

    /// Checks the request's credentials for `realm` at `now` (RFC 3261 §22.2-§22.3, RFC 2617
    /// §3.2.2): realm, username, digest `uri` against the Request-URI, algorithm, qop, nonce,
    /// nonce count, and the response, compared in constant time.
    pub fn authorize(&self, request: &Message, realm: &str, now: SystemTime) -> Verdict {
        let role = Role::of(request.method());
        let Some(value) = credentials_for(request, role, realm) else {
            return Verdict::NoCredentials;
        };
        let credentials = match digest::parse(value) {
            Ok(c) => c,
            Err(digest::ParseError::UnsupportedQop) => return Verdict::Refused("unsupported qop"),
            Err(_) => return Verdict::Refused("malformed credentials"),
        };
        let algorithm = match credentials.algorithm.as_deref() {
            None => Some(Algorithm::Md5),
            Some(token) => Algorithm::parse(token),
        };
        let Some(algorithm) = algorithm.filter(|a| self.algorithms.contains(a)) else {
            return Verdict::Refused("unsupported algorithm");
        };
        if !uri_matches(request, &credentials.uri) {
            return Verdict::Refused("uri does not match the Request-URI");
        }
        let (nonce, stale) = match self.nonces.check(&credentials.nonce, realm, now) {
            nonce::Check::Fresh(n) => (n, false),
            nonce::Check::Stale(n) => (n, true),
            nonce::Check::Forged => return Verdict::Refused("nonce not issued by this server"),
        };
        let Some((domain, subscriber)) = self
            .subscribers
            .find_with_domain(&credentials.username, realm)
        else {
            return Verdict::Refused("unknown user");
        };
        let method = request.method().map(Method::as_str).unwrap_or_default();
        let expected =
            digest::expected_response(algorithm, subscriber.ha1(algorithm), method, &credentials);
        let given = credentials.response.to_ascii_lowercase();
        if given.len() != algorithm.hex_len()
            || !digest::constant_time_eq(expected.as_bytes(), given.as_bytes())
        {
            return Verdict::Refused("wrong password");
        }
        // Only a correct response is told its nonce is stale (RFC 2617 §3.2.1 `stale`).
        if stale {
            return Verdict::Stale;
        }
        let fingerprint = self.replay.fingerprint(
            request.call_id().unwrap_or_default(),
            request.cseq().map_or(0, |c| c.seq),
            request
                .top_via()
                .ok()
                .and_then(|v| v.branch())
                .unwrap_or_default(),
        );
        let expires_at = nonce.expires_at(self.nonces.lifetime());
        let nc = credentials.qop.as_ref().map(|q| q.nc);
        match self
            .replay
            .record(&nonce, expires_at, nc, fingerprint, nonce::seconds(now))
        {
            replay::Use::Fresh => Verdict::Authorized {
                user: credentials.username,
                realm: realm.to_owned(),
                domain,
                algorithm,
            },
            replay::Use::Replayed => Verdict::Refused("replayed nonce"),
            replay::Use::Forgotten => Verdict::Stale,
        }
    }

    /// Drops the replay table's expired entries (the server's periodic sweep).
    pub fn sweep(&self, now: SystemTime) {
        self.replay.sweep(nonce::seconds(now));
    }
}

/// A challenge from a throwaway nonce key with both algorithms (or those of `wanted`, as
/// [`Authenticator::challenge_offering`] narrows them), for a script run without a server
/// (`moonroute test`): it shows what would be sent; nothing can answer it.
pub fn offline_challenge(
    wanted: Option<&[Algorithm]>,
    realm: &str,
    role: Role,
    stale: bool,
    now: SystemTime,
) -> Challenge {
    static OFFLINE: std::sync::OnceLock<nonce::Nonces> = std::sync::OnceLock::new();
    let nonces = OFFLINE.get_or_init(|| nonce::Nonces::new(b"", Duration::from_secs(300)));
    let both = [Algorithm::Sha256, Algorithm::Md5];
    let algorithms = offered(&both, wanted.unwrap_or(&both));
    challenge_with(nonces, &algorithms, realm, role, stale, now)
}

/// The algorithms a narrowed challenge offers: those of `wanted` that `enabled` has, in
/// `wanted`'s order, once each (RFC 8760 §2.4: the server's preferred first). When `enabled`
/// has none of them, `enabled` itself: the client can answer neither offer, and a challenge
/// never names an algorithm the server would refuse.
fn offered(enabled: &[Algorithm], wanted: &[Algorithm]) -> Vec<Algorithm> {
    let mut algorithms: Vec<Algorithm> = Vec::with_capacity(enabled.len());
    for algorithm in wanted {
        if enabled.contains(algorithm) && !algorithms.contains(algorithm) {
            algorithms.push(*algorithm);
        }
    }
    if algorithms.is_empty() {
        algorithms = enabled.to_vec();
    }
    algorithms
}

/// The challenge for `realm` (RFC 3261 §22.1, RFC 2617 §3.2.1, RFC 8760 §2.4): one header per
/// algorithm in `algorithms`' order, each with its own nonce, `qop="auth"`, and `stale=true`
/// when asked.
fn challenge_with(
    nonces: &nonce::Nonces,
    algorithms: &[Algorithm],
    realm: &str,
    role: Role,
    stale: bool,
    now: SystemTime,
) -> Challenge {
    let (code, reason) = role.status();
    let headers = algorithms
        .iter()
        .map(|algorithm| {
            let mut value = format!(
                "Digest realm=\"{}\", nonce=\"{}\", qop=\"auth\", algorithm={}",
                quote_escape(realm),
                nonces.issue(realm, now),
                algorithm.name()
            );
            if stale {
                value.push_str(", stale=true");
            }
            (role.challenge_header().to_owned(), value)
        })
        .collect();
    Challenge {
        code,
        reason,
        headers,
    }
}

/// The credentials value of `role`'s header whose realm is `realm` (RFC 3261 §22.3: a request
/// may carry credentials for several realms; the others are not ours).
pub fn credentials_for<'m>(request: &'m Message, role: Role, realm: &str) -> Option<&'m [u8]> {
    request
        .headers_named(role.credentials_header())
        .find(|value| digest::realm_of(value).is_some_and(|r| r == realm))
}

/// The digest `uri` names the Request-URI (RFC 2617 §3.2.2.5; RFC 3261 §22.4): byte-equal, or
/// equivalent under §19.1.4 for SIP URIs.
fn uri_matches(request: &Message, digest_uri: &str) -> bool {
    let Some(ruri) = request.request_uri_bytes() else {
        return false;
    };
    if ruri == digest_uri.as_bytes() {
        return true;
    }
    match (Uri::parse(ruri), Uri::parse(digest_uri.as_bytes())) {
        (Ok(a), Ok(b)) => match (a.as_sip(), b.as_sip()) {
            (Some(a), Some(b)) => a.equivalent(b),
            _ => false,
        },
        _ => false,
    }
}

/// `text` with `"` and `\` escaped for a quoted-string (RFC 3261 §25.1).
fn quote_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests;
