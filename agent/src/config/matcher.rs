//! `envoy.type.matcher.v3.StringMatcher` and `RegexMatcher`, and `envoy.config.route.v3.HeaderMatcher`:
//! shared by route matching (and later RBAC). Regexes are RE2 syntax, which the regex crate follows.

use super::tree::{ConfigError, Obj, Result};

#[derive(Debug, Clone, serde::Serialize)]
pub enum StringMatcher {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    Regex(Regex),
}

/// A compiled regex that matches the whole input, as Envoy's `safe_regex` does.
#[derive(Debug, Clone)]
pub struct Regex {
    pub source: String,
    pub whole: regex::Regex,
    /// The same pattern unanchored, for rewrites that replace every match.
    pub any: regex::Regex,
}

impl PartialEq for Regex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl PartialEq for StringMatcher {
    fn eq(&self, other: &Self) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}

impl serde::Serialize for Regex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl Regex {
    pub fn is_match(&self, text: &str) -> bool {
        self.whole.is_match(text)
    }
}

impl StringMatcher {
    pub fn matches(&self, value: &str) -> bool {
        let cmp = |pattern: &str, ignore_case: bool, test: fn(&str, &str) -> bool| {
            if ignore_case {
                test(&value.to_ascii_lowercase(), &pattern.to_ascii_lowercase())
            } else {
                test(value, pattern)
            }
        };
        match self {
            StringMatcher::Exact(p, i) => cmp(p, *i, |v, p| v == p),
            StringMatcher::Prefix(p, i) => cmp(p, *i, |v, p| v.starts_with(p)),
            StringMatcher::Suffix(p, i) => cmp(p, *i, |v, p| v.ends_with(p)),
            StringMatcher::Contains(p, i) => cmp(p, *i, |v, p| v.contains(p)),
            StringMatcher::Regex(r) => r.is_match(value),
        }
    }
}

/// `envoy.type.matcher.v3.RegexMatcher` (`google_re2` engine only, as Envoy has).
pub fn regex(mut r: Obj<'_>) -> Result<Regex> {
    if let Some(mut engine) = r.object("google_re2")? {
        let _ = engine.u64("max_program_size")?;
        engine.finish()?;
    }
    let source = r.required_string("regex")?.to_string();
    let compiled = |pattern: String| {
        regex::Regex::new(&pattern).map_err(|e| ConfigError::new(r.at("regex"), format!("invalid regex {source:?}: {e}")))
    };
    let whole = compiled(format!("^(?:{source})$"))?;
    let any = compiled(source.clone())?;
    r.finish()?;
    Ok(Regex { source, whole, any })
}

pub fn string_matcher(mut m: Obj<'_>) -> Result<StringMatcher> {
    let ignore_case = m.bool("ignore_case")?.unwrap_or(false);
    let found = [
        m.string("exact")?.map(|s| StringMatcher::Exact(s.to_string(), ignore_case)),
        m.string("prefix")?.map(|s| StringMatcher::Prefix(s.to_string(), ignore_case)),
        m.string("suffix")?.map(|s| StringMatcher::Suffix(s.to_string(), ignore_case)),
        m.string("contains")?.map(|s| StringMatcher::Contains(s.to_string(), ignore_case)),
        m.object("safe_regex")?.map(regex).transpose()?.map(StringMatcher::Regex),
    ];
    let mut found = found.into_iter().flatten();
    let (Some(matcher), None) = (found.next(), found.next()) else {
        return Err(ConfigError::new(m.path(), "needs exactly one of exact, prefix, suffix, contains or safe_regex"));
    };
    for (name, pattern) in [("prefix", &matcher), ("suffix", &matcher), ("contains", &matcher)] {
        if let StringMatcher::Prefix(p, _) | StringMatcher::Suffix(p, _) | StringMatcher::Contains(p, _) = pattern {
            if p.is_empty() {
                return Err(ConfigError::new(m.at(name), "must not be empty"));
            }
        }
    }
    m.finish()?;
    Ok(matcher)
}

/// `envoy.config.route.v3.HeaderMatcher`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HeaderMatcher {
    pub name: String,
    pub test: HeaderTest,
    pub invert: bool,
    pub treat_missing_as_empty: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum HeaderTest {
    /// No match specifier: the header is present.
    Present(bool),
    String(StringMatcher),
    /// `[start, end)`, on the value as a signed integer.
    Range(i64, i64),
}

impl HeaderMatcher {
    /// `value` is the header's values joined with ",", `None` when absent.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let value = match value {
            None if self.treat_missing_as_empty => Some(""),
            v => v,
        };
        match (&self.test, value) {
            (HeaderTest::Present(want), v) => v.is_some() == (*want != self.invert),
            (_, None) => false,
            (_, Some(v)) => self.test_value(v) != self.invert,
        }
    }

    /// Envoy's RBAC matching of a repeated header (`rbac_match_headers_individually`, on by default since
    /// 1.38): the header matches when one of its values does, each tested alone; `invert_match` inverts
    /// that answer. `values` empty: the header is absent.
    pub fn matches_individually(&self, values: &[&str]) -> bool {
        match (&self.test, values) {
            (_, []) => self.matches(None),
            (HeaderTest::Present(_), [first, ..]) => self.matches(Some(first)),
            _ => values.iter().any(|v| self.test_value(v)) != self.invert,
        }
    }

    /// The test on one present value, before `invert_match`.
    fn test_value(&self, value: &str) -> bool {
        match &self.test {
            HeaderTest::Present(want) => *want,
            HeaderTest::String(m) => m.matches(value),
            HeaderTest::Range(start, end) => value.parse::<i64>().is_ok_and(|n| *start <= n && n < *end),
        }
    }
}

/// A header's values joined with `,` (how Envoy's header matchers see a repeated header), `None` when absent.
pub fn joined(headers: &hyper::HeaderMap, name: &str) -> Option<String> {
    let values: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
    (!values.is_empty()).then(|| values.join(","))
}

impl HeaderMatcher {
    /// Matches against a header map (pseudo-headers aside).
    pub fn matches_in(&self, headers: &hyper::HeaderMap) -> bool {
        self.matches(joined(headers, &self.name).as_deref())
    }
}

pub fn header_matcher(mut h: Obj<'_>) -> Result<HeaderMatcher> {
    let name = h.required_string("name")?.to_ascii_lowercase();
    let invert = h.bool("invert_match")?.unwrap_or(false);
    let treat_missing_as_empty = h.bool("treat_missing_header_as_empty")?.unwrap_or(false);
    let legacy = |m: &mut Obj<'_>, key: &str, make: fn(String, bool) -> StringMatcher| -> Result<Option<HeaderTest>> {
        Ok(m.string(key)?.map(|s| HeaderTest::String(make(s.to_string(), false))))
    };
    let found = [
        legacy(&mut h, "exact_match", StringMatcher::Exact)?,
        legacy(&mut h, "prefix_match", StringMatcher::Prefix)?,
        legacy(&mut h, "suffix_match", StringMatcher::Suffix)?,
        legacy(&mut h, "contains_match", StringMatcher::Contains)?,
        h.object("safe_regex_match")?.map(regex).transpose()?.map(|r| HeaderTest::String(StringMatcher::Regex(r))),
        h.object("string_match")?.map(string_matcher).transpose()?.map(HeaderTest::String),
        h.bool("present_match")?.map(HeaderTest::Present),
        h.object("range_match")?.map(range).transpose()?,
    ];
    let mut found = found.into_iter().flatten();
    let test = match (found.next(), found.next()) {
        (None, _) => HeaderTest::Present(true),
        (Some(t), None) => t,
        _ => return Err(ConfigError::new(h.path(), "needs at most one header match specifier")),
    };
    h.finish()?;
    Ok(HeaderMatcher { name, test, invert, treat_missing_as_empty })
}

fn range(mut r: Obj<'_>) -> Result<HeaderTest> {
    let int = |r: &mut Obj<'_>, key: &str| -> Result<i64> {
        let path = r.at(key);
        match r.take(key) {
            None => Ok(0),
            Some(serde_json::Value::Number(n)) => n.as_i64().ok_or_else(|| ConfigError::new(path, "expected an integer")),
            Some(serde_json::Value::String(s)) => s.parse().map_err(|_| ConfigError::new(path, "expected an integer")),
            Some(_) => Err(ConfigError::new(path, "expected an integer")),
        }
    };
    let (start, end) = (int(&mut r, "start")?, int(&mut r, "end")?);
    r.finish()?;
    Ok(HeaderTest::Range(start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn header(v: serde_json::Value) -> HeaderMatcher {
        header_matcher(Obj::new(&v, "h").unwrap()).unwrap()
    }

    #[test]
    fn header_matchers_follow_envoy() {
        let m = header(json!({"name": "X-A", "string_match": {"prefix": "ab", "ignore_case": true}}));
        assert!(m.matches(Some("ABc")) && !m.matches(Some("xab")) && !m.matches(None));
        let m = header(json!({"name": "x", "string_match": {"exact": "v"}, "invert_match": true}));
        assert!(!m.matches(Some("v")) && m.matches(Some("w")) && !m.matches(None), "an absent header never matches, inverted or not");
        let m = header(json!({"name": "x", "present_match": false}));
        assert!(m.matches(None) && !m.matches(Some("")));
        let m = header(json!({"name": "x", "range_match": {"start": -10, "end": "10"}}));
        assert!(m.matches(Some("-10")) && m.matches(Some("9")) && !m.matches(Some("10")) && !m.matches(Some("a")));
        let m = header(json!({"name": "x", "safe_regex_match": {"regex": "a+b"}}));
        assert!(m.matches(Some("aab")) && !m.matches(Some("aabc")), "regexes match the whole value");
        let e = header_matcher(Obj::new(&json!({"name": "x", "string_match": {"safe_regex": {"regex": "("}}}), "h").unwrap()).unwrap_err();
        assert_eq!(e.path, "h.string_match.safe_regex.regex");
    }
}
