//! Privileged: the mesh's CA (`mesh-agent ca`) against a real Kubernetes API server
//! (`mesh_tests::kube::ControlPlane`), with the chart's RBAC for it and a token of its own
//! `ServiceAccount`, called as the agents call it (`mesh_ca::IstioCaClient`, Istio's certificate
//! API over TLS, the server verified by its Service's DNS name against the root it publishes).
//!
//! Proven here: a node agent's token (bound to its Pod on node-a, audience `istio-ca`) gets a
//! certificate for an identity with a pod on node-a: exactly that SPIFFE id, not a CA, its
//! lifetime capped by `--max-cert-lifetime`, chaining to the root of the published `ConfigMap`.
//! Refused, each with the one opaque answer to the client and its reason in the CA's log (never
//! the token): an identity whose only pod is on node-b; another `ServiceAccount`'s token asking
//! for someone else's identity; an expired token (signed by the API server's key: the API
//! server itself refuses it); a token for the API server's audience; a CSR naming another
//! identity than the one asked for. Restarted (stopped with SIGTERM, which it obeys at once,
//! then started with an empty state directory, as a new pod), the CA serves the same root
//! (`Secret` and `ConfigMap` unchanged). Killed, it is missed by a `CertManager` only as
//! retries: it keeps serving its certificate, and gets a new one once the CA is back.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use mesh_ca::{server::BAD_CSR, server::REFUSED, IstioCaClient, IstioCaOptions, StaticResolver};
use mesh_identity::{
    CaError, CaFuture, CertManager, CertificateAuthority, CsrRequest, Identity, IssuedChain,
    ManagerOptions, TrustBundle, WorkloadCert, WorkloadKey,
};
use mesh_tests::{
    kube::{register_node, ControlPlane, AGENT_NAMESPACE, CA_AUDIENCE},
    Process,
};
use tokio_rustls::rustls::{
    self,
    pki_types::{CertificateDer, UnixTime},
};

const TD: &str = "cluster.local";
const SHOP: &str = "shop";
const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";
/// The CA's Service, as the chart names it: its certificate must be valid for this name.
const CA_HOST: &str = "mesh-ca.mesh-system.svc";
/// `--max-cert-lifetime` of the CA under test.
const MAX_LIFETIME: Duration = Duration::from_secs(3600);
const WAIT: Duration = Duration::from_secs(60);

fn identity(namespace: &str, account: &str) -> Identity {
    Identity::new(TD, namespace, account).expect("identity")
}

/// A free port on 127.0.0.1 (bound, then released for the CA).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The CA as a process of the `mesh-agent` binary, on 127.0.0.1:`port`.
struct CaProcess {
    process: Process,
}

impl CaProcess {
    /// Starts `mesh-agent ca` with `kubeconfig` and `state_dir`, and waits until it listens
    /// (after its root and trust bundle are in place).
    fn start(kubeconfig: &Path, state_dir: &Path, port: u16) -> Self {
        let binary = mesh_tests::agent::binary("mesh-agent", "mesh-agent").expect("mesh-agent");
        let mut command = Command::new(binary);
        command
            .arg("ca")
            .args(["--namespace", AGENT_NAMESPACE])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--max-cert-lifetime", "1h"])
            .env("RUST_LOG", "info");
        let mut process = Process::spawn("mesh-ca", &mut command).expect("starting the CA");
        process
            .wait_for_line("the CA to listen", WAIT, |l| {
                l.contains("serving Istio's certificate API")
            })
            .expect("the CA listens");
        Self { process }
    }

    /// Waits for a log line from line `from` on holding every one of `parts`.
    fn logged(&mut self, from: usize, parts: &[&str]) -> String {
        self.process
            .wait_for_line_from(from, &format!("a log line with {parts:?}"), WAIT, |l| {
                parts.iter().all(|p| l.contains(p))
            })
            .expect("the CA logs it")
    }

    /// SIGTERM: a graceful shutdown, within a few seconds.
    fn stop(mut self) {
        let status = self
            .process
            .terminate(Duration::from_secs(10))
            .expect("the CA stops");
        assert!(status.success(), "{status}: {}", self.process.tail());
        assert!(
            self.process
                .lines()
                .iter()
                .any(|l| l.contains("shutdown complete")),
            "{}",
            self.process.tail()
        );
    }

    /// SIGKILL: the CA is gone at once.
    fn kill(mut self) {
        self.process
            .signal(nix::sys::signal::Signal::SIGKILL)
            .expect("SIGKILL");
        self.process
            .wait(Duration::from_secs(10))
            .expect("the CA exits");
    }
}

/// A cluster with two nodes, the CA's access, and pods: the agent of node-a, `shop/web` on
/// node-a, `shop/db` only on node-b, and `shop/intruder` on node-a.
struct Cluster {
    cp: ControlPlane,
    dir: PathBuf,
    kubeconfig: PathBuf,
    agent_pod: k8s_openapi::api::core::v1::Pod,
    intruder_pod: k8s_openapi::api::core::v1::Pod,
    runtime: tokio::runtime::Runtime,
}

impl Cluster {
    fn start() -> Self {
        let cp = ControlPlane::start().expect("control plane");
        let client = cp.client();
        for (node, ip) in [(NODE_A, [192, 0, 2, 1]), (NODE_B, [192, 0, 2, 2])] {
            cp.block_on(register_node(&client, node, Ipv4Addr::from(ip).into()))
                .expect("node");
        }
        let dir = cp.dir().join("kube-ca");
        std::fs::create_dir_all(&dir).expect("test directory");
        let kubeconfig = dir.join("ca.kubeconfig");
        cp.ca_kubeconfig(&kubeconfig).expect("the CA's access");
        let agent_pod = cp
            .pod_on_node(
                AGENT_NAMESPACE,
                "mesh-agent-node-a",
                "mesh-agent",
                NODE_A,
                "Running",
            )
            .expect("agent pod");
        cp.pod_on_node(SHOP, "web-1", "web", NODE_A, "Running")
            .expect("web pod");
        cp.pod_on_node(SHOP, "db-1", "db", NODE_B, "Running")
            .expect("db pod");
        let intruder_pod = cp
            .pod_on_node(SHOP, "intruder-1", "intruder", NODE_A, "Running")
            .expect("intruder pod");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        Self {
            cp,
            dir,
            kubeconfig,
            agent_pod,
            intruder_pod,
            runtime,
        }
    }

    fn start_ca(&self, state: &str, port: u16) -> CaProcess {
        CaProcess::start(&self.kubeconfig, &self.dir.join(state), port)
    }

    /// The published root (`ConfigMap` `mesh-ca-root-cert`, `root-cert.pem`), also written to
    /// a file for the clients.
    fn published_root(&self) -> (String, PathBuf) {
        let configmaps: Api<ConfigMap> = Api::namespaced(self.cp.client(), AGENT_NAMESPACE);
        let configmap = self
            .cp
            .block_on(configmaps.get("mesh-ca-root-cert"))
            .expect("the trust bundle's ConfigMap");
        let pem = configmap
            .data
            .and_then(|d| d.get("root-cert.pem").cloned())
            .expect("root-cert.pem");
        let path = self.dir.join("root-cert.pem");
        std::fs::write(&path, &pem).expect("roots file");
        (pem, path)
    }

    /// The root's Secret's data.
    fn root_secret(&self) -> std::collections::BTreeMap<String, k8s_openapi::ByteString> {
        let secrets: Api<Secret> = Api::namespaced(self.cp.client(), AGENT_NAMESPACE);
        self.cp
            .block_on(secrets.get("mesh-ca-root"))
            .expect("the root's Secret")
            .data
            .expect("data")
    }

    /// A token file named `name` holding `token`.
    fn token_file(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, token).expect("token file");
        path
    }

    /// Asks `client` for `identity`'s certificate (a fresh key; the CSR for `csr_for`).
    fn sign(
        &self,
        client: &IstioCaClient,
        identity: &Identity,
        csr_for: &Identity,
        lifetime: Duration,
    ) -> Result<(WorkloadKey, IssuedChain), CaError> {
        let key = WorkloadKey::generate().expect("key");
        let request = CsrRequest {
            csr_der: key.csr(csr_for).expect("CSR"),
            identity: identity.clone(),
            lifetime: Some(lifetime),
        };
        self.runtime
            .block_on(client.sign(request))
            .map(|issued| (key, issued))
    }
}

/// A client of the CA on `port` as the agent makes it (the CA's Service name, resolved to the
/// CA's address), trusting `roots`, sending the token in `token`.
fn client(port: u16, roots: &Path, token: &Path) -> IstioCaClient {
    let options = IstioCaOptions::new(format!("https://{CA_HOST}:{port}"), roots, token, TD);
    let resolver = StaticResolver(vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))]);
    IstioCaClient::new(options, Arc::new(resolver)).expect("client")
}

/// The leaf verifies, as a client certificate, to exactly `root_pem`.
fn assert_chains_to(leaf: &CertificateDer<'static>, root_pem: &str) {
    let (_, root) = x509_parser::pem::parse_x509_pem(root_pem.as_bytes()).expect("PEM");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(root.contents))
        .expect("root");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("verifier");
    let now = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock"),
    );
    verifier
        .verify_client_cert(leaf, &[], now)
        .expect("the leaf chains to the published root");
}

/// The refusal the client sees: `code` with the CA's fixed `message`.
fn assert_refused(result: Result<(WorkloadKey, IssuedChain), CaError>, code: &str, message: &str) {
    match result {
        Err(CaError::Refused {
            code: got_code,
            message: got_message,
            ..
        }) => {
            assert_eq!((got_code.as_str(), got_message.as_str()), (code, message));
        }
        Err(other) => panic!("expected a refusal {code}, got {other}"),
        Ok(_) => panic!("expected a refusal {code}, got a certificate"),
    }
}

/// A granted workload certificate: exactly `identity`, no CA, its lifetime capped, chained to
/// the published root.
fn assert_granted(cert: &WorkloadCert, identity: &Identity, root_pem: &str) {
    assert_eq!(
        mesh_identity::spiffe_ids_of(cert.leaf()).expect("SANs"),
        std::slice::from_ref(identity)
    );
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.leaf()).expect("leaf");
    assert!(!parsed.is_ca(), "a workload certificate is no CA");
    // The CA backdates by its clock-skew allowance (5 minutes) at most.
    assert!(
        cert.lifetime() <= MAX_LIFETIME + Duration::from_secs(300),
        "{:?}",
        cert.lifetime()
    );
    assert!(
        cert.not_after() <= SystemTime::now() + MAX_LIFETIME,
        "capped"
    );
    assert_chains_to(cert.leaf(), root_pem);
}

#[test]
fn the_ca_issues_a_node_agent_only_the_identities_of_its_node() {
    let cluster = Cluster::start();
    let port = free_port();
    let mut ca = cluster.start_ca("state", port);
    let (root_pem, roots) = cluster.published_root();
    let agent_token = cluster
        .cp
        .pod_token(&cluster.agent_pod, Some(CA_AUDIENCE), 3600)
        .expect("agent token");
    let agent = client(
        port,
        &roots,
        &cluster.token_file("agent.token", &agent_token),
    );
    let web = identity(SHOP, "web");

    // Granted: web has a pod on node-a. Asked for two hours, capped at one.
    let from = ca.process.line_count();
    let (key, issued) = cluster
        .sign(&agent, &web, &web, 2 * MAX_LIFETIME)
        .expect("a certificate for web");
    let cert = WorkloadCert::new(web.clone(), issued.chain, &key).expect("exactly web's");
    assert_granted(&cert, &web, &root_pem);
    ca.logged(from, &["issued a workload certificate", web.as_str()]);

    // Refused: db runs only on node-b.
    let db = identity(SHOP, "db");
    let from = ca.process.line_count();
    assert_refused(
        cluster.sign(&agent, &db, &db, MAX_LIFETIME),
        "Unauthenticated",
        REFUSED,
    );
    ca.logged(
        from,
        &[
            "refused a certificate request",
            "no running pod of spiffe://cluster.local/ns/shop/sa/db is on node node-a",
        ],
    );

    // Refused: another ServiceAccount's token (bound to its pod on node-a) asking for web.
    let intruder_token = cluster
        .cp
        .pod_token(&cluster.intruder_pod, Some(CA_AUDIENCE), 3600)
        .expect("intruder token");
    let refused = |ca: &mut CaProcess, file: &str, token: &str, reasons: &[&str]| {
        let caller = client(port, &roots, &cluster.token_file(file, token));
        let from = ca.process.line_count();
        assert_refused(
            cluster.sign(&caller, &web, &web, MAX_LIFETIME),
            "Unauthenticated",
            REFUSED,
        );
        let mut parts = vec!["refused a certificate request"];
        parts.extend_from_slice(reasons);
        ca.logged(from, &parts);
    };
    refused(
        &mut ca,
        "intruder.token",
        &intruder_token,
        &["shop/intruder may not ask for another identity (spiffe://cluster.local/ns/shop/sa/web)"],
    );

    // Refused: the agent's token, expired (the API server says so).
    let expired = cluster
        .cp
        .expired_pod_token(&cluster.agent_pod, CA_AUDIENCE)
        .expect("expired token");
    refused(
        &mut ca,
        "expired.token",
        &expired,
        &["the token is not authenticated", "expired"],
    );

    // Refused: the agent's token for the API server's audience, not the CA's.
    let api_token = cluster
        .cp
        .pod_token(&cluster.agent_pod, None, 3600)
        .expect("API token");
    refused(
        &mut ca,
        "api.token",
        &api_token,
        &["the token is not authenticated", "audience"],
    );

    // Refused: a CSR naming another identity than the one asked for (and granted).
    let from = ca.process.line_count();
    assert_refused(
        cluster.sign(&agent, &web, &db, MAX_LIFETIME),
        "InvalidArgument",
        BAD_CSR,
    );
    ca.logged(
        from,
        &["refused a CSR", "spiffe://cluster.local/ns/shop/sa/db"],
    );

    // No token ever reaches the log.
    for token in [&agent_token, &intruder_token, &expired, &api_token] {
        assert!(
            !ca.process
                .lines()
                .iter()
                .any(|l| l.contains(token.as_str())),
            "a token was logged"
        );
    }
    ca.kill();
}

/// Counts a CA's signings and failures.
struct Counting {
    inner: IstioCaClient,
    failures: AtomicUsize,
}

impl CertificateAuthority for Counting {
    fn trust_domain(&self) -> &str {
        self.inner.trust_domain()
    }

    fn sign(&self, request: CsrRequest) -> CaFuture<'_, Result<IssuedChain, CaError>> {
        Box::pin(async move {
            let result = self.inner.sign(request).await;
            if result.is_err() {
                self.failures.fetch_add(1, Ordering::SeqCst);
            }
            result
        })
    }

    fn trust_bundle(&self) -> TrustBundle {
        self.inner.trust_bundle()
    }
}

#[test]
fn the_root_outlives_restarts_and_an_outage_only_delays_rotation() {
    let cluster = Cluster::start();
    let port = free_port();
    let ca = cluster.start_ca("state-1", port);
    let (root_pem, roots) = cluster.published_root();
    let secret = cluster.root_secret();
    assert!(
        secret.contains_key("root-cert.pem") && secret.contains_key("root-key.pem"),
        "{:?}",
        secret.keys()
    );
    let agent_token = cluster
        .cp
        .pod_token(&cluster.agent_pod, Some(CA_AUDIENCE), 3600)
        .expect("agent token");
    let token = cluster.token_file("agent.token", &agent_token);
    let web = identity(SHOP, "web");

    // Stopped, and started again with an empty state directory (a new pod): the same root.
    ca.stop();
    let ca = cluster.start_ca("state-2", port);
    assert_eq!(
        cluster.published_root().0,
        root_pem,
        "the ConfigMap is unchanged"
    );
    assert_eq!(cluster.root_secret(), secret, "the Secret is unchanged");
    let agent = client(port, &roots, &token);
    let (key, issued) = cluster
        .sign(&agent, &web, &web, MAX_LIFETIME)
        .expect("a certificate after the restart");
    let cert = WorkloadCert::new(web.clone(), issued.chain, &key).expect("web's");
    assert_chains_to(cert.leaf(), &root_pem);

    // A certificate manager with short-lived certificates (rotated after about 10 s).
    let counting = Arc::new(Counting {
        inner: client(port, &roots, &token),
        failures: AtomicUsize::new(0),
    });
    let options = ManagerOptions {
        lifetime: Some(Duration::from_secs(20)),
        retry_initial: Duration::from_millis(200),
        retry_max: Duration::from_secs(1),
    };
    let manager = {
        let _entered = cluster.runtime.enter();
        CertManager::new(
            Arc::clone(&counting) as Arc<dyn CertificateAuthority>,
            options,
        )
        .expect("manager")
    };
    manager.set_wanted([web.clone()]);
    let first = cluster
        .runtime
        .block_on(manager.wait_for(&web, WAIT))
        .expect("a first certificate");

    // The CA is killed, and stays away until well past the rotation time: the manager keeps
    // serving its certificate (still valid) and keeps retrying.
    ca.kill();
    let outage_end = first.rotate_at() + Duration::from_secs(4);
    while SystemTime::now() < outage_end {
        let current = manager.snapshot();
        let held = current.get(&web).expect("the certificate is kept");
        assert_eq!(held.serial_hex(), first.serial_hex());
        std::thread::sleep(Duration::from_millis(500));
    }
    let failures = counting.failures.load(Ordering::SeqCst);
    assert!(
        failures >= 2,
        "retried while the CA was down: {failures} failures"
    );
    assert!(first.is_valid_at(SystemTime::now()), "still valid");

    // Back: a new certificate, under the same root.
    let _ca = cluster.start_ca("state-3", port);
    let deadline = Instant::now() + WAIT;
    let renewed = loop {
        if let Some(cert) = manager.snapshot().get(&web) {
            if cert.serial_hex() != first.serial_hex() {
                break Arc::clone(cert);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new certificate once the CA is back"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_chains_to(renewed.leaf(), &root_pem);
    assert_eq!(cluster.published_root().0, root_pem);
    drop(manager);
}
