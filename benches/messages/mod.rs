//! Messages shared by the benches (`mod messages;` in each).

#![allow(dead_code)] // each bench uses a different part

use bytes::Bytes;

pub const SDP: &str = "v=0\r\n\
o=- 2890844526 1 IN IP4 127.0.0.1\r\n\
s=-\r\n\
c=IN IP4 127.0.0.1\r\n\
t=0 0\r\n\
m=audio 49172 RTP/AVP 0 8 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=sendrecv\r\n";

/// A call set-up as a proxy sees it after one hop: two Vias, two Record-Routes, SDP offer.
pub fn invite() -> Bytes {
    let text = format!(
        "INVITE sip:bob@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP p1.example.com;branch=z9hG4bK2d4790\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK776a;rport\r\n\
Max-Forwards: 69\r\n\
To: <sip:bob@example.com>\r\n\
From: <sip:alice@example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@127.0.0.1:5062>\r\n\
Record-Route: <sip:p2.example.com;lr>\r\n\
Record-Route: <sip:p1.example.com;lr>\r\n\
Allow: INVITE, ACK, CANCEL, BYE\r\n\
Supported: timer\r\n\
User-Agent: bench/1.0\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\
\r\n\
{SDP}",
        SDP.len()
    );
    Bytes::from(text)
}
