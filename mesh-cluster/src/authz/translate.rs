//! The translation of an `AuthorizationPolicy` into the rules the agents and the waypoints
//! enforce: for a connection (the L4 fields; an ALLOW or AUDIT rule with an HTTP field matches
//! nothing, a DENY rule keeps its L4 part) and, for a waypoint's policy, for a request (every
//! field). See the parent module for what each field means.

use super::{
    waypoint, AuthMatch, AuthzMatch, AuthzPolicy, AuthzRule, AuthzScope, HeaderMatch,
    ServiceAccountMatch, StringMatch,
};
use crate::{
    error::StateError,
    k8s::{self, Attribute, AuthAttribute, AuthzAction, Kind, Values},
    meta::MetaExt,
    names::policy_key,
};

pub(super) fn policy_from(
    ap: &k8s::AuthorizationPolicy,
    root_namespace: &str,
    warnings: &mut Vec<String>,
) -> Result<AuthzPolicy, StateError> {
    let key = policy_key(Kind::AuthorizationPolicy, &ap.metadata)?;
    let namespace = ap.metadata.namespace();
    let spec = &ap.spec;
    let selector = spec.match_labels().cloned().unwrap_or_default();
    let scope = match (namespace == root_namespace, selector.is_empty()) {
        _ if !spec.target_refs.is_empty() => AuthzScope::Waypoint,
        (true, true) => AuthzScope::Mesh,
        (true, false) => AuthzScope::MeshSelector,
        (false, true) => AuthzScope::Namespace,
        (false, false) => AuthzScope::Workload,
    };
    let for_waypoints = scope == AuthzScope::Waypoint;
    let targets = if for_waypoints {
        crate::policy_target::targets(
            &format!("AuthorizationPolicy {key}"),
            (namespace, root_namespace),
            &spec.target_refs,
            warnings,
        )
    } else {
        Vec::new()
    };
    if spec.rules.is_empty() && spec.action != AuthzAction::Allow {
        warnings.push(format!(
            "AuthorizationPolicy {key}: {} policy without rules never matches (`rules: \
             [{{}}]` matches every {})",
            if spec.action == AuthzAction::Audit {
                "an AUDIT"
            } else {
                "a DENY"
            },
            if for_waypoints {
                "request"
            } else {
                "connection"
            },
        ));
    }
    let mut rules = Vec::new();
    let mut http_rules = Vec::new();
    let mut unenforced_by_agents = Vec::new();
    for (index, rule) in spec.rules.iter().enumerate() {
        let (enforced, http_fields) =
            rule_from(index, rule, namespace, spec.action, Layer::Connection);
        // A waypoint's policy is enforced with its HTTP fields on requests; its rules as a
        // connection sees them only apply to TCP it passes through (see the `waypoint` module).
        if !for_waypoints && !http_fields.is_empty() {
            let narrowed = http_narrowing(spec.action, &http_fields);
            warnings.push(format!("AuthorizationPolicy {key}: {narrowed}"));
            unenforced_by_agents.push(narrowed);
        }
        rules.extend(enforced);
        if for_waypoints {
            let (enforced, unevaluated) =
                rule_from(index, rule, namespace, spec.action, Layer::Request);
            if !unevaluated.is_empty() {
                warnings.push(waypoint::unevaluated_warning(
                    &key,
                    spec.action,
                    &unevaluated,
                ));
            }
            http_rules.extend(enforced);
        }
    }
    Ok(AuthzPolicy {
        namespace: namespace.to_owned(),
        name: ap.metadata.name().to_owned(),
        action: spec.action,
        scope,
        selector,
        rules,
        targets,
        http_rules,
        unenforced_by_agents,
        key,
    })
}

/// Which fields a rule is enforced with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// A connection (the node agent; TCP through a waypoint): the L4 fields.
    Connection,
    /// An HTTP request at a waypoint: every field.
    Request,
}

/// The rule as enforced at `layer` (`None` for an ALLOW or AUDIT rule with a field the layer
/// cannot evaluate), and the paths of those fields.
fn rule_from(
    index: usize,
    rule: &k8s::Rule,
    namespace: &str,
    action: AuthzAction,
    layer: Layer,
) -> (Option<AuthzRule>, Vec<String>) {
    let mut unenforced = Vec::new();
    let mut enforced = AuthzRule {
        index,
        from: Vec::new(),
        to: Vec::new(),
        when: Vec::new(),
    };
    for (i, from) in rule.from.iter().enumerate() {
        let at = format!("rules[{index}].from[{i}].source");
        enforced.from.push(source_match(
            &from.source,
            namespace,
            layer,
            (&at, &mut unenforced),
        ));
    }
    for (i, to) in rule.to.iter().enumerate() {
        let at = format!("rules[{index}].to[{i}].operation");
        enforced.to.push(operation_match(
            &to.operation,
            layer,
            (&at, &mut unenforced),
        ));
    }
    for (i, condition) in rule.when.iter().enumerate() {
        match condition_match(condition, namespace, layer) {
            Some(m) => enforced.when.push(m),
            None => unenforced.push(format!("rules[{index}].when[{i}] ({})", condition.key)),
        }
    }
    let dropped = !unenforced.is_empty() && action != AuthzAction::Deny;
    ((!dropped).then_some(enforced), unenforced)
}

/// The service accounts of a rule of a policy in `namespace` (where `name` alone is).
fn accounts(list: &[k8s::ServiceAccountRef], namespace: &str) -> Vec<ServiceAccountMatch> {
    list.iter()
        .map(|sa| ServiceAccountMatch {
            namespace: sa.namespace.as_deref().unwrap_or(namespace).to_owned(),
            name: sa.name.clone(),
        })
        .collect()
}

/// A `from[].source` as enforced at `layer`; the fields it cannot enforce are pushed to
/// `unenforced`, named under `at`.
fn source_match(
    source: &k8s::Source,
    namespace: &str,
    layer: Layer,
    (at, unenforced): (&str, &mut Vec<String>),
) -> AuthzMatch {
    let mut m = AuthzMatch {
        principals: patterns(&source.principals),
        not_principals: patterns(&source.not_principals),
        namespaces: patterns(&source.namespaces),
        not_namespaces: patterns(&source.not_namespaces),
        service_accounts: accounts(&source.service_accounts, namespace),
        not_service_accounts: accounts(&source.not_service_accounts, namespace),
        source_ips: source.ip_blocks.clone(),
        not_source_ips: source.not_ip_blocks.clone(),
        ..AuthzMatch::default()
    };
    match layer {
        Layer::Request => {
            m.remote_ips.clone_from(&source.remote_ip_blocks);
            m.not_remote_ips.clone_from(&source.not_remote_ip_blocks);
            if !source.request_principals.is_empty() || !source.not_request_principals.is_empty() {
                m.request_auth.push(AuthMatch {
                    attribute: AuthAttribute::Principal,
                    values: patterns(&source.request_principals),
                    not_values: patterns(&source.not_request_principals),
                });
            }
        }
        Layer::Connection => {
            for field in source.http_fields() {
                unenforced.push(format!("{at}.{field}"));
            }
        }
    }
    m
}

/// A `to[].operation` as enforced at `layer`; the fields it cannot enforce are pushed to
/// `unenforced`, named under `at`.
fn operation_match(
    operation: &k8s::Operation,
    layer: Layer,
    (at, unenforced): (&str, &mut Vec<String>),
) -> AuthzMatch {
    let mut m = AuthzMatch {
        destination_ports: operation.ports.clone(),
        not_destination_ports: operation.not_ports.clone(),
        ..AuthzMatch::default()
    };
    match layer {
        Layer::Request => {
            let hosts = |hosts: &[String]| {
                hosts
                    .iter()
                    .map(|h| StringMatch::new(&h.to_ascii_lowercase()))
                    .collect()
            };
            m.hosts = hosts(&operation.hosts);
            m.not_hosts = hosts(&operation.not_hosts);
            m.methods = patterns(&operation.methods);
            m.not_methods = patterns(&operation.not_methods);
            m.paths.clone_from(&operation.paths);
            m.not_paths.clone_from(&operation.not_paths);
        }
        Layer::Connection => {
            for field in operation.http_fields() {
                unenforced.push(format!("{at}.{field}"));
            }
        }
    }
    m
}

/// A `when` condition as enforced at `layer`; `None` when the layer cannot evaluate it.
fn condition_match(
    condition: &k8s::Condition,
    namespace: &str,
    layer: Layer,
) -> Option<AuthzMatch> {
    let request = layer == Layer::Request;
    let mut m = AuthzMatch::default();
    match &condition.attribute {
        Attribute::SourceIp(Values { values, not_values }) => {
            (m.source_ips, m.not_source_ips) = (values.clone(), not_values.clone());
        }
        Attribute::DestinationIp(Values { values, not_values }) => {
            (m.destination_ips, m.not_destination_ips) = (values.clone(), not_values.clone());
        }
        Attribute::DestinationPort(Values { values, not_values }) => {
            (m.destination_ports, m.not_destination_ports) = (values.clone(), not_values.clone());
        }
        Attribute::SourceNamespace(Values { values, not_values }) => {
            (m.namespaces, m.not_namespaces) = (patterns(values), patterns(not_values));
        }
        Attribute::SourcePrincipal(Values { values, not_values }) => {
            (m.principals, m.not_principals) = (patterns(values), patterns(not_values));
        }
        Attribute::RemoteIp(Values { values, not_values }) if request => {
            (m.remote_ips, m.not_remote_ips) = (values.clone(), not_values.clone());
        }
        Attribute::SourceServiceAccount(Values { values, not_values }) if request => {
            (m.service_accounts, m.not_service_accounts) =
                (accounts(values, namespace), accounts(not_values, namespace));
        }
        Attribute::RequestHeader { name, values } if request => {
            m.headers.push(HeaderMatch {
                name: name.clone(),
                values: patterns(&values.values),
                not_values: patterns(&values.not_values),
            });
        }
        Attribute::RequestAuth { attribute, values } if request => {
            m.request_auth.push(AuthMatch {
                attribute: attribute.clone(),
                values: patterns(&values.values),
                not_values: patterns(&values.not_values),
            });
        }
        // `notValues` always pass; a value is never there.
        Attribute::Absent(values) if request => {
            if !values.values.is_empty() {
                m.requires_absent.push(condition.key.clone());
            }
        }
        _ => return None,
    }
    Some(m)
}

fn patterns(values: &[String]) -> Vec<StringMatch> {
    values.iter().map(|v| StringMatch::new(v)).collect()
}

/// How a rule with HTTP fields (`fields`: their paths) is narrowed at the node agents.
fn http_narrowing(action: AuthzAction, fields: &[String]) -> String {
    let (are, them) = if fields.len() == 1 {
        ("is an HTTP (L7) field", "it")
    } else {
        ("are HTTP (L7) fields", "them")
    };
    let effect = if action == AuthzAction::Deny {
        format!("this DENY rule is enforced without {them}, so it denies more")
    } else {
        format!("this {action} rule matches nothing")
    };
    format!(
        "{} {are} the node agent does not enforce: {effect}",
        fields.join(", ")
    )
}
