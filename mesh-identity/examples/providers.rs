//! Measures the two rustls crypto providers the mesh can use (aws-lc-rs and *ring*) on the
//! mesh's own configurations: mutual TLS 1.3 handshakes with ECDSA P-256 workload certificates,
//! and bulk encryption + decryption, both ends in this process, over an in-memory pipe.
//!
//! `cargo run --release -p mesh-identity --example providers [-- --bytes-mib N --handshakes N]`
//!
//! Figures are per CPU-second of this process (user + system), so a busy second core does not
//! distort them; one thread does everything.

#![allow(clippy::cast_precision_loss)] // counts and byte totals far below 2^52

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_identity::{
    client_config, server_config, BuiltinCa, BuiltinCaOptions, CertSnapshot, CryptoProvider,
    CsrRequest, Identity, WorkloadCert, WorkloadKey,
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::watch,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn cpu_time() -> Duration {
    // utime and stime, fields 14 and 15 of /proc/self/stat, in clock ticks (100 Hz here).
    let stat = std::fs::read_to_string("/proc/self/stat").expect("reading /proc/self/stat");
    let after_comm = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

fn issue(ca: &BuiltinCa, identity: &Identity) -> Arc<WorkloadCert> {
    let key = WorkloadKey::generate().expect("key");
    let request = CsrRequest {
        csr_der: key.csr(identity).expect("csr"),
        identity: identity.clone(),
        lifetime: None,
    };
    let issued = ca.issue(&request).expect("issue");
    Arc::new(WorkloadCert::new(identity.clone(), issued.chain, &key).expect("cert"))
}

struct Setup {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

fn setup(
    provider: CryptoProvider,
    certs: &watch::Receiver<Arc<CertSnapshot>>,
    a: &Identity,
    b: &Identity,
) -> Setup {
    Setup {
        client: client_config(provider, certs.clone(), a.clone(), b.clone())
            .expect("client config"),
        server: server_config(provider, certs.clone(), b.clone()).expect("server config"),
    }
}

/// One mutual handshake over an in-memory pipe; returns both ends.
async fn handshake(
    s: &Setup,
) -> (
    tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
    tokio_rustls::server::TlsStream<tokio::io::DuplexStream>,
) {
    let (c, srv) = tokio::io::duplex(256 * 1024);
    let name = ServerName::try_from("hbone.mesh.invalid").expect("name");
    let connect = TlsConnector::from(Arc::clone(&s.client)).connect(name, c);
    let accept = TlsAcceptor::from(Arc::clone(&s.server)).accept(srv);
    let (c, srv) = tokio::join!(connect, accept);
    (c.expect("client handshake"), srv.expect("server handshake"))
}

async fn measure(provider: CryptoProvider, s: &Setup, handshakes: u32, bytes: u64) -> (f64, f64) {
    let (cpu0, t0) = (cpu_time(), Instant::now());
    for _ in 0..handshakes {
        let (mut c, mut srv) = handshake(s).await;
        // Complete the exchange so session tickets or late alerts do not linger.
        c.write_all(b"x").await.expect("write");
        let mut one = [0u8; 1];
        srv.read_exact(&mut one).await.expect("read");
    }
    let hs_cpu = cpu_time()
        .saturating_sub(cpu0)
        .max(t0.elapsed().min(Duration::from_millis(10)));
    let hs_per_cpu_s = f64::from(handshakes) / hs_cpu.as_secs_f64();

    let (mut c, mut srv) = handshake(s).await;
    let chunk = vec![0x5au8; 64 * 1024];
    let cpu0 = cpu_time();
    let writer = async {
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left.min(chunk.len() as u64)).expect("chunk");
            c.write_all(&chunk[..n]).await.expect("write");
            left -= n as u64;
        }
        c.shutdown().await.expect("shutdown");
    };
    let reader = async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        loop {
            let n = srv.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        got
    };
    let ((), got) = tokio::join!(writer, reader);
    assert_eq!(got, bytes, "{provider}: bytes lost");
    let bulk_cpu = cpu_time().saturating_sub(cpu0);
    let gbit_per_cpu_s = (bytes as f64 * 8.0 / 1e9) / bulk_cpu.as_secs_f64().max(0.01);
    (hs_per_cpu_s, gbit_per_cpu_s)
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: not a number: {v}"))
        })
}

fn main() {
    let mib = arg("--bytes-mib", 1024);
    let handshakes = u32::try_from(arg("--handshakes", 1000)).expect("--handshakes");
    let dir = std::env::temp_dir().join(format!("mesh-providers-{}", std::process::id()));
    let ca =
        BuiltinCa::load_or_create(&dir, "cluster.local", BuiltinCaOptions::default()).expect("CA");
    let a = Identity::new("cluster.local", "bench", "client").expect("identity");
    let b = Identity::new("cluster.local", "bench", "server").expect("identity");
    let certs: HashMap<Identity, Arc<WorkloadCert>> =
        [(a.clone(), issue(&ca, &a)), (b.clone(), issue(&ca, &b))].into();
    let snapshot = CertSnapshot {
        certs,
        bundle: Arc::new(mesh_identity::CertificateAuthority::trust_bundle(&ca)),
        generation: 1,
    };
    let (_tx, rx) = watch::channel(Arc::new(snapshot));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    println!("| provider | mutual TLS 1.3 handshakes per CPU-second (both ends) | bulk Gbit/s per CPU-second (encrypt + decrypt) |");
    println!("|---|---|---|");
    for provider in CryptoProvider::ALL {
        let s = setup(provider, &rx, &a, &b);
        let (hs, bulk) = rt.block_on(measure(provider, &s, handshakes, mib * 1024 * 1024));
        println!("| {provider} | {hs:.0} | {bulk:.2} |");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
