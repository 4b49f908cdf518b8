//! Ferrite's node agent: Kubernetes objects -> one desired-state model -> ordered
//! writes to the pinned BPF maps of the datapath.
//!
//! Modules depend one way, each only on those before it:
//! `limits`, `files`, `maglev`, `conntrack_gc`, `http` (the HTTP listeners' server)
//! -> `model`, `hostnet` -> `plan`,
//! `objects_yaml`, `driver`, `healthcheck` -> `maps`, `datapath` -> `telemetry`,
//! `podnet`, `inspect`, `monitor` (`ferrite monitor`'s events), `explain` -> `agent`
//! (the node), `source` and `kube_source` (events for the driver), `cni` ->
//! `install_cni` (`ferrite install-cni`: the plugins and conflist on a node). The
//! binaries wire a source, the driver and the node.
//! (Only `model`'s unit tests look up: they read fixtures with `objects_yaml`.)
pub mod agent;
pub mod bpf_syscall;
pub mod cni;
pub mod conntrack_gc;
pub mod datapath;
pub mod driver;
pub mod explain;
pub mod files;
pub mod healthcheck;
pub mod hostnet;
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
pub mod podnet;
pub mod source;
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
