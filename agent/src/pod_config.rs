//! `weft-agent config <namespace>/<pod> <kind>`: one captured pod's configuration from the running agent, in
//! the shape of `istioctl proxy-config` (listeners, routes, clusters, endpoints, secrets, bootstrap) as tables,
//! or its Envoy config-dump sections as JSON or YAML. It reads the agent's `/pods/<ns>/<name>/config_dump`
//! (and `/status` for the pod's workload certificate); secrets never carry key material.

use serde_json::{json, Value};

use crate::status::columns;

/// What to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Listeners,
    Routes,
    Clusters,
    Endpoints,
    Secrets,
    Bootstrap,
}

/// How to show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// `namespace/name` checked and split.
pub fn pod_name(pod: &str) -> Result<(&str, &str), String> {
    match pod.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok((ns, name)),
        _ => Err(format!("'{pod}' is not <namespace>/<pod> (for example shop/web-1); `weft-agent status` lists the captured pods")),
    }
}

/// The pod's config dump (with endpoints) and the agent's status, as the admin endpoint answers them.
pub struct Fetched {
    pub dump: Value,
    pub status: Value,
}

/// Renders `kind` of the fetched configuration of `pod` (`namespace/name`).
pub fn render(fetched: &Fetched, pod: &str, kind: Kind, output: Output) -> Result<String, String> {
    let data = match kind {
        Kind::Secrets => secrets(fetched, pod),
        _ => json!(sections(&fetched.dump, kind)),
    };
    match output {
        Output::Json => Ok(serde_json::to_string_pretty(&data).unwrap_or_default() + "\n"),
        Output::Yaml => serde_yaml::to_string(&data).map_err(|e| e.to_string()),
        Output::Table => Ok(match kind {
            Kind::Bootstrap => serde_json::to_string_pretty(&data).unwrap_or_default() + "\n",
            Kind::Listeners => columns(&["ADDRESSES", "PORT", "MATCH", "DESTINATION"], listener_rows(&data)),
            Kind::Routes => columns(&["NAME", "VHOST NAME", "DOMAINS", "MATCH", "VIRTUAL SERVICE"], route_rows(&data)),
            Kind::Clusters => columns(&["SERVICE FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE", "DESTINATION RULE"], cluster_rows(&data)),
            Kind::Endpoints => columns(&["ENDPOINT", "STATUS", "CLUSTER"], endpoint_rows(&data)),
            Kind::Secrets => columns(&["RESOURCE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"], secret_rows(&data)),
        }),
    }
}

/// The config-dump sections `kind` reads: the resources themselves, in Envoy's JSON.
fn sections(dump: &Value, kind: Kind) -> Vec<Value> {
    let (dump_type, lists): (&str, &[(&str, &str)]) = match kind {
        Kind::Bootstrap => return section(dump, "BootstrapConfigDump").map(|b| b["bootstrap"].clone()).into_iter().collect(),
        Kind::Listeners => ("ListenersConfigDump", &[("static_listeners", "/listener"), ("dynamic_listeners", "/active_state/listener")]),
        Kind::Routes => ("RoutesConfigDump", &[("dynamic_route_configs", "/route_config")]),
        Kind::Clusters => ("ClustersConfigDump", &[("static_clusters", "/cluster"), ("dynamic_active_clusters", "/cluster")]),
        Kind::Endpoints => ("EndpointsConfigDump", &[("dynamic_endpoint_configs", "/endpoint_config")]),
        Kind::Secrets => ("SecretsConfigDump", &[("static_secrets", "/secret"), ("dynamic_active_secrets", "/secret")]),
    };
    let Some(section) = section(dump, dump_type) else { return Vec::new() };
    lists
        .iter()
        .flat_map(|(list, pointer)| section[*list].as_array().into_iter().flatten().filter_map(|item| item.pointer(pointer).cloned()))
        .collect()
}

fn section<'a>(dump: &'a Value, type_suffix: &str) -> Option<&'a Value> {
    dump["configs"].as_array()?.iter().find(|c| c["@type"].as_str().is_some_and(|t| t.ends_with(type_suffix)))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

fn listener_rows(listeners: &Value) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for l in listeners.as_array().into_iter().flatten() {
        let address = &l["address"]["socket_address"];
        let chains = l["filter_chains"].as_array().into_iter().flatten().chain(l.get("default_filter_chain"));
        for chain in chains {
            rows.push(vec![text(&address["address"]), text(&address["port_value"]), chain_match(&chain["filter_chain_match"]), destination(chain)]);
        }
    }
    rows
}

/// A filter chain's match, as istioctl words it (`ALL` when it matches everything).
fn chain_match(m: &Value) -> String {
    let list = |key: &str| m[key].as_array().map(|v| v.iter().map(text).collect::<Vec<_>>().join(","));
    let mut parts = Vec::new();
    if let Some(port) = m.get("destination_port") {
        parts.push(format!("Port: {}", text(port)));
    }
    if let Some(ranges) = m["prefix_ranges"].as_array() {
        let cidrs: Vec<String> = ranges.iter().map(|r| format!("{}/{}", text(&r["address_prefix"]), r["prefix_len"].as_u64().unwrap_or(0))).collect();
        parts.push(format!("Addr: {}", cidrs.join(",")));
    }
    if let Some(sni) = list("server_names") {
        parts.push(format!("SNI: {sni}"));
    }
    if let Some(t) = m.get("transport_protocol") {
        parts.push(format!("Trans: {}", text(t)));
    }
    if let Some(app) = list("application_protocols") {
        parts.push(format!("App: {app}"));
    }
    if parts.is_empty() { "ALL".into() } else { parts.join("; ") }
}

/// Where a chain sends its traffic: the connection manager's routes or tcp_proxy's cluster.
fn destination(chain: &Value) -> String {
    for filter in chain["filters"].as_array().into_iter().flatten() {
        let config = &filter["typed_config"];
        let kind = config["@type"].as_str().unwrap_or_default();
        if kind.ends_with("HttpConnectionManager") {
            return match config["rds"]["route_config_name"].as_str() {
                Some(name) => format!("Route: {name}"),
                None => format!("Inline Route: {}", text(&config["route_config"]["name"])),
            };
        }
        if kind.ends_with("TcpProxy") {
            return match config["cluster"].as_str() {
                Some(cluster) => format!("Cluster: {cluster}"),
                None => "WeightedClusters".into(),
            };
        }
    }
    "Non-HTTP/Non-TCP".into()
}

fn route_rows(routes: &Value) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for rc in routes.as_array().into_iter().flatten() {
        for vh in rc["virtual_hosts"].as_array().into_iter().flatten() {
            let domains: Vec<String> = vh["domains"].as_array().into_iter().flatten().map(text).collect();
            let shown = match domains.len() {
                0..=2 => domains.join(", "),
                n => format!("{}, {} + {} more...", domains[0], domains[1], n - 2),
            };
            for route in vh["routes"].as_array().into_iter().flatten() {
                let istio_config = route["metadata"]["filter_metadata"]["istio"]["config"].as_str();
                rows.push(vec![text(&rc["name"]), text(&vh["name"]), shown.clone(), route_match(&route["match"]), istio_config.map_or("-".into(), istio_resource)]);
            }
        }
    }
    rows
}

/// A route's path match: `/*` for every path, `/api*` for a prefix, the path itself, or the regex.
fn route_match(m: &Value) -> String {
    if let Some(prefix) = m["prefix"].as_str() {
        return format!("{}*", if prefix.is_empty() { "/" } else { prefix });
    }
    if let Some(prefix) = m["path_separated_prefix"].as_str() {
        return format!("{prefix}/*");
    }
    if let Some(path) = m["path"].as_str() {
        return path.to_string();
    }
    m["safe_regex"]["regex"].as_str().map_or("-".into(), str::to_string)
}

/// `/apis/networking.istio.io/v1/namespaces/shop/virtual-service/reviews` → `reviews.shop`.
fn istio_resource(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').collect();
    match parts.iter().position(|p| *p == "namespaces") {
        Some(i) if parts.len() > i + 3 => format!("{}.{}", parts[i + 3], parts[i + 1]),
        _ => path.to_string(),
    }
}

fn cluster_rows(clusters: &Value) -> Vec<Vec<String>> {
    clusters
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let name = text(&c["name"]);
            // Istio's names: direction|port|subset|host.
            let (fqdn, port, subset, direction) = match name.split('|').collect::<Vec<_>>()[..] {
                [direction, port, subset, host] => (host.to_string(), port.to_string(), if subset.is_empty() { "-" } else { subset }.to_string(), direction.to_string()),
                _ => (name.clone(), "-".into(), "-".into(), "-".into()),
            };
            let kind = c["type"].as_str().unwrap_or(if c.get("cluster_type").is_some() { "CUSTOM" } else { "STATIC" }).to_string();
            let rule = c["metadata"]["filter_metadata"]["istio"]["config"].as_str().map_or("-".into(), istio_resource);
            vec![fqdn, port, subset, direction, kind, rule]
        })
        .collect()
}

fn endpoint_rows(assignments: &Value) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for a in assignments.as_array().into_iter().flatten() {
        for locality in a["endpoints"].as_array().into_iter().flatten() {
            for e in locality["lb_endpoints"].as_array().into_iter().flatten() {
                let address = &e["endpoint"]["address"]["socket_address"];
                let status = e["health_status"].as_str().unwrap_or("HEALTHY").to_string();
                rows.push(vec![format!("{}:{}", text(&address["address"]), text(&address["port_value"])), status, text(&a["cluster_name"])]);
            }
        }
    }
    rows
}

/// The pod's secrets: its workload certificate (`default`, from the agent's identities) and the secrets its
/// configuration received over SDS (key material redacted by the agent).
fn secrets(fetched: &Fetched, pod: &str) -> Value {
    let pods = fetched.status["pods"].as_array().into_iter().flatten();
    let identity = pods.filter(|p| format!("{}/{}", text(&p["namespace"]), text(&p["name"])) == pod).find_map(|p| p["identity"].as_str());
    let held = identity.and_then(|id| fetched.status["identities"].as_array().into_iter().flatten().find(|i| i["identity"] == id));
    let mut out: Vec<Value> = held
        .map(|i| json!({"name": "default", "type": "Cert Chain", "identity": i["identity"], "state": i["state"], "serial": i["serial"], "not_after_unix": i["not_after_unix"], "not_before_unix": i["not_before_unix"]}))
        .into_iter()
        .collect();
    for s in sections(&fetched.dump, Kind::Secrets) {
        let kind = if s.get("tls_certificate").is_some() { "Cert Chain" } else if s.get("validation_context").is_some() { "CA" } else { "-" };
        out.push(json!({"name": s["name"], "type": kind, "state": "valid"}));
    }
    json!(out)
}

fn secret_rows(secrets: &Value) -> Vec<Vec<String>> {
    let time = |v: &Value| v.as_u64().map_or("-".into(), |t| crate::civil_time::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)));
    secrets
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let state = text(&s["state"]);
            let status = if state == "valid" { "ACTIVE" } else { "WARMING" };
            vec![text(&s["name"]), text(&s["type"]), status.into(), (state == "valid").to_string(), text(&s["serial"]), time(&s["not_after_unix"]), time(&s["not_before_unix"])]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched() -> Fetched {
        let listener = json!({"name": "virtualInbound", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
            "filter_chains": [
                {"filter_chain_match": {"destination_port": 8080, "transport_protocol": "tls", "application_protocols": ["istio-http/1.1", "istio-h2"]},
                 "filters": [{"typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", "route_config": {"name": "inbound|8080||"}}}]},
                {"filters": [{"typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "cluster": "InboundPassthroughCluster"}}]}]});
        let route = json!({"name": "80", "virtual_hosts": [{"name": "server.shop.svc.cluster.local:80", "domains": ["server.shop.svc.cluster.local", "server", "server.shop", "10.96.0.7"],
            "routes": [{"match": {"prefix": "/"}, "metadata": {"filter_metadata": {"istio": {"config": "/apis/networking.istio.io/v1/namespaces/shop/virtual-service/routing"}}}}]}]});
        let cluster = json!({"name": "outbound|80|v1|server.shop.svc.cluster.local", "type": "EDS", "metadata": {"filter_metadata": {"istio": {"config": "/apis/networking.istio.io/v1/namespaces/shop/destination-rule/server"}}}});
        let assignment = json!({"cluster_name": "outbound|80|v1|server.shop.svc.cluster.local", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "10.77.0.4", "port_value": 8080}}}}]}]});
        let dump = json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": {"node": {"id": "sidecar~10.77.0.2~client.shop~shop.svc.cluster.local"}}},
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "dynamic_active_clusters": [{"cluster": cluster}, {"cluster": {"name": "BlackHoleCluster", "type": "STATIC"}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "dynamic_listeners": [{"name": "virtualInbound", "active_state": {"listener": listener}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": [{"route_config": route}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump"},
            {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump", "dynamic_endpoint_configs": [{"endpoint_config": assignment}]}]});
        let status = json!({"pods": [{"namespace": "shop", "name": "client", "identity": "spiffe://cluster.local/ns/shop/sa/client"}],
            "identities": [{"identity": "spiffe://cluster.local/ns/shop/sa/client", "state": "valid", "serial": "0a1b", "not_before_unix": 0, "not_after_unix": 86_400}]});
        Fetched { dump, status }
    }

    fn lines(kind: Kind) -> Vec<String> {
        render(&fetched(), "shop/client", kind, Output::Table).unwrap().lines().map(str::to_string).collect()
    }

    #[test]
    fn tables_have_istioctls_columns() {
        let l = lines(Kind::Listeners);
        assert!(l[0].starts_with("ADDRESSES") && l[1].contains("Port: 8080; Trans: tls; App: istio-http/1.1,istio-h2") && l[1].ends_with("Inline Route: inbound|8080||"), "{l:#?}");
        assert!(l[2].contains("ALL") && l[2].ends_with("Cluster: InboundPassthroughCluster"), "{l:#?}");
        let r = lines(Kind::Routes);
        assert!(r[1].contains("server.shop.svc.cluster.local, server + 2 more...") && r[1].contains("/*") && r[1].ends_with("routing.shop"), "{r:#?}");
        let c = lines(Kind::Clusters);
        let cells: Vec<&str> = c[1].split_whitespace().collect();
        assert_eq!(cells, ["server.shop.svc.cluster.local", "80", "v1", "outbound", "EDS", "server.shop"]);
        assert!(c[2].starts_with("BlackHoleCluster") && c[2].contains("STATIC"), "{c:#?}");
        let e = lines(Kind::Endpoints);
        assert_eq!(e[1].split_whitespace().collect::<Vec<_>>(), ["10.77.0.4:8080", "HEALTHY", "outbound|80|v1|server.shop.svc.cluster.local"]);
        let s = lines(Kind::Secrets);
        assert!(s[1].starts_with("default") && s[1].contains("Cert Chain") && s[1].contains("ACTIVE") && s[1].contains("0a1b") && s[1].contains("1970-01-02T00:00:00Z"), "{s:#?}");
    }

    #[test]
    fn json_and_yaml_carry_the_resources_and_bad_names_say_what_to_do() {
        let clusters: Value = serde_json::from_str(&render(&fetched(), "shop/client", Kind::Clusters, Output::Json).unwrap()).unwrap();
        assert_eq!(clusters[0]["name"], "outbound|80|v1|server.shop.svc.cluster.local");
        let bootstrap = render(&fetched(), "shop/client", Kind::Bootstrap, Output::Yaml).unwrap();
        assert!(bootstrap.contains("sidecar~10.77.0.2~client.shop"), "{bootstrap}");
        assert!(pod_name("client").unwrap_err().contains("weft-agent status"));
        assert_eq!(pod_name("shop/client").unwrap(), ("shop", "client"));
    }
}
