//! From the desired state to map writes, without touching BPF: compute what the maps
//! should hold (reusing the ids already in them, so a restart changes nothing that is
//! still right), diff that against what they hold, and order the writes so the
//! datapath never sees a half-written Service:
//! 0. node config and routes, 1. backends and rev-NAT entries, 2. backend slots,
//! 3. Maglev tables and source ranges, 4. Service master entries (count last, so
//! every slot it covers exists), 5. endpoints;
//!
//! then removals in reverse: master entries, Maglev tables and source ranges, slots,
//! rev-NAT, backends, endpoints, routes. A route change touches only its own entry: flows to other nodes go on.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use ferrite_common::{
    pod_mac_for, svc_flag, Backend, EndpointInfo, EndpointKey, NodeConfig, RevNatValue, RouteInfo,
    ServiceKey, ServiceValue, DEFAULT_VNI, MAGLEV_TABLE_SIZE, ROUTE_LOCAL, ROUTE_NODE,
    ROUTE_REMOTE, VXLAN_DEVICE,
};
use sha2::{Digest, Sha256};

use crate::model::{DesiredState, FrontendKind, L4Addr, Protocol, ServiceFrontend, Skipped};

/// An entry of `ferrite_srcrng`: a client network allowed to reach a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    pub frontend: ServiceKey,
    pub network: [u8; 4],
    /// Bits of `network` (the LPM key's prefix adds the frontend's 96).
    pub prefix_len: u32,
}

/// What a Maglev table is built from, as its hash: the backends in slot order and
/// the table size. The agent compares it (stored with the table) to see whether a
/// table must be rebuilt.
pub fn maglev_digest(backends: impl Iterator<Item = Backend>) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update((MAGLEV_TABLE_SIZE as u32).to_be_bytes());
    for backend in backends {
        hasher.update(maglev_key(&backend));
    }
    u64::from_be_bytes(hasher.finalize()[..8].try_into().expect("8 bytes"))
}

/// A backend's name in Maglev hashing: address and port, the same on every node.
pub fn maglev_key(backend: &Backend) -> [u8; 6] {
    let p = backend.port.to_be_bytes();
    let a = backend.address;
    [a[0], a[1], a[2], a[3], p[0], p[1]]
}

/// Key of `ferrite_routes` (an LPM trie key, made orderable for the diff).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteKey {
    pub prefix_len: u32,
    pub network: [u8; 4],
}

/// What the maps hold (read back from the kernel) or should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nat: BTreeMap<u16, RevNatValue>,
    pub endpoints: BTreeMap<EndpointKey, EndpointInfo>,
    pub routes: BTreeMap<RouteKey, RouteInfo>,
    pub config: NodeConfig,
    /// Maglev table of each external frontend, by the digest it was built from.
    pub maglev: BTreeMap<ServiceKey, u64>,
    pub source_ranges: BTreeSet<SourceRange>,
}

/// Node-wide settings that come from the agent's flags, not from objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    /// This node's name (its Node object gives its IP and pod CIDR).
    pub node: String,
    pub vni: u32,
    /// The overlay's UDP port.
    pub vxlan_port: u16,
    pub capacities: Capacities,
    /// Where external traffic is balanced on the uplink (XDP or its tcx program).
    pub uplink_xdp: UplinkXdp,
    /// This sync's decision: the uplink runs no XDP program, its tcx ingress program
    /// balances external traffic (`config_flag::EXTERNAL_IN_TC`).
    pub external_in_tc: bool,
    /// What the node accepts from objects (addresses, pod CIDRs, sizes).
    pub limits: crate::limits::Limits,
}

/// Whether the uplink gets the XDP program (`--xdp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UplinkXdp {
    /// On every uplink but a veth: XDP on a veth saves nothing (the skb exists
    /// already) and costs GSO (the veth's peer segments everything sent into it).
    #[default]
    Auto,
    Always,
    Never,
}

impl UplinkXdp {
    /// Whether an uplink driven by `driver` gets XDP.
    pub fn wants_xdp(self, driver: Option<&str>) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::Auto => driver != Some("veth"),
        }
    }
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            node: String::new(),
            vni: DEFAULT_VNI,
            vxlan_port: ferrite_common::DEFAULT_VXLAN_PORT,
            capacities: Capacities::default(),
            uplink_xdp: UplinkXdp::default(),
            external_in_tc: false,
            limits: crate::limits::Limits::default(),
        }
    }
}

/// A node's own address on the overlay: the first address of its (first) pod CIDR,
/// which the CNI plugin's IPAM never hands out (flannel.1 and vxlan.calico take an
/// address of the node's pod CIDR the same way).
pub fn overlay_address(pod_cidr: &ipnet::Ipv4Net) -> Option<std::net::Ipv4Addr> {
    pod_cidr.hosts().next()
}

/// Entries the Service maps hold (their `max_entries`): a Service that does not fit
/// is left out whole, with a reason naming the map, instead of failing the sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub services: usize,
    pub backends: usize,
    pub rev_nat: usize,
}

impl Default for Capacities {
    fn default() -> Self {
        use ferrite_common::capacity;
        Self {
            services: capacity::SERVICES as usize,
            backends: capacity::BACKENDS as usize,
            rev_nat: capacity::REV_NAT as usize,
        }
    }
}

/// What is left of each capacity while a plan is made.
struct Budget {
    left: Capacities,
    total: Capacities,
}

impl Budget {
    /// Room left in maps holding `maps`.
    fn after(capacities: &Capacities, maps: &MapContents) -> Self {
        Self {
            left: Capacities {
                services: capacities.services.saturating_sub(maps.services.len()),
                backends: capacities.backends.saturating_sub(maps.backends.len()),
                rev_nat: capacities.rev_nat.saturating_sub(maps.rev_nat.len()),
            },
            total: *capacities,
        }
    }

    /// Why a frontend needing these new entries does not fit, if it does not.
    fn refuse(&self, services: usize, backends: usize, rev_nat: usize) -> Option<String> {
        use ferrite_common::map_names;
        let full = |map: &str, total: usize| {
            format!("{map} is full ({total} entries): the Service port is not written")
        };
        if services > self.left.services {
            return Some(full(map_names::SERVICES, self.total.services));
        }
        if backends > self.left.backends {
            return Some(full(map_names::BACKENDS, self.total.backends));
        }
        if rev_nat > self.left.rev_nat {
            return Some(full(map_names::REV_NAT, self.total.rev_nat));
        }
        None
    }

    fn take(&mut self, services: usize, backends: usize, rev_nat: usize) {
        self.left.services -= services;
        self.left.backends -= backends;
        self.left.rev_nat -= rev_nat;
    }
}

/// A host-side interface as the node's network namespace reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interface {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, Backend),
    PutRevNat(u16, RevNatValue),
    PutService(ServiceKey, ServiceValue),
    PutEndpoint(EndpointKey, EndpointInfo),
    PutConfig(NodeConfig),
    PutRoute(RouteKey, RouteInfo),
    DeleteRoute(RouteKey),
    DeleteService(ServiceKey),
    DeleteRevNat(u16),
    DeleteBackend(u32),
    DeleteEndpoint(EndpointKey),
    /// Build and write the Maglev table of a frontend from its `count` slots (already
    /// written) - `digest` says what it is built from.
    PutMaglev(ServiceKey, u16, u64),
    DeleteMaglev(ServiceKey),
    PutSourceRange(SourceRange),
    DeleteSourceRange(SourceRange),
}

fn backend_value(addr: &L4Addr) -> Backend {
    Backend {
        address: addr.ip.octets(),
        port: addr.port,
        proto: addr.protocol.number(),
        flags: 0,
    }
}

fn rev_nat_value(frontend: &L4Addr) -> RevNatValue {
    RevNatValue {
        address: frontend.ip.octets(),
        port: frontend.port,
        _pad: 0,
    }
}

/// Hands out ids that are neither in use now nor still present in the maps (an id
/// being deleted must not be rewritten to mean something else in the same pass).
/// `in_maps` is every id the maps hold, by reference: no copy of 100k keys.
struct IdAllocator<'a, T, V> {
    in_maps: &'a BTreeMap<T, V>,
    handed_out: BTreeSet<T>,
    next: T,
    max: T,
    wrapped: bool,
}

impl<'a, T: Copy + Ord + From<u8> + std::ops::Add<Output = T>, V> IdAllocator<'a, T, V> {
    /// Starts above the highest id in use (O(1) per id while ids last), and wraps to
    /// the gaps from 1 once `max` is reached.
    fn new(in_maps: &'a BTreeMap<T, V>, max: T) -> Self {
        let next = match in_maps.keys().next_back() {
            Some(highest) if *highest < max => *highest + T::from(1),
            _ => T::from(1),
        };
        Self {
            in_maps,
            handed_out: BTreeSet::new(),
            next,
            max,
            wrapped: false,
        }
    }

    fn allocate(&mut self) -> Option<T> {
        loop {
            let id = self.next;
            let free = !self.in_maps.contains_key(&id) && !self.handed_out.contains(&id);
            if id >= self.max {
                if self.wrapped {
                    return free.then(|| self.take(id));
                }
                self.wrapped = true;
                self.next = T::from(1);
                if free {
                    return Some(self.take(id));
                }
                continue;
            }
            self.next = id + T::from(1);
            if free {
                return Some(self.take(id));
            }
        }
    }

    fn take(&mut self, id: T) -> T {
        self.handed_out.insert(id);
        id
    }
}

/// The key of the first entry holding each of `wanted`'s values, in one pass.
fn keys_of<K: Copy, V: Ord + Copy>(map: &BTreeMap<K, V>, wanted: &BTreeSet<V>) -> BTreeMap<V, K> {
    let mut found = BTreeMap::new();
    if wanted.is_empty() {
        return found;
    }
    for (key, value) in map {
        if wanted.contains(value) {
            found.entry(*value).or_insert(*key);
        }
    }
    found
}

/// Copy a frontend's entries (master, slots, their backends and rev-NAT entry) from
/// `written` into `out` unchanged. Returns whether it had any.
fn keep_as_written(master: ServiceKey, written: &MapContents, out: &mut MapContents) -> bool {
    let last = ServiceKey {
        backend_slot: u16::MAX,
        ..master
    };
    let mut any = false;
    for (key, value) in written.services.range(master..=last) {
        any = true;
        out.services.insert(*key, *value);
        if key.backend_slot == 0 {
            if let Some(rev) = written.rev_nat.get(&value.rev_nat_index) {
                out.rev_nat.insert(value.rev_nat_index, *rev);
            }
        } else if let Some(backend) = written.backends.get(&value.backend_id) {
            out.backends.insert(value.backend_id, *backend);
        }
    }
    if let Some(digest) = written.maglev.get(&master) {
        out.maglev.insert(master, *digest);
    }
    out.source_ranges.extend(
        written
            .source_ranges
            .iter()
            .filter(|r| r.frontend == master)
            .copied(),
    );
    any
}

/// How to find the id the maps already use for a value.
struct ExistingIds<'a> {
    backend: &'a dyn Fn(&Backend) -> Option<u32>,
    rev_nat: &'a dyn Fn(&RevNatValue) -> Option<u16>,
}

/// Write the Service entries (backends, rev-NAT, slots, masters) of `services` into
/// `out`. Ids already in `written` (all the maps hold) are kept for the same value;
/// new ones are neither in `written` nor handed out in this pass.
fn service_contents<'s>(
    services: impl Iterator<Item = (&'s L4Addr, &'s ServiceFrontend)>,
    written: &MapContents,
    existing: &ExistingIds,
    budget: &mut Budget,
    out: &mut MapContents,
    skipped: &mut Vec<Skipped>,
) {
    let mut backend_ids = IdAllocator::new(&written.backends, u32::MAX);
    let mut rev_nat_ids = IdAllocator::new(&written.rev_nat, u16::MAX);

    let mut backend_id_of: BTreeMap<Backend, u32> = BTreeMap::new();
    let mut rev_nat_of: BTreeMap<RevNatValue, u16> = BTreeMap::new();
    for (frontend, service) in services {
        let rev = rev_nat_value(frontend);
        let key = |slot: u16| {
            ServiceKey::new(frontend.ip, frontend.port, frontend.protocol.number(), slot)
        };
        // Only entries the maps do not hold yet need room: writes come before
        // removals, so what this plan removes frees its room for the next one.
        let slot_count = service.backends.len() + service.terminating.len();
        // The model refuses larger Services; a slot number must never wrap.
        let last_slot = match u16::try_from(slot_count) {
            Ok(last) if slot_count <= crate::limits::MAX_BACKENDS_PER_PORT => last,
            _ => {
                skipped.push(Skipped {
                    object: service.name.clone(),
                    reason: format!(
                        "{frontend} has {slot_count} backends: more than a port may have"
                    ),
                });
                continue;
            }
        };
        let new_entries = (0..=last_slot)
            .filter(|slot| !written.services.contains_key(&key(*slot)))
            .count();
        let new_rev_nat =
            usize::from(!rev_nat_of.contains_key(&rev) && (existing.rev_nat)(&rev).is_none());
        let new_backends = service
            .backends
            .iter()
            .chain(&service.terminating)
            .map(backend_value)
            .collect::<BTreeSet<_>>()
            .iter()
            .filter(|b| !backend_id_of.contains_key(*b) && (existing.backend)(b).is_none())
            .count();
        if let Some(reason) = budget.refuse(new_entries, new_backends, new_rev_nat) {
            // A port already in the maps keeps what it has: it goes on working.
            let kept = keep_as_written(key(0), written, out);
            skipped.push(Skipped {
                object: service.name.clone(),
                reason: if kept {
                    format!("{reason}; its backends stay as they were")
                } else {
                    reason
                },
            });
            continue;
        }
        budget.take(new_entries, new_backends, new_rev_nat);
        let rev_nat_index = match rev_nat_of.get(&rev) {
            Some(index) => *index,
            None => match (existing.rev_nat)(&rev).or_else(|| rev_nat_ids.allocate()) {
                Some(index) => {
                    rev_nat_of.insert(rev, index);
                    out.rev_nat.insert(index, rev);
                    index
                }
                None => {
                    skipped.push(Skipped {
                        object: service.name.clone(),
                        reason: "no rev-NAT index left".into(),
                    });
                    continue;
                }
            },
        };
        // Ready backends fill slots 1..=count, which new flows pick from; terminating
        // ones follow after `count`: no new flow picks them, but the maps say which
        // frontend they still serve (their flows' conntrack entries name their id).
        let mut slots = Vec::with_capacity(slot_count);
        for addr in service.backends.iter().chain(&service.terminating) {
            let value = backend_value(addr);
            let id = match backend_id_of.get(&value) {
                Some(id) => Some(*id),
                None => (existing.backend)(&value).or_else(|| backend_ids.allocate()),
            };
            let Some(id) = id else {
                skipped.push(Skipped {
                    object: service.name.clone(),
                    reason: format!("no backend id left for {addr}"),
                });
                break;
            };
            backend_id_of.insert(value, id);
            slots.push(id);
        }
        if slots.len() != slot_count {
            continue;
        }
        let master = key(0);
        if service.kind.is_external() && !service.backends.is_empty() {
            let digest = maglev_digest(service.backends.iter().map(backend_value));
            out.maglev.insert(master, digest);
        }
        for range in &service.source_ranges {
            out.source_ranges.insert(SourceRange {
                frontend: master,
                network: range.network().octets(),
                prefix_len: range.prefix_len() as u32,
            });
        }
        for (slot, id) in slots.iter().enumerate() {
            out.services.insert(
                key(u16::try_from(slot + 1).expect("bounded above")),
                ServiceValue {
                    backend_id: *id,
                    ..ServiceValue::default()
                },
            );
        }
        out.services.insert(
            master,
            ServiceValue {
                backend_id: 0,
                count: u16::try_from(service.backends.len()).expect("bounded above"),
                rev_nat_index,
                flags: service_flags(service),
                affinity_timeout_s: service.affinity_timeout_s,
            },
        );
    }
    for (value, id) in backend_id_of {
        out.backends.insert(id, value);
    }
}

fn service_flags(service: &ServiceFrontend) -> u32 {
    let mut flags = 0;
    if service.kind.is_external() {
        flags |= svc_flag::EXTERNAL;
    }
    if service.local_only {
        flags |= svc_flag::LOCAL_ONLY;
    }
    if service.kind == FrontendKind::NodePort {
        flags |= svc_flag::NODE_PORT;
    }
    if !service.source_ranges.is_empty() {
        flags |= svc_flag::SOURCE_RANGES;
    }
    flags
}

/// The map contents that realise `state`. Pods whose interface does not exist (yet)
/// and frontends for which no id is left are reported in the skipped list.
pub fn desired_contents(
    state: &DesiredState,
    interfaces: &BTreeMap<String, Interface>,
    current: &MapContents,
    settings: &NodeSettings,
) -> (MapContents, Vec<Skipped>) {
    desired_contents_keeping_ids(state, interfaces, current, current, settings)
}

/// Like [`desired_contents`], reusing the ids `ids_from` gives each value (the
/// agent's own last write): an entry altered behind the agent's back is then
/// rewritten in place, and flows pinned to its id keep going.
pub fn desired_contents_keeping_ids(
    state: &DesiredState,
    interfaces: &BTreeMap<String, Interface>,
    current: &MapContents,
    ids_from: &MapContents,
    settings: &NodeSettings,
) -> (MapContents, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let mut out = MapContents::default();

    let this_node = state.nodes.get(&settings.node);
    out.config = NodeConfig {
        node_ip: this_node.map(|n| n.ip.octets()).unwrap_or_default(),
        flags: if settings.external_in_tc {
            ferrite_common::config_flag::EXTERNAL_IN_TC
        } else {
            0
        },
        vxlan_ifindex: interfaces.get(VXLAN_DEVICE).map(|i| i.ifindex).unwrap_or(0),
        vni: settings.vni,
        vtep_mac: this_node.map(|n| n.vtep_mac).unwrap_or_default(),
        pod_mtu: interfaces
            .get(VXLAN_DEVICE)
            .map(|i| i.mtu.min(u16::MAX.into()) as u16)
            .unwrap_or(0),
        overlay_ip: this_node
            .and_then(|n| n.pod_cidrs.first())
            .and_then(overlay_address)
            .map(|ip| ip.octets())
            .unwrap_or_default(),
        vxlan_port: settings.vxlan_port,
        _pad: 0,
        // Carried over: `diff` bumps it when the endpoints or routes change.
        route_epoch: current.config.route_epoch,
    };
    for node in state.nodes.values() {
        let flags = if node.name == settings.node {
            ROUTE_LOCAL
        } else {
            ROUTE_REMOTE
        };
        for cidr in &node.pod_cidrs {
            out.routes.insert(
                RouteKey {
                    prefix_len: cidr.prefix_len() as u32,
                    network: cidr.network().octets(),
                },
                RouteInfo {
                    node_ip: node.ip.octets(),
                    vtep_mac: node.vtep_mac,
                    flags,
                },
            );
        }
    }
    // Other nodes' own addresses: replies to the NodePort flows they SNAT come back
    // to them through the overlay (see `ROUTE_NODE`).
    for node in state.nodes.values() {
        if node.name != settings.node {
            out.routes.insert(
                RouteKey {
                    prefix_len: 32,
                    network: node.ip.octets(),
                },
                RouteInfo {
                    node_ip: node.ip.octets(),
                    vtep_mac: node.vtep_mac,
                    flags: ROUTE_NODE,
                },
            );
        }
    }
    let wanted_backends: BTreeSet<Backend> = state
        .services
        .values()
        .flat_map(|service| {
            service
                .backends
                .iter()
                .chain(&service.terminating)
                .map(backend_value)
        })
        .collect();
    let wanted_rev_nat: BTreeSet<RevNatValue> = state.services.keys().map(rev_nat_value).collect();
    let backend_ids = keys_of(&ids_from.backends, &wanted_backends);
    let rev_nat_ids = keys_of(&ids_from.rev_nat, &wanted_rev_nat);
    let existing = ExistingIds {
        backend: &|value| backend_ids.get(value).copied(),
        rev_nat: &|value| rev_nat_ids.get(value).copied(),
    };
    let mut budget = Budget::after(&settings.capacities, current);
    service_contents(
        state.services.iter(),
        current,
        &existing,
        &mut budget,
        &mut out,
        &mut skipped,
    );

    for pod in state.pods.values() {
        let Some(interface) = interfaces.get(&pod.interface) else {
            skipped.push(Skipped {
                object: format!("Pod {}/{}", pod.namespace, pod.name),
                reason: format!("host interface {} does not exist (yet)", pod.interface),
            });
            continue;
        };
        out.endpoints.insert(
            EndpointKey {
                address: pod.ip.octets(),
            },
            EndpointInfo {
                ifindex: interface.ifindex,
                pod_mac: pod_mac_for(pod.ip),
                host_mac: interface.mac,
                flags: 0,
            },
        );
    }
    // The CNI plugin writes the endpoint of a pod it wires before the agent hears of
    // the pod: an endpoint whose interface still exists is kept, only those of
    // vanished interfaces go.
    let live: BTreeSet<u32> = interfaces.values().map(|i| i.ifindex).collect();
    for (key, info) in &current.endpoints {
        if !out.endpoints.contains_key(key) && live.contains(&info.ifindex) {
            out.endpoints.insert(*key, *info);
        }
    }
    (out, skipped)
}

/// One ordered pass over both maps (they are sorted): the entries of `desired`
/// (selected by `keep`) that `current` lacks or holds differently, and the keys of
/// `current` that `desired` no longer has.
#[allow(clippy::type_complexity)]
fn changes<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    keep: impl Fn(&K) -> bool,
) -> (Vec<(K, V)>, Vec<K>) {
    use std::cmp::Ordering;
    let (mut puts, mut deletes) = (Vec::new(), Vec::new());
    let mut cur = current.iter().filter(|(k, _)| keep(k)).peekable();
    let mut des = desired.iter().filter(|(k, _)| keep(k)).peekable();
    loop {
        match (cur.peek(), des.peek()) {
            (None, None) => break,
            (Some((ck, _)), None) => {
                deletes.push(**ck);
                cur.next();
            }
            (None, Some((dk, dv))) => {
                puts.push((**dk, **dv));
                des.next();
            }
            (Some((ck, cv)), Some((dk, dv))) => match ck.cmp(dk) {
                Ordering::Less => {
                    deletes.push(**ck);
                    cur.next();
                }
                Ordering::Greater => {
                    puts.push((**dk, **dv));
                    des.next();
                }
                Ordering::Equal => {
                    if cv != dv {
                        puts.push((**dk, **dv));
                    }
                    cur.next();
                    des.next();
                }
            },
        }
    }
    (puts, deletes)
}

/// The writes that turn `current` into `desired`, in a safe order (see module docs).
/// Entries already right are not written: a restart that finds the maps in order
/// writes nothing and never disturbs a live flow.
fn all<K>(_: &K) -> bool {
    true
}

pub fn diff(current: &MapContents, desired: &MapContents) -> Vec<Op> {
    let is_master = |k: &ServiceKey| k.backend_slot == 0;
    let is_slot = |k: &ServiceKey| k.backend_slot != 0;
    let (route_puts, route_deletes) = changes(&current.routes, &desired.routes, all);
    let (backend_puts, backend_deletes) = changes(&current.backends, &desired.backends, all);
    let (rev_puts, rev_deletes) = changes(&current.rev_nat, &desired.rev_nat, all);
    let (slot_puts, slot_deletes) = changes(&current.services, &desired.services, is_slot);
    let (master_puts, master_deletes) = changes(&current.services, &desired.services, is_master);
    let (endpoint_puts, endpoint_deletes) = changes(&current.endpoints, &desired.endpoints, all);
    let (maglev_puts, maglev_deletes) = changes(&current.maglev, &desired.maglev, all);
    let range_puts = desired.source_ranges.difference(&current.source_ranges);
    let range_deletes = current.source_ranges.difference(&desired.source_ranges);
    let mut ops = Vec::new();
    // The datapath caches endpoint and route lookups in conntrack entries per route
    // epoch: bumped by the last write, after every endpoint and route change is in.
    let routes_change = !(route_puts.is_empty()
        && route_deletes.is_empty()
        && endpoint_puts.is_empty()
        && endpoint_deletes.is_empty());
    let config_first = NodeConfig {
        route_epoch: current.config.route_epoch,
        ..desired.config
    };
    if current.config != config_first {
        ops.push(Op::PutConfig(config_first));
    }
    ops.extend(route_puts.into_iter().map(|(k, v)| Op::PutRoute(k, v)));
    ops.extend(backend_puts.into_iter().map(|(k, v)| Op::PutBackend(k, v)));
    ops.extend(rev_puts.into_iter().map(|(k, v)| Op::PutRevNat(k, v)));
    ops.extend(slot_puts.into_iter().map(|(k, v)| Op::PutService(k, v)));
    ops.extend(maglev_puts.into_iter().map(|(k, digest)| {
        let count = desired.services.get(&k).map(|m| m.count).unwrap_or(0);
        Op::PutMaglev(k, count, digest)
    }));
    ops.extend(range_puts.map(|r| Op::PutSourceRange(*r)));
    ops.extend(master_puts.into_iter().map(|(k, v)| Op::PutService(k, v)));
    ops.extend(
        endpoint_puts
            .into_iter()
            .map(|(k, v)| Op::PutEndpoint(k, v)),
    );
    ops.extend(master_deletes.into_iter().map(Op::DeleteService));
    ops.extend(maglev_deletes.into_iter().map(Op::DeleteMaglev));
    ops.extend(range_deletes.map(|r| Op::DeleteSourceRange(*r)));
    ops.extend(slot_deletes.into_iter().map(Op::DeleteService));
    ops.extend(rev_deletes.into_iter().map(Op::DeleteRevNat));
    ops.extend(backend_deletes.into_iter().map(Op::DeleteBackend));
    ops.extend(endpoint_deletes.into_iter().map(Op::DeleteEndpoint));
    ops.extend(route_deletes.into_iter().map(Op::DeleteRoute));
    if routes_change || desired.config.route_epoch != current.config.route_epoch {
        ops.push(Op::PutConfig(NodeConfig {
            route_epoch: current.config.route_epoch.wrapping_add(1),
            ..desired.config
        }));
    }
    ops
}

/// The maps as last written, with the reverse indexes an incremental update needs to
/// stay O(changed): the id of each value, and how many entries use each id.
#[derive(Clone, Debug, Default)]
pub struct Written {
    pub contents: MapContents,
    backend_id_of: HashMap<Backend, u32>,
    rev_nat_of: HashMap<RevNatValue, u16>,
    /// Backend id -> slots naming it; rev-NAT index -> masters naming it.
    backend_users: HashMap<u32, u32>,
    rev_nat_users: HashMap<u16, u32>,
}

fn add_user<K: Eq + std::hash::Hash>(users: &mut HashMap<K, u32>, key: K) {
    *users.entry(key).or_default() += 1;
}

fn remove_user<K: Eq + std::hash::Hash>(users: &mut HashMap<K, u32>, key: K) {
    if let std::collections::hash_map::Entry::Occupied(mut entry) = users.entry(key) {
        *entry.get_mut() -= 1;
        if *entry.get() == 0 {
            entry.remove();
        }
    }
}

impl Written {
    pub fn new(contents: MapContents) -> Self {
        let mut written = Self::default();
        let ops: Vec<Op> = contents
            .backends
            .iter()
            .map(|(k, v)| Op::PutBackend(*k, *v))
            .chain(contents.rev_nat.iter().map(|(k, v)| Op::PutRevNat(*k, *v)))
            .chain(
                contents
                    .services
                    .iter()
                    .map(|(k, v)| Op::PutService(*k, *v)),
            )
            .collect();
        written.apply(&ops);
        written.contents = contents;
        written
    }

    /// Record `ops` as written, keeping the indexes in step.
    pub fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            match *op {
                Op::PutBackend(id, value) => {
                    if let Some(old) = self.contents.backends.insert(id, value) {
                        self.forget_backend(id, old);
                    }
                    self.backend_id_of.entry(value).or_insert(id);
                }
                Op::DeleteBackend(id) => {
                    if let Some(old) = self.contents.backends.remove(&id) {
                        self.forget_backend(id, old);
                    }
                }
                Op::PutRevNat(index, value) => {
                    if let Some(old) = self.contents.rev_nat.insert(index, value) {
                        self.forget_rev_nat(index, old);
                    }
                    self.rev_nat_of.entry(value).or_insert(index);
                }
                Op::DeleteRevNat(index) => {
                    if let Some(old) = self.contents.rev_nat.remove(&index) {
                        self.forget_rev_nat(index, old);
                    }
                }
                Op::PutService(key, value) => {
                    if let Some(old) = self.contents.services.insert(key, value) {
                        self.forget_service(&key, &old);
                    }
                    if key.backend_slot == 0 {
                        add_user(&mut self.rev_nat_users, value.rev_nat_index);
                    } else {
                        add_user(&mut self.backend_users, value.backend_id);
                    }
                }
                Op::DeleteService(key) => {
                    if let Some(old) = self.contents.services.remove(&key) {
                        self.forget_service(&key, &old);
                    }
                }
                other => self.contents.apply(&[other]),
            }
        }
    }

    fn forget_backend(&mut self, id: u32, value: Backend) {
        if self.backend_id_of.get(&value) == Some(&id) {
            self.backend_id_of.remove(&value);
        }
    }

    fn forget_rev_nat(&mut self, index: u16, value: RevNatValue) {
        if self.rev_nat_of.get(&value) == Some(&index) {
            self.rev_nat_of.remove(&value);
        }
    }

    fn forget_service(&mut self, key: &ServiceKey, old: &ServiceValue) {
        if key.backend_slot == 0 {
            remove_user(&mut self.rev_nat_users, old.rev_nat_index);
        } else {
            remove_user(&mut self.backend_users, old.backend_id);
        }
    }
}

/// The writes for an incremental update of some Services, in time proportional to
/// their entries: `frontends` are all the frontends those Services had (in
/// `written`) or have now, `now` the ones they have now with their backends. The
/// same ordered diff as a full sync, over just these entries; a backend or rev-NAT
/// entry that another Service still uses is never removed.
pub fn service_update(
    written: &Written,
    frontends: &BTreeSet<L4Addr>,
    now: &BTreeMap<L4Addr, ServiceFrontend>,
    capacities: &Capacities,
) -> (Vec<Op>, Vec<Skipped>) {
    let maps = &written.contents;
    let mut current = MapContents {
        config: maps.config,
        ..MapContents::default()
    };
    for frontend in frontends {
        let master = ServiceKey::new(frontend.ip, frontend.port, frontend.protocol.number(), 0);
        keep_as_written(master, maps, &mut current);
    }
    let mut desired = MapContents {
        config: maps.config,
        ..MapContents::default()
    };
    let mut skipped = Vec::new();
    let existing = ExistingIds {
        backend: &|value| written.backend_id_of.get(value).copied(),
        rev_nat: &|value| written.rev_nat_of.get(value).copied(),
    };
    let mut budget = Budget::after(capacities, maps);
    service_contents(
        now.iter(),
        maps,
        &existing,
        &mut budget,
        &mut desired,
        &mut skipped,
    );
    let mut ops = diff(&current, &desired);
    // Users outside these frontends keep a backend or rev-NAT entry alive.
    let ours = |pick: &dyn Fn(&ServiceKey, &ServiceValue) -> bool| {
        current.services.iter().filter(|(k, v)| pick(k, v)).count() as u32
    };
    ops.retain(|op| match op {
        Op::DeleteBackend(id) => {
            let all = written.backend_users.get(id).copied().unwrap_or(0);
            all <= ours(&|k, v| k.backend_slot != 0 && v.backend_id == *id)
        }
        Op::DeleteRevNat(index) => {
            let all = written.rev_nat_users.get(index).copied().unwrap_or(0);
            all <= ours(&|k, v| k.backend_slot == 0 && v.rev_nat_index == *index)
        }
        _ => true,
    });
    (ops, skipped)
}

impl MapContents {
    /// Routes to pod CIDRs (this node's and others'), without other nodes' own /32s.
    pub fn pod_routes(&self) -> usize {
        self.routes
            .values()
            .filter(|r| r.flags & ROUTE_NODE == 0)
            .count()
    }

    /// Record `ops` as written (keeps the agent's copy of the maps in step).
    pub fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            match *op {
                Op::PutBackend(id, value) => drop(self.backends.insert(id, value)),
                Op::PutRevNat(index, value) => drop(self.rev_nat.insert(index, value)),
                Op::PutService(key, value) => drop(self.services.insert(key, value)),
                Op::PutEndpoint(key, value) => drop(self.endpoints.insert(key, value)),
                Op::PutConfig(config) => self.config = config,
                Op::PutRoute(key, value) => drop(self.routes.insert(key, value)),
                Op::DeleteRoute(key) => drop(self.routes.remove(&key)),
                Op::DeleteService(key) => drop(self.services.remove(&key)),
                Op::DeleteRevNat(index) => drop(self.rev_nat.remove(&index)),
                Op::DeleteBackend(id) => drop(self.backends.remove(&id)),
                Op::DeleteEndpoint(key) => drop(self.endpoints.remove(&key)),
                Op::PutMaglev(key, _, digest) => drop(self.maglev.insert(key, digest)),
                Op::DeleteMaglev(key) => drop(self.maglev.remove(&key)),
                Op::PutSourceRange(range) => drop(self.source_ranges.insert(range)),
                Op::DeleteSourceRange(range) => drop(self.source_ranges.remove(&range)),
            }
        }
    }
}

/// What `actual` holds differently from `expected`, as the writes that would put it
/// back (endpoints aside: the CNI plugin writes them between syncs).
pub fn drift(expected: &MapContents, actual: &MapContents) -> Vec<Op> {
    let without_endpoints = |maps: &MapContents| MapContents {
        endpoints: BTreeMap::new(),
        ..maps.clone()
    };
    diff(&without_endpoints(actual), &without_endpoints(expected))
}

/// The map an op writes.
pub fn op_map(op: &Op) -> &'static str {
    use ferrite_common::map_names;
    match op {
        Op::PutBackend(..) | Op::DeleteBackend(_) => map_names::BACKENDS,
        Op::PutRevNat(..) | Op::DeleteRevNat(_) => map_names::REV_NAT,
        Op::PutService(..) | Op::DeleteService(_) => map_names::SERVICES,
        Op::PutEndpoint(..) | Op::DeleteEndpoint(_) => map_names::ENDPOINTS,
        Op::PutConfig(_) => map_names::CONFIG,
        Op::PutRoute(..) | Op::DeleteRoute(_) => map_names::ROUTES,
        Op::PutMaglev(..) | Op::DeleteMaglev(_) => map_names::MAGLEV,
        Op::PutSourceRange(_) | Op::DeleteSourceRange(_) => map_names::SOURCE_RANGES,
    }
}

/// The master key of a Service entry's frontend.
fn master_of(key: &ServiceKey) -> ServiceKey {
    ServiceKey {
        backend_slot: 0,
        ..*key
    }
}

/// The rev-NAT index of a frontend and the backend ids of all its slots (ready and
/// terminating) in `services`.
fn members(
    services: &BTreeMap<ServiceKey, ServiceValue>,
    master: ServiceKey,
) -> (Option<u16>, BTreeSet<u32>) {
    let last = ServiceKey {
        backend_slot: u16::MAX,
        ..master
    };
    let mut rev_nat = None;
    let mut ids = BTreeSet::new();
    for (key, value) in services.range(master..=last) {
        if key.backend_slot == 0 {
            rev_nat = Some(value.rev_nat_index);
        } else {
            ids.insert(value.backend_id);
        }
    }
    (rev_nat, ids)
}

/// (rev-NAT index, backend id) pairs `ops` end, applied to `before`: a backend that no
/// longer serves a frontend (neither ready nor terminating), or a frontend that is
/// gone. Their conntrack and affinity entries must go even when the backend lives on
/// behind another Service (backends are shared by value): its flows of this frontend
/// move to the frontend's current backends. Proportional to the frontends touched.
pub fn ended_pairs(before: &MapContents, ops: &[Op]) -> BTreeSet<(u16, u32)> {
    let touched: BTreeSet<ServiceKey> = ops
        .iter()
        .filter_map(|op| match op {
            Op::PutService(key, _) | Op::DeleteService(key) => Some(master_of(key)),
            _ => None,
        })
        .collect();
    if touched.is_empty() {
        return BTreeSet::new();
    }
    let mut after = BTreeMap::new();
    for master in &touched {
        let last = ServiceKey {
            backend_slot: u16::MAX,
            ..*master
        };
        after.extend(before.services.range(*master..=last));
    }
    for op in ops {
        match op {
            Op::PutService(key, value) => drop(after.insert(*key, *value)),
            Op::DeleteService(key) => drop(after.remove(key)),
            _ => {}
        }
    }
    let mut ended = BTreeSet::new();
    for master in touched {
        let (Some(old_rev_nat), old_ids) = members(&before.services, master) else {
            continue;
        };
        let (new_rev_nat, new_ids) = members(&after, master);
        for id in old_ids {
            if new_rev_nat != Some(old_rev_nat) || !new_ids.contains(&id) {
                ended.insert((old_rev_nat, id));
            }
        }
    }
    ended
}

/// Backend ids a diff removes: conntrack entries naming them must go too, before the
/// id can ever be handed out again.
pub fn removed_backends(ops: &[Op]) -> BTreeSet<u32> {
    ops.iter()
        .filter_map(|op| match op {
            Op::DeleteBackend(id) => Some(*id),
            _ => None,
        })
        .collect()
}

/// Human-readable frontend of a service key (for logs and inspect).
pub fn describe_service_key(key: &ServiceKey) -> String {
    let protocol = Protocol::from_number(key.proto)
        .map(|p| p.to_string())
        .unwrap_or_else(|| format!("proto{}", key.proto));
    format!(
        "{}:{}/{}",
        std::net::Ipv4Addr::from(key.address),
        key.port,
        protocol
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LocalPod;
    use ferrite_common::PROTO_TCP;
    use std::net::Ipv4Addr;

    fn tcp(ip: &str, port: u16) -> L4Addr {
        L4Addr {
            ip: ip.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn state(services: &[(L4Addr, &[L4Addr])]) -> DesiredState {
        let mut state = DesiredState::default();
        for (frontend, backends) in services {
            state.services.insert(
                *frontend,
                ServiceFrontend {
                    service: ("default".into(), frontend.to_string()),
                    name: frontend.to_string(),
                    backends: backends.to_vec(),
                    ..ServiceFrontend::default()
                },
            );
        }
        state
    }

    fn plan(state: &DesiredState, current: &MapContents) -> (MapContents, Vec<Op>) {
        let (desired, skipped) =
            desired_contents(state, &BTreeMap::new(), current, &NodeSettings::default());
        assert!(skipped.is_empty(), "{skipped:?}");
        let ops = diff(current, &desired);
        (desired, ops)
    }

    fn apply(current: &mut MapContents, ops: &[Op]) {
        current.apply(ops);
    }

    /// What the datapath relies on after every single write: each master entry's slots
    /// exist and point at existing backends, and its rev-NAT entry exists.
    fn assert_consistent(maps: &MapContents) {
        for (key, value) in maps.services.iter().filter(|(k, _)| k.backend_slot == 0) {
            assert!(maps.rev_nat.contains_key(&value.rev_nat_index), "{key:?}");
            for slot in 1..=value.count {
                let slot_key = ServiceKey {
                    backend_slot: slot,
                    ..*key
                };
                let slot_value = maps.services.get(&slot_key).expect("slot missing");
                assert!(maps.backends.contains_key(&slot_value.backend_id));
            }
        }
    }

    fn apply_checking_each_step(current: &mut MapContents, ops: &[Op]) {
        for op in ops {
            apply(current, std::slice::from_ref(op));
            assert_consistent(current);
        }
    }

    #[test]
    fn terminating_backends_keep_slots_after_count_which_new_flows_never_pick() {
        let vip = tcp("10.96.0.10", 80);
        let (ready, terminating) = (tcp("10.244.0.2", 8080), tcp("10.244.0.3", 8080));
        let mut s = state(&[(vip, &[ready])]);
        s.services.get_mut(&vip).unwrap().terminating = vec![terminating];
        let (desired, _) = plan(&s, &MapContents::default());
        let key = |slot| ServiceKey::new(vip.ip, 80, PROTO_TCP, slot);
        assert_eq!(
            desired.services[&key(0)].count,
            1,
            "new flows pick slot 1 only"
        );
        let backend_of = |slot| desired.backends[&desired.services[&key(slot)].backend_id];
        assert_eq!(backend_of(1).address, ready.ip.octets());
        assert_eq!(backend_of(2).address, terminating.ip.octets());
        assert_eq!(desired.services.len(), 3);
    }

    #[test]
    fn a_backend_leaving_one_service_ends_that_pair_only_and_terminating_ends_none() {
        let (one, two) = (tcp("10.96.0.1", 80), tcp("10.96.0.2", 80));
        let (a, b) = (tcp("10.244.0.2", 8080), tcp("10.244.0.3", 8080));
        let (before, _) = plan(&state(&[(one, &[a]), (two, &[a])]), &MapContents::default());
        let rev_nat = |maps: &MapContents, vip: &L4Addr| {
            maps.services[&ServiceKey::new(vip.ip, 80, PROTO_TCP, 0)].rev_nat_index
        };
        let id_of = |maps: &MapContents, backend: &L4Addr| {
            *maps
                .backends
                .iter()
                .find(|(_, v)| v.address == backend.ip.octets())
                .unwrap()
                .0
        };
        // `one` moves from a to b; a lives on behind `two`.
        let (_, ops) = plan(&state(&[(one, &[b]), (two, &[a])]), &before);
        assert!(removed_backends(&ops).is_empty(), "a still backs two");
        assert_eq!(
            ended_pairs(&before, &ops),
            BTreeSet::from([(rev_nat(&before, &one), id_of(&before, &a))])
        );
        // a turning terminating in `one` ends nothing: its flows finish there.
        let mut draining = state(&[(one, &[b]), (two, &[a])]);
        draining.services.get_mut(&one).unwrap().terminating = vec![a];
        let (_, ops) = plan(&draining, &before);
        assert!(ended_pairs(&before, &ops).is_empty(), "{ops:?}");
        // `one` removed: every pair of it ends.
        let (_, ops) = plan(&state(&[(two, &[a])]), &before);
        assert_eq!(
            ended_pairs(&before, &ops),
            BTreeSet::from([(rev_nat(&before, &one), id_of(&before, &a))])
        );
    }

    #[test]
    fn first_sync_writes_backends_then_slots_then_master() {
        let vip = tcp("10.96.0.10", 80);
        let s = state(&[(vip, &[tcp("10.244.0.2", 8080), tcp("10.244.0.3", 8080)])]);
        let (desired, ops) = plan(&s, &MapContents::default());
        assert_eq!(desired.backends.len(), 2);
        assert_eq!(desired.services.len(), 3);
        let position = |pred: &dyn Fn(&Op) -> bool| ops.iter().position(pred).unwrap();
        let master = position(&|op| matches!(op, Op::PutService(k, _) if k.backend_slot == 0));
        let last_slot = ops
            .iter()
            .rposition(|op| matches!(op, Op::PutService(k, _) if k.backend_slot != 0))
            .unwrap();
        let last_backend = ops
            .iter()
            .rposition(|op| matches!(op, Op::PutBackend(..)))
            .unwrap();
        assert!(last_backend < last_slot && last_slot < master);
        let mut maps = MapContents::default();
        apply_checking_each_step(&mut maps, &ops);
        assert_eq!(maps, desired);
    }

    /// Frontend -> backend addresses and rev-NAT target: what the maps mean,
    /// whatever ids they use.
    fn meaning(maps: &MapContents) -> BTreeMap<ServiceKey, (Vec<Backend>, RevNatValue)> {
        maps.services
            .iter()
            .filter(|(k, _)| k.backend_slot == 0)
            .map(|(key, master)| {
                let backends = (1..=master.count)
                    .map(|slot| {
                        let slot = maps.services[&ServiceKey {
                            backend_slot: slot,
                            ..*key
                        }];
                        maps.backends[&slot.backend_id]
                    })
                    .collect();
                (*key, (backends, maps.rev_nat[&master.rev_nat_index]))
            })
            .collect()
    }

    #[test]
    fn an_incremental_service_update_means_what_a_full_sync_means_and_leaves_no_garbage() {
        let b = |n: u8| tcp(&format!("10.244.0.{n}"), 8080);
        let vip = |n: u8| tcp(&format!("10.96.0.{n}"), 80);
        let before = state(&[
            (vip(1), &[b(1), b(2)]),
            (vip(2), &[b(2), b(3)]), // b(2) is shared with vip(1)
            (vip(3), &[b(4)]),
        ]);
        let (mut maps, _) = plan(&before, &MapContents::default());
        // vip(1) drops the shared b(2) and gains b(5); vip(3) goes; vip(4) arrives.
        let after = state(&[
            (vip(1), &[b(1), b(5)]),
            (vip(2), &[b(2), b(3)]),
            (vip(4), &[b(4), b(6)]),
        ]);
        let frontends: BTreeSet<L4Addr> = [vip(1), vip(3), vip(4)].into();
        let now: BTreeMap<L4Addr, ServiceFrontend> = after
            .services
            .iter()
            .filter(|(f, _)| frontends.contains(f))
            .map(|(f, s)| (*f, s.clone()))
            .collect();
        let (ops, skipped) = service_update(
            &Written::new(maps.clone()),
            &frontends,
            &now,
            &Capacities::default(),
        );
        assert!(skipped.is_empty(), "{skipped:?}");
        apply_checking_each_step(&mut maps, &ops);
        let (full, _) = plan(&after, &MapContents::default());
        assert_eq!(meaning(&maps), meaning(&full));
        // b(2) stays (vip(2) uses it), nothing unreferenced is left behind.
        let referenced: BTreeSet<u32> = maps
            .services
            .iter()
            .filter(|(k, _)| k.backend_slot != 0)
            .map(|(_, v)| v.backend_id)
            .collect();
        assert_eq!(
            maps.backends.keys().copied().collect::<BTreeSet<_>>(),
            referenced
        );
        assert_eq!(maps.rev_nat.len(), 3);
        // Nothing of vip(2) was touched.
        assert!(ops.iter().all(|op| match op {
            Op::PutService(k, _) | Op::DeleteService(k) => k.address != vip(2).ip.octets(),
            _ => true,
        }));
        // A full resync afterwards finds nothing to change.
        let (_, resync) = plan(&after, &maps);
        assert!(resync.is_empty(), "{resync:?}");
    }

    /// A full map fails one Service port loudly (unlike cilium#12815) and
    /// the others keep working; nothing is half-written, and the sync goes on.
    #[test]
    fn services_that_do_not_fit_are_skipped_whole_naming_the_map() {
        let b = |n: u8| tcp(&format!("10.244.0.{n}"), 8080);
        let vip = |n: u8| tcp(&format!("10.96.0.{n}"), 80);
        let settings = NodeSettings {
            capacities: Capacities {
                services: 8,
                ..Capacities::default()
            },
            ..NodeSettings::default()
        };
        let s = state(&[
            (vip(1), &[b(1), b(2), b(3)]),
            (vip(2), &[b(4), b(5), b(6)]),
            (vip(3), &[b(7), b(8), b(9)]),
        ]);
        let (desired, skipped) =
            desired_contents(&s, &BTreeMap::new(), &MapContents::default(), &settings);
        assert_eq!(desired.services.len(), 8);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].object, vip(3).to_string());
        assert!(skipped[0]
            .reason
            .contains("ferrite_service is full (8 entries)"));
        let mut maps = MapContents::default();
        apply_checking_each_step(&mut maps, &diff(&MapContents::default(), &desired));
        // Incrementally too: a new port does not fit until another one leaves.
        let written = Written::new(maps.clone());
        let only = |f: L4Addr| -> BTreeMap<L4Addr, ServiceFrontend> {
            [(f, s.services[&f].clone())].into()
        };
        let (ops, skipped) = service_update(
            &written,
            &[vip(3)].into(),
            &only(vip(3)),
            &settings.capacities,
        );
        assert!(ops.is_empty() && skipped.len() == 1, "{ops:?} {skipped:?}");
        // vip(1) goes: its room is free once its removal is written, so vip(3) fits
        // on the next update (writes come before removals within one).
        let (ops, skipped) = service_update(
            &written,
            &[vip(1), vip(3)].into(),
            &only(vip(3)),
            &settings.capacities,
        );
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        apply_checking_each_step(&mut maps, &ops);
        assert_eq!(maps.services.len(), 4);
        let (ops, skipped) = service_update(
            &Written::new(maps.clone()),
            &[vip(3)].into(),
            &only(vip(3)),
            &settings.capacities,
        );
        assert!(skipped.is_empty(), "{skipped:?}");
        apply_checking_each_step(&mut maps, &ops);
        assert_eq!(maps.services.len(), 8);
        // A working port that would grow past the capacity keeps its old backends.
        let grown = state(&[
            (vip(2), &[b(4), b(5), b(6), b(10)]),
            (vip(3), &[b(7), b(8), b(9)]),
        ]);
        let (desired, skipped) = desired_contents(&grown, &BTreeMap::new(), &maps, &settings);
        assert!(
            skipped[0].reason.contains("its backends stay"),
            "{skipped:?}"
        );
        let before = meaning(&maps);
        let ops = diff(&maps, &desired);
        apply_checking_each_step(&mut maps, &ops);
        assert_eq!(meaning(&maps), before);
    }

    #[test]
    fn resync_of_unchanged_state_writes_nothing() {
        let s = state(&[(tcp("10.96.0.10", 80), &[tcp("10.244.0.2", 8080)])]);
        let (desired, _) = plan(&s, &MapContents::default());
        let (again, ops) = plan(&s, &desired);
        assert!(ops.is_empty(), "{ops:?}");
        assert_eq!(again, desired);
    }

    #[test]
    fn shrinking_and_growing_services_stay_consistent_at_every_step() {
        let vip = tcp("10.96.0.10", 80);
        let b = |n: u8| tcp(&format!("10.244.0.{n}"), 8080);
        let mut maps = MapContents::default();
        for backends in [
            vec![b(1), b(2), b(3)],
            vec![b(1), b(3)],
            vec![b(1), b(3), b(4), b(5)],
            vec![],
            vec![b(2)],
        ] {
            let s = state(&[(vip, &backends)]);
            let (desired, ops) = plan(&s, &maps);
            apply_checking_each_step(&mut maps, &ops);
            assert_eq!(maps, desired);
        }
    }

    #[test]
    fn ids_are_kept_for_unchanged_backends_and_not_reused_within_a_pass() {
        let vip = tcp("10.96.0.10", 80);
        let (first, ops) = plan(
            &state(&[(vip, &[tcp("10.244.0.1", 80), tcp("10.244.0.2", 80)])]),
            &MapContents::default(),
        );
        let mut maps = MapContents::default();
        apply(&mut maps, &ops);
        let id_of = |maps: &MapContents, ip: &str| {
            let octets = ip.parse::<Ipv4Addr>().unwrap().octets();
            maps.backends
                .iter()
                .find(|(_, b)| b.address == octets)
                .map(|(id, _)| *id)
        };
        let kept = id_of(&first, "10.244.0.2").unwrap();
        let removed = id_of(&first, "10.244.0.1").unwrap();
        // Replace .1 by .3: .2 keeps its id, .3 must not take .1's id while .1 is
        // still in the maps.
        let (second, ops) = plan(
            &state(&[(vip, &[tcp("10.244.0.2", 80), tcp("10.244.0.3", 80)])]),
            &maps,
        );
        assert_eq!(id_of(&second, "10.244.0.2"), Some(kept));
        assert_ne!(id_of(&second, "10.244.0.3"), Some(removed));
        assert_eq!(removed_backends(&ops), BTreeSet::from([removed]));
    }

    #[test]
    fn a_backend_shared_by_two_services_is_written_once() {
        let shared = tcp("10.244.0.9", 80);
        let (desired, _) = plan(
            &state(&[
                (tcp("10.96.0.1", 80), &[shared]),
                (tcp("10.96.0.2", 80), &[shared]),
            ]),
            &MapContents::default(),
        );
        assert_eq!(desired.backends.len(), 1);
        assert_eq!(desired.rev_nat.len(), 2);
    }

    #[test]
    fn pods_without_an_interface_wait_and_the_rest_are_written() {
        let mut s = DesiredState::default();
        for (n, interface) in [(2u8, "ferA"), (3, "ferB")] {
            let ip = Ipv4Addr::new(10, 244, 0, n);
            s.pods.insert(
                ip,
                LocalPod {
                    namespace: "default".into(),
                    name: format!("pod{n}"),
                    ip,
                    interface: interface.into(),
                },
            );
        }
        let interfaces = BTreeMap::from([(
            "ferA".to_string(),
            Interface {
                ifindex: 7,
                mac: [2, 0, 0, 0, 0, 7],
                mtu: 1450,
            },
        )]);
        let (desired, skipped) = desired_contents(
            &s,
            &interfaces,
            &MapContents::default(),
            &NodeSettings::default(),
        );
        assert_eq!(desired.endpoints.len(), 1);
        let info = desired.endpoints.values().next().unwrap();
        assert_eq!(
            (info.ifindex, info.pod_mac),
            (7, pod_mac_for(Ipv4Addr::new(10, 244, 0, 2)))
        );
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].reason.contains("ferB"));
    }

    #[test]
    fn endpoints_written_by_the_cni_stay_while_their_interface_exists() {
        let cni_written = |ifindex| {
            (
                EndpointKey {
                    address: [10, 244, 0, ifindex as u8],
                },
                EndpointInfo {
                    ifindex,
                    ..EndpointInfo::default()
                },
            )
        };
        let current = MapContents {
            endpoints: [cni_written(7), cni_written(8)].into(),
            ..MapContents::default()
        };
        let interfaces = BTreeMap::from([(
            "ferlive".to_string(),
            Interface {
                ifindex: 7,
                mac: [0; 6],
                mtu: 1450,
            },
        )]);
        let (desired, _) = desired_contents(
            &DesiredState::default(),
            &interfaces,
            &current,
            &NodeSettings::default(),
        );
        let endpoint_ops: Vec<Op> = diff(&current, &desired)
            .into_iter()
            .filter(|op| matches!(op, Op::PutEndpoint(..) | Op::DeleteEndpoint(_)))
            .collect();
        assert_eq!(
            endpoint_ops,
            vec![Op::DeleteEndpoint(cni_written(8).0)],
            "only the endpoint of the vanished interface goes"
        );
    }

    #[test]
    fn removals_come_after_every_write_and_masters_go_first() {
        let vip = tcp("10.96.0.10", 80);
        let mut maps = MapContents::default();
        let (_, ops) = plan(&state(&[(vip, &[tcp("10.244.0.1", 80)])]), &maps);
        apply(&mut maps, &ops);
        let (_, ops) = plan(
            &state(&[(tcp("10.96.0.11", 80), &[tcp("10.244.0.2", 80)])]),
            &maps,
        );
        let first_delete = ops
            .iter()
            .position(|op| {
                matches!(
                    op,
                    Op::DeleteService(_) | Op::DeleteBackend(_) | Op::DeleteRevNat(_)
                )
            })
            .unwrap();
        assert!(ops[..first_delete].iter().all(|op| matches!(
            op,
            Op::PutBackend(..) | Op::PutRevNat(..) | Op::PutService(..) | Op::PutEndpoint(..)
        )));
        assert!(matches!(ops[first_delete], Op::DeleteService(k) if k.backend_slot == 0));
        apply_checking_each_step(&mut maps, &ops);
    }

    fn node(name: &str, ip: [u8; 4], cidr: &str) -> crate::model::ClusterNode {
        crate::model::ClusterNode {
            name: name.into(),
            ip: Ipv4Addr::from(ip),
            pod_cidrs: vec![cidr.parse().unwrap()],
            vtep_mac: ferrite_common::vtep_mac_for(Ipv4Addr::from(ip)),
        }
    }

    #[test]
    fn nodes_become_routes_and_removing_one_touches_only_its_route() {
        let settings = NodeSettings {
            node: "a".into(),
            vni: 7,
            ..NodeSettings::default()
        };
        let mut s = DesiredState::default();
        for n in [
            node("a", [198, 51, 100, 1], "10.244.0.0/24"),
            node("b", [198, 51, 100, 2], "10.244.1.0/24"),
            node("c", [198, 51, 100, 3], "10.244.2.0/24"),
        ] {
            s.nodes.insert(n.name.clone(), n);
        }
        let interfaces = BTreeMap::from([(
            VXLAN_DEVICE.to_string(),
            Interface {
                ifindex: 9,
                mac: [0; 6],
                mtu: 1400,
            },
        )]);
        let (desired, _) = desired_contents(&s, &interfaces, &MapContents::default(), &settings);
        assert_eq!(desired.config.vni, 7);
        assert_eq!(desired.config.vxlan_ifindex, 9);
        assert_eq!(
            desired.config.pod_mtu, 1400,
            "pods get the VXLAN device's MTU"
        );
        assert_eq!(desired.config.node_ip, [198, 51, 100, 1]);
        let route = |n: [u8; 4]| RouteKey {
            prefix_len: 24,
            network: n,
        };
        assert_eq!(desired.routes[&route([10, 244, 0, 0])].flags, ROUTE_LOCAL);
        assert_eq!(desired.routes[&route([10, 244, 1, 0])].flags, ROUTE_REMOTE);
        let node_b = RouteKey {
            prefix_len: 32,
            network: [198, 51, 100, 2],
        };
        assert_eq!(desired.routes[&node_b].flags, ROUTE_NODE);
        assert!(!desired
            .routes
            .keys()
            .any(|k| k.network == [198, 51, 100, 1]));
        let ops = diff(&MapContents::default(), &desired);
        assert!(matches!(ops[0], Op::PutConfig(_)), "config first: {ops:?}");

        s.nodes.remove("c");
        let (smaller, _) = desired_contents(&s, &interfaces, &desired, &settings);
        // Its pod CIDR and its own address (for NodePort replies) go, nothing else;
        // then the route epoch moves on, last, so no flow keeps a route cached from
        // before.
        assert_eq!(
            diff(&desired, &smaller),
            vec![
                Op::DeleteRoute(route([10, 244, 2, 0])),
                Op::DeleteRoute(RouteKey {
                    prefix_len: 32,
                    network: [198, 51, 100, 3],
                }),
                Op::PutConfig(NodeConfig {
                    route_epoch: desired.config.route_epoch + 1,
                    ..smaller.config
                }),
            ]
        );
    }

    #[test]
    fn the_route_epoch_moves_on_last_after_endpoint_changes_and_only_then() {
        let mut current = MapContents::default();
        current.config.route_epoch = 41;
        let mut desired = current.clone();
        let pod = EndpointKey {
            address: [10, 244, 0, 5],
        };
        desired.endpoints.insert(pod, EndpointInfo::default());
        let ops = diff(&current, &desired);
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(matches!(ops[0], Op::PutEndpoint(..)));
        assert_eq!(
            ops[1],
            Op::PutConfig(NodeConfig {
                route_epoch: 42,
                ..desired.config
            })
        );

        // Only Services changing: the caches stay valid.
        let mut services_only = current.clone();
        services_only.rev_nat.insert(
            1,
            RevNatValue {
                address: [10, 96, 0, 1],
                port: 80,
                _pad: 0,
            },
        );
        assert!(diff(&current, &services_only)
            .iter()
            .all(|op| !matches!(op, Op::PutConfig(_))));
        // A config change alone keeps the epoch.
        let mut mtu = current.clone();
        mtu.config.pod_mtu = 1400;
        assert_eq!(diff(&current, &mtu), vec![Op::PutConfig(mtu.config)]);
    }
}
