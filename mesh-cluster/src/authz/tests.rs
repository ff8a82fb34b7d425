//! Tests of `AuthorizationPolicy` evaluation: every field and its `not…` form, patterns,
//! addresses, conditions, the verdict rules, scopes, HTTP (L7) fields and plaintext sources.

use std::{fs, net::IpAddr, path::PathBuf, sync::Arc};

use mesh_identity::Identity;

use super::{AuthzDecision, AuthzScope, ConnFacts, DecisionReason, StringMatch, Verdict};
use crate::{k8s::parse_documents, ClusterState, ConfigDir, EnrollmentOptions};

// ---------------------------------------------------------------------------------------------
// Fixtures

/// Workloads of the tests (namespace, name, service account, labels, addresses).
const PODS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "shop",
        "web",
        "web",
        "app: web, tier: front",
        "10.0.1.1,fd00::1:1",
    ),
    ("shop", "db", "db", "app: db", "10.0.1.2"),
    ("other", "api", "default", "app: web", "10.0.2.1"),
    ("istio-system", "gw", "gw", "app: gw", "10.0.3.1"),
];

fn pod_yaml((ns, name, sa, labels, ips): (&str, &str, &str, &str, &str)) -> String {
    let ips = ips
        .split(',')
        .map(|ip| format!("  - ip: {ip}\n"))
        .collect::<Vec<_>>()
        .concat();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{{labels}}}\nspec:\n  nodeName: n1\n  serviceAccountName: {sa}\nstatus:\n  phase: Running\n  podIPs:\n{ips}"
    )
}

/// An `AuthorizationPolicy` `ns/name` with `spec` (YAML, indented by two).
pub(super) fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}"
    )
}

pub(super) fn state_with(opts: &EnrollmentOptions, policies: &[String]) -> ClusterState {
    let mut docs: Vec<String> = PODS.iter().copied().map(pod_yaml).collect();
    docs.extend_from_slice(policies);
    let objects = parse_documents("test.yaml", &docs.join("---\n")).expect("parses");
    ClusterState::build(&objects, opts).expect("builds")
}

fn cluster(policies: &[String]) -> ClusterState {
    state_with(&EnrollmentOptions::new("n0"), policies)
}

/// A connection: from `src` (with the identity of `ns/sa`, or none) to a workload port.
#[derive(Clone, Debug)]
struct Conn {
    src: &'static str,
    identity: Option<(&'static str, &'static str)>,
    dst: &'static str,
    dst_ip: Option<&'static str>,
    port: u16,
}

/// mTLS from `ns/sa` at 10.0.9.9 to `shop/web` port 8080.
fn tls(ns: &'static str, sa: &'static str) -> Conn {
    Conn {
        src: "10.0.9.9",
        identity: Some((ns, sa)),
        dst: "shop/web",
        dst_ip: None,
        port: 8080,
    }
}

/// Plaintext from 10.0.9.9 to `shop/web` port 8080.
fn plain() -> Conn {
    Conn {
        identity: None,
        ..tls("", "")
    }
}

impl Conn {
    fn src(self, src: &'static str) -> Self {
        Self { src, ..self }
    }
    fn port(self, port: u16) -> Self {
        Self { port, ..self }
    }
    fn to(self, dst: &'static str) -> Self {
        Self { dst, ..self }
    }
    fn dst_ip(self, ip: &'static str) -> Self {
        Self {
            dst_ip: Some(ip),
            ..self
        }
    }
}

fn authorize(state: &ClusterState, conn: &Conn) -> AuthzDecision {
    let identity = conn
        .identity
        .map(|(ns, sa)| Identity::new("cluster.local", ns, sa).expect("identity"));
    let dst = state
        .workloads()
        .iter()
        .find(|w| w.to_string() == conn.dst)
        .unwrap_or_else(|| panic!("no workload {}", conn.dst));
    let dst_ip: IpAddr = conn.dst_ip.map_or(dst.ips[0], |ip| ip.parse().expect("ip"));
    state.authorize(&ConnFacts {
        src_ip: conn.src.parse().expect("ip"),
        src_identity: identity.as_ref(),
        dst_ip,
        dst_port: conn.port,
        dst,
    })
}

fn decision(verdict: Verdict, reason: DecisionReason, policy: Option<&str>) -> AuthzDecision {
    AuthzDecision {
        verdict,
        reason,
        policy: policy.map(Arc::from),
        audited: Box::default(),
    }
}

fn allowed_by(policy: &str) -> AuthzDecision {
    decision(Verdict::Allow, DecisionReason::AllowMatched, Some(policy))
}

fn denied_by(policy: &str) -> AuthzDecision {
    decision(Verdict::Deny, DecisionReason::DenyMatched, Some(policy))
}

fn no_policy() -> AuthzDecision {
    decision(Verdict::Allow, DecisionReason::NoPolicy, None)
}

fn no_allow_matched() -> AuthzDecision {
    decision(Verdict::Deny, DecisionReason::NoAllowMatched, None)
}

// ---------------------------------------------------------------------------------------------
// Matching, field by field

/// A rule (YAML flow mapping), and whether it matches each connection.
type MatchCase = (&'static str, Vec<(Conn, bool)>);

/// Checks each rule as the only rule of an ALLOW policy on `shop/web` (matches: allowed) and of
/// a DENY policy (matches: denied), so that both actions read fields the same way.
fn assert_matches(table: Vec<MatchCase>) {
    for (rule, conns) in table {
        for action in ["ALLOW", "DENY"] {
            let spec = format!(
                "  selector:\n    matchLabels: {{app: web}}\n  action: {action}\n  rules:\n  - {rule}\n"
            );
            let state = cluster(&[policy("shop", "p", &spec)]);
            assert!(
                state.warnings().is_empty(),
                "{rule}: {:?}",
                state.warnings()
            );
            for (conn, matches) in &conns {
                let expected = match (action, matches) {
                    ("ALLOW", true) => allowed_by("shop/p"),
                    ("ALLOW", false) => no_allow_matched(),
                    (_, true) => denied_by("shop/p"),
                    (_, false) => no_policy(),
                };
                assert_eq!(
                    authorize(&state, conn),
                    expected,
                    "{action} rule {rule} with {conn:?}"
                );
            }
        }
    }
}

#[test]
fn principals_and_patterns() {
    assert_matches(vec![
        (
            r#"{from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}]}"#,
            vec![
                (tls("shop", "client"), true),
                (tls("shop", "other"), false),
                (tls("other", "client"), false),
                (plain(), false),
            ],
        ),
        (
            r#"{from: [{source: {principals: ["spiffe://cluster.local/ns/shop/sa/client", "example.org/ns/shop/sa/client"]}}]}"#,
            vec![(tls("shop", "client"), false)],
        ),
        (
            r#"{from: [{source: {principals: ["*"]}}]}"#,
            vec![(tls("shop", "client"), true), (plain(), false)],
        ),
        (
            r#"{from: [{source: {principals: ["cluster.local/ns/shop/*"]}}]}"#,
            vec![
                (tls("shop", "client"), true),
                (tls("shopping", "client"), false),
                (tls("other", "client"), false),
                (plain(), false),
            ],
        ),
        (
            r#"{from: [{source: {principals: ["*/sa/client"]}}]}"#,
            vec![
                (tls("shop", "client"), true),
                (tls("other", "client"), true),
                (tls("shop", "clients"), false),
                (plain(), false),
            ],
        ),
        (
            r#"{from: [{source: {principals: ["a", "cluster.local/ns/other/sa/client"]}}]}"#,
            vec![
                (tls("other", "client"), true),
                (tls("shop", "client"), false),
            ],
        ),
        // `not…`: a plaintext source has no principal, so none of the values matches it.
        (
            r#"{from: [{source: {notPrincipals: ["cluster.local/ns/shop/sa/client"]}}]}"#,
            vec![
                (tls("shop", "client"), false),
                (tls("shop", "other"), true),
                (plain(), true),
            ],
        ),
        (
            r#"{from: [{source: {notPrincipals: ["*"]}}]}"#,
            vec![(tls("shop", "client"), false), (plain(), true)],
        ),
        (
            r#"{from: [{source: {notPrincipals: ["cluster.local/ns/shop/*"]}}]}"#,
            vec![
                (tls("shop", "a"), false),
                (tls("other", "a"), true),
                (plain(), true),
            ],
        ),
        (
            r#"{from: [{source: {principals: ["cluster.local/ns/shop/*"], notPrincipals: ["*/sa/db"]}}]}"#,
            vec![
                (tls("shop", "web"), true),
                (tls("shop", "db"), false),
                (tls("other", "web"), false),
                (plain(), false),
            ],
        ),
    ]);
}

#[test]
fn namespaces_and_service_accounts() {
    assert_matches(vec![
        (
            "{from: [{source: {namespaces: [shop]}}]}",
            vec![
                (tls("shop", "client"), true),
                (tls("other", "client"), false),
                (plain(), false),
            ],
        ),
        (
            r#"{from: [{source: {namespaces: ["sh*"]}}]}"#,
            vec![(tls("shopping", "a"), true), (tls("other", "a"), false)],
        ),
        (
            r#"{from: [{source: {namespaces: ["*op"]}}]}"#,
            vec![(tls("shop", "a"), true), (tls("shopping", "a"), false)],
        ),
        (
            r#"{from: [{source: {namespaces: ["*"]}}]}"#,
            vec![(tls("other", "a"), true), (plain(), false)],
        ),
        (
            "{from: [{source: {notNamespaces: [shop]}}]}",
            vec![
                (tls("shop", "client"), false),
                (tls("other", "client"), true),
                (plain(), true),
            ],
        ),
        (
            r#"{from: [{source: {namespaces: ["sh*"], notNamespaces: [shop]}}]}"#,
            vec![
                (tls("shopping", "a"), true),
                (tls("shop", "a"), false),
                (plain(), false),
            ],
        ),
        (
            "{from: [{source: {serviceAccounts: [shop/client, other/api]}}]}",
            vec![
                (tls("shop", "client"), true),
                (tls("other", "api"), true),
                (tls("other", "client"), false),
                (tls("shop", "api"), false),
                (plain(), false),
            ],
        ),
        // Without a namespace, the policy's (shop).
        (
            "{from: [{source: {serviceAccounts: [client]}}]}",
            vec![
                (tls("shop", "client"), true),
                (tls("other", "client"), false),
            ],
        ),
        (
            "{from: [{source: {notServiceAccounts: [shop/client]}}]}",
            vec![
                (tls("shop", "client"), false),
                (tls("other", "client"), true),
                (plain(), true),
            ],
        ),
        (
            "{from: [{source: {serviceAccounts: [shop/a, shop/b], notServiceAccounts: [b]}}]}",
            vec![(tls("shop", "a"), true), (tls("shop", "b"), false)],
        ),
    ]);
}

#[test]
fn ip_blocks_and_ports() {
    assert_matches(vec![
        (
            r#"{from: [{source: {ipBlocks: ["10.0.9.0/24"]}}]}"#,
            vec![
                (tls("shop", "a").src("10.0.9.200"), true),
                (plain(), true),
                (plain().src("10.0.8.9"), false),
                (plain().src("::ffff:10.0.9.9"), true),
                (plain().src("fd00:9::9"), false),
            ],
        ),
        (
            r#"{from: [{source: {ipBlocks: ["10.0.9.9", "10.0.7.7/32"]}}]}"#,
            vec![
                (plain(), true),
                (plain().src("10.0.7.7"), true),
                (plain().src("10.0.9.8"), false),
            ],
        ),
        (
            r#"{from: [{source: {ipBlocks: ["fd00:9::/32"]}}]}"#,
            vec![
                (plain().src("fd00:9:1::5"), true),
                (plain().src("fd00:8::5"), false),
                (plain(), false),
            ],
        ),
        (
            r#"{from: [{source: {notIpBlocks: ["10.0.9.0/24", "fd00:9::/32"]}}]}"#,
            vec![
                (plain(), false),
                (plain().src("fd00:9::1"), false),
                (plain().src("10.0.8.9"), true),
                (plain().src("fd00:8::1"), true),
            ],
        ),
        (
            r#"{from: [{source: {ipBlocks: ["10.0.0.0/8"], notIpBlocks: ["10.0.9.0/24"]}}]}"#,
            vec![
                (plain().src("10.0.8.9"), true),
                (plain(), false),
                (plain().src("11.0.0.1"), false),
            ],
        ),
        (
            r#"{to: [{operation: {ports: ["8080", 9090]}}]}"#,
            vec![
                (plain(), true),
                (plain().port(9090), true),
                (plain().port(80), false),
            ],
        ),
        (
            r#"{to: [{operation: {notPorts: ["8080"]}}]}"#,
            vec![(plain(), false), (plain().port(9090), true)],
        ),
        (
            r#"{to: [{operation: {ports: ["8080", "9090"], notPorts: ["9090"]}}]}"#,
            vec![(plain(), true), (plain().port(9090), false)],
        ),
    ]);
}

#[test]
fn when_conditions() {
    assert_matches(vec![
        (
            r#"{when: [{key: source.ip, values: ["10.0.9.0/24", "fd00::/8"]}]}"#,
            vec![
                (plain(), true),
                (plain().src("fd00::9"), true),
                (plain().src("10.0.8.1"), false),
            ],
        ),
        (
            r#"{when: [{key: source.ip, notValues: ["10.0.9.9"]}]}"#,
            vec![(plain(), false), (plain().src("10.0.9.8"), true)],
        ),
        (
            "{when: [{key: source.namespace, values: [shop]}]}",
            vec![
                (tls("shop", "a"), true),
                (tls("other", "a"), false),
                (plain(), false),
            ],
        ),
        (
            r#"{when: [{key: source.namespace, values: ["sh*"], notValues: [shop]}]}"#,
            vec![(tls("shopping", "a"), true), (tls("shop", "a"), false)],
        ),
        (
            "{when: [{key: source.namespace, notValues: [shop]}]}",
            vec![
                (tls("shop", "a"), false),
                (tls("other", "a"), true),
                (plain(), true),
            ],
        ),
        (
            r#"{when: [{key: source.principal, values: ["cluster.local/ns/shop/sa/client"]}]}"#,
            vec![
                (tls("shop", "client"), true),
                (tls("shop", "a"), false),
                (plain(), false),
            ],
        ),
        (
            r#"{when: [{key: source.principal, values: ["*"]}]}"#,
            vec![(tls("shop", "client"), true), (plain(), false)],
        ),
        (
            r#"{when: [{key: source.principal, notValues: ["*"]}]}"#,
            vec![(tls("shop", "client"), false), (plain(), true)],
        ),
        (
            r#"{when: [{key: destination.ip, values: ["10.0.1.1"]}]}"#,
            vec![
                (plain(), true),
                (plain().dst_ip("fd00::1:1"), false),
                (plain().dst_ip("::ffff:10.0.1.1"), true),
            ],
        ),
        (
            r#"{when: [{key: destination.ip, notValues: ["fd00::/16"]}]}"#,
            vec![(plain(), true), (plain().dst_ip("fd00::1:1"), false)],
        ),
        (
            r#"{when: [{key: destination.port, values: ["8080", 9090]}]}"#,
            vec![
                (plain(), true),
                (plain().port(9090), true),
                (plain().port(80), false),
            ],
        ),
        (
            r#"{when: [{key: destination.port, notValues: ["8080"]}]}"#,
            vec![(plain(), false), (plain().port(80), true)],
        ),
        // All conditions must hold.
        (
            r#"{when: [{key: source.namespace, values: [shop]}, {key: destination.port, values: ["8080"]}]}"#,
            vec![
                (tls("shop", "a"), true),
                (tls("shop", "a").port(80), false),
                (tls("other", "a"), false),
            ],
        ),
    ]);
}

#[test]
fn combining_sources_operations_conditions_and_rules() {
    assert_matches(vec![
        // `{}` matches everything, plaintext included.
        (
            "{}",
            vec![(plain(), true), (tls("other", "x").port(1), true)],
        ),
        // Sources are ORed.
        (
            r#"{from: [{source: {namespaces: [shop]}}, {source: {ipBlocks: ["10.0.8.0/24"]}}]}"#,
            vec![
                (tls("shop", "a"), true),
                (plain().src("10.0.8.1"), true),
                (plain(), false),
            ],
        ),
        // Fields of one source are ANDed.
        (
            r#"{from: [{source: {namespaces: [shop], ipBlocks: ["10.0.8.0/24"]}}]}"#,
            vec![
                (tls("shop", "a").src("10.0.8.1"), true),
                (tls("shop", "a"), false),
                (plain().src("10.0.8.1"), false),
            ],
        ),
        // Operations are ORed.
        (
            r#"{to: [{operation: {ports: ["80"]}}, {operation: {ports: ["8080"]}}]}"#,
            vec![
                (plain(), true),
                (plain().port(80), true),
                (plain().port(81), false),
            ],
        ),
        // from, to and when are ANDed.
        (
            r#"{from: [{source: {namespaces: [shop]}}], to: [{operation: {ports: ["8080"]}}], when: [{key: source.ip, values: ["10.0.9.0/24"]}]}"#,
            vec![
                (tls("shop", "a"), true),
                (tls("other", "a"), false),
                (tls("shop", "a").port(80), false),
                (tls("shop", "a").src("10.0.8.1"), false),
            ],
        ),
    ]);

    // Rules are ORed.
    let spec = "  rules:\n  - from: [{source: {namespaces: [shop]}}]\n  - to: [{operation: {ports: [\"9090\"]}}]\n";
    let state = cluster(&[policy("shop", "p", spec)]);
    assert_eq!(authorize(&state, &tls("shop", "a")), allowed_by("shop/p"));
    assert_eq!(authorize(&state, &plain().port(9090)), allowed_by("shop/p"));
    assert_eq!(authorize(&state, &plain()), no_allow_matched());
}

#[test]
fn string_patterns() {
    // (pattern, value, matches)
    let table = [
        ("abc", "abc", true),
        ("abc", "abcd", false),
        ("abc", "", false),
        ("ab*", "abc", true),
        ("ab*", "ab", true),
        ("ab*", "xab", false),
        ("*bc", "abc", true),
        ("*bc", "bcx", false),
        ("*", "x", true),
        ("*", "", false),
        ("*b*", "ab*", true),
        ("*b*", "abc", false),
    ];
    for (pattern, value, matches) in table {
        let m = StringMatch::new(pattern);
        assert_eq!(m.matches(value), matches, "{pattern} ~ {value:?}");
        assert_eq!(m.to_string(), pattern);
    }
}

// ---------------------------------------------------------------------------------------------
// Verdicts

const ALL: &str = "  rules:\n  - {}\n";
const DENY_ALL: &str = "  action: DENY\n  rules:\n  - {}\n";
const AUDIT_ALL: &str = "  action: AUDIT\n  rules:\n  - {}\n";
const FROM_SHOP: &str = "  rules:\n  - from: [{source: {namespaces: [shop]}}]\n";
const DENY_FROM_SHOP: &str =
    "  action: DENY\n  rules:\n  - from: [{source: {namespaces: [shop]}}]\n";
const AUDIT_FROM_SHOP: &str =
    "  action: AUDIT\n  rules:\n  - from: [{source: {namespaces: [shop]}}]\n";

/// Policies, a connection, and the decision on it.
type DecisionCase = (Vec<String>, Conn, AuthzDecision);

fn assert_decisions(table: Vec<DecisionCase>) {
    for (policies, conn, expected) in table {
        let state = cluster(&policies);
        assert_eq!(
            authorize(&state, &conn),
            expected,
            "{policies:#?}\n{conn:?}"
        );
    }
}

#[test]
fn verdicts_deny_over_allow_and_no_policy() {
    let deny_ssh = "  action: DENY\n  rules:\n  - to: [{operation: {ports: [\"22\"]}}]\n";
    assert_decisions(vec![
        (vec![], tls("shop", "a"), no_policy()),
        (vec![], plain(), no_policy()),
        (
            vec![policy("shop", "allow", FROM_SHOP)],
            tls("shop", "a"),
            allowed_by("shop/allow"),
        ),
        (
            vec![policy("shop", "allow", FROM_SHOP)],
            tls("other", "a"),
            no_allow_matched(),
        ),
        (
            vec![policy("shop", "allow", FROM_SHOP)],
            plain(),
            no_allow_matched(),
        ),
        // An ALLOW policy without rules allows nothing.
        (
            vec![policy("shop", "nothing", "")],
            tls("shop", "a"),
            no_allow_matched(),
        ),
        (
            vec![policy("shop", "nothing", "  action: ALLOW\n  rules: []\n")],
            plain(),
            no_allow_matched(),
        ),
        // DENY wins over ALLOW.
        (
            vec![
                policy("shop", "allow", ALL),
                policy("shop", "deny", DENY_FROM_SHOP),
            ],
            tls("shop", "a"),
            denied_by("shop/deny"),
        ),
        (
            vec![
                policy("shop", "allow", ALL),
                policy("shop", "deny", DENY_FROM_SHOP),
            ],
            tls("other", "a"),
            allowed_by("shop/allow"),
        ),
        // A DENY policy that does not match leaves the connection to the ALLOW policies, or to
        // the default.
        (
            vec![policy("shop", "deny", DENY_FROM_SHOP)],
            tls("other", "a"),
            no_policy(),
        ),
        (
            vec![
                policy("shop", "allow", FROM_SHOP),
                policy("shop", "deny", deny_ssh),
            ],
            tls("other", "a"),
            no_allow_matched(),
        ),
        // A DENY policy without rules never matches; `rules: [{}]` matches everything.
        (
            vec![policy("shop", "deny", "  action: DENY\n")],
            plain(),
            no_policy(),
        ),
        (
            vec![policy("shop", "deny", DENY_ALL)],
            tls("shop", "a"),
            denied_by("shop/deny"),
        ),
    ]);
}

#[test]
fn the_first_matching_policy_is_named() {
    assert_decisions(vec![
        // By name.
        (
            vec![
                policy("shop", "b", ALL),
                policy("shop", "a", FROM_SHOP),
                policy("shop", "c", ALL),
            ],
            tls("shop", "x"),
            allowed_by("shop/a"),
        ),
        (
            vec![
                policy("shop", "b", ALL),
                policy("shop", "a", FROM_SHOP),
                policy("shop", "c", ALL),
            ],
            tls("other", "x"),
            allowed_by("shop/b"),
        ),
        (
            vec![
                policy("shop", "d2", DENY_ALL),
                policy("shop", "d1", DENY_FROM_SHOP),
            ],
            tls("other", "x"),
            denied_by("shop/d2"),
        ),
        // The root namespace's policies come first.
        (
            vec![
                policy("shop", "a", DENY_ALL),
                policy("istio-system", "z", DENY_ALL),
            ],
            plain(),
            denied_by("istio-system/z"),
        ),
    ]);
}

#[test]
fn audit_policies_are_reported_and_never_change_the_verdict() {
    let audited = |mut d: AuthzDecision, names: &[&str]| {
        d.audited = names.iter().map(|&n| Arc::from(n)).collect();
        d
    };
    assert_decisions(vec![
        // An AUDIT policy is not an ALLOW policy.
        (
            vec![policy("shop", "audit", AUDIT_FROM_SHOP)],
            tls("shop", "a"),
            audited(no_policy(), &["shop/audit"]),
        ),
        (
            vec![policy("shop", "audit", AUDIT_FROM_SHOP)],
            tls("other", "a"),
            no_policy(),
        ),
        (
            vec![
                policy("shop", "audit", AUDIT_ALL),
                policy("istio-system", "audit", AUDIT_ALL),
                policy("shop", "deny", DENY_FROM_SHOP),
            ],
            tls("shop", "a"),
            audited(
                denied_by("shop/deny"),
                &["istio-system/audit", "shop/audit"],
            ),
        ),
        (
            vec![
                policy("shop", "audit", AUDIT_ALL),
                policy("shop", "allow", FROM_SHOP),
            ],
            tls("other", "a"),
            audited(no_allow_matched(), &["shop/audit"]),
        ),
        (
            vec![
                policy("shop", "audit", AUDIT_ALL),
                policy("shop", "allow", FROM_SHOP),
            ],
            tls("shop", "a"),
            audited(allowed_by("shop/allow"), &["shop/audit"]),
        ),
        // Without rules, it never matches.
        (
            vec![policy("shop", "audit", "  action: AUDIT\n")],
            plain(),
            no_policy(),
        ),
        // Only the AUDIT policies that apply to the workload are evaluated.
        (
            vec![policy("other", "audit", AUDIT_ALL)],
            plain(),
            no_policy(),
        ),
    ]);
}

// ---------------------------------------------------------------------------------------------
// Scopes

#[test]
fn scopes_root_namespace_namespace_and_selectors() {
    let web = "  selector:\n    matchLabels: {app: web}\n  action: DENY\n  rules:\n  - {}\n";
    let everything = "  action: DENY\n  rules:\n  - {}\n";
    let empty_selector = "  selector:\n    matchLabels: {}\n  action: DENY\n  rules:\n  - {}\n";
    let workloads = ["shop/web", "shop/db", "other/api", "istio-system/gw"];
    // (policy, scope, the workloads it applies to)
    let table: Vec<(String, AuthzScope, &[&str])> = vec![
        (policy("istio-system", "p", everything), AuthzScope::Mesh, &workloads),
        (
            policy("istio-system", "p", web),
            AuthzScope::MeshSelector,
            &["shop/web", "other/api"],
        ),
        (policy("shop", "p", everything), AuthzScope::Namespace, &["shop/web", "shop/db"]),
        (policy("shop", "p", empty_selector), AuthzScope::Namespace, &["shop/web", "shop/db"]),
        (policy("shop", "p", web), AuthzScope::Workload, &["shop/web"]),
        (
            policy("shop", "p", "  selector:\n    matchLabels: {app: web, tier: back}\n  action: DENY\n  rules:\n  - {}\n"),
            AuthzScope::Workload,
            &[],
        ),
        (policy("other", "p", web), AuthzScope::Workload, &["other/api"]),
        (
            policy("shop", "p", "  targetRefs:\n  - {kind: Service, group: \"\", name: web}\n  action: DENY\n  rules:\n  - {}\n"),
            AuthzScope::Waypoint,
            &[],
        ),
    ];
    for (policy, scope, applies) in table {
        let state = cluster(std::slice::from_ref(&policy));
        assert_eq!(state.authorization_policies()[0].scope, scope, "{policy}");
        for workload in workloads {
            let decision = authorize(&state, &plain().to(workload));
            let denied = decision.verdict == Verdict::Deny;
            assert_eq!(
                denied,
                applies.contains(&workload),
                "{workload}: {decision:?}\n{policy}"
            );
        }
    }
}

#[test]
fn root_namespace_is_configurable() {
    let mut opts = EnrollmentOptions::new("n0");
    opts.root_namespace = "mesh-root".to_owned();
    let state = state_with(
        &opts,
        &[
            policy("mesh-root", "deny", "  action: DENY\n  rules:\n  - {}\n"),
            policy("istio-system", "deny", "  action: DENY\n  rules:\n  - {}\n"),
        ],
    );
    let scopes: Vec<AuthzScope> = state
        .authorization_policies()
        .iter()
        .map(|p| p.scope)
        .collect();
    assert_eq!(scopes, [AuthzScope::Namespace, AuthzScope::Mesh]);
    assert_eq!(authorize(&state, &plain()), denied_by("mesh-root/deny"));
    assert_eq!(
        authorize(&state, &plain().to("istio-system/gw")),
        denied_by("mesh-root/deny")
    );
}

#[test]
fn the_node_agent_skips_waypoint_policies() {
    let spec = "  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n  - {kind: Service, name: web}\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n";
    let state = cluster(&[policy("shop", "w", spec)]);
    assert_eq!(authorize(&state, &plain()), no_policy());
    // Enforced by the waypoints, with its HTTP fields: the only warning is that this cluster
    // has no such waypoint (and no Service `web` to warn about).
    assert_eq!(
        state.warnings(),
        ["AuthorizationPolicy shop/w targets Gateway shop/waypoint, which is not a waypoint (class `istio-waypoint`): nothing enforces it"]
    );
    let listed = &state.authorization_policies()[0];
    // At L4 (TCP through the waypoint) the ALLOW rule with an HTTP field matches nothing; on a
    // request it is enforced whole.
    assert_eq!(
        (listed.scope, listed.rules.len(), listed.http_rules.len()),
        (AuthzScope::Waypoint, 0, 1)
    );
}

#[test]
fn http_fields_make_allow_and_audit_rules_match_nothing() {
    let spec = "  selector:\n    matchLabels: {app: web}\n  rules:\n  - from: [{source: {namespaces: [shop]}}]\n    to: [{operation: {methods: [GET]}}]\n  - to: [{operation: {ports: [\"9090\"]}}]\n";
    let state = cluster(&[policy("shop", "p", spec)]);
    assert_eq!(
        state.warnings(),
        ["AuthorizationPolicy shop/p: rules[0].to[0].operation.methods is an HTTP (L7) field the node agent does not enforce: this ALLOW rule matches nothing"]
    );
    assert_eq!(authorize(&state, &tls("shop", "a")), no_allow_matched());
    assert_eq!(
        authorize(&state, &tls("shop", "a").port(9090)),
        allowed_by("shop/p")
    );
    let rules: Vec<usize> = state.authorization_policies()[0]
        .rules
        .iter()
        .map(|r| r.index)
        .collect();
    assert_eq!(rules, [1], "rule 0 is left out");

    let audit = "  action: AUDIT\n  rules:\n  - when:\n    - {key: request.auth.principal, values: [\"*\"]}\n    - {key: \"request.headers[x-token]\", notValues: [x]}\n";
    let state = cluster(&[policy("shop", "a", audit)]);
    assert_eq!(
        state.warnings(),
        ["AuthorizationPolicy shop/a: rules[0].when[0] (request.auth.principal), rules[0].when[1] (request.headers[x-token]) are HTTP (L7) fields the node agent does not enforce: this AUDIT rule matches nothing"]
    );
    assert!(state.authorization_policies()[0].rules.is_empty());
}

/// A DENY rule, the paths of its HTTP fields in the warning (ending with its verb), and whether
/// the rule denies each connection.
type DenyCase = (&'static str, &'static str, Vec<(Conn, bool)>);

#[test]
fn http_fields_are_dropped_from_deny_rules() {
    // (rule, its HTTP fields, connections and whether the rule denies them)
    let table: Vec<DenyCase> = vec![
        (
            r#"{to: [{operation: {methods: [GET], ports: ["8080"]}}]}"#,
            "rules[0].to[0].operation.methods is",
            vec![(plain(), true), (plain().port(9090), false)],
        ),
        (
            r#"{to: [{operation: {paths: ["/admin"]}}]}"#,
            "rules[0].to[0].operation.paths is",
            vec![(plain(), true), (tls("other", "a").port(1), true)],
        ),
        (
            r#"{from: [{source: {requestPrincipals: ["*"], namespaces: [other]}}]}"#,
            "rules[0].from[0].source.requestPrincipals is",
            vec![(tls("other", "a"), true), (tls("shop", "a"), false), (plain(), false)],
        ),
        (
            r#"{from: [{source: {remoteIpBlocks: ["10.0.0.0/8"]}}], to: [{operation: {ports: ["22"]}}]}"#,
            "rules[0].from[0].source.remoteIpBlocks is",
            vec![(plain().port(22), true), (plain(), false)],
        ),
        (
            r#"{from: [{source: {notRemoteIpBlocks: ["10.0.0.0/8"], notRequestPrincipals: ["*"]}}], to: [{operation: {notHosts: [a], notMethods: [GET], notPaths: [/], hosts: [b]}}], when: [{key: connection.sni, values: [a]}, {key: destination.port, values: ["8080"]}]}"#,
            "rules[0].from[0].source.notRequestPrincipals, rules[0].from[0].source.notRemoteIpBlocks, rules[0].to[0].operation.hosts, rules[0].to[0].operation.notHosts, rules[0].to[0].operation.notMethods, rules[0].to[0].operation.notPaths, rules[0].when[0] (connection.sni) are",
            vec![(plain(), true), (plain().port(80), false)],
        ),
        (
            r#"{when: [{key: "request.auth.claims[iss]", values: [a]}, {key: remote.ip, values: ["10.0.0.1"]}, {key: source.serviceAccount, values: [shop/a]}, {key: "experimental.envoy.filters.a[b]", values: [c]}, {key: request.auth.audiences, values: [d]}, {key: request.auth.presenter, values: [e]}]}"#,
            "rules[0].when[0] (request.auth.claims[iss]), rules[0].when[1] (remote.ip), rules[0].when[2] (source.serviceAccount), rules[0].when[3] (experimental.envoy.filters.a[b]), rules[0].when[4] (request.auth.audiences), rules[0].when[5] (request.auth.presenter) are",
            vec![(plain(), true), (tls("other", "a").port(1), true)],
        ),
    ];
    for (rule, fields, conns) in table {
        let spec = format!("  action: DENY\n  rules:\n  - {rule}\n");
        let state = cluster(&[policy("shop", "d", &spec)]);
        let (noun, pronoun) = if fields.ends_with(" is") {
            ("an HTTP (L7) field", "it")
        } else {
            ("HTTP (L7) fields", "them")
        };
        assert_eq!(
            state.warnings(),
            [format!("AuthorizationPolicy shop/d: {fields} {noun} the node agent does not enforce: this DENY rule is enforced without {pronoun}, so it denies more")],
            "{rule}"
        );
        for (conn, denied) in conns {
            let expected = if denied {
                denied_by("shop/d")
            } else {
                no_policy()
            };
            assert_eq!(authorize(&state, &conn), expected, "{rule} with {conn:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State: listing, warnings, validation, files

#[test]
fn policies_are_listed_sorted_and_serialize_for_the_config_dump() {
    let spec = "  selector:\n    matchLabels: {app: web}\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/a/*\"]\n        notNamespaces: [\"*-test\"]\n        serviceAccounts: []\n        ipBlocks: [\"10.1.2.3/8\", \"fd00::1\"]\n    - source: {serviceAccounts: [db, other/api], notServiceAccounts: [x]}\n    to: [{operation: {ports: [\"8080\"], notPorts: [\"22\"], methods: [GET]}}]\n    when:\n    - {key: destination.ip, notValues: [\"10.0.0.0/24\"]}\n    - {key: source.principal, values: [\"*\"]}\n";
    let state = cluster(&[
        policy("shop", "b", ALL),
        policy("shop", "a", spec),
        policy("istio-system", "z", ALL),
    ]);
    let names: Vec<String> = state
        .authorization_policies()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(names, ["istio-system/z", "shop/a", "shop/b"]);
    let dump = serde_json::to_value(&*state.authorization_policies()[1]).expect("serializes");
    let expected = serde_json::json!({
        "namespace": "shop",
        "name": "a",
        "action": "DENY",
        "scope": "workload",
        "selector": {"app": "web"},
        "rules": [{
            "index": 0,
            "from": [
                {
                    "principals": ["cluster.local/ns/a/*"],
                    "notNamespaces": ["*-test"],
                    "sourceIps": ["10.0.0.0/8", "fd00::1"],
                },
                {
                    "serviceAccounts": ["shop/db", "other/api"],
                    "notServiceAccounts": ["shop/x"],
                },
            ],
            "to": [{"destinationPorts": [8080], "notDestinationPorts": [22]}],
            "when": [
                {"notDestinationIps": ["10.0.0.0/24"]},
                {"principals": ["*"]},
            ],
        }],
    });
    assert_eq!(dump, expected);
    let mesh = serde_json::to_value(&*state.authorization_policies()[0]).expect("serializes");
    assert_eq!(
        mesh,
        serde_json::json!({"namespace": "istio-system", "name": "z", "action": "ALLOW", "scope": "mesh", "rules": [{"index": 0}]})
    );
}

#[test]
fn warnings_of_peer_authentications_and_authorization_policies_are_both_listed() {
    let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: web, namespace: istio-system}\nspec:\n  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n";
    let state = cluster(&[
        pa.to_owned(),
        policy("shop", "deny", "  action: DENY\n"),
        policy("shop", "audit", "  action: AUDIT\n  rules: []\n"),
    ]);
    let warnings = state.warnings();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings[0].starts_with("PeerAuthentication istio-system/web is ignored"));
    assert_eq!(
        warnings[1..],
        [
            "AuthorizationPolicy shop/audit: an AUDIT policy without rules never matches (`rules: [{}]` matches every connection)",
            "AuthorizationPolicy shop/deny: a DENY policy without rules never matches (`rules: [{}]` matches every connection)",
        ]
    );
}

#[test]
fn duplicates_and_invalid_names_are_refused() {
    let objects =
        |texts: &[String]| parse_documents("t.yaml", &texts.join("---\n")).expect("parses");
    let opts = EnrollmentOptions::new("n0");
    let twice = objects(&[policy("shop", "a", ""), policy("shop", "a", ALL)]);
    let err = ClusterState::build(&twice, &opts)
        .expect_err("duplicate")
        .to_string();
    assert_eq!(err, "AuthorizationPolicy shop/a is defined more than once");
    for (ns, name, field) in [
        ("Shop", "a", "metadata.namespace"),
        ("shop", "A_", "metadata.name"),
    ] {
        let err = ClusterState::build(&objects(&[policy(ns, name, "")]), &opts)
            .expect_err("invalid name")
            .to_string();
        assert!(
            err.starts_with(&format!("AuthorizationPolicy {ns}/{name}: {field}: ")),
            "{err}"
        );
    }
    // Different kinds and namespaces do not collide.
    let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: shop}\n".to_owned();
    let state = ClusterState::build(
        &objects(&[pa, policy("shop", "a", ""), policy("other", "a", "")]),
        &opts,
    )
    .expect("builds");
    assert_eq!(state.authorization_policies().len(), 2);
}

#[test]
fn a_hundred_rule_policy_matches_its_last_rule() {
    let rules = (0..100)
        .map(|i| {
            format!(
                "  - from: [{{source: {{principals: [\"cluster.local/ns/ns{i}/sa/sa\"], ipBlocks: [\"10.{i}.0.0/16\"]}}}}]\n    to: [{{operation: {{ports: [\"{}\"]}}}}]\n",
                8000 + i
            )
        })
        .collect::<Vec<_>>()
        .concat();
    let state = cluster(&[policy("shop", "big", &format!("  rules:\n{rules}"))]);
    assert_eq!(state.authorization_policies()[0].rules.len(), 100);
    let last = Conn {
        src: "10.99.1.1",
        identity: Some(("ns99", "sa")),
        dst: "shop/web",
        dst_ip: None,
        port: 8099,
    };
    assert_eq!(authorize(&state, &last), allowed_by("shop/big"));
    assert_eq!(
        authorize(&state, &last.clone().port(8098)),
        no_allow_matched()
    );
    // Policies of other namespaces are not evaluated for this workload.
    assert_eq!(authorize(&state, &last.to("other/api")), no_policy());
}

/// A unique, empty temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("mesh-agent-authz-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_malformed_policy_keeps_the_previous_one_in_force() {
    let dir = TempDir::new("malformed");
    let pods: Vec<String> = PODS.iter().copied().map(pod_yaml).collect();
    fs::write(dir.0.join("pods.yaml"), pods.join("---\n")).expect("write");
    let file = dir.0.join("policy.yaml");
    let allow = |namespaces: &str| {
        policy(
            "shop",
            "p",
            &format!("  rules:\n  - from:\n    - source:\n        {namespaces}\n"),
        )
    };
    fs::write(&file, allow("namespaces: [shop]")).expect("write");
    let mut config = ConfigDir::new(&dir.0, EnrollmentOptions::new("n0")).expect("options");
    let first = config.load().expect("loads");
    assert_eq!(authorize(&first, &tls("shop", "a")), allowed_by("shop/p"));
    assert_eq!(authorize(&first, &tls("other", "a")), no_allow_matched());

    // A misspelt field must not widen the policy: the file is refused, the old policy stays.
    fs::write(&file, allow("namespace: [other]")).expect("write");
    let state = config.load().expect("loads");
    assert_eq!(authorize(&state, &tls("shop", "a")), allowed_by("shop/p"));
    assert_eq!(authorize(&state, &tls("other", "a")), no_allow_matched());
    let errors: Vec<String> = state.errors().iter().map(|e| e.message.clone()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    for part in [
        "policy.yaml: document 1: AuthorizationPolicy shop/p: ",
        "spec.rules[0].from[0].source: unknown field `namespace`",
        "line 10",
    ] {
        assert!(errors[0].contains(part), "{errors:?} lacks {part:?}");
    }

    // Fixed: applied.
    fs::write(&file, allow("namespaces: [other]")).expect("write");
    let state = config.load().expect("loads");
    assert!(state.errors().is_empty(), "{:?}", state.errors());
    assert_eq!(authorize(&state, &tls("other", "a")), allowed_by("shop/p"));
}
