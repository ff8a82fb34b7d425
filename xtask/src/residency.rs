//! Which pages of a binary file running processes have mapped: the raw material of
//! `cargo xtask order`.
//!
//! A process's `/proc/<pid>/pagemap` says, for each page of its address space, whether it is
//! mapped; `/proc/<pid>/maps` says which file and offset each mapping shows. Together they give
//! the file pages a process has in memory. On an ordinary disk that is far more than the code it
//! ran: the kernel reads ahead megabytes at the first touch and maps the cached pages around
//! each page touched (64 KiB). On a file system whose read-ahead is off ([`ScratchFs`]) and for a
//! file whose pages were dropped from the cache first ([`drop_cached`]), only the pages touched
//! are ever read, so the ones mapped are those the processes (or the loader) touched.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs::{self, File},
    io::{Read as _, Seek as _, SeekFrom},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::setup::capture;

/// The page size of x86-64 and of the binaries' layout.
pub const PAGE: u64 = 4096;

/// The pages of `binary` (as file page numbers) mapped by any of `pids`.
pub fn file_pages(binary: &Path, pids: &[u32]) -> Result<BTreeSet<u64>> {
    let binary =
        fs::canonicalize(binary).with_context(|| format!("resolving {}", binary.display()))?;
    let mut pages = BTreeSet::new();
    for &pid in pids {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
            .with_context(|| format!("reading /proc/{pid}/maps"))?;
        let mut pagemap = File::open(format!("/proc/{pid}/pagemap"))
            .with_context(|| format!("opening /proc/{pid}/pagemap"))?;
        for mapping in maps.lines().filter_map(Mapping::parse) {
            if Path::new(mapping.path) != binary {
                continue;
            }
            let count = (mapping.end - mapping.start) / PAGE;
            let mut entries = vec![0u8; usize::try_from(count * 8)?];
            pagemap.seek(SeekFrom::Start(mapping.start / PAGE * 8))?;
            pagemap
                .read_exact(&mut entries)
                .with_context(|| format!("reading /proc/{pid}/pagemap"))?;
            for (i, entry) in (0u64..).zip(entries.chunks_exact(8)) {
                let entry = u64::from_le_bytes(entry.try_into().expect("chunks of 8"));
                // Bit 63: present in memory.
                if entry >> 63 == 1 {
                    pages.insert(mapping.offset / PAGE + i);
                }
            }
        }
    }
    if pages.is_empty() {
        bail!(
            "no page of {} is mapped by processes {pids:?}: are they running it?",
            binary.display()
        );
    }
    Ok(pages)
}

/// One line of `/proc/<pid>/maps`: `start-end perms offset dev inode path`.
#[derive(Debug, PartialEq, Eq)]
struct Mapping<'a> {
    start: u64,
    end: u64,
    offset: u64,
    path: &'a str,
}

impl<'a> Mapping<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let _perms = fields.next()?;
        let offset = fields.next()?;
        let _dev = fields.next()?;
        let _inode = fields.next()?;
        let path = fields.next()?;
        Some(Self {
            start: u64::from_str_radix(start, 16).ok()?,
            end: u64::from_str_radix(end, 16).ok()?,
            offset: u64::from_str_radix(offset, 16).ok()?,
            path,
        })
    }
}

/// Writes `file` to disk and drops its pages from the page cache, so the next process that maps
/// it reads only what it touches (on a [`ScratchFs`]).
pub fn drop_cached(file: &Path) -> Result<()> {
    let f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    f.sync_all()
        .with_context(|| format!("writing {} to disk", file.display()))?;
    nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .with_context(|| format!("dropping {} from the page cache", file.display()))?;
    Ok(())
}

/// Page numbers, one per line.
pub fn write_pages(file: &Path, pages: &BTreeSet<u64>) -> Result<()> {
    let text = pages.iter().fold(String::new(), |mut text, p| {
        let _ = writeln!(text, "{p}");
        text
    });
    fs::write(file, text).with_context(|| format!("writing {}", file.display()))
}

pub fn read_pages(file: &Path) -> Result<BTreeSet<u64>> {
    fs::read_to_string(file)
        .with_context(|| format!("reading {}", file.display()))?
        .lines()
        .map(|l| {
            l.parse()
                .with_context(|| format!("{}: not a page number: {l:?}", file.display()))
        })
        .collect()
}

/// A small ext4 file system on a loop device with read-ahead off, mounted for as long as this
/// lives (unmounted and detached on drop, also when the profile run fails).
#[derive(Debug)]
pub struct ScratchFs {
    image: PathBuf,
    device: String,
    mount: PathBuf,
}

/// What to do when a file-system tool fails.
const TOOLS_HINT: &str = "the profile runs as root and needs mkfs.ext4 (e2fsprogs), losetup and \
                          mount (util-linux) and a free loop device";

/// Size of the scratch file system: room for two copies of a profiling build.
const SCRATCH_MIB: u64 = 512;

impl ScratchFs {
    pub fn new(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let image = dir.join("scratch.img");
        let mount = dir.join("mnt");
        let _ = fs::remove_file(&image);
        File::create(&image)
            .and_then(|f| f.set_len(SCRATCH_MIB << 20))
            .with_context(|| format!("creating {}", image.display()))?;
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F"]).arg(&image);
        run(mkfs)?;
        let mut losetup = Command::new("losetup");
        losetup.args(["--find", "--show"]).arg(&image);
        let device = capture(losetup, TOOLS_HINT)?;
        let fs = Self {
            image,
            device: device.trim().to_owned(),
            mount,
        };
        let name = fs
            .device
            .strip_prefix("/dev/")
            .with_context(|| format!("losetup named {:?}", fs.device))?;
        let ra = format!("/sys/block/{name}/queue/read_ahead_kb");
        fs::write(&ra, "0").with_context(|| format!("turning read-ahead off in {ra}"))?;
        fs::create_dir_all(&fs.mount)?;
        let mut mount = Command::new("mount");
        mount.arg(&fs.device).arg(&fs.mount);
        run(mount)?;
        Ok(fs)
    }

    pub fn dir(&self) -> &Path {
        &self.mount
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        let mut umount = Command::new("umount");
        umount.arg(&self.mount);
        let _ = run(umount);
        let mut detach = Command::new("losetup");
        detach.arg("-d").arg(&self.device);
        let _ = run(detach);
        let _ = fs::remove_file(&self.image);
    }
}

/// Runs a file-system tool; it needs root and util-linux / e2fsprogs.
fn run(cmd: Command) -> Result<()> {
    capture(cmd, TOOLS_HINT).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse() {
        let line = "5581c2a00000-5581c3b0f000 r-xp 00a47000 fe:00 1234   /tmp/x/mesh-agent";
        assert_eq!(
            Mapping::parse(line),
            Some(Mapping {
                start: 0x5581_c2a0_0000,
                end: 0x5581_c3b0_f000,
                offset: 0xa4_7000,
                path: "/tmp/x/mesh-agent",
            })
        );
        // Anonymous mappings have no path.
        assert_eq!(
            Mapping::parse("7ffd1000-7ffd2000 rw-p 00000000 00:00 0"),
            None
        );
    }

    /// Needs root (the tests run as root, as `cargo xtask test` requires).
    #[test]
    fn a_scratch_fs_mounts_with_read_ahead_off_and_goes_away() {
        let dir = std::env::temp_dir().join(format!("xtask-scratch-{}", std::process::id()));
        let scratch = ScratchFs::new(&dir).unwrap();
        let name = scratch.device.strip_prefix("/dev/").unwrap();
        let ra = fs::read_to_string(format!("/sys/block/{name}/queue/read_ahead_kb")).unwrap();
        assert_eq!(ra.trim(), "0");
        let file = scratch.dir().join("f");
        fs::write(&file, vec![1u8; 1 << 20]).unwrap();
        drop_cached(&file).unwrap();
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(mounts.contains(&scratch.device), "{mounts}");
        let device = scratch.device.clone();
        drop(scratch);
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(!mounts.contains(&device), "{mounts}");
        assert!(!dir.join("scratch.img").exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn own_binary_pages_are_found() {
        let exe = fs::read_link("/proc/self/exe").unwrap();
        let pages = file_pages(&exe, &[std::process::id()]).unwrap();
        assert!(!pages.is_empty());
    }
}
