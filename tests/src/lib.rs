//! Integration-test harness for weft.
//!
//! - [`netns`]: named network namespaces, running code and processes in them.
//! - [`cluster`]: a Kubernetes node without Kubernetes — a node netns with the
//!   CNI bridge and one netns per pod, driven through the real libcni by the
//!   Go driver in `tests/cnidriver`.
//! - [`tools`]: building the driver, finding workspace binaries, skip checks.
//! - [`util`]: errors with diagnostics, deadline polling, child-process guard.
//!
//! Everything here needs root; tests call [`require_root`] and skip with the
//! printed reason otherwise.

// `CniFailure` is returned by value on purpose: tests match on its fields.
#![allow(clippy::result_large_err)]

pub mod agent;
pub mod ca_server;
pub mod cluster;
pub mod conformance;
pub mod envoy_sidecar;
pub mod gotools;
pub mod istiod;
pub mod kube;
pub mod manifests;
pub mod netns;
pub mod otlp;
pub mod pki;
pub mod scenarios;
pub mod tools;
pub mod faults;
pub mod load;
pub mod local_agent;
pub mod share;
pub mod tls_client;
pub mod traffic;
pub mod util;
pub mod xds_server;

pub use cluster::{
    Cluster, ClusterOptions, CniCommand, CniError, CniFailure, CniOutput, Pod, PodOptions,
    WeftEntry, GATEWAY, POD_SUBNET,
};
pub use netns::NetNs;
pub use tools::{
    bin_path, cnidriver_path, envoy_command, envoy_path, require_cni_tools, require_ebpf, require_root, target_dir, workspace_root,
};
pub use util::{wait_for, wait_for_path, ChildGuard, HarnessError};

/// The root of the cgroup v2 hierarchy (where weft's eBPF programs attach), from this process's mounts.
pub fn cgroup2_root() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split(' ').collect();
        (right.starts_with("cgroup2 ") && fields.get(3) == Some(&"/")).then(|| fields[4].into())
    })
}
