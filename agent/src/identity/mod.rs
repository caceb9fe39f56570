//! Workload identities: the SPIFFE certificate each captured pod presents, as its Istio sidecar would.
//!
//! A [`CertificateSource`] issues a certificate for one [`SpiffeId`]: [`istio_ca::IstioCa`] asks istiod's CA
//! for it the way ztunnel does for the pods of its node (impersonation), [`file_ca::FileCa`] signs it locally
//! from a CA certificate and key on disk. The [`manager::IdentityManager`] fetches each identity once however
//! many pods share it, renews it at half its lifetime and keeps the last good one while it is valid.
//!
//! A leaf below the proxy: it imports nothing of the data path. Private keys are never logged: the types that
//! hold one redact it in `Debug`.

pub mod file_ca;
pub mod grpc;
pub mod istio_ca;
pub mod manager;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, the identity Istio gives a workload.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Checks each part as the SPIFFE spec and Kubernetes name them: a trust domain of lower-case letters,
    /// digits, `.`, `-` and `_`; namespace and service account non-empty path segments without `/`.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<SpiffeId, String> {
        let td_ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
        if trust_domain.is_empty() || !trust_domain.chars().all(td_ok) {
            return Err(format!("trust domain {trust_domain:?}: use lower-case letters, digits, '.', '-' and '_'"));
        }
        let segment_ok = |s: &str| !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_graphic() && c != '/' && c != '%');
        for (what, value) in [("namespace", namespace), ("service account", service_account)] {
            if !segment_ok(value) {
                return Err(format!("{what} {value:?} is not a valid SPIFFE path segment"));
            }
        }
        Ok(SpiffeId { trust_domain: trust_domain.into(), namespace: namespace.into(), service_account: service_account.into() })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = String;

    fn from_str(s: &str) -> Result<SpiffeId, String> {
        let bad = || format!("{s:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>");
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa).map_err(|e| format!("{}: {e}", bad())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

/// One identity's certificate: what a TLS handshake needs to present it (`default` in Istio's SDS) and to
/// verify peers (`ROOTCA`).
pub struct WorkloadCertificate {
    pub identity: SpiffeId,
    /// Leaf first, then the intermediates; the root is in `roots`.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (PKCS#8). Never printed.
    pub private_key: PrivateKeyDer<'static>,
    /// The mesh's trust roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// The leaf's serial number, hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .field("chain", &format_args!("{} certificate(s)", self.chain.len()))
            .field("private_key", &format_args!("[redacted]"))
            .field("roots", &format_args!("{} certificate(s)", self.roots.len()))
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl WorkloadCertificate {
    /// Builds it from a leaf and what came with it, checking what a CA could get wrong: the leaf parses,
    /// names exactly `identity` as its URI SAN (as ztunnel checks), and certifies the key we generated.
    pub fn new(
        identity: &SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: &rcgen::KeyPair,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<WorkloadCertificate, String> {
        let leaf_der = chain.first().ok_or("the certificate chain is empty")?;
        let (_, leaf) = X509Certificate::from_der(leaf_der).map_err(|e| format!("the leaf certificate does not parse: {e}"))?;
        let uris = uri_sans(&leaf)?;
        if uris != [identity.to_string()] {
            return Err(format!("the certificate is for {uris:?}, not {identity}"));
        }
        if leaf.public_key().raw != key.public_key_der().as_slice() {
            return Err("the certificate does not certify the key of the request".into());
        }
        if roots.is_empty() {
            return Err("no trust roots".into());
        }
        let validity = leaf.validity();
        Ok(WorkloadCertificate {
            identity: identity.clone(),
            serial: leaf.raw_serial_as_string().replace(':', ""),
            not_before: unix_time(validity.not_before.timestamp()),
            not_after: unix_time(validity.not_after.timestamp()),
            private_key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            chain,
            roots,
        })
    }

    /// Whether it may be handed out at `now`: not before its start, not at or after its end.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }
}

/// The URI SANs of a certificate.
pub fn uri_sans(cert: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let san = cert.subject_alternative_name().map_err(|e| format!("subjectAltName: {e}"))?;
    Ok(san
        .map(|san| san.value.general_names.iter().filter_map(|n| match n {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        }))
        .into_iter()
        .flatten()
        .collect())
}

fn unix_time(seconds: i64) -> SystemTime {
    match u64::try_from(seconds) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

/// A fresh ECDSA P-256 key and a CSR for it naming `identity` as its only URI SAN, as ztunnel requests.
pub fn key_and_csr(identity: &SpiffeId) -> Result<(rcgen::KeyPair, String), String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| format!("key generation: {e}"))?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![san_uri(identity)?];
    let csr = params.serialize_request(&key).map_err(|e| format!("CSR: {e}"))?;
    let pem = csr.pem().map_err(|e| format!("CSR: {e}"))?;
    Ok((key, pem))
}

pub(crate) fn san_uri(identity: &SpiffeId) -> Result<rcgen::SanType, String> {
    let uri = identity.to_string().try_into().map_err(|e| format!("{identity}: {e}"))?;
    Ok(rcgen::SanType::URI(uri))
}

/// Reads every certificate of a PEM file (or PEM text).
pub fn pem_certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|e| format!("{what}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no PEM certificate"));
    }
    Ok(certs)
}

/// The certificate source the settings name, or none; and the manager over it.
pub fn manager(settings: &crate::config::agent::IdentitySettings) -> Result<Option<std::sync::Arc<manager::IdentityManager>>, String> {
    use crate::config::agent::CaSettings;
    let source: std::sync::Arc<dyn CertificateSource> = match &settings.ca {
        None => return Ok(None),
        Some(CaSettings::Istiod(ca)) => std::sync::Arc::new(istio_ca::IstioCa::new(ca).map_err(|e| format!("ca istiod: {e}"))?),
        Some(CaSettings::File { cert, key }) => std::sync::Arc::new(file_ca::FileCa::load(cert, key).map_err(|e| format!("ca file: {e}"))?),
    };
    let manager = manager::IdentityManager::new(source, &settings.trust_domain, settings.cert_lifetime, manager::Backoff::default());
    Ok(Some(manager))
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Issues certificates: istiod's CA, a local file CA, or a test's.
pub trait CertificateSource: Send + Sync + 'static {
    /// A new certificate (and key) for `identity`, asking for `lifetime`.
    fn fetch<'a>(&'a self, identity: &'a SpiffeId, lifetime: Duration) -> BoxFuture<'a, Result<WorkloadCertificate, String>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_and_print() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage".parse().unwrap();
        assert_eq!((id.trust_domain(), id.namespace(), id.service_account()), ("cluster.local", "default", "bookinfo-productpage"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/bookinfo-productpage");
        assert_eq!(id, SpiffeId::new("cluster.local", "default", "bookinfo-productpage").unwrap());
    }

    #[test]
    fn bad_spiffe_ids_are_refused_with_the_reason() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a%2f/sa/b",
        ] {
            let e = bad.parse::<SpiffeId>().unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        assert!(SpiffeId::new("td", "a b", "c").unwrap_err().contains("namespace"));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let id = SpiffeId::new("cluster.local", "ns", "sa").unwrap();
        let (key, _) = key_and_csr(&id).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![san_uri(&id).unwrap()];
        let cert = params.self_signed(&key).unwrap();
        let wc = WorkloadCertificate::new(&id, vec![cert.der().clone()], &key, vec![cert.der().clone()]).unwrap();
        let shown = format!("{wc:?} {wc:#?}");
        assert!(shown.contains("[redacted]") && shown.contains("spiffe://cluster.local/ns/ns/sa/sa"), "{shown}");
        let der = key.serialize_der();
        // No run of the key's bytes, in any of the forms Debug could print them.
        let tail = &der[der.len() - 16..];
        assert!(!shown.contains(&format!("{tail:?}")[1..20]), "{shown}");
        assert!(!shown.contains(&key.serialize_pem()[30..60]), "{shown}");
        let hex: String = tail.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!shown.contains(&hex), "{shown}");
    }

    #[test]
    fn a_certificate_for_another_identity_or_key_is_refused() {
        let id = SpiffeId::new("cluster.local", "ns", "sa").unwrap();
        let other = SpiffeId::new("cluster.local", "ns", "other").unwrap();
        let (key, _) = key_and_csr(&id).unwrap();
        let (other_key, _) = key_and_csr(&id).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![san_uri(&other).unwrap()];
        let cert = params.self_signed(&key).unwrap();
        let e = WorkloadCertificate::new(&id, vec![cert.der().clone()], &key, vec![cert.der().clone()]).unwrap_err();
        assert!(e.contains("not spiffe://cluster.local/ns/ns/sa/sa"), "{e}");
        let e = WorkloadCertificate::new(&other, vec![cert.der().clone()], &other_key, vec![cert.der().clone()]).unwrap_err();
        assert!(e.contains("key"), "{e}");
    }
}
