//! TLS over TCP (RFC 3261 §26.2, RFC 5922), with rustls.
//!
//! Owns:
//! - `[tls]` ([`TlsConfig`], read by `crate::config`);
//! - the rustls configurations, built once per server ([`TlsContext`]) from `[tls]`: the
//!   server's certificate chain and key for `tls:` listeners, and the roots that servers we
//!   connect to are verified against (`ca_file`, else the system's roots). Every configuration
//!   names the ring provider explicitly, so nothing depends on a process-wide default;
//! - accepting: `tls:` listeners bind and accept like TCP ones (`tcp::run_acceptor`); each
//!   accepted connection is registered at once, under the registry's limits (it counts toward
//!   `max_connections`, `max_inbound_connections`, and, for its source address, toward
//!   `max_connections_per_ip` and, until its first SIP message, `max_pending_connections_per_ip`:
//!   so one address can only stall a few handshakes), then its handshake runs within
//!   `handshake_timeout_ms`, and at most `max_handshakes` run at a time on one event loop, so
//!   slow, silent or plaintext clients cannot pin resources. A refused connection and a
//!   handshake that times out get one `moonroute::refused` line and are counted; a failed
//!   handshake (garbage, plaintext) is logged at debug level and the connection closed;
//! - sending: a response goes back on its connection (§18.2.2). A request reuses a connection
//!   this server opened and verified for the same name (and address), else a new one is
//!   opened: registered at once so messages queue meanwhile, TCP connect within the connect
//!   timeout, handshake within the handshake timeout, and on any failure the destination is
//!   reported unreachable so the transaction fails over. Nothing is ever sent in plaintext;
//! - the RFC 5922 check of the server's identity ([`SipDomainVerifier`], rules in `identity`):
//!   rustls-webpki validates the chain; the name is matched against the SIP domain the request
//!   was for (`Destination::tls_name`), or the peer's IP address when there is none.
//!
//! Once established, a TLS connection is served by the same task as a TCP one
//! (`tcp::serve_stream`): framing, send queue, keep-alive pongs, idle timeout. Clients are not
//! asked for certificates (mutual TLS is not implemented).

mod identity;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, InconsistentKeys, RootCertStore,
    ServerConfig, SignatureScheme,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, warn};

use super::dispatch::LoopContext;
use super::metrics::{ConnectionRefusal, StreamTimeout};
use super::registry::Registration;
use super::{tcp, Destination, TransportKind};
use crate::logging::REFUSED;

/// TLS (RFC 3261 §26.2, RFC 5922): the certificate presented on `tls:` listeners, and how the
/// certificates of servers we connect to are verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain (leaf first). Needed when a `tls:` address is
    /// listened on. Default: empty.
    pub certificate: PathBuf,
    /// PEM file with the private key of `certificate`. Default: empty.
    pub private_key: PathBuf,
    /// PEM bundle of CA certificates that server certificates are verified against. Empty:
    /// the system's roots. Default: empty.
    pub ca_file: PathBuf,
    /// Longest a TLS handshake may take, in milliseconds. Default: 5000.
    pub handshake_timeout_ms: u64,
    /// TLS handshakes of accepted connections in progress at once, per event loop; beyond it
    /// new TLS connections are closed at once. Default: 256.
    pub max_handshakes: usize,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            certificate: PathBuf::new(),
            private_key: PathBuf::new(),
            ca_file: PathBuf::new(),
            handshake_timeout_ms: 5000,
            max_handshakes: 256,
        }
    }
}

/// The TLS configurations of one server, shared by its event loops.
pub(crate) struct TlsContext {
    /// For `tls:` listeners; `None` when the server has none.
    acceptor: Option<TlsAcceptor>,
    connector: TlsConnector,
    handshake_timeout: Duration,
    /// Handshakes of accepted connections in progress at once, per event loop.
    max_handshakes: usize,
}

impl TlsContext {
    /// Builds the configurations from `[tls]`; `listening` says whether a `tls:` address is
    /// listened on (the certificate and key are needed then). Errors name the file and the
    /// problem.
    pub(crate) fn new(tls: &TlsConfig, listening: bool) -> io::Result<TlsContext> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let acceptor = match listening {
            true => Some(TlsAcceptor::from(Arc::new(server_config(
                tls,
                Arc::clone(&provider),
            )?))),
            false => None,
        };
        let connector = TlsConnector::from(Arc::new(client_config(tls, provider)?));
        Ok(TlsContext {
            acceptor,
            connector,
            handshake_timeout: Duration::from_millis(tls.handshake_timeout_ms),
            max_handshakes: tls.max_handshakes,
        })
    }
}

impl TlsContext {
    /// `tls.max_handshakes`: TLS handshakes one event loop runs at a time.
    pub(crate) fn max_handshakes(&self) -> usize {
        self.max_handshakes
    }

    /// The acceptor of `tls:` and `wss:` listeners; `None` when the server has neither.
    pub(crate) fn acceptor(&self) -> Option<&TlsAcceptor> {
        self.acceptor.as_ref()
    }
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext")
            .field("listening", &self.acceptor.is_some())
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_handshakes", &self.max_handshakes)
            .finish_non_exhaustive()
    }
}

fn config_error(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// The server side: the certificate chain and key of `[tls]`.
fn server_config(tls: &TlsConfig, provider: Arc<CryptoProvider>) -> io::Result<ServerConfig> {
    if tls.certificate.as_os_str().is_empty() || tls.private_key.as_os_str().is_empty() {
        return Err(config_error(
            "a tls: listen address is configured but [tls] certificate and private_key are not \
             set"
            .to_owned(),
        ));
    }
    let chain = load_certificates(&tls.certificate, "certificate")?;
    let key = load_private_key(&tls.private_key)?;
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| config_error(format!("TLS: {error}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| {
            let (cert, key) = (tls.certificate.display(), tls.private_key.display());
            config_error(match error {
                rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => {
                    format!("[tls] private_key {key} does not match the certificate in {cert}")
                }
                other => {
                    format!("[tls] cannot use certificate {cert} with private_key {key}: {other}")
                }
            })
        })
}

/// The certificates of a PEM file, in order; an error names the file when it cannot be read
/// or holds none.
fn load_certificates(path: &Path, key: &str) -> io::Result<Vec<CertificateDer<'static>>> {
    let pem = read_file(path, key)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| {
            config_error(format!(
                "[tls] {key} {}: invalid PEM: {error}",
                path.display()
            ))
        })?;
    if certificates.is_empty() {
        return Err(config_error(format!(
            "[tls] {key} {}: no certificate (-----BEGIN CERTIFICATE-----) in the file",
            path.display()
        )));
    }
    Ok(certificates)
}

fn load_private_key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    let pem = read_file(path, "private_key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| {
        let problem = match error {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no private key (PKCS#8, PKCS#1 or SEC1 PEM) in the file".to_owned()
            }
            other => format!("invalid PEM: {other}"),
        };
        config_error(format!("[tls] private_key {}: {problem}", path.display()))
    })
}

fn read_file(path: &Path, key: &str) -> io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("[tls] {key} {}: cannot read it: {error}", path.display()),
        )
    })
}

/// The client side: server certificates verified against `ca_file` or the system's roots,
/// and matched per RFC 5922 by [`SipDomainVerifier`].
fn client_config(tls: &TlsConfig, provider: Arc<CryptoProvider>) -> io::Result<ClientConfig> {
    let roots = if tls.ca_file.as_os_str().is_empty() {
        system_roots()
    } else {
        let mut roots = RootCertStore::empty();
        let (added, _ignored) =
            roots.add_parsable_certificates(load_certificates(&tls.ca_file, "ca_file")?);
        if added == 0 {
            return Err(config_error(format!(
                "[tls] ca_file {}: no usable CA certificate in the file",
                tls.ca_file.display()
            )));
        }
        Arc::new(roots)
    };
    let verifier = SipDomainVerifier::new(roots, Arc::clone(&provider))?;
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| config_error(format!("TLS: {error}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// The system's CA certificates, loaded once per process; a warning when there are none
/// (outbound TLS then fails until `ca_file` is set).
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    Arc::clone(ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            debug!(%error, "while loading the system's CA certificates");
        }
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            warn!(
                "no system CA certificates found: outbound TLS connections will fail \
                 unless [tls] ca_file is set"
            );
        }
        Arc::new(roots)
    }))
}

/// Verifies a server's certificate for SIP (RFC 5922): the chain with rustls-webpki, the name
/// with the SIP domain rules of `identity` (sip URI subjectAltNames first, no wildcards, CN
/// only without subjectAltName) instead of webpki's HTTPS rules.
#[derive(Debug)]
pub(crate) struct SipDomainVerifier {
    /// `None` when there are no roots at all: every certificate is then refused.
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl SipDomainVerifier {
    fn new(roots: Arc<RootCertStore>, provider: Arc<CryptoProvider>) -> io::Result<Self> {
        let chain = if roots.is_empty() {
            None
        } else {
            let verifier =
                WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                    .build()
                    .map_err(|error| config_error(format!("TLS verifier: {error}")))?;
            Some(verifier)
        };
        Ok(SipDomainVerifier { chain, provider })
    }
}

impl ServerCertVerifier for SipDomainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ));
        };
        // webpki checks the name last, after the chain, validity and usage: a name error
        // means everything else passed. Its name rules (HTTPS: wildcards) are not SIP's, so
        // its verdict on the name is replaced by ours either way.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(other) => return Err(other),
        }
        if identity::certificate_matches(end_entity, server_name) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ----- accepting ---------------------------------------------------------------------------

/// Holds one of the loop's handshake slots; gives it back when dropped (`wss:` connections
/// take one too, `ws`).
pub(crate) struct HandshakeSlot(Rc<LoopContext>);

impl HandshakeSlot {
    fn take(ctx: &Rc<LoopContext>) -> Option<HandshakeSlot> {
        ctx.begin_handshake().then(|| HandshakeSlot(Rc::clone(ctx)))
    }

    /// [`HandshakeSlot::take`], or when every slot is busy the refusal of the `kind`
    /// connection from `peer` logged and counted (the caller closes it).
    pub(crate) fn take_or_refuse(
        ctx: &Rc<LoopContext>,
        kind: TransportKind,
        peer: SocketAddr,
    ) -> Option<HandshakeSlot> {
        let slot = HandshakeSlot::take(ctx);
        if slot.is_none() {
            let reason = format!(
                "tls.max_handshakes ({}) handshakes in progress on this event loop",
                ctx.tls().max_handshakes()
            );
            tcp::refuse(ctx, kind, peer, ConnectionRefusal::MaxHandshakes, &reason);
        }
        slot
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.end_handshake();
    }
}

/// A connection accepted on a `tls:` listener: registered, then served after its handshake.
/// Dropping `stream` closes a refused one.
pub(crate) fn accept(ctx: &Rc<LoopContext>, stream: TcpStream, peer: SocketAddr) {
    let Some(acceptor) = ctx.tls().acceptor.clone() else {
        warn!(%peer, "refusing TLS connection: no server certificate configured");
        return;
    };
    let queue_len = ctx.limits().tcp_send_queue;
    let registration = match ctx
        .registry()
        .register_inbound(TransportKind::Tls, peer, queue_len)
    {
        Ok(registration) => registration,
        Err(reached) => return tcp::refuse_limit(ctx, TransportKind::Tls, peer, reached),
    };
    let Some(slot) = HandshakeSlot::take_or_refuse(ctx, TransportKind::Tls, peer) else {
        return;
    };
    ctx.metrics()
        .transport
        .connection_opened(TransportKind::Tls, true);
    debug!(conn = %registration.id(), %peer, worker = ctx.index(), "accepted TLS connection");
    let task = accept_and_serve(Rc::clone(ctx), acceptor, stream, registration, slot);
    tokio::task::spawn_local(task);
}

async fn accept_and_serve(
    ctx: Rc<LoopContext>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    registration: Registration,
    slot: HandshakeSlot,
) {
    let handle = registration.handle().clone();
    let Some(local) = tcp::prepare(&stream, &handle) else {
        return;
    };
    let timeout = ctx.tls().handshake_timeout;
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(timeout, acceptor.accept(stream)) => handshake,
        () = handle.abort_signal().aborted() => {
            debug!(conn = %handle.id(), "connection aborted during the TLS handshake");
            return;
        }
    };
    drop(slot);
    let peer = handle.peer();
    match handshake {
        Ok(Ok(stream)) => {
            debug!(conn = %handle.id(), %peer, "TLS handshake done");
            tcp::serve_stream(ctx, stream, TransportKind::Tls, local, registration).await;
        }
        Ok(Err(error)) => {
            debug!(conn = %handle.id(), %peer, %error, "TLS handshake failed; closing")
        }
        Err(_) => {
            // The address's pending place is free once this is logged.
            drop(registration);
            ctx.metrics()
                .transport
                .connection_timed_out(TransportKind::Tls, StreamTimeout::Handshake);
            warn!(
                target: REFUSED,
                source = %peer,
                transport = %TransportKind::Tls,
                conn = %handle.id(),
                reason = %format_args!(
                    "TLS handshake not finished within {} ms (tls.handshake_timeout_ms); connection closed",
                    timeout.as_millis()
                ),
                "connection dropped"
            );
        }
    }
}

// ----- sending -----------------------------------------------------------------------------

/// Sends `data` over TLS: on `dest.conn` if it is still open (RFC 3261 §18.2.2); else, for a
/// destination with a SIP domain, on a connection opened and verified for that domain and
/// address; without one, on any open TLS connection to the address; else on a new connection.
pub(crate) fn send(ctx: &Rc<LoopContext>, dest: Destination, data: Bytes) {
    if let Some(connection) = tcp::connection_by_id(ctx, &dest) {
        return tcp::queue_on(&connection, data);
    }
    let name = match peer_name(&dest) {
        Ok(name) => name,
        Err(reason) => {
            warn!(dest = %dest.addr, reason, "dropping outgoing TLS message");
            ctx.report_unreachable(TransportKind::Tls, dest.addr);
            return;
        }
    };
    let key = name_key(&name);
    let existing = match dest.tls_name {
        // Only a connection whose certificate was checked for this domain proves it (an
        // accepted connection from that address proves nothing).
        Some(_) => ctx
            .registry()
            .find_named(TransportKind::Tls, dest.addr, &key),
        None => ctx.registry().find_peer(TransportKind::Tls, dest.addr),
    };
    if let Some(connection) = existing {
        return tcp::queue_on(&connection, data);
    }
    if dest.reuse_only {
        return tcp::no_connection(ctx, &dest);
    }
    let Some(registration) =
        tcp::register_outbound(ctx, TransportKind::Tls, dest.addr, Some(key), data)
    else {
        return;
    };
    let task = connect_and_serve(Rc::clone(ctx), dest.addr, name, registration);
    tokio::task::spawn_local(task);
}

/// The name the peer's certificate must prove: the destination's SIP domain, else its IP
/// address.
fn peer_name(dest: &Destination) -> Result<ServerName<'static>, &'static str> {
    match &dest.tls_name {
        Some(name) => {
            let name = name.strip_suffix('.').unwrap_or(name);
            let name = name
                .strip_prefix('[')
                .and_then(|n| n.strip_suffix(']'))
                .unwrap_or(name);
            ServerName::try_from(name.to_owned())
                .map_err(|_| "the SIP domain is not a valid DNS name or IP address")
        }
        None => Ok(ServerName::IpAddress(dest.addr.ip().into())),
    }
}

/// How a verified name is keyed in the connection registry: DNS names in lower case, IP
/// addresses in their canonical text form.
fn name_key(name: &ServerName<'_>) -> Arc<str> {
    match name {
        ServerName::DnsName(dns) => Arc::from(dns.as_ref().to_ascii_lowercase()),
        ServerName::IpAddress(ip) => Arc::from(std::net::IpAddr::from(*ip).to_string()),
        other => Arc::from(format!("{other:?}")),
    }
}

async fn connect_and_serve(
    ctx: Rc<LoopContext>,
    peer: SocketAddr,
    name: ServerName<'static>,
    mut registration: Registration,
) {
    let Some(stream) = tcp::connect(&ctx, TransportKind::Tls, peer, &mut registration).await else {
        return;
    };
    let handle = registration.handle().clone();
    let Some(local) = tcp::prepare(&stream, &handle) else {
        ctx.report_unreachable(TransportKind::Tls, peer);
        return;
    };
    let timeout = ctx.tls().handshake_timeout;
    let connector = ctx.tls().connector.clone();
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(timeout, connector.connect(name.clone(), stream)) => handshake,
        () = handle.abort_signal().aborted() => {
            debug!(conn = %handle.id(), %peer, "connection aborted during the TLS handshake");
            return;
        }
    };
    let queued = registration.queue().len();
    let name = name.to_str();
    match handshake {
        Ok(Ok(stream)) => {
            debug!(conn = %handle.id(), %peer, %name, "TLS connection established");
            tcp::serve_stream(ctx, stream, TransportKind::Tls, local, registration).await;
        }
        Ok(Err(error)) => {
            warn!(
                %peer, %name, %error, queued,
                "TLS handshake failed; dropping the queued messages"
            );
            ctx.report_unreachable(TransportKind::Tls, peer);
        }
        Err(_) => {
            warn!(
                %peer, %name, queued,
                timeout_ms = timeout.as_millis(),
                "TLS handshake timed out; dropping the queued messages"
            );
            ctx.report_unreachable(TransportKind::Tls, peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(tls_name: Option<&str>) -> Destination {
        Destination {
            kind: TransportKind::Tls,
            addr: "192.0.2.7:5061".parse().unwrap(),
            conn: None,
            local: None,
            tls_name: tls_name.map(Arc::from),
            reuse_only: false,
        }
    }

    #[test]
    fn peer_name_is_the_sip_domain_else_the_address() {
        let name = peer_name(&dest(Some("Sip.Example.com."))).unwrap();
        assert_eq!(&*name_key(&name), "sip.example.com");
        let name = peer_name(&dest(None)).unwrap();
        assert_eq!(&*name_key(&name), "192.0.2.7");
        let name = peer_name(&dest(Some("[2001:db8::1]"))).unwrap();
        assert_eq!(&*name_key(&name), "2001:db8::1");
        assert!(peer_name(&dest(Some("bad name"))).is_err());
    }

    /// A CA and leaves it signs, for the verifier tests.
    struct TestCa {
        params: rcgen::CertificateParams,
        key: rcgen::KeyPair,
        der: CertificateDer<'static>,
    }

    impl TestCa {
        fn new(name: &str) -> TestCa {
            let mut params = rcgen::CertificateParams::default();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = rcgen::KeyPair::generate().unwrap();
            let der = params.self_signed(&key).unwrap().der().clone();
            TestCa { params, key, der }
        }

        fn leaf(&self, sans: Vec<rcgen::SanType>, cn: &str) -> CertificateDer<'static> {
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = sans;
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            let key = rcgen::KeyPair::generate().unwrap();
            let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
            params.signed_by(&key, &issuer).unwrap().der().clone()
        }

        fn roots(&self) -> Arc<RootCertStore> {
            let mut roots = RootCertStore::empty();
            roots.add(self.der.clone()).unwrap();
            Arc::new(roots)
        }
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn verify(
        verifier: &dyn ServerCertVerifier,
        leaf: &CertificateDer<'static>,
        name: &str,
    ) -> Result<(), rustls::Error> {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn dns(name: &str) -> rcgen::SanType {
        rcgen::SanType::DnsName(name.try_into().unwrap())
    }

    const NOT_FOR_NAME: rustls::Error =
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName);

    #[test]
    fn the_verifier_applies_rfc_5922_names_to_a_valid_chain() {
        let ca = TestCa::new("test CA");
        let ours = SipDomainVerifier::new(ca.roots(), provider()).unwrap();
        let webpki = WebPkiServerVerifier::builder_with_provider(ca.roots(), provider())
            .build()
            .unwrap();

        let exact = ca.leaf(vec![dns("sip.example.com")], "x");
        assert_eq!(verify(&ours, &exact, "sip.example.com"), Ok(()));
        assert_eq!(
            verify(&ours, &exact, "other.example.com"),
            Err(NOT_FOR_NAME)
        );

        // HTTPS rules accept the wildcard; RFC 5922 §7.2 does not.
        let wildcard = ca.leaf(vec![dns("*.example.com")], "x");
        assert!(verify(&*webpki, &wildcard, "sip.example.com").is_ok());
        assert_eq!(
            verify(&ours, &wildcard, "sip.example.com"),
            Err(NOT_FOR_NAME)
        );

        // A sip URI identity, which webpki does not know.
        let sip_uri = ca.leaf(
            vec![rcgen::SanType::URI("sip:example.com".try_into().unwrap())],
            "x",
        );
        assert!(verify(&*webpki, &sip_uri, "example.com").is_err());
        assert_eq!(verify(&ours, &sip_uri, "example.com"), Ok(()));

        // CN only when there is no subjectAltName.
        let cn_only = ca.leaf(Vec::new(), "sip.example.com");
        assert_eq!(verify(&ours, &cn_only, "sip.example.com"), Ok(()));

        let ip = ca.leaf(
            vec![rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap())],
            "x",
        );
        assert_eq!(verify(&ours, &ip, "127.0.0.1"), Ok(()));
        assert_eq!(verify(&ours, &ip, "127.0.0.2"), Err(NOT_FOR_NAME));
    }

    #[test]
    fn the_verifier_refuses_an_untrusted_chain_whatever_the_name() {
        let ca = TestCa::new("test CA");
        let stranger = TestCa::new("another CA");
        let ours = SipDomainVerifier::new(ca.roots(), provider()).unwrap();
        let leaf = stranger.leaf(vec![dns("sip.example.com")], "sip.example.com");
        assert_eq!(
            verify(&ours, &leaf, "sip.example.com"),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        );
        let no_roots = SipDomainVerifier::new(Arc::new(RootCertStore::empty()), provider());
        let leaf = ca.leaf(vec![dns("sip.example.com")], "x");
        assert!(verify(&no_roots.unwrap(), &leaf, "sip.example.com").is_err());
    }

    #[test]
    fn listening_needs_a_certificate_and_key() {
        let error = TlsContext::new(&TlsConfig::default(), true).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("certificate and private_key are not set"),
            "{error}"
        );
        // Without a tls: listener nothing is needed.
        assert!(TlsContext::new(&TlsConfig::default(), false).is_ok());
    }
}
