//! The one contract between Ferrite's eBPF datapath and its userspace agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding so the kernel,
//! the agent and `bpftool map dump` (through BTF) all agree on the layout.
//! Conventions, chosen so `bpftool` output stays readable:
//! - IPv4 addresses are `[u8; 4]` in network order (bpftool prints `[10,96,0,10]`);
//! - ports are `u16` in **host** order (bpftool prints `80`); the datapath converts.
#![no_std]

use core::net::Ipv4Addr;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// Defines the map name constants, `ALL`, and `map_name!` (the same names as string
/// literals, for the datapath's map attributes, which take no constant).
macro_rules! define_map_names {
    ($($(#[$doc:meta])* $constant:ident = $name:literal,)*) => {
        $($(#[$doc])* pub const $constant: &str = $name;)*
        pub const ALL: [&str; [$($name),*].len()] = [$($constant),*];

        /// A name of [`map_names`](crate::map_names) as a string literal, for
        /// attributes: `map_name!(SERVICES)` is `"ferrite_service"`.
        #[macro_export]
        macro_rules! map_name {
            $(($constant) => { $name };)*
        }
    };
}

/// Map names. Kernel object names are limited to 15 characters, so these are
/// exactly what `bpftool map list` shows; they are also the pin file names.
pub mod map_names {
    define_map_names! {
        SERVICES = "ferrite_service",
        BACKENDS = "ferrite_backend",
        REV_NAT = "ferrite_rev_nat",
        ENDPOINTS = "ferrite_endpnt",
        /// The IPv6 addresses of this node's pods (`ENDPOINTS` for IPv4).
        ENDPOINTS6 = "ferrite_endpnt6",
        CONNTRACK = "ferrite_ct",
        STATS = "ferrite_stats",
        CONFIG = "ferrite_config",
        ROUTES = "ferrite_routes",
        /// The cluster's IPv6 pod CIDRs, by node (`ROUTES` for IPv4; the same
        /// [`RouteInfo`](crate::RouteInfo): the tunnel stays IPv4).
        ROUTES6 = "ferrite_routes6",
        LB_STATS = "ferrite_lbstats",
        MAGLEV = "ferrite_maglev",
        AFFINITY = "ferrite_affin",
        SOURCE_RANGES = "ferrite_srcrng",
        FRAGMENTS = "ferrite_frags",
        SOCK_REV_NAT = "ferrite_sockrev",
        SOCK_SERVICE = "ferrite_sk_svc",
        /// Ring buffer of [`MonitorEvent`](crate::MonitorEvent)s for `ferrite monitor`.
        EVENTS = "ferrite_events",
        /// Which events listeners want now (`monitor::WANT_*`), set by the agent.
        MONITOR = "ferrite_monitor",
        /// What the last explain run on each CPU did (`ferrite explain`).
        TRACE = "ferrite_trace",
        /// Address prefix -> NetworkPolicy identity (`policy`).
        IPCACHE = "ferrite_ipcache",
        /// What each policed pod allows (`policy`).
        POLICY = "ferrite_policy",
        /// Backend ids whose flows `program_names::PURGE` deletes (`purge`).
        PURGE_BACKENDS = "ferrite_purgebe",
        /// (rev-NAT index, backend id) pairs whose flows it deletes (`purge`).
        PURGE_PAIRS = "ferrite_purgepr",
        /// Programs the attached ones tail-call (`tail_call` slots), filled by the
        /// agent at load.
        TAIL_CALLS = "ferrite_progs",
        /// IPv6 Service frontends and their backend slots (`SERVICES` for IPv6).
        SERVICES6 = "ferrite_lb6_svc",
        /// IPv6 backends by id (`BACKENDS` for IPv6; one id space for both).
        BACKENDS6 = "ferrite_lb6_be",
        /// IPv6 frontends by rev-NAT index (`REV_NAT` for IPv6; one id space).
        REV_NAT6 = "ferrite_lb6_rev",
        /// `SOCK_REV_NAT` for IPv6 UDP sockets.
        SOCK_REV_NAT6 = "ferrite_sockrv6",
        /// `SOCK_SERVICE` for IPv6 TCP sockets.
        SOCK_SERVICE6 = "ferrite_sk_svc6",
    }
}

/// Slots of `ferrite_progs`: programs reached by a tail call, each with a fresh
/// 512-byte stack (an IPv6 branch inside `ferrite_from_pod` would exceed its own).
pub mod tail_call {
    use crate::program_names;

    /// `ferrite_from_pod` jumps here with every IPv6 frame.
    pub const FROM_POD6: u32 = 0;
    /// `ferrite_from_overlay` jumps here with every IPv6 frame another node sends.
    pub const FROM_OVERLAY6: u32 = 1;
    /// `ferrite_explain_pod` jumps here with every IPv6 frame (explain runs follow
    /// the real path).
    pub const EXPLAIN_POD6: u32 = 2;
    /// `ferrite_explain_overlay` jumps here with every IPv6 frame.
    pub const EXPLAIN_OVERLAY6: u32 = 3;
    /// Slots of the map.
    pub const SLOTS: u32 = 4;
    /// What the agent puts in each slot when it loads the object.
    pub const PROGRAMS: [(u32, &str); 4] = [
        (FROM_POD6, program_names::FROM_POD6),
        (FROM_OVERLAY6, program_names::FROM_OVERLAY6),
        (EXPLAIN_POD6, program_names::EXPLAIN_POD6),
        (EXPLAIN_OVERLAY6, program_names::EXPLAIN_OVERLAY6),
    ];
}

/// Program names in the object file.
pub mod program_names {
    /// tcx ingress of every pod's host-side veth: sees what the pod sends.
    pub const FROM_POD: &str = "ferrite_from_pod";
    /// What a pod sends over IPv6, reached by a tail call from `FROM_POD` (slot
    /// `tail_call::FROM_POD6`), never attached itself.
    pub const FROM_POD6: &str = "ferrite_from_pod6";
    /// tcx ingress of the node's VXLAN device: what other nodes send to this node's pods.
    pub const FROM_OVERLAY: &str = "ferrite_from_overlay";
    /// What other nodes send over IPv6, reached by a tail call from `FROM_OVERLAY`
    /// (slot `tail_call::FROM_OVERLAY6`), never attached itself.
    pub const FROM_OVERLAY6: &str = "ferrite_from_overlay6";
    /// Returns TC_ACT_OK and nothing else: the baseline `cargo xtask bench` compares with.
    pub const NOOP: &str = "ferrite_noop";
    /// Never attached: run with BPF_PROG_TEST_RUN, it writes the datapath's clock
    /// (jiffies, as a native-endian u64) over the first 8 bytes of the test packet.
    pub const CLOCK: &str = "ferrite_clock";
    /// Never attached: the bench's floors, one per established path, each only the
    /// work any datapath must do for that path's packet (datapath-ebpf's `floor`).
    /// An established Service flow to a local backend: a conntrack hit, the DNAT with
    /// its checksum fixes, the delivery.
    pub const FLOOR: &str = "ferrite_floor";
    /// ... to a backend on another node: the same DNAT, then the tunnel.
    pub const FLOOR_SERVICE_REMOTE: &str = "ferrite_floor_service_remote";
    /// A pod's packet to a pod of this node: endpoint lookup, MACs, redirect_peer.
    pub const FLOOR_POD_LOCAL: &str = "ferrite_floor_pod_local";
    /// ... to a pod of another node: route lookup, VTEP MACs, tunnel key, redirect.
    pub const FLOOR_POD_REMOTE: &str = "ferrite_floor_pod_remote";
    /// A flow delivered as its conntrack entry caches (NetworkPolicy's flows).
    pub const FLOOR_FLOW: &str = "ferrite_floor_flow";
    /// A Service flow's reply: conntrack hit, rev-NAT lookup, SNAT back, delivery.
    pub const FLOOR_REPLY: &str = "ferrite_floor_reply";
    /// XDP: an established NodePort flow's DNAT, and its DNAT + SNAT.
    pub const FLOOR_NODE_PORT: &str = "ferrite_floor_node_port";
    pub const FLOOR_NODE_PORT_SNAT: &str = "ferrite_floor_node_port_snat";
    /// The floors by program type.
    pub const TC_FLOORS: [&str; 6] = [
        FLOOR,
        FLOOR_SERVICE_REMOTE,
        FLOOR_POD_LOCAL,
        FLOOR_POD_REMOTE,
        FLOOR_FLOW,
        FLOOR_REPLY,
    ];
    pub const XDP_FLOORS: [&str; 2] = [FLOOR_NODE_PORT, FLOOR_NODE_PORT_SNAT];
    /// Never attached: run with BPF_PROG_TEST_RUN, it deletes the conntrack entries
    /// and affinity pins of the backends and pairs the agent put in the purge maps
    /// (`purge`).
    pub const PURGE: &str = "ferrite_purge";
    /// Returns XDP_PASS and nothing else: the bench's baseline for the XDP program.
    pub const NOOP_XDP: &str = "ferrite_noop_xdp";
    /// XDP on the node's uplink: NodePort, LoadBalancer and externalIP traffic from
    /// outside the cluster, balanced (Maglev) and NATed before the stack sees it.
    pub const FROM_WORLD: &str = "ferrite_from_world";
    /// tcx ingress of the node's uplink, after the XDP program: forwards what it
    /// translated to a local pod or through the overlay.
    pub const FROM_UPLINK: &str = "ferrite_from_uplink";
    /// tcx egress of every pod's host-side veth: what the host stack delivers to the
    /// pod (replies of Service flows whose backend is a node address, reverse-NATed).
    pub const TO_POD: &str = "ferrite_to_pod";
    /// tcx egress of the uplink and of `lo`: the per-packet Service path of the node's
    /// own processes (what socket-level load balancing does not cover).
    pub const FROM_HOST: &str = "ferrite_from_host";
    /// Never attached: `ferrite explain --socket` runs it with BPF_PROG_TEST_RUN on an
    /// `explain::SockRequest` to see the backend a socket call would get.
    pub const EXPLAIN_SOCK: &str = "ferrite_explain_sock";
    /// Never attached: the explain copies (`explain`) of the packet programs
    /// `ferrite explain` runs: the same logic, every write skipped and traced.
    pub const EXPLAIN_POD: &str = "ferrite_explain_pod";
    pub const EXPLAIN_OVERLAY: &str = "ferrite_explain_overlay";
    /// Their IPv6 halves, reached by tail call as the real ones' are (slots
    /// `tail_call::EXPLAIN_POD6`, `tail_call::EXPLAIN_OVERLAY6`).
    pub const EXPLAIN_POD6: &str = "ferrite_explain_pod6";
    pub const EXPLAIN_OVERLAY6: &str = "ferrite_explain_overlay6";
    pub const EXPLAIN_UPLINK: &str = "ferrite_explain_uplink";
    /// XDP, like the program it explains.
    pub const EXPLAIN_WORLD: &str = "ferrite_explain_world";
    /// Each program `ferrite explain` runs and its explain copy.
    pub const EXPLAIN: [(&str, &str); 4] = [
        (FROM_POD, EXPLAIN_POD),
        (FROM_OVERLAY, EXPLAIN_OVERLAY),
        (FROM_UPLINK, EXPLAIN_UPLINK),
        (FROM_WORLD, EXPLAIN_WORLD),
    ];
    /// cgroup/connect4: socket-level load balancing of TCP connects.
    pub const SOCK_CONNECT4: &str = "ferrite_connect4";
    /// cgroup/sendmsg4: socket-level load balancing of unconnected UDP sends.
    pub const SOCK_SENDMSG4: &str = "ferrite_sendmsg4";
    /// cgroup/recvmsg4: unconnected UDP answers appear to come from the Service.
    pub const SOCK_RECVMSG4: &str = "ferrite_recvmsg4";
    /// cgroup/getpeername4: a translated socket's peer is the Service address.
    pub const SOCK_GETPEERNAME4: &str = "ferrite_getpeername4";
    /// cgroup/connect6, sendmsg6, recvmsg6, getpeername6: the same for IPv6 sockets
    /// (and dual-stack ones naming IPv4 peers by IPv4-mapped addresses).
    pub const SOCK_CONNECT6: &str = "ferrite_connect6";
    pub const SOCK_SENDMSG6: &str = "ferrite_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "ferrite_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "ferrite_getpeername6";
    /// The socket-level programs, each with its cgroup attach point.
    pub const SOCKET_LB: [(&str, &str); 8] = [
        (SOCK_CONNECT4, "connect4"),
        (SOCK_SENDMSG4, "sendmsg4"),
        (SOCK_RECVMSG4, "recvmsg4"),
        (SOCK_GETPEERNAME4, "getpeername4"),
        (SOCK_CONNECT6, "connect6"),
        (SOCK_SENDMSG6, "sendmsg6"),
        (SOCK_RECVMSG6, "recvmsg6"),
        (SOCK_GETPEERNAME6, "getpeername6"),
    ];
}

/// Default map capacities (sized for 10k Services x 10 endpoints).
pub mod capacity {
    /// One master entry plus one slot per backend for every Service port.
    pub const SERVICES: u32 = 262_144;
    pub const BACKENDS: u32 = 131_072;
    pub const REV_NAT: u32 = 65_535;
    pub const ENDPOINTS: u32 = 4_096;
    pub const ENDPOINTS6: u32 = 4_096;
    pub const CONNTRACK: u32 = 262_144;
    pub const ROUTES: u32 = 16_384;
    /// One IPv6 pod CIDR per node (no node addresses: those are IPv4).
    pub const ROUTES6: u32 = 16_384;
    /// Service/backend pairs with traffic counters (LRU, per CPU: 16 bytes per CPU
    /// each, so this stays well below the backends map): the most recently active
    /// pairs are counted; an evicted pair starts again from zero (a counter reset).
    pub const LB_STATS: u32 = 32_768;
    /// Maglev tables, one per NodePort/LoadBalancer/externalIP frontend (32 KiB each,
    /// allocated as used: the map is not preallocated).
    pub const MAGLEV: u32 = 16_384;
    /// Client -> backend pins of `sessionAffinity: ClientIP` Services (LRU).
    pub const AFFINITY: u32 = 65_536;
    pub const SOURCE_RANGES: u32 = 16_384;
    /// IPv4 datagrams in fragments whose later fragments may still come (LRU;
    /// Cilium's default size).
    pub const FRAGMENTS: u32 = 8_192;
    /// Backend -> Service address of sockets the socket-level load balancer
    /// translated (LRU; read by recvmsg4/getpeername4).
    pub const SOCK_REV_NAT: u32 = 65_536;
    /// NetworkPolicy: every pod of the cluster and every ipBlock prefix (LPM trie:
    /// allocated as used).
    /// IPv6 Service maps: a quarter of the IPv4 ones by default (IPv6 Services are
    /// still the fewer in most clusters; `--map-capacity` raises them).
    pub const SERVICES6: u32 = SERVICES / 4;
    pub const BACKENDS6: u32 = BACKENDS / 4;
    pub const REV_NAT6: u32 = 16_384;
    pub const SOCK_REV_NAT6: u32 = SOCK_REV_NAT / 4;
    pub const IPCACHE: u32 = 131_072;
    /// NetworkPolicy: allowed (pod, direction, peer, protocol, port range) prefixes.
    pub const POLICY: u32 = 262_144;

    use crate::map_names;
    /// The default capacity of each sized map, by name: what the datapath declares and
    /// what `--map-capacity` may change. Maps not here have no capacity of their own:
    /// per-CPU counters, the one config entry, per-socket storage (as many entries as
    /// sockets), the event ring (a size in bytes, fixed at build time), the monitor's
    /// one entry and the explain runs' per-CPU trace.
    pub const DEFAULTS: [(&str, u32); 20] = [
        (map_names::SERVICES, SERVICES),
        (map_names::BACKENDS, BACKENDS),
        (map_names::REV_NAT, REV_NAT),
        (map_names::ENDPOINTS, ENDPOINTS),
        (map_names::ENDPOINTS6, ENDPOINTS6),
        (map_names::CONNTRACK, CONNTRACK),
        (map_names::ROUTES, ROUTES),
        (map_names::ROUTES6, ROUTES6),
        (map_names::LB_STATS, LB_STATS),
        (map_names::MAGLEV, MAGLEV),
        (map_names::AFFINITY, AFFINITY),
        (map_names::SOURCE_RANGES, SOURCE_RANGES),
        (map_names::FRAGMENTS, FRAGMENTS),
        (map_names::SOCK_REV_NAT, SOCK_REV_NAT),
        (map_names::IPCACHE, IPCACHE),
        (map_names::POLICY, POLICY),
        (map_names::SERVICES6, SERVICES6),
        (map_names::BACKENDS6, BACKENDS6),
        (map_names::REV_NAT6, REV_NAT6),
        (map_names::SOCK_REV_NAT6, SOCK_REV_NAT6),
    ];

    /// The default capacity of map `name`; `None` for a map without a capacity of its
    /// own (or no map of the datapath).
    pub fn default_for(name: &str) -> Option<u32> {
        DEFAULTS
            .iter()
            .find(|(sized, _)| *sized == name)
            .map(|(_, entries)| *entries)
    }
}

/// Entries of a Maglev table (prime; Cilium's default). Fixed at build time: it is
/// the size of a `ferrite_maglev` value.
pub const MAGLEV_TABLE_SIZE: usize = 16381;

/// Source ports this node SNATs forwarded NodePort flows to: above Linux's default
/// ephemeral range (32768-60999), so they never clash with the node's own sockets.
pub const SNAT_PORT_MIN: u16 = 61000;
pub const SNAT_PORT_MAX: u16 = 65535;

/// The source a pod's flow gets when a Service balances it back to the pod itself
/// (hairpin): a pod drops packets from its own address arriving from outside, so
/// the flow is SNATed to this link-local address (Cilium's choice) and its replies
/// come back through the pod's gateway.
pub const HAIRPIN_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// The node's VXLAN device (kernel vxlan in external/collect_md mode).
pub const VXLAN_DEVICE: &str = "ferrite_vxlan";
/// IANA's VXLAN port (Linux's own default is 8472, flannel's too): configurable.
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
pub const DEFAULT_VNI: u32 = 1;
/// VXLAN adds 50 bytes (outer Ethernet 14, IPv4 20, UDP 8, VXLAN 8): pod MTU = uplink - 50.
pub const VXLAN_OVERHEAD: u32 = 50;

/// Value of the LPM trie `ferrite_routes` (key: prefix length + IPv4 network, network
/// order) and of `ferrite_routes6` (key: prefix length + [`Route6Prefix`]): which
/// node owns a pod CIDR. Its underlay address stays IPv4: IPv6 pod traffic crosses
/// the overlay inside IPv4 VXLAN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteInfo {
    /// The owning node's underlay IP (network order); this node's own for `ROUTE_LOCAL`.
    pub node_ip: [u8; 4],
    /// Inner destination MAC for frames to that node's VTEP.
    pub vtep_mac: [u8; 6],
    pub flags: u16,
}

/// Data of a `ferrite_routes6` LPM trie key: an IPv6 pod CIDR's network (network
/// order); the key's prefix length is its length.
pub type Route6Prefix = [u8; 16];

/// `RouteInfo::flags`: this node's own pod CIDR (a miss in the endpoints map is a drop).
pub const ROUTE_LOCAL: u16 = 1;
/// `RouteInfo::flags`: another node's pod CIDR, reached through the overlay (or
/// natively, with `ROUTE_NATIVE`).
pub const ROUTE_REMOTE: u16 = 2;
/// `RouteInfo::flags`: another node's own IP (/32; its IPv6 InternalIP: /128 in
/// `ferrite_routes6`). Only replies to NodePort flows that node forwarded here
/// (destination port in its SNAT range) take the overlay; other pod traffic to it
/// goes through the stack as before. The socket programs serve it at a nodePort as
/// this node's NodePort. An IPv6 /128 is no source a node may send IPv6 from over
/// the overlay (only its IPv6 pod CIDR is).
pub const ROUTE_NODE: u16 = 4;
/// `RouteInfo::flags`, with `ROUTE_REMOTE` or `ROUTE_NODE`: that node is on-link on
/// this node's uplink and `--routing native` is on: its packets leave through the
/// uplink unencapsulated, to its MAC (`bpf_redirect_neigh`: the kernel's FIB takes
/// the agent's route `<pod CIDR> via <node IP> dev <uplink>`), instead of over the
/// VXLAN device.
pub const ROUTE_NATIVE: u16 = 8;

/// A node's VTEP MAC, derived from its underlay IP like pod MACs (`0a:58:<ip>`), so
/// every node knows every other's without an annotation. Linux VTEPs of other tools
/// can announce theirs with the `ferrite.dev/vtep-mac` Node annotation.
pub const fn vtep_mac_for(node_ip: Ipv4Addr) -> [u8; 6] {
    pod_mac_for(node_ip)
}

/// Key of `ferrite_service`, Cilium's lb4 layout: slot 0 is the Service's master
/// entry (backend count, rev-NAT id, flags); slots 1..=count each name one backend.
/// Picking a backend is then two O(1) lookups whatever the number of Services.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub address: [u8; 4],
    pub port: u16,
    pub proto: u8,
    /// Whose entries these are (`service_scope`): every client's, or the in-cluster
    /// clients' of a frontend whose master has `svc_flag::IN_CLUSTER_SCOPE`.
    pub scope: u8,
    pub backend_slot: u16,
    pub _pad2: u16,
}

/// `ServiceKey::scope`.
pub mod service_scope {
    /// The frontend's entries: what every client uses unless its master says otherwise.
    pub const ALL: u8 = 0;
    /// The entries of an `externalTrafficPolicy: Local` frontend that in-cluster
    /// clients (pods, the node's own processes) use: every ready endpoint, as
    /// kube-proxy gives them, while clients from outside keep the local ones.
    pub const IN_CLUSTER: u8 = 1;
}

impl ServiceKey {
    pub const fn new(address: Ipv4Addr, port: u16, proto: u8, backend_slot: u16) -> Self {
        Self {
            address: address.octets(),
            port,
            proto,
            scope: service_scope::ALL,
            backend_slot,
            _pad2: 0,
        }
    }

    /// The same entry of the frontend's other scope (`service_scope`).
    pub const fn in_scope(self, scope: u8) -> Self {
        Self { scope, ..self }
    }
}

/// Value of `ferrite_service`. For slot 0: `count`, `rev_nat_index`, `flags` and
/// `affinity_timeout_s` are set and `backend_id` is 0. For slot N: `backend_id` is set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub rev_nat_index: u32,
    pub flags: u32,
    /// `sessionAffinity: ClientIP` timeout (seconds); 0 = no affinity.
    pub affinity_timeout_s: u32,
    pub count: u16,
    pub _pad: u16,
}

/// `ServiceValue::flags` of a master entry.
pub mod svc_flag {
    /// A NodePort, LoadBalancer or externalIP frontend: reached from outside the
    /// cluster through the XDP program, balanced with its Maglev table.
    pub const EXTERNAL: u32 = 1;
    /// `externalTrafficPolicy: Local` (external) or `internalTrafficPolicy: Local`
    /// (ClusterIP): every backend is on this node, no SNAT, the client IP is kept.
    pub const LOCAL_ONLY: u32 = 2;
    /// A NodePort on this node's IP: without backends it goes to the stack, which
    /// refuses it (TCP RST, ICMP port unreachable) as kube-proxy's REJECT does.
    pub const NODE_PORT: u32 = 4;
    /// `loadBalancerSourceRanges` apply: clients outside `ferrite_srcrng` are dropped.
    pub const SOURCE_RANGES: u32 = 8;
    /// In-cluster clients (pods, the node's processes) use the frontend's entries
    /// under `service_scope::IN_CLUSTER` instead (`externalTrafficPolicy: Local`:
    /// kube-proxy sends in-cluster traffic to any ready endpoint); clients from
    /// outside the cluster keep these.
    pub const IN_CLUSTER_SCOPE: u32 = 16;
}

/// Value of `ferrite_maglev` (key: the frontend's master [`ServiceKey`]): entry i is
/// the backend slot (1..=count) owning it. Built by the agent over the frontend's
/// backends in slot order, so every node builds the same table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// Hash of the backends the table was built from (the agent's change detection).
    pub digest: u64,
    pub backend_slots: [u16; MAGLEV_TABLE_SIZE],
    pub _pad: [u16; 3],
}

/// Key of the LRU `ferrite_frags`: one fragmented datagram (RFC 791: source,
/// destination, protocol and identification name it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragmentKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// IP identification, network byte order as in the header.
    pub id: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `ferrite_frags`: the ports its first fragment carried (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentPorts {
    pub sport: u16,
    pub dport: u16,
}

/// Value of the socket storage `ferrite_sk_svc`: the Service a TCP socket connected to
/// and the backend it was given (getpeername shows the former while the socket is
/// connected to the latter). Freed with the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockService {
    pub frontend_address: [u8; 4],
    pub backend_address: [u8; 4],
    pub rev_nat_index: u32,
    /// Host order.
    pub frontend_port: u16,
    /// Host order.
    pub backend_port: u16,
    /// Makes the size differ from the 16-bit rev-NAT layout, so an upgraded agent
    /// re-creates the pinned map instead of reading old entries with new offsets.
    pub _pad: u32,
}

/// Key of the LRU `ferrite_sockrev`: one backend a socket was translated to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockRevKey {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    pub address: [u8; 4],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Value of `ferrite_sockrev`: the Service address the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    pub address: [u8; 4],
    pub rev_nat_index: u32,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of the LRU `ferrite_affin`: one client of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    pub rev_nat_index: u32,
    pub client: [u8; 4],
    /// What `client` holds: [`AFFINITY_CLIENT_IP`] or [`AFFINITY_CLIENT_NETNS`].
    pub client_kind: u16,
    pub _pad: u16,
}

/// `AffinityKey::client` is the client's IPv4 address (per-packet load balancing).
pub const AFFINITY_CLIENT_IP: u16 = 0;
/// `AffinityKey::client` is the low 32 bits of the client's network-namespace cookie
/// (socket-level load balancing runs before a socket has a source address; Cilium
/// keys its socket-level affinity the same way).
pub const AFFINITY_CLIENT_NETNS: u16 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// Coarse monotonic clock of the last new flow that used it.
    pub last_used_ns: u64,
}

/// Whether an affinity entry last used at `last_used_ns` still holds at `now_ns`.
#[inline(always)]
pub const fn affinity_holds(last_used_ns: u64, now_ns: u64, timeout_s: u32) -> bool {
    now_ns.saturating_sub(last_used_ns) < timeout_s as u64 * 1_000_000_000
}

/// Key data of the LPM trie `ferrite_srcrng`: a frontend (its master key) and an
/// allowed client network. The prefix length covers all of `frontend` (96 bits)
/// plus the network's prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub frontend: ServiceKey,
    pub network: [u8; 4],
}

/// Bits of [`SourceRangeKey::frontend`] in an LPM prefix length.
pub const SOURCE_RANGE_FRONTEND_BITS: u32 = 96;

/// Value of `ferrite_backend` (key: backend id, `u32`, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub address: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

/// Value of `ferrite_rev_nat` (key: rev-NAT index, `u32`, never 0): the frontend
/// a reply's source is rewritten back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevNatValue {
    pub address: [u8; 4],
    pub port: u16,
    pub _pad: u16,
}

/// Key of `ferrite_endpnt`: a pod IP on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub address: [u8; 4],
}

/// Key of `ferrite_endpnt6`: a pod's IPv6 address on this node (network order). Its
/// value is the same [`EndpointInfo`] as the pod's IPv4 entry (one veth, one MAC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint6Key {
    pub address: [u8; 16],
}

/// Value of `ferrite_endpnt` and `ferrite_endpnt6`: how to deliver to a local pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// ifindex of the host-side veth (in the node's network namespace).
    pub ifindex: u32,
    /// MAC of the pod's eth0 (destination MAC of frames delivered to it).
    pub pod_mac: [u8; 6],
    /// MAC of the host-side veth (the pod's gateway; source MAC of delivered frames).
    pub host_mac: [u8; 6],
    /// [`endpoint_flag`]s: who wrote the entry (the datapath reads none of them).
    pub flags: u32,
}

/// `EndpointInfo::flags`.
pub mod endpoint_flag {
    /// The agent wrote the entry for a Pod object, and removes it once no object
    /// gives that pod the address (deleted, or claiming another). An entry without
    /// it is the CNI plugin's, written before the agent heard of the pod: it stays
    /// while its interface lives.
    pub const FROM_POD_OBJECT: u32 = 1;
}

/// Every pod's default gateway: a link-local address answered by a permanent
/// neighbour entry in the pod (no ARP), the same on every node (Calico's scheme).
pub const POD_GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// MAC of every host-side pod veth, so the pod's gateway entry never changes.
pub const HOST_VETH_MAC: [u8; 6] = [0xee; 6];

/// The pod's MAC is derived from its IP, `0a:58:<ip>` (OVN-Kubernetes' scheme), so
/// the agent and the CNI plugin both know it without entering the pod's netns.
pub const fn pod_mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

/// Key of `ferrite_ct` (LRU hash): a packet's tuple as it leaves the pod. A Service
/// flow owns two entries: the forward tuple (client -> VIP) caching the chosen
/// backend, and the reply tuple (backend -> client, `CT_FLAG_REPLY`) naming the
/// rev-NAT entry to translate with. They cannot collide (a forward tuple's
/// destination is a VIP, a reply's is a pod), so one lookup serves both directions.
/// A flow the host stack forwarded between pods owns one, its reply tuple
/// (`CT_FLAG_VIA_STACK`); whichever of it and a Service flow's reply entry claims a
/// tuple first keeps it (a pod's later flow on it gets another client port).
///
/// Word-aligned, and padded with scalar fields: the datapath builds this key on every
/// packet, and a byte-array pad made the compiler call `memset` for it.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: u8,
    pub _pad2: u16,
}

/// `CtValue::rev_nat_index` of a flow that is not a Service flow: a pod's direct
/// connection whose source port was remapped (rev-NAT ids start at 1).
pub const REV_NAT_NONE: u32 = 0;

/// `CtValue::flags`: a TCP FIN or RST was seen (the flow is closing).
pub const CT_FLAG_CLOSING: u16 = 1;
/// `CtValue::flags`: this is the reply entry of a Service flow.
pub const CT_FLAG_REPLY: u16 = 2;
/// `CtValue::flags`: a flow from outside the cluster to an external frontend; its
/// replies leave through the uplink (FIB lookup), not the stack.
pub const CT_FLAG_EXTERNAL: u16 = 4;
/// `CtValue::flags`: the flow is SNATed to `nat_address:nat_port` (forward entry) /
/// its replies go back to the client at `nat_address:nat_port` (reply entry).
pub const CT_FLAG_SNAT: u16 = 8;
/// `CtValue::flags`: a flow between pods that the host stack forwarded (a pod's
/// packet the stack delivered to a pod of this node, seen by `ferrite_to_pod`),
/// under its reply tuple (the pod it reached -> the pod that sent). Netfilter may
/// have translated it (portmap's hostPort DNAT of a node address to this pod) and
/// holds what undoes that: the replies go back through the stack, never straight
/// to the client. `backend_address`/`backend_port`: the pod it reached.
pub const CT_FLAG_VIA_STACK: u16 = 16;
/// `CtValue::flags`: a TCP flow whose client has not completed its handshake. Set on
/// both entries of every TCP flow the datapath records (and on a flow the stack
/// forwarded), cleared on both when the client sends a segment with ACK and neither
/// SYN nor RST after the other side answered (its reply entry has seen a packet):
/// the backend answers every SYN, spoofed ones too, so its SYN-ACK proves nothing
/// about the client. Conntrack GC gives such flows the SYN lifetime (60 s, not 6 h),
/// and a new flow that finds no free SNAT port takes over the oldest such claim among
/// the ports it tried. Entries without it (recorded before it existed, and every
/// UDP flow) are established.
pub const CT_FLAG_UNESTABLISHED: u16 = 32;
/// `CtValue::flags`: a flow between addresses (no Service) that a NetworkPolicy of a
/// pod at either end of it on this node had to allow, recorded (both directions,
/// the reply entry with `CT_FLAG_REPLY` and the client in `nat_address:nat_port`)
/// so that its replies pass as replies and its packets carry their verdict.
pub const CT_FLAG_POLICY: u16 = 64;

/// `CtValue::route_kind`: delivered to a pod of this node (`route_target` = ifindex).
pub const CT_ROUTE_LOCAL: u8 = 1;
/// `CtValue::route_kind`: sent over the overlay (`route_target` = the node's IP).
pub const CT_ROUTE_REMOTE: u8 = 2;
/// `CtValue::route_kind`: handed to the host stack.
pub const CT_ROUTE_STACK: u8 = 3;
/// `CtValue::route_kind`: sent unencapsulated out of the uplink to the owning node
/// (`route_target` = the node's IP).
pub const CT_ROUTE_NATIVE: u8 = 4;
/// `CtValue::verified_kind`: checked to come from the veth `verified_source`.
pub const CT_VERIFIED_VETH: u8 = 1;
/// `CtValue::verified_kind`: checked to come over the overlay from the node
/// `verified_source`.
pub const CT_VERIFIED_NODE: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub backend_id: u32,
    pub rev_nat_index: u32,
    /// Forward entries: the backend the flow is pinned to (the agent removes the
    /// entries of a removed backend, so established packets need no backend lookup).
    pub backend_address: [u8; 4],
    pub backend_port: u16,
    /// With `CT_FLAG_SNAT`: forward entries, the source the flow is SNATed to (this
    /// node's IP and a port of its SNAT range); reply entries, the client to restore.
    pub nat_port: u16,
    pub nat_address: [u8; 4],
    /// With `verified_kind`: the source this flow's packets were last checked to come
    /// from (`CT_VERIFIED_VETH`: the pod's veth ifindex; `CT_VERIFIED_NODE`: the
    /// sending node's underlay IP, network order), valid while `cache_epoch` is the
    /// node's `route_epoch`. Later packets from there skip the anti-spoofing lookup.
    pub verified_source: u32,
    /// `NodeConfig::route_epoch` when the cached route and source were recorded: the
    /// agent bumps it after any change to `ferrite_endpnt` or `ferrite_routes`, which
    /// invalidates every cache at once.
    pub cache_epoch: u32,
    /// With `route_kind`: where this flow's packets go after NAT, so established
    /// packets skip the endpoint and route lookups. `CT_ROUTE_LOCAL`: the pod's host
    /// veth ifindex, and `route_macs` its Ethernet header (pod MAC, gateway MAC);
    /// `CT_ROUTE_REMOTE`: the owning node's underlay IP (network order), and the first
    /// six bytes of `route_macs` its VTEP MAC.
    pub route_target: u32,
    pub route_macs: [u8; 12],
    /// `CT_FLAG_*`.
    pub flags: u16,
    /// `CT_ROUTE_*`: 0 = nothing cached.
    pub route_kind: u8,
    /// `CT_VERIFIED_*`: 0 = nothing cached.
    pub verified_kind: u8,
    /// `policy::CT_POLICY_*`: the NetworkPolicy verdict on the flow, valid while
    /// `cache_epoch` is the node's `route_epoch` (the agent bumps it on every
    /// policy change, so a connection a new policy denies stops within one sync).
    pub policy_verdict: u8,
    pub _pad: u8,
    /// The 32-bit rev-NAT index would fit in 80 bytes only with narrower flags: the
    /// agent re-creates a pinned map whose key or value size changed, and a same-size
    /// reorder would let a new datapath read an old release's entries at new offsets.
    pub _pad2: u16,
    pub _pad3: u32,
    /// The kernel's jiffies (bpf_jiffies64, which the verifier turns into one load:
    /// a clock helper call per packet cost a seventh of the established path). Tick
    /// resolution is enough for flow ages; the agent reads the same clock with
    /// `program_names::CLOCK` and converts with the kernel's HZ.
    pub created_jiffies: u64,
    pub last_seen_jiffies: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// Value of the per-CPU `ferrite_stats` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Key of `ferrite_lbstats` (LRU per-CPU hash, value [`Counter`]): packets and bytes
/// clients sent to one Service frontend (by rev-NAT index) that went to one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbStatKey {
    pub rev_nat_index: u32,
    pub backend_id: u32,
}

/// Indexes of `ferrite_stats`: what happened to each packet the datapath saw.
/// The datapath's documented verdict rules, one counter each.
pub mod stat;

/// `ferrite monitor`: the datapath reports drops and new Service flows in the ring
/// buffer `ferrite_events`, only while the agent says someone listens (the entry of
/// `ferrite_monitor`, a map of its own so the agent's syncs never rewrite it).
pub mod monitor;

/// One entry of the ring buffer `ferrite_events`: a drop (with its reason) or a new
/// Service flow (with the frontend it was addressed to and the backend chosen).
///
/// Addresses are 16 bytes for either family (`family`): an IPv6 address whole, an
/// IPv4 one in the first 4 bytes, the rest zero (not IPv4-mapped: the IPv4 paths
/// write their 4 bytes as before, and a reader needs no family to find them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorEvent {
    /// CLOCK_MONOTONIC when it happened (bpf_ktime_get_ns).
    pub time_ns: u64,
    /// `monitor::KIND_*`.
    pub kind: u8,
    /// Index in `monitor::PROGRAMS` of the program that saw it.
    pub program: u8,
    /// IP protocol (IPv6: the next header after the fixed header; 0: not an IP
    /// packet, or too short to tell).
    pub proto: u8,
    /// `monitor::FAMILY_IPV4` or `monitor::FAMILY_IPV6`: how to read the addresses
    /// (0: a packet of neither family, or too short to tell; addresses all zero).
    pub family: u8,
    /// Drops: the `stat` index counted (`stat::NAMES`); flows: the counter of the
    /// new flow (`service_new_flow`, `external_new_flow`, `host_service_flow`,
    /// `sock_translated`).
    pub reason: u32,
    /// The device the program ran on (0 for socket programs).
    pub ifindex: u32,
    /// The packet's length in bytes (0 for socket programs).
    pub len: u32,
    /// The packet's addresses (network order) and ports (host order; 0 when the
    /// packet has none). Flows: as the client sent it, to the frontend.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// Flows: the backend chosen (address network order, port host order).
    pub backend_address: [u8; 16],
    pub backend_port: u16,
    pub _pad: u16,
    /// Flows: the frontend's rev-NAT index.
    pub rev_nat_index: u32,
    /// Flows: the backend's id in `ferrite_backend` (`ferrite_lb6_be` for IPv6).
    pub backend_id: u32,
}

/// `NodeConfig::flags`.
pub mod config_flag {
    /// No XDP program on the uplink: the uplink's tcx ingress program balances
    /// external traffic itself (the XDP logic, run on the skb). A veth uplink
    /// (kind-style nodes) gains nothing from XDP and loses GSO: its peer segments every
    /// super-packet sent into an XDP veth.
    pub const EXTERNAL_IN_TC: u32 = 1;
    /// `--routing native` (the datapath needs no flag for it: each route says how
    /// its node is reached; tools read the node's mode back from it).
    pub const NATIVE_ROUTING: u32 = 2;
}

/// Value of `ferrite_config` (an array of one entry) - node-wide settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's IP on the node network (0 until its Node object is known).
    pub node_ip: [u8; 4],
    /// `config_flag::*`.
    pub flags: u32,
    /// ifindex of `ferrite_vxlan` in the node's netns (0: no overlay yet).
    pub vxlan_ifindex: u32,
    /// VXLAN network identifier of the cluster.
    pub vni: u32,
    /// This node's VTEP MAC: inner source MAC of encapsulated frames.
    pub vtep_mac: [u8; 6],
    /// The largest IP packet pods get: the VXLAN device's MTU, which the CNI gives
    /// pods (node MTU - 50); with `--routing native`, the uplink's MTU. 0 (or below
    /// 68): no limit known.
    pub pod_mtu: u16,
    /// This node's own address on the overlay (the first address of its pod CIDR,
    /// on the VXLAN device): the node's processes reach other nodes' pods from it.
    pub overlay_ip: [u8; 4],
    /// The overlay's UDP port (host order): its datagrams are not Service traffic.
    pub vxlan_port: u16,
    pub _pad: u16,
    /// Bumped by the agent after every change to the endpoint or route maps, as its
    /// last write: conntrack entries cache routes and verified sources per epoch.
    pub route_epoch: u32,
    /// ifindex of the uplink (the interface holding `node_ip`): where packets to
    /// nodes routed natively (`ROUTE_NATIVE`) leave, and where theirs arrive. 0: not
    /// known yet (native routes then drop, `drop_no_overlay`).
    pub uplink_ifindex: u32,
    /// This node's IPv6 InternalIP (network order; all zeros: none): the address of
    /// its IPv6 NodePort frontends, which serve other nodes' IPv6 addresses at a
    /// nodePort to the node's sockets (`ROUTE_NODE` /128s in `ferrite_routes6`).
    pub node_ip6: [u8; 16],
}

pub mod explain;
pub use explain::ExplainTrace;
pub mod lb6;
pub use lb6::{Backend6, RevNat6Value, Service6Key, SockRev6Key, SockRev6Value, SockService6};
pub mod policy;
pub mod purge;

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: all are #[repr(C)], Copy, made only of integers and byte arrays, with
    // every padding byte an explicit field.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for Endpoint6Key {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for RouteInfo {}
    unsafe impl aya::Pod for LbStatKey {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentPorts {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for SockService {}
    unsafe impl aya::Pod for Service6Key {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for RevNat6Value {}
    unsafe impl aya::Pod for SockService6 {}
    unsafe impl aya::Pod for SockRev6Key {}
    unsafe impl aya::Pod for SockRev6Value {}
    unsafe impl aya::Pod for MonitorEvent {}
    unsafe impl aya::Pod for ExplainTrace {}
    unsafe impl aya::Pod for explain::SockRequest {}
    unsafe impl aya::Pod for policy::IpcacheValue {}
    unsafe impl aya::Pod for policy::PolicyKey {}
    unsafe impl aya::Pod for policy::PolicyValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 12);
        assert_eq!(size_of::<policy::IpcacheValue>(), 8);
        assert_eq!(size_of::<policy::PolicyKey>(), 12);
        assert_eq!(size_of::<policy::PolicyValue>(), 4);
        assert_eq!(size_of::<ServiceValue>(), 20);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<RevNatValue>(), 8);
        assert_eq!(size_of::<EndpointKey>(), 4);
        assert_eq!(size_of::<Endpoint6Key>(), 16);
        assert_eq!(size_of::<EndpointInfo>(), 20);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 88);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(size_of::<NodeConfig>(), 56);
        assert_eq!(size_of::<SockRevKey>(), 16);
        assert_eq!(size_of::<SockRevValue>(), 12);
        assert_eq!(size_of::<SockService>(), 20);
        assert_eq!(size_of::<RouteInfo>(), 12);
        assert_eq!(size_of::<Route6Prefix>(), 16);
        assert_eq!(size_of::<LbStatKey>(), 8);
        assert_eq!(size_of::<MaglevTable>(), 8 + 2 * MAGLEV_TABLE_SIZE + 6);
        assert_eq!(size_of::<AffinityKey>(), 12);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<SourceRangeKey>(), 16);
        assert_eq!(size_of::<MonitorEvent>(), 88);
        assert_eq!(size_of::<ExplainTrace>(), 88);
        assert_eq!(size_of::<explain::SockRequest>(), 32);
        assert_eq!(size_of::<Service6Key>(), 24);
        assert_eq!(size_of::<Backend6>(), 20);
        assert_eq!(size_of::<RevNat6Value>(), 20);
        assert_eq!(size_of::<SockService6>(), 40);
        assert_eq!(size_of::<SockRev6Key>(), 32);
        assert_eq!(size_of::<SockRev6Value>(), 24);
    }

    #[test]
    fn monitor_programs_are_found_by_name() {
        for (index, name) in monitor::PROGRAMS.iter().enumerate() {
            assert_eq!(monitor::program_index(name) as usize, index);
        }
    }

    #[test]
    fn affinity_holds_until_the_timeout_and_not_at_it() {
        let second = 1_000_000_000;
        assert!(affinity_holds(5 * second, 5 * second, 10));
        assert!(affinity_holds(5 * second, 15 * second - 1, 10));
        assert!(!affinity_holds(5 * second, 15 * second, 10));
        // A clock read on another CPU may be a tick behind: still fresh.
        assert!(affinity_holds(5 * second, 4 * second, 10));
        // The default 10800 s does not overflow.
        assert!(affinity_holds(0, 10_799 * second, 10_800));
    }

    #[test]
    fn map_names_fit_kernel_object_names() {
        for name in map_names::ALL {
            assert!(name.len() <= 15 && name.starts_with("ferrite_"), "{name}");
        }
    }

    #[test]
    fn every_default_capacity_names_one_map_once() {
        for (index, (name, _)) in capacity::DEFAULTS.iter().enumerate() {
            assert!(map_names::ALL.contains(name), "{name}");
            assert_eq!(
                capacity::default_for(name),
                Some(capacity::DEFAULTS[index].1)
            );
            assert!(
                !capacity::DEFAULTS[..index].iter().any(|(n, _)| n == name),
                "{name} twice"
            );
        }
        assert_eq!(capacity::default_for(map_names::STATS), None);
        assert_eq!(
            capacity::default_for(map_names::SERVICES),
            Some(capacity::SERVICES)
        );
    }

    #[test]
    fn pod_mac_is_locally_administered_and_unicast() {
        let mac = pod_mac_for(Ipv4Addr::new(10, 244, 0, 7));
        assert_eq!(mac, [0x0a, 0x58, 10, 244, 0, 7]);
        assert_eq!(mac[0] & 0b11, 0b10);
    }
}
