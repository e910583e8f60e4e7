//! The next hop to locate (RFC 3263) as the proxy asks for it and the shell's resolver
//! answers it: the query, the candidates, why there are none, and the parts of §4 that need
//! no DNS (an IP literal, the transport and port a URI asks for). The resolver itself is the
//! shell's (`moonroute::dns`).

pub mod target;

pub use target::{numeric, numeric_among, Candidate, Query, ResolveError};
