//! `cargo xtask order`: the link order of the agent's and the waypoint's hot functions, from
//! profiled runs.
//!
//! A proxy's resident memory is mostly its binary's pages, and the kernel maps 64 KiB of cached
//! file around each page a process touches (fault-around). In the default layout the functions
//! a proxy runs are spread over the whole text, so nearly all of it ended up resident. This
//! command finds the functions each program runs and writes them, in that order, to
//! `mesh-agent/hot-functions.txt` (the agent) and `mesh-agent/waypoint-hot-functions.txt`
//! (`mesh-waypoint`), which the release link of each places first (`mesh-agent/build.rs`,
//! `--symbol-ordering-file`):
//!
//! 1. a profiling build: the release profile with every function aligned to its own page
//!    (`-C llvm-args=-align-all-functions=12`), so a touched page names one function;
//! 2. the bench's round with the program running a copy of it from a file system whose
//!    read-ahead is off, its pages dropped from the cache first: the pages mapped are then those
//!    touched ([`residency`]). The agent's: throughput, latency and new connections, sockmap off
//!    and on. The waypoint's: the L7 group's waypoint cases (HTTP/1.1 and h2c, same node and
//!    cross node, JWT, `connectionPool`);
//! 3. the functions touched at rest (start-up, the config, idle) first, then those the round
//!    added, each group in the default order;
//! 4. the release build linked with the new lists and the same rounds run on it ([`check`]):
//!    the functions on the code pages it touched outside the lists' span (rare paths the
//!    profiled round did not take) are added to the lists as a last group. `--check` runs this
//!    step alone, on the lists as they are, and reports what the layout costs section by section.
//!
//! The names are the linker's (mangled, with a hash of the crate and the instance), stable
//! across edits of the code but not across a compiler or dependency upgrade, nor across builds
//! that take in other packages (the features of shared dependencies change the hashes): releases
//! are built as `cargo xtask build --release` builds them. Names the build no longer has are
//! passed over, and `cargo xtask bench` says how many of the list it found.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bench,
    functions::{mib, Function, Functions, HOT_FUNCTIONS, WAYPOINT_HOT_FUNCTIONS},
    residency::{self, ScratchFs},
};

mod check;

/// Where the profiling build goes (its own target directory: other flags).
const PROFILE_TARGET: &str = "target/order";

/// A program whose functions are ordered: its binary, the bench groups that profile it, the
/// residency readings that are its own, and its list.
struct Program {
    binary: &'static str,
    groups: &'static [&'static str],
    /// Whether a residency reading (by file name) is this program's.
    readings: fn(&str) -> bool,
    list: &'static str,
}

const PROGRAMS: [(&str, Program); 2] = [
    (
        "agent",
        Program {
            binary: "mesh-agent",
            groups: &["throughput", "latency", "connrate"],
            readings: |name| !name.starts_with(bench::WAYPOINT_RESIDENT_PREFIX),
            list: HOT_FUNCTIONS,
        },
    ),
    (
        "waypoint",
        Program {
            binary: "mesh-waypoint",
            groups: &["l7-waypoint"],
            readings: |name| name.starts_with(bench::WAYPOINT_RESIDENT_PREFIX),
            list: WAYPOINT_HOT_FUNCTIONS,
        },
    ),
];

/// Writes the lists of the programs named in `only` (all when empty), then checks them against
/// the release build and adds what it ran outside them ([`check`]); with `check`, only the
/// latter.
pub fn run(root: &Path, only: &[String], check: bool) -> Result<()> {
    let scratch = ScratchFs::new(&root.join(PROFILE_TARGET).join("scratch"))
        .context("a file system with read-ahead off (a loop device)")?;
    let programs: Vec<&(&str, Program)> = PROGRAMS
        .iter()
        .filter(|(name, _)| only.is_empty() || only.iter().any(|o| o == name))
        .collect();
    if !check {
        let build = profiling_build(root)?;
        for (name, program) in &programs {
            order(root, &build, &scratch, program)
                .with_context(|| format!("ordering the {name}'s functions"))?;
        }
    }
    // The release link with the lists as they are now.
    crate::build(root, true)?;
    let release = root.join("target/release");
    for (name, program) in &programs {
        check::check(root, &release, &scratch, (name, program))
            .with_context(|| format!("checking the {name}'s layout"))?;
    }
    Ok(())
}

/// The bench's rounds for `program`, running a copy of it from `build` on `scratch`: the results
/// directory and the pages of the binary mapped at rest and after the round.
fn rounds(
    root: &Path,
    build: &Path,
    scratch: &ScratchFs,
    program: &Program,
) -> Result<(PathBuf, BTreeSet<u64>, BTreeSet<u64>)> {
    let plan = bench::Plan::new(
        true,
        false,
        program.groups.iter().map(|g| (*g).to_owned()).collect(),
        None,
    )
    .with_residency(bench::Residency {
        build: build.to_path_buf(),
        scratch: scratch.dir().to_path_buf(),
    });
    let out = bench::run(root, plan)?;
    let (rest, round) = collect_pages(&out, program.readings)?;
    Ok((out, rest, round))
}

/// Profiles `program` (the profiling `build`, run from `scratch`) and writes its list.
fn order(root: &Path, build: &Path, scratch: &ScratchFs, program: &Program) -> Result<()> {
    let (out, rest, round) = rounds(root, build, scratch, program)?;
    let functions = Functions::of(&build.join(program.binary))?;
    let at_rest = functions.touching(&rest);
    let rest_names: BTreeSet<&str> = at_rest.iter().map(|f| f.name.as_str()).collect();
    let by_round: Vec<&Function> = functions
        .touching(&round)
        .into_iter()
        .filter(|f| !rest_names.contains(f.name.as_str()))
        .collect();
    let list = root.join(program.list);
    fs::write(
        &list,
        render(program.binary, &functions, &at_rest, &by_round),
    )
    .with_context(|| format!("writing {}", list.display()))?;
    println!(
        "{}: {}; profile in {}",
        list.display(),
        summary(&functions, &at_rest, &by_round),
        out.display()
    );
    Ok(())
}

/// Builds the binaries as released but with every function on its own page; returns their
/// directory.
fn profiling_build(root: &Path) -> Result<PathBuf> {
    let mut cmd = crate::cargo(root);
    // The release build's selection: the features of shared dependencies (so the symbols'
    // hashes) depend on which packages a build takes in.
    cmd.args(["build", "--release"])
        .args(crate::BUILD_SELECTION)
        .args(["--target-dir", PROFILE_TARGET])
        // Only the host's code: the kernel programs (built for the BPF target by the agent's build
        // script) keep their own flags.
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C llvm-args=-align-all-functions=12",
        );
    crate::step("profiling build (a function per page)", cmd)?;
    Ok(root.join(PROFILE_TARGET).join("release"))
}

/// The pages mapped at rest and after the round, over all modes, in the readings that are the
/// program's (`readings`, by file name).
fn collect_pages(out: &Path, readings: fn(&str) -> bool) -> Result<(BTreeSet<u64>, BTreeSet<u64>)> {
    let mut rest = BTreeSet::new();
    let mut round = BTreeSet::new();
    for entry in fs::read_dir(out)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with(bench::RESIDENT_PREFIX) && readings(name) {
            let pages = residency::read_pages(&path)?;
            if name.ends_with("-rest.txt") {
                rest.extend(pages);
            } else {
                round.extend(pages);
            }
        }
    }
    if rest.is_empty() || round.is_empty() {
        bail!("no residency readings in {}", out.display());
    }
    Ok((rest, round))
}

/// How many functions, of how much code, the list puts first.
fn summary(functions: &Functions, at_rest: &[&Function], by_round: &[&Function]) -> String {
    format!(
        "{} functions at rest ({:.2} MiB), then {} more run by the bench's round ({:.2} MiB), \
         of {} ({:.2} MiB)",
        at_rest.len(),
        mib(at_rest.iter().map(|f| f.size).sum()),
        by_round.len(),
        mib(by_round.iter().map(|f| f.size).sum()),
        functions.all().len(),
        mib(functions.all().iter().map(|f| f.size).sum()),
    )
}

/// The list: a header saying what it is, the functions at rest, then the round's.
fn render(
    binary: &str,
    functions: &Functions,
    at_rest: &[&Function],
    by_round: &[&Function],
) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# {binary}'s hot functions in link order, written by `cargo xtask order` (do not edit)."
    );
    let _ = writeln!(text, "# {}.", summary(functions, at_rest, by_round));
    for f in at_rest.iter().chain(by_round) {
        text.push_str(&f.name);
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_names_rest_then_round_after_its_header() {
        let readelf = "  [16] .text PROGBITS 0000000000400000 3ff000 3000 00  AX  0   0 64\n";
        let nm = "\
0000000000400000 0000000000000010 t rest
0000000000401000 0000000000000010 t round
0000000000402000 0000000000000010 t cold
";
        let functions = Functions::parse(readelf, nm).expect(".text");
        let all = functions.all();
        let list = render("mesh-agent", &functions, &[&all[0]], &[&all[1]]);
        assert!(list.starts_with("# "), "{list}");
        let names: Vec<&str> = crate::functions::listed_names(&list).collect();
        assert_eq!(names, ["rest", "round"]);
        assert_eq!(functions.count_known(names.into_iter()), (2, 2));
    }
}
