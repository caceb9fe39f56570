//! Strict reading of Envoy configuration as a JSON tree (YAML is converted to the same tree): every field is
//! taken explicitly, and whatever is left when an object is finished is rejected with its full path, unless
//! it is in the documented table of fields that are safe to ignore. Field names are accepted in both of the
//! proto3 JSON spellings Envoy accepts (`stat_prefix` and `statPrefix`).

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

use super::fields::ignorable;

/// A configuration error: where, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// The largest `google.protobuf.Duration` (10,000 years); Envoy refuses longer ones, and they would overflow.
const MAX_DURATION_SECS: f64 = 315_576_000_000.0;

/// A JSON object being read. Call [`Obj::finish`] when done: it rejects the fields nobody took.
pub struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
    taken: HashSet<&'a str>,
}

fn camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl<'a> Obj<'a> {
    pub fn new(value: &'a Value, path: impl Into<String>) -> Result<Obj<'a>> {
        let path = path.into();
        match value {
            Value::Object(map) => Ok(Obj { path, map, taken: HashSet::new() }),
            other => Err(ConfigError::new(path, format!("expected an object, found {}", kind(other)))),
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path of field `key` of this object.
    pub fn at(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Takes field `key` (either spelling); `None` when absent or null.
    pub fn take(&mut self, key: &str) -> Option<&'a Value> {
        let map = self.map;
        let alt = camel(key);
        let (name, value) = map.get_key_value(key).or_else(|| map.get_key_value(alt.as_str()))?;
        self.taken.insert(name.as_str());
        (!value.is_null()).then_some(value)
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.get(key).or_else(|| self.map.get(camel(key).as_str())).is_some_and(|v| !v.is_null())
    }

    pub fn string(&mut self, key: &str) -> Result<Option<&'a str>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(ConfigError::new(self.at(key), format!("expected a string, found {}", kind(other)))),
        }
    }

    pub fn required_string(&mut self, key: &str) -> Result<&'a str> {
        match self.string(key)? {
            Some(s) if !s.is_empty() => Ok(s),
            _ => Err(ConfigError::new(self.at(key), "is required")),
        }
    }

    pub fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(ConfigError::new(self.at(key), format!("expected a boolean, found {}", kind(other)))),
        }
    }

    /// A `google.protobuf.BoolValue`: a bare bool in proto3 JSON (or `{value: ...}` as some tools write it).
    pub fn bool_value(&mut self, key: &str) -> Result<Option<bool>> {
        let path = self.at(key);
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::Object(m)) if m.len() <= 1 => match m.get("value") {
                None => Ok(Some(false)),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(ConfigError::new(format!("{path}.value"), "expected a boolean")),
            },
            Some(_) => Err(ConfigError::new(path, "expected a boolean")),
        }
    }

    /// An unsigned integer; proto3 JSON also allows it as a string.
    pub fn u64(&mut self, key: &str) -> Result<Option<u64>> {
        let path = self.at(key);
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| ConfigError::new(path, format!("{n} is not an unsigned integer"))),
            Some(Value::String(s)) => s.parse().map(Some).map_err(|_| ConfigError::new(path, format!("{s:?} is not an unsigned integer"))),
            Some(other) => Err(ConfigError::new(path, format!("expected an integer, found {}", kind(other)))),
        }
    }

    /// A `google.protobuf.Duration` in its JSON form: `"5s"`, `"0.250s"`.
    pub fn duration(&mut self, key: &str) -> Result<Option<Duration>> {
        let path = self.at(key);
        let Some(text) = self.string(key)? else { return Ok(None) };
        let secs = text.strip_suffix('s').and_then(|n| n.parse::<f64>().ok()).filter(|s| (0.0..=MAX_DURATION_SECS).contains(s));
        secs.and_then(|s| Duration::try_from_secs_f64(s).ok()).map(Some).ok_or_else(|| {
            ConfigError::new(path, format!("{text:?} is not a duration; write seconds like \"5s\" or \"0.25s\", at most 315576000000s"))
        })
    }

    /// A timeout where `0s` disables it (Envoy's convention); `default` when absent.
    pub fn timeout(&mut self, key: &str, default: Option<Duration>) -> Result<Option<Duration>> {
        Ok(match self.duration(key)? {
            None => default,
            Some(t) if t.is_zero() => None,
            Some(t) => Some(t),
        })
    }

    pub fn object(&mut self, key: &str) -> Result<Option<Obj<'a>>> {
        let path = self.at(key);
        self.take(key).map(|v| Obj::new(v, path)).transpose()
    }

    pub fn required_object(&mut self, key: &str) -> Result<Obj<'a>> {
        let path = self.at(key);
        self.object(key)?.ok_or_else(|| ConfigError::new(path, "is required"))
    }

    /// A list of objects (absent = empty).
    pub fn objects(&mut self, key: &str) -> Result<Vec<Obj<'a>>> {
        let path = self.at(key);
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                items.iter().enumerate().map(|(i, v)| Obj::new(v, format!("{path}[{i}]"))).collect()
            }
            Some(other) => Err(ConfigError::new(path, format!("expected a list, found {}", kind(other)))),
        }
    }

    /// A list of strings (absent = empty).
    pub fn strings(&mut self, key: &str) -> Result<Vec<&'a str>> {
        let path = self.at(key);
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_str().ok_or_else(|| ConfigError::new(format!("{path}[{i}]"), "expected a string")))
                .collect(),
            Some(other) => Err(ConfigError::new(path, format!("expected a list, found {}", kind(other)))),
        }
    }

    /// Rejects whatever was not taken, except fields the ignore table lists for this object.
    pub fn finish(self) -> Result<()> {
        let mut left: Vec<&String> = self.map.keys().filter(|k| !self.taken.contains(k.as_str())).collect();
        left.sort();
        for key in left {
            let path = self.at(key);
            if self.map[key].is_null() || ignorable(&path) {
                continue;
            }
            return Err(ConfigError::new(path, "is not supported by weft; remove it or see docs/envoy-config.md"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_are_rejected_by_path_and_both_spellings_work() {
        let v = json!({"statPrefix": "x", "cluster": "c", "bogus": 1});
        let mut o = Obj::new(&v, "listeners[0]").unwrap();
        assert_eq!(o.string("stat_prefix").unwrap(), Some("x"));
        assert_eq!(o.string("cluster").unwrap(), Some("c"));
        let err = o.finish().unwrap_err();
        assert_eq!(err.path, "listeners[0].bogus");
    }

    #[test]
    fn durations_and_types() {
        let v = json!({"t": "0.25s", "bad": "5m", "n": "12", "s": 3});
        let mut o = Obj::new(&v, "").unwrap();
        assert_eq!(o.duration("t").unwrap(), Some(Duration::from_millis(250)));
        assert!(o.duration("bad").unwrap_err().to_string().contains("\"5m\""));
        let limits = json!({"huge": "199999999999999999999999s", "max": "315576000000s", "negative": "-1s", "nan": "NaNs"});
        let mut l = Obj::new(&limits, "").unwrap();
        assert!(l.duration("huge").unwrap_err().to_string().starts_with("huge: \"199999999999999999999999s\" is not a duration"));
        assert_eq!(l.duration("max").unwrap(), Some(Duration::from_secs(315_576_000_000)));
        assert!(l.duration("negative").is_err() && l.duration("nan").is_err());
        assert_eq!(o.u64("n").unwrap(), Some(12));
        assert_eq!(o.string("s").unwrap_err().to_string(), "s: expected a string, found a number");
    }
}
