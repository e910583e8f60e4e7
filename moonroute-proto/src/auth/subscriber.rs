//! One subscriber's credentials (Kamailio's `subscriber` row): the HA1 values for each
//! digest algorithm, `H(user ":" realm ":" password)` (RFC 2617 §3.2.2.2, RFC 8760 §2.3),
//! never the password, and the [`SubscriberTable`] the [`super::Authenticator`] looks them up
//! in (the shell keeps the table itself, in sled).

use super::digest::Algorithm;

/// Where the authenticator finds credentials.
pub trait SubscriberTable {
    /// The credentials of `username` in `realm` and the subscriber's domain (lowercase): the
    /// host its AOR must have, which is not the realm when it was added with `--realm`.
    fn find_with_domain(&self, username: &str, realm: &str) -> Option<(String, Subscriber)>;
}

/// One subscriber's credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscriber {
    pub realm: String,
    /// Lowercase hex HA1 with MD5 (32 digits).
    pub ha1_md5: String,
    /// Lowercase hex HA1 with SHA-256 (64 digits).
    pub ha1_sha256: String,
}

impl Subscriber {
    /// The credentials of `user` in `realm` with `password` (what `ctl user add` computes).
    pub fn with_password(user: &str, realm: &str, password: &str) -> Subscriber {
        Subscriber {
            realm: realm.to_owned(),
            ha1_md5: Algorithm::Md5.ha1(user, realm, password),
            ha1_sha256: Algorithm::Sha256.ha1(user, realm, password),
        }
    }

    pub fn ha1(&self, algorithm: Algorithm) -> &str {
        match algorithm {
            Algorithm::Md5 => &self.ha1_md5,
            Algorithm::Sha256 => &self.ha1_sha256,
        }
    }

    /// Checks the fields (realm printable, HA1s lowercase hex of the right length).
    pub fn validate(&self) -> Result<(), SubscriberError> {
        if self.realm.is_empty() || self.realm.chars().any(|c| c.is_control() || c == '"') {
            return Err(SubscriberError::InvalidRealm(self.realm.clone()));
        }
        let hex_of = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex_of(&self.ha1_md5, 32) || !hex_of(&self.ha1_sha256, 64) {
            return Err(SubscriberError::MalformedHa1);
        }
        Ok(())
    }
}

/// `user@domain` checked and normalized (an optional `sip:` prefix dropped, domain
/// lowercased): `(user, domain)`.
pub fn split_user(user_at_domain: &str) -> Result<(String, String), SubscriberError> {
    let text = user_at_domain.trim();
    let text = text
        .strip_prefix("sip:")
        .or_else(|| text.strip_prefix("sips:"))
        .unwrap_or(text);
    let (user, domain) = text
        .rsplit_once('@')
        .ok_or_else(|| SubscriberError::NotUserAtDomain(user_at_domain.to_owned()))?;
    let bad = |s: &str| {
        s.is_empty()
            || s.chars()
                .any(|c| c.is_control() || c.is_whitespace() || c == '"' || c == '@')
    };
    if bad(user) || bad(domain) || domain.contains([':', ';', '/']) {
        return Err(SubscriberError::NotUserAtDomain(user_at_domain.to_owned()));
    }
    Ok((user.to_owned(), domain.to_ascii_lowercase()))
}

/// Why a subscriber's name or credentials are refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscriberError {
    /// Not `user@domain` (with an optional `sip:` or `sips:`): the text given.
    NotUserAtDomain(String),
    /// An empty realm, or one with a control character or `"`.
    InvalidRealm(String),
    /// HA1 values that are not 32 (MD5) and 64 (SHA-256) lowercase hex digits.
    MalformedHa1,
}

impl std::fmt::Display for SubscriberError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubscriberError::NotUserAtDomain(text) => write!(f, "{text:?} is not USER@DOMAIN"),
            SubscriberError::InvalidRealm(realm) => write!(f, "invalid realm {realm:?}"),
            SubscriberError::MalformedHa1 => {
                f.write_str("HA1 values must be 32 (MD5) and 64 (SHA-256) lowercase hex digits")
            }
        }
    }
}

impl std::error::Error for SubscriberError {}

impl From<SubscriberError> for String {
    fn from(error: SubscriberError) -> String {
        error.to_string()
    }
}
