//! Access logs (`access_log` of listeners, `tcp_proxy` and the HTTP connection manager), as Istio's MeshConfig
//! (`accessLogFile`, `accessLogFormat`, `accessLogEncoding`) and Telemetry API emit them: Envoy's file logger
//! (`FileAccessLog`) and stdout/stderr loggers, Envoy's format strings (text or `json_format`) and access log
//! filters. A command operator or filter weft cannot evaluate is refused by its path, never printed wrong.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::matcher::{self, HeaderMatcher};
use super::tree::{ConfigError, Obj, Result};

const FILE_LOG: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";
const STDOUT_LOG: &str = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const STDERR_LOG: &str = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// Envoy's default text format, used when a logger names none.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// One access logger.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AccessLog {
    pub filter: Option<Filter>,
    pub sink: Sink,
    pub format: Format,
}

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Sink {
    Stdout,
    Stderr,
    File(PathBuf),
}

/// How a line is made.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum Format {
    Text(Template),
    /// One JSON object per line; with `omit_empty_values` keys whose value is missing are left out.
    Json { fields: BTreeMap<String, JsonField>, omit_empty_values: bool },
}

/// A `json_format` value.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum JsonField {
    /// A string: one command operator alone is typed (a number stays a number, missing is `null`).
    Template(Template),
    Number(f64),
    Bool(bool),
    Nested(BTreeMap<String, JsonField>),
}

/// A format string: literal text and command operators.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Template(pub Vec<Piece>);

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum Piece {
    Text(String),
    Op { op: Operator, max_length: Option<usize> },
}

/// The command operators weft fills (Envoy's names).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Operator {
    /// `START_TIME`, with Envoy's default format or a strftime-style one.
    StartTime(Option<String>),
    /// `REQ(name?alternative)`, `RESP(...)`, `TRAILER(...)`.
    Request(String, Option<String>),
    Response(String, Option<String>),
    Trailer(String, Option<String>),
    Protocol,
    ResponseCode,
    ResponseCodeDetails,
    ResponseFlags,
    ResponseFlagsLong,
    ConnectionTerminationDetails,
    UpstreamTransportFailureReason,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    UpstreamCluster,
    UpstreamClusterRaw,
    UpstreamLocalAddress,
    DownstreamLocalAddress,
    DownstreamLocalAddressWithoutPort,
    DownstreamLocalPort,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamRemotePort,
    DownstreamDirectRemoteAddress,
    DownstreamDirectRemoteAddressWithoutPort,
    RequestedServerName,
    RouteName,
    DownstreamPeerUriSan,
    DownstreamLocalUriSan,
    UpstreamPeerUriSan,
    UpstreamLocalUriSan,
}

impl Operator {
    fn parse(name: &str, args: Option<&str>) -> std::result::Result<Operator, String> {
        let headers = |args: Option<&str>| -> std::result::Result<(String, Option<String>), String> {
            let args = args.filter(|a| !a.is_empty()).ok_or_else(|| format!("{name} needs a header name: {name}(header)"))?;
            let (main, alt) = match args.split_once('?') {
                Some((m, a)) => (m, Some(a.to_ascii_lowercase())),
                None => (args, None),
            };
            Ok((main.to_ascii_lowercase(), alt))
        };
        let no_args = |op: Operator| match args {
            None => Ok(op),
            Some(_) => Err(format!("{name} takes no argument")),
        };
        match name {
            "START_TIME" => {
                let format = args.filter(|a| !a.is_empty()).map(str::to_string);
                if let Some(f) = &format {
                    check_time_format(f)?;
                }
                Ok(Operator::StartTime(format))
            }
            "REQ" => headers(args).map(|(h, a)| Operator::Request(h, a)),
            "RESP" => headers(args).map(|(h, a)| Operator::Response(h, a)),
            "TRAILER" => headers(args).map(|(h, a)| Operator::Trailer(h, a)),
            "PROTOCOL" => no_args(Operator::Protocol),
            "RESPONSE_CODE" => no_args(Operator::ResponseCode),
            "RESPONSE_CODE_DETAILS" => no_args(Operator::ResponseCodeDetails),
            "RESPONSE_FLAGS" => no_args(Operator::ResponseFlags),
            "RESPONSE_FLAGS_LONG" => no_args(Operator::ResponseFlagsLong),
            "CONNECTION_TERMINATION_DETAILS" => no_args(Operator::ConnectionTerminationDetails),
            "UPSTREAM_TRANSPORT_FAILURE_REASON" => no_args(Operator::UpstreamTransportFailureReason),
            "BYTES_RECEIVED" => no_args(Operator::BytesReceived),
            "BYTES_SENT" => no_args(Operator::BytesSent),
            "DURATION" => no_args(Operator::Duration),
            "UPSTREAM_HOST" => no_args(Operator::UpstreamHost),
            "UPSTREAM_CLUSTER" => no_args(Operator::UpstreamCluster),
            "UPSTREAM_CLUSTER_RAW" => no_args(Operator::UpstreamClusterRaw),
            "UPSTREAM_LOCAL_ADDRESS" => no_args(Operator::UpstreamLocalAddress),
            "DOWNSTREAM_LOCAL_ADDRESS" => no_args(Operator::DownstreamLocalAddress),
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => no_args(Operator::DownstreamLocalAddressWithoutPort),
            "DOWNSTREAM_LOCAL_PORT" => no_args(Operator::DownstreamLocalPort),
            "DOWNSTREAM_REMOTE_ADDRESS" => no_args(Operator::DownstreamRemoteAddress),
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => no_args(Operator::DownstreamRemoteAddressWithoutPort),
            "DOWNSTREAM_REMOTE_PORT" => no_args(Operator::DownstreamRemotePort),
            "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => no_args(Operator::DownstreamDirectRemoteAddress),
            "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => no_args(Operator::DownstreamDirectRemoteAddressWithoutPort),
            "REQUESTED_SERVER_NAME" => no_args(Operator::RequestedServerName),
            "ROUTE_NAME" => no_args(Operator::RouteName),
            "DOWNSTREAM_PEER_URI_SAN" => no_args(Operator::DownstreamPeerUriSan),
            "DOWNSTREAM_LOCAL_URI_SAN" => no_args(Operator::DownstreamLocalUriSan),
            "UPSTREAM_PEER_URI_SAN" => no_args(Operator::UpstreamPeerUriSan),
            "UPSTREAM_LOCAL_URI_SAN" => no_args(Operator::UpstreamLocalUriSan),
            other => Err(format!("command operator %{other}% is not supported by weft")),
        }
    }
}

/// The strftime conversions `START_TIME(...)` may use (Envoy's `%E<n>S`/`%f` fractions included).
fn check_time_format(format: &str) -> std::result::Result<(), String> {
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            continue;
        }
        match chars.next() {
            Some('Y' | 'm' | 'd' | 'H' | 'M' | 'S' | 's' | 'f' | 'j' | 'y' | 'e' | 'b' | 'a' | 'Z' | 'z' | '%' | 'F' | 'T') => {}
            Some('E') => match (chars.next(), chars.next()) {
                (Some('1'..='9'), Some('S')) | (Some('s'), _) => {}
                _ => return Err(format!("START_TIME format {format:?}: only %E<1-9>S and %Es of the %E conversions are supported")),
            },
            Some(other) => return Err(format!("START_TIME format {format:?}: %{other} is not supported by weft")),
            None => return Err(format!("START_TIME format {format:?} ends in '%'")),
        }
    }
    Ok(())
}

impl Template {
    /// Parses an Envoy format string (`%OPERATOR(args):max_length%`, `%%` for a percent sign).
    pub fn parse(text: &str) -> std::result::Result<Template, String> {
        let pieces = super::headers::scan_format(text, Piece::Text, |c| Ok(Piece::Op { op: Operator::parse(c.name, c.args)?, max_length: c.max_length }))?;
        Ok(Template(pieces))
    }

    /// The operator (and its length limit) of a template that is one operator and nothing else (typed in JSON).
    pub fn alone(&self) -> Option<(&Operator, Option<usize>)> {
        match &self.0[..] {
            [Piece::Op { op, max_length }] => Some((op, *max_length)),
            _ => None,
        }
    }
}

/// An access log filter (`envoy.config.accesslog.v3.AccessLogFilter`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum Filter {
    StatusCode(Comparison),
    Duration(Comparison),
    NotHealthCheck,
    /// `response_flag_filter`: any of these flags (empty: any flag at all).
    ResponseFlag(Vec<String>),
    /// `runtime_filter`: the default percentage of requests (weft has no runtime overrides).
    Runtime { numerator: u64, denominator: u64 },
    Header(HeaderMatcher),
    And(Vec<Filter>),
    Or(Vec<Filter>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Comparison {
    pub op: CompareOp,
    pub value: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CompareOp {
    Eq,
    Ge,
    Le,
    Ne,
}

impl Comparison {
    pub fn holds(&self, actual: u64) -> bool {
        match self.op {
            CompareOp::Eq => actual == self.value,
            CompareOp::Ge => actual >= self.value,
            CompareOp::Le => actual <= self.value,
            CompareOp::Ne => actual != self.value,
        }
    }
}

/// The flags `response_flag_filter` may name (Envoy's short names).
const FLAGS: [&str; 30] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC", "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT",
    "UPE", "NC", "OM", "DF", "DO", "DR", "UDO",
];

/// The loggers of one listener, `tcp_proxy` or connection manager (shared by their streams).
pub type AccessLogs = std::sync::Arc<[AccessLog]>;

/// `access_log` of a listener, `tcp_proxy` or connection manager.
pub fn translate_all(parent: &mut Obj<'_>) -> Result<AccessLogs> {
    parent.objects("access_log")?.into_iter().map(translate).collect()
}

fn translate(mut a: Obj<'_>) -> Result<AccessLog> {
    let _ = a.string("name")?;
    let filter = a.object("filter")?.map(filter).transpose()?;
    let mut typed = a.required_object("typed_config")?;
    let type_path = typed.at("@type");
    let type_url = typed.required_string("@type")?;
    let (sink, format) = match type_url.rsplit('/').next().unwrap_or(type_url) {
        FILE_LOG => file_log(&mut typed)?,
        STDOUT_LOG => (Sink::Stdout, log_format(&mut typed)?),
        STDERR_LOG => (Sink::Stderr, log_format(&mut typed)?),
        other => {
            return Err(ConfigError::new(type_path, format!("access logger {other} is not supported by weft; use {FILE_LOG}, {STDOUT_LOG} or {STDERR_LOG}")));
        }
    };
    typed.finish()?;
    a.finish()?;
    Ok(AccessLog { filter, sink, format })
}

fn file_log(f: &mut Obj<'_>) -> Result<(Sink, Format)> {
    let path_at = f.at("path");
    let sink = match f.required_string("path")? {
        "/dev/stdout" => Sink::Stdout,
        "/dev/stderr" => Sink::Stderr,
        "" => return Err(ConfigError::new(path_at, "must not be empty")),
        path => Sink::File(PathBuf::from(path)),
    };
    // The deprecated `format` / `json_format` fields, or `log_format`.
    let legacy = match (f.string("format")?, f.take("json_format")) {
        (Some(_), Some(_)) => return Err(ConfigError::new(f.path(), "format and json_format are exclusive")),
        (Some(text), None) => Some(Format::Text(template(text, &f.at("format"))?)),
        (None, Some(json)) => Some(json_format(json, &f.at("json_format"), false)?),
        (None, None) => None,
    };
    let format = match legacy {
        Some(format) if f.has("log_format") => return Err(ConfigError::new(f.at("log_format"), format!("exclusive with the deprecated format fields ({format:?} given)"))),
        Some(format) => format,
        None => log_format(f)?,
    };
    Ok((sink, format))
}

/// `log_format` (`envoy.config.core.v3.SubstitutionFormatString`), Envoy's default format without it.
fn log_format(parent: &mut Obj<'_>) -> Result<Format> {
    let Some(mut s) = parent.object("log_format")? else {
        return Ok(Format::Text(template(DEFAULT_FORMAT, &parent.at("log_format"))?));
    };
    let omit_empty_values = s.bool("omit_empty_values")?.unwrap_or(false);
    let _ = s.string("content_type")?;
    if !s.objects("formatters")?.is_empty() {
        return Err(ConfigError::new(s.at("formatters"), "formatter extensions are not supported by weft"));
    }
    let text_at = s.at("text_format");
    let json_at = s.at("json_format");
    let format = match (s.string("text_format")?, s.object("text_format_source")?, s.take("json_format")) {
        (Some(text), None, None) => Format::Text(template(text, &text_at)?),
        (None, Some(mut source), None) => {
            let at = source.at("inline_string");
            let text = source.required_string("inline_string")?;
            source.finish()?;
            Format::Text(template(text, &at)?)
        }
        (None, None, Some(json)) => json_format(json, &json_at, omit_empty_values)?,
        (None, None, None) => Format::Text(template(DEFAULT_FORMAT, &text_at)?),
        _ => return Err(ConfigError::new(s.path(), "needs exactly one of text_format, text_format_source (inline_string) or json_format")),
    };
    s.finish()?;
    Ok(format)
}

fn template(text: &str, path: &str) -> Result<Template> {
    Template::parse(text).map_err(|e| ConfigError::new(path, e))
}

fn json_format(value: &serde_json::Value, path: &str, omit_empty_values: bool) -> Result<Format> {
    Ok(Format::Json { fields: json_fields(value, path)?, omit_empty_values })
}

fn json_fields(value: &serde_json::Value, path: &str) -> Result<BTreeMap<String, JsonField>> {
    let map = value.as_object().ok_or_else(|| ConfigError::new(path, "expected an object of key to format"))?;
    let mut fields = BTreeMap::new();
    for (key, v) in map {
        let at = format!("{path}.{key}");
        let field = match v {
            serde_json::Value::String(s) => JsonField::Template(template(s, &at)?),
            serde_json::Value::Number(n) => JsonField::Number(n.as_f64().unwrap_or_default()),
            serde_json::Value::Bool(b) => JsonField::Bool(*b),
            serde_json::Value::Object(_) => JsonField::Nested(json_fields(v, &at)?),
            _ => return Err(ConfigError::new(at, "expected a string, number, boolean or object")),
        };
        fields.insert(key.clone(), field);
    }
    Ok(fields)
}

fn filter(mut f: Obj<'_>) -> Result<Filter> {
    let mut found = Vec::new();
    if let Some(mut s) = f.object("status_code_filter")? {
        found.push(Filter::StatusCode(comparison(&mut s)?));
        s.finish()?;
    }
    if let Some(mut d) = f.object("duration_filter")? {
        found.push(Filter::Duration(comparison(&mut d)?));
        d.finish()?;
    }
    if let Some(n) = f.object("not_health_check_filter")? {
        n.finish()?;
        found.push(Filter::NotHealthCheck);
    }
    if let Some(mut r) = f.object("response_flag_filter")? {
        let flags: Vec<String> = r.strings("flags")?.into_iter().map(str::to_string).collect();
        if let Some(bad) = flags.iter().find(|f| !FLAGS.contains(&f.as_str())) {
            return Err(ConfigError::new(r.at("flags"), format!("{bad} is not one of Envoy's response flags")));
        }
        r.finish()?;
        found.push(Filter::ResponseFlag(flags));
    }
    if let Some(mut r) = f.object("runtime_filter")? {
        let _ = r.required_string("runtime_key")?;
        let _ = r.bool("use_independent_randomness")?;
        let (numerator, denominator) = match r.object("percent_sampled")? {
            Some(mut p) => {
                let numerator = p.u64("numerator")?.unwrap_or(0);
                let denominator = match p.string("denominator")?.unwrap_or("HUNDRED") {
                    "HUNDRED" => 100,
                    "TEN_THOUSAND" => 10_000,
                    "MILLION" => 1_000_000,
                    other => return Err(ConfigError::new(p.at("denominator"), format!("{other} is not HUNDRED, TEN_THOUSAND or MILLION"))),
                };
                p.finish()?;
                (numerator, denominator)
            }
            None => (0, 100),
        };
        r.finish()?;
        found.push(Filter::Runtime { numerator, denominator });
    }
    if let Some(mut h) = f.object("header_filter")? {
        found.push(Filter::Header(matcher::header_matcher(h.required_object("header")?)?));
        h.finish()?;
    }
    for (key, make) in [("and_filter", Filter::And as fn(Vec<Filter>) -> Filter), ("or_filter", Filter::Or)] {
        if let Some(mut group) = f.object(key)? {
            let filters = group.objects("filters")?.into_iter().map(filter).collect::<Result<Vec<_>>>()?;
            if filters.len() < 2 {
                return Err(ConfigError::new(group.at("filters"), "needs at least two filters"));
            }
            group.finish()?;
            found.push(make(filters));
        }
    }
    let path = f.path().to_string();
    // Anything else (traceable, grpc_status, metadata, log_type, extension filters) is refused by its name.
    f.finish()?;
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(ConfigError::new(path, "needs one filter")),
        _ => Err(ConfigError::new(path, "holds more than one filter; combine them with and_filter or or_filter")),
    }
}

fn comparison(parent: &mut Obj<'_>) -> Result<Comparison> {
    let mut c = parent.required_object("comparison")?;
    let op = match c.string("op")?.unwrap_or("EQ") {
        "EQ" => CompareOp::Eq,
        "GE" => CompareOp::Ge,
        "LE" => CompareOp::Le,
        "NE" => CompareOp::Ne,
        other => return Err(ConfigError::new(c.at("op"), format!("{other} is not EQ, GE, LE or NE"))),
    };
    let mut v = c.required_object("value")?;
    let value = v.u64("default_value")?.unwrap_or(0);
    let _ = v.required_string("runtime_key")?;
    v.finish()?;
    c.finish()?;
    Ok(Comparison { op, value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log(v: serde_json::Value) -> Result<AccessLog> {
        let holder = json!({"access_log": [v]});
        let mut o = Obj::new(&holder, "l").unwrap();
        translate_all(&mut o).map(|v| v[0].clone())
    }

    #[test]
    fn istios_default_text_and_json_loggers_translate() {
        let text = log(json!({"name": "envoy.access_loggers.file", "typed_config": {"@type": format!("type.googleapis.com/{FILE_LOG}"), "path": "/dev/stdout",
            "log_format": {"text_format_source": {"inline_string": "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%\" %RESPONSE_CODE% 100%% %UPSTREAM_CLUSTER_RAW%\n"}}}}))
        .unwrap();
        assert_eq!(text.sink, Sink::Stdout);
        let Format::Text(t) = text.format else { panic!() };
        assert_eq!(t.0[0], Piece::Text("[".into()));
        assert_eq!(t.0[3], Piece::Op { op: Operator::Request(":method".into(), None), max_length: None });
        assert_eq!(t.0[5], Piece::Op { op: Operator::Request("x-envoy-original-path".into(), Some(":path".into())), max_length: None });
        assert!(t.0.contains(&Piece::Text(" 100% ".into())));
        let json = log(json!({"typed_config": {"@type": format!("type.googleapis.com/{FILE_LOG}"), "path": "/tmp/x.log",
            "log_format": {"json_format": {"code": "%RESPONSE_CODE%", "path": "%REQ(:PATH):5%", "n": 1, "inner": {"a": "x %PROTOCOL%"}}}}}))
        .unwrap();
        let Format::Json { fields, .. } = json.format else { panic!() };
        assert!(matches!(&fields["code"], JsonField::Template(t) if t.alone() == Some((&Operator::ResponseCode, None))));
        assert!(matches!(&fields["path"], JsonField::Template(t) if t.alone() == Some((&Operator::Request(":path".into(), None), Some(5)))));
        assert!(matches!(&fields["inner"], JsonField::Nested(inner) if matches!(&inner["a"], JsonField::Template(t) if t.alone().is_none())));
        assert!(matches!(&fields["inner"], JsonField::Nested(_)));
        assert_eq!(json.sink, Sink::File("/tmp/x.log".into()));
    }

    #[test]
    fn what_weft_cannot_log_is_refused_by_path() {
        let file = |format: serde_json::Value| json!({"typed_config": {"@type": format!("type.googleapis.com/{FILE_LOG}"), "path": "/dev/stdout", "log_format": format}});
        let cases = [
            (file(json!({"text_format": "%DYNAMIC_METADATA(x)%"})), "l.access_log[0].typed_config.log_format.text_format"),
            (file(json!({"text_format": "%START_TIME(%Q)%"})), "l.access_log[0].typed_config.log_format.text_format"),
            (file(json!({"text_format": "50% off"})), "l.access_log[0].typed_config.log_format.text_format"),
            (file(json!({"json_format": {"a": "%CEL(x)%"}})), "l.access_log[0].typed_config.log_format.json_format.a"),
            (file(json!({"text_format": "x", "formatters": [{"name": "f"}]})), "l.access_log[0].typed_config.log_format.formatters"),
            (json!({"typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"}}), "l.access_log[0].typed_config.@type"),
            (json!({"filter": {"grpc_status_filter": {}}, "typed_config": {"@type": format!("type.googleapis.com/{STDOUT_LOG}")}}), "l.access_log[0].filter.grpc_status_filter"),
            (json!({"filter": {"response_flag_filter": {"flags": ["XX"]}}, "typed_config": {"@type": format!("type.googleapis.com/{STDOUT_LOG}")}}), "l.access_log[0].filter.response_flag_filter.flags"),
        ];
        for (config, path) in cases {
            assert_eq!(log(config.clone()).unwrap_err().path, path, "{config}");
        }
    }

    #[test]
    fn filters_translate() {
        let f = log(json!({"filter": {"or_filter": {"filters": [
            {"status_code_filter": {"comparison": {"op": "GE", "value": {"default_value": 500, "runtime_key": "k"}}}},
            {"response_flag_filter": {"flags": ["NR"]}}]}},
            "typed_config": {"@type": format!("type.googleapis.com/{STDERR_LOG}")}}))
        .unwrap();
        let Some(Filter::Or(filters)) = f.filter else { panic!() };
        assert_eq!(filters[0], Filter::StatusCode(Comparison { op: CompareOp::Ge, value: 500 }));
        assert_eq!(f.sink, Sink::Stderr);
        assert!(matches!(f.format, Format::Text(_)), "Envoy's default format");
    }
}
