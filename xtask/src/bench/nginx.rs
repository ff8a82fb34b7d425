//! The L7 group's reference: nginx (Debian's `nginx-light`) as a plain reverse proxy in the
//! waypoint's pod, one worker in one process (the waypoint runs one worker thread), upstream
//! keep-alive, an access log line per request (the waypoint writes one too), no TLS and no mesh:
//! what a C proxy's hop costs per request on this rig.

use std::{fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use mesh_tests::{Pod, Process};

/// One proxied port: the backend it goes to, and whether it speaks h2c (prior knowledge).
pub(super) struct Listener {
    pub port: u16,
    pub backend: std::net::SocketAddr,
    pub h2c: bool,
}

/// nginx's configuration for `listeners`, on `pod`'s address, its files under `dir`.
fn config(pod: &Pod, dir: &Path, listeners: &[Listener]) -> String {
    let d = dir.display();
    let mut servers = String::new();
    for (i, l) in listeners.iter().enumerate() {
        let http2 = if l.h2c { " http2" } else { "" };
        let _ = write!(
            servers,
            "  upstream b{i} {{ server {backend}; keepalive 32; }}\n  server {{\n    listen {ip}:{port}{http2};\n    location / {{\n      proxy_pass http://b{i};\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n",
            backend = l.backend,
            ip = pod.ipv4,
            port = l.port,
        );
    }
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  keepalive_requests 100000;\n{servers}}}\n"
    )
}

/// Starts nginx in `pod` (the waypoint's, the agents stopped) for `listeners`; waits until it
/// listens.
pub(super) fn start(pod: &Pod, dir: &Path, listeners: &[Listener]) -> Result<Process> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let conf = dir.join("nginx.conf");
    fs::write(&conf, config(pod, dir, listeners))
        .with_context(|| format!("writing {}", conf.display()))?;
    let mut cmd = pod.command("nginx");
    cmd.arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"));
    let process = Process::spawn("nginx", &mut cmd)
        .context("starting nginx (`cargo xtask setup` installs nginx-light)")?;
    let first = listeners.first().context("no listener")?;
    let target = format!("{}:{}", pod.ipv4, first.port);
    for _ in 0..100 {
        let up = pod
            .command("curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "1"])
            .arg(format!("http://{target}/"))
            .status()
            .is_ok_and(|s| s.success());
        if up {
            return Ok(process);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!(
        "nginx does not answer on {target}: {}",
        fs::read_to_string(dir.join("error.log")).unwrap_or_default()
    )
}
