//! Service load balancing: frontend lookup, backend choice (conntrack first, then a
//! hash of the 5-tuple so a flow always lands on the same backend), DNAT.
use ferrite_common::{stat, Backend, ServiceKey, ServiceValue};

use crate::{
    conntrack,
    headers::Headers,
    maps::{BACKENDS, SERVICES},
    nat,
    packet::Packet,
    stats::{count, count_lb},
};

#[inline(always)]
fn service_key(h: &Headers, backend_slot: u16) -> ServiceKey {
    ServiceKey {
        address: h.daddr.to_ne_bytes(),
        port: h.dport,
        proto: h.proto,
        _pad: 0,
        backend_slot,
        _pad2: 0,
    }
}

/// The master entry of the Service `h` is addressed to, if any.
#[inline(always)]
pub fn lookup_service(h: &Headers) -> Option<ServiceValue> {
    unsafe { SERVICES.get(service_key(h, 0)).copied() }
}

/// lowbias32 over the 5-tuple: cheap and well mixed, so flows spread evenly.
#[inline(always)]
fn flow_hash(h: &Headers) -> u32 {
    let mut x = h.saddr
        ^ h.daddr.rotate_left(16)
        ^ (((h.sport as u32) << 16) | h.dport as u32)
        ^ h.proto as u32;
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// DNAT the first packet of a new flow to a Service: pick a backend, record the
/// flow. Returns the new destination address, or `None` when the Service has no
/// ready backend (the caller drops it as `drop_no_backend`).
#[inline(always)]
pub fn translate_new_flow<P: Packet>(
    pkt: &P,
    h: &Headers,
    svc: &ServiceValue,
) -> Result<Option<u32>, ()> {
    if svc.count == 0 {
        return Ok(None);
    }
    let slot = (flow_hash(h) % svc.count as u32) as u16 + 1;
    let Some(slot_value) = (unsafe { SERVICES.get(service_key(h, slot)) }) else {
        // The agent writes slots before the master entry; a miss is a torn update.
        return Ok(None);
    };
    let backend_id = slot_value.backend_id;
    let Some(backend) = (unsafe { BACKENDS.get(backend_id) }) else {
        return Ok(None);
    };
    let backend: Backend = *backend;
    let addr = u32::from_ne_bytes(backend.address);
    conntrack::create(
        h,
        backend_id,
        addr,
        backend.port,
        svc.rev_nat_index,
        pkt.len(),
    )?;
    nat::dnat(pkt, h, addr, backend.port)?;
    count(stat::SERVICE_NEW_FLOW, pkt.len());
    count_lb(svc.rev_nat_index, backend_id, pkt.len());
    Ok(Some(addr))
}
