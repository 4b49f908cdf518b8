//! Service-flow conntrack in the LRU map `ferrite_ct`: the forward entry pins a flow
//! to its backend (and caches it), the reply entry says how to reverse-NAT the
//! backend's answers. One lookup per packet finds either.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use ferrite_common::{CtKey, CtValue, CT_FLAG_CLOSING, CT_FLAG_REPLY, PROTO_TCP};

use crate::{
    headers::{Headers, TCP_FLAG_FIN, TCP_FLAG_RST},
    maps::CONNTRACK,
};

#[inline(always)]
fn key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey {
        saddr: saddr.to_ne_bytes(),
        daddr: daddr.to_ne_bytes(),
        sport,
        dport,
        proto,
        _pad: [0; 3],
    }
}

/// The entry of the flow `h` belongs to (either direction), with this packet
/// accounted to it.
#[inline(always)]
pub fn lookup_and_touch(h: &Headers, bytes: u32) -> Option<CtValue> {
    let entry = CONNTRACK.get_ptr_mut(key(h.saddr, h.daddr, h.sport, h.dport, h.proto))?;
    // Racy adds from several CPUs may lose a count; these are statistics only.
    unsafe {
        (*entry).last_seen_ns = bpf_ktime_get_coarse_ns();
        (*entry).packets += 1;
        (*entry).bytes += bytes as u64;
        if h.proto == PROTO_TCP && h.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
            (*entry).flags |= CT_FLAG_CLOSING;
        }
        Some(*entry)
    }
}

/// Record a new Service flow: `h` is the client's packet before DNAT, the backend is
/// `backend_addr:backend_port`.
#[inline(always)]
pub fn create(
    h: &Headers,
    backend_id: u32,
    backend_addr: u32,
    backend_port: u16,
    rev_nat_index: u16,
    bytes: u32,
) -> Result<(), ()> {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let forward = CtValue {
        backend_id,
        rev_nat_index,
        flags: 0,
        backend_address: backend_addr.to_ne_bytes(),
        backend_port,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: bytes as u64,
    };
    let reply = CtValue {
        flags: CT_FLAG_REPLY,
        packets: 0,
        bytes: 0,
        ..forward
    };
    let reply_key = key(backend_addr, h.saddr, backend_port, h.sport, h.proto);
    // Reply entry first: a forward entry must never exist without its reverse path.
    CONNTRACK.insert(reply_key, reply, 0).map_err(|_| ())?;
    CONNTRACK
        .insert(key(h.saddr, h.daddr, h.sport, h.dport, h.proto), forward, 0)
        .map_err(|_| ())
}
