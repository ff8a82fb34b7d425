//! A meshed testbed: the testbed, its config directory (namespaces and pods written as
//! Kubernetes objects) and one agent per node, each waited on until it has enrolled its pods.

use crate::{
    agent::AgentOptions,
    cluster::{ClusterFiles, SHORTCUT},
    Agent, Pod, Result, Testbed, TestbedSpec,
};

/// Namespace labelled for the mesh.
pub const NS: &str = "mesh";
/// Namespace without the label.
pub const PLAIN_NS: &str = "plain";

/// How a mesh offers the `sk_msg` short-cut to its pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortcut {
    /// The agents run with `--no-sockmap`: every leg takes the TCP path.
    Off,
    /// The agents' default: the short-cut is available, but no pod opted in.
    Default,
    /// The meshed namespace opts in (`mesh.local/sockmap-shortcut: enabled`).
    OptedIn,
}

/// A testbed with its config directory and one agent per node.
#[derive(Debug)]
pub struct Mesh {
    pub agents: Vec<Agent>,
    pub files: ClusterFiles,
    pub options: AgentOptions,
    /// Pods `(node, index)` placed in [`PLAIN_NS`].
    pub unmeshed: Vec<(usize, usize)>,
    /// Dropped last: the agents and files go first.
    pub tb: Testbed,
}

impl Mesh {
    /// Builds it all. Pods listed in `unmeshed` go to the unlabelled namespace.
    pub fn new(spec: TestbedSpec, shortcut: Shortcut, unmeshed: &[(usize, usize)]) -> Result<Self> {
        Self::new_with(spec, shortcut, unmeshed, |_| Vec::new())
    }

    /// [`Self::new`], with more arguments for every agent, chosen once the testbed exists (a
    /// collector in one of its pods).
    pub fn new_with(
        spec: TestbedSpec,
        shortcut: Shortcut,
        unmeshed: &[(usize, usize)],
        agent_args: impl FnOnce(&Testbed) -> Vec<String>,
    ) -> Result<Self> {
        let tb = Testbed::new(spec)?;
        let extra_args = agent_args(&tb);
        let files = ClusterFiles::new(tb.scratch_dir().join("config"))?;
        let annotations: &[(&str, &str)] = match shortcut {
            Shortcut::OptedIn => &[(SHORTCUT, "enabled")],
            Shortcut::Off | Shortcut::Default => &[],
        };
        files.namespace_with(NS, true, annotations)?;
        files.namespace(PLAIN_NS, false)?;
        for node in tb.nodes() {
            for (j, pod) in node.pods.iter().enumerate() {
                let ns = if unmeshed.contains(&(node.index, j)) {
                    PLAIN_NS
                } else {
                    NS
                };
                files.pod(pod, &node.name, ns, &[])?;
            }
        }
        let options = AgentOptions {
            config_dir: files.dir().to_path_buf(),
            kubeconfig: None,
            kubepods_cgroup: None,
            sockmap: shortcut != Shortcut::Off,
            keep_pins: false,
            extra_args,
            log: crate::agent::TEST_LOG.into(),
        };
        let mut mesh = Self {
            agents: Vec::new(),
            files,
            options,
            unmeshed: unmeshed.to_vec(),
            tb,
        };
        for i in 0..spec.nodes {
            let agent = mesh.start_agent(i)?;
            mesh.agents.push(agent);
        }
        Ok(mesh)
    }

    /// `nodes` nodes of `pods_per_node` pods, all meshed.
    pub fn of(nodes: usize, pods_per_node: usize, shortcut: Shortcut) -> Result<Self> {
        let spec = TestbedSpec {
            nodes,
            pods_per_node,
        };
        Self::new(spec, shortcut, &[])
    }

    /// Starts an agent on node `node` and waits until it has enrolled the node's meshed pods.
    pub fn start_agent(&self, node: usize) -> Result<Agent> {
        let mut agent = Agent::start(self.tb.node(node), &self.options)?;
        for (j, pod) in self.tb.node(node).pods.iter().enumerate() {
            if !self.unmeshed.contains(&(node, j)) {
                agent.wait_enrolled(&format!("{NS}/{}", pod.name), 0)?;
            }
        }
        Ok(agent)
    }

    pub fn pod(&self, node: usize, j: usize) -> &Pod {
        self.tb.pod(node, j)
    }
}
