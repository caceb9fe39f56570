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
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Discovery {
    /// Fixed endpoints from `load_assignment`.
    Static { endpoints: Vec<SocketAddr> },
    /// Connect to the downstream connection's original destination.
    OriginalDst,
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
    let discovery = match kind {
        "STATIC" => {
            if lb_policy == LbPolicy::ClusterProvided {
                return Err(ConfigError::new(c.at("lb_policy"), "CLUSTER_PROVIDED is only valid for ORIGINAL_DST clusters"));
            }
            Discovery::Static { endpoints: load_assignment(&mut c)? }
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
            return Err(ConfigError::new(c.at("type"), format!("{other} clusters are not supported yet; use STATIC or ORIGINAL_DST")))
        }
    };
    c.finish()?;
    Ok(Cluster { name, discovery, connect_timeout, lb_policy })
}

fn load_assignment(c: &mut Obj<'_>) -> Result<Vec<SocketAddr>> {
    let Some(mut la) = c.object("load_assignment")? else { return Ok(Vec::new()) };
    // Envoy accepts any cluster_name for a static cluster's inline assignment; only the endpoints matter.
    let _ = la.string("cluster_name")?;
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
    Ok(endpoints)
}
