//! The CDR file: ended dialogs' records ([`Cdr`], one JSON line each) appended to
//! `<data_dir>/cdr.jsonl`.
//!
//! Durability: each record is one `write` to a file opened with `O_APPEND`, so a record is
//! whole or absent and survives a crash of the process (it is in the kernel's page cache), not
//! a power loss before the kernel writes it back (no `fsync` per call). The file is rotated by
//! size: `cdr.jsonl` becomes `cdr.jsonl.1` (older ones shift up to `keep`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use moonroute_proto::dialog::cdr::{Cdr, CdrWriter};

/// The CDR file in the data directory, rotated by size (see the module doc).
pub struct CdrFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    keep: usize,
}

/// The CDR file's name in the data directory.
pub const FILE_NAME: &str = "cdr.jsonl";

impl CdrFile {
    /// Opens (creating, mode 0600) `dir/cdr.jsonl` for appending; rotated past `max_size`
    /// bytes, keeping `keep` older files.
    pub fn open(dir: &Path, max_size: u64, keep: usize) -> io::Result<CdrFile> {
        crate::file_modes::create_private_dir(dir)?;
        let path = dir.join(FILE_NAME);
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        Ok(CdrFile {
            path,
            file,
            size,
            max_size,
            keep,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record (one `write`), rotating first when the file is full.
    pub fn append(&mut self, cdr: &Cdr) -> io::Result<()> {
        let line = cdr.to_json_line();
        if self.size > 0 && self.size + line.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(line.as_bytes())?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let numbered = |n: usize| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        if self.keep == 0 {
            fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                let from = numbered(n);
                if from.exists() {
                    fs::rename(&from, numbered(n + 1))?;
                }
            }
            fs::rename(&self.path, numbered(1))?;
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// Where the event loops put their CDRs: `<data_dir>/cdr.jsonl`, opened at the first record
/// (a server whose script tracks no dialog creates no file). Shared by every loop; a record
/// costs one `write` under the lock. A write that fails is logged and counted, and the call
/// goes on.
pub struct CdrSink {
    dir: PathBuf,
    max_size: u64,
    keep: usize,
    failed_attempts: bool,
    file: Mutex<Option<CdrFile>>,
    written: AtomicU64,
    lost: AtomicU64,
}

/// Where and how a [`CdrSink`] writes (`[dialog] cdr_*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CdrSettings {
    /// The directory of `cdr.jsonl` (the data directory).
    pub dir: PathBuf,
    /// The size in bytes past which the file is rotated.
    pub max_size: u64,
    /// Rotated files kept.
    pub keep: usize,
    /// Whether calls that were never answered get a record too.
    pub failed_attempts: bool,
}

impl CdrSink {
    pub fn new(settings: CdrSettings) -> Arc<CdrSink> {
        let CdrSettings {
            dir,
            max_size,
            keep,
            failed_attempts,
        } = settings;
        Arc::new(CdrSink {
            dir,
            max_size,
            keep,
            failed_attempts,
            file: Mutex::new(None),
            written: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        })
    }

    /// Records written and lost since start.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.written.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
        )
    }

    fn lost(&self, cdr: &Cdr, error: &io::Error) {
        self.lost.fetch_add(1, Ordering::Relaxed);
        // The target the line had before the file moved out of `dialog::cdr`.
        tracing::error!(target: "moonroute::dialog::cdr", call_id = %cdr.call_id, dir = %self.dir.display(), %error, "CDR not written");
    }
}

impl CdrWriter for CdrSink {
    /// Appends `cdr` (a failed attempt only when configured).
    fn write(&self, cdr: &Cdr) {
        if !cdr.answered() && !self.failed_attempts {
            return;
        }
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if file.is_none() {
            match CdrFile::open(&self.dir, self.max_size, self.keep) {
                Ok(opened) => *file = Some(opened),
                Err(e) => return self.lost(cdr, &e),
            }
        }
        if let Some(open) = file.as_mut() {
            match open.append(cdr) {
                Ok(()) => {
                    self.written.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    // Reopened at the next record (the directory may have been fixed).
                    *file = None;
                    self.lost(cdr, &e);
                }
            }
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(crate::file_modes::PRIVATE_FILE)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moonroute_proto::dialog::cdr::EndReason;
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, UNIX_EPOCH};

    /// An unanswered call's record: what goes in the file does not matter here, its size does.
    fn sample() -> Cdr {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Cdr {
            call_id: "file@host".into(),
            from_uri: "sip:carol@example.com".into(),
            from_tag: "3".into(),
            to_uri: "sip:dave@example.com".into(),
            to_tag: None,
            src: "tcp:127.0.0.1:5071".into(),
            ruri: "sip:dave@example.com".into(),
            dst: None,
            start,
            answer: None,
            end: start + Duration::from_secs(4),
            status: 486,
            reason: EndReason::Failed,
            extra: Vec::new(),
        }
    }

    #[test]
    fn the_file_is_private_appended_and_rotated_by_size() {
        let dir = std::env::temp_dir().join(format!("moonroute-cdr-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let line_len = sample().to_json_line().len() as u64;
        let mut file = CdrFile::open(&dir, line_len * 2, 2).unwrap();
        for _ in 0..7 {
            file.append(&sample()).unwrap();
        }
        let mode = fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let lines = |name: &str| {
            fs::read_to_string(dir.join(name))
                .map(|s| s.lines().count())
                .unwrap_or(0)
        };
        // 7 records, 2 per file: the current file has 1, .1 and .2 have 2 each, the oldest
        // 2 are gone.
        assert_eq!(lines("cdr.jsonl"), 1);
        assert_eq!(lines("cdr.jsonl.1"), 2);
        assert_eq!(lines("cdr.jsonl.2"), 2);
        assert!(!dir.join("cdr.jsonl.3").exists());
        // Reopening appends.
        drop(file);
        let mut file = CdrFile::open(&dir, line_len * 2, 2).unwrap();
        file.append(&sample()).unwrap();
        assert_eq!(lines("cdr.jsonl"), 2);
        fs::remove_dir_all(&dir).unwrap();
    }
}
