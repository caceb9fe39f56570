//! The RBAC HTTP filter: the route's `RBACPerRoute` policies (most specific level) or the filter's own decide
//! each request; a denied one gets Envoy's 403 `RBAC: access denied`.

use hyper::{Response, StatusCode};

use super::super::super::body::Body;
use super::super::rbac::{self, Facts};
use super::local_reply;
use crate::config::rbac::{Engines, HttpRbac};
use crate::proxy::stream_info::RbacShadow;

/// `route_engines`: the route's `RBACPerRoute`, which replaces the filter's policies (not its counters).
pub fn decode(filter: &HttpRbac, route_engines: Option<&Engines>, facts: &Facts<'_>, grpc: bool) -> Option<Response<Body>> {
    let engines = route_engines.unwrap_or(&filter.engines);
    if rbac::evaluate(engines, &filter.stats, facts) {
        return None;
    }
    let mut reply = local_reply::reply(StatusCode::FORBIDDEN, Some("RBAC: access denied"), grpc);
    let policy = engines.enforced.as_ref().map_or_else(|| "none".to_string(), |p| p.denied_by(facts));
    reply.extensions_mut().insert(local_reply::ResponseDetails(format!("rbac_access_denied_matched_policy[{policy}]").into()));
    Some(reply)
}

/// The dynamic metadata Envoy's RBAC filter writes for its shadow rules (`<prefix>shadow_engine_result`:
/// `allowed` or `denied`; `<prefix>shadow_effective_policy_id`: the policy that matched), which spans' custom
/// tags read (Istio's dry-run policies); `None` without shadow rules.
pub fn shadow_metadata(filter: &HttpRbac, route_engines: Option<&Engines>, facts: &Facts<'_>) -> Option<RbacShadow> {
    let shadow = route_engines.unwrap_or(&filter.engines).shadow.as_ref()?;
    let prefix = &filter.shadow_prefix;
    let mut fields = Vec::new();
    if let Some(policy) = shadow.matched(facts) {
        fields.push((format!("{prefix}shadow_effective_policy_id"), policy.to_string()));
    }
    let result = if shadow.allows(facts) { "allowed" } else { "denied" };
    fields.push((format!("{prefix}shadow_engine_result"), result.to_string()));
    Some(RbacShadow(fields))
}
