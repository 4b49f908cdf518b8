//! Service-flow conntrack in the LRU map `ferrite_ct`: the forward entry pins a flow
//! to its backend (and caches it), the reply entry says how to reverse-NAT the
//! backend's answers. One lookup per packet finds either. Flows between pods that
//! the host stack forwarded (and netfilter may have translated: hostPorts) have one
//! entry, under their reply tuple, sending the answers back through the stack.
use core::ptr::NonNull;

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_jiffies64};
use ferrite_common::{
    explain::{step, write},
    stat, CtKey, CtValue, CT_FLAG_CLOSING, CT_FLAG_POLICY, CT_FLAG_REPLY, CT_FLAG_SNAT,
    CT_FLAG_UNESTABLISHED, CT_FLAG_VIA_STACK, CT_ROUTE_STACK, PROTO_TCP, REV_NAT_NONE,
    SNAT_PORT_MAX, SNAT_PORT_MIN,
};

use crate::{
    headers::{Headers, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN},
    icmp::Quoted,
    maps::{CONNTRACK, REV_NAT},
    trace::{self, count},
};

#[inline(always)]
fn key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey {
        saddr: saddr.to_ne_bytes(),
        daddr: daddr.to_ne_bytes(),
        sport,
        dport,
        proto,
        _pad: 0,
        _pad2: 0,
    }
}

/// The entry of the flow `h` belongs to (either direction), left as it is.
#[inline(always)]
pub fn lookup(h: &Headers) -> Option<&'static CtValue> {
    unsafe { CONNTRACK.get(key(h.saddr, h.daddr, h.sport, h.dport, h.proto)) }
}

/// Whether the answers of the flow `h` belongs to have an entry: a flow a frontend
/// translated to this destination has one (recorded when it was balanced) but none
/// under the translated tuple it arrives with.
#[inline(always)]
pub fn has_reply_entry(h: &Headers) -> bool {
    unsafe { CONNTRACK.get(key(h.daddr, h.saddr, h.dport, h.sport, h.proto)) }.is_some()
}

/// The entry an ICMP error about the packet `quoted` belongs to: the error travels
/// the way back, so the quoted tuple reversed is its flow's reply tuple (Cilium's
/// related lookup). Left as it is: an error does not keep a flow alive. In place, for
/// the policy verdict it may cache (see `find`).
#[inline(always)]
pub fn lookup_related(quoted: &Quoted) -> Option<NonNull<CtValue>> {
    let reverse = key(
        quoted.daddr,
        quoted.saddr,
        quoted.dport,
        quoted.sport,
        quoted.proto,
    );
    CONNTRACK.get_ptr_mut(reverse).and_then(NonNull::new)
}

/// `CT_FLAG_UNESTABLISHED` for a new flow of `h`'s protocol: every TCP flow starts
/// without a completed handshake.
#[inline(always)]
fn handshake_pending(h: &Headers) -> u16 {
    if h.proto == PROTO_TCP {
        CT_FLAG_UNESTABLISHED
    } else {
        0
    }
}

/// Whether the reply tuple of `h` (a pod's packet to no Service) is already the reply
/// entry of a live Service flow: the same client port reached that backend through a
/// Service. Its answers would be reverse-NATed to the Service address. Or of a live
/// flow the stack forwarded (`CT_FLAG_VIA_STACK`: the same client port reached that
/// pod through a hostPort), whose answers go through the stack's NAT. A closing
/// flow's tuple is taken over instead (see [`reopen_if_closing`]).
#[inline(always)]
pub fn clashes_with_service_reply(h: &Headers) -> bool {
    let reverse = key(h.daddr, h.saddr, h.dport, h.sport, h.proto);
    unsafe { CONNTRACK.get(reverse) }
        .is_some_and(|ct| ct.flags & (CT_FLAG_REPLY | CT_FLAG_VIA_STACK) != 0)
        && !reopen_if_closing(h, &reverse)
}

/// The forward key of the flow whose reply entry is `reply` under `reply_key`: its
/// client as it sent (before any port remap) and the frontend it asked for.
#[inline(always)]
fn forward_key_of(reply_key: &CtKey, reply: &CtValue) -> Option<CtKey> {
    let (client, client_port) = if reply.flags & CT_FLAG_SNAT != 0 {
        (u32::from_ne_bytes(reply.nat_address), reply.nat_port)
    } else {
        (u32::from_ne_bytes(reply_key.daddr), reply_key.dport)
    };
    let (frontend, frontend_port) = if reply.rev_nat_index == REV_NAT_NONE {
        (u32::from_ne_bytes(reply_key.saddr), reply_key.sport)
    } else {
        let rev = unsafe { REV_NAT.get(reply.rev_nat_index) }?;
        (u32::from_ne_bytes(rev.address), rev.port)
    };
    Some(key(
        client,
        frontend,
        client_port,
        frontend_port,
        reply_key.proto,
    ))
}

/// A new TCP connection (SYN `h`) whose reply tuple a closing connection still holds
/// (a FIN or RST was seen) reopens the tuple, as Linux conntrack does: the old flow's
/// entries are removed and the caller records the new one. Remapping the port instead
/// would fill the SNAT range with the leftovers of short connections until garbage
/// collection, and starve new ones (`drop_no_snat_port`). Returns whether it did.
#[inline(always)]
pub fn reopen_if_closing(h: &Headers, reply_key: &CtKey) -> bool {
    if !h.is_tcp_syn() {
        return false;
    }
    let Some(old) = (unsafe { CONNTRACK.get(reply_key) }).copied() else {
        return false;
    };
    if old.flags & CT_FLAG_VIA_STACK != 0 {
        // A finished flow the stack forwarded: its one entry goes (netfilter's own
        // leftovers never see the new flow, which does not pass through the stack).
        if old.flags & CT_FLAG_CLOSING == 0 {
            return false;
        }
        if trace::writes(h.explain, write::CT_REOPEN) {
            let _ = CONNTRACK.remove(reply_key);
        }
        count(h.explain, stat::CT_REOPENED, 0);
        return true;
    }
    if old.flags & CT_FLAG_REPLY == 0 {
        return false;
    }
    let forward = forward_key_of(reply_key, &old);
    let forward_closing = forward
        .and_then(|k| unsafe { CONNTRACK.get(k) })
        .is_some_and(|f| f.flags & CT_FLAG_CLOSING != 0);
    if old.flags & CT_FLAG_CLOSING == 0 && !forward_closing {
        return false;
    }
    if trace::writes(h.explain, write::CT_REOPEN) {
        if let Some(forward) = forward {
            // Gone already (LRU, GC) is as good as removed.
            let _ = CONNTRACK.remove(forward);
        }
        let _ = CONNTRACK.remove(reply_key);
    }
    count(h.explain, stat::CT_REOPENED, 0);
    true
}

/// The entry of the flow `h` belongs to (either direction), with this packet
/// accounted to it.
#[inline(always)]
pub fn lookup_and_touch(h: &Headers, bytes: u32) -> Option<&'static CtValue> {
    find(h).map(|entry| touch(entry, h, bytes))
}

/// The entry of the flow `h` belongs to (either direction), in place, untouched.
/// (`NonNull`: an `Option` of a raw pointer leaves its payload undefined when `None`,
/// and the compiler may then copy a register the verifier counts as unread.)
#[inline(always)]
pub fn find(h: &Headers) -> Option<NonNull<CtValue>> {
    find_with_ports(h, h.sport, h.dport)
}

/// [`find`] for a packet `h` without ports whose tuple has `sport` and `dport` in
/// their place (an ICMP echo's identifier, see `icmp::echo_ports`).
#[inline(always)]
pub fn find_with_ports(h: &Headers, sport: u16, dport: u16) -> Option<NonNull<CtValue>> {
    let found = CONNTRACK
        .get_ptr_mut(key(h.saddr, h.daddr, sport, dport, h.proto))
        .and_then(NonNull::new);
    trace::record(h.explain, |trace| match found {
        Some(entry) => {
            trace.steps |= step::CT_HIT;
            trace.ct_flags = unsafe { entry.as_ref() }.flags;
        }
        None => trace.steps |= step::CT_MISS,
    });
    found
}

/// Account packet `h` (`bytes` long) to its entry; returns the entry, read in place
/// (a copy on the stack would cost 80 of the verifier's 512 bytes).
#[inline(always)]
pub fn touch(entry: NonNull<CtValue>, h: &Headers, bytes: u32) -> &'static CtValue {
    let entry = entry.as_ptr();
    if !trace::writes(h.explain, write::CT_ACCOUNTING) {
        return unsafe { &*entry };
    }
    // Racy adds from several CPUs may lose a count; these are statistics only.
    unsafe {
        // Jiffies change every few milliseconds: most packets leave the line alone.
        let now = bpf_jiffies64();
        if (*entry).last_seen_jiffies != now {
            (*entry).last_seen_jiffies = now;
        }
        (*entry).packets += 1;
        (*entry).bytes += bytes as u64;
        if h.proto == PROTO_TCP {
            if h.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
                (*entry).flags |= CT_FLAG_CLOSING;
            }
            // Established flows pay this test only.
            if (*entry).flags & CT_FLAG_UNESTABLISHED != 0
                && h.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_RST | TCP_FLAG_ACK) == TCP_FLAG_ACK
            {
                complete_handshake(entry, h);
            }
        }
        &*entry
    }
}

/// A segment with ACK and neither SYN nor RST from the client of the unestablished
/// TCP flow of `entry`: once the backend has answered (the flow's reply entry has
/// seen a packet), the handshake is complete and `CT_FLAG_UNESTABLISHED` leaves both
/// entries (the reply entry first: it is the one holding a SNAT port). The backend's
/// own packets complete nothing: it answers every SYN, spoofed ones too. A flow the
/// stack forwarded has one entry, touched both ways: such a segment completes it.
#[inline(always)]
fn complete_handshake(entry: *mut CtValue, h: &Headers) {
    // SAFETY: a value of `ferrite_ct` found by this packet's lookup (see `touch`).
    unsafe {
        let flags = (*entry).flags;
        if flags & CT_FLAG_VIA_STACK != 0 {
            (*entry).flags &= !CT_FLAG_UNESTABLISHED;
            return;
        }
        if flags & CT_FLAG_REPLY != 0 {
            return;
        }
        // The reply tuple as the flow recorded it (`create`, `create_snat`).
        let (peer, peer_port) = if flags & CT_FLAG_SNAT != 0 {
            (u32::from_ne_bytes((*entry).nat_address), (*entry).nat_port)
        } else {
            (h.saddr, h.sport)
        };
        let reply_key = key(
            u32::from_ne_bytes((*entry).backend_address),
            peer,
            (*entry).backend_port,
            peer_port,
            h.proto,
        );
        let Some(reply) = CONNTRACK.get_ptr_mut(reply_key) else {
            return;
        };
        if (*reply).packets == 0 {
            return;
        }
        (*reply).flags &= !CT_FLAG_UNESTABLISHED;
        (*entry).flags &= !CT_FLAG_UNESTABLISHED;
    }
}

/// Whether the flow's packets were checked, at route epoch `epoch`, to come from
/// `source` (`kind`: `CT_VERIFIED_*`).
#[inline(always)]
pub fn source_verified(entry: NonNull<CtValue>, kind: u8, source: u32, epoch: u32) -> bool {
    let ct = unsafe { entry.as_ref() };
    ct.cache_epoch == epoch && ct.verified_kind == kind && ct.verified_source == source
}

/// Record that this flow's packets come from `source` (checked at route epoch `epoch`).
#[inline(always)]
pub fn record_verified(entry: NonNull<CtValue>, kind: u8, source: u32, epoch: u32) {
    claim_epoch(entry, epoch);
    let entry = entry.as_ptr();
    unsafe {
        (*entry).verified_source = source;
        (*entry).verified_kind = kind;
    }
}

/// Make the entry's caches those of route epoch `epoch`: anything cached at another
/// epoch is forgotten. Packets of one flow on two CPUs across an epoch change may
/// interleave these writes; the caches are read only when their epoch is the
/// node's, and a writer only ever stores an epoch it read before resolving.
#[inline(always)]
pub fn claim_epoch(entry: NonNull<CtValue>, epoch: u32) {
    let entry = entry.as_ptr();
    unsafe {
        if (*entry).cache_epoch != epoch {
            (*entry).route_kind = 0;
            (*entry).verified_kind = 0;
            (*entry).policy_verdict = 0;
            (*entry).cache_epoch = epoch;
        }
    }
}

/// Record that the stack forwarded `h` between pods: a pod's packet that the stack
/// delivers to a pod of this node (seen at that pod's veth egress, which the
/// datapath's own deliveries never pass). Netfilter may have translated it (portmap
/// DNATs a hostPort on a node address to the pod) and only it can undo that, so the
/// entry under its reply tuple (`CT_FLAG_VIA_STACK`, its route cached as the stack's
/// at `epoch`) sends the answers through the stack instead of straight to the
/// client. The flow's packets both ways keep it alive; a new TCP connection on a
/// closing one's tuple opens it again. An entry of another kind under that tuple (a
/// Service flow's reply: the same client port reached the same pod through a
/// Service first) is left as it is.
#[inline(always)]
pub fn record_via_stack(h: &Headers, epoch: u32, bytes: u32) {
    let reply_key = key(h.daddr, h.saddr, h.dport, h.sport, h.proto);
    if let Some(entry) = CONNTRACK.get_ptr_mut(reply_key).and_then(NonNull::new) {
        let flags = unsafe { entry.as_ref() }.flags;
        if flags & CT_FLAG_VIA_STACK != 0 {
            touch(entry, h, bytes);
            if flags & CT_FLAG_CLOSING != 0
                && h.is_tcp_syn()
                && trace::writes(h.explain, write::CT_REOPEN)
            {
                unsafe { (*entry.as_ptr()).flags = CT_FLAG_VIA_STACK | CT_FLAG_UNESTABLISHED };
            }
        }
        return;
    }
    if !trace::writes(h.explain, write::CT_CREATE) {
        return;
    }
    let now = unsafe { bpf_jiffies64() };
    let entry = CtValue {
        backend_id: 0,
        rev_nat_index: REV_NAT_NONE,
        flags: CT_FLAG_VIA_STACK | handshake_pending(h),
        backend_address: h.daddr.to_ne_bytes(),
        backend_port: h.dport,
        nat_port: 0,
        nat_address: [0; 4],
        verified_source: 0,
        cache_epoch: epoch,
        route_target: 0,
        route_macs: [0; 12],
        route_kind: CT_ROUTE_STACK,
        verified_kind: 0,
        policy_verdict: 0,
        _pad: 0,
        _pad2: 0,
        _pad3: 0,
        created_jiffies: now,
        last_seen_jiffies: now,
        packets: 1,
        bytes: bytes as u64,
    };
    // Another CPU's packet of the flow may have made it first: as good.
    let _ = CONNTRACK.insert(reply_key, entry, BPF_NOEXIST as u64);
}

/// Record a flow between addresses (no Service) that a NetworkPolicy allowed
/// (`verdict`, cached at `epoch`): the forward entry under `h`'s tuple, and the
/// reply entry (`CT_FLAG_REPLY`, its reverse translation a no-op: the client in
/// `nat_address:nat_port` is where the replies go anyway), so the answers pass as
/// answers. Nothing is recorded if the reply tuple is another flow's.
#[inline(always)]
pub fn create_policed(h: &Headers, epoch: u32, verdict: u8, bytes: u32) {
    create_policed_with_ports(h, h.sport, h.dport, epoch, verdict, bytes);
}

/// [`create_policed`] for a packet `h` without ports whose tuple has `sport` and
/// `dport` in their place (an ICMP echo's identifier, see `icmp::echo_ports`); no
/// copy of `h` on the verifier's 512 bytes of stack.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn create_policed_with_ports(
    h: &Headers,
    sport: u16,
    dport: u16,
    epoch: u32,
    verdict: u8,
    bytes: u32,
) {
    if !trace::writes(h.explain, write::CT_CREATE) {
        return;
    }
    let now = unsafe { bpf_jiffies64() };
    let flow = NewFlow {
        backend_id: 0,
        backend_addr: h.daddr,
        backend_port: dport,
        rev_nat_index: REV_NAT_NONE,
        flags: CT_FLAG_POLICY,
    };
    let flags = CT_FLAG_POLICY | handshake_pending(h);
    let mut entry = value(&flow, flags | CT_FLAG_REPLY, h.saddr, sport, now);
    entry.cache_epoch = epoch;
    entry.policy_verdict = verdict;
    let reply_key = key(h.daddr, h.saddr, dport, sport, h.proto);
    if CONNTRACK
        .insert(reply_key, &entry, BPF_NOEXIST as u64)
        .is_err()
    {
        return;
    }
    entry.flags = flags;
    entry.packets = 1;
    entry.bytes = bytes as u64;
    let _ = CONNTRACK.insert(key(h.saddr, h.daddr, sport, dport, h.proto), &entry, 0);
}

/// How a new Service flow is translated.
pub struct NewFlow {
    pub backend_id: u32,
    /// Backend address (raw network order) and port (host order).
    pub backend_addr: u32,
    pub backend_port: u16,
    pub rev_nat_index: u32,
    /// `CT_FLAG_EXTERNAL` for flows from outside the cluster.
    pub flags: u16,
}

#[inline(always)]
fn value(flow: &NewFlow, flags: u16, nat_addr: u32, nat_port: u16, now: u64) -> CtValue {
    CtValue {
        backend_id: flow.backend_id,
        rev_nat_index: flow.rev_nat_index,
        flags,
        backend_address: flow.backend_addr.to_ne_bytes(),
        backend_port: flow.backend_port,
        nat_port,
        nat_address: nat_addr.to_ne_bytes(),
        verified_source: 0,
        cache_epoch: 0,
        route_target: 0,
        route_macs: [0; 12],
        route_kind: 0,
        verified_kind: 0,
        policy_verdict: 0,
        _pad: 0,
        _pad2: 0,
        _pad3: 0,
        created_jiffies: now,
        last_seen_jiffies: now,
        packets: 0,
        bytes: 0,
    }
}

/// Record a new Service flow without SNAT: `h` is the client's packet before DNAT.
/// Returns `false`, recording nothing, when its reply tuple (backend -> client) is
/// another flow's already: the same client port reached that backend another way.
/// The caller then remaps the client port ([`create_snat`]), as Linux NAT does.
// By reference: passed by value, each insert may copy the 80-byte entry to another
// stack slot of the verifier's 512 bytes.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn create(h: &Headers, flow: &NewFlow, bytes: u32) -> Result<bool, ()> {
    let now = unsafe { bpf_jiffies64() };
    let flags = flow.flags | handshake_pending(h);
    let mut entry = value(flow, flags | CT_FLAG_REPLY, 0, 0, now);
    let reply_key = key(
        flow.backend_addr,
        h.saddr,
        flow.backend_port,
        h.sport,
        h.proto,
    );
    // Reply entry first: a forward entry must never exist without its reverse path.
    // An explain run only looks: whether it could be inserted (or taken over).
    let claim = |entry: &CtValue| {
        if h.explain {
            unsafe { CONNTRACK.get(reply_key) }.is_none()
        } else {
            CONNTRACK
                .insert(reply_key, entry, BPF_NOEXIST as u64)
                .is_ok()
        }
    };
    if !claim(&entry) && !(reopen_if_closing(h, &reply_key) && (h.explain || claim(&entry))) {
        return Ok(false);
    }
    if !trace::writes(h.explain, write::CT_CREATE) {
        return Ok(true);
    }
    // The forward entry differs from the reply entry only here: one value on the
    // stack for both.
    entry.flags = flags;
    entry.packets = 1;
    entry.bytes = bytes as u64;
    CONNTRACK
        .insert(key(h.saddr, h.daddr, h.sport, h.dport, h.proto), &entry, 0)
        .map_err(|_| ())?;
    Ok(true)
}

/// Tries at finding a free SNAT port before giving up (bounded for the verifier).
const SNAT_TRIES: u32 = 16;

/// The SNAT port a new flow hashed to `hash` tries at `attempt`: an odd stride (the
/// range is even-sized) visits different ports each try.
#[inline(always)]
fn snat_candidate(hash: u32, attempt: u32) -> u16 {
    let range = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    SNAT_PORT_MIN + (hash.wrapping_add(attempt.wrapping_mul(2_654_435_761)) % range) as u16
}

/// No SNAT port the new flow tried was free (`claim`: its reply key, the port to be
/// filled in here; `hash`: its hash): take over the oldest of them held by a TCP flow whose
/// client never completed its handshake (`CT_FLAG_UNESTABLISHED` on its reply entry),
/// removing that flow's entries and claiming the port with the new flow's reply entry
/// (`entry`; an explain run only looks). Returns the port, or 0 when every port tried
/// belongs to an established flow (or to a flow of another kind).
///
/// Why: spoofed SYNs claim a port each (a backend answers every SYN, so nothing
/// before the client's ACK tells them from a real client) and the agent's garbage
/// collection runs only with full resyncs (every 10 s), so ~4,500 SYNs would hold a
/// backend's whole range (61000-65535) until then, and before unestablished flows got
/// a lifetime of their own, for 6 hours (`drop_no_snat_port` for every real client).
/// Cilium retries up to 32/128 random ports, then drops (DROP_NAT_NO_MAPPING) and
/// signals its agent to collect (its SNAT map is an LRU, and a SYN-only flow lives
/// 60 s); Linux conntrack, with a full table, evicts an entry that is not ASSURED
/// (`early_drop`), and on its last NAT port tries takes over a TCP tuple in
/// TIME_WAIT (`nf_nat_used_tuple_harder`). This is `early_drop` for SNAT ports,
/// judged in the datapath at once: an unestablished claim is what a flood can make
/// and a real client holds for one round trip only. The oldest of the tried ports
/// goes: under a flood of R SYNs a second the range turns over every 4,536 / R
/// seconds and a client still in its handshake is the youngest claim by far, so it
/// keeps its port unless its round trip is longer than that (45 ms at 100,000 SYNs a
/// second; such a client's next packet then starts a new flow). A bound per client
/// address would not hold: spoofed sources are as many as the flood wants. An
/// established flow is never taken over: a full range of those still drops.
///
/// A function of its own (a BPF-to-BPF call), not inlined: it runs only when a range
/// is full, and inlined into each of a program's SNAT sites its 16 lookups cost
/// hundreds of instructions each. `EXPLAIN`: an explain run's (a copy of its own, so
/// the attached programs carry no explain code).
// Keys by reference: by value, each lookup copies the key to another stack slot of
// this function's small frame.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(never)]
fn reclaim_snat_port<const EXPLAIN: bool>(claim: &mut CtKey, hash: u32, entry: &CtValue) -> u16 {
    let mut oldest = 0u16;
    let mut oldest_created = u64::MAX;
    for attempt in 0..SNAT_TRIES {
        let candidate = snat_candidate(hash, attempt);
        claim.dport = candidate;
        let Some(held) = (unsafe { CONNTRACK.get(&*claim) }) else {
            continue;
        };
        let kind = held.flags & (CT_FLAG_REPLY | CT_FLAG_UNESTABLISHED | CT_FLAG_VIA_STACK);
        if kind == CT_FLAG_REPLY | CT_FLAG_UNESTABLISHED && held.created_jiffies < oldest_created {
            oldest = candidate;
            oldest_created = held.created_jiffies;
        }
    }
    if oldest == 0 {
        return 0;
    }
    claim.dport = oldest;
    count(EXPLAIN, stat::SNAT_PORT_RECLAIMED, 0);
    if !trace::writes(EXPLAIN, write::SNAT_RECLAIM) {
        return oldest;
    }
    // The old flow's forward entry would otherwise keep sending on the port.
    if let Some(forward) =
        unsafe { CONNTRACK.get(&*claim) }.and_then(|old| forward_key_of(claim, old))
    {
        let _ = CONNTRACK.remove(&forward);
    }
    let _ = CONNTRACK.remove(&*claim);
    // Another CPU's new flow may take it between the two: that one has it.
    match CONNTRACK.insert(&*claim, entry, BPF_NOEXIST as u64) {
        Ok(()) => oldest,
        Err(_) => 0,
    }
}

/// Record a new flow SNATed to `node_addr` (raw network order: this node for
/// forwarded external flows, the client itself for a remapped client port) and a
/// free port of the SNAT range, claimed by inserting its reply entry with
/// BPF_NOEXIST (a taken port is a reply tuple that already exists). Returns the port.
// By reference: passed by value, each insert may copy the 80-byte entry to another
// stack slot of the verifier's 512 bytes.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn create_snat(
    h: &Headers,
    flow: &NewFlow,
    node_addr: u32,
    hash: u32,
    bytes: u32,
) -> Option<u16> {
    let now = unsafe { bpf_jiffies64() };
    let flags = flow.flags | CT_FLAG_SNAT | handshake_pending(h);
    let mut entry = value(flow, flags | CT_FLAG_REPLY, h.saddr, h.sport, now);
    let mut port = 0u16;
    for attempt in 0..SNAT_TRIES {
        let candidate = snat_candidate(hash, attempt);
        let reply_key = key(
            flow.backend_addr,
            node_addr,
            flow.backend_port,
            candidate,
            h.proto,
        );
        // An explain run takes the first port that is free now, as the insert would.
        let claimed = if h.explain {
            unsafe { CONNTRACK.get(reply_key) }.is_none()
        } else {
            CONNTRACK
                .insert(reply_key, &entry, BPF_NOEXIST as u64)
                .is_ok()
        };
        if claimed {
            port = candidate;
            break;
        }
    }
    if port == 0 {
        let mut claim = key(flow.backend_addr, node_addr, flow.backend_port, 0, h.proto);
        port = if h.explain {
            reclaim_snat_port::<true>(&mut claim, hash, &entry)
        } else {
            reclaim_snat_port::<false>(&mut claim, hash, &entry)
        };
        if port == 0 {
            return None;
        }
    }
    trace::record(h.explain, |trace| {
        trace.steps |= step::SNAT;
        trace.skipped |= write::CT_CREATE;
        trace.snat_address = node_addr.to_ne_bytes();
        trace.snat_port = port;
    });
    if h.explain {
        return Some(port);
    }
    // The forward entry, in the same stack slot as the reply entry.
    entry.flags = flags;
    entry.nat_address = node_addr.to_ne_bytes();
    entry.nat_port = port;
    entry.packets = 1;
    entry.bytes = bytes as u64;
    CONNTRACK
        .insert(key(h.saddr, h.daddr, h.sport, h.dport, h.proto), &entry, 0)
        .ok()?;
    Some(port)
}
