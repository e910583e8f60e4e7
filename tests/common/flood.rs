#![allow(dead_code)] // shared by the test binaries; each uses a part
//! A bare UDP sender for flood tests: it sends new MESSAGEs as fast as its socket takes them
//! and counts the answers, instead of running transactions like the test UA.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moonroute::sip::Message;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

pub struct Flooder {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    domain: String,
    statuses: mpsc::UnboundedReceiver<u16>,
    sent: u32,
}

impl Flooder {
    /// A flooder on `ip` (port chosen by the kernel) claiming `flooder@domain` as its From.
    pub async fn bind(ip: [u8; 4], domain: &str) -> Flooder {
        let socket = Arc::new(UdpSocket::bind(SocketAddr::from((ip, 0))).await.unwrap());
        let local = socket.local_addr().unwrap();
        let (tx, statuses) = mpsc::unbounded_channel();
        let reader = socket.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            while let Ok((n, _)) = reader.recv_from(&mut buf).await {
                let status = Message::parse(Bytes::copy_from_slice(&buf[..n]))
                    .ok()
                    .and_then(|m| m.status());
                if let Some(status) = status {
                    if tx.send(status).is_err() {
                        return;
                    }
                }
            }
        });
        Flooder {
            socket,
            local,
            domain: domain.to_owned(),
            statuses,
            sent: 0,
        }
    }

    /// One new MESSAGE to `user` in the flooder's domain (a new transaction each time).
    pub async fn send(&mut self, server: SocketAddr, user: &str) {
        self.sent += 1;
        let n = self.sent;
        let local = self.local;
        let domain = &self.domain;
        let request = format!(
            "MESSAGE sip:{user}@{domain} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK-flood-{n};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:flooder@{domain}>;tag=f{n}\r\n\
             To: <sip:{user}@{domain}>\r\n\
             Call-ID: flood-{n}-{}@{}\r\n\
             CSeq: 1 MESSAGE\r\n\
             Content-Length: 0\r\n\r\n",
            local.port(),
            local.ip()
        );
        self.socket
            .send_to(request.as_bytes(), server)
            .await
            .unwrap();
    }

    /// The next answer within `wait`, if any.
    pub async fn answer(&mut self, wait: Duration) -> Option<u16> {
        tokio::time::timeout(wait, self.statuses.recv())
            .await
            .ok()
            .flatten()
    }

    /// Counts answers until none arrives for `quiet`; each must be `expected`.
    pub async fn drain(&mut self, quiet: Duration, expected: u16) -> usize {
        let mut count = 0;
        while let Some(status) = self.answer(quiet).await {
            assert_eq!(status, expected, "the flooder's answers");
            count += 1;
        }
        count
    }
}
