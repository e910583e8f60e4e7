//! Measuring how busy an event loop is, for its Worker's overload control.
//!
//! Owns the counters behind [`LoadSample`]. The loop's runtime calls [`on_park`] when it runs
//! out of work (every task waiting: its UDP sockets, its hand-over queue, its TCP
//! connections and timers all drained) and [`on_unpark`] when it wakes (tokio's
//! `on_thread_park` / `on_thread_unpark` hooks): the time between is exactly the time the loop
//! had work, whatever the work was, at the cost of one clock read per wake-up and none per
//! message. Time the thread was runnable but another thread held the CPU counts as busy: it is
//! time the loop could not serve its queues. Linux tells that time apart
//! (`/proc/thread-self/schedstat`), which the overload log line reports.
//!
//! What waits in the kernel for the loop is measured too: the bytes queued on its UDP
//! sockets (`/proc/net/udp`, the `rx_queue` of each socket, found by inode), read once per
//! sample: whether that backlog grows or shrinks tells a loop falling behind from one
//! catching up.
//!
//! The counters live in the loop thread's thread-local storage; [`sample`] reads them from a
//! task of the same loop.

use std::cell::Cell;
use std::time::{Duration, Instant};

use super::LoadSample;

/// How often a loop's counters are sampled for its Worker.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy)]
struct Meter {
    /// Busy time up to `woke`.
    busy: Duration,
    idles: u64,
    /// When the loop last woke, `None` while parked.
    woke: Option<Instant>,
}

thread_local! {
    static METER: Cell<Meter> = const {
        Cell::new(Meter { busy: Duration::ZERO, idles: 0, woke: None })
    };
}

/// The loop goes idle: every queue drained.
pub(crate) fn on_park() {
    let now = Instant::now();
    METER.with(|meter| {
        let mut m = meter.get();
        if let Some(woke) = m.woke.take() {
            m.busy += now.saturating_duration_since(woke);
        }
        m.idles += 1;
        meter.set(m);
    });
}

/// The loop wakes with work to do (also called once when the loop starts).
pub(crate) fn on_unpark() {
    let now = Instant::now();
    METER.with(|meter| {
        let mut m = meter.get();
        m.woke = Some(now);
        meter.set(m);
    });
}

/// This thread's counters at `now`, and the bytes queued on the UDP sockets `udp`.
pub(crate) fn sample(now: Instant, udp: &[UdpSocketId]) -> LoadSample {
    let m = METER.with(Cell::get);
    let busy = m.busy
        + m.woke
            .map_or(Duration::ZERO, |w| now.saturating_duration_since(w));
    let mut sample = LoadSample::new(now, busy, m.idles);
    if let Some((cpu, cpu_wait)) = schedstat() {
        sample.cpu = Some(cpu);
        sample.cpu_wait = Some(cpu_wait);
    }
    sample.queued = udp_queued(udp);
    sample
}

/// A UDP socket as `/proc/net/udp` lists it: its inode, and whether it is IPv6 (`udp6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UdpSocketId {
    pub(crate) inode: u64,
    pub(crate) ipv6: bool,
}

impl UdpSocketId {
    /// `None` where the system does not tell (no `/proc`).
    pub(crate) fn of(socket: &impl std::os::fd::AsRawFd, ipv6: bool) -> Option<UdpSocketId> {
        use std::os::unix::fs::MetadataExt;
        let fd = socket.as_raw_fd();
        let inode = std::fs::metadata(format!("/proc/self/fd/{fd}")).ok()?.ino();
        Some(UdpSocketId { inode, ipv6 })
    }
}

/// Bytes waiting in the receive queues of `sockets` (kernel accounting, overhead included);
/// `None` when unknown.
fn udp_queued(sockets: &[UdpSocketId]) -> Option<u64> {
    if sockets.is_empty() {
        return None;
    }
    let mut total = 0;
    for (ipv6, table) in [(false, "/proc/net/udp"), (true, "/proc/net/udp6")] {
        let inodes: Vec<u64> = sockets
            .iter()
            .filter(|s| s.ipv6 == ipv6)
            .map(|s| s.inode)
            .collect();
        if inodes.is_empty() {
            continue;
        }
        let text = std::fs::read_to_string(table).ok()?;
        total += rx_queues(&text, &inodes)?;
    }
    Some(total)
}

/// The sum of the `rx_queue` of the sockets with `inodes` in a `/proc/net/udp` table; `None`
/// unless all of them are listed.
fn rx_queues(table: &str, inodes: &[u64]) -> Option<u64> {
    let mut found = 0;
    let mut total = 0;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        let (Some(queues), Some(inode)) = (fields.get(4), fields.get(9)) else {
            continue;
        };
        if !inode
            .parse()
            .is_ok_and(|inode: u64| inodes.contains(&inode))
        {
            continue;
        }
        let rx = queues.split_once(':')?.1;
        total += u64::from_str_radix(rx, 16).ok()?;
        found += 1;
    }
    (found == inodes.len()).then_some(total)
}

/// This thread's time on a CPU and time runnable waiting for one (Linux; `None` elsewhere or
/// without CONFIG_SCHED_INFO).
fn schedstat() -> Option<(Duration, Duration)> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    parse_schedstat(&text)
}

fn parse_schedstat(text: &str) -> Option<(Duration, Duration)> {
    let mut fields = text.split_ascii_whitespace().map(str::parse::<u64>);
    let run = fields.next()?.ok()?;
    let wait = fields.next()?.ok()?;
    Some((Duration::from_nanos(run), Duration::from_nanos(wait)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_runs_from_wake_up_to_park() {
        // A fresh thread: its own counters.
        std::thread::spawn(|| {
            let start = Instant::now();
            on_unpark();
            let before_park = sample(Instant::now(), &[]);
            assert_eq!(before_park.idles, 0);
            on_park();
            let parked = sample(start + Duration::from_secs(3600), &[]);
            assert_eq!(parked.idles, 1);
            assert!(
                parked.busy < Duration::from_secs(60),
                "no time counted while parked"
            );
            assert!(parked.busy >= before_park.busy);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn udp_queues_are_read_by_inode() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
            \x20 12: 0100007F:3B16 00000000:0000 07 00000000:00000A00 00:00000000 00000000     0        0 4242 2 0000000000000000 0\n\
            \x20 13: 0100007F:3B17 00000000:0000 07 00000000:00000100 00:00000000 00000000     0        0 4243 2 0000000000000000 0\n";
        assert_eq!(rx_queues(table, &[4242]), Some(0xA00));
        assert_eq!(rx_queues(table, &[4242, 4243]), Some(0xB00));
        assert_eq!(rx_queues(table, &[4244]), None);
        // This process's own socket, through the real table.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        if let Some(id) = UdpSocketId::of(&socket, false) {
            let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            sender
                .send_to(b"queued", socket.local_addr().unwrap())
                .unwrap();
            let queued = udp_queued(&[id]).expect("listed in /proc/net/udp");
            assert!(queued > 0, "{queued}");
        }
    }

    #[test]
    fn schedstat_lines_are_parsed() {
        assert_eq!(
            parse_schedstat("123456 789 10\n"),
            Some((Duration::from_nanos(123_456), Duration::from_nanos(789)))
        );
        assert_eq!(parse_schedstat("garbage"), None);
        assert_eq!(parse_schedstat(""), None);
    }
}
