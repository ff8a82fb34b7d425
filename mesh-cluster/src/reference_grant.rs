//! Gateway API's `ReferenceGrant` (`v1`, `v1beta1`): the owner of a namespace lets objects of
//! other namespaces refer to its objects. The waypoint reads the grants that let `HTTPRoute`s
//! and `GRPCRoute`s send to (or mirror to) Services of another namespace: a `from` entry
//! `{group: gateway.networking.k8s.io, kind: HTTPRoute|GRPCRoute, namespace: <route's>}` with a
//! `to` entry `{group: "", kind: Service}`, for every Service of the grant's namespace, or with
//! `name` for that one.
//!
//! Checked when parsed as Gateway API's schema says: `from` and `to` hold 1 to 16 entries; each
//! names its `group` and `kind`, a `from` its `namespace`. Entries of other kinds (a Gateway's
//! Secrets, ...) are kept and grant the waypoint nothing.

use std::collections::BTreeSet;

use serde::{Deserialize, Deserializer};

use crate::{
    gateway_api::GATEWAY_GROUP,
    meta::{Kind, MetaExt, ObjectMeta},
};

/// `apiVersion`s of `ReferenceGrant` read.
pub const REFERENCE_GRANT_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];

/// A `ReferenceGrant`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ReferenceGrant {
    /// Name and namespace: the namespace whose objects it grants.
    pub metadata: ObjectMeta,
    /// `spec`.
    pub spec: ReferenceGrantSpec,
}

/// A grant's `spec`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceGrantSpec {
    /// Who may refer.
    #[serde(deserialize_with = "one_to_sixteen")]
    pub from: Vec<GrantFrom>,
    /// To what, in the grant's namespace.
    #[serde(deserialize_with = "one_to_sixteen")]
    pub to: Vec<GrantTo>,
}

/// An entry of `from`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

/// An entry of `to`; without `name`, every object of the kind.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantTo {
    pub group: String,
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// A list of 1 to 16 entries, as the schema bounds `from` and `to`.
fn one_to_sixteen<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let list = Vec::<T>::deserialize(deserializer)?;
    match list.len() {
        0 => Err(serde::de::Error::custom("must not be empty")),
        n if n > 16 => Err(serde::de::Error::custom(format!(
            "at most 16 entries, found {n}"
        ))),
        _ => Ok(list),
    }
}

/// The grants of Services to routes, as the routing index asks.
#[derive(Clone, Debug, Default)]
pub(crate) struct ServiceGrants {
    /// (route kind, route namespace, Service namespace, Service name or every one).
    grants: BTreeSet<(Kind, String, String, Option<String>)>,
}

impl ServiceGrants {
    /// The route-to-Service grants among `grants`.
    pub(crate) fn build<'a>(grants: impl IntoIterator<Item = &'a ReferenceGrant>) -> Self {
        let mut index = Self::default();
        for grant in grants {
            let namespace = grant.metadata.namespace();
            let services: Vec<&GrantTo> = grant
                .spec
                .to
                .iter()
                .filter(|t| t.group.is_empty() && t.kind == "Service")
                .collect();
            for from in &grant.spec.from {
                let kind = match (from.group.as_str(), from.kind.as_str()) {
                    (GATEWAY_GROUP, "HTTPRoute") => Kind::HttpRoute,
                    (GATEWAY_GROUP, "GRPCRoute") => Kind::GrpcRoute,
                    (GATEWAY_GROUP, "TCPRoute") => Kind::TcpRoute,
                    (GATEWAY_GROUP, "TLSRoute") => Kind::TlsRoute,
                    _ => continue,
                };
                for to in &services {
                    index.grants.insert((
                        kind,
                        from.namespace.clone(),
                        namespace.to_owned(),
                        to.name.clone(),
                    ));
                }
            }
        }
        index
    }

    /// Whether a route of `kind` in `route_namespace` may refer to Service `namespace/name`.
    pub(crate) fn allows(
        &self,
        kind: Kind,
        route_namespace: &str,
        namespace: &str,
        name: &str,
    ) -> bool {
        let key =
            |name: Option<String>| (kind, route_namespace.to_owned(), namespace.to_owned(), name);
        self.grants.contains(&key(None)) || self.grants.contains(&key(Some(name.to_owned())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(yaml: &str) -> ReferenceGrant {
        serde_yaml::from_str(yaml).expect("parses")
    }

    #[test]
    fn a_grant_lets_routes_of_its_kinds_and_namespaces_reach_its_services() {
        let all = grant("metadata: {name: g, namespace: backend}\nspec:\n  from:\n  - {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}\n  to:\n  - {group: \"\", kind: Service}\n");
        let one = grant("metadata: {name: g, namespace: other}\nspec:\n  from:\n  - {group: gateway.networking.k8s.io, kind: GRPCRoute, namespace: shop}\n  - {group: gateway.networking.k8s.io, kind: Gateway, namespace: shop}\n  to:\n  - {group: \"\", kind: Service, name: api}\n  - {group: \"\", kind: Secret}\n");
        let grants = ServiceGrants::build([&all, &one]);
        assert!(grants.allows(Kind::HttpRoute, "shop", "backend", "anything"));
        assert!(
            !grants.allows(Kind::GrpcRoute, "shop", "backend", "anything"),
            "kind"
        );
        assert!(
            !grants.allows(Kind::HttpRoute, "elsewhere", "backend", "x"),
            "namespace"
        );
        assert!(grants.allows(Kind::GrpcRoute, "shop", "other", "api"));
        assert!(
            !grants.allows(Kind::GrpcRoute, "shop", "other", "web"),
            "by name"
        );
        assert!(
            !grants.allows(Kind::HttpRoute, "shop", "other", "api"),
            "a Gateway's grant is not a route's"
        );
    }

    #[test]
    fn the_schema_bounds_are_checked_when_parsed() {
        let empty = serde_yaml::from_str::<ReferenceGrant>(
            "metadata: {name: g, namespace: b}\nspec:\n  from: []\n  to: [{group: \"\", kind: Service}]\n",
        );
        assert!(empty.unwrap_err().to_string().contains("must not be empty"));
        let unknown = serde_yaml::from_str::<ReferenceGrant>(
            "metadata: {name: g, namespace: b}\nspec:\n  from: [{group: g, kind: HTTPRoute, namespace: a, nme: x}]\n  to: [{group: \"\", kind: Service}]\n",
        );
        assert!(unknown
            .unwrap_err()
            .to_string()
            .contains("unknown field `nme`"));
    }
}
