//! The authenticator on whole requests, with explicit time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::digest::{expected_response, Credentials, QopAuth};
use super::*;

const REALM: &str = "example.com";

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// One subscriber, alice@example.com, in a table of this test's own.
struct OneSubscriber(Subscriber);

impl SubscriberTable for OneSubscriber {
    fn find_with_domain(&self, username: &str, realm: &str) -> Option<(String, Subscriber)> {
        (username == "alice" && realm == self.0.realm)
            .then(|| ("example.com".to_owned(), self.0.clone()))
    }
}

fn authenticator(algorithms: &[Algorithm]) -> Authenticator<OneSubscriber> {
    let settings = Settings {
        secret: b"test secret".to_vec(),
        nonce_lifetime: Duration::from_secs(300),
        algorithms: algorithms.to_vec(),
        max_tracked_nonces: 1000,
    };
    let alice = Subscriber::with_password("alice", REALM, "wonderland");
    Authenticator::new(&settings, Arc::new(OneSubscriber(alice)))
}

/// The nonce of the challenge header for `algorithm`.
fn nonce_of(challenge: &Challenge, algorithm: Algorithm) -> String {
    let (_, value) = challenge
        .headers
        .iter()
        .find(|(_, v)| v.ends_with(&format!("algorithm={}", algorithm.name())))
        .expect("a header for the algorithm");
    let start = value.find("nonce=\"").unwrap() + 7;
    value[start..start + 64].to_owned()
}

struct Answer<'a> {
    method: &'a str,
    ruri: &'a str,
    uri: &'a str,
    password: &'a str,
    nonce: &'a str,
    algorithm: Algorithm,
    nc: Option<u32>,
    branch: &'a str,
    cseq: u32,
}

impl Answer<'_> {
    fn request(&self) -> Message {
        let credentials = Credentials {
            username: "alice".into(),
            realm: REALM.into(),
            nonce: self.nonce.into(),
            uri: self.uri.into(),
            response: String::new(),
            algorithm: Some(self.algorithm.name().into()),
            opaque: None,
            qop: self.nc.map(|nc| QopAuth {
                nc_text: format!("{nc:08x}"),
                nc,
                cnonce: "0a4f113b".into(),
            }),
        };
        let ha1 = self.algorithm.ha1("alice", REALM, self.password);
        let response = expected_response(self.algorithm, &ha1, self.method, &credentials);
        let qop = match &credentials.qop {
            Some(q) => format!(", qop=auth, nc={}, cnonce=\"{}\"", q.nc_text, q.cnonce),
            None => String::new(),
        };
        let header = match self.method {
            "REGISTER" => "Authorization",
            _ => "Proxy-Authorization",
        };
        let text = format!(
            "{method} {ruri} SIP/2.0\r\n\
             Via: SIP/2.0/UDP 192.0.2.1:5060;branch={branch}\r\n\
             From: <sip:alice@example.com>;tag=1\r\n\
             To: <sip:alice@example.com>\r\n\
             Call-ID: call-1\r\n\
             CSeq: {cseq} {method}\r\n\
             {header}: Digest username=\"alice\", realm=\"{REALM}\", nonce=\"{nonce}\", \
             uri=\"{uri}\", response=\"{response}\", algorithm={alg}{qop}\r\n\
             Content-Length: 0\r\n\r\n",
            method = self.method,
            ruri = self.ruri,
            branch = self.branch,
            cseq = self.cseq,
            nonce = self.nonce,
            uri = self.uri,
            alg = self.algorithm.name(),
        );
        Message::parse(Bytes::from(text)).unwrap()
    }
}

fn register<'a>(nonce: &'a str, algorithm: Algorithm) -> Answer<'a> {
    Answer {
        method: "REGISTER",
        ruri: "sip:example.com",
        uri: "sip:example.com",
        password: "wonderland",
        nonce,
        algorithm,
        nc: Some(1),
        branch: "z9hG4bK-1",
        cseq: 1,
    }
}

fn authorized(algorithm: Algorithm) -> Verdict {
    Verdict::Authorized {
        user: "alice".into(),
        realm: REALM.into(),
        domain: "example.com".into(),
        algorithm,
    }
}

#[test]
fn challenge_lists_sha256_first_then_md5() {
    let auth = authenticator(&[Algorithm::Sha256, Algorithm::Md5]);
    let challenge = auth.challenge(REALM, Role::Registrar, false, at(1000));
    assert_eq!((challenge.code, challenge.reason), (401, "Unauthorized"));
    assert_eq!(challenge.headers.len(), 2);
    assert_eq!(challenge.headers[0].0, "WWW-Authenticate");
    assert!(challenge.headers[0]
        .1
        .starts_with("Digest realm=\"example.com\", nonce=\""));
    assert!(challenge.headers[0]
        .1
        .ends_with("qop=\"auth\", algorithm=SHA-256"));
    assert!(challenge.headers[1].1.ends_with("algorithm=MD5"));
    let proxy = auth.challenge(REALM, Role::Proxy, true, at(1000));
    assert_eq!(proxy.code, 407);
    assert_eq!(proxy.headers[0].0, "Proxy-Authenticate");
    assert!(proxy.headers[0].1.ends_with(", stale=true"));
}

#[test]
fn both_algorithms_authorize_and_replays_are_refused() {
    let auth = authenticator(&[Algorithm::Sha256, Algorithm::Md5]);
    let challenge = auth.challenge(REALM, Role::Registrar, false, at(1000));
    for algorithm in [Algorithm::Sha256, Algorithm::Md5] {
        let nonce = nonce_of(&challenge, algorithm);
        let first = register(&nonce, algorithm);
        assert_eq!(
            auth.authorize(&first.request(), REALM, at(1001)),
            authorized(algorithm)
        );
        // The same request again (a retransmission): the same verdict.
        assert_eq!(
            auth.authorize(&first.request(), REALM, at(1002)),
            authorized(algorithm)
        );
        // The same nc from another request: a replay.
        let replay = Answer {
            branch: "z9hG4bK-2",
            cseq: 2,
            ..register(&nonce, algorithm)
        };
        assert_eq!(
            auth.authorize(&replay.request(), REALM, at(1002)),
            Verdict::Refused("replayed nonce")
        );
        let next = Answer {
            nc: Some(2),
            ..replay
        };
        assert_eq!(
            auth.authorize(&next.request(), REALM, at(1003)),
            authorized(algorithm)
        );
    }
}

#[test]
fn refusals_say_why() {
    let auth = authenticator(&[Algorithm::Md5]);
    let challenge = auth.challenge(REALM, Role::Registrar, false, at(1000));
    let nonce = nonce_of(&challenge, Algorithm::Md5);
    let wrong = Answer {
        password: "guess",
        ..register(&nonce, Algorithm::Md5)
    };
    assert_eq!(
        auth.authorize(&wrong.request(), REALM, at(1001)),
        Verdict::Refused("wrong password")
    );
    let sha = register(&nonce, Algorithm::Sha256);
    assert_eq!(
        auth.authorize(&sha.request(), REALM, at(1001)),
        Verdict::Refused("unsupported algorithm")
    );
    let elsewhere = Answer {
        uri: "sip:other.example.com",
        ..register(&nonce, Algorithm::Md5)
    };
    assert_eq!(
        auth.authorize(&elsewhere.request(), REALM, at(1001)),
        Verdict::Refused("uri does not match the Request-URI")
    );
    // Equivalent under §19.1.4: host case differs.
    let equivalent = Answer {
        uri: "sip:EXAMPLE.com",
        ..register(&nonce, Algorithm::Md5)
    };
    assert_eq!(
        auth.authorize(&equivalent.request(), REALM, at(1001)),
        authorized(Algorithm::Md5)
    );
    let zeros = "0".repeat(64);
    let forged = register(&zeros, Algorithm::Md5);
    assert_eq!(
        auth.authorize(&forged.request(), REALM, at(1001)),
        Verdict::Refused("nonce not issued by this server")
    );
    // Credentials for another realm are not ours.
    assert_eq!(
        auth.authorize(
            &register(&nonce, Algorithm::Md5).request(),
            "other",
            at(1001)
        ),
        Verdict::NoCredentials
    );
}

#[test]
fn an_expired_nonce_with_a_good_response_is_stale() {
    let auth = authenticator(&[Algorithm::Md5]);
    let challenge = auth.challenge(REALM, Role::Registrar, false, at(1000));
    let nonce = nonce_of(&challenge, Algorithm::Md5);
    assert_eq!(
        auth.authorize(&register(&nonce, Algorithm::Md5).request(), REALM, at(1300)),
        Verdict::Stale
    );
    let wrong = Answer {
        password: "guess",
        ..register(&nonce, Algorithm::Md5)
    };
    assert_eq!(
        auth.authorize(&wrong.request(), REALM, at(1300)),
        Verdict::Refused("wrong password"),
        "stale only for a correct response"
    );
}

#[test]
fn without_qop_a_nonce_is_one_time() {
    let auth = authenticator(&[Algorithm::Md5]);
    let challenge = auth.challenge(REALM, Role::Proxy, false, at(1000));
    let nonce = nonce_of(&challenge, Algorithm::Md5);
    let invite = Answer {
        method: "INVITE",
        ruri: "sip:bob@example.com",
        uri: "sip:bob@example.com",
        nc: None,
        ..register(&nonce, Algorithm::Md5)
    };
    assert_eq!(
        auth.authorize(&invite.request(), REALM, at(1001)),
        authorized(Algorithm::Md5)
    );
    let again = Answer {
        branch: "z9hG4bK-9",
        cseq: 9,
        ..invite
    };
    assert_eq!(
        auth.authorize(&again.request(), REALM, at(1001)),
        Verdict::Refused("replayed nonce")
    );
}

#[test]
fn a_narrowed_challenge_offers_the_wanted_algorithms_that_are_enabled() {
    let auth = authenticator(&[Algorithm::Sha256, Algorithm::Md5]);
    let names = |challenge: &Challenge| -> Vec<String> {
        challenge
            .headers
            .iter()
            .map(|(_, value)| value.rsplit("algorithm=").next().unwrap().to_owned())
            .collect()
    };
    let md5 = auth.challenge_offering(&[Algorithm::Md5], REALM, Role::Registrar, false, at(1000));
    assert_eq!(names(&md5), ["MD5"]);
    assert_eq!(md5.headers[0].0, "WWW-Authenticate");
    // The list's order, each algorithm once; `stale` as in any challenge.
    let reordered = auth.challenge_offering(
        &[Algorithm::Md5, Algorithm::Sha256, Algorithm::Md5],
        REALM,
        Role::Proxy,
        false,
        at(1000),
    );
    assert_eq!(names(&reordered), ["MD5", "SHA-256"]);
    // What is accepted is [auth] algorithms still: SHA-256 credentials on the nonce of an
    // MD5-only challenge are as good as any (a client could have answered the full one).
    let nonce = nonce_of(&md5, Algorithm::Md5);
    assert_eq!(
        auth.authorize(
            &register(&nonce, Algorithm::Sha256).request(),
            REALM,
            at(1001)
        ),
        authorized(Algorithm::Sha256)
    );
    // None of the wanted ones enabled: the enabled ones (a challenge never offers what the
    // server would refuse).
    let sha256_only = authenticator(&[Algorithm::Sha256]);
    let fallback =
        sha256_only.challenge_offering(&[Algorithm::Md5], REALM, Role::Registrar, false, at(1000));
    assert_eq!(names(&fallback), ["SHA-256"]);
}
