//! gRPC to istiod's secured port (15012), as istio-agent and ztunnel reach it: TLS verified against istiod's
//! root certificate (a file, re-read at every connection so a rotated root is picked up), HTTP/2 negotiated by
//! ALPN, and the agent's own credential as `authorization: Bearer <token>` (the token file re-read for every
//! request, since the kubelet rotates projected tokens). The CA client and the pods' xDS streams share it.
//!
//! A pod's xDS stream may also present the pod's own workload certificate as TLS client certificate: istiod
//! authenticates a client certificate before a token, and its xDS identity check (`XDS_AUTH`, on by default)
//! wants an identity in the namespace of the proxy the stream configures, which the agent's token is not.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::codegen::{InterceptedService, Service};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use super::manager::CertificateWatch;
use super::BoxFuture;
use crate::config::agent::IstiodConnection;

/// A channel whose requests carry the bearer token when one is configured.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// A lazily connected channel to `address` (`host:port`) over TLS as `connection` says, with its token, and
/// presenting `client_identity`'s current certificate when given (and valid at the handshake).
pub fn istiod_channel(address: &str, connection: &IstiodConnection, client_identity: Option<CertificateWatch>) -> Result<AuthChannel, String> {
    let endpoint = Endpoint::from_shared(format!("https://{address}")).map_err(|e| format!("{address}: {e}"))?;
    let server_name = ServerName::try_from(connection.server_name.clone())
        .map_err(|e| format!("server name {:?}: {e}", connection.server_name))?;
    // Read now too, so a missing or damaged root file fails at start-up rather than at the first connection.
    client_config(&connection.root_cert, None)?;
    let connector = TlsConnector { root_cert: Arc::new(connection.root_cert.clone()), server_name, client_identity };
    let channel = endpoint.connect_with_connector_lazy(connector);
    Ok(InterceptedService::new(channel, BearerToken(Some(Arc::new(connection.token_file.clone())))))
}

/// A plaintext channel (istiod's 15010), without a token.
pub fn plaintext_channel(address: &str) -> Result<AuthChannel, String> {
    let endpoint = Endpoint::from_shared(format!("http://{address}")).map_err(|e| format!("{address}: {e}"))?;
    Ok(InterceptedService::new(endpoint.connect_lazy(), BearerToken(None)))
}

/// Adds `authorization: Bearer <token>` from a file, read for every request.
#[derive(Clone, Debug)]
pub struct BearerToken(pub Option<Arc<PathBuf>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(path) = &self.0 {
            let value = bearer(path).map_err(tonic::Status::unauthenticated)?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// The `authorization` header value for the token in `path`. The token itself never appears in errors.
pub fn bearer(path: &Path) -> Result<MetadataValue<tonic::metadata::Ascii>, String> {
    let token = std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    format!("Bearer {token}").parse().map_err(|_| format!("token file {}: not a printable ASCII token", path.display()))
}

/// Opens TCP to the URI's authority, then TLS verified against the root certificate file.
#[derive(Clone)]
struct TlsConnector {
    root_cert: Arc<PathBuf>,
    server_name: ServerName<'static>,
    client_identity: Option<CertificateWatch>,
}

impl Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let other = std::io::Error::other;
            let authority = uri.authority().ok_or_else(|| other(format!("{uri}: no host:port")))?.to_string();
            let config = client_config(&this.root_cert, this.client_identity.clone()).map_err(other)?;
            let tcp = TcpStream::connect(&authority).await?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(config).connect(this.server_name.clone(), tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// rustls with the ring provider, trusting only the roots of `root_cert`, offering HTTP/2, presenting
/// `client_identity`'s certificate if any.
fn client_config(root_cert: &Path, client_identity: Option<CertificateWatch>) -> Result<Arc<rustls::ClientConfig>, String> {
    let pem = std::fs::read(root_cert).map_err(|e| format!("root certificate {}: {e}", root_cert.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in super::pem_certificates(&pem, &format!("root certificate {}", root_cert.display()))? {
        roots.add(cert).map_err(|e| format!("root certificate {}: {e}", root_cert.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match client_identity {
        Some(watch) => builder.with_client_cert_resolver(Arc::new(WorkloadClientCert(watch))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Presents a workload's current certificate, read at each handshake so renewals are picked up.
struct WorkloadClientCert(CertificateWatch);

impl std::fmt::Debug for WorkloadClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkloadClientCert")
    }
}

impl rustls::client::ResolvesClientCert for WorkloadClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let cert = self.0.borrow().clone().filter(|c| c.is_valid_at(std::time::SystemTime::now()))?;
        let key = rustls::crypto::ring::sign::any_supported_type(&cert.private_key).ok()?;
        Some(Arc::new(rustls::sign::CertifiedKey::new(cert.chain.clone(), key)))
    }

    fn has_certs(&self) -> bool {
        true
    }
}
