//! `cargo xtask <command>`: build, test, demo and benchmark orchestration.
//!
//! Every command that needs the toolchain or the kernel runs `setup` first, so a newcomer's first
//! `cargo xtask test` or `cargo xtask demo` on a fresh machine installs what is missing.
#![forbid(unsafe_code)]

mod bench;
mod demo;
mod functions;
mod order;
mod residency;
mod setup;
/// The kernel programs' toolchain pin, shared with `mesh-agent/build.rs`.
#[path = "../../mesh-ebpf/toolchain.rs"]
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    about = "Build, test, demo and benchmark orchestration."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Make this Debian 12 machine able to build and test the project (idempotent; run as root).
    Setup,
    /// Build the agent (with its kernel programs) and the test workload.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: formatting, lints, unit tests and the privileged kernel/namespace tests.
    Test,
    /// Build a two-node testbed, run the agents and show a counted connection, then tear down.
    Demo {
        /// On a real Kubernetes control plane: `helm install` of the chart on two testbed
        /// kubelets (agents, CNI installer, CA), a namespace labelled through the API, traffic,
        /// access log, metrics, a policy, then `helm uninstall`.
        #[arg(long)]
        kube: bool,
    },
    /// Measure the mesh against direct connections (see BENCHMARKS.md).
    Bench {
        /// Short measurements, one repetition (under two minutes).
        #[arg(long)]
        quick: bool,
        /// Record perf profiles of the agents during the 1-stream throughput runs and the
        /// new-connection runs, with system calls and context switches per connection, and a
        /// timeline of every process's system calls during a new-connection run.
        #[arg(long)]
        profile: bool,
        /// Measure only these groups (repeatable): throughput, latency, connrate, memory,
        /// policy, kube (the agent on a real Kubernetes control plane: memory, watch traffic,
        /// capture after labelling; only when named), l7 (HTTP through the waypoint against
        /// direct and nginx; only when named), l7-waypoint (l7's waypoint cases alone).
        #[arg(long, value_parser = ["throughput", "latency", "connrate", "memory", "policy", "kube", "l7", "l7-waypoint"])]
        only: Vec<String>,
        /// Another `mesh-agent` binary (say, an earlier commit's release build) to measure as
        /// one more mode, pods opted into the short-cut, in the same run.
        #[arg(long)]
        compare_agent: Option<PathBuf>,
    },
    /// Profile which functions the agent and the waypoint run (a build with a function per
    /// page, the bench's rounds from a file system with read-ahead off) and write them to
    /// `mesh-agent/hot-functions.txt` and `mesh-agent/waypoint-hot-functions.txt`, the release
    /// links' order (see BENCHMARKS.md); then run the rounds on the release build so linked
    /// and add to the lists what it ran outside them.
    Order {
        /// Only these programs' lists (repeatable): agent, waypoint [default: both].
        #[arg(long, value_parser = ["agent", "waypoint"])]
        only: Vec<String>,
        /// Only the last step: run the rounds on the release build as linked, report section
        /// by section the pages they touch and what fault-around maps around them
        /// (`bench-results/<run>/order-check-*.md`), and add the functions run outside the
        /// list's span to the list.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = workspace_root();
    let result = match cli.command {
        Cmd::Setup => setup::run(&root),
        Cmd::Build { release } => setup::run(&root).and_then(|()| build(&root, release)),
        Cmd::Test => setup::run(&root).and_then(|()| test(&root)),
        Cmd::Demo { kube } => setup::run(&root)
            .and_then(|()| build(&root, false))
            .and_then(|()| {
                // The demo prints the lines that matter itself.
                std::env::set_var(mesh_tests::process::QUIET_ENV, "1");
                if kube {
                    demo::run_kube()
                } else {
                    demo::run()
                }
            }),
        Cmd::Bench {
            quick,
            profile,
            only,
            compare_agent,
        } => setup::run(&root)
            .and_then(|()| bench::check_tools())
            .and_then(|()| build(&root, true))
            .and_then(|()| {
                let plan = bench::Plan::new(quick, profile, only, compare_agent);
                bench::run(&root, plan).map(drop)
            }),
        Cmd::Order { only, check } => setup::run(&root)
            .and_then(|()| bench::check_tools())
            .and_then(|()| order::run(&root, &only, check)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Not anyhow's `Debug`, which adds a backtrace when RUST_BACKTRACE is set.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// `cargo` as invoked by the user (the toolchain that runs xtask).
fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

/// Runs a step, printing what it runs and how long it took; a failure names the step.
fn step(name: &str, mut cmd: Command) -> Result<()> {
    println!("[xtask] {name}: {}", render(&cmd));
    let start = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("{name}: could not start {}", render(&cmd)))?;
    if !status.success() {
        bail!("{name} failed ({status}): {}", render(&cmd));
    }
    println!(
        "[xtask] {name}: ok in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn render(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// What `build` builds. Releases are built with this selection, which decides the features of
/// shared dependencies and so the symbol names the link order (`cargo xtask order`) lists.
const BUILD_SELECTION: [&str; 7] = [
    "--package",
    "mesh-agent",
    "--package",
    "mesh-tests",
    "--package",
    "mesh-cni",
    "--bins",
];

fn build(root: &Path, release: bool) -> Result<()> {
    step("build", build_command(root, release))
}

/// The binaries' build, as `build`, `demo` and `test` run it: one non-incremental build (see
/// [`test_cargo`]), so the demo's binaries serve the tests after it.
fn build_command(root: &Path, release: bool) -> Command {
    let mut cmd = test_cargo(root);
    cmd.arg("build").args(BUILD_SELECTION);
    if release {
        cmd.arg("--release");
    }
    cmd
}

/// `cargo` for the test run's builds: without incremental compilation, whose caches would
/// double what a cold run writes (measured: 2.7 of 6.6 GiB) for edits a full run never makes.
fn test_cargo(root: &Path) -> Command {
    let mut cmd = cargo(root);
    cmd.env("CARGO_INCREMENTAL", "0");
    cmd
}

fn test(root: &Path) -> Result<()> {
    let mut fmt = cargo(root);
    fmt.args(["fmt", "--all", "--", "--check"]);
    step("format check", fmt)?;
    let mut clippy = test_cargo(root);
    clippy.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
    step("clippy", clippy)?;
    step("clippy (kernel programs)", kernel_clippy(root)?)?;
    check_disk_space(root)?;
    build(root, false)?;
    // Unit tests of every crate, then the privileged integration tests (testbed, kernel,
    // cleanup). They run as root; a test that cannot get what it needs fails with the reason.
    let mut tests = test_cargo(root);
    tests.args(["test", "--all-targets"]);
    step("tests", tests)?;
    check_nothing_left()
}

/// What a cold `cargo xtask test` needs in `target/`: measured 3.8 GiB for the Rust builds
/// without incremental caches (clippy 1.6, build 2.0, tests 2.9 with them, less their 2.7 of
/// incremental caches) and 0.6 GiB of Go tools and the kernel programs' clippy, with a margin
/// for the testbed's scratch files and growth.
const TEST_DISK_NEEDED: u64 = 6 << 30;

/// Fails before building when the disk holding `target/` cannot take the test build, naming
/// what is free and what is needed, instead of the linker dying with `No space left on device`.
fn check_disk_space(root: &Path) -> Result<()> {
    let target = root.join("target");
    let probe = if target.exists() {
        target
    } else {
        root.to_path_buf()
    };
    let stat = nix::sys::statvfs::statvfs(&probe)
        .with_context(|| format!("statvfs {}", probe.display()))?;
    let free = stat.blocks_available() * stat.fragment_size();
    let built = dir_size(&root.join("target"));
    // Tenths of a GiB, exact enough for a message.
    let gib = |b: u64| format!("{}.{}", b >> 30, ((b & ((1 << 30) - 1)) * 10) >> 30);
    println!(
        "[xtask] disk: {} GiB free on {}, target/ holds {} GiB",
        gib(free),
        probe.display(),
        gib(built)
    );
    // Whatever target/ holds already counts toward what the build needs.
    if free + built < TEST_DISK_NEEDED {
        bail!(
            "not enough disk for the test build: {} GiB free on {} and {} GiB in target/, \
             a cold build needs about {} GiB; free some space (for example `cargo clean` in \
             other checkouts) and rerun",
            gib(free),
            probe.display(),
            gib(built),
            gib(TEST_DISK_NEEDED)
        );
    }
    Ok(())
}

/// Bytes held by the files under `dir` (0 when it does not exist); symlinks are not followed.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Clippy for `mesh-ebpf`, which only builds for the BPF target: the kernel programs'
/// toolchain (the pinned nightly, or stable with `RUSTC_BOOTSTRAP=1`), `build-std=core`, and the
/// `bpf_target_arch` cfg that aya-build sets for real builds.
fn kernel_clippy(root: &Path) -> Result<Command> {
    let chosen = toolchain::EbpfToolchain::detect()
        .context("no toolchain for the kernel programs (run `cargo xtask setup`)")?;
    let mut cmd = Command::new("cargo");
    if chosen.needs_bootstrap() {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd.current_dir(root)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTFLAGS")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        )
        .arg(format!("+{}", chosen.rustup_name()))
        .args([
            "clippy",
            "--package",
            "mesh-ebpf",
            "--target",
            "bpfel-unknown-none",
        ])
        .args([
            "-Z",
            "build-std=core",
            "--target-dir",
            "target/kernel-clippy",
            "--",
            "-D",
            "warnings",
        ]);
    Ok(cmd)
}

/// After the tests, no testbed may remain: no namespace, cgroup or bpffs directory.
fn check_nothing_left() -> Result<()> {
    let testbed_entries = |dir: &Path| {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(mesh_tests::testbed::PREFIX))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let netns = testbed_entries(Path::new("/run/netns"));
    let scratch = testbed_entries(&std::env::temp_dir());
    let host = mesh_tests::host::require_privileges()?;
    let dirs: Vec<PathBuf> = [host.cgroup2, host.bpffs]
        .into_iter()
        .map(|d| d.join(mesh_tests::testbed::TESTBED_DIR))
        .filter(|d| d.exists())
        .collect();
    if !netns.is_empty() || !dirs.is_empty() || !scratch.is_empty() {
        bail!(
            "the tests left testbed state behind: namespaces {netns:?}, directories {dirs:?}, \
             scratch directories {scratch:?}"
        );
    }
    println!(
        "[xtask] cleanup check: no testbed namespace, cgroup, bpffs or scratch directory left"
    );
    Ok(())
}
