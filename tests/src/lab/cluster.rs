//! Several nodes on one underlay, with a world behind their default route.

use std::{collections::BTreeMap, path::Path, sync::Mutex};

use anyhow::{Context, Result};
use serde_json::Value;

use super::{
    basics::run_ip, node_ip, node_ip6, node_yaml, node_yaml_dual_stack, pod_cidr6, sh, unique,
    Netns, Node, Pod, Underlay, CLUSTER_CIDR, CLUSTER_CIDR6, SERVICE_CIDR6, WORLD_GATEWAY,
    WORLD_GATEWAY6, WORLD_IP, WORLD_IP6,
};

/// Where a cluster's agents read the Kubernetes objects from: the same stories run
/// on both, so every feature is checked in file mode and in Kubernetes mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectSource {
    /// One YAML file per node (`--config`), rewritten whole on every change.
    File,
    /// An API server (list and watch) the agents reach over the node network; a
    /// change becomes the watch events of the objects that changed.
    Kubernetes,
}

/// An API server the cluster's agents can watch: what [`Cluster::write_config`]
/// turns a change of the cluster's objects into.
pub trait ObjectStore: Send {
    /// Create or replace `object` (a Kubernetes object as JSON).
    fn apply(&self, object: Value);
    fn delete(&self, kind: &str, namespace: &str, name: &str);
    /// A kubeconfig that reaches this store from any node.
    fn write_kubeconfig(&self, path: &Path) -> Result<()>;
}

/// The API server of a Kubernetes-mode cluster and the objects it holds as the
/// tests gave them: (kind, namespace, name) -> object.
struct ApiSource {
    store: Box<dyn ObjectStore>,
    objects: BTreeMap<(String, String, String), Value>,
}

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
/// Fields drop in order: nodes (agents, pods), the API server, world, underlay.
pub struct Cluster {
    pub nodes: Vec<Node>,
    api: Option<Mutex<ApiSource>>,
    pub world: Netns,
    pub underlay: Underlay,
    /// Whether nodes have an IPv6 pod CIDR and address too (`Cluster::dual_stack`).
    dual_stack: bool,
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
            api: None,
            world,
            underlay,
            dual_stack: false,
        })
    }

    /// Make the cluster dual-stack (before its agents start): the node network and
    /// the world get IPv6 too (each node an address of [`node_ip6`] and a default
    /// route via the world's gateway, the world host [`WORLD_IP6`]), each Node object an
    /// IPv6 pod CIDR ([`pod_cidr6`]) and InternalIP, each agent the IPv6 cluster and
    /// Service CIDRs.
    pub fn dual_stack(&mut self) -> Result<()> {
        Underlay::plug6(&self.world, WORLD_GATEWAY6)?;
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.world.name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.lo.disable_ipv6=0",
            ],
        )?;
        run_ip(&[
            "-n",
            &self.world.name,
            "addr",
            "add",
            &format!("{WORLD_IP6}/128"),
            "dev",
            "lo",
        ])?;
        let gateway = WORLD_GATEWAY6.to_string();
        for (index, node) in self.nodes.iter_mut().enumerate() {
            Underlay::plug6(&node.netns, node_ip6(index))?;
            run_ip(&[
                "-6",
                "-n",
                &node.netns.name,
                "route",
                "add",
                "default",
                "via",
                &gateway,
            ])?;
            let flag = node.agent_args.iter().position(|a| a == "--cluster-cidr");
            let value = flag.map(|i| i + 1).filter(|&i| i < node.agent_args.len());
            let value = value.context("lab nodes run with --cluster-cidr")?;
            node.agent_args[value] = format!("{CLUSTER_CIDR},{CLUSTER_CIDR6}");
            node.agent_args
                .extend(["--service-cidr".to_string(), SERVICE_CIDR6.to_string()]);
        }
        self.dual_stack = true;
        Ok(())
    }

    /// From now on the agents read their objects from `store` (Kubernetes mode):
    /// [`Cluster::write_config`] applies what changed there and
    /// [`Cluster::start_agents`] points the agents at it.
    pub fn serve_objects_from(&mut self, store: Box<dyn ObjectStore>) {
        self.api = Some(Mutex::new(ApiSource {
            store,
            objects: BTreeMap::new(),
        }));
    }

    /// Where the agents read their objects from.
    pub fn object_source(&self) -> ObjectSource {
        match self.api {
            Some(_) => ObjectSource::Kubernetes,
            None => ObjectSource::File,
        }
    }

    /// Node objects of every node, and the Pod objects of every pod.
    pub fn nodes_and_pods_yaml(&self) -> String {
        let mut docs = Vec::new();
        for (index, node) in self.nodes.iter().enumerate() {
            let cidr = format!("10.244.{index}.0/24");
            let ip = node.ip.expect("plugged");
            docs.push(if self.dual_stack {
                node_yaml_dual_stack(
                    &node.name,
                    (ip, node_ip6(index)),
                    (&cidr, &pod_cidr6(index)),
                )
            } else {
                node_yaml(&node.name, ip, &cidr)
            });
            docs.extend(node.pods.iter().map(|p| p.yaml(&node.name)));
        }
        docs.join("---\n")
    }

    /// The cluster's objects are now those of `yaml`: the same cluster-wide file for
    /// every node's agent, or, in Kubernetes mode, the objects that changed applied to
    /// the API server (added or modified) and those gone deleted, each one watch event.
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        let Some(api) = &self.api else {
            return self.nodes.iter().try_for_each(|n| n.write_config(yaml));
        };
        let mut api = api.lock().expect("no test thread panicked holding it");
        let api = &mut *api;
        let mut wanted = BTreeMap::new();
        for document in serde_yaml_ng::Deserializer::from_str(yaml) {
            let object: Value = serde::Deserialize::deserialize(document)?;
            if object.is_null() {
                continue;
            }
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            let key = (
                text(&object["kind"]),
                text(&object["metadata"]["namespace"]),
                text(&object["metadata"]["name"]),
            );
            anyhow::ensure!(
                !key.0.is_empty() && !key.2.is_empty(),
                "an object without kind or name: {object}"
            );
            wanted.insert(key, object);
        }
        for ((kind, namespace, name), _) in
            api.objects.iter().filter(|(k, _)| !wanted.contains_key(*k))
        {
            api.store.delete(kind, namespace, name);
        }
        for (key, object) in &wanted {
            if api.objects.get(key) != Some(object) {
                api.store.apply(object.clone());
            }
        }
        api.objects = wanted;
        Ok(())
    }

    /// Start every node's agent on the cluster's objects: its file, or the API server.
    pub fn start_agents(&mut self) -> Result<()> {
        (0..self.nodes.len()).try_for_each(|index| self.start_agent(index))
    }

    /// Start node `index`'s agent alone (a node that joins later), as
    /// [`Cluster::start_agents`] starts each.
    pub fn start_agent(&mut self, index: usize) -> Result<()> {
        let node = &mut self.nodes[index];
        let Some(api) = &self.api else {
            return node.start_agent();
        };
        let api = api.lock().expect("no test thread panicked holding it");
        let kubeconfig = node.dir.join("kubeconfig");
        api.store
            .write_kubeconfig(&kubeconfig)
            .context("writing a kubeconfig")?;
        node.start_agent_kube(&kubeconfig)
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
