//! `envoy.config.bootstrap.v3.Bootstrap`: the file `weft-agent proxy -c` and `envoy -c` both take.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use serde_json::Value;

use super::cluster::{self, Cluster};
use super::listener::{self, Listener, NetworkFilter};
use super::route::Action;
use super::socket_address;
use super::tree::{ConfigError, Obj, Result};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Bootstrap {
    pub node: Node,
    pub admin: Option<SocketAddr>,
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
    /// The file as given, for `/config_dump`.
    #[serde(skip)]
    pub raw: Value,
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
    let (mut listeners, mut clusters) = (Vec::new(), Vec::new());
    if let Some(mut s) = b.object("static_resources")? {
        listeners = s.objects("listeners")?.into_iter().map(listener::translate).collect::<Result<_>>()?;
        clusters = s.objects("clusters")?.into_iter().map(cluster::translate).collect::<Result<_>>()?;
        s.finish()?;
    }
    b.finish()?;
    check_references(&listeners, &clusters)?;
    Ok(Bootstrap { node, admin, listeners, clusters, raw })
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
        if let NetworkFilter::HttpConnectionManager(rc) = &l.filter {
            for vh in &rc.virtual_hosts {
                for r in &vh.routes {
                    if let Action::Cluster(c) = &r.action {
                        if !names.contains(c.as_str()) {
                            return Err(ConfigError::new(format!("static_resources.listeners[{i}]"), format!("route: unknown cluster '{c}'")));
                        }
                    }
                }
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
        assert!(err(json!({"dynamic_resources": {"ads_config": {}}})).starts_with("dynamic_resources: is not supported"));
        assert!(err(json!({"static_resources": {"secrets": []}})).starts_with("static_resources.secrets: is not supported"));
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
        assert_eq!(b.listeners[0].filter, NetworkFilter::TcpProxy { cluster: "c".into() });
        let mut required = v;
        required["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["is_optional"] = json!(false);
        assert!(err(required).contains("filters[0].typed_config: filter \"opt\" of type type.googleapis.com/x.Unknown is not supported"));
    }
}
