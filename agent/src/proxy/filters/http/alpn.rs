//! `istio.alpn`, as istio-proxy's filter does it: the filter leaves its overrides with the request (Envoy's
//! filter state `envoy.network.application_protocols`); once the router has chosen the cluster, the upstream
//! TLS connection offers the list for the HTTP protocol the request goes upstream in — unless the cluster's
//! metadata says `istio.alpn_override: "false"` (non-Istio TLS). The pool keys connections by that list.

use std::sync::Arc;

use hyper::Version;

use super::super::super::upstream::pool::Protocol;
use crate::config::alpn::{AlpnOverrides, UpstreamProtocol};
use crate::config::cluster::Cluster;

/// What the filter leaves in a request's extensions for the router (the last `istio.alpn` filter wins).
#[derive(Debug, Clone)]
pub struct AlpnFilter(pub Arc<AlpnOverrides>);

impl AlpnFilter {
    /// The list the TLS connection to `cluster` offers for a request sent upstream in `protocol` that came in
    /// as `downstream`; `None`: the TLS context's own `alpn_protocols`.
    pub fn offer(&self, cluster: &Cluster, protocol: Protocol, downstream: Version) -> Option<Arc<[String]>> {
        if !cluster.metadata.istio.alpn_override {
            return None;
        }
        self.0.get(upstream_protocol(cluster, protocol, downstream)).cloned()
    }
}

/// Envoy's `upstreamHttpProtocol`: HTTP/2 when the request goes upstream in HTTP/2; with
/// `use_downstream_protocol_config` an HTTP/1.0 request stays HTTP/1.0; else HTTP/1.1.
fn upstream_protocol(cluster: &Cluster, protocol: Protocol, downstream: Version) -> UpstreamProtocol {
    match protocol {
        Protocol::Http2 => UpstreamProtocol::Http2,
        Protocol::Http1 if cluster.follow_downstream_protocol && downstream == Version::HTTP_10 => UpstreamProtocol::Http10,
        Protocol::Http1 => UpstreamProtocol::Http11,
    }
}

/// Through the connection manager to a TLS upstream on loopback that records the ALPN list each connection
/// offers: the list follows the protocol the request goes upstream in, `alpn_override: "false"` keeps the
/// context's, and connections offering different lists are not shared.
#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::{Request, Response};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::pem::PemObject;
    use serde_json::{json, Value};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::watch;

    use super::*;
    use crate::config::store::Resource;
    use crate::config::tree::Obj;
    use crate::proxy::filters::network::http_connection_manager::{serve, HttpContext};
    use crate::proxy::pod_share::{PodLimits, PodLoad};
    use crate::proxy::snapshot::Snapshot;
    use crate::proxy::socket::SocketFactory;
    use crate::proxy::upstream::pool::Pools;
    use crate::proxy::upstream::Upstream;

    /// The lists offered, one per upstream connection, in order.
    type Offers = Arc<Mutex<Vec<Vec<String>>>>;

    /// A TLS server choosing from `[h2, http/1.1]` as istio-proxy's inbound does (going on without ALPN when
    /// none is offered that it has), serving HTTP/2 or HTTP/1.1 by what was negotiated; it answers each
    /// request with the list its connection offered.
    async fn tls_upstream() -> (SocketAddr, Offers) {
        let (chain, key) = crate::proxy::testing::self_signed("upstream.test");
        let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<_, _>>().unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let plain = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let mut with_alpn = plain.clone();
        with_alpn.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let (plain, with_alpn) = (Arc::new(plain), Arc::new(with_alpn));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let offers: Offers = Arc::default();
        let recorded = Arc::clone(&offers);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (plain, with_alpn, recorded) = (Arc::clone(&plain), Arc::clone(&with_alpn), Arc::clone(&recorded));
                tokio::spawn(async move {
                    let Ok(start) = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await else { return };
                    let offered: Vec<String> = start.client_hello().alpn().into_iter().flatten().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
                    let ours = offered.iter().any(|p| p == "h2" || p == "http/1.1");
                    recorded.lock().unwrap().push(offered.clone());
                    let Ok(tls) = start.into_stream(if ours { with_alpn } else { plain }).await else { return };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let answer = offered.join(",");
                    let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        let answer = answer.clone();
                        async move { Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(answer)))) }
                    });
                    let io = TokioIo::new(tls);
                    let _ = if h2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await
                    } else {
                        hyper::server::conn::http1::Builder::new().serve_connection(io, service).await
                    };
                });
            }
        });
        (addr, offers)
    }

    /// An outbound connection manager as istiod writes it (`istio.alpn` with its three entries, then the
    /// router) whose route goes to TLS cluster `web` at `endpoint`, with `protocol` options and `istio`
    /// metadata; the TLS context offers `[istio-peer-exchange, istio]` by itself.
    fn context(endpoint: SocketAddr, protocol: Value, istio: Value) -> HttpContext {
        let mut cluster = json!({"name": "web", "connect_timeout": "1s",
            "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": endpoint.port()}}}}]}]},
            "transport_socket": {"name": "tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "outbound_.80_._.web.shop.svc.cluster.local", "common_tls_context": {"alpn_protocols": ["istio-peer-exchange", "istio"]}}},
            "metadata": {"filter_metadata": {"istio": istio}}});
        if let (Some(c), Some(p)) = (cluster.as_object_mut(), protocol.as_object()) {
            c.extend(p.clone());
        }
        let cluster = crate::config::cluster::translate(Obj::new(&cluster, "c").unwrap()).unwrap();
        let hcm = json!({"route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "web"}}]}]},
            "http_protocol_options": {"accept_http_10": true},
            "http_filters": [
                {"name": "istio.alpn", "typed_config": {"@type": "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig", "alpn_override": [
                    {"alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
                    {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
                    {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]}]}},
                {"name": "router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]});
        let hcm = crate::config::http_connection_manager::translate(Obj::new(&hcm, "h").unwrap()).unwrap();
        let snapshot = Arc::new(Snapshot { clusters: Arc::new([Resource::fixed("web", cluster)].into_iter().collect()), ..Snapshot::default() });
        let (_, updates) = watch::channel(Some(Arc::clone(&snapshot)));
        let upstream = Upstream { snapshot, pools: Pools::new(SocketFactory::Host), original_dst: "127.0.0.1:1".parse().unwrap(), downstream_buffer_limit: crate::config::DEFAULT_BUFFER_LIMIT };
        HttpContext { hcm: Arc::new(hcm), updates, upstream, peer: "127.0.0.1:40000".parse().unwrap(), local: "127.0.0.1:10000".parse().unwrap(), load: PodLoad::new(PodLimits::default()), tls: None, server_name: None, telemetry: Default::default() }
    }

    /// One request over a downstream connection of its own in `version`; returns the body: the list its
    /// upstream connection offered.
    async fn offered(context: &HttpContext, version: Version) -> String {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let upstream = context.upstream.clone();
        let (peer, local, load) = (context.peer, context.local, Arc::clone(&context.load));
        tokio::spawn(serve(server, HttpContext { hcm: Arc::clone(&context.hcm), updates: context.updates.clone(), upstream, peer, local, load, tls: None, server_name: None, telemetry: Default::default() }));
        let body = match version {
            Version::HTTP_2 => {
                let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client)).await.unwrap();
                tokio::spawn(conn);
                let req = Request::builder().uri("http://web.shop/").body(Full::new(Bytes::new())).unwrap();
                sender.send_request(req).await.unwrap().into_body().collect().await.unwrap().to_bytes()
            }
            Version::HTTP_10 => {
                let mut client = client;
                client.write_all(b"GET / HTTP/1.0\r\nhost: web.shop\r\n\r\n").await.unwrap();
                let mut raw = Vec::new();
                tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut raw)).await.unwrap().unwrap();
                let text = String::from_utf8_lossy(&raw).into_owned();
                Bytes::from(text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or(text))
            }
            _ => {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.unwrap();
                tokio::spawn(conn);
                let req = Request::builder().uri("/").header("host", "web.shop").body(Full::new(Bytes::new())).unwrap();
                sender.send_request(req).await.unwrap().into_body().collect().await.unwrap().to_bytes()
            }
        };
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Waits until `n` upstream HTTP/1.1 connections are back in the pool.
    async fn idle(context: &HttpContext, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while context.upstream.pools.idle_http1() != n {
            assert!(tokio::time::Instant::now() < deadline, "{n} idle connections expected, {} found", context.upstream.pools.idle_http1());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    const ISTIO_H2: &str = "istio-h2,istio,h2";
    const ISTIO_HTTP11: &str = "istio-http/1.1,istio,http/1.1";
    const ISTIO_HTTP10: &str = "istio-http/1.0,istio,http/1.0";

    #[tokio::test]
    async fn an_http1_cluster_offers_istio_http11_and_an_http2_cluster_istio_h2() {
        let (addr, _) = tls_upstream().await;
        let http1 = context(addr, json!({}), json!({}));
        assert_eq!(offered(&http1, Version::HTTP_11).await, ISTIO_HTTP11);
        assert_eq!(offered(&http1, Version::HTTP_2).await, ISTIO_HTTP11, "the cluster's protocol decides, not the downstream's");
        let http2 = context(addr, json!({"http2_protocol_options": {}}), json!({}));
        assert_eq!(offered(&http2, Version::HTTP_11).await, ISTIO_H2);
        assert_eq!(offered(&http2, Version::HTTP_2).await, ISTIO_H2);
    }

    #[tokio::test]
    async fn use_downstream_protocol_offers_the_downstreams_protocol_on_connections_of_their_own() {
        let (addr, offers) = tls_upstream().await;
        let follow = json!({"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}}}}});
        let context = context(addr, follow, json!({}));
        assert_eq!(offered(&context, Version::HTTP_11).await, ISTIO_HTTP11);
        idle(&context, 1).await;
        // Also an HTTP/1.1 connection upstream, but the idle one offered another list: not used.
        assert_eq!(offered(&context, Version::HTTP_10).await, ISTIO_HTTP10);
        idle(&context, 2).await;
        assert_eq!(offered(&context, Version::HTTP_2).await, ISTIO_H2);
        assert_eq!(offered(&context, Version::HTTP_11).await, ISTIO_HTTP11);
        let made: Vec<String> = offers.lock().unwrap().iter().map(|o| o.join(",")).collect();
        assert_eq!(made, [ISTIO_HTTP11, ISTIO_HTTP10, ISTIO_H2], "the last request reused the first one's connection");
    }

    #[tokio::test]
    async fn alpn_override_false_keeps_the_tls_contexts_own_list() {
        let (addr, _) = tls_upstream().await;
        // DestinationRule TLS SIMPLE/MUTUAL: istiod marks the cluster so the filter leaves it alone.
        let dr_tls = context(addr, json!({}), json!({"alpn_override": "false"}));
        assert_eq!(offered(&dr_tls, Version::HTTP_11).await, "istio-peer-exchange,istio");
        // Any other value is no opt-out (istio-proxy compares the string with "false").
        let other = context(addr, json!({}), json!({"alpn_override": "true"}));
        assert_eq!(offered(&other, Version::HTTP_11).await, ISTIO_HTTP11);
    }
}
