//! The TLS transport socket (rustls, ring): handshakes under the network filters, downstream on filter chains
//! and upstream on clusters, with Envoy's validation semantics: a chain to the configured roots (never a
//! host-name check: Envoy checks SANs only against `match_subject_alt_names`), SAN matchers, a client
//! certificate required or only validated when given; without roots an upstream's certificate is not
//! checked, as in Envoy. rustls configurations are built once per context and rebuilt when a secret changes
//! (a file's modification, a pushed identity), so a rotated certificate serves the next handshake while
//! established connections keep theirs.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;

use super::tls_info::{PeerCertificate, TlsInfo};
use crate::identity::manager::CertificateWatch;
use crate::identity::WorkloadCertificate;
use crate::config::secret::{DataSource, Secret, SecretKind};
use crate::config::store::{ByName, Entry};
use crate::config::tls::{iana_suite, CertificateSource, CommonTls, DownstreamTls, SanKind, SanMatcher, SdsSecret, TrustSource, UpstreamTls, Versions};

/// Key material of one certificate (never printed: see `Debug`).
pub struct Certificate {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Certificate({} in chain, key redacted)", self.chain.len())
    }
}

/// A secret pushed to a pod (its identity as `default`, the mesh roots as `ROOTCA`, SDS resources).
#[derive(Debug)]
pub enum Pushed {
    Certificate(Certificate),
    Roots(Vec<CertificateDer<'static>>),
}

/// A pod's (or the standalone proxy's) TLS state: the secrets pushed to it by name (its identity) and the
/// rustls configurations built from its contexts.
#[derive(Default)]
pub struct Tls {
    pushed: ArcSwap<HashMap<String, Arc<Pushed>>>,
    servers: Mutex<Vec<Cached<DownstreamTls, ServerSide>>>,
    clients: Mutex<Vec<Cached<UpstreamTls, ClientSide>>>,
}

/// A configuration built from `context`, valid while the secrets' `stamp` is unchanged.
struct Cached<C, R> {
    context: Weak<C>,
    stamp: Vec<u64>,
    built: Arc<R>,
}

/// A server configuration, the same without ALPN, and the URI SANs of the certificate it presents.
struct ServerSide {
    config: Arc<ServerConfig>,
    /// For clients that offer none of our protocols: Envoy (BoringSSL) then goes on without ALPN, where
    /// rustls would refuse the handshake.
    without_alpn: Arc<ServerConfig>,
    local_uri_sans: Arc<[String]>,
}

/// A handshake that did not complete, or a context whose secrets are missing or broken.
#[derive(Debug)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Tls {
    /// Makes `secrets` (by SDS name) the ones pushed to this pod; later handshakes use them.
    pub fn push(&self, secrets: HashMap<String, Arc<Pushed>>) {
        self.pushed.store(Arc::new(secrets));
    }

    /// Serves `watch`'s certificate as Istio's `default` and its roots as `ROOTCA`, following every renewal,
    /// until the watch ends; a withdrawn (expired) certificate is withdrawn here too: handshakes that need it
    /// fail, never fall back to plaintext.
    pub async fn follow(&self, mut watch: CertificateWatch) {
        loop {
            let current = watch.borrow_and_update().clone();
            self.push(current.map(|c| identity_secrets(&c)).unwrap_or_default());
            if watch.changed().await.is_err() {
                return;
            }
        }
    }

    /// Terminates TLS on a downstream connection.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(&self, io: S, context: &Arc<DownstreamTls>, secrets: &ByName<Secret>) -> Result<(tokio_rustls::server::TlsStream<S>, TlsInfo), TlsError> {
        let side = self.server_config(context, secrets)?;
        let failed = |e: io::Error| TlsError(format!("TLS handshake: {e}"));
        let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await.map_err(failed)?;
        let offered: Vec<&[u8]> = start.client_hello().alpn().map(Iterator::collect).unwrap_or_default();
        let overlap = offered.is_empty() || side.config.alpn_protocols.iter().any(|p| offered.contains(&p.as_slice()));
        let config = if overlap { &side.config } else { &side.without_alpn };
        let stream = start.into_stream(Arc::clone(config)).await.map_err(failed)?;
        let (_, session) = stream.get_ref();
        let info = TlsInfo {
            sni: session.server_name().map(str::to_string),
            alpn: session.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
            peer: session.peer_certificates().and_then(peer_certificate).map(Arc::new),
            local_uri_sans: Arc::clone(&side.local_uri_sans),
        };
        Ok((stream, info))
    }

    /// Originates TLS on an upstream connection to `ip`, offering `alpn` (the `istio.alpn` filter's list for
    /// the request) instead of the context's `alpn_protocols` when given.
    pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
        context: &Arc<UpstreamTls>,
        secrets: &ByName<Secret>,
        ip: IpAddr,
        alpn: Option<&[String]>,
    ) -> Result<(tokio_rustls::client::TlsStream<S>, Arc<[String]>), TlsError> {
        let side = self.client_config(context, secrets)?;
        let mut config = Arc::clone(&side.config);
        if let Some(protocols) = alpn {
            // The same configuration (certificates, verifier, session cache) with another list.
            let mut overridden = (*config).clone();
            overridden.alpn_protocols = protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
            config = Arc::new(overridden);
        }
        // Without `sni` Envoy sends none; rustls sends none for an IP address.
        let name = match &context.sni {
            Some(sni) => ServerName::try_from(sni.clone()).map_err(|e| TlsError(format!("sni {sni:?}: {e}")))?,
            None => ServerName::IpAddress(ip.into()),
        };
        let stream = TlsConnector::from(config).connect(name, io).await.map_err(|e| TlsError(format!("upstream TLS handshake: {e}")))?;
        Ok((stream, Arc::clone(&side.local_uri_sans)))
    }

    fn server_config(&self, context: &Arc<DownstreamTls>, secrets: &ByName<Secret>) -> Result<Arc<ServerSide>, TlsError> {
        self.cached(&self.servers, context, &context.common, secrets, |material| build_server(context, material))
    }

    fn client_config(&self, context: &Arc<UpstreamTls>, secrets: &ByName<Secret>) -> Result<Arc<ClientSide>, TlsError> {
        self.cached(&self.clients, context, &context.common, secrets, |material| build_client(&context.common, material))
    }

    fn cached<C, R>(&self, cache: &Mutex<Vec<Cached<C, R>>>, context: &Arc<C>, common: &CommonTls, secrets: &ByName<Secret>, build: impl FnOnce(Material) -> Result<R, TlsError>) -> Result<Arc<R>, TlsError> {
        let pushed = self.pushed.load();
        let sources = Sources { pushed: &pushed, secrets };
        let stamp = sources.stamp(common);
        {
            let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.retain(|c| c.context.strong_count() > 0);
            if let Some(c) = cache.iter().find(|c| std::ptr::eq(c.context.as_ptr(), Arc::as_ptr(context)) && c.stamp == stamp) {
                return Ok(Arc::clone(&c.built));
            }
        }
        let built = Arc::new(build(sources.material(common)?)?);
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|c| !std::ptr::eq(c.context.as_ptr(), Arc::as_ptr(context)));
        cache.push(Cached { context: Arc::downgrade(context), stamp, built: Arc::clone(&built) });
        Ok(built)
    }
}

/// Istio's SDS names: the workload's own certificate and the mesh's trust roots.
pub const IDENTITY_SECRET: &str = "default";
pub const ROOTS_SECRET: &str = "ROOTCA";

fn identity_secrets(c: &WorkloadCertificate) -> HashMap<String, Arc<Pushed>> {
    let certificate = Certificate { chain: c.chain.clone(), key: c.private_key.clone_key() };
    HashMap::from([
        (IDENTITY_SECRET.to_string(), Arc::new(Pushed::Certificate(certificate))),
        (ROOTS_SECRET.to_string(), Arc::new(Pushed::Roots(c.roots.clone()))),
    ])
}

/// Where a context's secrets are resolved: a secret the agent serves (`sds-grpc`, static names) is the one
/// pushed to the pod, else the configuration's (`static_resources.secrets`); one over ADS only the
/// configuration's (received on the pod's stream).
struct Sources<'a> {
    pushed: &'a HashMap<String, Arc<Pushed>>,
    secrets: &'a ByName<Secret>,
}

/// A context's secrets, loaded.
struct Material {
    certificate: Option<Arc<CertifiedKey>>,
    roots: Option<Arc<RootCertStore>>,
}

/// A named secret, found.
enum Found<'a> {
    Pushed(&'a Arc<Pushed>),
    Configured(&'a Entry<Secret>),
    Missing,
}

impl Sources<'_> {
    fn lookup(&self, sds: &SdsSecret) -> Found<'_> {
        let pushed = if sds.over_ads { None } else { self.pushed.get(&sds.name) };
        match (pushed, self.secrets.get(&sds.name)) {
            (Some(p), _) => Found::Pushed(p),
            (None, Some(e)) => Found::Configured(e),
            (None, None) => Found::Missing,
        }
    }

    /// What identifies the current secrets: pushed and received secrets by address, files by modification
    /// time and size.
    fn stamp(&self, common: &CommonTls) -> Vec<u64> {
        let mut stamp = Vec::new();
        let file = |stamp: &mut Vec<u64>, d: &DataSource| {
            if let DataSource::Filename(path) = d {
                let meta = std::fs::metadata(path).ok();
                let modified = meta.as_ref().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
                stamp.push(modified.map_or(0, |d| d.as_nanos() as u64));
                stamp.push(meta.map_or(0, |m| m.len()));
            }
        };
        if let Some(CertificateSource::Inline { certificate_chain, private_key }) = &common.certificate {
            file(&mut stamp, certificate_chain);
            file(&mut stamp, private_key);
        }
        if let Some(TrustSource::Inline(d)) = common.validation.as_ref().and_then(|v| v.trusted_ca.as_ref()) {
            file(&mut stamp, d);
        }
        for sds in common.sds_secrets() {
            match self.lookup(sds) {
                Found::Pushed(p) => stamp.push(Arc::as_ptr(p) as u64),
                Found::Configured(e) => {
                    stamp.push(Arc::as_ptr(e) as u64);
                    match &e.model.kind {
                        SecretKind::TlsCertificate { certificate_chain, private_key } => {
                            file(&mut stamp, certificate_chain);
                            file(&mut stamp, private_key);
                        }
                        SecretKind::ValidationContext { trusted_ca } => file(&mut stamp, trusted_ca),
                    }
                }
                Found::Missing => stamp.push(u64::MAX),
            }
        }
        stamp
    }

    fn material(&self, common: &CommonTls) -> Result<Material, TlsError> {
        let certificate = match &common.certificate {
            None => None,
            Some(CertificateSource::Inline { certificate_chain, private_key }) => Some(certified_key(&load_certificate(certificate_chain, private_key)?)?),
            Some(CertificateSource::Sds(sds)) => Some(match self.lookup(sds) {
                Found::Pushed(p) => match &**p {
                    Pushed::Certificate(c) => certified_key(c)?,
                    Pushed::Roots(_) => return Err(TlsError(format!("secret {:?} holds trust roots, not a certificate", sds.name))),
                },
                Found::Configured(e) => match &e.model.kind {
                    SecretKind::TlsCertificate { certificate_chain, private_key } => certified_key(&load_certificate(certificate_chain, private_key)?)?,
                    SecretKind::ValidationContext { .. } => return Err(TlsError(format!("secret {:?} is a validation_context, not a tls_certificate", sds.name))),
                },
                Found::Missing => return Err(TlsError(format!("secret {:?}: no certificate with that name yet", sds.name))),
            }),
        };
        let roots = match common.validation.as_ref().and_then(|v| v.trusted_ca.as_ref()) {
            None => None,
            Some(TrustSource::Inline(d)) => Some(root_store(&certificates(d)?)?),
            Some(TrustSource::Sds(sds)) => Some(match self.lookup(sds) {
                Found::Pushed(p) => match &**p {
                    Pushed::Roots(r) => root_store(r)?,
                    Pushed::Certificate(_) => return Err(TlsError(format!("secret {:?} holds a certificate, not trust roots", sds.name))),
                },
                Found::Configured(e) => match &e.model.kind {
                    SecretKind::ValidationContext { trusted_ca } => root_store(&certificates(trusted_ca)?)?,
                    SecretKind::TlsCertificate { .. } => return Err(TlsError(format!("secret {:?} is a tls_certificate, not a validation_context", sds.name))),
                },
                Found::Missing => return Err(TlsError(format!("secret {:?}: no trusted CA with that name yet", sds.name))),
            }),
        };
        Ok(Material { certificate, roots })
    }
}

/// Checks a secret received over xDS (or in a bootstrap) the way a handshake would load it, so a broken one
/// is rejected (NACKed, the last good one kept) rather than failing handshakes later. Files are only read
/// at handshake time, as in Envoy.
pub fn check_secret(secret: &Secret) -> Result<(), TlsError> {
    let inline = |d: &DataSource| matches!(d, DataSource::Inline(_));
    match &secret.kind {
        SecretKind::TlsCertificate { certificate_chain, private_key } if inline(certificate_chain) && inline(private_key) => {
            certified_key(&load_certificate(certificate_chain, private_key)?).map(drop)
        }
        SecretKind::ValidationContext { trusted_ca } if inline(trusted_ca) => root_store(&certificates(trusted_ca)?).map(drop),
        _ => Ok(()),
    }
}

fn read(d: &DataSource) -> Result<Vec<u8>, TlsError> {
    match d {
        DataSource::Inline(bytes) => Ok(bytes.clone()),
        DataSource::Filename(path) => std::fs::read(path).map_err(|e| TlsError(format!("{}: {e}", path.display()))),
    }
}

fn describe(d: &DataSource) -> String {
    match d {
        DataSource::Filename(p) => p.display().to_string(),
        DataSource::Inline(_) => "inline data".into(),
    }
}

/// PEM certificates (a chain or a bundle of roots).
pub fn certificates(d: &DataSource) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(d)?;
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| TlsError(format!("{}: not PEM certificates: {e}", describe(d))))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{}: no PEM certificate in it", describe(d))));
    }
    Ok(certs)
}

pub fn load_certificate(chain: &DataSource, key: &DataSource) -> Result<Certificate, TlsError> {
    let pem = read(key)?;
    // Never echo what the key file holds: only where it is.
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError(format!("{}: no PEM private key in it", describe(key))))?;
    Ok(Certificate { chain: certificates(chain)?, key })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The key checked against the leaf, and the leaf's validity: an expired or not yet valid certificate is
/// refused, never served.
fn certified_key(c: &Certificate) -> Result<Arc<CertifiedKey>, TlsError> {
    let leaf = c.chain.first().ok_or_else(|| TlsError("empty certificate chain".into()))?;
    check_validity(leaf)?;
    let key = provider().key_provider.load_private_key(c.key.clone_key()).map_err(|e| TlsError(format!("private key: {e}")))?;
    let certified = CertifiedKey::new(c.chain.clone(), key);
    certified.keys_match().map_err(|e| TlsError(format!("certificate and private key: {e}")))?;
    Ok(Arc::new(certified))
}

fn check_validity(leaf: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| TlsError(format!("certificate: {e}")))?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now < validity.not_before {
        return Err(TlsError(format!("certificate {} is not valid before {}", cert.subject(), validity.not_before)));
    }
    if now > validity.not_after {
        return Err(TlsError(format!("certificate {} expired at {}", cert.subject(), validity.not_after)));
    }
    Ok(())
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for (i, root) in roots.iter().enumerate() {
        store.add(root.clone()).map_err(|e| TlsError(format!("trusted CA {i}: {e}")))?;
    }
    Ok(Arc::new(store))
}

fn provider_for(common: &CommonTls) -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    // BoringSSL's (Envoy's) preference: AES-128-GCM first, whose SHA-256 handshake hashing is cheaper than
    // the SHA-384 of rustls's first choice.
    provider.cipher_suites.sort_by_key(|s| !s.suite().as_str().is_some_and(|n| n.contains("AES_128_GCM")));
    if let Some(allowed) = &common.cipher_suites {
        let allowed: Vec<&str> = allowed.iter().filter_map(|s| iana_suite(s)).collect();
        // The list governs TLS 1.2 only, as in Envoy; TLS 1.3 suites are not configurable there.
        provider.cipher_suites.retain(|s| s.version() == &rustls::version::TLS13 || s.suite().as_str().is_some_and(|n| allowed.contains(&n)));
    }
    provider
}

fn versions(v: Versions) -> Vec<&'static rustls::SupportedProtocolVersion> {
    let mut out = Vec::new();
    if v.tls13 {
        out.push(&rustls::version::TLS13);
    }
    if v.tls12 {
        out.push(&rustls::version::TLS12);
    }
    out
}

fn build_server(context: &DownstreamTls, material: Material) -> Result<ServerSide, TlsError> {
    let common = &context.common;
    let provider = Arc::new(provider_for(common));
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider)).with_protocol_versions(&versions(common.versions)).map_err(|e| TlsError(e.to_string()))?;
    let builder = match &material.roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let webpki = WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(&provider));
            let webpki = if context.require_client_certificate { webpki } else { webpki.allow_unauthenticated() };
            let inner = webpki.build().map_err(|e| TlsError(format!("client certificate validation: {e}")))?;
            let sans = common.validation.as_ref().map(|v| v.san_matchers.clone()).unwrap_or_default();
            builder.with_client_cert_verifier(Arc::new(ClientSans { inner, sans }))
        }
    };
    let certificate = material.certificate.ok_or_else(|| TlsError("a server needs a certificate".into()))?;
    let local_uri_sans = certificate.cert.first().map(uri_sans).unwrap_or_default();
    let mut config = builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certificate)));
    let without_alpn = Arc::new(config.clone());
    config.alpn_protocols = common.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(ServerSide { config: Arc::new(config), without_alpn, local_uri_sans })
}

/// A client context built: its configuration and the URI SANs of the certificate it presents (Istio's
/// telemetry reports the client side's own identity as `source_principal`).
struct ClientSide {
    config: Arc<ClientConfig>,
    local_uri_sans: Arc<[String]>,
}

fn build_client(common: &CommonTls, material: Material) -> Result<ClientSide, TlsError> {
    let provider = Arc::new(provider_for(common));
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider)).with_protocol_versions(&versions(common.versions)).map_err(|e| TlsError(e.to_string()))?;
    let inner = match &material.roots {
        Some(roots) => Some(rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(&provider)).build().map_err(|e| TlsError(format!("server certificate validation: {e}")))?),
        None => None,
    };
    let sans = common.validation.as_ref().map(|v| v.san_matchers.clone()).unwrap_or_default();
    let verifier = Arc::new(ServerSans { inner, sans, algorithms: provider.signature_verification_algorithms });
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    let local_uri_sans = material.certificate.as_ref().and_then(|c| c.cert.first()).map(uri_sans).unwrap_or_default();
    let mut config = match material.certificate {
        Some(certificate) => builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certificate))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = common.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(ClientSide { config: Arc::new(config), local_uri_sans })
}

/// A certificate's URI SANs.
fn uri_sans(der: &CertificateDer<'_>) -> Arc<[String]> {
    sans(der).into_iter().filter(|(k, _)| *k == SanKind::Uri).map(|(_, v)| v).collect()
}

/// A presented chain's leaf as RBAC, SAN matchers, `x-forwarded-client-cert` and access logs see it;
/// `None` if it does not parse.
pub fn peer_certificate(chain: &[CertificateDer<'_>]) -> Option<PeerCertificate> {
    let der = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let sha256 = ring::digest::digest(&ring::digest::SHA256, der).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let chain = chain.iter().map(|c| c.to_vec()).collect();
    let mut peer = PeerCertificate { subject: rfc2253(cert.subject()), sha256, chain, ..Default::default() };
    for (kind, name) in general_names(&cert) {
        match kind {
            SanKind::Uri => peer.uri_sans.push(name),
            SanKind::Dns => peer.dns_sans.push(name),
            _ => {}
        }
    }
    Some(peer)
}

/// The subject as Envoy prints it (RFC 2253: last RDN first, no spaces).
fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|a| {
                    let oid = a.attr_type().to_id_string();
                    format!("{}={}", short_name(&oid).unwrap_or(&oid), a.as_str().unwrap_or_default())
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// OpenSSL's short names of the attributes RFC 2253 output uses.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "emailAddress",
        _ => return None,
    })
}

/// Every SAN of a certificate with its kind, for `match_subject_alt_names`.
fn sans(der: &CertificateDer<'_>) -> Vec<(SanKind, String)> {
    x509_parser::parse_x509_certificate(der).map(|(_, cert)| general_names(&cert)).unwrap_or_default()
}

/// A parsed certificate's SANs with their kinds.
fn general_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<(SanKind, String)> {
    let Ok(Some(ext)) = cert.subject_alternative_name() else { return Vec::new() };
    use x509_parser::extensions::GeneralName;
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((SanKind::Uri, u.to_string())),
            GeneralName::DNSName(d) => Some((SanKind::Dns, d.to_string())),
            GeneralName::RFC822Name(e) => Some((SanKind::Email, e.to_string())),
            GeneralName::IPAddress(ip) => ip_text(ip).map(|ip| (SanKind::IpAddress, ip)),
            _ => None,
        })
        .collect()
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?).to_string()),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?).to_string()),
        _ => None,
    }
}

/// Envoy's rule: with matchers, some SAN of the leaf must satisfy one of them.
fn sans_accepted(leaf: &CertificateDer<'_>, matchers: &[SanMatcher]) -> bool {
    if matchers.is_empty() {
        return true;
    }
    let names = sans(leaf);
    matchers.iter().any(|m| names.iter().any(|(kind, value)| (m.kind == SanKind::Any || m.kind == *kind) && m.matcher.matches(value)))
}

fn san_mismatch() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// WebPKI's client verification, then the SAN matchers.
#[derive(Debug)]
struct ClientSans {
    inner: Arc<dyn ClientCertVerifier>,
    sans: Vec<SanMatcher>,
}

impl ClientCertVerifier for ClientSans {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(&self, leaf: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], now: UnixTime) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(leaf, intermediates, now)?;
        if sans_accepted(leaf, &self.sans) {
            Ok(verified)
        } else {
            Err(san_mismatch())
        }
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// An upstream's certificate as Envoy checks it: the chain to the roots when there are roots (the host
/// name is not checked), then the SAN matchers; without roots, nothing but the handshake's signatures.
#[derive(Debug)]
struct ServerSans {
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    sans: Vec<SanMatcher>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerSans {
    fn verify_server_cert(&self, leaf: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], name: &ServerName<'_>, ocsp: &[u8], now: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(inner) = &self.inner {
            match inner.verify_server_cert(leaf, intermediates, name, ocsp, now) {
                // The chain is good; only the name differs, which Envoy does not check.
                Ok(_) | Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        if sans_accepted(leaf, &self.sans) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(san_mismatch())
        }
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A connection with or without TLS under it: what the filters read and write.
pub enum MaybeTls<P, T> {
    Plain(P),
    Tls(Box<T>),
}

impl<P: AsyncRead + Unpin, T: AsyncRead + Unpin> AsyncRead for MaybeTls<P, T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(p) => Pin::new(p).poll_read(cx, buf),
            MaybeTls::Tls(t) => Pin::new(&mut **t).poll_read(cx, buf),
        }
    }
}

impl<P: AsyncWrite + Unpin, T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<P, T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(p) => Pin::new(p).poll_write(cx, buf),
            MaybeTls::Tls(t) => Pin::new(&mut **t).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(p) => Pin::new(p).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(t) => Pin::new(&mut **t).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(p) => p.is_write_vectored(),
            MaybeTls::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(p) => Pin::new(p).poll_flush(cx),
            MaybeTls::Tls(t) => Pin::new(&mut **t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(p) => Pin::new(p).poll_shutdown(cx),
            MaybeTls::Tls(t) => Pin::new(&mut **t).poll_shutdown(cx),
        }
    }
}

/// Handshakes over in-memory pipes with certificates of a test CA: who is accepted, what the filters learn
/// of the peer, and that a pushed certificate serves the next handshake.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tls::{downstream, upstream};
    use crate::config::tree::Obj;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    impl Ca {
        fn new() -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            Ca { cert: params.self_signed(&key).unwrap(), key }
        }

        /// A leaf for `uri` (a SPIFFE id): (chain PEM, key PEM).
        fn issue(&self, uri: &str) -> (String, String) {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
            params.distinguished_name.push(rcgen::DnType::CommonName, "workload");
            let key = KeyPair::generate().unwrap();
            (params.signed_by(&key, &self.cert, &self.key).unwrap().pem(), key.serialize_pem())
        }

        fn root(&self) -> String {
            self.cert.pem()
        }
    }

    fn inline(pem: &str) -> serde_json::Value {
        json!({"inline_string": pem})
    }

    fn server_context(ca: &Ca, who: &str, require: bool, san_prefix: &str) -> Arc<DownstreamTls> {
        let (chain, key) = ca.issue(who);
        let v = json!({"name": "tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": require,
            "common_tls_context": {"tls_certificates": [{"certificate_chain": inline(&chain), "private_key": inline(&key)}],
                "alpn_protocols": ["istio-peer-exchange", "h2"],
                "validation_context": {"trusted_ca": inline(&ca.root()), "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"prefix": san_prefix}}]}}}});
        match downstream(Some(Obj::new(&v, "ts").unwrap())).unwrap() {
            crate::config::tls::TransportSocket::Tls(t) => t,
            other => panic!("{other:?}"),
        }
    }

    fn client_context(ca: &Ca, who: Option<&str>, san_exact: &str) -> Arc<UpstreamTls> {
        let mut common = json!({"alpn_protocols": ["istio-peer-exchange", "istio"],
            "validation_context": {"trusted_ca": inline(&ca.root()), "match_subject_alt_names": [{"exact": san_exact}]}});
        if let Some(who) = who {
            let (chain, key) = ca.issue(who);
            common["tls_certificates"] = json!([{"certificate_chain": inline(&chain), "private_key": inline(&key)}]);
        }
        let v = json!({"name": "tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "outbound_.8080_._.b.ns.svc.cluster.local", "common_tls_context": common}});
        match upstream(Some(Obj::new(&v, "ts").unwrap())).unwrap() {
            crate::config::tls::TransportSocket::Tls(t) => t,
            other => panic!("{other:?}"),
        }
    }

    /// One exchange: the server's outcome (what it learnt of the client) and whether the client got the echo.
    async fn handshake(server: &Tls, down: &Arc<DownstreamTls>, client: &Tls, up: &Arc<UpstreamTls>) -> (Result<TlsInfo, String>, bool) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let accepting = async {
            let (mut stream, info) = server.accept(a, down, &ByName::default()).await.map_err(|e| e.0)?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            stream.write_all(&byte).await.map_err(|e| e.to_string())?;
            stream.flush().await.map_err(|e| e.to_string())?;
            Ok(info)
        };
        let connecting = async {
            let Ok((mut stream, _)) = client.connect(b, up, &ByName::default(), "10.0.0.2".parse().unwrap(), None).await else { return false };
            let mut byte = [0u8; 1];
            stream.write_all(b"x").await.is_ok() && stream.flush().await.is_ok() && stream.read_exact(&mut byte).await.is_ok()
        };
        tokio::join!(accepting, connecting)
    }

    #[tokio::test]
    async fn mutual_tls_with_san_checks_both_ways() {
        let ca = Ca::new();
        let (server, client) = (Tls::default(), Tls::default());
        let down = server_context(&ca, "spiffe://cluster.local/ns/b/sa/b", true, "spiffe://cluster.local/");
        let up = client_context(&ca, Some("spiffe://cluster.local/ns/a/sa/a"), "spiffe://cluster.local/ns/b/sa/b");
        let (info, echoed) = handshake(&server, &down, &client, &up).await;
        let info = info.unwrap();
        assert!(echoed);
        assert_eq!(info.peer.as_ref().unwrap().uri_sans, ["spiffe://cluster.local/ns/a/sa/a"]);
        assert_eq!(info.peer.as_ref().unwrap().subject, "CN=workload");
        assert_eq!(info.sni.as_deref(), Some("outbound_.8080_._.b.ns.svc.cluster.local"));
        assert_eq!(info.alpn.as_deref(), Some("istio-peer-exchange"));

        // The client expects another server identity: refused by the client.
        let wrong_server = client_context(&ca, Some("spiffe://cluster.local/ns/a/sa/a"), "spiffe://cluster.local/ns/c/sa/c");
        let (_, echoed) = handshake(&server, &down, &client, &wrong_server).await;
        assert!(!echoed, "a server with another SAN must be refused");
        // A client outside the trust domain prefix, and a client without a certificate: refused by the server.
        let outsider = client_context(&ca, Some("spiffe://other.domain/ns/a/sa/a"), "spiffe://cluster.local/ns/b/sa/b");
        assert!(handshake(&server, &down, &client, &outsider).await.0.is_err());
        let anonymous = client_context(&ca, None, "spiffe://cluster.local/ns/b/sa/b");
        assert!(handshake(&server, &down, &client, &anonymous).await.0.is_err());
        // Another CA's client: refused.
        let stranger = client_context(&Ca::new(), Some("spiffe://cluster.local/ns/a/sa/a"), "spiffe://cluster.local/ns/b/sa/b");
        assert!(handshake(&server, &down, &client, &stranger).await.0.is_err());
    }

    #[tokio::test]
    async fn optional_client_certificates_and_unverified_upstreams() {
        let ca = Ca::new();
        let down = server_context(&ca, "spiffe://cluster.local/ns/b/sa/b", false, "spiffe://cluster.local/");
        let v = json!({"name": "tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"}});
        let crate::config::tls::TransportSocket::Tls(bare) = upstream(Some(Obj::new(&v, "ts").unwrap())).unwrap() else { panic!() };
        let (info, echoed) = handshake(&Tls::default(), &down, &Tls::default(), &bare).await;
        // No roots upstream: the server's certificate is not checked, as in Envoy; no client certificate is fine
        // when it is not required.
        assert!(echoed);
        assert_eq!(info.unwrap().peer, None);
    }

    #[tokio::test]
    async fn pushed_identities_serve_the_next_handshake() {
        let ca = Ca::new();
        let server = Tls::default();
        let context = |name: &str| {
            let v = json!({"name": "tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": name, "sds_config": {"api_config_source": {"api_type": "GRPC", "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]}}}]}}});
            let crate::config::tls::TransportSocket::Tls(t) = downstream(Some(Obj::new(&v, "ts").unwrap())).unwrap() else { panic!() };
            t
        };
        let down = context("default");
        let up = client_context(&ca, None, "spiffe://cluster.local/ns/b/sa/first");
        // Nothing pushed yet: fail closed.
        assert!(handshake(&server, &down, &Tls::default(), &up).await.0.unwrap_err().contains("\"default\""));
        let push = |who: &str| {
            let (chain, key) = ca.issue(who);
            let certificate = load_certificate(&DataSource::Inline(chain.into_bytes()), &DataSource::Inline(key.into_bytes())).unwrap();
            assert!(!format!("{certificate:?}").contains("PRIVATE"), "keys are never printed");
            server.push(HashMap::from([("default".to_string(), Arc::new(Pushed::Certificate(certificate)))]));
        };
        push("spiffe://cluster.local/ns/b/sa/first");
        assert!(handshake(&server, &down, &Tls::default(), &up).await.1);
        push("spiffe://cluster.local/ns/b/sa/second");
        assert!(!handshake(&server, &down, &Tls::default(), &up).await.1, "the rotated certificate serves the next handshake");
        let up = client_context(&ca, None, "spiffe://cluster.local/ns/b/sa/second");
        assert!(handshake(&server, &down, &Tls::default(), &up).await.1);
    }

    #[test]
    fn broken_material_is_named_not_echoed() {
        let e = load_certificate(&DataSource::Inline(b"not pem".to_vec()), &DataSource::Inline(b"SECRET-KEY-BYTES".to_vec())).unwrap_err();
        assert!(e.0.contains("no PEM private key") && !e.0.contains("SECRET"), "{e}");
        let e = certificates(&DataSource::Filename("/nonexistent/chain.pem".into())).unwrap_err();
        assert!(e.0.contains("/nonexistent/chain.pem"), "{e}");
    }
}
