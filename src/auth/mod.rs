//! Digest authentication in the server: the protocol side ([`moonroute_proto::auth`]: the
//! challenge and the verdict, RFC 3261 §22) over the subscriber table kept here, in sled
//! under the data directory ([`subscribers`]).

pub mod subscribers;

use std::path::Path;

pub use moonroute_proto::auth::*;
pub use subscribers::Subscribers;

/// The server's authenticator: the protocol's, reading the sled subscriber table.
pub type Authenticator = moonroute_proto::auth::Authenticator<Subscribers>;

/// The authenticator over the subscriber table under `data_dir` (`<data_dir>/subscribers`).
pub fn open(settings: &Settings, data_dir: &Path) -> Result<Authenticator, String> {
    let subscribers = Subscribers::open_shared(&data_dir.join("subscribers"))?;
    Ok(Authenticator::new(settings, subscribers))
}
