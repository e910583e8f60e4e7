//! The shell's timer hook over a real UDP socket: a Worker that schedules a deadline gets
//! `on_timer` once it has passed, and an input that brings the deadline forward wakes the loop
//! early. Waits on datagrams with timeouts; never sleeps.

use std::net::SocketAddr;
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

/// "ARM <ms>" schedules a reply "FIRED <ms>" to the sender after that many milliseconds;
/// several may be pending, and each fires in deadline order.
#[derive(Default)]
struct AlarmWorker {
    pending: Vec<(Instant, SocketAddr, u64)>,
}

impl Worker for AlarmWorker {
    fn on_input(&mut self, input: Input, now: Instant, _out: &mut Vec<Output>) {
        let Input::Message { data, meta } = input else {
            return;
        };
        let text = String::from_utf8_lossy(&data);
        if let Some(ms) = text
            .strip_prefix("ARM ")
            .and_then(|n| n.trim().parse::<u64>().ok())
        {
            self.pending
                .push((now + Duration::from_millis(ms), meta.source, ms));
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.0).min()
    }

    fn on_timer(&mut self, now: Instant, out: &mut Vec<Output>) {
        let (due, later): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|p| p.0 <= now);
        self.pending = later;
        let mut due = due;
        due.sort();
        for (_, source, ms) in due {
            let dest = Destination {
                kind: TransportKind::Udp,
                addr: source,
                conn: None,
                local: None,
                tls_name: None,
                reuse_only: false,
            };
            out.push(Output::Send {
                dest,
                data: Bytes::from(format!("FIRED {ms}")),
            });
        }
    }
}

struct AlarmFactory;

impl WorkerFactory for AlarmFactory {
    fn make_worker(&self, _index: usize) -> Box<dyn Worker> {
        Box::<AlarmWorker>::default()
    }
}

async fn recv_text(socket: &UdpSocket) -> String {
    let mut buf = [0u8; 256];
    let (n, _) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
        .await
        .expect("timer fired in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn worker_timers_fire_after_their_deadline_and_earlier_ones_preempt() {
    let config = Config {
        listen: vec!["udp:127.0.0.1:0".parse::<ListenAddr>().unwrap()],
        workers: 1,
        ..Config::default()
    };
    let server = Server::start(&config, Arc::new(AlarmFactory)).unwrap();
    let addr = server.local_addr(TransportKind::Udp).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    let start = Instant::now();
    socket.send_to(b"ARM 1200", addr).await.unwrap();
    // The loop now sleeps until +1.2 s; this input must wake it for the earlier deadline.
    socket.send_to(b"ARM 100", addr).await.unwrap();
    assert_eq!(recv_text(&socket).await, "FIRED 100");
    let first = start.elapsed();
    assert!(
        first >= Duration::from_millis(100),
        "fired early: {first:?}"
    );
    assert!(
        first < Duration::from_millis(1000),
        "the earlier deadline did not preempt: {first:?}"
    );
    assert_eq!(recv_text(&socket).await, "FIRED 1200");
    assert!(start.elapsed() >= Duration::from_millis(1200));
}
