//! What a downstream TLS handshake established, as the filters after it see it (RBAC's `authenticated` and
//! `requested_server_name`, `x-forwarded-client-cert`, routes' `tls_context`). A leaf: the TLS transport
//! socket fills it, filters only read it.

use std::sync::Arc;

/// The connection's TLS session; plaintext connections have none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsInfo {
    /// The server name the client asked for (SNI).
    pub sni: Option<String>,
    /// The ALPN protocol agreed on.
    pub alpn: Option<String>,
    /// The client's certificate, present only when it was presented and validated.
    pub peer: Option<Arc<PeerCertificate>>,
    /// The URI SANs of the certificate we presented (`By=` in `x-forwarded-client-cert`).
    pub local_uri_sans: Arc<[String]>,
}

/// The validated leaf certificate of the peer, reduced to the names policies match on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerCertificate {
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    /// The subject in RFC 2253 form, as Envoy prints it.
    pub subject: String,
    /// SHA-256 of the leaf (DER), lowercase hex.
    pub sha256: String,
    /// The chain as presented, DER, leaf first.
    pub chain: Vec<Vec<u8>>,
}
