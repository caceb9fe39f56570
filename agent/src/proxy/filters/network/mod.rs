pub mod client_cert;
pub mod http1_codec;
pub mod http_connection_manager;
pub mod metadata_exchange;
pub mod rbac;
mod relay;
pub mod tcp_proxy;
pub mod stream;
