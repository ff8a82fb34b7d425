//! Builds the kernel programs (`mesh-ebpf`) for the BPF target with aya-build, so the agent
//! binary embeds them. Needs the nightly toolchain with `rust-src` and `bpf-linker`
//! (`cargo xtask setup` installs both).
use std::path::PathBuf;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root_dir = manifest_dir.join("../mesh-ebpf");
    let root_dir = root_dir.to_str().context("mesh-ebpf path is not UTF-8")?;
    // aya-build replays the nested cargo's stderr as build-script warnings; keep its progress
    // lines out of every build's output (compiler diagnostics still come through).
    std::env::set_var("CARGO_TERM_QUIET", "true");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the kernel programs (mesh-ebpf) failed; if nightly rust-src or bpf-linker \
         is missing, run `cargo xtask setup`",
    )
}
