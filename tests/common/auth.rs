#![allow(dead_code)] // shared by the test binaries; each uses a part
//! The client side of digest authentication (RFC 2617 §3.2.2, RFC 8760), written
//! independently of the server's code (md-5 and ring directly): [`Challenge::parse`] reads a
//! `WWW-Authenticate`/`Proxy-Authenticate` value, [`answer_challenge`] computes the
//! `Authorization`/`Proxy-Authorization` value.

use md5::{Digest as _, Md5};

/// A Digest challenge as a client reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub algorithm: String,
    pub qop: Option<String>,
    pub stale: bool,
}

impl Challenge {
    /// Parses `Digest realm="...", nonce="...", ...` (values quoted or tokens, no escapes).
    pub fn parse(value: &str) -> Challenge {
        let rest = value
            .strip_prefix("Digest ")
            .unwrap_or_else(|| panic!("a Digest challenge: {value}"));
        let mut challenge = Challenge {
            realm: String::new(),
            nonce: String::new(),
            algorithm: "MD5".into(),
            qop: None,
            stale: false,
        };
        for param in rest.split(',') {
            let (name, value) = param.trim().split_once('=').expect("name=value");
            let value = value.trim_matches('"').to_owned();
            match name.to_ascii_lowercase().as_str() {
                "realm" => challenge.realm = value,
                "nonce" => challenge.nonce = value,
                "algorithm" => challenge.algorithm = value,
                "qop" => challenge.qop = Some(value),
                "stale" => challenge.stale = value.eq_ignore_ascii_case("true"),
                _ => {}
            }
        }
        challenge
    }
}

fn hash(algorithm: &str, data: &str) -> String {
    let bytes: Vec<u8> = match algorithm {
        "MD5" => Md5::digest(data.as_bytes()).to_vec(),
        "SHA-256" => ring::digest::digest(&ring::digest::SHA256, data.as_bytes())
            .as_ref()
            .to_vec(),
        other => panic!("unsupported algorithm {other}"),
    };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What to answer a challenge with.
pub struct Answer<'a> {
    pub user: &'a str,
    pub password: &'a str,
    pub method: &'a str,
    /// The digest `uri`: the Request-URI (RFC 3261 §22.4).
    pub uri: &'a str,
    /// The nonce count (qop=auth); 1 for the first use of a nonce.
    pub nc: u32,
}

/// The credentials value answering `challenge` (qop=auth, RFC 2617 §3.2.2.1).
pub fn answer_challenge(challenge: &Challenge, answer: &Answer<'_>) -> String {
    let algorithm = challenge.algorithm.as_str();
    let ha1 = hash(
        algorithm,
        &format!("{}:{}:{}", answer.user, challenge.realm, answer.password),
    );
    let ha2 = hash(algorithm, &format!("{}:{}", answer.method, answer.uri));
    let nc = format!("{:08x}", answer.nc);
    let cnonce = format!("c{:x}", answer.nc.wrapping_mul(2_654_435_761));
    let response = hash(
        algorithm,
        &format!("{ha1}:{}:{nc}:{cnonce}:auth:{ha2}", challenge.nonce),
    );
    format!(
        "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{}\", response=\"{response}\", \
         algorithm={algorithm}, qop=auth, nc={nc}, cnonce=\"{cnonce}\"",
        answer.user, challenge.realm, challenge.nonce, answer.uri
    )
}
