//! Bytes per live transaction, measured: a counting global allocator around a transaction layer
//! holding N live INVITE server transactions (each after its 100 Trying, waiting for the core)
//! and N live INVITE client transactions (each waiting for a response). Prints the figures and
//! checks a generous bound, so a regression that bloats per-transaction state is caught.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use bytes::Bytes;

use moonroute::sip::Message;
use moonroute::transaction::layer::{LayerConfig, LayerOutput, TransactionLayer};
use moonroute::transport::{Destination, Meta, TransportKind};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const N: usize = 10_000;

/// A typical INVITE as a UA sends it (~650 bytes with SDP), unique per `i`.
fn invite(i: usize) -> Bytes {
    let sdp = "v=0\r\no=alice 2890844526 2890844526 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n\
               t=0 0\r\nm=audio 49170 RTP/AVP 0 8 97\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n";
    Bytes::from(format!(
        "INVITE sip:bob@127.0.0.1:5080 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKmem{i};rport\r\n\
         Max-Forwards: 70\r\nFrom: \"Alice\" <sip:alice@example.com>;tag=a{i}\r\n\
         To: <sip:bob@example.com>\r\nCall-ID: mem{i}@127.0.0.1\r\nCSeq: 1 INVITE\r\n\
         Contact: <sip:alice@127.0.0.1:5070>\r\nUser-Agent: memory-test\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    ))
}

fn meta() -> Meta {
    Meta {
        kind: TransportKind::Udp,
        source: "127.0.0.1:5070".parse().unwrap(),
        local: "127.0.0.1:5060".parse().unwrap(),
        conn: None,
        worker: 0,
    }
}

#[test]
fn bytes_per_live_transaction() {
    let now = Instant::now();
    let message_len = invite(0).len();
    let mut out = Vec::with_capacity(4);
    let mut layer = TransactionLayer::new(LayerConfig::default());

    // Messages are made inside the measured region: the received buffer that a transaction's
    // zero-copy key keeps alive counts as its memory.
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for i in 0..N {
        let request = Message::parse(invite(i)).unwrap();
        layer.on_request(request, meta(), now, &mut out);
        out.clear();
    }
    let server_bytes = (LIVE_BYTES.load(Ordering::Relaxed) - before) as usize / N;

    let dest = Destination {
        kind: TransportKind::Udp,
        addr: "127.0.0.1:5080".parse().unwrap(),
        conn: None,
        local: None,
        tls_name: None,
        reuse_only: false,
    };
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for i in 0..N {
        // Distinct branches from the server side: these are "ours".
        let text = String::from_utf8_lossy(&invite(i)).replace("z9hG4bKmem", "z9hG4bKout");
        let request = Message::parse(Bytes::from(text)).unwrap();
        layer
            .send_request(request, dest.clone(), now, &mut out)
            .unwrap();
        out.iter()
            .for_each(|o| assert!(matches!(o, LayerOutput::Send { .. })));
        out.clear();
    }
    let client_bytes = (LIVE_BYTES.load(Ordering::Relaxed) - before) as usize / N;
    assert_eq!(layer.live(), 2 * N);
    println!(
        "live transactions: {} server + {} client; bytes per live INVITE server transaction: {server_bytes}, \
         per live INVITE client transaction: {client_bytes} (INVITE of {} bytes, counted in)",
        N,
        N,
        message_len
    );
    // Generous bounds (about twice what was measured): a regression that bloats state fails.
    assert!(
        server_bytes < 4096,
        "{server_bytes} bytes per server transaction"
    );
    assert!(
        client_bytes < 6144,
        "{client_bytes} bytes per client transaction"
    );
}
