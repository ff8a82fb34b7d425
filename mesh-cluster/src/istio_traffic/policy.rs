//! A `DestinationRule`'s `trafficPolicy` (the rule's and a subset's) with its
//! `portLevelSettings`, and how they combine for one destination as Istio merges them: for each
//! part (load balancer, outlier detection, connection pool), the subset's setting for the port,
//! else the subset's, else the rule's for the port, else the rule's.

use std::time::Duration;

use serde::Deserialize;

use super::{
    istio_port, percentage, ConnectionPool, IstioDuration, LoadBalancerSettings, OutlierDetection,
};
use crate::{
    gateway_api::RouteSchemaError,
    schema::{Checked, List, Parsed},
};

/// What one level of a `trafficPolicy` sets; what it leaves out comes from the level below.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyParts {
    /// `loadBalancer`; round robin when no level sets it.
    pub load_balancer: Option<LoadBalancerSettings>,
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
    load_balancer: Option<LoadBalancerSettings>,
    connection_pool: Option<ConnectionPool>,
    outlier_detection: Option<OutlierFields>,
    tls: Option<ClientTls>,
    port_level_settings: List<PortPolicy>,
}

/// The parts a level sets, checked: its outlier detection, and its `tls` (only what the
/// waypoint does anyway).
fn parts(
    load_balancer: Option<LoadBalancerSettings>,
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
    load_balancer: Option<LoadBalancerSettings>,
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
        let port = istio_port(number)?;
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

/// `trafficPolicy.tls`: `ISTIO_MUTUAL` (often written in `DestinationRules` from older Istio
/// docs) is what the waypoint does toward the mesh's endpoints anyway; other modes, and the
/// fields that go with them, are refused.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ClientTls {
    mode: Option<String>,
}

impl ClientTls {
    pub(crate) fn check(self) -> Result<(), RouteSchemaError> {
        match self.mode {
            Some(mode) if mode != "ISTIO_MUTUAL" => Err(RouteSchemaError::TlsMode(mode)),
            _ => Ok(()),
        }
    }
}

/// `outlierDetection`, as Istio writes it.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct OutlierFields {
    #[serde(rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<u32>,
    consecutive_gateway_errors: Option<u32>,
    /// Deprecated in Istio for `consecutive5xxErrors`.
    consecutive_errors: Option<u32>,
    interval: Option<Parsed<IstioDuration>>,
    base_ejection_time: Option<Parsed<IstioDuration>>,
    max_ejection_percent: Option<u32>,
    min_health_percent: Option<u32>,
    split_external_local_origin_errors: Option<bool>,
    consecutive_local_origin_failures: Option<u32>,
}

impl OutlierFields {
    pub(crate) fn check(self) -> Result<OutlierDetection, RouteSchemaError> {
        // `consecutiveLocalOriginFailures` counts only when the errors are split, as in Envoy.
        let consecutive_local_origin = (self.split_external_local_origin_errors == Some(true))
            .then(|| self.consecutive_local_origin_failures.unwrap_or(5));
        for value in [self.max_ejection_percent, self.min_health_percent]
            .into_iter()
            .flatten()
        {
            percentage(f64::from(value))?;
        }
        let time = |d: Option<Parsed<IstioDuration>>, default: u64| {
            d.map_or(Duration::from_secs(default), |d| d.0 .0)
        };
        let outlier = OutlierDetection {
            consecutive_5xx: self
                .consecutive_5xx_errors
                .or(self.consecutive_errors)
                .unwrap_or(5),
            consecutive_gateway: self.consecutive_gateway_errors.unwrap_or(0),
            interval: time(self.interval, 10),
            base_ejection_time: time(self.base_ejection_time, 30),
            max_ejection_percent: self.max_ejection_percent.unwrap_or(10),
            min_health_percent: self.min_health_percent.unwrap_or(0),
            consecutive_local_origin,
        };
        if outlier.interval < Duration::from_millis(1)
            || outlier.base_ejection_time < Duration::from_millis(1)
        {
            return Err(RouteSchemaError::Unsupported(
                "outlierDetection with an interval or baseEjectionTime under 1ms",
            ));
        }
        Ok(outlier)
    }
}
