//! HTTP filters, in the order the connection manager lists them; the router is always last.

pub mod alpn;
pub mod cors;
pub mod fault;
pub mod local_ratelimit;
pub mod local_reply;
pub mod peer_metadata;
pub mod rbac;
pub mod router;
