//! The `moonroute` command: loads the configuration, starts the server, and runs until
//! SIGINT or SIGTERM.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use std::time::{Duration, SystemTime};

use moonroute::config::{Config, LogFormat, Overrides};
use moonroute::control::{ControlServer, Reply};
use moonroute::metrics::http::MetricsEndpoint;
use moonroute::metrics::EngineMetrics;
use moonroute::script::watch::ScriptWatcher;
use moonroute::script::{offline, ScriptHost};
use moonroute::server::{Server, Wiring};
use moonroute::transport::{Advertise, ListenAddr};

/// mimalloc instead of glibc's malloc: the event loops allocate and free per message, and
/// glibc's arena for a thread other than the main one grows its heap a page at a time with
/// `mprotect` (measured: 1.5 system calls per call). The library and its tests keep the
/// system allocator; this is the server's choice.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `moonroute -V`: the version and the release of the embedded Lua (see build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (Lua ",
    env!("MOONROUTE_LUA_RELEASE"),
    ")"
);

/// `moonroute --version`: [`VERSION`], then the git commit it was built from when known.
static LONG_VERSION: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| match env!("MOONROUTE_GIT_COMMIT") {
        "" => VERSION.to_owned(),
        commit => format!("{VERSION}\ncommit {commit}"),
    });

#[derive(Parser, Debug)]
#[command(
    name = "moonroute",
    version = VERSION,
    long_version = LONG_VERSION.as_str(),
    about = "A scriptable SIP server"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (the default when no command is given).
    Run(RunArgs),
    /// Check a routing script without starting a server: it must compile, run its top-level
    /// code and define on_request. Exit code 0 when valid, 1 with file:line otherwise.
    Check {
        /// The Lua script.
        script: PathBuf,
    },
    /// Run a routing script on one SIP message, without any network, and print what it
    /// decided (reply, targets, header changes, per-transaction vars, logs).
    Test(TestArgs),
    /// Send a command to the running server over its control socket, e.g. `ctl reload`.
    Ctl(CtlArgs),
}

#[derive(Args, Debug)]
struct TestArgs {
    /// The Lua script to run, or with --lua, a Lua test file.
    script: PathBuf,
    /// The SIP message (a file holding the request as it arrives on the wire; bare LF line
    /// ends are accepted).
    #[arg(long, value_name = "FILE", required_unless_present = "lua")]
    message: Option<PathBuf>,
    /// Location fixture: one `AOR CONTACT [q=Q] [expires=SECONDS]` per line.
    #[arg(long, value_name = "FILE")]
    location: Option<PathBuf>,
    /// Subscriber fixture: one `USER@DOMAIN PASSWORD [REALM]` per line (plaintext: for tests
    /// only); with it, `req:authorize` checks credentials.
    #[arg(long, value_name = "FILE")]
    subscribers: Option<PathBuf>,
    /// Where the message comes from, as transport:ip:port.
    #[arg(
        long,
        value_name = "TRANSPORT:IP:PORT",
        default_value = "udp:127.0.0.1:5070"
    )]
    source: ListenAddr,
    /// A domain the server is responsible for (repeatable).
    #[arg(long = "domain", value_name = "NAME")]
    domains: Vec<String>,
    /// SCRIPT is a Lua test file using `moonroute.run(...)` (see docs/scripting.md).
    #[arg(long)]
    lua: bool,
    /// Stamp received/rport only when the Via asks for rport, as the server does with
    /// `[nat] force_rport = false` (by default rport is recorded on every UDP request).
    #[arg(long)]
    no_force_rport: bool,
}

#[derive(Args, Debug)]
struct CtlArgs {
    /// Configuration file naming the control socket.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The control socket (overrides the configuration).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The command and its arguments: reload, status, stats [PREFIX] (metric samples, e.g.
    /// `stats moonroute_transactions`), ul show [AOR], ul rm AOR [CONTACT],
    /// ul add AOR CONTACT [EXPIRES], ul count, user add USER@DOMAIN [PASSWORD] [--realm
    /// REALM] (the password is read from stdin when not given), user rm USER@DOMAIN, user list,
    /// ds list [SET], ds set URI active|inactive|disabled|probing, ds reload, kv get KEY,
    /// kv set KEY VALUE [TTL], kv del KEY, kv list [PREFIX].
    #[arg(required = true, trailing_var_arg = true)]
    command: Vec<String>,
}

/// Flags of `run`; each one given overrides the configuration file.
#[derive(Args, Debug, Default)]
struct RunArgs {
    /// Configuration file (TOML). Without it, the defaults are used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. udp:127.0.0.1:5060, tcp:[::1]:5060, tls:..., ws:127.0.0.1:8080
    /// or wss:... (SIP over WebSocket), with what it
    /// advertises when that is not its own: udp:0.0.0.0:5060,advertise=sip.example.com:5060
    /// (repeatable; replaces the file's list).
    #[arg(long, value_name = "TRANSPORT:IP:PORT[,advertise=HOST[:PORT]]")]
    listen: Vec<ListenAddr>,
    /// The address peers reach this server at, for every listener without an advertise= of
    /// its own (in Via, Record-Route and keep-alives); without a port, each listener's own.
    // An empty value (`-e MOONROUTE_ADVERTISE=` with nothing after it) is no address: a
    // wildcard listener is then refused with the message saying how to name one.
    #[arg(long, value_name = "HOST[:PORT]", env = "MOONROUTE_ADVERTISE", value_parser = advertise_or_empty)]
    advertise: Option<AdvertiseArg>,
    /// The Lua routing script.
    #[arg(long, value_name = "FILE")]
    script: Option<PathBuf>,
    /// Directory for the server's data.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// A domain this server is responsible for (repeatable; replaces the file's list).
    #[arg(long = "domain", value_name = "NAME")]
    domains: Vec<String>,
    /// Log level or tracing filter (RUST_LOG wins if set).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Event loops; 0 means one per CPU core.
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Relay every new request (but OPTIONS to this server) to this SIP URI, e.g.
    /// sip:127.0.0.1:5080 (the built-in router, for labs: it replaces the routing script).
    #[arg(long, value_name = "URI")]
    static_route: Option<String>,
    /// The control socket for `moonroute ctl` (an empty value disables it).
    // clap's PathBuf parser refuses "", which is the documented way to turn the socket off.
    #[arg(long, value_name = "PATH", value_parser = path_or_empty)]
    control_socket: Option<PathBuf>,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9060 (an
    /// empty value turns the endpoint off).
    #[arg(long, value_name = "IP:PORT")]
    metrics_listen: Option<String>,
    /// Log line format: human (the default) or json (one object per line).
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Keep registrations on this Redis server, shared with other nodes
    /// (`[location] store = "redis"`), e.g. redis://127.0.0.1:6379/0.
    #[arg(long, value_name = "URL")]
    location_redis: Option<String>,
    /// Keep `sip.kv` on this Redis server, shared with other nodes (`[kv] backend = "redis"`).
    #[arg(long, value_name = "URL")]
    kv_redis: Option<String>,
}

impl RunArgs {
    fn into_parts(self) -> (Option<PathBuf>, Overrides) {
        let overrides = Overrides {
            listen: self.listen,
            advertise: self.advertise.and_then(|arg| arg.0),
            domains: self.domains,
            script: self.script,
            data_dir: self.data_dir,
            log_level: self.log_level,
            workers: self.workers,
            static_route: self.static_route,
            control_socket: self.control_socket,
            metrics_listen: self.metrics_listen,
            log_format: self.log_format,
            location_redis: self.location_redis,
            kv_redis: self.kv_redis,
        };
        (self.config, overrides)
    }
}

/// `--advertise`: an address, or none when empty.
#[derive(Clone, Debug)]
struct AdvertiseArg(Option<Advertise>);

fn advertise_or_empty(text: &str) -> Result<AdvertiseArg, String> {
    match text.trim() {
        "" => Ok(AdvertiseArg(None)),
        text => text
            .parse()
            .map(Some)
            .map(AdvertiseArg)
            .map_err(|e| e.to_string()),
    }
}

/// A path argument that may be empty (meaning "off").
fn path_or_empty(text: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(text))
}

fn main() -> ExitCode {
    // The process-wide rustls provider, for any TLS use that does not name one (moonroute's
    // own configurations name ring explicitly). An error only means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Run(args)) => args,
        None => RunArgs::default(),
        Some(Command::Check { script }) => return check(&script),
        Some(Command::Test(args)) => return test(args),
        Some(Command::Ctl(args)) => return ctl(args),
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("moonroute: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<(), Box<dyn Error>> {
    let (config_file, overrides) = args.into_parts();
    let mut config = match &config_file {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.apply(overrides);
    config.validate()?;
    init_logging(&config.log_level, config.log_format)?;
    // What an operator set up and others can read (what moonroute creates is private anyway).
    moonroute::file_modes::warn_at_start(&config.secret_files(config_file.as_deref()));
    for deprecated in config.limits.deprecations() {
        warn!("{deprecated}");
    }

    let Wiring {
        host,
        metrics,
        factory,
    } = Wiring::from_config(&config)?;
    let dialogs = factory.dialog_directory();
    let server = Server::start(&config, factory)?;
    for listen in server.listen_addrs() {
        let advertise = config
            .advertise_of(listen)
            .map(|a| format!("{}:{}", a.host(), a.port_for(listen.addr.port())));
        info!(listen = %listen.socket(), advertise, "listening");
    }
    info!(
        workers = server.worker_count(),
        script = %config.script.display(),
        script_version = host.version(),
        data_dir = %config.data_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "moonroute running"
    );

    let signal = serve_until_termination(&config, &host, &metrics, &dialogs)?;
    info!(signal, "shutting down");
    server.shutdown();
    info!("stopped");
    Ok(())
}

fn check(script: &std::path::Path) -> ExitCode {
    match offline::check(script) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn test(args: TestArgs) -> ExitCode {
    let result = if args.lua {
        offline::run_lua_tests(&args.script)
    } else {
        let options = offline::TestOptions {
            source: args.source,
            domains: args.domains,
            location: args.location,
            force_rport: !args.no_force_rport,
            subscribers: args.subscribers,
            clock: None,
        };
        let message = args.message.unwrap_or_default();
        offline::test_message(&args.script, &message, &options)
    };
    match result {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn ctl(args: CtlArgs) -> ExitCode {
    let socket = match (args.socket, args.config) {
        (Some(socket), _) => socket,
        (None, Some(path)) => match Config::load(&path) {
            Ok(config) => config.control.socket,
            Err(error) => {
                eprintln!("moonroute: {error}");
                return ExitCode::from(2);
            }
        },
        (None, None) => Config::default().control.socket,
    };
    // `user add`: the password becomes HA1 values here; it never reaches the socket.
    let command = match moonroute::control::user::client_args(&args.command, || {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    }) {
        Ok(command) => command,
        Err(error) => {
            eprintln!("moonroute: {error}");
            return ExitCode::from(2);
        }
    };
    let code = moonroute::control::ctl_main(&socket, &command);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Runs the server's management side until SIGINT or SIGTERM: reloads on SIGHUP, on a change
/// of the script file, and on `moonroute ctl reload`. Returns the terminating signal's name.
fn serve_until_termination(
    config: &Config,
    host: &Arc<ScriptHost>,
    metrics: &Arc<EngineMetrics>,
    dialogs: &Arc<moonroute::dialog::Directory>,
) -> Result<&'static str, Box<dyn Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let _metrics_endpoint = match config.metrics.listen_addr() {
            None => None,
            Some(addr) => Some(
                MetricsEndpoint::bind(addr, Arc::clone(metrics.registry()))
                    .await
                    .map_err(|e| format!("cannot serve metrics on {addr} (metrics.listen): {e}"))?,
            ),
        };
        let _control = match config.control.socket.as_os_str().is_empty() {
            true => None,
            false => {
                let handler =
                    control_handler(host.clone(), Arc::clone(metrics), Arc::clone(dialogs));
                let server = ControlServer::bind(&config.control.socket, handler)
                    .await
                    .map_err(|e| {
                        format!("control socket {}: {e}", config.control.socket.display())
                    })?;
                info!(socket = %config.control.socket.display(), "control socket ready");
                Some(server)
            }
        };
        if config.lua.watch {
            let mut watcher = ScriptWatcher::start(
                &config.script,
                Duration::from_millis(config.lua.reload_debounce_ms),
            )?;
            let host = host.clone();
            tokio::spawn(async move {
                loop {
                    watcher.changed().await;
                    info!(script = %host.path().display(), "script file changed");
                    let _ = host.reload();
                }
            });
        }
        tokio::spawn(sweep_expired(host.clone()));
        wait_for_signals(host).await.map_err(Into::into)
    })
}

/// Removes expired `sip.kv` entries and registrations every few seconds, so memory follows
/// what is live (lookups already ignore expired entries).
async fn sweep_expired(host: Arc<ScriptHost>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let services = host.services().clone();
        // The location sweep writes to disk: off this runtime, which also serves the control
        // socket and the signals.
        let swept = tokio::task::spawn_blocking(move || {
            let keys = services.kv.sweep(std::time::Instant::now());
            if let Some(auth) = &services.auth {
                auth.sweep(std::time::SystemTime::now());
            }
            let bindings = services
                .registrar
                .as_ref()
                .map_or(0, |r| r.store().sweep(std::time::SystemTime::now()));
            (keys, bindings)
        })
        .await;
        match swept {
            Ok((keys, bindings)) if keys + bindings > 0 => {
                tracing::debug!(keys, bindings, "expired entries removed");
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "the sweep of expired entries failed"),
        }
    }
}

/// What `moonroute ctl` can ask, for the error replies.
const COMMANDS: &str =
    "reload, status, stats [PREFIX], ul show|rm|add|count, user add|rm|list, dlg list|show|end|count, \
     ds list|set|reload, kv get|set|del|list";

fn control_handler(
    host: Arc<ScriptHost>,
    metrics: Arc<EngineMetrics>,
    dialogs: Arc<moonroute::dialog::Directory>,
) -> moonroute::control::Handler {
    Arc::new(
        move |args: &[String]| match args.first().map(String::as_str) {
            Some("reload") => match host.reload() {
                Ok(version) => Reply::ok(format!(
                    "script {} reloaded: version {version}",
                    host.path().display()
                )),
                Err(error) => Reply::error(format!(
                    "script refused, version {} keeps serving: {error}",
                    host.version()
                )),
            },
            Some("status") => {
                let (reloads, failed) = host.reload_counts();
                let registrar = host.services().registrar.as_ref();
                let bindings = registrar.map_or(0, |r| r.store().count());
                let location_health = registrar
                    .and_then(|r| r.store().health())
                    .map_or_else(String::new, |h| format!(", {h}"));
                let kv_health = format!("kv: {}\n", host.services().kv.health());
                let cluster = host
                    .services()
                    .cluster
                    .as_ref()
                    .map_or_else(String::new, |node| {
                        let alive = node.alive();
                        format!(
                            "cluster: this node {}, {} alive: {}\n",
                            node.uri(),
                            alive.len(),
                            alive.join(" ")
                        )
                    });
                let subscribers = host
                    .services()
                    .auth
                    .as_ref()
                    .map_or(0, |a| a.subscribers().count());
                Reply::ok(format!(
                "moonroute {}\nuptime: {}\nscript: {} (version {})\nreloads: {reloads} accepted, {failed} refused\nlive transactions: {}\nlocation: {bindings} bindings{location_health}\n{kv_health}{cluster}subscribers: {subscribers}\n",
                env!("CARGO_PKG_VERSION"),
                uptime_text(metrics.uptime()),
                host.path().display(),
                host.version(),
                metrics.transactions.live(),
            ))
            }
            Some("stats") => moonroute::control::stats::command(&args[1..], metrics.registry()),
            Some("dlg") => {
                moonroute::control::dlg::command(&args[1..], &dialogs, SystemTime::now())
            }
            // The control server runs this handler on tokio's blocking pool (spawn_blocking),
            // never on a SIP event loop: `ul`'s wait for the disk flush (at most 10 s, see
            // `control::ul`) blocks only that pool thread, so no `block_in_place` is needed.
            Some("ul") => match &host.services().registrar {
                Some(registrar) => {
                    moonroute::control::ul::command(&args[1..], registrar, SystemTime::now())
                }
                None => Reply::error("ul: this server has no registrar (no location database)"),
            },
            Some("user") => match &host.services().auth {
                Some(auth) => moonroute::control::user::command(&args[1..], auth),
                None => Reply::error("user: this server has no subscriber table"),
            },
            Some("ds") => moonroute::control::ds::command(
                &args[1..],
                &host.services().dispatcher,
                std::time::Instant::now(),
            ),
            Some("kv") => moonroute::control::kv::command(
                &args[1..],
                &host.services().kv,
                std::time::Instant::now(),
            ),
            Some(other) => Reply::error(format!("unknown command {other:?}; commands: {COMMANDS}")),
            None => Reply::error(format!("no command given; commands: {COMMANDS}")),
        },
    )
}

/// An uptime as `2d 3h 4m 5s` (days and hours only when non-zero), then in seconds.
fn uptime_text(uptime: Duration) -> String {
    let secs = uptime.as_secs();
    let (days, hours, minutes, seconds) =
        (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let mut text = String::new();
    if days > 0 {
        text.push_str(&format!("{days}d "));
    }
    if days > 0 || hours > 0 {
        text.push_str(&format!("{hours}h "));
    }
    format!("{text}{minutes}m {seconds}s ({secs} s)")
}

/// Logs to stderr, filtered by `RUST_LOG` if set, else by the configured `log_level`, as
/// human-readable lines or (`log_format = "json"`) one JSON object per line: timestamp, level,
/// target, the event's fields (top-level keys), and the current span's fields under `span` (the
/// `sip` span's `call_id` on every line about one message).
fn init_logging(log_level: &str, format: LogFormat) -> Result<(), Box<dyn Error>> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(&directives)
            .map_err(|error| format!("invalid RUST_LOG {directives:?}: {error}"))?,
        _ => EnvFilter::try_new(log_level)
            .map_err(|error| format!("invalid log_level {log_level:?}: {error}"))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        // Colour only for a person at a terminal: escape codes make log files and journals
        // unreadable.
        LogFormat::Human => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    Ok(())
}

/// Waits for SIGINT or SIGTERM (returning its name), reloading the script on every SIGHUP.
async fn wait_for_signals(host: &Arc<ScriptHost>) -> std::io::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut hangup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                result = tokio::signal::ctrl_c() => return result.map(|()| "SIGINT"),
                _ = terminate.recv() => return Ok("SIGTERM"),
                _ = hangup.recv() => {
                    info!("SIGHUP: reloading the script");
                    let _ = host.reload();
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = host;
        tokio::signal::ctrl_c().await.map(|()| "interrupt")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_subcommand_means_run_with_defaults() {
        let cli = Cli::try_parse_from(["moonroute"]).unwrap();
        assert!(cli.command.is_none());
    }

    #[test]
    fn run_flags_become_overrides() {
        let cli = Cli::try_parse_from([
            "moonroute",
            "run",
            "--config",
            "m.toml",
            "--listen",
            "udp:127.0.0.1:5070",
            "--listen",
            "tcp:[::1]:5070",
            "--script",
            "r.lua",
            "--data-dir",
            "d",
            "--domain",
            "a.example",
            "--domain",
            "b.example",
            "--log-level",
            "debug",
            "--workers",
            "2",
            "--log-format",
            "json",
        ])
        .unwrap();
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run");
        };
        let (config_file, overrides) = args.into_parts();
        assert_eq!(config_file, Some(PathBuf::from("m.toml")));
        assert_eq!(
            overrides.listen,
            vec![
                "udp:127.0.0.1:5070".parse().unwrap(),
                "tcp:[::1]:5070".parse().unwrap()
            ]
        );
        assert_eq!(overrides.domains, ["a.example", "b.example"]);
        assert_eq!(overrides.script, Some(PathBuf::from("r.lua")));
        assert_eq!(overrides.data_dir, Some(PathBuf::from("d")));
        assert_eq!(overrides.log_level.as_deref(), Some("debug"));
        assert_eq!(overrides.workers, Some(2));
        assert_eq!(overrides.log_format, Some(LogFormat::Json));
    }

    #[test]
    fn an_unknown_log_format_is_rejected() {
        let error = Cli::try_parse_from(["moonroute", "run", "--log-format", "xml"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("expected human or json"), "{error}");
    }

    #[test]
    fn ctl_passes_the_ul_arguments_through() {
        let cli = Cli::try_parse_from([
            "moonroute",
            "ctl",
            "--socket",
            "x.ctl",
            "ul",
            "add",
            "sip:alice@example.com",
            "<sip:alice@192.0.2.1;transport=tcp>",
            "0",
        ])
        .unwrap();
        let Some(Command::Ctl(args)) = cli.command else {
            panic!("expected ctl");
        };
        assert_eq!(
            args.command,
            [
                "ul",
                "add",
                "sip:alice@example.com",
                "<sip:alice@192.0.2.1;transport=tcp>",
                "0"
            ]
        );
    }

    #[test]
    fn metrics_listen_flag_becomes_an_override() {
        let cli = Cli::try_parse_from(["moonroute", "run", "--metrics-listen", "127.0.0.1:9061"])
            .unwrap();
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run");
        };
        let (_, overrides) = args.into_parts();
        assert_eq!(overrides.metrics_listen.as_deref(), Some("127.0.0.1:9061"));
    }

    #[test]
    fn uptime_reads_as_days_hours_minutes_seconds() {
        assert_eq!(uptime_text(Duration::from_secs(5)), "0m 5s (5 s)");
        assert_eq!(uptime_text(Duration::from_secs(3723)), "1h 2m 3s (3723 s)");
        assert_eq!(
            uptime_text(Duration::from_secs(2 * 86_400 + 7)),
            "2d 0h 0m 7s (172807 s)"
        );
    }

    #[test]
    fn an_empty_control_socket_turns_it_off() {
        let cli = Cli::try_parse_from(["moonroute", "run", "--control-socket", ""]).unwrap();
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run");
        };
        let (_, overrides) = args.into_parts();
        assert_eq!(overrides.control_socket, Some(PathBuf::new()));
    }

    #[test]
    fn advertised_addresses_are_flags_too() {
        let cli = Cli::try_parse_from([
            "moonroute",
            "run",
            "--listen",
            "udp:0.0.0.0:5060,advertise=sip.example.com:5060",
            "--listen",
            "tcp:0.0.0.0:5060",
            "--advertise",
            "203.0.113.7",
        ])
        .unwrap();
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run");
        };
        let (_, overrides) = args.into_parts();
        assert_eq!(
            overrides.listen[0].advertise,
            Some("sip.example.com:5060".parse().unwrap())
        );
        assert_eq!(overrides.listen[1].advertise, None);
        assert_eq!(overrides.advertise, Some("203.0.113.7".parse().unwrap()));
        let error = Cli::try_parse_from(["moonroute", "run", "--advertise", "0.0.0.0"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("expected HOST[:PORT]"), "{error}");
        let cli = Cli::try_parse_from(["moonroute", "run", "--advertise", ""]).unwrap();
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run");
        };
        assert_eq!(args.into_parts().1.advertise, None, "empty: none");
    }

    #[test]
    fn a_bad_listen_flag_is_rejected() {
        let error = Cli::try_parse_from(["moonroute", "run", "--listen", "udp:nowhere"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("expected TRANSPORT:IP:PORT"), "{error}");
    }
}
