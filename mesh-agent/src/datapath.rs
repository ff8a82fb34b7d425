//! The kernel side as seen from the agent: loads the embedded programs with their maps pinned
//! under the agent's bpffs directory (a restarted agent adopts them), forwards the programs'
//! aya-log records to `tracing`, and attaches and detaches the programs per pod.
//!
//! Ownership: [`Datapath`] owns the programs and the per-pod links; [`ConnMaps`] (shared with
//! the proxies) owns the maps touched once per connection, and the fast-path counters (read by
//! whoever holds it, e.g. a metrics endpoint).

use std::{
    fs, io,
    net::SocketAddr,
    os::{
        fd::{AsFd as _, AsRawFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SkMsg, SockOps,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use aya_log::EbpfLogger;
use mesh_common::{
    names, DirectPair, FastpathCounters, KernelOffsets, MeshConfig, NsSockKey, PodInfo, SockAddr,
    SockKey, MAX_SHORTCUT_BUDGET,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, info, warn};

use crate::netns::Netns;

mod conn_maps;
mod direct_maps;

pub use conn_maps::{ConnMaps, Paired};
pub use direct_maps::DirectMaps;

/// The name of the directory that holds every agent's pin directory in the default layout
/// (`/sys/fs/bpf/mesh-agent/<node>`, `config::DEFAULT_BPFFS_ROOT`, and the chart's).
const PIN_PARENT: &str = "mesh-agent";

/// The kernel object built by `build.rs` from the `mesh-ebpf` crate.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// `cgroup/sock_addr` programs attached to every meshed pod's cgroup.
const SOCK_ADDR_PROGRAMS: [&str; 6] = [
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
    names::PROG_GETPEERNAME4,
    names::PROG_GETPEERNAME6,
    names::PROG_BIND4,
    names::PROG_BIND6,
];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the kernel programs: {0}")]
    Load(#[source] Box<EbpfError>),
    #[error("kernel program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<ProgramError>,
    },
    #[error("kernel object has no program {0} (agent and kernel programs out of step)")]
    MissingProgram(&'static str),
    #[error("kernel object has no map {0} (agent and kernel programs out of step)")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<MapError>,
    },
    #[error("starting the kernel log reader: {0}")]
    Logger(#[source] io::Error),
    #[error("bpffs directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error("attaching {name} to {target}: {source}")]
    Attach {
        name: &'static str,
        target: PathBuf,
        source: Box<ProgramError>,
    },
    #[error("link of {name}: {source}")]
    Link {
        name: &'static str,
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("pinning the link of {name} at {path}: {source}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        source: Box<aya::pin::PinError>,
    },
}

/// Subdirectory of the pin directory that holds pinned links, one directory per agent instance.
const LINKS_DIR: &str = "links";
/// Separates a pod's name from the attachment's number in a links directory's name.
const LINK_SEQ: char = '@';

/// The part of a links directory's name that names the pod (`namespace_name`).
pub fn links_name(pod: &str) -> String {
    pod.replace('/', "_")
}

/// Unique per agent process: pid and start time.
fn instance_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// The file-descriptor link behind a program-specific link (link-based attach), for pinning.
fn fd_link<L>(link: L, name: &'static str) -> Result<FdLink, DatapathError>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    FdLink::try_from(link).map_err(|e| DatapathError::Link {
        name,
        source: Box::new(e),
    })
}

fn pin_link(link: FdLink, dir: &Path, name: &'static str) -> Result<PinnedLink, DatapathError> {
    let path = dir.join(name);
    link.pin(&path).map_err(|e| DatapathError::PinLink {
        name,
        path,
        source: Box::new(e),
    })
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |e| DatapathError::Program {
        name,
        source: Box::new(e),
    }
}

fn attach_err(name: &'static str, target: &Path) -> impl FnOnce(ProgramError) -> DatapathError {
    let target = target.to_path_buf();
    move |e| DatapathError::Attach {
        name,
        target,
        source: Box::new(e),
    }
}

/// `BPF_NOEXIST`: a map update that only creates (`EEXIST` if the key is there).
const BPF_NOEXIST: u64 = 1;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |e| DatapathError::Map {
        name,
        source: Box::new(e),
    }
}

/// One pod's program attachments, pinned under `<pin-dir>/links/<agent instance>/<pod>/` so
/// they outlive the agent: while it is down (or restarting) the pod stays captured, and its
/// connections fail or wait instead of bypassing the mesh. Give them back to
/// [`Datapath::detach_pod`].
#[derive(Debug)]
pub struct PodLinks {
    pub cgroup_id: u64,
    dir: PathBuf,
    pins: Vec<PinnedLink>,
}

/// The `sk_msg` short-cut's settings, for pods that opt in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shortcut {
    /// Bytes a sender may leave unread in its peer's short-cut queue; at most
    /// [`MAX_SHORTCUT_BUDGET`].
    pub budget: u32,
    /// Where the budget's kernel fields are (from the running kernel's BTF).
    pub offsets: KernelOffsets,
}

impl Shortcut {
    /// The short-cut with `budget`, if this kernel exposes what bounds it. The error says why
    /// not (the caller runs without the short-cut).
    pub fn for_running_kernel(budget: u32) -> Result<Self, crate::kernel_btf::BtfError> {
        let offsets = crate::kernel_btf::Btf::from_sys_fs()?.kernel_offsets()?;
        Ok(Self {
            budget: budget.min(MAX_SHORTCUT_BUDGET),
            offsets,
        })
    }
}

/// Loaded kernel programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    conn: Arc<ConnMaps>,
    pods: HashMap<MapData, u64, PodInfo>,
    listeners: SockHash<MapData, SockAddr>,
    pin_dir: PathBuf,
    /// `<pin-dir>/links/<instance>`: this agent's pinned links; other instances' are stale.
    links_dir: PathBuf,
    /// Attachments made so far (numbers each one's links directory).
    attachments: u64,
    keep_pins: bool,
    /// Kept alive for the programs' lifetime; dropped after `ebpf`, so it flushes last records.
    _logger: LoggerHandle,
}

impl Datapath {
    /// Loads and verifies the programs with their maps pinned in `pin_dir` (maps already pinned
    /// there by an earlier agent are adopted when their layout matches), starts the kernel log
    /// reader, attaches `sk_msg` to the SOCKHASH and `sockops` to the agent's own cgroup
    /// `agent_cgroup` (the agent's sockets are the other end of every pod-local leg).
    ///
    /// `shortcut`: the short-cut's settings, or `None` to keep every leg on the TCP path.
    /// `kernel_direct`: pods are registered for kernel-direct connections
    /// ([`PodInfo::KERNEL_DIRECT`]).
    pub fn load(
        pin_dir: &Path,
        keep_pins: bool,
        shortcut: Option<Shortcut>,
        kernel_direct: bool,
        agent_cgroup: &Path,
    ) -> Result<Self, DatapathError> {
        fs::create_dir_all(pin_dir).map_err(|source| DatapathError::PinDir {
            path: pin_dir.to_path_buf(),
            source,
        })?;
        release_incompatible_pins(pin_dir);
        let log_level = kernel_log_level() as u8;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .override_global(aya_log::LEVEL, &log_level, true)
            .load(KERNEL_OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        let logger = spawn_logger(&mut ebpf)?;
        for name in SOCK_ADDR_PROGRAMS {
            sock_addr_program(&mut ebpf, name)?
                .load()
                .map_err(prog_err(name))?;
        }
        sockops_program(&mut ebpf)?
            .load()
            .map_err(prog_err(names::PROG_SOCKOPS))?;
        sk_lookup_program(&mut ebpf)?
            .load()
            .map_err(prog_err(names::PROG_SK_LOOKUP))?;
        let sk_msg: &mut SkMsg = program(&mut ebpf, names::PROG_SK_MSG)?;
        sk_msg.load().map_err(prog_err(names::PROG_SK_MSG))?;

        let socks: SockHash<MapData, NsSockKey> = take_map(&mut ebpf, names::SOCKS)?;
        let sk_msg: &mut SkMsg = program(&mut ebpf, names::PROG_SK_MSG)?;
        sk_msg
            .attach(socks.fd())
            .map_err(prog_err(names::PROG_SK_MSG))?;

        let mut config: Array<MapData, MeshConfig> = take_map(&mut ebpf, names::CONFIG)?;
        let mesh_config = shortcut.map_or_else(MeshConfig::default, |s| MeshConfig {
            flags: MeshConfig::SOCKMAP,
            budget: s.budget,
            offsets: s.offsets,
        });
        config
            .set(0, mesh_config, 0)
            .map_err(map_err(names::CONFIG))?;

        let cgroup = open_cgroup(agent_cgroup)?;
        sockops_program(&mut ebpf)?
            .attach(&cgroup.0, CgroupAttachMode::Single)
            .map_err(prog_err(names::PROG_SOCKOPS))?;
        info!(
            pin_dir = %pin_dir.display(),
            agent_cgroup = %agent_cgroup.display(),
            shortcut = shortcut.is_some(),
            shortcut_budget = mesh_config.budget,
            "kernel programs loaded"
        );
        let conn = Arc::new(ConnMaps {
            conn_dst: Mutex::new(take_map(&mut ebpf, names::CONN_DST)?),
            peer_addr: Mutex::new(take_map(&mut ebpf, names::PEER_ADDR)?),
            socks: Mutex::new(socks),
            sock_ptrs: Mutex::new(take_map(&mut ebpf, names::SOCK_PTRS)?),
            pairs: Mutex::new(take_map(&mut ebpf, names::PAIRS)?),
            shortcut: shortcut.is_some(),
            fastpath: take_map(&mut ebpf, names::FASTPATH)?,
            direct: DirectMaps::load(&mut ebpf, kernel_direct)?,
        });
        // An earlier agent's connections ended with it (its sockets closed when it exited), and
        // the kernel never sends direct through a closed agent socket; what it left paired is
        // only taking room (agents of one node never overlap: the DaemonSet has no surge).
        let stale = conn.clear_pairs();
        if stale > 0 {
            info!(
                stale,
                "removed the same-node pairings an earlier agent left"
            );
        }
        Ok(Self {
            conn,
            pods: take_map(&mut ebpf, names::PODS)?,
            listeners: take_map(&mut ebpf, names::LISTENERS)?,
            ebpf,
            links_dir: pin_dir.join(LINKS_DIR).join(instance_id()),
            attachments: 0,
            pin_dir: pin_dir.to_path_buf(),
            keep_pins,
            _logger: logger,
        })
    }

    /// The per-connection maps, for the proxies.
    pub fn conn_maps(&self) -> Arc<ConnMaps> {
        Arc::clone(&self.conn)
    }

    /// Tells the connect hooks of the pod in namespace `netns_cookie` where its outbound
    /// listener is.
    pub fn register_pod(&mut self, netns_cookie: u64, info: PodInfo) -> Result<(), DatapathError> {
        let mut info = info;
        if self.conn.direct.enabled() {
            info.flags |= PodInfo::KERNEL_DIRECT;
        }
        self.pods
            .insert(netns_cookie, info, 0)
            .map_err(map_err(names::PODS))
    }

    pub fn unregister_pod(&mut self, netns_cookie: u64) {
        let _ = self.pods.remove(&netns_cookie);
    }

    /// Makes `listener` the target of `sk_lookup` for connections to pod address `addr`.
    pub fn add_listener(
        &mut self,
        addr: SocketAddr,
        listener: &impl AsRawFd,
    ) -> Result<(), DatapathError> {
        let key = SockAddr::from(addr).without_port();
        self.listeners
            .insert(key, listener.as_raw_fd(), 0)
            .map_err(map_err(names::LISTENERS))
    }

    pub fn remove_listener(&mut self, addr: SocketAddr) {
        let _ = self.listeners.remove(&SockAddr::from(addr).without_port());
    }

    /// Attaches the capture programs to a pod: the cgroup programs to its cgroup v2 directory,
    /// `sk_lookup` to its network namespace, and pins the links. Link-based: ours are added
    /// beside other tools' programs on the same hooks, never replacing them.
    pub fn attach_pod(
        &mut self,
        pod: &str,
        cgroup: &Path,
        netns: &Netns,
    ) -> Result<PodLinks, DatapathError> {
        let (dir, cgroup_id) = open_cgroup(cgroup)?;
        // One directory per attachment: a pod replaced in place (a new cgroup) has its new
        // links before its old ones go.
        self.attachments += 1;
        let links_dir =
            self.links_dir
                .join(format!("{}{LINK_SEQ}{}", links_name(pod), self.attachments));
        fs::create_dir_all(&links_dir).map_err(|source| DatapathError::PinDir {
            path: links_dir.clone(),
            source,
        })?;
        let mut links = PodLinks {
            cgroup_id,
            dir: links_dir,
            pins: Vec::new(),
        };
        match self.attach_all(&dir, cgroup, netns, &mut links) {
            Ok(()) => {
                debug!(pod, cgroup = %cgroup.display(), cgroup_id, "programs attached");
                Ok(links)
            }
            Err(e) => {
                // Undo the part that succeeded.
                self.detach_pod(links);
                Err(e)
            }
        }
    }

    fn attach_all(
        &mut self,
        cgroup: &fs::File,
        cgroup_path: &Path,
        netns: &Netns,
        links: &mut PodLinks,
    ) -> Result<(), DatapathError> {
        for name in SOCK_ADDR_PROGRAMS {
            let program = sock_addr_program(&mut self.ebpf, name)?;
            // Link attach (kernel >= 5.7): always multi-attach; the kernel rejects flags, so
            // `Single` (no flag) is the right mode.
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(attach_err(name, cgroup_path))?;
            let link = fd_link(program.take_link(id).map_err(prog_err(name))?, name)?;
            links.pins.push(pin_link(link, &links.dir, name)?);
        }
        let name = names::PROG_SOCKOPS;
        let program = sockops_program(&mut self.ebpf)?;
        let id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(attach_err(name, cgroup_path))?;
        let link = fd_link(program.take_link(id).map_err(prog_err(name))?, name)?;
        links.pins.push(pin_link(link, &links.dir, name)?);
        let name = names::PROG_SK_LOOKUP;
        let program = sk_lookup_program(&mut self.ebpf)?;
        let id = program
            .attach(netns.file())
            .map_err(attach_err(name, netns.path()))?;
        let link = FdLink::from(program.take_link(id).map_err(prog_err(name))?);
        links.pins.push(pin_link(link, &links.dir, name)?);
        Ok(())
    }

    /// Detaches a pod's programs and removes their pins.
    pub fn detach_pod(&mut self, links: PodLinks) {
        for pin in links.pins {
            match pin.unpin() {
                // Dropping the last reference to the link detaches it.
                Ok(link) => drop(link),
                Err(e) => warn!(dir = %links.dir.display(), error = %e, "unpinning a link"),
            }
        }
        let _ = fs::remove_dir(&links.dir);
    }

    /// Detaches the links earlier agent instances left pinned, except for the pods `keep`
    /// names (by [`links_name`]): those this instance has not captured itself yet, whose earlier
    /// links keep them captured (their connections fail rather than bypass the mesh) until it
    /// has. Returns how many links went.
    pub fn remove_stale_links(&mut self, keep: impl Fn(&str) -> bool) -> usize {
        let root = self.pin_dir.join(LINKS_DIR);
        let mut removed = 0;
        for instance in fs::read_dir(&root).into_iter().flatten().flatten() {
            if instance.path() == self.links_dir {
                continue;
            }
            for pod in fs::read_dir(instance.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = pod.file_name().to_string_lossy().into_owned();
                let pod_part = name.split(LINK_SEQ).next().unwrap_or(&name);
                if keep(pod_part) {
                    continue;
                }
                for pin in fs::read_dir(pod.path()).into_iter().flatten().flatten() {
                    match PinnedLink::from_pin(pin.path()).map(PinnedLink::unpin) {
                        Ok(Ok(link)) => {
                            drop(link);
                            removed += 1;
                        }
                        Ok(Err(e)) => {
                            warn!(path = %pin.path().display(), error = %e, "unpinning a stale link");
                        }
                        Err(e) => {
                            warn!(path = %pin.path().display(), error = %e, "opening a stale link");
                            let _ = fs::remove_file(pin.path());
                        }
                    }
                }
                let _ = fs::remove_dir(pod.path());
            }
            let _ = fs::remove_dir(instance.path());
        }
        if removed > 0 {
            info!(removed, "detached the links of an earlier agent");
        }
        removed
    }

    /// Directory holding this agent's pinned maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Whether the pins stay when this drops (decided at shutdown: see [`crate::departure`]).
    pub fn set_keep_pins(&mut self, keep: bool) {
        self.keep_pins = keep;
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        // Links are detached, and the log thread stopped, when the fields drop right after this.
        if self.keep_pins {
            info!(dir = %self.pin_dir.display(), "keeping pinned maps");
            return;
        }
        // Pods were detached (and their links unpinned) before; what is left are the maps.
        match fs::remove_dir_all(&self.pin_dir) {
            Ok(()) => {
                info!(dir = %self.pin_dir.display(), "pinned maps removed");
                // The default layout's shared parent (`<bpffs>/mesh-agent`), once no agent of
                // this machine pins below it: nothing of ours is left in bpffs.
                if let Some(parent) = self.pin_dir.parent().filter(|p| p.ends_with(PIN_PARENT)) {
                    if fs::remove_dir(parent).is_ok() {
                        info!(dir = %parent.display(), "empty pin parent removed");
                    }
                }
            }
            Err(e) => {
                warn!(dir = %self.pin_dir.display(), error = %e, "could not remove pin directory");
            }
        }
    }
}

/// Key size, value size and capacity of every pinned map, as this build's programs declare them.
fn map_layouts() -> [(&'static str, usize, usize, u32); 11] {
    use mesh_common::{CgroupCounters, MAX_CGROUPS, MAX_CONNS, MAX_PODS};
    use std::mem::size_of;
    [
        (
            names::CGROUP_COUNTERS,
            8,
            size_of::<CgroupCounters>(),
            MAX_CGROUPS,
        ),
        (names::PODS, 8, size_of::<PodInfo>(), MAX_PODS),
        (names::ORIG_DST, 8, size_of::<SockAddr>(), MAX_CONNS),
        (
            names::CONN_DST,
            size_of::<NsSockKey>(),
            size_of::<SockAddr>(),
            MAX_CONNS,
        ),
        (
            names::PEER_ADDR,
            size_of::<SockKey>(),
            size_of::<SockAddr>(),
            MAX_CONNS,
        ),
        (names::SOCKS, size_of::<NsSockKey>(), 4, MAX_CONNS),
        (names::SOCK_PTRS, size_of::<NsSockKey>(), 8, MAX_CONNS),
        (
            names::PAIRS,
            size_of::<NsSockKey>(),
            size_of::<DirectPair>(),
            MAX_CONNS,
        ),
        (names::LISTENERS, size_of::<SockAddr>(), 4, MAX_PODS * 2),
        (names::CONFIG, 4, size_of::<MeshConfig>(), 1),
        (names::FASTPATH, 4, size_of::<FastpathCounters>(), 1),
    ]
}

/// Releases pins an earlier agent left whose layout this build's programs do not share (an
/// upgrade changed a key or value): adopting them would fail to load or, worse, be read with the
/// wrong layout. The earlier agent's programs keep their own references to those maps until its
/// links are detached; this agent creates fresh ones.
fn release_incompatible_pins(pin_dir: &Path) {
    for (name, key, value, max) in map_layouts() {
        let path = pin_dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        let found = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (key, value, max) {
            warn!(
                map = name,
                found = ?found,
                expected = ?(key, value, max),
                "pinned map from an agent of another layout; releasing it"
            );
            let _ = fs::remove_file(&path);
        }
    }
}

fn open_cgroup(path: &Path) -> Result<(fs::File, u64), DatapathError> {
    let err = |source| DatapathError::Cgroup {
        path: path.to_path_buf(),
        source,
    };
    let fs_type = nix::sys::statfs::statfs(path)
        .map_err(|e| err(io::Error::from(e)))?
        .filesystem_type();
    if fs_type != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(DatapathError::NotCgroup2 {
            path: path.to_path_buf(),
        });
    }
    let dir = fs::File::open(path).map_err(err)?;
    let id = dir.metadata().map_err(err)?.ino();
    Ok((dir, id))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(prog_err(name))
}

fn sock_addr_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, DatapathError> {
    program(ebpf, name)
}

fn sockops_program(ebpf: &mut Ebpf) -> Result<&mut SockOps, DatapathError> {
    program(ebpf, names::PROG_SOCKOPS)
}

fn sk_lookup_program(ebpf: &mut Ebpf) -> Result<&mut SkLookup, DatapathError> {
    program(ebpf, names::PROG_SK_LOOKUP)
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// The most verbose level the agent's log filter lets through for the kernel programs' records
/// (target `mesh_ebpf`) as they are loaded. The programs write nothing more verbose into the ring
/// buffer, so the per-connection `debug` records (`connect4`/`connect6`) cost nothing unless
/// asked for at start (`RUST_LOG=info,mesh_ebpf=debug`); `/logging` cannot raise it later.
fn kernel_log_level() -> aya_log::Level {
    use tracing::Level;
    if tracing::enabled!(target: "mesh_ebpf", Level::TRACE) {
        aya_log::Level::Trace
    } else if tracing::enabled!(target: "mesh_ebpf", Level::DEBUG) {
        aya_log::Level::Debug
    } else if tracing::enabled!(target: "mesh_ebpf", Level::INFO) {
        aya_log::Level::Info
    } else if tracing::enabled!(target: "mesh_ebpf", Level::WARN) {
        aya_log::Level::Warn
    } else {
        aya_log::Level::Error
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

#[cfg(test)]
mod tests {
    use super::KERNEL_OBJECT;

    fn holds(needle: &[u8]) -> bool {
        KERNEL_OBJECT.windows(needle.len()).any(|w| w == needle)
    }

    /// `build.rs` strips the object's DWARF (which every agent would keep resident) but not
    /// the BTF the loader and the verifier's messages use.
    #[test]
    fn the_embedded_object_has_btf_and_no_dwarf() {
        assert!(holds(b".BTF.ext"), "no .BTF.ext section");
        assert!(!holds(b".debug_info"), "the object still carries DWARF");
        assert!(
            KERNEL_OBJECT.len() < 200 * 1024,
            "{} bytes",
            KERNEL_OBJECT.len()
        );
    }
}
