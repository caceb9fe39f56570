//! Role-based access control: `envoy.config.rbac.v3.RBAC` (policies of permissions and principals) and the
//! configurations of the filters that enforce it, `envoy.filters.network.rbac` and `envoy.filters.http.rbac`
//! (with `RBACPerRoute`). Everything a policy could say that weft cannot evaluate — CEL conditions, metadata,
//! filter state, URI templates, the unified matcher API — is refused by its path: ignoring a security rule
//! would let through what the policy denies, or deny what it allows.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::cidr::{cidr_range, CidrRange};
use super::matcher::{self, HeaderMatcher, StringMatcher};
use super::tree::{ConfigError, Obj, Result};

pub const NETWORK_RBAC: &str = "envoy.extensions.filters.network.rbac.v3.RBAC";
pub const HTTP_RBAC: &str = "envoy.extensions.filters.http.rbac.v3.RBAC";
pub const HTTP_RBAC_PER_ROUTE: &str = "envoy.extensions.filters.http.rbac.v3.RBACPerRoute";

/// What a policy match means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Allowed when some policy matches.
    Allow,
    /// Allowed when no policy matches.
    Deny,
    /// Always allowed (the match only marks the request for logging).
    Log,
}

/// `envoy.config.rbac.v3.RBAC`: the action and its named policies (sorted by name, as Envoy keeps them).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Policies {
    pub action: Action,
    pub policies: Vec<(String, Policy)>,
}

/// A policy matches when any of its permissions and any of its principals match.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Policy {
    pub permissions: Vec<Rule>,
    pub principals: Vec<Rule>,
}

/// A permission (what is accessed) or a principal (who accesses it): both are predicates on the same facts
/// of a connection and its request.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    Any,
    And(Vec<Rule>),
    Or(Vec<Rule>),
    Not(Box<Rule>),
    /// A request header (pseudo-headers included); never matches a connection without a request.
    Header(HeaderMatcher),
    /// The request's path after the connection manager's normalisation, without its query.
    UrlPath(StringMatcher),
    DestinationIp(CidrRange),
    /// Envoy's field is 32 bits wide: a port above 65535 never matches.
    DestinationPort(u32),
    /// `[start, end)`.
    DestinationPortRange(u32, u32),
    /// The SNI the client asked for (`""` when none).
    RequestedServerName(StringMatcher),
    /// A TLS connection; with a name, one of its peer's URI SANs, DNS SANs or its subject must match.
    Authenticated(Option<StringMatcher>),
    /// The connection's peer (`source_ip`, deprecated).
    SourceIp(CidrRange),
    /// The connection's peer.
    DirectRemoteIp(CidrRange),
    /// The client's address as the connection manager derives it (`x-forwarded-for`), the peer at L4.
    RemoteIp(CidrRange),
}

/// The enforced and shadow policies of a filter (or of a route's `RBACPerRoute`). `None`: no engine.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Engines {
    pub enforced: Option<Policies>,
    pub shadow: Option<Policies>,
}

/// A filter's counters: `<prefix>rbac.[rules_stat_prefix.]allowed` and the others, as Envoy names them.
#[derive(Debug, Clone)]
pub struct Counters {
    pub allowed: Arc<AtomicU64>,
    pub denied: Arc<AtomicU64>,
    pub shadow_allowed: Arc<AtomicU64>,
    pub shadow_denied: Arc<AtomicU64>,
    /// The base name (`http.inbound.rbac.`), for comparisons and dumps.
    pub names: [String; 2],
}

impl Counters {
    /// Envoy's `generateStats`: `statPrefixJoin(prefix, "rbac.")`, then each rule set's own prefix.
    fn new(prefix: &str, rules_prefix: &str, shadow_prefix: &str) -> Counters {
        let base = match prefix {
            "" => "rbac.".to_string(),
            p if p.ends_with('.') => format!("{p}rbac."),
            p => format!("{p}.rbac."),
        };
        // Envoy joins a rule set's prefix and the counter with a dot (`rbac.dry_run_.shadow_denied`).
        let dotted = |p: &str| if p.is_empty() || p.ends_with('.') { format!("{base}{p}") } else { format!("{base}{p}.") };
        let (enforced, shadow) = (dotted(rules_prefix), dotted(shadow_prefix));
        let counter = |name: String| crate::counters::counter(&name);
        Counters {
            allowed: counter(format!("{enforced}allowed")),
            denied: counter(format!("{enforced}denied")),
            shadow_allowed: counter(format!("{shadow}shadow_allowed")),
            shadow_denied: counter(format!("{shadow}shadow_denied")),
            names: [enforced, shadow],
        }
    }
}

impl PartialEq for Counters {
    fn eq(&self, other: &Self) -> bool {
        self.names == other.names
    }
}

impl serde::Serialize for Counters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.names.serialize(s)
    }
}

/// `envoy.extensions.filters.http.rbac.v3.RBAC`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HttpRbac {
    pub engines: Engines,
    pub stats: Counters,
    /// `shadow_rules_stat_prefix`, which also prefixes the shadow result's dynamic metadata keys.
    pub shadow_prefix: String,
}

/// `envoy.extensions.filters.network.rbac.v3.RBAC`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NetworkRbac {
    pub engines: Engines,
    pub stats: Counters,
    /// `CONTINUOUS`: checked again on every read (the facts do not change, the counters do).
    pub continuous: bool,
}

/// `envoy.config.rbac.v3.RBAC`.
pub fn policies(mut r: Obj<'_>, network: bool) -> Result<Policies> {
    let action = match r.string("action")?.unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "LOG" => Action::Log,
        other => return Err(ConfigError::new(r.at("action"), format!("{other} is not an action; use ALLOW, DENY or LOG"))),
    };
    let path = r.at("policies");
    let mut policies = Vec::new();
    match r.take("policies") {
        None => {}
        Some(serde_json::Value::Object(map)) => {
            for (name, value) in map {
                policies.push((name.clone(), policy(Obj::new(value, format!("{path}.{name}"))?, network)?));
            }
        }
        Some(_) => return Err(ConfigError::new(path, "expected a map of policy name to policy")),
    }
    policies.sort_by(|a, b| a.0.cmp(&b.0));
    r.finish()?;
    Ok(Policies { action, policies })
}

fn policy(mut p: Obj<'_>, network: bool) -> Result<Policy> {
    for cel in ["condition", "checked_condition"] {
        if p.has(cel) {
            return Err(ConfigError::new(p.at(cel), "CEL conditions are not supported by weft; a policy it cannot evaluate is refused"));
        }
    }
    let rules = |p: &mut Obj<'_>, key: &str, one: fn(Obj<'_>, bool) -> Result<Rule>| -> Result<Vec<Rule>> {
        let rules = p.objects(key)?.into_iter().map(|o| one(o, network)).collect::<Result<Vec<_>>>()?;
        if rules.is_empty() {
            return Err(ConfigError::new(p.at(key), "needs at least one entry"));
        }
        Ok(rules)
    };
    let permissions = rules(&mut p, "permissions", permission)?;
    let principals = rules(&mut p, "principals", principal)?;
    p.finish()?;
    Ok(Policy { permissions, principals })
}

/// Fields weft refuses in a permission or principal, and why.
const UNSUPPORTED: [(&str, &str); 5] = [
    ("metadata", "dynamic metadata matching is not supported by weft"),
    ("sourced_metadata", "metadata matching is not supported by weft"),
    ("filter_state", "filter state matching is not supported by weft (Istio's peer principal comes from the TLS peer: use authenticated)"),
    ("uri_template", "URI template matching is not supported by weft"),
    ("matcher", "extension matchers are not supported by weft"),
];

/// `envoy.config.rbac.v3.Permission`.
pub fn permission(mut p: Obj<'_>, network: bool) -> Result<Rule> {
    let found = [
        set(&mut p, "and_rules", "rules", permission, network)?.map(Rule::And),
        set(&mut p, "or_rules", "rules", permission, network)?.map(Rule::Or),
        p.object("not_rule")?.map(|o| permission(o, network)).transpose()?.map(|r| Rule::Not(Box::new(r))),
        destination_port(&mut p)?,
        p.object("destination_port_range")?.map(port_range).transpose()?,
        p.object("destination_ip")?.map(cidr_range).transpose()?.map(Rule::DestinationIp),
        p.object("requested_server_name")?.map(matcher::string_matcher).transpose()?.map(Rule::RequestedServerName),
    ];
    one_rule(p, found, network)
}

/// `envoy.config.rbac.v3.Principal`.
pub fn principal(mut p: Obj<'_>, network: bool) -> Result<Rule> {
    let found = [
        set(&mut p, "and_ids", "ids", principal, network)?.map(Rule::And),
        set(&mut p, "or_ids", "ids", principal, network)?.map(Rule::Or),
        p.object("not_id")?.map(|o| principal(o, network)).transpose()?.map(|r| Rule::Not(Box::new(r))),
        p.object("authenticated")?.map(authenticated).transpose()?,
        p.object("source_ip")?.map(cidr_range).transpose()?.map(Rule::SourceIp),
        p.object("direct_remote_ip")?.map(cidr_range).transpose()?.map(Rule::DirectRemoteIp),
        p.object("remote_ip")?.map(cidr_range).transpose()?.map(Rule::RemoteIp),
    ];
    one_rule(p, found, network)
}

/// The rule forms permissions and principals share (`any`, `header`, `url_path`), the refused ones, and the
/// check that exactly one form is set.
fn one_rule<const N: usize>(mut p: Obj<'_>, specific: [Option<Rule>; N], network: bool) -> Result<Rule> {
    for (field, why) in UNSUPPORTED {
        if p.has(field) {
            return Err(ConfigError::new(p.at(field), why));
        }
    }
    let any = match p.bool("any")? {
        Some(true) => Some(Rule::Any),
        Some(false) => return Err(ConfigError::new(p.at("any"), "must be true")),
        None => None,
    };
    let header = p.object("header")?.map(matcher::header_matcher).transpose()?;
    if header.is_some() && network {
        // Envoy refuses these too: a connection has no headers.
        return Err(ConfigError::new(p.at("header"), "header rules are not supported by the RBAC network filter"));
    }
    let url_path = p.object("url_path")?.map(path_matcher).transpose()?;
    let shared = [any, header.map(Rule::Header), url_path.map(Rule::UrlPath)];
    let mut found = specific.into_iter().chain(shared).flatten();
    let (Some(rule), None) = (found.next(), found.next()) else {
        return Err(ConfigError::new(p.path(), "needs exactly one rule"));
    };
    p.finish()?;
    Ok(rule)
}

/// `and_rules`/`or_rules` (`{rules: [...]}`) or `and_ids`/`or_ids` (`{ids: [...]}`).
fn set(p: &mut Obj<'_>, key: &str, list: &str, one: fn(Obj<'_>, bool) -> Result<Rule>, network: bool) -> Result<Option<Vec<Rule>>> {
    let Some(mut s) = p.object(key)? else { return Ok(None) };
    let rules = s.objects(list)?.into_iter().map(|o| one(o, network)).collect::<Result<Vec<_>>>()?;
    if rules.is_empty() {
        return Err(ConfigError::new(s.at(list), "needs at least one entry"));
    }
    s.finish()?;
    Ok(Some(rules))
}

fn destination_port(p: &mut Obj<'_>) -> Result<Option<Rule>> {
    match p.u64("destination_port")? {
        None => Ok(None),
        Some(port) if port <= 65535 => Ok(Some(Rule::DestinationPort(port as u32))),
        Some(port) => Err(ConfigError::new(p.at("destination_port"), format!("{port} is not a port (at most 65535)"))),
    }
}

/// `envoy.type.v3.Int32Range`, with Envoy's bounds: `0 <= start < end <= 65536`.
fn port_range(mut r: Obj<'_>) -> Result<Rule> {
    let mut bound = |key: &str| -> Result<u32> {
        let path = r.at(key);
        let value = match r.take(key) {
            None => 0,
            Some(serde_json::Value::Number(n)) => n.as_i64().ok_or_else(|| ConfigError::new(&path, "expected an integer"))?,
            Some(_) => return Err(ConfigError::new(path, "expected an integer")),
        };
        u32::try_from(value).ok().filter(|v| *v <= 65536).ok_or_else(|| ConfigError::new(path, format!("{value} is out of bounds [0, 65536]")))
    };
    let (start, end) = (bound("start")?, bound("end")?);
    if start >= end {
        return Err(ConfigError::new(r.path(), format!("range start {start} must be less than range end {end}")));
    }
    r.finish()?;
    Ok(Rule::DestinationPortRange(start, end))
}

/// `envoy.type.matcher.v3.PathMatcher`.
fn path_matcher(mut m: Obj<'_>) -> Result<StringMatcher> {
    let path = matcher::string_matcher(m.required_object("path")?)?;
    m.finish()?;
    Ok(path)
}

fn authenticated(mut a: Obj<'_>) -> Result<Rule> {
    let name = a.object("principal_name")?.map(matcher::string_matcher).transpose()?;
    a.finish()?;
    Ok(Rule::Authenticated(name))
}

/// The rule sets and the unified-matcher fields both filters share.
fn engines(r: &mut Obj<'_>, network: bool) -> Result<Engines> {
    for field in ["matcher", "shadow_matcher"] {
        if r.has(field) {
            return Err(ConfigError::new(r.at(field), "the unified matcher API is not supported by weft; use rules"));
        }
    }
    Ok(Engines {
        enforced: r.object("rules")?.map(|o| policies(o, network)).transpose()?,
        shadow: r.object("shadow_rules")?.map(|o| policies(o, network)).transpose()?,
    })
}

/// `envoy.extensions.filters.http.rbac.v3.RBAC`; `stat_prefix` is the connection manager's (`http.<its
/// stat_prefix>.`).
pub fn http(mut r: Obj<'_>, stat_prefix: &str) -> Result<HttpRbac> {
    let engines = engines(&mut r, false)?;
    let rules_prefix = r.string("rules_stat_prefix")?.unwrap_or_default();
    let shadow_prefix = r.string("shadow_rules_stat_prefix")?.unwrap_or_default();
    if r.bool("track_per_rule_stats")? == Some(true) {
        return Err(ConfigError::new(r.at("track_per_rule_stats"), "per-rule counters are not supported by weft yet"));
    }
    r.finish()?;
    Ok(HttpRbac { engines, stats: Counters::new(stat_prefix, rules_prefix, shadow_prefix), shadow_prefix: shadow_prefix.to_string() })
}

/// `envoy.extensions.filters.http.rbac.v3.RBACPerRoute`: without `rbac`, the filter allows everything on
/// the route (Envoy disables its policy there).
pub fn per_route(mut r: Obj<'_>) -> Result<Engines> {
    let engines = match r.object("rbac")? {
        Some(mut rbac) => {
            let engines = engines(&mut rbac, false)?;
            // Counters stay the filter's: a route's prefixes only rename dynamic metadata keys.
            let _ = rbac.string("rules_stat_prefix")?;
            let _ = rbac.string("shadow_rules_stat_prefix")?;
            if rbac.bool("track_per_rule_stats")? == Some(true) {
                return Err(ConfigError::new(rbac.at("track_per_rule_stats"), "per-rule counters are not supported by weft yet"));
            }
            rbac.finish()?;
            engines
        }
        None => Engines::default(),
    };
    r.finish()?;
    Ok(engines)
}

/// `envoy.extensions.filters.network.rbac.v3.RBAC`.
pub fn network(mut r: Obj<'_>) -> Result<NetworkRbac> {
    let engines = engines(&mut r, true)?;
    // Required by Envoy (min_len 1).
    let stat_prefix = r.required_string("stat_prefix")?;
    let shadow_prefix = r.string("shadow_rules_stat_prefix")?.unwrap_or_default();
    let continuous = match r.string("enforcement_type")?.unwrap_or("ONE_TIME_ON_FIRST_BYTE") {
        "ONE_TIME_ON_FIRST_BYTE" => false,
        "CONTINUOUS" => true,
        other => return Err(ConfigError::new(r.at("enforcement_type"), format!("{other} is not an enforcement type"))),
    };
    if r.duration("delay_deny")?.is_some_and(|d| !d.is_zero()) {
        return Err(ConfigError::new(r.at("delay_deny"), "is not supported by weft yet"));
    }
    r.finish()?;
    Ok(NetworkRbac { engines, stats: Counters::new(stat_prefix, "", shadow_prefix), continuous })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn http_rbac(v: serde_json::Value) -> Result<HttpRbac> {
        http(Obj::new(&v, "f")?, "http.t.")
    }

    #[test]
    fn policies_translate_sorted_and_nested() {
        let f = http_rbac(json!({"rules": {"action": "DENY", "policies": {
            "b": {"permissions": [{"and_rules": {"rules": [{"destination_port": 80}, {"not_rule": {"url_path": {"path": {"prefix": "/admin"}}}}]}}],
                  "principals": [{"or_ids": {"ids": [{"authenticated": {"principal_name": {"exact": "spiffe://td/ns/a/sa/b"}}}, {"remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}]}}]},
            "a": {"permissions": [{"any": true}], "principals": [{"header": {"name": ":method", "string_match": {"exact": "GET"}}}]}}},
            "shadow_rules_stat_prefix": "dry_"}))
        .unwrap();
        let rules = f.engines.enforced.unwrap();
        assert_eq!(rules.action, Action::Deny);
        assert_eq!(rules.policies.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(matches!(&rules.policies[1].1.permissions[0], Rule::And(r) if r[0] == Rule::DestinationPort(80)));
        assert_eq!(f.stats.names, ["http.t.rbac.".to_string(), "http.t.rbac.dry_.".to_string()]);
    }

    #[test]
    fn what_weft_cannot_honour_is_refused_by_path() {
        let refused = |rules: serde_json::Value| http_rbac(json!({"rules": rules})).unwrap_err().path;
        let policy = |p: serde_json::Value| json!({"policies": {"p": p}});
        assert_eq!(refused(policy(json!({"permissions": [{"any": true}], "principals": [{"any": true}], "condition": {}}))), "f.rules.policies.p.condition");
        assert_eq!(
            refused(policy(json!({"permissions": [{"and_rules": {"rules": [{"metadata": {}}]}}], "principals": [{"any": true}]}))),
            "f.rules.policies.p.permissions[0].and_rules.rules[0].metadata"
        );
        assert_eq!(refused(policy(json!({"permissions": [{"any": true}], "principals": [{"filter_state": {}}]}))), "f.rules.policies.p.principals[0].filter_state");
        assert_eq!(refused(policy(json!({"permissions": [{"uri_template": {}}], "principals": [{"any": true}]}))), "f.rules.policies.p.permissions[0].uri_template");
        assert_eq!(refused(policy(json!({"permissions": [], "principals": [{"any": true}]}))), "f.rules.policies.p.permissions");
        assert_eq!(refused(policy(json!({"permissions": [{"any": true, "destination_port": 1}], "principals": [{"any": true}]}))), "f.rules.policies.p.permissions[0]");
        assert_eq!(http_rbac(json!({"matcher": {}})).unwrap_err().path, "f.matcher");
        let e = network(Obj::new(&json!({"stat_prefix": "t", "rules": policy(json!({"permissions": [{"not_rule": {"header": {"name": "x"}}}], "principals": [{"any": true}]}))}), "n").unwrap()).unwrap_err();
        assert_eq!(e.path, "n.rules.policies.p.permissions[0].not_rule.header");
        let e = network(Obj::new(&json!({"rules": {}}), "n").unwrap()).unwrap_err();
        assert_eq!(e.path, "n.stat_prefix");
    }

    #[test]
    fn counters_are_named_as_envoy_names_them() {
        let n = network(Obj::new(&json!({"stat_prefix": "tcp", "shadow_rules_stat_prefix": "s_"}), "n").unwrap()).unwrap();
        assert_eq!(n.stats.names, ["tcp.rbac.".to_string(), "tcp.rbac.s_.".to_string()]);
        assert!(crate::counters::named_counters().iter().any(|(name, _)| name == "tcp.rbac.s_.shadow_denied"));
        let r = per_route(Obj::new(&json!({}), "r").unwrap()).unwrap();
        assert_eq!(r, Engines::default(), "an empty RBACPerRoute disables the filter on the route");
    }
}
