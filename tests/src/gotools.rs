//! Go programs of the ecosystem that the project builds from their Go modules by name (never copied into the
//! repository): what each is, at which version, and where its build is cached. `cargo xtask setup` builds them
//! (`xtask/src/goinstall.rs`); the tests find them here and fail with the command to run when one is missing.

use std::path::PathBuf;

/// A `main` package built with `go install <package>@<version>` into the cache as `<name>-<version>`.
#[derive(Debug, Clone, Copy)]
pub struct GoTool {
    pub name: &'static str,
    /// The main package, e.g. `helm.sh/helm/v3/cmd/helm`.
    pub package: &'static str,
    /// A module version the Go module proxy serves (`v3.22.0`).
    pub version: &'static str,
    /// `-ldflags` for the build (the version stamp), empty for none.
    pub ldflags: &'static str,
    /// Why the project needs it, for setup's message.
    pub why: &'static str,
}

/// Helm, which renders `deploy/helm/weft` for the manifest tests and installs it in `cargo xtask e2e-kind`.
pub const HELM: GoTool = GoTool {
    name: "helm",
    package: "helm.sh/helm/v3/cmd/helm",
    version: "v3.22.0",
    ldflags: "-s -w -X helm.sh/helm/v3/internal/version.version=v3.22.0",
    why: "renders deploy/helm/weft (manifest tests, cargo xtask e2e-kind)",
};

/// istiod (`pilot-discovery`), which drives the agent in the live-istiod suite (tests/tests/istiod.rs) and
/// `cargo xtask demo`. Istio tags are not semver, so the module proxy serves a commit by pseudo-version:
/// this one is master of 2026-08-27 (VERSION 1.31-dev), the newest `go install` accepts with Go 1.26.
pub const ISTIOD: GoTool = GoTool {
    name: "pilot-discovery",
    package: "istio.io/istio/pilot/cmd/pilot-discovery",
    version: "v0.0.0-20260827124520-eed52ebb66ad",
    ldflags: "-s -w -X istio.io/istio/pkg/version.buildVersion=1.31-dev-eed52ebb66ad",
    why: "the real istiod of the live-istiod suite and the demo",
};

/// Istio's CustomResourceDefinitions of the [`ISTIOD`] build (its module's
/// `manifests/charts/base/files/crd-all.gen.yaml`), which setup keeps beside the binary.
pub fn istio_crds() -> Result<PathBuf, String> {
    let path = cache_dir().join(format!("{}-{}-crds.yaml", ISTIOD.name, ISTIOD.version));
    match path.is_file() {
        true => Ok(path),
        false => Err(format!("{} is missing: run `cargo xtask setup`, which copies it from the istio.io/istio module", path.display())),
    }
}

/// kind, for `cargo xtask e2e-kind` where it is not installed (built only there, not by setup).
pub const KIND: GoTool = GoTool {
    name: "kind",
    package: "sigs.k8s.io/kind",
    version: "v0.33.0",
    ldflags: "-s -w",
    why: "creates the cluster of cargo xtask e2e-kind",
};

/// `$XDG_CACHE_HOME/weft/go-bin`, else `$HOME/.cache/weft/go-bin` (beside the other Go builds).
pub fn cache_dir() -> PathBuf {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"),
    };
    base.join("weft/go-bin")
}

impl GoTool {
    /// Where its build lives: the version is in the name, so a new version is a new build beside the old.
    pub fn path(&self) -> PathBuf {
        cache_dir().join(format!("{}-{}", self.name, self.version))
    }

    /// The cached build, or what to run to make it.
    pub fn find(&self) -> Result<PathBuf, String> {
        let path = self.path();
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{} {} is not built ({} is missing): run `cargo xtask setup`, which builds it from its Go module",
                self.name,
                self.version,
                path.display()
            ))
        }
    }
}
