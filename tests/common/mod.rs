//! Helpers shared by the integration tests.

pub mod dns_server;
pub mod exposition;
pub mod flood;
pub mod redis_server;
pub mod refused_log;
pub mod ua;

pub mod auth;
pub mod certs;

use std::path::PathBuf;
use std::sync::OnceLock;

/// `scripts/default.lua` with `local AUTHENTICATE = true` flipped to `false`, for the tests
/// that are not about authentication (they register and call without credentials). Written
/// once per test binary under Cargo's temporary directory for integration tests.
#[allow(dead_code)] // not every test binary runs the default script
pub fn default_script_without_auth() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/default.lua");
        let text = std::fs::read_to_string(&shipped).expect("scripts/default.lua");
        const FLAG: &str = "local AUTHENTICATE = true";
        assert!(text.contains(FLAG), "scripts/default.lua has `{FLAG}`");
        let text = text.replacen(FLAG, "local AUTHENTICATE = false", 1);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let path = dir.join("default-without-auth.lua");
        // Test binaries run in parallel: write aside, then rename (atomic).
        let aside = dir.join(format!("default-without-auth.lua.{}", std::process::id()));
        std::fs::write(&aside, text).expect("write the script copy");
        std::fs::rename(&aside, &path).expect("rename the script copy");
        path
    })
    .clone()
}

/// A Record-Route value without this proxy's signature parameter (`;mrs=`, the copy letter `q`
/// or `s`, 8 hex digits of expiry, `.`, 16 hex digits, `moonroute-proto/src/proxy/route_sign.rs`), so the rest
/// can be compared exactly; a value without one is returned as it is.
#[allow(dead_code)] // not every test binary compares Record-Route values
pub fn without_signature(value: &str) -> String {
    let Some(at) = value.find(";mrs=") else {
        return value.to_owned();
    };
    let sig = &value[at + 5..];
    let len = sig
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '.')
        .unwrap_or(sig.len());
    let token = &sig.as_bytes()[..len];
    let well_formed = len == 26
        && matches!(token[0], b'q' | b's' | b't' | b'u')
        && token[9] == b'.'
        && token[1..9]
            .iter()
            .chain(&token[10..])
            .all(u8::is_ascii_hexdigit);
    assert!(
        well_formed,
        "a signature `[qstu]<8 hex>.<16 hex>` in {value}"
    );
    format!("{}{}", &value[..at], &sig[len..])
}

/// Writes `<dir>/moonroute.toml` for a run of the real binary: one UDP listener on a free
/// port of 127.0.0.1, one event loop, the shipped `default.lua` (not watched), data in
/// `<dir>/data`, the control socket at `socket`. Returns the file's path.
#[allow(dead_code)] // not every test binary starts the real binary
pub fn write_binary_config(dir: &std::path::Path, socket: &std::path::Path) -> PathBuf {
    let config = dir.join("moonroute.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"udp:127.0.0.1:0\"]\nworkers = 1\nscript = {:?}\ndata_dir = {:?}\n\
             log_level = \"info\"\n[control]\nsocket = {:?}\n[lua]\nwatch = false\n",
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/default.lua"),
            dir.join("data"),
            socket,
        ),
    )
    .unwrap();
    config
}
