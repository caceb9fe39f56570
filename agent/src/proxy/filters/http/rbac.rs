//! The RBAC HTTP filter: the route's `RBACPerRoute` policies (most specific level) or the filter's own decide
//! each request; a denied one gets Envoy's 403 `RBAC: access denied`.

use hyper::{Response, StatusCode};

use super::super::super::body::Body;
use super::super::rbac::{self, Facts, Verdict};
use super::local_reply;
use crate::config::rbac::{Engines, HttpRbac};
use crate::proxy::stream_info::RbacShadow;

/// `route_engines`: the route's `RBACPerRoute`, which replaces the filter's policies (not its counters). Returns
/// the denial, and the dynamic metadata Envoy's RBAC filter writes for its shadow rules
/// (`<prefix>shadow_engine_result`: `allowed` or `denied`; `<prefix>shadow_effective_policy_id`: the policy
/// that matched), which spans' custom tags read (Istio's dry-run policies).
pub fn decode(filter: &HttpRbac, route_engines: Option<&Engines>, facts: &Facts<'_>, grpc: bool) -> (Option<Response<Body>>, Option<RbacShadow>) {
    let engines = route_engines.unwrap_or(&filter.engines);
    let (allowed, shadow) = rbac::evaluate(engines, &filter.stats, facts);
    let metadata = shadow.map(|verdict| shadow_metadata(&filter.shadow_prefix, verdict));
    if allowed {
        return (None, metadata);
    }
    let mut reply = local_reply::reply(StatusCode::FORBIDDEN, Some("RBAC: access denied"), grpc);
    let policy = engines.enforced.as_ref().map_or_else(|| "none".to_string(), |p| p.denied_by(facts));
    reply.extensions_mut().insert(local_reply::ResponseDetails(format!("rbac_access_denied_matched_policy[{policy}]").into()));
    (Some(reply), metadata)
}

fn shadow_metadata(prefix: &str, verdict: Verdict<'_>) -> RbacShadow {
    let mut fields = Vec::new();
    if let Some(policy) = verdict.matched {
        fields.push((format!("{prefix}shadow_effective_policy_id"), policy.to_string()));
    }
    let result = if verdict.allowed { "allowed" } else { "denied" };
    fields.push((format!("{prefix}shadow_engine_result"), result.to_string()));
    RbacShadow(fields)
}
