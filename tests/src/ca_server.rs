//! A test istiod secured port (15012): TLS with a certificate for `istiod.istio-system.svc` from a test CA,
//! HTTP/2 by ALPN only, serving
//! - `istio.v1.auth.IstioCertificateService/CreateCertificate` as istiod's CA serves a trusted node agent
//!   (`CA_TRUSTED_NODE_ACCOUNTS`): it CHECKS the bearer token, the `clusterid` header, the
//!   `ImpersonatedIdentity` (one of the pods "on this node"), the CSR's signature, key type (ECDSA P-256) and
//!   that its only URI SAN is the impersonated identity, and refuses otherwise; it signs a leaf for that
//!   identity with the requested validity through an intermediate and answers leaf, intermediate, root;
//! - an ADS endpoint that authenticates and authorizes each stream as istiod does (a client certificate of the
//!   mesh first, else the bearer token, which is the node agent's `weft-system/weft-agent`; the identity's
//!   namespace must be the node metadata's `NAMESPACE`, as `XDS_AUTH` checks), records it, and sends nothing.
//!
//! The protobuf messages are written here from Istio's `security/proto/pki/ca.proto` independently of the
//! agent's, so a wrong field number on either side fails the test.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, PublicKeyData, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateSigningRequestDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::{Request, Response, Status, Streaming};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::{FromDer, GeneralName, X509CertificationRequest};
use xds_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use xds_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};

use crate::util::HarnessError;

pub const SERVER_NAME: &str = "istiod.istio-system.svc";
pub const TOKEN: &str = "node-agent-token-of-the-test";
pub const CLUSTER_ID: &str = "test-cluster";

#[derive(Clone, PartialEq, prost::Message)]
pub struct CertificateRequest {
    #[prost(string, tag = "1")]
    pub csr: String,
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// One certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub identity: String,
    pub validity_s: i64,
    pub serial: String,
}

/// The identity the test token stands for (the node agent's ServiceAccount).
pub const AGENT_IDENTITY: &str = "spiffe://cluster.local/ns/weft-system/sa/weft-agent";

/// One ADS stream opened.
#[derive(Debug, Clone)]
pub struct XdsStream {
    pub authorization: Option<String>,
    pub node_id: Option<String>,
    /// The URI SAN of the client certificate, when one was presented.
    pub client_certificate: Option<String>,
    /// Why the stream was refused (`authorization failed: ...`), if it was.
    pub refused: Option<String>,
}

struct Pki {
    root: rcgen::Certificate,
    intermediate: rcgen::Certificate,
    intermediate_key: KeyPair,
}

#[derive(Default)]
struct Log {
    issued: Vec<Issued>,
    refused: Vec<String>,
    streams: Vec<XdsStream>,
}

struct State {
    pki: Pki,
    /// The identities of pods "scheduled on the agent's node".
    on_node: Mutex<BTreeSet<String>>,
    refuse_all: AtomicBool,
    log: Mutex<Log>,
}

/// The running server; stops when dropped.
pub struct CaServer {
    pub address: SocketAddr,
    /// istiod's root certificate (PEM file) and the agent's token file.
    pub root_cert: PathBuf,
    pub token_file: PathBuf,
    dir: PathBuf,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl CaServer {
    /// Starts on 127.0.0.1 (a free port), trusting the agent for impersonating `on_node`'s identities.
    pub fn start(on_node: &[&str]) -> Result<CaServer, HarnessError> {
        let dir = std::env::temp_dir().join(format!("weft-ca-server-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir)?;
        let (pki, root_key) = pki()?;
        let server_config = server_tls(&pki, &root_key)?;
        std::fs::write(dir.join("root-cert.pem"), pki.root.pem())?;
        std::fs::write(dir.join("istio-token"), format!("{TOKEN}\n"))?;
        let state = Arc::new(State {
            pki,
            on_node: Mutex::new(on_node.iter().map(|s| s.to_string()).collect()),
            refuse_all: false.into(),
            log: Mutex::default(),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        // Bound here and adopted on the server's runtime, so a test may start it from async code.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        runtime.spawn(accept(listener, tokio_rustls::TlsAcceptor::from(server_config), tx));
        let ca = CaService(Arc::clone(&state));
        let ads = AggregatedDiscoveryServiceServer::new(Ads(Arc::clone(&state)));
        runtime.spawn(tonic::transport::Server::builder().add_service(ca).add_service(ads).serve_with_incoming(ReceiverStream::new(rx)));
        Ok(CaServer { address, root_cert: dir.join("root-cert.pem"), token_file: dir.join("istio-token"), dir, state, runtime: Some(runtime) })
    }

    /// Makes every certificate request fail (as when istiod is unavailable or stops trusting the agent).
    pub fn refuse_all(&self, refuse: bool) {
        self.state.refuse_all.store(refuse, Ordering::SeqCst);
    }

    pub fn issued(&self) -> Vec<Issued> {
        self.log().issued.clone()
    }

    pub fn refused(&self) -> Vec<String> {
        self.log().refused.clone()
    }

    pub fn xds_streams(&self) -> Vec<XdsStream> {
        self.log().streams.clone()
    }

    /// A certificate of this mesh for `identity` issued without a request: (chain PEM, key PEM), for a sidecar
    /// the test runs without an istio-agent (a real Envoy reading static secrets).
    pub fn issue_directly(&self, identity: &str) -> Result<(String, String), HarnessError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(identity.try_into().map_err(err)?)];
        params.distinguished_name = rcgen::DistinguishedName::new();
        let leaf = params.signed_by(&key, &self.state.pki.intermediate, &self.state.pki.intermediate_key).map_err(err)?;
        Ok((leaf.pem() + &self.state.pki.intermediate.pem(), key.serialize_pem()))
    }

    /// The PEM of the CA's root (what workload certificates chain to).
    pub fn root_pem(&self) -> String {
        self.state.pki.root.pem()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.state.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn err(e: impl std::fmt::Display) -> HarnessError {
    HarnessError(e.to_string())
}

/// Root → intermediate (the signer), as istiod with a plugged-in CA.
fn pki() -> Result<(Pki, KeyPair), HarnessError> {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::OrganizationName, "cluster.local");
    params.distinguished_name.push(DnType::CommonName, "test root");
    let root = params.self_signed(&root_key).map_err(err)?;
    let intermediate_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "test intermediate");
    let intermediate = params.signed_by(&intermediate_key, &root, &root_key).map_err(err)?;
    Ok((Pki { root, intermediate, intermediate_key }, root_key))
}

/// istiod's serving certificate (DNS SAN `istiod.istio-system.svc`), h2 only; client certificates of the
/// mesh optional.
fn server_tls(pki: &Pki, root_key: &KeyPair) -> Result<Arc<rustls::ServerConfig>, HarnessError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let params = CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(err)?;
    let cert = params.signed_by(&key, &pki.root, root_key).map_err(err)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .with_client_cert_verifier(client_verifier(&pki.root)?)
        .with_single_cert(vec![cert.der().clone()], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .map_err(err)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn client_verifier(root: &rcgen::Certificate) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, HarnessError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.der().clone()).map_err(err)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).allow_unauthenticated().build().map_err(err)
}

/// Accepts TLS connections; a client that did not negotiate h2 by ALPN is dropped, as grpc-go does.
async fn accept(listener: std::net::TcpListener, acceptor: tokio_rustls::TlsAcceptor, tx: tokio::sync::mpsc::Sender<Result<Tls, std::io::Error>>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
    while let Ok((tcp, _)) = listener.accept().await {
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                let _ = tx.send(Ok(Tls(tls))).await;
            }
        });
    }
}

/// A server-side TLS connection tonic can serve.
struct Tls(tokio_rustls::server::TlsStream<TcpStream>);

/// The client's certificate chain, as the request extensions carry it.
#[derive(Clone)]
struct PeerCertificates(Option<Vec<rustls_pki_types::CertificateDer<'static>>>);

impl tonic::transport::server::Connected for Tls {
    type ConnectInfo = PeerCertificates;
    fn connect_info(&self) -> PeerCertificates {
        PeerCertificates(self.0.get_ref().1.peer_certificates().map(|c| c.to_vec()))
    }
}

impl AsyncRead for Tls {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tls {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// `istio.v1.auth.IstioCertificateService`, written out as tonic's generated servers are.
#[derive(Clone)]
struct CaService(Arc<State>);

impl tonic::server::NamedService for CaService {
    const NAME: &'static str = "istio.v1.auth.IstioCertificateService";
}

impl<B> Service<http::Request<B>> for CaService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let state = Arc::clone(&self.0);
        if req.uri().path() != "/istio.v1.auth.IstioCertificateService/CreateCertificate" {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        Box::pin(async move {
            let codec = tonic::codec::ProstCodec::<CertificateResponse, CertificateRequest>::default();
            Ok(tonic::server::Grpc::new(codec).unary(Create(state), req).await)
        })
    }
}

struct Create(Arc<State>);

impl tonic::server::UnaryService<CertificateRequest> for Create {
    type Response = CertificateResponse;
    type Future = BoxFuture<Response<CertificateResponse>, Status>;

    fn call(&mut self, request: Request<CertificateRequest>) -> Self::Future {
        let state = Arc::clone(&self.0);
        Box::pin(async move {
            let result = state.create(&request);
            let mut log = state.log.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok((issued, chain)) => {
                    log.issued.push(issued);
                    Ok(Response::new(CertificateResponse { cert_chain: chain }))
                }
                Err(status) => {
                    log.refused.push(status.message().to_string());
                    Err(status)
                }
            }
        })
    }
}

impl State {
    /// What istiod's CA server and node authorizer check, then the signing.
    fn create(&self, request: &Request<CertificateRequest>) -> Result<(Issued, Vec<String>), Status> {
        if self.refuse_all.load(Ordering::SeqCst) {
            return Err(Status::unavailable("the test CA refuses every request now"));
        }
        let header = |name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        if header("authorization").as_deref() != Some(&format!("Bearer {TOKEN}")) {
            return Err(Status::unauthenticated(format!("bad bearer token: {:?}", header("authorization").map(|_| "<other>"))));
        }
        if header("clusterid").as_deref() != Some(CLUSTER_ID) {
            return Err(Status::invalid_argument(format!("clusterid header {:?}, want {CLUSTER_ID}", header("clusterid"))));
        }
        let message = request.get_ref();
        let identity = impersonated(message)?;
        if !self.on_node.lock().unwrap_or_else(|e| e.into_inner()).contains(&identity) {
            return Err(Status::permission_denied(format!("no pod with identity {identity} on the agent's node")));
        }
        let public_key = check_csr(&message.csr, &identity)?;
        let validity = if message.validity_duration > 0 { message.validity_duration } else { 86400 };
        let leaf = self.sign(&identity, public_key, validity).map_err(|e| Status::internal(e.0))?;
        let serial = {
            let (_, cert) = x509_parser::parse_x509_certificate(leaf.der()).map_err(|e| Status::internal(e.to_string()))?;
            cert.raw_serial_as_string().replace(':', "")
        };
        let chain = vec![leaf.pem(), self.pki.intermediate.pem(), self.pki.root.pem()];
        Ok((Issued { identity, validity_s: validity, serial }, chain))
    }

    fn sign(&self, identity: &str, public_key: CsrKey, validity_s: i64) -> Result<rcgen::Certificate, HarnessError> {
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.not_before = now.into();
        params.not_after = (now + Duration::from_secs(validity_s.unsigned_abs())).into();
        params.subject_alt_names = vec![SanType::URI(identity.try_into().map_err(err)?)];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.signed_by(&public_key, &self.pki.intermediate, &self.pki.intermediate_key).map_err(err)
    }
}

/// `metadata.ImpersonatedIdentity`, required (this server trusts the caller as a node agent only).
fn impersonated(message: &CertificateRequest) -> Result<String, Status> {
    use prost_types::value::Kind;
    let value = message.metadata.as_ref().and_then(|m| m.fields.get("ImpersonatedIdentity")).and_then(|v| v.kind.as_ref());
    match value {
        Some(Kind::StringValue(id)) if id.starts_with("spiffe://") => Ok(id.clone()),
        other => Err(Status::invalid_argument(format!("metadata.ImpersonatedIdentity: {other:?}"))),
    }
}

/// The CSR's public key, once its signature, key type and SANs are checked.
fn check_csr(pem: &str, identity: &str) -> Result<CsrKey, Status> {
    let bad = |why: String| Status::invalid_argument(format!("CSR: {why}"));
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    csr.verify_signature().map_err(|e| bad(format!("signature: {e}")))?;
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(bad("the key is not ECDSA P-256".into()));
    }
    let uris: Vec<String> = csr
        .requested_extensions()
        .into_iter()
        .flatten()
        .filter_map(|ext| match ext {
            x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.clone()),
            _ => None,
        })
        .flatten()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect();
    if uris != [identity] {
        return Err(bad(format!("URI SANs {uris:?} are not the impersonated identity {identity}")));
    }
    Ok(CsrKey(spki.subject_public_key.data.to_vec()))
}

/// A P-256 public key from a CSR, for rcgen to certify.
struct CsrKey(Vec<u8>);

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// An ADS that records who connected and keeps the stream open.
struct Ads(Arc<State>);

type Pending<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Pending<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Pending<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let authorization = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        let client_certificate = request.extensions().get::<PeerCertificates>().and_then(|p| p.0.as_ref()).and_then(|c| uri_san(c.first()?));
        let mut stream = request.into_inner();
        let node = stream.message().await.ok().flatten().and_then(|r| r.node);
        let namespace = node.as_ref().and_then(|n| n.metadata.as_ref()).and_then(|m| m.fields.get("NAMESPACE")).and_then(|v| match &v.kind {
            Some(xds_api::pb::google::protobuf::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        });
        // istiod: the client certificate's identity first, else the token's.
        let identity = match (&client_certificate, &authorization) {
            (Some(id), _) => Some(id.clone()),
            (None, Some(a)) if *a == format!("Bearer {TOKEN}") => Some(AGENT_IDENTITY.to_string()),
            _ => None,
        };
        let refused = match (&identity, &namespace) {
            (None, _) => Some("authentication failure".to_string()),
            (Some(id), Some(ns)) if id.contains(&format!("/ns/{ns}/sa/")) => None,
            (Some(id), ns) => Some(format!("authorization failed: no identities ([{id}]) matched {}/", ns.as_deref().unwrap_or(""))),
        };
        let record = XdsStream { authorization, node_id: node.map(|n| n.id), client_certificate, refused: refused.clone() };
        self.0.log.lock().unwrap_or_else(|e| e.into_inner()).streams.push(record);
        match refused {
            Some(why) => Err(Status::permission_denied(why)),
            None => Ok(Response::new(Box::pin(tokio_stream::pending()))),
        }
    }

    async fn delta_aggregated_resources(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("delta is not served by the test istiod"))
    }
}

/// The URI SAN of a certificate.
fn uri_san(der: &rustls_pki_types::CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) => Some(uri.to_string()),
        _ => None,
    })
}
