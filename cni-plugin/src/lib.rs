//! `weft-cni`: the chained CNI plugin, and the wire protocol it speaks with `weft-agent`.
//!
//! The plugin binary lives in `main.rs`; the library exposes [`protocol`] so the agent and the plugin share one
//! definition of the socket messages, [`cni`] so both sides (and tests) parse CNI input the same way, [`agent`]
//! (the plugin's socket client) and [`logging`] (the plugin's log lines).

pub mod agent;
pub mod cni;
pub mod logging;
pub mod protocol;
