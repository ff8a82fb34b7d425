//! Giving the allocator's freed pages back to the kernel at once, after start-up.
//!
//! The agent's start allocates much more than it keeps: aya parses the kernel's BTF (megabytes
//! of type information) to load the programs, and the first config and certificates come with
//! their own transients. jemalloc's background threads return freed pages over about ten seconds
//! (its decay); a freshly started agent therefore looked two to three times its resting size for
//! a while, long enough to be what an operator (or a memory limit) sees first. Purging once the
//! start-up is done hands them back immediately. The same happens once a burst of load is over:
//! when the copy buffers' pool finds that no copy needed a buffer for a whole period (2 s) and
//! frees its last ones (`proxy::trim_copy_buffers`, within 4 s). Under load the decay stays in
//! charge: purging at every short pause would only make the next burst fault the pages in again.

use std::{ffi::CStr, ptr};

/// jemalloc's `arena.<i>.purge` for every arena (`MALLCTL_ARENAS_ALL` is 4096).
const PURGE_ALL: &CStr = c"arena.4096.purge";

/// Returns the pages of every arena's freed memory to the kernel. Logs (at `debug`) and goes
/// on when jemalloc refuses: nothing depends on it but the resident size.
pub fn release_freed() {
    if let Err(e) = purge_all() {
        tracing::debug!(error = %e, "jemalloc would not purge its arenas");
    }
}

fn purge_all() -> std::io::Result<()> {
    // SAFETY: `mallctl` with a NUL-terminated name and no old or new value (null pointers,
    // length 0) is how jemalloc's "void" controls are called; `arena.<i>.purge` reads and
    // writes nothing. The call only touches jemalloc's own state, under its own locks.
    #[allow(unsafe_code)]
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null_mut(),
            0,
        )
    };
    match rc {
        0 => Ok(()),
        rc => Err(std::io::Error::from_raw_os_error(rc)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purging_is_accepted() {
        // jemalloc is linked into every build of the agent, the tests included (whatever their
        // global allocator): the control must exist and accept the call.
        purge_all().expect("arena.<all>.purge");
    }
}
