//! A data-driven differential conformance suite for HTTP routing: the real Envoy and weft are started on the
//! same bootstrap, each in a network namespace of its own with its own four upstreams, and every request of a
//! case file is sent to both; what a client observes must be the same, and each request's `expect` must hold
//! for both (so both being broken the same way does not pass). The runner is `tests/tests/http_conformance.rs`.
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
//! ```
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
//! `WEFT_CONFORMANCE_ONLY=envoy` runs Envoy alone (checks the `expect`s: for writing cases);
//! `WEFT_CONFORMANCE_VERBOSE=1` prints every answer (first repetition) in full.
//! The assembled bootstraps (JSON) and the proxies' logs stay in `<target>/weft-test/conformance/`
//! (`envoy --mode validate -c FILE`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    serde_json::to_string_pretty(&json).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------------------
// Upstreams

type Reply = hyper::Response<Full<Bytes>>;

async fn upstream_reply(name: &'static str, req: hyper::Request<Incoming>) -> io::Result<Reply> {
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
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
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
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
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
    Ok(Observed { status: parts.status.as_u16().to_string(), error: None, headers, body, upstream: None })
}

/// Writes `raw` and parses the HTTP/1 answer by hand (until it is complete or the connection closes).
async fn send_raw(mut stream: tokio::net::TcpStream, raw: &str) -> Result<Observed, String> {
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
    Some(Observed { status, error: None, headers, body, upstream: None })
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
    Weft,
}

impl Proxy {
    pub fn name(self) -> &'static str {
        match self {
            Proxy::Envoy => "envoy",
            Proxy::Weft => "weft",
        }
    }

    fn command(self, config: &Path) -> Result<Command, String> {
        let mut cmd = match self {
            Proxy::Envoy => Command::new(tools::envoy_path().map_err(|e| e.to_string())?),
            Proxy::Weft => {
                let mut c = Command::new(tools::bin_path("weft-agent").map_err(|e| e.to_string())?);
                c.arg("proxy");
                c
            }
        };
        cmd.arg("-c").arg(config).args(["--concurrency", "1", "--log-level", "warn"]);
        Ok(cmd)
    }
}

/// One proxy's namespace: its upstreams and a tokio runtime whose threads live in the namespace (so the
/// client's sockets are made there).
pub struct Side {
    pub proxy: Proxy,
    pub ns: NetNs,
    rt: tokio::runtime::Runtime,
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
        Ok(Side { proxy, ns, rt })
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

    /// Starts the proxy on `config` and waits for its admin /ready; the error carries its stderr.
    fn start(&self, config: &Path, log: &Path) -> Result<ChildGuard, String> {
        let mut cmd = self.proxy.command(config)?;
        let log_file = std::fs::File::create(log).map_err(|e| e.to_string())?;
        cmd.stdout(Stdio::null()).stderr(log_file);
        self.ns.enter_on_spawn(&mut cmd);
        let mut child = ChildGuard::new(cmd.spawn().map_err(|e| format!("spawning {}: {e}", self.proxy.name()))?, self.proxy.name());
        child.set_grace(Duration::from_secs(2));
        let mut exited = None;
        let ready = wait_for(&format!("{} /ready", self.proxy.name()), Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.wait_timeout(Duration::ZERO) {
                exited = Some(status);
                return Ok(());
            }
            let ready = crate::traffic::http(&self.ns, ADMIN.parse().unwrap(), "GET", "admin", "/ready").map_err(|e| e.to_string())?;
            if ready.status == 200 { Ok(()) } else { Err(ready.head) }
        });
        let failure = match (ready, exited) {
            (Ok(()), None) => return Ok(child),
            (_, Some(status)) => format!("{} exited at start-up ({status})", self.proxy.name()),
            (Err(e), None) => e.to_string(),
        };
        drop(child);
        let stderr = std::fs::read_to_string(log).unwrap_or_default();
        Err(format!("{failure}\n{}", stderr.trim_end()))
    }

    fn stop(&self, mut child: ChildGuard) {
        let _ = crate::traffic::http(&self.ns, ADMIN.parse().unwrap(), "POST", "admin", "/quitquitquit");
        if !matches!(child.wait_timeout(Duration::from_secs(5)), Ok(Some(_))) {
            let _ = child.stop();
        }
    }

    /// Starts the proxy on `config`, sends every request in order, stops it. `Err` when it did not start.
    pub fn answers(&self, config: &Path, log: &Path, requests: &[CaseRequest]) -> Result<Vec<Vec<Observed>>, String> {
        let child = self.start(config, log)?;
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
        Ok(answers)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Comparison and report

/// The verdict on one request.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub file: String,
    pub request: String,
    /// Empty when it passed.
    pub problems: Vec<String>,
    /// Whether an `expect` failed for Envoy (the case is wrong, or Envoy changed).
    pub envoy_broken: bool,
    /// A documented difference that still holds: the differences found, which do not fail the suite.
    pub known: Option<String>,
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
        format!("{}…", one_line.chars().take(160).collect::<String>())
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

/// Compares Envoy's and weft's answers to one request (`weft` is `None` when weft was not run). Reported:
/// Envoy's failed `expect`s (the case or Envoy is wrong), the fields where weft differs from Envoy, and
/// weft's failed `expect`s on fields where it agrees with Envoy (both wrong the same way).
pub fn judge(file: &str, req: &CaseRequest, envoy: Result<&[Observed], &str>, weft: Option<Result<&[Observed], &str>>) -> Outcome {
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
    match weft {
        None => {}
        Some(Err(why)) => problems.push(format!("weft did not start: {}", shorten(why))),
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
                            weft_problems.push(format!("{field}: envoy={e:?} weft={w:?} (tolerance {tolerance})"));
                            differing.push(field);
                        }
                    } else if e != w {
                        weft_problems.push(format!("{field}: envoy={:?} weft={:?}", shorten(&e), shorten(&w)));
                        differing.push(field);
                    }
                }
            }
            for (field, problem) in check_expect(req, Proxy::Weft, weft) {
                if !differing.contains(&field) {
                    weft_problems.push(problem);
                }
            }
            if !weft_problems.is_empty() {
                weft_problems.extend(error_note(Proxy::Weft, weft));
            }
            match &req.known_difference {
                Some(_) if weft_problems.is_empty() && !envoy_broken => {
                    problems.push("weft now answers as Envoy does: remove known_difference from the case".into());
                }
                Some(why) if !envoy_broken => {
                    let known = format!("known difference ({why}): {}", weft_problems.join("; "));
                    return Outcome { file: file.to_string(), request: req.name.clone(), problems, envoy_broken, known: Some(known) };
                }
                _ => problems.extend(weft_problems),
            }
        }
    }
    Outcome { file: file.to_string(), request: req.name.clone(), problems, envoy_broken, known: None }
}

/// The line of a start-up failure that says why, shortened for the table (the whole text is printed once):
/// without the file name, with `<hcm>` for the shorthand's HttpConnectionManager path.
fn start_reason(why: &str) -> String {
    let lines: Vec<&str> = why.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let line = lines
        .iter()
        .rev()
        .find(|l| l.contains("rror") || l.contains("not supported") || l.contains("critical"))
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

/// Runs one case file against the sides (Envoy first; weft if present), both at once.
pub fn run_file(name: &str, file: &CaseFile, envoy: &Side, weft: Option<&Side>) -> Vec<Outcome> {
    let dir = work_dir();
    let config = dir.join(format!("{name}.json"));
    let written = bootstrap(file).and_then(|text| {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(&config, text).map_err(|e| e.to_string())
    });
    if let Err(e) = written {
        return file
            .requests
            .iter()
            .map(|r| Outcome { file: name.into(), request: r.name.clone(), problems: vec![format!("bad case file: {e}")], envoy_broken: true, known: None })
            .collect();
    }
    let run = |side: &Side| {
        let log = dir.join(format!("{name}.{}.log", side.proxy.name()));
        side.answers(&config, &log, &file.requests).map_err(|e| {
            eprintln!("--- {name}: {} did not start:\n{e}\n---", side.proxy.name());
            start_reason(&e)
        })
    };
    let (e, w) = std::thread::scope(|s| {
        let w = weft.map(|side| s.spawn(move || run(side)));
        let e = run(envoy);
        (e, w.map(|h| h.join().expect("weft side panicked")))
    });
    if std::env::var_os("WEFT_CONFORMANCE_VERBOSE").is_some() {
        for (proxy, answers) in [(Proxy::Envoy, Some(&e)), (Proxy::Weft, w.as_ref())] {
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
    file.requests
        .iter()
        .enumerate()
        .map(|(i, req)| {
            let envoy = e.as_ref().map(|a| a[i].as_slice()).map_err(String::as_str);
            let weft = w.as_ref().map(|w| w.as_ref().map(|a| a[i].as_slice()).map_err(String::as_str));
            judge(name, req, envoy, weft)
        })
        .collect()
}

/// The table: one row per request, then the totals.
pub fn table(outcomes: &[Outcome]) -> String {
    let fw = outcomes.iter().map(|o| o.file.len()).max().unwrap_or(4).max(4);
    let rw = outcomes.iter().map(|o| o.request.chars().count()).max().unwrap_or(7).clamp(7, 60);
    let mut out = String::new();
    let _ = writeln!(out, "{:fw$}  {:rw$}  RESULT  DETAIL", "FILE", "REQUEST");
    for o in outcomes {
        let verdict = match (o.passed(), &o.known) {
            (true, Some(_)) => "KNOWN",
            (true, None) => "PASS",
            (false, _) => "FAIL",
        };
        let name: String = o.request.chars().take(rw).collect();
        let detail = o.known.clone().unwrap_or_else(|| o.problems.join("; "));
        let _ = writeln!(out, "{:fw$}  {:rw$}  {verdict:6}  {detail}", o.file, name);
    }
    let _ = writeln!(out, "\n{:fw$}  PASSED/REQUESTS", "FILE");
    let mut files: Vec<(&str, usize, usize)> = Vec::new();
    for o in outcomes {
        match files.last_mut() {
            Some((f, passed, total)) if *f == o.file => {
                *passed += usize::from(o.passed());
                *total += 1;
            }
            _ => files.push((&o.file, usize::from(o.passed()), 1)),
        }
    }
    for (file, passed, total) in files {
        let _ = writeln!(out, "{file:fw$}  {passed}/{total}");
    }
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    let known = outcomes.iter().filter(|o| o.passed() && o.known.is_some()).count();
    let envoy_broken = outcomes.iter().filter(|o| o.envoy_broken).count();
    let _ = writeln!(
        out,
        "{} requests: {} the same as Envoy, {known} known differences, {failed} failed ({envoy_broken} with Envoy itself failing an expect)",
        outcomes.len(),
        outcomes.len() - failed - known
    );
    out
}

/// Runs the whole suite: the files in `dir` matching `filter`, Envoy and (unless `envoy_only`) weft.
pub fn run_suite(dir: &Path, filter: Option<&str>, envoy_only: bool) -> Result<Vec<Outcome>, String> {
    let files = load_cases(dir, filter)?;
    if files.is_empty() {
        return Err(format!("no case files in {} matching {filter:?}", dir.display()));
    }
    let tag = std::process::id() % 100_000;
    let envoy = Side::new(Proxy::Envoy, &format!("wc-e-{tag}"))?;
    let weft = if envoy_only { None } else { Some(Side::new(Proxy::Weft, &format!("wc-w-{tag}"))?) };
    let mut outcomes = Vec::new();
    for (name, file) in &files {
        let started = Instant::now();
        let result = match file {
            Ok(file) => run_file(name, file, &envoy, weft.as_ref()),
            Err(e) => vec![Outcome {
                file: name.clone(),
                request: "(the file)".into(),
                problems: vec![format!("bad case file: {e}")],
                envoy_broken: true,
                known: None,
            }],
        };
        let failed = result.iter().filter(|o| !o.passed()).count();
        eprintln!("{name}: {} requests, {failed} failed, {:.1}s", result.len(), started.elapsed().as_secs_f64());
        outcomes.extend(result);
    }
    Ok(outcomes)
}
