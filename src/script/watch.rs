//! Watching the routing script for hot reload.
//!
//! [`ScriptWatcher`] reports, debounced, every change of one file: written in place, created,
//! renamed onto, removed (and recreated). The reloader waits on [`ScriptWatcher::changed`],
//! then reads and compiles the script.
//!
//! # Why the directory is watched, not the file
//!
//! Most editors (vim with its default `backupcopy`, emacs, VS Code, `sed -i`, and anything that
//! writes atomically) save by writing a temporary file next to the original and renaming it
//! over the original. The original inode is then gone, and an inotify watch on it (kqueue
//! likewise) is attached to that dead inode: it reports the replacement once (as the file's
//! deletion) and then falls silent, so every later save would go unnoticed. A watch on the
//! file's parent directory (non-recursive) survives any number of such saves: the rename shows
//! up as an entry named like our file appearing in the directory. Events are filtered by file
//! name, so other files in the directory (the editor's temporary file included) are ignored.
//! The directory is canonicalized once at start, so a relative script path keeps working.
//!
//! # Which events count
//!
//! Creation, modification (data, metadata such as `touch`, renames), removal, and the close of
//! a file opened for writing. Plain accesses (open, read, close after reading) do not count:
//! the reloader reading the script must not trigger another reload.
//!
//! # Debouncing
//!
//! An editor's save is several events (create, write, close, rename), and a script copied in by
//! `scp` is many writes. After an event for the file, [`ScriptWatcher::changed`] waits until no
//! further event has come for `debounce` (`lua.reload_debounce_ms`), then resolves once: one
//! reload per save, of the finished file.
//!
//! If the watched directory itself is removed or renamed, the watch ends and no further change
//! is reported.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Watches one file for changes; see the module documentation.
pub struct ScriptWatcher {
    /// Kept alive for the watch to last; dropping it stops the notify thread.
    _watcher: RecommendedWatcher,
    /// One unit per batch of relevant events. Capacity 1: a full channel already means "changed".
    rx: mpsc::Receiver<()>,
    debounce: Duration,
    /// An event has been received and its debounce has not completed yet (kept across a
    /// cancelled `changed()`, so cancelling never loses a change).
    pending: bool,
    /// The watched file, directory canonicalized (for messages).
    path: PathBuf,
}

impl fmt::Debug for ScriptWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptWatcher")
            .field("path", &self.path)
            .field("debounce", &self.debounce)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

/// Why a script cannot be watched. Its `Display` is a plain sentence naming the path.
#[derive(Debug)]
pub enum WatchError {
    /// The path does not end in a file name (`..`, `/`).
    NoFileName { path: PathBuf },
    /// The script's directory cannot be resolved (it does not exist, no permission...).
    Directory {
        path: PathBuf,
        dir: PathBuf,
        source: std::io::Error,
    },
    /// The operating system refused the watch (e.g. the inotify watch limit is reached).
    Notify {
        path: PathBuf,
        source: notify::Error,
    },
}

impl fmt::Display for WatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WatchError::NoFileName { path } => write!(
                f,
                "cannot watch the script {}: the path does not name a file",
                path.display()
            ),
            WatchError::Directory { path, dir, source } => write!(
                f,
                "cannot watch the script {}: its directory {}: {source}",
                path.display(),
                dir.display()
            ),
            WatchError::Notify { path, source } => write!(
                f,
                "cannot watch the script {} for changes: {source}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for WatchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WatchError::NoFileName { .. } => None,
            WatchError::Directory { source, .. } => Some(source),
            WatchError::Notify { source, .. } => Some(source),
        }
    }
}

impl ScriptWatcher {
    /// Starts watching the file at `path` (which need not exist yet; its directory must).
    /// [`ScriptWatcher::changed`] then reports each change, debounced by `debounce`.
    ///
    /// Call it inside a tokio runtime: `changed` relies on the runtime's timer.
    pub fn start(path: &Path, debounce: Duration) -> Result<ScriptWatcher, WatchError> {
        let name: OsString = match path.file_name() {
            Some(name) => name.to_owned(),
            None => {
                return Err(WatchError::NoFileName {
                    path: path.to_owned(),
                })
            }
        };
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let dir = dir.canonicalize().map_err(|source| WatchError::Directory {
            path: path.to_owned(),
            dir: dir.to_owned(),
            source,
        })?;
        let full_path = dir.join(&name);

        let (tx, rx) = mpsc::channel(1);
        let log_path = full_path.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            match event {
                Ok(event) if concerns(&event, &name) => {
                    // Full: a change is already pending, which is all this one would say.
                    // Closed: the ScriptWatcher is gone.
                    let _ = tx.try_send(());
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    script = %log_path.display(),
                    error = %e,
                    "error while watching the script"
                ),
            }
        })
        .map_err(|source| WatchError::Notify {
            path: path.to_owned(),
            source,
        })?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError::Notify {
                path: path.to_owned(),
                source,
            })?;
        tracing::debug!(script = %full_path.display(), ?debounce, "watching the script");
        Ok(ScriptWatcher {
            _watcher: watcher,
            rx,
            debounce,
            pending: false,
            path: full_path,
        })
    }

    /// The watched file: its directory canonicalized, its name as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resolves once per debounced change of the file: after an event for it, once no further
    /// event has come for the debounce interval. Changes made while nobody waits are not lost:
    /// the next call reports them. Cancel-safe (usable in `tokio::select!`).
    pub async fn changed(&mut self) {
        loop {
            if !self.pending {
                match self.rx.recv().await {
                    Some(()) => self.pending = true,
                    // The notify thread is gone: nothing will ever change again.
                    None => std::future::pending::<()>().await,
                }
            }
            match tokio::time::timeout(self.debounce, self.rx.recv()).await {
                // Another event: the file is still being written; wait again.
                Ok(Some(())) => continue,
                // Quiet for the whole interval (or the watch ended): report.
                Ok(None) | Err(_) => {
                    self.pending = false;
                    return;
                }
            }
        }
    }
}

/// Whether `event` may have changed the file named `name` in the watched directory.
fn concerns(event: &Event, name: &OsString) -> bool {
    let relevant_kind = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Create(_)
        | EventKind::Modify(_)
        | EventKind::Remove(_)
        | EventKind::Any
        | EventKind::Other => true,
    };
    if event.need_rescan() {
        // Events were lost (e.g. the inotify queue overflowed): ours may have been among them.
        return true;
    }
    relevant_kind
        && event
            .paths
            .iter()
            .any(|p| p.file_name() == Some(name.as_os_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    const DEBOUNCE: Duration = Duration::from_millis(100);
    const WAIT: Duration = Duration::from_secs(5);

    async fn expect_change(w: &mut ScriptWatcher, what: &str) {
        tokio::time::timeout(WAIT, w.changed())
            .await
            .unwrap_or_else(|_| panic!("no change reported after {what}"));
    }

    /// Bounded negative check: nothing is reported within three debounce intervals.
    async fn expect_quiet(w: &mut ScriptWatcher, after: &str) {
        let quiet = tokio::time::timeout(DEBOUNCE * 3, w.changed()).await;
        assert!(quiet.is_err(), "an extra change was reported after {after}");
    }

    fn save_by_rename(dir: &Path, contents: &str) {
        let tmp = dir.join(".script.lua.tmp");
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, dir.join("script.lua")).unwrap();
    }

    #[tokio::test]
    async fn plain_write_is_reported() {
        let dir = TempDir::new().unwrap();
        let script = dir.path().join("script.lua");
        std::fs::write(&script, "-- v1").unwrap();
        let mut w = ScriptWatcher::start(&script, DEBOUNCE).unwrap();

        std::fs::write(&script, "-- v2").unwrap();
        expect_change(&mut w, "a write").await;
        // Reading the file (what the reloader does next) is not a change.
        assert_eq!(std::fs::read_to_string(&script).unwrap(), "-- v2");
        expect_quiet(&mut w, "a read").await;
    }

    #[tokio::test]
    async fn every_save_by_rename_is_reported() {
        let dir = TempDir::new().unwrap();
        let script = dir.path().join("script.lua");
        std::fs::write(&script, "-- v0").unwrap();
        let mut w = ScriptWatcher::start(&script, DEBOUNCE).unwrap();

        for version in 1..=3 {
            save_by_rename(dir.path(), &format!("-- v{version}"));
            expect_change(&mut w, &format!("save by rename #{version}")).await;
            assert_eq!(
                std::fs::read_to_string(&script).unwrap(),
                format!("-- v{version}")
            );
        }
    }

    #[tokio::test]
    async fn relative_paths_and_later_creation_work() {
        // A path relative to the working directory (climbing to the root and down again), to
        // a file that does not exist yet.
        let dir = TempDir::new().unwrap();
        let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
        let mut relative = PathBuf::new();
        for _ in cwd.components().skip(1) {
            relative.push("..");
        }
        let target = dir.path().canonicalize().unwrap();
        relative.push(target.strip_prefix("/").unwrap());
        relative.push("script.lua");
        assert!(relative.is_relative());
        let mut w = ScriptWatcher::start(&relative, DEBOUNCE).unwrap();
        assert!(w.path().is_absolute());

        std::fs::write(dir.path().join("script.lua"), "-- new").unwrap();
        expect_change(&mut w, "the creation").await;
        std::fs::remove_file(dir.path().join("script.lua")).unwrap();
        expect_change(&mut w, "the removal").await;
    }

    #[tokio::test]
    async fn a_burst_of_writes_is_one_change() {
        let dir = TempDir::new().unwrap();
        let script = dir.path().join("script.lua");
        std::fs::write(&script, "").unwrap();
        let mut w = ScriptWatcher::start(&script, DEBOUNCE).unwrap();

        for i in 0..10 {
            std::fs::write(&script, format!("-- line {i}\n")).unwrap();
        }
        expect_change(&mut w, "the burst").await;
        expect_quiet(&mut w, "the burst").await;
    }

    #[tokio::test]
    async fn other_files_in_the_directory_are_ignored() {
        let dir = TempDir::new().unwrap();
        let script = dir.path().join("script.lua");
        std::fs::write(&script, "-- v1").unwrap();
        let mut w = ScriptWatcher::start(&script, DEBOUNCE).unwrap();

        std::fs::write(dir.path().join("other.lua"), "-- other").unwrap();
        std::fs::write(dir.path().join("script.lua.bak"), "-- backup").unwrap();
        std::fs::write(dir.path().join(".script.lua.tmp"), "-- temp").unwrap();
        expect_quiet(&mut w, "writes to other files").await;

        // And the watch still works for the script itself.
        std::fs::write(&script, "-- v2").unwrap();
        expect_change(&mut w, "a write").await;
    }

    #[tokio::test]
    async fn a_change_while_nobody_waits_is_reported_later() {
        let dir = TempDir::new().unwrap();
        let script = dir.path().join("script.lua");
        std::fs::write(&script, "-- v1").unwrap();
        let mut w = ScriptWatcher::start(&script, DEBOUNCE).unwrap();

        std::fs::write(&script, "-- v2").unwrap();
        // Cancel a wait that had not completed: the change must not be lost.
        let _ = tokio::time::timeout(Duration::from_millis(1), w.changed()).await;
        expect_change(&mut w, "a write").await;
    }

    #[tokio::test]
    async fn errors_are_sentences_with_the_path() {
        let dir = TempDir::new().unwrap();
        let missing = dir.path().join("no-such-dir").join("script.lua");
        let err = ScriptWatcher::start(&missing, DEBOUNCE).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "cannot watch the script {}: its directory ",
                missing.display()
            )),
            "{text}"
        );
        assert!(text.contains("No such file or directory"), "{text}");

        let err = ScriptWatcher::start(Path::new("/"), DEBOUNCE).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot watch the script /: the path does not name a file"
        );
    }
}
