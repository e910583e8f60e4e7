//! Which event loop handles a message: every request of a dialog on the loop its Call-ID
//! hashes to, whatever socket, port or connection it came from.
//!
//! Owns the loop-affinity rule of the worker model ([`crate::server`]). The kernel spreads
//! datagrams and connections over the loops by flow (SO_REUSEPORT), but a transaction is not a
//! flow: RFC 3261 §17.2.3 matches a request to its server transaction by the top Via's branch
//! and sent-by and the method, never by the source port, so a retransmission sent from another
//! port (a UA using ephemeral ports, a NAT rebinding), a CANCEL on another connection than its
//! INVITE (§9.1), or the ACK of a non-2xx final response (§17.1.1.3) may reach any loop. A
//! loop that does not hold the transaction would take the copy for a new request.
//!
//! So each request is handled by the loop its Call-ID names: hashed with a fixed function, the
//! same on every loop and in every run. The Call-ID rather than the branch because it also
//! keeps a whole dialog (§12) on one loop: in-dialog requests, the ACK of a 2xx (§13.2.2.4,
//! a transaction of its own), the CANCEL and the relay's per-call state (Timer C, the
//! response context, the script's `req.vars`) all meet on the loop that holds them; and
//! RFC 2543 transaction matching (§17.2.3's backward compatibility) includes the Call-ID too.
//! A request that arrives on another loop is handed over to its owner before it is parsed: the
//! receiving loop only finds the Call-ID ([`crate::sip::prescan`]).
//!
//! Responses keep their own rule: they go to the loop named in the branch of the Via this
//! proxy added ([`crate::proxy::via_branch::owner_loop`]), the loop that holds the client
//! transaction (also the keep-alive probes of the first loop, `crate::nat::keepalive`).
//!
//! With one loop nothing is scanned or hashed.

use crate::sip::prescan;
use crate::transport::Meta;

/// The affinity rule as one loop applies it. See the module docs.
#[derive(Clone, Copy, Debug)]
pub struct Affinity {
    loop_index: usize,
    loops: usize,
}

impl Affinity {
    /// The rule for loop `loop_index` of `loops`.
    pub fn new(loop_index: usize, loops: usize) -> Affinity {
        Affinity { loop_index, loops }
    }

    /// The loop that must handle `message`, a request this loop received, when that is another
    /// loop; `None` when it is handled here: with one loop, for a message another loop handed
    /// over (the owner never passes it on, so nothing is handed over twice), for a response
    /// (routed by its branch once parsed), and for a message whose Call-ID cannot be found
    /// (the parser refuses it here).
    pub fn request_owner_elsewhere(&self, message: &[u8], meta: &Meta) -> Option<usize> {
        if self.loops < 2 || meta.worker != self.loop_index || prescan::is_response(message) {
            return None;
        }
        let owner = loop_of_call_id(prescan::call_id(message)?, self.loops);
        (owner != self.loop_index).then_some(owner)
    }
}

/// The loop of `loops` that owns the dialog with this Call-ID. A fixed, unkeyed hash: every loop
/// computes the same owner. It is not secret: a sender who chooses Call-IDs that land on one
/// loop achieves no more than by sending from one port, which the kernel already keeps on one
/// loop.
pub fn loop_of_call_id(call_id: &[u8], loops: usize) -> usize {
    // Lemire's multiply-shift maps the hash onto 0..loops without a division.
    ((u128::from(call_id_hash(call_id)) * loops as u128) >> 64) as usize
}

/// A 64-bit hash of a Call-ID: eight bytes at a time (FxHash's step), then MurmurHash3's
/// finalizer so that every output bit depends on every input byte (the high bits pick the
/// loop).
fn call_id_hash(call_id: &[u8]) -> u64 {
    const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut hash = SEED ^ call_id.len() as u64;
    let mut words = call_id.chunks_exact(8);
    for word in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        hash = (hash.rotate_left(5) ^ u64::from_le_bytes(bytes)).wrapping_mul(K);
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        let mut bytes = [0u8; 8];
        bytes[..tail.len()].copy_from_slice(tail);
        hash = (hash.rotate_left(5) ^ u64::from_le_bytes(bytes)).wrapping_mul(K);
    }
    fmix64(hash)
}

/// MurmurHash3's 64-bit finalizer.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::TransportKind;

    fn meta(worker: usize) -> Meta {
        Meta {
            kind: TransportKind::Udp,
            source: "127.0.0.1:5070".parse().unwrap(),
            local: "127.0.0.1:5060".parse().unwrap(),
            conn: None,
            worker,
        }
    }

    fn invite(call_id: &str) -> Vec<u8> {
        format!(
            "INVITE sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
             Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn the_owner_is_the_same_from_every_loop_and_every_run() {
        // Fixed values: the hash must not change between builds of one deployment's loops.
        assert_eq!(loop_of_call_id(b"a84b4c76e66710@pc33.atlanta.com", 4), 1);
        assert_eq!(loop_of_call_id(b"1-3016@127.0.0.1", 4), 3);
        for loops in 1..8 {
            for n in 0..100 {
                let call_id = format!("{n}-caller@127.0.0.1");
                let owner = loop_of_call_id(call_id.as_bytes(), loops);
                assert!(owner < loops);
                let message = invite(&call_id);
                for receiver in 0..loops {
                    let elsewhere = Affinity::new(receiver, loops)
                        .request_owner_elsewhere(&message, &meta(receiver));
                    let expected = (owner != receiver).then_some(owner);
                    assert_eq!(
                        elsewhere, expected,
                        "{call_id} on loop {receiver} of {loops}"
                    );
                }
            }
        }
    }

    #[test]
    fn call_ids_spread_evenly_over_the_loops() {
        for loops in [2usize, 3, 4, 8] {
            let mut counts = vec![0usize; loops];
            let total = 40_000;
            for n in 0..total {
                counts[loop_of_call_id(format!("{n}@host").as_bytes(), loops)] += 1;
            }
            let expected = total / loops;
            for count in counts {
                assert!(
                    count.abs_diff(expected) < expected / 20,
                    "{loops} loops: {count} of {total}, expected about {expected}"
                );
            }
        }
    }

    #[test]
    fn one_loop_handed_over_responses_and_unreadable_messages_stay() {
        let call_id = (0..)
            .map(|n| format!("{n}@host"))
            .find(|c| loop_of_call_id(c.as_bytes(), 2) == 1)
            .unwrap();
        let message = invite(&call_id);
        assert_eq!(
            Affinity::new(0, 2).request_owner_elsewhere(&message, &meta(0)),
            Some(1)
        );
        assert_eq!(
            Affinity::new(0, 1).request_owner_elsewhere(&message, &meta(0)),
            None,
            "one loop"
        );
        assert_eq!(
            Affinity::new(0, 2).request_owner_elsewhere(&message, &meta(1)),
            None,
            "handed over by loop 1 already"
        );
        let response = format!("SIP/2.0 200 OK\r\nCall-ID: {call_id}\r\n\r\n");
        assert_eq!(
            Affinity::new(0, 2).request_owner_elsewhere(response.as_bytes(), &meta(0)),
            None,
            "responses go by branch"
        );
        assert_eq!(
            Affinity::new(0, 2).request_owner_elsewhere(b"INVITE sip:x SIP/2.0\r\n\r\n", &meta(0)),
            None,
            "no Call-ID: refused here"
        );
    }

    /// The rule as the core applies it: a core of a server with two loops, fed received
    /// messages with an explicit `now`.
    mod in_the_core {
        use std::time::Instant;

        use bytes::Bytes;

        use super::{loop_of_call_id, meta};
        use crate::config::Config;
        use crate::server::core::CoreFactory;
        use crate::transport::{Input, Output, Worker, WorkerFactory};

        fn core(index: usize) -> Box<dyn Worker> {
            let config = Config::default();
            CoreFactory::new(&config).make_bound_worker(index, 2, &config.listen)
        }

        /// A Call-ID that loop `owner` of 2 owns.
        fn call_id_of_loop(owner: usize) -> String {
            (0..)
                .map(|n| format!("{n}-affinity@127.0.0.1"))
                .find(|c| loop_of_call_id(c.as_bytes(), 2) == owner)
                .unwrap()
        }

        fn request(method: &str, uri: &str, call_id: &str) -> Bytes {
            Bytes::from(format!(
                "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-a1;rport\r\n\
                 Max-Forwards: 70\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nTo: <{uri}>\r\n\
                 Call-ID: {call_id}\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
            ))
        }

        fn run(core: &mut dyn Worker, data: &Bytes, received_by: usize) -> Vec<Output> {
            let mut out = Vec::new();
            let input = Input::Message {
                data: data.clone(),
                meta: meta(received_by),
            };
            core.on_input(input, Instant::now(), &mut out);
            out
        }

        fn handed_to(out: &[Output]) -> Option<usize> {
            match out {
                [Output::HandOver { worker, .. }] => Some(*worker),
                _ => None,
            }
        }

        #[test]
        fn a_request_goes_to_its_call_ids_loop_which_handles_it() {
            let invite = request("INVITE", "sip:bob@example.com", &call_id_of_loop(1));
            let out = run(&mut *core(0), &invite, 0);
            let [Output::HandOver { worker: 1, input }] = &out[..] else {
                panic!("handed to loop 1: {out:?}");
            };
            let Input::Message { data, meta } = input else {
                panic!("{input:?}");
            };
            assert_eq!(data, &invite, "the bytes as received, unparsed");
            assert_eq!(meta.worker, 0, "still says which loop received it");
            // Loop 1 handles it (this server relays nothing: 501), and never passes it on.
            let out = run(&mut *core(1), &invite, 0);
            assert_eq!(handed_to(&out), None, "{out:?}");
            assert!(matches!(out.as_slice(), [Output::Send { .. }]), "{out:?}");
            // The loop that owns it handles what it receives itself.
            let out = run(&mut *core(1), &invite, 1);
            assert_eq!(handed_to(&out), None, "{out:?}");
        }

        #[test]
        fn options_for_this_server_are_answered_where_they_land() {
            let call_id = call_id_of_loop(1);
            let ping = request("OPTIONS", "sip:127.0.0.1:5060", &call_id);
            let out = run(&mut *core(0), &ping, 0);
            assert!(matches!(out.as_slice(), [Output::Send { .. }]), "{out:?}");
            let relayed = request("OPTIONS", "sip:bob@example.com", &call_id);
            assert_eq!(handed_to(&run(&mut *core(0), &relayed, 0)), Some(1));
        }

        #[test]
        fn a_request_without_a_call_id_is_refused_where_it_lands() {
            let broken = Bytes::from_static(
                b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-a2\r\n\
                  From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:bob@example.com>\r\nCSeq: 1 INVITE\r\n\r\n",
            );
            for receiver in 0..2 {
                let out = run(&mut *core(receiver), &broken, receiver);
                assert!(
                    matches!(out.as_slice(), [Output::Send { .. }]),
                    "a 400: {out:?}"
                );
            }
        }
    }
}
