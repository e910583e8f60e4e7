//! Hand-over between event loops over a real UDP socket: a Worker passes an input to another
//! loop (`Output::HandOver`), which processes it with its own Worker and answers from its own
//! socket. Waits on datagrams with a timeout; never sleeps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;

use moonroute::config::Config;
use moonroute::server::Server;
use moonroute::transport::{
    Destination, Input, ListenAddr, Output, TransportKind, Worker, WorkerFactory,
};

const WAIT: Duration = Duration::from_secs(5);

/// Hands every input received on its own socket to the next loop; answers inputs handed to it
/// with "HANDLED BY <its index> RECEIVED BY <receiving loop>".
struct PassAlong {
    index: usize,
    loops: usize,
}

impl Worker for PassAlong {
    fn on_input(&mut self, input: Input, _now: Instant, out: &mut Vec<Output>) {
        let Input::Message { meta, .. } = &input else {
            return;
        };
        if meta.worker == self.index {
            let next = (self.index + 1) % self.loops;
            out.push(Output::HandOver {
                worker: next,
                input,
            });
            return;
        }
        let dest = Destination {
            kind: TransportKind::Udp,
            addr: meta.source,
            conn: None,
            local: Some(meta.local),
            tls_name: None,
            reuse_only: false,
        };
        let text = format!("HANDLED BY {} RECEIVED BY {}", self.index, meta.worker);
        out.push(Output::Send {
            dest,
            data: Bytes::from(text),
        });
    }
}

struct Factory(usize);

impl WorkerFactory for Factory {
    fn make_worker(&self, index: usize) -> Box<dyn Worker> {
        Box::new(PassAlong {
            index,
            loops: self.0,
        })
    }
}

#[tokio::test]
async fn an_input_handed_over_is_processed_and_answered_by_the_other_loop() {
    let config = Config {
        listen: vec!["udp:127.0.0.1:0".parse::<ListenAddr>().unwrap()],
        workers: 2,
        ..Config::default()
    };
    let server = Server::start(&config, Arc::new(Factory(2))).unwrap();
    let addr = server.local_addr(TransportKind::Udp).unwrap();
    for _ in 0..4 {
        // A fresh source port each time, so the kernel may pick either loop.
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.send_to(b"PING", addr).await.unwrap();
        let mut buf = [0u8; 128];
        let (n, from) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
            .await
            .expect("answer")
            .unwrap();
        assert_eq!(from, addr, "answered from the shared listening address");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let words: Vec<&str> = text.split(' ').collect();
        assert_eq!(words.len(), 6, "{text}");
        assert_ne!(
            words[2], words[5],
            "handled by another loop than the one that received it: {text}"
        );
    }
}
