//! Istio's standard-metrics filter (`stats.PluginConfig`, istio-proxy's `istio.stats`), which istiod puts on
//! every sidecar listener (as a network filter) and connection manager (as an HTTP filter) when the mesh's
//! default metrics provider is Prometheus, as the istiod chart configures it. It is telemetry only: it changes
//! no byte of traffic. The data path records Istio's standard metrics by it (`proxy::filters::istio_stats`).
//! Telemetry's overrides apply as istio-proxy applies them: `drop`, `tags_to_remove`, and `dimensions` whose
//! expression is a string literal; weft evaluates no other CEL expression, and treats one as istio-proxy treats
//! an expression it cannot parse (a standard tag it overrides is left out, a new tag is not added), so a
//! custom metric (`definitions`) is not produced.

use std::time::Duration;

use super::tree::{ConfigError, Obj, Result};

/// Its type URL's message.
pub const ISTIO_STATS: &str = "stats.PluginConfig";

/// The filter's settings, validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IstioStats {
    /// Without it, an HTTP request's `host` names the destination service when its cluster does not.
    pub disable_host_header_fallback: bool,
    /// How often TCP metrics are reported (Istio's default 5 s).
    pub tcp_reporting_duration: Duration,
    /// `metrics`: changes to the standard metrics' tags, in order.
    pub overrides: Vec<MetricOverride>,
    /// Custom metric definitions (CEL): counted, not produced.
    pub definitions: usize,
}

/// One entry of `metrics`: for one standard metric (`None`: all of them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MetricOverride {
    pub metric: Option<String>,
    pub drop: bool,
    pub tags_to_remove: Vec<String>,
    /// `dimensions`, by tag in name order: the literal value, or `None` for an expression weft cannot evaluate.
    pub dimensions: Vec<(String, Option<String>)>,
}

pub fn translate(mut c: Obj<'_>) -> Result<IstioStats> {
    match c.string("reporter")?.unwrap_or("UNSPECIFIED") {
        "UNSPECIFIED" => {}
        // A waypoint reports the destination workload from the endpoint it picked; weft serves sidecars.
        "SERVER_GATEWAY" => return Err(ConfigError::new(c.at("reporter"), "SERVER_GATEWAY (a waypoint's reporting) is not supported by weft, which serves sidecar listeners; use UNSPECIFIED")),
        other => return Err(ConfigError::new(c.at("reporter"), format!("{other} is not a reporter; use UNSPECIFIED"))),
    }
    let disable_host_header_fallback = c.bool("disable_host_header_fallback")?.unwrap_or(false);
    let tcp_reporting_duration = c.duration("tcp_reporting_duration")?.unwrap_or(Duration::from_secs(5));
    let _ = c.duration("rotation_interval")?;
    let _ = c.duration("graceful_deletion_interval")?;
    let overrides = c.objects("metrics")?.into_iter().map(metric_override).collect::<Result<Vec<_>>>()?;
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
    Ok(IstioStats { disable_host_header_fallback, tcp_reporting_duration, overrides, definitions })
}

fn metric_override(mut m: Obj<'_>) -> Result<MetricOverride> {
    let path = m.at("dimensions");
    let mut dimensions = Vec::new();
    if let Some(value) = m.take("dimensions") {
        let map = value.as_object().ok_or_else(|| ConfigError::new(path.clone(), "expected a map of tag to expression"))?;
        for (tag, expression) in map {
            let expression = expression.as_str().ok_or_else(|| ConfigError::new(format!("{path}.{tag}"), "expected a string (a CEL expression)"))?;
            dimensions.push((tag.clone(), string_literal(expression)));
        }
        dimensions.sort();
    }
    let metric = m.string("name")?.filter(|n| !n.is_empty()).map(str::to_string);
    let tags_to_remove = m.strings("tags_to_remove")?.into_iter().map(str::to_string).collect();
    let drop = m.bool("drop")?.unwrap_or(false);
    let _ = m.string("match")?;
    m.finish()?;
    Ok(MetricOverride { metric, drop, tags_to_remove, dimensions })
}

/// The value of a CEL string literal (`'v'` or `"v"`, no escapes).
fn string_literal(expression: &str) -> Option<String> {
    let e = expression.trim();
    let quote = e.chars().next().filter(|q| *q == '\'' || *q == '"')?;
    let inner = e.strip_prefix(quote)?.strip_suffix(quote)?;
    (!inner.contains(quote) && !inner.contains('\\')).then(|| inner.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn istiods_stats_configs_translate_and_bad_ones_are_refused_by_path() {
        let inbound = json!({"disable_host_header_fallback": true, "reporter": "UNSPECIFIED", "metrics": [{"dimensions": {"x": "y"}, "name": "requests_total", "tags_to_remove": ["a"]}]});
        let s = translate(Obj::new(&inbound, "f").unwrap()).unwrap();
        assert!(s.disable_host_header_fallback);
        let o = &s.overrides[0];
        assert_eq!((o.metric.as_deref(), o.drop, &o.tags_to_remove[..]), (Some("requests_total"), false, &["a".to_string()][..]));
        assert_eq!(o.dimensions, vec![("x".to_string(), None)], "y is no literal");
        let literal = json!({"metrics": [{"dimensions": {"team": "'payments'", "b": "request.host"}}]});
        let s = translate(Obj::new(&literal, "f").unwrap()).unwrap();
        assert_eq!(s.overrides[0].dimensions, vec![("b".to_string(), None), ("team".to_string(), Some("payments".to_string()))]);
        assert_eq!(s.tcp_reporting_duration, Duration::from_secs(5));
        for bad in [json!({"reporter": "CLIENT"}), json!({"reporter": "SERVER_GATEWAY"})] {
            assert_eq!(translate(Obj::new(&bad, "f").unwrap()).unwrap_err().path, "f.reporter");
        }
        let unknown = json!({"metrics": [{"bogus": 1}]});
        assert_eq!(translate(Obj::new(&unknown, "f").unwrap()).unwrap_err().path, "f.metrics[0].bogus");
    }
}
