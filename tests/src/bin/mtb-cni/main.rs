//! `mtb-cni`: the testbed's primary CNI plugin (CNI spec 1.0), what the testbed kubelet
//! (`mesh_tests::kube::Kubelet`) chains first. It does for a pod what `Testbed` does for its
//! static pods: a veth pair between the node's network namespace and the pod's (`eth0` in the
//! pod), the pod's addresses from its node's pod subnet (`mesh_tests::plan`), routes both ways,
//! and a CNI 1.0 result with `interfaces`, `ips` and `routes`.
//!
//! Configuration (besides `cniVersion`, `name`, `type`):
//! - `node_netns`: the node's network namespace file (`/run/netns/<name>`);
//! - `node_index`: the node's index in the address plan;
//! - `first_pod_index`: the first pod index this plugin may hand out (the testbed's own static
//!   pods of the node hold the ones below it);
//! - `ipam_dir`: where addresses are recorded, one file per pod index holding the container id
//!   (created with `O_EXCL`, so concurrent ADDs never share an address).
//!
//! Commands: ADD (idempotent for a container id), DEL (idempotent; `CNI_NETNS` may be gone),
//! CHECK (the pod's `eth0` holds the result's addresses and the node's end exists), VERSION;
//! STATUS and GC succeed. Errors are the spec's error objects on stdout, exit status 1.
#![forbid(unsafe_code)]

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use mesh_tests::plan;
use serde_json::{json, Value};

const SUPPORTED: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// A failure: the spec's error code and message.
struct Failure {
    code: u32,
    msg: String,
}

fn fail(code: u32, msg: impl Into<String>) -> Failure {
    Failure {
        code,
        msg: msg.into(),
    }
}

/// CNI's well-known codes used here.
const INCOMPATIBLE_VERSION: u32 = 1;
const INVALID_ENV: u32 = 4;
const IO_FAILURE: u32 = 5;
const DECODE_FAILED: u32 = 6;
const INVALID_CONFIG: u32 = 7;
/// This plugin's own: no free address left in the node's pod subnet.
const NO_ADDRESS: u32 = 100;
/// CHECK: the pod's network is not as ADD left it.
const NOT_AS_ADDED: u32 = 101;

struct Conf {
    version: String,
    node_netns: PathBuf,
    node_index: usize,
    first_pod_index: usize,
    ipam_dir: PathBuf,
    prev_result: Option<Value>,
}

struct Env {
    command: String,
    container_id: String,
    netns: Option<PathBuf>,
    ifname: String,
}

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .filter(|v| SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".to_owned());
    let result = read
        .map_err(|e| fail(IO_FAILURE, format!("reading stdin: {e}")))
        .and_then(|_| run(&stdin, &version));
    match result {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("mtb-cni: error {}: {}", f.code, f.msg);
            println!(
                "{}",
                json!({"cniVersion": version, "code": f.code, "msg": f.msg})
            );
            ExitCode::FAILURE
        }
    }
}

fn run(stdin: &[u8], version: &str) -> Result<String, Failure> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let command = var("CNI_COMMAND").ok_or_else(|| fail(INVALID_ENV, "CNI_COMMAND is missing"))?;
    match command.as_str() {
        "VERSION" => {
            return Ok(json!({"cniVersion": version, "supportedVersions": SUPPORTED}).to_string())
        }
        "STATUS" | "GC" => return Ok(String::new()),
        "ADD" | "DEL" | "CHECK" => {}
        other => return Err(fail(INVALID_ENV, format!("unknown CNI_COMMAND {other:?}"))),
    }
    let env = Env {
        container_id: var("CNI_CONTAINERID").ok_or_else(|| {
            fail(
                INVALID_ENV,
                format!("CNI_CONTAINERID is required for {command}"),
            )
        })?,
        netns: var("CNI_NETNS").map(PathBuf::from),
        ifname: var("CNI_IFNAME")
            .ok_or_else(|| fail(INVALID_ENV, format!("CNI_IFNAME is required for {command}")))?,
        command,
    };
    let conf = parse_conf(stdin)?;
    match env.command.as_str() {
        "ADD" => add(&env, &conf),
        "DEL" => del(&env, &conf).map(|()| String::new()),
        _ => check(&env, &conf).map(|()| String::new()),
    }
}

fn parse_conf(stdin: &[u8]) -> Result<Conf, Failure> {
    let v: Value = serde_json::from_slice(stdin)
        .map_err(|e| fail(DECODE_FAILED, format!("network configuration: {e}")))?;
    let version = v["cniVersion"]
        .as_str()
        .ok_or_else(|| fail(INVALID_CONFIG, "cniVersion is missing"))?
        .to_owned();
    if !SUPPORTED.contains(&version.as_str()) {
        return Err(fail(
            INCOMPATIBLE_VERSION,
            format!("cniVersion {version} is not one of {SUPPORTED:?}"),
        ));
    }
    let string = |key: &str| {
        v[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| fail(INVALID_CONFIG, format!("{key} is missing or not a string")))
    };
    let index = |key: &str| {
        v[key]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| fail(INVALID_CONFIG, format!("{key} is missing or not a number")))
    };
    let node_index = index("node_index")?;
    if node_index >= plan::MAX_NODES {
        return Err(fail(
            INVALID_CONFIG,
            "node_index is outside the address plan",
        ));
    }
    Ok(Conf {
        version,
        node_netns: string("node_netns")?.into(),
        node_index,
        first_pod_index: index("first_pod_index")?,
        ipam_dir: string("ipam_dir")?.into(),
        prev_result: v.get("prevResult").filter(|p| !p.is_null()).cloned(),
    })
}

/// The node's end of the pod's veth: `mtb` and the CRC-32 of the container id (15 bytes at most,
/// unique per sandbox).
fn host_ifname(container_id: &str) -> String {
    format!("mtb{:08x}", crc32fast::hash(container_id.as_bytes()))
}

fn add(env: &Env, conf: &Conf) -> Result<String, Failure> {
    let netns = env
        .netns
        .as_ref()
        .ok_or_else(|| fail(INVALID_ENV, "CNI_NETNS is required for ADD"))?;
    if !netns.exists() {
        return Err(fail(
            INVALID_ENV,
            format!("CNI_NETNS {} does not exist", netns.display()),
        ));
    }
    let j = allocate(conf, &env.container_id)?;
    let (ipv4, ipv6) = (
        plan::pod_v4(conf.node_index, j),
        plan::pod_v6(conf.node_index, j),
    );
    let (gw4, gw6) = (
        plan::gateway_v4(conf.node_index),
        plan::gateway_v6(conf.node_index),
    );
    let host = host_ifname(&env.container_id);
    let ifname = &env.ifname;
    // An ADD repeated for the same container starts from scratch.
    let _ = ip_in(&conf.node_netns, &format!("link del {host}\n"));
    let wired = ip_in(
        &conf.node_netns,
        &format!(
            "link add {host} type veth peer name {ifname} netns {}\n",
            netns.display()
        ),
    )
    .and_then(|()| {
        ip_in(
            netns,
            &format!(
                "link set lo up\n\
                 addr add {ipv4}/32 dev {ifname}\n\
                 addr add {ipv6}/128 dev {ifname} nodad\n\
                 link set {ifname} up\n\
                 route add {gw4}/32 dev {ifname}\n\
                 route add default via {gw4} dev {ifname}\n\
                 route add {gw6}/128 dev {ifname}\n\
                 route add default via {gw6} dev {ifname}\n"
            ),
        )
    })
    .and_then(|()| {
        ip_in(
            &conf.node_netns,
            &format!(
                "addr add {gw4}/32 dev {host}\n\
                 addr add {gw6}/128 dev {host} nodad\n\
                 link set {host} up\n\
                 route add {ipv4}/32 dev {host}\n\
                 route add {ipv6}/128 dev {host}\n"
            ),
        )
    });
    if let Err(e) = wired {
        let _ = ip_in(&conf.node_netns, &format!("link del {host}\n"));
        release(conf, &env.container_id);
        return Err(e);
    }
    let host_mac = mac(&conf.node_netns, &host)?;
    let pod_mac = mac(netns, ifname)?;
    let result = json!({
        "cniVersion": conf.version,
        "interfaces": [
            {"name": host, "mac": host_mac},
            {"name": ifname, "mac": pod_mac, "sandbox": netns.display().to_string()},
        ],
        "ips": [
            {"address": format!("{ipv4}/32"), "gateway": gw4.to_string(), "interface": 1},
            {"address": format!("{ipv6}/128"), "gateway": gw6.to_string(), "interface": 1},
        ],
        "routes": [
            {"dst": "0.0.0.0/0", "gw": gw4.to_string()},
            {"dst": "::/0", "gw": gw6.to_string()},
        ],
        "dns": {},
    });
    Ok(result.to_string())
}

fn del(env: &Env, conf: &Conf) -> Result<(), Failure> {
    // Deleting either end removes the pair; the pod's namespace may already be gone.
    let host = host_ifname(&env.container_id);
    if let Err(e) = ip_in(&conf.node_netns, &format!("link del {host}\n")) {
        if !e.msg.contains("Cannot find device") && !e.msg.contains("does not exist") {
            return Err(e);
        }
    }
    release(conf, &env.container_id);
    Ok(())
}

fn check(env: &Env, conf: &Conf) -> Result<(), Failure> {
    let netns = env
        .netns
        .as_ref()
        .ok_or_else(|| fail(INVALID_ENV, "CNI_NETNS is required for CHECK"))?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| fail(INVALID_CONFIG, "CHECK needs a prevResult"))?;
    let want = mesh_tests::kube::kubelet::result_ips(prev);
    let have = addresses(netns, &env.ifname)?;
    if let Some(missing) = want.iter().find(|a| !have.contains(a)) {
        return Err(fail(
            NOT_AS_ADDED,
            format!("{} in {} lacks {missing}", env.ifname, netns.display()),
        ));
    }
    let host = host_ifname(&env.container_id);
    mac(&conf.node_netns, &host)
        .map_err(|e| fail(NOT_AS_ADDED, format!("the node's end {host}: {}", e.msg)))?;
    Ok(())
}

/// The pod index recorded for `container_id`, or the first free one (claimed atomically).
fn allocate(conf: &Conf, container_id: &str) -> Result<usize, Failure> {
    fs::create_dir_all(&conf.ipam_dir).map_err(|e| {
        fail(
            IO_FAILURE,
            format!("creating {}: {e}", conf.ipam_dir.display()),
        )
    })?;
    if let Some(j) = recorded(conf, container_id).into_iter().next() {
        return Ok(j);
    }
    for j in conf.first_pod_index..plan::MAX_PODS_PER_NODE {
        let path = conf.ipam_dir.join(j.to_string());
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut file) => {
                file.write_all(container_id.as_bytes())
                    .map_err(|e| fail(IO_FAILURE, format!("writing {}: {e}", path.display())))?;
                return Ok(j);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(fail(
                    IO_FAILURE,
                    format!("creating {}: {e}", path.display()),
                ))
            }
        }
    }
    Err(fail(
        NO_ADDRESS,
        format!(
            "no free address in {} (pods {}..{})",
            plan::pod_subnet_v4(conf.node_index),
            conf.first_pod_index,
            plan::MAX_PODS_PER_NODE
        ),
    ))
}

/// The pod indices recorded for `container_id`.
fn recorded(conf: &Conf, container_id: &str) -> Vec<usize> {
    let Ok(entries) = fs::read_dir(&conf.ipam_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| fs::read_to_string(e.path()).is_ok_and(|c| c == container_id))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn release(conf: &Conf, container_id: &str) {
    for j in recorded(conf, container_id) {
        let _ = fs::remove_file(conf.ipam_dir.join(j.to_string()));
    }
}

/// Runs `ip -batch -` inside the network namespace at `netns`.
fn ip_in(netns: &Path, script: &str) -> Result<(), Failure> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "ip", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(IO_FAILURE, format!("starting nsenter ip: {e}")))?;
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(script.as_bytes())
        .map_err(|e| fail(IO_FAILURE, format!("writing to ip -batch: {e}")))?;
    let out = child
        .wait_with_output()
        .map_err(|e| fail(IO_FAILURE, format!("waiting for ip: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(
            IO_FAILURE,
            format!(
                "ip in {} failed ({}): {} [script: {}]",
                netns.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                script.trim().replace('\n', "; ")
            ),
        ))
    }
}

/// `ip -j <args>` inside `netns`, parsed.
fn ip_json(netns: &Path, args: &[&str]) -> Result<Value, Failure> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "ip", "-j"])
        .args(args)
        .output()
        .map_err(|e| fail(IO_FAILURE, format!("running ip: {e}")))?;
    if !out.status.success() {
        return Err(fail(
            IO_FAILURE,
            format!(
                "ip {} in {}: {}",
                args.join(" "),
                netns.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| fail(IO_FAILURE, format!("ip's JSON: {e}")))
}

fn mac(netns: &Path, ifname: &str) -> Result<String, Failure> {
    let links = ip_json(netns, &["link", "show", "dev", ifname])?;
    links[0]["address"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| fail(IO_FAILURE, format!("{ifname} has no MAC address")))
}

fn addresses(netns: &Path, ifname: &str) -> Result<Vec<IpAddr>, Failure> {
    let links =
        ip_json(netns, &["addr", "show", "dev", ifname]).map_err(|e| fail(NOT_AS_ADDED, e.msg))?;
    Ok(links[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect())
}
