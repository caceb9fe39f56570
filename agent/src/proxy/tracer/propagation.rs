//! How span contexts cross a hop: W3C trace context (`traceparent`, `tracestate`) for the OpenTelemetry
//! tracer, B3 (`x-b3-*`, or the single `b3` header) for Zipkin; read as Envoy's extractors read them, written
//! as its spans inject them.

use hyper::header::{HeaderMap, HeaderValue};

/// A span's identity as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    /// 128-bit trace id; else 64-bit (the first 8 bytes zero, written as 16 hex digits).
    pub wide: bool,
    pub span_id: [u8; 8],
    /// The span's parent (B3 carries it; W3C does not).
    pub parent_id: Option<[u8; 8]>,
    pub sampled: bool,
    pub trace_state: String,
}

/// What a request's headers say of the trace it belongs to.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Nothing: a new trace.
    Nothing,
    /// A sampling decision alone (B3's `x-b3-sampled`, or `b3: 0|1|d`): a new trace, sampled as told.
    Sampled(bool),
    /// The client's span; `sampled` is `None` when the client left the decision to this proxy.
    Parent { context: SpanContext, sampled: Option<bool> },
    /// Headers Envoy would refuse: the request is not traced, and its headers go on untouched.
    Refused,
}

/// W3C trace context: `traceparent` as `<2 hex>-<32 hex>-<16 hex>-<2 hex>`, neither id zero; `tracestate`
/// values joined.
pub fn w3c(headers: &HeaderMap) -> Incoming {
    let Some(value) = headers.get("traceparent") else { return Incoming::Nothing };
    let Some((trace_id, span_id, sampled)) = value.to_str().ok().and_then(parse_traceparent) else { return Incoming::Refused };
    let trace_state = headers.get_all("tracestate").iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
    let context = SpanContext { trace_id, wide: true, span_id, parent_id: None, sampled, trace_state };
    Incoming::Parent { context, sampled: Some(sampled) }
}

pub(super) fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], bool)> {
    let parts: Vec<&str> = value.split('-').collect();
    let [version, trace, parent, flags] = parts.as_slice() else { return None };
    if value.len() != 55 || version.len() != 2 || !version.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let trace_id: [u8; 16] = hex(trace)?.try_into().ok()?;
    let span_id: [u8; 8] = hex(parent)?.try_into().ok()?;
    let flags = hex(flags)?;
    if trace_id == [0; 16] || span_id == [0; 8] || flags.len() != 1 {
        return None;
    }
    Some((trace_id, span_id, flags[0] & 1 == 1))
}

/// B3: the single `b3` header (`<trace>-<span>[-<sampled>[-<parent>]]`, or a decision alone), else the
/// `x-b3-*` headers.
pub fn b3(headers: &HeaderMap) -> Incoming {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(single) = text("b3") {
        return b3_single(single);
    }
    let sampled = match (text("x-b3-flags"), text("x-b3-sampled")) {
        (Some("1"), _) => Some(true),
        (_, Some(s)) => Some(s == "1" || s.eq_ignore_ascii_case("true")),
        _ => None,
    };
    let (Some(trace), Some(span)) = (text("x-b3-traceid"), text("x-b3-spanid")) else {
        return sampled.map_or(Incoming::Nothing, Incoming::Sampled);
    };
    b3_parent(trace, span, text("x-b3-parentspanid").filter(|p| !p.is_empty()), sampled)
}

fn b3_single(value: &str) -> Incoming {
    let parts: Vec<&str> = value.split('-').collect();
    let decision = |s: &str| match s {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    };
    match parts.as_slice() {
        [only] => decision(only).map_or(Incoming::Refused, Incoming::Sampled),
        [trace, span, rest @ ..] if rest.len() <= 2 => match rest.first().map(|s| decision(s)) {
            Some(None) => Incoming::Refused,
            sampled => b3_parent(trace, span, rest.get(1).copied(), sampled.flatten()),
        },
        _ => Incoming::Refused,
    }
}

/// The client's span from B3's ids (any of them malformed: refused).
fn b3_parent(trace: &str, span: &str, parent: Option<&str>, sampled: Option<bool>) -> Incoming {
    let parent_id = match parent.map(span_id) {
        Some(None) => return Incoming::Refused,
        parent => parent.flatten(),
    };
    match (trace_id(trace), span_id(span)) {
        (Some((trace_id, wide)), Some(span_id)) => {
            let context = SpanContext { trace_id, wide, span_id, parent_id, sampled: sampled.unwrap_or(false), trace_state: String::new() };
            Incoming::Parent { context, sampled }
        }
        _ => Incoming::Refused,
    }
}

/// A B3 trace id: 16 or 32 hex digits.
fn trace_id(s: &str) -> Option<([u8; 16], bool)> {
    let bytes = hex(s)?;
    let mut id = [0u8; 16];
    match bytes.len() {
        8 => id[8..].copy_from_slice(&bytes),
        16 => id.copy_from_slice(&bytes),
        _ => return None,
    }
    Some((id, bytes.len() == 16))
}

fn span_id(s: &str) -> Option<[u8; 8]> {
    hex(s)?.try_into().ok()
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl SpanContext {
    /// The trace id as written: 32 hex digits, or 16 for a 64-bit one.
    pub fn trace_hex(&self) -> String {
        if self.wide { to_hex(&self.trace_id) } else { to_hex(&self.trace_id[8..]) }
    }

    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", to_hex(&self.trace_id), to_hex(&self.span_id), if self.sampled { "01" } else { "00" })
    }

    /// W3C: `traceparent`, and `tracestate` (written even when empty, as Envoy does).
    pub fn inject_w3c(&self, headers: &mut HeaderMap) {
        set(headers, "traceparent", &self.traceparent());
        set(headers, "tracestate", &self.trace_state);
    }

    /// B3 as Envoy's Zipkin spans write it: in the single `b3` header when the request came with one
    /// (`<trace>-<span>-<sampled>[-<parent>]`), else `x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid` (when
    /// the span has a parent) and `x-b3-sampled`.
    pub fn inject_b3(&self, headers: &mut HeaderMap, single: bool) {
        if single {
            let parent = self.parent_id.map(|p| format!("-{}", to_hex(&p))).unwrap_or_default();
            let sampled = if self.sampled { "1" } else { "0" };
            set(headers, "b3", &format!("{}-{}-{sampled}{parent}", self.trace_hex(), to_hex(&self.span_id)));
            return;
        }
        set(headers, "x-b3-traceid", &self.trace_hex());
        set(headers, "x-b3-spanid", &to_hex(&self.span_id));
        if let Some(parent) = self.parent_id {
            set(headers, "x-b3-parentspanid", &to_hex(&parent));
        }
        set(headers, "x-b3-sampled", if self.sampled { "1" } else { "0" });
    }
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (hyper::header::HeaderName::from_static(k), HeaderValue::from_str(v).unwrap())).collect()
    }

    #[test]
    fn traceparent_is_read_as_envoy_reads_it() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let (trace, parent, sampled) = parse_traceparent(good).unwrap();
        assert_eq!((to_hex(&trace).as_str(), to_hex(&parent).as_str(), sampled), ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", true));
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn b3_in_either_form() {
        let multi = b3(&headers(&[("x-b3-traceid", "463ac35c9f6413ad"), ("x-b3-spanid", "a2fb4a1d1a96d312"), ("x-b3-sampled", "1")]));
        let Incoming::Parent { context, sampled } = multi else { panic!("{multi:?}") };
        assert_eq!((context.trace_hex().as_str(), context.wide, sampled), ("463ac35c9f6413ad", false, Some(true)));
        let single = b3(&headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0-05e3ac9a4f6e3b90")]));
        let Incoming::Parent { context, sampled } = single else { panic!("{single:?}") };
        assert_eq!((context.wide, sampled, context.parent_id.map(|p| to_hex(&p))), (true, Some(false), Some("05e3ac9a4f6e3b90".into())));
        assert_eq!(b3(&headers(&[("x-b3-sampled", "0")])), Incoming::Sampled(false));
        assert_eq!(b3(&headers(&[("x-b3-traceid", "xyz"), ("x-b3-spanid", "a2fb4a1d1a96d312")])), Incoming::Refused);
        let mut out = HeaderMap::new();
        SpanContext { trace_id: [1; 16], wide: false, span_id: [2; 8], parent_id: Some([3; 8]), sampled: true, trace_state: String::new() }.inject_b3(&mut out, false);
        assert_eq!(out["x-b3-traceid"], "0101010101010101");
        assert_eq!((out["x-b3-parentspanid"].to_str().unwrap(), out["x-b3-sampled"].to_str().unwrap()), ("0303030303030303", "1"));
    }
}
