//! Kernel programs of the mesh.
//!
//! - `capture`: `cgroup/connect4|6` on meshed pods' cgroups send each TCP `connect()` to the
//!   agent's outbound listener on the pod's loopback address, from the pod's own address
//!   (`source`), and remember the original destination;
//!   `cgroup/getpeername4|6` show an application the original client instead of the agent.
//! - `sockmap`: `sockops` hands the original destination to the agent and puts both sockets of
//!   every pod-local leg into a SOCKHASH; `sk_msg` then moves their bytes socket to socket.
//! - `inbound`: `sk_lookup` in each meshed pod's namespace steers incoming connections to the
//!   agent's inbound listener.
//!
//! Entry points are thin: each calls a `try_*` function and maps its result to the verdict.
#![no_std]
#![no_main]
// The BPF target has no atomic read-modify-write in stable `core` (no compare-and-swap), but the
// kernel has atomic adds (`BPF_ATOMIC | BPF_ADD`): `sockmap::count` reaches them through the
// intrinsic. This crate is only ever built with nightly (aya-build, `-Z build-std=core`).
#![feature(core_intrinsics)]
#![allow(internal_features)]
// aya's program macros fix the entry points' signature: the context is passed by value.
#![allow(clippy::needless_pass_by_value)]

mod addr;
mod budget;
mod capture;
mod direct;
mod inbound;
mod maps;
mod sockmap;
mod source;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Several helpers used here (sockmap redirects, `bpf_sk_assign`) are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
