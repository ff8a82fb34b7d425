//! Kernel-side helpers shared by the mesh's eBPF programs.
#![no_std]
