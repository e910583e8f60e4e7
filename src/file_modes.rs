//! Who may read what holds secrets: the modes of the data directory and of the files with
//! credentials or keys.
//!
//! The data directory (`data_dir`) holds password equivalents and keys: the subscribers' HA1s
//! in `subscribers/` (an HA1 is as good as the password in its realm, RFC 2617 §4.13), the
//! server key `secret` (it signs nonces and Record-Route), the registrations in `location/`
//! (who is where), and by default the control socket. Whatever the process umask, what
//! moonroute creates there is private to the user it runs as: directories 0700, files 0600.
//! A directory is made 0700 before anything is put in it, so there is no instant in which the
//! files sled creates inside (with the umask's mode, fixed to 0600 right after) can be reached.
//! The umask itself is never changed: it is process-wide, and other threads create files too.
//!
//! What exists already is treated according to who set it up:
//! - the database directories (`subscribers/`, `location/`) are moonroute's alone: sled's page
//!   files, read by nothing else. When group or others can reach them (earlier versions created
//!   them with the umask's modes), their modes are fixed when they are opened, and one warning
//!   says what changed ([`prepare_store`]).
//! - what an operator may have set up (the data directory itself, a `secret` copied from
//!   another server, the TLS private key, a configuration file holding `[auth] secret`) keeps
//!   its mode: [`startup_warnings`] names each one that others can read, with the `chmod` that
//!   fixes it. Group access to the TLS key and the configuration file is not reported: giving
//!   them to the service's group (mode 0640) is how contrib/moonroute.service deploys them.

use std::fs::{self, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a directory moonroute creates for its data.
pub const PRIVATE_DIR: u32 = 0o700;

/// Mode of a file moonroute creates with secrets or credentials.
pub const PRIVATE_FILE: u32 = 0o600;

/// Permission bits of the group and of others.
const GROUP_AND_OTHERS: u32 = 0o077;

/// Permission bits of others.
const OTHERS: u32 = 0o007;

/// Creates `dir` with mode 0700 unless it exists (as `mkdir -p -m 700`: missing parents get
/// the default mode). The mode is set exactly, whatever the umask. An existing directory is
/// left as it is.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(PRIVATE_DIR).create(dir) {
        // The umask can only have removed bits; a umask that removed the owner's too is undone.
        Ok(()) => fs::set_permissions(dir, Permissions::from_mode(PRIVATE_DIR)),
        // Another thread or process created it meanwhile.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Readies `dir`, a database directory only moonroute uses (`<data_dir>/subscribers`,
/// `<data_dir>/location`), before sled opens it: its parent (the data directory) and the
/// directory itself are created 0700 when missing. An existing one that its group or others
/// can reach gets their access removed from it and from everything in it, with one warning
/// naming the directory and its old mode.
pub fn prepare_store(dir: &Path) -> Result<(), String> {
    let created = |e: io::Error, what: &Path| format!("cannot create {}: {e}", what.display());
    if let Some(data_dir) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(data_dir).map_err(|e| created(e, data_dir))?;
    }
    let meta = match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return create_private_dir(dir).map_err(|e| created(e, dir));
        }
        Err(e) => return Err(format!("cannot inspect {}: {e}", dir.display())),
        Ok(meta) => meta,
    };
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_dir() && mode & GROUP_AND_OTHERS != 0 {
        let (changed, failed) = restrict_tree(dir);
        tracing::warn!(
            path = %dir.display(),
            was = %format!("{mode:04o}"),
            changed,
            failed,
            "database directory was open to other users: group and other access removed \
             from it and its files (now 0700 and 0600)"
        );
    }
    Ok(())
}

/// After sled opened `dir` (see [`prepare_store`]): the files it created with the umask's mode
/// are made 0600 too. Nobody else could reach them meanwhile (the directory is 0700); this
/// keeps each file private should the directory's mode be widened later.
pub fn seal_store(dir: &Path) {
    let (_, failed) = restrict_tree(dir);
    if failed > 0 {
        tracing::warn!(
            path = %dir.display(),
            failed,
            "cannot remove group and other access from some database files"
        );
    }
}

/// Removes group and other access from `root` and everything under it (symbolic links under
/// it are not followed; `root` itself may be one, as sled follows it); returns how many modes
/// changed and how many could not be changed.
fn restrict_tree(root: &Path) -> (usize, usize) {
    let (mut changed, mut failed) = (0, 0);
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = if path == root {
            fs::metadata(&path)
        } else {
            fs::symlink_metadata(&path)
        };
        let Ok(meta) = meta else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(&path) {
                pending.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else if !meta.is_file() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & GROUP_AND_OTHERS == 0 {
            continue;
        }
        match fs::set_permissions(&path, Permissions::from_mode(mode & !GROUP_AND_OTHERS)) {
            Ok(()) => changed += 1,
            Err(error) => {
                failed += 1;
                tracing::debug!(path = %path.display(), %error, "chmod failed");
            }
        }
    }
    (changed, failed)
}

/// What an operator sets up that holds secrets, as the configuration names it
/// (`crate::config::Config::secret_files`): what [`startup_warnings`] checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretFiles<'a> {
    /// The data directory (`data_dir`).
    pub data_dir: &'a Path,
    /// The server key file (`crate::secret`), when the key is not `[auth] secret`.
    pub key_file: Option<PathBuf>,
    /// The configuration file the server was started with, when it holds `[auth] secret`.
    pub config_with_secret: Option<&'a Path>,
    /// `[tls] private_key`, when set.
    pub tls_private_key: Option<&'a Path>,
}

/// What others can read among the things an operator sets up (see the module doc), one
/// sentence each, with the command that fixes it. Nothing is changed.
pub fn startup_warnings(files: &SecretFiles<'_>) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut check = |path: &Path, bits: u32, what: &str, why: &str, fix: &str| {
        let Ok(meta) = fs::metadata(path) else {
            return;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & bits != 0 {
            let path = path.display();
            let who = if bits == OTHERS {
                "all users"
            } else {
                "other users"
            };
            warnings.push(format!(
                "{what} {path}{why} is readable by {who} (mode {mode:04o}): chmod {fix} {path}"
            ));
        }
    };
    check(
        files.data_dir,
        GROUP_AND_OTHERS,
        "the data directory",
        " (the subscribers' HA1s, the server key)",
        "700",
    );
    if let Some(key_file) = &files.key_file {
        check(key_file, GROUP_AND_OTHERS, "the server key", "", "600");
    } else if let Some(file) = files.config_with_secret {
        check(
            file,
            OTHERS,
            "the configuration file",
            " (it holds [auth] secret)",
            "o-rwx",
        );
    }
    if let Some(key) = files.tls_private_key {
        check(key, OTHERS, "the TLS private key", "", "o-rwx");
    }
    warnings
}

/// Logs [`startup_warnings`], one warning line each.
pub fn warn_at_start(files: &SecretFiles<'_>) {
    for warning in startup_warnings(files) {
        tracing::warn!("{warning}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn set_mode(path: &Path, mode: u32) {
        fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_private_dir_is_0700_and_an_existing_one_is_left_alone() {
        let temp = tempfile::TempDir::new().unwrap();
        let dir = temp.path().join("a/b/data");
        create_private_dir(&dir).unwrap();
        assert_eq!(mode_of(&dir), 0o700);
        // An existing directory keeps its mode.
        set_mode(&dir, 0o750);
        create_private_dir(&dir).unwrap();
        assert_eq!(mode_of(&dir), 0o750);
    }

    #[test]
    fn a_new_store_is_created_private_with_its_data_dir() {
        let temp = tempfile::TempDir::new().unwrap();
        let store = temp.path().join("data/subscribers");
        prepare_store(&store).unwrap();
        assert_eq!(mode_of(&temp.path().join("data")), 0o700);
        assert_eq!(mode_of(&store), 0o700);
        // What sled then creates with the umask's mode is sealed.
        fs::write(store.join("db"), "x").unwrap();
        set_mode(&store.join("db"), 0o644);
        fs::create_dir(store.join("blobs")).unwrap();
        set_mode(&store.join("blobs"), 0o755);
        seal_store(&store);
        assert_eq!(mode_of(&store.join("db")), 0o600);
        assert_eq!(mode_of(&store.join("blobs")), 0o700);
    }

    #[test]
    fn an_exposed_store_is_restricted_but_not_its_data_dir() {
        let temp = tempfile::TempDir::new().unwrap();
        let data = temp.path().join("data");
        let store = data.join("location");
        fs::create_dir_all(store.join("blobs")).unwrap();
        fs::write(store.join("db"), "x").unwrap();
        fs::write(store.join("blobs/1"), "x").unwrap();
        set_mode(&data, 0o755);
        set_mode(&store, 0o755);
        set_mode(&store.join("blobs"), 0o775);
        set_mode(&store.join("db"), 0o644);
        set_mode(&store.join("blobs/1"), 0o664);
        prepare_store(&store).unwrap();
        assert_eq!(mode_of(&store), 0o700);
        assert_eq!(mode_of(&store.join("blobs")), 0o700);
        assert_eq!(mode_of(&store.join("db")), 0o600);
        assert_eq!(mode_of(&store.join("blobs/1")), 0o600);
        assert_eq!(
            mode_of(&data),
            0o755,
            "the operator's directory is only warned about"
        );
    }

    #[test]
    fn links_in_a_store_are_not_followed() {
        let temp = tempfile::TempDir::new().unwrap();
        let store = temp.path().join("store");
        fs::create_dir(&store).unwrap();
        set_mode(&store, 0o755);
        let outside = temp.path().join("outside");
        fs::write(&outside, "x").unwrap();
        set_mode(&outside, 0o644);
        std::os::unix::fs::symlink(&outside, store.join("link")).unwrap();
        prepare_store(&store).unwrap();
        assert_eq!(mode_of(&store), 0o700);
        assert_eq!(mode_of(&outside), 0o644);
    }

    #[test]
    fn warnings_name_what_others_can_read_and_change_nothing() {
        let temp = tempfile::TempDir::new().unwrap();
        let data = temp.path().join("data");
        create_private_dir(&data).unwrap();
        let mut config = Config {
            data_dir: data.clone(),
            ..Config::default()
        };
        assert!(startup_warnings(&config.secret_files(None)).is_empty());

        let secret = data.join(crate::secret::KEY_FILE);
        fs::write(&secret, "00").unwrap();
        set_mode(&secret, 0o640);
        set_mode(&data, 0o750);
        let warnings = startup_warnings(&config.secret_files(None));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("data directory") && warnings[0].contains("mode 0750"));
        assert!(warnings[0].ends_with(&format!("chmod 700 {}", data.display())));
        assert!(warnings[1].contains("server key") && warnings[1].contains("chmod 600"));
        assert_eq!(mode_of(&secret), 0o640, "warned about, not changed");

        // A key and a configuration file given to the service's group are fine; to all, not.
        set_mode(&data, 0o700);
        set_mode(&secret, 0o600);
        let key = temp.path().join("key.pem");
        let file = temp.path().join("moonroute.toml");
        fs::write(&key, "k").unwrap();
        fs::write(&file, "[auth]\nsecret = \"s\"\n").unwrap();
        set_mode(&key, 0o640);
        set_mode(&file, 0o640);
        config.tls.private_key = key.clone();
        config.auth.secret = "s".into();
        assert!(startup_warnings(&config.secret_files(Some(&file))).is_empty());
        set_mode(&key, 0o644);
        set_mode(&file, 0o644);
        let warnings = startup_warnings(&config.secret_files(Some(&file)));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("holds [auth] secret") && warnings[0].contains("chmod o-rwx"));
        assert!(warnings[1].contains("TLS private key") && warnings[1].contains("all users"));
    }
}
