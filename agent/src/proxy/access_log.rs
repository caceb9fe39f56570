//! Access logs: a finished stream (an HTTP request, or a TCP connection) described as Envoy's stream info,
//! checked against each logger's filter, formatted with its format string and written to its sink. Lines are
//! written by one thread per sink, so a slow terminal or disk never holds a connection; a line that finds the
//! sink's queue full is dropped and counted. In the agent each line names its pod (text: a `<ns>/<name> `
//! prefix; JSON: a `pod` key), since one process logs for every pod of the node.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hyper::HeaderMap;
use serde_json::Value;

use super::body::StreamEnd;
use super::stream_info::{Entry, RbacShadow, RequestHead};
use super::tracer::SpanSlot;
use super::filters::http::local_reply::{self, ResponseDetails, ResponseFlag, UpstreamFailure};
use super::filters::istio_stats::{ByteCount, StreamFacts};
use super::tls_info::TlsInfo;
use super::upstream::pool::UpstreamSession;
use crate::civil_time::{civil, days_from_civil};
use crate::config::access_log::{AccessLog, AccessLogs, Filter, Format, JsonField, Operator, Piece, Sink, Template};

/// Lines a sink's writer may have queued before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// Lines dropped because their sink's queue was full, process-wide.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Writes `entry` to every logger of `logs` whose filter passes it; `pod` names the pod the line belongs to.
pub fn emit(logs: &[AccessLog], entry: &Entry<'_>, pod: Option<&str>) {
    for log in logs {
        if log.filter.as_ref().is_none_or(|f| passes(f, entry)) {
            write(&log.sink, line(&log.format, entry, pod));
        }
    }
}

/// An HTTP stream being logged: started with its request, told the request as routed (after the connection
/// manager's header changes), and written when its response body ends or is dropped.
pub struct HttpLog {
    logs: AccessLogs,
    pod: Option<Arc<str>>,
    start: SystemTime,
    started: Instant,
    protocol: &'static str,
    routed: Arc<ForwardedRequest>,
    request_body: Arc<ByteCount>,
    direct_remote: SocketAddr,
    local: SocketAddr,
    server_name: Option<String>,
    tls: Option<Arc<TlsInfo>>,
    response: Option<Responded>,
    /// The request's span, finished with the same stream info as the logs.
    span: Option<Arc<SpanSlot>>,
}

/// The request as the connection manager forwarded it, and the client address it decided on; shared between
/// the connection manager (which fills it) and the stream's log.
#[derive(Default)]
pub struct ForwardedRequest(Mutex<Option<(RequestHead, SocketAddr)>>);

impl ForwardedRequest {
    pub fn set(&self, head: RequestHead, remote: SocketAddr) {
        *self.lock() = Some((head, remote));
    }

    /// The router's rewrite of the path and authority, and the headers as it forwards them.
    pub fn rewritten(&self, path: &str, authority: &str, headers: &HeaderMap) {
        if let Some((head, _)) = self.lock().as_mut() {
            head.path = path.to_string();
            head.authority = Some(authority.to_string()).filter(|a| !a.is_empty());
            head.headers = headers.clone();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(RequestHead, SocketAddr)>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What the response told when its head went out.
struct Responded {
    headers: HeaderMap,
    trailers: Option<HeaderMap>,
    code: u16,
    flag: Option<&'static str>,
    details: Option<std::borrow::Cow<'static, str>>,
    facts: StreamFacts,
    session: Option<Arc<UpstreamSession>>,
    /// The failed attempt's endpoint and transport failure, when there is no upstream connection.
    failure: Option<UpstreamFailure>,
    rbac_shadow: Option<RbacShadow>,
}

/// The connection an HTTP stream arrived on, as its log shows it.
pub struct HttpConnection<'a> {
    pub logs: &'a AccessLogs,
    pub pod: Option<Arc<str>>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub server_name: Option<String>,
    pub tls: Option<Arc<TlsInfo>>,
}

impl HttpLog {
    /// Starts the record of a request whose head is `parts`; `None` when the connection manager neither logs
    /// nor reports spans.
    pub fn start(connection: HttpConnection<'_>, parts: &hyper::http::request::Parts, span: Option<Arc<SpanSlot>>) -> Option<HttpLog> {
        if connection.logs.is_empty() && span.is_none() {
            return None;
        }
        let routed = Arc::new(ForwardedRequest::default());
        routed.set(RequestHead::of(parts), connection.peer);
        Some(HttpLog {
            logs: Arc::clone(connection.logs),
            pod: connection.pod,
            start: SystemTime::now(),
            started: Instant::now(),
            protocol: crate::proxy::route::protocol_name(parts.version),
            routed,
            request_body: Arc::default(),
            direct_remote: connection.peer,
            local: connection.local,
            server_name: connection.server_name,
            tls: connection.tls,
            response: None,
            span,
        })
    }

    /// Where the connection manager puts the request as it forwards it.
    pub fn routed(&self) -> Arc<ForwardedRequest> {
        Arc::clone(&self.routed)
    }

    /// Where the request body's bytes are counted (`BYTES_RECEIVED`).
    pub fn request_bytes(&self) -> Arc<ByteCount> {
        Arc::clone(&self.request_body)
    }

    /// What writes the log when the response ends.
    pub fn finish(mut self, parts: &hyper::http::response::Parts) -> Box<dyn StreamEnd> {
        let flag = parts.extensions.get::<ResponseFlag>().map(|f| f.0);
        let session = parts.extensions.get::<Arc<UpstreamSession>>().cloned();
        self.response = Some(Responded {
            headers: parts.headers.clone(),
            trailers: None,
            code: parts.status.as_u16(),
            flag,
            details: local_reply::details(flag, parts.extensions.get::<ResponseDetails>(), session.is_some()),
            facts: parts.extensions.get::<StreamFacts>().cloned().unwrap_or_default(),
            session,
            failure: parts.extensions.get::<UpstreamFailure>().copied(),
            rbac_shadow: parts.extensions.get::<RbacShadow>().cloned(),
        });
        Box::new(self)
    }
}

impl StreamEnd for HttpLog {
    fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(r) = &mut self.response {
            r.trailers = Some(trailers.clone());
        }
    }

    fn ended(self: Box<Self>, body_bytes: u64, complete: bool) {
        let Some(r) = &self.response else { return };
        let routed = self.routed.lock().take();
        let (request, remote) = match &routed {
            Some((head, remote)) => (Some(head), *remote),
            None => (None, self.direct_remote),
        };
        // A response that did not reach its end was reset downstream (`DC`), unless it already failed.
        let flag = r.flag.or((!complete).then_some("DC"));
        let entry = Entry {
            start: Some(self.start),
            duration: self.started.elapsed(),
            protocol: Some(self.protocol),
            request,
            response: Some(&r.headers),
            trailers: r.trailers.as_ref(),
            code: Some(r.code),
            flag,
            details: r.details.as_deref(),
            bytes_received: self.request_body.get(),
            bytes_sent: body_bytes,
            cluster: r.facts.cluster.as_deref(),
            upstream: r.session.as_deref(),
            upstream_host: r.session.as_ref().and_then(|s| s.host).or(r.failure.map(|f| f.host)),
            transport_failure: r.failure.and_then(|f| f.transport),
            route: r.facts.route.as_deref(),
            downstream_remote: Some(remote),
            downstream_direct_remote: Some(self.direct_remote),
            downstream_local: Some(self.local),
            server_name: self.server_name.as_deref(),
            tls: self.tls.as_deref(),
            rbac_shadow: r.rbac_shadow.as_ref(),
        };
        emit(&self.logs, &entry, self.pod.as_deref());
        if let Some(span) = self.span.as_ref().and_then(|s| s.take()) {
            span.finish(&entry);
        }
    }
}

fn passes(filter: &Filter, e: &Entry<'_>) -> bool {
    match filter {
        Filter::StatusCode(c) => c.holds(u64::from(e.code.unwrap_or(0))),
        Filter::Duration(c) => c.holds(e.duration.as_millis() as u64),
        // weft answers no health check requests itself (no health_check filter), so every stream passes.
        Filter::NotHealthCheck => true,
        Filter::ResponseFlag(flags) => e.flag.is_some_and(|set| !set.is_empty() && (flags.is_empty() || set.split(',').any(|f| flags.iter().any(|x| x == f)))),
        Filter::Runtime { numerator, denominator } => (crate::random::random() as u64) % denominator < *numerator,
        Filter::Header(m) => m.matches_in(e.request.map_or(&HeaderMap::new(), |r| &r.headers)),
        Filter::And(all) => all.iter().all(|f| passes(f, e)),
        Filter::Or(any) => any.iter().any(|f| passes(f, e)),
    }
}

/// One formatted line, newline-terminated for JSON (a text format carries its own).
pub fn line(format: &Format, e: &Entry<'_>, pod: Option<&str>) -> Vec<u8> {
    match format {
        Format::Text(t) => {
            let mut out = pod.map(|p| format!("{p} ")).unwrap_or_default();
            out.push_str(&text(t, e));
            out.into_bytes()
        }
        Format::Json { fields, omit_empty_values } => {
            let mut object = json_object(fields, e, *omit_empty_values);
            if let Some(p) = pod {
                object.entry("pod".to_string()).or_insert_with(|| Value::String(p.to_string()));
            }
            let mut out = serde_json::to_vec(&object).unwrap_or_default();
            out.push(b'\n');
            out
        }
    }
}

fn text(t: &Template, e: &Entry<'_>) -> String {
    let mut out = String::new();
    for piece in &t.0 {
        match piece {
            Piece::Text(s) => out.push_str(s),
            Piece::Op { op, max_length } => match value(op, e) {
                Field::Missing => out.push('-'),
                Field::Number(n) => out.push_str(&truncate(&n.to_string(), *max_length)),
                Field::Text(s) => out.push_str(&truncate(&s, *max_length)),
            },
        }
    }
    out
}

fn json_object(fields: &BTreeMap<String, JsonField>, e: &Entry<'_>, omit_empty: bool) -> serde_json::Map<String, Value> {
    let mut object = serde_json::Map::new();
    for (key, field) in fields {
        let v = match field {
            JsonField::Number(n) => serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number),
            JsonField::Bool(b) => Value::Bool(*b),
            JsonField::Nested(inner) => Value::Object(json_object(inner, e, omit_empty)),
            JsonField::Template(t) => match t.alone() {
                Some((op, max_length)) => match value(op, e) {
                    Field::Missing => Value::Null,
                    Field::Number(n) => Value::from(n),
                    Field::Text(s) => Value::String(truncate(&s, max_length)),
                },
                None => Value::String(text(t, e)),
            },
        };
        if omit_empty && (v.is_null() || v.as_str().is_some_and(str::is_empty)) {
            continue;
        }
        object.insert(key.clone(), v);
    }
    object
}

fn truncate(s: &str, max: Option<usize>) -> String {
    match max {
        Some(n) => s.chars().take(n).collect(),
        None => s.to_string(),
    }
}

/// One operator's value.
enum Field {
    Missing,
    Number(u64),
    Text(String),
}

fn some(s: Option<&str>) -> Field {
    s.filter(|s| !s.is_empty()).map_or(Field::Missing, |s| Field::Text(s.to_string()))
}

fn address(a: Option<SocketAddr>, port: bool) -> Field {
    match a {
        Some(a) if port => Field::Text(a.to_string()),
        Some(a) => Field::Text(a.ip().to_string()),
        None => Field::Missing,
    }
}

fn value(op: &Operator, e: &Entry<'_>) -> Field {
    let upstream = e.upstream;
    match op {
        Operator::StartTime(format) => e.start.map_or(Field::Missing, |t| Field::Text(start_time(t, format.as_deref()))),
        Operator::Request(name, alt) => some(request_header(e.request, name, alt.as_deref()).as_deref()),
        Operator::Response(name, alt) => some(header(e.response, name, alt.as_deref())),
        Operator::Trailer(name, alt) => some(header(e.trailers, name, alt.as_deref())),
        Operator::Protocol => some(e.protocol),
        Operator::ResponseCode => Field::Number(u64::from(e.code.unwrap_or(0))),
        Operator::ResponseCodeDetails => some(e.details),
        Operator::ResponseFlags => Field::Text(e.flag.filter(|f| !f.is_empty()).unwrap_or("-").to_string()),
        Operator::ResponseFlagsLong => Field::Text(e.flag.filter(|f| !f.is_empty()).map_or_else(|| "-".to_string(), long_flags)),
        Operator::ConnectionTerminationDetails => Field::Missing,
        Operator::UpstreamTransportFailureReason => some(e.transport_failure),
        Operator::BytesReceived => Field::Number(e.bytes_received),
        Operator::BytesSent => Field::Number(e.bytes_sent),
        Operator::Duration => Field::Number(e.duration.as_millis() as u64),
        Operator::UpstreamHost => address(e.upstream_host, true),
        Operator::UpstreamCluster | Operator::UpstreamClusterRaw => some(e.cluster),
        Operator::UpstreamLocalAddress => address(upstream.and_then(|u| u.local), true),
        Operator::DownstreamLocalAddress => address(e.downstream_local, true),
        Operator::DownstreamLocalAddressWithoutPort => address(e.downstream_local, false),
        Operator::DownstreamLocalPort => e.downstream_local.map_or(Field::Missing, |a| Field::Number(u64::from(a.port()))),
        Operator::DownstreamRemoteAddress => address(e.downstream_remote, true),
        Operator::DownstreamRemoteAddressWithoutPort => address(e.downstream_remote, false),
        Operator::DownstreamRemotePort => e.downstream_remote.map_or(Field::Missing, |a| Field::Number(u64::from(a.port()))),
        Operator::DownstreamDirectRemoteAddress => address(e.downstream_direct_remote, true),
        Operator::DownstreamDirectRemoteAddressWithoutPort => address(e.downstream_direct_remote, false),
        Operator::RequestedServerName => some(e.server_name),
        Operator::RouteName => some(e.route),
        Operator::DownstreamPeerUriSan => some(e.tls.and_then(|t| t.peer.as_ref()).map(|p| p.uri_sans.join(",")).as_deref()),
        Operator::DownstreamLocalUriSan => some(e.tls.map(|t| t.local_uri_sans.join(",")).as_deref()),
        Operator::UpstreamPeerUriSan => some(upstream.and_then(|u| u.peer_uri_san.as_deref())),
        Operator::UpstreamLocalUriSan => some(upstream.and_then(|u| u.local_uri_san.as_deref())),
    }
}

fn header<'h>(headers: Option<&'h HeaderMap>, name: &str, alt: Option<&str>) -> Option<&'h str> {
    let headers = headers?;
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    get(name).or_else(|| alt.and_then(get))
}

fn request_header(request: Option<&RequestHead>, name: &str, alt: Option<&str>) -> Option<String> {
    let r = request?;
    let get = |n: &str| -> Option<String> {
        match n {
            ":method" => Some(r.method.clone()),
            ":path" => Some(r.path.clone()),
            ":authority" => r.authority.clone(),
            ":scheme" => Some(r.scheme.to_string()),
            n => r.headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string),
        }
    };
    get(name).or_else(|| alt.and_then(get))
}

/// Envoy's long names of its response flags (comma-separated, as the short ones).
fn long_flags(set: &str) -> String {
    set.split(',').map(long_flag).collect::<Vec<_>>().join(",")
}

fn long_flag(short: &str) -> &'static str {
    match short {
        "NR" => "NoRouteFound",
        "NC" => "NoClusterFound",
        "UH" => "NoHealthyUpstream",
        "UF" => "UpstreamConnectionFailure",
        "UC" => "UpstreamConnectionTermination",
        "UO" => "UpstreamOverflow",
        "UT" => "UpstreamRequestTimeout",
        "FI" => "FaultInjected",
        "RL" => "RateLimited",
        "DC" => "DownstreamConnectionTermination",
        "UAEX" => "UnauthorizedExternalService",
        "URX" => "UpstreamRetryLimitExceeded",
        _ => "-",
    }
}

/// `START_TIME`: Envoy's default `%Y-%m-%dT%H:%M:%E3SZ`, or the given strftime format (UTC).
fn start_time(t: SystemTime, format: Option<&str>) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (secs, nanos) = (since.as_secs(), since.subsec_nanos());
    let days = (secs / 86_400) as i64;
    let (y, mo, d) = civil(days);
    let (h, mi, s) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    let Some(format) = format else {
        return format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z", nanos / 1_000_000);
    };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&format!("{y:04}")),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{mo:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('s') => out.push_str(&secs.to_string()),
            Some('f') => out.push_str(&format!("{nanos:09}")),
            Some('j') => out.push_str(&format!("{:03}", days - days_from_civil(y, 1, 1) + 1)),
            Some('F') => out.push_str(&format!("{y:04}-{mo:02}-{d:02}")),
            Some('T') => out.push_str(&format!("{h:02}:{mi:02}:{s:02}")),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('b') => out.push_str(["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][(mo - 1) as usize]),
            Some('a') => out.push_str(["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize]),
            Some('%') => out.push('%'),
            Some('E') => match chars.next() {
                Some('s') => out.push_str(&format!("{}", since.as_millis())),
                Some(n @ '1'..='9') => {
                    let _ = chars.next();
                    let digits = n as usize - '0' as usize;
                    out.push_str(&format!("{s:02}.{}", &format!("{nanos:09}")[..digits]));
                }
                _ => {}
            },
            _ => {}
        }
    }
    out
}

/// The queue of each sink's writer thread.
static WRITERS: LazyLock<Mutex<HashMap<Sink, SyncSender<Vec<u8>>>>> = LazyLock::new(Mutex::default);

fn write(sink: &Sink, line: Vec<u8>) {
    let sender = {
        let mut writers = WRITERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match writers.get(sink) {
            Some(s) => s.clone(),
            None => {
                let Some(s) = start_writer(sink) else { return };
                writers.insert(sink.clone(), s.clone());
                s
            }
        }
    };
    if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = sender.try_send(line) {
        DROPPED.fetch_add(1, Relaxed);
    }
}

/// Times files were asked to be reopened (`SIGUSR1`, after a rotation renamed them).
static REOPENS: AtomicU64 = AtomicU64::new(0);

/// Reopens every access log file before its next line, as Envoy does on `SIGUSR1`: a rotation tool renames
/// the file, then signals, and new lines go to a new file at the configured path.
pub fn reopen() {
    REOPENS.fetch_add(1, Relaxed);
}

fn open(sink: &Sink) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match sink {
        Sink::Stdout => Box::new(std::io::stdout()),
        Sink::Stderr => Box::new(std::io::stderr()),
        Sink::File(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            Box::new(std::fs::OpenOptions::new().append(true).create(true).mode(0o640).open(path)?)
        }
    })
}

/// A thread writing `sink`'s lines in batches, flushing whenever its queue runs dry.
fn start_writer(sink: &Sink) -> Option<SyncSender<Vec<u8>>> {
    let out = match open(sink) {
        Ok(out) => out,
        Err(e) => {
            tracing::warn!(sink = ?sink, "cannot open the access log: {e}");
            return None;
        }
    };
    let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
    let (name, sink) = (format!("{sink:?}"), sink.clone());
    let spawned = std::thread::Builder::new().name("access-log".into()).spawn(move || {
        let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
        let mut reopened = REOPENS.load(Relaxed);
        while let Ok(first) = rx.recv() {
            if matches!(sink, Sink::File(_)) && REOPENS.load(Relaxed) != reopened {
                reopened = REOPENS.load(Relaxed);
                match open(&sink) {
                    Ok(fresh) => {
                        let _ = out.flush();
                        out = std::io::BufWriter::with_capacity(64 * 1024, fresh);
                    }
                    Err(e) => tracing::warn!(sink = %name, "cannot reopen the access log (lines go on to the old file): {e}"),
                }
            }
            let mut result = out.write_all(&first);
            while let (Ok(()), Ok(next)) = (&result, rx.try_recv()) {
                result = out.write_all(&next);
            }
            if let Err(e) = result.and_then(|()| out.flush()) {
                tracing::warn!(sink = %name, "writing the access log: {e}");
            }
        }
    });
    spawned.ok().map(|_| tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::access_log::DEFAULT_FORMAT;
    use std::time::Duration;

    fn entry_parts() -> (RequestHead, HeaderMap) {
        let mut headers = HeaderMap::new();
        headers.insert("user-agent", "curl/8".parse().unwrap());
        headers.insert("x-request-id", "abc".parse().unwrap());
        let mut response = HeaderMap::new();
        response.insert("x-envoy-upstream-service-time", "3".parse().unwrap());
        (RequestHead { method: "GET".into(), path: "/a?b".into(), authority: Some("example.com".into()), scheme: "http", headers }, response)
    }

    #[test]
    fn envoys_default_format_fills_each_operator() {
        let (request, response) = entry_parts();
        let session = UpstreamSession { host: Some("10.0.0.2:8080".parse().unwrap()), ..Default::default() };
        let upstream_host = session.host;
        let e = Entry {
            start: Some(UNIX_EPOCH + Duration::from_millis(1_764_540_363_123)),
            duration: Duration::from_millis(7),
            protocol: Some("HTTP/1.1"),
            request: Some(&request),
            response: Some(&response),
            code: Some(200),
            bytes_received: 5,
            bytes_sent: 11,
            upstream: Some(&session),
            upstream_host,
            ..Default::default()
        };
        let t = Template::parse(DEFAULT_FORMAT).unwrap();
        assert_eq!(
            text(&t, &e),
            "[2025-11-30T22:06:03.123Z] \"GET /a?b HTTP/1.1\" 200 - 5 11 7 3 \"-\" \"curl/8\" \"abc\" \"example.com\" \"10.0.0.2:8080\"\n"
        );
        let custom = Template::parse("%START_TIME(%Y/%m/%d %H:%M:%S.%E3S %s %j %a)% %REQ(X-MISSING?USER-AGENT):3%").unwrap();
        assert_eq!(text(&custom, &e), "2025/11/30 22:06:03.03.123 1764540363 334 Sun cur");
    }

    #[test]
    fn json_lines_are_typed_and_name_the_pod() {
        let fields = serde_json::json!({"code": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%", "sni": "%REQUESTED_SERVER_NAME%", "mixed": "%PROTOCOL% x", "n": 1});
        let path = "f";
        let holder = serde_json::json!({"access_log": [{"typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", "log_format": {"json_format": fields}}}]});
        let logs = crate::config::access_log::translate_all(&mut crate::config::tree::Obj::new(&holder, path).unwrap()).unwrap();
        let e = Entry { code: Some(404), flag: Some("NR"), ..Default::default() };
        let line: Value = serde_json::from_slice(&line(&logs[0].format, &e, Some("default/client"))).unwrap();
        assert_eq!(line, serde_json::json!({"code": 404, "flags": "NR", "sni": null, "mixed": "- x", "n": 1.0, "pod": "default/client"}));
    }

    /// Lines go to the file at the path; after a rotation renamed it and `reopen`, to a new file there.
    #[test]
    fn files_are_reopened_after_a_rotation() {
        let dir = std::env::temp_dir().join(format!("weft-access-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let sink = Sink::File(path.clone());
        let read = |p: &std::path::Path, want: &str| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                if text.contains(want) || Instant::now() > deadline {
                    return text;
                }
                std::thread::yield_now();
            }
        };
        write(&sink, b"first\n".to_vec());
        assert_eq!(read(&path, "first"), "first\n");
        let rotated = dir.join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        reopen();
        write(&sink, b"second\n".to_vec());
        assert_eq!(read(&path, "second"), "second\n", "the new line is in a new file at the path");
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "first\n");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions()) & 0o777;
        assert_eq!(mode & 0o007, 0, "not readable by others: {mode:o}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn filters_choose_the_streams_logged() {
        use crate::config::access_log::{CompareOp, Comparison};
        let e = Entry { code: Some(503), flag: Some("UF"), duration: Duration::from_millis(20), ..Default::default() };
        assert!(passes(&Filter::StatusCode(Comparison { op: CompareOp::Ge, value: 500 }), &e));
        assert!(!passes(&Filter::Duration(Comparison { op: CompareOp::Ge, value: 100 }), &e));
        assert!(passes(&Filter::ResponseFlag(vec![]), &e));
        assert!(!passes(&Filter::ResponseFlag(vec!["NR".into()]), &e));
        assert!(passes(&Filter::ResponseFlag(vec!["URX".into()]), &Entry { flag: Some("UF,URX"), ..Default::default() }));
        assert!(!passes(&Filter::ResponseFlag(vec![]), &Entry::default()));
        assert!(!passes(&Filter::Runtime { numerator: 0, denominator: 100 }, &e));
        assert!(passes(&Filter::Runtime { numerator: 100, denominator: 100 }, &e));
        let or = Filter::Or(vec![Filter::ResponseFlag(vec!["NR".into()]), Filter::StatusCode(Comparison { op: CompareOp::Eq, value: 503 })]);
        assert!(passes(&or, &e));
    }
}
