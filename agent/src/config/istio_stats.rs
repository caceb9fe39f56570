//! Istio's standard-metrics filter (`stats.PluginConfig`, istio-proxy's `istio.stats`), which istiod puts on
//! every sidecar listener (as a network filter) and connection manager (as an HTTP filter) when the mesh's
//! default metrics provider is Prometheus, as the istiod chart configures it. It is telemetry only: it changes
//! no byte of traffic. weft validates it and produces none of Istio's metrics yet (see the README): a pod's
//! traffic shows in its own counters (`/stats/prometheus` on the agent and on the pod's 15020).

use std::time::Duration;

use super::tree::{ConfigError, Obj, Result};

/// Its type URL's message.
pub const ISTIO_STATS: &str = "stats.PluginConfig";

/// The filter's settings, validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IstioStats {
    /// `SERVER_GATEWAY` (a waypoint) or, unset, the listener's direction decides (`source`/`destination`).
    pub server_gateway: bool,
    pub disable_host_header_fallback: bool,
    /// How often TCP metrics are reported (Istio's default 5 s).
    pub tcp_reporting_duration: Duration,
    /// Metric overrides and custom definitions (CEL expressions), counted.
    pub overrides: usize,
    pub definitions: usize,
}

pub fn translate(mut c: Obj<'_>) -> Result<IstioStats> {
    let server_gateway = match c.string("reporter")?.unwrap_or("UNSPECIFIED") {
        "UNSPECIFIED" => false,
        "SERVER_GATEWAY" => true,
        other => return Err(ConfigError::new(c.at("reporter"), format!("{other} is not a reporter; use UNSPECIFIED or SERVER_GATEWAY"))),
    };
    let disable_host_header_fallback = c.bool("disable_host_header_fallback")?.unwrap_or(false);
    let tcp_reporting_duration = c.duration("tcp_reporting_duration")?.unwrap_or(Duration::from_secs(5));
    let _ = c.duration("rotation_interval")?;
    let _ = c.duration("graceful_deletion_interval")?;
    let mut overrides = 0;
    for mut m in c.objects("metrics")? {
        let _ = m.take("dimensions");
        let _ = m.string("name")?;
        let _ = m.strings("tags_to_remove")?;
        let _ = m.string("match")?;
        let _ = m.bool("drop")?;
        m.finish()?;
        overrides += 1;
    }
    let mut definitions = 0;
    for mut d in c.objects("definitions")? {
        let _ = d.required_string("name")?;
        let _ = d.string("value")?;
        match d.string("type")?.unwrap_or("COUNTER") {
            "COUNTER" | "GAUGE" | "HISTOGRAM" => {}
            other => return Err(ConfigError::new(d.at("type"), format!("{other} is not a metric type; use COUNTER, GAUGE or HISTOGRAM"))),
        }
        d.finish()?;
        definitions += 1;
    }
    c.finish()?;
    Ok(IstioStats { server_gateway, disable_host_header_fallback, tcp_reporting_duration, overrides, definitions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn istiods_stats_configs_translate_and_bad_ones_are_refused_by_path() {
        let inbound = json!({"disable_host_header_fallback": true, "reporter": "UNSPECIFIED", "metrics": [{"dimensions": {"x": "y"}, "name": "requests_total", "tags_to_remove": ["a"]}]});
        let s = translate(Obj::new(&inbound, "f").unwrap()).unwrap();
        assert!(s.disable_host_header_fallback && !s.server_gateway && s.overrides == 1);
        assert_eq!(s.tcp_reporting_duration, Duration::from_secs(5));
        let bad = json!({"reporter": "CLIENT"});
        assert_eq!(translate(Obj::new(&bad, "f").unwrap()).unwrap_err().path, "f.reporter");
        let unknown = json!({"metrics": [{"bogus": 1}]});
        assert_eq!(translate(Obj::new(&unknown, "f").unwrap()).unwrap_err().path, "f.metrics[0].bogus");
    }
}
