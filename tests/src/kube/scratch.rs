//! The control plane's cgroup and scratch directory, named `mtb-<pid>-<seq>` like a testbed's:
//! the sweep of a later run ([`crate::sweep_stale`]) removes them when their process is gone.

use std::path::PathBuf;

use super::Result;
use crate::{host::Host, testbed};

/// The control plane's cgroup and directory, named like a testbed's so the sweep finds them.
#[derive(Debug)]
pub(super) struct Scratch {
    host: Host,
    pub id: String,
    pub cgroup_dir: PathBuf,
    pub dir: PathBuf,
    removed: bool,
}

impl Scratch {
    pub fn create(host: Host) -> Result<Self> {
        let id = testbed::new_id();
        let scratch = Self {
            cgroup_dir: host.cgroup2.join(testbed::TESTBED_DIR).join(&id),
            dir: std::env::temp_dir().join(&id),
            host,
            id,
            removed: false,
        };
        for dir in [&scratch.cgroup_dir, &scratch.dir] {
            std::fs::create_dir_all(dir)
                .map_err(crate::io_err(format!("creating {}", dir.display())))?;
        }
        Ok(scratch)
    }

    /// Kills what is left in the cgroup, removes it and the directory.
    pub fn remove(&mut self) -> Result<()> {
        self.removed = true;
        let bpffs_dir = self.host.bpffs.join(testbed::TESTBED_DIR).join(&self.id);
        testbed::remove(&self.host, &self.id, &self.cgroup_dir, &bpffs_dir, &[])?;
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = self.remove() {
                eprintln!("control plane {}: cleanup failed: {e}", self.id);
            }
        }
    }
}
