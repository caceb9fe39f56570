//! `transport_socket` with `envoy.transport_sockets.tls` (`DownstreamTlsContext` on filter chains,
//! `UpstreamTlsContext` on clusters) or `envoy.transport_sockets.raw_buffer`. Everything that changes who is
//! trusted or what is offered is either honoured or rejected by its path; what rustls cannot do (TLS below
//! 1.2, a cipher list with none of its suites) is rejected, never weakened. Certificates and trust roots
//! come inline, from files (read at handshake time, reloaded when they change) or by SDS name (resolved per
//! pod: `default` and `ROOTCA` are the pod's identity and the mesh roots, other names static secrets).

use std::sync::Arc;

use super::matcher::{string_matcher, StringMatcher};
use super::secret::{data_source, DataSource};
use super::tree::{ConfigError, Obj, Result};

const TLS_SOCKET: &str = "envoy.extensions.transport_sockets.tls.v3.";
const RAW_BUFFER: &str = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

/// `envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DownstreamTls {
    pub common: CommonTls,
    /// Handshakes without a valid client certificate fail. Without it a certificate is still asked for
    /// (and validated when given) if a validation context is set, as in Envoy.
    pub require_client_certificate: bool,
}

/// `envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UpstreamTls {
    pub common: CommonTls,
    /// SNI sent to the upstream; none when empty (Envoy sends none either).
    pub sni: Option<String>,
}

/// `CommonTlsContext`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CommonTls {
    /// At most one certificate (several, chosen by the client's key types, is not supported).
    pub certificate: Option<CertificateSource>,
    pub validation: Option<Validation>,
    pub alpn: Vec<String>,
    pub versions: Versions,
    /// The suites allowed (IANA names), `None`: rustls's defaults, which are within Envoy's.
    pub cipher_suites: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateSource {
    Inline { certificate_chain: DataSource, private_key: DataSource },
    Sds(SdsSecret),
}

/// A secret by SDS name. Over ADS (`sds_config: {ads: {}}`) weft subscribes to it on the pod's stream, as
/// Envoy does; otherwise (istio-agent's `sds-grpc` cluster, or no `sds_config`: a static secret) the agent
/// resolves it itself: `default` and `ROOTCA` are the pod's identity and the mesh roots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SdsSecret {
    pub name: String,
    pub over_ads: bool,
}

/// Who the peer must be: a chain to these roots (when given) and, when matchers are given, one SAN that
/// one of them accepts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Validation {
    pub trusted_ca: Option<TrustSource>,
    pub san_matchers: Vec<SanMatcher>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustSource {
    Inline(DataSource),
    Sds(SdsSecret),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SanMatcher {
    pub kind: SanKind,
    pub matcher: StringMatcher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SanKind {
    /// `match_subject_alt_names` (untyped): URI, DNS, email and IP SANs alike, as Envoy.
    Any,
    Uri,
    Dns,
    Email,
    IpAddress,
}

/// TLS versions allowed; weft (rustls) has 1.2 and 1.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Versions {
    pub tls12: bool,
    pub tls13: bool,
}

/// A filter chain's or cluster's transport socket.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportSocket<T> {
    RawBuffer,
    Tls(Arc<T>),
}

impl<T> Default for TransportSocket<T> {
    fn default() -> Self {
        TransportSocket::RawBuffer
    }
}

/// A filter chain's `transport_socket` (absent: plaintext).
pub fn downstream(t: Option<Obj<'_>>) -> Result<TransportSocket<DownstreamTls>> {
    transport_socket(t, "DownstreamTlsContext", |mut c| {
        let require_client_certificate = c.bool("require_client_certificate")?.unwrap_or(false);
        let common = common(c.object("common_tls_context")?, Side::Server)?;
        for ignored in ["disable_stateless_session_resumption", "disable_stateful_session_resumption", "session_timeout"] {
            // Session resumption changes no one's identity: a resumed session carries the original peer.
            c.take(ignored);
        }
        if require_client_certificate && common.validation.as_ref().is_none_or(|v| v.trusted_ca.is_none()) {
            return Err(ConfigError::new(c.at("require_client_certificate"), "needs a validation context with trusted_ca to validate client certificates against"));
        }
        c.finish()?;
        Ok(DownstreamTls { common, require_client_certificate })
    })
}

/// A cluster's `transport_socket` (absent: plaintext).
pub fn upstream(t: Option<Obj<'_>>) -> Result<TransportSocket<UpstreamTls>> {
    transport_socket(t, "UpstreamTlsContext", |mut c| {
        let sni = c.string("sni")?.filter(|s| !s.is_empty()).map(str::to_string);
        let common = common(c.object("common_tls_context")?, Side::Client)?;
        c.finish()?;
        Ok(UpstreamTls { common, sni })
    })
}

fn transport_socket<T>(t: Option<Obj<'_>>, context: &str, tls: impl FnOnce(Obj<'_>) -> Result<T>) -> Result<TransportSocket<T>> {
    let Some(mut t) = t else { return Ok(TransportSocket::RawBuffer) };
    t.take("name");
    let Some(mut typed) = t.object("typed_config")? else {
        return Err(ConfigError::new(t.at("typed_config"), "is required (envoy.transport_sockets.tls or raw_buffer)"));
    };
    let type_url = typed.required_string("@type")?;
    let name = type_url.rsplit('/').next().unwrap_or_default();
    let socket = if name == RAW_BUFFER {
        typed.finish()?;
        TransportSocket::RawBuffer
    } else if name == format!("{TLS_SOCKET}{context}") {
        TransportSocket::Tls(Arc::new(tls(typed)?))
    } else {
        return Err(ConfigError::new(t.at("typed_config"), format!("transport socket {type_url} is not supported here; weft has {TLS_SOCKET}{context} and raw_buffer")));
    };
    t.finish()?;
    Ok(socket)
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Server,
    Client,
}

fn common(c: Option<Obj<'_>>, side: Side) -> Result<CommonTls> {
    let Some(mut c) = c else {
        return Ok(CommonTls { certificate: None, validation: None, alpn: Vec::new(), versions: Versions { tls12: true, tls13: true }, cipher_suites: None });
    };
    let mut certificates = Vec::new();
    for mut cert in c.objects("tls_certificates")? {
        let certificate_chain = data_source(cert.required_object("certificate_chain")?)?;
        let private_key = data_source(cert.required_object("private_key")?)?;
        cert.finish()?;
        certificates.push((c.at("tls_certificates"), CertificateSource::Inline { certificate_chain, private_key }));
    }
    for sds in c.objects("tls_certificate_sds_secret_configs")? {
        certificates.push((c.at("tls_certificate_sds_secret_configs"), CertificateSource::Sds(sds_name(sds)?)));
    }
    if certificates.len() > 1 {
        return Err(ConfigError::new(certificates.swap_remove(1).0, "only one certificate is supported (weft does not choose between certificates by key type or SNI)"));
    }
    let certificate = certificates.pop().map(|(_, c)| c);
    if side == Side::Server && certificate.is_none() {
        return Err(ConfigError::new(c.at("tls_certificates"), "a server needs a certificate (tls_certificates or tls_certificate_sds_secret_configs)"));
    }
    let validation = validation(&mut c)?;
    let alpn = c.strings("alpn_protocols")?.into_iter().map(str::to_string).collect();
    let (versions, cipher_suites) = match c.object("tls_params")? {
        Some(p) => tls_params(p)?,
        None => (Versions { tls12: true, tls13: true }, None),
    };
    c.finish()?;
    Ok(CommonTls { certificate, validation, alpn, versions, cipher_suites })
}

fn validation(c: &mut Obj<'_>) -> Result<Option<Validation>> {
    let inline = c.object("validation_context")?.map(validation_context).transpose()?;
    let by_name = c.object("validation_context_sds_secret_config")?.map(sds_name).transpose()?;
    let combined = c.object("combined_validation_context")?.map(combined).transpose()?;
    match (inline, by_name, combined) {
        (None, None, None) => Ok(None),
        (Some(v), None, None) => Ok(Some(v)),
        (None, Some(name), None) => Ok(Some(Validation { trusted_ca: Some(TrustSource::Sds(name)), san_matchers: Vec::new() })),
        (None, None, Some(v)) => Ok(Some(v)),
        _ => Err(ConfigError::new(c.path(), "needs at most one of validation_context, validation_context_sds_secret_config or combined_validation_context")),
    }
}

/// `combined_validation_context`: the SDS secret's roots with the default context's SAN matchers.
fn combined(mut c: Obj<'_>) -> Result<Validation> {
    let default = c.required_object("default_validation_context")?;
    let mut v = validation_context(default)?;
    let name = sds_name(c.required_object("validation_context_sds_secret_config")?)?;
    if v.trusted_ca.is_some() {
        return Err(ConfigError::new(c.at("default_validation_context.trusted_ca"), "cannot be combined with validation_context_sds_secret_config (which one wins is not defined)"));
    }
    v.trusted_ca = Some(TrustSource::Sds(name));
    c.finish()?;
    Ok(v)
}

fn validation_context(mut v: Obj<'_>) -> Result<Validation> {
    let trusted_ca = v.object("trusted_ca")?.map(data_source).transpose()?.map(TrustSource::Inline);
    let mut san_matchers = Vec::new();
    for m in v.objects("match_subject_alt_names")? {
        san_matchers.push(SanMatcher { kind: SanKind::Any, matcher: string_matcher(m)? });
    }
    for mut m in v.objects("match_typed_subject_alt_names")? {
        let kind = match m.required_string("san_type")? {
            "URI" => SanKind::Uri,
            "DNS" => SanKind::Dns,
            "EMAIL" => SanKind::Email,
            "IP_ADDRESS" => SanKind::IpAddress,
            other => return Err(ConfigError::new(m.at("san_type"), format!("{other} is not supported; weft has URI, DNS, EMAIL and IP_ADDRESS"))),
        };
        let matcher = string_matcher(m.required_object("matcher")?)?;
        m.finish()?;
        san_matchers.push(SanMatcher { kind, matcher });
    }
    v.finish()?;
    Ok(Validation { trusted_ca, san_matchers })
}

/// `SdsSecretConfig`: over ADS, or resolved by the agent (see [`SdsSecret`]).
fn sds_name(mut s: Obj<'_>) -> Result<SdsSecret> {
    let name = s.required_string("name")?.to_string();
    let over_ads = s.take("sds_config").is_some_and(|c| c.get("ads").is_some());
    s.finish()?;
    Ok(SdsSecret { name, over_ads })
}

impl CommonTls {
    /// The secrets this context names by SDS.
    pub fn sds_secrets(&self) -> impl Iterator<Item = &SdsSecret> {
        let certificate = match &self.certificate {
            Some(CertificateSource::Sds(s)) => Some(s),
            _ => None,
        };
        let roots = match self.validation.as_ref().and_then(|v| v.trusted_ca.as_ref()) {
            Some(TrustSource::Sds(s)) => Some(s),
            _ => None,
        };
        certificate.into_iter().chain(roots)
    }
}

fn tls_params(mut p: Obj<'_>) -> Result<(Versions, Option<Vec<String>>)> {
    // Envoy's defaults: TLS 1.2 to 1.3 for servers and clients.
    let min = version(&mut p, "tls_minimum_protocol_version", 2)?;
    let max = version(&mut p, "tls_maximum_protocol_version", 3)?;
    if min > max {
        return Err(ConfigError::new(p.at("tls_minimum_protocol_version"), "is above tls_maximum_protocol_version"));
    }
    let versions = Versions { tls12: min <= 2, tls13: max >= 3 };
    let suites = p.strings("cipher_suites")?;
    let cipher_suites = (!suites.is_empty()).then(|| suites.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    if let Some(list) = &cipher_suites {
        if versions.tls12 && !list.iter().any(|s| iana_suite(s).is_some()) {
            return Err(ConfigError::new(p.at("cipher_suites"), "names none of the TLS 1.2 suites weft has (ECDHE with AES-GCM or CHACHA20-POLY1305)"));
        }
    }
    // Curves are an offer, like suites: the ones weft has (X25519, P-256, P-384) are used.
    p.take("ecdh_curves");
    p.finish()?;
    Ok((versions, cipher_suites))
}

/// `TLSv1_2` → 2; `TLS_AUTO` → the default. TLS 1.0 and 1.1 are rejected: rustls has neither.
fn version(p: &mut Obj<'_>, key: &str, default: u8) -> Result<u8> {
    match p.string(key)? {
        None | Some("TLS_AUTO") => Ok(default),
        Some("TLSv1_2") => Ok(2),
        Some("TLSv1_3") => Ok(3),
        Some(v @ ("TLSv1_0" | "TLSv1_1")) => Err(ConfigError::new(p.at(key), format!("{v} is not supported (weft speaks TLS 1.2 and 1.3 only); set TLSv1_2 or above"))),
        Some(other) => Err(ConfigError::new(p.at(key), format!("unknown TLS version {other}"))),
    }
}

/// The IANA name of an OpenSSL-named TLS 1.2 suite weft has (Envoy takes OpenSSL names).
pub fn iana_suite(openssl: &str) -> Option<&'static str> {
    Some(match openssl {
        "ECDHE-ECDSA-AES128-GCM-SHA256" => "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256" => "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384" => "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384" => "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305" => "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "ECDHE-RSA-CHACHA20-POLY1305" => "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]" => "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "[ECDHE-RSA-AES128-GCM-SHA256|ECDHE-RSA-CHACHA20-POLY1305]" => "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn down(v: serde_json::Value) -> Result<TransportSocket<DownstreamTls>> {
        downstream(Some(Obj::new(&v, "filter_chains[0].transport_socket")?))
    }

    fn tls(context: serde_json::Value) -> serde_json::Value {
        let mut typed = json!({"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"});
        typed.as_object_mut().unwrap().extend(context.as_object().unwrap().clone());
        json!({"name": "envoy.transport_sockets.tls", "typed_config": typed})
    }

    /// The inbound context istiod generates for a sidecar in STRICT mode.
    #[test]
    fn istios_inbound_context_translates() {
        let sds = json!({"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"});
        let t = down(tls(json!({"require_client_certificate": true, "common_tls_context": {
            "alpn_protocols": ["h2", "http/1.1"],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}]},
                "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds}},
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds}],
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3",
                "cipher_suites": ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "AES256-GCM-SHA384"]}}})))
        .unwrap();
        let TransportSocket::Tls(t) = t else { panic!("{t:?}") };
        assert!(t.require_client_certificate);
        assert_eq!(t.common.certificate, Some(CertificateSource::Sds(SdsSecret { name: "default".into(), over_ads: true })));
        let v = t.common.validation.as_ref().unwrap();
        assert_eq!(v.trusted_ca, Some(TrustSource::Sds(SdsSecret { name: "ROOTCA".into(), over_ads: true })));
        assert_eq!(v.san_matchers[0].kind, SanKind::Uri);
        assert_eq!(t.common.alpn, ["h2", "http/1.1"]);
    }

    #[test]
    fn what_rustls_cannot_do_is_refused_by_path() {
        let cert = json!({"certificate_chain": {"filename": "/c"}, "private_key": {"filename": "/k"}});
        let e = down(tls(json!({"common_tls_context": {"tls_certificates": [cert], "tls_params": {"tls_minimum_protocol_version": "TLSv1_0"}}}))).unwrap_err();
        assert_eq!(e.path, "filter_chains[0].transport_socket.typed_config.common_tls_context.tls_params.tls_minimum_protocol_version");
        let e = down(tls(json!({"common_tls_context": {"tls_certificates": [cert], "tls_params": {"cipher_suites": ["AES128-SHA"]}}}))).unwrap_err();
        assert!(e.path.ends_with("tls_params.cipher_suites"), "{e}");
        let e = down(tls(json!({"common_tls_context": {"tls_certificates": [cert], "validation_context": {"trusted_ca": {"filename": "/ca"}, "crl": {"filename": "/crl"}}}}))).unwrap_err();
        assert!(e.path.ends_with("validation_context.crl"), "{e}");
        let e = down(tls(json!({"require_client_certificate": true, "common_tls_context": {"tls_certificates": [cert]}}))).unwrap_err();
        assert!(e.path.ends_with("require_client_certificate"), "{e}");
        let e = down(tls(json!({"common_tls_context": {}}))).unwrap_err();
        assert!(e.path.ends_with("tls_certificates"), "{e}");
        let e = down(json!({"name": "x", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.alts.v3.Alts"}})).unwrap_err();
        assert!(e.message.contains("not supported"), "{e}");
    }

    #[test]
    fn raw_buffer_and_absent_are_plaintext() {
        let raw = json!({"name": "raw", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}});
        assert_eq!(down(raw).unwrap(), TransportSocket::RawBuffer);
        assert_eq!(downstream(None).unwrap(), TransportSocket::RawBuffer);
    }
}
