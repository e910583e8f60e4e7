//! A server built from its configuration, in one place: the server key read once, the script
//! host and its services (registrar, authenticator, dispatcher), the Record-Route signer, the
//! engine's metrics, and the event loops' [`CoreFactory`] routed by the `[proxy]` built-in
//! router when it relays, else by the script. `moonroute run` starts what this builds; the
//! tests that start a whole server wire it the same way.

use std::sync::Arc;

use tracing::info;

use super::core::CoreFactory;
use crate::config::Config;
use crate::metrics::EngineMetrics;
use crate::proxy::RouteSigner;
use crate::script::{ScriptError, ScriptHost};

/// What a running server is made of, before its event loops start.
pub struct Wiring {
    /// The script, its services and the metric registry they count into.
    pub host: Arc<ScriptHost>,
    /// The engine's metric handles (in `host`'s registry).
    pub metrics: Arc<EngineMetrics>,
    /// Makes each event loop's core.
    pub factory: Arc<CoreFactory>,
}

impl Wiring {
    /// Wires the server `config` (validated) describes. Fails when the server key, the
    /// script, or a store it names cannot be loaded.
    pub fn from_config(config: &Config) -> Result<Wiring, ScriptError> {
        // Digest nonces and Record-Route signatures survive restarts: the key is `[auth]
        // secret` or `<data_dir>/secret` (created at the first start).
        let server_key = config.server_key().map_err(ScriptError)?;
        let signer = RouteSigner::new(&server_key);
        let host = ScriptHost::with_server_key(config, server_key)?;
        let metrics = EngineMetrics::register(&host.services().metrics);
        let core = CoreFactory::new(config)
            .with_route_signer(signer)
            .with_metrics(Arc::clone(&metrics));
        let factory = if core.relays() {
            info!("[proxy] static_route/relay_to_request_uri set: the built-in router replaces the script");
            core
        } else {
            let services = host.services();
            let core = core
                .routed_by(host.router_factory())
                .with_dispatcher(Arc::clone(&services.dispatcher))
                .with_flows(Arc::clone(&services.flows));
            match &services.registrar {
                Some(registrar) => core.with_keepalives(registrar.store().clone()),
                None => core,
            }
        };
        Ok(Wiring {
            host,
            metrics,
            factory: Arc::new(factory),
        })
    }
}
