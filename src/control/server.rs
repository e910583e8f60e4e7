//! The server end of the control socket: binding (stale files, live rivals, mode 0600), the
//! accept loop with its connection bound, and one connection's request → handler → reply.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::{
    describe_io, human_duration, Handler, Reply, MAX_CONNECTIONS, MAX_REQUEST_BYTES, READ_TIMEOUT,
};

/// How long `bind` waits for an existing socket to accept before calling it live.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The listening control socket. It serves on the tokio runtime it was bound on until
/// [`ControlServer::shutdown`] or drop, which stop accepting and remove the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// Device and inode of the socket file this server created: on shutdown the file is
    /// removed only if it is still this one, never a successor's.
    identity: (u64, u64),
    accept_task: JoinHandle<()>,
}

/// The knobs of a server; the defaults are the module's constants, tests shorten them.
#[derive(Clone, Copy, Debug)]
struct Settings {
    read_timeout: Duration,
    max_connections: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            read_timeout: READ_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

impl ControlServer {
    /// Binds the socket at `path` (creating its parent directory, 0700, when missing), with
    /// mode 0600, and serves it on the current tokio runtime until dropped or shut down. Each
    /// command runs `handler` on a blocking thread.
    ///
    /// A stale socket file left by a crashed server is replaced. Fails if another live server
    /// answers on `path` ("another moonroute is using the control socket PATH"), if `path`
    /// exists and is not a socket, or if the socket cannot be created.
    pub async fn bind(path: &Path, handler: Handler) -> io::Result<ControlServer> {
        ControlServer::bind_with(path, handler, Settings::default()).await
    }

    async fn bind_with(
        path: &Path,
        handler: Handler,
        settings: Settings,
    ) -> io::Result<ControlServer> {
        if path.as_os_str().is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the control socket path is empty",
            ));
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            // A directory made for the socket holds nothing but it: private, as the socket.
            crate::file_modes::create_private_dir(parent).map_err(|e| {
                with_context(
                    &e,
                    format!(
                        "cannot create the directory {} for the control socket",
                        parent.display()
                    ),
                )
            })?;
        }
        remove_stale(path).await?;
        let listener = UnixListener::bind(path).map_err(|e| {
            with_context(
                &e,
                format!("cannot create the control socket {}", path.display()),
            )
        })?;
        let meta = match restrict(path) {
            Ok(meta) => meta,
            Err(e) => {
                // Do not leave a socket with the wrong mode behind.
                let _ = std::fs::remove_file(path);
                return Err(with_context(
                    &e,
                    format!(
                        "cannot restrict the control socket {} to mode 0600",
                        path.display()
                    ),
                ));
            }
        };
        let owner = meta.uid();
        let accept_task = tokio::spawn(accept_loop(listener, handler, settings, owner));
        Ok(ControlServer {
            path: path.to_owned(),
            identity: (meta.dev(), meta.ino()),
            accept_task,
        })
    }

    /// The socket's path, as given to [`ControlServer::bind`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting connections and removes the socket file. Commands already running are
    /// finished and answered. Dropping the server does the same.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.accept_task.abort();
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// An I/O error with a sentence in front, keeping its kind.
fn with_context(e: &io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {}", describe_io(e)))
}

/// Sets mode 0600 on the socket file and returns its metadata.
fn restrict(path: &Path) -> io::Result<std::fs::Metadata> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::fs::metadata(path)
}

/// Makes `path` free for binding: nothing there, or a socket file nobody listens on any more
/// (removed). A live socket or a file of another kind is an error.
async fn remove_stale(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(with_context(
                &e,
                format!("cannot inspect the control socket path {}", path.display()),
            ))
        }
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket: refusing to replace it with the control socket",
                    path.display()
                ),
            ))
        }
        Ok(_) => {}
    }
    let in_use = || {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another moonroute is using the control socket {}",
                path.display()
            ),
        )
    };
    match tokio::time::timeout(LIVENESS_TIMEOUT, UnixStream::connect(path)).await {
        // Somebody accepted, or is there but too busy to: either way the socket is live.
        Ok(Ok(_)) | Err(_) => Err(in_use()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing a stale control socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(with_context(
                    &e,
                    format!("cannot remove the stale control socket {}", path.display()),
                )),
                _ => Ok(()),
            }
        }
        Ok(Err(e)) => Err(with_context(
            &e,
            format!(
                "cannot check whether the control socket {} is in use",
                path.display()
            ),
        )),
    }
}

/// Accepts connections, at most `settings.max_connections` served at once (the rest wait in
/// the listen backlog), each in its own task.
async fn accept_loop(listener: UnixListener, handler: Handler, settings: Settings, owner: u32) {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    serve(stream, handler, settings, owner).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// One connection: check the peer, read the request, run the handler, answer, close.
async fn serve(mut stream: UnixStream, handler: Handler, settings: Settings, owner: u32) {
    let reply = match authorize(&stream, owner) {
        Err(reply) => reply,
        Ok(()) => match read_request(&mut stream, settings.read_timeout).await {
            Ok(args) => run(handler, args).await,
            Err(reason) => {
                tracing::debug!(%reason, "control socket: malformed request");
                Reply::error(reason)
            }
        },
    };
    let mut answer = Vec::with_capacity(reply.text.len() + 6);
    answer.extend_from_slice(if reply.ok { b"ok\n" } else { b"error\n" });
    answer.extend_from_slice(reply.text.as_bytes());
    let write = async {
        stream.write_all(&answer).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(settings.read_timeout, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "control socket: cannot send the reply"),
        Err(_) => tracing::debug!("control socket: the client does not read its reply"),
    }
}

/// Only the socket's owner and root may send commands. The file's mode already says so; this
/// also covers a connection made in the instant between bind and chmod.
fn authorize(stream: &UnixStream, owner: u32) -> Result<(), Reply> {
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == owner || cred.uid() == 0 => Ok(()),
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                "control socket: refused a connection from another user"
            );
            Err(Reply::error(
                "permission denied: only the owner of the control socket may send commands",
            ))
        }
        Err(e) => Err(Reply::error(format!(
            "permission denied: cannot identify the client ({})",
            describe_io(&e)
        ))),
    }
}

/// Runs the handler on a blocking thread; a panic in it becomes an `error` reply.
async fn run(handler: Handler, args: Vec<String>) -> Reply {
    let command = args.first().cloned().unwrap_or_default();
    match tokio::task::spawn_blocking(move || handler(&args)).await {
        Ok(reply) => {
            tracing::debug!(%command, ok = reply.ok, "control command");
            reply
        }
        Err(e) => {
            tracing::error!(%command, error = %e, "control command failed");
            Reply::error(format!(
                "internal error: the command {command:?} failed unexpectedly (see the server log)"
            ))
        }
    }
}

/// Reads one request: its arguments, or the sentence for the `error` reply.
async fn read_request(stream: &mut UnixStream, timeout: Duration) -> Result<Vec<String>, String> {
    let read = async {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 8192];
        loop {
            match parse_request(&buf) {
                Parsed::Done(args) => return Ok(args),
                Parsed::Invalid(reason) => return Err(reason),
                Parsed::Incomplete if buf.len() >= MAX_REQUEST_BYTES => {
                    return Err(format!(
                        "the request is larger than {} KiB",
                        MAX_REQUEST_BYTES / 1024
                    ))
                }
                Parsed::Incomplete => {}
            }
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("cannot read the request: {}", describe_io(&e)))?;
            if n == 0 {
                return Err("the request ended before the empty line that must close it".to_owned());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no complete request within {} (arguments one per line, then an empty line)",
            human_duration(timeout)
        )),
    }
}

/// What the bytes received so far amount to.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// The empty line has arrived: these are the arguments.
    Done(Vec<String>),
    /// No empty line yet (within the first [`MAX_REQUEST_BYTES`]).
    Incomplete,
    /// A complete line is unacceptable: the reason.
    Invalid(String),
}

/// Parses a request: arguments one per line (`\n` or `\r\n`), closed by an empty line. Only the
/// first [`MAX_REQUEST_BYTES`] count.
fn parse_request(buf: &[u8]) -> Parsed {
    let mut rest = &buf[..buf.len().min(MAX_REQUEST_BYTES)];
    let mut args = Vec::new();
    while let Some(nl) = memchr::memchr(b'\n', rest) {
        let line = match &rest[..nl] {
            [head @ .., b'\r'] => head,
            line => line,
        };
        if line.is_empty() {
            return Parsed::Done(args);
        }
        match std::str::from_utf8(line) {
            Ok(arg) => args.push(arg.to_owned()),
            Err(_) => {
                return Parsed::Invalid(format!("argument {} is not valid UTF-8", args.len() + 1))
            }
        }
        rest = &rest[nl + 1..];
    }
    Parsed::Incomplete
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{send, ClientError};
    use tempfile::TempDir;

    const WAIT: Duration = Duration::from_secs(5);

    /// Echoes its arguments joined by `|`; `fail ...` answers an error, `panic` panics.
    fn echo_handler() -> Handler {
        Arc::new(|args: &[String]| match args.first().map(String::as_str) {
            Some("fail") => Reply::error(format!("failed: {}", args[1..].join("|"))),
            Some("panic") => panic!("the handler panicked on purpose"),
            _ => Reply::ok(args.join("|")),
        })
    }

    async fn bind(path: &Path) -> ControlServer {
        tokio::time::timeout(WAIT, ControlServer::bind(path, echo_handler()))
            .await
            .expect("bind timed out")
            .expect("bind")
    }

    /// The real client, on a blocking thread.
    async fn ask(path: &Path, args: &[&str]) -> Result<Reply, ClientError> {
        let path = path.to_owned();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let call = tokio::task::spawn_blocking(move || send(&path, &args, WAIT));
        tokio::time::timeout(WAIT * 2, call)
            .await
            .expect("client timed out")
            .expect("client task")
    }

    /// Sends raw bytes (from a separate task, ignoring write errors) and returns all the
    /// server answers.
    async fn raw(path: &Path, request: Vec<u8>, close_after: bool) -> String {
        let stream = UnixStream::connect(path).await.expect("connect");
        let (mut read_half, mut write_half) = stream.into_split();
        let writer = tokio::spawn(async move {
            let _ = write_half.write_all(&request).await;
            if close_after {
                let _ = write_half.shutdown().await;
            } else {
                // Keep the write half open until the server is done.
                std::future::pending::<()>().await;
            }
        });
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, read_half.read_to_end(&mut answer))
            .await
            .expect("no answer");
        writer.abort();
        String::from_utf8(answer).expect("utf-8 answer")
    }

    #[test]
    fn parses_requests() {
        assert_eq!(
            parse_request(b"reload\nnow\n\n"),
            Parsed::Done(vec!["reload".into(), "now".into()])
        );
        assert_eq!(
            parse_request(b"stats\r\n\r\n"),
            Parsed::Done(vec!["stats".into()])
        );
        assert_eq!(parse_request(b"\n"), Parsed::Done(vec![]));
        assert_eq!(parse_request(b"stats\n"), Parsed::Incomplete);
        assert_eq!(parse_request(b""), Parsed::Incomplete);
        assert_eq!(
            parse_request(b"ok\n\xff\n\n"),
            Parsed::Invalid("argument 2 is not valid UTF-8".into())
        );
        // Bytes after the empty line are ignored.
        assert_eq!(parse_request(b"a\n\nrest"), Parsed::Done(vec!["a".into()]));
    }

    #[tokio::test]
    async fn round_trip_ok_and_error() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("moonroute.ctl");
        let server = bind(&path).await;
        assert_eq!(server.path(), path);

        let reply = ask(&path, &["stats", "all"]).await.unwrap();
        assert_eq!(reply, Reply::ok("stats|all"));

        let reply = ask(&path, &["fail", "x", "y"]).await.unwrap();
        assert_eq!(reply, Reply::error("failed: x|y"));

        let reply = ask(&path, &["panic"]).await.unwrap();
        assert!(!reply.ok);
        assert!(reply.text.contains("internal error"), "{}", reply.text);

        // The server keeps serving after all of that.
        let reply = ask(&path, &["again"]).await.unwrap();
        assert_eq!(reply, Reply::ok("again"));
    }

    #[tokio::test]
    async fn arguments_with_spaces_are_kept() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("moonroute.ctl");
        let _server = bind(&path).await;
        let reply = ask(&path, &["kv.set", "greeting", " hello  world ", "é ✓"])
            .await
            .unwrap();
        assert_eq!(reply, Reply::ok("kv.set|greeting| hello  world |é ✓"));
    }

    #[tokio::test]
    async fn multi_line_bodies_and_empty_bodies_arrive_intact() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("moonroute.ctl");
        let handler: Handler = Arc::new(|args: &[String]| match args[0].as_str() {
            "empty" => Reply::ok(""),
            _ => Reply::ok("line 1\nline 2\n\nline 4\n"),
        });
        let _server = ControlServer::bind(&path, handler).await.unwrap();
        assert_eq!(ask(&path, &["empty"]).await.unwrap(), Reply::ok(""));
        assert_eq!(
            ask(&path, &["lines"]).await.unwrap(),
            Reply::ok("line 1\nline 2\n\nline 4\n")
        );
    }

    #[tokio::test]
    async fn socket_has_mode_0600_and_parent_is_created() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("var").join("run").join("moonroute.ctl");
        let _server = bind(&path).await;
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[tokio::test]
    async fn stale_socket_file_is_replaced() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("moonroute.ctl");
        // A crashed server leaves its socket file behind with nobody listening.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());

        let _server = bind(&path).await;
        assert_eq!(ask(&path, &["hello"]).await.unwrap(), Reply::ok("hello"));
    }

    #[tokio::test]
    async fn second_live_bind_is_refused() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("moonroute.ctl");
        let _first = bind(&path).await;

        let err = tokio::time::timeout(WAIT, ControlServer::bind(&path, echo_handler()))
            .await
            .expect("second bind timed out")
            .expect_err("second bind must fail");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(
            err.to_string(),
            format!(
                "another moonroute is using the control socket {}",
                path.display()
            )
        );
        // The first server is untouched.
        assert_eq!(ask(&path, &["still"]).await.unwrap(), Reply::ok("still"));
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_not_replaced() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("moonroute.toml");
        std::fs::write(&path, "precious").unwrap();
        let err = ControlServer::bind(&path, echo_handler())
            .await
            .expect_err("must refuse");
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[tokio::test]
    async fn shutdown_removes_the_socket_file() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("moonroute.ctl");
        let server = bind(&path).await;
        assert!(path.exists());
        server.shutdown();
        assert!(!path.exists());
        let err = ask(&path, &["hello"]).await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        // And the path can be bound again at once.
        let _again = bind(&path).await;
        assert_eq!(ask(&path, &["hello"]).await.unwrap(), Reply::ok("hello"));
    }

    #[tokio::test]
    async fn dropping_an_old_server_leaves_a_successors_socket_alone() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("moonroute.ctl");
        let old = bind(&path).await;
        // Someone replaced the file behind the old server's back.
        std::fs::remove_file(&path).unwrap();
        let _new = bind(&path).await;
        drop(old);
        assert!(path.exists());
        assert_eq!(ask(&path, &["hello"]).await.unwrap(), Reply::ok("hello"));
    }

    #[tokio::test]
    async fn oversized_request_is_refused() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("moonroute.ctl");
        let _server = bind(&path).await;
        let request = vec![b'a'; MAX_REQUEST_BYTES + 10_000];
        let answer = raw(&path, request, false).await;
        assert_eq!(answer, "error\nthe request is larger than 64 KiB");

        // Many short lines without the closing empty line are refused the same way.
        let request = b"x\n".repeat(MAX_REQUEST_BYTES);
        let answer = raw(&path, request, false).await;
        assert_eq!(answer, "error\nthe request is larger than 64 KiB");
    }

    #[tokio::test]
    async fn malformed_requests_get_a_sentence() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("moonroute.ctl");
        let _server = bind(&path).await;

        let answer = raw(&path, b"stats\n".to_vec(), true).await;
        assert_eq!(
            answer,
            "error\nthe request ended before the empty line that must close it"
        );
        let answer = raw(&path, b"stats\n\xc3\x28\n\n".to_vec(), true).await;
        assert_eq!(answer, "error\nargument 2 is not valid UTF-8");
        // Raw clients may send CRLF.
        let answer = raw(&path, b"a b\r\nc\r\n\r\n".to_vec(), false).await;
        assert_eq!(answer, "ok\na b|c");
    }

    #[tokio::test]
    async fn a_silent_client_times_out() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("moonroute.ctl");
        let settings = Settings {
            read_timeout: Duration::from_millis(200),
            ..Settings::default()
        };
        let _server = ControlServer::bind_with(&path, echo_handler(), settings)
            .await
            .unwrap();
        let answer = raw(&path, b"stats\n".to_vec(), false).await;
        assert_eq!(
            answer,
            "error\nno complete request within 200 ms (arguments one per line, then an empty line)"
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_bound_wait_their_turn() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("moonroute.ctl");
        let settings = Settings {
            max_connections: 1,
            ..Settings::default()
        };
        let _server = ControlServer::bind_with(&path, echo_handler(), settings)
            .await
            .unwrap();
        // The first connection holds the only slot while it has not sent its request.
        let mut first = UnixStream::connect(&path).await.unwrap();
        first.write_all(b"first\n").await.unwrap();
        let second = tokio::spawn({
            let path = path.clone();
            async move { ask(&path, &["second"]).await }
        });
        // The second one is accepted and answered once the first completes.
        first.write_all(b"\n").await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(WAIT, first.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, "ok\nfirst");
        let reply = tokio::time::timeout(WAIT, second)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply, Reply::ok("second"));
    }

    #[tokio::test]
    async fn client_reports_nobody_listening() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("moonroute.ctl");
        let err = ask(&path, &["stats"]).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot connect to the control socket {}: No such file or directory (is moonroute running?)",
                path.display()
            )
        );

        // A stale socket file: the connection is refused.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let err = ask(&path, &["stats"]).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot connect to the control socket {}: Connection refused (is moonroute running?)",
                path.display()
            )
        );
    }
}
