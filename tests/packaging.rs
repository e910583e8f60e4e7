//! Packaging: `moonroute --version`, the systemd unit and its configuration
//! (`contrib/moonroute.service`, `contrib/moonroute.toml`), and the Docker image
//! (`Dockerfile`, `contrib/docker.toml`).
//!
//! The files are checked for the invariants docs/deploying.md promises (non-root, paths the sandbox
//! lets the server write, the config the commands name), and the shipped configurations are
//! run for real: the real binary, started with the unit's `ExecStart` arguments and the image's
//! `CMD` on the shipped file (its absolute paths moved into a temporary directory, its ports
//! to free ones on 127.0.0.1), answers the unit's `ExecReload` and the image's `HEALTHCHECK`
//! commands, and stops with status 0 on the stop signal both name.
//!
//! The documentation that ships with them is checked too: `moonroute.example.toml`, the
//! configuration reference, documents every key with its default, and every relative link of
//! README.md and docs/*.md resolves.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use moonroute::config::{Config, Overrides};
use tempfile::TempDir;

/// How long the server may take to start, or to stop after SIGTERM (a debug build on a busy
/// 2-core machine).
const PATIENCE: Duration = Duration::from_secs(30);

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn moonroute(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moonroute"))
        .args(args)
        .output()
        .expect("run moonroute")
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

// ---- moonroute --version ----------------------------------------------------------------

/// The Lua release `-V` names, checked against the Lua the binary embeds: `_VERSION` is
/// "Lua 5.4" (mlua does not expose the third number; build.rs reads it from the vendored
/// `lua.h`).
#[test]
fn version_names_moonroute_and_the_embedded_lua_release() {
    let lua_version: String = mlua::Lua::new().globals().get("_VERSION").unwrap();
    assert_eq!(lua_version, "Lua 5.4");

    let short = moonroute(&["-V"]);
    assert!(short.status.success(), "{}", text(&short));
    let line = String::from_utf8(short.stdout).unwrap();
    let prefix = format!("moonroute {} (Lua 5.4.", env!("CARGO_PKG_VERSION"));
    let release = line
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("`moonroute -V` printed {line:?}, expected {prefix}N)"));
    assert!(
        !release.is_empty() && release.bytes().all(|b| b.is_ascii_digit()),
        "{line:?}"
    );

    // --version: the same first line, then the commit when the build knew it.
    let long = moonroute(&["--version"]);
    assert!(long.status.success(), "{}", text(&long));
    let long = String::from_utf8(long.stdout).unwrap();
    let mut lines = long.lines();
    assert_eq!(lines.next(), Some(line.trim_end()));
    if let Some(commit) = lines.next() {
        let hash = commit.strip_prefix("commit ").unwrap_or(commit);
        assert!(
            hash.len() >= 7 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "second line of --version: {commit:?}"
        );
    }
    assert_eq!(lines.next(), None, "{long:?}");
}

// ---- the systemd unit ---------------------------------------------------------------------

/// A systemd unit file: `(section, key, value)` in order, comments and blank lines left out.
/// (The shipped unit uses no line continuations; a stray one would be caught as a bad key.)
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not KEY=VALUE: {line:?}"));
        assert!(
            key.trim().bytes().all(|b| b.is_ascii_alphanumeric()),
            "bad key in {line:?}"
        );
        entries.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    entries
}

struct Unit(Vec<(String, String, String)>);

impl Unit {
    fn load() -> Unit {
        Unit(unit_entries(&repo_file("contrib/moonroute.service")))
    }

    /// The values of `key` in `[Service]` (a key may be given several times).
    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(section, k, _)| section == "Service" && k == key)
            .map(|(_, _, value)| value.as_str())
            .collect()
    }

    /// The value of `key` in `[Service]`, which must be given once.
    fn one(&self, key: &str) -> &str {
        match self.all(key).as_slice() {
            [value] => value,
            other => panic!("[Service] {key}: expected one value, found {other:?}"),
        }
    }

    /// What the sandbox (ProtectSystem=strict) lets the service write.
    fn writable_paths(&self) -> Vec<PathBuf> {
        let words = |key: &str| -> Vec<String> {
            self.all(key)
                .iter()
                .flat_map(|value| value.split_whitespace())
                .map(|word| word.trim_start_matches(['-', '+']).to_owned())
                .collect()
        };
        let mut paths: Vec<PathBuf> = Vec::new();
        paths.extend(
            words("StateDirectory")
                .iter()
                .map(|d| Path::new("/var/lib").join(d)),
        );
        paths.extend(
            words("RuntimeDirectory")
                .iter()
                .map(|d| Path::new("/run").join(d)),
        );
        paths.extend(words("ReadWritePaths").iter().map(PathBuf::from));
        paths
    }
}

/// `--config FILE` in a command line.
fn config_argument(command: &str) -> Option<&str> {
    let words: Vec<&str> = command.split_whitespace().collect();
    words
        .windows(2)
        .find(|pair| pair[0] == "--config")
        .map(|pair| pair[1])
}

#[test]
fn the_unit_runs_the_shipped_config_sandboxed_and_unprivileged() {
    let unit = Unit::load();
    let exec_start = unit.one("ExecStart");
    let words: Vec<&str> = exec_start.split_whitespace().collect();
    assert_eq!(
        words[..2],
        ["/usr/local/bin/moonroute", "run"],
        "{exec_start}"
    );
    let config_path = config_argument(exec_start).expect("ExecStart names --config");
    assert_eq!(config_path, "/etc/moonroute/moonroute.toml");
    // The reload goes to the same server: the control socket of the same file.
    let exec_reload = unit.one("ExecReload");
    assert!(
        exec_reload.starts_with("/usr/local/bin/moonroute ctl ")
            && exec_reload.ends_with(" reload"),
        "{exec_reload}"
    );
    assert_eq!(config_argument(exec_reload), Some(config_path));

    let config = Config::parse(&repo_file("contrib/moonroute.toml")).unwrap();
    config.validate().unwrap();

    // Every path the server writes is one the sandbox leaves writable; the script sits next
    // to the config (read-only is enough).
    let writable = unit.writable_paths();
    let is_writable = |path: &Path| writable.iter().any(|dir| path.starts_with(dir));
    for (key, path) in [
        ("data_dir", config.data_dir.as_path()),
        ("control.socket", config.control.socket.parent().unwrap()),
        ("WorkingDirectory", Path::new(unit.one("WorkingDirectory"))),
    ] {
        assert!(path.is_absolute(), "{key} = {}: relative", path.display());
        assert!(
            is_writable(path),
            "{key} = {} is not under {writable:?}",
            path.display()
        );
    }
    assert!(config.script.is_absolute());
    assert_eq!(config.script.parent(), Path::new(config_path).parent());
    assert!(
        config.tls.certificate.as_os_str().is_empty()
            && config.tls.private_key.as_os_str().is_empty()
    );

    // Unprivileged: a user of its own, no capabilities unless a port below 1024 needs one.
    let user = unit.one("User");
    assert!(
        !user.is_empty() && user != "root" && user != "0",
        "User={user}"
    );
    assert_eq!(unit.one("NoNewPrivileges"), "yes");
    assert_eq!(unit.one("ProtectSystem"), "strict");
    let low_port = config.listen.iter().any(|l| l.addr.port() < 1024);
    let capabilities = unit.one("CapabilityBoundingSet");
    if low_port {
        assert_eq!(capabilities, "CAP_NET_BIND_SERVICE");
    } else {
        assert_eq!(
            capabilities, "",
            "no listen port below 1024 needs a capability"
        );
    }
    for key in [
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "MemoryDenyWriteExecute",
    ] {
        assert_eq!(unit.one(key), "yes", "{key}");
    }
    // MemoryDenyWriteExecute holds because the Lua is PUC Lua 5.4 (an interpreter), never
    // LuaJIT.
    let manifest = repo_file("Cargo.toml");
    let mlua_line = manifest
        .lines()
        .find(|line| line.starts_with("mlua ="))
        .expect("mlua in Cargo.toml");
    assert!(
        mlua_line.contains("\"lua54\"") && !mlua_line.contains("luajit"),
        "{mlua_line}"
    );

    // The sockets it opens: IPv4/IPv6 for SIP, DNS and metrics, Unix for control and journal.
    let families: BTreeSet<&str> = unit
        .one("RestrictAddressFamilies")
        .split_whitespace()
        .collect();
    assert_eq!(families, BTreeSet::from(["AF_INET", "AF_INET6", "AF_UNIX"]));
    assert!(unit.all("SystemCallFilter").contains(&"@system-service"));
    // One descriptor per connection, with room for the rest.
    let files: usize = unit.one("LimitNOFILE").parse().unwrap();
    assert!(
        files >= config.limits.max_connections + 1024,
        "LimitNOFILE={files}"
    );
    assert_eq!(unit.one("Restart"), "on-failure");
    assert_eq!(unit.one("KillSignal"), "SIGTERM");

    // Metrics stay on loopback in the shipped config.
    let metrics = config.metrics.listen_addr().expect("metrics on");
    assert!(metrics.ip().is_loopback(), "{metrics}");
}

/// `systemd-analyze verify` on the unit, in a scratch root holding the system's units (for
/// the targets it names) and an executable at the binary's path. Skipped, saying so, when
/// systemd-analyze is not installed.
#[test]
fn systemd_analyze_verifies_the_unit() {
    let Ok(status) = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
    else {
        eprintln!("systemd-analyze is not installed: unit not verified (apt-get install systemd)");
        return;
    };
    assert!(status.success());
    let root = TempDir::new().unwrap();
    let units = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    for name in [
        "multi-user.target",
        "network-online.target",
        "sysinit.target",
        "basic.target",
        "shutdown.target",
    ] {
        for dir in ["/usr/lib/systemd/system", "/lib/systemd/system"] {
            if let Ok(text) = std::fs::read_to_string(Path::new(dir).join(name)) {
                std::fs::write(units.join(name), text).unwrap();
                break;
            }
        }
    }
    let bin = root.path().join("usr/local/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("moonroute"), "#!/bin/sh\n").unwrap();
    set_executable(&bin.join("moonroute"));
    let etc = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("moonroute.service"),
        repo_file("contrib/moonroute.service"),
    )
    .unwrap();

    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .arg("/etc/systemd/system/moonroute.service")
        .output()
        .unwrap();
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "{}",
        text(&output)
    );
}

fn set_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

// ---- the Docker image ---------------------------------------------------------------------

/// One Dockerfile instruction: its keyword (upper case) and its arguments, continuation lines
/// joined.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(start) = trimmed.strip_suffix('\\') {
            pending.push_str(start);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let (keyword, args) = pending
            .split_once(char::is_whitespace)
            .unwrap_or((&pending, ""));
        instructions.push((keyword.to_ascii_uppercase(), args.trim().to_owned()));
        pending.clear();
    }
    assert!(pending.is_empty(), "the Dockerfile ends in a continuation");
    instructions
}

/// A JSON-array (exec form) argument list, e.g. `["run", "--config", "x"]`; simple strings only.
fn exec_form(args: &str) -> Vec<String> {
    let inner = args
        .trim()
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or_else(|| panic!("not the exec form: {args}"));
    inner
        .split(',')
        .map(|word| {
            let word = word.trim();
            assert!(
                word.len() >= 2 && word.starts_with('"') && word.ends_with('"'),
                "{args}"
            );
            word[1..word.len() - 1].to_owned()
        })
        .collect()
}

struct Image {
    /// The instructions of the last stage (the image that runs).
    run_stage: Vec<(String, String)>,
    stages: Vec<String>,
}

impl Image {
    fn load() -> Image {
        let all = dockerfile_instructions(&repo_file("Dockerfile"));
        let stages: Vec<String> = all
            .iter()
            .filter(|(k, _)| k == "FROM")
            .map(|(_, args)| args.clone())
            .collect();
        let last_from = all.iter().rposition(|(k, _)| k == "FROM").expect("a FROM");
        Image {
            run_stage: all[last_from..].to_vec(),
            stages,
        }
    }

    fn last(&self, keyword: &str) -> Option<&str> {
        self.run_stage
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, args)| args.as_str())
    }

    fn position(&self, keyword: &str) -> Option<usize> {
        self.run_stage.iter().rposition(|(k, _)| k == keyword)
    }

    /// Where `COPY SOURCE DEST` (no `--from`) puts `source`.
    fn copied_to(&self, source: &str) -> String {
        self.run_stage
            .iter()
            .filter(|(k, _)| k == "COPY")
            .map(|(_, args)| args.split_whitespace().collect::<Vec<_>>())
            .find(|words| words.len() == 2 && words[0] == source)
            .map(|words| words[1].to_owned())
            .unwrap_or_else(|| panic!("the run stage does not COPY {source}"))
    }

    /// ENTRYPOINT followed by CMD: the command the container runs.
    fn command(&self) -> Vec<String> {
        let mut command = exec_form(self.last("ENTRYPOINT").expect("ENTRYPOINT"));
        command.extend(exec_form(self.last("CMD").expect("CMD")));
        command
    }
}

#[test]
fn the_image_is_multi_stage_non_root_and_runs_its_baked_config() {
    let image = Image::load();
    assert!(image.stages.len() >= 2, "multi-stage: {:?}", image.stages);
    let builder = image.stages[0].split_whitespace().collect::<Vec<_>>();
    assert!(
        builder.len() == 3 && builder[1].eq_ignore_ascii_case("AS"),
        "the first stage is named: {builder:?}"
    );
    assert_eq!(image.stages.last().unwrap(), "debian:bookworm-slim");
    let copies_binary = image
        .run_stage
        .iter()
        .any(|(k, args)| k == "COPY" && args.starts_with(&format!("--from={} ", builder[2])));
    assert!(
        copies_binary,
        "the run stage copies the build stage's binary"
    );

    // Non-root from USER on, and USER comes before what runs.
    let user_at = image.position("USER").expect("a USER");
    let user = image.last("USER").unwrap();
    assert!(
        !["root", "0", "0:0", "root:root"].contains(&user),
        "USER {user}"
    );
    for keyword in ["CMD", "ENTRYPOINT", "HEALTHCHECK"] {
        assert!(
            image.position(keyword).unwrap() > user_at,
            "{keyword} before USER"
        );
    }

    let exposed: BTreeSet<&str> = image
        .run_stage
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, args)| args.split_whitespace())
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from(["5060/udp", "5060/tcp", "9060/tcp"])
    );
    assert_eq!(image.last("STOPSIGNAL"), Some("SIGTERM"));

    // The container runs the baked config, which parses, validates and matches the image.
    let config_path = image.copied_to("contrib/docker.toml");
    let command = image.command();
    assert_eq!(command[..2], ["moonroute", "run"], "{command:?}");
    assert_eq!(
        config_argument(&command.join(" ")),
        Some(config_path.as_str())
    );
    let mut config = Config::parse(&repo_file("contrib/docker.toml")).unwrap();
    // On every address of the container, it advertises what `docker run -e
    // MOONROUTE_ADVERTISE=...` names; without it, it refuses to start and says so.
    let refusal = config.validate().unwrap_err().to_string();
    assert!(refusal.contains("MOONROUTE_ADVERTISE"), "{refusal}");
    config.apply(Overrides {
        advertise: Some("sip.example.com:5060".parse().unwrap()),
        ..Overrides::default()
    });
    config.validate().unwrap();
    assert_eq!(
        config.script.to_str(),
        Some(image.copied_to("scripts/default.lua").as_str())
    );
    let volume = exec_form(image.last("VOLUME").expect("a VOLUME"));
    assert_eq!(volume, [config.data_dir.to_str().unwrap()]);
    // SIP and metrics on every address of the container, on the exposed ports.
    for listen in &config.listen {
        assert!(listen.addr.ip().is_unspecified(), "{listen}");
        assert!(
            exposed.contains(format!("{}/{}", listen.addr.port(), listen.kind.scheme()).as_str()),
            "{listen} not exposed"
        );
    }
    let metrics = config.metrics.listen_addr().expect("metrics on");
    assert!(exposed.contains(format!("{}/tcp", metrics.port()).as_str()));

    // The user can write the data directory and the control socket's directory.
    let setup: String = image
        .run_stage
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, args)| args.as_str())
        .collect();
    for dir in [
        &config.data_dir,
        &config.control.socket.parent().unwrap().to_path_buf(),
    ] {
        let made = format!("-o {user} -g {user} -m 07");
        assert!(
            setup.contains(&format!("{made}00 {}", dir.display()))
                || setup.contains(&format!("{made}50 {}", dir.display())),
            "{} is not created for {user} in a RUN",
            dir.display()
        );
    }

    // The health check asks the running server over its control socket.
    let healthcheck = image.last("HEALTHCHECK").unwrap();
    let (_, check) = healthcheck
        .split_once("CMD ")
        .expect("HEALTHCHECK ... CMD [...]");
    let check = exec_form(check);
    assert_eq!(check[..2], ["moonroute", "ctl"]);
    assert_eq!(check.last().map(String::as_str), Some("status"));
    assert_eq!(
        config_argument(&check.join(" ")),
        Some(config_path.as_str())
    );

    // The build context leaves out build output and history.
    let ignored: Vec<String> = repo_file(".dockerignore")
        .lines()
        .map(str::to_owned)
        .collect();
    for entry in [".git", "target"] {
        assert!(
            ignored.iter().any(|line| line == entry),
            ".dockerignore lacks {entry}"
        );
    }
}

// ---- the shipped configurations, run -----------------------------------------------------

/// A shipped config moved into `dir`: its absolute directories under `dir`, its ports free
/// ones (0), its addresses loopback. The shipped script is copied where the config expects it.
fn relocate(config_text: &str, dir: &Path) -> PathBuf {
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let mut text = config_text.to_owned();
    for (from, to) in [
        ("/etc/moonroute", etc.clone()),
        ("/var/lib/moonroute", dir.join("data")),
        ("/run/moonroute", dir.join("run")),
        ("0.0.0.0:", PathBuf::from("127.0.0.1:")),
        (":5060\"", PathBuf::from(":0\"")),
        (":9060\"", PathBuf::from(":0\"")),
    ] {
        text = text.replace(from, to.to_str().unwrap());
    }
    let config = Config::parse(&text).unwrap();
    config.validate().unwrap();
    for listen in &config.listen {
        assert!(
            listen.addr.ip().is_loopback() && listen.addr.port() == 0,
            "{listen}"
        );
    }
    let metrics: Option<SocketAddr> = config.metrics.listen_addr();
    assert!(metrics.is_none_or(|addr| addr.ip().is_loopback() && addr.port() == 0));
    assert!(config.data_dir.starts_with(dir) && config.control.socket.starts_with(dir));
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/default.lua"),
        &config.script,
    )
    .unwrap();
    let path = etc.join("moonroute.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A `moonroute` started with `args`, once its control socket is ready. Killed if the test
/// ends without stopping it.
struct Running {
    pid: u32,
    /// Receives the exit status once the process has exited.
    exited: mpsc::Receiver<std::process::ExitStatus>,
    status: Option<std::process::ExitStatus>,
    /// Its log (stderr) so far, and a signal for each new line.
    log: std::sync::Arc<(std::sync::Mutex<String>, std::sync::Condvar)>,
}

impl Running {
    fn start(args: &[String]) -> Running {
        let mut command = Command::new(env!("CARGO_BIN_EXE_moonroute"));
        command.args(args);
        Running::spawn(command, None)
    }

    /// Runs `command`, which is moonroute or runs it; with `pid_file`, the command writes
    /// moonroute's pid there before the server starts (the signals go to that process).
    fn spawn(mut command: Command, pid_file: Option<&Path>) -> Running {
        let description = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start moonroute");
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new((std::sync::Mutex::new(String::new()), Default::default()));
        let writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let ready = line.contains("control socket ready");
                let (text, new_line): &(std::sync::Mutex<String>, std::sync::Condvar) = &writer;
                text.lock().unwrap().push_str(&(line + "\n"));
                new_line.notify_all();
                if ready {
                    let _ = ready_tx.send(true);
                }
            }
            let _ = ready_tx.send(false);
        });
        let (exited_tx, exited) = mpsc::channel();
        let mut running = Running {
            pid: child.id(),
            exited,
            status: None,
            log,
        };
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = exited_tx.send(status);
            }
        });
        let ready = ready_rx.recv_timeout(PATIENCE);
        if let Some(pid) = pid_file.and_then(|path| std::fs::read_to_string(path).ok()) {
            running.pid = pid.trim().parse().expect("a pid");
        }
        match ready {
            Ok(true) => running,
            Ok(false) => {
                running.status = running.exited.recv_timeout(PATIENCE).ok();
                panic!(
                    "{description} exited before its control socket was ready:\n{}",
                    running.log()
                );
            }
            Err(_) => panic!("{description}: no control socket within {PATIENCE:?}"),
        }
    }

    fn log(&self) -> String {
        self.log.0.lock().unwrap().clone()
    }

    /// Waits until the log has `count` lines containing `needle`.
    fn wait_for_log(&self, needle: &str, count: usize) {
        let (text, new_line) = &*self.log;
        let (log, timeout) = new_line
            .wait_timeout_while(text.lock().unwrap(), PATIENCE, |log| {
                log.matches(needle).count() < count
            })
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "no {needle:?} (x{count}) in the log within {PATIENCE:?}:\n{log}"
        );
    }

    /// The address it listens on for `transport` ("udp", "tcp"), from its log.
    fn listen_addr(&self, transport: &str) -> SocketAddr {
        let needle = format!("listening listen={transport}:");
        let log = self.log();
        let line = log
            .lines()
            .find(|line| line.contains(&needle))
            .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"));
        let (_, addr) = line.split_once(&needle).unwrap();
        addr.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Sends `signal` (e.g. "TERM") and returns the exit status.
    fn stop_with(&mut self, signal: &str) -> std::process::ExitStatus {
        send_signal(self.pid, signal);
        let status = self
            .exited
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("moonroute still runs {PATIENCE:?} after SIG{signal}"));
        self.status = Some(status);
        status
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Only a process not known to have exited: its pid cannot have been reused yet.
        if self.status.is_none() && self.exited.try_recv().is_err() {
            send_signal(self.pid, "KILL");
            let _ = self.exited.recv_timeout(PATIENCE);
        }
    }
}

/// `kill -SIGNAL pid`, with the system's kill(1): the tests need no libc binding.
fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Runs a command line of the unit or the image (its first word `moonroute`, or the
/// binary's installed path), with the relocated config instead of the shipped one.
fn run_shipped(command: &[String], shipped_config: &str, config: &Path) -> Output {
    let args = run_shipped_args(command, shipped_config, config);
    Command::new(env!("CARGO_BIN_EXE_moonroute"))
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("run moonroute")
}

fn words(command: &str) -> Vec<String> {
    command.split_whitespace().map(str::to_owned).collect()
}

/// The unit's ExecStart on contrib/moonroute.toml serves; its ExecReload reloads the script;
/// `ctl status` answers; its KillSignal stops it cleanly.
#[test]
fn the_unit_commands_drive_a_server_on_the_shipped_config() {
    let unit = Unit::load();
    let dir = TempDir::new().unwrap();
    let config = relocate(&repo_file("contrib/moonroute.toml"), dir.path());
    let shipped = "/etc/moonroute/moonroute.toml";
    let start = words(unit.one("ExecStart"));
    let args: Vec<String> = run_shipped_args(&start, shipped, &config);
    let mut server = Running::start(&args);

    let reload = run_shipped(&words(unit.one("ExecReload")), shipped, &config);
    assert!(reload.status.success(), "ExecReload: {}", text(&reload));
    assert!(
        text(&reload).contains("reloaded: version 2"),
        "{}",
        text(&reload)
    );
    let status = run_shipped(
        &words(&format!("moonroute ctl --config {shipped} status")),
        shipped,
        &config,
    );
    assert!(status.status.success(), "{}", text(&status));
    assert!(text(&status).contains("(version 2)"), "{}", text(&status));

    let signal = unit.one("KillSignal").strip_prefix("SIG").unwrap();
    let exit = server.stop_with(signal);
    assert!(exit.success(), "SIG{signal}: {exit}");
}

/// The image's CMD on contrib/docker.toml serves; its HEALTHCHECK passes; its STOPSIGNAL
/// stops it cleanly.
#[test]
fn the_image_commands_drive_a_server_on_the_baked_config() {
    let image = Image::load();
    let dir = TempDir::new().unwrap();
    let config = relocate(&repo_file("contrib/docker.toml"), dir.path());
    let shipped = image.copied_to("contrib/docker.toml");
    let args = run_shipped_args(&image.command(), &shipped, &config);
    let mut server = Running::start(&args);

    let healthcheck = image.last("HEALTHCHECK").unwrap();
    let (_, check) = healthcheck.split_once("CMD ").unwrap();
    let health = run_shipped(&exec_form(check), &shipped, &config);
    assert!(health.status.success(), "HEALTHCHECK: {}", text(&health));
    assert!(
        text(&health).starts_with(&format!("moonroute {}", env!("CARGO_PKG_VERSION"))),
        "{}",
        text(&health)
    );

    let signal = image
        .last("STOPSIGNAL")
        .unwrap()
        .strip_prefix("SIG")
        .unwrap();
    let exit = server.stop_with(signal);
    assert!(exit.success(), "SIG{signal}: {exit}");
    // Once stopped, the health check fails, with a sentence and a non-zero status.
    let health = run_shipped(&exec_form(check), &shipped, &config);
    assert!(!health.status.success(), "{}", text(&health));
}

/// The arguments after the program name, with the relocated config.
fn run_shipped_args(command: &[String], shipped_config: &str, config: &Path) -> Vec<String> {
    command[1..]
        .iter()
        .map(|arg| match arg == shipped_config {
            true => config.to_str().unwrap().to_owned(),
            false => arg.clone(),
        })
        .collect()
}

// ---- the sandbox, from the inside ---------------------------------------------------------

/// The system calls a `SystemCallFilter=` list allows: its groups expanded by
/// `systemd-analyze syscall-filter`, minus those of `~` lists.
fn allowed_system_calls(filters: &[&str]) -> BTreeSet<String> {
    fn expand(entry: &str) -> BTreeSet<String> {
        if !entry.starts_with('@') {
            return BTreeSet::from([entry.to_owned()]);
        }
        let output = Command::new("systemd-analyze")
            .args(["syscall-filter", entry])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", text(&output));
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .skip(1)
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .flat_map(expand)
            .collect()
    }
    let mut allowed = BTreeSet::new();
    let mut denied = BTreeSet::new();
    for filter in filters {
        match filter.strip_prefix('~') {
            Some(list) => denied.extend(list.split_whitespace().flat_map(expand)),
            None => allowed.extend(filter.split_whitespace().flat_map(expand)),
        }
    }
    &allowed - &denied
}

/// What an strace log (`strace -f -o`) shows a program did after it was executed: the system
/// calls by name, and the breaches of the unit's other limits.
fn traced_breaches(trace: &str, program: &str, allowed: &BTreeSet<String>) -> Vec<String> {
    let exec = format!("execve(\"{program}\"");
    let start = trace
        .lines()
        .position(|line| line.contains(&exec))
        .unwrap_or_else(|| panic!("no {exec} in the trace"));
    let families = ["AF_INET,", "AF_INET6,", "AF_UNIX,"];
    let mut breaches = Vec::new();
    for line in trace.lines().skip(start + 1) {
        // "PID name(args...) = result", or "PID <... name resumed>...".
        let Some(call) = line
            .split_whitespace()
            .nth(1)
            .and_then(|word| word.split_once('('))
            .map(|(name, _)| name)
        else {
            continue;
        };
        if call.is_empty() || !call.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue;
        }
        if !allowed.contains(call) {
            breaches.push(format!("SystemCallFilter: {line}"));
        }
        // MemoryDenyWriteExecute: no mapping both writable and executable.
        if matches!(call, "mmap" | "mprotect" | "pkey_mprotect")
            && line.contains("PROT_WRITE")
            && line.contains("PROT_EXEC")
        {
            breaches.push(format!("MemoryDenyWriteExecute: {line}"));
        }
        if matches!(call, "socket" | "socketpair")
            && !families
                .iter()
                .any(|family| line.contains(&format!("({family}")))
        {
            breaches.push(format!("RestrictAddressFamilies: {line}"));
        }
    }
    breaches
}

/// Whether `strace` can trace here (installed, and ptrace allowed).
fn strace_works() -> bool {
    Command::new("strace")
        .args(["-o", "/dev/null", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A minimal OPTIONS to `to` (RFC 3261 §11) from `from`, over `transport`.
fn options(transport: &str, from: SocketAddr, to: SocketAddr, call_id: &str) -> String {
    format!(
        "OPTIONS sip:{to} SIP/2.0\r\n\
         Via: SIP/2.0/{} {from};branch=z9hG4bK{call_id};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:packaging@{from}>;tag={call_id}\r\n\
         To: <sip:{to}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n",
        transport.to_ascii_uppercase()
    )
}

/// The unit's SystemCallFilter, MemoryDenyWriteExecute and RestrictAddressFamilies, checked
/// without systemd: the server runs the shipped config under strace through start, SIP over
/// UDP and TCP, `ctl status`, `ctl reload` (itself traced: it is ExecReload), a reload on a
/// script change, and SIGTERM, and every system call it made must be one the unit allows.
/// Skipped, saying so, without strace (or ptrace) or systemd-analyze.
#[test]
fn the_server_stays_within_the_units_system_call_filter() {
    if !strace_works()
        || Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!("strace or systemd-analyze unavailable: the unit's filters are not checked");
        return;
    }
    let unit = Unit::load();
    let allowed = allowed_system_calls(&unit.all("SystemCallFilter"));
    assert!(allowed.contains("epoll_wait") && !allowed.contains("reboot"));
    for (key, value) in [
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ] {
        assert_eq!(
            unit.one(key),
            value,
            "the checks below assume {key}={value}"
        );
    }
    let dir = TempDir::new().unwrap();
    let config = relocate(&repo_file("contrib/moonroute.toml"), dir.path());
    let binary = env!("CARGO_BIN_EXE_moonroute");
    let trace = dir.path().join("server.trace");
    let pid_file = dir.path().join("server.pid");
    let mut command = Command::new("strace");
    command
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .args(["sh", "-c", "echo $$ > \"$0\" && exec \"$@\""])
        .arg(&pid_file)
        .arg(binary)
        .args(["run", "--config"])
        .arg(&config);
    let mut server = Running::spawn(command, Some(&pid_file));

    // SIP over UDP and TCP: any answer will do.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(PATIENCE)).unwrap();
    let to = server.listen_addr("udp");
    let request = options("udp", udp.local_addr().unwrap(), to, "packaging-udp");
    udp.send_to(request.as_bytes(), to).unwrap();
    let mut buffer = [0u8; 4096];
    let (size, _) = udp.recv_from(&mut buffer).expect("an answer over UDP");
    assert!(buffer[..size].starts_with(b"SIP/2.0 "));
    {
        use std::io::{Read, Write};
        let to = server.listen_addr("tcp");
        let mut tcp = std::net::TcpStream::connect(to).unwrap();
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
        let request = options("tcp", tcp.local_addr().unwrap(), to, "packaging-tcp");
        tcp.write_all(request.as_bytes()).unwrap();
        let size = tcp.read(&mut buffer).expect("an answer over TCP");
        assert!(buffer[..size].starts_with(b"SIP/2.0 "));
    }

    let ctl = |args: &[&str], trace: Option<&Path>| {
        let mut command = match trace {
            Some(trace) => {
                let mut command = Command::new("strace");
                command.args(["-f", "-qq", "-o"]).arg(trace).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let output = command
            .arg("ctl")
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "ctl {args:?}: {}", text(&output));
    };
    let ctl_trace = dir.path().join("ctl.trace");
    ctl(&["reload"], Some(&ctl_trace));
    ctl(&["status"], None);
    let script = Config::load(&config).unwrap().script;
    let mut text_of_script = std::fs::read_to_string(&script).unwrap();
    text_of_script.push_str("\n-- edited\n");
    std::fs::write(&script, text_of_script).unwrap();
    server.wait_for_log("script reloaded", 2);

    let exit = server.stop_with("TERM");
    assert!(exit.success(), "SIGTERM: {exit}");
    let mut breaches = traced_breaches(&std::fs::read_to_string(&trace).unwrap(), binary, &allowed);
    breaches.extend(traced_breaches(
        &std::fs::read_to_string(&ctl_trace).unwrap(),
        binary,
        &allowed,
    ));
    assert!(
        breaches.is_empty(),
        "outside the unit's sandbox:\n{}",
        breaches.join("\n")
    );
}

// ---- the configuration reference: moonroute.example.toml ---------------------------------

/// Keys the configuration reference must document even though `Config::default()` leaves
/// them unset (so they are not serialized): the deprecated limits and the optional ones, as
/// `section.key`.
const UNSET_BY_DEFAULT: &[&str] = &[
    "advertise",
    "limits.max_inbound_connections",
    "limits.max_connections_per_ip",
    "limits.max_pending_connections_per_ip",
    "limits.max_transactions",
    "limits.max_receive_lag_ms",
    "timers.fr_timer_ms",
    "timers.fr_inv_timer_ms",
];

/// Every `section.key` of a TOML table (top-level keys without a section), tables of tables
/// flattened; an array (of tables too: `[[dispatcher.set]]`) is one key.
fn key_paths(table: &toml::Table, prefix: &str, paths: &mut BTreeSet<String>) {
    for (key, value) in table {
        let path = match prefix {
            "" => key.clone(),
            _ => format!("{prefix}.{key}"),
        };
        match value {
            toml::Value::Table(inner) => key_paths(inner, &path, paths),
            _ => {
                paths.insert(path);
            }
        }
    }
}

/// The keys `moonroute.example.toml` documents, as `section.key`, set (`key = ...`) or shown
/// commented out (`# key = ...`), each with a comment of its own right above it (or above the
/// keys it is grouped with), mapped to the line that sets or shows it. An array of tables
/// (`[[dispatcher.set]]`, shown commented out) is one key, mapped to an empty line: its
/// entries are data, not keys.
fn documented_keys(example: &str) -> std::collections::BTreeMap<String, String> {
    let mut keys = std::collections::BTreeMap::new();
    let mut section = String::new();
    let mut commented = false;
    let mut in_array = false;
    for line in example.lines() {
        let shown = line.strip_prefix("# ").unwrap_or(line);
        if let Some(name) = shown
            .strip_prefix("[[")
            .and_then(|rest| rest.strip_suffix("]]"))
        {
            assert!(
                commented,
                "moonroute.example.toml: `{line}` has no comment saying what it is"
            );
            keys.insert(name.to_owned(), String::new());
            in_array = true;
            continue;
        }
        if let Some(name) = line
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
        {
            section = name.to_owned();
            (commented, in_array) = (false, false);
            continue;
        }
        if in_array {
            continue;
        }
        let key = shown.split_once(" = ").map(|(key, _)| key).filter(|key| {
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        match key {
            Some(key) => {
                assert!(
                    commented,
                    "moonroute.example.toml: `{line}` has no comment saying what it does"
                );
                let path = match section.as_str() {
                    "" => key.to_owned(),
                    _ => format!("{section}.{key}"),
                };
                keys.insert(path, shown.to_owned());
            }
            None if line.starts_with('#') => commented = true,
            None if line.trim().is_empty() => commented = false,
            None => {}
        }
    }
    keys
}

/// moonroute.example.toml is the configuration reference: it parses into `Config` and
/// validates, every key the server has a default for is there with that default (the file
/// equals `Config::default()` but for the metrics endpoint it turns on), the keys without a
/// default are shown commented out, every key has its comment, and every key shown
/// commented out is a real key (unknown keys are errors, so its line parses on its own).
#[test]
fn the_example_configuration_documents_every_key() {
    let example = repo_file("moonroute.example.toml");
    let config = Config::parse(&example).expect("moonroute.example.toml parses");
    config.validate().expect("and validates");
    let mut defaults = Config::default();
    defaults.metrics.listen = "127.0.0.1:9060".to_owned();
    assert_eq!(
        config, defaults,
        "moonroute.example.toml holds the defaults"
    );

    let documented = documented_keys(&example);
    let mut expected = BTreeSet::new();
    let serialized = toml::Table::try_from(Config::default()).expect("Config serializes");
    key_paths(&serialized, "", &mut expected);
    expected.extend(UNSET_BY_DEFAULT.iter().map(|key| key.to_string()));
    let missing: Vec<&String> = expected
        .iter()
        .filter(|key| !documented.contains_key(*key))
        .collect();
    assert!(
        missing.is_empty(),
        "moonroute.example.toml does not document {missing:?}"
    );
    assert!(expected.len() >= 75, "{} keys", expected.len());

    for (path, line) in documented.iter().filter(|(_, line)| !line.is_empty()) {
        let text = match path.rsplit_once('.') {
            Some((section, _)) => format!("[{section}]\n{line}\n"),
            None => format!("{line}\n"),
        };
        Config::parse(&text)
            .unwrap_or_else(|e| panic!("moonroute.example.toml: `{line}` ([{path}]): {e}"));
    }
}

// ---- the documentation's links ------------------------------------------------------------

/// The anchors GitHub gives the headings of a markdown text: lower case, punctuation dropped,
/// spaces as hyphens, repeats numbered (`-1`, `-2`).
fn heading_anchors(markdown: &str) -> BTreeSet<String> {
    let mut anchors = BTreeSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        let Some(heading) = line.strip_prefix('#').filter(|_| !fenced) else {
            continue;
        };
        let slug: String = heading
            .trim_start_matches('#')
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let mut anchor = slug.clone();
        let mut n = 0;
        while !anchors.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{slug}-{n}");
        }
    }
    anchors
}

/// The targets of the inline links `[text](target)` of a markdown text, outside fenced code
/// blocks and code spans, with their line numbers.
fn link_targets(markdown: &str) -> Vec<(usize, String)> {
    let mut targets = Vec::new();
    let mut fenced = false;
    for (index, line) in markdown.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Code spans hold Lua and TOML, whose brackets are no links.
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join("``");
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                targets.push((index + 1, rest[..end].to_owned()));
                rest = &rest[end..];
            }
        }
    }
    targets
}

/// Every relative link of README.md and docs/*.md names a file of the repository, and every
/// `#anchor` a heading of the file it points into.
#[test]
fn every_relative_link_in_the_documentation_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "md") {
            files.push(path);
        }
    }
    assert!(files.len() > 10, "README.md and the docs: {files:?}");
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (line, target) in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let linked = match path {
                "" => file.clone(),
                _ => file.parent().unwrap().join(path),
            };
            let shown = format!(
                "{}:{line}: ({target})",
                file.strip_prefix(root).unwrap().display()
            );
            checked += 1;
            if !linked.exists() {
                broken.push(format!("{shown}: no such file"));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            let linked_text = match linked.extension().is_some_and(|ext| ext == "md") {
                true => std::fs::read_to_string(&linked).unwrap(),
                false => continue,
            };
            if !heading_anchors(&linked_text).contains(anchor) {
                broken.push(format!("{shown}: no heading with that anchor"));
            }
        }
    }
    assert!(checked > 50, "{checked} links checked");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
