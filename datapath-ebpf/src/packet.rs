//! Packet access shared by every attach point, like Cilium's "overloadable" skb/xdp
//! layer: the LB/NAT logic is written once over [`Packet`]; each context says how to
//! read, write and fix checksums. Offsets are absolute from the Ethernet header.
use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

/// What the shared logic decided; each program entry maps it to its own action codes.
#[derive(Clone, Copy)]
pub enum Verdict {
    /// Continue into the host network stack.
    Pass,
    /// Drop, counted (and logged at debug level) under this `stat` index.
    Drop(u32),
    /// Deliver into the pod behind this host-side veth (ifindex).
    RedirectPeer(u32),
}

pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Whole packet length, including any non-linear part.
    fn len(&self) -> u32;
    /// ifindex of the device the program runs on (at an ingress hook: the device the
    /// packet arrived on).
    fn ifindex(&self) -> u32;
    /// Make the first `len` bytes directly readable (skbs may carry headers outside
    /// the linear area). Pointers obtained before this call are invalid after it.
    fn pull(&self, len: u32) -> Result<(), ()>;
    /// Fix an L4 checksum for a change of `size` (2 or 4) bytes; `pseudo` when the
    /// field is part of the pseudo-header (addresses); `udp` keeps checksum 0 = "none".
    fn replace_l4_csum(
        &self,
        csum_offset: usize,
        from: u32,
        to: u32,
        size: u8,
        pseudo: bool,
        udp: bool,
    ) -> Result<(), ()>;

    /// A bounds-checked pointer to a `T` at `offset`, or `Err` if the packet is shorter.
    #[inline(always)]
    fn ptr_at<T>(&self, offset: usize) -> Result<*mut T, ()> {
        let start = self.data();
        if start + offset + size_of::<T>() > self.data_end() {
            return Err(());
        }
        Ok((start + offset) as *mut T)
    }

    /// Write `value` at `offset` with direct packet access (no helper call). Re-derives
    /// the pointer, so it stays valid after helpers that invalidate packet pointers.
    #[inline(always)]
    fn store<T: Copy>(&self, offset: usize, value: &T) -> Result<(), ()> {
        let ptr = self.ptr_at::<T>(offset)?;
        unsafe { core::ptr::write_unaligned(ptr, *value) };
        Ok(())
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn pull(&self, len: u32) -> Result<(), ()> {
        self.pull_data(len).map_err(|_| ())
    }

    #[inline(always)]
    fn replace_l4_csum(
        &self,
        csum_offset: usize,
        from: u32,
        to: u32,
        size: u8,
        pseudo: bool,
        udp: bool,
    ) -> Result<(), ()> {
        // The kernel helper handles both full and CHECKSUM_PARTIAL packets (a local
        // socket's packets on veth carry only the pseudo-header sum).
        let mut flags = size as u64;
        if pseudo {
            flags |= BPF_F_PSEUDO_HDR as u64;
        }
        if udp {
            flags |= BPF_F_MARK_MANGLED_0 as u64;
        }
        self.l4_csum_replace(csum_offset, from as u64, to as u64, flags)
            .map_err(|_| ())
    }
}
