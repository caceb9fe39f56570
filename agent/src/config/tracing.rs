//! The connection manager's `tracing`: which requests are traced (client, random and overall sampling, as
//! fractions of 10,000 as Envoy keeps them), the tags spans carry, and the tracer they are reported to:
//! `envoy.tracers.opentelemetry` over gRPC to a cluster (W3C `traceparent`), or `envoy.tracers.zipkin` with
//! JSON v2 over HTTP to a cluster (B3 headers); other tracers are refused by their path.

use std::sync::Arc;

use super::tree::{ConfigError, Obj, Result};

/// `envoy.config.trace.v3.OpenTelemetryConfig`.
pub const OPENTELEMETRY: &str = "envoy.config.trace.v3.OpenTelemetryConfig";
/// `envoy.config.trace.v3.ZipkinConfig`.
pub const ZIPKIN: &str = "envoy.config.trace.v3.ZipkinConfig";

/// `HttpConnectionManager.tracing`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Tracing {
    /// Fractions of 10,000: of requests with `x-client-trace-id`, traced; of others, traced at random; of
    /// those traced, kept.
    pub client_sampling: u64,
    pub random_sampling: u64,
    pub overall_sampling: u64,
    /// `verbose`: annotate spans with stream events (accepted; weft's spans carry tags only).
    pub verbose: bool,
    /// `max_path_tag_length` (default 256): `http.url` is cut to this many bytes.
    pub max_path_tag_length: usize,
    pub custom_tags: Vec<CustomTag>,
    /// `None`: sampling decides and `x-request-id` records it, but no span is made or reported.
    pub provider: Option<Arc<Provider>>,
}

/// The tracer spans are made and reported by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Provider {
    OpenTelemetry(OpenTelemetry),
    Zipkin(Zipkin),
}

impl Provider {
    /// The cluster spans are sent to.
    pub fn cluster(&self) -> &str {
        match self {
            Provider::OpenTelemetry(o) => &o.cluster,
            Provider::Zipkin(z) => &z.cluster,
        }
    }
}

/// `envoy.tracers.zipkin`: B3 propagation, spans POSTed as Zipkin JSON v2 to a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Zipkin {
    pub cluster: String,
    /// `collector_endpoint`: the path spans are POSTed to (`/api/v2/spans` in Istio).
    pub endpoint: String,
    /// `collector_hostname` (default: the cluster name), the POST's `Host`.
    pub hostname: String,
    /// `trace_id_128bit`: new traces get 128-bit ids (else 64).
    pub trace_id_128bit: bool,
    /// `shared_span_context` (default true): an inbound span shares the client's span id instead of being its
    /// child.
    pub shared_span_context: bool,
}

/// A tag every span of the connection manager carries.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CustomTag {
    pub tag: String,
    pub value: TagValue,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum TagValue {
    Literal(String),
    /// An environment variable of the proxy, read when the configuration is translated.
    Environment { value: Option<String>, default: Option<String> },
    RequestHeader { name: String, default: Option<String> },
    /// A key of the RBAC filter's dynamic metadata (`envoy.filters.http.rbac`), which its shadow rules write.
    RbacMetadata { key: String, default: Option<String> },
}

/// `envoy.tracers.opentelemetry`: spans exported with OTLP over gRPC to a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct OpenTelemetry {
    pub cluster: String,
    /// `envoy_grpc.authority` (default: the cluster name), the export request's `:authority`.
    pub authority: String,
    /// The gRPC deadline of an export (`grpc_service.timeout`; Envoy's default when unset is none, weft's 5 s).
    pub timeout_ms: u64,
    /// The `service.name` resource attribute (default `unknown_service:envoy`).
    pub service_name: String,
}

const RBAC_METADATA: &str = "envoy.filters.http.rbac";

pub fn translate(mut t: Obj<'_>) -> Result<Tracing> {
    let tracing = Tracing {
        client_sampling: percent(&mut t, "client_sampling")?,
        random_sampling: percent(&mut t, "random_sampling")?,
        overall_sampling: percent(&mut t, "overall_sampling")?,
        verbose: t.bool("verbose")?.unwrap_or(false),
        max_path_tag_length: t.u64("max_path_tag_length")?.map_or(256, |n| n as usize),
        custom_tags: t.objects("custom_tags")?.into_iter().map(custom_tag).collect::<Result<_>>()?,
        provider: t.object("provider")?.map(provider).transpose()?.map(Arc::new),
    };
    if t.bool_value("spawn_upstream_span")? == Some(true) {
        return Err(ConfigError::new(t.at("spawn_upstream_span"), "true is not supported by weft yet (it makes one span per request)"));
    }
    t.finish()?;
    Ok(tracing)
}

/// An `envoy.type.v3.Percent` as Envoy keeps it: a fraction of 10,000, rounded; 100% when unset.
fn percent(t: &mut Obj<'_>, key: &str) -> Result<u64> {
    let Some(mut p) = t.object(key)? else { return Ok(10_000) };
    let path = p.at("value");
    let value = match p.take("value") {
        None => 0.0,
        Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(0.0),
        Some(_) => return Err(ConfigError::new(path, "expected a number")),
    };
    if !(0.0..=100.0).contains(&value) {
        return Err(ConfigError::new(path, "must be between 0 and 100"));
    }
    p.finish()?;
    Ok((value * 100.0).round() as u64)
}

fn custom_tag(mut c: Obj<'_>) -> Result<CustomTag> {
    let tag = c.required_string("tag")?.to_string();
    let value = if let Some(mut l) = c.object("literal")? {
        let v = l.string("value")?.unwrap_or_default().to_string();
        l.finish()?;
        TagValue::Literal(v)
    } else if let Some(mut e) = c.object("environment")? {
        let name = e.required_string("name")?;
        let default = e.string("default_value")?.map(str::to_string);
        e.finish()?;
        TagValue::Environment { value: std::env::var(name).ok(), default }
    } else if let Some(mut h) = c.object("request_header")? {
        let name = h.required_string("name")?.to_ascii_lowercase();
        let default = h.string("default_value")?.map(str::to_string);
        h.finish()?;
        TagValue::RequestHeader { name, default }
    } else if let Some(m) = c.object("metadata")? {
        metadata_tag(m)?
    } else {
        return Err(ConfigError::new(c.path(), "needs one of literal, environment, request_header or metadata"));
    };
    c.finish()?;
    Ok(CustomTag { tag, value })
}

/// A metadata tag: weft's filters write one kind of dynamic metadata a tag can read, the RBAC filter's
/// shadow results (Istio's `istio.authorization.dry_run.*` tags).
fn metadata_tag(mut m: Obj<'_>) -> Result<TagValue> {
    let mut kind = m.required_object("kind")?;
    let request = kind.object("request")?;
    if request.is_none() {
        return Err(ConfigError::new(kind.path(), "only request (dynamic) metadata is supported by weft"));
    }
    kind.finish()?;
    let mut key = m.required_object("metadata_key")?;
    let namespace = key.required_string("key")?;
    if namespace != RBAC_METADATA {
        return Err(ConfigError::new(key.at("key"), format!("{namespace} is not supported; weft's filters write dynamic metadata only under {RBAC_METADATA}")));
    }
    let path_at = key.at("path");
    let mut path = key.objects("path")?;
    let [segment] = path.as_mut_slice() else {
        return Err(ConfigError::new(path_at, "needs exactly one segment (the RBAC filter's keys are flat)"));
    };
    let name = segment.required_string("key")?.to_string();
    for s in path {
        s.finish()?;
    }
    key.finish()?;
    let default = m.string("default_value")?.map(str::to_string);
    m.finish()?;
    Ok(TagValue::RbacMetadata { key: name, default })
}

fn provider(mut p: Obj<'_>) -> Result<Provider> {
    let _ = p.string("name")?;
    let mut typed = p.required_object("typed_config")?;
    let type_url = typed.required_string("@type")?;
    let provider = match type_url.rsplit('/').next().unwrap_or(type_url) {
        OPENTELEMETRY => Provider::OpenTelemetry(opentelemetry(&mut typed)?),
        ZIPKIN => Provider::Zipkin(zipkin(&mut typed)?),
        _ => return Err(ConfigError::new(typed.at("@type"), format!("{type_url} is not supported; weft's tracers are {OPENTELEMETRY} and {ZIPKIN}"))),
    };
    typed.finish()?;
    p.finish()?;
    Ok(provider)
}

fn zipkin(typed: &mut Obj<'_>) -> Result<Zipkin> {
    let cluster = typed.required_string("collector_cluster")?.to_string();
    let endpoint = typed.required_string("collector_endpoint")?.to_string();
    match typed.string("collector_endpoint_version")?.unwrap_or("HTTP_JSON") {
        "HTTP_JSON" => {}
        other => return Err(ConfigError::new(typed.at("collector_endpoint_version"), format!("{other} is not supported by weft; use HTTP_JSON"))),
    }
    if typed.bool("split_spans_for_request")? == Some(true) {
        return Err(ConfigError::new(typed.at("split_spans_for_request"), "true is not supported by weft yet"));
    }
    let hostname = typed.string("collector_hostname")?.filter(|h| !h.is_empty()).unwrap_or(&cluster).to_string();
    Ok(Zipkin {
        trace_id_128bit: typed.bool("trace_id_128bit")?.unwrap_or(false),
        shared_span_context: typed.bool_value("shared_span_context")?.unwrap_or(true),
        cluster,
        endpoint,
        hostname,
    })
}

fn opentelemetry(typed: &mut Obj<'_>) -> Result<OpenTelemetry> {
    let mut grpc = typed.object("grpc_service")?.ok_or_else(|| {
        let what = if typed.has("http_service") { "http_service is not supported by weft yet; use grpc_service" } else { "grpc_service is required" };
        ConfigError::new(typed.at("grpc_service"), what)
    })?;
    let mut envoy_grpc = grpc.object("envoy_grpc")?.ok_or_else(|| ConfigError::new(grpc.at("envoy_grpc"), "is required (google_grpc is not supported by weft)"))?;
    let cluster = envoy_grpc.required_string("cluster_name")?.to_string();
    let authority = envoy_grpc.string("authority")?.filter(|a| !a.is_empty()).unwrap_or(&cluster).to_string();
    envoy_grpc.finish()?;
    let timeout_ms = grpc.duration("timeout")?.map_or(5_000, |d| d.as_millis() as u64);
    grpc.finish()?;
    let service_name = typed.string("service_name")?.filter(|s| !s.is_empty()).unwrap_or("unknown_service:envoy").to_string();
    Ok(OpenTelemetry { cluster, authority, timeout_ms, service_name })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translated(v: serde_json::Value) -> Result<Tracing> {
        translate(Obj::new(&v, "tracing")?)
    }

    #[test]
    fn istiods_tracing_translates() {
        let t = translated(serde_json::json!({
            "clientSampling": {"value": 100}, "randomSampling": {"value": 1}, "overallSampling": {"value": 100},
            "customTags": [
                {"tag": "istio.canonical_service", "literal": {"value": "ratings"}},
                {"tag": "istio.authorization.dry_run.allow_policy.name", "metadata": {"kind": {"request": {}}, "metadataKey": {"key": "envoy.filters.http.rbac", "path": [{"key": "istio_dry_run_allow_shadow_effective_policy_id"}]}}}
            ],
            "provider": {"name": "envoy.tracers.opentelemetry", "typedConfig": {"@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpcService": {"envoyGrpc": {"clusterName": "outbound|4317||otel.svc"}, "timeout": "0.250s"}, "serviceName": "ratings.shop"}}
        }))
        .unwrap();
        assert_eq!((t.client_sampling, t.random_sampling, t.overall_sampling), (10_000, 100, 10_000));
        assert_eq!(t.custom_tags[1].value, TagValue::RbacMetadata { key: "istio_dry_run_allow_shadow_effective_policy_id".into(), default: None });
        assert_eq!(t.provider.as_deref(), Some(&Provider::OpenTelemetry(OpenTelemetry { cluster: "outbound|4317||otel.svc".into(), authority: "outbound|4317||otel.svc".into(), timeout_ms: 250, service_name: "ratings.shop".into() })));
        // Istio's zipkin provider.
        let z = translated(serde_json::json!({"provider": {"name": "envoy.tracers.zipkin", "typedConfig": {"@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
            "collectorCluster": "outbound|9411||zipkin.istio-system.svc.cluster.local", "collectorEndpoint": "/api/v2/spans", "traceId128bit": true,
            "sharedSpanContext": false, "collectorEndpointVersion": "HTTP_JSON", "collectorHostname": "zipkin.istio-system.svc.cluster.local"}}}))
        .unwrap();
        let Some(Provider::Zipkin(z)) = z.provider.as_deref() else { panic!("{z:?}") };
        assert_eq!((z.trace_id_128bit, z.shared_span_context, z.hostname.as_str()), (true, false, "zipkin.istio-system.svc.cluster.local"));
    }

    #[test]
    fn what_weft_cannot_honour_is_refused_by_path() {
        for (tracing, path) in [
            (serde_json::json!({"provider": {"name": "d", "typedConfig": {"@type": "type.googleapis.com/envoy.config.trace.v3.DatadogConfig"}}}), "tracing.provider.typed_config.@type"),
            (serde_json::json!({"provider": {"name": "z", "typedConfig": {"@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig", "collectorCluster": "z", "collectorEndpoint": "/", "collectorEndpointVersion": "GRPC"}}}), "tracing.provider.typed_config.collector_endpoint_version"),
            (serde_json::json!({"provider": {"name": "o", "typedConfig": {"@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig", "httpService": {}}}}), "tracing.provider.typed_config.grpc_service"),
            (serde_json::json!({"spawnUpstreamSpan": true}), "tracing.spawn_upstream_span"),
            (serde_json::json!({"randomSampling": {"value": 101}}), "tracing.random_sampling.value"),
            (serde_json::json!({"customTags": [{"tag": "t", "metadata": {"kind": {"route": {}}, "metadataKey": {"key": "k"}}}]}), "tracing.custom_tags[0].metadata.kind"),
        ] {
            let e = translated(tracing).unwrap_err();
            assert_eq!(e.path, path, "{e}");
        }
    }
}
