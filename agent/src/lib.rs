//! Ferrite's node agent: Kubernetes objects -> one desired-state model -> ordered
//! writes to the pinned BPF maps of the datapath.
//!
//! Modules depend one way: each uses only modules of the tiers before its own
//! (`tests/layering.rs` checks it, from the sources):
//! 1. `family` (what code serving both IP families needs of each);
//! 2. `bpf_syscall`, `command` (the programs the agent runs: nft, iptables-restore),
//!    `conntrack_gc`, `files`, `http` (the HTTP listeners' server), `limits`,
//!    `maglev`, `netlink`;
//! 3. `model` (objects -> desired state, pure), `takeover` (kube-proxy's conntrack
//!    and rules);
//! 4. `plan` (desired state -> ordered map writes, and the node's state, pure);
//! 5. `host` (the node's own networking), `datapath` (load, pin, attach), `maps`,
//!    `driver`, `healthcheck`, `proxy_health`, `objects_yaml`;
//! 6. `telemetry`, `inspect`, `explain`, `cni`;
//! 7. `monitor`, `kube_source`, `source`, `install_cni`, `agent` (the node);
//! 8. `cli` (the command line of the binary, with its help).
//!
//! The binaries wire a source, the driver and the node. (Only `model`'s unit tests
//! look up: they read fixtures with `objects_yaml`.)
pub mod agent;
pub mod bpf_syscall;
pub mod cli;
pub mod cni;
pub mod command;
pub mod conntrack_gc;
pub mod datapath;
pub mod driver;
pub mod explain;
pub mod family;
pub mod files;
pub mod healthcheck;
pub mod host;
pub mod http;
pub mod inspect;
pub mod install_cni;
pub mod kube_source;
pub mod limits;
pub mod maglev;
pub mod maps;
pub mod model;
pub mod monitor;
pub mod netlink;
pub mod objects_yaml;
pub mod plan;
pub mod proxy_health;
pub mod source;
pub mod takeover;
pub mod telemetry;

/// Unit tests' heap meter: bytes allocated by the calling thread, for tests that
/// memory does not grow with untrusted input.
#[cfg(test)]
pub(crate) mod alloc_meter {
    use std::{
        alloc::{GlobalAlloc, Layout, System},
        cell::Cell,
    };

    thread_local! {
        static ALLOCATED: Cell<usize> = const { Cell::new(0) };
    }

    struct Meter;

    // SAFETY: every call is passed to the system allocator unchanged.
    unsafe impl GlobalAlloc for Meter {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATED.with(|a| a.set(a.get().saturating_add(layout.size())));
            System.alloc(layout)
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            System.dealloc(ptr, layout)
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            ALLOCATED.with(|a| a.set(a.get().saturating_add(new_size)));
            System.realloc(ptr, layout, new_size)
        }
    }

    #[global_allocator]
    static METER: Meter = Meter;

    pub fn allocated_on_this_thread() -> usize {
        ALLOCATED.with(Cell::get)
    }
}
