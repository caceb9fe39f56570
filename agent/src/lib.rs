//! `weft-agent`: the node agent (CNI socket, capture, pod registry) and the node proxy it hosts.
//! See shared/DESIGN.md for the architecture; each module owns the concept it is named after.

pub mod admin;
pub mod capture;
pub mod civil_time;
pub mod cni_install;
pub mod cni_server;
pub mod config;
pub mod counters;
pub mod explain;
pub mod fuzz_targets;
pub mod identity;
pub mod k8s;
pub mod logging;
pub mod node;
pub mod node_metrics;
pub mod pod_config;
pub mod proxy;
pub mod random;
pub mod status;
pub mod xds;
