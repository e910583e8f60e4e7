#![allow(dead_code)] // shared by the test binaries; each uses a part
//! The `moonroute::refused` lines of this test process, captured as JSON objects (event fields
//! at the top level, as `--log-format json` writes them), so a test can wait for the one line
//! a refusal must produce. Servers run in-process on threads of their own, so the capture is
//! the process-wide tracing subscriber: installed by the first [`subscribe`] of the test
//! binary, it must be the only one there. Tests in one binary run in parallel: each picks the
//! lines of its own client addresses.

use std::io;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast;
use tracing_subscriber::fmt::MakeWriter;

/// Lines kept for a subscriber that has not read them yet.
const BACKLOG: usize = 4096;

static LINES: OnceLock<broadcast::Sender<Value>> = OnceLock::new();

/// The refused lines logged from now on.
pub struct RefusedLines(broadcast::Receiver<Value>);

/// Starts capturing (once per process) and returns the lines logged from now on.
pub fn subscribe() -> RefusedLines {
    let sender = LINES.get_or_init(|| {
        let (sender, _) = broadcast::channel(BACKLOG);
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            // The relay's line about a peer's mistake it worked around (once per peer).
            .with_env_filter("moonroute::refused=info,moonroute::proxy::relay=warn")
            .with_writer(Capture(sender.clone()))
            .try_init()
            .expect("the refused-line capture is this binary's only tracing subscriber");
        sender
    });
    RefusedLines(sender.subscribe())
}

impl RefusedLines {
    /// The next line from `ip` (its `source` field) whose `reason` contains `reason`; panics
    /// after `within`.
    pub async fn expect(&mut self, ip: &str, reason: &str, within: Duration) -> Value {
        let wanted = |line: &Value| {
            let source = line["source"].as_str().unwrap_or_default();
            let said = line["reason"].as_str().unwrap_or_default();
            source.starts_with(&format!("{ip}:")) && said.contains(reason)
        };
        let found = tokio::time::timeout(within, async {
            loop {
                match self.0.recv().await {
                    Ok(line) if wanted(&line) => return line,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => panic!("capture closed"),
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no refused line from {ip} with {reason:?} in {within:?}"))
    }

    /// How many of the lines logged so far came from `source` (exactly) with a `reason`
    /// containing `reason`; they are consumed. For lines logged before an event the test has
    /// seen (the server logs before it sends): nothing is waited for.
    pub fn count_logged(&mut self, source: std::net::SocketAddr, reason: &str) -> usize {
        let source = source.to_string();
        let mut count = 0;
        loop {
            match self.0.try_recv() {
                Ok(line) => {
                    let from = line["source"].as_str().unwrap_or_default();
                    let said = line["reason"].as_str().unwrap_or_default();
                    count += usize::from(from == source && said.contains(reason));
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => return count,
            }
        }
    }
}

/// Sends each formatted event, parsed, to the subscribers.
struct Capture(broadcast::Sender<Value>);

/// One event's bytes; sent when the formatter is done with it.
struct EventWriter {
    line: Vec<u8>,
    sender: broadcast::Sender<Value>,
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            line: Vec::new(),
            sender: self.0.clone(),
        }
    }
}

impl io::Write for EventWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if let Ok(line) = serde_json::from_slice(&self.line) {
            // No subscriber now: nobody waits for this line.
            let _ = self.sender.send(line);
        }
    }
}
