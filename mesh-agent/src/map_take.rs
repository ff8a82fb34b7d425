//! `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on a hash map: read an entry and remove it in one system
//! call. aya 0.14 offers it only for queues and stacks; the kernel has it for (LRU) hash maps
//! since Linux 5.14. The agent takes each captured connection's original destination this way:
//! one call per connection instead of a lookup and a delete.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{maps::MapData, Pod};

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (`enum bpf_cmd`).
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The part of `union bpf_attr` that map element commands use.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Removes `key` from `map` and returns its value; `None` if there was no such key.
///
/// `K` and `V` must be the map's key and value types (their sizes are the map's).
#[allow(unsafe_code)]
pub fn take<K: Pod, V: Pod>(map: &MapData, key: &K) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let attr = ElemAttr {
        map_fd: u32::try_from(map.fd().as_fd().as_raw_fd()).map_err(io::Error::other)?,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid, initialised prefix of `union bpf_attr` for this command (the
    // kernel treats the remaining bytes as zero); `key` points at a `K` and `value` at space for
    // a `V`, both live for the call and of the map's key and value sizes (the caller's
    // contract), so the kernel reads and writes within them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            std::ptr::from_ref(&attr),
            size_of::<ElemAttr>(),
        )
    };
    if rc == 0 {
        // SAFETY: the kernel filled the value on success; `V: Pod` is valid for any bytes.
        Ok(Some(unsafe { value.assume_init() }))
    } else {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}
