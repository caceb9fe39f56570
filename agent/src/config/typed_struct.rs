//! `udpa.type.v1.TypedStruct` and `xds.type.v3.TypedStruct`: an extension config carried as the proto3 JSON
//! mapping of the message named by `type_url` (istiod wraps Istio's own filter configs in it). Envoy chooses
//! the extension by the inner `type_url` and reads `value` as that message; weft rewrites each TypedStruct into
//! the ordinary `{"@type": <type_url>, <fields>}` form before translation, so every translator sees one shape
//! and an unknown inner type is refused by its path like any other.

use serde_json::{Map, Value};

const TYPED_STRUCTS: [&str; 2] = ["udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"];

/// `raw` with every TypedStruct (at any depth) replaced by its inner message.
pub fn expand(mut raw: Value) -> Value {
    expand_in_place(&mut raw);
    raw
}

fn expand_in_place(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if is_typed_struct(map) {
                *map = inner(map);
            }
            map.values_mut().for_each(expand_in_place);
        }
        Value::Array(items) => items.iter_mut().for_each(expand_in_place),
        _ => {}
    }
}

fn is_typed_struct(map: &Map<String, Value>) -> bool {
    map.get("@type").and_then(Value::as_str).is_some_and(|t| TYPED_STRUCTS.contains(&t.rsplit('/').next().unwrap_or(t)))
}

/// The inner message: `@type` from `type_url` (kept verbatim, so a missing one is refused by the translator
/// as an empty type), fields from `value` with proto3 JSON's lowerCamelCase names turned back into the
/// .proto names the translators read. Anything else beside them stays, so the translator refuses it by path.
fn inner(map: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    let type_url = map.get("type_url").or_else(|| map.get("typeUrl")).cloned().unwrap_or(Value::String(String::new()));
    out.insert("@type".into(), type_url);
    if let Some(Value::Object(fields)) = map.get("value") {
        for (k, v) in fields {
            out.insert(proto_name(k), snake_keys(v.clone()));
        }
    }
    for (k, v) in map {
        if !["@type", "type_url", "typeUrl", "value"].contains(&k.as_str()) {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Nested messages of the value use the JSON names too, except under an `@type` (another Any keeps its own).
fn snake_keys(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (proto_name(&k), snake_keys(v))).collect()),
        Value::Array(items) => Value::Array(items.into_iter().map(snake_keys).collect()),
        other => other,
    }
}

/// `enableDiscovery` → `enable_discovery`; names already in .proto form (and `@type`) stay as they are.
fn proto_name(json_name: &str) -> String {
    if json_name.starts_with('@') || !json_name.bytes().any(|b| b.is_ascii_uppercase()) {
        return json_name.to_string();
    }
    let mut out = String::with_capacity(json_name.len() + 4);
    for c in json_name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_typed_struct_becomes_its_inner_message() {
        let raw = json!({"filters": [{"name": "istio.metadata_exchange", "typed_config": {
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange",
            "value": {"protocol": "istio-peer-exchange", "enableDiscovery": true}}}]});
        let expanded = expand(raw);
        assert_eq!(
            expanded["filters"][0]["typed_config"],
            json!({"@type": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange", "protocol": "istio-peer-exchange", "enable_discovery": true})
        );
    }

    #[test]
    fn the_xds_form_and_nesting_are_expanded_too() {
        let raw = json!({"@type": "type.googleapis.com/xds.type.v3.TypedStruct", "type_url": "type.googleapis.com/a.B",
            "value": {"inner": {"@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "type_url": "type.googleapis.com/c.D", "value": {"tcpReportingDuration": "5s"}}}});
        assert_eq!(expand(raw), json!({"@type": "type.googleapis.com/a.B", "inner": {"@type": "type.googleapis.com/c.D", "tcp_reporting_duration": "5s"}}));
    }

    #[test]
    fn without_a_type_url_the_type_is_empty_and_refused_downstream() {
        let raw = json!({"@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "value": {"a": 1}});
        assert_eq!(expand(raw), json!({"@type": "", "a": 1}));
    }
}
