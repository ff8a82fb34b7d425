//! The fields of a `TCPRoute`'s and a `TLSRoute`'s spec as written, and their checks
//! ([`crate::gateway_api::l4`]).

use serde::Deserialize;

use super::{check_section_name, BackendFields, Hostname};
use crate::gateway_api::{
    check_count,
    l4::{L4Rule, TcpRouteSpec, TlsRouteSpec},
    BackendRef, Checked, Int, List, ParentRef, Parsed, RouteSchemaError,
};

crate::schema::checked!(TcpRouteSpec, TlsRouteSpec, L4Rule, L4Backend);

/// A backend of an L4 rule: a `backendRef` without `filters`.
pub(crate) struct L4Backend(BackendRef);

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct TcpSpecFields {
    #[serde(default)]
    parent_refs: List<ParentRef>,
    rules: List<L4Rule, true>,
}

impl Checked for TcpRouteSpec {
    type Error = RouteSchemaError;
    type Fields = TcpSpecFields;
    const WHAT: &'static str = "a TCPRoute spec";

    fn check(f: TcpSpecFields) -> Result<Self, RouteSchemaError> {
        check_count(&f.parent_refs.0, 32)?;
        Ok(Self {
            parent_refs: f.parent_refs.0,
            rule: one_rule(f.rules)?,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct TlsSpecFields {
    #[serde(default)]
    parent_refs: List<ParentRef>,
    #[serde(default)]
    hostnames: List<Parsed<Hostname>>,
    rules: List<L4Rule, true>,
}

impl Checked for TlsRouteSpec {
    type Error = RouteSchemaError;
    type Fields = TlsSpecFields;
    const WHAT: &'static str = "a TLSRoute spec";

    fn check(f: TlsSpecFields) -> Result<Self, RouteSchemaError> {
        check_count(&f.parent_refs.0, 32)?;
        check_count(&f.hostnames.0, 1024)?;
        Ok(Self {
            parent_refs: f.parent_refs.0,
            hostnames: f.hostnames.0.into_iter().map(|h| h.0 .0).collect(),
            rule: one_rule(f.rules)?,
        })
    }
}

/// The one rule of an L4 route (Gateway API `v1`: a rule has no matches, so a second rule could
/// never be chosen).
fn one_rule(rules: List<L4Rule, true>) -> Result<L4Rule, RouteSchemaError> {
    match <[L4Rule; 1]>::try_from(rules.0) {
        Ok([rule]) => Ok(rule),
        Err(rules) => Err(RouteSchemaError::OneRule(rules.len())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct L4RuleFields {
    name: Option<String>,
    backend_refs: List<L4Backend, true>,
}

impl Checked for L4Rule {
    type Error = RouteSchemaError;
    type Fields = L4RuleFields;
    const WHAT: &'static str = "a rule";

    fn check(f: L4RuleFields) -> Result<Self, RouteSchemaError> {
        check_count(&f.backend_refs.0, 16)?;
        if let Some(name) = &f.name {
            check_section_name(name)?;
        }
        Ok(Self {
            name: f.name,
            backend_refs: f.backend_refs.0.into_iter().map(|b| b.0).collect(),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct L4BackendFields {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<Int>,
    weight: Option<Int>,
}

impl Checked for L4Backend {
    type Error = RouteSchemaError;
    type Fields = L4BackendFields;
    const WHAT: &'static str = "a backendRef";

    fn check(f: L4BackendFields) -> Result<Self, RouteSchemaError> {
        BackendRef::check(BackendFields {
            group: f.group,
            kind: f.kind,
            name: f.name,
            namespace: f.namespace,
            port: f.port,
            weight: f.weight,
            filters: List::default(),
        })
        .map(L4Backend)
    }
}
