//! `ferrite monitor`'s events (`ferrite_events`): drops and new Service flows,
//! written only while the agent's `ferrite_monitor` entry says someone listens for
//! their kind, so with no monitor a drop or a new flow costs one array lookup more
//! and builds nothing.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use ferrite_common::{monitor, stat, MonitorEvent, PROTO_TCP, PROTO_UDP};

use crate::{
    headers::Headers,
    maps::{EVENTS, MONITOR},
    packet::Packet,
    stats,
};

/// A packet's (or a socket call's) addresses, raw network order, and ports, host order.
#[derive(Clone, Copy, Default)]
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    #[inline(always)]
    pub fn of(h: &Headers) -> Self {
        Self {
            saddr: h.saddr,
            daddr: h.daddr,
            sport: h.sport,
            dport: h.dport,
            proto: h.proto,
        }
    }
}

/// Where an event was seen: the program (`monitor::program_index`), its device and
/// the packet's length (0 and 0 for socket programs).
#[derive(Clone, Copy)]
pub struct Seen {
    pub program: u8,
    pub ifindex: u32,
    pub len: u32,
}

impl Seen {
    #[inline(always)]
    pub fn packet<P: Packet>(pkt: &P, program: u8) -> Self {
        Self {
            program,
            ifindex: pkt.ifindex(),
            len: pkt.len(),
        }
    }
}

/// The backend a new flow was given (address raw network order, port host order;
/// `backend_id` 0 where the path does not know it).
#[derive(Clone, Copy, Default)]
pub struct FlowTarget {
    pub backend_address: u32,
    pub backend_port: u16,
    pub rev_nat_index: u32,
    pub backend_id: u32,
}

/// Whether a monitor listens for the events `want` (`monitor::WANT_*`).
#[inline(always)]
pub fn wanted(want: u32) -> bool {
    MONITOR.get(0).is_some_and(|wants| *wants & want != 0)
}

/// Report the drop of `pkt` counted under `reason`, if a monitor listens for drops.
#[inline(always)]
pub fn packet_dropped<P: Packet>(pkt: &P, seen: &Seen, reason: u32) {
    if wanted(monitor::WANT_DROPS) {
        write(
            monitor::KIND_DROP,
            seen,
            reason,
            &tuple(pkt),
            &FlowTarget::default(),
        );
    }
}

/// Report a refusal counted under `reason` that has no packet (a socket call).
#[inline(always)]
pub fn refused(seen: &Seen, reason: u32, tuple: &Tuple) {
    if wanted(monitor::WANT_DROPS) {
        write(
            monitor::KIND_DROP,
            seen,
            reason,
            tuple,
            &FlowTarget::default(),
        );
    }
}

/// Report a new Service flow counted under `counter`, if a monitor listens for flows.
#[inline(always)]
pub fn new_flow(seen: &Seen, counter: u32, tuple: &Tuple, target: &FlowTarget) {
    if wanted(monitor::WANT_FLOWS) {
        write(monitor::KIND_FLOW, seen, counter, tuple, target);
    }
}

/// The addresses and ports of a dropped packet, read again from the packet (it may
/// be malformed or not IPv4: whatever can be read, zero for the rest).
#[inline(always)]
fn tuple<P: Packet>(pkt: &P) -> Tuple {
    const ETH_P_IP: u16 = 0x0800;
    let mut tuple = Tuple::default();
    if pkt.load::<u16>(12).map(u16::from_be) != Ok(ETH_P_IP) {
        return tuple;
    }
    // One field at a time: a tuple of loads let the compiler mix a packet pointer
    // into arithmetic the verifier refuses.
    let Ok(addrs) = pkt.load::<[u32; 2]>(26) else {
        return tuple;
    };
    let Ok(proto) = pkt.load::<u8>(23) else {
        return tuple;
    };
    let Ok(fragment) = pkt.load::<u16>(20) else {
        return tuple;
    };
    let Ok(version_ihl) = pkt.load::<u8>(14) else {
        return tuple;
    };
    tuple.proto = proto;
    tuple.saddr = addrs[0];
    tuple.daddr = addrs[1];
    // Ports only where this packet carries them: TCP or UDP, not a later fragment,
    // behind a header of a possible length.
    let later_fragment = u16::from_be(fragment) & 0x1fff != 0;
    let ihl = (version_ihl & 0x0f) as usize;
    if (proto == PROTO_TCP || proto == PROTO_UDP) && !later_fragment && ihl >= 5 {
        let l4 = 14 + ihl * 4;
        if let Ok(ports) = pkt.load::<[u16; 2]>(l4) {
            tuple.sport = u16::from_be(ports[0]);
            tuple.dport = u16::from_be(ports[1]);
        }
    }
    tuple
}

#[inline(always)]
fn write(kind: u8, seen: &Seen, reason: u32, tuple: &Tuple, target: &FlowTarget) {
    // A full ring (the agent behind) loses the event: the monitor is best effort,
    // but the loss is counted.
    let Some(mut entry) = EVENTS.reserve(0) else {
        stats::count(stat::MONITOR_LOST, seen.len);
        return;
    };
    entry.write(MonitorEvent {
        time_ns: unsafe { bpf_ktime_get_ns() },
        kind,
        program: seen.program,
        proto: tuple.proto,
        _pad: 0,
        reason,
        ifindex: seen.ifindex,
        len: seen.len,
        saddr: tuple.saddr.to_ne_bytes(),
        daddr: tuple.daddr.to_ne_bytes(),
        sport: tuple.sport,
        dport: tuple.dport,
        backend_address: target.backend_address.to_ne_bytes(),
        backend_port: target.backend_port,
        _pad2: 0,
        rev_nat_index: target.rev_nat_index,
        backend_id: target.backend_id,
        _pad3: 0,
    });
    entry.submit(0);
}
