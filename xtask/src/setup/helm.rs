//! Setup step `helm`: builds Helm from its Go module at the release `tests/helm/go.mod` pins
//! (every k8s.io module at the control plane's release) into `target/kube/bin/helm`, for the
//! chart's tests (`deploy/chart`). Rebuilt only when the binary is missing or older than a file
//! of the module; the Go build cache keeps it quick after the first time.

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use super::kcp::{mark_built, stale};
use super::{capture, command, stream, Missing, Present, State};

/// The Go module, relative to the workspace root.
const MODULE_DIR: &str = "tests/helm";
/// Helm's module and its main package.
const MODULE: &str = "helm.sh/helm/v4";
const MAIN: &str = "helm.sh/helm/v4/cmd/helm";

pub(super) fn check(root: &Path) -> Result<State> {
    let bin = root.join(mesh_tests::kube::HELM_PATH);
    if let Some(why) = stale(&bin, &root.join(MODULE_DIR))? {
        return Ok(Missing(why));
    }
    Ok(Present(format!(
        "{}; {MODULE}@{}",
        bin.display(),
        version(root)?
    )))
}

/// The pinned release, from `go list -m`.
fn version(root: &Path) -> Result<String> {
    let mut list = command(&["go", "list", "-m", "-f", "{{.Version}}", MODULE]);
    list.current_dir(root.join(MODULE_DIR));
    let out = capture(list, "check tests/helm/go.mod and that Go can read it")?;
    Ok(out.trim().to_owned())
}

pub(super) fn install(root: &Path) -> Result<()> {
    let dir = root.join(MODULE_DIR);
    let hint = "check that the Go module proxy is reachable (GOPROXY) and that tests/helm/go.mod \
                and go.sum are intact; the command can be rerun by hand in tests/helm";
    let mut download = command(&["go", "mod", "download", MODULE]);
    download.current_dir(&dir);
    stream(download, hint)?;
    let version = version(root)?;
    let bin = root.join(mesh_tests::kube::HELM_PATH);
    let out_dir = bin.parent().context("the binary's directory")?;
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // Stamped as Helm's own release build does, so `helm version` names the release.
    let ldflags = format!("-ldflags=-s -w -X helm.sh/helm/v4/internal/version.version={version}");
    let mut build = command(&["go", "build", "-trimpath", "-buildvcs=false"]);
    build
        .arg(ldflags)
        .arg("-o")
        .arg(&bin)
        .arg(MAIN)
        .current_dir(&dir);
    println!(
        "[setup] helm: building {MODULE}@{version} into {} (about 2 minutes the first time)",
        bin.display()
    );
    let started = Instant::now();
    stream(build, hint)?;
    mark_built(&bin)?;
    println!(
        "[setup] helm: built in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
