//! The two ports an Istio sidecar answers on besides the data path, served inside each captured pod's network
//! namespace as its sidecar served them: 15021 `/healthz/ready` (the readiness kubelet probes on injected
//! pods) and 15020, istio-agent's status port (`/healthz/ready` again, and `/stats/prometheus`, where the
//! `prometheus.io/port` annotation of injected pods points Prometheus: the pod's share of the proxy and
//! `istio_build`). Inbound capture never redirects either port (`capture::EXCLUDED_INBOUND_PORTS`).

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::agent::LOAD_METRICS;
use crate::proxy::listener::AcceptLoops;
use crate::proxy::istio_metrics::{self, label_value, IstioMetrics};
use crate::proxy::pod_share::PodLoad;
use crate::proxy::stats::{ListenerSnapshot, ListenerStats};
use crate::xds::{XdsState, CLUSTER_TYPE, LISTENER_TYPE};

/// istio-agent's status port: readiness and merged metrics.
pub const STATUS_PORT: u16 = 15020;
/// The sidecar's readiness port.
pub const READINESS_PORT: u16 = 15021;

/// Connections open at once on one pod's two ports; more are closed at once, so that a client holding
/// connections cannot grow the agent without bound (kubelet and Prometheus use one or two).
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A kept-alive connection is closed after this long; Prometheus reconnects at its next scrape.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// Which of the two ports a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// 15020: `/healthz/ready` and `/stats/prometheus`.
    Status,
    /// 15021: `/healthz/ready`.
    Readiness,
}

impl Port {
    pub fn number(self) -> u16 {
        match self {
            Port::Status => STATUS_PORT,
            Port::Readiness => READINESS_PORT,
        }
    }
}

/// What makes the pod ready.
pub enum Readiness {
    /// No control plane: the generated pass-through configuration is the pod's from its capture on.
    Local,
    /// The pod's xDS stream (a new one when the pod's metadata changes): ready once a stream has accepted
    /// clusters and listeners, and from then on, as istio-agent's readiness latches: a control plane that
    /// goes away later leaves the pod serving its last good configuration.
    Xds { stream: ArcSwapOption<XdsState>, configured: AtomicBool },
}

impl Readiness {
    /// Readiness that follows an xDS stream, not ready until [`Readiness::follow`] gives it one that has
    /// accepted clusters and listeners.
    pub fn xds() -> Readiness {
        Readiness::Xds { stream: ArcSwapOption::empty(), configured: AtomicBool::new(false) }
    }

    /// Follows the pod's current xDS stream.
    pub fn follow(&self, state: Arc<XdsState>) {
        if let Readiness::Xds { stream, .. } = self {
            stream.store(Some(state));
        }
    }

    /// `Ok` when ready; otherwise what the pod still waits for.
    pub fn check(&self) -> Result<(), String> {
        let Readiness::Xds { stream, configured } = self else { return Ok(()) };
        if configured.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(state) = stream.load_full() else {
            return Err("the pod's xDS stream has not started".into());
        };
        let missing: Vec<&str> = [(CLUSTER_TYPE, "clusters (CDS)"), (LISTENER_TYPE, "listeners (LDS)")]
            .into_iter()
            .filter(|(type_url, _)| !state.has_accepted(type_url))
            .map(|(_, what)| what)
            .collect();
        if missing.is_empty() {
            configured.store(true, Ordering::Release);
            return Ok(());
        }
        Err(format!("config not received from the control plane yet (is istiod running?): no {} accepted", missing.join(" and no ")))
    }
}

/// The pod's own counters, as its 15020 shows them.
pub struct PodMetrics {
    /// Istio's standard metrics of the pod's traffic, as its sidecar's Envoy showed them.
    pub istio: Arc<IstioMetrics>,
    pub outbound: Arc<ListenerStats>,
    pub inbound: Arc<ListenerStats>,
    pub load: Arc<PodLoad>,
    /// The `ISTIO_VERSION` the pod declares to istiod: `istio_build`'s `tag`, as istio-proxy reports it.
    pub istio_version: String,
}

/// One metric of a pod's in-pod listeners, shown per direction.
type ListenerMetric = (&'static str, &'static str, &'static str, fn(&ListenerSnapshot) -> u64);

const LISTENER_METRICS: &[ListenerMetric] = &[
    ("weft_pod_listener_connections_total", "counter", "Connections accepted by the pod's in-pod listener.", |l| l.accepted),
    ("weft_pod_listener_connections", "gauge", "Connections open on the pod's in-pod listener.", |l| l.active),
    ("weft_pod_listener_rejected_total", "counter", "Connections closed by the pod's configuration (no listener, no filter chain, no configuration yet).", |l| l.rejected),
    ("weft_pod_listener_upstream_connect_failed_total", "counter", "Connections whose upstream could not be reached.", |l| l.upstream_connect_failed),
    ("weft_pod_listener_received_bytes_total", "counter", "Bytes read from downstream on relayed connections.", |l| l.bytes_from_downstream),
    ("weft_pod_listener_sent_bytes_total", "counter", "Bytes written to downstream on relayed connections.", |l| l.bytes_to_downstream),
];

impl PodMetrics {
    /// Prometheus text format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let load = self.load.snapshot();
        for (name, kind, help, value) in LOAD_METRICS {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n", value(&load)));
        }
        let (outbound, inbound) = (self.outbound.snapshot(), self.inbound.snapshot());
        for (name, kind, help, value) in LISTENER_METRICS {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            out.push_str(&format!("{name}{{direction=\"outbound\"}} {}\n{name}{{direction=\"inbound\"}} {}\n", value(&outbound), value(&inbound)));
        }
        out.push_str("# HELP istio_build Istio component build info\n# TYPE istio_build gauge\n");
        out.push_str(&format!("istio_build{{component=\"proxy\",tag=\"{}\"}} 1\n", label_value(&self.istio_version)));
        out.push_str(&istio_metrics::render(&[(Vec::new(), &self.istio)]));
        out
    }
}

/// The answer to one request on `port`.
pub fn respond(port: Port, method: &Method, path: &str, readiness: &Readiness, metrics: &PodMetrics) -> Response<Full<Bytes>> {
    if *method != Method::GET && *method != Method::HEAD {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into());
        response.headers_mut().insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match (port, path) {
        // As istio-agent: 200 with an empty body, or 503 saying what is missing.
        (_, "/healthz/ready") => match readiness.check() {
            Ok(()) => reply(StatusCode::OK, "text/plain", String::new()),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("readiness probe failed: {why}\n")),
        },
        (Port::Status, "/stats/prometheus") => reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
        (Port::Status, _) => reply(StatusCode::NOT_FOUND, "text/plain", "paths: /healthz/ready /stats/prometheus\n".into()),
        (Port::Readiness, _) => reply(StatusCode::NOT_FOUND, "text/plain", "paths: /healthz/ready\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}

/// The running ports of one pod. Dropping it stops them.
pub struct PodPorts {
    pub tasks: AcceptLoops,
    pub addresses: Vec<SocketAddr>,
    /// What the pod's readiness follows (its xDS stream is handed over here when it is replaced).
    pub readiness: Arc<Readiness>,
}

/// What every connection to one pod's ports shares.
struct Served {
    pod: String,
    readiness: Arc<Readiness>,
    metrics: PodMetrics,
    connections: Arc<Semaphore>,
}

/// The pod's 15020 and 15021, bound but not yet served.
pub struct PortSockets(Vec<(Port, SocketAddr, std::net::TcpListener)>);

/// Binds 15020 and 15021 on every address of the pod (IPv4, and IPv6 where the pod has it); called on a thread
/// inside its netns.
pub fn bind_here(ipv6: bool) -> io::Result<PortSockets> {
    let mut hosts: Vec<std::net::IpAddr> = vec![Ipv4Addr::UNSPECIFIED.into()];
    if ipv6 {
        hosts.push(Ipv6Addr::UNSPECIFIED.into());
    }
    let mut sockets = Vec::new();
    for host in hosts {
        for port in [Port::Status, Port::Readiness] {
            let addr = SocketAddr::new(host, port.number());
            sockets.push((port, addr, crate::proxy::listener::bind(addr)?));
        }
    }
    Ok(PortSockets(sockets))
}

/// Serves the bound ports on `runtime` (the pod's own threads).
pub fn start(pod: String, readiness: Arc<Readiness>, metrics: PodMetrics, runtime: tokio::runtime::Handle, sockets: PortSockets) -> io::Result<PodPorts> {
    let served = Arc::new(Served { pod, readiness: Arc::clone(&readiness), metrics, connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)) });
    let mut ports = PodPorts { tasks: AcceptLoops::default(), addresses: Vec::new(), readiness };
    for (port, addr, socket) in sockets.0 {
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(socket)?
        };
        ports.addresses.push(addr);
        ports.tasks.push(runtime.spawn(accept_loop(listener, port, Arc::clone(&served))));
    }
    Ok(ports)
}

async fn accept_loop(listener: TcpListener, port: Port, served: Arc<Served>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match Arc::clone(&served.connections).try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(serve(stream, port, Arc::clone(&served), permit));
                }
                Err(_) => drop(stream),
            },
            Err(e) => {
                tracing::warn!(pod = %served.pod, port = port.number(), "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// HTTP/1.1 (what kubelet and Prometheus speak), kept alive up to [`CONNECTION_LIFETIME`].
async fn serve<I>(io: I, port: Port, served: Arc<Served>, _permit: OwnedSemaphorePermit)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let served = Arc::clone(&served);
        async move { Ok::<_, Infallible>(respond(port, request.method(), request.uri().path(), &served.readiness, &served.metrics)) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::config::bootstrap::Bootstrap;
    use crate::proxy::pod_share::PodLimits;
    use crate::xds::Sink;

    fn stream() -> Arc<XdsState> {
        let bootstrap = Bootstrap { node: Default::default(), admin: None, listeners: vec![], clusters: vec![], secrets: vec![], ads: None, raw: serde_json::Value::Null };
        XdsState::new(bootstrap, Sink::Pod(tokio::sync::watch::channel(None).0))
    }

    fn metrics() -> PodMetrics {
        PodMetrics {
            istio: Arc::default(),
            outbound: Arc::default(),
            inbound: Arc::default(),
            load: PodLoad::new(PodLimits::default()),
            istio_version: "1.31.0".into(),
        }
    }

    /// Status and body of a GET on `port`.
    fn get(port: Port, path: &str, readiness: &Readiness) -> (StatusCode, String) {
        let response = respond(port, &Method::GET, path, readiness, &metrics());
        let status = response.status();
        let body = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(response.into_body()))
            .and_then(Result::ok)
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        (status, body)
    }

    #[test]
    fn without_a_control_plane_the_pod_is_ready_on_both_ports() {
        for port in [Port::Readiness, Port::Status] {
            assert_eq!(get(port, "/healthz/ready", &Readiness::Local).0, StatusCode::OK);
        }
    }

    #[test]
    fn ready_once_clusters_and_listeners_are_accepted_and_from_then_on() {
        let readiness = Readiness::xds();
        let (status, body) = get(Port::Readiness, "/healthz/ready", &readiness);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("has not started"), "{body}");

        let first = stream();
        readiness.follow(Arc::clone(&first));
        let (status, body) = get(Port::Readiness, "/healthz/ready", &readiness);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("no clusters (CDS) and no listeners (LDS)"), "{body}");

        assert!(first.apply(CLUSTER_TYPE, "1", &[], &[], true).is_empty());
        let (status, body) = get(Port::Status, "/healthz/ready", &readiness);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("no listeners (LDS)") && !body.contains("CDS"), "{body}");

        assert!(first.apply(LISTENER_TYPE, "1", &[], &[], true).is_empty());
        assert_eq!(get(Port::Readiness, "/healthz/ready", &readiness), (StatusCode::OK, String::new()));
        assert_eq!(get(Port::Status, "/healthz/ready", &readiness).0, StatusCode::OK);

        // A new stream (the pod's metadata changed) that has nothing yet: the pod keeps serving its last
        // configuration, and stays ready.
        readiness.follow(stream());
        assert_eq!(get(Port::Readiness, "/healthz/ready", &readiness).0, StatusCode::OK);
    }

    #[test]
    fn a_rejected_response_does_not_make_the_pod_ready() {
        let readiness = Readiness::xds();
        let state = stream();
        readiness.follow(Arc::clone(&state));
        assert!(state.apply(CLUSTER_TYPE, "1", &[], &[], true).is_empty());
        let bad = crate::xds::Received { name: Some("l"), version: "1", type_url: LISTENER_TYPE, bytes: b"\xff\xff" };
        assert!(!state.apply(LISTENER_TYPE, "1", &[bad], &[], true).is_empty(), "garbage was accepted");
        assert_eq!(get(Port::Readiness, "/healthz/ready", &readiness).0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn stats_show_the_pods_counters_and_istio_build() {
        let m = metrics();
        m.inbound.accepted();
        m.inbound.closed(10, 20);
        m.inbound.accepted();
        m.outbound.rejected();
        let text = m.render();
        for line in [
            "weft_pod_listener_connections_total{direction=\"inbound\"} 2",
            "weft_pod_listener_connections{direction=\"inbound\"} 1",
            "weft_pod_listener_received_bytes_total{direction=\"inbound\"} 10",
            "weft_pod_listener_sent_bytes_total{direction=\"inbound\"} 20",
            "weft_pod_listener_rejected_total{direction=\"outbound\"} 1",
            "weft_pod_connections 0",
            "weft_pod_cpu_seconds_total 0",
            "istio_build{component=\"proxy\",tag=\"1.31.0\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // Every sample belongs to a declared metric.
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap_or_default();
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} has no TYPE line");
        }
        let odd = PodMetrics { istio_version: "1.31\"x\\y\nz".into(), ..metrics() };
        assert!(odd.render().contains(r#"tag="1.31\"x\\y\nz""#), "{}", odd.render());
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        let ready = Readiness::Local;
        assert_eq!(get(Port::Readiness, "/stats/prometheus", &ready).0, StatusCode::NOT_FOUND);
        assert_eq!(get(Port::Status, "/app-health/app/readyz", &ready).0, StatusCode::NOT_FOUND);
        assert_eq!(get(Port::Status, "/stats/prometheus", &ready).0, StatusCode::OK);
        let post = respond(Port::Status, &Method::POST, "/healthz/ready", &ready, &metrics());
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[ALLOW], "GET, HEAD");
    }

    /// One raw HTTP/1.1 exchange with the server over an in-memory pipe.
    async fn exchange(port: Port, served: &Arc<Served>, request: &str) -> String {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let permit = Arc::clone(&served.connections).try_acquire_owned().unwrap();
        let task = tokio::spawn(serve(server, port, Arc::clone(served), permit));
        let (mut read, mut write) = tokio::io::split(client);
        write.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        read.read_to_string(&mut out).await.unwrap();
        task.await.unwrap();
        out
    }

    #[tokio::test]
    async fn served_over_http1() {
        let served = Arc::new(Served { pod: "ns/p".into(), readiness: Arc::new(Readiness::xds()), metrics: metrics(), connections: Arc::new(Semaphore::new(1)) });
        let answer = exchange(Port::Readiness, &served, "GET /healthz/ready HTTP/1.1\r\nhost: 10.0.0.1:15021\r\nconnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{answer}");
        assert!(answer.ends_with("readiness probe failed: the pod's xDS stream has not started\n"), "{answer}");

        let answer = exchange(Port::Status, &served, "GET /stats/prometheus?x=1 HTTP/1.1\r\nhost: p\r\nconnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{answer}");
        assert!(answer.contains("\r\n\r\n# HELP weft_pod_connections "), "{answer}");

        // HEAD: the head only.
        let answer = exchange(Port::Status, &served, "HEAD /stats/prometheus HTTP/1.1\r\nhost: p\r\nconnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("\r\n\r\n"), "{answer}");
    }
}
