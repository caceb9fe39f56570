//! RBAC policy evaluation, shared by the network and HTTP RBAC filters: the facts of a connection (and of a
//! request, for HTTP) against the policies of `config::rbac`, as Envoy's `Filters::Common::RBAC` evaluates
//! them (`matchers.cc`, `engine_impl.cc`).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;

use hyper::http::request::Parts;

use super::super::route;
use super::super::tls_info::TlsInfo;
use crate::config::matcher::HeaderMatcher;
use crate::config::rbac::{Action, Counters, Engines, Policies, Rule};

/// What the rules are evaluated against.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The connection's local address: its original destination when it was redirected.
    pub local: SocketAddr,
    /// The connection's peer (`source_ip`, `direct_remote_ip`).
    pub peer: SocketAddr,
    /// The client as the connection manager derived it from `x-forwarded-for` (`remote_ip`); the peer at L4.
    pub remote: IpAddr,
    /// The SNI the client asked for: the TLS session's, or what the `tls_inspector` read.
    pub server_name: Option<&'a str>,
    /// The connection's TLS session; `None` for plaintext.
    pub tls: Option<&'a TlsInfo>,
    /// The request (after the connection manager's normalisation); `None` for a network filter.
    pub request: Option<&'a Parts>,
}

impl Rule {
    pub fn matches(&self, facts: &Facts<'_>) -> bool {
        match self {
            Rule::Any => true,
            Rule::And(rules) => rules.iter().all(|r| r.matches(facts)),
            Rule::Or(rules) => rules.iter().any(|r| r.matches(facts)),
            Rule::Not(rule) => !rule.matches(facts),
            Rule::Header(h) => header_matches(h, facts.request),
            // The path without its query (a request target never carries a fragment).
            Rule::UrlPath(m) => facts.request.is_some_and(|r| m.matches(r.uri.path())),
            Rule::DestinationIp(range) => range.contains(facts.local.ip()),
            Rule::DestinationPort(port) => u32::from(facts.local.port()) == *port,
            Rule::DestinationPortRange(start, end) => (*start..*end).contains(&u32::from(facts.local.port())),
            Rule::RequestedServerName(m) => m.matches(facts.server_name.unwrap_or_default()),
            Rule::Authenticated(name) => authenticated(name.as_ref(), facts.tls),
            Rule::SourceIp(range) | Rule::DirectRemoteIp(range) => range.contains(facts.peer.ip()),
            Rule::RemoteIp(range) => range.contains(facts.remote),
        }
    }
}

/// Envoy's RBAC header rule: each value of a repeated header on its own (see
/// [`HeaderMatcher::matches_individually`]). A network filter sees an empty header map, as Envoy's does.
fn header_matches(h: &HeaderMatcher, request: Option<&Parts>) -> bool {
    let Some(request) = request else { return h.matches(None) };
    if h.name.starts_with(':') {
        return h.matches(route::header_value(request, &h.name).as_deref());
    }
    let values: Vec<std::borrow::Cow<'_, str>> = request.headers.get_all(h.name.as_str()).iter().map(|v| String::from_utf8_lossy(v.as_bytes())).collect();
    let values: Vec<&str> = values.iter().map(|v| v.as_ref()).collect();
    h.matches_individually(&values)
}

/// Envoy's `AuthenticatedMatcher`: any TLS connection without a name; with one, any URI SAN, then any DNS
/// SAN, then the subject (empty without a peer certificate) must match it.
fn authenticated(name: Option<&crate::config::matcher::StringMatcher>, tls: Option<&TlsInfo>) -> bool {
    let Some(tls) = tls else { return false };
    let Some(name) = name else { return true };
    let Some(peer) = tls.peer.as_deref() else { return name.matches("") };
    peer.uri_sans.iter().any(|s| name.matches(s)) || peer.dns_sans.iter().any(|s| name.matches(s)) || name.matches(&peer.subject)
}

impl Policies {
    /// The name of the first policy (by name) that matches.
    pub fn matched(&self, facts: &Facts<'_>) -> Option<&str> {
        self.policies
            .iter()
            .find(|(_, p)| p.permissions.iter().any(|r| r.matches(facts)) && p.principals.iter().any(|r| r.matches(facts)))
            .map(|(name, _)| name.as_str())
    }

    /// What Envoy names as the policy that denied a request: the DENY policy that matched, or `none` when no
    /// ALLOW policy did.
    pub fn denied_by(&self, facts: &Facts<'_>) -> String {
        match self.action {
            Action::Deny => self.matched(facts).unwrap_or("none").to_string(),
            Action::Allow | Action::Log => "none".to_string(),
        }
    }

    pub fn allows(&self, facts: &Facts<'_>) -> bool {
        self.decide(facts).allowed
    }

    /// The decision, and the policy that matched (Envoy's effective policy id), from one pass over the
    /// policies.
    pub fn decide(&self, facts: &Facts<'_>) -> Verdict<'_> {
        let matched = self.matched(facts);
        let allowed = match self.action {
            Action::Allow => matched.is_some(),
            Action::Deny => matched.is_none(),
            Action::Log => true,
        };
        Verdict { allowed, matched }
    }
}

/// What one set of policies decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub allowed: bool,
    pub matched: Option<&'a str>,
}

/// Runs the shadow policies (counted, never enforced), then the enforced ones (counted); `true` when the
/// connection or request may go on (without enforced policies everything is allowed and nothing counted),
/// and what the shadow policies decided, for the HTTP filter's dynamic metadata.
pub fn evaluate<'e>(engines: &'e Engines, counters: &Counters, facts: &Facts<'_>) -> (bool, Option<Verdict<'e>>) {
    let shadow = engines.shadow.as_ref().map(|shadow| shadow.decide(facts));
    if let Some(verdict) = shadow {
        let counter = if verdict.allowed { &counters.shadow_allowed } else { &counters.shadow_denied };
        counter.fetch_add(1, Relaxed);
    }
    let Some(enforced) = &engines.enforced else { return (true, shadow) };
    let allowed = enforced.allows(facts);
    if allowed {
        counters.allowed.fetch_add(1, Relaxed);
    } else {
        tracing::debug!(peer = %facts.peer, remote = %facts.remote, local = %facts.local, "rbac: denied");
        counters.denied.fetch_add(1, Relaxed);
    }
    (allowed, shadow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::rbac;
    use crate::config::tree::Obj;
    use crate::proxy::tls_info::PeerCertificate;
    use serde_json::json;
    use std::sync::Arc;

    fn principal(v: serde_json::Value) -> Rule {
        rbac::principal(Obj::new(&v, "p").unwrap(), false).unwrap()
    }

    fn permission(v: serde_json::Value) -> Rule {
        rbac::permission(Obj::new(&v, "p").unwrap(), false).unwrap()
    }

    fn request(method: &str, target: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = hyper::Request::builder().method(method).uri(target);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn facts<'a>(tls: Option<&'a TlsInfo>, request: Option<&'a Parts>) -> Facts<'a> {
        Facts {
            local: "10.0.0.5:8080".parse().unwrap(),
            peer: "10.1.2.3:40000".parse().unwrap(),
            remote: "192.0.2.7".parse().unwrap(),
            server_name: None,
            tls,
            request,
        }
    }

    fn tls(uri: &[&str], dns: &[&str], subject: &str) -> TlsInfo {
        let peer = PeerCertificate {
            uri_sans: uri.iter().map(|s| s.to_string()).collect(),
            dns_sans: dns.iter().map(|s| s.to_string()).collect(),
            subject: subject.to_string(),
            ..Default::default()
        };
        TlsInfo { sni: Some("svc.example".into()), peer: Some(Arc::new(peer)), ..Default::default() }
    }

    #[test]
    fn authenticated_matches_uri_sans_then_dns_sans_then_the_subject() {
        let spiffe = principal(json!({"authenticated": {"principal_name": {"safe_regex": {"regex": "spiffe://cluster.local/ns/[^/]+/sa/client"}}}}));
        let by_dns = principal(json!({"authenticated": {"principal_name": {"exact": "client.example"}}}));
        let by_subject = principal(json!({"authenticated": {"principal_name": {"prefix": "CN=client"}}}));
        let any_tls = principal(json!({"authenticated": {}}));
        let cert = tls(&["spiffe://cluster.local/ns/default/sa/client"], &["client.example"], "CN=client,O=weft");
        let f = facts(Some(&cert), None);
        assert!(spiffe.matches(&f) && by_dns.matches(&f) && by_subject.matches(&f) && any_tls.matches(&f));
        let other = tls(&["spiffe://cluster.local/ns/default/sa/other"], &[], "CN=other");
        assert!(!spiffe.matches(&facts(Some(&other), None)) && !by_subject.matches(&facts(Some(&other), None)));
        let plaintext = facts(None, None);
        assert!(!any_tls.matches(&plaintext) && !spiffe.matches(&plaintext), "plaintext is never authenticated");
        let no_cert = TlsInfo::default();
        assert!(any_tls.matches(&facts(Some(&no_cert), None)) && !by_subject.matches(&facts(Some(&no_cert), None)));
        assert!(principal(json!({"authenticated": {"principal_name": {"exact": ""}}})).matches(&facts(Some(&no_cert), None)), "the empty subject");
    }

    #[test]
    fn requested_server_name_and_addresses() {
        let sni = permission(json!({"requested_server_name": {"suffix": ".example"}}));
        let cert = tls(&[], &[], "");
        let mut f = facts(Some(&cert), None);
        assert!(!sni.matches(&f), "no SNI reads as empty");
        f.server_name = Some("svc.example");
        assert!(sni.matches(&f));
        assert!(permission(json!({"destination_port": 8080})).matches(&f));
        assert!(permission(json!({"destination_port_range": {"start": 8000, "end": 8081}})).matches(&f));
        assert!(!permission(json!({"destination_port_range": {"start": 8000, "end": 8080}})).matches(&f), "the end is excluded");
        assert!(permission(json!({"destination_ip": {"address_prefix": "10.0.0.0", "prefix_len": 24}})).matches(&f));
        assert!(principal(json!({"direct_remote_ip": {"address_prefix": "10.1.0.0", "prefix_len": 16}})).matches(&f));
        assert!(principal(json!({"source_ip": {"address_prefix": "10.1.2.3", "prefix_len": 32}})).matches(&f));
        assert!(!principal(json!({"remote_ip": {"address_prefix": "10.1.0.0", "prefix_len": 16}})).matches(&f));
        assert!(principal(json!({"remote_ip": {"address_prefix": "192.0.2.0", "prefix_len": 24}})).matches(&f));
    }

    #[test]
    fn request_rules_read_the_normalised_request() {
        let req = request("POST", "/api/v1/items?debug=1", &[("x-user", "alice"), ("x-user", "bob")]);
        let f = facts(None, Some(&req));
        assert!(permission(json!({"url_path": {"path": {"exact": "/api/v1/items"}}})).matches(&f), "the query is not part of the path");
        assert!(permission(json!({"url_path": {"path": {"prefix": "/API/", "ignore_case": true}}})).matches(&f));
        assert!(permission(json!({"header": {"name": ":method", "string_match": {"exact": "POST"}}})).matches(&f));
        assert!(permission(json!({"header": {"name": ":path", "string_match": {"suffix": "debug=1"}}})).matches(&f), ":path keeps the query");
        assert!(principal(json!({"header": {"name": "x-user", "string_match": {"exact": "bob"}}})).matches(&f), "each value alone");
        assert!(!principal(json!({"header": {"name": "x-user", "string_match": {"exact": "alice,bob"}}})).matches(&f), "values are not joined");
        let not_alice = principal(json!({"header": {"name": "x-user", "string_match": {"exact": "alice"}, "invert_match": true}}));
        assert!(!not_alice.matches(&f), "one of the values is alice: inverted, no match (as Envoy)");
        assert!(!principal(json!({"header": {"name": "x-absent", "string_match": {"exact": "a"}, "invert_match": true}})).matches(&f));
        let network = facts(None, None);
        assert!(!permission(json!({"url_path": {"path": {"prefix": "/"}}})).matches(&network));
        assert!(permission(json!({"not_rule": {"url_path": {"path": {"prefix": "/"}}}})).matches(&network));
    }

    #[test]
    fn actions_shadow_rules_and_counters() {
        let config = json!({
            "rules": {"action": "DENY", "policies": {"deny-admin": {"permissions": [{"url_path": {"path": {"prefix": "/admin"}}}], "principals": [{"any": true}]}}},
            "shadow_rules": {"policies": {"only-get": {"permissions": [{"header": {"name": ":method", "string_match": {"exact": "GET"}}}], "principals": [{"any": true}]}}},
            "rules_stat_prefix": "unit_"});
        let filter = rbac::http(Obj::new(&config, "f").unwrap(), "http.evaluation_test.").unwrap();
        let (admin, other) = (request("POST", "/admin/x", &[]), request("GET", "/public", &[]));
        assert!(!evaluate(&filter.engines, &filter.stats, &facts(None, Some(&admin))).0);
        assert!(evaluate(&filter.engines, &filter.stats, &facts(None, Some(&other))).0);
        let s = &filter.stats;
        let counts = [&s.allowed, &s.denied, &s.shadow_allowed, &s.shadow_denied].map(|c| c.load(Relaxed));
        assert_eq!(counts, [1, 1, 1, 1], "the shadow rules count but never decide");
        assert!(crate::counters::named_counters().contains(&("http.evaluation_test.rbac.unit_.denied".to_string(), 1)));
        let empty_allow = Policies { action: Action::Allow, policies: Vec::new() };
        assert!(!empty_allow.allows(&facts(None, None)), "ALLOW without policies denies everything");
        let log = Policies { action: Action::Log, policies: Vec::new() };
        assert!(log.allows(&facts(None, None)));
        assert!(evaluate(&Engines::default(), &filter.stats, &facts(None, None)).0, "no engine: allowed");
    }
}
