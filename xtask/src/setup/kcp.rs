//! Setup step `kubernetes control plane`: builds `mesh-kcp` (etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler in one binary, `tests/kube`) into
//! `target/kube/bin/mesh-kcp` and downloads the Go modules that carry the upstream CRDs, for the
//! privileged tests' real control plane (`mesh_tests::kube`).
//!
//! The build uses the default Go build cache, so it is slow once (Kubernetes is large) and
//! quick afterwards; it runs again only when the binary is missing or older than a file of the
//! Go module.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

use super::{capture, command, find_on_path, stream, Missing, Present, State};

/// The Go module, relative to the workspace root.
const MODULE_DIR: &str = "tests/kube";
/// The modules whose files the tests read: the control plane's release and the CRDs.
const MODULES: &[&str] = &[
    "k8s.io/kubernetes",
    "istio.io/api",
    "sigs.k8s.io/gateway-api",
];
/// How often a long build says it is still going.
const HEARTBEAT: Duration = Duration::from_secs(60);

fn binary(root: &Path) -> PathBuf {
    root.join(mesh_tests::kube::BINARY_PATH)
}

/// The Go module's files the binary depends on: go.mod, go.sum and every `.go` file.
fn sources(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name == "go.mod" || name == "go.sum" || p.extension().is_some_and(|e| e == "go")
        })
        .collect();
    files.sort();
    Ok(files)
}

fn modified(path: &Path) -> Result<SystemTime> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    meta.modified()
        .with_context(|| format!("reading the time {} was modified", path.display()))
}

/// `path@version` of each of [`MODULES`], or what is missing: a module not in the module
/// cache has no `Dir` in `go list -m -json`.
fn modules(root: &Path) -> Result<Result<Vec<String>, String>> {
    let mut list = command(&["go", "list", "-m", "-json"]);
    list.args(MODULES).current_dir(root.join(MODULE_DIR));
    let out = capture(list, "check tests/kube/go.mod and that Go can read it")?;
    let mut found = Vec::new();
    for module in serde_json::Deserializer::from_str(&out).into_iter::<serde_json::Value>() {
        let module = module.context("parsing `go list -m -json` output")?;
        let name = format!(
            "{}@{}",
            module["Path"].as_str().unwrap_or_default(),
            module["Version"].as_str().unwrap_or_default()
        );
        if module["Dir"].as_str().is_none() {
            return Ok(Err(format!("{name} is not in the Go module cache")));
        }
        found.push(name);
    }
    Ok(Ok(found))
}

/// Strip symbols and debug information (a third of the size), and stamp the release into the
/// version packages as Kubernetes' own build does, so `/version` reports it rather than
/// `v0.0.0-master`.
fn ldflags(kubernetes: &str) -> String {
    let mut flags = vec!["-s".to_owned(), "-w".to_owned()];
    let mut parts = kubernetes.trim_start_matches('v').split('.');
    let (major, minor) = (parts.next().unwrap_or("0"), parts.next().unwrap_or("0"));
    for package in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        for (name, value) in [
            ("gitVersion", kubernetes),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        ] {
            flags.push(format!("-X {package}.{name}={value}"));
        }
    }
    flags.join(" ")
}

/// Why `bin`, built from the Go module in `dir`, must be built (again): no `go`, no binary, or
/// a file of the module newer than it. `None` when it is up to date.
pub(super) fn stale(bin: &Path, dir: &Path) -> Result<Option<String>> {
    if find_on_path("go").is_none() {
        return Ok(Some("`go` is not on PATH".to_owned()));
    }
    if !bin.is_file() {
        return Ok(Some(format!("no {}", bin.display())));
    }
    let built = modified(bin)?;
    for source in sources(dir)? {
        if modified(&source)? > built {
            let (source, bin) = (source.display(), bin.display());
            return Ok(Some(format!("{source} is newer than {bin}")));
        }
    }
    Ok(None)
}

/// `go build` leaves an up-to-date binary untouched: marks it as built now, so [`stale`]
/// compares the module's files against this build.
pub(super) fn mark_built(bin: &Path) -> Result<()> {
    let file = fs::File::options().write(true).open(bin);
    let file = file.with_context(|| format!("opening {}", bin.display()))?;
    file.set_modified(SystemTime::now())
        .with_context(|| format!("touching {}", bin.display()))
}

pub(super) fn check(root: &Path) -> Result<State> {
    let bin = binary(root);
    if let Some(why) = stale(&bin, &root.join(MODULE_DIR))? {
        return Ok(Missing(why));
    }
    Ok(match modules(root)? {
        Ok(found) => Present(format!("{}; {}", bin.display(), found.join(", "))),
        Err(missing) => Missing(missing),
    })
}

pub(super) fn install(root: &Path) -> Result<()> {
    let hint_go = "install Go 1.26 or newer and put it on PATH";
    let version = capture(command(&["go", "version"]), hint_go)?;
    println!("[setup] kubernetes control plane: {}", version.trim());
    let dir = root.join(MODULE_DIR);
    let hint = "check that the Go module proxy is reachable (GOPROXY) and that tests/kube/go.mod \
                and go.sum are intact; the command can be rerun by hand in tests/kube";
    let mut download = command(&["go", "mod", "download"]);
    download.args(MODULES).current_dir(&dir);
    stream(download, hint)?;

    let kubernetes = match modules(root)? {
        Ok(found) => found
            .into_iter()
            .find_map(|m| m.strip_prefix("k8s.io/kubernetes@").map(str::to_owned)),
        Err(missing) => anyhow::bail!("after `go mod download`: {missing}\nwhat to do: {hint}"),
    };
    let kubernetes = kubernetes.context("tests/kube/go.mod does not require k8s.io/kubernetes")?;
    let bin = binary(root);
    let out_dir = bin.parent().context("the binary's directory")?;
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut build = command(&["go", "build", "-trimpath", "-buildvcs=false"]);
    build
        .arg(format!("-ldflags={}", ldflags(&kubernetes)))
        .arg("-o")
        .arg(&bin)
        .arg(".")
        .current_dir(&dir);
    println!(
        "[setup] kubernetes control plane: building {} with the Go build cache: about 10 \
         minutes on 2 cores the first time, well under a minute after",
        bin.display()
    );
    let started = Instant::now();
    let (done, ticks) = mpsc::channel::<()>();
    let heartbeat = thread::spawn(move || {
        while let Err(mpsc::RecvTimeoutError::Timeout) = ticks.recv_timeout(HEARTBEAT) {
            let secs = started.elapsed().as_secs();
            println!("[setup] kubernetes control plane: still building ({secs}s)");
        }
    });
    let outcome = stream(build, hint);
    drop(done);
    let _ = heartbeat.join();
    outcome?;
    mark_built(&bin)?;
    let secs = started.elapsed().as_secs_f64();
    println!("[setup] kubernetes control plane: built in {secs:.1}s");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ldflags_stamp_the_release() {
        let flags = super::ldflags("v1.37.2");
        assert!(flags.starts_with("-s -w "), "{flags}");
        assert!(flags.contains("-X k8s.io/component-base/version.gitVersion=v1.37.2"));
        assert!(flags.contains("-X k8s.io/component-base/version.gitMinor=37"));
        assert!(flags.contains("-X k8s.io/client-go/pkg/version.gitMajor=1"));
    }
}
