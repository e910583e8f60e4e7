//! A one-shot SIP user agent client: sends one request to a server on this machine, prints
//! every response (provisional and final, with the time since the request went out), completes
//! an INVITE the way RFC 3261 wants (ACK for the final response, then BYE for a 2xx), and exits
//! with the outcome.
//!
//! ```text
//! cargo run --example uac -- sip:bob@127.0.0.1:5060                      # INVITE over UDP
//! cargo run --example uac -- --method OPTIONS sip:127.0.0.1:5060
//! cargo run --example uac -- --transport tcp --proxy 127.0.0.1:5060 \
//!     --from sip:alice@127.0.0.1 --header 'X-Foo: bar' --no-bye sip:bob@example.com
//! ```
//!
//! Options: `--transport udp|tcp` (udp), `--method M` (INVITE), `--from URI`
//! (sip:uac@127.0.0.1), `--header 'Name: value'` (repeatable), `--proxy IP:PORT` (else the
//! host:port of the Request-URI, which must then be an IP address), `--no-bye` (leave a
//! answered call up), `--timeout SECS` (32, Timer B/F of §17.1).
//!
//! Exit status: 0 when the final response is a 2xx, 1 otherwise (including no answer), 2 on
//! usage errors.
//!
//! Like `examples/options.rs` it only talks to loopback addresses (127.0.0.0/8, ::1): it is a
//! tool for poking a server you run locally, not a scanner. Over UDP it retransmits like a
//! client transaction (Timer A/E, §17.1); ACK and BYE of a 2xx go to the first Record-Route hop
//! or the Contact when that is a loopback address, else where the INVITE went. Over TCP every
//! request uses the one connection. Out of scope: authentication, PRACK, forked 2xx (only the
//! first is answered), CANCEL on Ctrl-C, DNS.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use moonroute::sip::{Contact, HeaderName, Message, NameAddr, Uri};

const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);

struct Options {
    tcp: bool,
    method: String,
    from: String,
    headers: Vec<String>,
    proxy: Option<SocketAddr>,
    bye: bool,
    timeout: Duration,
    uri: String,
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("{e}\nusage: uac [--transport udp|tcp] [--method M] [--from URI] [--header 'N: v']... [--proxy IP:PORT] [--no-bye] [--timeout SECS] sip:user@127.0.0.1:5060");
            return ExitCode::from(2);
        }
    };
    let dest = match opts.proxy.map_or_else(|| hop(&opts.uri), Ok) {
        Ok(dest) if dest.ip().is_loopback() => dest,
        Ok(dest) => {
            eprintln!("refusing to send to {dest}: this example only talks to loopback addresses");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("{e} (or give --proxy 127.0.0.1:PORT)");
            return ExitCode::from(2);
        }
    };
    match run(&opts, dest) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut opts = Options {
        tcp: false,
        method: "INVITE".into(),
        from: "sip:uac@127.0.0.1".into(),
        headers: Vec::new(),
        proxy: None,
        bye: true,
        timeout: Duration::from_secs(32),
        uri: String::new(),
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--transport" => match value()?.to_ascii_lowercase().as_str() {
                "udp" => opts.tcp = false,
                "tcp" => opts.tcp = true,
                other => return Err(format!("unknown transport '{other}' (udp or tcp)")),
            },
            "--method" => opts.method = value()?,
            "--from" => opts.from = value()?,
            "--header" => {
                let header = value()?;
                if !header.contains(':') || header.contains(['\r', '\n']) {
                    return Err(format!("'{header}' is not one 'Name: value' header"));
                }
                opts.headers.push(header);
            }
            "--proxy" => {
                let v = value()?;
                opts.proxy = Some(v.parse().map_err(|_| format!("'{v}' is not IP:PORT"))?);
            }
            "--no-bye" => opts.bye = false,
            "--timeout" => {
                let v = value()?;
                let secs: u64 = v.parse().map_err(|_| format!("'{v}' is not seconds"))?;
                opts.timeout = Duration::from_secs(secs);
            }
            "-h" | "--help" => return Err("uac: send one SIP request".into()),
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            _ if opts.uri.is_empty() => opts.uri = arg,
            _ => return Err(format!("unexpected argument '{arg}'")),
        }
    }
    if opts.uri.is_empty() {
        return Err("missing the Request-URI".into());
    }
    if Uri::parse(opts.uri.as_bytes()).is_err() || Uri::parse(opts.from.as_bytes()).is_err() {
        return Err("the Request-URI and --from must be URIs like sip:bob@127.0.0.1".into());
    }
    if !opts
        .method
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
        || opts.method.is_empty()
    {
        return Err(format!("'{}' is not a method", opts.method));
    }
    Ok(opts)
}

/// The address a SIP URI, or a name-addr holding one, points at (IP literals only).
fn hop(uri: &str) -> Result<SocketAddr, String> {
    let parsed = match NameAddr::parse(uri.as_bytes()) {
        Ok(na) => na.uri,
        Err(_) => Uri::parse(uri.as_bytes()).map_err(|e| format!("bad URI {uri}: {e}"))?,
    };
    let sip = parsed.as_sip().ok_or(format!("{uri} is not a SIP URI"))?;
    let ip = sip
        .host
        .ip()
        .ok_or(format!("{uri}: the host is not an IP address"))?;
    Ok(SocketAddr::new(ip, sip.port.unwrap_or(5060)))
}

enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream, BytesMut),
}

impl Conn {
    fn open(tcp: bool, dest: SocketAddr) -> Result<Conn, String> {
        if tcp {
            let stream = TcpStream::connect_timeout(&dest, Duration::from_secs(2))
                .map_err(|e| format!("connect {dest}: {e}"))?;
            return Ok(Conn::Tcp(stream, BytesMut::new()));
        }
        let bind = if dest.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        };
        UdpSocket::bind(bind)
            .map(Conn::Udp)
            .map_err(|e| format!("bind: {e}"))
    }

    fn local(&self) -> SocketAddr {
        match self {
            Conn::Udp(s) => s.local_addr(),
            Conn::Tcp(s, _) => s.local_addr(),
        }
        .expect("a bound socket has an address")
    }

    fn send(&mut self, data: &[u8], dest: SocketAddr) -> Result<(), String> {
        match self {
            Conn::Udp(s) => s.send_to(data, dest).map(drop),
            Conn::Tcp(s, _) => s.write_all(data),
        }
        .map_err(|e| format!("send: {e}"))
    }

    /// The next message, or `None` when `until` passes first.
    fn recv(&mut self, until: Instant) -> Result<Option<Message>, String> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let data = match self {
                Conn::Udp(s) => {
                    s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
                    let mut buf = vec![0u8; 65535];
                    match s.recv_from(&mut buf) {
                        Ok((n, _)) => Bytes::copy_from_slice(&buf[..n]),
                        Err(e) if is_timeout(&e) => return Ok(None),
                        Err(e) => return Err(format!("receive: {e}")),
                    }
                }
                Conn::Tcp(s, buf) => match next_frame(buf) {
                    Some(frame) => frame,
                    None => {
                        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk) {
                            Ok(0) => return Err("the server closed the connection".into()),
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            Err(e) if is_timeout(&e) => return Ok(None),
                            Err(e) => return Err(format!("receive: {e}")),
                        }
                        continue;
                    }
                },
            };
            match Message::parse(data) {
                Ok(m) => return Ok(Some(m)),
                Err(e) => eprintln!("(ignoring an unparsable message: {e})"),
            }
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// One message off a TCP stream, framed by Content-Length (§18.3).
fn next_frame(buf: &mut BytesMut) -> Option<Bytes> {
    while buf.starts_with(b"\r\n") {
        buf.advance(2);
    }
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let body_len = head
        .split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length") || n.trim() == "l")
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + body_len).then(|| buf.split_to(head_end + body_len).freeze())
}

/// What the call needs to remember across requests.
struct Call {
    started: Instant,
    local: SocketAddr,
    transport: &'static str,
    nonce: String,
    branches: u32,
}

impl Call {
    fn branch(&mut self) -> String {
        self.branches += 1;
        format!("z9hG4bK{}.{}", self.nonce, self.branches)
    }

    /// A request; `routes` become Route fields in order.
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        method: &str,
        uri: &str,
        branch: &str,
        routes: &[String],
        from: &str,
        to: &str,
        cseq: u32,
        extra: &[String],
        body: &str,
    ) -> String {
        let mut out = format!(
            "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/{} {};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n",
            self.transport, self.local
        );
        for route in routes {
            out += &format!("Route: {route}\r\n");
        }
        out += &format!(
            "From: {from}\r\nTo: {to}\r\nCall-ID: {}@{}\r\nCSeq: {cseq} {method}\r\n",
            self.nonce,
            self.local.ip()
        );
        if method != "ACK" && method != "BYE" {
            let tp = if self.transport == "TCP" {
                ";transport=tcp"
            } else {
                ""
            };
            out += &format!("Contact: <sip:uac@{}{tp}>\r\n", self.local);
        }
        for header in extra {
            out += &format!("{header}\r\n");
        }
        if !body.is_empty() {
            out += "Content-Type: application/sdp\r\n";
        }
        out + &format!("Content-Length: {}\r\n\r\n{body}", body.len())
    }

    fn print(&self, response: &Message) {
        let ms = self.started.elapsed().as_secs_f64() * 1000.0;
        println!("--- {ms:9.3} ms ---");
        print!("{}", String::from_utf8_lossy(&response.to_bytes()));
    }
}

/// Sends a request and waits for its final response (printing every response), retransmitting
/// over UDP (§17.1.1.2, §17.1.2.2). A 2xx to an earlier INVITE arriving meanwhile (the server
/// retransmits until it gets the ACK) is answered with `ack_again`.
fn transaction(
    conn: &mut Conn,
    call: &Call,
    request: &str,
    dest: SocketAddr,
    deadline: Instant,
    ack_again: Option<&(String, SocketAddr)>,
) -> Result<Option<Message>, String> {
    let sent = Message::parse(Bytes::copy_from_slice(request.as_bytes())).expect("own request");
    let branch = sent
        .top_via()
        .ok()
        .and_then(|v| v.branch())
        .map(<[u8]>::to_vec);
    let method = sent.method().expect("a request").clone();
    let is_invite = method.as_str() == "INVITE";
    conn.send(request.as_bytes(), dest)?;
    let mut interval = T1;
    let mut next_retransmit = Instant::now() + interval;
    let mut provisional = false;
    loop {
        let retransmits = matches!(conn, Conn::Udp(_)) && !(is_invite && provisional);
        let until = if retransmits {
            next_retransmit.min(deadline)
        } else {
            deadline
        };
        let Some(response) = conn.recv(until)? else {
            if Instant::now() >= deadline {
                return Ok(None);
            }
            conn.send(request.as_bytes(), dest)?;
            interval = if is_invite {
                interval * 2
            } else {
                (interval * 2).min(T2)
            };
            next_retransmit = Instant::now() + interval;
            continue;
        };
        let (Some(status), Ok(cseq)) = (response.status(), response.cseq()) else {
            continue; // a request from the server: not handled by this client
        };
        let ours = response
            .top_via()
            .ok()
            .and_then(|v| v.branch())
            .map(<[u8]>::to_vec)
            == branch
            && cseq.method == method;
        if !ours {
            if let (Some((ack, to)), true) = (ack_again, cseq.method.as_str() == "INVITE") {
                conn.send(ack.as_bytes(), *to)?;
            }
            continue;
        }
        call.print(&response);
        if status >= 200 {
            return Ok(Some(response));
        }
        provisional = true;
    }
}

fn run(opts: &Options, dest: SocketAddr) -> Result<bool, String> {
    let mut conn = Conn::open(opts.tcp, dest)?;
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut call = Call {
        started: Instant::now(),
        local: conn.local(),
        transport: if opts.tcp { "TCP" } else { "UDP" },
        nonce: format!("{nonce:x}"),
        branches: 0,
    };
    let deadline = call.started + opts.timeout;
    let from = format!("<{}>;tag={}", opts.from, call.nonce);
    let to = format!("<{}>", opts.uri);
    let is_invite = opts.method == "INVITE";
    let body = if is_invite {
        "v=0\r\no=uac 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio 49170 RTP/AVP 0\r\n"
    } else {
        ""
    };
    let branch = call.branch();
    let request = call.request(
        &opts.method,
        &opts.uri,
        &branch,
        &[],
        &from,
        &to,
        1,
        &opts.headers,
        body,
    );
    println!(
        "--> {} {} to {dest} over {}",
        opts.method, opts.uri, call.transport
    );
    let Some(response) = transaction(&mut conn, &call, &request, dest, deadline, None)? else {
        println!("no final response within {:?}", opts.timeout);
        return Ok(false);
    };
    let status = response.status().unwrap_or(0);
    let success = (200..300).contains(&status);
    if !is_invite {
        return Ok(success);
    }
    let response_to = String::from_utf8_lossy(response.header(HeaderName::To).unwrap_or(b""));
    if !success {
        // §17.1.1.3: same branch and Request-URI, To from the response.
        let ack = call.request(
            "ACK",
            &opts.uri,
            &branch,
            &[],
            &from,
            &response_to,
            1,
            &[],
            "",
        );
        conn.send(ack.as_bytes(), dest)?;
        println!("--> ACK");
        return Ok(false);
    }

    // §12.1.2 and §13.2.2.4: the dialog's route set is Record-Route reversed, its target the
    // Contact; the ACK is a new transaction.
    let mut routes: Vec<String> = response
        .values(HeaderName::RecordRoute)
        .filter_map(Result::ok)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    routes.reverse();
    let target = match response.contacts().next() {
        Some(Ok(Contact::Addr(a))) => String::from_utf8_lossy(a.uri.raw()).into_owned(),
        _ => opts.uri.clone(),
    };
    let next_hop = hop(routes.first().unwrap_or(&target))
        .ok()
        .filter(|a| a.ip().is_loopback() && !opts.tcp)
        .unwrap_or(dest);
    let ack_branch = call.branch();
    let ack = call.request(
        "ACK",
        &target,
        &ack_branch,
        &routes,
        &from,
        &response_to,
        1,
        &[],
        "",
    );
    conn.send(ack.as_bytes(), next_hop)?;
    println!("--> ACK to {next_hop}");
    if !opts.bye {
        return Ok(true);
    }
    let bye_branch = call.branch();
    let bye = call.request(
        "BYE",
        &target,
        &bye_branch,
        &routes,
        &from,
        &response_to,
        2,
        &[],
        "",
    );
    println!("--> BYE to {next_hop}");
    let bye_deadline = Instant::now() + Duration::from_secs(32).min(opts.timeout);
    let resend_ack = (ack, next_hop);
    match transaction(
        &mut conn,
        &call,
        &bye,
        next_hop,
        bye_deadline,
        Some(&resend_ack),
    )? {
        Some(_) => {}
        None => println!("no final response to the BYE"),
    }
    Ok(true)
}
