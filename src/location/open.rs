//! Opening the location store `[location]` names: the shell's side of `crate::location`,
//! which picks a backend (sled on disk, Redis shared by several nodes, memory) and loads it.
//! Owns the `[location]` section ([`LocationConfig`], read by `crate::config`).

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::{AorKeys, LocationStore, MemoryLocation, RedisLocation, SledLocation};
use serde::{Deserialize, Serialize};

/// Which location store keeps registrations, and its limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocationBackend {
    /// Durable: sled under `<data_dir>/location`; a 200 to REGISTER is sent only once the
    /// binding is flushed to disk.
    Sled,
    /// In memory only: registrations are lost on restart (labs, tests).
    Memory,
    /// Shared by several nodes on a Redis server (`redis_url`): a 200 to REGISTER is sent
    /// only once Redis acknowledged the write ([`crate::location::RedisLocation`]).
    Redis,
}

/// The location database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocationConfig {
    /// `"sled"` (durable, under `<data_dir>/location`), `"redis"` (shared by several nodes,
    /// at `redis_url`) or `"memory"`. Default: `"sled"`. Also spelled `backend`.
    #[serde(alias = "backend")]
    pub store: LocationBackend,
    /// The Redis server of `store = "redis"` (`--location-redis URL`).
    /// Default: `"redis://127.0.0.1:6379/0"`.
    pub redis_url: String,
    /// Most bindings held, across all AORs; beyond it REGISTERs that add bindings get 500.
    /// Default: 1000000.
    pub max_bindings: usize,
    /// sled's page cache, in MiB (lookups never read the disk: this only speeds up writes).
    /// Default: 16.
    pub cache_mb: u64,
    /// With `store = "redis"`: the SIP URI the other nodes reach this node at, recorded with
    /// every binding registered here (`crate::cluster`), e.g. `"sip:10.0.0.1:5060;transport=tcp"`.
    /// Default: empty, the first listen address as it advertises itself.
    pub node_uri: String,
}

impl Default for LocationConfig {
    fn default() -> Self {
        LocationConfig {
            store: LocationBackend::Sled,
            redis_url: crate::redis_link::DEFAULT_URL.to_owned(),
            max_bindings: 1_000_000,
            cache_mb: 16,
            node_uri: String::new(),
        }
    }
}

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
    config: &LocationConfig,
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
