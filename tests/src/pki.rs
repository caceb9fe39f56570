//! A test PKI written to files both proxies read: the mesh CA (`ca.pem`, its key `ca.key` for weft's file
//! CA), another CA (`other-ca.pem`), and
//! leaf certificates with SPIFFE identities (`<name>.pem` chain, `<name>.key`). Conformance case files name
//! them as `{{pki}}/<file>`. Generated once per test process (fresh keys every run).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

/// The leaves: name, issuing CA (`ca` or `other-ca`), URI SAN, DNS SAN.
pub const LEAVES: [(&str, &str, &str, Option<&str>); 5] = [
    ("server", "ca", "spiffe://cluster.local/ns/b/sa/b", Some("b.example.com")),
    ("client-a", "ca", "spiffe://cluster.local/ns/a/sa/a", None),
    ("client-c", "ca", "spiffe://cluster.local/ns/c/sa/c", None),
    ("client-other-domain", "ca", "spiffe://other.domain/ns/a/sa/a", None),
    ("stranger", "other-ca", "spiffe://cluster.local/ns/a/sa/a", None),
];

/// The directory with the PKI's files, created on first use.
pub fn dir() -> Result<&'static Path, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| generate(&crate::tools::harness_dir().join("pki"))).as_ref().map(PathBuf::as_path).map_err(Clone::clone)
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Result<Ca, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate()?;
    Ok(Ca { cert: params.self_signed(&key)?, key })
}

fn generate(dir: &Path) -> Result<PathBuf, String> {
    let e = |e: rcgen::Error| e.to_string();
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cas = [("ca", ca("mesh ca").map_err(e)?), ("other-ca", ca("other ca").map_err(e)?)];
    let write = |file: &str, text: &str| std::fs::write(dir.join(file), text).map_err(|e| format!("{file}: {e}"));
    for (name, ca) in &cas {
        write(&format!("{name}.pem"), &ca.cert.pem())?;
        write(&format!("{name}.key"), &ca.key.serialize_pem())?;
    }
    for (name, issuer, uri, dns) in LEAVES {
        let Some((_, ca)) = cas.iter().find(|(n, _)| *n == issuer) else { return Err(format!("no CA {issuer}")) };
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names.push(SanType::URI(uri.try_into().map_err(e)?));
        if let Some(dns) = dns {
            params.subject_alt_names.push(SanType::DnsName(dns.try_into().map_err(e)?));
        }
        let key = KeyPair::generate().map_err(e)?;
        let cert = params.signed_by(&key, &ca.cert, &ca.key).map_err(e)?;
        write(&format!("{name}.pem"), &cert.pem())?;
        write(&format!("{name}.key"), &key.serialize_pem())?;
    }
    Ok(dir.to_path_buf())
}
