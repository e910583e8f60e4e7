//! Protocol behaviour of the server core, in process: the event loops' sans-IO `Core`s driven
//! by the harness (`tests/protocol/harness.rs`) with simulated time, an in-memory network and
//! simulated user agents (`tests/protocol/ua.rs`). Deterministic and fast: timers are exact
//! (Timer C at 181 s, Timer B at 64*T1), nothing sleeps and nothing is bound. Transport
//! behaviour (sockets, connections, framing, real threads and clocks) stays in the socket
//! tests (`tests/proxy.rs`, `tests/transport.rs`, `tests/affinity.rs`, `tests/timers.rs`, ...).

/// The client side of digest authentication, as the socket tests answer challenges.
#[path = "common/auth.rs"]
mod common_auth;
/// Reading the CDR file, as the socket tests do.
#[path = "common/cdr.rs"]
mod common_cdr;
/// The socket UA's dialog state and message builders, shared by the simulated one.
#[path = "common/ua.rs"]
mod common_ua;
#[path = "common/refused_log.rs"]
mod refused_log;

// A test binary's root resolves modules beside it, in `tests/`: these live in `tests/protocol/`.
#[path = "protocol/harness.rs"]
mod harness;
#[path = "protocol/ua.rs"]
mod ua;

#[path = "protocol/default_policy.rs"]
mod default_policy;
#[path = "protocol/dialog.rs"]
mod dialog;
#[path = "protocol/failure_routing.rs"]
mod failure_routing;
#[path = "protocol/proxy.rs"]
mod proxy;
#[path = "protocol/registrar.rs"]
mod registrar;
#[path = "protocol/route_signature.rs"]
mod route_signature;
