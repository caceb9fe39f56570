//! `x-forwarded-client-cert`, as Envoy's connection manager sets it (`forward_client_cert_details`,
//! `set_current_client_cert_details`): this hop's entry names the certificate we presented (`By=`), the
//! client's (`Hash=`, then the configured `Subject`, `Cert`, `Chain`, `DNS`, `URI`), `;`-separated.

use hyper::header::{HeaderMap, HeaderValue};

use crate::config::http_connection_manager::{CertDetail, ClientCert, ForwardClientCert};
use crate::proxy::tls_info::{PeerCertificate, TlsInfo};

const XFCC: &str = "x-forwarded-client-cert";

/// Applies `config` to a request's headers on a connection with `tls` (none: plaintext).
pub fn mutate(headers: &mut HeaderMap, config: &ClientCert, tls: Option<&TlsInfo>) {
    if config.forward == ForwardClientCert::AlwaysForwardOnly {
        return;
    }
    let peer = tls.and_then(|t| t.peer.as_deref().map(|p| (t, p)));
    let Some((tls, peer)) = peer.filter(|_| config.forward != ForwardClientCert::Sanitize) else {
        headers.remove(XFCC);
        return;
    };
    let entry = match config.forward {
        ForwardClientCert::AppendForward | ForwardClientCert::SanitizeSet => entry(tls, peer, &config.details),
        _ => return,
    };
    let value = match (config.forward, headers.get(XFCC).and_then(|v| v.to_str().ok())) {
        (ForwardClientCert::AppendForward, Some(existing)) => format!("{existing},{entry}"),
        _ => entry,
    };
    match HeaderValue::from_str(&value) {
        Ok(v) => {
            headers.insert(XFCC, v);
        }
        Err(_) => {
            headers.remove(XFCC);
        }
    }
}

fn entry(tls: &TlsInfo, peer: &PeerCertificate, details: &[CertDetail]) -> String {
    let mut parts: Vec<String> = tls.local_uri_sans.iter().map(|uri| format!("By={uri}")).collect();
    parts.push(format!("Hash={}", peer.sha256));
    for detail in details {
        match detail {
            CertDetail::Subject => parts.push(format!("Subject=\"{}\"", peer.subject)),
            CertDetail::Cert => parts.extend(peer.chain.first().map(|leaf| format!("Cert=\"{}\"", url_encoded_pem(leaf)))),
            CertDetail::Chain => parts.push(format!("Chain=\"{}\"", peer.chain.iter().map(|c| url_encoded_pem(c)).collect::<String>())),
            CertDetail::Dns => parts.extend(peer.dns_sans.iter().map(|d| format!("DNS={d}"))),
            // The key is there even without a URI SAN, as in Envoy.
            CertDetail::Uri if peer.uri_sans.is_empty() => parts.push("URI=".into()),
            CertDetail::Uri => parts.extend(peer.uri_sans.iter().map(|u| format!("URI={u}"))),
        }
    }
    parts.join(";")
}

/// PEM with Envoy's escaping of the characters that would break the header's syntax.
fn url_encoded_pem(der: &[u8]) -> String {
    let pem = pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF));
    let mut out = String::with_capacity(pem.len() + pem.len() / 8);
    for c in pem.chars() {
        match c {
            '\n' => out.push_str("%0A"),
            ' ' => out.push_str("%20"),
            '+' => out.push_str("%2B"),
            '/' => out.push_str("%2F"),
            '=' => out.push_str("%3D"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn tls() -> TlsInfo {
        let peer = PeerCertificate {
            uri_sans: vec!["spiffe://cluster.local/ns/a/sa/a".into()],
            dns_sans: vec!["a.example".into()],
            subject: "CN=a".into(),
            sha256: "abc123".into(),
            chain: vec![vec![1, 2, 3]],
        };
        TlsInfo { peer: Some(Arc::new(peer)), local_uri_sans: Arc::from(vec!["spiffe://cluster.local/ns/b/sa/b".to_string()]), ..Default::default() }
    }

    fn apply(forward: ForwardClientCert, details: Vec<CertDetail>, tls: Option<&TlsInfo>, incoming: Option<&str>) -> Option<String> {
        let mut headers = HeaderMap::new();
        if let Some(v) = incoming {
            headers.insert(XFCC, HeaderValue::from_str(v).unwrap());
        }
        mutate(&mut headers, &ClientCert { forward, details }, tls);
        headers.get(XFCC).map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn modes_as_envoy() {
        let t = tls();
        let mine = "By=spiffe://cluster.local/ns/b/sa/b;Hash=abc123;Subject=\"CN=a\";URI=spiffe://cluster.local/ns/a/sa/a";
        let details = vec![CertDetail::Subject, CertDetail::Uri];
        assert_eq!(apply(ForwardClientCert::AppendForward, details.clone(), Some(&t), Some("By=x")), Some(format!("By=x,{mine}")));
        assert_eq!(apply(ForwardClientCert::SanitizeSet, details.clone(), Some(&t), Some("By=x")).as_deref(), Some(mine));
        assert_eq!(apply(ForwardClientCert::AppendForward, details.clone(), None, Some("By=forged")), None, "plaintext: removed");
        assert_eq!(apply(ForwardClientCert::Sanitize, details.clone(), Some(&t), Some("By=x")), None);
        assert_eq!(apply(ForwardClientCert::ForwardOnly, details.clone(), Some(&t), Some("By=x")).as_deref(), Some("By=x"));
        assert_eq!(apply(ForwardClientCert::AlwaysForwardOnly, details, None, Some("By=x")).as_deref(), Some("By=x"));
    }
}
