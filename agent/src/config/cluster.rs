//! `envoy.config.cluster.v3.Cluster`: where upstream connections go.

use std::net::SocketAddr;
use std::time::Duration;

use super::tree::{ConfigError, Obj, Result};
use super::socket_address;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Cluster {
    pub name: String,
    pub discovery: Discovery,
    pub connect_timeout: Duration,
    pub lb_policy: LbPolicy,
    /// Upstream speaks HTTP/2 (gRPC clusters such as the ADS cluster).
    pub http2: bool,
    /// `upstream_bind_config.source_address`: the local address upstream connections are made from (Istio's
    /// inbound clusters use 127.0.0.6, which capture lets through).
    pub source_address: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Discovery {
    /// Fixed endpoints from `load_assignment`.
    Static { endpoints: Vec<SocketAddr> },
    /// Connect to the downstream connection's original destination.
    OriginalDst,
    /// Endpoints from EDS (over ADS), for `service_name`.
    Eds { service_name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbPolicy {
    RoundRobin,
    Random,
    ClusterProvided,
}

/// Envoy's default `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn translate(mut c: Obj<'_>) -> Result<Cluster> {
    let name = c.required_string("name")?.to_string();
    let kind = c.string("type")?.unwrap_or("STATIC");
    let connect_timeout = c.duration("connect_timeout")?.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    if connect_timeout.is_zero() {
        return Err(ConfigError::new(c.at("connect_timeout"), "must be greater than 0s"));
    }
    let lb_policy = match c.string("lb_policy")?.unwrap_or("ROUND_ROBIN") {
        "ROUND_ROBIN" => LbPolicy::RoundRobin,
        "RANDOM" => LbPolicy::Random,
        "CLUSTER_PROVIDED" => LbPolicy::ClusterProvided,
        other => return Err(ConfigError::new(c.at("lb_policy"), format!("{other} is not supported; use ROUND_ROBIN or RANDOM"))),
    };
    let http2 = http2_options(&mut c)?;
    let source_address = c.object("upstream_bind_config")?.map(bind_config).transpose()?;
    let discovery = match kind {
        "STATIC" => {
            if lb_policy == LbPolicy::ClusterProvided {
                return Err(ConfigError::new(c.at("lb_policy"), "CLUSTER_PROVIDED is only valid for ORIGINAL_DST clusters"));
            }
            Discovery::Static { endpoints: load_assignment(&mut c)? }
        }
        "EDS" => {
            if lb_policy == LbPolicy::ClusterProvided {
                return Err(ConfigError::new(c.at("lb_policy"), "CLUSTER_PROVIDED is only valid for ORIGINAL_DST clusters"));
            }
            let mut eds = c.required_object("eds_cluster_config")?;
            let service_name = eds.string("service_name")?.unwrap_or(&name).to_string();
            let mut source = eds.required_object("eds_config")?;
            match source.string("resource_api_version")? {
                None | Some("V3") => {}
                Some(other) => return Err(ConfigError::new(source.at("resource_api_version"), format!("{other} is not supported; only V3"))),
            }
            let ads = source.required_object("ads").map_err(|e| ConfigError::new(e.path, "is required: weft takes EDS over ADS only"))?;
            ads.finish()?;
            source.finish()?;
            eds.finish()?;
            Discovery::Eds { service_name }
        }
        "ORIGINAL_DST" => {
            if lb_policy != LbPolicy::ClusterProvided {
                return Err(ConfigError::new(
                    c.at("lb_policy"),
                    "cluster: LB policy ROUND_ROBIN is not valid for Cluster type ORIGINAL_DST. Only 'CLUSTER_PROVIDED' is allowed with cluster type 'ORIGINAL_DST'",
                ));
            }
            if c.has("load_assignment") {
                return Err(ConfigError::new(c.at("load_assignment"), "ORIGINAL_DST clusters must have no load assignment configured"));
            }
            Discovery::OriginalDst
        }
        other => {
            return Err(ConfigError::new(c.at("type"), format!("{other} clusters are not supported yet; use STATIC, EDS or ORIGINAL_DST")))
        }
    };
    c.finish()?;
    Ok(Cluster { name, discovery, connect_timeout, lb_policy, http2, source_address })
}

fn load_assignment(c: &mut Obj<'_>) -> Result<Vec<SocketAddr>> {
    // Envoy accepts any cluster_name for a static cluster's inline assignment; only the endpoints matter.
    c.object("load_assignment")?.map(|la| assignment(la).map(|(_, e)| e)).transpose().map(Option::unwrap_or_default)
}

/// `envoy.config.endpoint.v3.ClusterLoadAssignment`: its cluster (service) name and endpoints.
pub fn assignment(mut la: Obj<'_>) -> Result<(String, Vec<SocketAddr>)> {
    let name = la.string("cluster_name")?.unwrap_or_default().to_string();
    let mut endpoints = Vec::new();
    for mut locality in la.objects("endpoints")? {
        for mut lb in locality.objects("lb_endpoints")? {
            let mut endpoint = lb.required_object("endpoint")?;
            endpoints.push(socket_address(endpoint.required_object("address")?)?);
            endpoint.finish()?;
            lb.finish()?;
        }
        locality.finish()?;
    }
    la.finish()?;
    Ok((name, endpoints))
}

/// `envoy.config.core.v3.BindConfig`: only the source address (a `SocketAddress`, not an `Address`).
fn bind_config(mut b: Obj<'_>) -> Result<SocketAddr> {
    let source = super::bare_socket_address(b.required_object("source_address")?)?;
    b.finish()?;
    Ok(source)
}

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// `http2_protocol_options: {}` or `typed_extension_protocol_options` with explicit HTTP/2: how a gRPC
/// cluster (the ADS cluster) is declared. Any HTTP/2 tuning inside is not supported yet.
fn http2_options(c: &mut Obj<'_>) -> Result<bool> {
    let mut http2 = false;
    if let Some(o) = c.object("http2_protocol_options")? {
        o.finish()?;
        http2 = true;
    }
    if let Some(mut ext) = c.object("typed_extension_protocol_options")? {
        if let Some(mut opts) = ext.object(HTTP_PROTOCOL_OPTIONS)? {
            super::expect_type(&mut opts, HTTP_PROTOCOL_OPTIONS)?;
            let mut explicit = opts.required_object("explicit_http_config")?;
            match (explicit.object("http2_protocol_options")?, explicit.object("http_protocol_options")?) {
                (Some(h2), None) => {
                    h2.finish()?;
                    http2 = true;
                }
                (None, Some(h1)) => h1.finish()?,
                _ => return Err(ConfigError::new(explicit.path(), "needs exactly one of http_protocol_options or http2_protocol_options")),
            }
            explicit.finish()?;
            opts.finish()?;
        }
        ext.finish()?;
    }
    Ok(http2)
}
