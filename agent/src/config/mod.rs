//! The validated configuration model. Envoy resources are translated here once, at the edge (from a
//! bootstrap file today, from xDS next); nothing downstream sees the wire form. Unsupported fields are
//! rejected by path (see [`fields`] for the tables and `docs/envoy-config.md`).

pub mod access_log;
pub mod agent;
pub mod alpn;
pub mod bootstrap;
pub mod cidr;
pub mod cluster;
pub mod fields;
pub mod headers;
pub mod health_check;
pub mod http_connection_manager;
pub mod http_filters;
pub mod istio_stats;
pub mod listener;
pub mod matcher;
pub mod metadata;
pub mod metadata_exchange;
pub mod rbac;
pub mod route;
pub mod secret;
pub mod tls;
pub mod tracing;
pub mod store;
pub mod tree;
pub mod typed_struct;
pub mod workload_metadata;

pub use tree::ConfigError;

use std::net::{IpAddr, SocketAddr};

use tree::Obj;

/// Envoy's default `per_connection_buffer_limit_bytes` (1 MiB).
pub const DEFAULT_BUFFER_LIMIT: usize = 1024 * 1024;

/// `per_connection_buffer_limit_bytes` of a listener or cluster: how much of a connection's data the proxy
/// holds before it stops reading from it.
pub(crate) fn buffer_limit(o: &mut Obj<'_>) -> tree::Result<usize> {
    let key = "per_connection_buffer_limit_bytes";
    match o.u64(key)? {
        None => Ok(DEFAULT_BUFFER_LIMIT),
        Some(0) => Err(ConfigError::new(o.at(key), "must be at least 1")),
        Some(n) => u32::try_from(n)
            .map(|n| n as usize)
            .map_err(|_| ConfigError::new(o.at(key), format!("{n} is over a uint32"))),
    }
}

/// `envoy.config.core.v3.Address` with a TCP `socket_address`.
pub(crate) fn socket_address(mut address: Obj<'_>) -> tree::Result<SocketAddr> {
    let addr = bare_socket_address(address.required_object("socket_address")?)?;
    address.finish()?;
    Ok(addr)
}

/// `envoy.config.core.v3.SocketAddress` (TCP, an IP address: weft resolves no names).
pub(crate) fn bare_socket_address(mut sa: Obj<'_>) -> tree::Result<SocketAddr> {
    let host = sa.required_string("address")?;
    let ip: IpAddr = host.parse().map_err(|_| {
        ConfigError::new(sa.at("address"), format!("{host:?} is not an IP address (weft resolves no names here)"))
    })?;
    let port = sa.u64("port_value")?.unwrap_or(0);
    let port = u16::try_from(port).map_err(|_| ConfigError::new(sa.at("port_value"), format!("{port} is not a port")))?;
    if let Some(protocol) = sa.string("protocol")? {
        if protocol != "TCP" {
            return Err(ConfigError::new(sa.at("protocol"), format!("{protocol} is not supported; only TCP")));
        }
    }
    sa.finish()?;
    Ok(SocketAddr::new(ip, port))
}

/// A `ConfigSource` that must be ADS (`what` names the resource type in the error): `resource_api_version`
/// V3, and `initial_fetch_timeout` 0s (istiod's value: wait for the resource however long it takes, which is
/// what weft does; another timeout would start serving without it, and is refused).
pub(crate) fn ads_source(mut source: Obj<'_>, what: &str) -> tree::Result<()> {
    match source.string("resource_api_version")? {
        None | Some("V3") => {}
        Some(other) => return Err(ConfigError::new(source.at("resource_api_version"), format!("{other} is not supported; only V3"))),
    }
    if let Some(timeout) = source.duration("initial_fetch_timeout")? {
        if !timeout.is_zero() {
            return Err(ConfigError::new(source.at("initial_fetch_timeout"), "only 0s (wait until the resource arrives) is supported"));
        }
    }
    let ads = source.required_object("ads").map_err(|e| ConfigError::new(e.path, format!("is required: weft takes {what} over ADS only")))?;
    ads.finish()?;
    source.finish()
}

/// Reads the `@type` of a `typed_config` and checks it is the one expected.
pub(crate) fn expect_type(config: &mut Obj<'_>, expected: &str) -> tree::Result<()> {
    let type_url = config.required_string("@type")?;
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    if name == expected {
        Ok(())
    } else {
        Err(ConfigError::new(config.at("@type"), format!("{type_url} is not supported here; expected {expected}")))
    }
}
