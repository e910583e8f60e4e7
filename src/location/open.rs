//! Opening the location store `[location]` names: the shell's side of `crate::location`,
//! which picks a backend (sled on disk, Redis shared by several nodes, memory) and loads it.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::{AorKeys, LocationStore, MemoryLocation, RedisLocation, SledLocation};
use crate::config::{Location, LocationBackend};

/// A store opened by [`open_configured`].
pub struct Opened {
    pub store: Arc<dyn LocationStore>,
    /// The Redis link of a store shared by several nodes (`crate::cluster` runs its heartbeat
    /// on it); `None` for a store of this process alone.
    pub shared_link: Option<Arc<crate::redis_link::RedisLink>>,
}

impl Opened {
    fn alone(store: Arc<dyn LocationStore>) -> Opened {
        Opened {
            store,
            shared_link: None,
        }
    }
}

/// The store `[location]` asks for: [`SledLocation`] in `<data_dir>/location` (created
/// private if missing, loaded before this returns, its keys migrated to `keys`), a
/// [`RedisLocation`] at `redis_url` (keys used as they are: one rule per cluster), or a
/// [`MemoryLocation`].
pub fn open_configured(
    config: &Location,
    data_dir: &Path,
    keys: &dyn AorKeys,
) -> Result<Opened, String> {
    match config.store {
        LocationBackend::Memory => Ok(Opened::alone(Arc::new(MemoryLocation::new(
            config.max_bindings,
        )))),
        LocationBackend::Redis => {
            let link = crate::redis_link::RedisLink::open(&config.redis_url)?;
            // A node may start before Redis: it answers 503 until Redis is there.
            if let Err(error) = link.ping(std::time::Duration::from_secs(2)) {
                tracing::warn!(url = %link.url_for_logs(), %error, "location store: Redis does not answer yet; registrations get 503 until it does");
            }
            Ok(Opened {
                store: Arc::new(RedisLocation::new(Arc::clone(&link), config.max_bindings)),
                shared_link: Some(link),
            })
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
            Ok(Opened::alone(Arc::new(store)))
        }
    }
}
