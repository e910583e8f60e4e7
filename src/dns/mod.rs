//! RFC 3263 server location: turns a next hop URI into an ordered list of transport, address
//! and port candidates (NAPTR → SRV → A/AAAA), over hickory-resolver.
