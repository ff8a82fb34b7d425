//! Tests of `AuthorizationPolicy` at a waypoint: targets, every HTTP field, absent attributes,
//! TCP passed through, and the warnings.

use std::net::SocketAddr;

use http::HeaderMap;
use mesh_identity::Identity;

use super::super::tests::{policy, state_with};
use super::{HttpFacts, WaypointFacts};
use crate::{AuthzDecision, ClusterState, DecisionReason, EnrollmentOptions, Verdict};

/// Services `web` and `db` of `shop`, bound to its waypoint `waypoint`, and a Service
/// `lonely` no waypoint serves.
const SERVICES: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}\nspec:\n  clusterIP: 10.96.0.11\n  selector: {app: db}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: lonely, namespace: shop}\nspec:\n  clusterIP: 10.96.0.12\n  selector: {app: db}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";

fn cluster(policies: &[&str]) -> ClusterState {
    let mut docs: Vec<String> = vec![SERVICES.to_owned()];
    docs.extend(policies.iter().map(|p| (*p).to_owned()));
    state_with(&EnrollmentOptions::new("n0"), &docs)
}

/// A request through waypoint `shop/waypoint` to Service `shop/<service>`.
struct Ask {
    waypoint: (&'static str, &'static str),
    service: Option<&'static str>,
    from: (&'static str, &'static str),
    src_ip: &'static str,
    method: &'static str,
    authority: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    tcp: bool,
    jwt: Option<crate::VerifiedJwt>,
}

fn ask(service: &'static str, method: &'static str, path: &'static str) -> Ask {
    Ask {
        waypoint: ("shop", "waypoint"),
        service: Some(service),
        from: ("front", "sleep"),
        src_ip: "10.0.9.9",
        method,
        authority: "web.shop.svc.cluster.local:80",
        path,
        headers: Vec::new(),
        tcp: false,
        jwt: None,
    }
}

impl Ask {
    fn from(mut self, ns: &'static str, sa: &'static str) -> Self {
        self.from = (ns, sa);
        self
    }
    fn authority(mut self, authority: &'static str) -> Self {
        self.authority = authority;
        self
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }
    fn at(mut self, ns: &'static str, name: &'static str) -> Self {
        self.waypoint = (ns, name);
        self
    }
    /// Addressed to the pod of the Service, not to the Service.
    fn addressed_to_the_pod(mut self) -> Self {
        self.service = None;
        self
    }
    fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }
    /// With a verified JWT of these claims.
    fn jwt(mut self, claims: &str) -> Self {
        let claims: serde_json::Value = serde_json::from_str(claims).unwrap();
        let text = |name: &str| {
            claims
                .get(name)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        self.jwt = Some(crate::VerifiedJwt {
            principal: format!("{}/{}", text("iss"), text("sub")),
            audiences: match claims.get("aud") {
                Some(serde_json::Value::String(a)) => vec![a.clone()],
                _ => Vec::new(),
            },
            presenter: claims
                .get("azp")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            claims,
        });
        self
    }

    fn decide(&self, state: &ClusterState) -> AuthzDecision {
        let identity = Identity::new("cluster.local", self.from.0, self.from.1).expect("identity");
        let service = self.service.map(|name| {
            state
                .service_by_hostname(&format!("{name}.shop.svc.cluster.local"))
                .expect("service")
                .clone()
        });
        let dst: SocketAddr = match self.service {
            Some("db") => "10.96.0.11:80",
            Some(_) => "10.96.0.10:80",
            // The pods `shop/web` and `shop/db` of the fixture.
            None if self.authority.starts_with("db") => "10.0.1.2:8080",
            None => "10.0.1.1:8080",
        }
        .parse()
        .unwrap();
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            headers.append(*name, value.parse().unwrap());
        }
        let path = self.path.split('?').next().unwrap();
        let facts = WaypointFacts {
            src_ip: self.src_ip.parse().unwrap(),
            src_identity: &identity,
            dst,
            http: (!self.tcp).then_some(HttpFacts {
                method: self.method,
                authority: self.authority,
                path,
                path_and_query: self.path,
                headers: &headers,
                jwt: self.jwt.as_ref(),
            }),
        };
        state.authorize_at_waypoint(self.waypoint, service.as_deref(), &facts)
    }
}

/// A decision's verdict, reason and deciding policy.
type Outcome<'a> = (Verdict, DecisionReason, Option<&'a str>);

fn verdict(decision: &AuthzDecision) -> Outcome<'_> {
    (
        decision.verdict,
        decision.reason,
        decision.policy.as_deref(),
    )
}

const ALLOWED_BY: fn(&str) -> Outcome<'_> =
    |p| (Verdict::Allow, DecisionReason::AllowMatched, Some(p));
const DENIED_BY: fn(&str) -> Outcome<'_> =
    |p| (Verdict::Deny, DecisionReason::DenyMatched, Some(p));
const NO_ALLOW: Outcome<'static> = (Verdict::Deny, DecisionReason::NoAllowMatched, None);
const NO_POLICY: Outcome<'static> = (Verdict::Allow, DecisionReason::NoPolicy, None);

fn assert_table(state: &ClusterState, table: &[(Ask, Outcome<'_>)]) {
    for (index, (ask, expected)) in table.iter().enumerate() {
        let decision = ask.decide(state);
        assert_eq!(
            verdict(&decision),
            *expected,
            "case {index}: {:?}",
            ask.path
        );
    }
}

#[test]
fn a_service_policy_allows_one_caller_one_method() {
    // Istio's example: only `sleep` may GET, and only on `web`.
    let p = policy(
        "shop",
        "web-viewer",
        "  targetRefs:\n  - {kind: Service, group: \"\", name: web}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/front/sa/sleep]}}]\n    to: [{operation: {methods: [GET]}}]\n",
    );
    let state = cluster(&[&p]);
    assert!(state.warnings().is_empty(), "{:?}", state.warnings());
    assert_table(
        &state,
        &[
            (ask("web", "GET", "/"), ALLOWED_BY("shop/web-viewer")),
            (ask("web", "POST", "/"), NO_ALLOW),
            (ask("web", "GET", "/").from("front", "other"), NO_ALLOW),
            // Another Service of the same waypoint: the policy is not its.
            (ask("db", "POST", "/"), NO_POLICY),
            // TCP to the Service: the ALLOW rule has an HTTP field, so it matches nothing.
            (ask("web", "GET", "/").tcp(), NO_ALLOW),
        ],
    );
}

#[test]
fn a_gateway_policy_covers_every_service_of_that_waypoint_only() {
    let p = policy(
        "shop",
        "no-admin",
        "  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/admin\", \"/admin/*\"]}}]\n",
    );
    let state = cluster(&[&p]);
    assert_table(
        &state,
        &[
            (ask("web", "GET", "/admin"), DENIED_BY("shop/no-admin")),
            (ask("db", "GET", "/admin/x?y=1"), DENIED_BY("shop/no-admin")),
            (ask("web", "GET", "/administrator"), NO_POLICY),
            (ask("web", "GET", "/public?p=/admin"), NO_POLICY),
            // Another waypoint, or the same name in another namespace.
            (ask("web", "GET", "/admin").at("shop", "other"), NO_POLICY),
            (
                ask("web", "GET", "/admin").at("front", "waypoint"),
                NO_POLICY,
            ),
            // TCP through it: the DENY rule keeps its L4 part (none), so it refuses all.
            (ask("web", "GET", "/").tcp(), DENIED_BY("shop/no-admin")),
        ],
    );
}

#[test]
fn the_waypoint_class_from_the_root_namespace_covers_every_waypoint() {
    let class = "  targetRefs:\n  - {kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}\n  action: DENY\n  rules:\n  - to: [{operation: {methods: [DELETE]}}]\n";
    let state = cluster(&[
        &policy("istio-system", "no-delete", class),
        &policy("shop", "not-root", class),
    ]);
    assert_table(
        &state,
        &[
            (
                ask("web", "DELETE", "/"),
                DENIED_BY("istio-system/no-delete"),
            ),
            (
                ask("web", "DELETE", "/").at("front", "w2"),
                DENIED_BY("istio-system/no-delete"),
            ),
            (ask("web", "GET", "/"), NO_POLICY),
        ],
    );
    assert_eq!(
        state.warnings(),
        ["AuthorizationPolicy shop/not-root: targetRefs[0] (GatewayClass/istio-waypoint, group \"gateway.networking.k8s.io\") applies to nothing: only a policy of the root namespace may target the waypoints' class"]
    );
}

#[test]
fn hosts_headers_ip_blocks_and_service_accounts() {
    let p = policy(
        "shop",
        "fine",
        r#"  targetRefs: [{kind: Service, name: web}]
  rules:
  - to: [{operation: {hosts: ["WEB.shop.svc.cluster.local", "*.example.com"], notPaths: ["/private/{**}"]}}]
    when:
    - {key: "request.headers[X-Team]", values: [blue, "green*"], notValues: [green-old]}
    - {key: source.serviceAccount, values: [front/sleep]}
    - {key: remote.ip, values: [10.0.9.0/24]}
"#,
    );
    let state = cluster(&[&p]);
    let ok = || ask("web", "GET", "/").header("x-team", "blue");
    assert_table(
        &state,
        &[
            (ok(), ALLOWED_BY("shop/fine")),
            // With or without the port, any case.
            (
                ok().authority("web.shop.svc.cluster.local"),
                ALLOWED_BY("shop/fine"),
            ),
            (
                ok().authority("Web.Shop.svc.cluster.local:80"),
                ALLOWED_BY("shop/fine"),
            ),
            (
                ok().authority("api.example.com:8080"),
                ALLOWED_BY("shop/fine"),
            ),
            (ok().authority("db.shop.svc.cluster.local"), NO_ALLOW),
            (
                ask("web", "GET", "/").header("x-team", "green-new"),
                ALLOWED_BY("shop/fine"),
            ),
            (
                ask("web", "GET", "/").header("x-team", "green-old"),
                NO_ALLOW,
            ),
            (ask("web", "GET", "/").header("x-team", "red"), NO_ALLOW),
            // Two values of the header read as one, joined by `,`.
            (
                ask("web", "GET", "/")
                    .header("x-team", "blue")
                    .header("x-team", "red"),
                NO_ALLOW,
            ),
            (ask("web", "GET", "/"), NO_ALLOW),
            (ok().from("front", "other"), NO_ALLOW),
            (
                Ask {
                    src_ip: "10.0.8.1",
                    ..ok()
                },
                NO_ALLOW,
            ),
            (
                ask("web", "GET", "/private/a/b").header("x-team", "blue"),
                NO_ALLOW,
            ),
            (
                ask("web", "GET", "/private").header("x-team", "blue"),
                ALLOWED_BY("shop/fine"),
            ),
        ],
    );
}

#[test]
fn jwt_attributes_read_the_verified_token() {
    // Istio's idiom "deny requests without a JWT".
    let deny = policy(
        "shop",
        "require-jwt",
        "  targetRefs: [{kind: Service, name: web}]\n  action: DENY\n  rules:\n  - from: [{source: {notRequestPrincipals: [\"*\"]}}]\n",
    );
    // Each rule reads another attribute of the token.
    let allow = policy(
        "shop",
        "jwt-users",
        "  targetRefs: [{kind: Service, name: db}]\n  rules:\n  - from: [{source: {requestPrincipals: [\"https://idp/*\"], notRequestPrincipals: [\"https://idp/mallory\"]}}]\n    to: [{operation: {methods: [GET]}}]\n  - when: [{key: \"request.auth.claims[groups]\", values: [admins]}]\n  - when: [{key: \"request.auth.claims[org][team]\", values: [blue]}, {key: request.auth.audiences, values: [db]}, {key: request.auth.presenter, notValues: [evil-cli]}]\n",
    );
    let state = cluster(&[&deny, &allow]);
    assert!(state.warnings().is_empty(), "{:?}", state.warnings());
    let alice = r#"{"iss": "https://idp", "sub": "alice"}"#;
    let mallory = r#"{"iss": "https://idp", "sub": "mallory"}"#;
    let admin = r#"{"iss": "https://other", "sub": "root", "groups": ["dev", "admins"]}"#;
    let blue = r#"{"iss": "https://other", "sub": "b", "aud": "db", "azp": "cli", "org": {"team": "blue"}}"#;
    let blue_evil = r#"{"iss": "https://other", "sub": "b", "aud": "db", "azp": "evil-cli", "org": {"team": "blue"}}"#;
    assert_table(
        &state,
        &[
            (ask("web", "GET", "/"), DENIED_BY("shop/require-jwt")),
            (ask("web", "GET", "/").jwt(alice), NO_POLICY),
            (
                ask("db", "GET", "/").jwt(alice),
                ALLOWED_BY("shop/jwt-users"),
            ),
            (ask("db", "POST", "/").jwt(alice), NO_ALLOW),
            (ask("db", "GET", "/").jwt(mallory), NO_ALLOW),
            (
                ask("db", "POST", "/").jwt(admin),
                ALLOWED_BY("shop/jwt-users"),
            ),
            (
                ask("db", "POST", "/").jwt(blue),
                ALLOWED_BY("shop/jwt-users"),
            ),
            (ask("db", "POST", "/").jwt(blue_evil), NO_ALLOW),
            // Without a token, no value of a JWT attribute matches.
            (ask("db", "GET", "/"), NO_ALLOW),
        ],
    );
    // `connection.sni` is never there: a value of it matches nothing, a `notValues` passes.
    let sni = policy(
        "shop",
        "sni",
        "  targetRefs: [{kind: Service, name: db}]\n  rules:\n  - when: [{key: connection.sni, values: [db]}]\n  - when: [{key: connection.sni, notValues: [x]}]\n    to: [{operation: {methods: [PUT]}}]\n",
    );
    assert_table(
        &cluster(&[&sni]),
        &[
            (ask("db", "GET", "/"), NO_ALLOW),
            (ask("db", "PUT", "/"), ALLOWED_BY("shop/sni")),
        ],
    );
}

#[test]
fn fields_nothing_evaluates_fail_closed_with_a_warning() {
    let key = "experimental.envoy.filters.network.mysql_proxy[db.table]";
    let allow = policy(
        "shop",
        "a",
        &format!("  targetRefs: [{{kind: Service, name: web}}]\n  rules:\n  - when: [{{key: \"{key}\", values: [x]}}]\n"),
    );
    let deny = policy(
        "shop",
        "d",
        &format!("  targetRefs: [{{kind: Service, name: db}}]\n  action: DENY\n  rules:\n  - to: [{{operation: {{methods: [PUT]}}}}]\n    when: [{{key: \"{key}\", values: [x]}}]\n"),
    );
    let state = cluster(&[&allow, &deny]);
    assert_eq!(
        state.warnings(),
        [
            format!("AuthorizationPolicy shop/a: rules[0].when[0] ({key}) cannot be evaluated by the waypoint: this ALLOW rule matches nothing"),
            format!("AuthorizationPolicy shop/d: rules[0].when[0] ({key}) cannot be evaluated by the waypoint: this DENY rule holds without them, so it denies more"),
        ]
    );
    assert_table(
        &state,
        &[
            (ask("web", "GET", "/"), NO_ALLOW),
            (ask("db", "PUT", "/"), DENIED_BY("shop/d")),
            (ask("db", "GET", "/"), NO_POLICY),
        ],
    );
}

#[test]
fn targets_that_apply_to_nothing_are_warned_about() {
    let p = policy(
        "shop",
        "t",
        "  targetRefs:\n  - {kind: ServiceEntry, group: networking.example, name: ext}\n  - {kind: Service, name: web, namespace: front}\n  - {kind: Gateway, name: waypoint}\n  - {kind: GatewayClass, group: gateway.networking.k8s.io, name: istio}\n  - {kind: Pod, name: web}\n  action: DENY\n  rules: [{}]\n",
    );
    let state = cluster(&[&p]);
    assert_eq!(
        state.warnings(),
        [
            "AuthorizationPolicy shop/t: targetRefs[0] (ServiceEntry/ext, group \"networking.example\") applies to nothing: not of the kind's API group",
            "AuthorizationPolicy shop/t: targetRefs[1] (Service/web, group \"\") applies to nothing: a policy can only target objects of its own namespace (Istio refuses others)",
            "AuthorizationPolicy shop/t: targetRefs[2] (Gateway/waypoint, group \"\") applies to nothing: not of the kind's API group",
            "AuthorizationPolicy shop/t: targetRefs[3] (GatewayClass/istio, group \"gateway.networking.k8s.io\") applies to nothing: only the waypoints' class, `istio-waypoint`, has waypoints",
            "AuthorizationPolicy shop/t: targetRefs[4] (Pod/web, group \"\") applies to nothing: waypoints enforce policies on Gateways, GatewayClasses, Services and ServiceEntries",
        ]
    );
    assert_table(&state, &[(ask("web", "GET", "/"), NO_POLICY)]);
}

#[test]
fn audit_policies_are_listed() {
    let p = policy(
        "shop",
        "watch-posts",
        "  targetRefs: [{kind: Service, name: web}]\n  action: AUDIT\n  rules:\n  - to: [{operation: {methods: [POST]}}]\n",
    );
    let state = cluster(&[&p]);
    let decision = ask("web", "POST", "/").decide(&state);
    assert_eq!(verdict(&decision), NO_POLICY);
    assert_eq!(
        &*decision.audited,
        [std::sync::Arc::from("shop/watch-posts")]
    );
    assert!(ask("web", "GET", "/").decide(&state).audited.is_empty());
}

#[test]
fn policies_nothing_enforces_are_warned_about() {
    let service = policy(
        "shop",
        "s",
        "  targetRefs: [{kind: Service, name: lonely}, {kind: Service, name: web}, {kind: Service, name: not-yet}]\n  action: DENY\n  rules: [{}]\n",
    );
    let gateway = policy(
        "shop",
        "g",
        "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: ghost}, {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  action: DENY\n  rules: [{}]\n",
    );
    let state = cluster(&[&service, &gateway]);
    assert_eq!(
        state.warnings(),
        [
            "AuthorizationPolicy shop/g targets Gateway shop/ghost, which is not a waypoint (class `istio-waypoint`): nothing enforces it",
            "AuthorizationPolicy shop/s targets Service shop/lonely, which no waypoint serves: nothing enforces it (bind the Service to a waypoint with `istio.io/use-waypoint`, or use a selector)",
        ]
    );
}

#[test]
fn a_service_policy_also_holds_for_its_pods_addresses() {
    // Stricter than Istio: through a workload waypoint, dialling `web`'s pod does not dodge
    // the policies of `web`; the pod of `db` and `lonely` has both Services' policies.
    let deny = policy(
        "shop",
        "web-no-admin",
        "  targetRefs: [{kind: Service, name: web}]\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin]}}]\n",
    );
    let db = policy(
        "shop",
        "db-get",
        "  targetRefs: [{kind: Service, name: db}]\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n",
    );
    let lonely = policy(
        "shop",
        "lonely-put",
        "  targetRefs: [{kind: Service, name: lonely}]\n  rules:\n  - to: [{operation: {methods: [PUT]}}]\n",
    );
    let state = cluster(&[&deny, &db, &lonely]);
    let db_pod = |method| {
        ask("db", method, "/")
            .authority("db.shop")
            .addressed_to_the_pod()
    };
    assert_table(
        &state,
        &[
            (
                ask("web", "GET", "/admin").addressed_to_the_pod(),
                DENIED_BY("shop/web-no-admin"),
            ),
            (ask("web", "GET", "/").addressed_to_the_pod(), NO_POLICY),
            // Either Service's ALLOW lets a request in, as it would through that Service.
            (db_pod("GET"), ALLOWED_BY("shop/db-get")),
            (db_pod("PUT"), ALLOWED_BY("shop/lonely-put")),
            (db_pod("POST"), NO_ALLOW),
            // Addressed to `db`, only `db`'s policies.
            (ask("db", "PUT", "/"), NO_ALLOW),
        ],
    );
}

#[test]
fn a_waypoint_policy_serializes_for_the_config_dump() {
    let p = policy(
        "shop",
        "web-viewer",
        "  targetRefs: [{kind: Service, name: web}, {kind: ServiceEntry, group: networking.example, name: x}]\n  rules:\n  - to: [{operation: {methods: [GET], hosts: [Web.Example], paths: [\"/a/{*}\"]}}]\n    when: [{key: \"request.headers[X-Team]\", notValues: [red]}]\n",
    );
    let state = cluster(&[&p]);
    let dump = serde_json::to_value(&*state.authorization_policies()[0]).expect("serializes");
    assert_eq!(
        dump,
        serde_json::json!({
            "namespace": "shop",
            "name": "web-viewer",
            "action": "ALLOW",
            "scope": "waypoint",
            // On a connection, the ALLOW rule with HTTP fields matches nothing.
            "rules": [],
            "targets": [{"kind": "Service", "name": "web"}],
            "httpRules": [{
                "index": 0,
                "to": [{"hosts": ["web.example"], "methods": ["GET"], "paths": ["/a/{*}"]}],
                "when": [{"headers": [{"name": "x-team", "notValues": ["red"]}]}],
            }],
        })
    );
}

#[test]
fn a_service_of_another_namespace_cannot_lend_a_pod_its_policies() {
    // Service `lure` of namespace `other` has no selector and an `EndpointSlice` listing the
    // address of `shop/web`'s pod, and an ALLOW policy that allows everything. Were its policy
    // counted for that pod, it would widen `web`'s ALLOW (GET only) for requests to the pod.
    let lure = "apiVersion: v1\nkind: Service\nmetadata: {name: lure, namespace: other}\nspec:\n  clusterIP: 10.96.0.20\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: lure-1, namespace: other, labels: {kubernetes.io/service-name: lure}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.1.1]}]\nports: [{name: http, port: 8080}]\n";
    let open = policy(
        "other",
        "lure-open",
        "  targetRefs: [{kind: Service, name: lure}]\n  rules: [{}]\n",
    );
    let web = policy(
        "shop",
        "web-get",
        "  targetRefs: [{kind: Service, name: web}]\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n",
    );
    let state = cluster(&[lure, &open, &web]);
    let lure_service = state
        .service_by_hostname("lure.other.svc.cluster.local")
        .expect("lure");
    assert!(
        lure_service.ports[0]
            .endpoints
            .iter()
            .any(|e| e.addr.ip().to_string() == "10.0.1.1"),
        "the lure lists the pod: {:?}",
        lure_service.ports[0].endpoints
    );
    assert_table(
        &state,
        &[
            (ask("web", "POST", "/").addressed_to_the_pod(), NO_ALLOW),
            (
                ask("web", "GET", "/").addressed_to_the_pod(),
                ALLOWED_BY("shop/web-get"),
            ),
        ],
    );
}
