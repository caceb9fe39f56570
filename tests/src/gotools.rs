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
