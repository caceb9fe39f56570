//! `envoy.tcp.metadataexchange.config.MetadataExchange` (istiod's `istio.metadata_exchange`): Istio's TCP
//! metadata exchange, a network filter of inbound filter chains and an upstream network filter of outbound
//! clusters (`Cluster.filters`). Both sides of an mTLS connection whose negotiated ALPN is `protocol` send one
//! frame with their workload metadata before any payload and strip the peer's.

use super::tree::{Obj, Result};

pub const METADATA_EXCHANGE: &str = "envoy.tcp.metadataexchange.config.MetadataExchange";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MetadataExchange {
    /// The ALPN under which the exchange happens (istiod: `istio-peer-exchange`); empty, as in istio-proxy,
    /// means connections that negotiated none (plaintext ones included).
    pub protocol: String,
    /// Fall back to workload discovery (WDS) when the peer sends nothing: accepted; weft has no WDS, so a
    /// failed exchange means no peer, as in istio-proxy without WDS.
    pub enable_discovery: bool,
    /// Peer labels kept besides the canonical service ones.
    pub additional_labels: Vec<String>,
}

/// The filter's `typed_config` (its `@type` already read).
pub fn translate(mut m: Obj<'_>) -> Result<MetadataExchange> {
    let protocol = m.string("protocol")?.unwrap_or_default().to_string();
    let enable_discovery = m.bool("enable_discovery")?.unwrap_or(false);
    let additional_labels = m.strings("additional_labels")?.into_iter().map(str::to_string).collect();
    m.finish()?;
    Ok(MetadataExchange { protocol, enable_discovery, additional_labels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn istiods_config_translates_and_mistakes_name_their_field() {
        let v = json!({"@type": "x", "protocol": "istio-peer-exchange", "enable_discovery": true, "additional_labels": ["role"]});
        let mut o = Obj::new(&v, "f").unwrap();
        let _ = o.string("@type");
        let m = translate(o).unwrap();
        assert_eq!(m, MetadataExchange { protocol: "istio-peer-exchange".into(), enable_discovery: true, additional_labels: vec!["role".into()] });
        let v = json!({"protocol": 7});
        assert_eq!(translate(Obj::new(&v, "f").unwrap()).unwrap_err().path, "f.protocol");
        let v = json!({"protocol": "p", "bogus": 1});
        assert_eq!(translate(Obj::new(&v, "f").unwrap()).unwrap_err().path, "f.bogus");
    }
}
