//! The HTTP connection manager with the router filter: HTTP/1.1 downstream, route by virtual host and path,
//! then a direct response or a forward to a cluster. Local replies and added headers follow Envoy's defaults
//! so the same requests get the same answers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use super::cluster::UpstreamError;
use super::connection_handler::{Config, HttpContext, Upstream};
use super::listener_filter::Rewind;
use crate::config::route::{Action, RouteConfiguration};

type Body = BoxBody<Bytes, hyper::Error>;

/// Envoy's default route timeout.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Hop-by-hop headers: they describe one connection and are never forwarded.
const HOP_BY_HOP: [&str; 6] = ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"];

/// Serves one downstream connection until it closes.
pub async fn serve_connection<C: Config>(stream: Rewind, context: Arc<HttpContext<C>>) {
    let service = hyper::service::service_fn(move |req| {
        let (routes, upstream) = context.current();
        async move {
            let Some(routes) = routes else { return Ok::<_, Infallible>(local_reply(StatusCode::NOT_FOUND, None)) };
            Ok(handle(req, &routes, &upstream).await)
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
        tracing::debug!("HTTP connection ended: {e}");
    }
}

async fn handle<C: Config>(req: Request<Incoming>, routes: &RouteConfiguration, upstream: &Upstream<C>) -> Response<Body> {
    let authority = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).or(req.uri().host()).unwrap_or("");
    let host = authority.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(authority, |(h, _)| h);
    let path = req.uri().path().to_string();
    let route = routes.virtual_host(host).and_then(|vh| vh.routes.iter().find(|r| r.path.matches(&path)));
    match route.map(|r| &r.action) {
        None => local_reply(StatusCode::NOT_FOUND, None),
        Some(Action::DirectResponse { status, body }) => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            let mut reply = local_reply(status, body.as_deref());
            // Envoy points a 201 or a redirect at the request's own URL when the route names no other.
            if status == StatusCode::CREATED || status.is_redirection() {
                let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
                if let Ok(v) = HeaderValue::from_str(&format!("http://{authority}{target}")) {
                    reply.headers_mut().insert(header::LOCATION, v);
                }
            }
            reply
        }
        Some(Action::Cluster(cluster)) => forward(req, cluster, upstream).await,
    }
}

fn local_reply(status: StatusCode, body: Option<&str>) -> Response<Body> {
    let mut builder = Response::builder().status(status).header(header::SERVER, "envoy");
    let body = match body {
        Some(text) => {
            builder = builder.header(header::CONTENT_TYPE, "text/plain");
            Full::new(Bytes::from(text.to_string())).map_err(|never| match never {}).boxed()
        }
        None => Empty::new().map_err(|never| match never {}).boxed(),
    };
    builder.body(body).unwrap_or_else(|_| Response::new(Empty::new().map_err(|never| match never {}).boxed()))
}

async fn forward<C: Config>(mut req: Request<Incoming>, cluster: &str, upstream: &Upstream<C>) -> Response<Body> {
    let upstream = match upstream.connect(cluster).await {
        Ok(s) => s,
        Err(UpstreamError::UnknownCluster(_)) => return local_reply(StatusCode::SERVICE_UNAVAILABLE, None),
        Err(UpstreamError::NoHealthyUpstream) => {
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, Some("no healthy upstream"))
        }
        Err(UpstreamError::Connect(e)) => {
            tracing::debug!(cluster, "upstream connect failed: {e}");
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                Some("upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"),
            );
        }
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(upstream)).await else {
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, Some("upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"));
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("upstream connection ended: {e}");
        }
    });
    prepare_upstream_request(&mut req);
    let started = Instant::now();
    let response = match tokio::time::timeout(ROUTE_TIMEOUT, sender.send_request(req)).await {
        Err(_) => return local_reply(StatusCode::GATEWAY_TIMEOUT, Some("upstream request timeout")),
        Ok(Err(e)) => {
            tracing::debug!(cluster, "upstream request failed: {e}");
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                Some("upstream connect error or disconnect/reset before headers. reset reason: connection termination"),
            );
        }
        Ok(Ok(r)) => r,
    };
    let mut response = response.map(BodyExt::boxed);
    // Downstream speaks HTTP/1.1 whatever the upstream spoke.
    *response.version_mut() = hyper::Version::HTTP_11;
    let headers = response.headers_mut();
    for h in HOP_BY_HOP {
        if h != "transfer-encoding" {
            headers.remove(h);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&started.elapsed().as_millis().to_string()) {
        headers.insert("x-envoy-upstream-service-time", v);
    }
    headers.insert(header::SERVER, HeaderValue::from_static("envoy"));
    response
}

/// The headers Envoy's router adds or removes on the way upstream.
fn prepare_upstream_request(req: &mut Request<Incoming>) {
    let headers = req.headers_mut();
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    headers.insert("x-envoy-expected-rq-timeout-ms", HeaderValue::from(ROUTE_TIMEOUT.as_millis() as u64));
    if !headers.contains_key("x-request-id") {
        if let Ok(v) = HeaderValue::from_str(&request_id()) {
            headers.insert("x-request-id", v);
        }
    }
}

/// A random UUID (version 4 layout), like Envoy's generated request ids.
fn request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let word = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(Instant::now().elapsed().as_nanos());
        h.finish()
    };
    let (a, b) = (word(), word());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}
