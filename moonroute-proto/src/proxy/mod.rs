//! The proxy core (RFC 3261 §16), sans-IO: plain functions over the codec's [`Message`] that
//! check a received request (§16.3), preprocess its route information (§16.4) and build the
//! copy forwarded to each target (§16.6), plus the branch and loop-detection hash they share
//! (§16.3 item 4, §16.6 step 8); and the response context of one proxied request
//! (`response_context`: forking by q groups, Timer C, CANCEL, choosing and aggregating the best
//! response, §16.7, §16.8, §16.10, RFC 6026). No sockets, no clock: the caller owns target
//! selection (§16.5) and the client transactions.
//!
//! [`Message`]: crate::sip::Message

pub mod identity;
pub mod relay;
pub mod request;
pub mod response_context;
pub mod route_sign;
pub mod router;
pub mod via_branch;

pub use request::{
    branch_for, check_request, detect_loop, forward_copy, is_our_stateless_branch, next_hop,
    preprocess_routes, stateless_branch, ForwardSpec, NextHop, Preprocessed, ProxyIdentity,
    Rejection,
};
pub use route_sign::{RouteSigner, Verdict};
