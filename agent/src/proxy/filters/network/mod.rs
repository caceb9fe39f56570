pub mod http_connection_manager;
pub mod tcp_proxy;
