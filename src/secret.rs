//! The server key: what Record-Route signatures (`crate::proxy::route_sign`) and, when
//! `[auth] secret` is empty, digest nonces (RFC 3261 §22.4, `crate::auth`) are signed with.
//!
//! One rule: the key is `[auth] secret` when it is set, otherwise the contents of
//! `<data_dir>/secret`, 32 random bytes written (hex) at the first start and read at every
//! start after it. It must survive restarts: a dialog outlives a restart of the proxy and its
//! BYE carries the Route we signed before it. Servers behind one load balancer (or sharing a
//! domain) must share the key: set the same `[auth] secret`, or copy the file.
//!
//! The file is created with mode 0600 (the data directory, when it creates it, 0700:
//! `crate::file_modes`), atomically: written to a temporary name and linked to
//! `secret` only when complete, so two servers starting on one data directory agree on one key
//! and a crash never leaves half a key.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::rand::{SecureRandom, SystemRandom};

/// The key file's name under the data directory.
pub const KEY_FILE: &str = "secret";

/// Bytes of a generated key.
const KEY_LEN: usize = 32;

/// The server key (see the module doc for the rule): `configured` (`[auth] secret`) when it is
/// set, otherwise the key in `<data_dir>/secret`.
pub fn server_key(configured: &str, data_dir: &Path) -> Result<Vec<u8>, String> {
    if !configured.is_empty() {
        return Ok(configured.as_bytes().to_vec());
    }
    load_or_create(data_dir)
}

/// The key in `<data_dir>/secret`, generated there first when the file does not exist.
pub fn load_or_create(data_dir: &Path) -> Result<Vec<u8>, String> {
    let path = data_dir.join(KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => return decode(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    create(data_dir).map_err(|e| format!("{}: cannot create the key: {e}", path.display()))?;
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    decode(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes a new random key to a temporary file and links it to `secret`; when another process
/// linked its key first, that one stays (the caller reads whichever won).
fn create(data_dir: &Path) -> std::io::Result<()> {
    crate::file_modes::create_private_dir(data_dir)?;
    let mut key = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| std::io::Error::other("no random numbers from the system"))?;
    // Unique per process and per call: threads of one process may race here too.
    static ATTEMPT: AtomicU64 = AtomicU64::new(0);
    let attempt = ATTEMPT.fetch_add(1, Ordering::Relaxed);
    let temp = data_dir.join(format!(".{KEY_FILE}.{}.{attempt}.tmp", std::process::id()));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(crate::file_modes::PRIVATE_FILE)
            .open(&temp)?;
        // Exactly 0600 whatever the umask (which can only have removed bits from it).
        file.set_permissions(fs::Permissions::from_mode(crate::file_modes::PRIVATE_FILE))?;
        writeln!(file, "{}", crate::auth::digest::hex(&key))?;
        file.sync_all()
    })();
    let linked = written.and_then(|()| match fs::hard_link(&temp, data_dir.join(KEY_FILE)) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    });
    let _ = fs::remove_file(&temp);
    linked
}

/// The key from the file's text: hex digits, at least 16 bytes' worth (a key an operator
/// wrote by hand, e.g. copied from another server, is accepted as long as it is hex).
fn decode(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    if text.len() % 2 != 0 || text.len() < 32 {
        return Err("the key must be at least 32 hex digits, an even number".into());
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| "the key is not hex".to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_private_and_read_back() {
        let dir = tempfile::TempDir::new().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        assert_eq!(first.len(), KEY_LEN);
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap(), first);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn racing_threads_agree_on_one_key() {
        let dir = tempfile::TempDir::new().unwrap();
        let keys: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| load_or_create(dir.path()).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_data_dir_is_created() {
        let dir = tempfile::TempDir::new().unwrap();
        let nested = dir.path().join("a/b");
        assert_eq!(load_or_create(&nested).unwrap().len(), KEY_LEN);
        let mode = fs::metadata(&nested).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o700,
            "the data directory it creates is private"
        );
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_new_key() {
        let dir = tempfile::TempDir::new().unwrap();
        fs::write(dir.path().join(KEY_FILE), "not a key\n").unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(err.contains("secret"), "{err}");
    }

    #[test]
    fn auth_secret_wins_over_the_file() {
        let dir = tempfile::TempDir::new().unwrap();
        assert_eq!(server_key("shared", dir.path()).unwrap(), b"shared");
        assert!(!dir.path().join(KEY_FILE).exists());
        assert_eq!(server_key("", dir.path()).unwrap().len(), KEY_LEN);
    }
}
