//! Addresses that can never be a pod's own or a service's endpoint: the agent binds its
//! listeners to a pod's address and steers traffic by it, so these are refused when the view is
//! built, naming the object and field.

use std::net::IpAddr;

/// Why `ip` can never be a pod's own address, if so: the agent binds its listeners to a pod's
/// address, and steers the pod's traffic by it.
pub(crate) fn unusable_pod_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_unspecified() {
                Some("unspecified")
            } else if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if v4.is_broadcast() {
                Some("broadcast")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unicast_link_local() {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}
