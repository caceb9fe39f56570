//! The test clients' TLS: a rustls client that presents a leaf of the test PKI and accepts any server
//! certificate (what is under test is the proxy's checking, not the client's).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::conformance::ClientTls;

/// Connects TLS over `tcp` as `tls` says.
pub async fn connect(tcp: TcpStream, tls: &ClientTls) -> Result<TlsStream<TcpStream>, String> {
    let config = Arc::new(config(tls)?);
    let name = match &tls.sni {
        Some(sni) => ServerName::try_from(sni.clone()).map_err(|e| format!("sni {sni}: {e}"))?,
        None => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| format!("TLS handshake: {e}"))
}

fn config(tls: &ClientTls) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match &tls.cert {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let dir = crate::pki::dir()?;
            let chain = CertificateDer::pem_file_iter(dir.join(format!("{name}.pem"))).and_then(|i| i.collect::<Result<Vec<_>, _>>()).map_err(|e| format!("{name}.pem: {e}"))?;
            let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).map_err(|e| format!("{name}.key: {e}"))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
        }
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
