//! CNI input and output: environment, network configuration, results and errors (CNI spec 1.1.0, also 0.3.x,
//! 0.4.0 and 1.0.0).
//!
//! Everything here is pure: the binary hands in environment variables and stdin bytes and gets typed values or a
//! [`CniError`] that already carries the spec's error code and a message naming what to fix.

use std::ffi::OsString;
use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::protocol::{Attachment, DEFAULT_SOCKET};

/// Largest network configuration accepted on stdin; real ones are a few KiB.
pub const MAX_STDIN_BYTES: usize = 1 << 20;
/// Namespaces left alone when the config does not say otherwise.
pub const DEFAULT_EXCLUDED_NAMESPACES: &[&str] = &["kube-system"];
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
pub const MAX_TIMEOUT_MS: u64 = 60_000;
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH_BYTES: usize = 107;

// ---------------------------------------------------------------------------------------------------------------
// Versions
// ---------------------------------------------------------------------------------------------------------------

/// A CNI spec version this plugin speaks. Ordered, so "at least 0.4.0" is a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub const ALL: [CniVersion; 5] =
        [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0, CniVersion::V1_0_0, CniVersion::V1_1_0];
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn parse(s: &str) -> Option<CniVersion> {
        CniVersion::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Results before 1.0.0 carry `ips[].version`; 1.0.0 dropped it.
    fn ips_carry_version(self) -> bool {
        self < CniVersion::V1_0_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn supported_versions_list() -> String {
    CniVersion::ALL.map(CniVersion::as_str).join(", ")
}

/// The answer to `VERSION`.
pub fn version_info() -> Value {
    json!({
        "cniVersion": CniVersion::LATEST.as_str(),
        "supportedVersions": CniVersion::ALL.map(CniVersion::as_str),
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------------

/// A CNI error result: printed on stdout as `{"cniVersion", "code", "msg", "details"}` with exit status 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// libcni's `ErrInternal`; codes 100+ are plugin-specific, 999 is what runtimes already know.
    pub const INTERNAL: u32 = 999;

    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: details.into() }
    }

    /// Code 1.
    pub fn incompatible_version(msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError::new(Self::INCOMPATIBLE_VERSION, msg, details)
    }
    /// Code 4.
    pub fn invalid_env(msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError::new(Self::INVALID_ENV, msg, details)
    }
    /// Code 5.
    pub fn io_failure(msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError::new(Self::IO_FAILURE, msg, details)
    }
    /// Code 6.
    pub fn decode(msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError::new(Self::DECODE, msg, details)
    }
    /// Code 7.
    pub fn invalid_config(msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError::new(Self::INVALID_CONFIG, msg, details)
    }
    /// Code 11: the runtime retries the sandbox later.
    pub fn try_again(msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError::new(Self::TRY_AGAIN, msg, details)
    }
    /// Code 50: the plugin cannot serve ADD right now (STATUS).
    pub fn not_available(msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError::new(Self::NOT_AVAILABLE, msg, details)
    }
    /// Code 999.
    pub fn internal(msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError::new(Self::INTERNAL, msg, details)
    }

    pub fn to_json(&self, version: CniVersion) -> Value {
        json!({ "cniVersion": version.as_str(), "code": self.code, "msg": self.msg, "details": self.details })
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "code {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

// ---------------------------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::invalid_env(
                    format!("unknown CNI_COMMAND {other:?}"),
                    "CNI_COMMAND must be one of ADD, DEL, CHECK, VERSION, STATUS, GC",
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    /// The operations that act on one attachment and so need `CNI_CONTAINERID` and `CNI_IFNAME`.
    fn targets_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }

    /// DEL may run after the namespace is gone, so only ADD and CHECK insist on `CNI_NETNS`.
    fn needs_netns(self) -> bool {
        matches!(self, Command::Add | Command::Check)
    }

    /// The oldest config version in which this operation exists (as libcni's skel enforces it).
    fn min_version(self) -> Option<CniVersion> {
        match self {
            Command::Check => Some(CniVersion::V0_4_0),
            Command::Status | Command::Gc => Some(CniVersion::V1_1_0),
            Command::Add | Command::Del | Command::Version => None,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The Kubernetes identity kubelet's runtime passes in `CNI_ARGS`. Empty values count as absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K8sArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub infra_container_id: Option<String>,
}

/// Parses `K=V;K=V`. Keys other than the four `K8S_POD_*` ones are ignored (as with `IgnoreUnknown`); empty
/// segments are tolerated (`a=b;`), a segment without `=` or with an empty key is an error, since it means the
/// runtime and plugin disagree on the format.
pub fn parse_cni_args(s: &str) -> Result<K8sArgs, CniError> {
    let mut args = K8sArgs::default();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(CniError::invalid_env(
                format!("CNI_ARGS has a malformed pair {pair:?}"),
                "CNI_ARGS must be KEY=VALUE pairs separated by ';'",
            ));
        };
        let slot = match key {
            "K8S_POD_NAMESPACE" => &mut args.pod_namespace,
            "K8S_POD_NAME" => &mut args.pod_name,
            "K8S_POD_UID" => &mut args.pod_uid,
            "K8S_POD_INFRA_CONTAINER_ID" => &mut args.infra_container_id,
            _ => continue,
        };
        *slot = Some(value.to_owned()).filter(|v| !v.is_empty());
    }
    Ok(args)
}

/// The `CNI_*` environment, validated for the command it names. Variables a command does not need are empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    /// Empty on DEL when the runtime no longer has the namespace.
    pub netns: String,
    pub ifname: String,
    pub args: K8sArgs,
    /// Not used (weft-cni delegates to nothing), kept for logs.
    pub path: String,
}

impl CniEnv {
    /// Reads the environment through `get` (`std::env::var_os` in the binary, a map in tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<OsString>) -> Result<CniEnv, CniError> {
        let var = |name: &str| -> Result<Option<String>, CniError> {
            match get(name) {
                None => Ok(None),
                Some(os) => match os.into_string() {
                    Ok(s) if s.is_empty() => Ok(None),
                    Ok(s) => Ok(Some(s)),
                    Err(_) => Err(CniError::invalid_env(
                        format!("{name} is not valid UTF-8"),
                        "the container runtime passed bytes that are not UTF-8",
                    )),
                },
            }
        };
        let Some(command) = var("CNI_COMMAND")? else {
            return Err(CniError::invalid_env(
                "CNI_COMMAND is not set",
                "weft-cni is a CNI plugin: run it from a container runtime, or set CNI_COMMAND (ADD, DEL, CHECK, \
                 VERSION, STATUS, GC)",
            ));
        };
        let command = Command::parse(&command)?;
        let required = |name: &str| -> Result<String, CniError> {
            var(name)?.ok_or_else(|| {
                CniError::invalid_env(
                    format!("{name} is required for {command}"),
                    format!("the container runtime must set {name} (CNI spec, \"Parameters\")"),
                )
            })
        };

        let mut env = CniEnv {
            command,
            container_id: String::new(),
            netns: String::new(),
            ifname: String::new(),
            args: K8sArgs::default(),
            path: var("CNI_PATH")?.unwrap_or_default(),
        };
        if command.targets_attachment() {
            env.container_id = required("CNI_CONTAINERID")?;
            validate_container_id(&env.container_id)?;
            env.ifname = required("CNI_IFNAME")?;
            validate_ifname(&env.ifname)?;
            env.netns =
                if command.needs_netns() { required("CNI_NETNS")? } else { var("CNI_NETNS")?.unwrap_or_default() };
            if !env.netns.is_empty() && !env.netns.starts_with('/') {
                return Err(CniError::invalid_env(
                    format!("CNI_NETNS {:?} is not an absolute path", env.netns),
                    "CNI_NETNS must name a network namespace file such as /var/run/netns/NAME or /proc/PID/ns/net",
                ));
            }
            env.args = parse_cni_args(&var("CNI_ARGS")?.unwrap_or_default())?;
        }
        Ok(env)
    }

    pub fn attachment(&self) -> Attachment {
        Attachment { container_id: self.container_id.clone(), ifname: self.ifname.clone() }
    }
}

/// Same rule as libcni's `ValidateContainerID`, so we refuse exactly what the runtime library would.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(CniError::invalid_env(
            format!("CNI_CONTAINERID {id:?} is not a valid container id"),
            "it must start with a letter or digit and contain only letters, digits, '_', '.' and '-'",
        ))
    }
}

/// Same rule as libcni's `ValidateInterfaceName` (Linux IFNAMSIZ is 16 including the NUL).
fn validate_ifname(name: &str) -> Result<(), CniError> {
    let problem = if name.len() > 15 {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("it may not be '.' or '..'")
    } else if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        Some("it may not contain '/', ':' or whitespace")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(CniError::invalid_env(format!("CNI_IFNAME {name:?} is not a valid interface name"), p)),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Network configuration
// ---------------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

impl LogLevel {
    pub fn parse(s: &str) -> Option<LogLevel> {
        Some(match s {
            "error" => LogLevel::Error,
            "warn" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "ERROR",
            LogLevel::Warn => "WARN",
            LogLevel::Info => "INFO",
            LogLevel::Debug => "DEBUG",
        }
    }
}

/// The network configuration from stdin: the CNI fields weft-cni uses and its own plugin fields, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    pub agent_socket: PathBuf,
    pub exclude_namespaces: Vec<String>,
    pub log_file: Option<PathBuf>,
    pub log_level: LogLevel,
    /// Deadline for the whole exchange with the agent (connect, write, read).
    pub timeout: Duration,
    /// The previous plugin's result, kept as JSON so fields we do not know pass through untouched.
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (GC only), parsed on demand by [`NetConf::valid_attachments`].
    pub valid_attachments: Option<Value>,
}

/// Reads at most `limit` bytes; more is an error rather than a silent truncation.
pub fn read_bounded(reader: impl Read, limit: usize) -> Result<Vec<u8>, CniError> {
    let mut buf = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut buf)
        .map_err(|e| CniError::io_failure("cannot read the network configuration from stdin", e.to_string()))?;
    if buf.len() > limit {
        return Err(CniError::decode(
            "network configuration on stdin is too large",
            format!("weft-cni accepts at most {limit} bytes"),
        ));
    }
    Ok(buf)
}

/// The config's `cniVersion` if stdin holds a config with a supported one: used to label error results even
/// when the config itself is rejected for another reason.
pub fn peek_cni_version(stdin: &[u8]) -> Option<CniVersion> {
    let value: Value = serde_json::from_slice(stdin).ok()?;
    CniVersion::parse(value.get("cniVersion")?.as_str()?)
}

/// `null` counts as absent: templated configs (Helm) often render unset values that way.
fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// "a string (\"x\")", "a number (3)": what the user wrote, for error details.
fn describe(v: &Value) -> String {
    let mut shown = v.to_string();
    if shown.len() > 60 {
        let mut cut = 57;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push_str("...");
    }
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("got {kind} ({shown})")
}

fn bad_field(what: String, v: &Value, fix: &str) -> CniError {
    CniError::invalid_config(format!("invalid network config: {what}"), format!("{}; {fix}", describe(v)))
}

/// Parses the network configuration. Unknown top-level fields are accepted (configs carry `ipam`, `dns`,
/// `capabilities`, `runtimeConfig`...); weft-cni's own fields must have the right type and range.
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Err(CniError::decode(
            "no network configuration on stdin",
            "the container runtime must pass the network configuration JSON on stdin",
        ));
    }
    let value: Value = serde_json::from_slice(stdin)
        .map_err(|e| CniError::decode("network configuration on stdin is not JSON", e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(CniError::invalid_config("invalid network config: it must be a JSON object", describe(&value)));
    };

    let cni_version = match field(&obj, "cniVersion") {
        None => {
            return Err(CniError::invalid_config(
                "invalid network config: cniVersion is missing",
                format!("set \"cniVersion\" to one of {}", supported_versions_list()),
            ))
        }
        Some(Value::String(s)) => CniVersion::parse(s).ok_or_else(|| {
            CniError::incompatible_version(
                "incompatible CNI version",
                format!("config cniVersion {s:?} is not supported; weft-cni supports {}", supported_versions_list()),
            )
        })?,
        Some(other) => {
            return Err(bad_field(
                "cniVersion must be a string".into(),
                other,
                &format!("use one of {}", supported_versions_list()),
            ))
        }
    };

    let agent_socket = match field(&obj, "agent_socket") {
        None => PathBuf::from(DEFAULT_SOCKET),
        Some(Value::String(s)) if s.starts_with('/') && s.len() <= MAX_SOCKET_PATH_BYTES => PathBuf::from(s),
        Some(v @ Value::String(s)) if s.starts_with('/') => {
            return Err(bad_field(
                format!("agent_socket is {} bytes long", s.len()),
                v,
                &format!("unix socket paths must be at most {MAX_SOCKET_PATH_BYTES} bytes; pick a shorter path"),
            ))
        }
        Some(v) => {
            return Err(bad_field(
                "agent_socket must be an absolute path to the weft agent's unix socket".into(),
                v,
                &format!("e.g. \"agent_socket\": \"{DEFAULT_SOCKET}\""),
            ))
        }
    };

    let exclude_namespaces = match field(&obj, "exclude_namespaces") {
        None => DEFAULT_EXCLUDED_NAMESPACES.iter().map(|s| (*s).to_owned()).collect(),
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => out.push(s.clone()),
                    other => {
                        return Err(bad_field(
                            format!("exclude_namespaces[{i}] must be a string"),
                            other,
                            "list namespace names, e.g. \"exclude_namespaces\": [\"kube-system\"]",
                        ))
                    }
                }
            }
            out
        }
        Some(v) => {
            return Err(bad_field(
                "exclude_namespaces must be an array of strings".into(),
                v,
                "e.g. \"exclude_namespaces\": [\"kube-system\"] ([] captures every namespace)",
            ))
        }
    };

    let log_file = match field(&obj, "log_file") {
        None => None,
        Some(Value::String(s)) if s.starts_with('/') => Some(PathBuf::from(s)),
        Some(v) => {
            return Err(bad_field(
                "log_file must be an absolute path".into(),
                v,
                "e.g. \"log_file\": \"/var/log/weft-cni.log\", or leave it out to log to stderr only",
            ))
        }
    };

    let log_level = match field(&obj, "log_level") {
        None => LogLevel::Info,
        Some(v) => v.as_str().and_then(LogLevel::parse).ok_or_else(|| {
            bad_field(
                "log_level must be one of \"error\", \"warn\", \"info\", \"debug\"".into(),
                v,
                "the default is \"info\"",
            )
        })?,
    };

    let timeout_ms = match field(&obj, "timeout_ms") {
        None => DEFAULT_TIMEOUT_MS,
        Some(v) => v.as_u64().filter(|ms| (1..=MAX_TIMEOUT_MS).contains(ms)).ok_or_else(|| {
            bad_field(
                format!("timeout_ms must be an integer from 1 to {MAX_TIMEOUT_MS} (milliseconds)"),
                v,
                &format!("the default is {DEFAULT_TIMEOUT_MS}"),
            )
        })?,
    };

    let prev_result = match field(&obj, "prevResult") {
        None => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(v) => return Err(bad_field("prevResult must be a JSON object".into(), v, "check the previous plugin")),
    };

    Ok(NetConf {
        cni_version,
        agent_socket,
        exclude_namespaces,
        log_file,
        log_level,
        timeout: Duration::from_millis(timeout_ms),
        prev_result,
        valid_attachments: field(&obj, "cni.dev/valid-attachments").cloned(),
    })
}

/// Refuses operations the config's version does not have (CHECK before 0.4.0, STATUS and GC before 1.1.0),
/// as libcni's skel does.
pub fn check_version_allows(command: Command, version: CniVersion) -> Result<(), CniError> {
    match command.min_version() {
        Some(min) if version < min => Err(CniError::incompatible_version(
            format!("config version does not allow {command}"),
            format!("{command} exists since CNI {min}; the config says cniVersion {version}"),
        )),
        _ => Ok(()),
    }
}

impl NetConf {
    /// `prevResult`, required by ADD and CHECK: weft-cni only ever runs chained after an interface plugin.
    pub fn require_prev_result(&self) -> Result<&Value, CniError> {
        self.prev_result.as_ref().ok_or_else(|| {
            CniError::invalid_config(
                "invalid network config: prevResult is missing",
                "weft-cni is a chained plugin: list it after the interface plugin (bridge, ptp, calico...) in the \
                 same conflist",
            )
        })
    }

    /// GC's `cni.dev/valid-attachments`. Missing is an error, not "none are valid": treating it as empty would
    /// make the agent forget every pod on the node.
    pub fn valid_attachments(&self) -> Result<Vec<Attachment>, CniError> {
        const KEY: &str = "cni.dev/valid-attachments";
        let fix = "the runtime must pass [{\"containerID\": ..., \"ifname\": ...}, ...] for GC";
        let items = match &self.valid_attachments {
            None => return Err(CniError::invalid_config(format!("invalid network config: {KEY} is missing"), fix)),
            Some(Value::Array(items)) => items,
            Some(v) => return Err(bad_field(format!("{KEY} must be an array"), v, fix)),
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let get = |key: &str| -> Result<String, CniError> {
                match item.get(key) {
                    Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                    Some(v) => Err(bad_field(format!("{KEY}[{i}].{key} must be a non-empty string"), v, fix)),
                    None => Err(bad_field(format!("{KEY}[{i}] has no {key}"), item, fix)),
                }
            };
            out.push(Attachment { container_id: get("containerID")?, ifname: get("ifname")? });
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Pods and results
// ---------------------------------------------------------------------------------------------------------------

/// Whether weft should capture this pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture<'a> {
    Pod {
        namespace: &'a str,
        name: &'a str,
    },
    /// Pass through without the agent; the reason is logged.
    Skip(String),
}

pub fn capture_decision<'a>(args: &'a K8sArgs, exclude_namespaces: &[String]) -> Capture<'a> {
    match (args.pod_namespace.as_deref(), args.pod_name.as_deref()) {
        (Some(namespace), Some(_)) if exclude_namespaces.iter().any(|n| n == namespace) => {
            Capture::Skip(format!("namespace {namespace:?} is in exclude_namespaces"))
        }
        (Some(namespace), Some(name)) => Capture::Pod { namespace, name },
        _ => Capture::Skip("not a Kubernetes pod (CNI_ARGS has no K8S_POD_NAMESPACE and K8S_POD_NAME)".into()),
    }
}

fn bad_prev_result(what: String) -> CniError {
    CniError::invalid_config(
        format!("invalid prevResult: {what}"),
        "the previous plugin in the conflist returned a result weft-cni cannot read",
    )
}

/// The `ips` entries of a result, each an object with a CIDR `address`. Absent `ips` is an empty list.
fn ip_entries(prev: &Value) -> Result<&[Value], CniError> {
    match prev.get("ips") {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(bad_prev_result("ips must be an array".into())),
    }
}

/// The address part of `ips[i].address` ("10.22.0.5/16" → 10.22.0.5). The prefix must be present and in range:
/// the spec says CIDR, and a bare address means the previous plugin is not what we think it is.
fn entry_address(entry: &Value, i: usize) -> Result<IpAddr, CniError> {
    let Some(text) = entry.get("address").and_then(Value::as_str) else {
        return Err(bad_prev_result(format!("ips[{i}].address is missing or not a string")));
    };
    let parsed = text.split_once('/').and_then(|(addr, prefix)| {
        let addr: IpAddr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(addr)
    });
    parsed.ok_or_else(|| bad_prev_result(format!("ips[{i}].address {text:?} is not an address/prefix")))
}

/// The pod's addresses from `prevResult.ips[].address`, in order, without duplicates.
pub fn pod_ips(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
    let mut ips = Vec::new();
    for (i, entry) in ip_entries(prev)?.iter().enumerate() {
        let ip = entry_address(entry, i)?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// `prev` converted to `to`: `cniVersion` set, `ips[].version` added (before 1.0.0) or removed (1.0.0 on),
/// derived from the address. Every other field passes through unchanged, including ones newer than `to`.
pub fn convert_result(prev: &Value, to: CniVersion) -> Result<Value, CniError> {
    let Value::Object(map) = prev else {
        return Err(bad_prev_result("it must be a JSON object".into()));
    };
    let mut out = map.clone();
    if let Some(Value::Array(entries)) = out.get_mut("ips") {
        for (i, entry) in entries.iter_mut().enumerate() {
            let ip = entry_address(entry, i)?;
            let Value::Object(obj) = entry else {
                return Err(bad_prev_result(format!("ips[{i}] must be an object")));
            };
            if to.ips_carry_version() {
                obj.insert("version".into(), Value::from(if ip.is_ipv4() { "4" } else { "6" }));
            } else {
                obj.remove("version");
            }
        }
    } else {
        ip_entries(prev)?; // rejects a non-array `ips`
    }
    out.insert("cniVersion".into(), Value::from(to.as_str()));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn conf(extra: &str) -> Result<NetConf, CniError> {
        let sep = if extra.is_empty() { "" } else { "," };
        parse_netconf(format!(r#"{{"cniVersion":"1.0.0","name":"k8s","type":"weft-cni"{sep}{extra}}}"#).as_bytes())
    }

    fn code(r: Result<impl fmt::Debug, CniError>) -> (u32, String) {
        let e = r.expect_err("expected an error");
        (e.code, format!("{} / {}", e.msg, e.details))
    }

    #[test]
    fn cni_args_reads_k8s_keys_and_ignores_others() {
        let a = parse_cni_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-7d9;K8S_POD_UID=u-1;\
             K8S_POD_INFRA_CONTAINER_ID=abc;FOO=a=b;",
        )
        .unwrap();
        assert_eq!(a.pod_namespace.as_deref(), Some("shop"));
        assert_eq!(a.pod_name.as_deref(), Some("web-7d9"));
        assert_eq!(a.pod_uid.as_deref(), Some("u-1"));
        assert_eq!(a.infra_container_id.as_deref(), Some("abc"));
        assert_eq!(parse_cni_args("").unwrap(), K8sArgs::default());
        assert_eq!(parse_cni_args("K8S_POD_NAME=").unwrap().pod_name, None);
    }

    #[test]
    fn cni_args_malformed_pair_is_code_4() {
        let (c, text) = code(parse_cni_args("K8S_POD_NAME=a;garbage"));
        assert_eq!(c, 4);
        assert!(text.contains("garbage"), "{text}");
        assert_eq!(code(parse_cni_args("=x")).0, 4);
    }

    fn env(vars: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let map: HashMap<String, OsString> = vars.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        CniEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn env_requirements_follow_the_command() {
        let base = [("CNI_CONTAINERID", "abc123"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/var/run/netns/p1")];
        let add = env(&[("CNI_COMMAND", "ADD"), base[0], base[1], base[2], ("CNI_ARGS", "K8S_POD_NAME=x")]).unwrap();
        assert_eq!(add.command, Command::Add);
        assert_eq!(add.netns, "/var/run/netns/p1");
        assert_eq!(add.args.pod_name.as_deref(), Some("x"));

        let (c, text) = code(env(&[("CNI_COMMAND", "ADD"), base[0], base[1]]));
        assert_eq!(c, 4);
        assert!(text.contains("CNI_NETNS"), "{text}");
        // DEL tolerates a missing netns.
        assert_eq!(env(&[("CNI_COMMAND", "DEL"), base[0], base[1], ("CNI_NETNS", "")]).unwrap().netns, "");
        let (_, text) = code(env(&[("CNI_COMMAND", "DEL"), base[1]]));
        assert!(text.contains("CNI_CONTAINERID"), "{text}");
        // STATUS, GC and VERSION need nothing else.
        assert!(env(&[("CNI_COMMAND", "STATUS")]).is_ok());
        assert!(env(&[("CNI_COMMAND", "GC")]).is_ok());
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
    }

    #[test]
    fn env_rejects_bad_values_naming_the_variable() {
        for (vars, name) in [
            (vec![("CNI_COMMAND", "FROB")], "CNI_COMMAND"),
            (vec![], "CNI_COMMAND"),
            (vec![("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "-bad"), ("CNI_IFNAME", "eth0")], "CNI_CONTAINERID"),
            (vec![("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "ok"), ("CNI_IFNAME", "a/b")], "CNI_IFNAME"),
            (
                vec![("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "ok"), ("CNI_IFNAME", "x".repeat(16).as_str())],
                "CNI_IFNAME",
            ),
            (
                vec![("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "ok"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "rel")],
                "CNI_NETNS",
            ),
        ] {
            let (c, text) = code(env(&vars));
            assert_eq!(c, 4, "{vars:?}");
            assert!(text.contains(name), "{vars:?}: {text}");
        }
    }

    #[test]
    fn config_defaults() {
        let c = conf("").unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.exclude_namespaces, vec!["kube-system".to_string()]);
        assert_eq!(c.log_file, None);
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.timeout, Duration::from_millis(5000));
        assert_eq!(c.prev_result, None);
    }

    #[test]
    fn config_plugin_fields_and_unknown_fields() {
        let c = conf(
            r#""agent_socket":"/run/w.sock","exclude_namespaces":[],"log_file":"/tmp/w.log","log_level":"debug",
               "timeout_ms":60000,"ipam":{},"runtimeConfig":{"portMappings":[]},"future":1"#,
        )
        .unwrap();
        assert_eq!(c.agent_socket, PathBuf::from("/run/w.sock"));
        assert!(c.exclude_namespaces.is_empty());
        assert_eq!(c.log_file, Some(PathBuf::from("/tmp/w.log")));
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.timeout, Duration::from_secs(60));
        // null means "use the default".
        assert_eq!(conf(r#""timeout_ms":null"#).unwrap().timeout, Duration::from_millis(5000));
    }

    #[test]
    fn config_wrong_types_are_code_7_naming_the_field() {
        for (extra, name) in [
            (r#""exclude_namespaces":"kube-system""#, "exclude_namespaces"),
            (r#""exclude_namespaces":["a",3]"#, "exclude_namespaces[1]"),
            (r#""timeout_ms":0"#, "timeout_ms"),
            (r#""timeout_ms":60001"#, "timeout_ms"),
            (r#""timeout_ms":-5"#, "timeout_ms"),
            (r#""timeout_ms":1.5"#, "timeout_ms"),
            (r#""timeout_ms":"5000""#, "timeout_ms"),
            (r#""log_level":"verbose""#, "log_level"),
            (r#""log_file":"relative.log""#, "log_file"),
            (r#""agent_socket":42"#, "agent_socket"),
            (r#""agent_socket":"run/x.sock""#, "agent_socket"),
            (r#""prevResult":[]"#, "prevResult"),
        ] {
            let (c, text) = code(conf(extra));
            assert_eq!(c, 7, "{extra}: {text}");
            assert!(text.contains(name), "{extra}: {text}");
        }
        let long = format!(r#""agent_socket":"/{}""#, "s".repeat(120));
        let (c, text) = code(conf(&long));
        assert_eq!(c, 7);
        assert!(text.contains("agent_socket") && text.contains("107"), "{text}");
    }

    #[test]
    fn config_not_json_is_code_6() {
        assert_eq!(code(parse_netconf(b"{not json")).0, 6);
        assert_eq!(code(parse_netconf(b"")).0, 6);
        assert_eq!(code(parse_netconf(b"[1,2]")).0, 7);
        let big = vec![b' '; MAX_STDIN_BYTES + 1];
        assert_eq!(code(read_bounded(&big[..], MAX_STDIN_BYTES)).0, 6);
        assert_eq!(read_bounded(&big[..10], MAX_STDIN_BYTES).unwrap().len(), 10);
    }

    #[test]
    fn config_version_errors() {
        let (c, text) = code(parse_netconf(br#"{"cniVersion":"0.2.0","name":"n","type":"weft-cni"}"#));
        assert_eq!(c, 1);
        assert!(text.contains("incompatible CNI version") && text.contains("0.3.1, 0.4.0, 1.0.0, 1.1.0"), "{text}");
        let (c, text) = code(parse_netconf(br#"{"name":"n","type":"weft-cni"}"#));
        assert_eq!(c, 7);
        assert!(text.contains("cniVersion"), "{text}");
        assert_eq!(code(parse_netconf(br#"{"cniVersion":1}"#)).0, 7);
        assert_eq!(peek_cni_version(br#"{"cniVersion":"0.4.0","timeout_ms":0}"#), Some(CniVersion::V0_4_0));
        assert_eq!(peek_cni_version(b"nope"), None);
    }

    #[test]
    fn version_gates_match_libcni() {
        assert_eq!(code(check_version_allows(Command::Check, CniVersion::V0_3_1)).0, 1);
        assert!(check_version_allows(Command::Check, CniVersion::V0_4_0).is_ok());
        assert_eq!(code(check_version_allows(Command::Gc, CniVersion::V1_0_0)).0, 1);
        assert_eq!(code(check_version_allows(Command::Status, CniVersion::V1_0_0)).0, 1);
        assert!(check_version_allows(Command::Status, CniVersion::V1_1_0).is_ok());
        assert!(check_version_allows(Command::Add, CniVersion::V0_3_0).is_ok());
    }

    #[test]
    fn version_info_lists_all_versions() {
        assert_eq!(
            version_info().to_string(),
            r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#
        );
    }

    #[test]
    fn error_object_shape() {
        let e = CniError::try_again("weft agent unreachable at /x", "connect: refused");
        assert_eq!(
            e.to_json(CniVersion::V0_4_0),
            json!({"cniVersion":"0.4.0","code":11,"msg":"weft agent unreachable at /x","details":"connect: refused"})
        );
    }

    fn prev_040() -> Value {
        json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "mac": "0a:58:0a:16:00:05", "sandbox": "/var/run/netns/p1"}],
            "ips": [
                {"version": "4", "address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 0},
                {"version": "6", "address": "fd00::5/64", "interface": 0}
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.96.0.10"]}
        })
    }

    #[test]
    fn convert_040_to_100_drops_ip_version() {
        let out = convert_result(&prev_040(), CniVersion::V1_0_0).unwrap();
        let mut want = prev_040();
        want["cniVersion"] = json!("1.0.0");
        want["ips"][0].as_object_mut().unwrap().remove("version");
        want["ips"][1].as_object_mut().unwrap().remove("version");
        assert_eq!(out, want);
    }

    #[test]
    fn convert_100_to_040_derives_ip_version_and_keeps_other_fields() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p1", "mtu": 1450}],
            "ips": [{"address": "fd00::5/64", "interface": 0}, {"address": "10.22.0.5/16", "interface": 0}],
            "dns": {}
        });
        let out = convert_result(&prev, CniVersion::V0_4_0).unwrap();
        assert_eq!(out["cniVersion"], "0.4.0");
        assert_eq!(out["ips"][0]["version"], "6");
        assert_eq!(out["ips"][1]["version"], "4");
        assert_eq!(out["interfaces"], prev["interfaces"]);
        assert_eq!(out["dns"], json!({}));
        // Same version: only cniVersion is (re)written.
        assert_eq!(convert_result(&prev, CniVersion::V1_0_0).unwrap(), prev);
        // No ips at all is fine.
        assert_eq!(convert_result(&json!({}), CniVersion::V0_3_1).unwrap(), json!({"cniVersion": "0.3.1"}));
    }

    #[test]
    fn convert_rejects_unreadable_ips() {
        for bad in [
            json!({"ips": {}}),
            json!({"ips": [{"address": "10.0.0.1"}]}),
            json!({"ips": [{"address": "10.0.0.1/33"}]}),
            json!({"ips": [{"gateway": "10.0.0.1"}]}),
            json!({"ips": ["10.0.0.1/8"]}),
            json!([]),
        ] {
            assert_eq!(code(convert_result(&bad, CniVersion::V1_0_0)).0, 7, "{bad}");
        }
    }

    #[test]
    fn pod_ips_extracts_addresses() {
        let ips = pod_ips(&prev_040()).unwrap();
        assert_eq!(ips, vec!["10.22.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        assert!(pod_ips(&json!({"interfaces": []})).unwrap().is_empty());
        let dup = json!({"ips": [{"address": "10.0.0.1/8"}, {"address": "10.0.0.1/24"}]});
        assert_eq!(pod_ips(&dup).unwrap().len(), 1);
        let (c, text) = code(pod_ips(&json!({"ips": [{"address": "10.0.0.1/8"}, {"address": "nope/8"}]})));
        assert_eq!(c, 7);
        assert!(text.contains("ips[1].address"), "{text}");
    }

    #[test]
    fn capture_skips_non_k8s_and_excluded() {
        let excl = vec!["kube-system".to_string()];
        let pod = parse_cni_args("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web").unwrap();
        assert_eq!(capture_decision(&pod, &excl), Capture::Pod { namespace: "shop", name: "web" });
        let sys = parse_cni_args("K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns").unwrap();
        assert!(matches!(capture_decision(&sys, &excl), Capture::Skip(r) if r.contains("exclude_namespaces")));
        let bare = parse_cni_args("K8S_POD_NAMESPACE=shop").unwrap();
        assert!(matches!(capture_decision(&bare, &excl), Capture::Skip(r) if r.contains("not a Kubernetes pod")));
    }

    #[test]
    fn valid_attachments_parse_and_errors() {
        let c = conf(r#""cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]"#).unwrap();
        assert_eq!(
            c.valid_attachments().unwrap(),
            vec![Attachment { container_id: "c1".into(), ifname: "eth0".into() }]
        );
        assert_eq!(code(conf("").unwrap().valid_attachments()).0, 7);
        let (c, text) =
            code(conf(r#""cni.dev/valid-attachments":[{"containerID":"c1"}]"#).unwrap().valid_attachments());
        assert_eq!(c, 7);
        assert!(text.contains("[0] has no ifname"), "{text}");
    }
}
