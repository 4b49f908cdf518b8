//! Several nodes on one underlay, with a world behind their default route.

use anyhow::Result;

use super::{
    basics::run_ip, node_ip, node_yaml, sh, unique, Netns, Node, Pod, Underlay, CLUSTER_CIDR,
    WORLD_GATEWAY, WORLD_IP,
};

/// How the cluster's agents route pod traffic between nodes (`--routing`): the
/// cross-node stories run in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    Vxlan,
    Native,
}

impl Routing {
    pub const ALL: [Routing; 2] = [Routing::Vxlan, Routing::Native];

    /// The pod MTU for a 1500-byte uplink.
    pub fn pod_mtu(self) -> u32 {
        match self {
            Routing::Vxlan => 1500 - ferrite_common::VXLAN_OVERHEAD,
            Routing::Native => 1500,
        }
    }

    pub fn flag(self) -> &'static str {
        match self {
            Routing::Vxlan => "vxlan",
            Routing::Native => "native",
        }
    }
}

/// Several Ferrite nodes on one underlay, with a world behind their default route.
/// Fields drop in order: nodes (agents, pods), world, underlay.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub world: Netns,
    pub underlay: Underlay,
}

impl Cluster {
    /// `count` uniquely named nodes with overlay MTUs; agents not started yet.
    pub fn new(count: usize) -> Result<Self> {
        Self::with_routing(count, Routing::Vxlan)
    }

    /// [`Cluster::new`] with its agents routing as `routing` says (and pod MTUs to
    /// match).
    pub fn with_routing(count: usize, routing: Routing) -> Result<Self> {
        let names: Vec<String> = (0..count).map(|i| unique(&format!("n{i}"))).collect();
        let mut cluster = Self::named(&unique("ul"), &unique("world"), &names)?;
        for node in &mut cluster.nodes {
            node.pod_mtu = routing.pod_mtu();
            // VXLAN is the default: its agents run without the flag, as before.
            if routing != Routing::Vxlan {
                node.agent_args
                    .extend(["--routing".into(), routing.flag().into()]);
            }
        }
        Ok(cluster)
    }

    /// Nodes called `names` (node `i` gets underlay address .i+1 and pod CIDR
    /// 10.244.i.0/24), with the underlay and world namespaces named as given.
    pub fn named(underlay: &str, world: &str, names: &[String]) -> Result<Self> {
        let underlay = Underlay::named(underlay)?;
        let world = Netns::new(world)?;
        underlay.plug(&world, WORLD_GATEWAY)?;
        // A host on a real wire sends complete checksums; a veth would hand the node
        // CHECKSUM_PARTIAL packets, which only exist inside one machine (and which
        // XDP, having no skb, cannot tell apart).
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &world.name,
                "ethtool",
                "-K",
                "ul0",
                "tx",
                "off",
            ],
        )?;
        run_ip(&[
            "-n",
            &world.name,
            "addr",
            "add",
            &format!("{WORLD_IP}/32"),
            "dev",
            "lo",
        ])?;
        let mut nodes = Vec::new();
        for (index, name) in names.iter().enumerate() {
            let mut node = Node::named(name)?;
            let ip = node_ip(index);
            underlay.plug(&node.netns, ip)?;
            let gateway = WORLD_GATEWAY.to_string();
            run_ip(&[
                "-n",
                &node.netns.name,
                "route",
                "add",
                "default",
                "via",
                &gateway,
            ])?;
            node.ip = Some(ip);
            node.pod_mtu = 1500 - ferrite_common::VXLAN_OVERHEAD;
            node.agent_args
                .extend(["--cluster-cidr".into(), CLUSTER_CIDR.into()]);
            nodes.push(node);
        }
        Ok(Self {
            nodes,
            world,
            underlay,
        })
    }

    /// Node objects of every node, and the Pod objects of every pod.
    pub fn nodes_and_pods_yaml(&self) -> String {
        let mut docs = Vec::new();
        for (index, node) in self.nodes.iter().enumerate() {
            let cidr = format!("10.244.{index}.0/24");
            docs.push(node_yaml(&node.name, node.ip.expect("plugged"), &cidr));
            docs.extend(node.pods.iter().map(|p| p.yaml(&node.name)));
        }
        docs.join("---\n")
    }

    /// The same cluster-wide file for every node's agent.
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        self.nodes.iter().try_for_each(|n| n.write_config(yaml))
    }

    pub fn start_agents(&mut self) -> Result<()> {
        self.nodes.iter_mut().try_for_each(Node::start_agent)
    }

    /// Find a pod by name on any node.
    pub fn pod(&self, name: &str) -> &Pod {
        self.nodes
            .iter()
            .flat_map(|n| n.pods.iter())
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }
}
