//! What a privileged test needs from the machine: root, iproute2, a cgroup v2 mount and bpffs.
//! Each check fails with the reason and the fix, never silently.

use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::{Error, Result};

/// Where bpffs must be mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Machine facts the testbed uses.
#[derive(Clone, Debug)]
pub struct Host {
    /// Mount point of the cgroup v2 hierarchy.
    pub cgroup2: PathBuf,
    /// Mount point of bpffs.
    pub bpffs: PathBuf,
}

/// Checks that privileged tests can run here, and says exactly why not when they cannot.
pub fn require_privileges() -> Result<Host> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(crate::io_err("reading /proc/self/status"))?;
    let euid = effective_uid(&status)
        .ok_or_else(|| Error::Privileges("no Uid line in /proc/self/status".into()))?;
    if euid != 0 {
        return Err(Error::Privileges(format!(
            "needs root (effective uid is {euid}); run `sudo cargo xtask test`"
        )));
    }
    for (program, package) in [("ip", "iproute2"), ("nsenter", "util-linux")] {
        if !on_path(program) {
            return Err(Error::Privileges(format!(
                "`{program}` ({package}) is not installed; run `cargo xtask setup`"
            )));
        }
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(crate::io_err("reading /proc/self/mountinfo"))?;
    let mounts = parse_mountinfo(&mountinfo);
    let cgroup2 = mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.mount_point.clone())
        .ok_or_else(|| {
            Error::Privileges("no cgroup v2 hierarchy is mounted; run `cargo xtask setup`".into())
        })?;
    if !mounts
        .iter()
        .any(|m| m.fstype == "bpf" && m.mount_point == Path::new(BPFFS))
    {
        return Err(Error::Privileges(format!(
            "bpffs is not mounted at {BPFFS}; run `cargo xtask setup`"
        )));
    }
    Ok(Host {
        cgroup2,
        bpffs: PathBuf::from(BPFFS),
    })
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// The effective uid from the `Uid:` line of `/proc/<pid>/status` (real, effective, saved, fs).
pub fn effective_uid(status: &str) -> Option<u32> {
    // "Uid:\treal\teffective\tsaved\tfs"
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// One line of /proc/self/mountinfo, the parts the testbed needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fstype: String,
}

/// Parses /proc/self/mountinfo: field 5 is the mount point; the file system type follows the
/// `-` that ends the variable number of optional fields (searched for after field 6, so a mount
/// point named `-` is not mistaken for it). Lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mount = |line: &str| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let separator = 6 + fields.iter().skip(6).position(|f| *f == "-")?;
        let fstype = unescape(fields.get(separator + 1)?);
        Some(Mount {
            mount_point: unescape(fields.get(4)?).into(),
            fstype,
        })
    };
    text.lines().filter_map(mount).collect()
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        if let Some(c) = code {
            out.push(char::from(c));
            rest = &rest[i + 4..];
        } else {
            out.push('\\');
            rest = &rest[i + 1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw
35 22 0:30 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
36 22 0:31 / /sys/fs/bpf rw,relatime - bpf bpf rw
40 22 0:32 / /mnt/with\\040space rw master:1 shared:3 - tmpfs tmpfs rw
";

    #[test]
    fn mountinfo_fields_with_and_without_optional_fields() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].mount_point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m[1].fstype, "cgroup2");
        assert_eq!(m[2].fstype, "bpf");
        assert_eq!(m[3].mount_point, Path::new("/mnt/with space"));
        assert_eq!(m[3].fstype, "tmpfs");
        let odd = parse_mountinfo("1 2 0:3 / - rw - ext4 /dev/sda rw\ngarbage line");
        assert_eq!(
            odd,
            [Mount {
                mount_point: "-".into(),
                fstype: "ext4".into()
            }]
        );
    }

    #[test]
    fn octal_escapes() {
        assert_eq!(unescape(r"a\011b\134c\012d\040"), "a\tb\\c\nd ");
        assert_eq!(unescape(r"\134040"), r"\040");
    }

    #[test]
    fn effective_uid_is_the_second_field() {
        assert_eq!(effective_uid("Name:\tx\nUid:\t1000\t0\t0\t0\n"), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t0\t0\n"), Some(1000));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }
}
