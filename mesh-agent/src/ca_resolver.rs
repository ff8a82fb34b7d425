//! Where the remote CA is: the agent runs on the host network, where a cluster's DNS (and, in
//! test clusters, kube-proxy) may be missing, so a `<svc>.<ns>.svc[.<cluster domain>]` host is
//! resolved through the agent's own cluster view, to the ready endpoints of the service's port;
//! anything else, or a service without ready endpoints, through the system's resolver.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_ca::{Resolve, SystemResolver};
use mesh_cluster::ClusterState;
use tokio::sync::watch;
use tracing::debug;

/// Resolves the CA's host with the newest cluster view, then system DNS.
#[derive(Debug)]
pub struct ClusterCaResolver {
    state: watch::Receiver<Arc<ClusterState>>,
    cluster_domain: String,
}

impl ClusterCaResolver {
    /// A resolver reading `state`, for services named `<name>.<ns>.svc.<cluster_domain>`.
    pub fn new(state: watch::Receiver<Arc<ClusterState>>, cluster_domain: &str) -> Self {
        Self {
            state,
            cluster_domain: cluster_domain.trim_end_matches('.').to_owned(),
        }
    }

    /// The ready endpoints of `host`'s service port `port`, if `host` names a service of the
    /// cluster view.
    fn cluster_endpoints(&self, host: &str, port: u16) -> Option<Vec<SocketAddr>> {
        let host = host.trim_end_matches('.');
        let suffix = format!(".svc.{}", self.cluster_domain);
        let hostname = if host.ends_with(&suffix) {
            host.to_owned()
        } else if host.strip_suffix(".svc").is_some() {
            format!("{host}.{}", self.cluster_domain)
        } else {
            return None;
        };
        let state = Arc::clone(&self.state.borrow());
        let service = state.service_by_hostname(&hostname)?;
        let service_port = service.ports.iter().find(|p| p.port == port)?;
        Some(service_port.endpoints.iter().map(|e| e.addr).collect())
    }
}

impl Resolve for ClusterCaResolver {
    fn resolve(&self, host: &str, port: u16) -> Vec<SocketAddr> {
        match self.cluster_endpoints(host, port) {
            Some(addrs) if !addrs.is_empty() => {
                debug!(
                    host,
                    port,
                    ?addrs,
                    "the CA's service endpoints, from the cluster view"
                );
                addrs
            }
            _ => SystemResolver.resolve(host, port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_cluster::{EndpointsFrom, EnrollmentOptions, RuntimeHandles};

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh-system}
---
apiVersion: v1
kind: Pod
metadata: {name: ca-0, namespace: mesh-system, labels: {app: mesh-ca}}
spec:
  nodeName: n1
  serviceAccountName: mesh-ca
  containers: [{name: ca, image: mesh-agent, ports: [{name: grpc, containerPort: 15012}]}]
status:
  phase: Running
  podIP: 198.19.1.7
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Service
metadata: {name: mesh-ca, namespace: mesh-system}
spec:
  clusterIP: 198.18.128.9
  selector: {app: mesh-ca}
  ports: [{name: grpc-ca, port: 15012, targetPort: 15012}]
"#;

    fn resolver() -> ClusterCaResolver {
        let objects = mesh_cluster::k8s::parse_documents("cluster.yaml", CLUSTER).unwrap();
        let options = EnrollmentOptions {
            label_key: mesh_cluster::DEFAULT_LABEL_KEY.into(),
            trust_domain: "cluster.local".into(),
            node_name: "n0".into(),
            root_namespace: "istio-system".into(),
            cluster_domain: "cluster.local".into(),
            runtime_handles: RuntimeHandles::Annotations,
            endpoints: EndpointsFrom::Selectors,
        };
        let state = ClusterState::build(&objects, &options).unwrap();
        let (_tx, rx) = watch::channel(Arc::new(state));
        ClusterCaResolver::new(rx, "cluster.local")
    }

    #[test]
    fn service_hosts_resolve_to_ready_endpoints_of_the_port() {
        let r = resolver();
        let endpoint: SocketAddr = "198.19.1.7:15012".parse().unwrap();
        for host in [
            "mesh-ca.mesh-system.svc",
            "mesh-ca.mesh-system.svc.cluster.local",
            "mesh-ca.mesh-system.svc.cluster.local.",
        ] {
            assert_eq!(
                r.cluster_endpoints(host, 15012),
                Some(vec![endpoint]),
                "{host}"
            );
        }
        assert_eq!(r.cluster_endpoints("mesh-ca.mesh-system.svc", 443), None);
        assert_eq!(r.cluster_endpoints("other.mesh-system.svc", 15012), None);
        assert_eq!(r.cluster_endpoints("istiod.example.com", 15012), None);
    }

    #[test]
    fn other_hosts_go_to_the_system_resolver() {
        let addrs = resolver().resolve("127.0.0.1", 15012);
        assert_eq!(addrs, ["127.0.0.1:15012".parse::<SocketAddr>().unwrap()]);
    }
}
