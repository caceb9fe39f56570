//! One pod's Istio standard metrics (`istio_requests_total`, `istio_tcp_sent_bytes_total`, ...), as the
//! `istio.stats` filters record them and istio-proxy's Prometheus endpoint shows them: counters and
//! histograms (Envoy's default buckets) per label set. Kept across configuration updates, like Envoy's
//! stats. A leaf: the filters record, the pod's 15020 and the agent's admin render.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// The standard metrics, in the order istio-proxy defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    RequestsTotal,
    RequestDurationMilliseconds,
    RequestBytes,
    ResponseBytes,
    TcpConnectionsOpenedTotal,
    TcpConnectionsClosedTotal,
    TcpSentBytesTotal,
    TcpReceivedBytesTotal,
}

impl Metric {
    pub const ALL: [Metric; 8] = [
        Metric::RequestsTotal,
        Metric::RequestDurationMilliseconds,
        Metric::RequestBytes,
        Metric::ResponseBytes,
        Metric::TcpConnectionsOpenedTotal,
        Metric::TcpConnectionsClosedTotal,
        Metric::TcpSentBytesTotal,
        Metric::TcpReceivedBytesTotal,
    ];

    /// The name in `stats.PluginConfig` (`metrics[].name`), without the `istio_` prefix.
    pub fn short_name(self) -> &'static str {
        match self {
            Metric::RequestsTotal => "requests_total",
            Metric::RequestDurationMilliseconds => "request_duration_milliseconds",
            Metric::RequestBytes => "request_bytes",
            Metric::ResponseBytes => "response_bytes",
            Metric::TcpConnectionsOpenedTotal => "tcp_connections_opened_total",
            Metric::TcpConnectionsClosedTotal => "tcp_connections_closed_total",
            Metric::TcpSentBytesTotal => "tcp_sent_bytes_total",
            Metric::TcpReceivedBytesTotal => "tcp_received_bytes_total",
        }
    }

    pub fn of_short_name(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.short_name() == name)
    }

    fn is_histogram(self) -> bool {
        matches!(self, Metric::RequestDurationMilliseconds | Metric::RequestBytes | Metric::ResponseBytes)
    }
}

/// A series' labels, in the order they were recorded.
pub type Labels = Vec<(&'static str, String)>;

/// Envoy's default histogram buckets (istio-proxy sets no others for its metrics).
const BUCKETS: [f64; 19] = [0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0];

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Counter(u64),
    Histogram { buckets: [u64; BUCKETS.len()], count: u64, sum: u64 },
}

/// The metrics of one pod (or of the standalone proxy): by label set (a stream's metrics share one, so a
/// stream looks it up without copying it once it exists), then by metric.
#[derive(Debug, Default)]
pub struct IstioMetrics {
    series: Mutex<HashMap<Labels, Vec<(Metric, Value)>>>,
}

impl IstioMetrics {
    /// The value of `metric` of `labels`, made with `new` the first time.
    fn with(&self, metric: Metric, labels: &Labels, new: Value, f: impl FnOnce(&mut Value)) {
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if !series.contains_key(labels) {
            series.insert(labels.clone(), Vec::new());
        }
        let Some(metrics) = series.get_mut(labels) else { return };
        let at = match metrics.iter().position(|(m, _)| *m == metric) {
            Some(at) => at,
            None => {
                metrics.push((metric, new));
                metrics.len() - 1
            }
        };
        f(&mut metrics[at].1);
    }

    /// Adds `amount` to counter `metric` of `labels`.
    pub fn count(&self, metric: Metric, labels: &Labels, amount: u64) {
        self.with(metric, labels, Value::Counter(0), |v| {
            if let Value::Counter(c) = v {
                *c += amount;
            }
        });
    }

    /// Records `value` in histogram `metric` of `labels`.
    pub fn observe(&self, metric: Metric, labels: &Labels, value: u64) {
        let empty = Value::Histogram { buckets: [0; BUCKETS.len()], count: 0, sum: 0 };
        self.with(metric, labels, empty, |v| {
            let Value::Histogram { buckets, count, sum } = v else { return };
            for (bucket, bound) in buckets.iter_mut().zip(BUCKETS) {
                if value as f64 <= bound {
                    *bucket += 1;
                }
            }
            *count += 1;
            *sum += value;
        });
    }

    /// The value of counter `metric` with exactly `labels` (0 when never recorded).
    pub fn counter(&self, metric: Metric, labels: &Labels) -> u64 {
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let found = series.get(labels).and_then(|metrics| metrics.iter().find(|(m, _)| *m == metric));
        match found {
            Some((_, Value::Counter(c))) => *c,
            _ => 0,
        }
    }

    fn copy(&self) -> Vec<((Metric, Labels), Value)> {
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        series.iter().flat_map(|(labels, metrics)| metrics.iter().map(|(m, v)| ((*m, labels.clone()), v.clone()))).collect()
    }
}

/// One series of one source, its source's labels first.
type Sample<'a> = (Metric, Vec<(&'a str, String)>, Value);

/// Prometheus text format (0.0.4) of several pods' metrics, each series with its source's labels first (the
/// agent's `namespace` and `pod`; none on a pod's own 15020): one family per metric, its `# TYPE` once.
pub fn render(sources: &[(Vec<(&str, &str)>, &IstioMetrics)]) -> String {
    let mut all: Vec<Sample<'_>> = Vec::new();
    for (extra, metrics) in sources {
        for ((metric, labels), value) in metrics.copy() {
            let pairs = extra.iter().map(|(k, v)| (*k, v.to_string())).chain(labels).collect();
            all.push((metric, pairs, value));
        }
    }
    all.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut out = String::new();
    let mut last = None;
    for (metric, pairs, value) in all {
        let name = format!("istio_{}", metric.short_name());
        if last != Some(metric) {
            let kind = if metric.is_histogram() { "histogram" } else { "counter" };
            let _ = writeln!(out, "# TYPE {name} {kind}");
            last = Some(metric);
        }
        let set = label_set(&pairs);
        match value {
            Value::Counter(c) => {
                let _ = writeln!(out, "{name}{{{set}}} {c}");
            }
            Value::Histogram { buckets, count, sum } => {
                let comma = if set.is_empty() { "" } else { "," };
                for (n, bound) in buckets.iter().zip(BUCKETS) {
                    let _ = writeln!(out, "{name}_bucket{{{set}{comma}le=\"{bound}\"}} {n}");
                }
                let _ = writeln!(out, "{name}_bucket{{{set}{comma}le=\"+Inf\"}} {count}");
                let _ = writeln!(out, "{name}_sum{{{set}}} {sum}\n{name}_count{{{set}}} {count}");
            }
        }
    }
    out
}

fn label_set(pairs: &[(&str, String)]) -> String {
    let quoted: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", label_value(v))).collect();
    quoted.join(",")
}

/// A Prometheus label value: backslash, double quote and newline escaped.
pub fn label_value(text: &str) -> String {
    text.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_render_as_istio_proxy_shows_them() {
        let m = IstioMetrics::default();
        let labels: Labels = vec![("reporter", "destination".into()), ("response_code", "200".into())];
        m.count(Metric::RequestsTotal, &labels, 1);
        m.count(Metric::RequestsTotal, &labels, 2);
        m.observe(Metric::RequestDurationMilliseconds, &labels, 7);
        m.observe(Metric::RequestDurationMilliseconds, &vec![("reporter", "a\"b\\c\nd".into())], 0);
        assert_eq!(m.counter(Metric::RequestsTotal, &labels), 3);
        let out = render(&[(vec![("pod", "web-1")], &m)]);
        assert!(out.contains("# TYPE istio_requests_total counter\nistio_requests_total{pod=\"web-1\",reporter=\"destination\",response_code=\"200\"} 3\n"), "{out}");
        assert!(out.contains("# TYPE istio_request_duration_milliseconds histogram\n"), "{out}");
        assert!(out.contains("istio_request_duration_milliseconds_bucket{pod=\"web-1\",reporter=\"destination\",response_code=\"200\",le=\"5\"} 0\n"), "{out}");
        assert!(out.contains("istio_request_duration_milliseconds_bucket{pod=\"web-1\",reporter=\"destination\",response_code=\"200\",le=\"10\"} 1\n"), "{out}");
        assert!(out.contains("istio_request_duration_milliseconds_sum{pod=\"web-1\",reporter=\"destination\",response_code=\"200\"} 7\n"), "{out}");
        assert!(out.contains("reporter=\"a\\\"b\\\\c\\nd\",le=\"0.5\"} 1"), "escaped: {out}");
        assert_eq!(out.matches("# TYPE").count(), 2, "one TYPE line per metric");
    }
}
