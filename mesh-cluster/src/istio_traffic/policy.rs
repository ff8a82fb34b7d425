//! A `DestinationRule`'s `trafficPolicy` (the rule's and a subset's) with its
//! `portLevelSettings`, and how they combine for one destination as Istio merges them: for each
//! part (load balancer, outlier detection, connection pool), the subset's setting for the port,
//! else the subset's, else the rule's for the port, else the rule's.

use serde::Deserialize;

use super::{
    de_fields::{ClientTls, OutlierFields},
    ConnectionPool, LoadBalancer, OutlierDetection,
};
use crate::{
    gateway_api::RouteSchemaError,
    schema::{Checked, List},
};

/// What one level of a `trafficPolicy` sets; what it leaves out comes from the level below.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyParts {
    /// `loadBalancer`; round robin when no level sets it.
    pub load_balancer: Option<LoadBalancer>,
    /// `outlierDetection`.
    pub outlier_detection: Option<OutlierDetection>,
    /// `connectionPool`.
    pub connection_pool: Option<ConnectionPool>,
}

impl PolicyParts {
    /// `self`, with what `over` sets in its place.
    fn overlaid(mut self, over: &PolicyParts) -> Self {
        if over.load_balancer.is_some() {
            self.load_balancer.clone_from(&over.load_balancer);
        }
        if over.outlier_detection.is_some() {
            self.outlier_detection.clone_from(&over.outlier_detection);
        }
        if over.connection_pool.is_some() {
            self.connection_pool.clone_from(&over.connection_pool);
        }
        self
    }
}

/// One of `portLevelSettings`: the parts for one Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPolicy {
    /// `port.number`.
    pub port: u16,
    /// What it sets for that port.
    pub parts: PolicyParts,
}

/// A `trafficPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrafficPolicy {
    /// For every port.
    pub parts: PolicyParts,
    /// `portLevelSettings`, each port once.
    pub port_level: Vec<PortPolicy>,
}

impl TrafficPolicy {
    /// What it sets for `port` (its own level for the port over its own).
    fn at(&self, port: Option<u16>) -> PolicyParts {
        let own = self.parts.clone();
        match port.and_then(|port| self.port_level.iter().find(|p| p.port == port)) {
            Some(level) => own.overlaid(&level.parts),
            None => own,
        }
    }
}

/// The parts for `port` (none: a port no `portLevelSettings` names) of a destination of `rule`,
/// in `subset` when one: the subset's settings over the rule's, each part on its own.
pub fn merged(
    rule: &TrafficPolicy,
    subset: Option<&TrafficPolicy>,
    port: Option<u16>,
) -> PolicyParts {
    let base = rule.at(port);
    match subset {
        Some(subset) => base.overlaid(&subset.at(port)),
        None => base,
    }
}

/// `trafficPolicy`, as written.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct TrafficPolicyFields {
    load_balancer: Option<LoadBalancer>,
    connection_pool: Option<ConnectionPool>,
    outlier_detection: Option<OutlierFields>,
    tls: Option<ClientTls>,
    port_level_settings: List<PortPolicy>,
}

/// The parts a level sets, checked: its outlier detection, and its `tls` (only what the
/// waypoint does anyway).
fn parts(
    load_balancer: Option<LoadBalancer>,
    connection_pool: Option<ConnectionPool>,
    outlier_detection: Option<OutlierFields>,
    tls: Option<ClientTls>,
) -> Result<PolicyParts, RouteSchemaError> {
    let outlier_detection = outlier_detection.map(OutlierFields::check).transpose()?;
    if let Some(tls) = tls {
        tls.check()?;
    }
    Ok(PolicyParts {
        load_balancer,
        outlier_detection,
        connection_pool,
    })
}

impl TrafficPolicyFields {
    pub(crate) fn check(self) -> Result<TrafficPolicy, RouteSchemaError> {
        let port_level = self.port_level_settings.0;
        for (i, level) in port_level.iter().enumerate() {
            if port_level[..i].iter().any(|p| p.port == level.port) {
                return Err(RouteSchemaError::DuplicatePortLevel(level.port));
            }
        }
        Ok(TrafficPolicy {
            parts: parts(
                self.load_balancer,
                self.connection_pool,
                self.outlier_detection,
                self.tls,
            )?,
            port_level,
        })
    }
}

/// `port` of a port-level setting.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct PortSelector {
    number: Option<u32>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PortPolicyFields {
    port: Option<PortSelector>,
    load_balancer: Option<LoadBalancer>,
    connection_pool: Option<ConnectionPool>,
    outlier_detection: Option<OutlierFields>,
    tls: Option<ClientTls>,
}

impl Checked for PortPolicy {
    type Error = RouteSchemaError;
    type Fields = PortPolicyFields;
    const WHAT: &'static str = "a port-level setting";

    fn check(f: PortPolicyFields) -> Result<Self, RouteSchemaError> {
        let number = f
            .port
            .and_then(|p| p.number)
            .ok_or(RouteSchemaError::OneOf("`port.number`"))?;
        let port = u16::try_from(number)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(RouteSchemaError::Port(i64::from(number)))?;
        Ok(PortPolicy {
            port,
            parts: parts(
                f.load_balancer,
                f.connection_pool,
                f.outlier_detection,
                f.tls,
            )?,
        })
    }
}
