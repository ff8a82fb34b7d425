//! Calling the CNI plugins as a container runtime does (CNI spec 1.0): the node's conflist
//! (first `*.conflist` of the conf dir, read at each sandbox's ADD as containerd re-reads its
//! directory), one execution per plugin with `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//! `CNI_IFNAME`, `CNI_ARGS`, `CNI_PATH` and the plugin's configuration on stdin (with the
//! list's `cniVersion` and `name` and, after the first, `prevResult`). ADD runs the list in
//! order, chaining each result into the next; DEL runs it in reverse and CHECK in order, both
//! with the ADD's final result.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt as _;

/// How long one plugin execution may take before it is killed.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The pod a CNI call is for.
#[derive(Clone, Debug)]
pub struct CniPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub sandbox_id: String,
    pub netns: PathBuf,
}

/// One plugin execution, as recorded for tests ([`super::Kubelet::cni_calls`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniCall {
    /// `ADD`, `DEL` or `CHECK`.
    pub command: String,
    /// The plugin's `type`.
    pub plugin: String,
    /// `namespace/name`.
    pub pod: String,
    pub sandbox_id: String,
    /// The plugin's exit status (`-1`: killed or not started).
    pub exit_code: i32,
    /// The error object's `code` when it failed.
    pub error_code: Option<u64>,
    /// The error object's `msg` (or what went wrong running it).
    pub message: Option<String>,
}

/// A failed step of a chain: which plugin, its code and message.
#[derive(Clone, Debug)]
pub struct CniFailure {
    pub plugin: String,
    pub command: String,
    pub code: Option<u64>,
    pub message: String,
}

impl std::fmt::Display for CniFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "plugin type={:?} failed ({})",
            self.plugin,
            self.command.to_lowercase()
        )?;
        if let Some(code) = self.code {
            write!(f, ": code {code}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The node's network configuration list as loaded for one sandbox.
#[derive(Clone, Debug)]
pub struct ConfList {
    pub version: String,
    pub name: String,
    pub plugins: Vec<Value>,
}

impl ConfList {
    /// The first `*.conflist` (by name) in `dir`, as runtimes pick it.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("reading CNI conf dir {}: {e}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
            .collect();
        files.sort();
        let file = files
            .first()
            .ok_or_else(|| format!("no network config found in {}", dir.display()))?;
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("reading {}: {e}", file.display()))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", file.display()))?;
        let field = |key: &str| {
            value[key]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("{}: {key} missing", file.display()))
        };
        let plugins = value["plugins"]
            .as_array()
            .filter(|p| !p.is_empty())
            .cloned()
            .ok_or_else(|| format!("{}: no plugins", file.display()))?;
        Ok(Self {
            version: field("cniVersion")?,
            name: field("name")?,
            plugins,
        })
    }
}

/// Runs the node's plugins for one sandbox.
#[derive(Clone, Debug)]
pub struct Cni {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// The node's file system, in which the plugins run, and the launcher that enters it.
    pub view: super::NodeView,
    pub launcher: PathBuf,
}

impl Cni {
    /// ADD through the list; the final result, or the first failure. `record` sees every call.
    pub async fn add(
        &self,
        list: &ConfList,
        pod: &CniPod,
        record: &(dyn Fn(CniCall) + Sync),
    ) -> Result<Value, CniFailure> {
        let mut prev: Option<Value> = None;
        for plugin in &list.plugins {
            let result = self
                .exec("ADD", list, plugin, pod, prev.as_ref(), record)
                .await?;
            prev = Some(result);
        }
        Ok(prev.unwrap_or_else(|| json!({"cniVersion": list.version})))
    }

    /// DEL through the list in reverse; every plugin is called even after one fails, and the
    /// first failure is returned.
    pub async fn del(
        &self,
        list: &ConfList,
        pod: &CniPod,
        result: Option<&Value>,
        record: &(dyn Fn(CniCall) + Sync),
    ) -> Result<(), CniFailure> {
        let mut first = None;
        for plugin in list.plugins.iter().rev() {
            if let Err(e) = self.exec("DEL", list, plugin, pod, result, record).await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// CHECK through the list, with the ADD's result.
    pub async fn check(
        &self,
        list: &ConfList,
        pod: &CniPod,
        result: &Value,
        record: &(dyn Fn(CniCall) + Sync),
    ) -> Result<(), CniFailure> {
        for plugin in &list.plugins {
            self.exec("CHECK", list, plugin, pod, Some(result), record)
                .await?;
        }
        Ok(())
    }

    async fn exec(
        &self,
        command: &str,
        list: &ConfList,
        plugin: &Value,
        pod: &CniPod,
        prev: Option<&Value>,
        record: &(dyn Fn(CniCall) + Sync),
    ) -> Result<Value, CniFailure> {
        let kind = plugin["type"].as_str().unwrap_or_default().to_owned();
        let mut conf = plugin.clone();
        conf["cniVersion"] = json!(list.version);
        conf["name"] = json!(list.name);
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let outcome = self.spawn(command, &kind, &conf, pod).await;
        let failure = |code, message: String| CniFailure {
            plugin: kind.clone(),
            command: command.to_owned(),
            code,
            message,
        };
        let mut call = CniCall {
            command: command.to_owned(),
            plugin: kind.clone(),
            pod: format!("{}/{}", pod.namespace, pod.name),
            sandbox_id: pod.sandbox_id.clone(),
            exit_code: -1,
            error_code: None,
            message: None,
        };
        let result = match outcome {
            Err(message) => Err(failure(None, message)),
            Ok((status, stdout, stderr)) => {
                call.exit_code = status;
                let parsed: Option<Value> = serde_json::from_str(stdout.trim()).ok();
                if status == 0 {
                    Ok(parsed.unwrap_or(Value::Null))
                } else {
                    let code = parsed.as_ref().and_then(|v| v["code"].as_u64());
                    let msg = parsed
                        .as_ref()
                        .and_then(|v| v["msg"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| {
                            format!("exit status {status}: {}{}", stdout.trim(), stderr.trim())
                        });
                    Err(failure(code, msg))
                }
            }
        };
        if let Err(e) = &result {
            call.error_code = e.code;
            call.message = Some(e.message.clone());
        }
        record(call);
        result
    }

    /// Runs the plugin binary: its exit status, stdout and stderr.
    async fn spawn(
        &self,
        command: &str,
        kind: &str,
        conf: &Value,
        pod: &CniPod,
    ) -> Result<(i32, String, String), String> {
        let binary = self.bin_dir.join(kind);
        if kind.is_empty() || kind.contains('/') || !binary.exists() {
            return Err(format!(
                "failed to find plugin {kind:?} in path [{}]",
                self.bin_dir.display()
            ));
        }
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.sandbox_id, pod.uid
        );
        // Started in the node's file system (`mtb-run view`), which then execs the plugin.
        let mut child = tokio::process::Command::new(&self.launcher)
            .arg("view")
            .args(self.view.launcher_flags())
            .arg("--")
            .arg(&binary)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.sandbox_id)
            .env("CNI_NETNS", &pod.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let mut stdin = child.stdin.take().expect("stdin piped");
        let body = conf.to_string();
        // A plugin that exits without reading its configuration is judged by its output.
        let _ = stdin.write_all(body.as_bytes()).await;
        drop(stdin);
        let output = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| {
                format!(
                    "{} did not finish within {PLUGIN_TIMEOUT:?}",
                    binary.display()
                )
            })?
            .map_err(|e| format!("waiting for {}: {e}", binary.display()))?;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            super::echo(&format!("cni {kind} {command} {}", pod.name), line);
        }
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr,
        ))
    }
}

/// The pod's addresses from a CNI result (`ips[].address`, CIDR form), IPv4 first.
pub fn result_ips(result: &Value) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect();
    ips.sort_by_key(IpAddr::is_ipv6);
    ips
}

/// The conflist the kubelet writes for a node: the testbed's veth plugin, then `mesh-cni` when
/// asked for.
pub fn conflist(name: &str, veth: &Value, mesh_cni: Option<(&Path, Duration)>) -> Value {
    let mut plugins = vec![veth.clone()];
    if let Some((socket, timeout)) = mesh_cni {
        plugins.push(json!({
            "type": "mesh-cni",
            "agent_socket": socket,
            "timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            "log_level": "info",
        }));
    }
    json!({"cniVersion": "1.0.0", "name": name, "plugins": plugins})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_ips_put_ipv4_first() {
        let result = json!({"ips": [
            {"address": "fd00::2/128", "interface": 1},
            {"address": "198.19.0.2/32", "interface": 1},
        ]});
        let ips = result_ips(&result);
        assert_eq!(ips[0].to_string(), "198.19.0.2");
        assert_eq!(ips[1].to_string(), "fd00::2");
        assert!(result_ips(&json!({})).is_empty());
    }

    #[test]
    fn conflist_chains_mesh_cni_after_the_veth_plugin() {
        let veth = json!({"type": "mtb-cni"});
        let list = conflist(
            "mtb-n0",
            &veth,
            Some((Path::new("/tmp/x/cni.sock"), Duration::from_secs(2))),
        );
        assert_eq!(list["plugins"][0]["type"], "mtb-cni");
        assert_eq!(list["plugins"][1]["type"], "mesh-cni");
        assert_eq!(list["plugins"][1]["agent_socket"], "/tmp/x/cni.sock");
        assert_eq!(list["plugins"][1]["timeout_ms"], 2000);
        assert_eq!(
            conflist("x", &veth, None)["plugins"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn failures_read_like_the_runtime_reports_them() {
        let f = CniFailure {
            plugin: "mesh-cni".into(),
            command: "ADD".into(),
            code: Some(11),
            message: "agent down".into(),
        };
        assert_eq!(
            f.to_string(),
            r#"plugin type="mesh-cni" failed (add): code 11: agent down"#
        );
    }
}
