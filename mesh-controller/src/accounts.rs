//! A waypoint per service account: the one setting, [`WAYPOINT_MODE`]` = `[`PER_SERVICE_ACCOUNT`]
//! on a `Namespace` (every service account of it) or on a `ServiceAccount` (`none` there opts it
//! out of its namespace's), gives each service account a waypoint `Gateway` of its own,
//! `<account>-waypoint`, labelled [`FOR_SERVICE_ACCOUNT`]` = <account>` and taking all traffic:
//! the model then sends the account's pods' traffic, and that of the Services whose pods all run
//! under it, through it ([`mesh_cluster::waypoint`]). The `Gateway` is owned by the
//! `ServiceAccount` (gone with it) and turned into a waypoint like any other (`desired.rs`),
//! running under its own identity, `<account>-waypoint`.
//!
//! The accounts the controller makes (the waypoints' own) never get one.

use std::collections::BTreeMap;

use mesh_cluster::waypoint::{
    service_account_waypoint, FOR_SERVICE_ACCOUNT, GATEWAY_NAME_LABEL, PER_SERVICE_ACCOUNT,
    WAYPOINT_CLASS, WAYPOINT_FOR, WAYPOINT_MODE,
};
use serde_json::{json, Value};

use crate::desired::MANAGED_BY;

/// Why a service account gets no waypoint although its setting asks for one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoWaypoint {
    /// `<account>-waypoint` is longer than a label value may be (63): its pods could not be
    /// labelled with it.
    #[error("the waypoint's name {0:?} is longer than 63 characters")]
    NameTooLong(String),
}

/// Whether `account` (its labels), in a namespace with `ns_labels`, gets a waypoint of its own.
pub fn wants_waypoint(
    account_labels: &BTreeMap<String, String>,
    ns_labels: &BTreeMap<String, String>,
) -> bool {
    let ours = account_labels.get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1)
        || account_labels.contains_key(GATEWAY_NAME_LABEL);
    if ours {
        return false;
    }
    match account_labels.get(WAYPOINT_MODE).map(String::as_str) {
        Some(PER_SERVICE_ACCOUNT) => true,
        Some(_) => false,
        None => ns_labels.get(WAYPOINT_MODE).map(String::as_str) == Some(PER_SERVICE_ACCOUNT),
    }
}

/// The waypoint `Gateway` of service account `namespace/account` (uid `uid`).
pub fn gateway(namespace: &str, account: &str, uid: &str) -> Result<Value, NoWaypoint> {
    let name = service_account_waypoint(account);
    if name.len() > 63 {
        return Err(NoWaypoint::NameTooLong(name));
    }
    Ok(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {
            "name": name, "namespace": namespace,
            "labels": {
                FOR_SERVICE_ACCOUNT: account,
                WAYPOINT_FOR: "all",
                MANAGED_BY.0: MANAGED_BY.1,
            },
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "ServiceAccount", "name": account, "uid": uid,
            }],
        },
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }))
}

/// Whether `gateway` is the one the controller made for `account`.
pub fn is_accounts(gateway: &Value, account: &str) -> bool {
    let labels = &gateway["metadata"]["labels"];
    labels[MANAGED_BY.0] == MANAGED_BY.1 && labels[FOR_SERVICE_ACCOUNT] == account
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_setting_on_the_namespace_or_the_account() {
        let on = [(WAYPOINT_MODE, PER_SERVICE_ACCOUNT)];
        let none = labels(&[]);
        assert!(wants_waypoint(&none, &labels(&on)), "the namespace's");
        assert!(wants_waypoint(&labels(&on), &none), "the account's");
        assert!(!wants_waypoint(&none, &none));
        assert!(
            !wants_waypoint(&labels(&[(WAYPOINT_MODE, "none")]), &labels(&on)),
            "opted out"
        );
        // The waypoints' own accounts never get one (no waypoint of a waypoint).
        assert!(!wants_waypoint(
            &labels(&[(MANAGED_BY.0, MANAGED_BY.1)]),
            &labels(&on)
        ));
        assert!(!wants_waypoint(
            &labels(&[(GATEWAY_NAME_LABEL, "x-waypoint")]),
            &labels(&on)
        ));
    }

    #[test]
    fn the_gateway_is_owned_by_the_account_and_names_it() {
        let gw = gateway("shop", "reviews", "uid-7").unwrap();
        assert_eq!(gw["metadata"]["name"], "reviews-waypoint");
        assert_eq!(gw["metadata"]["labels"][FOR_SERVICE_ACCOUNT], "reviews");
        assert_eq!(gw["metadata"]["labels"][WAYPOINT_FOR], "all");
        assert_eq!(gw["metadata"]["ownerReferences"][0]["uid"], "uid-7");
        assert_eq!(gw["spec"]["gatewayClassName"], WAYPOINT_CLASS);
        assert!(is_accounts(&gw, "reviews"));
        assert!(!is_accounts(&gw, "other"));
        assert_eq!(
            gateway("shop", &"a".repeat(60), "u"),
            Err(NoWaypoint::NameTooLong(format!(
                "{}-waypoint",
                "a".repeat(60)
            )))
        );
    }
}
