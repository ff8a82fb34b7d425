//! [`ControlPlane`]: starting, waiting on, using and tearing down the four processes.

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{atomic::AtomicUsize, Mutex},
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{Api, Client};
use tokio::runtime::Runtime;

use super::{
    components::{self, Component, Files, Ports},
    crds, forward, kubeconfig,
    pki::Pki,
    scratch::Scratch,
    Credentials, Error, Result,
};
use crate::Process;

/// How long the API server may take to answer `/readyz` with `ok`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the controller manager and scheduler, the default service account and the CRDs
/// may each take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped component gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running control plane. Dropping it (also during a panic) stops every process and removes
/// its cgroup and files; [`ControlPlane::teardown`] does the same and reports problems.
pub struct ControlPlane {
    pub(super) processes: [Option<Process>; 4],
    pub(super) forwarders: Mutex<Vec<forward::Forwarder>>,
    pub(super) admin: Client,
    /// Runs the clients' connections and the forwarders, on threads of the root namespace.
    pub(super) runtime: Option<Runtime>,
    pub(super) binary: PathBuf,
    pub(super) ports: Ports,
    pub(super) files: Files,
    pub(super) pki: Pki,
    pub(super) admin_kubeconfig: PathBuf,
    pub(super) crds: Vec<String>,
    pub(super) next_file: AtomicUsize,
    /// Dropped last: removes the cgroup (killing what is left in it) and the files.
    pub(super) scratch: Scratch,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("id", &self.scratch.id)
            .field("ports", &self.ports)
            .field("processes", &self.processes)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts etcd, the API server, the controller manager and the scheduler, installs the
    /// upstream CRDs and returns once all of them work: `/readyz` and both `/healthz` say
    /// `ok`, the `default` service account exists (the controller manager's controllers run)
    /// and every CRD is Established. A component that exits, or a step that times out, fails
    /// with the reason and that component's last output lines. Removes leftovers of killed
    /// earlier runs first. It blocks the calling thread (also inside an async runtime's task).
    pub fn start() -> Result<Self> {
        let started = Instant::now();
        let host = crate::host::require_privileges()?;
        crate::sweep_stale()?;
        let binary = super::binary()?;
        let scratch = Scratch::create(host)?;
        let pki = Pki::new(&scratch.dir.join("pki"))?;
        let ports = Ports::pick()?;
        let (sa_private, sa_public) = pki.service_account_keys()?;
        let files = Files {
            ca_cert: pki.ca_cert(),
            ca_key: pki.ca_key(),
            etcd: pki.etcd()?,
            etcd_data: scratch.dir.join("etcd"),
            apiserver: pki.apiserver(components::KUBERNETES_SERVICE_IP.into())?,
            apiserver_etcd_client: pki.client(
                "apiserver-etcd-client",
                "kube-apiserver-etcd-client",
                None,
            )?,
            apiserver_kubelet_client: pki.client(
                "apiserver-kubelet-client",
                "kube-apiserver-kubelet-client",
                Some("system:masters"),
            )?,
            front_proxy_ca_cert: pki.front_proxy_ca_cert(),
            front_proxy_client: pki.front_proxy_client()?,
            components_serving: pki.component_serving()?,
            sa_private,
            sa_public,
            controller_manager_kubeconfig: kubeconfig::file_in(&scratch.dir, "controller-manager"),
            scheduler_kubeconfig: kubeconfig::file_in(&scratch.dir, "scheduler"),
        };
        let apiserver = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.apiserver));
        let identities = [
            ("admin", "kubernetes-admin", Some("system:masters")),
            ("controller-manager", "system:kube-controller-manager", None),
            ("scheduler", "system:kube-scheduler", None),
        ];
        for (name, user, group) in identities {
            let creds = Credentials::ClientCert(pki.client(name, user, group)?);
            let path = kubeconfig::file_in(&scratch.dir, name);
            kubeconfig::write(&path, apiserver, &files.ca_cert, &creds)?;
        }
        let admin_kubeconfig = kubeconfig::file_in(&scratch.dir, "admin");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kcp-runtime")
            .enable_all()
            .build()
            .map_err(crate::io_err("starting the control plane's tokio runtime"))?;
        // kube's rustls setup needs a process-wide provider: the workspace enables two.
        let _ = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
        let admin = match block_on(&runtime, kubeconfig::client(&admin_kubeconfig)) {
            Ok(admin) => admin,
            Err(e) => {
                // Never a blocking drop: the caller may be a runtime's task.
                runtime.shutdown_background();
                return Err(e);
            }
        };
        let mut cp = Self {
            processes: [None, None, None, None],
            forwarders: Mutex::new(Vec::new()),
            admin,
            runtime: Some(runtime),
            binary,
            ports,
            files,
            pki,
            admin_kubeconfig,
            crds: Vec::new(),
            next_file: AtomicUsize::new(0),
            scratch,
        };
        // On an error `cp` is dropped here, which stops whatever started.
        cp.spawn(Component::Etcd)?;
        cp.start_apiserver()?;
        for component in [Component::ControllerManager, Component::Scheduler] {
            cp.spawn(component)?;
        }
        for component in [Component::ControllerManager, Component::Scheduler] {
            cp.wait_healthz(component)?;
        }
        cp.wait_service_account("default", "default", STEP_TIMEOUT)?;
        let files = crds::manifest_files(&super::go_module_dir())?;
        let admin = cp.admin.clone();
        cp.crds = cp.block_on(crds::apply(&admin, &files))?;
        cp.block_on(crds::wait_established(&admin, &cp.crds, STEP_TIMEOUT))?;
        eprintln!(
            "control plane {}: ready in {:.1}s (API server https://{apiserver}, {} CRDs)",
            cp.scratch.id,
            started.elapsed().as_secs_f64(),
            cp.crds.len()
        );
        Ok(cp)
    }

    /// The id in the names of its cgroup and directory (`mtb-<pid>-<seq>`).
    pub fn id(&self) -> &str {
        &self.scratch.id
    }

    /// Its directory (certificates, kubeconfigs, etcd's data), removed with it.
    pub fn dir(&self) -> &Path {
        &self.scratch.dir
    }

    /// Its cgroup: every component runs in a leaf cgroup below it.
    pub fn cgroup_dir(&self) -> &Path {
        &self.scratch.cgroup_dir
    }

    /// The API server's address on the root namespace's loopback.
    pub fn apiserver_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.apiserver))
    }

    /// The ports every component listens on.
    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// The CA certificate (PEM file) that signed every certificate of this control plane.
    pub fn ca_cert(&self) -> &Path {
        &self.files.ca_cert
    }

    /// The admin's kubeconfig (`system:masters`), for `kubectl --kubeconfig`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// A client acting as the admin (`system:masters`). It may be used from any runtime.
    pub fn client(&self) -> Client {
        self.admin.clone()
    }

    /// Names of the CRDs installed at start (all Established).
    pub fn crds(&self) -> &[String] {
        &self.crds
    }

    /// Stops the API server (SIGTERM, then SIGKILL after 10 s); etcd and the other components
    /// keep running, as when an API server goes away in a real cluster.
    pub fn stop_apiserver(&mut self) -> Result<()> {
        if let Some(mut process) = self.processes[Component::ApiServer.index()].take() {
            process.terminate(STOP_GRACE)?;
        }
        Ok(())
    }

    /// Starts the API server (again) on the same port with the same flags, and waits until
    /// `/readyz` says `ok`.
    pub fn start_apiserver(&mut self) -> Result<()> {
        self.stop_apiserver()?;
        self.spawn(Component::ApiServer)?;
        self.wait_ready(READY_TIMEOUT)
    }

    /// Waits until the API server's `/readyz` answers `ok`, failing early if a component exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let admin = self.admin.clone();
        self.wait_until(Component::ApiServer, "/readyz to say ok", timeout, || {
            kubeconfig::healthy(&admin, "/readyz")
        })
    }

    /// Waits until service account `namespace/name` exists (the controller manager creates
    /// `default` in every namespace; pods cannot be created in a namespace before it).
    pub fn wait_service_account(
        &mut self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<()> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let what = format!("service account {namespace}/{name}");
        self.wait_until(Component::ControllerManager, &what, timeout, || async {
            match api.get_opt(name).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err("not created yet".to_owned()),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    /// The last lines `component` printed (empty when it is not running).
    pub fn tail(&self, component: Component) -> String {
        self.processes[component.index()]
            .as_ref()
            .map(Process::tail)
            .unwrap_or_default()
    }

    /// Runs `future` to completion on the control plane's runtime, from any thread (also from
    /// inside another runtime's task: it blocks that thread, not a runtime's).
    pub fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        block_on(self.runtime(), future)
    }

    /// Stops everything and removes the cgroup and files, reporting the first problem
    /// (dropping does the same but can only print problems).
    pub fn teardown(mut self) -> Result<()> {
        self.stop_all();
        self.scratch.remove()
    }

    pub(super) fn runtime(&self) -> &Runtime {
        self.runtime
            .as_ref()
            .expect("runtime present until teardown")
    }

    fn spawn(&mut self, component: Component) -> Result<()> {
        let args = components::args(component, &self.ports, &self.files);
        let process = components::spawn(&self.binary, &self.scratch.cgroup_dir, component, &args)?;
        self.processes[component.index()] = Some(process);
        Ok(())
    }

    fn wait_healthz(&mut self, component: Component) -> Result<()> {
        let port = match component {
            Component::ControllerManager => self.ports.controller_manager,
            Component::Scheduler => self.ports.scheduler,
            Component::Etcd | Component::ApiServer => unreachable!("waited on otherwise"),
        };
        let client = {
            let _entered = self.runtime().enter();
            kubeconfig::anonymous_client(&components::loopback_url(port), self.pki.ca_der())?
        };
        self.wait_until(component, "/healthz to say ok", STEP_TIMEOUT, || {
            kubeconfig::healthy(&client, "/healthz")
        })
    }

    /// Polls `check` every 200 ms until it succeeds. Fails when any component exits (with its
    /// output) or at `timeout` (with the last answer and `component`'s output).
    fn wait_until<F, Fut>(
        &mut self,
        component: Component,
        what: &str,
        timeout: Duration,
        check: F,
    ) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), String>> + Send,
    {
        let deadline = Instant::now() + timeout;
        let doing = format!("waiting for {} {what}", component.name());
        loop {
            for c in Component::ALL {
                let Some(process) = self.processes[c.index()].as_mut() else {
                    continue;
                };
                if let Some(status) = process.try_status()? {
                    // Let the output readers catch up with what it printed last.
                    let _ = process.wait(Duration::from_secs(2));
                    return Err(Error::Exited {
                        component: c.name(),
                        status: status.to_string(),
                        doing,
                        output: process.tail(),
                    });
                }
            }
            let last = match self.block_on(check()) {
                Ok(()) => return Ok(()),
                Err(last) => last,
            };
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{} {what}", component.name()),
                    after: timeout,
                    detail: format!(
                        "last answer: {last}\n{}'s last output:\n{}",
                        component.name(),
                        self.tail(component)
                    ),
                });
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the forwarders, the runtime and every process (idempotent).
    fn stop_all(&mut self) {
        self.forwarders.lock().expect("forwarders lock").clear();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        for process in self.processes.iter_mut().rev() {
            drop(process.take());
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Runs `future` on `runtime` from a scoped thread of its own, which is never inside a runtime,
/// so this works from any context. A panic in `future` is resumed in the caller.
fn block_on<F>(runtime: &Runtime, future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    let handle = runtime.handle();
    thread::scope(
        |scope| match scope.spawn(move || handle.block_on(future)).join() {
            Ok(output) => output,
            Err(panic) => std::panic::resume_unwind(panic),
        },
    )
}
