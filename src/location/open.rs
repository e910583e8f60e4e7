//! Opening the location store `[location]` names: the shell's side of `crate::location`,
//! which picks a backend (sled on disk, Redis shared by several nodes, memory) and loads it.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::{AorKeys, LocationStore, MemoryLocation, RedisLocation, SledLocation};
use crate::config::{Location, LocationBackend};

/// The store `[location]` asks for: [`SledLocation`] in `<data_dir>/location` (created
/// private if missing, loaded before this returns, its keys migrated to `keys`), a
/// [`RedisLocation`] at `redis_url` (keys used as they are: one rule per cluster), or a
/// [`MemoryLocation`].
pub fn open_configured(
    config: &Location,
    data_dir: &Path,
    keys: &dyn AorKeys,
) -> Result<Arc<dyn LocationStore>, String> {
    match config.store {
        LocationBackend::Memory => Ok(Arc::new(MemoryLocation::new(config.max_bindings))),
        LocationBackend::Redis => {
            let link = crate::redis_link::RedisLink::open(&config.redis_url)?;
            // A node may start before Redis: it answers 503 until Redis is there.
            if let Err(error) = link.ping(std::time::Duration::from_secs(2)) {
                tracing::warn!(url = %link.url_for_logs(), %error, "location store: Redis does not answer yet; registrations get 503 until it does");
            }
            Ok(Arc::new(RedisLocation::new(link, config.max_bindings)))
        }
        LocationBackend::Sled => {
            let dir = data_dir.join("location");
            let (store, _report) = SledLocation::open_rekeyed(
                &dir,
                config.max_bindings,
                config.cache_mb.saturating_mul(1024 * 1024),
                SystemTime::now(),
                keys,
            )?;
            Ok(Arc::new(store))
        }
    }
}
