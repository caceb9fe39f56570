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

/// Splits Envoy's header value format into text and `%COMMAND%` parts (`%%` is a literal `%`).
pub fn parse_format(text: &str) -> std::result::Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('%') {
        literal.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(stripped) = after.strip_prefix('%') {
            literal.push('%');
            rest = stripped;
            continue;
        }
        let end = after.find('%').ok_or_else(|| format!("unterminated variable expression in {text:?}"))?;
        let command = &after[..end];
        let part = match command {
            "DOWNSTREAM_REMOTE_ADDRESS" => Part::DownstreamRemoteAddress { port: true },
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Part::DownstreamRemoteAddress { port: false },
            "DOWNSTREAM_LOCAL_ADDRESS" => Part::DownstreamLocalAddress { port: true },
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Part::DownstreamLocalAddress { port: false },
            "DOWNSTREAM_LOCAL_PORT" => Part::DownstreamLocalPort,
            "PROTOCOL" => Part::Protocol,
            "RESPONSE_CODE" => Part::ResponseCode,
            "UPSTREAM_REMOTE_ADDRESS" => Part::UpstreamRemoteAddress,
            "UPSTREAM_CLUSTER" => Part::UpstreamCluster,
            "LOCAL_REPLY_BODY" => Part::LocalReplyBody,
            _ => match (command.strip_prefix("REQ("), command.strip_prefix("RESP(")) {
                (Some(rest), _) => Part::RequestHeader(header_argument(rest, command)?),
                (_, Some(rest)) => Part::ResponseHeader(header_argument(rest, command)?),
                _ => return Err(format!("%{command}% is not supported by weft in header values")),
            },
        };
        if !literal.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut literal)));
        }
        parts.push(part);
        rest = &after[end + 1..];
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        parts.push(Part::Text(literal));
    }
    Ok(parts)
}

/// The header name of `REQ(name)`/`RESP(name)` (an alternative after `?` and a length after `:` are not
/// supported).
fn header_argument(rest: &str, command: &str) -> std::result::Result<String, String> {
    let name = rest.strip_suffix(')').unwrap_or_default().to_ascii_lowercase();
    let pseudo = matches!(name.as_str(), ":path" | ":method" | ":authority" | ":scheme");
    if !name.is_empty() && (pseudo || !name.contains(['?', ':'])) {
        Ok(name)
    } else {
        Err(format!("%{command}% is not supported by weft in header values"))
    }
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
