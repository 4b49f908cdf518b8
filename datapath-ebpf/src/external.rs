//! Traffic from outside the cluster to NodePort, LoadBalancer and externalIP
//! frontends, seen by XDP on the node's uplink before the stack (or, on an uplink
//! without XDP, by the same logic at its tcx ingress). Rules:
//! - anything that is not IPv4 TCP/UDP with ports, or not addressed to an external
//!   frontend, passes untouched and uncounted (it is the node's own traffic: ARP,
//!   IPv6, the overlay's VXLAN datagrams, SSH, fragments);
//! - a client outside a frontend's `loadBalancerSourceRanges` is dropped
//!   (`drop_source_range`);
//! - no backend: `externalTrafficPolicy: Local` drops (`drop_no_local_backend`); a
//!   NodePort passes to the stack, which refuses it with a TCP RST or an ICMP port
//!   unreachable, as kube-proxy's REJECT does (`nodeport_rejected`); a LoadBalancer or
//!   externalIP drops (`drop_no_backend`);
//! - a packet of an external flow (new or established) larger than `pod_mtu` with DF
//!   set is answered with ICMP "fragmentation needed" (`icmp_frag_needed`), as the
//!   router in front of the pods would: XDP passes it untouched and the uplink's TC
//!   program sends the answer (XDP_TX into a veth uplink needs its peer set up for
//!   XDP; a TC redirect does not). Without DF it is forwarded (fragmented on the way,
//!   or taken whole by the pod);
//! - replies to the node's own Service flows whose backend is another node's address
//!   are translated back at tcx ingress (the XDP program leaves them alone);
//! - a backend on this node whose NetworkPolicy does not admit the client (its
//!   address, the target port) drops the new flow (`drop_policy_ingress`), before the
//!   pod sees it; an admitted flow's replies are judged as its answers;
//! - a backend on this node: DNAT only (the client IP is kept); on another node: DNAT
//!   and SNAT to this node's IP and a free port of its SNAT range, so the reply comes
//!   back here. Both pass on translated: the uplink's TC program delivers them to the
//!   pod or through the overlay (XDP cannot attach tunnel metadata).
use aya_ebpf::btf_maps::lpm_trie::Key;
use ferrite_common::{
    explain::write, stat, svc_flag, SourceRangeKey, CT_FLAG_EXTERNAL, CT_FLAG_REPLY, CT_FLAG_SNAT,
    PROTO_UDP, SOURCE_RANGE_FRONTEND_BITS,
};

use crate::{
    conntrack::{self, NewFlow},
    events::{self, FlowTarget, Seen, Tuple},
    headers::{parse, Headers, Parsed},
    icmp, lb,
    maps::{CONFIG, SOURCE_RANGES},
    nat,
    packet::{Packet, Verdict},
    policy, routing,
    stats::count_lb,
    trace::{self, count},
};

#[inline(always)]
fn source_allowed(h: &Headers) -> bool {
    let key = SourceRangeKey {
        frontend: lb::service_key(h, 0),
        network: h.saddr.to_ne_bytes(),
    };
    let key = Key::new(SOURCE_RANGE_FRONTEND_BITS + 32, key);
    SOURCE_RANGES.get(&key).is_some()
}

/// The pod MTU, if `h` is a packet pods cannot take whole (DF set, larger) of an
/// external flow: established, or new to an external frontend that admits the client.
#[inline(always)]
pub fn frag_needed_mtu(h: &Headers) -> Option<u16> {
    let mtu = CONFIG.get(0).map(|c| c.pod_mtu).unwrap_or(0);
    if !icmp::too_big_for(h, mtu) {
        return None;
    }
    if let Some(ct) = conntrack::lookup(h) {
        if ct.flags & (CT_FLAG_EXTERNAL | CT_FLAG_REPLY) == CT_FLAG_EXTERNAL {
            return Some(mtu);
        }
    }
    let svc = lb::lookup_service(h)?;
    let admitted = svc.flags & svc_flag::SOURCE_RANGES == 0 || source_allowed(h);
    (svc.flags & svc_flag::EXTERNAL != 0 && admitted).then_some(mtu)
}

/// The overlay's own datagrams (to this node's VXLAN port): never external traffic.
#[inline(always)]
pub fn is_overlay(h: &Headers) -> bool {
    h.proto == PROTO_UDP && CONFIG.get(0).is_some_and(|c| h.dport == c.vxlan_port)
}

/// Balance a packet of the world to an external frontend (the XDP program's logic,
/// also run by the uplink's tcx program where the uplink has no XDP): translated
/// packets pass on, for the uplink's tcx program to forward.
#[inline(always)]
/// `program`: the entry's `monitor::program_index`, for the new flows it reports.
pub fn balance<P: Packet>(pkt: &P, program: u8) -> Result<Verdict, ()> {
    let h = match parse(pkt) {
        Parsed::Ipv4(h) if h.has_ports && !is_overlay(&h) => h,
        _ => return Ok(Verdict::Pass),
    };
    if frag_needed_mtu(&h).is_some() {
        return Ok(Verdict::Pass); // answered by the uplink's tcx program
    }
    if let Some(ct) = conntrack::lookup_and_touch(&h, pkt.len()) {
        if ct.flags & (CT_FLAG_EXTERNAL | CT_FLAG_REPLY) == CT_FLAG_EXTERNAL {
            nat::dnat(
                pkt,
                &h,
                u32::from_ne_bytes(ct.backend_address),
                ct.backend_port,
            )?;
            if ct.flags & CT_FLAG_SNAT != 0 {
                nat::snat(pkt, &h, u32::from_ne_bytes(ct.nat_address), ct.nat_port)?;
            }
            count(h.explain, stat::SERVICE_ESTABLISHED, pkt.len());
            return Ok(Verdict::Pass);
        }
    }
    let Some(svc) = lb::lookup_service(&h) else {
        return Ok(Verdict::Pass);
    };
    if svc.flags & svc_flag::EXTERNAL == 0 {
        return Ok(Verdict::Pass);
    }
    if svc.flags & svc_flag::SOURCE_RANGES != 0 && !source_allowed(&h) {
        return Ok(Verdict::Drop(stat::DROP_SOURCE_RANGE));
    }
    let Some(chosen) = lb::choose_backend(&h, lb::service_key(&h, 0), &svc, true) else {
        if svc.flags & svc_flag::LOCAL_ONLY != 0 {
            return Ok(Verdict::Drop(stat::DROP_NO_LOCAL_BACKEND));
        }
        if svc.flags & svc_flag::NODE_PORT != 0 {
            count(h.explain, stat::NODEPORT_REJECTED, pkt.len());
            return Ok(Verdict::Pass);
        }
        return Ok(Verdict::Drop(stat::DROP_NO_BACKEND));
    };
    let backend_addr = u32::from_ne_bytes(chosen.backend.address);
    let flow = NewFlow {
        backend_id: chosen.id,
        backend_addr,
        backend_port: chosen.backend.port,
        rev_nat_index: svc.rev_nat_index,
        flags: CT_FLAG_EXTERNAL,
    };
    let local =
        svc.flags & svc_flag::LOCAL_ONLY != 0 || routing::local_endpoint(backend_addr).is_some();
    if local {
        // Judged before delivery as the backend receives it: from the client's
        // address, to its target port (a remote backend's node judges the flow,
        // SNATed to this node, as kube-proxy's).
        let verdict = policy::verdict(h.saddr, backend_addr, h.proto, chosen.backend.port);
        if let Some(reason) = policy::denied(verdict) {
            return Ok(Verdict::Drop(reason));
        }
    }
    // A local backend whose reply tuple to this client is taken (the client port
    // reached it through another frontend) is SNATed like a remote one.
    if local && conntrack::create(&h, &flow, pkt.len())? {
        nat::dnat(pkt, &h, backend_addr, chosen.backend.port)?;
    } else {
        let node_addr = CONFIG
            .get(0)
            .map(|c| u32::from_ne_bytes(c.node_ip))
            .ok_or(())?;
        let Some(port) = conntrack::create_snat(&h, &flow, node_addr, lb::flow_hash(&h), pkt.len())
        else {
            return Ok(Verdict::Drop(stat::DROP_NO_SNAT_PORT));
        };
        nat::dnat(pkt, &h, backend_addr, chosen.backend.port)?;
        nat::snat(pkt, &h, node_addr, port)?;
        count(h.explain, stat::EXTERNAL_SNAT, pkt.len());
    }
    count(h.explain, stat::EXTERNAL_NEW_FLOW, pkt.len());
    if trace::writes(h.explain, write::LB_STATS) {
        count_lb(svc.rev_nat_index, chosen.id, pkt.len());
    }
    if trace::writes(h.explain, write::MONITOR_EVENT) {
        events::new_flow(
            &Seen::packet(pkt, program),
            stat::EXTERNAL_NEW_FLOW,
            &Tuple::of(&h),
            &FlowTarget {
                backend_address: backend_addr,
                backend_port: chosen.backend.port,
                rev_nat_index: svc.rev_nat_index,
                backend_id: chosen.id,
            },
        );
    }
    Ok(Verdict::Pass)
}
