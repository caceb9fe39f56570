//! Builds Go programs of the ecosystem from their modules, by name and version, into the cache
//! (`$XDG_CACHE_HOME/weft/go-bin`, else `~/.cache/weft/go-bin`): `go install <package>@<version>` once, then nothing.
//! Which programs, at which versions, is in `tests/src/gotools.rs`, where the tests look them up too.

use std::path::{Path, PathBuf};
use std::process::Command;

use weft_tests::gotools::{cache_dir, GoTool};

/// `tool`'s cached build, built first when missing (quiet when present). Safe against concurrent and
/// interrupted runs: the build goes to a private directory and is renamed into place whole.
pub fn ensure(tool: &GoTool) -> Result<PathBuf, String> {
    let path = tool.path();
    if path.is_file() {
        return Ok(path);
    }
    let go = go_binary()?;
    let dir = cache_dir();
    let staging = dir.join(format!(".build-{}-{}", tool.name, std::process::id()));
    std::fs::create_dir_all(&staging).map_err(|e| format!("creating {}: {e}", staging.display()))?;
    eprintln!("xtask: building {} {} from its Go module for: {} (a few minutes, once)", tool.name, tool.version, tool.why);
    let built = install(&go, tool, &staging).and_then(|binary| {
        std::fs::rename(&binary, &path).map_err(|e| format!("moving {} to {}: {e}", binary.display(), path.display()))
    });
    let _ = std::fs::remove_dir_all(&staging);
    built.map(|()| path)
}

/// `go install` into `gobin`; returns the binary it made.
fn install(go: &Path, tool: &GoTool, gobin: &Path) -> Result<PathBuf, String> {
    let mut cmd = Command::new(go);
    cmd.args(["install", "-trimpath"]);
    if !tool.ldflags.is_empty() {
        cmd.arg(format!("-ldflags={}", tool.ldflags));
    }
    // Static: the binary does not depend on the machine's C library.
    cmd.arg(format!("{}@{}", tool.package, tool.version)).env("GOBIN", gobin).env("CGO_ENABLED", "0");
    crate::run(&mut cmd)?;
    let binary = gobin.join(binary_name(tool.package));
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!("go install {}@{} made no {}", tool.package, tool.version, binary.display()))
    }
}

/// The name `go install` gives a package's binary: its last path element, or the one before a major-version
/// suffix (`example.com/tool/v2` makes `tool`).
fn binary_name(package: &str) -> &str {
    let mut parts = package.rsplit('/');
    let last = parts.next().unwrap_or(package);
    let is_major = last.len() > 1 && last.starts_with('v') && last[1..].bytes().all(|b| b.is_ascii_digit());
    match (is_major, parts.next()) {
        (true, Some(before)) => before,
        _ => last,
    }
}

/// The machine's Go: `go` on PATH, else the official install location.
pub(crate) fn go_binary() -> Result<PathBuf, String> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("go")).find(|g| g.is_file()))
        .unwrap_or_default();
    on_path
        .or_else(|| Some(PathBuf::from("/usr/local/go/bin/go")).filter(|g| g.is_file()))
        .ok_or_else(|| "Go is needed to build tools from their modules: install Go 1.24 or newer and put `go` on PATH".into())
}

#[cfg(test)]
mod tests {
    use super::binary_name;

    #[test]
    fn binary_names_follow_go_install() {
        assert_eq!(binary_name("helm.sh/helm/v3/cmd/helm"), "helm");
        assert_eq!(binary_name("sigs.k8s.io/kind"), "kind");
        assert_eq!(binary_name("example.com/tool/v2"), "tool");
        assert_eq!(binary_name("go.etcd.io/etcd/server/v3"), "server");
    }
}
