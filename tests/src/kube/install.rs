//! The mesh installed as users install it: `helm install` of the chart (`deploy/chart`) on the
//! real control plane, whose `DaemonSet` and CA `Deployment` the testbed kubelets run (image
//! `mesh-agent` → this repository's binary). The agents are pods here, not test processes: their
//! logs are their containers' ([`KubeMesh::agent_logs`]).
//!
//! The chart's host paths point into each node's own file system ([`NodeView`]): one
//! `DaemonSet` names the same paths on every node, which lead to each node's CNI directories,
//! hand-over socket and kubepods cgroup. bpffs is the machine's, below the testbed's directory
//! (the agents pin under `<it>/mesh-agent/<node>`).

use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{api::ListParams, Api};

use super::{
    chart_dir, eventually, helm_binary,
    kubelet::NodeView,
    mesh::{KubeMesh, WAIT},
    Error, Kubelet, KubeletOptions, Result, AGENT_NAMESPACE, RELEASE,
};
use crate::{agent::binary, Testbed};

/// How long `helm install`, `upgrade` and `uninstall` may wait for the rollout.
pub const HELM_TIMEOUT: &str = "240s";

/// The agent pods' label (the chart's `app.kubernetes.io/name`).
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=mesh-agent";

/// The chart values that fit the testbed: host paths in each node's own file system, bpffs
/// below the testbed's directory.
pub fn testbed_values(tb: &Testbed) -> Vec<(String, String)> {
    let root = NodeView::root_in(tb.scratch_dir());
    let at = |p: &str| root.join(p).display().to_string();
    vec![
        ("cni.confDir".into(), at("cni/net.d")),
        ("cni.binDir".into(), at("cni/bin")),
        ("host.run".into(), at("run/mesh")),
        ("host.cgroup".into(), at("cgroup")),
        ("host.bpffs".into(), tb.bpffs_dir().display().to_string()),
    ]
}

impl KubeMesh {
    /// The control plane, `nodes` nodes with their kubelets (the CNI chain is the testbed's
    /// veth plugin only: the chart's installer adds `mesh-cni`), `namespace` (labelled for the
    /// mesh if `meshed`), and the chart installed with the testbed's values and `values`
    /// (`--wait`: every agent and the CA ready).
    pub fn install(
        nodes: usize,
        namespace: &str,
        meshed: bool,
        values: &[(&str, &str)],
    ) -> Result<Self> {
        Self::install_with(nodes, namespace, meshed, values, |_| {})
    }

    /// [`Self::install`] with the kubelets' options changed by `adjust` (more images).
    pub fn install_with(
        nodes: usize,
        namespace: &str,
        meshed: bool,
        values: &[(&str, &str)],
        adjust: impl FnOnce(&mut KubeletOptions),
    ) -> Result<Self> {
        let mesh = Self::cluster(nodes, namespace, meshed, &[], adjust)?;
        mesh.helm_release("install", values)?;
        Ok(mesh)
    }

    /// [`Self::install`] before `helm install`: nodes registered with the `NoSchedule` taints
    /// `taints` (kubelet's `--register-with-taints`).
    pub fn without_mesh(
        nodes: usize,
        namespace: &str,
        meshed: bool,
        taints: &[&str],
    ) -> Result<Self> {
        Self::cluster(nodes, namespace, meshed, taints, |_| {})
    }

    fn cluster(
        nodes: usize,
        namespace: &str,
        meshed: bool,
        taints: &[&str],
        adjust: impl FnOnce(&mut KubeletOptions),
    ) -> Result<Self> {
        let (mut cp, tb) = super::mesh::control_plane_and_testbed(nodes)?;
        // Pods resolve names with the cluster DNS, as on a real cluster (`CoreDNS`).
        let mut options = KubeletOptions {
            mesh_cni: false,
            images: [("mesh-agent".to_owned(), binary("mesh-agent", "mesh-agent")?)].into(),
            register_with_taints: taints.iter().map(|t| (*t).to_owned()).collect(),
            cluster_dns: Some(super::dns::CLUSTER_DNS_IP.into()),
            ..KubeletOptions::default()
        };
        adjust(&mut options);
        let kubelets = Kubelet::start_all(&cp, &tb, &options)?;
        let dns = cp.serve_dns_on(tb.nodes())?;
        super::mesh::create_namespace(&mut cp, namespace, meshed)?;
        Ok(Self {
            kubelets,
            agents: Vec::new(),
            options: Vec::new(),
            tb,
            cp,
            namespace: namespace.to_owned(),
            dns: Some(dns),
        })
    }

    /// `helm install` or `helm upgrade` (`--reuse-values`) of the chart with the testbed's
    /// values and `values`, waiting for the rollout.
    pub fn helm_release(&self, verb: &str, values: &[(&str, &str)]) -> Result<String> {
        let chart = chart_dir().display().to_string();
        let mut args: Vec<String> = vec![
            verb.into(),
            RELEASE.into(),
            chart,
            "--namespace".into(),
            AGENT_NAMESPACE.into(),
            "--wait".into(),
            "--timeout".into(),
            HELM_TIMEOUT.into(),
        ];
        match verb {
            "install" => args.push("--create-namespace".into()),
            _ => args.push("--reuse-values".into()),
        }
        let owned: Vec<(String, String)> = values
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        for (key, value) in testbed_values(&self.tb).into_iter().chain(owned) {
            args.push("--set".into());
            args.push(format!("{key}={value}"));
        }
        self.helm(&args)
    }

    /// Runs `helm` with `args` as the cluster's admin; its output, or an error with its
    /// output and the agents' last lines.
    pub fn helm(&self, args: &[String]) -> Result<String> {
        let helm = helm_binary()?;
        let out = Command::new(&helm)
            .args(args)
            .arg("--kubeconfig")
            .arg(self.cp.kubeconfig_path())
            .env("HELM_CACHE_HOME", self.tb.scratch_dir().join("helm/cache"))
            .env(
                "HELM_CONFIG_HOME",
                self.tb.scratch_dir().join("helm/config"),
            )
            .env("HELM_DATA_HOME", self.tb.scratch_dir().join("helm/data"))
            .output()
            .map_err(|e| Error::Setup(format!("running {}: {e}", helm.display())))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            return Ok(text);
        }
        let mut detail = format!("{}\n{text}", out.status);
        for (i, kubelet) in self.kubelets.iter().enumerate() {
            for pod in kubelet
                .pods()
                .into_iter()
                .filter(|p| p.namespace == AGENT_NAMESPACE)
            {
                for c in &pod.containers {
                    let lines = kubelet.logs(&pod.namespace, &pod.name, &c.name);
                    let tail = &lines[lines.len().saturating_sub(15)..];
                    let _ = write!(
                        detail,
                        "\n--- node {i} {}/{} last lines:\n{}",
                        pod.name,
                        c.name,
                        tail.join("\n")
                    );
                }
            }
        }
        Err(Error::Invalid {
            what: format!("helm {}", args.first().map_or("", String::as_str)),
            detail,
        })
    }

    /// The agent pods (the chart's `DaemonSet`), with their node.
    pub fn agent_pods(&self) -> Result<Vec<Pod>> {
        let api: Api<Pod> = Api::namespaced(self.cp.client(), AGENT_NAMESPACE);
        self.cp
            .block_on(api.list(&ListParams::default().labels(AGENT_SELECTOR)))
            .map(|l| l.items)
            .map_err(|source| Error::Api {
                what: "listing the agent pods".into(),
                source,
            })
    }

    /// The name of the agent pod on node `index` now (waits for one to run there).
    pub fn agent_pod(&self, index: usize) -> Result<String> {
        let kubelet = &self.kubelets[index];
        self.cp.block_on(eventually(
            &format!("an agent pod running on {}", kubelet.node_name()),
            WAIT,
            || async {
                kubelet
                    .pods()
                    .into_iter()
                    .find(|p| {
                        p.namespace == AGENT_NAMESPACE
                            && p.name.starts_with("mesh-agent-")
                            && p.containers.iter().all(|c| c.running)
                    })
                    .map(|p| p.name)
            },
        ))
    }

    /// What the `agent` container of agent pod `pod` on node `index` printed (kept after the
    /// pod is gone).
    pub fn agent_logs(&self, index: usize, pod: &str) -> Vec<String> {
        self.kubelets[index].logs(AGENT_NAMESPACE, pod, "agent")
    }

    /// Waits until no pod of the chart is left on any node.
    pub fn wait_chart_pods_gone(&self, timeout: Duration) -> Result<()> {
        self.cp
            .block_on(eventually("the chart's pods gone", timeout, || async {
                self.kubelets
                    .iter()
                    .all(|k| k.pods().iter().all(|p| p.namespace != AGENT_NAMESPACE))
                    .then_some(())
            }))
    }
}

/// Whether the CNI configuration in `conf_dir` names `mesh-cni` (any `*.conflist`).
pub fn conflist_names_mesh_cni(conf_dir: &Path) -> bool {
    std::fs::read_dir(conf_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "conflist"))
        .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|text| text.contains("\"mesh-cni\"")))
}
