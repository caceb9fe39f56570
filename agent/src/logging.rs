//! The process's log output and its level, which the admin endpoint's `/logging` changes at run time.

use std::sync::OnceLock;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, Registry};

static LEVEL: OnceLock<reload::Handle<LevelFilter, Registry>> = OnceLock::new();

/// Logs to stderr at `level` (colours only on a terminal). Call once, first thing.
pub fn init(level: tracing::Level) {
    let (filter, handle) = reload::Layer::new(LevelFilter::from_level(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let output = fmt::layer().with_target(false).with_ansi(ansi).with_writer(std::io::stderr);
    if tracing_subscriber::registry().with(filter).with(output).try_init().is_ok() {
        let _ = LEVEL.set(handle);
    }
}

/// The current level (`off` before [`init`]).
pub fn level() -> LevelFilter {
    LEVEL.get().and_then(|h| h.clone_current()).unwrap_or(LevelFilter::OFF)
}

/// Sets the level by Envoy's names (`trace`, `debug`, `info`, `warning`/`warn`, `error`, `critical`, `off`).
pub fn set_level(name: &str) -> Result<LevelFilter, String> {
    let level = match name {
        "trace" => LevelFilter::TRACE,
        "debug" => LevelFilter::DEBUG,
        "info" => LevelFilter::INFO,
        "warning" | "warn" => LevelFilter::WARN,
        "error" | "critical" => LevelFilter::ERROR,
        "off" => LevelFilter::OFF,
        other => return Err(format!("unknown logger level {other:?}; use trace, debug, info, warning, error, critical or off")),
    };
    let handle = LEVEL.get().ok_or("logging is not initialised")?;
    handle.modify(|f| *f = level).map_err(|e| e.to_string())?;
    Ok(level)
}

/// A level by Envoy's name for it.
fn envoy_name(level: LevelFilter) -> &'static str {
    match level {
        LevelFilter::TRACE => "trace",
        LevelFilter::DEBUG => "debug",
        LevelFilter::INFO => "info",
        LevelFilter::WARN => "warning",
        LevelFilter::ERROR => "error",
        _ => "off",
    }
}

/// Envoy's `/logging`: without parameters, the active level; `POST ?level=L` sets it.
pub fn admin(method: &str, level_param: Option<&str>) -> (hyper::StatusCode, String) {
    use hyper::StatusCode;
    match (method, level_param) {
        (_, None) => (StatusCode::OK, format!("active loggers:\n  weft: {}\n", envoy_name(level()))),
        ("POST", Some(name)) => match set_level(name) {
            Ok(level) => (StatusCode::OK, format!("active loggers:\n  weft: {}\n", envoy_name(level))),
            Err(e) => (StatusCode::BAD_REQUEST, format!("error: {e}\n")),
        },
        _ => (StatusCode::METHOD_NOT_ALLOWED, "This endpoint requires POST to change the level\n".to_string()),
    }
}
