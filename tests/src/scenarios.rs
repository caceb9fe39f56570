//! The shared traffic scenarios (`tests/scenarios.yaml`): the workloads of a small mesh and who calls whom with
//! which outcome. `cargo xtask e2e-kind` runs them on a kind cluster; the netns suite runs them on its pods.
//!
//! ```yaml
//! workloads:            # by name: the pod (and Service, for servers) each scenario refers to
//!   client: {service_account: client, captured: true}
//!   server-v1: {service_account: server, captured: true, version: v1, port: 5000}
//! scenarios:
//!   - {name: ..., from: client, to: server-v1, port: 5000, expect: reach}   # reach | denied | reset
//! ```
//!
//! A workload with a `port` is a server (an HTTP service answering `GET /hello` with its version); the others are
//! clients. Every reference is checked when the file loads, and every error names the scenario or workload and
//! the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What the caller observes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// The server's answer (HTTP 200 naming its version).
    Reach,
    /// An authorization policy's refusal: HTTP 403.
    Denied,
    /// No HTTP answer at all: the connection is refused, reset or closed (plaintext into STRICT mTLS).
    Reset,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub service_account: String,
    /// In a namespace weft captures.
    pub captured: bool,
    /// Servers: the version they answer with.
    #[serde(default)]
    pub version: Option<String>,
    /// Servers: the port they serve on.
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub from: String,
    pub to: String,
    pub port: u16,
    pub expect: Expect,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenarios {
    pub workloads: BTreeMap<String, Workload>,
    pub scenarios: Vec<Scenario>,
}

/// `tests/scenarios.yaml` in this workspace.
pub fn default_path() -> PathBuf {
    crate::tools::workspace_root().join("tests/scenarios.yaml")
}

impl Scenarios {
    pub fn load(path: &Path) -> Result<Scenarios, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Scenarios::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Scenarios, String> {
        let parsed: Scenarios = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        parsed.check()?;
        Ok(parsed)
    }

    /// The servers: workloads with a port.
    pub fn servers(&self) -> impl Iterator<Item = (&str, &Workload)> {
        self.workloads.iter().filter(|(_, w)| w.port.is_some()).map(|(n, w)| (n.as_str(), w))
    }

    fn check(&self) -> Result<(), String> {
        for (name, w) in &self.workloads {
            if !is_dns_label(name) {
                return Err(format!("workloads.{name}: not a DNS label (lower-case letters, digits, '-', at most 63)"));
            }
            if w.port.is_some() != w.version.is_some() {
                return Err(format!("workloads.{name}: a server has both `port` and `version`, a client neither"));
            }
            if w.port == Some(0) {
                return Err(format!("workloads.{name}.port: must be 1-65535"));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, s) in self.scenarios.iter().enumerate() {
            let at = format!("scenarios[{i}] ({:?})", s.name);
            if !names.insert(s.name.as_str()) {
                return Err(format!("{at}.name: used twice"));
            }
            if !self.workloads.contains_key(&s.from) {
                return Err(format!("{at}.from: no workload {:?}", s.from));
            }
            let to = self.workloads.get(&s.to).ok_or_else(|| format!("{at}.to: no workload {:?}", s.to))?;
            if to.port != Some(s.port) {
                return Err(format!("{at}.port: {} is not the port {:?} serves ({:?})", s.port, s.to, to.port));
            }
        }
        if self.scenarios.is_empty() {
            return Err("scenarios: empty".into());
        }
        Ok(())
    }
}

fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = "
workloads:
  client: {service_account: client, captured: true}
  server-v1: {service_account: server, captured: true, version: v1, port: 5000}
scenarios:
  - {name: a, from: client, to: server-v1, port: 5000, expect: reach}
";

    #[test]
    fn the_shared_file_loads() {
        let s = Scenarios::load(&default_path()).unwrap();
        assert!(s.scenarios.len() >= 5, "{s:?}");
        for expect in [Expect::Reach, Expect::Denied, Expect::Reset] {
            assert!(s.scenarios.iter().any(|x| x.expect == expect), "no scenario expects {expect:?}");
        }
        assert_eq!(s.servers().count(), 2);
    }

    #[test]
    fn a_small_file_parses() {
        let s = Scenarios::parse(SMALL).unwrap();
        assert_eq!(s.scenarios[0], Scenario { name: "a".into(), from: "client".into(), to: "server-v1".into(), port: 5000, expect: Expect::Reach });
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (SMALL.replace("from: client", "from: nobody"), "scenarios[0] (\"a\").from: no workload \"nobody\""),
            (SMALL.replace("to: server-v1", "to: client"), "scenarios[0] (\"a\").port: 5000 is not the port \"client\" serves"),
            (SMALL.replace("port: 5000, expect", "port: 5001, expect"), ".port: 5001 is not the port"),
            (SMALL.replace("expect: reach", "expect: maybe"), "unknown variant `maybe`"),
            (SMALL.replace("expect: reach", "expect: reach, extra: 1"), "unknown field `extra`"),
            (SMALL.replace(", version: v1", ""), "workloads.server-v1: a server has both"),
            (SMALL.replace("client: {", "Client: {"), "workloads.Client: not a DNS label"),
            (format!("{SMALL}  - {{name: a, from: client, to: server-v1, port: 5000, expect: reset}}\n"), "scenarios[1] (\"a\").name: used twice"),
        ];
        for (text, want) in cases {
            let err = Scenarios::parse(&text).unwrap_err();
            assert!(err.contains(want), "want {want:?} in {err:?}");
        }
    }
}
