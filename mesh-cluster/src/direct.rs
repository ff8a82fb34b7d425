//! Kernel-direct decisions: whether a node's agent may let the kernel connect a pod's
//! connections to a destination straight to the endpoints, without the agent, and to which.
//!
//! Only when the agent's own path would do nothing the kernel cannot: every endpoint it could
//! pick is a meshed pod of the same node (no tunnel, no TLS), no waypoint is asked for on the
//! way (the Service's, or an endpoint's own), and the destination's policy allows this client
//! for every one of them (a decision that depends only on the client pod, its identity and the
//! endpoint, never on the connection's source port).

use std::net::SocketAddr;

use crate::{
    authz::Verdict,
    decision::{Inbound, Origin},
    locality::keep_closest,
    model::Workload,
    state::ClusterState,
    waypoint::WaypointBinding,
};

/// Why a destination is not sent kernel-direct for a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotDirect {
    /// Neither a Service port nor a pod of the cluster: the agent passes it on as it was.
    Unknown,
    /// The destination (a Service, a pod, or one of the Service's endpoints) uses a waypoint.
    Waypoint,
    /// No endpoint of the destination's address family.
    NoEndpoint,
    /// More endpoints than a route holds.
    TooManyEndpoints(usize),
    /// An endpoint is not a meshed pod of this node.
    NotLocal(SocketAddr),
    /// The destination's policy does not allow this client for an endpoint.
    Denied(SocketAddr),
}

impl ClusterState {
    /// The endpoints a connection from `client` (a pod of `node`, at `client_addr`) to `dst`
    /// may go to kernel-direct: all those the agent could pick for it (at most `max`), or why
    /// not.
    pub fn direct_targets(
        &self,
        client: &Workload,
        client_addr: SocketAddr,
        dst: SocketAddr,
        node: &str,
        max: usize,
    ) -> Result<Vec<SocketAddr>, NotDirect> {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        let endpoints: Vec<SocketAddr> = match self.service_for_client(&client.namespace, dst) {
            Some((service, port)) => {
                if !matches!(self.service_waypoint(service), WaypointBinding::None) {
                    return Err(NotDirect::Waypoint);
                }
                // Those the agent could pick: under a traffic distribution, the closest.
                let mut candidates: Vec<_> = port
                    .endpoints
                    .iter()
                    .filter(|e| e.addr.is_ipv4() == dst.is_ipv4())
                    .collect();
                keep_closest(
                    &mut candidates,
                    service.traffic_distribution,
                    Some(client.place()),
                    |e| e.workload.as_deref().map(Workload::place),
                );
                candidates.into_iter().map(|e| e.addr).collect()
            }
            None if self.workload_by_ip(dst.ip()).is_some() => vec![dst],
            None => return Err(NotDirect::Unknown),
        };
        if endpoints.is_empty() {
            return Err(NotDirect::NoEndpoint);
        }
        if endpoints.len() > max {
            return Err(NotDirect::TooManyEndpoints(endpoints.len()));
        }
        for &endpoint in &endpoints {
            let Some(pod) = self.workload_by_ip(endpoint.ip()) else {
                return Err(NotDirect::NotLocal(endpoint));
            };
            if !pod.is_meshed() || pod.node.as_deref() != Some(node) {
                return Err(NotDirect::NotLocal(endpoint));
            }
            if !matches!(self.workload_waypoint(pod), WaypointBinding::None) {
                return Err(NotDirect::Waypoint);
            }
            let decision = self.admit(&Inbound {
                src: client_addr,
                dst: endpoint,
                src_identity: Some(&client.identity),
                origin: Origin::Network,
            });
            if decision.verdict != Verdict::Allow {
                return Err(NotDirect::Denied(endpoint));
            }
        }
        Ok(endpoints)
    }
}

#[cfg(test)]
mod tests {
    use super::NotDirect;
    use crate::{
        tests::{addr, docs, ip, opts, parse, pod, service},
        ClusterState,
    };

    fn namespace(name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {{istio.io/dataplane-mode: ambient}}\n"
        )
    }

    const DENY_B: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
        metadata:\n  name: no-b\n  namespace: a\nspec:\n  selector:\n    matchLabels: {app: web}\n  \
        action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/b/sa/default]\n";

    fn web(labels: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: a\n  labels: {{{labels}}}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{{port: 80, targetPort: 8080}}]\n  selector: {{app: web}}\n"
        )
    }

    fn state(extra: &[String]) -> ClusterState {
        state_with(&web(""), extra)
    }

    fn state_with(web: &str, extra: &[String]) -> ClusterState {
        let mut parts = vec![
            namespace("a"),
            namespace("b"),
            pod("a", "web-0", "n0", "10.0.0.2", "app: web"),
            pod("a", "web-1", "n0", "10.0.0.3", "app: web"),
            pod("a", "far-0", "n1", "10.0.1.2", "app: far"),
            pod("a", "client", "n0", "10.0.0.9", "app: client"),
            pod("b", "other", "n0", "10.0.0.8", "app: other"),
            web.to_owned(),
            service("a", "far", "10.96.0.2", "80", "8080", "app: far"),
        ];
        parts.extend_from_slice(extra);
        ClusterState::build(&parse(&docs(&parts)), &opts()).expect("builds")
    }

    fn targets(s: &ClusterState, client: &str, dst: &str) -> Result<Vec<String>, NotDirect> {
        let w = s.workload_by_ip(ip(client)).expect("client");
        s.direct_targets(w, addr(&format!("{client}:40000")), addr(dst), "n0", 8)
            .map(|t| t.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn a_service_whose_endpoints_are_all_local_and_allowed_goes_direct_to_all_of_them() {
        let s = state(&[]);
        assert_eq!(
            targets(&s, "10.0.0.9", "10.96.0.1:80"),
            Ok(vec!["10.0.0.2:8080".to_owned(), "10.0.0.3:8080".to_owned()])
        );
        assert_eq!(
            targets(&s, "10.0.0.9", "10.0.0.2:8080"),
            Ok(vec!["10.0.0.2:8080".to_owned()]),
            "a pod's own address"
        );
    }

    #[test]
    fn remote_unknown_waypointed_denied_and_large_destinations_stay_with_the_agent() {
        let s = state(&[DENY_B.to_owned()]);
        assert_eq!(
            targets(&s, "10.0.0.9", "10.96.0.2:80"),
            Err(NotDirect::NotLocal(addr("10.0.1.2:8080")))
        );
        assert_eq!(
            targets(&s, "10.0.0.9", "192.0.2.1:80"),
            Err(NotDirect::Unknown)
        );
        assert_eq!(
            targets(&s, "10.0.0.8", "10.96.0.1:80"),
            Err(NotDirect::Denied(addr("10.0.0.2:8080"))),
            "the DENY policy's principal"
        );
        assert_eq!(
            targets(&s, "10.0.0.9", "10.96.0.1:80"),
            Ok(vec!["10.0.0.2:8080".to_owned(), "10.0.0.3:8080".to_owned()]),
            "another client of the same service"
        );
        let w = s.workload_by_ip(ip("10.0.0.9")).expect("client");
        assert_eq!(
            s.direct_targets(w, addr("10.0.0.9:1"), addr("10.96.0.1:80"), "n0", 1),
            Err(NotDirect::TooManyEndpoints(2))
        );
        assert_eq!(
            s.direct_targets(w, addr("10.0.0.9:1"), addr("10.96.0.1:80"), "n1", 8),
            Err(NotDirect::NotLocal(addr("10.0.0.2:8080"))),
            "as another node's agent sees it"
        );
    }

    #[test]
    fn a_service_preferring_the_same_node_goes_direct_to_this_nodes_endpoints() {
        // `web` with a third pod on another node: not all local, so the agent's.
        let far_web = pod("a", "web-2", "n1", "10.0.1.3", "app: web");
        let spread = state(std::slice::from_ref(&far_web));
        assert_eq!(
            targets(&spread, "10.0.0.9", "10.96.0.1:80"),
            Err(NotDirect::NotLocal(addr("10.0.1.3:8080")))
        );
        // `PreferSameNode`: the agent would pick only this node's, so the kernel may too.
        let web = web("").replace("spec:\n", "spec:\n  trafficDistribution: PreferSameNode\n");
        let near = state_with(&web, &[far_web]);
        assert_eq!(
            targets(&near, "10.0.0.9", "10.96.0.1:80"),
            Ok(vec!["10.0.0.2:8080".to_owned(), "10.0.0.3:8080".to_owned()])
        );
    }

    #[test]
    fn a_destination_bound_to_a_waypoint_stays_with_the_agent() {
        let waypoint = [
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wp\n  \
             namespace: a\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - name: mesh\n    \
             port: 15008\n    protocol: HBONE\n"
                .to_owned(),
            pod("a", "wp-0", "n0", "10.0.0.20", "gateway.networking.k8s.io/gateway-name: wp"),
        ];
        let unlabelled = state(&waypoint);
        assert!(targets(&unlabelled, "10.0.0.9", "10.96.0.1:80").is_ok());
        let labelled = state_with(&web("istio.io/use-waypoint: wp"), &waypoint);
        assert_eq!(
            targets(&labelled, "10.0.0.9", "10.96.0.1:80"),
            Err(NotDirect::Waypoint)
        );
        assert_eq!(
            targets(&labelled, "10.0.0.9", "10.0.0.2:8080"),
            Err(NotDirect::Denied(addr("10.0.0.2:8080"))),
            "the pod's own address: its agent refuses what skipped the Service's waypoint"
        );
    }
}
