#![allow(dead_code)] // not every test binary starts Redis

//! A real `redis-server` for the tests of the shared (several nodes) stores: on 127.0.0.1 at a
//! port the test chooses, its data in a temporary directory, append-only file on with
//! `appendfsync always` (every acknowledged write survives a SIGKILL of Redis itself).
//! Tests skip, with a message saying how to install it, when the binary is missing
//! (`.ci/run` installs it with apt-get).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

/// How long Redis may take to start (loading its append-only file included).
const START_LIMIT: Duration = Duration::from_secs(20);

/// A running `redis-server`; dropped, it is killed.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

/// The `redis-server` binary, or `None` (with a message) when it is not installed.
pub fn binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        eprintln!(
            "SKIPPED: redis-server is not installed (apt-get install redis-server; .ci/run does)"
        );
    }
    found
}

impl RedisServer {
    /// Starts `redis-server` on 127.0.0.1:`port`; `None` when it is not installed.
    pub fn start(port: u16) -> Option<RedisServer> {
        binary()?;
        let mut server = RedisServer {
            child: None,
            port,
            dir: TempDir::new().expect("a directory for Redis"),
        };
        server.restart();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory (its append-only file is read
    /// back) and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.kill();
        let mut child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args([
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let stdout = child.stdout.take().expect("redis-server's output");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("Ready to accept connections") {
                    let _ = ready_tx.send(Ok(()));
                    // Keep draining so Redis never blocks on a full pipe.
                    continue;
                }
                lines.push(line);
            }
            let _ = ready_tx.send(Err(lines.join("\n")));
        });
        match ready_rx.recv_timeout(START_LIMIT) {
            Ok(Ok(())) => {}
            Ok(Err(log)) => panic!("redis-server on port {} did not start:\n{log}", self.port),
            Err(_) => panic!("redis-server on port {} not ready in time", self.port),
        }
        self.child = Some(child);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
