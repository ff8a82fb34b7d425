//! The copy buffers both copies (TCP to TCP in [`super::relay`], TCP to an HBONE stream in
//! [`super::stream_copy`]) borrow for one read and the writes that follow, and the budget of
//! reads a busy direction may do before it yields.

use std::sync::Mutex;

/// Size of one copy buffer: large enough that a bulk transfer needs few system calls and that
/// a direction that fell behind catches up in one read.
const BUF: usize = 256 * 1024;
/// Buffers kept for reuse; more are allocated (and freed) under a burst of busy connections.
const POOL_MAX: usize = 32;
/// Reads a busy direction may do in one poll before it lets other tasks run.
pub(super) const BUDGET: u32 = 16;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

pub(super) fn take_buffer() -> Box<[u8]> {
    POOL.lock()
        .ok()
        .and_then(|mut p| p.pop())
        .unwrap_or_else(|| vec![0; BUF].into_boxed_slice())
}

pub(super) fn give_back(buf: Box<[u8]>) {
    if let Ok(mut p) = POOL.lock() {
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    }
}
