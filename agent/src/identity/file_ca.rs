//! A CA from files: a CA certificate and its private key (PEM) on disk sign each identity's certificate
//! locally. For the standalone proxy, the demo and tests, where no istiod CA is at hand; the CA certificate is
//! the trust root handed out with every certificate.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, IsCa, KeyIdMethod, KeyPair};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use super::{key_and_csr, san_uri, BoxFuture, CertificateSource, SpiffeId, WorkloadCertificate};

/// Signs certificates with a CA certificate and key read once at start.
pub struct FileCa {
    /// The CA as rcgen's issuer: same subject, key and key identifier as the file's certificate, which is
    /// what an issued certificate's issuer name and authority key identifier are made of.
    issuer: rcgen::Certificate,
    key: KeyPair,
    root: CertificateDer<'static>,
}

impl FileCa {
    /// Reads the CA; errors name the file at fault.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<FileCa, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let cert_pem = read(cert_path)?;
        let key_pem = String::from_utf8(read(key_path)?).map_err(|_| format!("{}: not PEM", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| format!("{}: {e}", key_path.display()))?;
        let root = super::pem_certificates(&cert_pem, &cert_path.display().to_string())?.remove(0);
        FileCa::new(root, key).map_err(|e| format!("{}: {e}", cert_path.display()))
    }

    /// A CA from its certificate (DER) and key.
    pub fn new(root: CertificateDer<'static>, key: KeyPair) -> Result<FileCa, String> {
        let (_, cert) = X509Certificate::from_der(&root).map_err(|e| format!("the CA certificate does not parse: {e}"))?;
        if !cert.is_ca() {
            return Err("the certificate is not a CA (basicConstraints cA is not set)".into());
        }
        if cert.public_key().raw != key.public_key_der().as_slice() {
            return Err("the key is not the CA certificate's".into());
        }
        let issuer = issuer_params(&cert)?.self_signed(&key).map_err(|e| format!("the CA: {e}"))?;
        Ok(FileCa { issuer, key, root })
    }

    /// Issues a certificate for `identity` valid from now for `lifetime`, with a fresh key.
    pub fn issue(&self, identity: &SpiffeId, lifetime: Duration) -> Result<WorkloadCertificate, String> {
        let (key, _) = key_and_csr(identity)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.not_before = now.into();
        params.not_after = (now + lifetime).into();
        params.subject_alt_names = vec![san_uri(identity)?];
        params.distinguished_name = DistinguishedName::new();
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer, &self.key).map_err(|e| format!("signing: {e}"))?;
        WorkloadCertificate::new(identity, vec![cert.der().clone()], &key, vec![self.root.clone()])
    }
}

impl CertificateSource for FileCa {
    fn fetch<'a>(&'a self, identity: &'a SpiffeId, lifetime: Duration) -> BoxFuture<'a, Result<WorkloadCertificate, String>> {
        Box::pin(async move { self.issue(identity, lifetime) })
    }
}

/// rcgen parameters that reproduce the CA's subject and key identifier.
fn issuer_params(cert: &X509Certificate<'_>) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    for attr in cert.subject().iter_attributes() {
        let oid: Vec<u64> = attr.attr_type().iter().ok_or("the CA subject has an unreadable attribute type")?.collect();
        let text = attr.as_str().map_err(|e| format!("the CA subject attribute {}: {e}", attr.attr_type()))?;
        let value = match attr.attr_value().tag() {
            x509_parser::der_parser::asn1_rs::Tag::PrintableString => {
                DnValue::PrintableString(text.try_into().map_err(|e| format!("the CA subject: {e}"))?)
            }
            _ => DnValue::Utf8String(text.into()),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectKeyIdentifier(id) = ext.parsed_extension() {
            params.key_identifier_method = KeyIdMethod::PreSpecified(id.0.to_vec());
        }
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::X509Certificate;

    fn test_ca() -> (String, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::OrganizationName, "weft test");
        params.distinguished_name.push(DnType::CommonName, "root");
        (params.self_signed(&key).unwrap().pem(), key)
    }

    #[test]
    fn issues_certificates_the_ca_signed_for_the_identity() {
        let dir = std::env::temp_dir().join(format!("weft-file-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (pem, key) = test_ca();
        std::fs::write(dir.join("ca.pem"), &pem).unwrap();
        std::fs::write(dir.join("ca.key"), key.serialize_pem()).unwrap();
        let ca = FileCa::load(&dir.join("ca.pem"), &dir.join("ca.key")).unwrap();
        let id = SpiffeId::new("cluster.local", "default", "web").unwrap();
        let wc = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(wc.lifetime(), Duration::from_secs(3600));
        assert!(wc.is_valid_at(SystemTime::now()));
        let (_, leaf) = X509Certificate::from_der(&wc.chain[0]).unwrap();
        let (_, root) = X509Certificate::from_der(&wc.roots[0]).unwrap();
        assert_eq!(leaf.issuer(), root.subject());
        leaf.verify_signature(Some(root.public_key())).expect("signed by the file's CA");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_of_another_ca_or_a_leaf_is_refused() {
        let (pem, _) = test_ca();
        let (_, other_key) = test_ca();
        let root = super::super::pem_certificates(pem.as_bytes(), "ca").unwrap().remove(0);
        assert!(FileCa::new(root, other_key).err().unwrap().contains("not the CA certificate's"));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::default().self_signed(&key).unwrap();
        assert!(FileCa::new(leaf.der().clone(), key).err().unwrap().contains("not a CA"));
    }
}
