//! Flood and abuse protection: per-source request rate limiting (Kamailio's `pike`) and the
//! overload answer (503 with Retry-After, RFC 3261 §21.5.4) when the server is past its limits.
