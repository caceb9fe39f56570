//! The filters of a filter chain: network filters on the connection's byte stream (generic over it, so TLS
//! can sit underneath without them knowing), and HTTP filters on each request of the HTTP connection manager.

pub mod http;
pub mod istio_stats;
pub mod network;
pub mod rbac;
