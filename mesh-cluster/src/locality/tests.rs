use std::collections::BTreeSet;

use super::{
    closeness, keep_closest, Distribute, Locality, LocalityLbSetting, LocalityPattern, Place,
    PriorityLabel, TrafficDistribution,
    TrafficDistribution::{PreferSameNode, PreferSameZone},
    ZONE_LABEL,
};
use crate::meta::Labels;

fn at(region: &str, zone: &str, subzone: &str) -> Locality {
    Locality {
        region: region.into(),
        zone: zone.into(),
        subzone: subzone.into(),
    }
}

fn place<'a>(locality: &'a Locality, node: &'a str) -> Place<'a> {
    Place {
        locality,
        node: Some(node),
    }
}

#[test]
fn closeness_counts_the_scopes_shared_from_the_region_down() {
    let here = at("eu", "eu-1a", "");
    let (same_zone, other_zone, other_region) = (
        at("eu", "eu-1a", ""),
        at("eu", "eu-1b", ""),
        at("us", "eu-1a", ""),
    );
    let from = place(&here, "n0");
    assert_eq!(closeness(PreferSameZone, from, place(&same_zone, "n1")), 3);
    assert_eq!(closeness(PreferSameZone, from, place(&other_zone, "n1")), 1);
    // A zone of the same name in another region is not the same zone.
    assert_eq!(
        closeness(PreferSameZone, from, place(&other_region, "n1")),
        0
    );
    // The node counts only for `PreferSameNode`.
    assert_eq!(closeness(PreferSameZone, from, place(&same_zone, "n0")), 3);
    assert_eq!(closeness(PreferSameNode, from, place(&same_zone, "n0")), 4);
    assert_eq!(closeness(PreferSameNode, from, place(&same_zone, "n1")), 3);
    // Unknown localities are equal: nodes without labels are all "close".
    let unknown = Locality::default();
    assert_eq!(
        closeness(PreferSameZone, place(&unknown, "n0"), place(&unknown, "n1")),
        3
    );
}

/// An endpoint's name, locality and node.
type Named<'a> = (&'static str, &'a Locality, &'static str);

/// The names of the `items` closest to node `n0` at `here`.
fn names_closest(
    distribution: Option<TrafficDistribution>,
    items: &[Named<'_>],
    here: &Locality,
) -> Vec<&'static str> {
    let mut kept = items.to_vec();
    keep_closest(
        &mut kept,
        distribution,
        Some(place(here, "n0")),
        |&(_, l, n)| Some(place(l, n)),
    );
    kept.into_iter().map(|(name, _, _)| name).collect()
}

#[test]
fn the_closest_endpoints_are_kept_and_the_next_ones_only_when_none_is_left() {
    let (a, b, c) = (at("eu", "a", ""), at("eu", "b", ""), at("us", "a", ""));
    let endpoints = [
        ("x", &a, "n0"),
        ("y", &a, "n1"),
        ("z", &b, "n2"),
        ("w", &c, "n3"),
    ];
    let closest = |distribution, items: &[Named<'_>]| names_closest(distribution, items, &a);
    assert_eq!(closest(Some(PreferSameZone), &endpoints), ["x", "y"]);
    assert_eq!(closest(Some(PreferSameNode), &endpoints), ["x"]);
    // Zone `a`'s endpoints gone: the region's, then any.
    assert_eq!(closest(Some(PreferSameZone), &endpoints[2..]), ["z"]);
    assert_eq!(closest(Some(PreferSameZone), &endpoints[3..]), ["w"]);
    // No preference: all of them.
    assert_eq!(closest(None, &endpoints).len(), 4);
}

#[test]
fn a_pods_locality_is_its_nodes_unless_its_own_label_says() {
    let node_labels: Labels = [
        ("topology.kubernetes.io/region", "eu"),
        ("topology.kubernetes.io/zone", "eu-1a"),
        ("topology.istio.io/subzone", "rack-4"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let node = Locality::of_node(&node_labels);
    assert_eq!(node, at("eu", "eu-1a", "rack-4"));
    assert_eq!(Locality::of_pod(&Labels::new(), Some(&node)), node);
    let pod: Labels = [("istio-locality".to_owned(), "us.us-2b".to_owned())].into();
    assert_eq!(Locality::of_pod(&pod, Some(&node)), at("us", "us-2b", ""));
    assert_eq!(Locality::of_pod(&Labels::new(), None), Locality::default());
}

#[test]
fn traffic_distributions_are_kubernetes_values() {
    assert_eq!(
        TrafficDistribution::parse("PreferClose"),
        Ok(PreferSameZone)
    );
    assert_eq!(
        TrafficDistribution::parse("PreferSameZone"),
        Ok(PreferSameZone)
    );
    assert_eq!(
        TrafficDistribution::parse("PreferSameNode"),
        Ok(PreferSameNode)
    );
    let refused = TrafficDistribution::parse("PreferRegion").unwrap_err();
    assert!(
        refused.contains("\"PreferRegion\"") && refused.contains("PreferClose"),
        "{refused}"
    );
}

/// Node `name` in region `eu`, zone `zone`.
fn node(name: &str, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: {zone}, kubernetes.io/os: linux}}\n"
    )
}

/// Nodes n0, n1 (zone `a`) and n2 (zone `b`); a client pod on n0; Service `web` with
/// `metadata` and `spec` lines added, and its pods on the nodes `web_nodes`; `extra` objects.
fn cluster(
    (metadata, spec): (&str, &str),
    web_nodes: &[&str],
    extra: &[String],
) -> crate::ClusterState {
    let mut parts = vec![
        node("n0", "a"),
        node("n1", "a"),
        node("n2", "b"),
        crate::tests::pod("shop", "client", "n0", "10.0.0.100", "app: client"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n{metadata}spec:\n  clusterIP: 10.96.0.1\n  ports: [{{port: 80, targetPort: 8080}}]\n  selector: {{app: web}}\n{spec}"
        ),
    ];
    for (i, n) in web_nodes.iter().enumerate() {
        let ip = format!("10.0.0.{}", i + 1);
        parts.push(crate::tests::pod(
            "shop",
            &format!("web-{n}"),
            n,
            &ip,
            "app: web",
        ));
    }
    parts.extend(extra.iter().cloned());
    let objects = crate::tests::parse(&crate::tests::docs(&parts));
    crate::ClusterState::build(&objects, &crate::tests::opts()).expect("builds")
}

/// The pods `client`'s connections to `web` reach (through its waypoint, if bound), over 12
/// connections.
fn reached(state: &crate::ClusterState) -> BTreeSet<String> {
    let client = state.workload_by_name("shop", "client").expect("client");
    (0..12)
        .map(
            |_| match state.resolve_from(Some(client), "10.96.0.1:80".parse().unwrap()) {
                crate::Resolution::Service {
                    workload: Some(w), ..
                } => w.name.clone(),
                crate::Resolution::Waypoint { pod, .. } => pod.name.clone(),
                other => panic!("{other:?}"),
            },
        )
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[test]
fn a_client_reaches_the_endpoints_of_its_zone_then_the_others() {
    let close = ("", "  trafficDistribution: PreferClose\n");
    assert_eq!(
        reached(&cluster(close, &["n1", "n2"], &[])),
        set(&["web-n1"])
    );
    // Zone `a` without an endpoint: zone `b`'s.
    assert_eq!(reached(&cluster(close, &["n2"], &[])), set(&["web-n2"]));
    // `PreferSameNode`: the client's node first, then its zone.
    let node = ("", "  trafficDistribution: PreferSameNode\n");
    assert_eq!(
        reached(&cluster(node, &["n0", "n1", "n2"], &[])),
        set(&["web-n0"])
    );
    assert_eq!(
        reached(&cluster(node, &["n1", "n2"], &[])),
        set(&["web-n1"])
    );
    // Istio's annotation, for an API server without the field.
    let annotated = (
        "  annotations: {networking.istio.io/traffic-distribution: PreferClose}\n",
        "",
    );
    assert_eq!(
        reached(&cluster(annotated, &["n1", "n2"], &[])),
        set(&["web-n1"])
    );
    // No preference: all.
    assert_eq!(
        reached(&cluster(("", ""), &["n1", "n2"], &[])),
        set(&["web-n1", "web-n2"])
    );
    // An unknown value: all, and a warning names the Service and the value.
    let unknown = cluster(
        ("", "  trafficDistribution: PreferMoon\n"),
        &["n1", "n2"],
        &[],
    );
    assert_eq!(reached(&unknown), set(&["web-n1", "web-n2"]));
    assert!(
        unknown
            .warnings()
            .iter()
            .any(|w| w.contains("Service shop/web: spec.trafficDistribution: \"PreferMoon\"")),
        "{:?}",
        unknown.warnings()
    );
}

#[test]
fn a_waypoints_gateway_annotation_keeps_clients_on_its_pods_in_their_zone() {
    let gateway = |annotations: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wp\n  namespace: shop\n  annotations: {{{annotations}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - {{name: mesh, port: 15008, protocol: HBONE}}\n"
        )
    };
    // `web` bound to waypoint `wp`, whose pods run in zones `a` and `b`.
    let waypoints = |annotations: &str| {
        let extra = [
            gateway(annotations),
            crate::tests::waypoint_pod("wp-a", "n1", "10.0.1.1"),
            crate::tests::waypoint_pod("wp-b", "n2", "10.0.1.2"),
        ];
        let bound = ("  labels: {istio.io/use-waypoint: wp}\n", "");
        reached(&cluster(bound, &["n1"], &extra))
    };
    let close = "networking.istio.io/traffic-distribution: PreferClose";
    assert_eq!(waypoints(close), set(&["wp-a"]));
    assert_eq!(waypoints(""), set(&["wp-a", "wp-b"]));
}

#[test]
fn locality_patterns_name_a_region_zone_or_subzone_with_a_last_wildcard() {
    let locality = at("eu", "eu-a", "rack-1");
    for (pattern, matches) in [
        ("eu/eu-a/rack-1", true),
        ("eu/eu-a/*", true),
        ("eu/*", true),
        ("*", true),
        ("eu/eu-a", false),
        ("eu/eu-b/*", false),
        ("us/*", false),
    ] {
        let parsed = LocalityPattern::parse(pattern).expect(pattern);
        assert_eq!(parsed.matches(&locality), matches, "{pattern}");
    }
    assert!(LocalityPattern::parse("eu/eu-a")
        .unwrap()
        .matches(&at("eu", "eu-a", "")));
    for bad in ["", "eu//a", "*/eu-a", "eu/*/rack", "a/b/c/d", "eu/a*"] {
        assert!(LocalityPattern::parse(bad).is_none(), "{bad:?}");
    }
}

/// Workloads in these localities (`name` at region/zone/subzone, with `labels`).
fn workloads(spec: &[(&str, &str, &str, &str, &str)]) -> Vec<crate::Workload> {
    spec.iter()
        .map(|&(name, region, zone, subzone, labels)| {
            let text = crate::tests::pod("shop", name, "n0", "10.0.0.1", labels);
            let objects = crate::tests::parse(&text);
            let state = crate::ClusterState::build(&objects, &crate::tests::opts()).unwrap();
            let mut workload = (**state.workload_by_name("shop", name).unwrap()).clone();
            workload.locality = at(region, zone, subzone);
            workload
        })
        .collect()
}

fn preferred(
    setting: &LocalityLbSetting,
    from: &crate::Workload,
    to: &[crate::Workload],
    roll: u32,
) -> Vec<String> {
    let mut kept: Vec<&crate::Workload> = to.iter().collect();
    setting.keep_preferred(&mut kept, from.site(), |w| Some(w.site()), roll);
    kept.into_iter().map(|w| w.name.clone()).collect()
}

#[test]
fn locality_failover_goes_to_the_zone_then_the_region_then_the_failover_region() {
    let from = &workloads(&[("waypoint", "r1", "z1", "", "")])[0];
    let all = workloads(&[
        ("same-zone", "r1", "z1", "", ""),
        ("same-region", "r1", "z2", "", ""),
        ("failover", "r2", "z3", "", ""),
        ("other", "r3", "z4", "", ""),
    ]);
    let setting = LocalityLbSetting {
        failover: vec![("r1".into(), "r2".into())],
        ..LocalityLbSetting::default()
    };
    // Istio's failover task: priority 0 the zone, then the region, then r2 (failover), then r3.
    for (i, expected) in ["same-zone", "same-region", "failover", "other"]
        .iter()
        .enumerate()
    {
        assert_eq!(preferred(&setting, from, &all[i..], 0), [*expected]);
    }
    // Without `failover`, r2 and r3 alike.
    let plain = LocalityLbSetting::default();
    assert_eq!(preferred(&plain, from, &all[2..], 0), ["failover", "other"]);
    // Disabled: all.
    let off = LocalityLbSetting {
        enabled: false,
        ..LocalityLbSetting::default()
    };
    assert_eq!(preferred(&off, from, &all, 0).len(), 4);
}

#[test]
fn failover_priority_ranks_by_the_labels_shared_in_order() {
    let from = &workloads(&[("waypoint", "r1", "z1", "", "tier: gold, rack: a")])[0];
    let all = workloads(&[
        ("gold-a", "r2", "z9", "", "tier: gold, rack: a"),
        ("gold-b", "r1", "z1", "", "tier: gold, rack: b"),
        ("silver", "r1", "z1", "", "tier: silver, rack: a"),
    ]);
    let label = |key: &str, value: Option<&str>| PriorityLabel {
        key: key.into(),
        value: value.map(Into::into),
    };
    let setting = LocalityLbSetting {
        failover_priority: vec![label("tier", None), label("rack", None)],
        ..LocalityLbSetting::default()
    };
    assert_eq!(preferred(&setting, from, &all, 0), ["gold-a"]);
    assert_eq!(preferred(&setting, from, &all[1..], 0), ["gold-b"]);
    // A value given overrides the waypoint's own; the topology labels read the locality.
    let setting = LocalityLbSetting {
        failover_priority: vec![label("tier", Some("silver")), label(ZONE_LABEL, None)],
        ..LocalityLbSetting::default()
    };
    assert_eq!(preferred(&setting, from, &all, 0), ["silver"]);
}

#[test]
fn distribute_shares_requests_among_localities_by_weight() {
    let from = &workloads(&[("waypoint", "r1", "z1", "", "")])[0];
    let all = workloads(&[
        ("z1-a", "r1", "z1", "", ""),
        ("z1-b", "r1", "z1", "", ""),
        ("z2", "r1", "z2", "", ""),
    ]);
    let pattern = |p: &str| LocalityPattern::parse(p).unwrap();
    let setting = LocalityLbSetting {
        distribute: vec![Distribute {
            from: pattern("r1/z1/*"),
            to: vec![
                (pattern("r1/z1/*"), 80),
                (pattern("r1/z2/*"), 20),
                (pattern("r9/*"), 0),
            ],
        }],
        ..LocalityLbSetting::default()
    };
    assert_eq!(preferred(&setting, from, &all, 0), ["z1-a", "z1-b"]);
    assert_eq!(preferred(&setting, from, &all, 79), ["z1-a", "z1-b"]);
    assert_eq!(preferred(&setting, from, &all, 80), ["z2"]);
    assert_eq!(preferred(&setting, from, &all, 99), ["z2"]);
    // z1 empty: z2 takes every request.
    assert_eq!(preferred(&setting, from, &all[2..], 10), ["z2"]);
    // A waypoint no rule is from: by priority, as without `distribute`.
    let elsewhere = &workloads(&[("waypoint", "r1", "z2", "", "")])[0];
    assert_eq!(preferred(&setting, elsewhere, &all, 0), ["z2"]);
}
