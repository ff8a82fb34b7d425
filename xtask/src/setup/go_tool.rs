//! Setup steps `helm`, `jaeger` and `gamma conformance`: each builds a test tool from its Go
//! module at the release its tools module pins (`tests/helm`, `tests/jaeger`, `tests/gamma`;
//! every k8s.io module at the control plane's release) into `target/kube/bin`. Helm serves the
//! chart's tests (`deploy/chart`), Jaeger the tracing test, and the Gateway API's conformance
//! suite (a Go test binary) the mesh conformance test. Rebuilt only when the binary is missing or older than a file of its
//! module; the Go build cache keeps it quick after the first time.

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use super::kcp::{mark_built, stale};
use super::{capture, command, stream, Missing, Present, State};

/// A tool built from a Go module.
pub(super) struct GoTool {
    /// The step's name.
    name: &'static str,
    /// Its tools module, relative to the workspace root.
    module_dir: &'static str,
    /// The module it comes from, and its main package.
    module: &'static str,
    main: &'static str,
    /// A test binary (`go test -c`) rather than a program.
    test: bool,
    /// Where it goes, relative to the workspace root.
    bin: &'static str,
    /// `-X` stamps its own release build sets, given the release.
    stamp: fn(&str) -> String,
    /// How long the first build takes here.
    first_build: &'static str,
}

/// Helm, stamped as its release build is, so `helm version` names the release.
pub(super) const HELM: GoTool = GoTool {
    name: "helm",
    module_dir: "tests/helm",
    module: "helm.sh/helm/v4",
    main: "helm.sh/helm/v4/cmd/helm",
    test: false,
    bin: mesh_tests::kube::HELM_PATH,
    stamp: |version| format!("-X helm.sh/helm/v4/internal/version.version={version}"),
    first_build: "about 2 minutes",
};

/// Jaeger v2 (OTLP receiver, memory store, query API in one binary).
pub(super) const JAEGER: GoTool = GoTool {
    name: "jaeger",
    module_dir: "tests/jaeger",
    module: "github.com/jaegertracing/jaeger",
    main: "github.com/jaegertracing/jaeger/cmd/jaeger",
    test: false,
    bin: mesh_tests::jaeger::JAEGER_PATH,
    stamp: |version| {
        format!("-X github.com/jaegertracing/jaeger/internal/version.latestVersion={version}")
    },
    first_build: "about 3 minutes",
};

/// The Gateway API conformance suite with the harness that runs it against the mesh
/// (`tests/gamma`), a test binary.
pub(super) const GAMMA: GoTool = GoTool {
    name: "gamma conformance",
    module_dir: "tests/gamma",
    module: "sigs.k8s.io/gateway-api/conformance",
    main: ".",
    test: true,
    bin: mesh_tests::kube::GAMMA_PATH,
    stamp: |_| String::new(),
    first_build: "about 3 minutes",
};

pub(super) fn check_helm(root: &Path) -> Result<State> {
    HELM.check(root)
}

pub(super) fn install_helm(root: &Path) -> Result<()> {
    HELM.install(root)
}

pub(super) fn check_jaeger(root: &Path) -> Result<State> {
    JAEGER.check(root)
}

pub(super) fn install_jaeger(root: &Path) -> Result<()> {
    JAEGER.install(root)
}

pub(super) fn check_gamma(root: &Path) -> Result<State> {
    GAMMA.check(root)
}

pub(super) fn install_gamma(root: &Path) -> Result<()> {
    GAMMA.install(root)
}

impl GoTool {
    fn check(&self, root: &Path) -> Result<State> {
        let bin = root.join(self.bin);
        if let Some(why) = stale(&bin, &root.join(self.module_dir))? {
            return Ok(Missing(why));
        }
        Ok(Present(format!(
            "{}; {}@{}",
            bin.display(),
            self.module,
            self.version(root)?
        )))
    }

    /// The pinned release, from `go list -m`.
    fn version(&self, root: &Path) -> Result<String> {
        let mut list = command(&["go", "list", "-m", "-f", "{{.Version}}", self.module]);
        list.current_dir(root.join(self.module_dir));
        let hint = format!("check {}/go.mod and that Go can read it", self.module_dir);
        let out = capture(list, &hint)?;
        Ok(out.trim().to_owned())
    }

    fn install(&self, root: &Path) -> Result<()> {
        let (name, dir) = (self.name, root.join(self.module_dir));
        let hint = format!(
            "check that the Go module proxy is reachable (GOPROXY) and that {0}/go.mod and \
             go.sum are intact; the command can be rerun by hand in {0}",
            self.module_dir
        );
        let mut download = command(&["go", "mod", "download", self.module]);
        download.current_dir(&dir);
        stream(download, &hint)?;
        let version = self.version(root)?;
        let bin = root.join(self.bin);
        let out_dir = bin.parent().context("the binary's directory")?;
        fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
        let ldflags = format!("-ldflags=-s -w {}", (self.stamp)(&version));
        let mut build = if self.test {
            command(&["go", "test", "-c", "-trimpath", "-buildvcs=false"])
        } else {
            command(&["go", "build", "-trimpath", "-buildvcs=false"])
        };
        build
            .arg(ldflags)
            .arg("-o")
            .arg(&bin)
            .arg(self.main)
            .current_dir(&dir);
        println!(
            "[setup] {name}: building {}@{version} into {} ({} the first time)",
            self.module,
            bin.display(),
            self.first_build
        );
        let started = Instant::now();
        stream(build, &hint)?;
        mark_built(&bin)?;
        println!(
            "[setup] {name}: built in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
