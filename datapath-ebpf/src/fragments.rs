//! IPv4 fragments of TCP/UDP datagrams, as Cilium tracks them: only the first
//! fragment carries the ports, so it records them in the LRU `ferrite_frags` under
//! the datagram's (source, destination, protocol, identification); later fragments
//! take them from there and follow their flow (conntrack, Service translation of the
//! addresses; the ports and L4 checksum live in the first fragment only). A later
//! fragment whose first one was not seen (reordered, or evicted) has no ports and is
//! routed by destination only (`fragment_routed`).
use ferrite_common::{stat, FragmentKey, FragmentPorts};

use crate::{maps::FRAGMENTS, trace::count};

#[inline(always)]
fn key(saddr: u32, daddr: u32, id: [u8; 2], proto: u8) -> FragmentKey {
    FragmentKey {
        saddr: saddr.to_ne_bytes(),
        daddr: daddr.to_ne_bytes(),
        id,
        proto,
        _pad: 0,
    }
}

/// A first fragment: remember its ports for the rest of its datagram.
#[inline(always)]
pub fn remember(saddr: u32, daddr: u32, id: [u8; 2], proto: u8, sport: u16, dport: u16) {
    let ports = FragmentPorts { sport, dport };
    // Full (LRU) or failing: later fragments are then routed untranslated.
    let _ = FRAGMENTS.insert(key(saddr, daddr, id, proto), ports, 0);
}

/// A later fragment: the ports of its datagram, if its first fragment was seen.
#[inline(always)]
pub fn ports_of(
    saddr: u32,
    daddr: u32,
    id: [u8; 2],
    proto: u8,
    len: u32,
    explain: bool,
) -> Option<(u16, u16)> {
    let ports = unsafe { FRAGMENTS.get(key(saddr, daddr, id, proto)) }?;
    count(explain, stat::FRAGMENT_TRACKED, len);
    Some((ports.sport, ports.dport))
}
