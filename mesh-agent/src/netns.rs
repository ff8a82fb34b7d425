//! Network namespaces of pods: the agent opens its listeners and its connections *inside* each
//! meshed pod's namespace (as ztunnel does), from threads that briefly switch into it.
//!
//! A socket belongs to the namespace its creating thread was in when `socket()` ran; after that
//! it can be used from any thread. [`Netns::run`] switches the calling thread in, runs a short
//! synchronous closure (socket creation, bind, listen) and switches back before returning.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use nix::sched::{setns, CloneFlags};

/// The agent's own network namespace, opened once at start (`/proc/self/ns/net` names the main
/// thread's, which never switches).
static HOME: OnceLock<File> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("in network namespace {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("network namespace not known yet: {0}")]
    Unknown(String),
}

/// Where a pod's network namespace is, as its source tells it.
#[derive(Clone, Debug)]
pub enum NetnsRef {
    /// A namespace file (the file source's stand-in annotation, `/run/netns/<name>`).
    Path(PathBuf),
    /// An open descriptor: handed over by the CNI plugin, or taken from `/proc` (`from` says
    /// which). Kept open, so the namespace cannot be swapped under the agent by reusing a path.
    Fd {
        fd: Arc<OwnedFd>,
        from: &'static str,
    },
    /// Not known yet, and why (a pod waiting for its hand-over): it cannot be captured.
    Unknown(String),
}

impl PartialEq for NetnsRef {
    /// Paths by name; descriptors by the namespace they refer to (device and inode), so the
    /// same namespace handed over twice is the same.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (NetnsRef::Path(a), NetnsRef::Path(b)) => a == b,
            (NetnsRef::Fd { fd: a, .. }, NetnsRef::Fd { fd: b, .. }) => {
                Arc::ptr_eq(a, b) || ns_identity(a).is_some_and(|id| ns_identity(b) == Some(id))
            }
            (NetnsRef::Unknown(a), NetnsRef::Unknown(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for NetnsRef {}

impl std::fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetnsRef::Path(path) => write!(f, "{}", path.display()),
            NetnsRef::Fd { fd, from } => match ns_identity(fd) {
                Some((_, ino)) => write!(f, "net:[{ino}] ({from})"),
                None => write!(f, "a namespace descriptor ({from})"),
            },
            NetnsRef::Unknown(why) => write!(f, "unknown: {why}"),
        }
    }
}

/// Device and inode of the namespace behind `fd`.
fn ns_identity(fd: &OwnedFd) -> Option<(u64, u64)> {
    nix::sys::stat::fstat(fd.as_raw_fd())
        .ok()
        .map(|st| (st.st_dev, st.st_ino))
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace file at `path` (`/run/netns/<name>`, `/proc/<pid>/ns/net`).
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        init_home()?;
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Opens the namespace `at` names (a descriptor is duplicated: the original stays with its
    /// source). An unknown namespace is an error saying why.
    pub fn open_ref(at: &NetnsRef) -> Result<Self, NetnsError> {
        match at {
            NetnsRef::Path(path) => Self::open(path),
            NetnsRef::Fd { fd, .. } => {
                init_home()?;
                let label = PathBuf::from(at.to_string());
                let file = fd
                    .try_clone()
                    .map(File::from)
                    .map_err(|source| NetnsError::Open {
                        path: label.clone(),
                        source,
                    })?;
                Ok(Self { file, path: label })
            }
            NetnsRef::Unknown(why) => Err(NetnsError::Unknown(why.clone())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace file, for attaching programs (`sk_lookup`) to it.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` with the calling thread inside this namespace.
    ///
    /// # Panics
    /// If the thread cannot return to the agent's namespace: continuing would run the agent's
    /// later work in a pod's namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> Result<T, NetnsError> {
        let home = init_home()?;
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let out = f();
        setns(home, CloneFlags::CLONE_NEWNET)
            .expect("returning to the agent's own network namespace");
        out.map_err(|source| NetnsError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// The kernel's cookie for this namespace (`bpf_get_netns_cookie` in the programs).
    pub fn cookie(&self) -> Result<u64, NetnsError> {
        self.run(|| {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0")
                .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
            netns_cookie(socket.as_raw_fd())
        })
    }
}

fn init_home() -> Result<&'static File, NetnsError> {
    if let Some(home) = HOME.get() {
        return Ok(home);
    }
    let path = Path::new("/proc/self/ns/net");
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(HOME.get_or_init(|| file))
}

/// `SO_NETNS_COOKIE` (Linux 5.14), not yet exported by the libc crate.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// `getsockopt(SO_NETNS_COOKIE)`: no safe wrapper exists in nix or libc for this option.
#[allow(unsafe_code)]
fn netns_cookie(fd: libc::c_int) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).expect("8 fits socklen_t");
    // SAFETY: `fd` is an open socket owned by the caller for the duration of the call;
    // `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_has_a_stable_cookie_and_run_returns_home() {
        let ns = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        let a = ns.cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(ns.cookie().unwrap(), a);
    }

    #[test]
    fn missing_namespace_is_named_in_the_error() {
        let err = Netns::open(Path::new("/run/netns/does-not-exist")).unwrap_err();
        assert!(
            err.to_string().contains("/run/netns/does-not-exist"),
            "{err}"
        );
    }
}
