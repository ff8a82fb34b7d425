//! The kernel side as seen from the agent: loads the embedded programs, forwards their aya-log
//! records to `tracing`, attaches them to pod cgroups and pins the shared maps.
//!
//! Dropping a [`Datapath`] detaches every program (the links are owned by it) and, unless
//! `keep_pins` is set, removes the pins.

use std::{
    fs, io,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use aya::{
    programs::{CgroupAttachMode, CgroupSockAddr},
    Ebpf, EbpfError,
};
use aya_log::EbpfLogger;
use mesh_common::names;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, info, warn};

/// The kernel object built by `build.rs` from the `mesh-ebpf` crate.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Maps pinned under the agent's bpffs directory (readable by `mesh-agent stats`).
const PINNED_MAPS: [&str; 1] = [names::CGROUP_COUNTERS];

/// Programs attached to every meshed pod's cgroup.
const CGROUP_PROGRAMS: [&str; 2] = [names::PROG_CONNECT4, names::PROG_CONNECT6];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the kernel programs: {0}")]
    Load(#[source] Box<EbpfError>),
    #[error("kernel program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("kernel object has no program {0} (agent and kernel programs out of step)")]
    MissingProgram(&'static str),
    #[error("kernel object has no map {0} (agent and kernel programs out of step)")]
    MissingMap(&'static str),
    #[error("starting the kernel log reader: {0}")]
    Logger(#[source] io::Error),
    #[error("pinning map {name} at {path}: {source}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        source: Box<aya::pin::PinError>,
    },
    #[error("bpffs directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
}

/// A cgroup the programs are attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedCgroup {
    pub path: PathBuf,
    /// Kernel cgroup id: the inode number of the cgroup v2 directory, the key of the counter map.
    pub id: u64,
}

/// Loaded kernel programs and their maps.
#[derive(Debug)]
pub struct Datapath {
    ebpf: Ebpf,
    /// Kept alive for the programs' lifetime; dropped after `ebpf`, so it flushes last records.
    _logger: LoggerHandle,
    pin_dir: PathBuf,
    pinned: Vec<PathBuf>,
    keep_pins: bool,
    attached: Vec<AttachedCgroup>,
}

impl Datapath {
    /// Loads and verifies the programs, starts the kernel log reader and pins
    /// the maps under `pin_dir`.
    pub fn load(pin_dir: &Path, keep_pins: bool) -> Result<Self, DatapathError> {
        let mut ebpf = Ebpf::load(KERNEL_OBJECT).map_err(|e| DatapathError::Load(Box::new(e)))?;
        // The logger must live as long as the programs, or the log ring buffer closes under them.
        let logger = spawn_logger(&mut ebpf)?;
        for name in CGROUP_PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|e| DatapathError::Program {
                    name,
                    source: Box::new(e),
                })?;
            program.load().map_err(|e| DatapathError::Program {
                name,
                source: Box::new(e),
            })?;
            debug!(program = name, "kernel program loaded");
        }
        let mut datapath = Self {
            ebpf,
            _logger: logger,
            pin_dir: pin_dir.to_path_buf(),
            pinned: Vec::new(),
            keep_pins,
            attached: Vec::new(),
        };
        datapath.pin_maps()?;
        Ok(datapath)
    }

    fn pin_maps(&mut self) -> Result<(), DatapathError> {
        fs::create_dir_all(&self.pin_dir).map_err(|source| DatapathError::PinDir {
            path: self.pin_dir.clone(),
            source,
        })?;
        for name in PINNED_MAPS {
            let path = self.pin_dir.join(name);
            if path.exists() {
                // A previous agent died without cleaning up. Its counts are not carried over.
                warn!(path = %path.display(), "replacing a stale pinned map left by an earlier agent");
                fs::remove_file(&path).map_err(|source| DatapathError::PinDir {
                    path: path.clone(),
                    source,
                })?;
            }
            let map = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
            map.pin(&path).map_err(|e| DatapathError::Pin {
                name,
                path: path.clone(),
                source: Box::new(e),
            })?;
            info!(map = name, path = %path.display(), "map pinned");
            self.pinned.push(path);
        }
        Ok(())
    }

    /// Attaches every cgroup program to the cgroup v2 directory `path`, next to any programs other
    /// tools attached there (link-based attach: ours never replace theirs).
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<AttachedCgroup, DatapathError> {
        let cgroup_err = |source| DatapathError::Cgroup {
            path: path.to_path_buf(),
            source,
        };
        let dir = fs::File::open(path).map_err(cgroup_err)?;
        let id = dir.metadata().map_err(cgroup_err)?.ino();
        for name in CGROUP_PROGRAMS {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|e| DatapathError::Program {
                    name,
                    source: Box::new(e),
                })?;
            // Attached through a bpf_link (kernel >= 5.7, which the agent requires): the kernel
            // always attaches links in multi mode, beside other tools' programs, and rejects
            // any attach flag, so `Single` (no flag) is the right mode here.
            program
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|e| DatapathError::Program {
                    name,
                    source: Box::new(e),
                })?;
        }
        let attached = AttachedCgroup {
            path: path.to_path_buf(),
            id,
        };
        info!(cgroup = %path.display(), cgroup_id = id, "programs attached to cgroup");
        self.attached.push(attached.clone());
        Ok(attached)
    }

    /// Cgroups the programs are attached to, in attach order.
    pub fn attached(&self) -> &[AttachedCgroup] {
        &self.attached
    }

    /// Directory holding this agent's pinned maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        // Links are detached, and the log thread stopped, when the fields drop right after this.
        if self.keep_pins {
            info!(dir = %self.pin_dir.display(), "keeping pinned maps");
            return;
        }
        for path in &self.pinned {
            if let Err(e) = fs::remove_file(path) {
                warn!(path = %path.display(), error = %e, "could not remove pinned map");
            }
        }
        match fs::remove_dir(&self.pin_dir) {
            Ok(()) => info!(dir = %self.pin_dir.display(), "pinned maps removed"),
            Err(e) => {
                warn!(dir = %self.pin_dir.display(), error = %e, "could not remove pin directory");
            }
        }
    }
}

/// Reads the programs' aya-log ring buffer on a thread of its own and forwards the records to
/// the `log` facade, which the tracing subscriber receives (target `mesh_ebpf`). Stops within
/// [`LOG_POLL_MS`] of the returned handle being dropped.
fn spawn_logger(ebpf: &mut Ebpf) -> Result<LoggerHandle, DatapathError> {
    let mut logger =
        EbpfLogger::init(ebpf).map_err(|e| DatapathError::Logger(io::Error::other(e)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("kernel-log".into())
        .spawn(move || {
            while !thread_stop.load(Ordering::Relaxed) {
                let mut fds = [PollFd::new(logger.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(LOG_POLL_MS)) {
                    Ok(_) => logger.flush(),
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        warn!(error = %e, "kernel log reader stopped");
                        return;
                    }
                }
            }
            // Records written just before shutdown.
            logger.flush();
        })
        .map_err(DatapathError::Logger)?;
    Ok(LoggerHandle {
        stop,
        thread: Some(thread),
    })
}

/// How often the log thread checks for shutdown when no records arrive.
const LOG_POLL_MS: u8 = 200;

/// Owns the kernel log thread; stops and joins it on drop.
#[derive(Debug)]
struct LoggerHandle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LoggerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
