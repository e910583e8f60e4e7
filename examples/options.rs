//! Sends one OPTIONS request to a SIP server on this machine and prints the response.
//!
//! ```text
//! cargo run --example options                      # udp:127.0.0.1:5060
//! cargo run --example options -- tcp:127.0.0.1:5060
//! cargo run --example options -- udp:[::1]:5060 sip:alice@example.com
//! ```
//!
//! It only talks to loopback addresses (127.0.0.0/8, ::1): it is a tool for poking a server you
//! run locally, not a scanner.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let target = args
        .next()
        .unwrap_or_else(|| "udp:127.0.0.1:5060".to_string());
    let Some((transport, addr)) = target.split_once(':') else {
        eprintln!("target must look like udp:127.0.0.1:5060 or tcp:[::1]:5060");
        return ExitCode::from(2);
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("'{addr}' is not an IP address and port");
        return ExitCode::from(2);
    };
    if !addr.ip().is_loopback() {
        eprintln!("refusing to send to {addr}: this example only talks to loopback addresses");
        return ExitCode::from(2);
    }
    let uri = args.next().unwrap_or_else(|| format!("sip:{addr}"));
    let result = match transport {
        "udp" => over_udp(addr, &uri),
        "tcp" => over_tcp(addr, &uri),
        other => Err(format!("unknown transport '{other}' (udp or tcp)")),
    };
    match result {
        Ok(response) => {
            print!("{response}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn request(transport: &str, local: SocketAddr, uri: &str) -> String {
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let host = match local {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    format!(
        "OPTIONS {uri} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {host};branch=z9hG4bK{nonce:x};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:options@{host}>;tag={nonce:x}\r\n\
         To: <{uri}>\r\n\
         Call-ID: {nonce:x}@{host}\r\n\
         CSeq: 1 OPTIONS\r\n\
         Accept: application/sdp\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn over_udp(addr: SocketAddr, uri: &str) -> Result<String, String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    }
    .parse()
    .map_err(|_| "bad bind")?;
    let socket = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    socket
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    socket
        .send_to(request("UDP", local, uri).as_bytes(), addr)
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 65535];
    let (n, _) = socket
        .recv_from(&mut buf)
        .map_err(|e| format!("no response from {addr}: {e}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn over_tcp(addr: SocketAddr, uri: &str) -> Result<String, String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    stream
        .write_all(request("TCP", local, uri).as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the header block is complete; our requests carry no body in the answer we need.
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("no response from {addr}: {e}"))?;
        if n == 0 {
            return Err(format!("{addr} closed the connection"));
        }
        response.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&response).into_owned())
}
