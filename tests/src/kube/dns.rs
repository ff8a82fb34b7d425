//! The testbed's cluster DNS: what `CoreDNS`'s `kubernetes` plugin answers, served on every node
//! at the `kube-dns` Service's address as `NodeLocal DNSCache` serves it (the address on the node
//! namespace's loopback, a UDP server there), so pods reach it through their route to the node.
//! Pods get it from the testbed kubelet with [`super::kubelet::KubeletOptions::cluster_dns`].
//!
//! It answers `A` queries for `<service>.<namespace>.svc.cluster.local` with the Service's
//! cluster IPv4 address, from a reflector of the API server's Services, and a headless Service's
//! name (`clusterIP: None`) with the IPv4 addresses of its ready endpoints, from a reflector of
//! the `EndpointSlices` (the testbed runs no kube-proxy: a headless Service is how its unmeshed
//! pods reach another pod by name); `AAAA` and other types of a known name get an empty answer
//! (the testbed's pods use IPv4), unknown names in `cluster.local` `NXDOMAIN`, and names outside
//! it `REFUSED`: the testbed has no upstream resolver. The `kube-dns` Service (in
//! `kube-system`, without selector) is created to hold the address, so no other Service is
//! given it.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket},
    pin::pin,
};

use crate::dns_reply::Known;
use futures_util::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    api::{Patch, PatchParams},
    runtime::{reflector, watcher, WatchStreamExt as _},
    Api, ResourceExt as _,
};
use serde_json::json;
use tokio::{net::UdpSocket, task::JoinHandle};

use super::{forward, ControlPlane, Error, Result};
use crate::Node;

/// The `kube-dns` Service's address, and so the pods' name server.
pub const CLUSTER_DNS_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 10);
/// The cluster's domain.
const DOMAIN: &str = "svc.cluster.local";
/// Time to live of the answers, in seconds (`CoreDNS`'s default).
const TTL: u32 = 5;

/// The cluster DNS; dropping it stops the servers and the reflector.
#[derive(Debug)]
pub struct ClusterDns {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ClusterDns {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ControlPlane {
    /// Starts the cluster DNS on `nodes` (see the module's documentation).
    pub fn serve_dns_on(&self, nodes: &[Node]) -> Result<ClusterDns> {
        let kube_dns: Api<Service> = Api::namespaced(self.client(), "kube-system");
        let object = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system",
                         "labels": {"k8s-app": "kube-dns"}},
            "spec": {"clusterIP": CLUSTER_DNS_IP.to_string(), "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ]},
        });
        self.block_on(kube_dns.patch(
            "kube-dns",
            &PatchParams::apply(super::crds::FIELD_MANAGER),
            &Patch::Apply(&object),
        ))
        .map_err(|e| Error::Api {
            what: "creating the kube-dns Service".into(),
            source: e,
        })?;
        let handle = self.runtime().handle().clone();
        let (services, services_task) =
            self.reflect(Api::<Service>::all(self.client()), "Service")?;
        let (slices, slices_task) =
            self.reflect(Api::<EndpointSlice>::all(self.client()), "EndpointSlice")?;
        let mut tasks = vec![services_task, slices_task];
        let known = Names { services, slices };
        for node in nodes {
            super::access::address_on_loopback(node, CLUSTER_DNS_IP)?;
            let addr = SocketAddr::from((CLUSTER_DNS_IP, 53));
            let what = format!("the cluster DNS on {addr} in node {}", node.name);
            let socket = forward::socket_in(&node.netns_path(), what.clone(), move || {
                let socket = StdUdpSocket::bind(addr)?;
                socket.set_nonblocking(true)?;
                Ok(socket)
            })?;
            let socket = {
                let _entered = handle.enter();
                UdpSocket::from_std(socket).map_err(crate::io_err(what))?
            };
            tasks.push(handle.spawn(serve(socket, known.clone())));
        }
        Ok(ClusterDns { tasks })
    }

    /// A store of every `K` in the cluster, kept by a reflector on a task of the testbed's
    /// runtime, once it has listed them.
    fn reflect<K>(&self, api: Api<K>, kind: &str) -> Result<(reflector::Store<K>, JoinHandle<()>)>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let (store, writer) = reflector::store();
        let task = self.runtime().spawn(async move {
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .applied_objects();
            let mut stream = pin!(stream);
            while stream.next().await.is_some() {}
        });
        if let Err(e) = self.block_on(store.wait_until_ready()) {
            task.abort();
            return Err(Error::Setup(format!(
                "the cluster DNS's {kind} reflector: {e}"
            )));
        }
        Ok((store, task))
    }
}

/// What the cluster DNS answers from: the Services, and the endpoints of the headless ones.
#[derive(Clone)]
struct Names {
    services: reflector::Store<Service>,
    slices: reflector::Store<EndpointSlice>,
}

/// Answers queries on `socket` for ever.
async fn serve(socket: UdpSocket, services: Names) {
    let mut buffer = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buffer).await else {
            continue;
        };
        let Some(answer) = answer(&buffer[..n], &services) else {
            continue;
        };
        let _ = socket.send_to(&answer, peer).await;
    }
}

/// The answer to the query in `packet`; `None` for what is no query (nothing is sent back).
fn answer(packet: &[u8], known: &Names) -> Option<Vec<u8>> {
    crate::dns_reply::reply(packet, TTL, |name, _| match resolve(name, known) {
        Resolved::Outside => Known::Refused,
        Resolved::Unknown => Known::NoSuchName,
        Resolved::Addresses(ips) => Known::Addresses(ips),
    })
}

/// What a name is.
#[derive(Debug, PartialEq, Eq)]
enum Resolved {
    /// Not in the cluster's domain.
    Outside,
    /// In it, but no Service with an IPv4 cluster address, or headless with ready IPv4
    /// endpoints, has that name.
    Unknown,
    Addresses(Vec<Ipv4Addr>),
}

fn resolve(name: &str, known: &Names) -> Resolved {
    let Some(rest) = name.strip_suffix(DOMAIN).and_then(|r| r.strip_suffix('.')) else {
        return if name == "cluster.local" || name.ends_with(".cluster.local") {
            Resolved::Unknown
        } else {
            Resolved::Outside
        };
    };
    let Some((service, namespace)) = rest.split_once('.') else {
        return Resolved::Unknown;
    };
    let found = known
        .services
        .state()
        .into_iter()
        .find(|s| s.name_any() == service && s.namespace().as_deref() == Some(namespace));
    let cluster_ip = found
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.cluster_ip.as_deref());
    if cluster_ip == Some("None") {
        let ready = ready_endpoints(&known.slices, namespace, service);
        return if ready.is_empty() {
            Resolved::Unknown
        } else {
            Resolved::Addresses(ready)
        };
    }
    match cluster_ip.and_then(|ip| ip.parse::<IpAddr>().ok()) {
        Some(IpAddr::V4(ip)) => Resolved::Addresses(vec![ip]),
        _ => Resolved::Unknown,
    }
}

/// The IPv4 addresses of the ready endpoints of Service `namespace`/`service`, as `CoreDNS`
/// answers a headless Service's name.
fn ready_endpoints(
    slices: &reflector::Store<EndpointSlice>,
    namespace: &str,
    service: &str,
) -> Vec<Ipv4Addr> {
    let mut ready: Vec<Ipv4Addr> = slices
        .state()
        .iter()
        .filter(|slice| {
            slice.namespace().as_deref() == Some(namespace)
                && slice.address_type == "IPv4"
                && slice
                    .labels()
                    .get("kubernetes.io/service-name")
                    .map(String::as_str)
                    == Some(service)
        })
        .flat_map(|slice| slice.endpoints.iter().flatten())
        .filter(|endpoint| {
            endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true)
        })
        .flat_map(|endpoint| endpoint.addresses.iter())
        .filter_map(|address| address.parse().ok())
        .collect();
    ready.sort_unstable();
    ready.dedup();
    ready
}
