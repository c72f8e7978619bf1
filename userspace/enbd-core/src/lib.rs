// SPDX-License-Identifier: GPL-2.0
//! Kernel-independent enbd logic, shared with the kernel module.
//!
//! Each module here is a single `no_std`, allocation-free file that
//! `drivers/block/enbd/main.rs` also compiles with `#[path]`, so the module
//! and userspace run the same code and cargo tests cover what the kernel runs.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod health;
pub mod journal;
pub mod ratelimit;
pub mod replica;
pub mod uapi;
pub mod wake;
pub mod wire;
