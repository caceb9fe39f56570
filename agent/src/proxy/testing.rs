//! Helpers the data path's in-memory tests share.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// A TCP echo server on loopback (no root needed): every connection gets its bytes back.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A self-signed certificate for `dns_name`: (chain PEM, key PEM).
pub fn self_signed(dns_name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key pair");
    let cert = rcgen::CertificateParams::new(vec![dns_name.to_string()]).expect("params").self_signed(&key).expect("self-signed");
    (cert.pem(), key.serialize_pem())
}
