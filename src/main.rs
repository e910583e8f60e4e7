//! The `moonroute` command: loads the configuration, starts the server, and runs until
//! SIGINT or SIGTERM.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tracing::info;
use tracing_subscriber::EnvFilter;

use moonroute::config::{Config, Overrides};
use moonroute::server::core::CoreFactory;
use moonroute::server::Server;
use moonroute::transport::ListenAddr;

#[derive(Parser, Debug)]
#[command(name = "moonroute", version, about = "A scriptable SIP server")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (the default when no command is given).
    Run(RunArgs),
}

/// Flags of `run`; each one given overrides the configuration file.
#[derive(Args, Debug, Default)]
struct RunArgs {
    /// Configuration file (TOML). Without it, the defaults are used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. udp:127.0.0.1:5060 or tcp:[::1]:5060 (repeatable;
    /// replaces the file's list).
    #[arg(long, value_name = "TRANSPORT:IP:PORT")]
    listen: Vec<ListenAddr>,
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
    /// sip:127.0.0.1:5080 (the built-in router, until routing scripts land).
    #[arg(long, value_name = "URI")]
    static_route: Option<String>,
    /// The control socket for `moonroute ctl` (an empty value disables it).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
}

impl RunArgs {
    fn into_parts(self) -> (Option<PathBuf>, Overrides) {
        let overrides = Overrides {
            listen: self.listen,
            domains: self.domains,
            script: self.script,
            data_dir: self.data_dir,
            log_level: self.log_level,
            workers: self.workers,
            static_route: self.static_route,
            control_socket: self.control_socket,
        };
        (self.config, overrides)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Run(args)) => args,
        None => RunArgs::default(),
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
    init_logging(&config.log_level)?;

    let factory = Arc::new(CoreFactory::new(&config));
    let server = Server::start(&config, factory)?;
    for listen in server.listen_addrs() {
        info!(%listen, "listening");
    }
    info!(
        workers = server.worker_count(),
        script = %config.script.display(),
        data_dir = %config.data_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "moonroute running"
    );

    let signal = wait_for_termination()?;
    info!(signal, "shutting down");
    server.shutdown();
    info!("stopped");
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` if set, else by the configured `log_level`.
fn init_logging(log_level: &str) -> Result<(), Box<dyn Error>> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(&directives)
            .map_err(|error| format!("invalid RUST_LOG {directives:?}: {error}"))?,
        _ => EnvFilter::try_new(log_level)
            .map_err(|error| format!("invalid log_level {log_level:?}: {error}"))?,
    };
    // Colour only for a person at a terminal: escape codes make log files and journals unreadable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    Ok(())
}

/// Blocks until SIGINT or SIGTERM; returns the signal's name.
fn wait_for_termination() -> std::io::Result<&'static str> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut terminate = signal(SignalKind::terminate())?;
            tokio::select! {
                result = tokio::signal::ctrl_c() => result.map(|()| "SIGINT"),
                _ = terminate.recv() => Ok("SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c().await.map(|()| "interrupt")
        }
    })
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
    }

    #[test]
    fn a_bad_listen_flag_is_rejected() {
        let error = Cli::try_parse_from(["moonroute", "run", "--listen", "udp:nowhere"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("expected TRANSPORT:IP:PORT"), "{error}");
    }
}
