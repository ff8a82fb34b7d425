//! The L7 group's references: nginx (Debian's `nginx-light`) as a reverse proxy in the
//! waypoint's pod, one worker in one process (the waypoint runs one worker thread), upstream
//! keep-alive, an access log line per request (the waypoint writes one too), no mesh: what a C
//! proxy's hop costs per request on this rig.
//!
//! Two references: a plain hop (HTTP in, HTTP out), and a hop that does the waypoint's
//! cryptography (mutual TLS 1.3 in from a source-side nginx, mutual TLS 1.3 out to a
//! destination-side nginx in the backend's pod), so a chain of three nginx processes in which
//! only the middle one is measured.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use mesh_tests::{process, Pod, Process};

/// One proxied port: the backend it goes to, whether it speaks h2c (prior knowledge), and
/// mutual TLS on either side.
pub(super) struct Listener {
    pub port: u16,
    pub backend: std::net::SocketAddr,
    pub h2c: bool,
    /// Mutual TLS toward clients: the listener presents its instance's certificate and requires
    /// one from the bench's CA.
    pub tls_in: bool,
    /// Mutual TLS toward the backend, which must present a certificate for this name; the
    /// instance's certificate is the client's.
    pub tls_to: Option<&'static str>,
}

/// An nginx instance: where its files go, its certificate's name (under `certs`, when any
/// listener uses TLS), and whether it writes a line per request (the measured hop does, as the
/// waypoint does; the chain's other two stand for the agents, which log per connection).
pub(super) struct Instance<'a> {
    pub dir: PathBuf,
    pub certs: Option<(&'a Certs, &'static str)>,
    pub access_log: bool,
}

/// A bench CA and certificates it issued (ECDSA P-256, as the mesh's), made by `openssl`.
pub(super) struct Certs {
    dir: PathBuf,
}

impl Certs {
    /// A CA under `dir` and a certificate for each of `names` (its DNS name, for server and
    /// client use).
    pub(super) fn issue(dir: &Path, names: &[&str]) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let openssl = |args: &[&str]| -> Result<String> {
            process::run(
                std::process::Command::new("openssl")
                    .current_dir(dir)
                    .args(args),
            )
            .with_context(|| format!("openssl {}", args.join(" ")))
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]);
        ca.extend(["-subj", "/CN=bench-ca"]);
        openssl(&ca)?;
        for name in names {
            let (key, csr, pem, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            let mut req = vec!["req", "-new"];
            req.extend(ec);
            let subject = format!("/CN={name}");
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
            openssl(&req)?;
            fs::write(
                dir.join(&ext),
                format!("subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth,clientAuth\n"),
            )?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ])?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// nginx's configuration for `listeners`, on `pod`'s address.
fn config(pod: &Pod, instance: &Instance<'_>, listeners: &[Listener]) -> String {
    let d = instance.dir.display();
    let mut servers = String::new();
    let cert = |(certs, name): (&Certs, &str)| {
        (
            certs.file(&format!("{name}.pem")),
            certs.file(&format!("{name}.key")),
            certs.file("ca.pem"),
        )
    };
    for (i, l) in listeners.iter().enumerate() {
        let http2 = if l.h2c { " http2" } else { "" };
        let mut listen = format!("{}:{}{http2}", pod.ipv4, l.port);
        let mut tls = String::new();
        if let (true, Some(c)) = (l.tls_in, instance.certs) {
            let (pem, key, ca) = cert(c);
            listen.push_str(" ssl");
            let _ = write!(
                tls,
                "    ssl_protocols TLSv1.3;\n    ssl_certificate {pem};\n    ssl_certificate_key {key};\n    ssl_client_certificate {ca};\n    ssl_verify_client on;\n"
            );
        }
        let scheme = match (l.tls_to, instance.certs) {
            (Some(peer), Some(c)) => {
                let (pem, key, ca) = cert(c);
                let _ = write!(
                    tls,
                    "    proxy_ssl_protocols TLSv1.3;\n    proxy_ssl_certificate {pem};\n    proxy_ssl_certificate_key {key};\n    proxy_ssl_trusted_certificate {ca};\n    proxy_ssl_verify on;\n    proxy_ssl_name {peer};\n    proxy_ssl_session_reuse on;\n"
                );
                "https"
            }
            _ => "http",
        };
        let _ = write!(
            servers,
            "  upstream b{i} {{ server {backend}; keepalive 32; }}\n  server {{\n    listen {listen};\n{tls}    location / {{\n      proxy_pass {scheme}://b{i};\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n",
            backend = l.backend,
        );
    }
    let access_log = if instance.access_log {
        format!("{d}/access.log")
    } else {
        "off".to_owned()
    };
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log {access_log};\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  keepalive_requests 100000;\n{servers}}}\n"
    )
}

/// Starts nginx in `pod` for `listeners`; waits until each listens (a TLS listener: until it
/// completes a handshake, answering 400 to a client without a certificate).
pub(super) fn start(pod: &Pod, instance: &Instance<'_>, listeners: &[Listener]) -> Result<Process> {
    let dir = &instance.dir;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let conf = dir.join("nginx.conf");
    fs::write(&conf, config(pod, instance, listeners))
        .with_context(|| format!("writing {}", conf.display()))?;
    let mut cmd = pod.command("nginx");
    cmd.arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"));
    let process = Process::spawn("nginx", &mut cmd)
        .context("starting nginx (`cargo xtask setup` installs nginx-light)")?;
    for l in listeners {
        let scheme = if l.tls_in { "https" } else { "http" };
        let target = format!("{scheme}://{}:{}/", pod.ipv4, l.port);
        let up = (0..100).any(|_| {
            let mut curl = pod.command("curl");
            curl.args(["-sk", "-o", "/dev/null", "--max-time", "1"]);
            if l.h2c {
                curl.arg("--http2-prior-knowledge");
            }
            let up = curl.arg(&target).status().is_ok_and(|s| s.success());
            if !up {
                std::thread::sleep(Duration::from_millis(100));
            }
            up
        });
        anyhow::ensure!(
            up,
            "nginx does not answer on {target}: {}",
            fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
    }
    Ok(process)
}
