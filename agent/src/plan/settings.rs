//! What a plan is made for besides the objects: the node's flags and map capacities,
//! and its host interfaces.
use ferrite_common::DEFAULT_VNI;

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
    /// How pod traffic reaches other nodes (`--routing`).
    pub routing: Routing,
    /// This sync's reading of the uplink (the interface holding the node's IP): its
    /// name and the subnets on it, which say which nodes are on-link.
    pub uplink: Option<Uplink>,
}

impl NodeSettings {
    /// Whether another node, at `ip`, is reached natively: `--routing native` and
    /// `ip` on-link on the uplink. `Err`: native routing is on but refused for that
    /// node, and why (it is reached over VXLAN).
    pub fn routes_natively_to(&self, ip: std::net::Ipv4Addr) -> Result<bool, String> {
        if self.routing != Routing::Native {
            return Ok(false);
        }
        match &self.uplink {
            Some(uplink) if uplink.on_link(ip) => Ok(true),
            Some(uplink) => Err(format!(
                "InternalIP {ip} is not on-link on the uplink {} ({}): --routing native needs \
                 the nodes on one L2 segment; reached over VXLAN",
                uplink.name,
                uplink
                    .subnets
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => Err(format!(
                "no uplink known (no interface holds this node's InternalIP): {ip} is \
                 reached over VXLAN"
            )),
        }
    }
}

/// How pod traffic reaches other nodes' pods (`--routing`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Routing {
    /// Encapsulated in VXLAN (the kernel's collect_md device): any underlay that
    /// routes between the nodes' InternalIPs; pods lose 50 bytes of MTU.
    #[default]
    Vxlan,
    /// Unencapsulated, out of the uplink straight to the other node's MAC (flannel's
    /// host-gw, Calico without encapsulation, Cilium's native routing): the nodes
    /// must share an L2 segment; pods get the uplink's MTU. A node whose InternalIP
    /// is not on-link is refused native routing (with a logged reason) and reached
    /// over VXLAN.
    Native,
}

/// The uplink as a sync read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    /// The subnets of its IPv4 addresses: the nodes on-link are in one of them.
    pub subnets: Vec<ipnet::Ipv4Net>,
}

impl Uplink {
    /// Whether `ip` is on the uplink's link (in one of its subnets).
    pub fn on_link(&self, ip: std::net::Ipv4Addr) -> bool {
        self.subnets.iter().any(|subnet| subnet.contains(&ip))
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
            routing: Routing::default(),
            uplink: None,
        }
    }
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

/// Entries the Service maps hold (their `max_entries`): a Service that does not fit
/// is left out whole, with a reason naming the map, instead of failing the sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub services: usize,
    pub backends: usize,
    pub rev_nat: usize,
    /// The IPv6 Service maps (`ferrite_lb6_*`).
    pub services6: usize,
    pub backends6: usize,
    pub rev_nat6: usize,
}

impl Capacities {
    /// The capacities `entries_of` gives the Service maps (by map name).
    pub fn of(entries_of: impl Fn(&str) -> usize) -> Self {
        use ferrite_common::map_names;
        Self {
            services: entries_of(map_names::SERVICES),
            backends: entries_of(map_names::BACKENDS),
            rev_nat: entries_of(map_names::REV_NAT),
            services6: entries_of(map_names::SERVICES6),
            backends6: entries_of(map_names::BACKENDS6),
            rev_nat6: entries_of(map_names::REV_NAT6),
        }
    }
}

impl Default for Capacities {
    fn default() -> Self {
        Self::of(|name| ferrite_common::capacity::default_for(name).unwrap_or(0) as usize)
    }
}

/// A host-side interface as the node's network namespace reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interface {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// A node's own address on the overlay: the first address of its (first) pod CIDR,
/// which the CNI plugin's IPAM never hands out (flannel.1 and vxlan.calico take an
/// address of the node's pod CIDR the same way).
pub fn overlay_address(pod_cidr: &ipnet::Ipv4Net) -> Option<std::net::Ipv4Addr> {
    pod_cidr.hosts().next()
}

/// A node's own IPv6 address on the overlay: `::1` of its IPv6 pod CIDR (`::0` is
/// the subnet-router anycast address), which the IPAM never hands out either.
pub fn overlay_address6(pod_cidr: &ipnet::Ipv6Net) -> Option<std::net::Ipv6Addr> {
    let network = u128::from(pod_cidr.network());
    (pod_cidr.prefix_len() < 128).then(|| std::net::Ipv6Addr::from(network + 1))
}
