//! What the load clients (`tls_load`, `ws_load`) share: running one bounded job on a
//! current-thread runtime, and a TLS client configuration that trusts the bench's own CA.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Runs `job` on a current-thread runtime, giving up after `limit` (every load run is bounded
/// in time); `Ok(true)` is success, `Ok(false)` a run with failures, `Err` a run that could not
/// be made. Held connections and tasks go with the runtime.
pub fn run_bounded(
    name: &str,
    limit: Duration,
    job: impl Future<Output = Result<bool, String>>,
) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = runtime.block_on(async move {
        match tokio::time::timeout(limit, job).await {
            Ok(result) => result,
            Err(_) => Err(format!("gave up after --timeout {} s", limit.as_secs_f64())),
        }
    });
    runtime.shutdown_timeout(Duration::from_millis(100));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A TLS client configuration (ring provider) that trusts exactly the certificates in `ca`.
pub fn trusting(ca: &Path) -> Result<rustls::ClientConfig, String> {
    let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate", ca.display()));
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth())
}
