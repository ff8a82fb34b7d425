//! The Gateway API mesh conformance suite (GAMMA) against the mesh: the upstream suite's test
//! binary (`tests/gamma`, built by `cargo xtask setup`) run on the testbed's cluster, with its
//! scenario manifests as the `sigs.k8s.io/gateway-api/conformance` module embeds them (nothing
//! of it is copied here).
//!
//! What the cluster gives the suite: the image it deploys, `echo-advanced` (Istio's echo), is
//! `mesh-probe` under that image's names ([`istio_echo_image`]); the pods resolve Service names
//! through the testbed's cluster DNS; its `pods/exec` runs in the testbed kubelets' containers
//! (see `tests/gamma/gamma_test.go`). Its namespaces are put in the mesh by the labels it is
//! told to set on them, with a waypoint per service account ([`SUITE_NAMESPACE_LABELS`]).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{json, Value};

use super::{gamma_binary, Error, Result};
use crate::agent::binary;

/// The features the mesh claims, besides the profiles' core (`Mesh`, `HTTPRoute`, `GRPCRoute`):
/// every mesh extended feature of the MESH-HTTP and MESH-GRPC profiles, and the `HTTPRoute`
/// features the mesh scenarios use.
pub const SUPPORTED_FEATURES: &[&str] = &[
    "Mesh",
    "HTTPRoute",
    "GRPCRoute",
    "MeshClusterIPMatching",
    "MeshConsumerRoute",
    "MeshHTTPRouteRewritePath",
    "MeshHTTPRouteSchemeRedirect",
    "MeshHTTPRouteRedirectPort",
    "MeshHTTPRouteRedirectPath",
    "MeshHTTPRouteBackendRequestHeaderModification",
    "MeshHTTPRouteQueryParamMatching",
    "MeshHTTPRouteNamedRouteRule",
    "HTTPRouteResponseHeaderModification",
    "HTTPRouteParentRefPort",
    "HTTPRoute303RedirectStatusCode",
    "HTTPRoute307RedirectStatusCode",
    "HTTPRoute308RedirectStatusCode",
];

/// The labels the suite sets on the namespaces it creates: enrolled in the mesh (Istio
/// ambient's label), and a waypoint for each service account (the mesh's own label), so every
/// Service of the suite is routed by a waypoint running under its workloads' account.
pub const SUITE_NAMESPACE_LABELS: &[(&str, &str)] = &[
    (super::mesh::MESH_LABEL, "ambient"),
    ("mesh.local/waypoint", "per-service-account"),
];

/// The image table entry of `echo-advanced`: a directory (next to `mesh-probe`) holding
/// `server` (the image's entry point) and `client` (what the suite execs), both `mesh-probe`,
/// which acts by the name it is run under. Returns the entry point.
pub fn istio_echo_image() -> Result<PathBuf> {
    let probe = binary("mesh-probe", "mesh-tests")?;
    let dir = probe
        .parent()
        .map_or_else(|| PathBuf::from("images"), |d| d.join("images"))
        .join("echo-advanced");
    std::fs::create_dir_all(&dir).map_err(crate::io_err(format!("creating {}", dir.display())))?;
    for name in ["server", "client"] {
        let link = dir.join(name);
        if std::fs::read_link(&link).is_ok_and(|target| target == probe) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&probe, &link).map_err(crate::io_err(format!(
            "linking {} to {}",
            link.display(),
            probe.display()
        )))?;
    }
    Ok(dir.join("server"))
}

/// The suite's options (its `-conformance-options-file`), reporting to `report`.
pub fn options(report: &Path) -> Value {
    let labels: serde_json::Map<String, Value> = SUITE_NAMESPACE_LABELS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    json!({
        "conformanceProfiles": ["MESH-HTTP", "MESH-GRPC"],
        "supportedFeatures": SUPPORTED_FEATURES,
        "namespaceLabels": labels,
        "cleanupBaseResources": true,
        "cleanupTestResources": true,
        "reportOutputPath": report.display().to_string(),
        "mode": "default",
        "implementation": {
            "organization": "mesh.local",
            "project": "mesh",
            "url": "https://mesh.local/mesh",
            "version": env!("CARGO_PKG_VERSION"),
            "contact": ["@mesh-maintainers"],
        },
    })
}

/// How the suite ended.
#[derive(Debug)]
pub struct SuiteRun {
    /// The test binary succeeded.
    pub passed: bool,
    /// Its report (`ConformanceReport`), if it wrote one.
    pub report: Option<Value>,
    /// The `--- PASS`/`--- FAIL`/`--- SKIP` lines of the scenarios, in order.
    pub results: Vec<String>,
    /// Its whole output.
    pub log: PathBuf,
}

/// Where the suite's options, output and report are kept after the run (they outlive the
/// testbed): `target/conformance`.
pub fn results_dir() -> Result<PathBuf> {
    let binary = gamma_binary()?;
    // target/kube/bin/gamma-conformance → target/conformance
    let target = binary
        .ancestors()
        .nth(3)
        .ok_or_else(|| Error::Setup(format!("no target directory above {}", binary.display())))?;
    let dir = target.join("conformance");
    std::fs::create_dir_all(&dir).map_err(crate::io_err(format!("creating {}", dir.display())))?;
    Ok(dir)
}

/// Runs the suite against the cluster of `kubeconfig`, whose kubelets describe their
/// containers in `exec_dirs`; its files go to `dir`.
pub fn run_suite(kubeconfig: &Path, exec_dirs: &[PathBuf], dir: &Path) -> Result<SuiteRun> {
    let binary = gamma_binary()?;
    let report = dir.join("conformance-report.yaml");
    let options_file = dir.join("conformance-options.json");
    let write = |path: &Path, body: String| {
        std::fs::write(path, body).map_err(crate::io_err(format!("writing {}", path.display())))
    };
    write(&options_file, options(&report).to_string())?;
    let log = dir.join("conformance.log");
    let out = std::fs::File::create(&log)
        .map_err(crate::io_err(format!("creating {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(crate::io_err("duplicating the log's descriptor"))?;
    let dirs: Vec<String> = exec_dirs.iter().map(|d| d.display().to_string()).collect();
    let status = Command::new(&binary)
        .arg("-test.v")
        .arg("-test.timeout=40m")
        .arg(format!(
            "-conformance-options-file={}",
            options_file.display()
        ))
        .arg(format!("-exec-state={}", dirs.join(",")))
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(crate::io_err(format!("running {}", binary.display())))?;
    let text = std::fs::read_to_string(&log)
        .map_err(crate::io_err(format!("reading {}", log.display())))?;
    let results = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("--- "))
        .map(str::to_owned)
        .collect();
    let report = match std::fs::read_to_string(&report) {
        Ok(body) => Some(serde_yaml::from_str(&body).map_err(|e| Error::Invalid {
            what: format!("the conformance report {}", report.display()),
            detail: e.to_string(),
        })?),
        Err(_) => None,
    };
    Ok(SuiteRun {
        passed: status.success(),
        report,
        results,
        log,
    })
}

/// One line per profile of `report`: its name, core and extended results with their counts.
pub fn summary(report: &Value) -> String {
    let mut out = String::new();
    for profile in report["profiles"].as_array().into_iter().flatten() {
        let part = |p: &Value| {
            if p.is_null() {
                return "none at this release".to_owned();
            }
            let s = &p["statistics"];
            format!(
                "{} (passed {}, skipped {}, failed {})",
                p["result"].as_str().unwrap_or("?"),
                s["Passed"],
                s["Skipped"],
                s["Failed"]
            )
        };
        let _ = writeln!(
            out,
            "{}: core {}; extended {}",
            profile["name"].as_str().unwrap_or("?"),
            part(&profile["core"]),
            part(&profile["extended"])
        );
    }
    out
}
