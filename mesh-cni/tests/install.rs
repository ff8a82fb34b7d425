//! Installing into copies of realistic primary CNI configurations: a bridge + portmap conflist
//! (containerd's default) and a Cilium-style single `.conf`.

mod common;

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use common::TempDir;
use mesh_cni::{
    install::{
        ensure_installed, find_primary, uninstall, Changed, InstallError, PluginEntry,
        CONVERTED_FROM_KEY, PLUGIN_TYPE,
    },
    json::Json,
};

const CONFLIST: &str = include_str!("testdata/10-containerd-net.conflist");
const CILIUM: &str = include_str!("testdata/05-cilium.conf");
const LOOPBACK: &str = r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#;

fn write(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn json(path: &Path) -> Json {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn parse(text: &str) -> Json {
    serde_json::from_str(text).unwrap()
}

fn plugins(value: &Json) -> &Vec<Json> {
    match value.as_object().unwrap().get("plugins") {
        Some(Json::Array(plugins)) => plugins,
        other => panic!("no plugins: {other:?}"),
    }
}

fn keys(value: &Json) -> Vec<&str> {
    value.as_object().unwrap().iter().map(|(k, _)| k).collect()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn entry(timeout_ms: u64) -> PluginEntry {
    PluginEntry {
        timeout_ms,
        ..PluginEntry::default()
    }
}

#[test]
fn a_conflist_gets_our_entry_once_and_keeps_everything_else() {
    let dir = TempDir::new();
    let primary = dir.join("10-containerd-net.conflist");
    let later = dir.join("99-loopback.conf");
    write(&primary, CONFLIST, 0o640);
    write(&later, LOOPBACK, 0o644);
    let original = parse(CONFLIST);

    assert_eq!(
        ensure_installed(&dir.0, &entry(5000)).unwrap(),
        Changed::Added(primary.clone())
    );
    let installed = json(&primary);
    assert_eq!(
        keys(&installed),
        keys(&original),
        "top-level keys in their order"
    );
    assert_eq!(
        plugins(&installed)[..2],
        plugins(&original)[..],
        "other plugins untouched, key order too"
    );
    assert_eq!(
        installed.as_object().unwrap().get("x-vendor-extension"),
        original.as_object().unwrap().get("x-vendor-extension")
    );
    let ours = plugins(&installed)[2].to_value();
    assert_eq!(ours["type"], PLUGIN_TYPE);
    assert_eq!(
        (ours["agent_socket"].as_str(), ours["timeout_ms"].as_u64()),
        (Some("/var/run/mesh/cni.sock"), Some(5000))
    );
    assert_eq!(mode(&primary), 0o640, "mode kept");

    let bytes = fs::read(&primary).unwrap();
    assert_eq!(
        ensure_installed(&dir.0, &entry(5000)).unwrap(),
        Changed::Unchanged(primary.clone())
    );
    assert_eq!(
        fs::read(&primary).unwrap(),
        bytes,
        "idempotent: nothing written"
    );

    assert_eq!(
        ensure_installed(&dir.0, &entry(2500)).unwrap(),
        Changed::Updated(primary.clone())
    );
    let updated = json(&primary);
    assert_eq!(plugins(&updated).len(), 3);
    assert_eq!(
        plugins(&updated)[2].to_value()["timeout_ms"],
        2500,
        "updated in place"
    );
    assert_eq!(
        fs::read_to_string(&later).unwrap(),
        LOOPBACK,
        "other files untouched"
    );

    assert_eq!(uninstall(&dir.0).unwrap(), vec![primary.clone()]);
    assert_eq!(
        json(&primary),
        original,
        "uninstall restores the original, key order included"
    );
    assert_eq!(mode(&primary), 0o640);
    assert!(
        uninstall(&dir.0).unwrap().is_empty(),
        "nothing left to remove"
    );
    let leftovers: Vec<PathBuf> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(leftovers.len(), 2, "no temporary files left: {leftovers:?}");
}

#[test]
fn a_single_conf_becomes_a_conflist_and_comes_back() {
    let dir = TempDir::new();
    let conf = dir.join("05-cilium.conf");
    let conflist = dir.join("05-cilium.conflist");
    let other = dir.join("10-containerd-net.conflist");
    write(&conf, CILIUM, 0o600);
    write(&other, CONFLIST, 0o644);
    let original = parse(CILIUM);

    let changed = ensure_installed(&dir.0, &entry(5000)).unwrap();
    assert_eq!(
        changed,
        Changed::Converted {
            from: conf.clone(),
            to: conflist.clone()
        }
    );
    assert!(!conf.exists(), "the .conf would sort before the .conflist");
    let list = json(&conflist);
    assert_eq!(keys(&list), ["cniVersion", "name", "plugins"]);
    assert_eq!(list.to_value()["cniVersion"], "0.3.1");
    assert_eq!(list.to_value()["name"], "cilium");
    assert_eq!(
        plugins(&list)[0],
        original,
        "the original plugin, unchanged"
    );
    assert_eq!(
        plugins(&list)[1].to_value()[CONVERTED_FROM_KEY],
        "05-cilium.conf"
    );
    assert_eq!(mode(&conflist), 0o600);
    assert_eq!(find_primary(&dir.0).unwrap(), conflist);
    assert_eq!(
        ensure_installed(&dir.0, &entry(5000)).unwrap(),
        Changed::Unchanged(conflist.clone())
    );

    // Cilium writes its file again: it sorts first, so it is converted again.
    let rewritten = CILIUM.replace("false", "true");
    write(&conf, &rewritten, 0o600);
    assert!(ensure_installed(&dir.0, &entry(5000)).unwrap().is_changed());
    assert_eq!(plugins(&json(&conflist))[0], parse(&rewritten));

    assert_eq!(uninstall(&dir.0).unwrap(), vec![conf.clone()]);
    assert_eq!(
        json(&conf),
        parse(&rewritten),
        "the single-plugin file is back"
    );
    assert!(!conflist.exists());
    assert_eq!(
        fs::read_to_string(&other).unwrap(),
        CONFLIST,
        "the other file was never touched"
    );
}

#[test]
fn the_primary_is_the_first_file_by_name_and_must_be_valid() {
    let dir = TempDir::new();
    assert!(matches!(
        ensure_installed(&dir.0, &entry(5000)),
        Err(InstallError::NoPrimary(_))
    ));
    for (name, text) in [
        ("20-b.conflist", CONFLIST),
        ("README.md", "x"),
        ("99-z.conf", LOOPBACK),
    ] {
        write(&dir.join(name), text, 0o644);
    }
    assert_eq!(find_primary(&dir.0).unwrap(), dir.join("20-b.conflist"));
    write(&dir.join("10-a.conflist"), "{ not json", 0o644);
    match ensure_installed(&dir.0, &entry(5000)) {
        Err(error @ InstallError::Parse { .. }) => {
            assert!(error.to_string().contains("10-a.conflist"));
        }
        other => panic!("{other:?}"),
    }
    write(
        &dir.join("10-a.conflist"),
        r#"{"name":"x","plugins":{}}"#,
        0o644,
    );
    assert!(matches!(
        ensure_installed(&dir.0, &entry(5000)),
        Err(InstallError::Invalid { .. })
    ));
}

#[test]
fn the_install_command_copies_the_binary_and_uninstall_removes_the_entry() {
    let dir = TempDir::new();
    let conf_dir = dir.join("net.d");
    let bin_dir = dir.join("bin");
    fs::create_dir_all(&conf_dir).unwrap();
    let primary = conf_dir.join("10-containerd-net.conflist");
    write(&primary, CONFLIST, 0o644);
    let binary = env!("CARGO_BIN_EXE_mesh-cni");
    let run = |args: &[&str]| {
        let out = Command::new(binary).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "logs go to stderr");
    };
    let (conf_arg, bin_arg) = (conf_dir.to_str().unwrap(), bin_dir.to_str().unwrap());
    let install = [
        "install",
        "--conf-dir",
        conf_arg,
        "--bin-dir",
        bin_arg,
        "--socket",
        "/run/m/cni.sock",
        "--timeout-ms",
        "3000",
    ];
    run(&install);
    let installed = bin_dir.join("mesh-cni");
    assert_eq!(fs::read(&installed).unwrap(), fs::read(binary).unwrap());
    assert_eq!(mode(&installed), 0o755);
    let ours = plugins(&json(&primary))[2].to_value();
    assert_eq!(
        (ours["agent_socket"].as_str(), ours["timeout_ms"].as_u64()),
        (Some("/run/m/cni.sock"), Some(3000))
    );
    run(&install);
    assert_eq!(plugins(&json(&primary)).len(), 3, "idempotent");

    run(&["uninstall", "--conf-dir", conf_arg]);
    assert_eq!(json(&primary), parse(CONFLIST));
    assert!(
        installed.exists(),
        "the binary stays for the DEL of running pods"
    );
}

/// Kills the watching installer when the test ends, passed or not.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to 5 s for `check`.
fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `install --watch-ms` keeps the entry: when the primary CNI's installer rewrites its conflist
/// without it, or replaces it by another CNI's single `.conf`, the entry is back within a
/// moment; a directory briefly without configuration is waited out.
#[test]
fn the_watching_installer_puts_the_entry_back_when_another_cni_rewrites_the_configuration() {
    let dir = TempDir::new();
    let (conf_dir, bin_dir) = (dir.join("net.d"), dir.join("bin"));
    fs::create_dir_all(&conf_dir).unwrap();
    fs::create_dir_all(&bin_dir).unwrap();
    let primary = conf_dir.join("10-containerd-net.conflist");
    write(&primary, CONFLIST, 0o644);
    let ours = |path: &Path| {
        fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .is_some_and(|v| {
                v["plugins"]
                    .as_array()
                    .is_some_and(|p| p.iter().filter(|e| e["type"] == PLUGIN_TYPE).count() == 1)
            })
    };
    let _installer = Child(
        Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
            .args(["install", "--watch-ms", "50", "--conf-dir"])
            .arg(&conf_dir)
            .arg("--bin-dir")
            .arg(&bin_dir)
            .spawn()
            .unwrap(),
    );
    eventually("installed", || ours(&primary));

    // The primary CNI's installer writes its own file again, without our entry.
    write(&primary, CONFLIST, 0o644);
    assert!(!ours(&primary));
    eventually("the entry put back into the rewritten conflist", || {
        ours(&primary)
    });

    // The primary CNI is replaced: its file goes, and for a moment there is none.
    fs::remove_file(&primary).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let cilium = conf_dir.join("05-cilium.conf");
    write(&cilium, CILIUM, 0o644);
    let converted = conf_dir.join("05-cilium.conflist");
    eventually(
        "the new CNI's configuration converted, with the entry",
        || ours(&converted) && !cilium.exists(),
    );
    let config = json(&converted);
    assert_eq!(
        plugins(&config)[0].to_value()["type"],
        "cilium-cni",
        "the new primary first"
    );
}
