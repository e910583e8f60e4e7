//! Server configuration: a TOML file with documented defaults, overridable from the command
//! line.
//!
//! Owns the shape, defaults and validation of the configuration. Every key is optional; an
//! unknown key is an error, so a typo cannot silently leave a default in force. See
//! `moonroute.example.toml` at the repository root for every key with its default.
//!
//! A section read by one module only is that module's type, re-exported here under the
//! section's name (`[dns]` is `crate::dns::DnsConfig`, `[tls]`, `[websocket]`, `[dispatcher]`,
//! `[location]` likewise); the other sections are converted here into the types their modules
//! own (`[limits]` into `crate::transport::TransportLimits`, `[registrar]` into
//! `crate::registrar::Rules`...). So this module imports the others and none imports it: the
//! server (`crate::server::Wiring`, `main.rs`) reads the configuration and hands each part its
//! settings.
//!
//! Defaults follow RFC 3261 where it has an opinion: port 5060 for UDP and TCP (§18.1.1,
//! §19.1.2), and a maximum message size above the 65,535-byte UDP limit is pointless for
//! datagrams but may be raised for streams (§18.3).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::dispatcher::DispatcherConfig as Dispatcher;
pub use crate::dns::DnsConfig as Dns;
use crate::file_modes::SecretFiles;
pub use crate::location::{LocationBackend, LocationConfig as Location};
pub use crate::redis_link::DEFAULT_URL as DEFAULT_REDIS_URL;
pub use crate::transport::tls::TlsConfig as Tls;
pub use crate::transport::ws::WsConfig as WebSocket;
use crate::transport::{Advertise, ListenAddr, TransportKind, TransportLimits};

/// The whole configuration. Field docs give the defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Addresses to listen on, each with what it advertises when that is not its own
    /// (`udp:0.0.0.0:5060,advertise=sip.example.com`). Default: `udp:127.0.0.1:5060` and
    /// `tcp:127.0.0.1:5060`.
    pub listen: Vec<ListenAddr>,
    /// `HOST[:PORT]` advertised by every listener without an `advertise=` of its own
    /// (Kamailio's `advertised_address` / `advertised_port`); without a port each listener
    /// advertises its own. Default: none.
    pub advertise: Option<Advertise>,
    /// Domains this server is responsible for; an IP literal (IPv6 with or without brackets)
    /// names that address on any port. Default: empty, meaning the server treats its own listen
    /// addresses as its local domains.
    pub domains: Vec<String>,
    /// The Lua routing script. Default: `scripts/default.lua`.
    pub script: PathBuf,
    /// Where the server keeps its data (registrations, subscribers, the server key
    /// `secret`: `crate::secret`). Default: `var`.
    pub data_dir: PathBuf,
    /// Log filter: a level (`error`, `warn`, `info`, `debug`, `trace`) or tracing directives
    /// such as `moonroute::transport=debug,info`. `RUST_LOG` wins if set. Default: `info`.
    pub log_level: String,
    /// Log line format: `human` (default; coloured at a terminal) or `json` (one object per
    /// line, for log shippers).
    pub log_format: LogFormat,
    /// Event loops (each one OS thread). 0 means one per CPU core. Default: 0.
    pub workers: usize,
    /// Resource limits.
    pub limits: Limits,
    /// Transaction and proxy timers.
    pub timers: Timers,
    /// The built-in router (labs and benchmarks): when it relays, it replaces the script.
    pub proxy: Proxy,
    /// Limits and reloading of the Lua routing script.
    pub lua: Lua,
    /// The local control socket (`moonroute ctl`).
    pub control: Control,
    /// The Prometheus metrics endpoint.
    pub metrics: Metrics,
    /// Registrar rules (RFC 3261 §10.3).
    pub registrar: Registrar,
    /// The location database (registrations).
    pub location: Location,
    /// The `sip.kv` store.
    pub kv: Kv,
    /// TLS: the server's certificate, and how peers' certificates are verified.
    pub tls: Tls,
    /// SIP over WebSocket listeners (`ws:`, `wss:`; RFC 7118).
    pub websocket: WebSocket,
    /// DNS resolution of next hops (RFC 3263).
    pub dns: Dns,
    /// NAT traversal: RFC 3581 `rport` and keep-alives of NATed registrations.
    pub nat: Nat,
    /// Digest authentication (RFC 3261 §22): nonces and algorithms.
    pub auth: Auth,
    /// The per-source rate limiter behind `sip.pike_check` (flood protection).
    pub pike: Pike,
    /// Dialog tracking (`req:dlg_manage()`), call limits and CDRs: `crate::dialog`.
    pub dialog: Dialog,
    /// Destination sets for load balancing and failover (`sip.ds`), and their probing.
    pub dispatcher: Dispatcher,
}

/// Dialog tracking and accounting (`crate::dialog`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Dialog {
    /// Most dialogs tracked per event loop; `req:dlg_manage()` returns false past it.
    /// Default: 100000.
    pub max_dialogs: usize,
    /// Most memory the dialogs of one event loop may hold, in MiB (about 2 KiB per call with
    /// a few variables). Default: 256.
    pub memory_mb: usize,
    /// A dialog still up this many seconds after it began is forgotten (its BYE was lost),
    /// without BYEs (Kamailio's `default_timeout`). Default: 43200 (12 h).
    pub lifetime_secs: u64,
    /// A tracked call is ended with a BYE to both parties this many seconds after its
    /// answer, unless the script sets its own (`req:dlg_set_timeout`). 0: no limit (the
    /// default).
    pub max_duration_secs: u64,
    /// Write a CDR per ended dialog to `<data_dir>/cdr.jsonl`. Default: true.
    pub cdr: bool,
    /// Also a CDR per failed call attempt (CANCEL, 4xx-6xx, no answer). Default: true.
    pub cdr_failed_attempts: bool,
    /// The CDR file is rotated past this many MiB. Default: 100.
    pub cdr_max_mb: u64,
    /// Rotated CDR files kept (`cdr.jsonl.1` ... `.N`). Default: 10.
    pub cdr_keep: usize,
}

impl Default for Dialog {
    fn default() -> Self {
        Dialog {
            max_dialogs: 100_000,
            memory_mb: 256,
            lifetime_secs: 43_200,
            max_duration_secs: 0,
            cdr: true,
            cdr_failed_attempts: true,
            cdr_max_mb: 100,
            cdr_keep: 10,
        }
    }
}

impl Dialog {
    fn validate(&self) -> Result<(), String> {
        if self.max_dialogs == 0 || self.memory_mb == 0 || self.lifetime_secs == 0 {
            return Err(
                "dialog: max_dialogs, memory_mb and lifetime_secs must be at least 1".to_owned(),
            );
        }
        if self.cdr_max_mb == 0 {
            return Err("dialog: cdr_max_mb must be at least 1".to_owned());
        }
        Ok(())
    }

    /// The dialog table's limits.
    pub fn limits(&self) -> crate::dialog::Limits {
        use std::time::Duration;
        crate::dialog::Limits {
            max_dialogs: self.max_dialogs,
            memory_budget: self.memory_mb.saturating_mul(1 << 20),
            lifetime: Duration::from_secs(self.lifetime_secs),
            default_max_duration: (self.max_duration_secs > 0)
                .then(|| Duration::from_secs(self.max_duration_secs)),
            ..crate::dialog::Limits::default()
        }
    }

    /// Where CDRs go (`<data_dir>/cdr.jsonl`); `None` when `cdr = false`.
    pub fn cdr_settings(&self, data_dir: &std::path::Path) -> Option<crate::dialog::CdrSettings> {
        self.cdr.then(|| crate::dialog::CdrSettings {
            dir: data_dir.to_path_buf(),
            max_size: self.cdr_max_mb.saturating_mul(1 << 20),
            keep: self.cdr_keep,
            failed_attempts: self.cdr_failed_attempts,
        })
    }
}

impl Dispatcher {
    fn validate(&self) -> Result<(), String> {
        if self.down_after == 0 || self.up_after == 0 {
            return Err("dispatcher: down_after and up_after must be at least 1".to_owned());
        }
        if self.probe_interval_secs > 86_400 || self.probe_interval_ms > 86_400_000 {
            return Err("dispatcher: the probe interval is at most one day".to_owned());
        }
        if let Some(interval) = self.probe_interval() {
            let timeout = std::time::Duration::from_millis(self.probe_timeout_ms);
            if timeout.is_zero() || timeout > interval {
                return Err(
                    "dispatcher.probe_timeout_ms: must be 1 ms up to the probe interval".to_owned(),
                );
            }
        }
        let method = self.probe_method.as_bytes();
        if method.is_empty() || !method.iter().all(u8::is_ascii_uppercase) {
            return Err(format!(
                "dispatcher.probe_method: {:?} is not a method name (OPTIONS, INFO...)",
                self.probe_method
            ));
        }
        if matches!(
            self.probe_method.as_str(),
            "INVITE" | "ACK" | "CANCEL" | "REGISTER"
        ) {
            return Err(format!(
                "dispatcher.probe_method: {} would start a call, a dialog or a registration",
                self.probe_method
            ));
        }
        self.rules()?;
        crate::dispatcher::set::validate(&self.set)
    }
}

/// NAT traversal (RFC 3581; keep-alives as in RFC 5626 §4.4.1). See `moonroute-proto/src/nat/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Nat {
    /// Act on every UDP request as if its top Via had `rport` (RFC 3581 §4; Kamailio's
    /// `force_rport()`): unless the Via already names the source address and port,
    /// `received` and `rport=<source port>` are recorded, and responses go to the packet's
    /// source address and port even when the client did not ask. Phones behind a NAT rarely
    /// listen where their Via says. (Over TCP/TLS responses use the connection anyway.)
    /// Default: true.
    pub force_rport: bool,
    /// Seconds between keep-alives to each binding registered through a NAT (OPTIONS over
    /// UDP, CRLFCRLF on a TCP/TLS connection); 0 turns keep-alives off. Default: 30.
    pub keepalive_interval_secs: u64,
    /// The interval in milliseconds instead, when not 0 (tests and labs). Default: 0.
    pub keepalive_interval_ms: u64,
    /// Consecutive unanswered keep-alives (or failed stream writes) after which a NATed
    /// binding is removed from the location store. Default: 3.
    pub keepalive_failures: u32,
    /// AORs read from the location store per keep-alive tick, whose NATed bindings are then
    /// probed: each interval's probes are spread over `ceil(bindings / batch)` ticks evenly
    /// spaced across the interval, so the event loop never reads (nor sends) more than one
    /// batch at a time (100k bindings, 30 s: 1000 ticks of 100 AORs, one every 30 ms).
    /// At least 1. Default: 100.
    pub keepalive_batch: usize,
}

impl Default for Nat {
    fn default() -> Self {
        Nat {
            force_rport: true,
            keepalive_interval_secs: 30,
            keepalive_interval_ms: 0,
            keepalive_failures: 3,
            keepalive_batch: 100,
        }
    }
}

/// The per-source request rate limiter scripts query with `sip.pike_check` /
/// `req:pike_check` (Kamailio's `pike`; [`crate::flood::pike`]). It only counts: what happens
/// to a flagged source is the script's decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pike {
    /// The sampling window, in milliseconds (Kamailio's `sampling_time_unit`). Default: 2000.
    pub window_ms: u64,
    /// Requests one source (an IPv4 address, an IPv6 /64) may send per window; one more flags
    /// it until a whole window passes within the limit (Kamailio's `reqs_density_per_unit`).
    /// Default: 200, far above Kamailio's 30: a desk phone with 60 BLF keys sends ~130
    /// SUBSCRIBEs (with their digest challenges) when it boots, and a small office's phones
    /// often share one public address; 100 requests/s sustained is still a flood.
    pub max_requests: u32,
    /// Sources tracked at once (40 bytes each, 50 to 100 with the hash table's spare room).
    /// When the table is full, idle sources make room; a new source that still finds no room
    /// is not rate-limited (logged). Default: 100000.
    pub max_tracked_ips: usize,
}

impl Default for Pike {
    fn default() -> Self {
        Pike {
            window_ms: 2000,
            max_requests: 200,
            max_tracked_ips: 100_000,
        }
    }
}

impl Nat {
    /// The keep-alive interval, `None` when keep-alives are off.
    pub fn keepalive_interval(&self) -> Option<std::time::Duration> {
        let interval = match self.keepalive_interval_ms {
            0 => std::time::Duration::from_secs(self.keepalive_interval_secs),
            ms => std::time::Duration::from_millis(ms),
        };
        (!interval.is_zero()).then_some(interval)
    }

    fn validate(&self) -> Result<(), String> {
        if self.keepalive_failures == 0 {
            return Err("nat.keepalive_failures: must be at least 1".to_owned());
        }
        if self.keepalive_batch == 0 {
            return Err("nat.keepalive_batch: must be at least 1".to_owned());
        }
        if self.keepalive_interval_secs > 86_400 || self.keepalive_interval_ms > 86_400_000 {
            return Err("nat: a keep-alive interval is at most one day".to_owned());
        }
        Ok(())
    }
}

/// The limiter's rules from `[pike]`.
impl From<&Pike> for crate::flood::pike::PikeRules {
    fn from(config: &Pike) -> Self {
        crate::flood::pike::PikeRules {
            window: std::time::Duration::from_millis(config.window_ms),
            max_requests: config.max_requests,
            max_tracked: config.max_tracked_ips,
        }
    }
}

impl Pike {
    fn validate(&self) -> Result<(), String> {
        if self.window_ms == 0 || self.max_requests == 0 || self.max_tracked_ips == 0 {
            return Err(
                "pike: window_ms, max_requests and max_tracked_ips must be at least 1".to_owned(),
            );
        }
        Ok(())
    }
}

impl WebSocket {
    fn validate(&self) -> Result<(), String> {
        if self.handshake_timeout_ms == 0 {
            return Err("websocket.handshake_timeout_ms: must be at least 1".to_owned());
        }
        if let Some(bad) = self
            .allowed_origins
            .iter()
            .find(|o| o.trim() != "*" && !o.contains("://"))
        {
            return Err(format!(
                "websocket.allowed_origins: {bad:?} is not an origin (scheme://host[:port]) or *"
            ));
        }
        Ok(())
    }
}

impl Tls {
    fn validate(&self) -> Result<(), String> {
        if self.handshake_timeout_ms == 0 {
            return Err("tls.handshake_timeout_ms: must be at least 1".to_owned());
        }
        if self.max_handshakes == 0 {
            return Err("tls.max_handshakes: must be at least 1".to_owned());
        }
        Ok(())
    }
}

impl Dns {
    fn validate(&self) -> Result<(), String> {
        if self.timeout_ms == 0 || self.cache_size == 0 {
            return Err("dns: timeout_ms and cache_size must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// Digest authentication (RFC 3261 §22, RFC 8760), by [`crate::auth::Authenticator`]. The
/// subscribers are in `<data_dir>/subscribers` (`moonroute ctl user add`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// The server key when set: digest nonces and Record-Route signatures (HMAC-SHA256) are
    /// signed with it. Empty: the key in `<data_dir>/secret`, created at the first start
    /// (`crate::secret`), so nonces and dialogs survive restarts either way. Servers sharing a
    /// key accept each other's nonces and route each other's dialogs. Default: empty.
    pub secret: String,
    /// How long a nonce is fresh, in seconds; after it credentials get a new challenge with
    /// `stale=true`. Default: 300.
    pub nonce_expires_secs: u64,
    /// Algorithms offered, preferred first: `"SHA-256"`, `"MD5"` (RFC 8760). One challenge
    /// header each. Default: `["SHA-256", "MD5"]`.
    pub algorithms: Vec<String>,
    /// Most nonces whose counts are tracked against replay; beyond it the oldest is forgotten
    /// (its next use is answered stale). Default: 100000.
    pub max_tracked_nonces: usize,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            secret: String::new(),
            nonce_expires_secs: 300,
            algorithms: vec!["SHA-256".to_owned(), "MD5".to_owned()],
            max_tracked_nonces: 100_000,
        }
    }
}

impl Auth {
    fn validate(&self) -> Result<(), String> {
        if !(1..=86_400).contains(&self.nonce_expires_secs) {
            return Err("auth.nonce_expires_secs: must be 1 to 86400".to_owned());
        }
        if self.max_tracked_nonces == 0 {
            return Err("auth.max_tracked_nonces: must be at least 1".to_owned());
        }
        self.algorithms().map(drop)
    }

    /// `algorithms` parsed, preferred first: the one parse [`Config::validate`] checks and
    /// [`Auth::settings`] uses.
    fn algorithms(&self) -> Result<Vec<crate::auth::Algorithm>, String> {
        if self.algorithms.is_empty() {
            return Err("auth.algorithms: at least one of \"SHA-256\", \"MD5\"".to_owned());
        }
        let mut parsed = Vec::with_capacity(self.algorithms.len());
        for name in &self.algorithms {
            let Some(algorithm) = crate::auth::Algorithm::parse(name) else {
                return Err(format!(
                    "auth.algorithms: {name:?} is not supported (\"SHA-256\" or \"MD5\")"
                ));
            };
            if parsed.contains(&algorithm) {
                return Err(format!("auth.algorithms: {name:?} is listed twice"));
            }
            parsed.push(algorithm);
        }
        Ok(parsed)
    }

    /// The authenticator's settings, nonces signed with `server_key` (`crate::secret`). An
    /// invalid `algorithms` (refused by [`Config::validate`]) offers the default ones.
    pub fn settings(&self, server_key: Vec<u8>) -> crate::auth::Settings {
        crate::auth::Settings {
            secret: server_key,
            nonce_lifetime: std::time::Duration::from_secs(self.nonce_expires_secs),
            algorithms: self.algorithms().unwrap_or_default(),
            max_tracked_nonces: self.max_tracked_nonces,
        }
    }
}

impl Location {
    fn validate(&self) -> Result<(), String> {
        if self.max_bindings == 0 || self.cache_mb == 0 {
            return Err("location: max_bindings and cache_mb must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// Where `sip.kv` keeps its entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvBackend {
    /// This node's memory: seen by every event loop of the node, not by other nodes.
    Memory,
    /// A Redis server (`redis_url`) shared by several nodes: counters and bans are common.
    Redis,
}

/// The `sip.kv` store (`[kv]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Kv {
    /// `"memory"` or `"redis"`. Default: `"memory"`.
    pub backend: KvBackend,
    /// The Redis server of `backend = "redis"` (`--kv-redis URL`).
    /// Default: `"redis://127.0.0.1:6379/0"`.
    pub redis_url: String,
}

impl Default for Kv {
    fn default() -> Self {
        Kv {
            backend: KvBackend::Memory,
            redis_url: DEFAULT_REDIS_URL.to_owned(),
        }
    }
}

/// Limits and reloading of the routing script (see `docs/scripting.md`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Lua {
    /// Lua VM instructions one hook call may run before it is stopped with an error (the
    /// request then gets 500). Default: 1000000.
    pub max_instructions: u64,
    /// Memory one Lua state (one per event loop) may allocate, in MiB. Default: 64.
    pub memory_limit_mb: usize,
    /// Reload the script when its file changes. Default: true.
    pub watch: bool,
    /// How long the file must stay unchanged before a reload, in milliseconds: an editor's
    /// save is several file events. Default: 200.
    pub reload_debounce_ms: u64,
}

impl Default for Lua {
    fn default() -> Self {
        Lua {
            max_instructions: 1_000_000,
            memory_limit_mb: 64,
            watch: true,
            reload_debounce_ms: 200,
        }
    }
}

/// The control socket `moonroute ctl` talks to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Control {
    /// Path of the Unix socket (mode 0600), relative to the working directory unless
    /// absolute. Empty: no control socket. Default: `var/moonroute.ctl`.
    pub socket: PathBuf,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            socket: PathBuf::from("var/moonroute.ctl"),
        }
    }
}

/// How log lines are written (`log_format`, `--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `tracing`'s human-readable lines, coloured only when stderr is a terminal.
    #[default]
    Human,
    /// One JSON object per line (timestamp, level, target, fields, spans).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected human or json"
            )),
        }
    }
}

/// The Prometheus text endpoint (`GET /metrics` over HTTP/1.1): see `crate::metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    /// `IP:PORT` to serve metrics on, e.g. `127.0.0.1:9060`. Empty (the default): off.
    /// Metrics name users and peers' addresses: keep it on loopback, or behind a firewall.
    pub listen: String,
}

impl Metrics {
    /// The address to serve on; `None` when off.
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.trim().parse().ok()
    }

    fn validate(&self) -> Result<(), String> {
        let listen = self.listen.trim();
        if !listen.is_empty() && listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "metrics.listen: {listen:?} is not IP:PORT (e.g. \"127.0.0.1:9060\"; empty turns metrics off)"
            ));
        }
        Ok(())
    }
}

/// Registrar rules (RFC 3261 §10.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Registrar {
    /// Expiry of a binding whose REGISTER names none, in seconds. Default: 3600.
    pub default_expires: u32,
    /// Shortest expiry accepted; shorter ones get 423 Interval Too Brief. Default: 60.
    pub min_expires: u32,
    /// Longest expiry granted; longer ones are lowered to it. Default: 86400.
    pub max_expires: u32,
}

impl Default for Registrar {
    fn default() -> Self {
        let rules = crate::registrar::Rules::default();
        Registrar {
            default_expires: rules.default_expires,
            min_expires: rules.min_expires,
            max_expires: rules.max_expires,
        }
    }
}

impl From<&Registrar> for crate::registrar::Rules {
    fn from(c: &Registrar) -> crate::registrar::Rules {
        crate::registrar::Rules {
            default_expires: c.default_expires,
            min_expires: c.min_expires,
            max_expires: c.max_expires,
        }
    }
}

/// The proxy. `static_route` and `relay_to_request_uri` are the built-in router, for labs and
/// benchmarks: when it relays (either key set) it replaces the routing script. Both off by
/// default: the script routes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Proxy {
    /// A SIP URI every new request (but OPTIONS to this server) is relayed to, statefully and
    /// Record-Routed, e.g. `"sip:127.0.0.1:5080"`. Empty: none. Default: empty.
    pub static_route: String,
    /// Relay requests for other hosts to their Request-URI (an open relay: for labs and tests
    /// on loopback). Default: false.
    pub relay_to_request_uri: bool,
    /// How long, in seconds, a Record-Route signature routes its dialog
    /// (`crate::proxy::route_sign`): the longest a dialog through this server can last; after
    /// it only BYE is routed. 60 to 31536000 (a year). Default: 43200 (12 hours).
    pub record_route_lifetime_secs: u64,
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy {
            static_route: String::new(),
            relay_to_request_uri: false,
            record_route_lifetime_secs: crate::proxy::route_sign::DEFAULT_LIFETIME.as_secs(),
        }
    }
}

/// Transaction timers (RFC 3261 §17.1.1.1, table 4) and the proxy's INVITE timeout, Timer C
/// (§16.8). The RFC defaults suit the public Internet; shorter values are for tests and labs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timers {
    /// T1, the round-trip estimate, in milliseconds. Default: 500.
    pub t1_ms: u64,
    /// T2, the longest retransmit interval, in milliseconds. Default: 4000.
    pub t2_ms: u64,
    /// T4, the longest time a message lives in the network, in milliseconds. Default: 5000.
    pub t4_ms: u64,
    /// Timer C, in seconds: an INVITE branch with no final response is cancelled after it
    /// (§16.8 requires more than 3 minutes). Default: 181.
    pub timer_c_secs: u64,
    /// Kamailio's `fr_timer`, in milliseconds: a relayed request's branch that hears nothing
    /// (an INVITE: not even a 100; another request: no final) within it is given up as a 408
    /// and the failure route runs (failover to the next gateway in seconds, not Timer B's
    /// 64*T1). The script's `req:t_set_fr()` sets it per transaction. Default: off (Timer
    /// B/F end such a branch).
    pub fr_timer_ms: Option<u64>,
    /// Kamailio's `fr_inv_timer`, in milliseconds: Timer C (§16.8) in milliseconds, how long
    /// an INVITE branch may ring without a final before it is CANCELled. Default:
    /// `timer_c_secs`.
    pub fr_inv_timer_ms: Option<u64>,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            t1_ms: 500,
            t2_ms: 4000,
            t4_ms: 5000,
            timer_c_secs: 181,
            fr_timer_ms: None,
            fr_inv_timer_ms: None,
        }
    }
}

impl Timers {
    /// Timer C of proxied INVITE branches: `fr_inv_timer_ms`, else `timer_c_secs`.
    pub fn timer_c(&self) -> std::time::Duration {
        match self.fr_inv_timer_ms {
            Some(ms) => std::time::Duration::from_millis(ms),
            None => std::time::Duration::from_secs(self.timer_c_secs),
        }
    }

    /// The failure timer of relayed branches (`fr_timer_ms`), `None` when off.
    pub fn fr_timer(&self) -> Option<std::time::Duration> {
        self.fr_timer_ms.map(std::time::Duration::from_millis)
    }
}

impl Proxy {
    /// `record_route_lifetime_secs` as a duration.
    pub fn record_route_lifetime(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.record_route_lifetime_secs)
    }

    fn validate(&self) -> Result<(), String> {
        if !(60..=31_536_000).contains(&self.record_route_lifetime_secs) {
            return Err("proxy.record_route_lifetime_secs: 60 to 31536000 (a year)".to_owned());
        }
        let route = self.static_route.trim();
        if route.is_empty() {
            return Ok(());
        }
        match crate::sip::Uri::parse(route.as_bytes()) {
            Ok(uri) if uri.as_sip().is_some() => Ok(()),
            _ => Err(format!(
                "proxy.static_route: {route:?} is not a sip: or sips: URI"
            )),
        }
    }
}

impl Lua {
    fn validate(&self) -> Result<(), String> {
        if self.max_instructions < 1000 {
            return Err("lua.max_instructions: at least 1000".to_owned());
        }
        if self.memory_limit_mb == 0 {
            return Err("lua.memory_limit_mb: at least 1".to_owned());
        }
        Ok(())
    }
}

impl Registrar {
    fn validate(&self) -> Result<(), String> {
        if self.min_expires == 0 || self.min_expires > self.max_expires {
            return Err(format!(
                "registrar: need 1 <= min_expires ({}) <= max_expires ({})",
                self.min_expires, self.max_expires
            ));
        }
        if !(self.min_expires..=self.max_expires).contains(&self.default_expires) {
            return Err(format!(
                "registrar.default_expires: {} is outside min_expires..=max_expires",
                self.default_expires
            ));
        }
        Ok(())
    }
}

impl Timers {
    fn validate(&self) -> Result<(), String> {
        if self.t1_ms == 0 || self.t4_ms == 0 || self.timer_c_secs == 0 {
            return Err("timers: t1_ms, t4_ms and timer_c_secs must be at least 1".to_owned());
        }
        if self.fr_timer_ms == Some(0) || self.fr_inv_timer_ms == Some(0) {
            return Err(
                "timers: fr_timer_ms and fr_inv_timer_ms must be at least 1 (leave them out for the default)"
                    .to_owned(),
            );
        }
        if self.t2_ms < self.t1_ms {
            return Err(format!(
                "timers.t2_ms: {} is below t1_ms ({})",
                self.t2_ms, self.t1_ms
            ));
        }
        Ok(())
    }

    /// The values the transaction layer uses.
    pub fn transaction_timers(&self) -> crate::transaction::TimerValues {
        use std::time::Duration;
        crate::transaction::TimerValues {
            t1: Duration::from_millis(self.t1_ms),
            t2: Duration::from_millis(self.t2_ms),
            t4: Duration::from_millis(self.t4_ms),
        }
    }
}

/// Resource limits: what bounds the memory a peer can make the server use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest message accepted, in bytes: a whole datagram, or header block plus body on a
    /// stream. Default: 65536.
    pub max_message_size: usize,
    /// Open TCP connections, inbound and outbound, for the whole server. Beyond it new
    /// inbound connections are closed at once and new outbound ones are not made.
    /// Default: 1024.
    pub max_connections: usize,
    /// Seconds without traffic after which a TCP connection is closed. Default: 300.
    pub tcp_idle_timeout_secs: u64,
    /// Seconds to wait for an outbound TCP connection to be established. Default: 5.
    pub tcp_connect_timeout_secs: u64,
    /// Messages queued for sending per connection; a peer that does not read and lets the
    /// queue fill is disconnected. Default: 256.
    pub tcp_send_queue: usize,
    /// Memory, in MiB, that the live SIP transactions of all event loops, with the proxy
    /// state of the requests they carry, may hold together (charged per transaction from what
    /// it keeps; `moonroute_transactions_memory_bytes` shows the figure). Beyond it new
    /// requests are answered 503 with Retry-After instead of exhausting memory. A completed
    /// call relayed by `scripts/default.lua` keeps about 6 KB for the 32 s of its transactions'
    /// wait states (RFC 3261 §17 Timers J, K; RFC 6026 Timers L, M; see bench/README.md), so
    /// the default holds some 2,500 calls/s. Default: 512.
    pub transaction_memory_mb: usize,
    /// Deprecated, use `transaction_memory_mb`: live SIP transactions per event loop, beyond
    /// which new requests are answered 503 with Retry-After. Unset by default; when set it
    /// applies besides the memory budget, and the server warns at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_transactions: Option<usize>,
    /// Requests one event loop may hold waiting for something outside the loop: answers
    /// waiting for their registration to reach the disk, and requests whose script waits for
    /// DNS (`sip.resolve`). Beyond it new requests are answered 503 with Retry-After before
    /// the script runs, so a slow disk or DNS server makes clients back off instead of
    /// retransmitting into a growing queue. Default: 2000.
    pub max_backlog: usize,
    /// How long, in milliseconds, an event loop must stay saturated (never idle: its UDP
    /// sockets, hand-over queue, connections and timers never all drained), in CPU time, or
    /// twice that in wall time, before it sheds load. Then it answers a share of new
    /// out-of-dialog requests 503 with Retry-After, set every 100 ms from the messages it
    /// handled against those that arrived while it stays saturated, falling as soon as it has
    /// time to spare (`server::overload`); responses, ACKs, CANCELs, retransmissions and requests inside a
    /// dialog are always served. Shorter saturations (a burst, another process holding the
    /// CPU for a moment) refuse nothing. 0: off. Default: 1000.
    pub overload_after_ms: u64,
    /// Deprecated, use `overload_after_ms`: when set, its value is used as
    /// `overload_after_ms` (0: off), and the server warns at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_receive_lag_ms: Option<u64>,
    /// Accepted (inbound) TCP and TLS connections at once; the rest of `max_connections` is
    /// kept for connections this server opens, so clients cannot starve them. Default (when
    /// absent): `max_connections` minus an eighth, rounded up (896 of 1024).
    pub max_inbound_connections: Option<usize>,
    /// Accepted connections from one IP address (IPv6: one /64). Default (when absent): an
    /// eighth of the inbound connections, at least 1 (112).
    pub max_connections_per_ip: Option<usize>,
    /// Accepted connections from one IP address (IPv6: one /64) that have not yet delivered a
    /// complete SIP message: TLS handshake, or first message, in progress. Default (when
    /// absent): a thirty-second of the inbound connections, between 1 and 32 (28).
    pub max_pending_connections_per_ip: Option<usize>,
    /// Milliseconds within which the header block of a message on a TCP or TLS connection
    /// must be complete, from its first byte; on an accepted connection the first message's
    /// clock starts when the connection is ready (TLS handshake done), so a client that
    /// connects and says nothing is closed too. Default: 10000.
    pub tcp_header_timeout_ms: u64,
    /// Milliseconds within which a whole message (header block and body) on a TCP or TLS
    /// connection must be complete, from its first byte. At least `tcp_header_timeout_ms`.
    /// Default: 20000.
    pub tcp_message_timeout_ms: u64,
}

/// The default SIP port for UDP and TCP (RFC 3261 §19.1.2).
pub const DEFAULT_SIP_PORT: u16 = 5060;

impl Default for Config {
    fn default() -> Self {
        let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_SIP_PORT);
        Config {
            listen: vec![
                ListenAddr::new(TransportKind::Udp, loopback),
                ListenAddr::new(TransportKind::Tcp, loopback),
            ],
            advertise: None,
            domains: Vec::new(),
            script: PathBuf::from("scripts/default.lua"),
            data_dir: PathBuf::from("var"),
            log_level: "info".to_owned(),
            log_format: LogFormat::Human,
            workers: 0,
            limits: Limits::default(),
            timers: Timers::default(),
            proxy: Proxy::default(),
            lua: Lua::default(),
            control: Control::default(),
            metrics: Metrics::default(),
            registrar: Registrar::default(),
            location: Location::default(),
            kv: Kv::default(),
            tls: Tls::default(),
            websocket: WebSocket::default(),
            dns: Dns::default(),
            nat: Nat::default(),
            auth: Auth::default(),
            pike: Pike::default(),
            dialog: Dialog::default(),
            dispatcher: Dispatcher::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 65_536,
            max_connections: 1024,
            tcp_idle_timeout_secs: 300,
            tcp_connect_timeout_secs: 5,
            tcp_send_queue: 256,
            transaction_memory_mb: 512,
            max_transactions: None,
            max_backlog: 2000,
            overload_after_ms: 1000,
            max_receive_lag_ms: None,
            max_inbound_connections: None,
            max_connections_per_ip: None,
            max_pending_connections_per_ip: None,
            tcp_header_timeout_ms: 10_000,
            tcp_message_timeout_ms: 20_000,
        }
    }
}

impl Limits {
    /// `transaction_memory_mb` in bytes.
    pub fn transaction_memory(&self) -> usize {
        self.transaction_memory_mb.saturating_mul(1 << 20)
    }

    /// What an operator should change in `[limits]`, one line per deprecated key set.
    pub fn deprecations(&self) -> Vec<String> {
        let transactions = self.max_transactions.map(|n| {
            format!(
                "limits.max_transactions ({n}) is deprecated and will go: transactions are \
                 bounded by limits.transaction_memory_mb ({} MiB) now; it still caps each \
                 event loop at {n} live transactions until removed from the configuration",
                self.transaction_memory_mb
            )
        });
        let lag = self.max_receive_lag_ms.map(|ms| {
            format!(
                "limits.max_receive_lag_ms ({ms}) is deprecated and will go: an event loop \
                 sheds load after limits.overload_after_ms of saturation now; {ms} is used as \
                 limits.overload_after_ms until removed from the configuration"
            )
        });
        transactions.into_iter().chain(lag).collect()
    }

    /// How long an event loop must be saturated before it sheds load
    /// (`overload_after_ms`, or the deprecated `max_receive_lag_ms` when set); `None` when
    /// 0 (off).
    pub fn overload_after(&self) -> Option<std::time::Duration> {
        let ms = self.max_receive_lag_ms.unwrap_or(self.overload_after_ms);
        (ms > 0).then(|| std::time::Duration::from_millis(ms))
    }

    /// `max_inbound_connections`, or its default: all of `max_connections` but an eighth
    /// (rounded up), at least 1.
    pub fn inbound_connections(&self) -> usize {
        self.max_inbound_connections.unwrap_or_else(|| {
            let reserved = self.max_connections.div_ceil(8);
            self.max_connections.saturating_sub(reserved).max(1)
        })
    }

    /// `max_connections_per_ip`, or its default: an eighth of the inbound connections.
    pub fn connections_per_ip(&self) -> usize {
        self.max_connections_per_ip
            .unwrap_or_else(|| (self.inbound_connections() / 8).max(1))
    }

    /// `max_pending_connections_per_ip`, or its default: a thirty-second of the inbound
    /// connections, between 1 and 32.
    pub fn pending_connections_per_ip(&self) -> usize {
        self.max_pending_connections_per_ip
            .unwrap_or_else(|| (self.inbound_connections() / 32).clamp(1, 32))
    }
}

/// Values given on the command line; each one that is set replaces the file's value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Replaces the whole `listen` list when not empty.
    pub listen: Vec<ListenAddr>,
    /// Replaces `advertise` (`--advertise`, `MOONROUTE_ADVERTISE`).
    pub advertise: Option<Advertise>,
    /// Replaces the whole `domains` list when not empty.
    pub domains: Vec<String>,
    pub script: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub log_level: Option<String>,
    pub workers: Option<usize>,
    pub static_route: Option<String>,
    pub control_socket: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    /// `metrics.listen`; an empty value turns metrics off.
    pub metrics_listen: Option<String>,
    /// `--location-redis URL`: `[location] store = "redis"` at this URL.
    pub location_redis: Option<String>,
    /// `--kv-redis URL`: `[kv] backend = "redis"` at this URL.
    pub kv_redis: Option<String>,
}

/// Why a configuration could not be used. The message names the file when there is one.
#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    Parse {
        path: Option<PathBuf>,
        message: String,
    },
    Invalid {
        path: Option<PathBuf>,
        message: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "cannot read config file {}: {source}", path.display())
            }
            ConfigError::Parse {
                path: Some(path),
                message,
            } => write!(f, "{}: {message}", path.display()),
            ConfigError::Parse {
                path: None,
                message,
            } => write!(f, "invalid configuration: {message}"),
            ConfigError::Invalid {
                path: Some(path),
                message,
            } => write!(f, "{}: {message}", path.display()),
            ConfigError::Invalid {
                path: None,
                message,
            } => write!(f, "invalid configuration: {message}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Config {
    /// The server key (`crate::secret`): `[auth] secret`, or the key in `<data_dir>/secret`.
    pub fn server_key(&self) -> Result<Vec<u8>, String> {
        crate::secret::server_key(&self.auth.secret, &self.data_dir)
    }

    /// The files holding secrets that `crate::file_modes::startup_warnings` checks;
    /// `config_file` is the configuration file the server was started with, if any.
    pub fn secret_files<'a>(&'a self, config_file: Option<&'a Path>) -> SecretFiles<'a> {
        let key_in_config = !self.auth.secret.is_empty();
        SecretFiles {
            data_dir: &self.data_dir,
            key_file: (!key_in_config).then(|| self.data_dir.join(crate::secret::KEY_FILE)),
            config_with_secret: config_file.filter(|_| key_in_config),
            tls_private_key: Some(self.tls.private_key.as_path())
                .filter(|key| !key.as_os_str().is_empty()),
        }
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|error| error.in_file(path))?;
        config.validate().map_err(|error| error.in_file(path))?;
        Ok(config)
    }

    /// Parses a configuration from TOML text (not validated: see [`Config::validate`]).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: None,
            // toml's message already says where (line, column) and what was expected.
            message: error.to_string().trim_end().to_owned(),
        })
    }

    /// Replaces values with those given on the command line.
    pub fn apply(&mut self, overrides: Overrides) {
        if !overrides.listen.is_empty() {
            self.listen = overrides.listen;
        }
        if let Some(advertise) = overrides.advertise {
            self.advertise = Some(advertise);
        }
        if !overrides.domains.is_empty() {
            self.domains = overrides.domains;
        }
        if let Some(script) = overrides.script {
            self.script = script;
        }
        if let Some(data_dir) = overrides.data_dir {
            self.data_dir = data_dir;
        }
        if let Some(log_level) = overrides.log_level {
            self.log_level = log_level;
        }
        if let Some(workers) = overrides.workers {
            self.workers = workers;
        }
        if let Some(socket) = overrides.control_socket {
            self.control.socket = socket;
        }
        if let Some(route) = overrides.static_route {
            self.proxy.static_route = route;
        }
        if let Some(format) = overrides.log_format {
            self.log_format = format;
        }
        if let Some(listen) = overrides.metrics_listen {
            self.metrics.listen = listen;
        }
        if let Some(url) = overrides.location_redis {
            self.location.store = LocationBackend::Redis;
            self.location.redis_url = url;
        }
        if let Some(url) = overrides.kv_redis {
            self.kv.backend = KvBackend::Redis;
            self.kv.redis_url = url;
        }
    }

    /// Checks what the types cannot: non-empty, non-duplicate listen addresses, an advertised
    /// address for every wildcard listener, and limits that leave the server able to work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: None,
            message,
        };
        if self.listen.is_empty() {
            return Err(invalid("listen: at least one address is needed".to_owned()));
        }
        for (index, listen) in self.listen.iter().enumerate() {
            if self.listen[..index].iter().any(|l| l.same_socket(listen)) {
                let socket = listen.socket();
                return Err(invalid(format!("listen: {socket} is listed twice")));
            }
        }
        self.check_advertised().map_err(invalid)?;
        if let Some(domain) = self.domains.iter().find(|domain| domain.trim().is_empty()) {
            return Err(invalid(format!("domains: empty domain name {domain:?}")));
        }
        if self.log_level.trim().is_empty() {
            return Err(invalid("log_level: must not be empty".to_owned()));
        }
        self.limits.validate().map_err(invalid)?;
        self.timers.validate().map_err(invalid)?;
        self.proxy.validate().map_err(invalid)?;
        self.lua.validate().map_err(invalid)?;
        self.metrics.validate().map_err(invalid)?;
        self.registrar.validate().map_err(invalid)?;
        self.location.validate().map_err(invalid)?;
        self.tls.validate().map_err(invalid)?;
        self.websocket.validate().map_err(invalid)?;
        self.dns.validate().map_err(invalid)?;
        self.nat.validate().map_err(invalid)?;
        self.auth.validate().map_err(invalid)?;
        self.pike.validate().map_err(invalid)?;
        self.dialog.validate().map_err(invalid)?;
        self.dispatcher.validate().map_err(invalid)
    }

    /// What `listen` advertises (its own `advertise=`, else the global `advertise`), `None`
    /// when it advertises its socket address.
    pub fn advertise_of<'a>(&'a self, listen: &'a ListenAddr) -> Option<&'a Advertise> {
        listen.advertise.as_ref().or(self.advertise.as_ref())
    }

    /// A wildcard listener (`0.0.0.0`, `[::]`) must advertise an address: Via, Record-Route
    /// and keep-alives would carry the wildcard, which no peer can send to. Refused whatever
    /// the script does: it decides per request, may be reloaded into one that relays at any
    /// time, and keep-alives to NATed phones need the address too.
    fn check_advertised(&self) -> Result<(), String> {
        let Some(listen) = self
            .listen
            .iter()
            .find(|l| l.addr.ip().is_unspecified() && self.advertise_of(l).is_none())
        else {
            return Ok(());
        };
        let socket = listen.socket();
        Err(format!(
            "listen: {socket} listens on every address, and no address is advertised for it: \
             Via, Record-Route and NAT keep-alives would carry {ip}, which peers cannot send \
             to. Name the address phones and peers reach this server at: \
             \"{socket},advertise=HOST[:PORT]\" in listen, advertise = \"HOST[:PORT]\" for \
             every listener, or --advertise HOST[:PORT] (MOONROUTE_ADVERTISE); or listen on \
             that address itself",
            ip = listen.addr.ip(),
        ))
    }

    /// The number of event loops to run: `workers`, or one per CPU core when it is 0.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |cores| cores.get()),
            workers => workers,
        }
    }
}

/// The smallest `max_message_size` accepted: RFC 3261 §18.1.1 expects messages up to
/// 1300 bytes to be usual, so anything much smaller would reject ordinary traffic.
pub const MIN_MESSAGE_SIZE: usize = 1024;

/// The bounds `[limits]` sets on the transports.
impl From<&Limits> for TransportLimits {
    fn from(limits: &Limits) -> Self {
        TransportLimits {
            max_message_size: limits.max_message_size,
            tcp_idle_timeout: std::time::Duration::from_secs(limits.tcp_idle_timeout_secs),
            tcp_connect_timeout: std::time::Duration::from_secs(limits.tcp_connect_timeout_secs),
            tcp_send_queue: limits.tcp_send_queue,
            connections: crate::transport::registry::ConnectionLimits {
                max_connections: limits.max_connections,
                max_inbound: limits.inbound_connections(),
                max_per_source: limits.connections_per_ip(),
                max_pending_per_source: limits.pending_connections_per_ip(),
            },
            message_timeouts: crate::transport::message_clock::MessageTimeouts {
                header: std::time::Duration::from_millis(limits.tcp_header_timeout_ms),
                message: std::time::Duration::from_millis(limits.tcp_message_timeout_ms),
            },
        }
    }
}

impl Limits {
    fn validate(&self) -> Result<(), String> {
        if self.max_message_size < MIN_MESSAGE_SIZE {
            return Err(format!(
                "limits.max_message_size: {} is below the minimum of {MIN_MESSAGE_SIZE}",
                self.max_message_size
            ));
        }
        let at_least_one = [
            ("limits.max_connections", self.max_connections as u64),
            ("limits.tcp_idle_timeout_secs", self.tcp_idle_timeout_secs),
            (
                "limits.tcp_connect_timeout_secs",
                self.tcp_connect_timeout_secs,
            ),
            ("limits.tcp_send_queue", self.tcp_send_queue as u64),
            (
                "limits.transaction_memory_mb",
                self.transaction_memory_mb as u64,
            ),
            (
                "limits.max_transactions",
                self.max_transactions.map_or(1, |n| n as u64),
            ),
            ("limits.max_backlog", self.max_backlog as u64),
            ("limits.tcp_header_timeout_ms", self.tcp_header_timeout_ms),
            // Absent: derived, and never 0.
            (
                "limits.max_inbound_connections",
                self.max_inbound_connections.map_or(1, |v| v as u64),
            ),
            (
                "limits.max_connections_per_ip",
                self.max_connections_per_ip.map_or(1, |v| v as u64),
            ),
            (
                "limits.max_pending_connections_per_ip",
                self.max_pending_connections_per_ip.map_or(1, |v| v as u64),
            ),
        ];
        if let Some((name, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return Err(format!("{name}: must be at least 1"));
        }
        if self.inbound_connections() > self.max_connections {
            return Err(format!(
                "limits.max_inbound_connections: {} is above limits.max_connections ({})",
                self.inbound_connections(),
                self.max_connections
            ));
        }
        if self.tcp_message_timeout_ms < self.tcp_header_timeout_ms {
            return Err(format!(
                "limits.tcp_message_timeout_ms: {} is below limits.tcp_header_timeout_ms ({})",
                self.tcp_message_timeout_ms, self.tcp_header_timeout_ms
            ));
        }
        Ok(())
    }
}

impl ConfigError {
    fn in_file(self, file: &Path) -> ConfigError {
        match self {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: Some(file.to_owned()),
                message,
            },
            ConfigError::Invalid { message, .. } => ConfigError::Invalid {
                path: Some(file.to_owned()),
                message,
            },
            read => read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(text: &str) -> ListenAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(
            config.listen,
            vec![listen("udp:127.0.0.1:5060"), listen("tcp:127.0.0.1:5060")]
        );
        assert!(config.domains.is_empty());
        assert_eq!(config.script, PathBuf::from("scripts/default.lua"));
        assert_eq!(config.data_dir, PathBuf::from("var"));
        assert_eq!(config.log_level, "info");
        assert_eq!(config.workers, 0);
        assert_eq!(config.limits.max_message_size, 65_536);
        assert_eq!(config.limits.max_connections, 1024);
        assert_eq!(config.limits.tcp_idle_timeout_secs, 300);
        assert_eq!(config.limits.tcp_connect_timeout_secs, 5);
        assert_eq!(config.limits.tcp_send_queue, 256);
        assert_eq!(config.limits.inbound_connections(), 896);
        assert_eq!(config.limits.connections_per_ip(), 112);
        assert_eq!(config.limits.pending_connections_per_ip(), 28);
        assert_eq!(config.limits.tcp_header_timeout_ms, 10_000);
        assert_eq!(config.limits.tcp_message_timeout_ms, 20_000);
        config.validate().unwrap();
    }

    #[test]
    fn parses_every_key() {
        let config = Config::parse(
            r#"
            listen = ["udp:0.0.0.0:5080,advertise=edge.example.com:5090", "tcp:[::1]:5080"]
            advertise = "sip.example.com"
            domains = ["example.com", "example.org"]
            script = "/etc/moonroute/route.lua"
            data_dir = "/var/lib/moonroute"
            log_level = "debug"
            workers = 3

            [limits]
            max_message_size = 8192
            max_connections = 10
            tcp_idle_timeout_secs = 60
            tcp_connect_timeout_secs = 2
            tcp_send_queue = 16
            max_backlog = 50
            overload_after_ms = 0
            max_inbound_connections = 8
            max_connections_per_ip = 3
            max_pending_connections_per_ip = 2
            tcp_header_timeout_ms = 1500
            tcp_message_timeout_ms = 2500

            [pike]
            window_ms = 500
            max_requests = 20
            max_tracked_ips = 1000
            "#,
        )
        .unwrap();
        assert_eq!(
            config.pike,
            Pike {
                window_ms: 500,
                max_requests: 20,
                max_tracked_ips: 1000,
            }
        );
        assert_eq!(config.limits.overload_after(), None);
        assert_eq!(
            config.listen,
            vec![
                listen("udp:0.0.0.0:5080,advertise=edge.example.com:5090"),
                listen("tcp:[::1]:5080")
            ]
        );
        assert_eq!(config.advertise, Some("sip.example.com".parse().unwrap()));
        assert_eq!(
            config
                .advertise_of(&config.listen[0])
                .map(|a| a.to_string()),
            Some("edge.example.com:5090".to_owned())
        );
        assert_eq!(
            config
                .advertise_of(&config.listen[1])
                .map(|a| a.to_string()),
            Some("sip.example.com".to_owned())
        );
        assert_eq!(config.domains, ["example.com", "example.org"]);
        assert_eq!(config.script, PathBuf::from("/etc/moonroute/route.lua"));
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/moonroute"));
        assert_eq!(config.log_level, "debug");
        assert_eq!(config.workers, 3);
        assert_eq!(config.worker_count(), 3);
        assert_eq!(
            config.limits,
            Limits {
                max_message_size: 8192,
                max_connections: 10,
                tcp_idle_timeout_secs: 60,
                tcp_connect_timeout_secs: 2,
                tcp_send_queue: 16,
                transaction_memory_mb: Limits::default().transaction_memory_mb,
                max_transactions: Limits::default().max_transactions,
                max_backlog: 50,
                overload_after_ms: 0,
                max_receive_lag_ms: None,
                max_inbound_connections: Some(8),
                max_connections_per_ip: Some(3),
                max_pending_connections_per_ip: Some(2),
                tcp_header_timeout_ms: 1500,
                tcp_message_timeout_ms: 2500,
            }
        );
    }

    #[test]
    fn connection_limits_left_out_scale_with_max_connections() {
        let derived = |max_connections| {
            let limits = Limits {
                max_connections,
                ..Limits::default()
            };
            (
                limits.inbound_connections(),
                limits.connections_per_ip(),
                limits.pending_connections_per_ip(),
            )
        };
        // The issue's server: one address can no longer hold every slot.
        assert_eq!(derived(20), (17, 2, 1));
        assert_eq!(derived(1), (1, 1, 1));
        assert_eq!(derived(100_000), (87_500, 10_937, 32));
        let set = Limits {
            max_connections_per_ip: Some(500),
            ..Limits::default()
        };
        assert_eq!(set.connections_per_ip(), 500);
    }

    #[test]
    fn overload_after_replaces_max_receive_lag_which_still_works_with_a_warning() {
        let config = Config::parse("").unwrap();
        assert_eq!(
            config.limits.overload_after(),
            Some(std::time::Duration::from_secs(1))
        );
        let config = Config::parse("[limits]\nmax_receive_lag_ms = 0\n").unwrap();
        assert_eq!(config.limits.overload_after(), None);
        let warnings = config.limits.deprecations();
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("limits.max_receive_lag_ms (0) is deprecated"),
            "{warnings:?}"
        );
        let config = Config::parse("[limits]\noverload_after_ms = 2500\n").unwrap();
        assert_eq!(
            config.limits.overload_after(),
            Some(std::time::Duration::from_millis(2500))
        );
        assert!(config.limits.deprecations().is_empty());
    }

    #[test]
    fn transaction_memory_replaces_max_transactions_which_still_works_with_a_warning() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.limits.transaction_memory_mb, 512);
        assert_eq!(config.limits.transaction_memory(), 512 << 20);
        assert_eq!(config.limits.max_transactions, None);
        assert!(config.limits.deprecations().is_empty());

        let config =
            Config::parse("[limits]\ntransaction_memory_mb = 64\nmax_transactions = 5000\n")
                .unwrap();
        assert_eq!(config.limits.transaction_memory(), 64 << 20);
        assert_eq!(config.limits.max_transactions, Some(5000));
        let warnings = config.limits.deprecations();
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("limits.max_transactions (5000) is deprecated")
                && warnings[0].contains("limits.transaction_memory_mb (64 MiB)"),
            "{warnings:?}"
        );
        for zero in ["transaction_memory_mb = 0", "max_transactions = 0"] {
            let error = Config::parse(&format!("[limits]\n{zero}\n"))
                .and_then(|c| c.validate().map(|_| c))
                .unwrap_err()
                .to_string();
            assert!(error.contains("must be at least 1"), "{zero}: {error}");
        }
    }

    #[test]
    fn a_partial_limits_table_keeps_the_other_defaults() {
        let config = Config::parse("[limits]\nmax_connections = 7\n").unwrap();
        assert_eq!(config.limits.max_connections, 7);
        assert_eq!(config.limits.max_message_size, 65_536);
        assert_eq!(config.listen, Config::default().listen);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let error = Config::parse("listn = []").unwrap_err().to_string();
        assert!(error.contains("unknown field `listn`"), "{error}");
        let error = Config::parse("[limits]\nmax_conections = 1")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `max_conections`"), "{error}");
    }

    #[test]
    fn bad_values_are_errors_that_say_what_is_wrong() {
        let error = Config::parse("listen = [\"udp:localhost:5060\"]")
            .unwrap_err()
            .to_string();
        assert!(error.contains("udp:localhost:5060"), "{error}");
        let error = Config::parse("workers = -1").unwrap_err().to_string();
        assert!(error.contains("workers"), "{error}");
        let error = Config::parse("workers = \"two\"").unwrap_err().to_string();
        assert!(error.contains("workers"), "{error}");
    }

    #[test]
    fn validation_rejects_unusable_values() {
        let check = |edit: fn(&mut Config), expected: &str| {
            let mut config = Config::default();
            edit(&mut config);
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        };
        check(|c| c.listen.clear(), "at least one address");
        check(
            |c| c.listen.push(c.listen[0].clone()),
            "udp:127.0.0.1:5060 is listed twice",
        );
        check(|c| c.domains.push(" ".into()), "empty domain");
        check(|c| c.log_level.clear(), "log_level");
        check(|c| c.limits.max_message_size = 100, "max_message_size");
        check(|c| c.limits.max_connections = 0, "max_connections");
        check(|c| c.limits.max_backlog = 0, "max_backlog");
        check(|c| c.pike.window_ms = 0, "pike");
        check(|c| c.pike.max_requests = 0, "pike");
        check(|c| c.limits.tcp_send_queue = 0, "tcp_send_queue");
        check(
            |c| c.limits.tcp_idle_timeout_secs = 0,
            "tcp_idle_timeout_secs",
        );
        check(
            |c| c.limits.tcp_connect_timeout_secs = 0,
            "tcp_connect_timeout_secs",
        );
        check(
            |c| c.limits.max_pending_connections_per_ip = Some(0),
            "max_pending_connections_per_ip: must be at least 1",
        );
        check(
            |c| c.limits.max_inbound_connections = Some(2000),
            "max_inbound_connections: 2000 is above limits.max_connections (1024)",
        );
        check(
            |c| c.limits.tcp_message_timeout_ms = 5000,
            "tcp_message_timeout_ms: 5000 is below limits.tcp_header_timeout_ms (10000)",
        );
    }

    #[test]
    fn a_wildcard_listener_must_advertise_an_address() {
        let refused = |text: &str| {
            let config = Config::parse(text).unwrap();
            config.validate().unwrap_err().to_string()
        };
        let error = refused("listen = [\"udp:127.0.0.1:5060\", \"tcp:[::]:5060\"]");
        assert!(
            error.contains("listen: tcp:[::]:5060 listens on every address")
                && error.contains("\"tcp:[::]:5060,advertise=HOST[:PORT]\"")
                && error.contains("--advertise")
                && error.contains("MOONROUTE_ADVERTISE"),
            "says which listener and every way to fix it: {error}"
        );
        for fixed in [
            "listen = [\"udp:0.0.0.0:5060,advertise=203.0.113.7\"]",
            "listen = [\"udp:0.0.0.0:5060\"]\nadvertise = \"sip.example.com\"",
            "listen = [\"udp:192.0.2.1:5060\"]",
        ] {
            Config::parse(fixed).unwrap().validate().unwrap();
        }
        let mut config = Config::parse("listen = [\"udp:0.0.0.0:5060\"]").unwrap();
        config.apply(Overrides {
            advertise: Some("sip.example.com:5080".parse().unwrap()),
            ..Overrides::default()
        });
        config.validate().unwrap();
        let error = Config::parse("advertise = \"0.0.0.0\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("advertise"), "{error}");
        // Two listeners on one socket are one listener, whatever they advertise.
        let error = refused(
            "listen = [\"udp:0.0.0.0:5060,advertise=a.example\", \
             \"udp:0.0.0.0:5060,advertise=b.example\"]",
        );
        assert!(
            error.contains("udp:0.0.0.0:5060 is listed twice"),
            "{error}"
        );
    }

    #[test]
    fn overrides_replace_file_values() {
        let mut config = Config::parse(
            "listen = [\"udp:0.0.0.0:5060\"]\ndomains = [\"a.example\"]\nworkers = 4\n",
        )
        .unwrap();
        config.apply(Overrides {
            listen: vec![listen("tcp:127.0.0.1:5070")],
            domains: vec!["b.example".into()],
            script: Some("other.lua".into()),
            data_dir: Some("/tmp/data".into()),
            log_level: Some("trace".into()),
            workers: Some(1),
            static_route: Some("sip:127.0.0.1:5080".into()),
            control_socket: Some("/tmp/ctl".into()),
            ..Overrides::default()
        });
        assert_eq!(config.proxy.static_route, "sip:127.0.0.1:5080");
        config.validate().unwrap();
        config.proxy.static_route = "mailto:x@example.com".into();
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("static_route"));
        assert_eq!(config.listen, vec![listen("tcp:127.0.0.1:5070")]);
        assert_eq!(config.domains, ["b.example"]);
        assert_eq!(config.script, PathBuf::from("other.lua"));
        assert_eq!(config.data_dir, PathBuf::from("/tmp/data"));
        assert_eq!(config.log_level, "trace");
        assert_eq!(config.workers, 1);
    }

    #[test]
    fn empty_overrides_keep_file_values() {
        let mut config = Config::parse("workers = 4\n").unwrap();
        let before = config.clone();
        config.apply(Overrides::default());
        assert_eq!(config, before);
    }

    #[test]
    fn keepalive_batch_is_checked() {
        let config = Config::parse("[nat]\nkeepalive_batch = 500\n").unwrap();
        config.validate().unwrap();
        assert_eq!(config.nat.keepalive_batch, 500);
        assert_eq!(Config::default().nat.keepalive_batch, 100);
        let error = Config::parse("[nat]\nkeepalive_batch = 0\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(error.contains("nat.keepalive_batch"), "{error}");
    }

    #[test]
    fn auth_is_checked() {
        let config = Config::parse("[auth]\nalgorithms = [\"MD5\"]\n").unwrap();
        config.validate().unwrap();
        for bad in [
            "[auth]\nalgorithms = []\n",
            "[auth]\nalgorithms = [\"MD5-sess\"]\n",
            "[auth]\nalgorithms = [\"md5\", \"MD5\"]\n",
            "[auth]\nnonce_expires_secs = 0\n",
            "[auth]\nmax_tracked_nonces = 0\n",
        ] {
            let error = Config::parse(bad)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(error.contains("auth."), "{bad}: {error}");
        }
    }

    #[test]
    fn zero_workers_means_one_per_core() {
        let config = Config::default();
        assert!(config.worker_count() >= 1);
    }

    #[test]
    fn load_reports_the_path_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moonroute.toml");

        let missing = Config::load(&path).unwrap_err().to_string();
        assert!(missing.contains("cannot read config file"), "{missing}");
        assert!(missing.contains("moonroute.toml"), "{missing}");

        std::fs::write(&path, "workers = 2\nlimits = 5\n").unwrap();
        let error = Config::load(&path).unwrap_err().to_string();
        assert!(error.starts_with(&path.display().to_string()), "{error}");
        assert!(error.contains("limits"), "{error}");

        std::fs::write(&path, "listen = []\n").unwrap();
        let error = Config::load(&path).unwrap_err().to_string();
        assert!(error.starts_with(&path.display().to_string()), "{error}");
        assert!(error.contains("at least one address"), "{error}");

        std::fs::write(&path, "workers = 2\n").unwrap();
        assert_eq!(Config::load(&path).unwrap().workers, 2);
    }

    #[test]
    fn timers_are_checked() {
        let config =
            Config::parse("[timers]\nt1_ms = 50\nt2_ms = 400\ntimer_c_secs = 3\n").unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.timers.transaction_timers().t1,
            std::time::Duration::from_millis(50)
        );
        let bad = Config::parse("[timers]\nt1_ms = 500\nt2_ms = 100\n").unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("t2_ms"));
        assert!(
            Config::parse("[timers]\nt3_ms = 1\n").is_err(),
            "unknown keys are errors"
        );
    }

    #[test]
    fn record_route_lifetime_is_checked() {
        assert_eq!(Config::default().proxy.record_route_lifetime_secs, 43_200);
        let config = Config::parse("[proxy]\nrecord_route_lifetime_secs = 7200\n").unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.proxy.record_route_lifetime(),
            std::time::Duration::from_secs(7200)
        );
        for bad in [0, 59, 31_536_001] {
            let config =
                Config::parse(&format!("[proxy]\nrecord_route_lifetime_secs = {bad}\n")).unwrap();
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains("record_route_lifetime_secs"), "{error}");
        }
    }

    #[test]
    fn dispatcher_sets_and_rules_parse_and_bad_ones_are_refused() {
        let config = Config::parse(
            "[dispatcher]\nprobe_interval_ms = 500\nprobe_timeout_ms = 300\n\
             alive_codes = [\"2xx\", \"404\"]\n\
             [[dispatcher.set]]\nid = 1\n\
             destinations = [{ uri = \"sip:127.0.0.1:5071\", weight = 2 }]\n",
        )
        .unwrap();
        config.validate().unwrap();
        let rules = config.dispatcher.rules().unwrap();
        assert_eq!(rules.interval, Some(std::time::Duration::from_millis(500)));
        assert!(rules.alive.contains(404) && !rules.alive.contains(501));
        assert_eq!(config.dispatcher.set[0].destinations[0].weight, 2);
        let check = |text: &str, expected: &str| {
            let error = Config::parse(text)
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()))
                .unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        };
        check("[dispatcher]\ndown_after = 0\n", "down_after");
        check(
            "[dispatcher]\nprobe_timeout_ms = 20000\n",
            "probe_timeout_ms",
        );
        check("[dispatcher]\nprobe_method = \"INVITE\"\n", "probe_method");
        check(
            "[dispatcher]\nprobe_method = \"opt ions\"\n",
            "probe_method",
        );
        check(
            "[dispatcher]\nmark_on = [\"5xx\", \"later\"]\n",
            "dispatcher.mark_on",
        );
        check(
            "[[dispatcher.set]]\nid = 3\ndestinations = []\n",
            "dispatcher set 3: no destinations",
        );
    }

    #[test]
    fn the_example_file_is_valid_and_matches_the_defaults() {
        let example = include_str!("../moonroute.example.toml");
        let config = Config::parse(example).unwrap();
        config.validate().unwrap();
        // The one difference: the example turns the metrics endpoint on (off by default).
        let mut expected = Config::default();
        expected.metrics.listen = "127.0.0.1:9060".to_owned();
        assert_eq!(config, expected);
    }

    #[test]
    fn metrics_listen_and_log_format() {
        let config =
            Config::parse("log_format = \"json\"\n[metrics]\nlisten = \"127.0.0.1:9060\"\n")
                .unwrap();
        config.validate().unwrap();
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(
            config.metrics.listen_addr(),
            Some("127.0.0.1:9060".parse().unwrap())
        );
        assert_eq!(Config::default().metrics.listen_addr(), None);
        let bad = Config::parse("[metrics]\nlisten = \"localhost\"\n").unwrap();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("metrics.listen"));
        assert!(Config::parse("log_format = \"xml\"\n").is_err());
    }
}
