//! `envoy.extensions.transport_sockets.tls.v3.Secret`: certificates, private keys and trust roots. Like
//! Envoy, files are read when a TLS context uses the secret, not when the configuration is loaded, so a
//! bootstrap Envoy starts with starts here too. Key material is never printed (see `Debug` and `Serialize`).

use std::path::PathBuf;

use super::tree::{ConfigError, Obj, Result};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Secret {
    pub name: String,
    pub kind: SecretKind,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretKind {
    TlsCertificate { certificate_chain: DataSource, private_key: DataSource },
    ValidationContext { trusted_ca: DataSource },
}

/// `envoy.config.core.v3.DataSource`.
#[derive(Clone, PartialEq)]
pub enum DataSource {
    Filename(PathBuf),
    Inline(Vec<u8>),
}

impl std::fmt::Debug for DataSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSource::Filename(p) => write!(f, "Filename({})", p.display()),
            DataSource::Inline(bytes) => write!(f, "Inline({} bytes)", bytes.len()),
        }
    }
}

impl serde::Serialize for DataSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{self:?}"))
    }
}

pub fn translate(mut s: Obj<'_>) -> Result<Secret> {
    let name = s.required_string("name")?.to_string();
    let kind = match (s.object("tls_certificate")?, s.object("validation_context")?) {
        (Some(mut tls), None) => {
            let certificate_chain = data_source(tls.required_object("certificate_chain")?)?;
            let private_key = data_source(tls.required_object("private_key")?)?;
            tls.finish()?;
            SecretKind::TlsCertificate { certificate_chain, private_key }
        }
        (None, Some(mut vc)) => {
            let trusted_ca = data_source(vc.required_object("trusted_ca")?)?;
            vc.finish()?;
            SecretKind::ValidationContext { trusted_ca }
        }
        _ => {
            // An unsupported kind (generic_secret, session_ticket_keys) is named by its path.
            let path = s.path().to_string();
            s.finish()?;
            return Err(ConfigError::new(path, "needs exactly one of tls_certificate or validation_context"));
        }
    };
    s.finish()?;
    Ok(Secret { name, kind })
}

pub(crate) fn data_source(mut d: Obj<'_>) -> Result<DataSource> {
    let source = match (d.string("filename")?, d.string("inline_string")?, d.string("inline_bytes")?) {
        (Some(f), None, None) if !f.is_empty() => DataSource::Filename(PathBuf::from(f)),
        (None, Some(text), None) => DataSource::Inline(text.as_bytes().to_vec()),
        (None, None, Some(b64)) => DataSource::Inline(base64(b64).ok_or_else(|| ConfigError::new(d.at("inline_bytes"), "is not valid base64"))?),
        _ => return Err(ConfigError::new(d.path(), "needs exactly one of filename, inline_string or inline_bytes")),
    };
    d.finish()?;
    Ok(source)
}

/// Standard base64 with padding, as the proto3 JSON mapping writes `bytes`.
pub(crate) fn base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    };
    let digits: Vec<u8> = text.trim_end_matches('=').bytes().map(value).collect::<Option<_>>()?;
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, d)| acc | u32::from(*d) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secret(v: serde_json::Value) -> Result<Secret> {
        translate(Obj::new(&v, "static_resources.secrets[0]")?)
    }

    #[test]
    fn secrets_translate_and_never_show_key_material() {
        let s = secret(json!({"name": "cert", "tls_certificate": {"certificate_chain": {"filename": "/etc/certs/chain.pem"},
            "private_key": {"inline_bytes": "S0VZIQ=="}}})).unwrap();
        let SecretKind::TlsCertificate { private_key, .. } = &s.kind else { panic!("{s:?}") };
        assert_eq!(*private_key, DataSource::Inline(b"KEY!".to_vec()));
        assert!(!format!("{s:?}").contains("KEY") && !serde_json::to_string(&s).unwrap().contains("KEY"));
        let e = secret(json!({"name": "c", "tls_certificate": {"certificate_chain": {"filename": "/a"}, "private_key": {"filename": "/b"}, "password": {"inline_string": "p"}}})).unwrap_err();
        assert_eq!(e.path, "static_resources.secrets[0].tls_certificate.password");
        let e = secret(json!({"name": "ca", "validation_context": {"trusted_ca": {"filename": "/a"}, "match_typed_subject_alt_names": []}})).unwrap_err();
        assert_eq!(e.path, "static_resources.secrets[0].validation_context.match_typed_subject_alt_names");
        assert_eq!(base64("aGVsbG8").unwrap(), b"hello");
    }
}
