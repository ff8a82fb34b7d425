//! Where a workload runs (region, zone, subzone and node), and a Service's wish to keep its
//! traffic close: Kubernetes' `spec.trafficDistribution` (`PreferClose`, `PreferSameZone`,
//! `PreferSameNode`), or Istio's annotation `networking.istio.io/traffic-distribution` for
//! clusters whose API server lacks the field (and on a waypoint's `Gateway`, for the waypoint's
//! own pods).
//!
//! As ztunnel's failover mode: a destination is ranked by how many of the scopes region, zone,
//! subzone (and node, for `PreferSameNode`) it shares with the source, in that order, stopping
//! at the first that differs; the best-ranked ready endpoints take the connection, and only when
//! there are none of them do the next ones. A Service without the setting spreads over all its
//! endpoints.
//!
//! A pod's locality is its node's labels `topology.kubernetes.io/region` and `…/zone` and
//! Istio's `topology.istio.io/subzone`, or the pod's own label `istio-locality`
//! (`region.zone.subzone`), which Istio lets override them.

use crate::meta::Labels;

/// The node label naming its region.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The node label naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Istio's node label naming its subzone.
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
/// Istio's pod label overriding its node's locality: `region.zone.subzone`.
pub const POD_LOCALITY_LABEL: &str = "istio-locality";
/// Istio's annotation asking for a traffic distribution (on a Service, or a waypoint's
/// `Gateway`).
pub const TRAFFIC_DISTRIBUTION_ANNOTATION: &str = "networking.istio.io/traffic-distribution";

/// Where a workload runs; empty parts are unknown (and equal to each other, as in ztunnel).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    /// `topology.kubernetes.io/region`.
    pub region: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: String,
    /// `topology.istio.io/subzone`.
    pub subzone: String,
}

impl Locality {
    /// A node's locality, from its labels.
    #[must_use]
    pub fn of_node(labels: &Labels) -> Self {
        let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
        Self {
            region: label(REGION_LABEL),
            zone: label(ZONE_LABEL),
            subzone: label(SUBZONE_LABEL),
        }
    }

    /// A pod's locality: its label `istio-locality` when it has one, else its node's.
    #[must_use]
    pub fn of_pod(pod_labels: &Labels, node: Option<&Locality>) -> Self {
        match pod_labels.get(POD_LOCALITY_LABEL) {
            Some(value) => {
                let mut parts = value.splitn(3, '.').map(str::to_owned);
                Self {
                    region: parts.next().unwrap_or_default(),
                    zone: parts.next().unwrap_or_default(),
                    subzone: parts.next().unwrap_or_default(),
                }
            }
            None => node.cloned().unwrap_or_default(),
        }
    }
}

/// How a Service's traffic prefers its endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficDistribution {
    /// `PreferClose` or `PreferSameZone`: the endpoints of the source's zone (and region, and
    /// subzone) first.
    PreferSameZone,
    /// `PreferSameNode`: the endpoints of the source's node first, then as `PreferSameZone`.
    PreferSameNode,
}

impl TrafficDistribution {
    /// Its name, as Kubernetes spells it (`PreferClose` reads as `PreferSameZone`, its
    /// newer name).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PreferSameZone => "PreferSameZone",
            Self::PreferSameNode => "PreferSameNode",
        }
    }

    /// Reads a value of `spec.trafficDistribution` or of the annotation; `Err` names the
    /// values known.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "PreferClose" | "PreferSameZone" => Ok(Self::PreferSameZone),
            "PreferSameNode" => Ok(Self::PreferSameNode),
            other => Err(format!(
                "{other:?} is not a traffic distribution this mesh knows (PreferClose, \
                 PreferSameZone, PreferSameNode); the traffic is spread over every endpoint"
            )),
        }
    }
}

/// Where a source or a destination runs: its locality and node.
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    /// Region, zone and subzone.
    pub locality: &'a Locality,
    /// The node's name, when known.
    pub node: Option<&'a str>,
}

/// How close `to` is to `from` under `distribution`: the number of scopes (region, zone,
/// subzone, then node for `PreferSameNode`) they share, counted from the first until one
/// differs.
#[must_use]
pub fn closeness(distribution: TrafficDistribution, from: Place<'_>, to: Place<'_>) -> u8 {
    let scopes = [
        from.locality.region == to.locality.region,
        from.locality.zone == to.locality.zone,
        from.locality.subzone == to.locality.subzone,
    ];
    let mut shared = 0;
    for same in scopes {
        if !same {
            return shared;
        }
        shared += 1;
    }
    if distribution == TrafficDistribution::PreferSameNode
        && from.node.is_some()
        && from.node == to.node
    {
        shared += 1;
    }
    shared
}

/// Keeps the closest of `items` to `from` (those of the best closeness; all of them when
/// `distribution` is `None` or nothing is known of `from`).
pub fn keep_closest<'p, T>(
    items: &mut Vec<T>,
    distribution: Option<TrafficDistribution>,
    from: Option<Place<'_>>,
    place: impl Fn(&T) -> Option<Place<'p>>,
) {
    let (Some(distribution), Some(from)) = (distribution, from) else {
        return;
    };
    let rank = |item: &T| place(item).map_or(0, |to| closeness(distribution, from, to));
    let Some(best) = items.iter().map(rank).max() else {
        return;
    };
    items.retain(|item| rank(item) == best);
}

#[cfg(test)]
mod tests;
