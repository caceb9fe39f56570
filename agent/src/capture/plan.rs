//! A pod's capture plan: which of its traffic the rules send to the proxy, from Istio's per-pod traffic
//! annotations, read with istio-cni's semantics (`cni/pkg/plugin/sidecar_redirect.go`) and laid out in rules
//! in istio-iptables' order (`tools/istio-iptables/pkg/capture`).
//!
//! Parsing is all or nothing: a bad value is an [`AnnotationError`] naming the annotation, never a plan with
//! that field silently left at its default. What to do then is the caller's decision: the pod watcher logs it,
//! records an event on the pod, and keeps the pod's last good plan (or, for a new pod, refuses to guess).

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
/// Deprecated by Istio in favour of [`REROUTE_VIRTUAL_INTERFACES`], which wins when both are set.
pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";

/// Everything, or exactly the listed items (an empty list selects nothing).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection<T> {
    All,
    Only(Vec<T>),
}

impl<T> Selection<T> {
    pub fn is_all(&self) -> bool {
        matches!(self, Selection::All)
    }

    pub fn is_nothing(&self) -> bool {
        matches!(self, Selection::Only(items) if items.is_empty())
    }
}

/// A network interface name as Linux accepts it, restricted to characters that need no quoting in an
/// iptables or nftables batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InterfaceName(String);

impl InterfaceName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for InterfaceName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if name.is_empty() || name.len() > 15 || name == "." || name == ".." || !name.chars().all(allowed) {
            return Err(format!(
                "{name:?} is not an interface name (1 to 15 characters of letters, digits, '-', '_' and '.')"
            ));
        }
        Ok(InterfaceName(name))
    }
}

impl From<InterfaceName> for String {
    fn from(n: InterfaceName) -> String {
        n.0
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which of a pod's traffic is redirected to the proxy. `Default` is weft's behaviour without annotations:
/// all outbound and inbound TCP, minus the fixed exclusions every backend applies (the proxy's own traffic,
/// loopback, Istio's ports).
///
/// Lists are sorted and free of duplicates (address ranges merged), so two plans that capture the same
/// traffic compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct PodCapture {
    /// `includeOutboundIPRanges`: destinations whose outbound TCP is redirected.
    pub outbound_ranges: Selection<IpNet>,
    /// `excludeOutboundIPRanges`: destinations never redirected (before every inclusion).
    pub outbound_excluded_ranges: Vec<IpNet>,
    /// `includeOutboundPorts`: destination ports redirected whatever the address (after the exclusions).
    pub outbound_ports: Vec<u16>,
    /// `excludeOutboundPorts`: destination ports never redirected.
    pub outbound_excluded_ports: Vec<u16>,
    /// `includeInboundPorts`: local ports whose inbound TCP is redirected.
    pub inbound_ports: Selection<u16>,
    /// `excludeInboundPorts`: local ports not redirected; applies when `inbound_ports` is `All` (as in Istio).
    pub inbound_excluded_ports: Vec<u16>,
    /// `istio.io/reroute-virtual-interfaces` (or `kubevirtInterfaces`): traffic arriving on these interfaces
    /// (a VM's) is outbound traffic of the pod.
    pub virtual_interfaces: Vec<InterfaceName>,
    /// `excludeInterfaces`: traffic in or out of these interfaces is never redirected.
    pub excluded_interfaces: Vec<InterfaceName>,
    /// The pod's kubelet probe ports (from its spec, not from annotations): host-originated connections to
    /// them are exempt from inbound capture when the agent's probe exemption is on.
    pub probe_ports: Vec<u16>,
}

impl Default for PodCapture {
    fn default() -> Self {
        PodCapture {
            outbound_ranges: Selection::All,
            outbound_excluded_ranges: Vec::new(),
            outbound_ports: Vec::new(),
            outbound_excluded_ports: Vec::new(),
            inbound_ports: Selection::All,
            inbound_excluded_ports: Vec::new(),
            virtual_interfaces: Vec::new(),
            excluded_interfaces: Vec::new(),
            probe_ports: Vec::new(),
        }
    }
}

/// An annotation whose value cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationError {
    pub annotation: &'static str,
    pub value: String,
    pub problem: String,
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "annotation {}={:?}: {}", self.annotation, self.value, self.problem)
    }
}

impl std::error::Error for AnnotationError {}

/// A setting that is valid for Istio but that weft does not apply, with the reason (for a log line or event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub annotation: &'static str,
    pub reason: String,
}

/// A parsed plan and the settings it leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub capture: PodCapture,
    pub ignored: Vec<Ignored>,
}

impl PodCapture {
    /// A plan that redirects nothing (the pod stays registered, its rules only hold the fixed exclusions).
    pub fn nothing() -> PodCapture {
        PodCapture { outbound_ranges: Selection::Only(Vec::new()), inbound_ports: Selection::Only(Vec::new()), ..Default::default() }
    }

    /// The plan of a pod's annotations; see [`PodCapture::parse`] for what it leaves out.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<PodCapture, AnnotationError> {
        Self::parse(annotations).map(|p| p.capture)
    }

    /// The plan of a pod's annotations, with istio-cni's defaults for those that are absent, and the
    /// settings weft leaves out (each with its reason).
    pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Parsed, AnnotationError> {
        let get = |name: &'static str| annotations.get(name).map(|v| (name, v.as_str()));
        let mut capture = PodCapture::default();
        let mut ignored = Vec::new();
        if let Some((name, v)) = get(INCLUDE_OUTBOUND_IP_RANGES) {
            capture.outbound_ranges = match v.trim() {
                "*" => Selection::All,
                _ => Selection::Only(ranges(name, v)?),
            };
        }
        if let Some((name, v)) = get(EXCLUDE_OUTBOUND_IP_RANGES) {
            capture.outbound_excluded_ranges = ranges(name, v)?;
        }
        if let Some((name, v)) = get(INCLUDE_OUTBOUND_PORTS) {
            capture.outbound_ports = ports(name, v)?;
        }
        if let Some((name, v)) = get(EXCLUDE_OUTBOUND_PORTS) {
            capture.outbound_excluded_ports = ports(name, v)?;
        }
        if let Some((name, v)) = get(INCLUDE_INBOUND_PORTS) {
            capture.inbound_ports = match v.trim() {
                "*" => Selection::All,
                _ => Selection::Only(ports(name, v)?),
            };
        }
        if let Some((name, v)) = get(EXCLUDE_INBOUND_PORTS) {
            capture.inbound_excluded_ports = ports(name, v)?;
        }
        if let Some((name, v)) = get(REROUTE_VIRTUAL_INTERFACES).or_else(|| get(KUBEVIRT_INTERFACES)) {
            capture.virtual_interfaces = interfaces(name, v)?;
        }
        if let Some((name, v)) = get(EXCLUDE_INTERFACES) {
            capture.excluded_interfaces = interfaces(name, v)?;
        }
        // The annotation overrides proxy.istio.io/config, as in Istio's injector.
        let from_proxy_config = match get(PROXY_CONFIG) {
            Some((name, v)) => proxy_config(name, v, &mut ignored)?,
            None => None,
        };
        match get(INTERCEPTION_MODE) {
            Some((name, v)) => interception_mode(name, v, &mut ignored)?,
            None => {
                if let Some(mode) = from_proxy_config {
                    interception_mode(PROXY_CONFIG, &mode, &mut ignored)?;
                }
            }
        }
        Ok(Parsed { capture, ignored })
    }

    /// Whether the plan names loopback among the included outbound ranges: then the app's own traffic over
    /// `lo` is captured too (istio-iptables leaves out its "app over lo passes" rule).
    pub fn includes_loopback(&self) -> bool {
        matches!(&self.outbound_ranges, Selection::Only(r) if r.iter().any(|n| n.addr().is_loopback()))
    }

    /// The plan with the pod's probe ports (kubelet's liveness, readiness and startup probes).
    pub fn with_probe_ports(mut self, mut ports: Vec<u16>) -> PodCapture {
        ports.sort_unstable();
        ports.dedup();
        self.probe_ports = ports;
        self
    }
}

fn error(annotation: &'static str, value: &str, problem: impl Into<String>) -> AnnotationError {
    AnnotationError { annotation, value: value.to_string(), problem: problem.into() }
}

/// Comma-separated items, blanks around them ignored; an empty value is an empty list. An empty item
/// (`"80,,90"`, `"80,"`) is an error, as in istio-cni.
fn items<'a>(annotation: &'static str, value: &'a str) -> Result<Vec<&'a str>, AnnotationError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(str::trim)
        .map(|item| if item.is_empty() { Err(error(annotation, value, "empty item in the comma-separated list")) } else { Ok(item) })
        .collect()
}

fn ports(annotation: &'static str, value: &str) -> Result<Vec<u16>, AnnotationError> {
    let mut out = items(annotation, value)?
        .into_iter()
        .map(|item| match item {
            "*" => Err(error(annotation, value, "`*` is only valid for includeInboundPorts and includeOutboundIPRanges")),
            _ => item.parse::<u16>().map_err(|_| error(annotation, value, format!("{item:?} is not a port number (0-65535)"))),
        })
        .collect::<Result<Vec<u16>, _>>()?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn ranges(annotation: &'static str, value: &str) -> Result<Vec<IpNet>, AnnotationError> {
    let parsed = items(annotation, value)?
        .into_iter()
        .map(|item| match item {
            "*" if annotation == INCLUDE_OUTBOUND_IP_RANGES => {
                Err(error(annotation, value, "`*` must be the whole value, not one item of a list"))
            }
            "*" => Err(error(annotation, value, "`*` is not valid here: list address ranges (CIDR), or leave the annotation out")),
            _ => item.parse::<IpNet>().map(|n| n.trunc()).map_err(|_| {
                error(annotation, value, format!("{item:?} is not an address range (CIDR such as 10.0.0.0/8 or fd00::/8)"))
            }),
        })
        .collect::<Result<Vec<IpNet>, _>>()?;
    // Sorted, overlaps and neighbours merged: nftables refuses overlapping elements in one set.
    Ok(IpNet::aggregate(&parsed))
}

fn interfaces(annotation: &'static str, value: &str) -> Result<Vec<InterfaceName>, AnnotationError> {
    let mut out = items(annotation, value)?
        .into_iter()
        .map(|item| InterfaceName::try_from(item.to_string()).map_err(|e| error(annotation, value, e)))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// istio-cni accepts REDIRECT and TPROXY. weft redirects: TPROXY's only difference for the app (it sees the
/// client's address rather than 127.0.0.6) is reported, and the pod is captured with REDIRECT.
fn interception_mode(annotation: &'static str, value: &str, ignored: &mut Vec<Ignored>) -> Result<(), AnnotationError> {
    match value.trim() {
        "REDIRECT" => Ok(()),
        "TPROXY" => {
            ignored.push(Ignored {
                annotation,
                reason: "interception mode TPROXY: weft captures with REDIRECT, so the app sees inbound connections from 127.0.0.6 rather than from the client's address".into(),
            });
            Ok(())
        }
        "NONE" => Err(error(
            annotation,
            value,
            "interception mode NONE (no capture) is not supported: to keep the pod out of the mesh, label it sidecar.istio.io/inject=false",
        )),
        _ => Err(error(annotation, value, "unknown interception mode: use REDIRECT or TPROXY")),
    }
}

/// Reads `proxy.istio.io/config` (a ProxyConfig in YAML or JSON) for what concerns capture: its
/// `interceptionMode` (returned), and `proxyMetadata` switches of capture features weft does not have.
/// Everything else configures the proxy, not capture, and is reported as not applied here.
fn proxy_config(annotation: &'static str, value: &str, ignored: &mut Vec<Ignored>) -> Result<Option<String>, AnnotationError> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(value).map_err(|e| error(annotation, value, format!("not a YAML ProxyConfig: {e}")))?;
    let map = match doc {
        serde_yaml::Value::Null => return Ok(None),
        serde_yaml::Value::Mapping(m) => m,
        _ => return Err(error(annotation, value, "not a YAML ProxyConfig: expected a mapping of fields")),
    };
    let mut mode = None;
    let mut others = Vec::new();
    for (key, field) in &map {
        let key = key.as_str().ok_or_else(|| error(annotation, value, "field names must be strings"))?;
        match key {
            "interceptionMode" => {
                let m = field.as_str().ok_or_else(|| error(annotation, value, "interceptionMode must be a string"))?;
                mode = Some(m.to_string());
            }
            "proxyMetadata" => proxy_metadata(annotation, value, field, ignored)?,
            other => others.push(other.to_string()),
        }
    }
    if !others.is_empty() {
        ignored.push(Ignored {
            annotation,
            reason: format!("{} configure the proxy, not capture: weft's proxy takes its settings from the agent and istiod", others.join(", ")),
        });
    }
    Ok(mode)
}

fn proxy_metadata(
    annotation: &'static str,
    value: &str,
    field: &serde_yaml::Value,
    ignored: &mut Vec<Ignored>,
) -> Result<(), AnnotationError> {
    let map = field.as_mapping().ok_or_else(|| error(annotation, value, "proxyMetadata must be a mapping of names to strings"))?;
    for (name, setting) in map {
        let truthy = setting.as_str().map(|s| matches!(s.trim(), "true" | "1" | "True" | "TRUE")).unwrap_or(setting.as_bool() == Some(true));
        let reason = match name.as_str() {
            Some("ISTIO_META_DNS_CAPTURE") if truthy => "proxyMetadata.ISTIO_META_DNS_CAPTURE: weft has no DNS proxy; the pod's DNS goes to its resolver uncaptured",
            Some("INVALID_DROP") if truthy => "proxyMetadata.INVALID_DROP: weft does not add the conntrack INVALID drop rule",
            _ => continue,
        };
        ignored.push(Ignored { annotation, reason: reason.into() });
    }
    Ok(())
}

/// The annotation combinations the backends' golden files cover.
#[cfg(test)]
pub(crate) mod tests_support {
    use std::net::Ipv4Addr;

    use super::*;

    pub(crate) fn golden_plans() -> Vec<(&'static str, PodCapture, Option<Ipv4Addr>)> {
        let plan = |pairs: &[(&str, &str)]| {
            PodCapture::from_annotations(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let probes = Some(crate::capture::DEFAULT_PROBE_SOURCE);
        vec![
            ("outbound-ranges", plan(&[(INCLUDE_OUTBOUND_IP_RANGES, "10.96.0.0/12,10.244.0.0/16,fd00:10:96::/112")]), None),
            ("outbound-nothing", plan(&[(INCLUDE_OUTBOUND_IP_RANGES, ""), (INCLUDE_OUTBOUND_PORTS, "443")]), None),
            ("outbound-loopback", plan(&[(INCLUDE_OUTBOUND_IP_RANGES, "127.0.0.1/32,10.0.0.0/8")]), None),
            ("outbound-excluded", plan(&[(EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.5/32,169.254.169.254/32,fd00::/8"), (EXCLUDE_OUTBOUND_PORTS, "3306,5432")]), None),
            ("inbound-ports", plan(&[(INCLUDE_INBOUND_PORTS, "8080,9090"), (EXCLUDE_INBOUND_PORTS, "22")]), None),
            ("inbound-excluded", plan(&[(EXCLUDE_INBOUND_PORTS, "22,8443")]), None),
            ("inbound-nothing", plan(&[(INCLUDE_INBOUND_PORTS, "")]), None),
            ("virtual-interfaces", plan(&[(KUBEVIRT_INTERFACES, "k6t-eth0,net1")]), None),
            ("virtual-interfaces-ranges", plan(&[(REROUTE_VIRTUAL_INTERFACES, "net1"), (INCLUDE_OUTBOUND_IP_RANGES, "10.96.0.0/12,fd00::/8")]), None),
            ("excluded-interfaces", plan(&[(EXCLUDE_INTERFACES, "eth1,net2")]), None),
            ("probes", PodCapture::default().with_probe_ports(vec![8080, 15021]), probes),
            ("probes-off", PodCapture::default().with_probe_ports(vec![8080]), None),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Parsed, AnnotationError> {
        PodCapture::parse(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn plan(pairs: &[(&str, &str)]) -> PodCapture {
        parse(pairs).unwrap().capture
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        parse(pairs).unwrap_err().to_string()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn no_annotations_is_the_default_plan() {
        assert_eq!(plan(&[("unrelated/annotation", "x")]), PodCapture::default());
        assert!(parse(&[]).unwrap().ignored.is_empty());
    }

    #[test]
    fn include_outbound_ranges_wildcard_empty_and_lists() {
        assert_eq!(plan(&[(INCLUDE_OUTBOUND_IP_RANGES, "*")]).outbound_ranges, Selection::All);
        assert_eq!(plan(&[(INCLUDE_OUTBOUND_IP_RANGES, " * ")]).outbound_ranges, Selection::All);
        assert!(plan(&[(INCLUDE_OUTBOUND_IP_RANGES, "")]).outbound_ranges.is_nothing());
        let p = plan(&[(INCLUDE_OUTBOUND_IP_RANGES, "10.96.0.0/12, fd00::/8,10.0.0.5/8")]);
        // Host bits cleared, sorted, v4 before v6.
        assert_eq!(p.outbound_ranges, Selection::Only(nets(&["10.0.0.0/8", "fd00::/8"])));
        assert!(!p.includes_loopback());
        assert!(plan(&[(INCLUDE_OUTBOUND_IP_RANGES, "127.0.0.1/32,10.0.0.0/8")]).includes_loopback());
    }

    #[test]
    fn overlapping_ranges_are_merged() {
        let p = plan(&[(EXCLUDE_OUTBOUND_IP_RANGES, "10.1.0.0/16,10.0.0.0/8,192.168.0.0/25,192.168.0.128/25,10.0.0.0/8")]);
        assert_eq!(p.outbound_excluded_ranges, nets(&["10.0.0.0/8", "192.168.0.0/24"]));
    }

    #[test]
    fn port_lists_are_sorted_and_deduplicated() {
        let p = plan(&[
            (INCLUDE_INBOUND_PORTS, "9090, 8080,9090"),
            (EXCLUDE_INBOUND_PORTS, "22"),
            (EXCLUDE_OUTBOUND_PORTS, "3306,5432"),
            (INCLUDE_OUTBOUND_PORTS, "443"),
        ]);
        assert_eq!(p.inbound_ports, Selection::Only(vec![8080, 9090]));
        assert_eq!(p.inbound_excluded_ports, vec![22]);
        assert_eq!(p.outbound_excluded_ports, vec![3306, 5432]);
        assert_eq!(p.outbound_ports, vec![443]);
        assert_eq!(plan(&[(INCLUDE_INBOUND_PORTS, "*")]).inbound_ports, Selection::All);
        assert!(plan(&[(INCLUDE_INBOUND_PORTS, "")]).inbound_ports.is_nothing());
        assert!(plan(&[(EXCLUDE_OUTBOUND_PORTS, "")]).outbound_excluded_ports.is_empty());
    }

    #[test]
    fn reroute_virtual_interfaces_wins_over_kubevirt_interfaces() {
        let p = plan(&[(KUBEVIRT_INTERFACES, "net1,net2"), (EXCLUDE_INTERFACES, "eth9")]);
        assert_eq!(p.virtual_interfaces.iter().map(|i| i.as_str()).collect::<Vec<_>>(), ["net1", "net2"]);
        assert_eq!(p.excluded_interfaces[0].as_str(), "eth9");
        let p = plan(&[(KUBEVIRT_INTERFACES, "net1"), (REROUTE_VIRTUAL_INTERFACES, "k6t-eth0")]);
        assert_eq!(p.virtual_interfaces.iter().map(|i| i.as_str()).collect::<Vec<_>>(), ["k6t-eth0"]);
    }

    #[test]
    fn invalid_values_name_the_annotation_and_the_item() {
        for (pairs, wanted) in [
            (vec![(INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8,nope")], ["includeOutboundIPRanges", "\"nope\" is not an address range"]),
            (vec![(INCLUDE_OUTBOUND_IP_RANGES, "*,10.0.0.0/8")], ["includeOutboundIPRanges", "whole value"]),
            (vec![(INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.1")], ["includeOutboundIPRanges", "\"10.0.0.1\""]),
            (vec![(EXCLUDE_OUTBOUND_IP_RANGES, "*")], ["excludeOutboundIPRanges", "`*` is not valid here"]),
            (vec![(EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33")], ["excludeOutboundIPRanges", "10.0.0.0/33"]),
            (vec![(INCLUDE_INBOUND_PORTS, "80,http")], ["includeInboundPorts", "\"http\" is not a port number"]),
            (vec![(INCLUDE_INBOUND_PORTS, "80,")], ["includeInboundPorts", "empty item"]),
            (vec![(EXCLUDE_INBOUND_PORTS, "65536")], ["excludeInboundPorts", "\"65536\""]),
            (vec![(EXCLUDE_INBOUND_PORTS, "*")], ["excludeInboundPorts", "`*`"]),
            (vec![(EXCLUDE_OUTBOUND_PORTS, "-1")], ["excludeOutboundPorts", "\"-1\""]),
            (vec![(INCLUDE_OUTBOUND_PORTS, "*")], ["includeOutboundPorts", "`*`"]),
            (vec![(KUBEVIRT_INTERFACES, "eth0;reboot")], ["kubevirtInterfaces", "not an interface name"]),
            (vec![(EXCLUDE_INTERFACES, "averyveryverylongname")], ["excludeInterfaces", "not an interface name"]),
            (vec![(INTERCEPTION_MODE, "NONE")], ["interceptionMode", "inject=false"]),
            (vec![(INTERCEPTION_MODE, "redirect")], ["interceptionMode", "REDIRECT or TPROXY"]),
            (vec![(PROXY_CONFIG, "interceptionMode: [")], ["proxy.istio.io/config", "not a YAML ProxyConfig"]),
            (vec![(PROXY_CONFIG, "- a list")], ["proxy.istio.io/config", "mapping"]),
            (vec![(PROXY_CONFIG, "interceptionMode: NONE")], ["proxy.istio.io/config", "NONE"]),
            (vec![(PROXY_CONFIG, "proxyMetadata: 3")], ["proxy.istio.io/config", "proxyMetadata"]),
        ] {
            let e = err(&pairs);
            for w in wanted {
                assert!(e.contains(w), "{pairs:?}: {e}");
            }
        }
    }

    #[test]
    fn proxy_config_reports_what_it_does_not_apply() {
        let parsed = parse(&[(
            PROXY_CONFIG,
            "concurrency: 2\ninterceptionMode: TPROXY\nproxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n  INVALID_DROP: \"false\"\n  OTHER: x\n",
        )])
        .unwrap();
        assert_eq!(parsed.capture, PodCapture::default());
        let reasons: Vec<&str> = parsed.ignored.iter().map(|i| i.reason.as_str()).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("ISTIO_META_DNS_CAPTURE")), "{reasons:?}");
        assert!(reasons.iter().any(|r| r.starts_with("concurrency configure the proxy")), "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("TPROXY")), "{reasons:?}");
        // The annotation overrides the ProxyConfig field.
        let parsed = parse(&[(PROXY_CONFIG, "interceptionMode: NONE"), (INTERCEPTION_MODE, "REDIRECT")]).unwrap();
        assert!(parsed.ignored.is_empty(), "{:?}", parsed.ignored);
        // JSON is YAML; an empty document is no setting.
        assert!(parse(&[(PROXY_CONFIG, r#"{"interceptionMode":"REDIRECT"}"#)]).unwrap().ignored.is_empty());
        assert!(parse(&[(PROXY_CONFIG, "")]).unwrap().ignored.is_empty());
    }

    #[test]
    fn plans_round_trip_through_json_and_old_records_get_the_default() {
        let p = plan(&[(INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8"), (KUBEVIRT_INTERFACES, "net1")]).with_probe_ports(vec![8081, 8080, 8081]);
        assert_eq!(p.probe_ports, vec![8080, 8081]);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<PodCapture>(&json).unwrap(), p);
        assert_eq!(serde_json::from_str::<PodCapture>("{}").unwrap(), PodCapture::default());
        assert!(serde_json::from_str::<PodCapture>(r#"{"virtual_interfaces":["a b"]}"#).is_err());
    }
}
