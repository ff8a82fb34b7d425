//! `mtb-run`: the testbed kubelet's container launcher (the part of a container runtime that
//! puts a process into its container), so that every step happens in the process that then
//! becomes the container's program (same pid, nothing left in between).
//!
//! ```text
//! mtb-run run  [--node-bind SRC:DST]... --cgroup DIR --netns FILE [--bind SRC:DST[:ro]]...
//!              [--resolv-conf FILE] [--uid N] [--gid N] [--workdir D] -- PROGRAM [ARGS...]
//! mtb-run exec --pid PID --cgroup DIR [--uid N] [--gid N] -- PROGRAM [ARGS...]
//! mtb-run view [--node-bind SRC:DST]... -- PROGRAM [ARGS...]
//! ```
//!
//! `--node-bind` puts the process into its node's own file system (the testbed kubelet's
//! `NodeView`): in the process's new mount namespace, `SRC` is bind-mounted on `DST` (an
//! existing directory of the testbed's) before anything else. `view` does only that (for CNI
//! plugins, which run on the node, outside containers) and execs `PROGRAM`; the machine's later
//! mounts still reach it (a slave mount namespace).
//!
//! `run` joins the container's cgroup v2 directory, enters the pod's network namespace, makes a
//! private mount namespace with a fresh tmpfs on `/run` (so `/var/run` too; the host's `/run` is
//! never changed), bind-mounts the volumes below it (`DST` must be below `/run` or `/var/run`),
//! with `--resolv-conf` puts `FILE` read-only over `/etc/resolv.conf` (the pod's cluster DNS, as
//! kubelet writes it; the host's file is never written), drops to the uid/gid (supplementary
//! groups cleared), and execs `PROGRAM` (found through the
//! `PATH` it was given) with the environment it was given.
//!
//! `exec` runs a command inside a running container (exec probes): it joins the cgroup and
//! enters the network and mount namespaces of process `PID`, then drops privileges and execs.
#![forbid(unsafe_code)]

use std::{
    ffi::CString,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
    process::ExitCode,
};

use nix::{
    mount::{mount, MsFlags},
    sched::{setns, unshare, CloneFlags},
    unistd::{chdir, execvp, setgroups, setresgid, setresuid, Gid, Uid},
};

/// Exit status when the launcher itself fails (as runc's "container init" failures do); the
/// kubelet reports the message it printed.
const LAUNCH_FAILED: u8 = 128;

#[derive(Default)]
struct Options {
    cgroup: Option<PathBuf>,
    netns: Option<PathBuf>,
    pid: Option<u32>,
    binds: Vec<(PathBuf, PathBuf, bool)>,
    node_binds: Vec<(PathBuf, PathBuf)>,
    uid: Option<u32>,
    gid: Option<u32>,
    workdir: Option<PathBuf>,
    resolv_conf: Option<PathBuf>,
    argv: Vec<String>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = parse(&args).and_then(|(mode, options)| match mode.as_str() {
        "run" => launch(&options),
        "exec" => enter(&options),
        "view" => view(&options),
        other => Err(format!("unknown mode {other:?} (run, exec or view)")),
    });
    // Only failures return: success execs the program.
    let error = result.err().unwrap_or_default();
    eprintln!("mtb-run: {error}");
    ExitCode::from(LAUNCH_FAILED)
}

fn parse(args: &[String]) -> Result<(String, Options), String> {
    let (mode, mut rest) = args
        .split_first()
        .ok_or("usage: mtb-run run|exec|view ...")?;
    let mut o = Options::default();
    while let Some((flag, tail)) = rest.split_first() {
        if flag == "--" {
            o.argv = tail.to_vec();
            break;
        }
        let (value, tail) = tail
            .split_first()
            .ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<u32>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--cgroup" => o.cgroup = Some(value.into()),
            "--netns" => o.netns = Some(value.into()),
            "--pid" => o.pid = Some(number(value)?),
            "--uid" => o.uid = Some(number(value)?),
            "--gid" => o.gid = Some(number(value)?),
            "--workdir" => o.workdir = Some(value.into()),
            "--resolv-conf" => o.resolv_conf = Some(value.into()),
            "--node-bind" => {
                let (src, dst) = value
                    .split_once(':')
                    .ok_or_else(|| format!("--node-bind {value}: expected SRC:DST"))?;
                o.node_binds.push((src.into(), dst.into()));
            }
            "--bind" => {
                let mut parts = value.split(':');
                let (Some(src), Some(dst)) = (parts.next(), parts.next()) else {
                    return Err(format!("--bind {value}: expected SRC:DST[:ro]"));
                };
                let ro = match parts.next() {
                    None => false,
                    Some("ro") => true,
                    Some(other) => return Err(format!("--bind {value}: unknown option {other}")),
                };
                o.binds.push((src.into(), dst.into(), ro));
            }
            other => return Err(format!("unknown flag {other}")),
        }
        rest = tail;
    }
    if o.argv.is_empty() {
        return Err("no program after --".into());
    }
    Ok((mode.clone(), o))
}

fn launch(o: &Options) -> Result<(), String> {
    let cgroup = o.cgroup.as_ref().ok_or("--cgroup is required")?;
    let netns = o.netns.as_ref().ok_or("--netns is required")?;
    join_cgroup(cgroup)?;
    enter_ns(netns, CloneFlags::CLONE_NEWNET)?;
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    // Nothing done in this mount namespace may reach the host's.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making / private: {e}"))?;
    node_binds(o)?;
    mount(
        Some("tmpfs"),
        "/run",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=4m"),
    )
    .map_err(|e| format!("mounting a tmpfs on /run: {e}"))?;
    for (src, dst, ro) in &o.binds {
        bind(src, dst, *ro)?;
    }
    if let Some(file) = &o.resolv_conf {
        // Over the existing file only: nothing is created or written outside the private /run.
        mount_bind(file, Path::new("/etc/resolv.conf"), true)?;
    }
    let workdir = o.workdir.clone().unwrap_or_else(|| "/".into());
    chdir(&workdir).map_err(|e| format!("chdir {}: {e}", workdir.display()))?;
    drop_privileges(o)?;
    exec(&o.argv)
}

fn enter(o: &Options) -> Result<(), String> {
    let pid = o.pid.ok_or("--pid is required")?;
    let cgroup = o.cgroup.as_ref().ok_or("--cgroup is required")?;
    join_cgroup(cgroup)?;
    let proc = PathBuf::from(format!("/proc/{pid}/ns"));
    enter_ns(&proc.join("net"), CloneFlags::CLONE_NEWNET)?;
    enter_ns(&proc.join("mnt"), CloneFlags::CLONE_NEWNS)?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    drop_privileges(o)?;
    exec(&o.argv)
}

/// `view`: a new mount namespace in which the node's binds are made, then the program.
fn view(o: &Options) -> Result<(), String> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| format!("making / a slave: {e}"))?;
    node_binds(o)?;
    exec(&o.argv)
}

/// The `--node-bind` mounts, in order (in a mount namespace of this process's own).
fn node_binds(o: &Options) -> Result<(), String> {
    for (src, dst) in &o.node_binds {
        mount(
            Some(src.as_path()),
            dst.as_path(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            format!(
                "node view: bind-mounting {} on {}: {e}",
                src.display(),
                dst.display()
            )
        })?;
    }
    Ok(())
}

fn join_cgroup(dir: &Path) -> Result<(), String> {
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, "0").map_err(|e| format!("joining {}: {e}", procs.display()))
}

fn enter_ns(file: &Path, kind: CloneFlags) -> Result<(), String> {
    let ns = fs::File::open(file).map_err(|e| format!("opening {}: {e}", file.display()))?;
    setns(&ns, kind).map_err(|e| format!("setns {}: {e}", file.display()))
}

/// Bind-mounts `src` on `dst` (below the private `/run`), read-only if asked.
fn bind(src: &Path, dst: &Path, ro: bool) -> Result<(), String> {
    let below_run = dst.starts_with("/run") || dst.starts_with("/var/run");
    if !below_run || dst.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "mount point {} is not below /run or /var/run (the only private part of the file system)",
            dst.display()
        ));
    }
    let meta = fs::metadata(src).map_err(|e| format!("volume {}: {e}", src.display()))?;
    if meta.is_dir() {
        fs::create_dir_all(dst).map_err(|e| format!("creating {}: {e}", dst.display()))?;
    } else {
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        fs::write(dst, "").map_err(|e| format!("creating {}: {e}", dst.display()))?;
    }
    mount_bind(src, dst, ro)?;
    // Mount points made here are reachable by the container's user.
    let _ = fs::set_permissions("/run", fs::Permissions::from_mode(0o755));
    Ok(())
}

/// Bind-mounts `src` on the existing `dst`, read-only if `ro`.
fn mount_bind(src: &Path, dst: &Path, ro: bool) -> Result<(), String> {
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("bind-mounting {} on {}: {e}", src.display(), dst.display()))?;
    if ro {
        mount(
            None::<&str>,
            dst,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| format!("making {} read-only: {e}", dst.display()))?;
    }
    Ok(())
}

fn drop_privileges(o: &Options) -> Result<(), String> {
    if o.uid.is_none() && o.gid.is_none() {
        return Ok(());
    }
    let gid = Gid::from_raw(o.gid.unwrap_or(0));
    setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    setresgid(gid, gid, gid).map_err(|e| format!("setresgid {gid}: {e}"))?;
    if let Some(uid) = o.uid {
        let uid = Uid::from_raw(uid);
        setresuid(uid, uid, uid).map_err(|e| format!("setresuid {uid}: {e}"))?;
    }
    Ok(())
}

fn exec(argv: &[String]) -> Result<(), String> {
    let c_args: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_str()).map_err(|e| format!("argument {a:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let error = execvp(&c_args[0], &c_args).unwrap_err();
    Err(format!("exec {}: {error}", argv[0]))
}
