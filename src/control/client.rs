//! The client end of the control socket: blocking std I/O, no runtime needed. Used by
//! `moonroute ctl`.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{describe_io, human_duration, Reply, MAX_REQUEST_BYTES};

/// How long `moonroute ctl` waits for the answer to a command.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest answer the client accepts, in bytes.
const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;

/// Why a command got no answer. Its `Display` is a plain sentence for the operator.
#[derive(Debug)]
pub enum ClientError {
    /// The command cannot be expressed in the protocol (an empty argument, a line break in
    /// one, too large).
    Request(String),
    /// Connecting to the socket failed: usually the server is not running.
    Connect { path: PathBuf, source: io::Error },
    /// The connection broke while sending the request or reading the answer.
    Io { path: PathBuf, source: io::Error },
    /// No complete answer within the timeout.
    Timeout { path: PathBuf, timeout: Duration },
    /// The answer does not follow the protocol.
    Protocol { path: PathBuf, detail: String },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Request(reason) => write!(f, "cannot send this command: {reason}"),
            ClientError::Connect { path, source } => {
                write!(
                    f,
                    "cannot connect to the control socket {}: {}",
                    path.display(),
                    describe_io(source)
                )?;
                if matches!(
                    source.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) {
                    f.write_str(" (is moonroute running?)")?;
                }
                Ok(())
            }
            ClientError::Io { path, source } => write!(
                f,
                "lost the connection to the control socket {}: {}",
                path.display(),
                describe_io(source)
            ),
            ClientError::Timeout { path, timeout } => write!(
                f,
                "no answer from the control socket {} within {}",
                path.display(),
                human_duration(*timeout)
            ),
            ClientError::Protocol { path, detail } => write!(
                f,
                "unexpected answer from the control socket {}: {detail}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect { source, .. } | ClientError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Sends one command (its arguments, the command name first) to the server listening on
/// `path` and returns its reply. `timeout` bounds sending and the wait for the whole answer.
pub fn send(path: &Path, args: &[String], timeout: Duration) -> Result<Reply, ClientError> {
    let request = encode_request(args)?;
    let timeout = timeout.max(Duration::from_millis(1));
    let deadline = Instant::now() + timeout;
    let io_error = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            ClientError::Timeout {
                path: path.to_owned(),
                timeout,
            }
        } else {
            ClientError::Io {
                path: path.to_owned(),
                source,
            }
        }
    };

    let mut stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_owned(),
        source,
    })?;
    stream.set_write_timeout(Some(timeout)).map_err(io_error)?;
    stream.write_all(&request).map_err(io_error)?;

    let mut answer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io_error(io::ErrorKind::TimedOut.into()));
        }
        stream.set_read_timeout(Some(left)).map_err(io_error)?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                if answer.len() > MAX_REPLY_BYTES {
                    return Err(ClientError::Protocol {
                        path: path.to_owned(),
                        detail: format!(
                            "the answer is larger than {} MiB",
                            MAX_REPLY_BYTES / (1024 * 1024)
                        ),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e)),
        }
    }
    decode_reply(&answer).map_err(|detail| ClientError::Protocol {
        path: path.to_owned(),
        detail,
    })
}

/// The request bytes for `args`: each on its own line, then an empty line.
fn encode_request(args: &[String]) -> Result<Vec<u8>, ClientError> {
    let mut request = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        if arg.is_empty() {
            return Err(ClientError::Request(format!(
                "argument {} is empty, which the control protocol cannot carry",
                i + 1
            )));
        }
        if arg.contains(['\n', '\r']) {
            return Err(ClientError::Request(format!(
                "argument {} contains a line break, which the control protocol cannot carry",
                i + 1
            )));
        }
        request.extend_from_slice(arg.as_bytes());
        request.push(b'\n');
    }
    request.push(b'\n');
    if request.len() > MAX_REQUEST_BYTES {
        return Err(ClientError::Request(format!(
            "the arguments take more than {} KiB",
            MAX_REQUEST_BYTES / 1024
        )));
    }
    Ok(request)
}

/// Splits an answer into its status line and body.
fn decode_reply(answer: &[u8]) -> Result<Reply, String> {
    if answer.is_empty() {
        return Err("the server closed the connection without answering".to_owned());
    }
    let (status, body) = match memchr::memchr(b'\n', answer) {
        Some(nl) => (&answer[..nl], &answer[nl + 1..]),
        None => (answer, &answer[answer.len()..]),
    };
    let text = String::from_utf8_lossy(body).into_owned();
    match status {
        b"ok" => Ok(Reply::ok(text)),
        b"error" => Ok(Reply::error(text)),
        other => Err(format!(
            "the first line is {:?}, not \"ok\" or \"error\"",
            String::from_utf8_lossy(other)
        )),
    }
}

/// `moonroute ctl ARGS...`: sends the command, prints the reply body to stdout and returns 0
/// when it is `ok`, prints it to stderr and returns 1 when it is `error`, and prints why to
/// stderr and returns 2 when there is no answer (server not running, timeout...).
pub fn ctl_main(path: &Path, args: &[String]) -> i32 {
    let result = send(path, args, CTL_TIMEOUT);
    report(&result, &mut io::stdout().lock(), &mut io::stderr().lock())
}

/// Prints the outcome of a command and returns the exit status (see [`ctl_main`]). Write
/// errors (a closed pipe) are ignored: the exit status still tells.
fn report(result: &Result<Reply, ClientError>, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    fn print(w: &mut dyn Write, text: &str) {
        let _ = w.write_all(text.as_bytes());
        if !text.is_empty() && !text.ends_with('\n') {
            let _ = w.write_all(b"\n");
        }
        let _ = w.flush();
    }
    match result {
        Ok(reply) if reply.ok => {
            print(out, &reply.text);
            0
        }
        Ok(reply) => {
            print(err, &reply.text);
            1
        }
        Err(e) => {
            print(err, &format!("moonroute ctl: {e}"));
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_lines_then_an_empty_line() {
        let args = vec!["kv.set".to_owned(), "a key".to_owned()];
        assert_eq!(encode_request(&args).unwrap(), b"kv.set\na key\n\n");
        assert_eq!(encode_request(&[]).unwrap(), b"\n");
    }

    #[test]
    fn unsendable_arguments_are_refused_before_connecting() {
        let nowhere = Path::new("/nonexistent/moonroute.ctl");
        let err = send(nowhere, &["a\nb".to_owned()], CTL_TIMEOUT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot send this command: argument 1 contains a line break, which the control protocol cannot carry"
        );
        let err = send(nowhere, &["x".to_owned(), String::new()], CTL_TIMEOUT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot send this command: argument 2 is empty, which the control protocol cannot carry"
        );
        let err = send(nowhere, &["x".repeat(MAX_REQUEST_BYTES)], CTL_TIMEOUT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot send this command: the arguments take more than 64 KiB"
        );
    }

    #[test]
    fn replies_are_decoded() {
        assert_eq!(decode_reply(b"ok\nhello\n").unwrap(), Reply::ok("hello\n"));
        assert_eq!(decode_reply(b"ok").unwrap(), Reply::ok(""));
        assert_eq!(decode_reply(b"error\nno").unwrap(), Reply::error("no"));
        assert_eq!(
            decode_reply(b"").unwrap_err(),
            "the server closed the connection without answering"
        );
        assert_eq!(
            decode_reply(b"OK\n").unwrap_err(),
            "the first line is \"OK\", not \"ok\" or \"error\""
        );
    }

    #[test]
    fn ctl_exit_codes_and_streams() {
        let run = |result: Result<Reply, ClientError>| {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let code = report(&result, &mut out, &mut err);
            (
                code,
                String::from_utf8(out).unwrap(),
                String::from_utf8(err).unwrap(),
            )
        };
        assert_eq!(
            run(Ok(Reply::ok("reloaded"))),
            (0, "reloaded\n".into(), String::new())
        );
        assert_eq!(run(Ok(Reply::ok(""))), (0, String::new(), String::new()));
        assert_eq!(
            run(Ok(Reply::error("syntax error\n"))),
            (1, String::new(), "syntax error\n".into())
        );
        let nobody = ClientError::Connect {
            path: PathBuf::from("var/moonroute.ctl"),
            source: io::Error::from_raw_os_error(2),
        };
        assert_eq!(
            run(Err(nobody)),
            (
                2,
                String::new(),
                "moonroute ctl: cannot connect to the control socket var/moonroute.ctl: No such file or directory (is moonroute running?)\n".into()
            )
        );
    }
}
