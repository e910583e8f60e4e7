//! The SIP message codec (RFC 3261 §7, §19, §20, §25): sans-IO, no sockets, no clock.
//!
//! Owns: parsing received bytes into [`Message`]s (zero-copy over `bytes::Bytes`, typed values
//! parsed lazily into borrowed views), validating them (§8.1.1, §8.2.2, RFC 4475), editing them
//! the way a proxy must (§16.6) while leaving everything else byte-exact, serializing them, and
//! building responses to requests (§8.2.6).

pub mod error;
pub mod extensions;
pub mod header;
pub(crate) mod layout;
pub mod message;
pub mod method;
pub mod name_addr;
pub mod params;
pub mod prescan;
pub mod response;
pub mod scan;
pub mod typed;
pub mod uri;
pub mod via;

pub use error::ParseError;
pub use header::HeaderName;
pub use message::{HeaderRef, Message};
pub use method::Method;
pub use name_addr::{Contact, NameAddr};
pub use params::{Param, Params};
pub use response::ResponseBuilder;
pub use typed::CSeq;
pub use uri::{Host, SipUri, TelUri, Uri};
pub use via::Via;
#[cfg(test)]
mod rfc4475_tests;
#[cfg(test)]
mod tests;
