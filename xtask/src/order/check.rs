//! `cargo xtask order --check`: what the shipped layout costs. The bench's rounds run the release
//! build (its own link order, not the profiling build's) from a file system with read-ahead off,
//! so the pages of each binary the program maps are those it touched; the report says, section by
//! section, how many pages that is and how many the kernel would map around them from a cached
//! file (fault-around), and which functions outside the list's span the program ran.
//!
//! Fault-around maps the aligned 64 KiB window (`fault_around_bytes`) of the faulting address,
//! within the mapping. A position-independent binary is loaded at a random page, so where the
//! windows fall on the file changes from run to run: the report averages over the 16 placements.
//!
//! Each page touched outside the list's span costs a whole window in production, and the
//! profiling run misses some functions the shipped build runs (rare paths: a GOAWAY, a retried
//! handshake, a warning). The check adds the functions on those pages to the list, as a last
//! group, so the next release link places them with the others: a few kilobytes of code each
//! instead of 64 KiB of mapping.

use std::{collections::BTreeSet, fmt::Write as _, fs, path::Path, process::Command};

use anyhow::{Context as _, Result};

use super::{rounds, Program};
use crate::{
    functions::{listed_names, mib, sections, Function, Functions, Section},
    residency::{ScratchFs, PAGE},
    setup::capture,
};

/// Pages in a fault-around window (64 KiB, the kernel's default).
const WINDOW: u64 = 16;

/// Runs the program's rounds on the release build in `build`, writes the report under the
/// bench's results directory and adds the functions run outside the list to it.
pub(super) fn check(
    root: &Path,
    build: &Path,
    scratch: &ScratchFs,
    (name, program): (&str, &Program),
) -> Result<()> {
    let (out, rest, round) = rounds(root, build, scratch, program)?;
    let touched: BTreeSet<u64> = rest.union(&round).copied().collect();
    let binary = build.join(program.binary);
    let mut readelf = Command::new("readelf");
    readelf.arg("-SW").arg(&binary);
    let sections = with_contents(&capture(readelf, "readelf comes with binutils")?);
    let functions = Functions::of(&binary)?;
    let list_path = root.join(program.list);
    let list = fs::read_to_string(&list_path)
        .with_context(|| format!("reading {}", list_path.display()))?;
    let listed: BTreeSet<&str> = listed_names(&list).collect();
    let misses = outside_the_list(&sections, &touched, &functions, &listed);
    let report = render(name, &sections, &touched, &misses);
    let file = out.join(format!("order-check-{name}.md"));
    fs::write(&file, &report).with_context(|| format!("writing {}", file.display()))?;
    print!("{report}");
    println!("(in {})", file.display());
    if !misses.functions.is_empty() {
        let run = out
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        fs::write(&list_path, with_misses(&list, &misses.functions, &run))
            .with_context(|| format!("writing {}", list_path.display()))?;
        println!(
            "{}: {} functions added after the list's own",
            list_path.display(),
            misses.functions.len()
        );
    }
    Ok(())
}

/// What of the code touched lies outside the list's span.
struct Misses<'a> {
    /// The listed functions the build has.
    listed: usize,
    /// The span's first and last page.
    span: (u64, u64),
    /// Code pages touched outside it.
    pages: BTreeSet<u64>,
    /// The functions on them the list does not name, largest first.
    functions: Vec<&'a Function>,
}

fn outside_the_list<'a>(
    sections: &[Section],
    touched: &BTreeSet<u64>,
    functions: &'a Functions,
    listed: &BTreeSet<&str>,
) -> Misses<'a> {
    let in_list: Vec<&Function> = functions
        .all()
        .iter()
        .filter(|f| listed.contains(f.name.as_str()))
        .collect();
    let span: BTreeSet<u64> = in_list.iter().flat_map(|f| f.pages()).collect();
    let span = (
        span.first().copied().unwrap_or(0),
        span.last().copied().unwrap_or(0),
    );
    let text_pages = sections
        .iter()
        .find(|s| s.name == ".text")
        .map_or(0..0, Section::pages);
    let pages: BTreeSet<u64> = touched
        .range(text_pages)
        .copied()
        .filter(|p| !(span.0..=span.1).contains(p))
        .collect();
    let mut others: Vec<&Function> = functions
        .touching(&pages)
        .into_iter()
        .filter(|f| !listed.contains(f.name.as_str()))
        .collect();
    others.sort_by_key(|f| std::cmp::Reverse(f.size));
    Misses {
        listed: in_list.len(),
        span,
        pages,
        functions: others,
    }
}

/// The list with `misses` added as a last group (after a comment naming the `run`).
fn with_misses(list: &str, misses: &[&Function], run: &str) -> String {
    let mut text = list.trim_end().to_owned();
    let _ = writeln!(
        text,
        "\n# {} more on the pages the release build ran outside the list ({:.2} MiB; \
         `cargo xtask order --check`, run {run}).",
        misses.len(),
        mib(misses.iter().map(|f| f.size).sum()),
    );
    for f in misses {
        text.push_str(&f.name);
        text.push('\n');
    }
    text
}

/// The sections of `readelf -SW` the program maps from the file.
fn with_contents(readelf: &str) -> Vec<Section> {
    sections(readelf)
        .into_iter()
        .filter(|s| s.loaded && s.size > 0)
        .collect()
}

/// The pages of `range` fault-around would map from a fully cached file when `touched` are the
/// pages touched, averaged over the window's 16 placements.
#[allow(clippy::cast_precision_loss)] // page counts far below 2^52
fn mapped_around(range: &std::ops::Range<u64>, touched: &BTreeSet<u64>) -> f64 {
    let total: u64 = (0..WINDOW)
        .map(|shift| {
            let windows: BTreeSet<u64> = touched
                .range(range.clone())
                .map(|p| (p + shift) / WINDOW)
                .collect();
            windows
                .iter()
                .map(|w| {
                    let first = (w * WINDOW).saturating_sub(shift).max(range.start);
                    let end = ((w + 1) * WINDOW).saturating_sub(shift).min(range.end);
                    end.saturating_sub(first)
                })
                .sum::<u64>()
        })
        .sum();
    total as f64 / WINDOW as f64
}

/// The report: sections, then the functions run outside the list's span.
fn render(
    name: &str,
    sections: &[Section],
    touched: &BTreeSet<u64>,
    misses: &Misses<'_>,
) -> String {
    let kib = |pages: f64| pages * 4.0;
    let mut text = format!(
        "\n## {name}: pages of the release build touched by the bench's rounds\n\n\
         | section | size | touched | mapped with fault-around (mean of 16 placements) |\n\
         |---|---|---|---|\n"
    );
    for s in sections {
        let range = s.pages();
        let hit = touched.range(range.clone()).count();
        if hit == 0 && s.size < 64 * 1024 {
            continue;
        }
        #[allow(clippy::cast_precision_loss)] // sizes far below 2^52
        let _ = writeln!(
            text,
            "| {} | {:.0} KiB | {hit} pages, {:.0} KiB | {:.0} KiB |",
            s.name,
            s.size as f64 / 1024.0,
            kib(hit as f64),
            kib(mapped_around(&range, touched)),
        );
    }
    let (first, last) = misses.span;
    #[allow(clippy::cast_precision_loss)] // page counts far below 2^52
    let _ = writeln!(
        text,
        "\nThe list's {} functions found span {:.2} MiB of text; {} touched pages of code lie \
         outside it ({:.0} KiB mapped with fault-around), on which are {} functions not listed \
         ({:.2} MiB), the largest:\n",
        misses.listed,
        mib((last + 1 - first) * PAGE),
        misses.pages.len(),
        kib(mapped_around(&(0..u64::MAX), &misses.pages)),
        misses.functions.len(),
        mib(misses.functions.iter().map(|f| f.size).sum()),
    );
    for f in misses.functions.iter().take(60) {
        let _ = writeln!(text, "- {} ({} B)", f.name, f.size);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_with_contents_are_read() {
        let readelf = "\
  [12] .gcc_except_table PROGBITS 0000000000005e00 005e00 092f24 00   A  0   0  4
  [13] .rodata           PROGBITS 0000000000099000 099000 1be2a5 00 AMS  0   0 4096
  [16] .text             PROGBITS 00000000003ce1c0 3cd1c0 107b285 00  AX  0   0 64
  [31] .bss              NOBITS   00000000014d2500 14cf500 04d85c 00  WA  0   0 64
  [32] .comment          PROGBITS 0000000000000000 14cf500 0000cb 01  MS  0   0  1
";
        let names: Vec<String> = with_contents(readelf).into_iter().map(|s| s.name).collect();
        assert_eq!(names, [".gcc_except_table", ".rodata", ".text"]);
    }

    #[test]
    fn misses_are_added_after_the_list_and_read_back() {
        let readelf = "  [16] .text PROGBITS 0000000000400000 3ff000 4000 00  AX  0   0 64\n";
        let nm = "\
0000000000400000 0000000000000010 t hot
0000000000401000 0000000000000010 t cold
0000000000403000 0000000000000010 t rare
0000000000403800 0000000000000010 t rare_neighbour
";
        let functions = Functions::parse(readelf, nm).expect(".text");
        let sections = sections(readelf);
        let list = "# header\nhot\n";
        let listed: BTreeSet<&str> = listed_names(list).collect();
        // The hot page and the rare one were touched: both functions on the rare page miss.
        let touched: BTreeSet<u64> = [0x3ff, 0x402].into_iter().collect();
        let misses = outside_the_list(&sections, &touched, &functions, &listed);
        assert_eq!(misses.pages.len(), 1);
        let names: Vec<&str> = misses.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names.len(), 2);
        let text = with_misses(list, &misses.functions, "1");
        let all: Vec<&str> = listed_names(&text).collect();
        assert_eq!(all[0], "hot");
        assert_eq!(all.len(), 3, "{text}");
        assert!(all.contains(&"rare") && all.contains(&"rare_neighbour"));
    }

    #[test]
    fn fault_around_maps_whole_windows_within_the_section() {
        let touched: BTreeSet<u64> = [0, 40].into_iter().collect();
        // One page per 16 touched: every placement maps two windows, cut by the range's ends.
        let mapped = mapped_around(&(0..48), &touched);
        assert!((17.0..=32.0).contains(&mapped), "{mapped}");
        // Sixteen pages in a row touched map 16 to 31 pages.
        let row: BTreeSet<u64> = (16..32).collect();
        let mapped = mapped_around(&(0..1000), &row);
        assert!((16.0..=31.0).contains(&mapped), "{mapped}");
        assert!(mapped_around(&(100..200), &touched).abs() < f64::EPSILON);
    }
}
