//! Maps keyed by this server's own handles: transaction, dialog and call ids, lookup counters.
//!
//! These keys are counters the server hands out, never values taken from the network, so the
//! flooding resistance of the standard library's SipHash buys nothing for them, while its cost
//! (~140 instructions per lookup, several hundred lookups per call across the transaction
//! layer, the proxy and the dialog table) does show. FxHash (`rustc-hash`, one multiply per
//! key) is what rustc uses for the same kind of keys. Maps keyed by anything a peer chooses
//! (branches, Call-IDs, addresses) keep the standard hasher.

/// A `HashMap` for keys the server itself allocates (see the module doc).
pub type IdMap<K, V> = rustc_hash::FxHashMap<K, V>;
