//! The inbound decision: STRICT mTLS first, then `AuthorizationPolicy`.

use std::net::SocketAddr;

use mesh_identity::Identity;

use super::Inbound;
use crate::{k8s::parse_documents, ClusterState, DecisionReason, EnrollmentOptions, Verdict};

/// Namespace `shop` in the mesh, a server pod `web` (10.0.0.2, port 8080 and 9090), a client
/// pod `cli` (10.0.0.3), and `extra` objects.
fn state(extra: &str) -> ClusterState {
    let text = format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {{app: web}}
  annotations: {{mesh.local/netns: /run/netns/web, mesh.local/cgroup: /sys/fs/cgroup/web}}
spec: {{nodeName: n0, serviceAccountName: web}}
status: {{phase: Running, podIP: 10.0.0.2}}
---
apiVersion: v1
kind: Pod
metadata:
  name: cli
  namespace: shop
  annotations: {{mesh.local/netns: /run/netns/cli, mesh.local/cgroup: /sys/fs/cgroup/cli}}
spec: {{nodeName: n0, serviceAccountName: cli}}
status: {{phase: Running, podIP: 10.0.0.3}}
{extra}"
    );
    let objects = parse_documents("test.yaml", &text).expect("parses");
    ClusterState::build(&objects, &EnrollmentOptions::new("n0")).expect("builds")
}

const STRICT_ON_8080: &str = "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-strict, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls: {8080: {mode: STRICT}}
";

const ALLOW_CLI: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-cli, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/shop/sa/cli]}
";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "shop", sa).expect("identity")
}

fn admit(
    state: &ClusterState,
    dst: &str,
    src_identity: Option<&Identity>,
) -> (Verdict, DecisionReason, Option<String>) {
    let decision = state.admit(&Inbound {
        src: addr("10.0.0.3:40000"),
        dst: addr(dst),
        src_identity,
        origin: crate::Origin::Network,
    });
    (
        decision.verdict,
        decision.reason,
        decision.policy.map(|p| p.to_string()),
    )
}

#[test]
fn a_destination_the_model_does_not_know_is_refused() {
    let state = state(ALLOW_CLI);
    let (verdict, reason, policy) = admit(&state, "10.9.9.9:8080", None);
    assert_eq!(
        (verdict, reason, policy),
        (Verdict::Deny, DecisionReason::UnknownDestination, None)
    );
}

#[test]
fn plaintext_to_a_strict_port_is_refused_naming_the_peer_authentication() {
    let state = state(STRICT_ON_8080);
    let (verdict, reason, policy) = admit(&state, "10.0.0.2:8080", None);
    assert_eq!(
        (verdict, reason),
        (Verdict::Deny, DecisionReason::MtlsRequired)
    );
    assert_eq!(
        policy.as_deref(),
        Some("PeerAuthentication shop/web-strict")
    );
    // The same port over mTLS, and another port in plaintext, are let in.
    let cli = id("cli");
    assert_eq!(admit(&state, "10.0.0.2:8080", Some(&cli)).0, Verdict::Allow);
    assert_eq!(admit(&state, "10.0.0.2:9090", None).0, Verdict::Allow);
}

#[test]
fn strict_mtls_is_checked_before_authorization() {
    // An ALLOW that would match nothing for plaintext anyway: the refusal names mTLS, not the
    // policy, so that the operator sees the first reason.
    let state = state(&format!("{STRICT_ON_8080}{ALLOW_CLI}"));
    let (verdict, reason, _) = admit(&state, "10.0.0.2:8080", None);
    assert_eq!(
        (verdict, reason),
        (Verdict::Deny, DecisionReason::MtlsRequired)
    );
}

#[test]
fn authorization_sees_the_proven_identity() {
    let state = state(ALLOW_CLI);
    let cli = id("cli");
    let other = id("other");
    let (verdict, reason, policy) = admit(&state, "10.0.0.2:8080", Some(&cli));
    assert_eq!(
        (verdict, reason),
        (Verdict::Allow, DecisionReason::AllowMatched)
    );
    assert_eq!(policy.as_deref(), Some("shop/allow-cli"));
    let (verdict, reason, _) = admit(&state, "10.0.0.2:8080", Some(&other));
    assert_eq!(
        (verdict, reason),
        (Verdict::Deny, DecisionReason::NoAllowMatched)
    );
    // Plaintext on a PERMISSIVE port has no identity, so a principal rule cannot match it.
    let (verdict, reason, _) = admit(&state, "10.0.0.2:9090", None);
    assert_eq!(
        (verdict, reason),
        (Verdict::Deny, DecisionReason::NoAllowMatched)
    );
}

#[test]
fn an_ipv4_mapped_destination_is_the_ipv4_workload() {
    let state = state(STRICT_ON_8080);
    let (verdict, reason, _) = admit(&state, "[::ffff:10.0.0.2]:8080", None);
    assert_eq!(
        (verdict, reason),
        (Verdict::Deny, DecisionReason::MtlsRequired)
    );
}

#[test]
fn the_nodes_own_plaintext_connections_are_held_to_strict_mtls_and_policy() {
    // A `NodePort`'s traffic from outside the cluster reaches the pod from the node's address
    // too: the node's connections get no exemption from STRICT mTLS nor from policy.
    let state = state(&format!("{STRICT_ON_8080}{ALLOW_CLI}"));
    for origin in [crate::Origin::Network, crate::Origin::Node] {
        let d = state.admit(&Inbound {
            src: addr("10.0.0.1:40000"),
            dst: addr("10.0.0.2:8080"),
            src_identity: None,
            origin,
        });
        assert_eq!(
            (d.verdict, d.reason),
            (Verdict::Deny, DecisionReason::MtlsRequired)
        );
        let d = state.admit(&Inbound {
            src: addr("10.0.0.1:40000"),
            dst: addr("10.0.0.2:9090"),
            src_identity: None,
            origin,
        });
        assert_eq!(
            (d.verdict, d.reason),
            (Verdict::Deny, DecisionReason::NoAllowMatched)
        );
    }
}
