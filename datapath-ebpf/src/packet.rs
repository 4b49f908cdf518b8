//! Packet access shared by every attach point, like Cilium's "overloadable" skb/xdp
//! layer: the LB/NAT logic is written once over [`Packet`]; each context says how to
//! read, write and fix checksums. Offsets are absolute from the Ethernet header.
use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_tunnel_key, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_ZERO_CSUM_TX,
    },
    helpers::{
        bpf_skb_change_tail, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
    EbpfContext,
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
    /// Send out of this device (ifindex), e.g. the VXLAN device after set_tunnel.
    Redirect(u32),
    /// Send out of this device, the kernel resolving the next hop's MAC
    /// (bpf_redirect_neigh; TC only, XDP passes instead).
    RedirectNeigh(u32),
    /// Send back out of the device it arrived on (an answer built in place).
    Bounce,
    /// Receive as if it had arrived on this device (ifindex): how a packet for the
    /// node's own processes re-enters the stack from a program at an egress hook.
    RedirectIngress(u32),
}

/// The tunnel metadata of a received packet.
pub struct TunnelKey {
    pub vni: u32,
    /// The sending node's address, host byte order (as `set_tunnel` takes it).
    pub remote_ipv4: u32,
}

pub trait Packet: EbpfContext {
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

    /// Copy a `T` from `offset`, linear data or not, without a packet pointer: for
    /// offsets that only a walk over headers knows (IPv6 extension headers), whose
    /// bounds the verifier cannot follow into direct access after a pull.
    fn read<T: Copy>(&self, offset: usize) -> Result<T, ()>;

    /// Attach tunnel metadata (remote underlay IP in host order, VNI) for a collect_md
    /// tunnel device. `Err` where the context cannot carry it.
    fn set_tunnel(&self, remote_ipv4: u32, vni: u32) -> Result<(), ()>;
    /// What a packet that arrived on a collect_md tunnel device came with.
    fn tunnel_key(&self) -> Result<TunnelKey, ()>;
    /// Make the packet `len` bytes long: cut, or grow with zeroes at the end.
    fn truncate(&self, len: u32) -> Result<(), ()>;
    /// Whether this is a GSO packet (segments merged by GRO or a local sender).
    fn is_gso(&self) -> bool;

    /// Whether this is an explain run's packet (`trace`): decide, write nothing. A
    /// constant of the context type: the attached programs carry no explain code.
    #[inline(always)]
    fn explain(&self) -> bool {
        false
    }

    /// Count an event (`stat` index) of this packet (an explain run only notes it).
    #[inline(always)]
    fn count(&self, index: u32) {
        crate::trace::count(self.explain(), index, self.len());
    }

    /// bpf_fib_lookup on this packet's context: the kernel's route and neighbour
    /// for `params` (BPF_FIB_LKUP_RET_* result).
    #[inline(always)]
    fn fib_lookup(&self, params: &mut bpf_fib_lookup) -> i64 {
        unsafe {
            aya_ebpf::helpers::bpf_fib_lookup(
                self.as_ptr(),
                params,
                size_of::<bpf_fib_lookup>() as i32,
                0,
            )
        }
    }

    /// Make the first `len` bytes directly readable, pulling only when they are not
    /// already (a pull can copy and reallocate: never pay it for headers that are
    /// there). A packet shorter than `len` is left alone: the bounds checks catch it.
    #[inline(always)]
    fn ensure_linear(&self, len: u32) -> Result<(), ()> {
        let linear = (self.data_end() - self.data()) as u32;
        if linear >= len || self.len() <= linear {
            return Ok(());
        }
        self.pull(if self.len() < len { self.len() } else { len })
    }

    /// A bounds-checked pointer to a `T` at `offset`, or `Err` if the packet is shorter.
    #[inline(always)]
    fn ptr_at<T>(&self, offset: usize) -> Result<*mut T, ()> {
        let start = self.data();
        if start + offset + size_of::<T>() > self.data_end() {
            return Err(());
        }
        Ok((start + offset) as *mut T)
    }

    /// Read a `T` at `offset` with direct packet access, as one load instruction.
    ///
    /// Packet data is not aligned for `T` (an IPv4 header sits 2 bytes off a word in
    /// XDP), but BPF loads and stores of any width work at any address where the
    /// verifier does not enforce strict alignment (x86-64, arm64: efficient unaligned
    /// access), as Cilium's C relies on too; `read_unaligned` would cost one load,
    /// shift and or per byte.
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Result<T, ()> {
        let ptr = self.ptr_at::<T>(offset)?;
        Ok(unsafe { ptr.read() })
    }

    /// Write `value` at `offset` with direct packet access (no helper call), as one
    /// store instruction per field (see [`Packet::load`]). Re-derives the pointer, so
    /// it stays valid after helpers that invalidate packet pointers.
    #[inline(always)]
    fn store<T: Copy>(&self, offset: usize, value: &T) -> Result<(), ()> {
        let ptr = self.ptr_at::<T>(offset)?;
        unsafe { ptr.write(*value) };
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
    fn read<T: Copy>(&self, offset: usize) -> Result<T, ()> {
        // bpf_skb_load_bytes.
        TcContext::load(self, offset).map_err(|_| ())
    }

    #[inline(always)]
    fn set_tunnel(&self, remote_ipv4: u32, vni: u32) -> Result<(), ()> {
        let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
        key.tunnel_id = vni;
        key.__bindgen_anon_1.remote_ipv4 = remote_ipv4;
        key.tunnel_ttl = 64;
        // Outer UDP checksum 0, as Linux vxlan (and flannel) send over IPv4 by default:
        // RFC 7348 allows it and the inner packet keeps its own checksums.
        let ret = unsafe {
            bpf_skb_set_tunnel_key(
                self.skb.skb,
                &mut key,
                size_of::<bpf_tunnel_key>() as u32,
                BPF_F_ZERO_CSUM_TX as u64,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(())
        }
    }

    #[inline(always)]
    fn tunnel_key(&self) -> Result<TunnelKey, ()> {
        let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
        let ret = unsafe {
            bpf_skb_get_tunnel_key(
                self.skb.skb,
                &mut key,
                size_of::<bpf_tunnel_key>() as u32,
                0,
            )
        };
        if ret == 0 {
            Ok(TunnelKey {
                vni: key.tunnel_id,
                remote_ipv4: unsafe { key.__bindgen_anon_1.remote_ipv4 },
            })
        } else {
            Err(())
        }
    }

    #[inline(always)]
    fn is_gso(&self) -> bool {
        unsafe { (*self.skb.skb).gso_size != 0 }
    }

    #[inline(always)]
    fn truncate(&self, len: u32) -> Result<(), ()> {
        match unsafe { bpf_skb_change_tail(self.skb.skb, len, 0) } {
            0 => Ok(()),
            _ => Err(()),
        }
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

/// XDP frames are linear and, coming from the wire, carry complete checksums: L4
/// checksums are updated by hand (RFC 1624), the same way for pseudo-header fields.
/// (A CHECKSUM_PARTIAL skb from a veth peer in the same machine holds only the
/// pseudo-header sum, which this would corrupt: the lab's "world" sends with
/// checksum offload off, as a host on a real wire does.)
impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn pull(&self, _len: u32) -> Result<(), ()> {
        Ok(()) // already linear
    }

    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Result<T, ()> {
        Packet::load(self, offset)
    }

    #[inline(always)]
    fn set_tunnel(&self, _remote_ipv4: u32, _vni: u32) -> Result<(), ()> {
        Err(()) // no skb to carry tunnel metadata: the TC program encapsulates
    }

    #[inline(always)]
    fn tunnel_key(&self) -> Result<TunnelKey, ()> {
        Err(())
    }

    #[inline(always)]
    fn is_gso(&self) -> bool {
        false
    }

    #[inline(always)]
    fn truncate(&self, len: u32) -> Result<(), ()> {
        let delta = len as i32 - Packet::len(self) as i32;
        match unsafe { bpf_xdp_adjust_tail(self.ctx, delta) } {
            0 => Ok(()),
            _ => Err(()),
        }
    }

    #[inline(always)]
    fn replace_l4_csum(
        &self,
        csum_offset: usize,
        from: u32,
        to: u32,
        _size: u8,
        _pseudo: bool,
        udp: bool,
    ) -> Result<(), ()> {
        let check: u16 = self.load(csum_offset)?;
        if udp && check == 0 {
            return Ok(()); // UDP without a checksum stays without one
        }
        // A 16-bit value (a port) sits in the low half of `from`/`to`: the upper
        // halves are zero on both sides and cancel out.
        let mut updated = crate::csum::replace4(check, from, to);
        if udp && updated == 0 {
            updated = 0xffff; // 0 would mean "no checksum"
        }
        self.store(csum_offset, &updated)
    }
}

/// The context of an explain run (`ferrite explain`, see `trace`): the same packet
/// access as `C`'s, but [`Packet::explain`] is true, so the shared logic, compiled
/// again for it, skips every write and notes it in the trace. Only the never-attached
/// `ferrite_explain_*` programs use it.
pub struct Explaining<C>(pub C);

impl<C: EbpfContext> EbpfContext for Explaining<C> {
    #[inline(always)]
    fn as_ptr(&self) -> *mut core::ffi::c_void {
        self.0.as_ptr()
    }
}

/// The methods an explain run's context takes from its own context as they are.
macro_rules! packet_access_of_the_context {
    () => {
        #[inline(always)]
        fn data(&self) -> usize {
            Packet::data(&self.0)
        }

        #[inline(always)]
        fn data_end(&self) -> usize {
            Packet::data_end(&self.0)
        }

        #[inline(always)]
        fn len(&self) -> u32 {
            Packet::len(&self.0)
        }

        #[inline(always)]
        fn ifindex(&self) -> u32 {
            Packet::ifindex(&self.0)
        }

        #[inline(always)]
        fn pull(&self, len: u32) -> Result<(), ()> {
            self.0.pull(len)
        }

        #[inline(always)]
        fn read<T: Copy>(&self, offset: usize) -> Result<T, ()> {
            self.0.read(offset)
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
            self.0
                .replace_l4_csum(csum_offset, from, to, size, pseudo, udp)
        }

        #[inline(always)]
        fn set_tunnel(&self, remote_ipv4: u32, vni: u32) -> Result<(), ()> {
            self.0.set_tunnel(remote_ipv4, vni)
        }

        #[inline(always)]
        fn truncate(&self, len: u32) -> Result<(), ()> {
            self.0.truncate(len)
        }

        #[inline(always)]
        fn is_gso(&self) -> bool {
            self.0.is_gso()
        }

        #[inline(always)]
        fn explain(&self) -> bool {
            true
        }
    };
}

impl Explaining<TcContext> {
    /// The run's word (`ferrite_common::explain`: magic and nonce): its skb mark.
    #[inline(always)]
    pub fn word(&self) -> u32 {
        unsafe { (*self.0.skb.skb).mark }
    }
}

impl Packet for Explaining<TcContext> {
    packet_access_of_the_context!();

    /// A test run has no tunnel metadata: the run brings the key its packet would
    /// have arrived with in its control block (VNI, then the remote, host order).
    #[inline(always)]
    fn tunnel_key(&self) -> Result<TunnelKey, ()> {
        let cb = unsafe { (*self.0.skb.skb).cb };
        Ok(TunnelKey {
            vni: cb[0],
            remote_ipv4: cb[1],
        })
    }
}

impl Explaining<XdpContext> {
    /// The run's word: the first word of its XDP metadata (0 without).
    #[inline(always)]
    pub fn word(&self) -> u32 {
        let meta = self.0.metadata();
        if meta + ferrite_common::explain::XDP_METADATA_LEN > XdpContext::data(&self.0) {
            return 0;
        }
        unsafe { *(meta as *const u32) }
    }
}

impl Packet for Explaining<XdpContext> {
    packet_access_of_the_context!();

    #[inline(always)]
    fn tunnel_key(&self) -> Result<TunnelKey, ()> {
        self.0.tunnel_key()
    }
}
