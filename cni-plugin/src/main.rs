//! `weft-cni`: the chained CNI plugin. Reads the CNI environment and network config, asks the node's weft agent
//! to capture (or release, check, collect) the pod, and prints the previous plugin's result or a CNI error.
//!
//! Parsing and conversion live in `weft_cni::cni`, the socket client in `weft_cni::agent`; this file only
//! dispatches and maps agent outcomes to CNI error codes.

use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::time::Instant;

use serde_json::Value;
use weft_cni::agent::{self, AgentError};
use weft_cni::cni::{self, Capture, CniEnv, CniError, CniVersion, Command, NetConf};
use weft_cni::logging::Logger;
use weft_cni::protocol::{PodSandbox, Request, Response};

const RUNNING_HINT: &str = "is the weft-agent DaemonSet running on this node?";
const ADD_HINT: &str = "the pod must not start uncaptured; is the weft-agent DaemonSet running on this node?";

fn main() -> ExitCode {
    let mut log = Logger::new();
    // Errors carry the config's cniVersion when stdin has a usable one, else the latest.
    let mut version = CniVersion::LATEST;
    // Belt and braces: nothing below should panic, but if it does the runtime still gets a CNI error object.
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| run(&mut log, &mut version)));
    let result = outcome.unwrap_or_else(|_| {
        Err(CniError::internal("weft-cni panicked", "this is a bug in weft-cni; the panic message is on stderr"))
    });
    match result {
        Ok(output) => {
            if let Some(value) = output {
                print_json(&value);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            log.error(&e);
            print_json(&e.to_json(version));
            ExitCode::FAILURE
        }
    }
}

fn print_json(value: &Value) {
    // A closed stdout cannot be reported anywhere useful; do not panic over it.
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn run(log: &mut Logger, version: &mut CniVersion) -> Result<Option<Value>, CniError> {
    // Read stdin first (even for VERSION, so the writer never sees a closed pipe) to label errors with its version.
    let stdin = cni::read_bounded(io::stdin().lock(), cni::MAX_STDIN_BYTES);
    if let Some(v) = stdin.as_deref().ok().and_then(cni::peek_cni_version) {
        *version = v;
    }
    let env = CniEnv::from_vars(|name| std::env::var_os(name))?;
    log.set_context(&env);
    if env.command == Command::Version {
        return Ok(Some(cni::version_info()));
    }
    let conf = cni::parse_netconf(&stdin?)?;
    log.configure(conf.log_level, conf.log_file.as_deref());
    cni::check_version_allows(env.command, conf.cni_version)?;
    match env.command {
        Command::Add => add(&env, &conf, log),
        Command::Del => del(&env, &conf, log).map(|()| None),
        Command::Check => check(&env, &conf, log).map(|()| None),
        Command::Status => status(&conf, log).map(|()| None),
        Command::Gc => gc(&conf, log).map(|()| None),
        Command::Version => Ok(Some(cni::version_info())),
    }
}

/// One exchange with the agent, timed for the debug log.
fn ask(conf: &NetConf, log: &Logger, request: &Request) -> Result<Response, AgentError> {
    let start = Instant::now();
    let result = agent::exchange(&conf.agent_socket, request, conf.timeout);
    log.debug(format_args!("agent exchange took {:?}", start.elapsed()));
    result
}

/// ": detail" for log lines, nothing when the agent gave no detail.
fn suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

/// Unreachable (absent, restarting, too slow) → code 11 so the runtime retries; anything else → 999.
fn agent_failure(e: &AgentError, hint: &str) -> CniError {
    if e.is_unreachable() {
        CniError::try_again(e.msg(), format!("{}; {hint}", e.cause()))
    } else {
        CniError::internal(e.msg(), e.cause())
    }
}

fn add(env: &CniEnv, conf: &NetConf, log: &Logger) -> Result<Option<Value>, CniError> {
    let prev = conf.require_prev_result()?;
    // Convert before asking the agent: a result we could not return must not leave a captured pod behind.
    let output = cni::convert_result(prev, conf.cni_version)?;
    let ips = cni::pod_ips(prev)?;
    let (namespace, name) = match cni::capture_decision(&env.args, &conf.exclude_namespaces) {
        Capture::Pod { namespace, name } => (namespace, name),
        Capture::Skip(reason) => {
            log.info(format_args!("not captured: {reason}"));
            return Ok(Some(output));
        }
    };
    let ip_list = ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    log.debug(format_args!("pod ips [{ip_list}], netns {}", env.netns));
    if ips.is_empty() {
        log.warn("prevResult has no ips; asking the agent to capture anyway");
    }
    let pod = PodSandbox {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: env.args.pod_uid.clone().unwrap_or_default(),
        container_id: env.container_id.clone(),
        infra_container_id: env.args.infra_container_id.clone().unwrap_or_default(),
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        ips,
    };
    match ask(conf, log, &Request::Add { pod }) {
        Ok(Response::Ok { detail }) => {
            log.info(format_args!("captured [{ip_list}]{}", suffix(&detail)));
            Ok(Some(output))
        }
        Ok(Response::Error { msg, details }) => Err(CniError::internal(msg, details)),
        Err(e) => Err(agent_failure(&e, ADD_HINT)),
    }
}

fn del(env: &CniEnv, conf: &NetConf, log: &Logger) -> Result<(), CniError> {
    // Same decision as ADD. If exclude_namespaces changed since the ADD, the pod stays registered until GC.
    if let Capture::Skip(reason) = cni::capture_decision(&env.args, &conf.exclude_namespaces) {
        log.info(format_args!("nothing to release: {reason}"));
        return Ok(());
    }
    match ask(conf, log, &Request::Del { attachment: env.attachment() }) {
        Ok(Response::Ok { detail }) => {
            log.info(format_args!("released{}", suffix(&detail)));
            Ok(())
        }
        Ok(Response::Error { msg, details }) => Err(CniError::internal(msg, details)),
        // Succeed without the agent: a failing DEL blocks sandbox removal and the runtime retries it forever,
        // while nothing is lost by skipping it. The pod's netns is being torn down (its in-pod listeners and
        // rules go with it), the agent drops pods whose netns is gone when it starts, and CNI GC removes
        // whatever is left.
        Err(e) if e.is_unreachable() => {
            log.warn(format_args!("{e}; succeeding anyway, the agent cleans up on start and on GC"));
            Ok(())
        }
        Err(e) => Err(agent_failure(&e, RUNNING_HINT)),
    }
}

fn check(env: &CniEnv, conf: &NetConf, log: &Logger) -> Result<(), CniError> {
    cni::pod_ips(conf.require_prev_result()?)?;
    if let Capture::Skip(reason) = cni::capture_decision(&env.args, &conf.exclude_namespaces) {
        log.debug(format_args!("nothing to check: {reason}"));
        return Ok(());
    }
    match ask(conf, log, &Request::Check { attachment: env.attachment() }) {
        Ok(Response::Ok { detail }) => {
            log.debug(format_args!("check passed{}", suffix(&detail)));
            Ok(())
        }
        Ok(Response::Error { msg, details }) => Err(CniError::internal(msg, details)),
        Err(e) => Err(agent_failure(&e, RUNNING_HINT)),
    }
}

fn status(conf: &NetConf, log: &Logger) -> Result<(), CniError> {
    match ask(conf, log, &Request::Status {}) {
        Ok(Response::Ok { detail }) => {
            log.debug(format_args!("agent ready{}", suffix(&detail)));
            Ok(())
        }
        // Not ready or not there: either way ADD cannot succeed now, which is what code 50 tells the runtime.
        Ok(Response::Error { msg, details }) => Err(CniError::not_available(msg, details)),
        Err(e) if e.is_unreachable() => Err(CniError::not_available(e.msg(), format!("{}; {RUNNING_HINT}", e.cause()))),
        Err(e) => Err(agent_failure(&e, RUNNING_HINT)),
    }
}

fn gc(conf: &NetConf, log: &Logger) -> Result<(), CniError> {
    let valid = conf.valid_attachments()?;
    let count = valid.len();
    match ask(conf, log, &Request::Gc { valid }) {
        Ok(Response::Ok { detail }) => {
            log.info(format_args!("gc with {count} valid attachments{}", suffix(&detail)));
            Ok(())
        }
        Ok(Response::Error { msg, details }) => Err(CniError::internal(msg, details)),
        Err(e) => Err(agent_failure(&e, RUNNING_HINT)),
    }
}
