//! The pure part of the installer: reading a network configuration as libcni reads it, and putting weft-cni's
//! entry into it (or taking it out) without touching anything else.

use std::path::PathBuf;

use weft_cni::cni::CniVersion;

use super::json::{Json, Object};

/// The `type` of weft-cni's entry in a plugin list.
pub const PLUGIN_TYPE: &str = "weft-cni";

/// How libcni reads a file of the conf dir, by its extension: `.conflist` is a plugin list, `.conf` and `.json`
/// a single plugin's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    List,
    Single,
}

impl Format {
    /// `None`: libcni ignores the file (`.cilium_bak`, `.temp`, kubeconfigs...).
    pub fn of(file_name: &str) -> Option<Format> {
        if file_name.ends_with(".conflist") {
            Some(Format::List)
        } else if file_name.ends_with(".conf") || file_name.ends_with(".json") {
            Some(Format::Single)
        } else {
            None
        }
    }
}

/// weft-cni's entry: the fields the installer owns (see cni-plugin/src/cni.rs for their meaning).
#[derive(Debug, Clone, PartialEq)]
pub struct WeftEntry {
    pub agent_socket: PathBuf,
    pub exclude_namespaces: Vec<String>,
    /// None: the plugin logs to stderr only (the runtime's log).
    pub log_file: Option<PathBuf>,
}

impl WeftEntry {
    /// Sets the owned fields on `obj`, leaving any other field someone added (e.g. `timeout_ms`) as it is.
    fn apply_to(&self, obj: &mut Object) {
        obj.insert("type", PLUGIN_TYPE.into());
        obj.insert("agent_socket", Json::String(self.agent_socket.to_string_lossy().into_owned()));
        let namespaces = self.exclude_namespaces.iter().map(|n| n.as_str().into()).collect();
        obj.insert("exclude_namespaces", Json::Array(namespaces));
        match &self.log_file {
            Some(path) => obj.insert("log_file", Json::String(path.to_string_lossy().into_owned())),
            None => {
                obj.remove("log_file");
            }
        }
    }

    fn to_object(&self) -> Object {
        let mut obj = Object::default();
        self.apply_to(&mut obj);
        obj
    }
}

/// A network configuration libcni would load: a list with at least one plugin, or one plugin's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    format: Format,
    doc: Object,
}

/// What [`NetConfig::with_entry`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Chained {
    /// The file already holds exactly weft's entry once.
    Unchanged,
    /// The list to write (for a single-plugin file, a new `.conflist`).
    Changed(Json),
}

impl NetConfig {
    /// Checks what libcni checks: a JSON object; a list has a string `name` and a non-empty `plugins` array of
    /// objects with a string `type`; a single config has a string `type`.
    pub fn parse(format: Format, bytes: &[u8]) -> Result<NetConfig, String> {
        let value = Json::parse(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
        let Json::Object(doc) = value else {
            return Err(format!("the file holds {}, not a JSON object", value.kind()));
        };
        match format {
            Format::List => {
                doc.str("name").ok_or("no string \"name\"")?;
                let Some(Json::Array(plugins)) = doc.get("plugins") else {
                    return Err("no \"plugins\" array".into());
                };
                if plugins.is_empty() {
                    return Err("\"plugins\" is empty".into());
                }
                for (i, plugin) in plugins.iter().enumerate() {
                    plugin.as_object().and_then(|p| p.str("type")).ok_or_else(|| format!("plugins[{i}] has no string \"type\""))?;
                }
            }
            Format::Single => {
                doc.str("type").ok_or("no string \"type\" (a plugin list belongs in a .conflist file)")?;
            }
        }
        Ok(NetConfig { format, doc })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    fn plugins(&self) -> Vec<&Object> {
        match (self.format, self.doc.get("plugins")) {
            (Format::List, Some(Json::Array(plugins))) => plugins.iter().filter_map(Json::as_object).collect(),
            _ => vec![&self.doc],
        }
    }

    /// The first plugin's type: the component that owns the file, for messages.
    pub fn primary_type(&self) -> &str {
        self.plugins().first().and_then(|p| p.str("type")).unwrap_or("?")
    }

    /// How many weft-cni entries the file holds.
    pub fn weft_entries(&self) -> usize {
        self.plugins().iter().filter(|p| is_weft(p)).count()
    }

    /// The configuration as a plugin list ending with weft's entry, the primary's `cniVersion` and every other
    /// key kept. An existing weft entry is updated where it stands and any further ones dropped, so the list
    /// never holds two. A single-plugin config becomes a list named after it, as libcni's `ConfListFromConf`
    /// builds one, so the runtime sees the same network (its result cache is keyed by the network's name).
    pub fn with_entry(&self, entry: &WeftEntry) -> Result<Chained, String> {
        self.check_versions()?;
        let mut list = match self.format {
            Format::List => self.doc.clone(),
            Format::Single => {
                let name = self.doc.str("name").ok_or("the config has no \"name\"; a .conflist needs one")?;
                let mut list = Object::default();
                if let Some(v) = self.doc.get("cniVersion") {
                    list.insert("cniVersion", v.clone());
                }
                list.insert("name", name.into());
                list.insert("plugins", Json::Array(vec![Json::Object(self.doc.clone())]));
                list
            }
        };
        let Some(Json::Array(plugins)) = list.get_mut("plugins") else {
            return Err("no \"plugins\" array".into());
        };
        let mut seen = false;
        plugins.retain_mut(|plugin| match plugin {
            Json::Object(p) if is_weft(p) => {
                if seen {
                    return false;
                }
                seen = true;
                entry.apply_to(p);
                true
            }
            _ => true,
        });
        if !seen {
            plugins.push(Json::Object(entry.to_object()));
        }
        Ok(match self.format {
            Format::List if list == self.doc => Chained::Unchanged,
            _ => Chained::Changed(Json::Object(list)),
        })
    }

    /// The configuration without weft's entries; `None` when it has none. Nothing else changes: a list that
    /// was converted from a `.conf` stays a list.
    pub fn without_entry(&self) -> Option<Json> {
        if self.format != Format::List || self.weft_entries() == 0 {
            return None;
        }
        let mut doc = self.doc.clone();
        if let Some(Json::Array(plugins)) = doc.get_mut("plugins") {
            plugins.retain(|p| !p.as_object().is_some_and(is_weft));
        }
        Some(Json::Object(doc))
    }

    /// weft-cni answers the versions it knows; a runtime calling it with another would fail every pod, so such a
    /// config is refused rather than chained into.
    fn check_versions(&self) -> Result<(), String> {
        let supported = || CniVersion::ALL.map(CniVersion::as_str).join(", ");
        let version = match self.doc.get("cniVersion") {
            Some(Json::String(v)) => v.as_str(),
            Some(other) => return Err(format!("cniVersion is {}, not a string", other.kind())),
            None => return Err(format!("it has no cniVersion; weft-cni needs one of {}", supported())),
        };
        let mut versions = vec![version];
        if let Some(Json::Array(list)) = self.doc.get("cniVersions") {
            versions.extend(list.iter().filter_map(|v| if let Json::String(s) = v { Some(s.as_str()) } else { None }));
        }
        match versions.into_iter().find(|v| CniVersion::parse(v).is_none()) {
            Some(v) => Err(format!(
                "its CNI version {v:?} is one weft-cni does not speak ({}); chaining weft-cni into it would fail every pod",
                supported()
            )),
            None => Ok(()),
        }
    }
}

fn is_weft(plugin: &Object) -> bool {
    plugin.str("type") == Some(PLUGIN_TYPE)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn entry() -> WeftEntry {
        WeftEntry {
            agent_socket: "/var/run/weft/cni.sock".into(),
            exclude_namespaces: vec!["kube-system".into()],
            log_file: Some("/var/log/weft-cni.log".into()),
        }
    }

    fn golden_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/cni_install/testdata")
    }

    /// Each `testdata/<name>/` holds a config as its project ships it (`input.conflist`, `input.conf`) and the
    /// list weft writes (`expected.conflist`); UPDATE_GOLDEN=1 rewrites the latter.
    #[test]
    fn golden_conflists() {
        let mut names: Vec<_> = std::fs::read_dir(golden_dir()).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        assert!(names.len() >= 8, "golden cases missing: {names:?}");
        for dir in names {
            let input = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.file_stem().is_some_and(|s| s == "input"))
                .unwrap_or_else(|| panic!("{}: no input.*", dir.display()));
            let name = input.file_name().unwrap().to_string_lossy().into_owned();
            let format = Format::of(&name).unwrap();
            let config = NetConfig::parse(format, &std::fs::read(&input).unwrap()).unwrap();
            assert_eq!(config.weft_entries(), 0, "{}", input.display());
            let Chained::Changed(out) = config.with_entry(&entry()).unwrap() else {
                panic!("{}: nothing inserted", input.display())
            };
            let actual = String::from_utf8(out.to_pretty()).unwrap();
            let expected_path = dir.join("expected.conflist");
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::write(&expected_path, &actual).unwrap();
            }
            let expected = std::fs::read_to_string(&expected_path)
                .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1 to create it)", expected_path.display()));
            assert_eq!(actual, expected, "{} differs (UPDATE_GOLDEN=1 to accept)", expected_path.display());

            // Once in, inserting again changes nothing, and taking it out gives back what was there.
            let written = NetConfig::parse(Format::List, actual.as_bytes()).unwrap();
            assert_eq!(written.weft_entries(), 1);
            assert_eq!(written.with_entry(&entry()).unwrap(), Chained::Unchanged, "{}", dir.display());
            let removed = written.without_entry().unwrap();
            let original = Json::parse(&std::fs::read(&input).unwrap()).unwrap();
            match format {
                Format::List => assert_eq!(removed, original, "{}", dir.display()),
                Format::Single => {
                    let plugins = removed.as_object().and_then(|o| o.get("plugins")).unwrap();
                    assert_eq!(plugins, &Json::Array(vec![original]), "{}", dir.display());
                }
            }
        }
    }

    fn list(text: &str) -> NetConfig {
        NetConfig::parse(Format::List, text.as_bytes()).unwrap()
    }

    #[test]
    fn an_existing_entry_is_updated_in_place_and_duplicates_dropped() {
        let config = list(
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},
                {"type":"weft-cni","agent_socket":"/old.sock","timeout_ms":900},
                {"type":"bandwidth"},{"type":"weft-cni"}]}"#,
        );
        assert_eq!(config.weft_entries(), 2);
        let Chained::Changed(out) = config.with_entry(&entry()).unwrap() else { panic!() };
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"weft-cni","agent_socket":"/var/run/weft/cni.sock","timeout_ms":900,"exclude_namespaces":["kube-system"],"log_file":"/var/log/weft-cni.log"},{"type":"bandwidth"}]}"#
        );
    }

    #[test]
    fn log_file_is_dropped_when_not_configured() {
        let config = list(r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"ptp"},{"type":"weft-cni","log_file":"/x.log"}]}"#);
        let no_log = WeftEntry { log_file: None, ..entry() };
        let Chained::Changed(out) = config.with_entry(&no_log).unwrap() else { panic!() };
        assert!(!serde_json::to_string(&out).unwrap().contains("log_file"));
    }

    #[test]
    fn versions_weft_cni_does_not_speak_are_refused() {
        for (text, what) in [
            (r#"{"cniVersion":"0.2.0","name":"n","type":"bridge"}"#, "\"0.2.0\""),
            (r#"{"name":"n","type":"bridge"}"#, "no cniVersion"),
            (r#"{"cniVersion":1,"name":"n","type":"bridge"}"#, "not a string"),
        ] {
            let config = NetConfig::parse(Format::Single, text.as_bytes()).unwrap();
            let e = config.with_entry(&entry()).unwrap_err();
            assert!(e.contains(what), "{text}: {e}");
        }
        let config = list(r#"{"cniVersion":"1.0.0","cniVersions":["1.0.0","1.2.0"],"name":"n","plugins":[{"type":"ptp"}]}"#);
        assert!(config.with_entry(&entry()).unwrap_err().contains("\"1.2.0\""));
    }

    #[test]
    fn files_libcni_would_not_load_are_refused_with_the_reason() {
        for (format, text, reason) in [
            (Format::List, "{", "not valid JSON"),
            (Format::List, "[]", "not a JSON object"),
            (Format::List, r#"{"cniVersion":"1.0.0","plugins":[{"type":"a"}]}"#, "name"),
            (Format::List, r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#, "empty"),
            (Format::List, r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"ipam":{}}]}"#, "plugins[0]"),
            (Format::Single, r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a"}]}"#, ".conflist"),
        ] {
            let e = NetConfig::parse(format, text.as_bytes()).unwrap_err();
            assert!(e.contains(reason), "{text}: {e}");
        }
    }

    #[test]
    fn format_by_extension() {
        assert_eq!(Format::of("10-calico.conflist"), Some(Format::List));
        assert_eq!(Format::of("10-bridge.conf"), Some(Format::Single));
        assert_eq!(Format::of("99-x.json"), Some(Format::Single));
        assert_eq!(Format::of("10-calico.conflist.cilium_bak"), None);
        assert_eq!(Format::of("calico-kubeconfig"), None);
    }
}
