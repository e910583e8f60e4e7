//! RFC 3263 server location: turns a next hop URI into an ordered list of transport, address
//! and port candidates (NAPTR → SRV → A/AAAA), over hickory-resolver.
//!
//! (Interface stub: the resolver lands with the DNS work.)

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use crate::transport::TransportKind;

/// What to locate: the next hop of RFC 3261 §16.6 step 7 / §8.1.2.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Query {
    pub host: String,
    pub port: Option<u16>,
    pub transport: Option<TransportKind>,
    pub secure: bool,
}

/// One place to try, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub kind: TransportKind,
    pub addr: SocketAddr,
    pub tls_name: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolveError {
    NotFound { host: String },
    Failed(String),
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::NotFound { host } => write!(f, "{host}: no such host"),
            ResolveError::Failed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ResolveError {}

pub fn numeric(query: &Query) -> Option<Result<Vec<Candidate>, ResolveError>> {
    let ip: IpAddr = if query.host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        query.host.parse().ok()?
    };
    let kind = match query.transport {
        Some(TransportKind::Udp) if query.secure => {
            return Some(Err(ResolveError::Failed("sips over UDP".into())))
        }
        Some(TransportKind::Tcp) if query.secure => TransportKind::Tls,
        Some(kind) => kind,
        None if query.secure => TransportKind::Tls,
        None => TransportKind::Udp,
    };
    let port = query.port.unwrap_or(match kind {
        TransportKind::Tls => 5061,
        _ => 5060,
    });
    let tls_name = (kind == TransportKind::Tls).then(|| Arc::from(query.host.as_str()));
    Some(Ok(vec![Candidate {
        kind,
        addr: SocketAddr::new(ip, port),
        tls_name,
    }]))
}

#[derive(Clone)]
pub struct Resolver;

impl Resolver {
    pub fn from_config(_config: &crate::config::Dns) -> Result<Resolver, ResolveError> {
        Ok(Resolver)
    }

    pub async fn locate(
        &self,
        query: &Query,
        _supported: &[TransportKind],
    ) -> Result<Vec<Candidate>, ResolveError> {
        numeric(query).unwrap_or_else(|| {
            Err(ResolveError::NotFound {
                host: query.host.clone(),
            })
        })
    }
}
