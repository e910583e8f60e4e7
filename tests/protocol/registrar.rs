//! The shipped `scripts/default.lua` (with `AUTHENTICATE` off) as the router, over a durable
//! location store (sled in a temporary directory): a REGISTER is answered only once its
//! binding is on disk (RFC 3261 §10.3: at once when the flusher thread was quicker than the
//! script, else when the store's wake signal tells the loop, which the harness waits for), and
//! a call to the registered AOR reaches the contact (§16.5: the location service gives the
//! target).

use super::harness::{
    config, default_script_without_auth, show, Config, Harness, HeaderName, LocationBackend,
};

const DOMAIN: &str = "moonroute.test";

fn durable_config() -> Config {
    let mut config = config();
    config.domains = vec![DOMAIN.to_owned()];
    config.location.store = LocationBackend::Sled;
    config
}

#[test]
fn a_durable_registration_then_a_call_to_the_aor() {
    let mut h = Harness::with_script(&durable_config(), &default_script_without_auth());
    let alice = h.add_ua_via_proxy("alice", "127.0.0.2:5060");
    let bob = h.add_ua_via_proxy("bob", "127.0.0.3:5060");
    h.ua(alice).from_domain = Some(DOMAIN.to_owned());
    h.ua(bob).from_domain = Some(DOMAIN.to_owned());
    let aor = format!("sip:alice@{DOMAIN}");

    h.ua(alice)
        .request("REGISTER", &aor)
        .header("Expires", "600")
        .send();
    let registered = h.expect_final(alice, 200);
    let contact =
        String::from_utf8_lossy(registered.header(HeaderName::Contact).unwrap()).into_owned();
    assert!(
        contact.contains("127.0.0.2:5060") && contact.contains("expires="),
        "the binding in the 200\n{}",
        show(&registered)
    );

    let invite = h.ua(bob).invite(&aor);
    let incoming = h.expect_request(alice, "INVITE");
    assert_eq!(
        incoming.request_uri_bytes(),
        Some(&b"sip:alice@127.0.0.2:5060"[..]),
        "the Request-URI is the registered contact"
    );
    assert_eq!(incoming.call_id().unwrap(), invite.call_id().unwrap());
    h.ua(alice).respond(&incoming, 200, "OK");
    let answer = h.expect_final(bob, 200);
    let mut dialog = h.ua(bob).ack_2xx(&answer);
    h.expect_request(alice, "ACK");
    h.ua(bob).bye(&mut dialog);
    let bye = h.expect_request(alice, "BYE");
    h.ua(alice).respond(&bye, 200, "OK");
    h.expect_response(bob, 200);
}
