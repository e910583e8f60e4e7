//! What digest authentication costs the server per request, without the network:
//! `Authenticator::authorize` of a valid REGISTER credential (nonce HMAC check, subscriber
//! lookup in the sled table, the MD5 or SHA-256 response, the replay table), building a 401
//! challenge, and issuing a nonce. `bench/register_auth.sh` gives the end-to-end figure
//! (two round trips per registration).
//!
//! Run with `cargo bench --bench auth -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use moonroute::auth::digest::{expected_response, Credentials, QopAuth};
use moonroute::auth::nonce::Nonces;
use moonroute::auth::{Algorithm, Role, Settings, Subscriber, Verdict};
use moonroute::sip::Message;

const REALM: &str = "127.0.0.1";
const SECRET: &[u8] = b"bench secret";
const LIFETIME: Duration = Duration::from_secs(300);
/// Subscribers provisioned; the benchmark cycles through them.
const USERS: usize = 1000;
/// Authorizations per second of the benchmark's clock: each uses a fresh nonce (one 401 per
/// registration, as SIPp does), so the replay table holds about RATE x lifetime nonces, up to
/// its capacity (the default 100000), then evicts the oldest, as a busy registrar would.
const RATE: u64 = 1000;

fn settings(algorithms: Vec<Algorithm>) -> Settings {
    Settings {
        secret: SECRET.to_vec(),
        nonce_lifetime: LIFETIME,
        algorithms,
        max_tracked_nonces: 100_000,
    }
}

/// The n-th second of the benchmark's clock.
fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

/// A REGISTER from user `rN` answering a challenge with `nonce` (nc=1, qop=auth), as SIPp's
/// bench/register_auth_uac.xml sends it.
fn register(user: usize, nonce: &str, algorithm: Algorithm, cseq: u64) -> Message {
    let username = format!("r{user}");
    let uri = "sip:127.0.0.1:5060";
    let mut credentials = Credentials {
        username: username.clone(),
        realm: REALM.into(),
        nonce: nonce.into(),
        uri: uri.into(),
        response: String::new(),
        algorithm: Some(algorithm.name().into()),
        opaque: None,
        qop: Some(QopAuth {
            nc_text: "00000001".into(),
            nc: 1,
            cnonce: format!("{cseq:08x}"),
        }),
    };
    let ha1 = algorithm.ha1(&username, REALM, "bench-pw");
    credentials.response = expected_response(algorithm, &ha1, "REGISTER", &credentials);
    let text = format!(
        "REGISTER {uri} SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{cseq};rport=5070;received=127.0.0.1\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:{username}@127.0.0.1:5060>;tag={cseq}\r\n\
         To: <sip:{username}@127.0.0.1:5060>\r\n\
         Call-ID: {cseq}-bench@127.0.0.1\r\n\
         CSeq: 2 REGISTER\r\n\
         Contact: <sip:{username}@127.0.0.1:5070>\r\n\
         Expires: 3600\r\n\
         Authorization: Digest username=\"{username}\",realm=\"{REALM}\",cnonce=\"{cnonce}\",\
         nc=00000001,qop=auth,uri=\"{uri}\",nonce=\"{nonce}\",response=\"{response}\",\
         algorithm={alg}\r\n\
         Content-Length: 0\r\n\r\n",
        cnonce = credentials.qop.as_ref().map_or("", |q| q.cnonce.as_str()),
        response = credentials.response,
        alg = algorithm.name(),
    );
    Message::parse(Bytes::from(text)).expect("parses")
}

fn bench_authorize(c: &mut Criterion, algorithm: Algorithm) {
    let dir = tempfile::TempDir::new().expect("temporary directory");
    let auth = moonroute::auth::open(&settings(vec![algorithm]), dir.path()).expect("opens");
    for user in 0..USERS {
        let subscriber = Subscriber::with_password(&format!("r{user}"), REALM, "bench-pw");
        auth.subscribers()
            .add(&format!("r{user}@{REALM}"), &subscriber)
            .expect("adds");
    }
    // The server's nonces, issued with the same secret.
    let nonces = Nonces::new(SECRET, LIFETIME);
    let mut next = 0u64;
    let mut request = || {
        // Building and parsing the request is outside the measurement.
        next += 1;
        let now = at(next / RATE);
        let nonce = nonces.issue(REALM, now);
        (
            register(next as usize % USERS, &nonce, algorithm, next),
            now,
        )
    };
    let (first, now) = request();
    assert!(
        matches!(
            auth.authorize(&first, REALM, now),
            Verdict::Authorized { .. }
        ),
        "the benchmark's credentials must be valid"
    );
    let mut group = c.benchmark_group("auth");
    group.throughput(Throughput::Elements(1));
    let name = format!("authorize_register_{}", algorithm.name());
    group.bench_function(name, |b| {
        b.iter_batched(
            &mut request,
            |(request, now)| {
                let verdict = auth.authorize(black_box(&request), REALM, now);
                debug_assert!(matches!(verdict, Verdict::Authorized { .. }));
                verdict
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn authorize_md5(c: &mut Criterion) {
    bench_authorize(c, Algorithm::Md5);
}

fn authorize_sha256(c: &mut Criterion) {
    bench_authorize(c, Algorithm::Sha256);
}

fn challenge_and_nonce(c: &mut Criterion) {
    let dir = tempfile::TempDir::new().expect("temporary directory");
    let both = moonroute::auth::open(
        &settings(vec![Algorithm::Sha256, Algorithm::Md5]),
        dir.path(),
    )
    .expect("opens");
    let nonces = Nonces::new(SECRET, LIFETIME);
    let now = at(0);
    let mut group = c.benchmark_group("auth");
    group.throughput(Throughput::Elements(1));
    // The shipped default: two WWW-Authenticate headers (SHA-256, MD5), a nonce each.
    group.bench_function("challenge_sha256_and_md5", |b| {
        b.iter(|| both.challenge(black_box(REALM), Role::Registrar, false, now))
    });
    group.bench_function("nonce_issue", |b| {
        b.iter(|| nonces.issue(black_box(REALM), now))
    });
    let nonce = nonces.issue(REALM, now);
    group.bench_function("nonce_check", |b| {
        b.iter(|| nonces.check(black_box(&nonce), REALM, now))
    });
    group.finish();
}

criterion_group!(
    benches,
    authorize_md5,
    authorize_sha256,
    challenge_and_nonce
);
criterion_main!(benches);
