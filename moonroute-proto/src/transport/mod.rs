//! The address vocabulary the protocol shares with the shell's sockets: transport kinds,
//! listen addresses, where a message came from ([`Meta`]) and where one goes
//! ([`Destination`], RFC 3261 §18.2.2 for responses), and the address a listener advertises.
//! The sockets themselves are the shell's (`moonroute::transport`).

pub mod address;
pub mod advertise;

pub use address::{
    response_destination, ConnectionId, Destination, ListenAddr, Meta, ParseListenAddrError,
    TransportKind, TRANSPORTS,
};
pub use advertise::Advertise;
