//! The agent's own metrics, by event: CNI requests (count and latency by command and result), xDS responses
//! (ACK/NACK and apply latency by type), workload certificate fetches, in Prometheus' text format through
//! `prometheus-client` (names, escaping, histograms). A leaf: the CNI server, the xDS client and the identity
//! manager record, the admin endpoint renders. Scrape-time values (pods, their load, certificate expiry)
//! are rendered next to these by the admin endpoint.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

struct NodeMetrics {
    registry: Registry,
    cni_requests: Family<Labels, Counter>,
    cni_duration: Family<Labels, Histogram, fn() -> Histogram>,
    xds_responses: Family<Labels, Counter>,
    xds_apply: Family<Labels, Histogram, fn() -> Histogram>,
    certificate_fetches: Family<Labels, Counter>,
}

/// Latency buckets from 100 µs to about 3 s (Prometheus' help texts get their final period from the crate).
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

static METRICS: LazyLock<NodeMetrics> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let cni_requests = Family::<Labels, Counter>::default();
    registry.register("weft_cni_requests", "CNI requests handled, by command (ADD, DEL, CHECK, GC, STATUS) and result (ok, error)", cni_requests.clone());
    let cni_duration = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency);
    registry.register("weft_cni_request_duration_seconds", "Time the agent took to answer a CNI request, by command", cni_duration.clone());
    let xds_responses = Family::<Labels, Counter>::default();
    registry.register("weft_xds_responses", "Control-plane responses applied, by type (CDS, EDS, LDS, RDS, SDS) and result (ack, nack)", xds_responses.clone());
    let xds_apply = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency);
    registry.register("weft_xds_apply_duration_seconds", "Time taken to validate and apply a control-plane response, by type", xds_apply.clone());
    let certificate_fetches = Family::<Labels, Counter>::default();
    registry.register("weft_certificate_fetches", "Workload certificate requests to the CA, by result (ok, error)", certificate_fetches.clone());
    NodeMetrics { registry, cni_requests, cni_duration, xds_responses, xds_apply, certificate_fetches }
});

/// One CNI request answered.
pub fn cni(command: &'static str, ok: bool, took: Duration) {
    let m = &*METRICS;
    m.cni_requests.get_or_create(&vec![("command", command.to_string()), ("result", result(ok).to_string())]).inc();
    m.cni_duration.get_or_create(&vec![("command", command.to_string())]).observe(took.as_secs_f64());
}

/// One xDS response of `kind` (`CDS`, ...) applied: accepted or not, and how long it took.
pub fn xds(kind: &'static str, accepted: bool, took: Duration) {
    let m = &*METRICS;
    m.xds_responses.get_or_create(&vec![("type", kind.to_string()), ("result", if accepted { "ack" } else { "nack" }.to_string())]).inc();
    m.xds_apply.get_or_create(&vec![("type", kind.to_string())]).observe(took.as_secs_f64());
}

/// One workload certificate request answered (or failed).
pub fn certificate_fetch(ok: bool) {
    METRICS.certificate_fetches.get_or_create(&vec![("result", result(ok).to_string())]).inc();
}

/// A label value as the text format needs it: `prometheus-client` 0.23 writes values verbatim, so a quote,
/// backslash or newline in one (a SPIFFE id may hold any) is escaped here.
fn escaped(value: &str) -> String {
    crate::proxy::istio_metrics::label_value(value)
}

fn result(ok: bool) -> &'static str {
    if ok { "ok" } else { "error" }
}

/// What the admin endpoint knows at scrape time.
pub struct Scrape {
    pub pods_captured: i64,
    /// `(identity, not_after_unix)` of each workload certificate held.
    pub certificates: Vec<(String, i64)>,
    /// The process-wide access log lines dropped because their writer fell behind.
    pub access_log_dropped: u64,
    /// The eBPF capture's maps: `(name, entries in use, capacity)`; empty in other modes.
    pub ebpf_maps: Vec<(&'static str, u64, u64)>,
}

/// The event metrics and the scrape-time ones, as Prometheus text.
pub fn render(scrape: &Scrape) -> String {
    let mut now = Registry::default();
    let pods = Gauge::<i64>::default();
    pods.set(scrape.pods_captured);
    now.register("weft_pods_captured", "Pods this agent captures", pods);
    let expiry = Family::<Labels, Gauge>::default();
    for (identity, not_after) in &scrape.certificates {
        expiry.get_or_create(&vec![("identity", escaped(identity))]).set(*not_after);
    }
    now.register("weft_certificate_expiry_timestamp_seconds", "When each workload certificate held expires (Unix time)", expiry);
    let dropped = Counter::<u64>::default();
    dropped.inc_by(scrape.access_log_dropped);
    now.register("weft_access_log_dropped_lines", "Access log lines dropped because their destination fell behind", dropped);
    let (entries, capacity) = (Family::<Labels, Gauge>::default(), Family::<Labels, Gauge>::default());
    for (map, used, max) in &scrape.ebpf_maps {
        let labels = vec![("map", map.to_string())];
        entries.get_or_create(&labels).set(*used as i64);
        capacity.get_or_create(&labels).set(*max as i64);
    }
    now.register("weft_ebpf_map_entries", "Entries in use in each of the eBPF capture's maps", entries);
    now.register("weft_ebpf_map_capacity", "Capacity (max_entries) of each of the eBPF capture's maps", capacity);
    let mut out = String::new();
    for registry in [&METRICS.registry, &now] {
        // Without the OpenMetrics `# EOF`: the endpoint goes on with the pods' and Istio's metrics.
        if let Err(e) = prometheus_client::encoding::text::encode_registry(&mut out, registry) {
            tracing::warn!("node metrics: {e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_scrape_time_values_are_rendered_with_escaped_labels() {
        // The registry is the process's: other tests record too, so series are checked, not counts.
        cni("ADD", true, Duration::from_millis(3));
        cni("ADD", false, Duration::from_millis(1));
        xds("LDS", false, Duration::from_micros(300));
        let text = render(&Scrape { pods_captured: 2, certificates: vec![("spiffe://td/ns/a\"b/sa/x".into(), 1_800_000_000)], access_log_dropped: 0, ebpf_maps: vec![("WEFT_POLICIES", 3, 16384)] });
        for expected in [
            "weft_cni_requests_total{command=\"ADD\",result=\"ok\"}",
            "weft_cni_requests_total{command=\"ADD\",result=\"error\"}",
            "weft_cni_request_duration_seconds_bucket{le=\"0.0032\",command=\"ADD\"}",
            "weft_xds_responses_total{type=\"LDS\",result=\"nack\"}",
            "weft_pods_captured 2",
            "weft_ebpf_map_entries{map=\"WEFT_POLICIES\"} 3",
            "weft_ebpf_map_capacity{map=\"WEFT_POLICIES\"} 16384",
            "weft_certificate_expiry_timestamp_seconds{identity=\"spiffe://td/ns/a\\\"b/sa/x\"} 1800000000",
        ] {
            assert!(text.contains(expected), "{expected} in\n{text}");
        }
        assert!(!text.contains("# EOF"), "{text}");
    }
}
