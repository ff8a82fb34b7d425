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

/// A workload as locality load balancing sees it: where it runs, and its labels
/// (`failoverPriority`).
#[derive(Clone, Copy, Debug)]
pub struct Site<'a> {
    /// Where it runs.
    pub place: Place<'a>,
    /// Its labels.
    pub labels: &'a Labels,
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

/// A `DestinationRule`'s `loadBalancer.localityLbSetting`: how the waypoint prefers endpoints
/// by where they run, from where it runs. As in Istio, it applies only to a destination with
/// `outlierDetection` (which tells which endpoints to fail over from), and is on by default
/// there: the endpoints sharing the most of region, zone and subzone with the waypoint take
/// the requests, then those of a `failover` region, then any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalityLbSetting {
    /// `enabled` (default true).
    pub enabled: bool,
    /// `distribute`: the share of requests each locality gets, by the waypoint's locality.
    pub distribute: Vec<Distribute>,
    /// `failover`: the region to fail over to from a region (before any other).
    pub failover: Vec<(String, String)>,
    /// `failoverPriority`: labels whose values the endpoints should share with the waypoint,
    /// in order.
    pub failover_priority: Vec<PriorityLabel>,
}

impl Default for LocalityLbSetting {
    fn default() -> Self {
        Self {
            enabled: true,
            distribute: Vec::new(),
            failover: Vec::new(),
            failover_priority: Vec::new(),
        }
    }
}

/// One of `distribute`: from the waypoint's locality `from`, the weights (adding up to 100) of
/// the localities `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Distribute {
    /// The waypoints it is for.
    pub from: LocalityPattern,
    /// The localities and their weights.
    pub to: Vec<(LocalityPattern, u32)>,
}

/// `region`, `region/zone` or `region/zone/subzone`, with `*` as its last part for any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalityPattern {
    parts: Vec<String>,
    wildcard: bool,
}

impl LocalityPattern {
    /// Reads a pattern; `None` when it is not one.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts: Vec<String> = text.split('/').map(str::to_owned).collect();
        let wildcard = parts.last().is_some_and(|p| p == "*");
        if wildcard {
            parts.pop();
        }
        let valid = parts.len() <= 3
            && (wildcard || !parts.is_empty())
            && parts.iter().all(|p| !p.is_empty() && !p.contains('*'));
        valid.then_some(Self { parts, wildcard })
    }

    /// Whether `locality` is one it names.
    #[must_use]
    pub fn matches(&self, locality: &Locality) -> bool {
        let own = [&locality.region, &locality.zone, &locality.subzone];
        let named = self.parts.iter().zip(own).all(|(p, l)| p == l);
        named && (self.wildcard || own[self.parts.len()..].iter().all(|l| l.is_empty()))
    }
}

/// One of `failoverPriority`: a label (`key`), or a label with the value to match instead of
/// the waypoint's own (`key=value`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriorityLabel {
    /// The label's key.
    pub key: String,
    /// The value endpoints should have, when given.
    pub value: Option<String>,
}

/// The value of label `key` for a workload: its locality's for the topology labels (a single
/// network and cluster: the same for all), else its own label's.
fn label_value<'a>(site: Site<'a>, key: &str) -> Option<&'a str> {
    let locality = site.place.locality;
    match key {
        REGION_LABEL => Some(&locality.region),
        ZONE_LABEL => Some(&locality.zone),
        SUBZONE_LABEL => Some(&locality.subzone),
        "topology.istio.io/network" | "topology.istio.io/cluster" => Some(""),
        _ => site.labels.get(key).map(String::as_str),
    }
}

impl LocalityLbSetting {
    /// Keeps the `items` the waypoint `from` should send a request to now: under `distribute`,
    /// those of the locality `roll` (0-99) falls on among those that have any, by their
    /// weights; else the best-ranked (`failoverPriority`'s labels shared in order, then the
    /// scopes of the locality shared, a `failover` region counting over other regions). An item
    /// without a workload ranks last.
    pub fn keep_preferred<'s, T>(
        &self,
        items: &mut Vec<T>,
        from: Site<'_>,
        site: impl Fn(&T) -> Option<Site<'s>>,
        roll: u32,
    ) {
        if !self.enabled || items.is_empty() {
            return;
        }
        let in_pattern = |item: &T, pattern: &LocalityPattern| {
            site(item).is_some_and(|s| pattern.matches(s.place.locality))
        };
        let from_locality = from.place.locality;
        if let Some(rule) = self
            .distribute
            .iter()
            .find(|d| d.from.matches(from_locality))
        {
            let present: Vec<(&LocalityPattern, u32)> = rule
                .to
                .iter()
                .filter(|(pattern, weight)| {
                    *weight > 0 && items.iter().any(|i| in_pattern(i, pattern))
                })
                .map(|(pattern, weight)| (pattern, *weight))
                .collect();
            let total: u32 = present.iter().map(|(_, w)| w).sum();
            if total == 0 {
                return;
            }
            let mut point = roll % 100 * total / 100;
            for (pattern, weight) in present {
                if point < weight {
                    items.retain(|i| in_pattern(i, pattern));
                    return;
                }
                point -= weight;
            }
            return;
        }
        let rank = |item: &T| -> (usize, u8) {
            let Some(to) = site(item) else {
                return (0, 0);
            };
            let labels = self
                .failover_priority
                .iter()
                .take_while(|label| {
                    let wanted = match &label.value {
                        Some(value) => Some(value.as_str()),
                        None => label_value(from, &label.key),
                    };
                    wanted.is_some() && wanted == label_value(to, &label.key)
                })
                .count();
            let shared = closeness(TrafficDistribution::PreferSameZone, from.place, to.place);
            let to_region = &to.place.locality.region;
            let failover = shared == 0
                && self
                    .failover
                    .iter()
                    .any(|(f, t)| *f == from_locality.region && t == to_region);
            (labels, shared * 2 + u8::from(failover))
        };
        let Some(best) = items.iter().map(rank).max() else {
            return;
        };
        items.retain(|item| rank(item) == best);
    }
}

#[cfg(test)]
mod tests;
