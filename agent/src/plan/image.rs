//! The map image: what the maps hold or should hold, key by key, the ops that write
//! it, and how model values render into map values.
use std::collections::{BTreeMap, BTreeSet};

use ferrite_common::{
    policy::{IpcacheValue, PolicyKey, PolicyValue},
    service_scope, Backend, Backend6, Endpoint6Key, EndpointInfo, EndpointKey, NodeConfig,
    RevNat6Value, RevNatValue, RouteInfo, Service6Key, ServiceKey, ServiceValue, MAGLEV_TABLE_SIZE,
    ROUTE_NODE,
};
use sha2::{Digest, Sha256};

use super::LbFamily;
use crate::model::{L4Addr, Protocol};

/// What the maps hold (read back from the kernel) or should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nat: BTreeMap<u32, RevNatValue>,
    /// The IPv6 Services (`ferrite_lb6_*`): the same layout with IPv6 addresses;
    /// backend ids and rev-NAT indexes share one id space with IPv4's.
    pub services6: BTreeMap<Service6Key, ServiceValue>,
    pub backends6: BTreeMap<u32, Backend6>,
    pub rev_nat6: BTreeMap<u32, RevNat6Value>,
    pub endpoints: BTreeMap<EndpointKey, EndpointInfo>,
    /// The pods' IPv6 addresses (`ferrite_endpnt6`), the same values as their IPv4
    /// entries.
    pub endpoints6: BTreeMap<Endpoint6Key, EndpointInfo>,
    pub routes: BTreeMap<RouteKey, RouteInfo>,
    /// The IPv6 pod CIDRs (`ferrite_routes6`), the same values as the nodes' IPv4
    /// pod CIDRs, and the other nodes' IPv6 addresses (/128, `ROUTE_NODE`).
    pub routes6: BTreeMap<Route6Key, RouteInfo>,
    pub config: NodeConfig,
    /// Maglev table of each external frontend, by the digest it was built from.
    pub maglev: BTreeMap<ServiceKey, u64>,
    pub source_ranges: BTreeSet<SourceRange>,
    /// NetworkPolicy: address prefix -> identity.
    pub ipcache: BTreeMap<RouteKey, IpcacheValue>,
    /// NetworkPolicy: what each policed pod allows.
    pub policy: BTreeMap<PolicyRule, PolicyValue>,
}

impl MapContents {
    /// Routes to pod CIDRs (this node's and others'), without other nodes' own /32s.
    pub fn pod_routes(&self) -> usize {
        self.routes
            .values()
            .filter(|r| r.flags & ROUTE_NODE == 0)
            .count()
    }

    /// Routes to IPv6 pod CIDRs, without other nodes' own IPv6 /128s.
    pub fn pod_routes6(&self) -> usize {
        self.routes6
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
                Op::PutBackend6(id, value) => drop(self.backends6.insert(id, value)),
                Op::PutRevNat6(index, value) => drop(self.rev_nat6.insert(index, value)),
                Op::PutService6(key, value) => drop(self.services6.insert(key, value)),
                Op::DeleteService6(key) => drop(self.services6.remove(&key)),
                Op::DeleteRevNat6(index) => drop(self.rev_nat6.remove(&index)),
                Op::DeleteBackend6(id) => drop(self.backends6.remove(&id)),
                Op::PutEndpoint(key, value) => drop(self.endpoints.insert(key, value)),
                Op::PutEndpoint6(key, value) => drop(self.endpoints6.insert(key, value)),
                Op::PutConfig(config) => self.config = config,
                Op::PutRoute(key, value) => drop(self.routes.insert(key, value)),
                Op::DeleteRoute(key) => drop(self.routes.remove(&key)),
                Op::PutRoute6(key, value) => drop(self.routes6.insert(key, value)),
                Op::DeleteRoute6(key) => drop(self.routes6.remove(&key)),
                Op::DeleteService(key) => drop(self.services.remove(&key)),
                Op::DeleteRevNat(index) => drop(self.rev_nat.remove(&index)),
                Op::DeleteBackend(id) => drop(self.backends.remove(&id)),
                Op::DeleteEndpoint(key) => drop(self.endpoints.remove(&key)),
                Op::DeleteEndpoint6(key) => drop(self.endpoints6.remove(&key)),
                Op::PutMaglev(key, _, digest) => drop(self.maglev.insert(key, digest)),
                Op::DeleteMaglev(key) => drop(self.maglev.remove(&key)),
                Op::PutSourceRange(range) => drop(self.source_ranges.insert(range)),
                Op::DeleteSourceRange(range) => drop(self.source_ranges.remove(&range)),
                Op::PutIpcache(key, value) => drop(self.ipcache.insert(key, value)),
                Op::DeleteIpcache(key) => drop(self.ipcache.remove(&key)),
                Op::PutPolicy(rule, value) => drop(self.policy.insert(rule, value)),
                Op::DeletePolicy(rule) => drop(self.policy.remove(&rule)),
            }
        }
    }
}

/// What the plan needs of an IP family's endpoint map (`ferrite_endpnt`,
/// `ferrite_endpnt6`): its key, where a map image holds it and the ops that write
/// it, so the endpoint rules are written once for both families.
pub trait EndpointFamily: crate::family::Family {
    type Key: Copy + Ord + std::fmt::Debug;

    fn endpoint_key(self) -> Self::Key;
    fn endpoints(maps: &MapContents) -> &BTreeMap<Self::Key, EndpointInfo>;
    fn endpoints_mut(maps: &mut MapContents) -> &mut BTreeMap<Self::Key, EndpointInfo>;
}

impl EndpointFamily for std::net::Ipv4Addr {
    type Key = EndpointKey;

    fn endpoint_key(self) -> EndpointKey {
        EndpointKey {
            address: self.octets(),
        }
    }

    fn endpoints(maps: &MapContents) -> &BTreeMap<EndpointKey, EndpointInfo> {
        &maps.endpoints
    }

    fn endpoints_mut(maps: &mut MapContents) -> &mut BTreeMap<EndpointKey, EndpointInfo> {
        &mut maps.endpoints
    }
}

impl EndpointFamily for std::net::Ipv6Addr {
    type Key = Endpoint6Key;

    fn endpoint_key(self) -> Endpoint6Key {
        Endpoint6Key {
            address: self.octets(),
        }
    }

    fn endpoints(maps: &MapContents) -> &BTreeMap<Endpoint6Key, EndpointInfo> {
        &maps.endpoints6
    }

    fn endpoints_mut(maps: &mut MapContents) -> &mut BTreeMap<Endpoint6Key, EndpointInfo> {
        &mut maps.endpoints6
    }
}

/// Key of `ferrite_routes` (an LPM trie key, made orderable for the diff).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteKey {
    pub prefix_len: u32,
    pub network: [u8; 4],
}

/// Key of `ferrite_routes6` (an LPM trie key, made orderable for the diff).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route6Key {
    pub prefix_len: u32,
    pub network: ferrite_common::Route6Prefix,
}

/// An entry of `ferrite_policy`: its key data and how many of its bits count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRule {
    pub prefix_len: u32,
    pub key: PolicyKey,
}

/// An entry of `ferrite_srcrng`: a client network allowed to reach a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    pub frontend: ServiceKey,
    pub network: [u8; 4],
    /// Bits of `network` (the LPM key's prefix adds the frontend's 96).
    pub prefix_len: u32,
}

/// One write to one map entry: a plan is an ordered list of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, Backend),
    PutRevNat(u32, RevNatValue),
    PutService(ServiceKey, ServiceValue),
    PutEndpoint(EndpointKey, EndpointInfo),
    PutEndpoint6(Endpoint6Key, EndpointInfo),
    PutConfig(NodeConfig),
    PutRoute(RouteKey, RouteInfo),
    DeleteRoute(RouteKey),
    PutRoute6(Route6Key, RouteInfo),
    DeleteRoute6(Route6Key),
    DeleteService(ServiceKey),
    DeleteRevNat(u32),
    DeleteBackend(u32),
    DeleteEndpoint(EndpointKey),
    DeleteEndpoint6(Endpoint6Key),
    PutBackend6(u32, Backend6),
    PutRevNat6(u32, RevNat6Value),
    PutService6(Service6Key, ServiceValue),
    DeleteService6(Service6Key),
    DeleteRevNat6(u32),
    DeleteBackend6(u32),
    /// Build and write the Maglev table of a frontend from its `count` slots (already
    /// written) - `digest` says what it is built from.
    PutMaglev(ServiceKey, u16, u64),
    DeleteMaglev(ServiceKey),
    PutSourceRange(SourceRange),
    DeleteSourceRange(SourceRange),
    PutIpcache(RouteKey, IpcacheValue),
    DeleteIpcache(RouteKey),
    PutPolicy(PolicyRule, PolicyValue),
    DeletePolicy(PolicyRule),
}

impl Op {
    /// Whether this op removes an entry (rather than writing one).
    pub fn removes(&self) -> bool {
        matches!(
            self,
            Op::DeleteRoute(_)
                | Op::DeleteRoute6(_)
                | Op::DeleteService(_)
                | Op::DeleteRevNat(_)
                | Op::DeleteBackend(_)
                | Op::DeleteEndpoint(_)
                | Op::DeleteEndpoint6(_)
                | Op::DeleteService6(_)
                | Op::DeleteRevNat6(_)
                | Op::DeleteBackend6(_)
                | Op::DeleteMaglev(_)
                | Op::DeleteSourceRange(_)
                | Op::DeleteIpcache(_)
                | Op::DeletePolicy(_)
        )
    }
}

/// The map an op writes.
pub fn op_map(op: &Op) -> &'static str {
    use ferrite_common::map_names;
    match op {
        Op::PutBackend(..) | Op::DeleteBackend(_) => map_names::BACKENDS,
        Op::PutRevNat(..) | Op::DeleteRevNat(_) => map_names::REV_NAT,
        Op::PutService(..) | Op::DeleteService(_) => map_names::SERVICES,
        Op::PutBackend6(..) | Op::DeleteBackend6(_) => map_names::BACKENDS6,
        Op::PutRevNat6(..) | Op::DeleteRevNat6(_) => map_names::REV_NAT6,
        Op::PutService6(..) | Op::DeleteService6(_) => map_names::SERVICES6,
        Op::PutEndpoint(..) | Op::DeleteEndpoint(_) => map_names::ENDPOINTS,
        Op::PutEndpoint6(..) | Op::DeleteEndpoint6(_) => map_names::ENDPOINTS6,
        Op::PutConfig(_) => map_names::CONFIG,
        Op::PutRoute(..) | Op::DeleteRoute(_) => map_names::ROUTES,
        Op::PutRoute6(..) | Op::DeleteRoute6(_) => map_names::ROUTES6,
        Op::PutMaglev(..) | Op::DeleteMaglev(_) => map_names::MAGLEV,
        Op::PutSourceRange(_) | Op::DeleteSourceRange(_) => map_names::SOURCE_RANGES,
        Op::PutIpcache(..) | Op::DeleteIpcache(_) => map_names::IPCACHE,
        Op::PutPolicy(..) | Op::DeletePolicy(_) => map_names::POLICY,
    }
}

/// The `ferrite_service` (`ferrite_lb6_svc`) entries of one frontend, its ids
/// chosen: the plan writes each Service port through this, the packet test bed too,
/// so the two cannot lay them out differently. Its rev-NAT entry is
/// `rev_nat_value(frontend)` under `rev_nat_index`, written apart (a plan writes one
/// per frontend address).
#[derive(Clone, Copy, Debug)]
pub struct FrontendEntries<'a, A: LbFamily = std::net::Ipv4Addr> {
    pub frontend: L4Addr<A>,
    /// Whose entries (`service_scope`): every client's, or the in-cluster ones'.
    pub scope: u8,
    pub rev_nat_index: u32,
    /// The backend id of each slot from slot 1: the ready backends, then the
    /// terminating ones (no new flow picks them, but their flows name them).
    pub backend_ids: &'a [u32],
    /// How many of `backend_ids` are ready: new flows pick slots `1..=ready`.
    pub ready: u16,
    /// `svc_flag` bits.
    pub flags: u32,
    /// Session affinity (0: none).
    pub affinity_timeout_s: u32,
}

impl<A: LbFamily> FrontendEntries<'_, A> {
    /// The key of the frontend's master entry (slot 0) in its scope.
    pub fn master(&self) -> A::ServiceKey {
        A::at(&A::service_key(&self.frontend, 0), self.scope, 0)
    }

    /// Put the slots and the master entry into `out`.
    pub fn write_into(&self, out: &mut MapContents) {
        let master = self.master();
        let services = A::services_mut(out);
        for (index, id) in self.backend_ids.iter().enumerate() {
            let slot = u16::try_from(index + 1).expect("slots are bounded");
            let value = ServiceValue {
                backend_id: *id,
                ..ServiceValue::default()
            };
            services.insert(A::at(&master, self.scope, slot), value);
        }
        services.insert(
            master,
            ServiceValue {
                backend_id: 0,
                count: self.ready,
                rev_nat_index: self.rev_nat_index,
                flags: self.flags,
                affinity_timeout_s: self.affinity_timeout_s,
                _pad: 0,
            },
        );
    }
}

/// The `ferrite_backend` value of a backend address.
pub fn backend_value(addr: &L4Addr) -> Backend {
    <std::net::Ipv4Addr as LbFamily>::backend_value(addr)
}

/// The `ferrite_rev_nat` value of a frontend: what replies are rewritten to.
pub fn rev_nat_value(frontend: &L4Addr) -> RevNatValue {
    <std::net::Ipv4Addr as LbFamily>::rev_nat_value(frontend)
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

/// Human-readable policy entry (for logs, inspect and golden files): `pod
/// 10.244.0.10 ingress from identity 17 TCP 80-80`.
pub fn describe_policy_rule(rule: &PolicyRule) -> String {
    use ferrite_common::policy::{
        DIRECTION_INGRESS, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL,
    };
    let key = &rule.key;
    let (direction, peer) = match key.direction {
        DIRECTION_INGRESS => ("ingress", "from"),
        _ => ("egress", "to"),
    };
    let identity = match u32::from_be_bytes(key.identity) {
        ferrite_common::policy::IDENTITY_ANY => "any peer".to_string(),
        id => format!("identity {id}"),
    };
    let what = if rule.prefix_len <= POLICY_PREFIX_ANY_PROTOCOL {
        "any protocol".to_string()
    } else {
        let protocol = match key.protocol {
            6 => "TCP".to_string(),
            17 => "UDP".to_string(),
            132 => "SCTP".to_string(),
            other => format!("proto{other}"),
        };
        let bits = rule
            .prefix_len
            .saturating_sub(POLICY_PREFIX_ANY_PORT)
            .min(16);
        if bits == 0 {
            format!("{protocol} any port")
        } else {
            let first = u16::from_be_bytes(key.port);
            let last = first | (u16::MAX.checked_shr(bits).unwrap_or(0));
            format!("{protocol} {first}-{last}")
        }
    };
    format!(
        "pod {} {direction} {peer} {identity} {what}",
        std::net::Ipv4Addr::from(key.endpoint)
    )
}

/// Human-readable frontend of a service key (for logs and inspect); entries of the
/// in-cluster scope say so.
pub fn describe_service_key(key: &ServiceKey) -> String {
    <std::net::Ipv4Addr as LbFamily>::describe(key)
}

/// [`describe_service_key`] of an IPv6 frontend: `[fd00::10]:80/TCP`.
pub fn describe_service6_key(key: &Service6Key) -> String {
    <std::net::Ipv6Addr as LbFamily>::describe(key)
}

pub(super) fn describe_frontend(ip: std::net::IpAddr, port: u16, proto: u8, scope: u8) -> String {
    let protocol = Protocol::from_number(proto)
        .map(|p| p.to_string())
        .unwrap_or_else(|| format!("proto{proto}"));
    let scope = match scope {
        service_scope::ALL => String::new(),
        service_scope::IN_CLUSTER => " (in-cluster)".to_string(),
        other => format!(" (scope {other})"),
    };
    format!("{}/{protocol}{scope}", std::net::SocketAddr::new(ip, port))
}
