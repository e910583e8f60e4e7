//! What handing a received message to another event loop costs (`Output::HandOver`), measured
//! on the real shell: a server with two loops on 127.0.0.1 and a UDP client in this process.
//!
//! ```text
//! hand_over_cost [--messages N] [--windows 1,32] [--rounds 3] [--size BYTES] [--timeout SECS]
//! ```
//!
//! The server's Worker answers every datagram with a short one. In `direct` runs the loop that
//! received the datagram answers it; in `hand-over` runs it hands the datagram to the other loop,
//! which answers. The client keeps WINDOW datagrams in flight (1: each one alone, so every
//! hand-over finds the other loop asleep and must wake it; 32: bursts) until N are answered.
//! Per run it prints the CPU time of the two loop threads (`/proc/self/task/*/schedstat`,
//! nanoseconds, so SIP parsing and routing are not in it: the Worker does neither) per message,
//! and their voluntary context switches per message (a loop going to sleep and being woken).
//! Runs alternate direct and hand-over, ROUNDS of each per window; the summary gives the median
//! difference per message: the hand-over's own cost (queueing, waking the other loop, running
//! its task), to add to the pre-scan of the Call-ID (`cargo bench --bench affinity`).
//!
//! Bounded: each run stops after `--timeout` seconds (default 60, exit 1); a lost datagram is
//! sent again after 200 ms. Loopback only.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;

use moonroute::config::Config;
use moonroute::server::Server;
use moonroute::transport::{
    Destination, Input, ListenAddr, Output, TransportKind, Worker, WorkerFactory,
};

const REPLY: &[u8] = b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n";
const RESEND_AFTER: Duration = Duration::from_millis(200);

struct Args {
    messages: usize,
    windows: Vec<usize>,
    rounds: usize,
    size: usize,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        messages: 200_000,
        windows: vec![1, 32],
        rounds: 3,
        size: 600,
        timeout: Duration::from_secs(60),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = || value.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--messages" => args.messages = number()?,
            "--rounds" => args.rounds = number()?,
            "--size" => args.size = number()?,
            "--timeout" => args.timeout = Duration::from_secs(number()? as u64),
            "--windows" => {
                args.windows = value
                    .split(',')
                    .map(|w| w.parse().map_err(|e| format!("--windows: {e}")))
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if args.windows.contains(&0) || args.messages == 0 || args.rounds == 0 {
        return Err("--messages, --rounds and each window must be at least 1".into());
    }
    Ok(args)
}

/// Answers each datagram; with `hand_over`, from the other loop.
struct Answerer {
    index: usize,
    loops: usize,
    hand_over: bool,
}

impl Worker for Answerer {
    fn on_input(&mut self, input: Input, _now: Instant, out: &mut Vec<Output>) {
        let Input::Message { meta, .. } = &input else {
            return;
        };
        if self.hand_over && meta.worker == self.index {
            let worker = (self.index + 1) % self.loops;
            out.push(Output::HandOver { worker, input });
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
        out.push(Output::Send {
            dest,
            data: Bytes::from_static(REPLY),
        });
    }
}

struct Factory {
    hand_over: bool,
}

impl WorkerFactory for Factory {
    fn make_worker(&self, index: usize) -> Box<dyn Worker> {
        Box::new(Answerer {
            index,
            loops: 2,
            hand_over: self.hand_over,
        })
    }
}

/// CPU nanoseconds and voluntary context switches of this process's event loop threads.
fn loop_threads_usage() -> (u64, u64) {
    let mut cpu_ns = 0;
    let mut switches = 0;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (0, 0);
    };
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with("moonroute-loop") {
            continue;
        }
        let schedstat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        cpu_ns += schedstat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        switches += status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    (cpu_ns, switches)
}

struct Run {
    cpu_ns_per_message: f64,
    switches_per_message: f64,
    resent: usize,
    wall: Duration,
}

/// Sends `messages` datagrams to `server`, `window` in flight, until each is answered.
async fn drive(
    server: SocketAddr,
    args: &Args,
    window: usize,
) -> Result<(usize, Duration), String> {
    let socket = UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let payload = vec![b'x'; args.size];
    let started = Instant::now();
    let deadline = started + args.timeout;
    let (mut sent, mut answered, mut resent) = (0usize, 0usize, 0usize);
    while sent < window.min(args.messages) {
        socket
            .send_to(&payload, server)
            .await
            .map_err(|e| e.to_string())?;
        sent += 1;
    }
    let mut buf = [0u8; 2048];
    while answered < args.messages {
        if Instant::now() > deadline {
            return Err(format!("timed out after {answered} answers"));
        }
        match tokio::time::timeout(RESEND_AFTER, socket.recv_from(&mut buf)).await {
            Ok(received) => {
                received.map_err(|e| e.to_string())?;
                answered += 1;
                if sent < args.messages {
                    socket
                        .send_to(&payload, server)
                        .await
                        .map_err(|e| e.to_string())?;
                    sent += 1;
                }
            }
            Err(_) => {
                // A datagram was lost (socket buffer): keep the window full.
                socket
                    .send_to(&payload, server)
                    .await
                    .map_err(|e| e.to_string())?;
                resent += 1;
            }
        }
    }
    Ok((resent, started.elapsed()))
}

fn run(args: &Args, window: usize, hand_over: bool) -> Result<Run, String> {
    let config = Config {
        listen: vec!["udp:127.0.0.1:0"
            .parse::<ListenAddr>()
            .map_err(|e| e.to_string())?],
        workers: 2,
        ..Config::default()
    };
    let server =
        Server::start(&config, Arc::new(Factory { hand_over })).map_err(|e| e.to_string())?;
    let addr = server
        .local_addr(TransportKind::Udp)
        .ok_or("no UDP address")?;
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (cpu_before, switches_before) = loop_threads_usage();
    let driven = client.block_on(drive(addr, args, window));
    let (cpu_after, switches_after) = loop_threads_usage();
    server.shutdown();
    let (resent, wall) = driven?;
    let messages = args.messages as f64;
    Ok(Run {
        cpu_ns_per_message: (cpu_after - cpu_before) as f64 / messages,
        switches_per_message: (switches_after - switches_before) as f64 / messages,
        resent,
        wall,
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("hand_over_cost: {error}");
            return ExitCode::from(2);
        }
    };
    println!(
        "{:>6} {:>9} {:>9} {:>10} {:>14} {:>16} {:>7}",
        "window", "mode", "messages", "wall s", "loop CPU us/msg", "vol. switches/msg", "resent"
    );
    let mut summary = Vec::new();
    for &window in &args.windows {
        let (mut direct, mut handed) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            for hand_over in [false, true] {
                let result = match run(&args, window, hand_over) {
                    Ok(result) => result,
                    Err(error) => {
                        eprintln!("hand_over_cost: window {window}: {error}");
                        return ExitCode::FAILURE;
                    }
                };
                println!(
                    "{:>6} {:>9} {:>9} {:>10.2} {:>14.2} {:>16.3} {:>7}",
                    window,
                    if hand_over { "hand-over" } else { "direct" },
                    args.messages,
                    result.wall.as_secs_f64(),
                    result.cpu_ns_per_message / 1000.0,
                    result.switches_per_message,
                    result.resent
                );
                let list = if hand_over { &mut handed } else { &mut direct };
                list.push(result.cpu_ns_per_message / 1000.0);
            }
        }
        let spread = |v: &[f64]| {
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(0.0, f64::max);
            format!("{min:.2}-{max:.2}")
        };
        let (d_spread, h_spread) = (spread(&direct), spread(&handed));
        let (d, h) = (median(&mut direct), median(&mut handed));
        summary.push(format!(
            "window {window:>3}: direct {d:.2} us/msg ({d_spread}), hand-over {h:.2} us/msg ({h_spread}): the hand-over adds {:.2} us per message (medians)",
            h - d
        ));
    }
    println!();
    for line in summary {
        println!("{line}");
    }
    ExitCode::SUCCESS
}
