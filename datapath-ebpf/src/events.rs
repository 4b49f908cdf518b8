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

/// A packet's (or a socket call's) IPv4 addresses, raw network order, and ports,
/// host order.
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

/// An IPv6 socket call's addresses (network order) and ports (host order).
#[derive(Clone, Copy, Default)]
pub struct Tuple6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// What an event says about its packet or call, written straight into the ring's
/// entry (no copy of the event on the programs' stack).
pub trait Addresses {
    fn fill(&self, event: &mut MonitorEvent);
}

/// An IPv4 address in the event's 16 bytes: the first 4, the rest zero.
#[inline(always)]
fn wide(address: u32) -> [u8; 16] {
    let b = address.to_ne_bytes();
    [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

impl Addresses for Tuple {
    #[inline(always)]
    fn fill(&self, event: &mut MonitorEvent) {
        event.family = monitor::FAMILY_IPV4;
        event.proto = self.proto;
        event.saddr = wide(self.saddr);
        event.daddr = wide(self.daddr);
        event.sport = self.sport;
        event.dport = self.dport;
    }
}

impl Addresses for Tuple6 {
    #[inline(always)]
    fn fill(&self, event: &mut MonitorEvent) {
        event.family = monitor::FAMILY_IPV6;
        event.proto = self.proto;
        event.saddr = self.saddr;
        event.daddr = self.daddr;
        event.sport = self.sport;
        event.dport = self.dport;
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

impl Addresses for FlowTarget {
    #[inline(always)]
    fn fill(&self, event: &mut MonitorEvent) {
        event.backend_address = wide(self.backend_address);
        event.backend_port = self.backend_port;
        event.rev_nat_index = self.rev_nat_index;
        event.backend_id = self.backend_id;
    }
}

/// The IPv6 backend a new flow was given (an id of `ferrite_lb6_be`).
#[derive(Clone, Copy, Default)]
pub struct FlowTarget6 {
    pub backend_address: [u8; 16],
    pub backend_port: u16,
    pub rev_nat_index: u32,
    pub backend_id: u32,
}

impl Addresses for FlowTarget6 {
    #[inline(always)]
    fn fill(&self, event: &mut MonitorEvent) {
        event.backend_address = self.backend_address;
        event.backend_port = self.backend_port;
        event.rev_nat_index = self.rev_nat_index;
        event.backend_id = self.backend_id;
    }
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
        report_drop(pkt, seen, reason);
    }
}

/// A BPF subprogram of its own: reading either family's tuple takes stack that the
/// largest entries (`ferrite_from_pod`) have no room for in their own frame.
#[inline(never)]
fn report_drop<P: Packet>(pkt: &P, seen: &Seen, reason: u32) {
    write(
        monitor::KIND_DROP,
        seen,
        reason,
        &PacketTuple(pkt),
        &NoTarget,
    );
}

/// Report a refusal counted under `reason` that has no packet (a socket call).
#[inline(always)]
pub fn refused(seen: &Seen, reason: u32, tuple: &impl Addresses) {
    if wanted(monitor::WANT_DROPS) {
        write(monitor::KIND_DROP, seen, reason, tuple, &NoTarget);
    }
}

/// Report a new Service flow counted under `counter`, if a monitor listens for flows.
#[inline(always)]
pub fn new_flow(seen: &Seen, counter: u32, tuple: &impl Addresses, target: &impl Addresses) {
    if wanted(monitor::WANT_FLOWS) {
        write(monitor::KIND_FLOW, seen, counter, tuple, target);
    }
}

/// Drops name no backend.
struct NoTarget;

impl Addresses for NoTarget {
    #[inline(always)]
    fn fill(&self, _: &mut MonitorEvent) {}
}

/// The addresses and ports of a dropped packet, read again from the packet (it may
/// be malformed or not IP: whatever can be read, zero for the rest).
struct PacketTuple<'a, P>(&'a P);

impl<P: Packet> Addresses for PacketTuple<'_, P> {
    #[inline(always)]
    fn fill(&self, event: &mut MonitorEvent) {
        const ETH_P_IP: u16 = 0x0800;
        const ETH_P_IPV6: u16 = 0x86dd;
        match self.0.load::<u16>(12).map(u16::from_be) {
            Ok(ETH_P_IP) => ipv4_tuple(self.0, event),
            Ok(ETH_P_IPV6) => ipv6_tuple(self.0, event),
            _ => {}
        }
    }
}

#[inline(always)]
fn ipv4_tuple<P: Packet>(pkt: &P, event: &mut MonitorEvent) {
    // One field at a time: a tuple of loads let the compiler mix a packet pointer
    // into arithmetic the verifier refuses.
    let Ok(addrs) = pkt.load::<[u32; 2]>(26) else {
        return;
    };
    let Ok(proto) = pkt.load::<u8>(23) else {
        return;
    };
    let Ok(fragment) = pkt.load::<u16>(20) else {
        return;
    };
    let Ok(version_ihl) = pkt.load::<u8>(14) else {
        return;
    };
    event.family = monitor::FAMILY_IPV4;
    event.proto = proto;
    event.saddr = wide(addrs[0]);
    event.daddr = wide(addrs[1]);
    // Ports only where this packet carries them: TCP or UDP, not a later fragment,
    // behind a header of a possible length.
    let later_fragment = u16::from_be(fragment) & 0x1fff != 0;
    let ihl = (version_ihl & 0x0f) as usize;
    if (proto == PROTO_TCP || proto == PROTO_UDP) && !later_fragment && ihl >= 5 {
        let l4 = 14 + ihl * 4;
        if let Ok(ports) = pkt.load::<[u16; 2]>(l4) {
            event.sport = u16::from_be(ports[0]);
            event.dport = u16::from_be(ports[1]);
        }
    }
}

/// An IPv6 packet's addresses, next header, and ports when TCP or UDP follows the
/// fixed header directly (extension headers are not walked here: ports 0 then).
#[inline(always)]
fn ipv6_tuple<P: Packet>(pkt: &P, event: &mut MonitorEvent) {
    const FIXED_HEADER_END: usize = 14 + 40;
    let Ok(saddr) = pkt.load::<[u8; 16]>(22) else {
        return;
    };
    let Ok(daddr) = pkt.load::<[u8; 16]>(38) else {
        return;
    };
    let Ok(next_header) = pkt.load::<u8>(20) else {
        return;
    };
    event.family = monitor::FAMILY_IPV6;
    event.proto = next_header;
    event.saddr = saddr;
    event.daddr = daddr;
    if next_header == PROTO_TCP || next_header == PROTO_UDP {
        if let Ok(ports) = pkt.load::<[u16; 2]>(FIXED_HEADER_END) {
            event.sport = u16::from_be(ports[0]);
            event.dport = u16::from_be(ports[1]);
        }
    }
}

#[inline(always)]
fn write(kind: u8, seen: &Seen, reason: u32, tuple: &impl Addresses, target: &impl Addresses) {
    // A full ring (the agent behind) loses the event: the monitor is best effort,
    // but the loss is counted.
    let Some(mut entry) = EVENTS.reserve(0) else {
        stats::count(stat::MONITOR_LOST, seen.len);
        return;
    };
    // Zero first: reserved ring memory holds whatever was there before.
    let event = entry.write(MonitorEvent {
        time_ns: unsafe { bpf_ktime_get_ns() },
        kind,
        program: seen.program,
        reason,
        ifindex: seen.ifindex,
        len: seen.len,
        ..MonitorEvent::default()
    });
    tuple.fill(event);
    target.fill(event);
    entry.submit(0);
}
