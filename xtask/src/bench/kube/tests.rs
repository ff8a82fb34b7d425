//! Unit tests of the generated objects and the report's arithmetic.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Pod;

use super::{
    objects::{bench_pod, churn_step, pod_ip, pod_name},
    report::percentile,
};

#[test]
fn pods_look_like_a_deployments_and_stay_apart() {
    let (ns, name) = pod_name(123);
    assert_eq!(ns, "bench-12");
    assert!(name.starts_with("shipping-012-"), "{name}");
    assert_eq!(pod_ip(0), Ipv4Addr::new(10, 64, 1, 0));
    assert_eq!(pod_ip(9_999), Ipv4Addr::new(10, 64, 40, 15));
    assert_ne!(pod_name(1).1, pod_name(2).1);
    let pod = bench_pod(0, "sim-000");
    let applied = pod["metadata"]["annotations"]
        ["kubectl.kubernetes.io/last-applied-configuration"]
        .as_str()
        .unwrap();
    assert!((1_500..3_500).contains(&applied.len()), "{}", applied.len());
    let _: Pod = serde_json::from_value(pod).unwrap();
}

#[test]
fn churn_flaps_each_pod_and_ends_ready() {
    assert_eq!(churn_step(0, 1000).0, churn_step(1, 1000).0);
    assert!(!churn_step(0, 1000).1 && churn_step(1, 1000).1);
    assert!((percentile(&[1.0, 2.0, 3.0, 4.0], 0.5) - 2.0).abs() < 1e-9);
    assert!((percentile(&[1.0, 2.0, 3.0, 4.0], 1.0) - 4.0).abs() < 1e-9);
}
