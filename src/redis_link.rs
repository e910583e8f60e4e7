//! A link to a Redis (or Valkey) server shared by several moonroute nodes: what the location
//! store ([`crate::location::RedisLocation`]) and `sip.kv` ([`crate::script::kv`]) use when
//! they are configured on Redis (`[location] backend = "redis"`, `[kv] backend = "redis"`).
//!
//! The client is the `redis` crate's [`ConnectionManager`]: one multiplexed connection (every
//! event loop's commands are pipelined on it), reconnected with exponential backoff by the
//! crate. It runs on a runtime of its own, on one thread (`moonroute-redis`): the stores'
//! interfaces are synchronous (they are called from the event loops' sans-IO code), so a
//! caller hands a command to that runtime and waits for the answer, at most [`REPLY_TIMEOUT`];
//! a caller that can park what depends on the answer uses [`RedisLink::script_then`] and does
//! not wait (a REGISTER's write).
//!
//! # When Redis is unreachable
//!
//! A command that fails (refused connection, timeout, a connection lost mid-way) marks the link
//! down: one `warn` log line (`redis unreachable`), the metric
//! `moonroute_<user>_redis_errors_total` (user: `location`, `kv`) counts every failure. While down, commands fail at once
//! without waiting (callers answer 503: a node must not stall its event loops on a dead
//! server), except one probe per backoff interval (100 ms doubling to 5 s) that tries the
//! server again; the first probe that succeeds brings the link up (`redis reachable again`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisResult};
use tracing::{info, warn};

/// The default Redis server of `[location]` and `[kv]`.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379/0";

/// Longest wait for one command's answer (a reconnection included) before the caller gives up
/// and answers 503.
pub const REPLY_TIMEOUT: Duration = Duration::from_millis(1500);

/// Backoff between probes of a server found unreachable.
const PROBE_MIN: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_secs(5);

/// Why a command failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkError {
    /// The server could not be reached, or did not answer in time: the link is down.
    Unreachable(String),
    /// The server answered with an error (a wrong type, a script error): the link is up.
    Refused(String),
}

impl LinkError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, LinkError::Unreachable(_))
    }
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Unreachable(e) => write!(f, "Redis unreachable: {e}"),
            LinkError::Refused(e) => write!(f, "Redis refused: {e}"),
        }
    }
}

/// An error of the client: a failure to reach the server, or the server's own error reply.
fn classify(error: &redis::RedisError) -> LinkError {
    if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
    {
        LinkError::Unreachable(error.to_string())
    } else {
        LinkError::Refused(error.to_string())
    }
}

/// A boxed command future run on the link's runtime.
type Job<T> = Pin<Box<dyn Future<Output = RedisResult<T>> + Send>>;

/// The state of the backoff while the server is down.
struct Down {
    /// When the next probe may go.
    next_probe: Instant,
    /// The current interval between probes.
    interval: Duration,
}

/// A connection to one Redis server, shared by every event loop of a node.
pub struct RedisLink {
    url: String,
    manager: ConnectionManager,
    runtime: tokio::runtime::Handle,
    /// Dropped to stop the runtime thread.
    _stop: tokio::sync::oneshot::Sender<()>,
    up: AtomicBool,
    down: Mutex<Option<Down>>,
    errors: AtomicU64,
    commands: AtomicU64,
    /// Times the link came back after being down.
    reconnects: AtomicU64,
    /// The last failure, and when.
    last_error: Mutex<Option<(Instant, String)>>,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink")
            .field("url", &self.url_for_logs())
            .field("up", &self.is_up())
            .finish()
    }
}

impl RedisLink {
    /// A link to `url` (`redis://host:port/db`, `redis://:password@host/db`,
    /// `unix:///path`). Connects lazily; the first command tells whether the server is there
    /// (see [`RedisLink::ping`]). Fails only for a URL that cannot be a Redis URL or when the
    /// runtime thread cannot start.
    pub fn open(url: &str) -> Result<Arc<RedisLink>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis URL {url:?}: {e}"))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("moonroute-redis".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("redis runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(Duration::from_millis(500)))
                        .set_response_timeout(Some(Duration::from_secs(1)))
                        .set_number_of_retries(2)
                        .set_min_delay(Duration::from_millis(50))
                        .set_max_delay(Duration::from_millis(400));
                    let made = ConnectionManager::new_lazy_with_config(client, config)
                        .map(|manager| (manager, tokio::runtime::Handle::current()))
                        .map_err(|e| format!("redis client: {e}"));
                    let _ = ready_tx.send(made);
                    // Serve the commands handed to this runtime until the link is dropped.
                    let _ = stop_rx.await;
                });
            })
            .map_err(|e| format!("cannot start the redis thread: {e}"))?;
        let (manager, runtime) = ready_rx
            .recv()
            .map_err(|_| "the redis thread stopped".to_owned())??;
        Ok(Arc::new(RedisLink {
            url: url.to_owned(),
            manager,
            runtime,
            _stop: stop_tx,
            up: AtomicBool::new(true),
            down: Mutex::new(None),
            errors: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }))
    }

    /// The URL without its password, for logs and status output.
    pub fn url_for_logs(&self) -> String {
        match (self.url.find("://"), self.url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://***{}", &self.url[..scheme], &self.url[at..])
            }
            _ => self.url.clone(),
        }
    }

    /// Whether the last command got its answer.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Commands that failed since the link opened (`moonroute_<user>_redis_errors_total`).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Commands sent since the link opened.
    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }

    /// Times the server came back after being unreachable.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// The link's health for `ctl status`: `redis URL connected, 1200 commands, 3 failed,
    /// 1 reconnect, last error 42 s ago: ...`.
    pub fn health(&self) -> String {
        let state = if self.is_up() {
            "connected"
        } else {
            "UNREACHABLE"
        };
        let reconnects = self.reconnects();
        let mut text = format!(
            "redis {} {state}, {} commands, {} failed, {reconnects} reconnect{}",
            self.url_for_logs(),
            self.commands(),
            self.errors(),
            if reconnects == 1 { "" } else { "s" },
        );
        if let Some((at, error)) = &*self.last_error.lock().unwrap_or_else(|p| p.into_inner()) {
            text.push_str(&format!(
                ", last error {} s ago: {error}",
                at.elapsed().as_secs()
            ));
        }
        text
    }

    /// Registers the link's metrics for its user `what` (`location`, `kv`):
    /// `moonroute_<what>_redis_up` and `moonroute_<what>_redis_errors_total`.
    pub fn register_metrics(self: &Arc<Self>, registry: &crate::metrics::Registry, what: &str) {
        let link = Arc::downgrade(self);
        registry.gauge_fn(
            &format!("moonroute_{what}_redis_up"),
            "1 while the Redis server answers, 0 while it is unreachable",
            move || {
                link.upgrade()
                    .map_or(0.0, |l| f64::from(u8::from(l.is_up())))
            },
        );
        let link = Arc::downgrade(self);
        let name = format!("moonroute_{what}_redis_errors_total");
        let sample = name.clone();
        registry.collect(
            &name,
            "Redis commands that failed because the server was unreachable or too slow",
            crate::metrics::Kind::Counter,
            Box::new(move |out| {
                let errors = link.upgrade().map_or(0, |l| l.errors());
                out.sample(&sample, &[], errors as f64);
            }),
        );
    }

    /// Checks that the server answers (a `PING`), waiting at most `timeout`.
    pub fn ping(&self, timeout: Duration) -> Result<(), LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.query::<String>(redis::cmd("PING")) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
            self.allow_probe_now();
        }
    }

    /// Runs one command and returns its answer.
    pub fn query<T: FromRedisValue + Send + 'static>(
        &self,
        cmd: redis::Cmd,
    ) -> Result<T, LinkError> {
        self.run(move |mut manager| Box::pin(async move { cmd.query_async(&mut manager).await }))
    }

    /// Runs a pipeline (atomic when built with `.atomic()`: MULTI/EXEC) and returns its answers.
    pub fn pipeline<T: FromRedisValue + Send + 'static>(
        &self,
        pipe: redis::Pipeline,
    ) -> Result<T, LinkError> {
        self.run(move |mut manager| Box::pin(async move { pipe.query_async(&mut manager).await }))
    }

    /// Runs a server-side Lua script (EVALSHA, loaded on first use) with `keys` and `args`.
    pub fn script<T: FromRedisValue + Send + 'static>(
        &self,
        script: &redis::Script,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Result<T, LinkError> {
        let script = script.clone();
        let keys: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        let args: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
        self.run(move |mut manager| {
            Box::pin(async move {
                let mut invocation = script.prepare_invoke();
                for key in &keys {
                    invocation.key(key.as_slice());
                }
                for arg in &args {
                    invocation.arg(arg.as_slice());
                }
                invocation.invoke_async(&mut manager).await
            })
        })
    }

    /// [`RedisLink::script`] without waiting: `done` gets the answer on the link's thread
    /// (at once, on the caller's thread, while the server is down and no probe is due). For a
    /// caller that parks what depends on the answer instead of blocking its event loop.
    pub fn script_then<T: FromRedisValue + Send + 'static>(
        self: &Arc<Self>,
        script: &redis::Script,
        keys: Vec<Vec<u8>>,
        args: Vec<Vec<u8>>,
        done: impl FnOnce(Result<T, LinkError>) + Send + 'static,
    ) {
        if !self.may_send() {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return done(Err(LinkError::Unreachable(
                "down, waiting to retry".to_owned(),
            )));
        }
        self.commands.fetch_add(1, Ordering::Relaxed);
        let script = script.clone();
        let mut manager = self.manager.clone();
        let link = Arc::clone(self);
        self.runtime.spawn(async move {
            let mut invocation = script.prepare_invoke();
            for key in &keys {
                invocation.key(key.as_slice());
            }
            for arg in &args {
                invocation.arg(arg.as_slice());
            }
            let answer = tokio::time::timeout(REPLY_TIMEOUT, invocation.invoke_async(&mut manager))
                .await
                .unwrap_or_else(|_| {
                    Err(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {} ms", REPLY_TIMEOUT.as_millis()),
                    )))
                })
                .map_err(|error| classify(&error));
            match &answer {
                Ok(_) | Err(LinkError::Refused(_)) => link.mark_up(),
                Err(LinkError::Unreachable(error)) => link.mark_down(error),
            }
            done(answer);
        });
    }

    /// Hands `job` to the link's runtime and waits for its answer; fails at once while the
    /// server is down and no probe is due.
    fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(ConnectionManager) -> Job<T>,
    ) -> Result<T, LinkError> {
        if !self.may_send() {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return Err(LinkError::Unreachable("down, waiting to retry".to_owned()));
        }
        self.commands.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let future = job(self.manager.clone());
        self.runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        let answer = match rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(classify(&error)),
            Err(_) => Err(LinkError::Unreachable(format!(
                "no answer within {} ms",
                REPLY_TIMEOUT.as_millis()
            ))),
        };
        match &answer {
            Ok(_) | Err(LinkError::Refused(_)) => self.mark_up(),
            Err(LinkError::Unreachable(error)) => self.mark_down(error),
        }
        answer
    }

    /// True when up, or when down and a probe is due (which then takes the probe).
    fn may_send(&self) -> bool {
        if self.is_up() {
            return true;
        }
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        match down.as_mut() {
            None => true,
            Some(state) => {
                let now = Instant::now();
                if now < state.next_probe {
                    return false;
                }
                state.next_probe = now + state.interval;
                state.interval = (state.interval * 2).min(PROBE_MAX);
                true
            }
        }
    }

    /// Lets the next command probe at once (for [`RedisLink::ping`]'s start-up wait).
    fn allow_probe_now(&self) {
        if let Some(state) = self.down.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            state.next_probe = Instant::now();
        }
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            *self.down.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            info!(url = %self.url_for_logs(), "redis reachable again");
        }
    }

    fn mark_down(&self, error: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), error.to_owned()));
        if self.up.swap(false, Ordering::AcqRel) {
            *self.down.lock().unwrap_or_else(|p| p.into_inner()) = Some(Down {
                next_probe: Instant::now() + PROBE_MIN,
                interval: PROBE_MIN * 2,
            });
            warn!(url = %self.url_for_logs(), %error, "redis unreachable: registrations and lookups answer 503 until it is back");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_never_show_the_password() {
        let link = RedisLink::open("redis://:s3cret@127.0.0.1:1/0").unwrap();
        assert_eq!(link.url_for_logs(), "redis://***@127.0.0.1:1/0");
        let link = RedisLink::open("redis://127.0.0.1:1/2").unwrap();
        assert_eq!(link.url_for_logs(), "redis://127.0.0.1:1/2");
    }

    #[test]
    fn an_unreachable_server_fails_fast_after_the_first_failure() {
        // Port 1 on loopback: refused at once.
        let link = RedisLink::open("redis://127.0.0.1:1/0").unwrap();
        assert!(link.query::<String>(redis::cmd("PING")).is_err());
        assert!(!link.is_up());
        let started = Instant::now();
        let error = link.query::<String>(redis::cmd("PING")).unwrap_err();
        assert!(error.is_unreachable(), "{error}");
        assert!(started.elapsed() < Duration::from_millis(50), "{error}");
        assert!(link.errors() >= 2);
    }
}
