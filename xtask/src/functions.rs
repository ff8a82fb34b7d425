//! A binary's functions (`readelf`, `nm`) and the hot-function lists that name them, one per
//! program (`cargo xtask order` writes them; the bench checks how much of each a build has).

use std::{collections::BTreeSet, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::{residency::PAGE, setup::capture};

/// The agent's list, which the release link of `mesh-agent` reads (`mesh-agent/build.rs`).
pub const HOT_FUNCTIONS: &str = "mesh-agent/hot-functions.txt";
/// The waypoint's list, which the release link of `mesh-waypoint` reads.
pub const WAYPOINT_HOT_FUNCTIONS: &str = "mesh-agent/waypoint-hot-functions.txt";

/// A function of the binary's `.text`: its name, and where its code is in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub name: String,
    offset: u64,
    pub size: u64,
}

impl Function {
    pub fn pages(&self) -> impl Iterator<Item = u64> {
        let first = self.offset / PAGE;
        let last = (self.offset + self.size.max(1) - 1) / PAGE;
        first..=last
    }
}

/// The functions of a binary, in address order.
pub struct Functions {
    all: Vec<Function>,
}

impl Functions {
    /// Reads `.text`'s place (`readelf`) and its function symbols (`nm`).
    pub fn of(binary: &Path) -> Result<Self> {
        const HINT: &str = "readelf and nm come with binutils (apt-get install binutils)";
        let mut readelf = Command::new("readelf");
        readelf.arg("-SW").arg(binary);
        let mut nm = Command::new("nm");
        nm.args(["--numeric-sort", "--print-size", "--defined-only"])
            .arg(binary);
        let sections = capture(readelf, HINT)?;
        let symbols = capture(nm, HINT)?;
        let functions = Self::parse(&sections, &symbols)
            .with_context(|| format!("no .text section in {}", binary.display()))?;
        if functions.all.is_empty() {
            bail!("no function symbols in {} (stripped?)", binary.display());
        }
        Ok(functions)
    }

    /// From `readelf -SW` and `nm -n -S --defined-only`; `None` without a `.text` section.
    pub fn parse(readelf: &str, nm: &str) -> Option<Self> {
        let (addr, offset, size) = text_section(readelf)?;
        Some(Self {
            all: parse_nm(nm, addr, offset, size),
        })
    }

    /// Every function, in address order.
    pub fn all(&self) -> &[Function] {
        &self.all
    }

    /// The functions with code on any of `pages`.
    pub fn touching(&self, pages: &BTreeSet<u64>) -> Vec<&Function> {
        self.all
            .iter()
            .filter(|f| f.pages().any(|p| pages.contains(&p)))
            .collect()
    }

    /// How many of `names` this binary has.
    pub fn count_known<'a>(&self, names: impl Iterator<Item = &'a str>) -> (usize, usize) {
        let known: BTreeSet<&str> = self.all.iter().map(|f| f.name.as_str()).collect();
        names.fold((0, 0), |(found, listed), n| {
            (found + usize::from(known.contains(n)), listed + 1)
        })
    }
}

/// A section of a binary, from `readelf -SW`: where it is in memory and in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub addr: u64,
    pub offset: u64,
    pub size: u64,
    /// Whether the file holds its contents and the program maps them (allocated, not `NOBITS`).
    pub loaded: bool,
}

impl Section {
    /// The file pages it covers.
    pub fn pages(&self) -> std::ops::Range<u64> {
        self.offset / PAGE..(self.offset + self.size).div_ceil(PAGE)
    }
}

/// The sections listed by `readelf -SW`.
pub fn sections(readelf: &str) -> Vec<Section> {
    readelf
        .lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix('[')?.split_once(']')?.1;
            // name type address offset size entsize flags ...
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let hex = |i: usize| u64::from_str_radix(fields.get(i)?, 16).ok();
            let (name, kind) = (*fields.first()?, *fields.get(1)?);
            let flags = fields.get(6).copied().unwrap_or_default();
            Some(Section {
                name: name.to_owned(),
                addr: hex(2)?,
                offset: hex(3)?,
                size: hex(4)?,
                loaded: flags.contains('A') && kind != "NOBITS",
            })
        })
        .collect()
}

/// `.text`'s address, file offset and size from `readelf -SW`.
fn text_section(readelf: &str) -> Option<(u64, u64, u64)> {
    sections(readelf)
        .into_iter()
        .find(|s| s.name == ".text")
        .map(|s| (s.addr, s.offset, s.size))
}

/// Function symbols (`t`, `T`, `w`, `W`) with a size, inside `.text`, from `nm -n -S`.
fn parse_nm(nm: &str, text_addr: u64, text_offset: u64, text_size: u64) -> Vec<Function> {
    nm.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let addr = u64::from_str_radix(fields.next()?, 16).ok()?;
            let size = u64::from_str_radix(fields.next()?, 16).ok()?;
            let kind = fields.next()?;
            let name = fields.next()?;
            let in_text = (text_addr..text_addr + text_size).contains(&addr);
            (matches!(kind, "t" | "T" | "w" | "W") && size > 0 && in_text).then(|| Function {
                name: name.to_owned(),
                offset: addr - text_addr + text_offset,
                size,
            })
        })
        .collect()
}

/// The names a list holds (comment lines skipped, as the linker does).
pub fn listed_names(list: &str) -> impl Iterator<Item = &str> {
    list.lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
}

/// Mebibytes, for the list's header and the command's report.
#[allow(clippy::cast_precision_loss)] // sizes far below 2^52
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    const READELF: &str = "\
  [13] .rodata           PROGBITS        0000000000001000 001000 22e000 00 AMS  0   0 32
  [16] .text             PROGBITS        0000000000400000 3ff000 1097000 00  AX  0   0 64
";

    #[test]
    fn text_section_is_found() {
        assert_eq!(
            text_section(READELF),
            Some((0x40_0000, 0x3f_f000, 0x109_7000))
        );
    }

    #[test]
    fn functions_and_their_pages() {
        let nm = "\
0000000000001010 0000000000000008 r _ZN4data5CONST17h0123456789abcdefE
0000000000400000 0000000000000010 t _ZN4a3one17h0000000000000001E
0000000000400ff8 0000000000000010 T _ZN4a3two17h0000000000000002E
0000000000402000 0000000000000000 t zero_sized
0000000000402000 0000000000003000 W _ZN4a5three17h0000000000000003E
";
        let all = parse_nm(nm, 0x40_0000, 0x3f_f000, 0x109_7000);
        let names: Vec<&str> = all.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "_ZN4a3one17h0000000000000001E",
                "_ZN4a3two17h0000000000000002E",
                "_ZN4a5three17h0000000000000003E"
            ]
        );
        // `two` straddles two pages; `three` spans three.
        let pages: Vec<Vec<u64>> = all.iter().map(|f| f.pages().collect()).collect();
        assert_eq!(
            pages,
            [vec![0x3ff], vec![0x3ff, 0x400], vec![0x401, 0x402, 0x403]]
        );
        let functions = Functions { all };
        let touched = functions.touching(&BTreeSet::from([0x400]));
        assert_eq!(touched.len(), 1);
        assert_eq!(touched[0].name, "_ZN4a3two17h0000000000000002E");
        let list = "# a header\n_ZN4a3two17h0000000000000002E # comment\n\ngone\n";
        assert_eq!(functions.count_known(listed_names(list)), (1, 2));
    }
}
