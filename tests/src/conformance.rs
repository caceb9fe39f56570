//! A data-driven differential conformance suite for HTTP routing: the real Envoy and weft are started on the
//! same bootstrap, each in a network namespace of its own with its own four upstreams, and every request of a
//! case file is sent to both; what a client observes must be the same, and each request's `expect` must hold
//! for both (so both being broken the same way does not pass). The runner is `tests/tests/http_conformance.rs`.
//!
//! A third side, `weft-xds`, checks that xDS-delivered configuration behaves exactly like file-delivered
//! configuration: the same bootstrap's listeners go to weft over LDS, its clusters over CDS and every
//! HttpConnectionManager's inline `route_config` over RDS (the HCM then says `rds: {route_config_name:
//! <listener>}`), all state of the world over ADS from the test management server
//! ([`crate::xds_server::XdsServer`]) in that side's namespace; its bootstrap keeps the node and admin and
//! has only `dynamic_resources` (see [`xds_config`]). Its answers are judged against Envoy's like the static
//! weft side's (a `known_difference` must show there too), and must also equal the static weft side's.
//! A file whose resources cannot be delivered that way (e.g. they do not encode as protobuf) is skipped on
//! that side, with the reason in the table.
//!
//! # Case files: `tests/conformance/<topic>.yaml`
//!
//! ```yaml
//! description: route matching by headers
//! # Either `static_resources` (used verbatim: listeners and clusters of your own, the HTTP listener on
//! # 127.0.0.1:19200), or the shorthand below, which the runner turns into one listener on 127.0.0.1:19200
//! # with an HttpConnectionManager (stat_prefix http) whose filters are `http_filters` + the router.
//! route_config: {virtual_hosts: [...]}   # the HCM's route_config
//! hcm: {codec_type: AUTO, normalize_path: true}   # optional: more HttpConnectionManager fields
//! http_filters: [...]                    # optional: filters before envoy.filters.http.router
//! clusters: [...]                        # optional: more clusters. The shorthand always defines a, b, c, d
//!                                        # (STATIC, 127.0.0.1:20001..20004) and dead (127.0.0.1:20009,
//!                                        # nothing listens); do not redefine those names.
//! requests:
//!   - name: exact header match
//!     protocol: http1        # http1 | h2c (HTTP/2 prior knowledge); default http1
//!     method: GET            # default GET
//!     path: /foo?x=1         # request target as sent (an http:// URI is sent in absolute form on HTTP/1.1)
//!     authority: api.example.com   # Host / :authority; default example.com
//!     headers: {x-user: alice, x-multi: [one, two]}   # a list sends the header once per value
//!     body: ""               # request body; or body_size: N for N generated ASCII bytes
//!     raw: "GET / HTTP/1.1\r\n\r\n"   # instead of all the above: bytes sent as they are (HTTP/1 only; a
//!                            # lone \n becomes \r\n), the answer parsed by hand. For malformed requests.
//!     repeat: 1              # send it N times (fresh connection each, one after the other); see below
//!     concurrency: 1         # with repeat: how many at a time (order then no longer deterministic)
//!     compare: [status, body, upstream, upstream_path, upstream_header.x-foo, header.location]
//!     expect: {status: 200, upstream: a}   # must hold for BOTH proxies, for every repetition
//!     timeout_ms: 5000       # client-side deadline per request
//!     port: 19200            # the listener to send to (only with static_resources of your own)
//!     known_difference: why  # a difference the README documents: passes only while weft still differs
//!     tls: {cert: client-a, sni: b.example.com, alpn: [h2]}   # send over TLS (any server certificate is
//!                            # accepted; `cert` presents a leaf of the test PKI, see `crate::pki`)
//! ```
//!
//! A bootstrap may name the test PKI's files as `{{pki}}/<name>.pem` / `.key` (`ca`, `other-ca`, `server`,
//! `client-a`, `client-c`, `client-other-domain`, `stranger`; see `crate::pki::LEAVES` for their identities).
//!
//! Fields (`compare` entries and `expect` keys; the default `compare` is `[status, body, upstream,
//! upstream_path]`; `expect` keys are always compared too):
//! - `status`: the response status, `ERR` when the client saw no response (reset, timeout).
//! - `error`: the client-side error, `-` when there is a response.
//! - `body`: for an answer from an upstream, the request body the upstream received (the raw JSON has
//!   headers such as x-request-id that always differ); otherwise the response body verbatim.
//! - `body_digest`: `len=N fnv=HEX` of what `body` means (for large bodies).
//! - `upstream`, `upstream_path`, `upstream_method`, `upstream_version` (`HTTP/1.1` | `HTTP/2.0`),
//!   `upstream_authority` (Host or :authority), `upstream_header.NAME`: what the upstream received; `-`
//!   when the answer does not come from an upstream (local reply, direct_response) or the header is absent.
//! - `header.NAME`: a response header (repeated ones joined with `,`), `-` when absent.
//! - `access_log`: the lines the proxy's access logs wrote to its stdout for this request (a logger with
//!   `path: /dev/stdout` in `hcm.access_log`), `-` when none. The request carries `x-request-id:
//!   <file>-<request name>` (unless it sets one), and a line belongs to the request whose id it contains.
//!   Values that differ between any two runs are normalised: times (`<time>`), ephemeral ports
//!   (`127.0.0.1:<port>`) and JSON `duration` / `upstream_service_time` (`<ms>`).
//! - `upstream_distribution` (with `repeat`): the fraction of answers from each upstream; Envoy and weft may
//!   differ by `tolerance` (default 0.03) per upstream; `expect_distribution: {a: 0.9, b: 0.1}` must hold
//!   within the tolerance for both.
//!
//! With `repeat: N`, every other field is compared as a histogram (`200×1998 503×2`, values sorted), and an
//! `expect` value must hold for every answer, unless it contains `×`: then it is the expected histogram.
//!
//! # Upstreams
//!
//! a, b, c, d on 127.0.0.1:20001..20004, HTTP/1.1 and h2c on the same port. Each answers 200 with
//! content-type application/json and `{"upstream","method","path","version","authority","headers","body"}`.
//! Request headers script them (both proxies pass them through): `x-upstream-status: 503` answers that
//! status; `x-upstream-delay-ms: N` waits first; `x-upstream-header: name=value` (repeatable) adds a response
//! header; `x-upstream-fail-on: a,b` makes the listed upstreams answer 503; `x-upstream-reset: 1` closes the
//! connection without answering; `x-upstream-redirect: a 302 http://example.com/next` makes upstream a
//! answer that status with that location (the others answer normally).
//!
//! # Environment
//!
//! `WEFT_CONFORMANCE_FILTER=substring` runs only the files whose name contains it;
//! `WEFT_CONFORMANCE_ONLY=envoy` runs Envoy alone (checks the `expect`s: for writing cases); `=weft` runs
//! Envoy and weft on the static bootstrap, `=xds` Envoy and weft over xDS;
//! `WEFT_CONFORMANCE_VERBOSE=1` prints every answer (first repetition) in full.
//! The assembled bootstraps (JSON) and the proxies' logs stay in `<target>/weft-test/conformance/`
//! (`envoy --mode validate -c FILE`); for the xDS side `<file>.xds.json` (its bootstrap) and
//! `<file>.xds-resources.json` (the resources served, as JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use xds_api::pb::google::protobuf::Any;

use crate::xds_server::{self, XdsServer};
use crate::{tools, wait_for, ChildGuard, NetNs};

/// The HTTP listener of the shorthand.
pub const LISTENER_PORT: u16 = 19200;
/// The admin listener every bootstrap gets.
pub const ADMIN: &str = "127.0.0.1:19901";
/// The upstreams' names; `UPSTREAMS[i]` listens on 127.0.0.1:`20001 + i`.
pub const UPSTREAMS: [&str; 4] = ["a", "b", "c", "d"];
/// How long one proxy may spend on the requests of one file; later requests are not sent.
pub const FILE_DEADLINE: Duration = Duration::from_secs(60);
/// Where nothing listens (cluster `dead`).
pub const DEAD_PORT: u16 = 20009;

const DEFAULT_COMPARE: [&str; 4] = ["status", "body", "upstream", "upstream_path"];

/// One case file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    pub description: String,
    #[serde(default)]
    pub static_resources: Option<Value>,
    #[serde(default)]
    pub route_config: Option<Value>,
    #[serde(default)]
    pub hcm: Option<Mapping>,
    #[serde(default)]
    pub http_filters: Vec<Value>,
    #[serde(default)]
    pub clusters: Vec<Value>,
    pub requests: Vec<CaseRequest>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http1,
    H2c,
}

/// One request of a case file (see the module documentation).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_authority")]
    pub authority: String,
    #[serde(default)]
    pub headers: Mapping,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub body_size: usize,
    #[serde(default)]
    pub raw: Option<String>,
    #[serde(default = "one")]
    pub repeat: usize,
    #[serde(default = "one")]
    pub concurrency: usize,
    #[serde(default)]
    pub compare: Option<Vec<String>>,
    #[serde(default)]
    pub expect: Mapping,
    #[serde(default)]
    pub tolerance: Option<f64>,
    #[serde(default)]
    pub expect_distribution: BTreeMap<String, f64>,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub port: Option<u16>,
    /// Why weft answers differently (a documented difference, listed in the README): the request then
    /// passes only while weft still differs, so the marker must go when the difference is fixed.
    #[serde(default)]
    pub known_difference: Option<String>,
    /// Send over TLS (see [`ClientTls`]).
    #[serde(default)]
    pub tls: Option<ClientTls>,
    /// The case file's name (set by the loader).
    #[serde(skip)]
    pub file: String,
}

/// The client side of a TLS request: `tls: {cert: client-a, sni: b.example.com, alpn: [h2]}`. The client
/// trusts any server certificate (the suite judges the proxies' checks, not its own); `cert` names a leaf of
/// the test PKI ([`crate::pki`]) presented as the client certificate.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    #[serde(default)]
    pub cert: Option<String>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub alpn: Vec<String>,
}

fn default_method() -> String {
    "GET".into()
}
fn default_path() -> String {
    "/".into()
}
fn default_authority() -> String {
    "example.com".into()
}
fn one() -> usize {
    1
}
fn default_timeout() -> u64 {
    5_000
}

impl CaseRequest {
    /// The fields compared: `compare` (or the default) plus the `expect` keys.
    pub fn fields(&self) -> Vec<String> {
        let mut fields: Vec<String> =
            self.compare.clone().unwrap_or_else(|| DEFAULT_COMPARE.iter().map(|s| s.to_string()).collect());
        for key in self.expect.keys() {
            if let Some(k) = key.as_str() {
                if !fields.iter().any(|f| f == k) {
                    fields.push(k.to_string());
                }
            }
        }
        if !self.expect_distribution.is_empty() && !fields.iter().any(|f| f == "upstream_distribution") {
            fields.push("upstream_distribution".into());
        }
        fields
    }

    /// The `x-request-id` the harness adds so the request's access log lines can be found.
    fn log_id(&self) -> Option<String> {
        let compared = self.fields().iter().any(|f| f == "access_log");
        let has_id = self.header_list().iter().any(|(k, _)| k.eq_ignore_ascii_case("x-request-id"));
        (compared && !has_id).then(|| format!("{}-{}", self.file, self.name.replace(' ', "-")))
    }

    fn header_list(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (k, v) in &self.headers {
            let name = scalar(k).unwrap_or_default();
            match v {
                Value::Sequence(values) => out.extend(values.iter().map(|v| (name.clone(), scalar(v).unwrap_or_default()))),
                v => out.push((name, scalar(v).unwrap_or_default())),
            }
        }
        out
    }

    fn body_bytes(&self) -> Vec<u8> {
        if self.body_size > 0 {
            // Printable, non-repeating-looking ASCII (the upstream echoes the body as a JSON string).
            crate::traffic::payload(self.body_size).into_iter().map(|b| b'a' + b % 26).collect()
        } else {
            self.body.clone().into_bytes()
        }
    }
}

/// A YAML scalar as text (`200` → "200").
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some("-".into()),
        _ => None,
    }
}

/// A case file's name (without `.yaml`) and its contents, or why it could not be read.
pub type LoadedFile = (String, Result<CaseFile, String>);

/// The case files in `dir` (sorted by name) whose file name contains `filter`; a file that cannot be read
/// or parsed is an `Err` of its own, so the others still run.
pub fn load_cases(dir: &Path, filter: Option<&str>) -> Result<Vec<LoadedFile>, String> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    names.sort();
    let mut files = Vec::new();
    for path in names {
        let name = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        if filter.is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let file = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))
            .and_then(|text| serde_yaml::from_str::<CaseFile>(&text).map_err(|e| format!("{}: {e}", path.display())));
        let file = file.map(|mut f| {
            f.requests.iter_mut().for_each(|r| r.file = name.clone());
            f
        });
        files.push((name, file));
    }
    Ok(files)
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).expect("built-in YAML")
}

fn static_cluster(name: &str, port: u16) -> Value {
    yaml(&format!(
        "{{name: {name}, type: STATIC, connect_timeout: 1s, load_assignment: {{cluster_name: {name}, endpoints: \
         [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}}}"
    ))
}

/// The full bootstrap for a case file.
pub fn bootstrap(file: &CaseFile) -> Result<String, String> {
    let static_resources = match (&file.static_resources, &file.route_config) {
        (Some(_), Some(_)) => return Err("both static_resources and route_config".into()),
        (Some(s), None) => {
            if file.hcm.is_some() || !file.http_filters.is_empty() || !file.clusters.is_empty() {
                return Err("hcm/http_filters/clusters are for the route_config shorthand".into());
            }
            s.clone()
        }
        (None, None) => return Err("neither static_resources nor route_config".into()),
        (None, Some(route_config)) => {
            let mut hcm = Mapping::new();
            hcm.insert("@type".into(), "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager".into());
            hcm.insert("stat_prefix".into(), "http".into());
            hcm.insert("route_config".into(), route_config.clone());
            let mut filters = file.http_filters.clone();
            filters.push(yaml("{name: envoy.filters.http.router, typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}"));
            hcm.insert("http_filters".into(), Value::Sequence(filters));
            for (k, v) in file.hcm.iter().flatten() {
                hcm.insert(k.clone(), v.clone());
            }
            let mut listener = yaml(&format!(
                "{{name: http, address: {{socket_address: {{address: 127.0.0.1, port_value: {LISTENER_PORT}}}}}, \
                 filter_chains: [{{filters: [{{name: envoy.filters.network.http_connection_manager}}]}}]}}"
            ));
            listener["filter_chains"][0]["filters"][0]
                .as_mapping_mut()
                .expect("mapping")
                .insert("typed_config".into(), Value::Mapping(hcm));
            let mut clusters: Vec<Value> =
                UPSTREAMS.iter().enumerate().map(|(i, name)| static_cluster(name, 20001 + i as u16)).collect();
            clusters.push(static_cluster("dead", DEAD_PORT));
            clusters.extend(file.clusters.iter().cloned());
            let mut s = Mapping::new();
            s.insert("listeners".into(), Value::Sequence(vec![listener]));
            s.insert("clusters".into(), Value::Sequence(clusters));
            Value::Mapping(s)
        }
    };
    let mut root = yaml(
        "{node: {id: conformance, cluster: weft-tests}, \
         admin: {address: {socket_address: {address: 127.0.0.1, port_value: 19901}}}, layered_runtime: {}}",
    );
    root.as_mapping_mut().expect("mapping").insert("static_resources".into(), static_resources);
    // JSON, not YAML: the case files are read as YAML 1.2, where `yes` is a string; written back as YAML,
    // Envoy's YAML 1.1 parser would read it as a boolean.
    let json = serde_json::to_value(&root).map_err(|e| e.to_string())?;
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    if !text.contains("{{pki}}") {
        return Ok(text);
    }
    Ok(text.replace("{{pki}}", &crate::pki::dir()?.display().to_string()))
}

// ---------------------------------------------------------------------------------------------------------
// The same configuration over xDS

/// Where the xDS side's management server listens (in that side's namespace).
pub const XDS_ADDR: &str = "127.0.0.1:18000";
/// The xDS side's bootstrap cluster to the management server.
const XDS_CLUSTER: &str = "weft-conformance-xds";

/// Resources of one type: name → the resource as JSON, and encoded.
pub type Encoded = BTreeMap<String, (serde_json::Value, Any)>;

/// A bootstrap's static resources as a management server delivers them, and the bootstrap that gets them.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// The bootstrap (JSON): the node, admin and runtime of the static one, `dynamic_resources` with LDS and
    /// CDS over ADS (state of the world) from [`XDS_ADDR`], and only the management server's cluster.
    pub bootstrap: String,
    /// Per type URL (clusters, listeners, routes): name → the resource as JSON, and encoded.
    pub resources: Vec<(&'static str, Encoded)>,
    /// The ports of the listeners (the side waits until each accepts).
    pub ports: Vec<u16>,
}

impl XdsConfig {
    /// The names of the resources of `type_url`.
    pub fn names(&self, type_url: &str) -> Vec<String> {
        self.resources.iter().filter(|(t, _)| *t == type_url).flat_map(|(_, r)| r.keys().cloned()).collect()
    }

    /// The resources as JSON, for the work directory.
    pub fn resources_json(&self) -> serde_json::Value {
        let by_type: serde_json::Map<String, serde_json::Value> = self
            .resources
            .iter()
            .map(|(t, r)| (t.to_string(), r.values().map(|(json, _)| json.clone()).collect()))
            .collect();
        serde_json::Value::Object(by_type)
    }
}

/// The HttpConnectionManager configurations of a listener (its filter chains' and default chain's).
fn hcm_configs(listener: &mut serde_json::Value) -> Vec<&mut serde_json::Map<String, serde_json::Value>> {
    let mut out = Vec::new();
    let Some(obj) = listener.as_object_mut() else { return out };
    for (key, value) in obj.iter_mut() {
        let chains: Vec<&mut serde_json::Value> = match (key.as_str(), value) {
            ("filter_chains", serde_json::Value::Array(chains)) => chains.iter_mut().collect(),
            ("default_filter_chain", chain) => vec![chain],
            _ => continue,
        };
        for chain in chains {
            let Some(filters) = chain.get_mut("filters").and_then(serde_json::Value::as_array_mut) else { continue };
            for filter in filters {
                let Some(config) = filter.get_mut("typed_config").and_then(serde_json::Value::as_object_mut) else { continue };
                if config.get("@type").and_then(serde_json::Value::as_str).is_some_and(|t| t.ends_with(".HttpConnectionManager")) {
                    out.push(config);
                }
            }
        }
    }
    out
}

/// `value` encoded as the xDS resource `type_url` (with the agent's descriptor pool, as the test server does).
fn encode(type_url: &str, value: &serde_json::Value) -> Result<Any, String> {
    let message = type_url.rsplit('/').next().unwrap_or(type_url);
    let bytes = weft_agent::xds::codec::json_to_bytes(message, value)?;
    Ok(Any { type_url: type_url.to_string(), value: bytes })
}

/// Moves a static bootstrap's (the output of [`bootstrap`]) listeners to LDS, clusters to CDS and every
/// HttpConnectionManager's inline `route_config` to RDS (named by its listener, `<listener>-<n>` when a
/// listener has several), and encodes them. `Err` says why this bootstrap cannot be delivered so.
pub fn xds_config(static_bootstrap: &str) -> Result<XdsConfig, String> {
    use serde_json::{json, Value as Json};
    let mut root: Json = serde_json::from_str(static_bootstrap).map_err(|e| format!("the bootstrap: {e}"))?;
    let root_map = root.as_object_mut().ok_or("the bootstrap is not an object")?;
    if root_map.contains_key("dynamic_resources") {
        return Err("the bootstrap already has dynamic_resources".into());
    }
    let Some(Json::Object(mut statics)) = root_map.remove("static_resources") else {
        return Err("no static_resources".into());
    };
    let mut take = |key: &str| match statics.remove(key) {
        None => Ok(Vec::new()),
        Some(Json::Array(items)) => Ok(items),
        Some(other) => Err(format!("static_resources.{key} is not a list: {other}")),
    };
    let mut listeners = take("listeners")?;
    let clusters = take("clusters")?;
    if let Some(key) = statics.keys().next() {
        return Err(format!("static_resources.{key} has no LDS/CDS/RDS equivalent here"));
    }
    let mut routes = Vec::new();
    let mut ports = Vec::new();
    for (i, listener) in listeners.iter_mut().enumerate() {
        let name = match listener.get("name").and_then(Json::as_str) {
            Some(name) => name.to_string(),
            None => {
                // Static listeners may go unnamed; LDS resources are named.
                let name = format!("listener-{i}");
                listener.as_object_mut().ok_or("a listener is not an object")?.insert("name".into(), name.clone().into());
                name
            }
        };
        if let Some(port) = listener["address"]["socket_address"]["port_value"].as_u64() {
            ports.push(u16::try_from(port).map_err(|_| format!("listener {name}: port {port}"))?);
        }
        let hcms = hcm_configs(listener);
        let several = hcms.len() > 1;
        for (n, hcm) in hcms.into_iter().enumerate() {
            let Some(mut route_config) = hcm.remove("route_config") else { continue };
            let route_name = if several { format!("{name}-{n}") } else { name.clone() };
            route_config
                .as_object_mut()
                .ok_or_else(|| format!("listener {name}: route_config is not an object"))?
                .insert("name".into(), route_name.clone().into());
            hcm.insert(
                "rds".into(),
                json!({"route_config_name": route_name, "config_source": {"ads": {}, "resource_api_version": "V3"}}),
            );
            routes.push(route_config);
        }
    }
    let mut resources = Vec::new();
    for (type_url, items) in [(xds_server::CLUSTER, clusters), (xds_server::LISTENER, listeners), (xds_server::ROUTE, routes)] {
        let kind = type_url.rsplit('.').next().unwrap_or(type_url);
        let mut named = BTreeMap::new();
        for item in items {
            let name = item.get("name").and_then(Json::as_str).ok_or_else(|| format!("a {kind} without a name"))?.to_string();
            if type_url == xds_server::CLUSTER && name == XDS_CLUSTER {
                return Err(format!("cluster {name} is the management server's"));
            }
            let any = encode(type_url, &item).map_err(|e| format!("encoding {kind} {name}: {e}"))?;
            if named.insert(name.clone(), (item, any)).is_some() {
                return Err(format!("two {kind}s named {name}"));
            }
        }
        resources.push((type_url, named));
    }
    let (xds_host, xds_port) = XDS_ADDR.split_once(':').expect("host:port");
    root_map.insert(
        "dynamic_resources".into(),
        json!({
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        }),
    );
    root_map.insert(
        "static_resources".into(),
        json!({"clusters": [{
            "name": XDS_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }},
            "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": xds_host, "port_value": xds_port.parse::<u16>().expect("port")},
            }}}]}]},
        }]}),
    );
    let bootstrap = serde_json::to_string_pretty(&root).map_err(|e| e.to_string())?;
    Ok(XdsConfig { bootstrap, resources, ports })
}

// ---------------------------------------------------------------------------------------------------------
// Upstreams

type Reply = hyper::Response<Full<Bytes>>;

async fn upstream_reply(name: &'static str, mut req: hyper::Request<Incoming>) -> io::Result<Reply> {
    if req.method() == hyper::Method::CONNECT {
        return Ok(accept_connect(name, &mut req));
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    let all = |h: &str| -> Vec<String> {
        parts.headers.get_all(h).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect()
    };
    let first = |h: &str| all(h).into_iter().next();
    if first("x-upstream-reset").is_some_and(|v| v == "1") {
        return Err(io::Error::other("scripted reset"));
    }
    if let Some(ms) = first("x-upstream-delay-ms").and_then(|v| v.trim().parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let failing = first("x-upstream-fail-on").is_some_and(|v| v.split(',').any(|n| n.trim() == name));
    // `x-upstream-redirect: NAME STATUS LOCATION`: upstream NAME answers STATUS with that location.
    let redirect = all("x-upstream-redirect").into_iter().find_map(|spec| {
        let mut parts = spec.split_whitespace();
        let (who, status, location) = (parts.next()?, parts.next()?.parse::<u16>().ok()?, parts.next()?);
        (who == name).then(|| (status, location.to_string()))
    });
    let status = if failing {
        503
    } else if let Some((status, _)) = &redirect {
        *status
    } else {
        first("x-upstream-status").and_then(|v| v.trim().parse::<u16>().ok()).unwrap_or(200)
    };
    let mut headers = serde_json::Map::new();
    for key in parts.headers.keys() {
        headers.insert(key.as_str().to_string(), all(key.as_str()).join(",").into());
    }
    let (path, authority) = if parts.version == hyper::Version::HTTP_2 {
        (
            parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
            parts.uri.authority().map(|a| a.to_string()).unwrap_or_default(),
        )
    } else {
        (parts.uri.to_string(), first("host").unwrap_or_default())
    };
    let json = serde_json::json!({
        "upstream": name,
        "method": parts.method.as_str(),
        "path": path,
        "version": format!("{:?}", parts.version),
        "authority": authority,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let mut reply = hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some((_, location)) = &redirect {
        reply = reply.header("location", location.as_str());
    }
    for spec in all("x-upstream-header") {
        if let Some((k, v)) = spec.split_once('=') {
            reply = reply.header(k.trim(), v.trim());
        }
    }
    reply.body(Full::new(Bytes::from(json.to_string()))).map_err(io::Error::other)
}

/// A CONNECT reaching an upstream (forwarded by the proxy): 200, then the tunnel answers the first bytes it
/// carries with `NAME <target>: <bytes>` and closes.
fn accept_connect(name: &'static str, req: &mut hyper::Request<Incoming>) -> Reply {
    let target = req.uri().to_string();
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut tunnel = TokioIo::new(upgraded);
        let mut buf = vec![0; 4096];
        if let Ok(n) = tunnel.read(&mut buf).await {
            let _ = tunnel.write_all(format!("{name} {target}: {}", String::from_utf8_lossy(&buf[..n])).as_bytes()).await;
        }
        let _ = tunnel.shutdown().await;
    });
    hyper::Response::new(Full::new(Bytes::new()))
}

async fn serve_upstream(name: &'static str, listener: std::net::TcpListener) {
    let listener = match listener.set_nonblocking(true).and_then(|_| tokio::net::TcpListener::from_std(listener)) {
        Ok(l) => l,
        Err(e) => panic!("upstream {name}: {e}"),
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| upstream_reply(name, req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await;
        });
    }
}

// ---------------------------------------------------------------------------------------------------------
// Client

/// What a client observed.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub status: String,
    pub error: Option<String>,
    /// Lowercased names, repeated ones joined with ",".
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// The body parsed as one of the upstreams' JSON answers.
    pub upstream: Option<serde_json::Value>,
    /// The access log lines the proxy wrote for the request (normalised), when the request compares them.
    pub access_log: Option<String>,
}

impl Observed {
    fn error(e: impl std::fmt::Display) -> Observed {
        Observed { status: "ERR".into(), error: Some(e.to_string()), ..Default::default() }
    }

    fn finish(mut self) -> Observed {
        self.upstream = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .filter(|v| v.get("upstream").is_some_and(|u| u.is_string()) && v.get("headers").is_some());
        self
    }

    fn echoed_body(&self) -> Vec<u8> {
        match &self.upstream {
            Some(u) => u["body"].as_str().unwrap_or_default().as_bytes().to_vec(),
            None => self.body.clone(),
        }
    }

    /// The value of one field (see the module documentation).
    pub fn field(&self, field: &str) -> String {
        let up = |key: &str| match &self.upstream {
            Some(u) => u[key].as_str().map(str::to_string).unwrap_or_else(|| "-".into()),
            None => "-".into(),
        };
        match field {
            "status" => self.status.clone(),
            "error" => self.error.clone().unwrap_or_else(|| "-".into()),
            "body" => String::from_utf8_lossy(&self.echoed_body()).into_owned(),
            "body_digest" => {
                let body = self.echoed_body();
                format!("len={} fnv={:016x}", body.len(), fnv1a(&body))
            }
            "upstream" => up("upstream"),
            "upstream_path" => up("path"),
            "upstream_method" => up("method"),
            "upstream_version" => up("version"),
            "upstream_authority" => up("authority"),
            "access_log" => self.access_log.clone().unwrap_or_else(|| "-".into()),
            f => {
                if let Some(h) = f.strip_prefix("upstream_header.") {
                    match &self.upstream {
                        Some(u) => u["headers"][h.to_ascii_lowercase()].as_str().map(str::to_string).unwrap_or_else(|| "-".into()),
                        None => "-".into(),
                    }
                } else if let Some(h) = f.strip_prefix("header.") {
                    self.headers.get(&h.to_ascii_lowercase()).cloned().unwrap_or_else(|| "-".into())
                } else {
                    format!("<unknown field {f}>")
                }
            }
        }
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Sends one request to 127.0.0.1:`port` (from the calling task's network namespace).
pub async fn send(req: &CaseRequest, port: u16) -> Observed {
    let deadline = Duration::from_millis(req.timeout_ms);
    match tokio::time::timeout(deadline, send_inner(req, port)).await {
        Ok(Ok(o)) => o.finish(),
        Ok(Err(e)) => Observed::error(e),
        Err(_) => Observed::error(format!("no answer within {deadline:?}")),
    }
}

async fn send_inner(req: &CaseRequest, port: u16) -> Result<Observed, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = match &req.tls {
        None => Box::new(tcp),
        Some(tls) => Box::new(crate::tls_client::connect(tcp, tls).await?),
    };
    if let Some(raw) = &req.raw {
        return send_raw(stream, raw).await;
    }
    let body = Full::new(Bytes::from(req.body_bytes()));
    let mut builder = hyper::Request::builder().method(req.method.as_str());
    match req.protocol {
        Protocol::Http1 => {
            builder = builder.uri(req.path.as_str()).header("host", req.authority.as_str());
        }
        Protocol::H2c => {
            builder = builder.uri(format!("http://{}{}", req.authority, req.path)).version(hyper::Version::HTTP_2);
        }
    }
    for (k, v) in req.header_list() {
        builder = builder.header(k, v);
    }
    if let Some(id) = req.log_id() {
        builder = builder.header("x-request-id", id);
    }
    let request = builder.body(body).map_err(|e| format!("building the request: {e}"))?;
    let io = TokioIo::new(stream);
    let response = match req.protocol {
        Protocol::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender.send_request(request).await.map_err(|e| e.to_string())?
        }
        Protocol::H2c => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender.send_request(request).await.map_err(|e| e.to_string())?
        }
    };
    let (parts, body) = response.into_parts();
    let mut headers = BTreeMap::<String, String>::new();
    for (k, v) in &parts.headers {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        headers.entry(k.as_str().to_string()).and_modify(|old| *old = format!("{old},{v}")).or_insert(v);
    }
    let body = body.collect().await.map_err(|e| format!("reading the body: {e}"))?.to_bytes().to_vec();
    Ok(Observed { status: parts.status.as_u16().to_string(), error: None, headers, body, upstream: None, access_log: None })
}

/// Writes `raw` and parses the HTTP/1 answer by hand (until it is complete or the connection closes).
/// A client connection, plaintext or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

async fn send_raw(mut stream: Box<dyn Io>, raw: &str) -> Result<Observed, String> {
    let bytes = if raw.contains("\r\n") { raw.to_string() } else { raw.replace('\n', "\r\n") };
    stream.write_all(bytes.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(o) = parse_response(&buf, false) {
            return Ok(o);
        }
        match stream.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    parse_response(&buf, true).ok_or_else(|| {
        if buf.is_empty() {
            "connection closed without an answer".to_string()
        } else {
            format!("unparsable answer: {:?}", String::from_utf8_lossy(&buf))
        }
    })
}

/// The response in `buf` if it is complete (or, at `eof`, whatever arrived).
fn parse_response(buf: &[u8], eof: bool) -> Option<Observed> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let rest = &buf[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.to_string();
    let mut headers = BTreeMap::<String, String>::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
            headers.entry(k).and_modify(|old| *old = format!("{old},{v}")).or_insert(v);
        }
    }
    let body = if headers.get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        dechunk(rest).or_else(|| eof.then(|| rest.to_vec()))?
    } else if let Some(len) = headers.get("content-length").and_then(|l| l.parse::<usize>().ok()) {
        if rest.len() < len && !eof {
            return None;
        }
        rest[..len.min(rest.len())].to_vec()
    } else if status.starts_with('1') || status == "204" || status == "304" {
        Vec::new()
    } else if eof {
        rest.to_vec()
    } else {
        return None;
    };
    Some(Observed { status, error: None, headers, body, upstream: None, access_log: None })
}

/// A complete chunked body, or `None` while it is incomplete.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&rest[..line_end]).ok()?.split(';').next()?.trim();
        let size = usize::from_str_radix(size, 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if rest.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------------------------
// Proxies

/// Which proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    Envoy,
    /// weft on the static bootstrap.
    Weft,
    /// weft with the same listeners, clusters and routes over xDS (see [`xds_config`]).
    WeftXds,
}

impl Proxy {
    pub fn name(self) -> &'static str {
        match self {
            Proxy::Envoy => "envoy",
            Proxy::Weft => "weft",
            Proxy::WeftXds => "weft-xds",
        }
    }

    fn command(self, config: &Path) -> Result<Command, String> {
        let mut cmd = match self {
            Proxy::Envoy => tools::envoy_command().map_err(|e| e.to_string())?,
            Proxy::Weft | Proxy::WeftXds => {
                let mut c = Command::new(tools::bin_path("weft-agent").map_err(|e| e.to_string())?);
                c.arg("proxy");
                c
            }
        };
        cmd.arg("-c").arg(config).args(["--concurrency", "1", "--log-level", "warn"]);
        if self == Proxy::Envoy {
            // Envoy writes access logs every 10 s by default; the harness reads them once the proxy stopped.
            cmd.args(["--file-flush-interval-msec", "50"]);
        }
        Ok(cmd)
    }
}

/// Where a proxy started with `log` as its stderr writes its stdout (its `/dev/stdout` access logs).
fn stdout_of(log: &Path) -> PathBuf {
    log.with_extension("stdout")
}

/// An access log line with what differs between any two runs replaced: times, ephemeral ports, durations.
pub fn normalize_log_line(line: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(map)) => {
            let normalized: serde_json::Map<String, serde_json::Value> = map
                .into_iter()
                .map(|(k, v)| {
                    let v = match (&*k, v) {
                        ("duration" | "upstream_service_time", v) if !v.is_null() => serde_json::Value::String("<ms>".into()),
                        (_, serde_json::Value::String(s)) => serde_json::Value::String(normalize_token(&s)),
                        (_, v) => v,
                    };
                    (k, v)
                })
                .collect();
            serde_json::Value::Object(normalized).to_string()
        }
        _ => line.split(' ').map(|token| {
            let core = token.trim_matches(|c| c == '"' || c == '[' || c == ']');
            token.replace(core, &normalize_token(core))
        }).collect::<Vec<_>>().join(" "),
    }
}

fn normalize_token(s: &str) -> String {
    let b = s.as_bytes();
    let time = b.len() == 24 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && b[23] == b'Z';
    if time {
        return "<time>".into();
    }
    match s.parse::<std::net::SocketAddr>() {
        Ok(a) if a.port() >= 32768 => format!("{}:<port>", a.ip()),
        _ => s.to_string(),
    }
}

/// One proxy's namespace: its upstreams and a tokio runtime whose threads live in the namespace (so the
/// client's sockets are made there).
pub struct Side {
    pub proxy: Proxy,
    pub ns: NetNs,
    rt: tokio::runtime::Runtime,
    /// The management server of the xDS side.
    xds: Option<XdsServer>,
    /// The xDS side's last resource version (one per file).
    version: std::sync::atomic::AtomicU64,
}

/// What the xDS side waits for after start-up: `version` of the resources acknowledged, and the listeners.
struct XdsWait<'a> {
    config: &'a XdsConfig,
    version: String,
    /// The server's requests before this start (the rest are this process's).
    since: usize,
}

impl Side {
    /// A fresh namespace `name` with loopback up and the four upstreams.
    pub fn new(proxy: Proxy, name: &str) -> Result<Side, String> {
        let ns = NetNs::create_with_lo(name).map_err(|e| e.to_string())?;
        // Threads inherit the network namespace of the thread that spawns them: the runtime built on a
        // thread inside `ns` has all its workers (and their blocking pool) there.
        let rt = ns
            .try_run_in(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build())
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        for (i, name) in UPSTREAMS.iter().enumerate() {
            let listener = ns.tcp_listen(("127.0.0.1", 20001 + i as u16)).map_err(|e| format!("upstream {name}: {e}"))?;
            rt.spawn(serve_upstream(name, listener));
        }
        let xds = match proxy {
            Proxy::WeftXds => Some(
                XdsServer::start(&ns, XDS_ADDR.parse().expect("address")).map_err(|e| format!("management server: {e}"))?,
            ),
            _ => None,
        };
        Ok(Side { proxy, ns, rt, xds, version: Default::default() })
    }

    /// Runs `fut` on the runtime (never on the calling thread, which is outside the namespace).
    fn run<F, T>(&self, fut: F) -> T
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let handle = self.rt.spawn(fut);
        self.rt.block_on(handle).expect("conformance task panicked")
    }

    /// Starts the proxy on `config` and waits for its admin /ready (and with `xds`, for the resources to be
    /// acknowledged and the listeners to accept); the error carries its stderr.
    fn start(&self, config: &Path, log: &Path, xds: Option<&XdsWait>) -> Result<ChildGuard, String> {
        let mut cmd = self.proxy.command(config)?;
        let log_file = std::fs::File::create(log).map_err(|e| e.to_string())?;
        let stdout = std::fs::File::create(stdout_of(log)).map_err(|e| e.to_string())?;
        cmd.stdout(stdout).stderr(log_file);
        self.ns.enter_on_spawn(&mut cmd);
        let mut child = ChildGuard::new(cmd.spawn().map_err(|e| format!("spawning {}: {e}", self.proxy.name()))?, self.proxy.name());
        child.set_grace(Duration::from_secs(2));
        let mut exited = None;
        let mut rejected = None;
        let what = match xds {
            None => format!("{} /ready", self.proxy.name()),
            Some(_) => format!("{} /ready, the xDS resources acknowledged and the listeners accepting", self.proxy.name()),
        };
        let ready = wait_for(&what, Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.wait_timeout(Duration::ZERO) {
                exited = Some(status);
                return Ok(());
            }
            if let Some(wait) = xds {
                if let Some(nack) = self.xds_rejected(wait) {
                    rejected = Some(nack);
                    return Ok(());
                }
            }
            let ready = crate::traffic::http(&self.ns, ADMIN.parse().unwrap(), "GET", "admin", "/ready").map_err(|e| e.to_string())?;
            if ready.status != 200 {
                return Err(ready.head);
            }
            match xds {
                Some(wait) => self.xds_synced(wait),
                None => Ok(()),
            }
        });
        let failure = match (ready, exited, rejected) {
            (Ok(()), None, None) => return Ok(child),
            (_, Some(status), _) => format!("{} exited at start-up ({status})", self.proxy.name()),
            (_, None, Some(nack)) => nack,
            (Err(e), None, None) => e.to_string(),
        };
        drop(child);
        let stderr = std::fs::read_to_string(log).unwrap_or_default();
        Err(format!("{failure}\n{}", stderr.trim_end()))
    }

    /// A NACK of this start's resources, as the error.
    fn xds_rejected(&self, wait: &XdsWait) -> Option<String> {
        let server = self.xds.as_ref()?;
        let requests = server.requests();
        let nack = requests.get(wait.since..)?.iter().find(|r| r.error.is_some() && !r.response_nonce.is_empty())?;
        let kind = nack.type_url.rsplit('.').next().unwrap_or_default();
        Some(format!("weft rejected (NACK) {kind} version {}: {}", wait.version, nack.error.clone().unwrap_or_default()))
    }

    /// `Ok` once CDS, LDS and RDS (every route name subscribed) acknowledged this start's version and every
    /// listener port accepts a connection; `Err` says what is missing.
    fn xds_synced(&self, wait: &XdsWait) -> Result<(), String> {
        let server = self.xds.as_ref().ok_or("no management server")?;
        let requests = server.requests();
        let recent = requests.get(wait.since..).unwrap_or_default();
        for (type_url, _) in &wait.config.resources {
            let names = wait.config.names(type_url);
            // Wildcard types are acknowledged whatever they hold; RDS only once there is a route to ask for.
            if *type_url == xds_server::ROUTE && names.is_empty() {
                continue;
            }
            let acked = recent.iter().any(|r| {
                r.type_url == *type_url
                    && r.is_ack()
                    && r.version_info == wait.version
                    && (*type_url != xds_server::ROUTE || names.iter().all(|n| r.names.contains(n)))
            });
            if !acked {
                let kind = type_url.rsplit('.').next().unwrap_or_default();
                let last = recent.iter().rev().find(|r| r.type_url == *type_url);
                return Err(format!("no ACK of {kind} version {} (names {names:?}); its last request: {last:?}", wait.version));
            }
        }
        for port in &wait.config.ports {
            self.ns
                .tcp_connect(std::net::SocketAddr::from(([127, 0, 0, 1], *port)), Duration::from_secs(1))
                .map_err(|e| format!("listener port {port}: {e}"))?;
        }
        Ok(())
    }

    fn stop(&self, mut child: ChildGuard) {
        let _ = crate::traffic::http(&self.ns, ADMIN.parse().unwrap(), "POST", "admin", "/quitquitquit");
        if !matches!(child.wait_timeout(Duration::from_secs(5)), Ok(Some(_))) {
            let _ = child.stop();
        }
    }

    /// Starts the proxy on `config`, sends every request in order, stops it. `Err` when it did not start.
    pub fn answers(&self, config: &Path, log: &Path, requests: &[CaseRequest]) -> Result<Vec<Vec<Observed>>, String> {
        let child = self.start(config, log, None)?;
        Ok(self.send_all(child, requests, log))
    }

    /// [`Side::answers`] for the xDS side: serves `xds`'s resources (a new version) from the side's
    /// management server, starts weft on `xds.bootstrap` (written at `config`), waits until it acknowledged
    /// them and its listeners accept, then sends the requests.
    pub fn answers_over_xds(&self, xds: &XdsConfig, config: &Path, log: &Path, requests: &[CaseRequest]) -> Result<Vec<Vec<Observed>>, String> {
        let server = self.xds.as_ref().ok_or("this side has no management server")?;
        let version = (self.version.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1).to_string();
        let since = server.requests().len();
        for (type_url, resources) in &xds.resources {
            let encoded = resources.iter().map(|(name, (_, any))| (name.clone(), any.clone())).collect();
            server.publish(type_url, &version, encoded);
        }
        let child = self.start(config, log, Some(&XdsWait { config: xds, version, since }))?;
        Ok(self.send_all(child, requests, log))
    }

    /// Sends every request in order, then stops `child` and reads the access log lines of the requests that
    /// compare them from its stdout (next to `log`).
    fn send_all(&self, child: ChildGuard, requests: &[CaseRequest], log: &Path) -> Vec<Vec<Observed>> {
        let mut answers = self.send_each(child, requests);
        let stdout = std::fs::read_to_string(stdout_of(log)).unwrap_or_default();
        for (req, observed) in requests.iter().zip(&mut answers) {
            if let Some(id) = req.log_id() {
                let lines: Vec<String> = stdout.lines().filter(|l| l.contains(&id)).map(normalize_log_line).collect();
                let logged = (!lines.is_empty()).then(|| lines.join("\n"));
                observed.iter_mut().for_each(|o| o.access_log = logged.clone());
            }
        }
        answers
    }

    fn send_each(&self, child: ChildGuard, requests: &[CaseRequest]) -> Vec<Vec<Observed>> {
        let requests = requests.to_vec();
        let answers = self.run(async move {
            let file_deadline = Instant::now() + FILE_DEADLINE;
            let mut all = Vec::new();
            for req in &requests {
                let port = req.port.unwrap_or(LISTENER_PORT);
                let wanted = req.repeat.max(1);
                let mut answers = Vec::with_capacity(wanted);
                let batch_size = req.concurrency.max(1);
                let req = Arc::new(req.clone());
                // A proxy that does not answer must not hold the suite for repeat × timeout: after 3 client
                // time-outs (or past the file's deadline) the remaining repetitions get the last error.
                let mut timeouts = 0;
                while answers.len() < wanted {
                    if Instant::now() > file_deadline || timeouts >= 3 {
                        let why = if timeouts >= 3 {
                            answers.last().cloned().unwrap_or_else(|| Observed::error("not sent"))
                        } else {
                            Observed::error(format!("not sent: the file took over {FILE_DEADLINE:?}"))
                        };
                        answers.resize(wanted, why);
                        break;
                    }
                    let batch = (wanted - answers.len()).min(batch_size);
                    let tasks: Vec<_> = (0..batch)
                        .map(|_| {
                            let req = Arc::clone(&req);
                            tokio::spawn(async move { send(&req, port).await })
                        })
                        .collect();
                    for t in tasks {
                        let answer = t.await.unwrap_or_else(Observed::error);
                        if answer.error.as_deref().is_some_and(|e| e.starts_with("no answer within")) {
                            timeouts += 1;
                        }
                        answers.push(answer);
                    }
                }
                all.push(answers);
            }
            all
        });
        self.stop(child);
        answers
    }
}

// ---------------------------------------------------------------------------------------------------------
// Comparison and report

/// The verdict on one request.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub file: String,
    /// Whose answers were judged: `weft`, `weft-xds`, or `envoy` (when no weft side ran).
    pub proxy: &'static str,
    pub request: String,
    /// Empty when it passed.
    pub problems: Vec<String>,
    /// Whether an `expect` failed for Envoy (the case is wrong, or Envoy changed).
    pub envoy_broken: bool,
    /// A documented difference that still holds: the differences found, which do not fail the suite.
    pub known: Option<String>,
    /// Why the file was not run on this side (its one row; not a failure).
    pub skipped: Option<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A field over repetitions: the value itself, or a histogram.
fn summarize(answers: &[Observed], field: &str) -> String {
    if field == "upstream_distribution" {
        let dist = distribution(answers);
        return dist.iter().map(|(k, v)| format!("{k}={v:.3}")).collect::<Vec<_>>().join(" ");
    }
    if answers.len() == 1 {
        return answers[0].field(field);
    }
    let mut counts = BTreeMap::<String, usize>::new();
    for a in answers {
        *counts.entry(a.field(field)).or_default() += 1;
    }
    counts.iter().map(|(v, n)| format!("{v}×{n}")).collect::<Vec<_>>().join(" ")
}

fn distribution(answers: &[Observed]) -> BTreeMap<String, f64> {
    let mut counts = BTreeMap::<String, usize>::new();
    for a in answers {
        *counts.entry(a.field("upstream")).or_default() += 1;
    }
    counts.into_iter().map(|(k, n)| (k, n as f64 / answers.len().max(1) as f64)).collect()
}

fn shorten(s: &str) -> String {
    let one_line = s.replace('\n', "\\n").replace('\r', "\\r");
    if one_line.chars().count() > 160 {
        format!("{}…", one_line.chars().take(600).collect::<String>())
    } else {
        one_line
    }
}

/// Checks `expect` and `expect_distribution` on one proxy's answers: (field, problem) pairs.
fn check_expect(req: &CaseRequest, proxy: Proxy, answers: &[Observed]) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let tolerance = req.tolerance.unwrap_or(0.03);
    for (k, v) in &req.expect {
        let (Some(field), Some(want)) = (k.as_str(), scalar(v)) else {
            problems.push((String::new(), format!("bad expect entry {k:?}: {v:?}")));
            continue;
        };
        let got = if answers.len() > 1 && want.contains('×') {
            Some(summarize(answers, field)).filter(|got| *got != want)
        } else {
            answers.iter().map(|a| a.field(field)).find(|got| *got != want)
        };
        if let Some(got) = got {
            problems.push((field.to_string(), format!("{} expect {field}={:?}: got {:?}", proxy.name(), shorten(&want), shorten(&got))));
        }
    }
    if !req.expect_distribution.is_empty() {
        let dist = distribution(answers);
        for (name, want) in &req.expect_distribution {
            let got = dist.get(name).copied().unwrap_or(0.0);
            if (got - want).abs() > tolerance {
                let problem = format!("{} expect_distribution {name}={want}: got {got:.3}", proxy.name());
                problems.push(("upstream_distribution".to_string(), problem));
            }
        }
    }
    problems
}

/// The first client-side error among `answers`, as a note for the table.
fn error_note(proxy: Proxy, answers: &[Observed]) -> Option<String> {
    answers.iter().find_map(|a| a.error.as_deref()).map(|e| format!("({} client error: {})", proxy.name(), shorten(e)))
}

/// Compares Envoy's and weft's (static bootstrap) answers to one request: [`judge_proxy`] for [`Proxy::Weft`].
pub fn judge(file: &str, req: &CaseRequest, envoy: Result<&[Observed], &str>, weft: Option<Result<&[Observed], &str>>) -> Outcome {
    judge_proxy(file, req, envoy, Proxy::Weft, weft, None)
}

/// Compares Envoy's and `proxy`'s answers to one request (`answers` is `None` when no weft was run: the row
/// is then Envoy's). Reported: Envoy's failed `expect`s (the case or Envoy is wrong), the fields where
/// `proxy` differs from Envoy, and its failed `expect`s on fields where it agrees with Envoy (both wrong the
/// same way). With `reference` (the static weft side's answers, when judging the xDS side), also every
/// field where the answers differ from those: configuration delivered over xDS must behave exactly as the
/// same configuration from a file, so a `known_difference` must show the same way too.
pub fn judge_proxy(
    file: &str,
    req: &CaseRequest,
    envoy: Result<&[Observed], &str>,
    proxy: Proxy,
    answers: Option<Result<&[Observed], &str>>,
    reference: Option<&[Observed]>,
) -> Outcome {
    let mut problems: Vec<String> = match envoy {
        Ok(a) => {
            let mut p: Vec<String> = check_expect(req, Proxy::Envoy, a).into_iter().map(|(_, p)| p).collect();
            if !p.is_empty() {
                p.extend(error_note(Proxy::Envoy, a));
            }
            p
        }
        Err(why) => vec![format!("envoy did not start: {}", shorten(why))],
    };
    let envoy_broken = !problems.is_empty();
    let envoy = envoy.ok();
    let outcome = |problems, known| Outcome {
        file: file.to_string(),
        proxy: if answers.is_some() { proxy.name() } else { Proxy::Envoy.name() },
        request: req.name.clone(),
        problems,
        envoy_broken,
        known,
        skipped: None,
    };
    match answers {
        None => {}
        Some(Err(why)) => problems.push(format!("{} did not start: {}", proxy.name(), shorten(why))),
        Some(Ok(weft)) => {
            let mut differing = Vec::new();
            let mut weft_problems = Vec::new();
            if let Some(envoy) = envoy {
                for field in req.fields() {
                    let (e, w) = (summarize(envoy, &field), summarize(weft, &field));
                    if field == "upstream_distribution" {
                        let tolerance = req.tolerance.unwrap_or(0.03);
                        let (de, dw) = (distribution(envoy), distribution(weft));
                        let differs = de.keys().chain(dw.keys()).any(|k| {
                            (de.get(k).copied().unwrap_or(0.0) - dw.get(k).copied().unwrap_or(0.0)).abs() > tolerance
                        });
                        if differs {
                            weft_problems.push(format!("{field}: envoy={e:?} {}={w:?} (tolerance {tolerance})", proxy.name()));
                            differing.push(field);
                        }
                    } else if e != w {
                        weft_problems.push(format!("{field}: envoy={:?} {}={:?}", shorten(&e), proxy.name(), shorten(&w)));
                        differing.push(field);
                    }
                }
            }
            for (field, problem) in check_expect(req, proxy, weft) {
                if !differing.contains(&field) {
                    weft_problems.push(problem);
                }
            }
            if !weft_problems.is_empty() {
                weft_problems.extend(error_note(proxy, weft));
            }
            // Unlike the same configuration from a file: never excused by a known difference.
            if let Some(reference) = reference {
                let mut unlike = Vec::new();
                for field in req.fields() {
                    // Sampled: each side is held to Envoy's within the tolerance above.
                    if field == "upstream_distribution" {
                        continue;
                    }
                    let (r, a) = (summarize(reference, &field), summarize(weft, &field));
                    if r != a {
                        unlike.push(format!("{field}: weft={:?} {}={:?}", shorten(&r), proxy.name(), shorten(&a)));
                    }
                }
                if !unlike.is_empty() {
                    problems.push(format!("unlike weft on the static bootstrap: {}", unlike.join("; ")));
                }
            }
            match &req.known_difference {
                Some(_) if weft_problems.is_empty() && !envoy_broken => {
                    problems.push(format!("{} now answers as Envoy does: remove known_difference from the case", proxy.name()));
                }
                Some(why) if !envoy_broken => {
                    let known = format!("known difference ({why}): {}", weft_problems.join("; "));
                    return outcome(problems, Some(known));
                }
                _ => problems.extend(weft_problems),
            }
        }
    }
    outcome(problems, None)
}

/// The line of a start-up failure that says why, shortened for the table (the whole text is printed once):
/// without the file name, with `<hcm>` for the shorthand's HttpConnectionManager path.
fn start_reason(why: &str) -> String {
    let lines: Vec<&str> = why.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    // The xDS side's NACK (its first line) says it best; the log after it repeats it with a timestamp.
    let nack = lines.first().filter(|l| l.starts_with("weft rejected (NACK)"));
    let line = nack
        .or_else(|| lines.iter().rev().find(|l| l.contains("rror") || l.contains("not supported") || l.contains("critical")))
        .or(lines.last())
        .map(|l| l.to_string())
        .unwrap_or_default();
    let line = match line.find("configuration '").and_then(|i| line[i..].find("': ").map(|j| i + j + 3)) {
        Some(start) => line[start..].to_string(),
        None => line,
    };
    line.replace("static_resources.listeners[0].filter_chains[0].filters[0].typed_config.", "<hcm>.")
        .replace("; remove it or see docs/envoy-config.md", "")
}

/// Where the assembled bootstraps and the proxies' logs go.
pub fn work_dir() -> PathBuf {
    tools::harness_dir().join("conformance")
}

/// Every request of `file` as one row (a file that could not be run at all).
fn file_rows(name: &str, file: &CaseFile, proxy: &'static str, problem: &str) -> Vec<Outcome> {
    file.requests
        .iter()
        .map(|r| Outcome {
            file: name.into(),
            proxy,
            request: r.name.clone(),
            problems: vec![problem.to_string()],
            envoy_broken: true,
            known: None,
            skipped: None,
        })
        .collect()
}

/// Runs one case file against the sides, all at once: Envoy, weft on the static bootstrap if present, and
/// weft over xDS if present (skipped, with the reason as its one row, when the configuration cannot be
/// delivered so).
pub fn run_file(name: &str, file: &CaseFile, envoy: &Side, weft: Option<&Side>, xds: Option<&Side>) -> Vec<Outcome> {
    let dir = work_dir();
    let config = dir.join(format!("{name}.json"));
    let written = bootstrap(file).and_then(|text| {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(&config, &text).map_err(|e| e.to_string())?;
        Ok(text)
    });
    let text = match written {
        Ok(text) => text,
        Err(e) => return file_rows(name, file, Proxy::Envoy.name(), &format!("bad case file: {e}")),
    };
    // The xDS side's bootstrap (next to the static one) and resources, or why the file is skipped there.
    let xds_config_path = dir.join(format!("{name}.xds.json"));
    let over_xds = xds.map(|_| {
        let xds = xds_config(&text)?;
        std::fs::write(&xds_config_path, &xds.bootstrap).map_err(|e| e.to_string())?;
        let resources = serde_json::to_string_pretty(&xds.resources_json()).map_err(|e| e.to_string())?;
        std::fs::write(dir.join(format!("{name}.xds-resources.json")), resources).map_err(|e| e.to_string())?;
        Ok::<_, String>(xds)
    });
    if let Some(Err(why)) = &over_xds {
        eprintln!("--- {name}: SKIPPED on the xDS side: {why}");
    }
    let run = |side: &Side| {
        let log = dir.join(format!("{name}.{}.log", side.proxy.name()));
        let answers = match (side.proxy, &over_xds) {
            (Proxy::WeftXds, Some(Ok(xds))) => side.answers_over_xds(xds, &xds_config_path, &log, &file.requests),
            (Proxy::WeftXds, _) => Err("no xDS configuration".to_string()),
            _ => side.answers(&config, &log, &file.requests),
        };
        answers.map_err(|e| {
            eprintln!("--- {name}: {} did not start:\n{e}\n---", side.proxy.name());
            start_reason(&e)
        })
    };
    let xds = xds.filter(|_| matches!(over_xds, Some(Ok(_))));
    let timed = |side: &Side| {
        let started = Instant::now();
        let answers = run(side);
        (answers, format!("{} {:.1}s", side.proxy.name(), started.elapsed().as_secs_f64()))
    };
    let started = Instant::now();
    let ((e, te), w, x) = std::thread::scope(|s| {
        let w = weft.map(|side| s.spawn(move || timed(side)));
        let x = xds.map(|side| s.spawn(move || timed(side)));
        let e = timed(envoy);
        (e, w.map(|h| h.join().expect("weft side panicked")), x.map(|h| h.join().expect("weft-xds side panicked")))
    });
    let (w, tw) = w.map_or((None, None), |(w, t)| (Some(w), Some(t)));
    let (x, tx) = x.map_or((None, None), |(x, t)| (Some(x), Some(t)));
    if started.elapsed() > Duration::from_secs(5) {
        let times: Vec<String> = [Some(te), tw, tx].into_iter().flatten().collect();
        eprintln!("{name}: slow: {}", times.join(", "));
    }
    if std::env::var_os("WEFT_CONFORMANCE_VERBOSE").is_some() {
        for (proxy, answers) in [(Proxy::Envoy, Some(&e)), (Proxy::Weft, w.as_ref()), (Proxy::WeftXds, x.as_ref())] {
            let Some(Ok(answers)) = answers else { continue };
            for (req, a) in file.requests.iter().zip(answers) {
                let a = &a[0];
                eprintln!(
                    "[{name} / {} / {}] {} {:?} body={:?} upstream={} path={} headers={:?}",
                    req.name,
                    proxy.name(),
                    a.status,
                    a.error,
                    shorten(&String::from_utf8_lossy(&a.body)),
                    a.field("upstream"),
                    a.field("upstream_path"),
                    a.headers
                );
            }
        }
    }
    let one = |answers: &Result<Vec<Vec<Observed>>, String>, i: usize| -> Result<Vec<Observed>, String> {
        answers.as_ref().map(|a| a[i].clone()).map_err(Clone::clone)
    };
    let mut outcomes = Vec::new();
    // Envoy's rows when no weft side ran, else the static side's rows, then the xDS side's.
    if weft.is_some() || xds.is_none() {
        for (i, req) in file.requests.iter().enumerate() {
            let envoy = one(&e, i);
            let weft = w.as_ref().map(|w| one(w, i));
            let weft = weft.as_ref().map(|w| w.as_deref().map_err(String::as_str));
            outcomes.push(judge(name, req, envoy.as_deref().map_err(String::as_str), weft));
        }
    }
    match (&over_xds, &x) {
        (Some(Err(why)), _) => outcomes.push(Outcome {
            file: name.into(),
            proxy: Proxy::WeftXds.name(),
            request: "(the file)".into(),
            problems: Vec::new(),
            envoy_broken: false,
            known: None,
            skipped: Some(why.clone()),
        }),
        (_, Some(x)) => {
            for (i, req) in file.requests.iter().enumerate() {
                let envoy = one(&e, i);
                let answers = one(x, i);
                // The static side's answers, when it ran.
                let reference = w.as_ref().and_then(|w| w.as_ref().ok()).map(|w| w[i].as_slice());
                let answers = Some(answers.as_deref().map_err(String::as_str));
                outcomes.push(judge_proxy(name, req, envoy.as_deref().map_err(String::as_str), Proxy::WeftXds, answers, reference));
            }
        }
        _ => {}
    }
    outcomes
}

/// The table: one row per request and proxy, then the totals.
pub fn table(outcomes: &[Outcome]) -> String {
    let fw = outcomes.iter().map(|o| o.file.len()).max().unwrap_or(4).max(4);
    let pw = outcomes.iter().map(|o| o.proxy.len()).max().unwrap_or(5).max(5);
    let rw = outcomes.iter().map(|o| o.request.chars().count()).max().unwrap_or(7).clamp(7, 60);
    let mut out = String::new();
    let _ = writeln!(out, "{:fw$}  {:pw$}  {:rw$}  RESULT  DETAIL", "FILE", "PROXY", "REQUEST");
    for o in outcomes {
        let verdict = match (o.passed(), &o.known, &o.skipped) {
            (true, _, Some(_)) => "SKIP",
            (true, Some(_), None) => "KNOWN",
            (true, None, None) => "PASS",
            (false, _, _) => "FAIL",
        };
        let name: String = o.request.chars().take(rw).collect();
        let detail = o.skipped.clone().or_else(|| o.known.clone()).unwrap_or_else(|| o.problems.join("; "));
        let _ = writeln!(out, "{:fw$}  {:pw$}  {:rw$}  {verdict:6}  {detail}", o.file, o.proxy, name);
    }
    let _ = writeln!(out, "\n{:fw$}  {:pw$}  PASSED/REQUESTS", "FILE", "PROXY");
    let mut files: Vec<(&str, &str, usize, usize, bool)> = Vec::new();
    for o in outcomes {
        match files.last_mut() {
            Some((f, p, passed, total, _)) if *f == o.file && *p == o.proxy => {
                *passed += usize::from(o.passed());
                *total += 1;
            }
            _ => files.push((&o.file, o.proxy, usize::from(o.passed()), 1, o.skipped.is_some())),
        }
    }
    for (file, proxy, passed, total, skipped) in files {
        if skipped {
            let _ = writeln!(out, "{file:fw$}  {proxy:pw$}  skipped");
        } else {
            let _ = writeln!(out, "{file:fw$}  {proxy:pw$}  {passed}/{total}");
        }
    }
    let mut proxies: Vec<&str> = Vec::new();
    for o in outcomes {
        if !proxies.contains(&o.proxy) {
            proxies.push(o.proxy);
        }
    }
    for proxy in proxies {
        let rows: Vec<&Outcome> = outcomes.iter().filter(|o| o.proxy == proxy).collect();
        let skipped = rows.iter().filter(|o| o.skipped.is_some()).count();
        let requests = rows.len() - skipped;
        let failed = rows.iter().filter(|o| !o.passed()).count();
        let known = rows.iter().filter(|o| o.passed() && o.known.is_some()).count();
        let envoy_broken = rows.iter().filter(|o| o.envoy_broken).count();
        let skipped = if skipped > 0 { format!("; {skipped} files skipped") } else { String::new() };
        let _ = writeln!(
            out,
            "{proxy}: {requests} requests: {} the same as Envoy, {known} known differences, {failed} failed ({envoy_broken} with Envoy itself failing an expect){skipped}",
            requests - failed - known
        );
    }
    out
}

/// Which weft sides run next to Envoy.
#[derive(Debug, Clone, Copy)]
pub struct Sides {
    /// weft on the static bootstrap.
    pub weft: bool,
    /// weft with the configuration over xDS.
    pub xds: bool,
}

/// Runs the whole suite: the files in `dir` matching `filter`, on Envoy and the `sides`.
pub fn run_suite(dir: &Path, filter: Option<&str>, sides: Sides) -> Result<Vec<Outcome>, String> {
    let files = load_cases(dir, filter)?;
    if files.is_empty() {
        return Err(format!("no case files in {} matching {filter:?}", dir.display()));
    }
    let tag = std::process::id() % 100_000;
    let envoy = Side::new(Proxy::Envoy, &format!("wc-e-{tag}"))?;
    let weft = if sides.weft { Some(Side::new(Proxy::Weft, &format!("wc-w-{tag}"))?) } else { None };
    let xds = if sides.xds { Some(Side::new(Proxy::WeftXds, &format!("wc-x-{tag}"))?) } else { None };
    let mut outcomes = Vec::new();
    for (name, file) in &files {
        let started = Instant::now();
        let result = match file {
            Ok(file) => run_file(name, file, &envoy, weft.as_ref(), xds.as_ref()),
            Err(e) => vec![Outcome {
                file: name.clone(),
                proxy: Proxy::Envoy.name(),
                request: "(the file)".into(),
                problems: vec![format!("bad case file: {e}")],
                envoy_broken: true,
                known: None,
                skipped: None,
            }],
        };
        let failed = result.iter().filter(|o| !o.passed()).count();
        let skipped = if result.iter().any(|o| o.skipped.is_some()) { " (skipped on the xDS side)" } else { "" };
        eprintln!("{name}: {} rows, {failed} failed{skipped}, {:.1}s", result.len(), started.elapsed().as_secs_f64());
        outcomes.extend(result);
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(text: &str) -> CaseFile {
        serde_yaml::from_str(text).expect("case file")
    }

    #[test]
    fn xds_config_moves_listeners_clusters_and_inline_routes() {
        let file = case(&std::fs::read_to_string(crate::workspace_root().join("tests/conformance/codec_types.yaml")).unwrap());
        let xds = xds_config(&bootstrap(&file).unwrap()).unwrap();
        assert_eq!(xds.names(xds_server::CLUSTER), ["a", "b"]);
        assert_eq!(xds.names(xds_server::LISTENER), ["h1-only", "h2-only"]);
        assert_eq!(xds.names(xds_server::ROUTE), ["h1-only", "h2-only"]);
        assert_eq!(xds.ports, [19200, 19201]);
        let json = xds.resources_json();
        let hcm = &json[xds_server::LISTENER][0]["filter_chains"][0]["filters"][0]["typed_config"];
        assert!(hcm.get("route_config").is_none());
        assert_eq!(hcm["rds"]["route_config_name"], "h1-only");
        assert_eq!(hcm["codec_type"], "HTTP1");
        let boot: serde_json::Value = serde_json::from_str(&xds.bootstrap).unwrap();
        assert_eq!(boot["node"]["id"], "conformance");
        assert_eq!(boot["dynamic_resources"]["lds_config"]["ads"], serde_json::json!({}));
        assert!(boot["static_resources"].get("listeners").is_none());
        assert_eq!(boot["static_resources"]["clusters"][0]["name"], XDS_CLUSTER);
    }

    #[test]
    fn xds_config_reports_what_does_not_encode() {
        let file = case(
            "{description: d, route_config: {virtual_hosts: []}, requests: [], http_filters: [{name: envoy.filters.http.ext_authz, \
             typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz}}]}",
        );
        let e = xds_config(&bootstrap(&file).unwrap()).unwrap_err();
        assert!(e.contains("encoding Listener http") && e.contains("ext_authz.v3.ExtAuthz"), "{e}");
    }

    #[test]
    fn the_xds_side_must_answer_as_the_static_side_even_in_a_known_difference() {
        let req: CaseRequest =
            serde_yaml::from_str("{name: r, compare: [status], known_difference: why}").expect("request");
        let answer = |status: &str| vec![Observed { status: status.into(), ..Default::default() }];
        let (envoy, weft, same, other) = (answer("501"), answer("400"), answer("400"), answer("502"));
        let ok = judge_proxy("f", &req, Ok(&envoy), Proxy::WeftXds, Some(Ok(&same)), Some(&weft));
        assert!(ok.passed() && ok.known.is_some(), "{ok:?}");
        assert_eq!(ok.proxy, "weft-xds");
        let bad = judge_proxy("f", &req, Ok(&envoy), Proxy::WeftXds, Some(Ok(&other)), Some(&weft));
        assert!(!bad.passed(), "{bad:?}");
        assert!(bad.problems[0].contains(r#"unlike weft on the static bootstrap: status: weft="400" weft-xds="502""#), "{bad:?}");
    }
}
