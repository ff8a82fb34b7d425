//! Which Rust toolchain builds the kernel programs: one home for the pin, shared (by `#[path]`)
//! by `mesh-agent/build.rs`, which builds them, and `cargo xtask setup`, which installs it. A
//! host-side file: it is not part of the kernel crate.
//!
//! The kernel programs need `-Z build-std=core`, so a nightly compiler, and `bpf-linker` built
//! against that compiler's LLVM. The nightly they were proven with is pinned; when it cannot be
//! installed, the stable toolchain builds them with `RUSTC_BOOTSTRAP=1` (set for that nested
//! build only). Both ship LLVM 22, so one `bpf-linker` serves both.

use std::process::Command;

/// rustup's name of the pinned nightly: `rustc 1.97.0-nightly (e50aa6fba 2026-05-19)`.
pub const PINNED_NIGHTLY: &str = "nightly-2026-05-20";
/// rustup's floating name, accepted when it happens to be the pinned commit (a machine image may
/// ship it), so nothing needs downloading there.
pub const FLOATING_NIGHTLY: &str = "nightly";
/// The pinned nightly's commit, as the start of `rustc -vV`'s `commit-hash`.
pub const PINNED_COMMIT: &str = "e50aa6fba";
/// The fallback toolchain (rustup's name).
pub const FALLBACK: &str = "stable";
/// The LLVM major version of both toolchains, which `bpf-linker` must be linked against.
pub const LLVM_MAJOR: u32 = 22;

/// A toolchain that can build the kernel programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EbpfToolchain {
    /// The pinned commit, under rustup's name [`PINNED_NIGHTLY`] or [`FLOATING_NIGHTLY`].
    Pinned(&'static str),
    /// [`FALLBACK`] with `RUSTC_BOOTSTRAP=1`.
    StableBootstrap,
}

impl EbpfToolchain {
    /// rustup's name of the toolchain.
    pub fn rustup_name(self) -> &'static str {
        match self {
            Self::Pinned(name) => name,
            Self::StableBootstrap => FALLBACK,
        }
    }

    /// Whether the nested build needs `RUSTC_BOOTSTRAP=1` (a stable compiler with `-Z` flags).
    pub fn needs_bootstrap(self) -> bool {
        self == Self::StableBootstrap
    }

    /// The toolchain to build with on this machine: the pinned nightly if rustup has it (under
    /// its dated name, or as `nightly` when that is the pinned commit), otherwise stable if its
    /// LLVM is the same major version; `None` if neither is installed.
    pub fn detect() -> Option<Self> {
        for name in [PINNED_NIGHTLY, FLOATING_NIGHTLY] {
            if rustc_vv(name).is_some_and(|vv| is_pinned(&vv)) {
                return Some(Self::Pinned(name));
            }
        }
        rustc_vv(FALLBACK)
            .is_some_and(|vv| llvm_major(&vv) == Some(LLVM_MAJOR))
            .then_some(Self::StableBootstrap)
    }
}

/// `rustc -vV` of rustup's toolchain `name`, without installing anything.
pub fn rustc_vv(name: &str) -> Option<String> {
    let out = Command::new("rustup")
        .args(["run", name, "rustc", "-vV"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("RUSTUP_AUTO_INSTALL", "0")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `rustc -vV` output is the pinned nightly's.
pub fn is_pinned(vv: &str) -> bool {
    field(vv, "commit-hash:").is_some_and(|h| h.starts_with(PINNED_COMMIT))
}

/// The LLVM major version in `rustc -vV` output.
pub fn llvm_major(vv: &str) -> Option<u32> {
    field(vv, "LLVM version:")?.split('.').next()?.parse().ok()
}

/// The value of the `key` line of `rustc -vV` output.
pub fn field<'a>(vv: &'a str, key: &str) -> Option<&'a str> {
    vv.lines().find_map(|l| l.strip_prefix(key)).map(str::trim)
}
