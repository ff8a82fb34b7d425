//! Tests of `AuthorizationPolicy` parsing: the schema, Istio's validation rules (each error
//! naming the field path and the line), versions and lists.

use std::net::IpAddr;

use super::{
    AuthorizationPolicy, AuthzAction, Condition, IpBlock, Operation, PolicyTargetRef, Rule,
    RuleFrom, RuleTo, ServiceAccountRef, Source, Values,
};
use crate::k8s::{parse_documents, Attribute, AuthAttribute, MetaExt, Object};

/// The document of policy `shop/x` with `body` as its spec; the spec's fields start at line 7.
fn doc(body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\n  namespace: shop\nspec:\n{body}"
    )
}

fn parse_one(text: &str) -> AuthorizationPolicy {
    let objects = parse_documents("ap.yaml", text).expect("parses");
    match objects.as_slice() {
        [Object::AuthorizationPolicy(policy)] => policy.clone(),
        other => panic!("expected one AuthorizationPolicy, got {other:?}"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP address")
}

fn block(s: &str) -> IpBlock {
    s.parse().expect("IP block")
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|&v| v.to_owned()).collect()
}

#[test]
fn parses_every_field() {
    let text = doc(r#"  selector:
    matchLabels: {app: web}
    matchExpressions: []
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/a/sa/b", "*"]
        notPrincipals: ["cluster.local/ns/a/*"]
        requestPrincipals: ["issuer/subject"]
        notRequestPrincipals: ["*"]
        namespaces: ["a", "b*"]
        notNamespaces: ["*c"]
        ipBlocks: ["10.0.0.1", "10.1.2.3/8", "fd00::/8"]
        notIpBlocks: ["10.0.0.0/24"]
        remoteIpBlocks: ["192.0.2.1"]
        notRemoteIpBlocks: ["2001:db8::/32"]
    - source:
        serviceAccounts: ["a/b", "c"]
        notServiceAccounts: ["a/d"]
    to:
    - operation:
        ports: ["8080", 9090]
        notPorts: ["22"]
        hosts: ["a.example"]
        notHosts: ["b.example"]
        methods: ["GET"]
        notMethods: ["POST"]
        paths: ["/a"]
        notPaths: ["/b"]
    when:
    - key: source.ip
      values: ["10.0.0.0/8"]
      notValues: ["10.0.0.1"]
    - key: source.namespace
      values: ["a"]
    - key: source.principal
      notValues: ["*"]
    - key: destination.ip
      values: ["::1"]
    - key: destination.port
      values: ["80", 443]
    - key: request.headers[x-token]
      values: ["t"]
  - {}
"#);
    let policy = parse_one(&text);
    assert_eq!(
        (policy.metadata.namespace(), policy.metadata.name()),
        ("shop", "x")
    );
    let spec = &policy.spec;
    assert_eq!(spec.action, AuthzAction::Deny);
    assert_eq!(
        spec.match_labels()
            .map(|l| l.get("app").map(String::as_str)),
        Some(Some("web"))
    );
    assert!(spec.target_refs.is_empty());
    let [rule, empty] = spec.rules.as_slice() else {
        panic!("two rules: {:?}", spec.rules)
    };
    assert_eq!(*empty, Rule::default());
    let source = Source {
        principals: strings(&["cluster.local/ns/a/sa/b", "*"]),
        not_principals: strings(&["cluster.local/ns/a/*"]),
        request_principals: strings(&["issuer/subject"]),
        not_request_principals: strings(&["*"]),
        namespaces: strings(&["a", "b*"]),
        not_namespaces: strings(&["*c"]),
        ip_blocks: vec![block("10.0.0.1"), block("10.0.0.0/8"), block("fd00::/8")],
        not_ip_blocks: vec![block("10.0.0.0/24")],
        remote_ip_blocks: vec![block("192.0.2.1")],
        not_remote_ip_blocks: vec![block("2001:db8::/32")],
        ..Source::default()
    };
    let accounts = Source {
        service_accounts: vec![
            ServiceAccountRef {
                namespace: Some("a".to_owned()),
                name: "b".to_owned(),
            },
            ServiceAccountRef {
                namespace: None,
                name: "c".to_owned(),
            },
        ],
        not_service_accounts: vec![ServiceAccountRef {
            namespace: Some("a".to_owned()),
            name: "d".to_owned(),
        }],
        ..Source::default()
    };
    assert_eq!(
        rule.from,
        [RuleFrom { source }, RuleFrom { source: accounts }]
    );
    assert_eq!(
        rule.from[0].source.http_fields(),
        [
            "requestPrincipals",
            "notRequestPrincipals",
            "remoteIpBlocks",
            "notRemoteIpBlocks"
        ]
    );
    let operation = Operation {
        ports: vec![8080, 9090],
        not_ports: vec![22],
        hosts: strings(&["a.example"]),
        not_hosts: strings(&["b.example"]),
        methods: strings(&["GET"]),
        not_methods: strings(&["POST"]),
        paths: vec!["/a".parse().unwrap()],
        not_paths: vec!["/b".parse().unwrap()],
    };
    assert_eq!(
        operation.http_fields(),
        [
            "hosts",
            "notHosts",
            "methods",
            "notMethods",
            "paths",
            "notPaths"
        ]
    );
    assert_eq!(rule.to, [RuleTo { operation }]);
    let condition = |key: &str, attribute| Condition {
        key: key.to_owned(),
        attribute,
    };
    assert_eq!(
        rule.when,
        [
            condition(
                "source.ip",
                Attribute::SourceIp(Values {
                    values: vec![block("10.0.0.0/8")],
                    not_values: vec![block("10.0.0.1")],
                })
            ),
            condition(
                "source.namespace",
                Attribute::SourceNamespace(Values {
                    values: strings(&["a"]),
                    not_values: Vec::new(),
                })
            ),
            condition(
                "source.principal",
                Attribute::SourcePrincipal(Values {
                    values: Vec::new(),
                    not_values: strings(&["*"]),
                })
            ),
            condition(
                "destination.ip",
                Attribute::DestinationIp(Values {
                    values: vec![block("::1")],
                    not_values: Vec::new(),
                })
            ),
            condition(
                "destination.port",
                Attribute::DestinationPort(Values {
                    values: vec![80, 443],
                    not_values: Vec::new(),
                })
            ),
            condition(
                "request.headers[x-token]",
                Attribute::RequestHeader {
                    name: "x-token".to_owned(),
                    values: Values {
                        values: strings(&["t"]),
                        not_values: Vec::new(),
                    },
                }
            ),
        ]
    );
}

#[test]
fn defaults_and_empty_forms() {
    // No spec, a null spec, a null action, null lists: an ALLOW policy without rules.
    for body in ["", "  action:\n  rules:\n  selector:\n", "  rules: []\n"] {
        let policy = parse_one(&doc(body));
        assert_eq!(policy.spec.action, AuthzAction::Allow, "{body:?}");
        assert!(policy.spec.rules.is_empty(), "{body:?}");
        assert!(policy.spec.match_labels().is_none(), "{body:?}");
    }
    let bare = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: null\n";
    assert_eq!(parse_one(bare).metadata.namespace(), "default");

    // Empty matchLabels is namespace-wide; `selector: {}` too.
    for selector in ["  selector: {}\n", "  selector:\n    matchLabels: {}\n"] {
        let policy = parse_one(&doc(selector));
        assert!(policy.spec.selector.is_some() && policy.spec.match_labels().is_none());
    }

    // Null lists inside a rule and a source; `provider: null` is no provider.
    let policy = parse_one(&doc(
        "  action: AUDIT\n  provider:\n  rules:\n  - from:\n    to:\n    when:\n  - from:\n    - source:\n        principals: [a]\n        notPrincipals:\n",
    ));
    assert_eq!(policy.spec.action, AuthzAction::Audit);
    assert_eq!(policy.spec.rules[0], Rule::default());
    assert_eq!(policy.spec.rules[1].from[0].source.principals, ["a"]);

    // targetRef and targetRefs are merged.
    let policy = parse_one(&doc(
        "  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n  targetRefs:\n  - {kind: Service, name: web, namespace: shop}\n",
    ));
    let targets: Vec<String> = policy
        .spec
        .target_refs
        .iter()
        .map(PolicyTargetRef::to_string)
        .collect();
    assert_eq!(targets, ["Service/web", "Gateway/waypoint"]);
}

#[test]
fn versions_and_lists() {
    let one = |version: &str| {
        format!(
            "apiVersion: {version}\nkind: AuthorizationPolicy\nmetadata: {{name: a, namespace: shop}}\nspec: {{action: DENY, rules: [{{}}]}}\n"
        )
    };
    let text = [
        one("security.istio.io/v1"),
        one("security.istio.io/v1beta1"),
        one("security.istio.io/v1alpha1"),
        one("example.com/v1"),
    ]
    .join("---\n");
    let objects = parse_documents("ap.yaml", &text).expect("parses");
    assert_eq!(objects.len(), 2, "v1alpha1 and other groups are not read");

    let typed = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicyList\nitems:\n- metadata: {name: a, namespace: shop}\n  spec: {action: DENY, rules: [{}]}\n- metadata: {name: b, namespace: shop}\n";
    let mixed = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}\n- apiVersion: security.istio.io/v1beta1\n  kind: AuthorizationPolicy\n  metadata: {name: b, namespace: shop}\n  spec:\n    selector: {matchLabels: {app: web}}\n    rules:\n    - to: [{operation: {ports: [\"8080\"]}}]\n";
    for (text, expected) in [(typed, &["shop/a", "shop/b"][..]), (mixed, &["shop/b"][..])] {
        let names: Vec<String> = parse_documents("list.yaml", text)
            .expect("parses")
            .iter()
            .filter_map(|object| match object {
                Object::AuthorizationPolicy(p) => {
                    Some(format!("{}/{}", p.metadata.namespace(), p.metadata.name()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(names, expected);
    }

    // Inside a list, the path starts at the item and the error names it.
    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata: {name: x, namespace: shop}\n  spec: {action: CUSTOM}\n";
    let err = parse_documents("list.yaml", list)
        .expect_err("CUSTOM")
        .to_string();
    assert!(
        err.starts_with("list.yaml: document 1, items[0]: AuthorizationPolicy shop/x: items[0].spec.action: action CUSTOM is not supported"),
        "{err}"
    );
}

/// Checks that each spec body of `table` fails to parse with an error that names the file,
/// document and object, and contains each of the expected parts.
fn assert_parse_errors<B: AsRef<str>, P: AsRef<str>>(table: &[(B, &[P])]) {
    for (body, expected) in table {
        let text = doc(body.as_ref());
        let err = parse_documents("ap.yaml", &text)
            .expect_err("must not parse")
            .to_string();
        let prefix = "ap.yaml: document 1: AuthorizationPolicy shop/x: ";
        assert!(err.starts_with(prefix), "error {err:?} lacks {prefix:?}");
        for part in expected.iter().map(AsRef::as_ref) {
            assert!(
                err.contains(part),
                "error {err:?} lacks {part:?}, for:\n{text}"
            );
        }
    }
}

#[test]
fn action_provider_selector_and_target_errors() {
    assert_parse_errors(&[
        (
            "  action: CUSTOM\n  provider: {name: ext-authz}\n",
            &[
                "spec.action: action CUSTOM is not supported",
                "external authorizer",
                "line 7 column 11",
            ],
        ),
        (
            "  provider:\n    name: ext-authz\n  action: CUSTOM\n",
            &["spec.provider: `provider` is only valid with action CUSTOM", "line 8"],
        ),
        (
            "  action: DENY\n  provider: {name: ext-authz}\n",
            &["spec.provider: `provider` is only valid with action CUSTOM", "line 8"],
        ),
        (
            "  action: REJECT\n",
            &[
                "spec.action: unknown action \"REJECT\"",
                "`ALLOW`, `DENY` or `AUDIT`",
                "line 7",
            ],
        ),
        ("  action: deny\n", &["spec.action: unknown action \"deny\"", "line 7"]),
        (
            "  action: [ALLOW]\n",
            &["spec.action: invalid type: sequence, expected ALLOW, DENY or AUDIT", "line 7"],
        ),
        (
            "  selector:\n    matchLabels: {app: web}\n  targetRefs:\n  - {kind: Gateway, name: waypoint}\n",
            &["spec: `selector` and `targetRefs` cannot both be set", "line 7"],
        ),
        (
            "  targetRef: {kind: Gateway, name: waypoint}\n  selector:\n    matchLabels: {app: web}\n",
            &["spec: `selector` and `targetRef` cannot both be set", "line 7"],
        ),
        (
            "  selector:\n    matchExpressions:\n    - {key: app, operator: In, values: [web]}\n",
            &["spec.selector.matchExpressions: not supported", "line 9"],
        ),
        (
            "  selector:\n    matchLabel: {app: web}\n",
            &[
                "spec.selector: unknown field `matchLabel`, expected `matchLabels` or `matchExpressions`",
                "line 8",
            ],
        ),
        (
            "  rule:\n  - {}\n",
            &["spec: unknown field `rule`, expected one of", "`rules`", "line 7"],
        ),
    ]);
}

#[test]
fn rule_source_operation_and_condition_shape_errors() {
    assert_parse_errors(&[
        (
            "  rules:\n  - form:\n    - source: {principals: [a]}\n",
            &["spec.rules[0]: unknown field `form`, expected one of `from`, `to`, `when`", "line 8"],
        ),
        (
            "  rules:\n  - from:\n    - sources: {principals: [a]}\n",
            &["spec.rules[0].from[0]: unknown field `sources`, expected `source`", "line 9"],
        ),
        (
            "  rules:\n  - from:\n    - source:\n        principles: [a]\n",
            &["spec.rules[0].from[0].source: unknown field `principles`, expected one of", "line 10"],
        ),
        (
            "  rules:\n  - from:\n    - source:\n        principals: [a]\n        ipBlock: [10.0.0.1]\n",
            &["spec.rules[0].from[0].source: unknown field `ipBlock`", "line 11"],
        ),
        (
            "  rules:\n  - to:\n    - operation:\n        port: [\"80\"]\n",
            &["spec.rules[0].to[0].operation: unknown field `port`, expected one of", "line 10"],
        ),
        (
            "  rules:\n  - to:\n    - operations: {ports: [\"80\"]}\n",
            &["spec.rules[0].to[0]: unknown field `operations`, expected `operation`", "line 9"],
        ),
        (
            "  rules:\n  - when:\n    - key: source.ip\n      value: [10.0.0.1]\n",
            &["spec.rules[0].when[0]: unknown field `value`, expected one of", "line 10"],
        ),
        (
            "  rules:\n  -\n",
            &["spec.rules[0]: must not be null: expected a rule (`{}` matches every connection)", "line 8"],
        ),
        ("  rules:\n  - from: []\n", &["spec.rules[0].from: must not be an empty list", "line 8"]),
        ("  rules:\n  - to: []\n", &["spec.rules[0].to: must not be an empty list", "line 8"]),
        ("  rules:\n  - from:\n    - {}\n", &["spec.rules[0].from[0]: missing field `source`", "line 9"]),
        (
            "  rules:\n  - from:\n    - source:\n",
            &["spec.rules[0].from[0].source: must not be null: expected a source", "line 9"],
        ),
        (
            "  rules:\n  - from:\n    - source: {}\n",
            &["spec.rules[0].from[0].source: must not be empty: set at least one field", "line 9"],
        ),
        (
            "  rules:\n  - from:\n    - source: {principals: []}\n",
            &["spec.rules[0].from[0].source: must not be empty", "line 9"],
        ),
        (
            "  rules:\n  - to:\n    - operation: {}\n",
            &["spec.rules[0].to[0].operation: must not be empty: set at least one field (Istio rejects an empty operation)", "line 9"],
        ),
        (
            "  rules:\n  - to:\n    - operation: null\n",
            &["spec.rules[0].to[0].operation: must not be null: expected an operation", "line 9"],
        ),
        (
            "  rules:\n  - from:\n    - source:\n        principals: \"a\"\n",
            &["spec.rules[0].from[0].source.principals: invalid type: string \"a\", expected a list", "line 10"],
        ),
        (
            "  rules:\n  - from:\n    - source:\n        namespaces: [shop, \"\"]\n",
            &["spec.rules[0].from[0].source.namespaces[1]: empty value not allowed", "line 10"],
        ),
        (
            "  rules:\n  - to:\n    - operation:\n        methods:\n        - \"\"\n",
            &["spec.rules[0].to[0].operation.methods[0]: empty value not allowed", "line 11"],
        ),
        (
            "  rules:\n  - from:\n    - source:\n        principals: [{a: b}]\n",
            &["spec.rules[0].from[0].source.principals[0]: invalid type: map, expected a string", "line 10"],
        ),
    ]);
}

#[test]
fn address_and_port_errors() {
    let source = |field: &str, value: &str| -> String {
        format!("  rules:\n  - from:\n    - source:\n        {field}:\n        - 10.0.0.1\n        - \"{value}\"\n")
    };
    let mut cases: Vec<(String, Vec<String>)> = Vec::new();
    for field in [
        "ipBlocks",
        "notIpBlocks",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
    ] {
        for bad in [
            "10.0.0.300",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/8/8",
            "/8",
            "fe80::1%eth0",
            "web",
        ] {
            cases.push((
                source(field, bad),
                vec![
                    format!("spec.rules[0].from[0].source.{field}[1]: {bad:?} is not an IP address or CIDR"),
                    "line 12".to_owned(),
                ],
            ));
        }
    }
    let ports = |field: &str, value: &str| -> String {
        format!("  rules:\n  - to:\n    - operation:\n        {field}: [\"8080\", {value}]\n")
    };
    for field in ["ports", "notPorts"] {
        for (bad, shown) in [
            ("\"0\"", "0"),
            ("0", "0"),
            ("65536", "65536"),
            ("\"-1\"", "-1"),
            ("-1", "-1"),
            ("\"+80\"", "+80"),
            ("\"http\"", "http"),
            ("\" 80\"", " 80"),
        ] {
            cases.push((
                ports(field, bad),
                vec![
                    format!("spec.rules[0].to[0].operation.{field}[1]: {shown} is not a port number (1-65535)"),
                    "line 10".to_owned(),
                ],
            ));
        }
    }
    for (text, expected) in cases {
        let text = doc(&text);
        let err = parse_documents("ap.yaml", &text)
            .expect_err("must not parse")
            .to_string();
        for part in &expected {
            assert!(
                err.contains(part.as_str()),
                "error {err:?} lacks {part:?}, for:\n{text}"
            );
        }
    }
}

#[test]
fn service_account_errors() {
    let many: Vec<String> = (0..17).map(|i| format!("shop/sa{i}")).collect();
    let many = format!(
        "  rules:\n  - from:\n    - source:\n        notServiceAccounts: [{}]\n",
        many.join(", ")
    );
    let table: &[(&str, &[&str])] = &[
        (
            "  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"shop/*\"]\n",
            &["spec.rules[0].from[0].source.serviceAccounts[0]: \"shop/*\" is not a service account", "wildcards are not allowed", "line 10"],
        ),
        (
            "  rules:\n  - from:\n    - source:\n        serviceAccounts: [a/b/c]\n",
            &["serviceAccounts[0]: \"a/b/c\" is not a service account", "more than one '/'"],
        ),
        (
            "  rules:\n  - from:\n    - source:\n        notServiceAccounts: [/b]\n",
            &["notServiceAccounts[0]: \"/b\" is not a service account", "empty namespace"],
        ),
        (
            "  rules:\n  - from:\n    - source:\n        serviceAccounts: [a/]\n",
            &["serviceAccounts[0]: \"a/\" is not a service account", "empty name"],
        ),
        (
            &many,
            &["spec.rules[0].from[0].source: notServiceAccounts: at most 16 values", "found 17", "line 10"],
        ),
        (
            "  rules:\n  - from:\n    - source:\n        serviceAccounts: [shop/web]\n        namespaces: [shop]\n",
            &["spec.rules[0].from[0].source: serviceAccounts and notServiceAccounts cannot be set with principals or namespaces", "line 10"],
        ),
        (
            "  rules:\n  - from:\n    - source:\n        notPrincipals: [\"*\"]\n        notServiceAccounts: [shop/web]\n",
            &["cannot be set with principals or namespaces"],
        ),
    ];
    assert_parse_errors(table);
    let long = format!("a/{}", "b".repeat(320));
    assert!(long.parse::<ServiceAccountRef>().is_err());
}

#[test]
fn condition_errors() {
    let when = |condition: &str| -> String { format!("  rules:\n  - when:\n    - {condition}\n") };
    let table: Vec<(String, &[&str])> = vec![
        (
            when("values: [a]"),
            &["spec.rules[0].when[0]: `key` must not be empty", "line 9"],
        ),
        (
            when("{key: \"\", values: [a]}"),
            &["`key` must not be empty"],
        ),
        (
            when("key: source.ip"),
            &[
                "spec.rules[0].when[0]: the condition on source.ip needs `values` or `notValues`",
                "line 9",
            ],
        ),
        (
            when("{key: source.ip, values: [], notValues: []}"),
            &["needs `values` or `notValues`"],
        ),
        (
            when("{key: source.ips, values: [10.0.0.1]}"),
            &[
                "spec.rules[0].when[0]: unknown attribute \"source.ips\" in `key`",
                "line 9",
            ],
        ),
        (
            when("{key: destination.namespace, values: [shop]}"),
            &["attribute destination.namespace in `key` is not supported: use metadata.namespace"],
        ),
        (
            when("{key: \"destination.labels[app]\", values: [web]}"),
            &["is not supported: use the workload selector"],
        ),
        (
            when("{key: destination.user, values: [web]}"),
            &["is not supported: only in Istio's v1alpha1 RBAC"],
        ),
        (
            when("{key: request.headers, values: [a]}"),
            &["bad key \"request.headers\": expected the form name[entry]"],
        ),
        (
            when("{key: \"request.auth.claims[]\", values: [a]}"),
            &["bad key \"request.auth.claims[]\""],
        ),
        (
            when("{key: \"request.auth.claims[a][]\", values: [a]}"),
            &["bad key \"request.auth.claims[a][]\""],
        ),
        (
            when("{key: source.ip, values: [10.0.0.1, 10.0.0.256]}"),
            &[
                "spec.rules[0].when[0]: values[1]: \"10.0.0.256\" is not an IP address or CIDR",
                "line 9",
            ],
        ),
        (
            when("{key: destination.ip, notValues: [\"fd00::/200\"]}"),
            &["notValues[0]: \"fd00::/200\" is not an IP address or CIDR"],
        ),
        (
            when("{key: remote.ip, values: [nope]}"),
            &["values[0]: \"nope\" is not an IP address or CIDR"],
        ),
        (
            when("{key: destination.port, values: [\"80\", \"0\"]}"),
            &["values[1]: 0 is not a port number"],
        ),
        (
            when("{key: destination.port, notValues: [http]}"),
            &["notValues[0]: http is not a port number"],
        ),
        (
            when("{key: source.serviceAccount, values: [\"a/b/c\"]}"),
            &["values[0]: \"a/b/c\" is not a service account"],
        ),
        (
            when("{key: source.principal, values: [a, \"\"]}"),
            &["spec.rules[0].when[0].values[1]: empty value not allowed"],
        ),
    ];
    assert_parse_errors(&table);
}

#[test]
fn attributes_ztunnel_does_not_evaluate_parse_as_http() {
    let when = |condition: &str| -> String { format!("  rules:\n  - when:\n    - {condition}\n") };
    // Every attribute Istio knows parses; those ztunnel does not evaluate are HTTP ones, kept
    // typed for the waypoint.
    let text = |values: &[&str]| Values {
        values: strings(values),
        not_values: Vec::new(),
    };
    let table = [
        (
            "request.headers[X-Token]",
            "a/b",
            Attribute::RequestHeader {
                name: "x-token".to_owned(),
                values: text(&["a/b"]),
            },
        ),
        (
            "request.headers[:authority]",
            "a/b",
            Attribute::RequestHeader {
                name: ":authority".to_owned(),
                values: text(&["a/b"]),
            },
        ),
        (
            "request.experimental.inline.headers[x-token]",
            "a/b",
            Attribute::Unevaluated,
        ),
        (
            "request.auth.principal",
            "a/b",
            Attribute::RequestAuth {
                attribute: AuthAttribute::Principal,
                values: text(&["a/b"]),
            },
        ),
        (
            "request.auth.audiences",
            "a/b",
            Attribute::RequestAuth {
                attribute: AuthAttribute::Audiences,
                values: text(&["a/b"]),
            },
        ),
        (
            "request.auth.presenter",
            "a/b",
            Attribute::RequestAuth {
                attribute: AuthAttribute::Presenter,
                values: text(&["a/b"]),
            },
        ),
        (
            "request.auth.claims[iss]",
            "a/b",
            Attribute::RequestAuth {
                attribute: AuthAttribute::Claim(vec!["iss".to_owned()]),
                values: text(&["a/b"]),
            },
        ),
        (
            "request.auth.claims[org][team]",
            "a/b",
            Attribute::RequestAuth {
                attribute: AuthAttribute::Claim(vec!["org".to_owned(), "team".to_owned()]),
                values: text(&["a/b"]),
            },
        ),
        ("connection.sni", "a/b", Attribute::Absent(text(&["a/b"]))),
        (
            "remote.ip",
            "10.0.0.1",
            Attribute::RemoteIp(Values {
                values: vec!["10.0.0.1".parse().unwrap()],
                not_values: Vec::new(),
            }),
        ),
        (
            "source.serviceAccount",
            "a/b",
            Attribute::SourceServiceAccount(Values {
                values: vec!["a/b".parse().unwrap()],
                not_values: Vec::new(),
            }),
        ),
        (
            "experimental.envoy.filters.network.mysql_proxy[db.table]",
            "a/b",
            Attribute::Unevaluated,
        ),
    ];
    for (key, value, attribute) in table {
        let policy = parse_one(&doc(&when(&format!(
            "{{key: \"{key}\", values: [\"{value}\"]}}"
        ))));
        let parsed = &policy.spec.rules[0].when[0].attribute;
        assert_eq!(parsed, &attribute, "{key}");
        assert!(parsed.is_http(), "{key}");
    }
}

#[test]
fn waypoint_fields_are_checked_when_read() {
    let when = |condition: &str| -> String { format!("  rules:\n  - when:\n    - {condition}\n") };
    let to = |operation: &str| -> String {
        format!("  rules:\n  - to:\n    - operation: {operation}\n")
    };
    let table = [
        (
            when("{key: \"request.headers[bad name]\", values: [x]}"),
            &["spec.rules[0].when[0]: \"bad name\" is not an HTTP header name"][..],
        ),
        (
            to("{paths: [\"/a\", \"/{**}/b/{*}\"]}"),
            &[
                "spec.rules[0].to[0].operation.paths[1]: \"/{**}/b/{*}\" is not a valid path \
                 template: `{**}` must be the last operator",
            ][..],
        ),
        (
            to("{notPaths: [\"/a/{*}.txt\"]}"),
            &["spec.rules[0].to[0].operation.notPaths[0]: \"/a/{*}.txt\" is not a valid path template"][..],
        ),
        (
            "  targetRefs:\n  - {kind: Service, name: a, sectionName: http}\n".to_owned(),
            &["unknown field `sectionName`"][..],
        ),
    ];
    assert_parse_errors(&table);
}

#[test]
fn ip_blocks() {
    // (block, addresses inside, addresses outside, display)
    let table: &[(&str, &[&str], &[&str], &str)] = &[
        (
            "10.0.0.1",
            &["10.0.0.1"],
            &["10.0.0.2", "::ffff:10.0.0.1"],
            "10.0.0.1",
        ),
        ("10.0.0.1/32", &["10.0.0.1"], &["10.0.0.0"], "10.0.0.1"),
        (
            "10.1.2.3/8",
            &["10.0.0.0", "10.255.255.255"],
            &["11.0.0.0", "9.255.255.255"],
            "10.0.0.0/8",
        ),
        (
            "10.0.0.0/0",
            &["0.0.0.0", "255.255.255.255"],
            &["::"],
            "0.0.0.0/0",
        ),
        (
            "192.168.1.128/25",
            &["192.168.1.200"],
            &["192.168.1.127"],
            "192.168.1.128/25",
        ),
        (
            "fd00::/8",
            &["fd00::1", "fdff::"],
            &["fe00::", "10.0.0.1"],
            "fd00::/8",
        ),
        ("::/0", &["::1", "fd00::1"], &["0.0.0.0"], "::/0"),
        (
            "2001:db8::1",
            &["2001:db8::1"],
            &["2001:db8::2"],
            "2001:db8::1",
        ),
        (
            "2001:db8::1/128",
            &["2001:db8::1"],
            &["2001:db8::"],
            "2001:db8::1",
        ),
        (
            "2001:db8:ff::/33",
            &["2001:db8:0:1::", "2001:db8:7fff::"],
            &["2001:db8:8000::"],
            "2001:db8::/33",
        ),
    ];
    for (text, inside, outside, display) in table {
        let b = block(text);
        assert_eq!(b.to_string(), *display, "{text}");
        for addr in *inside {
            assert!(b.contains(ip(addr)), "{text} contains {addr}");
        }
        for addr in *outside {
            assert!(!b.contains(ip(addr)), "{text} does not contain {addr}");
        }
    }
    assert_eq!(IpBlock::new(ip("10.0.0.1"), 33), None);
    assert_eq!(IpBlock::new(ip("::1"), 129), None);
    assert_eq!(IpBlock::new(ip("10.0.0.1"), 8), Some(block("10.0.0.0/8")));
}
