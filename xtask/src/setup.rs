//! `cargo xtask setup`: make a fresh Debian 12 machine able to build and test the project.
//!
//! Each step checks first and changes the machine only when needed, so a second run is quick and
//! changes nothing. The parsing the checks rely on is pure and unit-tested at the bottom.

#![expect(
    clippy::unnecessary_wraps,
    reason = "all checks in `STEPS` share one signature"
)]

use std::env;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use crate::toolchain::{self, EbpfToolchain};

/// Helm, built with Go, for the chart's tests.
mod go_tool;
/// The tests' Kubernetes control plane (`mesh-kcp`, built with Go) and its CRD modules.
mod kcp;

/// (command looked for on `PATH`, Debian package that provides it).
const APT_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("bpftool", "bpftool"),
    ("tcpdump", "tcpdump"),
    ("iperf3", "iperf3"),
    // The control-plane test reaches the API server from a node's namespace with it; the
    // waypoint tests send HTTP/1.1 and h2c with it.
    ("curl", "curl"),
    // The waypoint's HTTP/2 multiplexing test, and the L7 benchmarks (h2load, wrk).
    ("h2load", "nghttp2-client"),
    ("wrk", "wrk"),
    // The L7 benchmarks' reference: a C reverse proxy on the same rig (never started as a
    // service: see `install_apt`).
    ("nginx", "nginx-light"),
    // The offline rust-src fallback unpacks a .tar.xz.
    ("xz", "xz-utils"),
    // `ports.rs` narrows pods' ephemeral port ranges with it.
    ("sysctl", "procps"),
    // `capture.rs` runs a client that binds its socket before connecting.
    ("python3", "python3"),
];
const BPFFS_DIR: &str = "/sys/fs/bpf";
const CGROUP2_DIR: &str = "/run/mesh/cgroup2";
/// How many trailing lines of a failed command's output its error shows.
const TAIL_LINES: usize = 20;

/// What a step's check found: `Present(what is there)` or `Missing(what is not)`.
enum State {
    Present(String),
    Missing(String),
}
use State::{Missing, Present};

type Check = fn(&Path) -> Result<State>;
type Install = fn(&Path) -> Result<()>;

/// The steps after `root`, in order: (name, whether installing needs root, check, install), the
/// last two called with the workspace root. The rustup and cargo steps write to the invoking
/// user's `~/.rustup` and `~/.cargo`, so they do not need root.
const STEPS: &[(&str, bool, Check, Install)] = &[
    ("apt packages", true, check_apt, install_apt),
    (
        "kernel-program toolchain",
        false,
        check_toolchain,
        install_toolchain,
    ),
    ("rust-src", false, check_src, install_src),
    ("bpf-linker", false, check_linker, install_linker),
    ("bpffs", true, check_bpffs, install_bpffs),
    ("cgroup2", true, check_cgroup2, install_cgroup2),
    ("kubernetes control plane", false, kcp::check, kcp::install),
    ("helm", false, go_tool::check_helm, go_tool::install_helm),
    (
        "jaeger",
        false,
        go_tool::check_jaeger,
        go_tool::install_jaeger,
    ),
    (
        "gamma conformance",
        false,
        go_tool::check_gamma,
        go_tool::install_gamma,
    ),
];

/// Runs every step in order, printing one `[setup]` line per step and a final summary.
pub fn run(workspace_root: &Path) -> Result<()> {
    let started = Instant::now();
    check_root(workspace_root)?;
    let mut installed = Vec::new();
    for &(name, _, check, install) in STEPS {
        let failed = || format!("step `{name}` failed");
        let what = match check(workspace_root).with_context(failed)? {
            Present(detail) => {
                println!("[setup] {name}: present ({detail})");
                continue;
            }
            Missing(what) => what,
        };
        println!("[setup] {name}: installing … ({what})");
        let step_started = Instant::now();
        install(workspace_root).with_context(failed)?;
        if let Missing(why) = check(workspace_root).with_context(failed)? {
            bail!(
                "step `{name}` failed: after installing, its check still finds: {why}\n\
                 what to do: fix that by hand, then rerun `cargo xtask setup`"
            );
        }
        let secs = step_started.elapsed().as_secs_f64();
        println!("[setup] {name}: installed in {secs:.1}s");
        installed.push(format!("{name} ({secs:.1}s)"));
    }
    if installed.is_empty() {
        println!("[setup] all present");
    } else {
        let total = started.elapsed().as_secs_f64();
        let installed = installed.join(", ");
        println!("[setup] installed {installed}; the rest was present; total {total:.1}s");
    }
    Ok(())
}

/// Fails up front when we are not root and a step that needs root has work to do.
fn check_root(workspace_root: &Path) -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid =
        mesh_tests::host::effective_uid(&status).context("no `Uid:` line in /proc/self/status")?;
    let mut needs = Vec::new();
    for &(name, _, check, _) in STEPS.iter().filter(|step| step.1 && euid != 0) {
        let failed = || format!("step `{name}` failed");
        if let Missing(what) = check(workspace_root).with_context(failed)? {
            needs.push(format!("`{name}` ({what})"));
        }
    }
    if !needs.is_empty() {
        bail!(
            "step `root` failed: running as euid {euid}, but step {} needs root\n\
             what to do: rerun as root, e.g. `sudo env PATH=\"$PATH\" cargo xtask setup`",
            needs.join(" and step ")
        );
    }
    let detail = match euid {
        0 => "euid 0".to_owned(),
        _ => format!("euid {euid}, but no step that needs root has work to do"),
    };
    println!("[setup] root: present ({detail})");
    Ok(())
}

fn missing_apt_packages() -> Vec<&'static str> {
    missing_packages(APT_PACKAGES, |cmd| find_on_path(cmd).is_some())
}

fn check_apt(_: &Path) -> Result<State> {
    let missing = missing_apt_packages();
    if missing.is_empty() {
        let cmds: Vec<&str> = APT_PACKAGES.iter().map(|(cmd, _)| *cmd).collect();
        return Ok(Present(format!("{} on PATH", cmds.join(", "))));
    }
    Ok(Missing(missing.join(", ")))
}

fn install_apt(_: &Path) -> Result<()> {
    const HINT: &str = "check that the Debian mirror in /etc/apt/sources.list(.d) is reachable \
                        and that no other apt/dpkg process holds the lock";
    stream(command(&["apt-get", "update"]), HINT)?;
    let mut install = command(&["apt-get", "install", "-y", "--no-install-recommends"]);
    install.env("DEBIAN_FRONTEND", "noninteractive");
    install.args(missing_apt_packages());
    // A package's service (nginx's) must not start on the machine's own network: Debian's
    // policy-rc.d (exit 101: "action forbidden") holds it back, for this install only.
    let policy = Path::new(POLICY_RC_D);
    let placed = !policy.exists();
    if placed {
        fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask setup: no service starts during its install\nexit 101\n",
        )
        .and_then(|()| fs::set_permissions(policy, fs::Permissions::from_mode(0o755)))
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
    }
    let installed = stream(install, HINT);
    if placed {
        fs::remove_file(policy).with_context(|| format!("removing {POLICY_RC_D}"))?;
    }
    installed
}

/// Debian's hook that tells package scripts whether they may start services.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Set when installing the pinned nightly failed and stable (with `RUSTC_BOOTSTRAP=1`) was
/// accepted instead, for this run; the next run tries the nightly again.
static FELL_BACK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `rustc -vV` facts and the sysroot of the toolchain the kernel programs build with.
fn chosen_toolchain() -> Result<(EbpfToolchain, RustcInfo, PathBuf)> {
    let chosen = EbpfToolchain::detect().with_context(|| {
        format!(
            "neither {} nor {} (LLVM {}) is installed",
            toolchain::PINNED_NIGHTLY,
            toolchain::FALLBACK,
            toolchain::LLVM_MAJOR
        )
    })?;
    let name = chosen.rustup_name();
    let vv = toolchain::rustc_vv(name).with_context(|| format!("`rustc +{name} -vV` fails"))?;
    let info = parse_rustc_vv(&vv)?;
    let mut sysroot = command(&["rustup", "run", name, "rustc", "--print", "sysroot"]);
    sysroot
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("RUSTUP_AUTO_INSTALL", "0");
    let hint = format!("reinstall it: `rustup toolchain install {name}`");
    let sysroot = capture(sysroot, &hint)?;
    Ok((chosen, info, PathBuf::from(sysroot.trim())))
}

/// Whether rustup's toolchain `name` has `cargo clippy` (the kernel crate is linted with it).
fn has_clippy(name: &str) -> bool {
    let mut clippy = command(&["rustup", "run", name, "cargo-clippy", "--version"]);
    clippy
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("RUSTUP_AUTO_INSTALL", "0");
    capture(clippy, "").is_ok()
}

fn check_toolchain(_: &Path) -> Result<State> {
    Ok(match EbpfToolchain::detect() {
        Some(EbpfToolchain::Pinned(name)) if !has_clippy(name) => {
            Missing(format!("{name} has no clippy component"))
        }
        Some(EbpfToolchain::Pinned(name)) => Present(format!(
            "{name}, rustc {}, with clippy",
            toolchain::PINNED_COMMIT
        )),
        Some(EbpfToolchain::StableBootstrap)
            if FELL_BACK.load(std::sync::atomic::Ordering::Relaxed) =>
        {
            Present(format!(
                "{} with RUSTC_BOOTSTRAP=1 for the kernel crate ({} could not be installed)",
                toolchain::FALLBACK,
                toolchain::PINNED_NIGHTLY
            ))
        }
        _ => Missing(format!("{} is not installed", toolchain::PINNED_NIGHTLY)),
    })
}

/// Installs the pinned nightly (minimal profile, with `rust-src` and `clippy`; on an installed
/// toolchain this adds what is missing); if rustup cannot, falls back to the stable toolchain
/// when its LLVM matches.
fn install_toolchain(_: &Path) -> Result<()> {
    let hint = "check that the Rust distribution server is reachable and that rustup is \
                installed";
    // The pinned commit is installed (perhaps as `nightly`) but lacks a component: add it,
    // without `toolchain install`, which would move a floating `nightly` to today's.
    if let Some(EbpfToolchain::Pinned(name)) = EbpfToolchain::detect() {
        let mut add = command(&["rustup", "component", "add", "clippy", "rust-src"]);
        add.args(["--toolchain", name])
            .env_remove("RUSTUP_TOOLCHAIN");
        return stream(add, hint);
    }
    let name = toolchain::PINNED_NIGHTLY;
    let mut rustup = command(&["rustup", "toolchain", "install", name]);
    rustup.args([
        "--profile",
        "minimal",
        "--component",
        "rust-src",
        "--component",
        "clippy",
    ]);
    rustup.env_remove("RUSTUP_TOOLCHAIN");
    let Err(err) = stream(rustup, hint) else {
        return Ok(());
    };
    let stable = toolchain::rustc_vv(toolchain::FALLBACK);
    match stable.as_deref().map(toolchain::llvm_major) {
        Some(Some(toolchain::LLVM_MAJOR)) => {
            println!(
                "[setup] kernel-program toolchain: {name} could not be installed; falling back \
                 to {} with RUSTC_BOOTSTRAP=1 for the kernel crate only (same LLVM {})",
                toolchain::FALLBACK,
                toolchain::LLVM_MAJOR
            );
            FELL_BACK.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        other => Err(err.context(format!(
            "and the fallback {} is {}",
            toolchain::FALLBACK,
            match other {
                None => "not installed".to_owned(),
                Some(llvm) => format!("on LLVM {llvm:?}, not {}", toolchain::LLVM_MAJOR),
            }
        ))),
    }
}

fn check_src(_: &Path) -> Result<State> {
    let (chosen, _, sysroot) = chosen_toolchain()?;
    let src = sysroot.join("lib/rustlib/src/rust");
    let marker = src.join("library/core/Cargo.toml");
    if marker.is_file() {
        let bootstrap = if chosen.needs_bootstrap() {
            ", built with RUSTC_BOOTSTRAP=1"
        } else {
            ""
        };
        let name = chosen.rustup_name();
        return Ok(Present(format!("{name}{bootstrap}: {}", src.display())));
    }
    Ok(Missing(format!("no {}", marker.display())))
}

/// `rustup component add`, or offline the matching tarball in `<workspace>/../shared/toolchain`.
fn install_src(workspace_root: &Path) -> Result<()> {
    let (chosen, rustc, sysroot) = chosen_toolchain()?;
    let name = chosen.rustup_name();
    let rustlib = sysroot.join("lib/rustlib");
    let mut rustup = command(&["rustup", "component", "add", "rust-src"]);
    rustup.args(["--toolchain", name]);
    rustup.env_remove("RUSTUP_TOOLCHAIN");
    let hint = format!(
        "install rust-src by hand: `rustup component add rust-src --toolchain {name}` (needs \
         the Rust distribution server), or unpack a rust-src tarball of commit {} with `tar -xJf \
         <tarball> -C {dir}` and append a line `rust-src` to {dir}/components",
        rustc.commit_hash,
        dir = rustlib.display(),
    );
    let Err(rustup_err) = stream(rustup, &hint) else {
        return Ok(());
    };
    let shared = workspace_root.parent().unwrap_or(workspace_root);
    let shared = shared.join("shared/toolchain");
    src_from_tarball(&shared, &rustc.commit_hash, &rustlib)
        .map_err(|err| anyhow!("{rustup_err:#}\n(the offline fallback failed too: {err:#})"))
}

fn src_from_tarball(shared: &Path, commit_hash: &str, rustlib: &Path) -> Result<()> {
    let names = file_names(shared)?;
    let name = matching_tarball(names.iter().map(String::as_str), commit_hash);
    let name = name.with_context(|| {
        let shared = shared.display();
        format!("no rust-src-<version>-<channel>-<hash>.tar.xz in {shared} matches {commit_hash}")
    })?;
    let tarball = shared.join(name);
    let shown = tarball.display();
    println!("[setup] rust-src: rustup failed, unpacking {shown}");
    let hint = "check that xz-utils is installed and the tarball intact";
    let mut tar = command(&["tar", "-xJf"]);
    tar.arg(&tarball).arg("-C").arg(rustlib);
    stream(tar, hint)?;
    let components = rustlib.join("components");
    let text = fs::read_to_string(&components).unwrap_or_default();
    if let Some(text) = with_component(&text, "rust-src") {
        let context = || format!("writing {}", components.display());
        fs::write(&components, text).with_context(context)?;
    }
    Ok(())
}

/// Present when `bpf-linker --version` runs and `ldd` resolves its libLLVM to an existing file
/// of LLVM [`toolchain::LLVM_MAJOR`] (from either toolchain: both ship that LLVM).
fn check_linker(_: &Path) -> Result<State> {
    let Some(path) = find_on_path("bpf-linker") else {
        return Ok(Missing("bpf-linker is not on PATH".to_owned()));
    };
    let mut version = Command::new(&path);
    version.arg("--version").env_remove("LD_LIBRARY_PATH");
    let Ok(version) = capture(version, "") else {
        return Ok(Missing(format!("`{} --version` fails", path.display())));
    };
    let mut ldd = command(&["ldd"]);
    ldd.arg(&path).env_remove("LD_LIBRARY_PATH");
    let llvms = ldd_llvm_paths(&capture(ldd, "").unwrap_or_default());
    let right =
        |llvm: &&PathBuf| llvm.is_file() && llvm_so_major(llvm) == Some(toolchain::LLVM_MAJOR);
    Ok(match (llvms.iter().find(right), llvms.first()) {
        (Some(llvm), _) => Present(format!("{}, {}", version.trim(), llvm.display())),
        (None, Some(other)) => Missing(format!(
            "bpf-linker uses {}, not LLVM {}",
            other.display(),
            toolchain::LLVM_MAJOR
        )),
        (None, None) => Missing("`ldd bpf-linker` shows no libLLVM".to_owned()),
    })
}

/// The LLVM major version in a libLLVM file name (`libLLVM.so.22.1-rust-…`, `libLLVM-22…`).
fn llvm_so_major(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    let rest = name
        .strip_prefix("libLLVM.so.")
        .or_else(|| name.strip_prefix("libLLVM-"))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `cargo install bpf-linker` with the default (stable) cargo, linked against the kernel-program
/// toolchain's libLLVM.
fn install_linker(_: &Path) -> Result<()> {
    let (_, rustc, sysroot) = chosen_toolchain()?;
    let lib = sysroot.join("lib");
    let llvm = llvm_link_name(file_names(&lib)?.iter().map(String::as_str));
    let llvm = llvm.with_context(|| format!("no libLLVM*.so in {}", lib.display()))?;
    let lib = lib.display();
    let features = format!("llvm-{},no-llvm-linking", rustc.llvm_major);
    let mut cargo = command(&["cargo", "install", "bpf-linker"]);
    cargo.args(["--version", "^0.13", "--force", "--no-default-features"]);
    cargo.args(["--features", &features]);
    let rustflags = format!(
        "-C link-arg=-Wl,--no-as-needed -C link-arg=-L{lib} -C link-arg=-l{llvm} \
         -C link-arg=-Wl,-rpath,{lib}"
    );
    cargo.env("RUSTFLAGS", rustflags);
    cargo.env_remove("RUSTUP_TOOLCHAIN");
    cargo.env_remove("CARGO_TARGET_DIR");
    cargo.env_remove("CARGO_ENCODED_RUSTFLAGS");
    // Outside the workspace, so that neither its cargo config nor a toolchain file applies.
    cargo.current_dir(env::temp_dir());
    println!("[setup] bpf-linker: building takes 1-4 minutes; cargo's output follows");
    let hint =
        "check that the crates registry is reachable and that a C linker (`cc`) is installed; the \
                command can be rerun by hand";
    stream(cargo, hint)
}

fn check_bpffs(_: &Path) -> Result<State> {
    let is_bpffs = |(at, fstype): &(String, String)| at == BPFFS_DIR && fstype == "bpf";
    if mounts()?.iter().any(is_bpffs) {
        return Ok(Present(format!("bpf at {BPFFS_DIR}")));
    }
    Ok(Missing(format!("no bpf mount at {BPFFS_DIR}")))
}

fn install_bpffs(_: &Path) -> Result<()> {
    let hint = "the kernel needs CONFIG_BPF_SYSCALL and a container must be privileged; then \
                mount it by hand: `mount -t bpf bpf /sys/fs/bpf`";
    stream(command(&["mount", "-t", "bpf", "bpf", BPFFS_DIR]), hint)
}

fn check_cgroup2(_: &Path) -> Result<State> {
    let cgroup2 = mounts()?.into_iter().find(|(_, t)| t == "cgroup2");
    Ok(match cgroup2 {
        Some((at, _)) => Present(format!("cgroup2 at {at}")),
        None => Missing("no cgroup2 mount".to_owned()),
    })
}

fn install_cgroup2(_: &Path) -> Result<()> {
    fs::create_dir_all(CGROUP2_DIR).with_context(|| format!("`mkdir -p {CGROUP2_DIR}`"))?;
    let hint = "the kernel needs cgroup v2 and a container must be privileged; then mount it \
                by hand: `mount -t cgroup2 none /run/mesh/cgroup2`";
    let mount = command(&["mount", "-t", "cgroup2", "none", CGROUP2_DIR]);
    stream(mount, hint)
}

/// (mount point, file system type) of every mount, parsed by the testbed's host module.
fn mounts() -> Result<Vec<(String, String)>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mounts = mesh_tests::host::parse_mountinfo(&text);
    Ok(mounts
        .into_iter()
        .map(|m| (m.mount_point.display().to_string(), m.fstype))
        .collect())
}

/// The first executable file called `cmd` in a `PATH` directory.
fn find_on_path(cmd: &str) -> Option<PathBuf> {
    let executable = |m: fs::Metadata| m.is_file() && m.permissions().mode() & 0o111 != 0;
    let path = env::var_os("PATH")?;
    let mut candidates = env::split_paths(&path).map(|dir| dir.join(cmd));
    candidates.find(|p| fs::metadata(p).is_ok_and(executable))
}

fn file_names(dir: &Path) -> Result<Vec<String>> {
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let name = |entry: io::Result<fs::DirEntry>| entry.ok()?.file_name().into_string().ok();
    Ok(entries.filter_map(name).collect())
}

// ---- Running commands ----

fn command(argv: &[&str]) -> Command {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null());
    cmd
}

/// Runs `cmd` quietly and returns its stdout; errors as [`failure`] says.
pub(crate) fn capture(mut cmd: Command, hint: &str) -> Result<String> {
    let out = cmd.output();
    let out = out.map_err(|e| anyhow!("could not start `{cmd:?}`: {e}\nwhat to do: {hint}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let output: Vec<&str> = stdout.lines().chain(stderr.lines()).collect();
    Err(failure(&cmd, out.status, &output, hint))
}

/// Runs `cmd`, echoing its stdout and stderr (merged, in order) as they come; errors as
/// [`failure`] says.
fn stream(mut cmd: Command, hint: &str) -> Result<()> {
    let (reader, writer) = io::pipe().context("creating a pipe")?;
    cmd.stdout(writer.try_clone().context("duplicating a pipe")?);
    let child = cmd.stderr(writer).spawn();
    // `cmd` holds our copies of the pipe's write end: close them, or reading never ends.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child =
        child.map_err(|e| anyhow!("could not start `{cmd:?}`: {e}\nwhat to do: {hint}"))?;
    let mut output = Vec::new();
    for line in BufReader::new(reader).split(b'\n') {
        let line = line.context("reading a command's output")?;
        let line = String::from_utf8_lossy(&line).trim_end().to_owned();
        eprintln!("    {line}");
        output.push(line);
    }
    let status = child.wait().context("waiting for a command")?;
    if status.success() {
        return Ok(());
    }
    let output: Vec<&str> = output.iter().map(String::as_str).collect();
    Err(failure(&cmd, status, &output, hint))
}

/// The error of a failed command: its command line (with environment changes and directory),
/// exit status, the last [`TAIL_LINES`] lines of its output and `hint`, what to do about it.
fn failure(cmd: &Command, status: ExitStatus, output: &[&str], hint: &str) -> anyhow::Error {
    let tail = &output[output.len().saturating_sub(TAIL_LINES)..];
    let tail: Vec<String> = tail.iter().map(|line| format!("    {line}")).collect();
    let tail = match tail.len() {
        0 => "it printed nothing".to_owned(),
        n => format!("last {n} lines of its output:\n{}", tail.join("\n")),
    };
    anyhow!("`{cmd:?}` exited with {status}\n{tail}\nwhat to do: {hint}")
}

// ---- Pure parsing ----

/// The packages of `table` whose command is not `found` (on `PATH`), without duplicates.
fn missing_packages<'a>(table: &[(&str, &'a str)], found: impl Fn(&str) -> bool) -> Vec<&'a str> {
    let mut missing = Vec::new();
    for &(cmd, package) in table {
        if !found(cmd) && !missing.contains(&package) {
            missing.push(package);
        }
    }
    missing
}

/// What setup needs from `rustc +nightly -vV`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RustcInfo {
    release: String,
    commit_hash: String,
    llvm_major: u32,
}

fn parse_rustc_vv(out: &str) -> Result<RustcInfo> {
    let field = |key: &str| {
        let value = toolchain::field(out, key);
        value.with_context(|| format!("no `{key}` line in `rustc -vV` output:\n{out}"))
    };
    let llvm = field("LLVM version:")?;
    let llvm_major = llvm.split('.').next().and_then(|major| major.parse().ok());
    Ok(RustcInfo {
        release: field("release:")?.to_owned(),
        commit_hash: field("commit-hash:")?.to_owned(),
        llvm_major: llvm_major.with_context(|| format!("cannot parse LLVM version `{llvm}`"))?,
    })
}

/// The absolute paths `ldd` output resolves libLLVM to.
fn ldd_llvm_paths(ldd: &str) -> Vec<PathBuf> {
    let llvm = |line: &str| {
        let (name, resolved) = line.split_once("=>")?;
        let path = resolved.trim().split(" (").next()?.trim();
        (name.trim().starts_with("libLLVM") && path.starts_with('/')).then(|| path.into())
    };
    ldd.lines().filter_map(llvm).collect()
}

/// The `-l` name of the `libLLVM*.so` among `names` (`libLLVM-22-rust-1.97.0-nightly.so` →
/// `LLVM-22-rust-1.97.0-nightly`); `libLLVM.so.<version>` cannot be linked with `-l`.
fn llvm_link_name<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let name = |n: &'a str| n.strip_prefix("lib")?.strip_suffix(".so");
    let llvm = names.into_iter().filter_map(name);
    llvm.filter(|n| n.starts_with("LLVM"))
        .min()
        .map(str::to_owned)
}

/// The `rust-src-<version>-<nightly|stable>-<shorthash>.tar.xz` among `names` whose short hash
/// (at least 7 hex digits) starts the commit `hash`.
fn matching_tarball<'a>(names: impl IntoIterator<Item = &'a str>, hash: &str) -> Option<&'a str> {
    let matches = |name: &&str| {
        let stem = name.strip_prefix("rust-src-")?.strip_suffix(".tar.xz")?;
        let (version, short) = stem
            .rsplit_once("-nightly-")
            .or_else(|| stem.rsplit_once("-stable-"))?;
        let hex = short.len() >= 7 && short.chars().all(|c| c.is_ascii_hexdigit());
        Some(!version.is_empty() && hex && hash.starts_with(short))
    };
    names.into_iter().find(|name| matches(name) == Some(true))
}

/// The `components` file of `lib/rustlib` with a `component` line added; `None` if listed.
fn with_component(components: &str, component: &str) -> Option<String> {
    let mut lines: Vec<&str> = components.lines().collect();
    if lines.contains(&component) {
        return None;
    }
    lines.push(component);
    Some(lines.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NIGHTLY_VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)
binary: rustc
commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a
commit-date: 2026-05-19
host: x86_64-unknown-linux-gnu
release: 1.97.0-nightly
LLVM version: 22.1.4
";

    #[test]
    fn rustc_vv() {
        let info = parse_rustc_vv(NIGHTLY_VV).unwrap();
        let expected = RustcInfo {
            release: "1.97.0-nightly".into(),
            commit_hash: "e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a".into(),
            llvm_major: 22,
        };
        assert_eq!(info, expected);
        assert!(parse_rustc_vv(&NIGHTLY_VV.replace("LLVM version: 22.1.4\n", "")).is_err());
        assert!(parse_rustc_vv(&NIGHTLY_VV.replace("22.1.4", "x.1")).is_err());
        assert!(parse_rustc_vv(&NIGHTLY_VV.replace("commit-hash", "hash")).is_err());
    }

    #[test]
    fn llvm_link_name_skips_the_versioned_soname() {
        let names = [
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "librustc_driver-b5a965480ee51f9a.so",
            "libLLVM-22-rust-1.97.0-nightly.so",
            "rustlib",
        ];
        let name = llvm_link_name(names);
        assert_eq!(name.as_deref(), Some("LLVM-22-rust-1.97.0-nightly"));
        assert_eq!(
            llvm_link_name(["libLLVM.so.22.1-rust-1.97.0-nightly", "rustlib"]),
            None
        );
    }

    #[test]
    fn ldd_output() {
        let ldd = "\tlinux-vdso.so.1 (0x00007fcd24db1000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fcd2481e000)
\tlibLLVM.so.22.1-rust-1.97.0-nightly => /tc/lib/libLLVM.so.22.1-rust-1.97.0-nightly (0x7fcd1a0)
\tlibLLVM-19.so.1 => not found
";
        let expected = PathBuf::from("/tc/lib/libLLVM.so.22.1-rust-1.97.0-nightly");
        assert_eq!(ldd_llvm_paths(ldd), [expected]);
    }

    #[test]
    fn fallback_tarball_must_match_the_commit() {
        let hash = "e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a";
        let tarball = "rust-src-1.97.0-nightly-e50aa6fba.tar.xz";
        assert_eq!(
            matching_tarball(["README.md", tarball], hash),
            Some(tarball)
        );
        assert_eq!(matching_tarball([tarball], "0123456789abcdef"), None);
        assert_eq!(
            matching_tarball(["rust-src-1.97.0-nightly-e5.tar.xz"], hash),
            None
        );
        assert_eq!(
            matching_tarball(["rust-src-1.97.0-nightly-e50aa6fba.tar.gz"], hash),
            None
        );
        assert_eq!(
            matching_tarball(["rust-std-1.97.0-nightly-e50aa6fba.tar.xz"], hash),
            None
        );
        let stable = "rust-src-1.95.0-stable-59807616e.tar.xz";
        assert_eq!(
            matching_tarball(
                [tarball, stable],
                "59807616e1fa2540724bfbac14d7976d7e4a3860"
            ),
            Some(stable)
        );
    }

    #[test]
    fn llvm_major_from_library_names() {
        let p = |s: &str| llvm_so_major(Path::new(s));
        assert_eq!(p("/t/lib/libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(p("/t/lib/libLLVM-22-rust-1.95.0-stable.so"), Some(22));
        assert_eq!(p("/usr/lib/libLLVM-19.so.1"), Some(19));
        assert_eq!(p("/usr/lib/libc.so.6"), None);
    }

    #[test]
    fn toolchain_pin_is_recognised_from_rustc_vv() {
        assert!(toolchain::is_pinned(NIGHTLY_VV));
        assert_eq!(
            toolchain::llvm_major(NIGHTLY_VV),
            Some(toolchain::LLVM_MAJOR)
        );
        let other = NIGHTLY_VV.replace("e50aa6fba4e6", "9eb3be26b46e");
        assert!(!toolchain::is_pinned(&other));
        assert_eq!(toolchain::llvm_major("LLVM version: x"), None);
    }

    #[test]
    fn apt_installs_only_missing_packages_once() {
        let table = [
            ("ip", "iproute2"),
            ("ss", "iproute2"),
            ("nsenter", "util-linux"),
        ];
        assert!(missing_packages(&table, |_| true).is_empty());
        assert_eq!(
            missing_packages(&table, |cmd| cmd == "nsenter"),
            ["iproute2"]
        );
        assert_eq!(
            missing_packages(&table, |_| false),
            ["iproute2", "util-linux"]
        );
        assert_eq!(
            missing_packages(APT_PACKAGES, |_| false).len(),
            APT_PACKAGES.len()
        );
    }

    #[test]
    fn failed_commands_explain_themselves() {
        let script = "for i in $(seq 1 30); do echo line $i; done; echo oops >&2; exit 3";
        for streamed in [true, false] {
            let cmd = command(&["sh", "-c", script]);
            let err = if streamed {
                stream(cmd, "do X")
            } else {
                capture(cmd, "do X").map(drop)
            };
            let err = format!("{:#}", err.unwrap_err());
            assert!(err.starts_with(r#"`"sh" "-c" "for i in"#), "{err}");
            assert!(
                err.contains("exited with exit status: 3\nlast 20 lines"),
                "{err}"
            );
            assert!(
                err.contains("    line 30\n    oops\nwhat to do: do X"),
                "{err}"
            );
            assert!(!err.contains("line 11\n"), "{err}");
        }
        let err = capture(command(&["/nonexistent/tool"]), "install it").unwrap_err();
        assert!(format!("{err:#}").contains("could not start"), "{err:#}");
        assert_eq!(capture(command(&["echo", "hi"]), "").unwrap(), "hi\n");
    }

    #[test]
    fn components_file() {
        assert_eq!(with_component("cargo-x\nrust-src\n", "rust-src"), None);
        let added = with_component("cargo-x", "rust-src");
        assert_eq!(added.as_deref(), Some("cargo-x\nrust-src\n"));
        assert_eq!(
            with_component("", "rust-src").as_deref(),
            Some("rust-src\n")
        );
    }
}
