//! The parsers of outside input, as fuzz targets: each function takes arbitrary bytes and must return without
//! panicking whatever they are. `cargo xtask fuzz` runs them under libFuzzer (the cargo-fuzz crate in `fuzz/`
//! calls these); the test below replays their committed corpora (`fuzz/corpus/<target>/`, seeds and every
//! input that once crashed) on every `cargo xtask test`.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use serde_json::{json, Value};
use tokio::io::{AsyncRead, ReadBuf};

use crate::config::tree::Obj;

/// A target: arbitrary bytes in, no panic.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/<name>.rs` calls it.
pub const TARGETS: &[(&str, Target)] = &[
    ("cni_stdin", cni_stdin),
    ("agent_socket", agent_socket),
    ("bootstrap", bootstrap),
    ("xds_resource", xds_resource),
    ("tls_client_hello", tls_client_hello),
    ("http_inspector", http_inspector),
    ("metadata_exchange", metadata_exchange),
    ("rbac_and_routes", rbac_and_routes),
];

/// What kubelet's runtime hands the plugin: the network configuration on stdin (with its `prevResult`,
/// converted to the asked version), and `CNI_ARGS`.
pub fn cni_stdin(data: &[u8]) {
    use weft_cni::cni;
    if let Ok(conf) = cni::parse_netconf(data) {
        if let Some(prev) = &conf.prev_result {
            let _ = cni::pod_ips(prev);
            for version in cni::CniVersion::ALL {
                let _ = cni::convert_result(prev, version);
            }
        }
    }
    let _ = cni::peek_cni_version(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = cni::parse_cni_args(text);
    }
}

/// One request line on the agent's socket.
pub fn agent_socket(data: &[u8]) {
    let _ = crate::cni_server::decode_request(data);
}

/// A bootstrap file, JSON or YAML.
pub fn bootstrap(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let raw: Option<Value> = serde_json::from_str(text).ok().or_else(|| serde_yaml::from_str(text).ok());
    if let Some(raw) = raw {
        let _ = crate::config::bootstrap::translate(raw);
    }
}

/// One xDS resource through the translator: the first byte picks the type, the rest is its protobuf.
pub fn xds_resource(data: &[u8]) {
    use crate::config::{cluster, listener, route, secret};
    let Some((kind, bytes)) = data.split_first() else { return };
    let types = ["Listener", "Cluster", "RouteConfiguration", "ClusterLoadAssignment", "Secret"];
    let message = types[usize::from(*kind) % types.len()];
    let type_url = match message {
        "Listener" => "type.googleapis.com/envoy.config.listener.v3.Listener",
        "Cluster" => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "RouteConfiguration" => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "ClusterLoadAssignment" => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        _ => "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
    };
    let Ok(value) = crate::xds::codec::any_to_json(type_url, bytes) else { return };
    let value = crate::config::typed_struct::expand(value);
    let Ok(obj) = Obj::new(&value, message) else { return };
    let _ = match message {
        "Listener" => listener::translate(obj).map(drop),
        "Cluster" => cluster::translate(obj).map(drop),
        "RouteConfiguration" => route::translate(obj).map(drop),
        "ClusterLoadAssignment" => cluster::assignment(obj).map(drop),
        _ => secret::translate(obj).map(drop),
    };
}

/// The TLS inspector's view of a connection's first bytes (a ClientHello record, or not).
pub fn tls_client_hello(data: &[u8]) {
    let _ = crate::proxy::listener_filter::parse_hello(data);
}

/// The HTTP inspector's view of a connection's first bytes.
pub fn http_inspector(data: &[u8]) {
    let _ = crate::proxy::listener_filter::http_protocol(data);
}

/// A peer's bytes on a connection under Istio's TCP metadata exchange: its frame (or not), then the
/// application's bytes, read to the end.
pub fn metadata_exchange(data: &[u8]) {
    let config = Arc::new(crate::config::metadata_exchange::MetadataExchange {
        protocol: "istio-peer-exchange".into(),
        enable_discovery: false,
        additional_labels: vec!["role".into()],
    });
    let io = std::io::Cursor::new(data.to_vec());
    let mut stream = crate::proxy::filters::network::metadata_exchange::ExchangeStream::awaiting_frame(io, config);
    let mut cx = Context::from_waker(Waker::noop());
    let mut buf = [0u8; 512];
    // An in-memory reader never waits: each poll answers at once, and the end comes after `data.len()`
    // bytes at the most, so the loop is bounded.
    for _ in 0..=data.len() + 1 {
        let mut read = ReadBuf::new(&mut buf);
        match std::pin::Pin::new(&mut stream).poll_read(&mut cx, &mut read) {
            Poll::Ready(Ok(())) if !read.filled().is_empty() => continue,
            _ => break,
        }
    }
    let _ = stream.peer().get();
}

/// A request made of the bytes (`METHOD path` on the first line, `name: value` headers after) against an
/// HTTP RBAC policy and a route configuration with every kind of matcher.
pub fn rbac_and_routes(data: &[u8]) {
    let Some(parts) = request_of(data) else { return };
    let (rbac, routes) = policy_and_routes();
    let peer: SocketAddr = "10.0.0.1:40000".parse().unwrap_or(SocketAddr::from(([10, 0, 0, 1], 40000)));
    let local: SocketAddr = "10.0.0.2:8080".parse().unwrap_or(SocketAddr::from(([10, 0, 0, 2], 8080)));
    let facts = crate::proxy::filters::rbac::Facts { local, peer, remote: peer.ip(), server_name: None, tls: None, request: Some(&parts) };
    let _ = crate::proxy::filters::http::rbac::decode(rbac, None, &facts, false);
    let host = crate::proxy::route::authority(&parts).unwrap_or_default().to_string();
    let _ = crate::proxy::route::select(routes, &host, &parts);
}

fn request_of(data: &[u8]) -> Option<hyper::http::request::Parts> {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let mut first = lines.next()?.splitn(2, ' ');
    let (method, target) = (first.next()?, first.next().unwrap_or("/"));
    let mut builder = hyper::Request::builder().method(method).uri(target);
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            builder = builder.header(name.trim(), value.trim());
        }
    }
    builder.body(()).ok().map(|r| r.into_parts().0)
}

/// The RBAC policy and routes `rbac_and_routes` matches against, translated once.
fn policy_and_routes() -> (&'static crate::config::rbac::HttpRbac, &'static crate::config::route::RouteConfiguration) {
    static BUILT: OnceLock<Option<(crate::config::rbac::HttpRbac, crate::config::route::RouteConfiguration)>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let rbac = json!({"rules": {"action": "DENY", "policies": {"p": {
            "permissions": [{"or_rules": {"rules": [
                {"url_path": {"path": {"prefix": "/admin"}}},
                {"header": {"name": ":method", "string_match": {"exact": "DELETE"}}},
                {"header": {"name": "x-token", "safe_regex_match": {"regex": "^[a-f0-9]{8,}$"}}},
                {"not_rule": {"destination_port": 8080}}]}}],
            "principals": [{"or_ids": {"ids": [
                {"header": {"name": "user-agent", "string_match": {"contains": "bot", "ignore_case": true}}},
                {"remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}},
                {"authenticated": {"principal_name": {"suffix": "/sa/admin"}}}]}}]}}}});
        let routes = json!({"virtual_hosts": [
            {"name": "api", "domains": ["api.*", "*.example.com:8080"], "routes": [
                {"match": {"safe_regex": {"regex": "/v[0-9]+/items/[^/]+"}, "headers": [{"name": "x-version", "present_match": true}]}, "direct_response": {"status": 200}},
                {"match": {"path_separated_prefix": "/v1", "query_parameters": [{"name": "q", "string_match": {"prefix": "a"}}]}, "direct_response": {"status": 201}},
                {"match": {"prefix": "/", "case_sensitive": false, "headers": [{"name": "x-range", "range_match": {"start": 1, "end": 9}}]}, "direct_response": {"status": 202}}]},
            {"name": "all", "domains": ["*"], "routes": [{"match": {"path": "/exact"}, "direct_response": {"status": 204}}, {"match": {"grpc": {}, "prefix": "/"}, "direct_response": {"status": 205}}]}]});
        let rbac = crate::config::rbac::http(Obj::new(&rbac, "rbac").ok()?, "fuzz").ok()?;
        let routes = crate::config::route::translate(Obj::new(&routes, "routes").ok()?).ok()?;
        Some((rbac, routes))
    });
    match built {
        Some((rbac, routes)) => (rbac, routes),
        None => panic!("the fuzz target's own RBAC policy and routes translate"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed input of every target runs without a panic (CI runs this; `cargo xtask fuzz` adds
    /// to the corpora).
    #[test]
    fn fuzz_corpora_replay_without_a_panic() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let mut replayed = 0;
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e} (each target has a committed corpus)", dir.display()));
            let mut inputs = 0;
            for entry in entries.flatten() {
                let data = std::fs::read(entry.path()).unwrap();
                target(&data);
                inputs += 1;
            }
            assert!(inputs > 0, "{name}: an empty corpus");
            replayed += inputs;
        }
        assert!(replayed >= TARGETS.len());
    }

    #[test]
    fn the_route_and_rbac_targets_see_the_requests_they_are_given() {
        let parts = request_of(b"DELETE /admin/x\nhost: api.local\nx-version: 2").unwrap();
        assert_eq!((parts.method.as_str(), parts.uri.path(), parts.headers["x-version"].to_str().unwrap()), ("DELETE", "/admin/x", "2"));
        let (rbac, routes) = policy_and_routes();
        let facts = crate::proxy::filters::rbac::Facts {
            local: "10.0.0.2:8080".parse().unwrap(),
            peer: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.1".parse().unwrap(),
            server_name: None,
            tls: None,
            request: Some(&parts),
        };
        assert!(crate::proxy::filters::http::rbac::decode(rbac, None, &facts, false).0.is_some(), "the policy denies it");
        assert!(crate::proxy::route::select(routes, "api.local", &parts).is_none(), "no route for it");
        let items = request_of(b"GET /v2/items/42\nhost: api.local\nx-version: 2").unwrap();
        let (_, route) = crate::proxy::route::select(routes, "api.local", &items).expect("the regex route");
        assert!(matches!(route.action, crate::config::route::Action::DirectResponse { status: 200, .. }));
    }
}

