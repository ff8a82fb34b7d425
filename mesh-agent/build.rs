//! Builds the kernel programs (`mesh-ebpf`) for the BPF target with aya-build, so the agent
//! binary embeds them. Needs the pinned nightly (or, as a fallback, stable with
//! `RUSTC_BOOTSTRAP=1`) with `rust-src`, and `bpf-linker` (`cargo xtask setup` installs them; the
//! pin is in `mesh-ebpf/toolchain.rs`).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

#[path = "../mesh-ebpf/toolchain.rs"]
mod toolchain;

use toolchain::EbpfToolchain;

/// The link order of a release's hot functions (see `cargo xtask order`): the agent's, and
/// the waypoint's.
const HOT_FUNCTIONS: &str = "hot-functions.txt";
const WAYPOINT_HOT_FUNCTIONS: &str = "waypoint-hot-functions.txt";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root_dir = manifest_dir.join("../mesh-ebpf");
    let root_dir = root_dir.to_str().context("mesh-ebpf path is not UTF-8")?;
    println!("cargo:rerun-if-changed=../mesh-ebpf/toolchain.rs");
    let chosen = EbpfToolchain::detect().with_context(|| {
        format!(
            "no toolchain for the kernel programs: neither {} (rustc {}) nor {} with LLVM {} is \
             installed; run `cargo xtask setup`",
            toolchain::PINNED_NIGHTLY,
            toolchain::PINNED_COMMIT,
            toolchain::FALLBACK,
            toolchain::LLVM_MAJOR
        )
    })?;
    if chosen.needs_bootstrap() {
        // Only the nested build of the kernel crate inherits this (aya-build then passes
        // `-Z build-std=core` to a stable cargo).
        std::env::set_var("RUSTC_BOOTSTRAP", "1");
        println!(
            "cargo:warning=kernel programs built with {} and RUSTC_BOOTSTRAP=1 ({} is not \
             installed; `cargo xtask setup` installs it)",
            toolchain::FALLBACK,
            toolchain::PINNED_NIGHTLY
        );
    }
    // Relative relocations packed (DT_RELR, glibc 2.36 and later): the loader reads a few
    // kilobytes instead of a megabyte of `.rela.dyn` at every start, and those pages stay
    // resident. The binary keeps its position independence (ASLR).
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    // Releases: the functions a profiled program ran placed first and together (`cargo xtask
    // order` writes the lists: the agent's, and the waypoint's for `mesh-waypoint`), so the
    // pages the kernel maps around each one run hold code that runs too. Names a build no
    // longer has are passed over.
    if std::env::var("PROFILE").as_deref() == Ok("release") {
        for (bin, list) in [
            ("mesh-agent", HOT_FUNCTIONS),
            ("mesh-waypoint", WAYPOINT_HOT_FUNCTIONS),
        ] {
            let path = manifest_dir.join(list);
            println!("cargo:rerun-if-changed={list}");
            if path.is_file() {
                println!(
                    "cargo:rustc-link-arg-bin={bin}=-Wl,--symbol-ordering-file={}",
                    path.display()
                );
                println!("cargo:rustc-link-arg-bin={bin}=-Wl,--no-warn-symbol-ordering");
            }
        }
    }
    // aya-build replays the nested cargo's stderr as build-script warnings; keep its progress
    // lines out of every build's output (compiler diagnostics still come through).
    std::env::set_var("CARGO_TERM_QUIET", "true");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(chosen.rustup_name()),
    )
    .with_context(|| {
        format!(
            "building the kernel programs (mesh-ebpf) with {} failed; if rust-src or bpf-linker \
             is missing, run `cargo xtask setup`",
            chosen.rustup_name()
        )
    })?;
    strip_debug(&PathBuf::from(std::env::var("OUT_DIR")?).join(KERNEL_OBJECT))
}

/// The kernel programs' object, as aya-build leaves it in `OUT_DIR` (`datapath.rs` embeds it).
const KERNEL_OBJECT: &str = "mesh-ebpf";

/// Drops the kernel object's DWARF (nine tenths of it: 562 of its 634 KiB), which the loader reads
/// along with the rest and every agent then keeps resident; the BTF made from it (`.BTF`,
/// `.BTF.ext`, with the line information verifier messages cite) stays. The tool is the host
/// toolchain's `rust-objcopy` (LLVM's objcopy, shipped with rustc), run with its toolchain's
/// libraries.
fn strip_debug(object: &Path) -> anyhow::Result<()> {
    let rustc = std::env::var("RUSTC")?;
    let host = std::env::var("HOST")?;
    let out = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .with_context(|| format!("running {rustc} --print sysroot"))?;
    let sysroot = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    let objcopy = sysroot.join(format!("lib/rustlib/{host}/bin/rust-objcopy"));
    let status = Command::new(&objcopy)
        .env("LD_LIBRARY_PATH", sysroot.join("lib"))
        .arg("--strip-debug")
        .arg(object)
        .status()
        .with_context(|| format!("running {}", objcopy.display()))?;
    anyhow::ensure!(
        status.success(),
        "{} --strip-debug {} failed ({status})",
        objcopy.display(),
        object.display()
    );
    Ok(())
}
