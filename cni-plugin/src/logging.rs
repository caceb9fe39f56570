//! One-line log records to stderr (the runtime's log) and, when configured, appended to `log_file`.
//!
//! No logging crate: the plugin writes a handful of lines per run, and each line is one `write` so concurrent
//! plugin processes appending to the same file (O_APPEND) do not interleave within a line.

use std::fmt::Display;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cni::{CniEnv, LogLevel};

pub struct Logger {
    level: LogLevel,
    file: Option<File>,
    command: String,
    container_id: String,
    pod: String,
}

impl Default for Logger {
    fn default() -> Self {
        Logger::new()
    }
}

impl Logger {
    /// Stderr only, level info, until [`Logger::configure`] has the network config.
    pub fn new() -> Logger {
        Logger { level: LogLevel::Info, file: None, command: "-".into(), container_id: "-".into(), pod: "-".into() }
    }

    /// Identifies the invocation on every following line.
    pub fn set_context(&mut self, env: &CniEnv) {
        self.command = env.command.as_str().to_owned();
        self.container_id = if env.container_id.is_empty() { "-".into() } else { env.container_id.clone() };
        self.pod = match (&env.args.pod_namespace, &env.args.pod_name) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            _ => "-".into(),
        };
    }

    /// Applies `log_level` and opens `log_file` (append, create, 0600). A file that cannot be opened is reported
    /// on stderr and otherwise ignored: logging must never decide whether a pod starts.
    pub fn configure(&mut self, level: LogLevel, log_file: Option<&Path>) {
        self.level = level;
        self.file = None;
        if let Some(path) = log_file {
            match OpenOptions::new().append(true).create(true).mode(0o600).open(path) {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    self.warn(format_args!("cannot open log_file {}: {e}; logging to stderr only", path.display()))
                }
            }
        }
    }

    pub fn enabled(&self, level: LogLevel) -> bool {
        level <= self.level
    }

    pub fn log(&self, level: LogLevel, msg: impl Display) {
        if !self.enabled(level) {
            return;
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let line = format_line(now, level, &self.command, &self.container_id, &self.pod, &msg.to_string());
        // Write failures are ignored: there is nowhere left to report them.
        let _ = io::stderr().lock().write_all(line.as_bytes());
        if let Some(mut f) = self.file.as_ref() {
            let _ = f.write_all(line.as_bytes());
        }
    }

    pub fn error(&self, msg: impl Display) {
        self.log(LogLevel::Error, msg)
    }
    pub fn warn(&self, msg: impl Display) {
        self.log(LogLevel::Warn, msg)
    }
    pub fn info(&self, msg: impl Display) {
        self.log(LogLevel::Info, msg)
    }
    pub fn debug(&self, msg: impl Display) {
        self.log(LogLevel::Debug, msg)
    }
}

/// `1732245600.123 INFO weft-cni ADD container=abc pod=shop/web: message\n`. Newlines inside the message are
/// escaped so every record stays one line.
pub fn format_line(
    since_epoch: Duration,
    level: LogLevel,
    command: &str,
    container_id: &str,
    pod: &str,
    msg: &str,
) -> String {
    let msg = msg.replace('\r', "\\r").replace('\n', "\\n");
    format!(
        "{}.{:03} {:<5} weft-cni {command} container={container_id} pod={pod}: {msg}\n",
        since_epoch.as_secs(),
        since_epoch.subsec_millis(),
        level.as_str(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format() {
        let line = format_line(Duration::from_millis(1_732_245_600_042), LogLevel::Warn, "DEL", "c1", "a/b", "x\ny");
        assert_eq!(line, "1732245600.042 WARN  weft-cni DEL container=c1 pod=a/b: x\\ny\n");
    }

    #[test]
    fn log_file_is_appended() {
        let path = std::env::temp_dir().join(format!("weft-cni-log-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut log = Logger::new();
        log.configure(LogLevel::Info, Some(&path));
        log.info("one");
        log.debug("hidden");
        log.configure(LogLevel::Debug, Some(&path));
        log.debug("two");
        let text = std::fs::read_to_string(&path).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        let _ = std::fs::remove_file(&path);
        assert_eq!(mode & 0o077, 0, "log file mode {mode:o}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].ends_with(": one") && lines[1].ends_with(": two"), "{text}");
    }
}
