//! Kubeconfig files: the admin's, the controller manager's and the scheduler's, and any other
//! identity a test needs (a node's client certificate, a service account's token), pointing at
//! the API server directly or at a forwarder inside a node's namespace. Files name the
//! certificate files rather than embedding them, so a process in a node's network namespace
//! (same file system) reads the same ones.

use std::{
    fs,
    io::Write as _,
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use kube::config::{KubeConfigOptions, Kubeconfig};

use super::{pki::CertFiles, Error, Result};

/// Who a kubeconfig (or a client) authenticates as.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// A client certificate signed by the control plane's CA: the user is its CN, the group
    /// its O (`system:masters` for the admin, `system:nodes` for a kubelet).
    ClientCert(CertFiles),
    /// A bearer token, e.g. a service-account token obtained with `TokenRequest`.
    Token(String),
}

/// Writes a kubeconfig (mode 0600: it may hold a token) for `credentials` at
/// `https://<server>`, trusting `ca_cert`.
pub fn write(
    path: &Path,
    server: SocketAddr,
    ca_cert: &Path,
    credentials: &Credentials,
) -> Result<()> {
    let text = render(server, ca_cert, credentials);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(crate::io_err(format!("creating {}", path.display())))?;
    file.write_all(text.as_bytes())
        .map_err(crate::io_err(format!("writing {}", path.display())))?;
    Ok(())
}

/// The kubeconfig's text. Strings are JSON-quoted, which YAML reads as they are.
fn render(server: SocketAddr, ca_cert: &Path, credentials: &Credentials) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let path = |p: &Path| quote(&p.display().to_string());
    let user = match credentials {
        Credentials::ClientCert(files) => format!(
            "    client-certificate: {}\n    client-key: {}\n",
            path(&files.cert),
            path(&files.key)
        ),
        Credentials::Token(token) => format!("    token: {}\n", quote(token)),
    };
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: mesh-tests\n  \
           cluster:\n    \
             server: {server}\n    \
             certificate-authority: {ca}\n\
         users:\n\
         - name: mesh-tests\n  \
           user:\n{user}\
         contexts:\n\
         - name: mesh-tests\n  \
           context:\n    \
             cluster: mesh-tests\n    \
             user: mesh-tests\n\
         current-context: mesh-tests\n",
        server = quote(&format!("https://{server}")),
        ca = path(ca_cert),
    )
}

/// A client configured by the kubeconfig at `path` (read as kubectl would read it). Must be
/// called within a tokio runtime: the client's worker task runs on it.
pub async fn client(path: &Path) -> Result<kube::Client> {
    let what = || format!("loading kubeconfig {}", path.display());
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| Error::Kubeconfig {
        what: what(),
        source: e,
    })?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig {
            what: what(),
            source: e,
        })?;
    kube::Client::try_from(config).map_err(|e| Error::Api {
        what: format!("building a client from {}", path.display()),
        source: e,
    })
}

/// A client for an HTTPS endpoint that only needs the server verified (the controller
/// manager's and scheduler's `/healthz`).
pub fn anonymous_client(url: &str, ca_der: Vec<u8>) -> Result<kube::Client> {
    let uri = url.parse().map_err(|e| Error::Invalid {
        what: format!("URL {url}"),
        detail: format!("{e}"),
    })?;
    let mut config = kube::Config::new(uri);
    config.root_cert = Some(vec![ca_der]);
    kube::Client::try_from(config).map_err(|e| Error::Api {
        what: format!("building a client for {url}"),
        source: e,
    })
}

/// Whether `GET path` (`/readyz`, `/healthz`) says `ok`; otherwise what it said.
pub async fn healthy(client: &kube::Client, path: &str) -> Result<(), String> {
    let request = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    match client.request_text(request).await {
        Ok(body) if body.trim() == "ok" => Ok(()),
        Ok(body) => Err(body),
        Err(e) => Err(e.to_string()),
    }
}

/// File name for a kubeconfig of identity `name` in directory `dir`.
pub fn file_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.kubeconfig"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_parses_with_either_credential() {
        let server: SocketAddr = "127.0.0.1:6443".parse().unwrap();
        let cert = Credentials::ClientCert(CertFiles {
            cert: "/p/a b.crt".into(),
            key: "/p/a.key".into(),
        });
        let text = render(server, Path::new("/p/ca.crt"), &cert);
        let parsed = Kubeconfig::from_yaml(&text).unwrap();
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority.as_deref(), Some("/p/ca.crt"));
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.client_certificate.as_deref(), Some("/p/a b.crt"));
        assert_eq!(parsed.current_context.as_deref(), Some("mesh-tests"));

        let token = Credentials::Token("abc\"def".into());
        let text = render("[::1]:443".parse().unwrap(), Path::new("/ca"), &token);
        let parsed = Kubeconfig::from_yaml(&text).unwrap();
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://[::1]:443"));
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert!(user.token.is_some() && user.client_certificate.is_none());
        assert!(text.contains(r#"token: "abc\"def""#), "{text}");
    }
}
