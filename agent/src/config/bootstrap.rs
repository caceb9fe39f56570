//! `envoy.config.bootstrap.v3.Bootstrap`: the file `weft-agent proxy -c` and `envoy -c` both take.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use serde_json::Value;

use super::cluster::{self, Cluster};
use super::listener::{self, Listener};
use super::route::RouteConfiguration;
use super::secret::{self, Secret};
use super::socket_address;
use super::tree::{ConfigError, Obj, Result};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Bootstrap {
    pub node: Node,
    pub admin: Option<SocketAddr>,
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
    pub secrets: Vec<Secret>,
    /// Listeners and clusters from an aggregated discovery service.
    pub ads: Option<Ads>,
    /// The file as given, for `/config_dump`.
    #[serde(skip)]
    pub raw: Value,
}

/// `dynamic_resources` with LDS and CDS over ADS.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Ads {
    pub api: AdsApi,
    /// The static cluster the ADS gRPC stream goes to.
    pub cluster: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum AdsApi {
    /// State of the world (`GRPC`).
    Sotw,
    /// Incremental (`DELTA_GRPC`).
    Delta,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Node {
    pub id: String,
    pub cluster: String,
    pub metadata: Value,
}

/// Reads a bootstrap file: YAML or JSON, chosen by extension like Envoy (`.json` → JSON, else YAML, which is
/// a superset).
pub fn load(path: &Path) -> Result<Bootstrap> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
    let raw: Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| ConfigError::new("", format!("{}: invalid JSON: {e}", path.display())))?
    } else {
        serde_yaml::from_str(&text).map_err(|e| ConfigError::new("", format!("{}: invalid YAML: {e}", path.display())))?
    };
    translate(raw)
}

pub fn translate(raw: Value) -> Result<Bootstrap> {
    let raw = super::typed_struct::expand(raw);
    let mut b = Obj::new(&raw, "")?;
    let node = match b.object("node")? {
        Some(mut n) => {
            let node = Node {
                id: n.string("id")?.unwrap_or_default().to_string(),
                cluster: n.string("cluster")?.unwrap_or_default().to_string(),
                metadata: n.take("metadata").cloned().unwrap_or(Value::Null),
            };
            n.finish()?;
            node
        }
        None => Node::default(),
    };
    let admin = match b.object("admin")? {
        Some(mut a) => {
            let address = a.object("address")?.map(socket_address).transpose()?;
            a.finish()?;
            address
        }
        None => None,
    };
    let (mut listeners, mut clusters, mut secrets) = (Vec::new(), Vec::new(), Vec::new());
    if let Some(mut s) = b.object("static_resources")? {
        listeners = s.objects("listeners")?.into_iter().map(listener::translate).collect::<Result<_>>()?;
        clusters = s.objects("clusters")?.into_iter().map(cluster::translate).collect::<Result<_>>()?;
        secrets = s.objects("secrets")?.into_iter().map(secret::translate).collect::<Result<Vec<_>>>()?;
        s.finish()?;
    }
    let ads = b.object("dynamic_resources")?.map(dynamic_resources).transpose()?;
    b.finish()?;
    check_references(&listeners, &clusters)?;
    let mut secret_names = HashSet::new();
    if let Some((i, s)) = secrets.iter().enumerate().find(|(_, s)| !secret_names.insert(s.name.as_str())) {
        return Err(ConfigError::new(format!("static_resources.secrets[{i}].name"), format!("Duplicate static secret name {}", s.name)));
    }
    let uses_ads = listeners.iter().any(|l| l.rds_names().next().is_some())
        || clusters.iter().any(|c| matches!(c.discovery, super::cluster::Discovery::Eds { .. }));
    if uses_ads && ads.is_none() {
        return Err(ConfigError::new("dynamic_resources", "RDS and EDS come over ADS: configure dynamic_resources.ads_config"));
    }
    if let Some(ads) = &ads {
        match clusters.iter().find(|c| c.name == ads.cluster) {
            None => return Err(ConfigError::new("dynamic_resources.ads_config", format!("Unknown gRPC client cluster '{}'", ads.cluster))),
            Some(c) if !c.http2 => {
                return Err(ConfigError::new(
                    "dynamic_resources.ads_config",
                    format!("cluster '{}' must use HTTP/2 (set explicit_http_config.http2_protocol_options) for gRPC", ads.cluster),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(Bootstrap { node, admin, listeners, clusters, secrets, ads, raw })
}

fn dynamic_resources(mut d: Obj<'_>) -> Result<Ads> {
    let mut ads = d.required_object("ads_config")?;
    let api = match ads.string("api_type")?.unwrap_or("GRPC") {
        "GRPC" => AdsApi::Sotw,
        "DELTA_GRPC" => AdsApi::Delta,
        other => return Err(ConfigError::new(ads.at("api_type"), format!("{other} is not supported; use GRPC or DELTA_GRPC"))),
    };
    v3_only(&mut ads, "transport_api_version")?;
    let _ = ads.bool("set_node_on_first_message_only")?;
    let mut services = ads.objects("grpc_services")?;
    if services.len() != 1 {
        return Err(ConfigError::new(ads.at("grpc_services"), "needs exactly one gRPC service"));
    }
    let mut service = services.remove(0);
    let mut envoy_grpc = service.required_object("envoy_grpc")?;
    let cluster = envoy_grpc.required_string("cluster_name")?.to_string();
    envoy_grpc.finish()?;
    service.finish()?;
    ads.finish()?;
    for source in ["lds_config", "cds_config"] {
        super::ads_source(d.required_object(source)?, "LDS and CDS")?;
    }
    d.finish()?;
    Ok(Ads { api, cluster })
}

fn v3_only(o: &mut Obj<'_>, key: &str) -> Result<()> {
    match o.string(key)? {
        None | Some("V3") => Ok(()),
        Some(other) => Err(ConfigError::new(o.at(key), format!("{other} is not supported; only V3"))),
    }
}

/// Names are unique, and HTTP routes point at clusters that exist (Envoy's `validate_clusters` default for
/// static route configurations). A tcp_proxy to a missing cluster is accepted, as in Envoy: its connections
/// are closed at run time.
fn check_references(listeners: &[Listener], clusters: &[Cluster]) -> Result<()> {
    let mut names = HashSet::new();
    for (i, c) in clusters.iter().enumerate() {
        if !names.insert(c.name.as_str()) {
            return Err(ConfigError::new(format!("static_resources.clusters[{i}].name"), format!("cluster manager: duplicate cluster '{}' found", c.name)));
        }
    }
    let mut listener_names = HashSet::new();
    for (i, l) in listeners.iter().enumerate() {
        if !listener_names.insert(l.name.as_str()) {
            return Err(ConfigError::new(format!("static_resources.listeners[{i}].name"), format!("error adding listener: duplicate listener '{}' found", l.name)));
        }
        for c in l.inline_routes().filter(|rc| rc.validate_clusters).flat_map(RouteConfiguration::clusters) {
            if !names.contains(c) {
                return Err(ConfigError::new(format!("static_resources.listeners[{i}]"), format!("route: unknown cluster '{c}'")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        translate(v).unwrap_err().to_string()
    }

    #[test]
    fn not_yet_supported_sections_are_refused_by_path() {
        assert!(err(json!({"dynamic_resources": {"ads_config": {"api_type": "REST"}}})).starts_with("dynamic_resources.ads_config.api_type: REST is not supported"));
        assert!(err(json!({"static_resources": {"secrets": [{"name": "s", "generic_secret": {}}]}})).starts_with("static_resources.secrets[0].generic_secret: is not supported"));
        assert!(err(json!({"overload_manager": {}})).starts_with("overload_manager: is not supported"));
    }

    #[test]
    fn ignorable_sections_are_accepted() {
        let b = translate(json!({"layered_runtime": {"layers": []}, "stats_config": {}, "node": {"id": "n", "locality": {"zone": "z"}}})).unwrap();
        assert_eq!(b.node.id, "n");
    }

    #[test]
    fn listener_filter_types_are_checked() {
        let v = json!({"static_resources": {"listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"filters": [
                {"name": "opt", "is_optional": true, "typed_config": {"@type": "type.googleapis.com/x.Unknown"}},
                {"name": "tcp", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "s", "cluster": "c"}}]}]}]}});
        let b = translate(v.clone()).unwrap();
        assert_eq!(b.listeners[0].filter_chains[0].filter, crate::config::listener::TcpProxy::to("c"));
        let mut required = v;
        required["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["is_optional"] = json!(false);
        assert!(err(required).contains("filters[0].typed_config: filter \"opt\" of type type.googleapis.com/x.Unknown is not supported"));
    }
}
