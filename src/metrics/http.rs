//! The `[metrics] listen` endpoint: a minimal HTTP/1.1 server (RFC 9112) answering
//! `GET /metrics` with [`Registry::render`] in the Prometheus text format 0.0.4.
//!
//! Owns the request-head parsing ([`route`], sans-IO) and the tokio accept loop
//! ([`MetricsEndpoint::bind`]). One request per connection (`Connection: close`), so no
//! keep-alive state. Bounded: a request head of at most [`MAX_HEAD`] bytes, read within
//! [`READ_TIMEOUT`], and at most [`MAX_CONNECTIONS`] connections served at once (more wait
//! in the kernel's backlog). A body, if a client sends one, is never read.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::Registry;

/// The largest request head read (request line and header fields).
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// The exposition format's content type (text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What to answer to a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` (a query string is ignored).
    Metrics,
    /// 400: not an HTTP/1.x request line.
    BadRequest,
    /// 404: any other path.
    NotFound,
    /// 405: `/metrics` with a method other than GET.
    MethodNotAllowed,
    /// 505: an HTTP version other than 1.x.
    VersionNotSupported,
}

/// Routes a complete request head (up to and including its blank line, or at least its
/// request line): RFC 9112 §3 `method SP request-target SP HTTP-version`.
pub fn route(head: &[u8]) -> Route {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = head[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&head[..line_end]);
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::BadRequest;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    let is_token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !is_token(method) || target.is_empty() || !version.starts_with("HTTP/") {
        return Route::BadRequest;
    }
    if !version.starts_with("HTTP/1.") {
        return Route::VersionNotSupported;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (path, method) {
        ("/metrics", "GET") => Route::Metrics,
        ("/metrics", _) => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

/// The whole HTTP response for `route`.
pub fn response(route: Route, registry: &Registry) -> Vec<u8> {
    let (status, extra, body) = match route {
        Route::Metrics => ("200 OK", "", registry.render()),
        Route::BadRequest => ("400 Bad Request", "", "bad request\n".to_owned()),
        Route::NotFound => (
            "404 Not Found",
            "",
            "not found: metrics are at /metrics\n".to_owned(),
        ),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "Allow: GET\r\n",
            "method not allowed: use GET\n".to_owned(),
        ),
        Route::VersionNotSupported => (
            "505 HTTP Version Not Supported",
            "",
            "use HTTP/1.1\n".to_owned(),
        ),
    };
    let content_type = match route {
        Route::Metrics => CONTENT_TYPE,
        _ => "text/plain; charset=utf-8",
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// A 431 for a head longer than [`MAX_HEAD`] (RFC 6585 §5).
fn head_too_large() -> &'static [u8] {
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
}

/// The running endpoint; dropping it stops accepting.
pub struct MetricsEndpoint {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsEndpoint {
    /// Binds `addr` and serves `registry` on the current tokio runtime. Logs one warning
    /// when the address is not a loopback one (metrics name users and addresses) and one
    /// `info` line once ready.
    pub async fn bind(addr: SocketAddr, registry: Arc<Registry>) -> io::Result<MetricsEndpoint> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            warn!(listen = %local_addr, "the metrics endpoint listens beyond loopback: its samples name users and addresses, and it has no authentication; restrict access to it");
        }
        info!(listen = %local_addr, "metrics endpoint ready");
        let task = tokio::spawn(accept_loop(listener, registry));
        Ok(MetricsEndpoint { local_addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, registry: Arc<Registry>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Take a slot before accepting: past the cap, connections wait in the backlog.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "metrics endpoint: accept failed");
                // E.g. out of file descriptors: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            if let Err(error) = serve_one(stream, &registry).await {
                debug!(%peer, %error, "metrics endpoint: connection ended early");
            }
            drop(slot);
        });
    }
}

/// Reads one request head, answers it, and closes.
async fn serve_one(mut stream: TcpStream, registry: &Registry) -> io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request head in time",
            ))
        }
    };
    let answer = match head {
        Some(head) => response(route(&head), registry),
        None => head_too_large().to_vec(),
    };
    stream.write_all(&answer).await?;
    stream.shutdown().await
}

/// The request head up to its blank line; `None` when it exceeds [`MAX_HEAD`].
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the end of the request head",
            ));
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find_head_end(&head) {
            head.truncate(end);
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

/// The end of the head: after CRLF CRLF (or a bare LF LF, RFC 9112 §2.2 allows LF alone).
fn find_head_end(data: &[u8]) -> Option<usize> {
    let crlf = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = data.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_metrics_is_served_and_query_strings_are_ignored() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics HTTP/1.1\n\n"), Route::Metrics);
    }

    #[test]
    fn other_paths_methods_and_versions() {
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /metricsx HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(
            route(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(
            route(b"GET /metrics HTTP/2.0\r\n\r\n"),
            Route::VersionNotSupported
        );
    }

    #[test]
    fn malformed_request_lines_are_bad_requests() {
        for head in [
            &b""[..],
            b"\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"G(T /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics SIP/2.0\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(route(head), Route::BadRequest, "{head:?}");
        }
    }

    #[test]
    fn responses_carry_length_type_and_close() {
        let registry = Registry::new();
        registry.counter("m_total", "help").inc();
        let text = String::from_utf8(response(Route::Metrics, &registry)).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains(&format!("Content-Type: {CONTENT_TYPE}")),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(head.contains("Connection: close"), "{head}");
        assert_eq!(body, registry.render());
        let text = String::from_utf8(response(Route::MethodNotAllowed, &registry)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nAllow: GET\r\n"), "{text}");
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\nbody"), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }
}
