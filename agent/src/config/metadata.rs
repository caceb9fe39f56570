//! `envoy.config.core.v3.Metadata` of a cluster: opaque data for filters. Every namespace is kept as given
//! (config dumps show it); Istio's namespace (`filter_metadata.istio`, what istiod writes on its clusters) is
//! also read into typed fields the filters use. Metadata is free-form in Envoy: a value of another type than
//! the one Istio writes is kept and read as Envoy's filters read it (a string `alpn_override` other than
//! `"false"`, a non-bool `external`, are the defaults), never refused.

use serde_json::{Map, Value};

use super::tree::{ConfigError, Obj, Result};

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Metadata {
    /// `filter_metadata`: each namespace's Struct, as proto3 JSON.
    pub filter_metadata: Map<String, Value>,
    /// `typed_filter_metadata`: each namespace's Any, expanded.
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub typed_filter_metadata: Map<String, Value>,
    /// `filter_metadata.istio`, read.
    pub istio: IstioMetadata,
}

/// What istiod writes under `filter_metadata.istio` of a cluster (`pilot/pkg/networking/core/cluster_builder.go`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IstioMetadata {
    /// `services`: the Kubernetes services behind the cluster (telemetry labels).
    pub services: Vec<IstioService>,
    /// `default_original_port`: the service port the cluster was built for.
    pub default_original_port: Option<u16>,
    /// False when `alpn_override` is the string `"false"` (istiod's mark for DestinationRule TLS SIMPLE or
    /// MUTUAL: non-Istio TLS, whose ALPN the `istio.alpn` filter must leave alone).
    pub alpn_override: bool,
    /// `external`: a MESH_EXTERNAL service (metadata exchange may skip it).
    pub external: bool,
    /// `disable_mx`: every endpoint is HBONE; metadata exchange is skipped unconditionally.
    pub disable_mx: bool,
    /// `config`: the DestinationRule the cluster came from (`/apis/<group>/<version>/namespaces/<ns>/destination-rule/<name>`).
    pub config: Option<String>,
    /// `subset`: the DestinationRule subset.
    pub subset: Option<String>,
}

impl Default for IstioMetadata {
    fn default() -> Self {
        IstioMetadata { services: Vec::new(), default_original_port: None, alpn_override: true, external: false, disable_mx: false, config: None, subset: None }
    }
}

/// One entry of `istio.services`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct IstioService {
    pub host: String,
    pub name: String,
    pub namespace: String,
}

/// Istio's namespace of `filter_metadata`.
pub const ISTIO: &str = "istio";

/// `metadata` (an `envoy.config.core.v3.Metadata`).
pub fn translate(mut m: Obj<'_>) -> Result<Metadata> {
    let filter_metadata = namespaces(&mut m, "filter_metadata")?;
    let typed_filter_metadata = namespaces(&mut m, "typed_filter_metadata")?;
    m.finish()?;
    let istio = filter_metadata.get(ISTIO).and_then(Value::as_object).map(istio).unwrap_or_default();
    Ok(Metadata { filter_metadata, typed_filter_metadata, istio })
}

fn namespaces(m: &mut Obj<'_>, key: &str) -> Result<Map<String, Value>> {
    let path = m.at(key);
    match m.take(key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) => {
            for (namespace, value) in map {
                if !value.is_object() {
                    return Err(ConfigError::new(format!("{path}.{namespace}"), "expected an object (a Struct)"));
                }
            }
            Ok(map.clone())
        }
        Some(_) => Err(ConfigError::new(path, "expected a map of namespaces")),
    }
}

/// Reads the keys as Envoy's and istio-proxy's filters read them (`string_value()`, `bool_value()`,
/// `number_value()`: another type reads as the default).
fn istio(fields: &Map<String, Value>) -> IstioMetadata {
    let string = |key: &str| fields.get(key).and_then(Value::as_str);
    let flag = |key: &str| fields.get(key).and_then(Value::as_bool).unwrap_or(false);
    let services = fields.get("services").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_object).map(|s| {
        let text = |key: &str| s.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
        IstioService { host: text("host"), name: text("name"), namespace: text("namespace") }
    });
    let port = fields.get("default_original_port").and_then(Value::as_f64).filter(|p| p.fract() == 0.0 && (1.0..=65535.0).contains(p));
    IstioMetadata {
        services: services.collect(),
        default_original_port: port.map(|p| p as u16),
        alpn_override: string("alpn_override") != Some("false"),
        external: flag("external"),
        disable_mx: flag("disable_mx"),
        config: string("config").map(str::to_string),
        subset: string("subset").map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metadata(v: Value) -> Result<Metadata> {
        translate(Obj::new(&v, "c.metadata")?)
    }

    #[test]
    fn istiods_cluster_metadata_is_typed_and_every_namespace_kept() {
        let m = metadata(json!({"filter_metadata": {
            "istio": {"services": [{"host": "server.shop.svc.cluster.local", "name": "server", "namespace": "shop"}],
                "default_original_port": 8080.0, "alpn_override": "false", "external": true, "disable_mx": true,
                "config": "/apis/networking.istio.io/v1/namespaces/shop/destination-rule/server", "subset": "v1"},
            "envoy.lb": {"canary": true}}}))
        .unwrap();
        assert_eq!(m.istio.services, vec![IstioService { host: "server.shop.svc.cluster.local".into(), name: "server".into(), namespace: "shop".into() }]);
        assert_eq!(m.istio.default_original_port, Some(8080));
        assert!(!m.istio.alpn_override && m.istio.external && m.istio.disable_mx);
        assert_eq!(m.istio.subset.as_deref(), Some("v1"));
        assert_eq!(m.filter_metadata["envoy.lb"], json!({"canary": true}), "other namespaces are kept for dumps");
    }

    #[test]
    fn values_read_as_envoys_filters_read_them() {
        // Absent: ALPN is overridden, metadata exchange runs.
        let m = metadata(json!({})).unwrap();
        assert!(m.istio.alpn_override && !m.istio.external && !m.istio.disable_mx);
        // Only the string "false" turns the override off; a bool or "False" does not (string_value() == "false").
        for value in [json!(false), json!("False"), json!("true")] {
            let m = metadata(json!({"filter_metadata": {"istio": {"alpn_override": value}}})).unwrap();
            assert!(m.istio.alpn_override, "{value}");
        }
        let m = metadata(json!({"filter_metadata": {"istio": {"external": "true", "default_original_port": 70000}}})).unwrap();
        assert!(!m.istio.external, "bool_value() of a string is false");
        assert_eq!(m.istio.default_original_port, None);
    }

    #[test]
    fn malformed_metadata_is_refused_by_path() {
        let err = metadata(json!({"filter_metadata": {"istio": 3}})).unwrap_err();
        assert!(err.to_string().contains("c.metadata.filter_metadata.istio"), "{err}");
        let err = metadata(json!({"other": {}})).unwrap_err();
        assert!(err.to_string().contains("c.metadata.other"), "{err}");
    }
}
