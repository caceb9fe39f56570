//! Which pods are captured: the decision Istio's sidecar injector makes (its webhook selectors for the agent's
//! revision, then its injection policy), Istio ambient's `istio.io/dataplane-mode`, and weft's own
//! `weft.dev/capture`. Pure: the watcher feeds it what the API says.

use std::collections::BTreeMap;

/// weft's own switch, as a pod label or annotation: `enabled` or `disabled`. It wins over Istio's labels, so
/// a pod can move between a sidecar and weft by itself.
pub const WEFT_CAPTURE: &str = "weft.dev/capture";
pub const ISTIO_INJECTION: &str = "istio-injection";
pub const ISTIO_REV: &str = "istio.io/rev";
pub const SIDECAR_INJECT: &str = "sidecar.istio.io/inject";
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Set by Istio's injector on pods that got a sidecar.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Namespaces Istio's injector never injects.
const IGNORED_NAMESPACES: [&str; 2] = ["kube-system", "kube-public"];

/// What the policy reads of a pod.
#[derive(Debug, Clone, Default)]
pub struct PodFacts<'a> {
    pub namespace: &'a str,
    pub labels: Option<&'a BTreeMap<String, String>>,
    pub annotations: Option<&'a BTreeMap<String, String>>,
    pub host_network: bool,
    /// A container (or native sidecar) named `istio-proxy`.
    pub has_istio_proxy: bool,
}

/// The agent's side of the decision.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Pods of the agent's own namespace are never captured.
    pub agent_namespace: String,
    /// The Istio revision the agent serves (`default` also serves unrevisioned labels).
    pub revision: String,
}

/// The decision, why, and what in the pod's or namespace's metadata could not be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub capture: bool,
    pub reason: String,
    /// Each names the object, the key and the value, e.g. `pod label weft.dev/capture="yes": ...`.
    pub warnings: Vec<String>,
}

impl Verdict {
    fn new(capture: bool, reason: impl Into<String>, warnings: Vec<String>) -> Verdict {
        Verdict { capture, reason: reason.into(), warnings }
    }
}

fn get<'a>(map: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    map.and_then(|m| m.get(key)).map(String::as_str)
}

impl Policy {
    pub fn decide(&self, pod: &PodFacts, namespace_labels: Option<&BTreeMap<String, String>>) -> Verdict {
        let mut warnings = Vec::new();
        if pod.host_network {
            return Verdict::new(false, "hostNetwork pod", warnings);
        }
        if pod.has_istio_proxy || get(pod.annotations, SIDECAR_STATUS).is_some() {
            return Verdict::new(false, "already runs an Istio sidecar", warnings);
        }
        if pod.namespace == self.agent_namespace {
            return Verdict::new(false, "the agent's own namespace", warnings);
        }
        if let Some(verdict) = weft_switch(pod, &mut warnings) {
            return Verdict { warnings, ..verdict };
        }
        if IGNORED_NAMESPACES.contains(&pod.namespace) {
            return Verdict::new(false, format!("Istio never injects {}", pod.namespace), warnings);
        }
        if let Some(verdict) = self.ambient(pod, namespace_labels, &mut warnings) {
            return Verdict { warnings, ..verdict };
        }
        let verdict = self.injection(pod, namespace_labels, &mut warnings);
        Verdict { warnings, ..verdict }
    }

    /// Istio ambient's opt-in (namespace or pod label `ambient`) and opt-out (pod label `none`).
    fn ambient(&self, pod: &PodFacts, ns: Option<&BTreeMap<String, String>>, warnings: &mut Vec<String>) -> Option<Verdict> {
        let pod_mode = get(pod.labels, DATAPLANE_MODE);
        match pod_mode {
            Some("none") => return Some(Verdict::new(false, format!("pod label {DATAPLANE_MODE}=none"), vec![])),
            Some("ambient") => return Some(Verdict::new(true, format!("pod label {DATAPLANE_MODE}=ambient"), vec![])),
            Some(other) => warnings.push(format!("pod label {DATAPLANE_MODE}={other:?}: not ambient or none; ignored")),
            None => {}
        }
        match get(ns, DATAPLANE_MODE) {
            Some("ambient") => Some(Verdict::new(true, format!("namespace label {DATAPLANE_MODE}=ambient"), vec![])),
            Some("none") | None => None,
            Some(other) => {
                warnings.push(format!("namespace label {DATAPLANE_MODE}={other:?}: not ambient or none; ignored"));
                None
            }
        }
    }

    /// The sidecar injector: its webhook's namespace and object selectors, then its policy on the pod's
    /// `sidecar.istio.io/inject` (the label wins over the annotation; `y`, `yes`, `true`, `on` inject, any other
    /// value does not).
    fn injection(&self, pod: &PodFacts, ns: Option<&BTreeMap<String, String>>, warnings: &mut Vec<String>) -> Verdict {
        let inject_label = get(pod.labels, SIDECAR_INJECT);
        let inject = inject_label.or(get(pod.annotations, SIDECAR_INJECT));
        let opted_out = match inject.map(str::to_ascii_lowercase).as_deref() {
            None | Some("") | Some("y" | "yes" | "true" | "on") => false,
            Some("n" | "no" | "false" | "off") => true,
            Some(other) => {
                warnings.push(format!("pod {SIDECAR_INJECT}={other:?}: not a boolean; Istio treats it as false"));
                true
            }
        };
        let selected = match (get(ns, ISTIO_INJECTION), get(ns, ISTIO_REV)) {
            (Some("enabled"), _) if self.revision == "default" => Some(format!("namespace label {ISTIO_INJECTION}=enabled")),
            (Some(_), _) => None,
            (None, Some(rev)) if rev == self.revision => Some(format!("namespace label {ISTIO_REV}={rev}")),
            (None, Some(_)) => None,
            // Neither namespace label: the pod selects itself, by revision or by the inject label.
            (None, None) => match get(pod.labels, ISTIO_REV) {
                Some(rev) if rev == self.revision => Some(format!("pod label {ISTIO_REV}={rev}")),
                Some(_) => None,
                None if self.revision == "default" && inject_label.is_some_and(|v| v == "true") => {
                    Some(format!("pod label {SIDECAR_INJECT}=true"))
                }
                None => None,
            },
        };
        match (selected, opted_out) {
            (Some(_), true) => Verdict::new(false, format!("pod {SIDECAR_INJECT}={}", inject.unwrap_or_default()), vec![]),
            (Some(by), false) => Verdict::new(true, by, vec![]),
            (None, _) => Verdict::new(false, "not selected for the mesh (no injection or ambient label)", vec![]),
        }
    }
}

/// `weft.dev/capture` on the pod (label, then annotation); an unknown value is reported and ignored.
fn weft_switch(pod: &PodFacts, warnings: &mut Vec<String>) -> Option<Verdict> {
    for (what, map) in [("label", pod.labels), ("annotation", pod.annotations)] {
        match get(map, WEFT_CAPTURE) {
            Some("enabled") => return Some(Verdict::new(true, format!("pod {what} {WEFT_CAPTURE}=enabled"), vec![])),
            Some("disabled") => return Some(Verdict::new(false, format!("pod {what} {WEFT_CAPTURE}=disabled"), vec![])),
            Some(other) => warnings.push(format!("pod {what} {WEFT_CAPTURE}={other:?}: use enabled or disabled; ignored")),
            None => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn policy(revision: &str) -> Policy {
        Policy { agent_namespace: "weft-system".into(), revision: revision.into() }
    }

    /// (namespace labels, pod labels, pod annotations) → captured?
    fn decide(rev: &str, ns: &[(&str, &str)], labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Verdict {
        let (ns, labels, annotations) = (map(ns), map(labels), map(annotations));
        let pod = PodFacts { namespace: "shop", labels: Some(&labels), annotations: Some(&annotations), ..Default::default() };
        policy(rev).decide(&pod, Some(&ns))
    }

    #[test]
    fn as_istio_injects() {
        let cases: &[(&str, &[(&str, &str)], &[(&str, &str)], &[(&str, &str)], bool)] = &[
            ("default", &[("istio-injection", "enabled")], &[], &[], true),
            ("default", &[("istio-injection", "enabled")], &[("sidecar.istio.io/inject", "false")], &[], false),
            ("default", &[("istio-injection", "enabled")], &[], &[("sidecar.istio.io/inject", "false")], false),
            // The label wins over the annotation.
            ("default", &[("istio-injection", "enabled")], &[("sidecar.istio.io/inject", "true")], &[("sidecar.istio.io/inject", "false")], true),
            ("default", &[("istio-injection", "disabled")], &[("sidecar.istio.io/inject", "true")], &[], false),
            ("default", &[], &[("sidecar.istio.io/inject", "true")], &[], true),
            // The annotation alone does not select a pod (the webhook's object selector reads labels).
            ("default", &[], &[], &[("sidecar.istio.io/inject", "true")], false),
            ("default", &[], &[], &[], false),
            ("default", &[("istio.io/rev", "default")], &[], &[], true),
            ("default", &[("istio.io/rev", "canary")], &[], &[], false),
            ("canary", &[("istio.io/rev", "canary")], &[], &[], true),
            ("canary", &[("istio-injection", "enabled")], &[], &[], false),
            // istio-injection takes precedence over istio.io/rev.
            ("canary", &[("istio-injection", "enabled"), ("istio.io/rev", "canary")], &[], &[], false),
            ("canary", &[], &[("istio.io/rev", "canary")], &[], true),
            ("default", &[("istio.io/dataplane-mode", "ambient")], &[], &[], true),
            ("default", &[("istio.io/dataplane-mode", "ambient")], &[("istio.io/dataplane-mode", "none")], &[], false),
            ("default", &[], &[("istio.io/dataplane-mode", "ambient")], &[], true),
            ("default", &[], &[("weft.dev/capture", "enabled")], &[], true),
            ("default", &[("istio-injection", "enabled")], &[("weft.dev/capture", "disabled")], &[], false),
            ("default", &[("istio-injection", "enabled")], &[], &[("weft.dev/capture", "disabled")], false),
        ];
        for (rev, ns, labels, annotations, want) in cases {
            let verdict = decide(rev, ns, labels, annotations);
            assert_eq!(verdict.capture, *want, "rev {rev} ns {ns:?} labels {labels:?} annotations {annotations:?}: {verdict:?}");
            assert!(verdict.warnings.is_empty(), "{verdict:?}");
        }
    }

    #[test]
    fn never_captured() {
        let ns = map(&[("istio-injection", "enabled")]);
        let labels = map(&[("weft.dev/capture", "enabled")]);
        let base = PodFacts { namespace: "shop", labels: Some(&labels), ..Default::default() };
        let p = policy("default");
        assert!(!p.decide(&PodFacts { host_network: true, ..base.clone() }, Some(&ns)).capture);
        assert!(!p.decide(&PodFacts { has_istio_proxy: true, ..base.clone() }, Some(&ns)).capture);
        assert!(!p.decide(&PodFacts { namespace: "weft-system", ..base.clone() }, Some(&ns)).capture);
        let status = map(&[("sidecar.istio.io/status", "{}")]);
        assert!(!p.decide(&PodFacts { annotations: Some(&status), ..base.clone() }, Some(&ns)).capture);
        // kube-system: Istio never injects; weft's own switch still can.
        let plain = PodFacts { namespace: "kube-system", ..Default::default() };
        let verdict = p.decide(&plain, Some(&ns));
        assert!(!verdict.capture && verdict.reason.contains("kube-system"), "{verdict:?}");
        assert!(p.decide(&PodFacts { namespace: "kube-system", ..base }, Some(&ns)).capture);
    }

    #[test]
    fn unknown_values_are_named_and_decided_as_istio_does() {
        let verdict = decide("default", &[("istio-injection", "enabled")], &[("sidecar.istio.io/inject", "maybe")], &[]);
        assert!(!verdict.capture);
        assert_eq!(verdict.warnings, ["pod sidecar.istio.io/inject=\"maybe\": not a boolean; Istio treats it as false"]);
        let verdict = decide("default", &[("istio-injection", "enabled")], &[("weft.dev/capture", "yes")], &[]);
        assert!(verdict.capture, "an unknown weft.dev/capture value falls back to Istio's decision");
        assert_eq!(verdict.warnings, ["pod label weft.dev/capture=\"yes\": use enabled or disabled; ignored"]);
        let verdict = decide("default", &[("istio.io/dataplane-mode", "sidecar")], &[], &[]);
        assert!(!verdict.capture);
        assert!(verdict.warnings[0].contains("namespace label istio.io/dataplane-mode=\"sidecar\""), "{verdict:?}");
    }
}
