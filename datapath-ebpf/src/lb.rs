//! Service load balancing: frontend lookup, backend choice (session affinity, then
//! Maglev for external frontends or a hash slot for ClusterIPs; established flows
//! never get here, conntrack keeps them on their backend), DNAT. The choice is shared
//! by the per-packet programs and the socket-level ones (`sock`, `sock6`), which only
//! feed it a different hash and affinity client, and by both address families
//! ([`Family`]: where a frontend's entries and its backends are).
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use ferrite_common::{
    affinity_holds,
    explain::{choice, step, write},
    service_scope, stat, svc_flag, AffinityKey, AffinityValue, Backend, Backend6, ExplainTrace,
    Service6Key, ServiceKey, ServiceValue, AFFINITY_CLIENT_IP, HAIRPIN_IP, MAGLEV_TABLE_SIZE,
};

use crate::{
    conntrack::{self, NewFlow},
    headers::Headers,
    maps::{AFFINITY, BACKENDS, BACKENDS6, MAGLEV, SERVICES, SERVICES6},
    nat,
    packet::Packet,
    stats::count_lb,
    trace::{self, count},
};

#[inline(always)]
pub fn frontend_key(address: u32, port: u16, proto: u8, backend_slot: u16) -> ServiceKey {
    ServiceKey {
        address: address.to_ne_bytes(),
        port,
        proto,
        scope: service_scope::ALL,
        backend_slot,
        _pad2: 0,
    }
}

#[inline(always)]
pub fn service_key(h: &Headers, backend_slot: u16) -> ServiceKey {
    frontend_key(h.daddr, h.dport, h.proto, backend_slot)
}

/// The master entry of the Service `h` is addressed to, if any.
#[inline(always)]
pub fn lookup_service(h: &Headers) -> Option<ServiceValue> {
    let found = unsafe { SERVICES.get(service_key(h, 0)).copied() };
    if let Some(svc) = &found {
        trace::record(h.explain, |trace| {
            trace.steps |= step::FRONTEND;
            trace.frontend = service_key(h, 0);
            trace.service = *svc;
        });
    }
    found
}

/// The entries an in-cluster client (a pod, the node's own process) balances over for
/// the frontend `master` names: its in-cluster scope's where its master says so
/// (`externalTrafficPolicy: Local`), else its own. A scope the agent has not written
/// yet (mid-update) leaves the frontend's own entries.
#[inline(always)]
pub fn in_cluster_entries<K: Family>(master: K, svc: ServiceValue) -> (K, ServiceValue) {
    if svc.flags & svc_flag::IN_CLUSTER_SCOPE == 0 {
        return (master, svc);
    }
    let scoped = master.scoped(service_scope::IN_CLUSTER);
    match scoped.entry() {
        Some(entry) => (scoped, entry),
        None => (master, svc),
    }
}

/// The entries an in-cluster client's packet `h` balances over, if it is addressed to
/// a frontend (see [`in_cluster_entries`]).
#[inline(always)]
pub fn lookup_in_cluster(h: &Headers) -> Option<(ServiceKey, ServiceValue)> {
    let svc = lookup_service(h)?;
    let (master, svc) = in_cluster_entries(service_key(h, 0), svc);
    if master.scope != service_scope::ALL {
        trace::record(h.explain, |trace| {
            trace.frontend = master;
            trace.service = svc;
        });
    }
    Some((master, svc))
}

/// lowbias32: cheap and well mixed, so flows spread evenly.
#[inline(always)]
pub fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// Hash of the flow without its destination address: an external flow hashes the
/// same on every node it may reach (each node has its own NodePort address), so
/// every node's Maglev table sends it to the same backend.
#[inline(always)]
pub fn flow_hash(h: &Headers) -> u32 {
    mix(h.saddr ^ (((h.sport as u32) << 16) | h.dport as u32) ^ ((h.proto as u32) << 8))
}

/// An address family's Service maps, by the type of their frontend keys: the rest of
/// a backend choice (slots, affinity by id, counters) is the same for both.
pub trait Family: Copy {
    /// The value of its backends map.
    type Backend: Copy;
    /// The entry under this key (a master entry or a slot).
    fn entry(&self) -> Option<ServiceValue>;
    /// The same frontend's entry in `scope` (`service_scope`).
    fn scoped(self, scope: u8) -> Self;
    /// The same frontend's slot `slot`.
    fn slot(self, slot: u16) -> Self;
    fn backend(id: u32) -> Option<Self::Backend>;
    /// The slot (1..=count) Maglev gives `hash`, if the frontend has a table.
    fn maglev_slot(&self, hash: u32, count: u16) -> Option<u16>;
    /// Note the chosen backend in an explain run's trace.
    fn trace_backend(trace: &mut ExplainTrace, backend: &Self::Backend);
}

impl Family for ServiceKey {
    type Backend = Backend;

    #[inline(always)]
    fn entry(&self) -> Option<ServiceValue> {
        unsafe { SERVICES.get(*self) }.copied()
    }

    #[inline(always)]
    fn scoped(self, scope: u8) -> Self {
        self.in_scope(scope)
    }

    #[inline(always)]
    fn slot(self, slot: u16) -> Self {
        Self {
            backend_slot: slot,
            ..self
        }
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend> {
        unsafe { BACKENDS.get(id) }.copied()
    }

    #[inline(always)]
    fn maglev_slot(&self, hash: u32, count: u16) -> Option<u16> {
        maglev_slot(self, hash, count)
    }

    #[inline(always)]
    fn trace_backend(trace: &mut ExplainTrace, backend: &Backend) {
        trace.backend = *backend;
    }
}

/// IPv6 frontends have no Maglev tables and no explain runs yet.
impl Family for Service6Key {
    type Backend = Backend6;

    #[inline(always)]
    fn entry(&self) -> Option<ServiceValue> {
        unsafe { SERVICES6.get(*self) }.copied()
    }

    #[inline(always)]
    fn scoped(self, scope: u8) -> Self {
        self.in_scope(scope)
    }

    #[inline(always)]
    fn slot(self, slot: u16) -> Self {
        Self {
            backend_slot: slot,
            ..self
        }
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend6> {
        unsafe { BACKENDS6.get(id) }.copied()
    }

    #[inline(always)]
    fn maglev_slot(&self, _hash: u32, _count: u16) -> Option<u16> {
        None
    }

    #[inline(always)]
    fn trace_backend(_trace: &mut ExplainTrace, _backend: &Backend6) {}
}

/// A backend picked for a new flow.
pub struct Chosen<B = Backend> {
    pub id: u32,
    pub backend: B,
}

impl Chosen {
    /// The backend's address, raw network order.
    #[inline(always)]
    pub fn address(&self) -> u32 {
        u32::from_ne_bytes(self.backend.address)
    }
}

#[inline(always)]
fn backend<K: Family>(id: u32) -> Option<Chosen<K::Backend>> {
    let backend = K::backend(id)?;
    Some(Chosen { id, backend })
}

/// The slot (1..=count) Maglev gives `hash`, if the frontend has a table.
#[inline(always)]
fn maglev_slot(master: &ServiceKey, hash: u32, count: u16) -> Option<u16> {
    let table = MAGLEV.get_ptr(master)?;
    // Lemire's multiply-shift reduction instead of `%`: the verifier follows a
    // multiplication and a shift to the bound (index < MAGLEV_TABLE_SIZE), not a modulo.
    let index = ((hash as u64 * MAGLEV_TABLE_SIZE as u64) >> 32) as usize;
    let slot = unsafe { *(*table).backend_slots.get(index)? };
    // A table written for another backend count (mid-update) is not trusted.
    (slot >= 1 && slot <= count).then_some(slot)
}

/// What a backend choice needs to know about the new flow.
pub struct Selection<K = ServiceKey> {
    /// The frontend's master key.
    pub master: K,
    /// Spreads flows over the slots (and Maglev entries).
    pub hash: u32,
    /// The affinity client: its kind (`AFFINITY_CLIENT_*`) and identity.
    pub client_kind: u16,
    pub client: [u8; 4],
    /// An explain run's (`trace`): choose, but pin nothing.
    pub explain: bool,
}

impl Selection {
    /// The selection of a packet's new flow to the entries under `master`: hashed
    /// over its tuple, affinity by its source address.
    #[inline(always)]
    pub fn of_packet(h: &Headers, master: ServiceKey) -> Self {
        Self {
            master,
            hash: flow_hash(h),
            client_kind: AFFINITY_CLIENT_IP,
            client: h.saddr.to_ne_bytes(),
            explain: h.explain,
        }
    }
}

/// Pick the backend of a new flow to the frontend `sel.master` names.
/// `maglev`: use the frontend's Maglev table (external frontends).
#[inline(always)]
pub fn choose<K: Family>(
    sel: &Selection<K>,
    svc: &ServiceValue,
    maglev: bool,
) -> Option<Chosen<K::Backend>> {
    if svc.count == 0 {
        return None;
    }
    let affinity_key = AffinityKey {
        rev_nat_index: svc.rev_nat_index,
        client_kind: sel.client_kind,
        client: sel.client,
        _pad: 0,
    };
    // The clock is read only for Services with affinity (a helper call per new flow).
    let now = if svc.affinity_timeout_s != 0 {
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        0
    };
    if svc.affinity_timeout_s != 0 {
        if let Some(pinned) = AFFINITY.get_ptr_mut(affinity_key) {
            let (id, last_used) = unsafe { ((*pinned).backend_id, (*pinned).last_used_ns) };
            // The agent removes pins of removed backends; a missing one is a race.
            if affinity_holds(last_used, now, svc.affinity_timeout_s) {
                if let Some(chosen) = backend::<K>(id) {
                    if trace::writes(sel.explain, write::AFFINITY) {
                        unsafe { (*pinned).last_used_ns = now };
                    }
                    trace_choice::<K>(sel.explain, choice::AFFINITY, 0, &chosen);
                    return Some(chosen);
                }
            }
        }
    }
    let (slot, how) = match maglev
        .then(|| sel.master.maglev_slot(sel.hash, svc.count))
        .flatten()
    {
        Some(slot) => (slot, choice::MAGLEV),
        None => ((sel.hash % svc.count as u32) as u16 + 1, choice::HASH),
    };
    // The agent writes slots before the master entry; a miss is a torn update.
    let id = sel.master.slot(slot).entry()?.backend_id;
    let chosen = backend::<K>(id)?;
    trace_choice::<K>(sel.explain, how, slot, &chosen);
    if svc.affinity_timeout_s != 0 && trace::writes(sel.explain, write::AFFINITY) {
        let pin = AffinityValue {
            backend_id: id,
            _pad: 0,
            last_used_ns: now,
        };
        // Best effort: without the pin the next flow is balanced afresh.
        let _ = AFFINITY.insert(affinity_key, pin, 0);
    }
    Some(chosen)
}

/// Note in an explain run's trace how `chosen` was chosen (`choice::*`, its slot).
#[inline(always)]
fn trace_choice<K: Family>(explain: bool, how: u16, slot: u16, chosen: &Chosen<K::Backend>) {
    trace::record(explain, |trace| {
        trace.steps |= step::BACKEND_CHOSEN;
        trace.choice = how;
        trace.backend_slot = slot;
        trace.backend_id = chosen.id;
        K::trace_backend(trace, &chosen.backend);
    });
}

/// Pick the backend of a new flow of the packet `h` from the entries under `master`
/// (the frontend it is addressed to, or its in-cluster scope).
#[inline(always)]
pub fn choose_backend(
    h: &Headers,
    master: ServiceKey,
    svc: &ServiceValue,
    maglev: bool,
) -> Option<Chosen> {
    choose(&Selection::of_packet(h, master), svc, maglev)
}

/// Record `flow`, whose reply tuple (backend -> client port) another flow holds,
/// with the client's port remapped to a free one of the SNAT range (above pods'
/// ephemeral ports), as Linux NAT remaps clashing tuples; rewrite the packet's source
/// port. Returns `false` when no port was free.
#[inline(always)]
pub fn remap_client_port<P: Packet>(pkt: &P, h: &Headers, flow: &NewFlow) -> Result<bool, ()> {
    let Some(port) = conntrack::create_snat(h, flow, h.saddr, flow_hash(h), pkt.len()) else {
        return Ok(false);
    };
    nat::snat(pkt, h, h.saddr, port)?;
    count(h.explain, stat::PORT_REMAPPED, pkt.len());
    Ok(true)
}

/// What became of the first packet of a new ClusterIP flow.
pub enum NewFlowOutcome {
    /// DNATed to this backend (address raw network order, port host order).
    Translated(u32, u16),
    /// The Service has no ready backend: refuse it (`service_rejected`).
    NoBackend,
    /// The client port had to be remapped and no port was free (`drop_no_snat_port`).
    NoPortLeft,
}

/// DNAT the first packet of a new ClusterIP flow of a pod: pick a backend, record the
/// flow. If the client port already reached that backend by another flow (their
/// answers would be indistinguishable), the client port is remapped too
/// (`port_remapped`); a flow balanced back to its own client is SNATed to
/// `HAIRPIN_IP` (`hairpin`), since a pod drops packets from its own address.
#[inline(always)]
pub fn translate_new_flow<P: Packet>(
    pkt: &P,
    h: &Headers,
    master: ServiceKey,
    svc: &ServiceValue,
) -> Result<NewFlowOutcome, ()> {
    let Some(chosen) = choose_backend(h, master, svc, false) else {
        return Ok(NewFlowOutcome::NoBackend);
    };
    let addr = chosen.address();
    let flow = NewFlow {
        backend_id: chosen.id,
        backend_addr: addr,
        backend_port: chosen.backend.port,
        rev_nat_index: svc.rev_nat_index,
        flags: 0,
    };
    if addr == h.saddr {
        let hairpin = u32::from_ne_bytes(HAIRPIN_IP.octets());
        let Some(port) = conntrack::create_snat(h, &flow, hairpin, flow_hash(h), pkt.len()) else {
            return Ok(NewFlowOutcome::NoPortLeft);
        };
        nat::dnat(pkt, h, addr, chosen.backend.port)?;
        nat::snat(pkt, h, hairpin, port)?;
        count(h.explain, stat::HAIRPIN, pkt.len());
    } else {
        if !conntrack::create(h, &flow, pkt.len())? && !remap_client_port(pkt, h, &flow)? {
            return Ok(NewFlowOutcome::NoPortLeft);
        }
        nat::dnat(pkt, h, addr, chosen.backend.port)?;
    }
    count(h.explain, stat::SERVICE_NEW_FLOW, pkt.len());
    if trace::writes(h.explain, write::LB_STATS) {
        count_lb(svc.rev_nat_index, chosen.id, pkt.len());
    }
    Ok(NewFlowOutcome::Translated(addr, chosen.backend.port))
}
