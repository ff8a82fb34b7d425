//! Reaching and acting on the control plane as someone: more client certificates, service-account
//! tokens, kubeconfigs and clients for them, and the API server exposed inside a node's network
//! namespace.

use std::{net::SocketAddr, path::Path, sync::atomic::Ordering};

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
};
use kube::{api::PostParams, Api, Client};

use super::{forward, kubeconfig, ControlPlane, Credentials, Error, Result, KUBERNETES_SERVICE_IP};
use crate::Node;

impl ControlPlane {
    /// Issues a client certificate for user `user` in `group` (e.g. `system:node:n0` in
    /// `system:nodes` for a kubelet), written as `<file>.crt` and `.key` in [`Self::dir`].
    pub fn issue_client_cert(
        &self,
        file: &str,
        user: &str,
        group: Option<&str>,
    ) -> Result<Credentials> {
        Ok(Credentials::ClientCert(self.pki.client(file, user, group)?))
    }

    /// A token for service account `namespace/name` from the `TokenRequest` API (one hour).
    pub fn service_account_token(&self, namespace: &str, name: &str) -> Result<String> {
        self.service_account_token_for(namespace, name, None)
    }

    /// A token for service account `namespace/name` from the `TokenRequest` API (one hour), for
    /// `audience` (the API server's own when `None`): what a pod run under that account is
    /// given in a projected volume.
    pub fn service_account_token_for(
        &self,
        namespace: &str,
        name: &str,
        audience: Option<&str>,
    ) -> Result<String> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                audiences: audience.map(|a| vec![a.to_owned()]),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let response = self
            .block_on(api.create_token_request(name, &PostParams::default(), &request))
            .map_err(|e| Error::Api {
                what: format!("requesting a token for service account {namespace}/{name}"),
                source: e,
            })?;
        response
            .status
            .and_then(|s| s.token)
            .ok_or_else(|| Error::Invalid {
                what: format!("the token request for {namespace}/{name}"),
                detail: "the answer holds no token".into(),
            })
    }

    /// Writes a kubeconfig at `path` for `credentials`, pointing at `server` (the API server's
    /// own address, or one returned by [`Self::expose_in`] for processes in that namespace).
    pub fn write_kubeconfig(
        &self,
        path: &Path,
        server: SocketAddr,
        credentials: &Credentials,
    ) -> Result<()> {
        kubeconfig::write(path, server, &self.files.ca_cert, credentials)
    }

    /// A client acting as `credentials`, through a kubeconfig written in [`Self::dir`].
    pub fn client_for(&self, credentials: &Credentials) -> Result<Client> {
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        let path = kubeconfig::file_in(&self.scratch.dir, &format!("client-{n}"));
        self.write_kubeconfig(&path, self.apiserver_addr(), credentials)?;
        self.client_from(&path)
    }

    /// A client configured by the kubeconfig at `path`, read as kubectl reads it. A kubeconfig
    /// written for an [`Self::expose_in`] address works from the root namespace too: that is
    /// `127.0.0.1:<API server port>`, where the API server itself listens.
    pub fn client_from(&self, path: &Path) -> Result<Client> {
        self.block_on(kubeconfig::client(path))
    }

    /// Makes the API server reachable at the returned address (`127.0.0.1:<its port>`) from
    /// inside the network namespace at `netns` (e.g. `/run/netns/<name>`), through a forwarder
    /// whose listening socket lives there. Once per namespace: a second call returns the same
    /// address.
    pub fn expose_in(&self, netns: &Path) -> Result<SocketAddr> {
        let mut forwarders = self.forwarders.lock().expect("forwarders lock");
        if let Some(existing) = forwarders.iter().find(|f| f.netns == netns) {
            return Ok(existing.listen);
        }
        let handle = self.runtime().handle();
        let forwarder = forward::start(handle, netns, self.apiserver_addr())?;
        let listen = forwarder.listen;
        forwarders.push(forwarder);
        Ok(listen)
    }

    /// [`Self::expose_in`] the namespace of a testbed node.
    pub fn expose_on(&self, node: &Node) -> Result<SocketAddr> {
        self.expose_in(&node.netns_path())
    }

    /// Makes the API server reachable on the node at the `kubernetes` Service's address
    /// ([`KUBERNETES_SERVICE_IP`]`:443`), what kube-proxy does for that one Service on a real
    /// node: the address goes on the node namespace's loopback device, and a forwarder listens
    /// on it. Its host-network pods reach it there, and its other pods through their route to
    /// the node; in-cluster clients (`KUBERNETES_SERVICE_HOST`) verify the API server's own
    /// certificate, which names that address. Once per node.
    pub fn expose_service_on(&self, node: &Node) -> Result<SocketAddr> {
        let listen = SocketAddr::from((KUBERNETES_SERVICE_IP, 443));
        let netns = node.netns_path();
        let mut forwarders = self.forwarders.lock().expect("forwarders lock");
        if let Some(existing) = forwarders
            .iter()
            .find(|f| f.netns == netns && f.listen == listen)
        {
            return Ok(existing.listen);
        }
        address_on_loopback(node, KUBERNETES_SERVICE_IP)?;
        let handle = self.runtime().handle();
        let forwarder = forward::start_at(handle, &netns, listen, self.apiserver_addr())?;
        forwarders.push(forwarder);
        Ok(listen)
    }
}

/// Puts `ip` on the loopback device of `node`'s namespace, where a Service's address is served
/// on the node (the `kubernetes` Service's forwarder, the cluster DNS).
pub(super) fn address_on_loopback(node: &Node, ip: std::net::Ipv4Addr) -> Result<()> {
    crate::process::run(std::process::Command::new("ip").args([
        "-n",
        &node.netns,
        "addr",
        "replace",
        &format!("{ip}/32"),
        "dev",
        "lo",
    ]))?;
    Ok(())
}
