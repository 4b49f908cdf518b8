//! The "bench node": a [`Testbed`] filled as node 0 of a two-node cluster (its pod
//! CIDR, the other node's CIDR and address routed over the overlay, its VXLAN
//! device, pods, Services and NodePorts), and the packets of every per-packet path
//! `cargo xtask bench datapath` measures. The bench and the packet tests
//! (`tests/tests/bench_paths.rs`) both build it here, so the bench measures exactly
//! the frames the tests check.
//!
//! BPF_PROG_TEST_RUN with repeat > 1 re-runs the program on the skb (or XDP buffer)
//! the previous pass left. Each established path is therefore set up so that its
//! output is again a packet of the same path, the other way round:
//! - pod -> pod (same node, other node): nothing in the packet the program reads
//!   changes (MACs are rewritten to the same values each pass);
//! - ClusterIP, established: a pair of Services whose frontends are each other's
//!   backend (A:80 -> B:8080, B:8080 -> A:80), with the client's flow to both
//!   established. Each pass is a conntrack hit, DNAT with a port change (both L4
//!   checksum fixes) and delivery: A and B are pods of this node (local backend,
//!   redirect_peer with MAC rewrite) or of the other node (overlay, tunnel key);
//! - reply (reverse NAT): the same pairs' reply entries: B:8080 -> client becomes
//!   A:80 -> client, which is the reply of the flow to B, and back;
//! - NodePort, established (XDP): the flow is created by the program; a second
//!   conntrack entry, written here, translates its output back (the translated
//!   tuple -> the NodePort, SNAT undone), so every pass is a conntrack hit with the
//!   full DNAT (+ SNAT) rewrite.
//!
//! New flows run each frame once (repeat = 1) over a set of distinct 5-tuples;
//! [`BenchNode::clear_new_flows`] removes what they created, so the set is new again.
use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context, Result};
use ferrite_common::{
    capacity, map_names, program_names, stat, svc_flag, vtep_mac_for, CtKey, CtValue, CT_FLAG_SNAT,
    CT_FLAG_UNESTABLISHED, DEFAULT_VNI, DEFAULT_VXLAN_PORT, PROTO_TCP, ROUTE_LOCAL, ROUTE_NODE,
    ROUTE_REMOTE,
};

use crate::{
    frames,
    testbed::{RunResult, Testbed, TC_ACT_REDIRECT, TEST_RUN_IFINDEX, XDP_PASS},
    tunnel_shim::TunnelShim,
};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const REMOTE_NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// This node's address on the overlay (the first of its pod CIDR).
pub const OVERLAY_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The VXLAN device's ifindex (a test run records the redirect, it does not do it).
pub const VXLAN_IFINDEX: u32 = 4242;
pub const POD_MTU: u16 = 1450;
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
pub const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
/// Pods of this node that NetworkPolicies isolate both ways, the client allowed to
/// send to the server's port 8080 and the server to take it from the client.
pub const POLICED_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 4);
pub const POLICED_SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
/// Pods of this node that are each other's Service backend.
pub const LOCAL_PAIR: [SocketAddrV4; 2] = [
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 10), 80),
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 11), 8080),
];
/// Pods of the other node that are each other's Service backend.
pub const REMOTE_PAIR: [SocketAddrV4; 2] = [
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10), 80),
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 11), 8080),
];
pub const WORLD_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const NODE_PORT_LOCAL: SocketAddrV4 = SocketAddrV4::new(NODE_IP, 30080);
pub const NODE_PORT_REMOTE: SocketAddrV4 = SocketAddrV4::new(NODE_IP, 30081);
/// Backends of the NodePorts: pods of this node, and of the other node.
pub const NODE_PORT_LOCAL_BACKENDS: u8 = 4;
pub const NODE_PORT_REMOTE_BACKENDS: u8 = 16;
/// ClusterIP Services loaded around the measured paths: two backends each, out of
/// a pool of pods of this node.
const FILLER_BACKEND_POOL: u32 = 16;
const FILLER_BACKEND_ID: u32 = 1001;
/// Rev-NAT indexes up to this one belong to the bench node's own frontends.
const RESERVED_REV_NAT: u32 = 16;
/// Clients of new ClusterIP flows: pods of this node.
const NEW_FLOW_CLIENT_PODS: u32 = 64;
/// Their NetworkPolicy identity (one class: the same labels).
const NEW_FLOW_CLIENTS_IDENTITY: u32 = 20;
const NEW_FLOW_CLIENTS_IDENTITY_PODS: u32 = NEW_FLOW_CLIENT_PODS;

pub fn local_node_port_backend(index: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 20 + index), 8080)
}

pub fn remote_node_port_backend(index: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 20 + index), 8080)
}

/// ClusterIP Service `index` of the loaded ones.
pub fn service_ip(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + index)
}

fn filler_backend(index: u32) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 64 + index as u8), 8080)
}

/// The backends of ClusterIP Service `index`.
pub fn service_backends(index: u32) -> [SocketAddrV4; 2] {
    [
        filler_backend(index % FILLER_BACKEND_POOL),
        filler_backend((index + 1) % FILLER_BACKEND_POOL),
    ]
}

fn new_flow_client(index: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 128 + (index % NEW_FLOW_CLIENT_PODS) as u8)
}

/// Where a path's packets enter the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// tcx ingress of a pod's host veth.
    FromPod,
    /// tcx ingress of the VXLAN device (through the tunnel-key shim).
    FromOverlay,
    /// XDP on the uplink.
    FromWorld,
}

impl Hook {
    /// The verdict of a packet this hook's paths forward.
    pub fn forwarded(self) -> u32 {
        match self {
            Hook::FromPod | Hook::FromOverlay => TC_ACT_REDIRECT,
            // Translated and passed on: the uplink's tcx program delivers it.
            Hook::FromWorld => XDP_PASS,
        }
    }

    pub fn program(self) -> &'static str {
        match self {
            Hook::FromPod => program_names::FROM_POD,
            Hook::FromOverlay => program_names::FROM_OVERLAY,
            Hook::FromWorld => program_names::FROM_WORLD,
        }
    }

    /// The baseline each path of this hook is compared with.
    pub fn noop(self) -> &'static str {
        match self {
            Hook::FromPod => program_names::NOOP,
            Hook::FromOverlay => "shim + ferrite_noop",
            Hook::FromWorld => program_names::NOOP_XDP,
        }
    }
}

/// An established flow's packet, measured with repeat > 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Established {
    PodToPodLocal,
    PodToPodPoliced,
    PodToPodRemote,
    ClusterIpLocal,
    ClusterIpRemote,
    ReplyLocal,
    ReplyOverlay,
    NodePortLocal,
    NodePortSnat,
}

impl Established {
    pub const ALL: [Self; 9] = [
        Self::PodToPodLocal,
        Self::PodToPodPoliced,
        Self::PodToPodRemote,
        Self::ClusterIpLocal,
        Self::ClusterIpRemote,
        Self::ReplyLocal,
        Self::ReplyOverlay,
        Self::NodePortLocal,
        Self::NodePortSnat,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::PodToPodLocal => "pod -> pod, same node",
            Self::PodToPodPoliced => "pod -> pod, same node, both policed",
            Self::PodToPodRemote => "pod -> pod, other node (overlay)",
            Self::ClusterIpLocal => "pod -> ClusterIP, local backend",
            Self::ClusterIpRemote => "pod -> ClusterIP, remote backend",
            Self::ReplyLocal => "reply (rev-NAT), local backend",
            Self::ReplyOverlay => "reply (rev-NAT), from the overlay",
            Self::NodePortLocal => "NodePort (XDP), local backend",
            Self::NodePortSnat => "NodePort (XDP), SNAT to remote",
        }
    }

    pub fn hook(self) -> Hook {
        match self {
            Self::ReplyOverlay => Hook::FromOverlay,
            Self::NodePortLocal | Self::NodePortSnat => Hook::FromWorld,
            _ => Hook::FromPod,
        }
    }

    /// Counters every pass of this path bumps exactly once.
    pub fn counters(self) -> &'static [u32] {
        match self {
            Self::PodToPodLocal | Self::PodToPodPoliced => &[stat::DELIVERED_LOCAL],
            Self::PodToPodRemote => &[stat::SENT_TO_NODE],
            Self::ClusterIpLocal => &[stat::SERVICE_ESTABLISHED, stat::DELIVERED_LOCAL],
            Self::ClusterIpRemote => &[stat::SERVICE_ESTABLISHED, stat::SENT_TO_NODE],
            Self::ReplyLocal => &[stat::REVERSE_NAT, stat::DELIVERED_LOCAL],
            Self::ReplyOverlay => &[stat::REVERSE_NAT, stat::RECEIVED_FROM_NODE],
            Self::NodePortLocal | Self::NodePortSnat => &[stat::SERVICE_ESTABLISHED],
        }
    }

    /// Its floor (datapath-ebpf's `floor`): only the work any datapath must do for
    /// this path's packet, leaving the same frame (checked by tests/tests/bench_paths.rs).
    pub fn floor(self) -> &'static str {
        match self {
            Self::PodToPodLocal => program_names::FLOOR_POD_LOCAL,
            Self::PodToPodPoliced => program_names::FLOOR_FLOW,
            Self::PodToPodRemote => program_names::FLOOR_POD_REMOTE,
            Self::ClusterIpLocal => program_names::FLOOR,
            Self::ClusterIpRemote => program_names::FLOOR_SERVICE_REMOTE,
            Self::ReplyLocal | Self::ReplyOverlay => program_names::FLOOR_REPLY,
            Self::NodePortLocal => program_names::FLOOR_NODE_PORT,
            Self::NodePortSnat => program_names::FLOOR_NODE_PORT_SNAT,
        }
    }

    /// What its floor does.
    pub fn floor_work(self) -> &'static str {
        match self {
            Self::PodToPodLocal => "endpoint lookup, MACs, redirect_peer",
            Self::PodToPodPoliced => "ct hit, cached MACs, redirect_peer",
            Self::PodToPodRemote => "route lookup, VTEP MACs, tunnel key, redirect",
            Self::ClusterIpLocal => "ct hit, DNAT + csums, cached MACs, redirect_peer",
            Self::ClusterIpRemote => "ct hit, DNAT + csums, VTEP MACs, tunnel key, redirect",
            Self::ReplyLocal => "ct hit, rev-NAT lookup, SNAT + csums, cached MACs, redirect_peer",
            Self::ReplyOverlay => "the same, behind the tunnel-key shim",
            Self::NodePortLocal => "ct hit, DNAT + csums (by hand)",
            Self::NodePortSnat => "ct hit, DNAT + SNAT + csums (by hand)",
        }
    }

    /// The client port of this path's flow.
    pub fn client_port(self) -> u16 {
        match self {
            Self::PodToPodLocal => 41000,
            Self::PodToPodPoliced => 41004,
            Self::PodToPodRemote => 41001,
            Self::ClusterIpLocal | Self::ReplyLocal => 41002,
            Self::ClusterIpRemote | Self::ReplyOverlay => 41003,
            Self::NodePortLocal => 40000,
            Self::NodePortSnat => 40001,
        }
    }

    /// The frame measured (the first pass's input).
    pub fn frame(self) -> Vec<u8> {
        let client = SocketAddrV4::new(CLIENT, self.client_port());
        let world = SocketAddrV4::new(WORLD_CLIENT, self.client_port());
        let (from, to) = match self {
            Self::PodToPodLocal => (client, SocketAddrV4::new(LOCAL_POD, 8080)),
            Self::PodToPodPoliced => (
                SocketAddrV4::new(POLICED_CLIENT, self.client_port()),
                SocketAddrV4::new(POLICED_SERVER, 8080),
            ),
            Self::PodToPodRemote => (client, SocketAddrV4::new(REMOTE_POD, 8080)),
            Self::ClusterIpLocal => (client, LOCAL_PAIR[0]),
            Self::ClusterIpRemote => (client, REMOTE_PAIR[0]),
            Self::ReplyLocal => (LOCAL_PAIR[1], client),
            Self::ReplyOverlay => (REMOTE_PAIR[1], client),
            Self::NodePortLocal => (world, NODE_PORT_LOCAL),
            Self::NodePortSnat => (world, NODE_PORT_REMOTE),
        };
        frames::tcp_ack(from, to, b"")
    }
}

/// A new flow's first packet, each of a set run once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewFlow {
    ClusterIp,
    NodePortLocal,
    NodePortSnat,
}

impl NewFlow {
    pub const ALL: [Self; 3] = [Self::ClusterIp, Self::NodePortLocal, Self::NodePortSnat];

    pub fn label(self) -> &'static str {
        match self {
            Self::ClusterIp => "pod -> ClusterIP, local backend",
            Self::NodePortLocal => "NodePort (XDP), local backend",
            Self::NodePortSnat => "NodePort (XDP), SNAT to remote",
        }
    }

    pub fn hook(self) -> Hook {
        match self {
            Self::ClusterIp => Hook::FromPod,
            _ => Hook::FromWorld,
        }
    }

    /// Counters every new flow of this path bumps exactly once.
    pub fn counters(self) -> &'static [u32] {
        match self {
            Self::ClusterIp => &[stat::SERVICE_NEW_FLOW, stat::DELIVERED_LOCAL],
            Self::NodePortLocal => &[stat::EXTERNAL_NEW_FLOW],
            Self::NodePortSnat => &[stat::EXTERNAL_NEW_FLOW, stat::EXTERNAL_SNAT],
        }
    }
}

pub struct BenchNode {
    pub bed: Testbed,
    shim: TunnelShim,
    /// NetworkPolicy load: `ferrite_ipcache` entries of other pods, and rules of the
    /// policed server for other peers (`load_policy`).
    policy_pods: u32,
    policy_rules: u32,
    /// ClusterIP Services loaded (`service_ip(0..services)`).
    services: u32,
    /// Conntrack entries of the established paths: kept when new flows are cleared.
    established: HashSet<CtKey>,
}

/// The conntrack key of a TCP packet from `from` to `to`.
pub fn ct_key(from: SocketAddrV4, to: SocketAddrV4) -> CtKey {
    CtKey {
        saddr: from.ip().octets(),
        daddr: to.ip().octets(),
        sport: from.port(),
        dport: to.port(),
        proto: PROTO_TCP,
        _pad: 0,
        _pad2: 0,
    }
}

impl BenchNode {
    /// The node, with one ClusterIP Service loaded and every established path's flow
    /// set up.
    pub fn new() -> Result<Self> {
        // 100,000 Services of two backends take 300,000 entries: sized for it, as
        // an operator sizes the agent's (`--map-capacity ferrite_service=524288`).
        let mut bed = Testbed::load_sized(&[(map_names::SERVICES, 1 << 19)])?;
        bed.update_config(|c| {
            c.node_ip = NODE_IP.octets();
            c.vxlan_ifindex = VXLAN_IFINDEX;
            c.vni = DEFAULT_VNI;
            c.vtep_mac = vtep_mac_for(NODE_IP);
            c.pod_mtu = POD_MTU;
            c.overlay_ip = OVERLAY_IP.octets();
            c.vxlan_port = DEFAULT_VXLAN_PORT;
        })?;
        // The agent's routes: this node's CIDR, the other node's, its address.
        add_pod_routes(&mut bed)?;
        bed.add_route(REMOTE_NODE_IP, 32, REMOTE_NODE_IP, ROUTE_NODE)?;
        let mut pods = vec![
            CLIENT,
            LOCAL_POD,
            POLICED_CLIENT,
            POLICED_SERVER,
            *LOCAL_PAIR[0].ip(),
            *LOCAL_PAIR[1].ip(),
        ];
        pods.extend((0..NODE_PORT_LOCAL_BACKENDS).map(|i| *local_node_port_backend(i).ip()));
        pods.extend((0..FILLER_BACKEND_POOL).map(|i| *filler_backend(i).ip()));
        pods.extend((0..NEW_FLOW_CLIENT_PODS).map(new_flow_client));
        for pod in pods {
            bed.add_endpoint(pod, TEST_RUN_IFINDEX)?;
        }
        for (pair, rev_nat) in [(LOCAL_PAIR, 1), (REMOTE_PAIR, 3)] {
            bed.add_service(pair[0], PROTO_TCP, rev_nat, rev_nat, &[pair[1]])?;
            bed.add_service(pair[1], PROTO_TCP, rev_nat + 1, rev_nat + 1, &[pair[0]])?;
        }
        let local: Vec<_> = (0..NODE_PORT_LOCAL_BACKENDS)
            .map(local_node_port_backend)
            .collect();
        let remote: Vec<_> = (0..NODE_PORT_REMOTE_BACKENDS)
            .map(remote_node_port_backend)
            .collect();
        for (frontend, rev_nat, first_id, backends) in [
            (NODE_PORT_LOCAL, 5, 10, &local),
            (NODE_PORT_REMOTE, 6, 20, &remote),
        ] {
            bed.add_service(frontend, PROTO_TCP, rev_nat, first_id, backends)?;
            bed.set_service_flags(
                frontend,
                PROTO_TCP,
                svc_flag::EXTERNAL | svc_flag::NODE_PORT,
            )?;
            bed.add_maglev(frontend, PROTO_TCP)?;
        }
        for i in 0..FILLER_BACKEND_POOL {
            bed.add_backend(FILLER_BACKEND_ID + i, filler_backend(i), PROTO_TCP)?;
        }
        crate::bench_families::add_ipv6(&mut bed)?;
        let shim = TunnelShim::new(
            &[
                bed.program_fd(program_names::FROM_OVERLAY)?,
                bed.program_fd(program_names::NOOP)?,
                bed.program_fd(program_names::FLOOR_REPLY)?,
            ],
            DEFAULT_VNI,
            REMOTE_NODE_IP,
        )?;
        let mut node = Self {
            bed,
            shim,
            policy_pods: 0,
            policy_rules: 0,
            services: 0,
            established: HashSet::new(),
        };
        node.load_services(1)?;
        node.establish()?;
        Ok(node)
    }

    /// The flows of the established paths, created by the programs themselves, and
    /// the entries that translate the NodePort flows' output back.
    fn establish(&mut self) -> Result<()> {
        // The pairs' frontends are pod addresses, which the agent never allows and the
        // datapath therefore never looks up as Services: their flows are opened with
        // the pods' endpoints and CIDR routes withdrawn, and these put back after.
        for pod in LOCAL_PAIR {
            self.bed.remove_endpoint(*pod.ip())?;
        }
        self.bed.remove_route(Ipv4Addr::new(10, 244, 0, 0), 24)?;
        self.bed.remove_route(Ipv4Addr::new(10, 244, 1, 0), 24)?;
        for (path, pair) in [
            (Established::ClusterIpLocal, LOCAL_PAIR),
            (Established::ClusterIpRemote, REMOTE_PAIR),
        ] {
            let client = SocketAddrV4::new(CLIENT, path.client_port());
            for frontend in pair {
                self.bed
                    .from_pod(&frames::tcp_syn(client, frontend, b""))
                    .context("opening a ClusterIP flow")?;
                self.bed
                    .conntrack(&ct_key(client, frontend))?
                    .context("the ClusterIP flow was not created")?;
            }
        }
        for pod in LOCAL_PAIR {
            self.bed.add_endpoint(*pod.ip(), TEST_RUN_IFINDEX)?;
        }
        add_pod_routes(&mut self.bed)?;
        for path in [Established::NodePortLocal, Established::NodePortSnat] {
            let client = SocketAddrV4::new(WORLD_CLIENT, path.client_port());
            let frontend = if path == Established::NodePortLocal {
                NODE_PORT_LOCAL
            } else {
                NODE_PORT_REMOTE
            };
            self.bed
                .from_world(&frames::tcp_syn(client, frontend, b""))
                .context("opening a NodePort flow")?;
            let forward = self
                .bed
                .conntrack(&ct_key(client, frontend))?
                .context("the NodePort flow was not created")?;
            let backend = SocketAddrV4::new(forward.backend_address.into(), forward.backend_port);
            let snat = forward.flags & CT_FLAG_SNAT != 0;
            let source = if snat {
                SocketAddrV4::new(forward.nat_address.into(), forward.nat_port)
            } else {
                client
            };
            self.bed.insert_conntrack(
                ct_key(source, backend),
                CtValue {
                    backend_address: frontend.ip().octets(),
                    backend_port: frontend.port(),
                    nat_address: if snat { client.ip().octets() } else { [0; 4] },
                    nat_port: if snat { client.port() } else { 0 },
                    ..forward
                },
            )?;
        }
        self.police()?;
        let path = Established::PodToPodPoliced;
        let opening = frames::tcp_syn(
            SocketAddrV4::new(POLICED_CLIENT, path.client_port()),
            SocketAddrV4::new(POLICED_SERVER, 8080),
            b"",
        );
        self.bed
            .from_pod(&opening)
            .context("opening the policed flow")?;
        // Established flows: their clients completed the handshake (the programs
        // saw only the SYNs that opened them here).
        for key in self.bed.conntrack_keys()? {
            if let Some(entry) = self.bed.conntrack(&key)? {
                let flags = entry.flags & !CT_FLAG_UNESTABLISHED;
                self.bed.insert_conntrack(key, CtValue { flags, ..entry })?;
            }
        }
        self.established = self.bed.conntrack_keys()?.into_iter().collect();
        Ok(())
    }

    /// The policed pods' isolation, identities and rules, as the agent writes them.
    fn police(&mut self) -> Result<()> {
        use ferrite_agent::model::policy::{Allow, Direction};
        use ferrite_common::policy::{ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED};
        const CLIENT_IDENTITY: u32 = 16;
        const SERVER_IDENTITY: u32 = 17;
        self.bed.set_identity(POLICED_CLIENT, 32, CLIENT_IDENTITY)?;
        self.bed.set_identity(POLICED_SERVER, 32, SERVER_IDENTITY)?;
        for (pod, direction, peer) in [
            (POLICED_CLIENT, Direction::Egress, SERVER_IDENTITY),
            (POLICED_SERVER, Direction::Ingress, CLIENT_IDENTITY),
        ] {
            let allow = Allow {
                direction,
                identity: peer,
                protocol: PROTO_TCP,
                ports: Some((8080, 8080)),
            };
            self.bed.set_allow(pod, &allow, true)?;
            self.bed
                .set_isolation(pod, ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED)?;
        }
        Ok(())
    }

    /// Grow the NetworkPolicy load to `pods` `ferrite_ipcache` entries (pods of other
    /// nodes, 1,000 identities among them) and `rules` ingress rules of the policed
    /// server for identities no client has; the new-flow clients' own identity and
    /// the one rule that allows them are written first.
    pub fn load_policy(&mut self, pods: u32, rules: u32) -> Result<()> {
        use ferrite_agent::model::policy::{Allow, Direction};
        let rule = |identity: u32| Allow {
            direction: Direction::Ingress,
            identity,
            protocol: PROTO_TCP,
            ports: Some((8080, 8080)),
        };
        if self.policy_rules == 0 {
            for i in 0..NEW_FLOW_CLIENTS_IDENTITY_PODS {
                self.bed
                    .set_identity(new_flow_client(i), 32, NEW_FLOW_CLIENTS_IDENTITY)?;
            }
            self.bed
                .set_allow(POLICED_SERVER, &rule(NEW_FLOW_CLIENTS_IDENTITY), true)?;
            self.policy_rules = 1;
        }
        while self.policy_pods < pods {
            let i = self.policy_pods;
            let pod = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 248, 0, 0)) + i);
            self.bed.set_identity(pod, 32, 1_000 + i % 1_000)?;
            self.policy_pods += 1;
        }
        while self.policy_rules < rules {
            self.bed
                .set_allow(POLICED_SERVER, &rule(10_000 + self.policy_rules), true)?;
            self.policy_rules += 1;
        }
        Ok(())
    }

    /// `count` SYNs of distinct new flows from this node's unpoliced pods to the
    /// policed server (`policed`) or to an unpoliced pod, on port 8080.
    pub fn pod_new_flow_frames(&self, policed: bool, count: u32) -> Vec<Vec<u8>> {
        let server = if policed { POLICED_SERVER } else { LOCAL_POD };
        (0..count)
            .map(|i| {
                frames::tcp_syn(
                    SocketAddrV4::new(
                        new_flow_client(i % NEW_FLOW_CLIENT_PODS),
                        20_000 + (i / NEW_FLOW_CLIENT_PODS) as u16,
                    ),
                    SocketAddrV4::new(server, 8080),
                    b"",
                )
            })
            .collect()
    }

    /// Load ClusterIP Services up to `total` (each: port 80, two backends, TCP).
    pub fn load_services(&mut self, total: u32) -> Result<()> {
        while self.services < total {
            let i = self.services;
            let ids = [
                FILLER_BACKEND_ID + i % FILLER_BACKEND_POOL,
                FILLER_BACKEND_ID + (i + 1) % FILLER_BACKEND_POOL,
            ];
            // The rev-NAT map holds its default capacity: past it, indexes repeat,
            // which changes no lookup measured here.
            let rev_nat = RESERVED_REV_NAT + i % (capacity::REV_NAT - RESERVED_REV_NAT) + 1;
            self.bed.add_frontend(
                SocketAddrV4::new(service_ip(i), 80),
                PROTO_TCP,
                rev_nat,
                &ids,
            )?;
            self.services += 1;
        }
        Ok(())
    }

    pub fn services(&self) -> u32 {
        self.services
    }

    /// `count` first packets of distinct new flows of `path` (TCP SYNs); ClusterIP
    /// flows spread over every loaded Service.
    pub fn new_flow_frames(&self, path: NewFlow, count: u32) -> Vec<Vec<u8>> {
        let step = (self.services / count).max(1);
        (0..count)
            .map(|i| match path {
                NewFlow::ClusterIp => frames::tcp_syn(
                    SocketAddrV4::new(
                        new_flow_client(i),
                        20_000 + (i / NEW_FLOW_CLIENT_PODS) as u16,
                    ),
                    SocketAddrV4::new(service_ip((i * step) % self.services), 80),
                    b"",
                ),
                NewFlow::NodePortLocal | NewFlow::NodePortSnat => {
                    let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i);
                    let frontend = if path == NewFlow::NodePortLocal {
                        NODE_PORT_LOCAL
                    } else {
                        NODE_PORT_REMOTE
                    };
                    frames::tcp_syn(SocketAddrV4::new(client, 50_000), frontend, b"")
                }
            })
            .collect()
    }

    /// Remove every conntrack entry but the established paths': new flows are new
    /// again. Returns how many were removed.
    pub fn clear_new_flows(&mut self) -> Result<usize> {
        let created: Vec<CtKey> = self
            .bed
            .conntrack_keys()?
            .into_iter()
            .filter(|k| !self.established.contains(k))
            .collect();
        self.bed.remove_conntrack(&created)?;
        Ok(created.len())
    }

    /// Run `hook`'s program `repeat` times on `frame`.
    pub fn run(&self, hook: Hook, frame: &[u8], repeat: u32) -> Result<(RunResult, Duration)> {
        match hook {
            Hook::FromPod => self.bed.run_program(hook.program(), frame, repeat),
            Hook::FromOverlay => self.shim.run(0, frame, repeat),
            Hook::FromWorld => self.bed.run_xdp_program(hook.program(), frame, repeat),
        }
    }

    /// Run `path`'s floor `repeat` times on `frame` (from the overlay: behind the
    /// same tunnel-key shim as the path).
    pub fn run_floor(
        &self,
        path: Established,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(RunResult, Duration)> {
        match path.hook() {
            Hook::FromPod => self.bed.run_program(path.floor(), frame, repeat),
            Hook::FromOverlay => self.shim.run(2, frame, repeat),
            Hook::FromWorld => self.bed.run_xdp_program(path.floor(), frame, repeat),
        }
    }

    /// Run `hook`'s baseline `repeat` times on `frame`.
    pub fn run_noop(&self, hook: Hook, frame: &[u8], repeat: u32) -> Result<(RunResult, Duration)> {
        match hook {
            Hook::FromPod => self.bed.run_program(program_names::NOOP, frame, repeat),
            Hook::FromOverlay => self.shim.run(1, frame, repeat),
            Hook::FromWorld => self
                .bed
                .run_xdp_program(program_names::NOOP_XDP, frame, repeat),
        }
    }
}

/// This node's pod CIDR and the other node's, routed as the agent routes them.
fn add_pod_routes(bed: &mut Testbed) -> Result<()> {
    bed.add_route(Ipv4Addr::new(10, 244, 0, 0), 24, NODE_IP, ROUTE_LOCAL)?;
    bed.add_route(
        Ipv4Addr::new(10, 244, 1, 0),
        24,
        REMOTE_NODE_IP,
        ROUTE_REMOTE,
    )
}
