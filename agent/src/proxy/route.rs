//! The route step of the data path: the virtual host and route a request matches, the header changes routes
//! make, and what a route rewrites or redirects to. Pure functions of the request and the configuration,
//! tested in memory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;

use super::tls_info::TlsInfo;
use crate::config::headers::{AppendAction, HeaderOps, HeaderValueOption, Part};
use crate::config::matcher::Regex;
use crate::config::route::{PathMatch, Redirect, Route, RouteConfiguration, RouteMatch, VirtualHost};

/// What header substitutions read about the request's connection.
#[derive(Debug, Clone, Copy)]
pub struct Downstream {
    /// The client's address: the connection's peer, or the trusted `x-forwarded-for` entry.
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// `HTTP/1.1` or `HTTP/2`, as `%PROTOCOL%` shows it.
    pub protocol: &'static str,
}

/// Everything a header value's `%...%` commands can read.
pub struct Vars<'a> {
    pub downstream: &'a Downstream,
    pub request: &'a HeaderMap,
    /// `:path`, `:method` and `:authority` of the request.
    pub path: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    /// The endpoint and cluster that answered (response headers).
    pub upstream: Option<(SocketAddr, &'a str)>,
    /// The response's status and headers (response headers).
    pub response: Option<(u16, &'a HeaderMap)>,
    /// The text of a local reply (`local_reply_config` formats).
    pub local_reply_body: Option<&'a str>,
}

impl<'a> Vars<'a> {
    /// The variables of a request (before any response).
    pub fn of(parts: &'a Parts, downstream: &'a Downstream) -> Vars<'a> {
        Vars {
            downstream,
            request: &parts.headers,
            path: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            method: parts.method.as_str(),
            authority: authority(parts).unwrap_or_default(),
            upstream: None,
            response: None,
            local_reply_body: None,
        }
    }
}

/// The virtual host and route for a request whose host (after port stripping) is `host`.
pub fn select<'a>(rc: &'a RouteConfiguration, host: &str, req: &Parts) -> Option<(&'a VirtualHost, &'a Route)> {
    let host = if rc.ignore_port_in_host_matching { split_port(host).0 } else { host };
    let vh = rc.virtual_host(host)?;
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    vh.routes.iter().find(|r| matches(&r.matcher, path, req)).map(|r| (vh, r))
}

fn matches(m: &RouteMatch, path_and_query: &str, req: &Parts) -> bool {
    let path = path_and_query.split(['?', '#']).next().unwrap_or_default();
    // A CONNECT request has no path: only `connect_matcher` routes take it, and they take nothing else.
    let connect = req.method == hyper::Method::CONNECT;
    let path_ok = match &m.path {
        PathMatch::Connect => connect,
        _ if connect => false,
        // A prefix sees the whole `:path`; exact paths and regexes the path without the query, as in Envoy.
        PathMatch::Prefix(_) => m.path.matches(path_and_query, m.case_sensitive),
        _ => m.path.matches(path, m.case_sensitive),
    };
    path_ok
        && m.headers.iter().all(|h| h.matches(header_value(req, &h.name).as_deref()))
        && m.query_parameters.iter().all(|q| {
            let value = query_value(path_and_query, &q.name);
            match (&q.value, value) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(m), Some(v)) => m.matches(v),
            }
        })
        && (!m.grpc || is_grpc(&req.headers))
        && m.tls_presented.is_none_or(|presented| presented == peer_presented(req))
        && m.fraction.is_none_or(|f| f.hit(crate::random::random() as u64))
}

/// Whether the client presented a certificate (Envoy's `tls_context.presented`); plaintext ones did not.
fn peer_presented(req: &Parts) -> bool {
    req.extensions.get::<Arc<TlsInfo>>().is_some_and(|t| t.peer.is_some())
}

/// A header's values joined with `,`, pseudo-headers included, as Envoy's header matchers see them.
pub fn header_value(req: &Parts, name: &str) -> Option<String> {
    match name {
        ":path" => req.uri.path_and_query().map(|p| p.as_str().to_string()),
        ":method" => Some(req.method.as_str().to_string()),
        ":authority" => authority(req).map(str::to_string),
        ":scheme" => Some(req.uri.scheme_str().unwrap_or("http").to_string()),
        _ => crate::config::matcher::joined(&req.headers, name),
    }
}

/// The request's authority: `:authority` (HTTP/2, absolute-form) or the Host header.
pub fn authority(req: &Parts) -> Option<&str> {
    req.uri.authority().map(|a| a.as_str()).or_else(|| req.headers.get(hyper::header::HOST).and_then(|h| h.to_str().ok()))
}

fn query_value<'a>(path_and_query: &'a str, name: &str) -> Option<&'a str> {
    let query = path_and_query.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or_default();
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// A request's protocol as Envoy's `%PROTOCOL%` shows it.
pub fn protocol_name(version: hyper::Version) -> &'static str {
    match version {
        hyper::Version::HTTP_2 => "HTTP/2",
        hyper::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// A request's `grpc-timeout` (at most 8 digits and a unit: H, M, S, m, u, n).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok().filter(|_| (1..=8).contains(&digits.len()))?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `grpc-timeout` value for `timeout`, as Envoy writes it: milliseconds, or a larger unit when the
/// number would exceed 8 digits.
pub fn grpc_timeout_value(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let ms = timeout.as_millis();
    let units = [(ms, 'm'), (ms / 1000, 'S'), (ms / 60_000, 'M'), (ms / 3_600_000, 'H')];
    let (value, unit) = units.into_iter().find(|(v, _)| *v <= MAX).unwrap_or((MAX, 'H'));
    HeaderValue::from_str(&format!("{value}{unit}")).unwrap_or(HeaderValue::from_static("99999999H"))
}

/// Applies one level's request changes: removals first, then additions, as Envoy's header parser does.
pub fn apply_request(ops: &HeaderOps, headers: &mut HeaderMap, vars: &Vars<'_>) {
    remove(&ops.request_remove, headers);
    add(&ops.request_add, headers, vars);
}

pub fn apply_response(ops: &HeaderOps, headers: &mut HeaderMap, vars: &Vars<'_>) {
    remove(&ops.response_remove, headers);
    add(&ops.response_add, headers, vars);
}

fn remove(names: &[String], headers: &mut HeaderMap) {
    for name in names {
        headers.remove(name.as_str());
    }
}

fn add(options: &[HeaderValueOption], headers: &mut HeaderMap, vars: &Vars<'_>) {
    for o in options {
        let Ok(name) = HeaderName::from_bytes(o.name.as_bytes()) else { continue };
        let value = format_value(&o.value, vars);
        if value.is_empty() && !o.keep_empty_value {
            continue;
        }
        let Ok(value) = HeaderValue::from_str(&value) else { continue };
        let exists = headers.contains_key(&name);
        match o.action {
            AppendAction::AppendIfExistsOrAdd => {
                headers.append(name, value);
            }
            AppendAction::AddIfAbsent if !exists => {
                headers.insert(name, value);
            }
            AppendAction::OverwriteIfExistsOrAdd => {
                headers.insert(name, value);
            }
            AppendAction::OverwriteIfExists if exists => {
                headers.insert(name, value);
            }
            AppendAction::AddIfAbsent | AppendAction::OverwriteIfExists => {}
        }
    }
}

pub fn format_value(parts: &[Part], vars: &Vars<'_>) -> String {
    let mut out = String::new();
    let d = vars.downstream;
    let header = |map: &HeaderMap, name: &str| map.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    for part in parts {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::DownstreamRemoteAddress { port: true } => out.push_str(&d.remote.to_string()),
            Part::DownstreamRemoteAddress { port: false } => out.push_str(&d.remote.ip().to_string()),
            Part::DownstreamLocalAddress { port: true } => out.push_str(&d.local.to_string()),
            Part::DownstreamLocalAddress { port: false } => out.push_str(&d.local.ip().to_string()),
            Part::DownstreamLocalPort => out.push_str(&d.local.port().to_string()),
            Part::Protocol => out.push_str(d.protocol),
            Part::RequestHeader(name) => out.push_str(&match name.as_str() {
                ":path" => vars.path.to_string(),
                ":method" => vars.method.to_string(),
                ":authority" => vars.authority.to_string(),
                _ => header(vars.request, name),
            }),
            Part::ResponseHeader(name) => out.push_str(&vars.response.map(|(_, h)| header(h, name)).unwrap_or_default()),
            Part::ResponseCode => out.push_str(&vars.response.map(|(s, _)| s.to_string()).unwrap_or_default()),
            Part::UpstreamRemoteAddress => out.push_str(&vars.upstream.map(|(a, _)| a.to_string()).unwrap_or_default()),
            Part::UpstreamCluster => out.push_str(vars.upstream.map(|(_, c)| c).unwrap_or_default()),
            Part::LocalReplyBody => out.push_str(vars.local_reply_body.unwrap_or_default()),
        }
    }
    out
}

/// The path after `prefix_rewrite` (replacing what the route's prefix or path matched) or `regex_rewrite`
/// (every match in the path, the query kept).
pub fn rewrite_path(path_and_query: &str, matched: &PathMatch, prefix: Option<&str>, regex: Option<&(Regex, String)>) -> Option<String> {
    if let Some(replacement) = prefix {
        let len = match matched {
            PathMatch::Prefix(p) | PathMatch::PathSeparatedPrefix(p) => p.len(),
            PathMatch::Path(_) | PathMatch::Regex(_) | PathMatch::Connect => path_and_query.split('?').next().unwrap_or_default().len(),
        };
        let rest = path_and_query.get(len.min(path_and_query.len())..).unwrap_or_default();
        return Some(format!("{replacement}{rest}"));
    }
    let (pattern, substitution) = regex?;
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let rewritten = pattern.any.replace_all(path, re2_substitution(substitution).as_str()).into_owned();
    Some(match query {
        Some(q) => format!("{rewritten}?{q}"),
        None => rewritten,
    })
}

/// RE2's `\1` group references in the regex crate's `${1}` syntax (and `$` escaped).
fn re2_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

/// The `location` of a redirect, built as Envoy builds it.
pub fn redirect_location(r: &Redirect, matched: &PathMatch, req: &Parts, scheme: &str) -> String {
    let original_host = authority(req).unwrap_or_default();
    let final_scheme = r.scheme.as_deref().unwrap_or(scheme);
    let host = match &r.host {
        Some(h) => h.clone(),
        None => {
            // The request's port goes when another port is set, or when the scheme changes and the port was
            // the old scheme's default.
            let (name, port) = split_port(original_host);
            let drop_port = r.port.is_some()
                || (r.scheme.is_some() && ((final_scheme == "https" && port == Some("80")) || (final_scheme == "http" && port == Some("443"))));
            if drop_port {
                name.to_string()
            } else {
                original_host.to_string()
            }
        }
    };
    let host = match r.port {
        Some(p) => format!("{}:{p}", split_port(&host).0),
        None => host,
    };
    let original = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut path = match (&r.path, &r.prefix_rewrite, &r.regex_rewrite) {
        (Some(p), _, _) => {
            // A path_redirect without its own query keeps the request's (unless strip_query).
            match (p.contains('?'), original.split_once('?')) {
                (false, Some((_, q))) => format!("{p}?{q}"),
                _ => p.clone(),
            }
        }
        (None, prefix, regex) => rewrite_path(original, matched, prefix.as_deref(), regex.as_ref()).unwrap_or_else(|| original.to_string()),
    };
    if r.strip_query {
        if let Some(i) = path.find('?') {
            path.truncate(i);
        }
    }
    format!("{final_scheme}://{host}{path}")
}

/// `host:port` into host and port (IPv6 literals in brackets kept whole).
pub fn split_port(host: &str) -> (&str, Option<&str>) {
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && (!name.contains(':') || name.ends_with(']')) => (name, Some(port)),
        _ => (host, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tree::Obj;
    use serde_json::json;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = hyper::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn config(routes: serde_json::Value) -> RouteConfiguration {
        let v = json!({"virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": routes}]});
        crate::config::route::translate(Obj::new(&v, "rc").unwrap()).unwrap()
    }

    #[test]
    fn routes_match_on_path_headers_and_query() {
        let rc = config(json!([
            {"name": "hdr", "match": {"prefix": "/", "headers": [{"name": "x-user", "string_match": {"exact": "alice"}}]}, "direct_response": {"status": 200}},
            {"name": "query", "match": {"prefix": "/", "query_parameters": [{"name": "debug", "present_match": true}]}, "direct_response": {"status": 200}},
            {"name": "regex", "match": {"safe_regex": {"regex": "/v[0-9]+/.*"}}, "direct_response": {"status": 200}},
            {"name": "grpc", "match": {"prefix": "/", "grpc": {}}, "direct_response": {"status": 200}},
            {"name": "rest", "match": {"prefix": "/"}, "direct_response": {"status": 200}},
        ]));
        let pick = |uri: &str, h: &[(&str, &str)]| select(&rc, "x", &parts(uri, h)).map(|(_, r)| r.name.clone());
        assert_eq!(pick("/a", &[("x-user", "alice")]).as_deref(), Some("hdr"));
        assert_eq!(pick("/a?debug", &[]).as_deref(), Some("query"));
        assert_eq!(pick("/v2/items?x=1", &[]).as_deref(), Some("regex"));
        assert_eq!(pick("/a", &[("content-type", "application/grpc+proto")]).as_deref(), Some("grpc"));
        assert_eq!(pick("/a?debugger=1", &[]).as_deref(), Some("rest"));
    }

    #[test]
    fn rewrites_and_redirects() {
        let prefix = PathMatch::Prefix("/old".into());
        assert_eq!(rewrite_path("/old/x?q=1", &prefix, Some("/new"), None).as_deref(), Some("/new/x?q=1"));
        let v = json!({"regex": "^/svc/([^/]+)/(.*)$"});
        let re = crate::config::matcher::regex(Obj::new(&v, "r").unwrap()).unwrap();
        assert_eq!(rewrite_path("/svc/a/b?z", &prefix, None, Some(&(re, "/\\2/\\1".into()))).as_deref(), Some("/b/a?z"));
        let r = Redirect { scheme: Some("https".into()), host: None, port: None, path: None, prefix_rewrite: None, regex_rewrite: None, status: 301, strip_query: true };
        let req = parts("/p?q=1", &[("host", "example.com:80")]);
        assert_eq!(redirect_location(&r, &prefix, &req, "http"), "https://example.com/p");
    }

    #[test]
    fn header_options_follow_append_actions() {
        let ctx = Downstream { remote: "10.0.0.1:5000".parse().unwrap(), local: "10.0.0.2:80".parse().unwrap(), protocol: "HTTP/1.1" };
        let v = json!({"request_headers_to_add": [
            {"header": {"key": "x-a", "value": "1"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"},
            {"header": {"key": "x-b", "value": "2"}, "append_action": "ADD_IF_ABSENT"},
            {"header": {"key": "x-c", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}, "append_action": "OVERWRITE_IF_EXISTS"},
            {"header": {"key": "x-d", "value": "%REQ(x-missing)%"}},
        ], "request_headers_to_remove": ["x-gone"]});
        let ops = crate::config::headers::ops(&mut Obj::new(&v, "o").unwrap()).unwrap();
        let mut headers = HeaderMap::new();
        for (k, v) in [("x-a", "0"), ("x-b", "0"), ("x-c", "0"), ("x-gone", "0")] {
            headers.insert(k, HeaderValue::from_static(v));
        }
        let original = headers.clone();
        let vars = Vars { downstream: &ctx, request: &original, path: "/", method: "GET", authority: "x", upstream: None, response: None, local_reply_body: None };
        apply_request(&ops, &mut headers, &vars);
        assert_eq!(headers.get_all("x-a").iter().count(), 2);
        assert_eq!(headers["x-b"], "0");
        assert_eq!(headers["x-c"], "10.0.0.1");
        assert!(!headers.contains_key("x-d") && !headers.contains_key("x-gone"));
    }
}
