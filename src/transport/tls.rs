//! TLS over TCP (RFC 3261 §26.2, RFC 5922), with rustls.
