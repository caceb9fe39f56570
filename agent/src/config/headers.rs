//! Header changes of routes, virtual hosts, route configurations and weighted clusters:
//! `request_headers_to_add`/`_remove` and `response_headers_to_add`/`_remove`, with `append_action`,
//! `keep_empty_value` and the `%...%` substitutions Istio emits.

use super::tree::{ConfigError, Obj, Result};

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HeaderOps {
    pub request_add: Vec<HeaderValueOption>,
    pub request_remove: Vec<String>,
    pub response_add: Vec<HeaderValueOption>,
    pub response_remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.request_add.is_empty() && self.request_remove.is_empty() && self.response_add.is_empty() && self.response_remove.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HeaderValueOption {
    pub name: String,
    pub value: Vec<Part>,
    pub action: AppendAction,
    pub keep_empty_value: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

/// A piece of a header value: text, or a value of the request known when it is sent.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum Part {
    Text(String),
    DownstreamRemoteAddress { port: bool },
    DownstreamLocalAddress { port: bool },
    DownstreamLocalPort,
    Protocol,
    RequestHeader(String),
    /// Response headers only.
    ResponseHeader(String),
    ResponseCode,
    UpstreamRemoteAddress,
    UpstreamCluster,
    /// Local reply bodies (`local_reply_config` formats) only.
    LocalReplyBody,
}

/// Headers a proxy owns and a route may not change (Envoy refuses these too).
const PROTECTED: [&str; 5] = [":authority", ":path", ":method", ":scheme", "host"];

pub fn ops(o: &mut Obj<'_>) -> Result<HeaderOps> {
    Ok(HeaderOps {
        request_add: o.objects("request_headers_to_add")?.into_iter().map(option).collect::<Result<_>>()?,
        request_remove: removals(o, "request_headers_to_remove")?,
        response_add: o.objects("response_headers_to_add")?.into_iter().map(option).collect::<Result<_>>()?,
        response_remove: removals(o, "response_headers_to_remove")?,
    })
}

fn removals(o: &mut Obj<'_>, key: &str) -> Result<Vec<String>> {
    let path = o.at(key);
    let names: Vec<String> = o.strings(key)?.into_iter().map(str::to_ascii_lowercase).collect();
    match names.iter().find(|n| n.starts_with(':') || PROTECTED.contains(&n.as_str())) {
        Some(n) => Err(ConfigError::new(path, format!(":-prefixed or host headers may not be removed ({n})"))),
        None => Ok(names),
    }
}

pub fn option(mut h: Obj<'_>) -> Result<HeaderValueOption> {
    let mut header = h.required_object("header")?;
    let name = header.required_string("key")?.to_ascii_lowercase();
    if name.starts_with(':') || name == "host" {
        return Err(ConfigError::new(header.at("key"), format!(":-prefixed or host headers may not be modified ({name})")));
    }
    let text = match (header.string("value")?, header.string("raw_value")?) {
        (Some(v), None) => v.to_string(),
        (None, Some(raw)) => base64_decode(raw).ok_or_else(|| ConfigError::new(header.at("raw_value"), "is not base64 of UTF-8 text"))?,
        (None, None) => String::new(),
        (Some(_), Some(_)) => return Err(ConfigError::new(header.path(), "needs at most one of value or raw_value")),
    };
    let value = parse_format(&text).map_err(|e| ConfigError::new(header.at("value"), e))?;
    header.finish()?;
    let append = h.bool("append")?;
    let action = match h.string("append_action")? {
        None => match append {
            Some(false) => AppendAction::OverwriteIfExistsOrAdd,
            _ => AppendAction::AppendIfExistsOrAdd,
        },
        Some(_) if append.is_some() => return Err(ConfigError::new(h.at("append"), "cannot be combined with append_action")),
        Some("APPEND_IF_EXISTS_OR_ADD") => AppendAction::AppendIfExistsOrAdd,
        Some("ADD_IF_ABSENT") => AppendAction::AddIfAbsent,
        Some("OVERWRITE_IF_EXISTS_OR_ADD") => AppendAction::OverwriteIfExistsOrAdd,
        Some("OVERWRITE_IF_EXISTS") => AppendAction::OverwriteIfExists,
        Some(other) => return Err(ConfigError::new(h.at("append_action"), format!("{other} is not an append action"))),
    };
    let keep_empty_value = h.bool("keep_empty_value")?.unwrap_or(false);
    h.finish()?;
    Ok(HeaderValueOption { name, value, action, keep_empty_value })
}

/// One command operator of an Envoy format string: `%NAME(args):max_length%`.
pub struct Command<'a> {
    pub name: &'a str,
    pub args: Option<&'a str>,
    pub max_length: Option<usize>,
}

/// Splits an Envoy format string (header values, local reply bodies, access logs) into literal text (`%%` is a
/// percent sign), made into `T` by `literal`, and command operators, made into `T` by `command`.
pub fn scan_format<T>(text: &str, literal: impl Fn(String) -> T, mut command: impl FnMut(Command<'_>) -> std::result::Result<T, String>) -> std::result::Result<Vec<T>, String> {
    let mut out = Vec::new();
    let mut pending = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('%') {
        pending.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(tail) = after.strip_prefix('%') {
            pending.push('%');
            rest = tail;
            continue;
        }
        let (found, tail) = next_command(after)?;
        if !pending.is_empty() {
            out.push(literal(std::mem::take(&mut pending)));
        }
        out.push(command(found)?);
        rest = tail;
    }
    pending.push_str(rest);
    if !pending.is_empty() {
        out.push(literal(pending));
    }
    Ok(out)
}

/// The command operator at the start of `text` (just after its `%`), and what follows its closing `%`.
fn next_command(text: &str) -> std::result::Result<(Command<'_>, &str), String> {
    let name_end = text.find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')).unwrap_or(text.len());
    let name = &text[..name_end];
    if name.is_empty() {
        let preview: String = text.chars().take(20).collect();
        return Err(format!("'%' not followed by a command operator at {preview:?} (write %% for a percent sign)"));
    }
    let mut rest = &text[name_end..];
    let mut args = None;
    if let Some(inner) = rest.strip_prefix('(') {
        let close = inner.find(')').ok_or_else(|| format!("%{name}( has no closing parenthesis"))?;
        args = Some(&inner[..close]);
        rest = &inner[close + 1..];
    }
    let mut max_length = None;
    if let Some(inner) = rest.strip_prefix(':') {
        let digits = inner.find(|c: char| !c.is_ascii_digit()).unwrap_or(inner.len());
        max_length = Some(inner[..digits].parse::<usize>().map_err(|_| format!("%{name}: the length after ':' must be a number"))?);
        rest = &inner[digits..];
    }
    let rest = rest.strip_prefix('%').ok_or_else(|| format!("%{name} is not closed by '%'"))?;
    Ok((Command { name, args, max_length }, rest))
}

/// Splits Envoy's header value format into text and `%COMMAND%` parts.
pub fn parse_format(text: &str) -> std::result::Result<Vec<Part>, String> {
    scan_format(text, Part::Text, |c| {
        let unsupported = || format!("%{}{}% is not supported by weft in header values", c.name, c.args.map(|a| format!("({a})")).unwrap_or_default());
        if c.max_length.is_some() {
            return Err(unsupported());
        }
        let part = match (c.name, c.args) {
            ("DOWNSTREAM_REMOTE_ADDRESS", None) => Part::DownstreamRemoteAddress { port: true },
            ("DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", None) => Part::DownstreamRemoteAddress { port: false },
            ("DOWNSTREAM_LOCAL_ADDRESS", None) => Part::DownstreamLocalAddress { port: true },
            ("DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", None) => Part::DownstreamLocalAddress { port: false },
            ("DOWNSTREAM_LOCAL_PORT", None) => Part::DownstreamLocalPort,
            ("PROTOCOL", None) => Part::Protocol,
            ("RESPONSE_CODE", None) => Part::ResponseCode,
            ("UPSTREAM_REMOTE_ADDRESS", None) => Part::UpstreamRemoteAddress,
            ("UPSTREAM_CLUSTER", None) => Part::UpstreamCluster,
            ("LOCAL_REPLY_BODY", None) => Part::LocalReplyBody,
            ("REQ", Some(args)) => Part::RequestHeader(header_argument(args).ok_or_else(unsupported)?),
            ("RESP", Some(args)) => Part::ResponseHeader(header_argument(args).ok_or_else(unsupported)?),
            _ => return Err(unsupported()),
        };
        Ok(part)
    })
}

/// The header name of `REQ(name)`/`RESP(name)` (an alternative after `?` is not supported).
fn header_argument(args: &str) -> Option<String> {
    let name = args.to_ascii_lowercase();
    let pseudo = matches!(name.as_str(), ":path" | ":method" | ":authority" | ":scheme");
    (!name.is_empty() && (pseudo || !name.contains(['?', ':']))).then_some(name)
}

/// Standard base64 (proto3 JSON `bytes`) to UTF-8 text.
fn base64_decode(text: &str) -> Option<String> {
    String::from_utf8(super::secret::base64(text)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_into_parts() {
        let parts = parse_format("ip=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% 100%% %REQ(X-A)%").unwrap();
        assert_eq!(
            parts,
            vec![
                Part::Text("ip=".into()),
                Part::DownstreamRemoteAddress { port: false },
                Part::Text(" 100% ".into()),
                Part::RequestHeader("x-a".into())
            ]
        );
        assert!(parse_format("%START_TIME%").unwrap_err().contains("START_TIME"));
        assert!(parse_format("50%").is_err());
        assert_eq!(base64_decode("aGVsbG8="), Some("hello".into()));
    }
}
