//! `istio.alpn` (`istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig`), which istiod puts on every
//! outbound connection manager: the ALPN list a TLS upstream connection offers, by the HTTP protocol the
//! request goes upstream in. The receiving sidecar picks its HTTP filter chain by these names (`istio-http/1.0`,
//! `istio-http/1.1`, `istio-h2`); without them an HTTP request to an undeclared port lands on its TCP chain.

use std::sync::Arc;

use super::tree::{ConfigError, Obj, Result};

pub const ALPN_FILTER: &str = "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig";

/// The HTTP version a request goes upstream in, as the filter's `upstream_protocol` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum UpstreamProtocol {
    Http10,
    Http11,
    Http2,
}

/// The ALPN list to offer for each upstream protocol (`None`: the TLS context's own `alpn_protocols`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AlpnOverrides {
    pub http10: Option<Arc<[String]>>,
    pub http11: Option<Arc<[String]>>,
    pub http2: Option<Arc<[String]>>,
}

impl AlpnOverrides {
    pub fn get(&self, protocol: UpstreamProtocol) -> Option<&Arc<[String]>> {
        match protocol {
            UpstreamProtocol::Http10 => self.http10.as_ref(),
            UpstreamProtocol::Http11 => self.http11.as_ref(),
            UpstreamProtocol::Http2 => self.http2.as_ref(),
        }
    }

    fn slot(&mut self, protocol: UpstreamProtocol) -> &mut Option<Arc<[String]>> {
        match protocol {
            UpstreamProtocol::Http10 => &mut self.http10,
            UpstreamProtocol::Http11 => &mut self.http11,
            UpstreamProtocol::Http2 => &mut self.http2,
        }
    }
}

/// The filter's `typed_config` (its `@type` already checked).
pub fn translate(mut config: Obj<'_>) -> Result<AlpnOverrides> {
    let mut out = AlpnOverrides::default();
    for mut entry in config.objects("alpn_override")? {
        let protocol = upstream_protocol(&mut entry)?;
        let path = entry.at("alpn_override");
        let mut names = Vec::new();
        for (i, name) in entry.strings("alpn_override")?.into_iter().enumerate() {
            // A TLS ClientHello carries each protocol name as 1 to 255 bytes.
            if name.is_empty() || name.len() > 255 {
                return Err(ConfigError::new(format!("{path}[{i}]"), "an ALPN protocol name must be 1 to 255 bytes"));
            }
            names.push(name.to_string());
        }
        entry.finish()?;
        // istio-proxy keeps the first entry of a protocol, and an empty list overrides nothing.
        let slot = out.slot(protocol);
        if slot.is_none() && !names.is_empty() {
            *slot = Some(names.into());
        }
    }
    config.finish()?;
    Ok(out)
}

/// `upstream_protocol`: absent (proto3 JSON omits the default), a name or the enum's number.
fn upstream_protocol(entry: &mut Obj<'_>) -> Result<UpstreamProtocol> {
    let path = entry.at("upstream_protocol");
    match entry.take("upstream_protocol") {
        None => Ok(UpstreamProtocol::Http10),
        Some(serde_json::Value::String(name)) => match name.as_str() {
            "HTTP10" => Ok(UpstreamProtocol::Http10),
            "HTTP11" => Ok(UpstreamProtocol::Http11),
            "HTTP2" => Ok(UpstreamProtocol::Http2),
            other => Err(ConfigError::new(path, format!("{other} is not a protocol; use HTTP10, HTTP11 or HTTP2"))),
        },
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(0) => Ok(UpstreamProtocol::Http10),
            Some(1) => Ok(UpstreamProtocol::Http11),
            Some(2) => Ok(UpstreamProtocol::Http2),
            _ => Err(ConfigError::new(path, format!("{n} is not a protocol; use HTTP10, HTTP11 or HTTP2"))),
        },
        Some(_) => Err(ConfigError::new(path, "expected a protocol name (HTTP10, HTTP11 or HTTP2)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn overrides(v: serde_json::Value) -> Result<AlpnOverrides> {
        translate(Obj::new(&v, "f.typed_config")?)
    }

    #[test]
    fn istiods_three_entries_with_http10_as_the_omitted_default() {
        // As in istiod's config_dump: the HTTP10 entry has no upstream_protocol.
        let o = overrides(json!({"alpn_override": [
            {"alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
            {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
            {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]}]}))
        .unwrap();
        assert_eq!(o.get(UpstreamProtocol::Http10).unwrap()[0], "istio-http/1.0");
        assert_eq!(&*o.http11.unwrap(), ["istio-http/1.1", "istio", "http/1.1"]);
        assert_eq!(&*o.http2.unwrap(), ["istio-h2", "istio", "h2"]);
    }

    #[test]
    fn first_entry_wins_and_empty_lists_override_nothing() {
        let o = overrides(json!({"alpn_override": [
            {"upstream_protocol": 2, "alpn_override": ["a"]},
            {"upstream_protocol": "HTTP2", "alpn_override": ["b"]},
            {"upstream_protocol": "HTTP11", "alpn_override": []}]}))
        .unwrap();
        assert_eq!(&*o.http2.unwrap(), ["a"]);
        assert_eq!(o.http11, None);
    }

    #[test]
    fn bad_entries_are_refused_by_path() {
        let err = |v| overrides(v).unwrap_err().to_string();
        assert!(err(json!({"alpn_override": [{"upstream_protocol": "HTTP3"}]})).starts_with("f.typed_config.alpn_override[0].upstream_protocol: HTTP3"));
        assert!(err(json!({"alpn_override": [{"alpn_override": ["h2", ""]}]})).starts_with("f.typed_config.alpn_override[0].alpn_override[1]"));
        assert!(err(json!({"alpn_override": [{"downstream_protocol": "HTTP2"}]})).contains("alpn_override[0].downstream_protocol"));
    }
}
