//! An update of some Services writes what a full sync of the same objects writes, as
//! a property over generated change sequences: Services of every kind (ClusterIP,
//! NodePort, LoadBalancer, externalIPs, traffic policies Local, health-check ports,
//! affinity; IPv4, IPv6 and dual-stack, and RequireDualStack missing a family) drawn
//! from small pools of addresses and ports, so that they also collide; their
//! EndpointSlices of both families, with and without zone hints; Nodes that change
//! address, pod CIDRs (dual-stack or not) and zone, join and leave; Pods of both
//! nodes (labels, IPv4 and IPv6 addresses that collide too, named ports, hostPorts
//! that collide with each other, NodePorts and health-check ports; this node's pods
//! wired or not), and for NetworkPolicy,
//! Namespaces (labels) and NetworkPolicies (pod, namespace and ipBlock peers,
//! numbered and named ports, both directions) that come, change and go. After every
//! step the agent's record is the maps, a full sync would write nothing, the maps
//! (both families' Service maps) mean what a full sync from scratch means, and the
//! IPv6 frontends of the model are a full sync's and each has its lb6 entries.
mod support;

use ferrite_agent::limits::Limits;
use proptest::prelude::*;
use support::SimNode;

const SERVICES: [&str; 4] = ["a", "b", "c", "d"];
#[derive(Clone, Debug)]
struct ServiceSpec {
    kind: &'static str,
    cluster_ip: u8,
    ports: Vec<(u16, &'static str)>,
    node_port_base: u16,
    external_ip: Option<u8>,
    ingress_ip: Option<u8>,
    external_local: bool,
    internal_local: bool,
    health_check_port: Option<u16>,
    affinity: Option<u32>,
    /// `IPv4`, `IPv6`, `dual` (both), `half` (RequireDualStack with one clusterIP:
    /// refused).
    families: &'static str,
}

impl ServiceSpec {
    fn yaml(&self, name: &str) -> String {
        let (v4, v6) = (
            format!("10.96.0.{}", self.cluster_ip),
            format!("'fd00:10:96::{}'", self.cluster_ip),
        );
        let families = match self.families {
            "IPv4" => format!("clusterIP: {v4}\n  ipFamilies: [IPv4]"),
            "IPv6" => format!("clusterIP: {v6}\n  ipFamilies: [IPv6]"),
            "dual" => format!(
                "clusterIP: {v6}\n  clusterIPs: [{v6}, {v4}]\n  ipFamilyPolicy: PreferDualStack"
            ),
            _ => format!(
                "clusterIP: {v4}\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack"
            ),
        };
        let mut spec = format!("  type: {}\n  {families}\n", self.kind);
        if let Some(ip) = self.external_ip {
            spec.push_str(&format!(
                "  externalIPs: [192.0.2.{ip}, '2001:db8:e::{ip}']\n"
            ));
        }
        if self.external_local && self.kind != "ClusterIP" {
            spec.push_str("  externalTrafficPolicy: Local\n");
            if let (Some(port), "LoadBalancer") = (self.health_check_port, self.kind) {
                spec.push_str(&format!("  healthCheckNodePort: {port}\n"));
            }
        }
        if self.internal_local {
            spec.push_str("  internalTrafficPolicy: Local\n");
        }
        if let Some(timeout) = self.affinity {
            spec.push_str(&format!(
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}\n"
            ));
        }
        spec.push_str("  ports:\n");
        for (i, (port, protocol)) in self.ports.iter().enumerate() {
            let node_port = if self.kind == "ClusterIP" {
                String::new()
            } else {
                format!(", nodePort: {}", self.node_port_base + i as u16)
            };
            spec.push_str(&format!(
                "  - {{name: p{port}, port: {port}, protocol: {protocol}, targetPort: {}{node_port}}}\n",
                port + 8000
            ));
        }
        let status = match (self.kind, self.ingress_ip) {
            ("LoadBalancer", Some(ip)) => {
                format!("status: {{loadBalancer: {{ingress: [{{ip: 192.0.2.{ip}}}, {{ip: '2001:db8:1b::{ip}'}}]}}}}\n")
            }
            _ => String::new(),
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{spec}{status}"
        )
    }
}

fn service_spec() -> impl Strategy<Value = ServiceSpec> {
    let ports = prop::sample::subsequence(vec![(80u16, "TCP"), (53, "UDP"), (443, "TCP")], 1..=3);
    (
        prop::sample::select(vec!["ClusterIP", "NodePort", "LoadBalancer"]),
        1u8..=5,
        ports,
        prop::sample::select(vec![30000u16, 30002, 30010]),
        prop::option::of(1u8..=3),
        prop::option::of(1u8..=3),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![32000u16, 32001])),
        prop::option::of(prop::sample::select(vec![60u32, 10_800])),
        prop::sample::select(vec!["IPv4", "IPv4", "IPv6", "dual", "dual", "half"]),
    )
        .prop_map(
            |(
                kind,
                cluster_ip,
                ports,
                node_port_base,
                external_ip,
                ingress_ip,
                external_local,
                internal_local,
                health_check_port,
                affinity,
                families,
            )| ServiceSpec {
                kind,
                cluster_ip,
                ports,
                node_port_base,
                external_ip,
                ingress_ip,
                external_local,
                internal_local,
                health_check_port,
                affinity,
                families,
            },
        )
}

/// An endpoint: (address, node, condition, zone hint).
type EndpointSpec = (
    &'static str,
    Option<&'static str>,
    &'static str,
    Option<&'static str>,
);

fn endpoints() -> impl Strategy<Value = Vec<EndpointSpec>> {
    let endpoint = (
        prop::sample::select(vec![
            "10.244.0.11",
            "10.244.0.12",
            "10.244.1.11",
            "10.244.1.12",
            "10.244.2.11",
        ]),
        prop::sample::select(vec![None, Some("node-1"), Some("node-2")]),
        prop::sample::select(vec!["ready", "not-ready", "terminating"]),
        prop::sample::select(vec![None, Some("z1"), Some("z2")]),
    );
    prop::collection::vec(endpoint, 0..4)
}

/// The IPv6 address of a pod at IPv4 `address` (`10.244.N.M` -> `fd00:10:244:N::M`),
/// in its node's IPv6 pod CIDR.
fn ipv6_of(address: &str) -> String {
    let octets: Vec<&str> = address.split('.').collect();
    format!("'fd00:10:244:{}::{}'", octets[2], octets[3])
}

/// EndpointSlice `slice` of `service`: 0 and 1 are IPv4, 2 is IPv6.
fn slice_yaml(service: &str, slice: u8, endpoints: &[EndpointSpec]) -> String {
    let ipv6 = slice == 2;
    let mut list = String::new();
    for (address, node, condition, zone) in endpoints {
        let address = if ipv6 {
            ipv6_of(address)
        } else {
            address.to_string()
        };
        let node = node.map(|n| format!(", nodeName: {n}")).unwrap_or_default();
        let hints = zone
            .map(|z| format!(", hints: {{forZones: [{{name: {z}}}]}}"))
            .unwrap_or_default();
        let conditions = match *condition {
            "ready" => "{ready: true}",
            "not-ready" => "{ready: false}",
            _ => "{ready: false, serving: true, terminating: true}",
        };
        list.push_str(&format!(
            "- {{addresses: [{address}], conditions: {conditions}{node}{hints}}}\n"
        ));
    }
    let ports: String = [(80, "TCP"), (53, "UDP"), (443, "TCP")]
        .iter()
        .map(|(port, protocol)| {
            format!(
                "- {{name: p{port}, port: {}, protocol: {protocol}}}\n",
                port + 8000
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-{slice}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {}\nports:\n{ports}endpoints:\n{list}",
        if ipv6 { "IPv6" } else { "IPv4" }
    )
}

/// A Node; with `cidr6`, dual-stack: its IPv6 pod CIDR beside the IPv4 one and an
/// IPv6 InternalIP (`2001:db8::N` for `198.51.100.N`) beside its IPv4 one.
fn node_yaml(name: &str, ip: &str, cidr: &str, cidr6: Option<&str>, zone: &str) -> String {
    let (cidrs, ip6) = match cidr6 {
        Some(cidr6) => (
            format!("podCIDR: {cidr}, podCIDRs: [{cidr}, '{cidr6}']"),
            format!(
                ", {{type: InternalIP, address: '2001:db8::{}'}}",
                ip.rsplit('.').next().unwrap_or("1")
            ),
        ),
        None => (format!("podCIDR: {cidr}"), String::new()),
    };
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{topology.kubernetes.io/zone: '{zone}'}}}}\nspec: {{{cidrs}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}{ip6}]}}\n"
    )
}

const PODS: [&str; 4] = ["p0", "p1", "p2", "p3"];
const NAMESPACES: [&str; 2] = ["a", "b"];
const POLICIES: [&str; 3] = ["np0", "np1", "np2"];

/// A pod of either node: its labels, address, named port and hostPorts (port,
/// protocol, hostIP; only this node's mean anything).
#[derive(Clone, Debug)]
struct PodSpec {
    namespace: usize,
    node: &'static str,
    ip: &'static str,
    /// The IPv6 address of a dual-stack pod (in `status.podIPs`).
    ip6: Option<&'static str>,
    app: &'static str,
    tier: &'static str,
    http_port: Option<u16>,
    host_ports: Vec<(u16, &'static str, Option<&'static str>)>,
}

impl PodSpec {
    fn yaml(&self, name: &str) -> String {
        let mut ports: Vec<String> = self
            .http_port
            .map(|p| format!("{{name: http, containerPort: {p}}}"))
            .into_iter()
            .collect();
        ports.extend(
            self.host_ports
                .iter()
                .enumerate()
                .map(|(i, (port, protocol, host_ip))| {
                    let host_ip = host_ip
                        .map(|ip| format!(", hostIP: {ip}"))
                        .unwrap_or_default();
                    format!(
                        "{{containerPort: {}, hostPort: {port}, protocol: {protocol}{host_ip}}}",
                        9000 + i
                    )
                }),
        );
        let pod_ips = match self.ip6 {
            Some(ip6) => format!(", podIPs: [{{ip: {}}}, {{ip: '{ip6}'}}]", self.ip),
            None => String::new(),
        };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {}, labels: {{app: {}, tier: '{}'}}}}\nspec: {{nodeName: {}, containers: [{{name: c, ports: [{}]}}]}}\nstatus: {{phase: Running, podIP: {}{pod_ips}}}\n",
            NAMESPACES[self.namespace],
            self.app,
            self.tier,
            self.node,
            ports.join(", "),
            self.ip
        )
    }
}

fn pod_spec() -> impl Strategy<Value = PodSpec> {
    // hostPorts that collide with each other, the NodePorts and the health-check ports.
    let host_port = (
        prop::sample::select(vec![8088u16, 30000, 30002, 32000]),
        prop::sample::select(vec!["TCP", "UDP"]),
        prop::option::of(prop::sample::select(vec!["198.51.100.1", "0.0.0.0"])),
    );
    (
        0..NAMESPACES.len(),
        prop::sample::select(vec![
            ("node-1", "10.244.0.21"),
            ("node-1", "10.244.0.22"),
            ("node-1", "10.244.0.23"),
            ("node-2", "10.244.1.21"),
            ("node-2", "10.244.1.22"),
        ]),
        // IPv6 addresses of this node's IPv6 pod CIDR (two pods may claim one), of
        // node-2's, and none.
        prop::option::of(prop::sample::select(vec![
            "fd00:10:244::21",
            "fd00:10:244::22",
            "fd00:10:244:1::21",
        ])),
        prop::sample::select(vec!["web", "db"]),
        prop::sample::select(vec!["1", "2"]),
        prop::option::of(prop::sample::select(vec![8080u16, 8081])),
        prop::collection::vec(host_port, 0..3),
    )
        .prop_map(
            |(namespace, (node, ip), ip6, app, tier, http_port, host_ports)| PodSpec {
                namespace,
                node,
                ip,
                ip6,
                app,
                tier,
                http_port,
                host_ports,
            },
        )
}

#[derive(Clone, Debug)]
struct PolicySpec {
    namespace: usize,
    /// The pods it selects by app (`None`: every pod of its namespace).
    app: Option<&'static str>,
    /// One rule's peer.
    peer: &'static str,
    /// One rule's ports.
    ports: &'static str,
    egress: bool,
}

impl PolicySpec {
    fn yaml(&self, name: &str) -> String {
        let selector = self
            .app
            .map(|a| format!("{{matchLabels: {{app: {a}}}}}"))
            .unwrap_or_else(|| "{}".into());
        let rule = format!(
            "[{{{}: [{}]{}}}]",
            if self.egress { "to" } else { "from" },
            self.peer,
            self.ports
        );
        let direction = if self.egress { "egress" } else { "ingress" };
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {}}}\nspec: {{podSelector: {selector}, {direction}: {rule}}}\n",
            NAMESPACES[self.namespace]
        )
    }
}

fn policy_spec() -> impl Strategy<Value = PolicySpec> {
    (
        0..NAMESPACES.len(),
        prop::option::of(prop::sample::select(vec!["web", "db"])),
        prop::sample::select(vec![
            "{podSelector: {matchLabels: {tier: '1'}}}",
            "{podSelector: {}}",
            "{namespaceSelector: {matchLabels: {team: x}}}",
            "{namespaceSelector: {matchLabels: {team: y}}, podSelector: {matchLabels: {app: db}}}",
            "{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.0.22/32]}}",
            "{ipBlock: {cidr: 198.51.100.0/24}}",
        ]),
        prop::sample::select(vec![
            "",
            ", ports: [{port: 80}]",
            ", ports: [{port: http}]",
            ", ports: [{port: 1000, endPort: 1010, protocol: UDP}]",
        ]),
        any::<bool>(),
    )
        .prop_map(|(namespace, app, peer, ports, egress)| PolicySpec {
            namespace,
            app,
            peer,
            ports,
            egress,
        })
}

#[derive(Clone, Debug)]
enum Change {
    Pod(usize, PodSpec),
    DeletePod(usize),
    /// A namespace's `team` label (`None`: no labels).
    Namespace(usize, Option<&'static str>),
    DeleteNamespace(usize),
    Policy(usize, PolicySpec),
    DeletePolicy(usize),
    Service(usize, ServiceSpec),
    Slice(usize, u8, Vec<EndpointSpec>),
    DeleteService(usize),
    DeleteSlice(usize, u8),
    /// This node's address, pod CIDRs (IPv4, IPv6) and zone.
    ThisNode(
        &'static str,
        (&'static str, Option<&'static str>),
        &'static str,
    ),
    NodeJoins,
    NodeLeaves,
}

fn change() -> impl Strategy<Value = Change> {
    let service = 0..SERVICES.len();
    prop_oneof![
        4 => (service.clone(), service_spec()).prop_map(|(i, s)| Change::Service(i, s)),
        4 => (service.clone(), 0u8..3, endpoints()).prop_map(|(i, n, e)| Change::Slice(i, n, e)),
        1 => service.clone().prop_map(Change::DeleteService),
        1 => (service, 0u8..3).prop_map(|(i, n)| Change::DeleteSlice(i, n)),
        1 => (
            prop::sample::select(vec!["198.51.100.1", "198.51.100.101"]),
            prop::sample::select(vec![
                ("10.244.0.0/24", Some("fd00:10:244::/64")),
                ("10.244.0.0/24", None),
                ("10.244.4.0/24", Some("fd00:10:244:4::/64")),
            ]),
            prop::sample::select(vec!["z1", "z2", ""]),
        )
            .prop_map(|(ip, cidrs, zone)| Change::ThisNode(ip, cidrs, zone)),
        1 => Just(Change::NodeJoins),
        1 => Just(Change::NodeLeaves),
        4 => (0..PODS.len(), pod_spec()).prop_map(|(i, s)| Change::Pod(i, s)),
        1 => (0..PODS.len()).prop_map(Change::DeletePod),
        2 => (
            0..NAMESPACES.len(),
            prop::option::of(prop::sample::select(vec!["x", "y"]))
        )
            .prop_map(|(i, team)| Change::Namespace(i, team)),
        1 => (0..NAMESPACES.len()).prop_map(Change::DeleteNamespace),
        3 => (0..POLICIES.len(), policy_spec()).prop_map(|(i, s)| Change::Policy(i, s)),
        1 => (0..POLICIES.len()).prop_map(Change::DeletePolicy),
    ]
}

/// Apply `change` to `node` as a watch event would bring it.
fn apply(node: &mut SimNode, change: &Change) {
    let has_service = |node: &SimNode, name: &str| {
        node.objects
            .services
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some(name))
    };
    let has_slice = |node: &SimNode, name: &str| {
        node.objects
            .endpoint_slices
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some(name))
    };
    match change {
        Change::Service(i, spec) => node.apply(&spec.yaml(SERVICES[*i])),
        Change::Slice(i, n, endpoints) => node.apply(&slice_yaml(SERVICES[*i], *n, endpoints)),
        Change::DeleteService(i) if has_service(node, SERVICES[*i]) => {
            node.delete("Service", "default", SERVICES[*i])
        }
        Change::DeleteSlice(i, n) if has_slice(node, &format!("{}-{n}", SERVICES[*i])) => {
            node.delete("EndpointSlice", "default", &format!("{}-{n}", SERVICES[*i]))
        }
        Change::DeleteService(_) | Change::DeleteSlice(..) => {}
        Change::ThisNode(ip, (cidr, cidr6), zone) => {
            node.apply(&node_yaml("node-1", ip, cidr, *cidr6, zone))
        }
        Change::NodeJoins => node.apply(&node_yaml(
            "node-3",
            "198.51.100.3",
            "10.244.2.0/24",
            Some("fd00:10:244:2::/64"),
            "z2",
        )),
        Change::NodeLeaves if node.objects.nodes.len() > 2 => node.delete("Node", "", "node-3"),
        Change::NodeLeaves => {}
        Change::Pod(i, spec) => {
            // A pod keeps its namespace: another namespace is another pod.
            let name = format!("{}-{}", PODS[*i], NAMESPACES[spec.namespace]);
            node.apply(&spec.yaml(&name))
        }
        Change::DeletePod(i) => {
            let gone = node.objects.pods.iter().find(|p| {
                p.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(&format!("{}-", PODS[*i])))
            });
            if let Some(pod) = gone.cloned() {
                let namespace = pod.metadata.namespace.clone().unwrap_or_default();
                let name = pod.metadata.name.clone().unwrap_or_default();
                node.delete("Pod", &namespace, &name);
            }
        }
        Change::Namespace(i, team) => {
            let labels = team
                .map(|t| format!("{{team: {t}}}"))
                .unwrap_or_else(|| "{}".into());
            node.apply(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, labels: {labels}}}\n",
                NAMESPACES[*i]
            ))
        }
        Change::DeleteNamespace(i) => {
            let name = NAMESPACES[*i];
            if node
                .objects
                .namespaces
                .iter()
                .any(|n| n.metadata.name.as_deref() == Some(name))
            {
                node.delete("Namespace", "", name);
            }
        }
        Change::Policy(i, spec) => {
            let name = format!("{}-{}", POLICIES[*i], NAMESPACES[spec.namespace]);
            node.apply(&spec.yaml(&name))
        }
        Change::DeletePolicy(i) => {
            let gone = node.objects.network_policies.iter().find(|p| {
                p.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(&format!("{}-", POLICIES[*i])))
            });
            if let Some(policy) = gone.cloned() {
                let namespace = policy.metadata.namespace.clone().unwrap_or_default();
                let name = policy.metadata.name.clone().unwrap_or_default();
                node.delete("NetworkPolicy", &namespace, &name);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn an_update_of_services_or_policy_objects_writes_what_a_full_sync_writes(
        first in prop::collection::vec(change(), 0..6),
        changes in prop::collection::vec(change(), 1..25),
    ) {
        let limits = Limits {
            external_ip_cidrs: vec!["192.0.2.0/24".parse().unwrap()],
            external_ip_cidrs6: vec!["2001:db8:e::/48".parse().unwrap()],
            ..Limits::default()
        };
        let mut node = SimNode::new("node-1", limits);
        node.objects.nodes = ferrite_agent::objects_yaml::parse_objects(&format!(
            "{}---\n{}",
            node_yaml("node-1", "198.51.100.1", "10.244.0.0/24", Some("fd00:10:244::/64"), "z1"),
            node_yaml("node-2", "198.51.100.2", "10.244.1.0/24", Some("fd00:10:244:1::/64"), "z2")
        ))
        .expect("nodes")
        .0
        .nodes;
        node.full_sync();
        for change in &first {
            apply(&mut node, change);
        }
        node.full_sync();
        node.check_incremental_means_full("after the first full sync");
        for (step, change) in changes.iter().enumerate() {
            apply(&mut node, change);
            node.check_incremental_means_full(&format!("step {step}: {change:?}"));
        }
    }
}
