//! Service-flow conntrack in the LRU map `ferrite_ct`: the forward entry pins a flow
//! to its backend, the reply entry says how to reverse-NAT the backend's answers.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use ferrite_common::{CtKey, CtValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, PROTO_TCP};

use crate::{
    headers::{Headers, TCP_FLAG_FIN, TCP_FLAG_RST},
    maps::CONNTRACK,
};

#[inline(always)]
pub fn key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, direction: u8) -> CtKey {
    CtKey {
        saddr: saddr.to_ne_bytes(),
        daddr: daddr.to_ne_bytes(),
        sport,
        dport,
        proto,
        direction,
        _pad: 0,
    }
}

#[inline(always)]
pub fn forward_key(h: &Headers) -> CtKey {
    key(h.saddr, h.daddr, h.sport, h.dport, h.proto, CT_DIR_FORWARD)
}

#[inline(always)]
pub fn reply_key(h: &Headers) -> CtKey {
    key(h.saddr, h.daddr, h.sport, h.dport, h.proto, CT_DIR_REPLY)
}

/// Look an entry up and account this packet to it.
#[inline(always)]
pub fn lookup_and_touch(key: &CtKey, h: &Headers, bytes: u32) -> Option<CtValue> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // Racy adds from several CPUs may lose a count; these are statistics only.
    unsafe {
        (*entry).last_seen_ns = bpf_ktime_get_ns();
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
    let now = unsafe { bpf_ktime_get_ns() };
    let value = CtValue {
        backend_id,
        rev_nat_index,
        flags: 0,
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: bytes as u64,
    };
    let reply = key(
        backend_addr,
        h.saddr,
        backend_port,
        h.sport,
        h.proto,
        CT_DIR_REPLY,
    );
    // Reply entry first: a forward entry must never exist without its reverse path.
    CONNTRACK
        .insert(
            reply,
            CtValue {
                packets: 0,
                bytes: 0,
                ..value
            },
            0,
        )
        .map_err(|_| ())?;
    CONNTRACK.insert(forward_key(h), value, 0).map_err(|_| ())
}
