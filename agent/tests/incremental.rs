//! An update of some Services writes what a full sync of the same objects writes, as
//! a property over generated change sequences: Services of every kind (ClusterIP,
//! NodePort, LoadBalancer, externalIPs, traffic policies Local, health-check ports,
//! affinity) drawn from small pools of addresses and ports, so that they also
//! collide; their EndpointSlices, with and without zone hints; Nodes that change
//! address, pod CIDR and zone, join and leave; this node's pods with hostPorts that
//! collide with each other, NodePorts and health-check ports. After every step the agent's record is the maps, a full sync would write
//! nothing, and the maps mean what a full sync from scratch means.
mod support;

use ferrite_agent::limits::Limits;
use proptest::prelude::*;
use support::SimNode;

const SERVICES: [&str; 4] = ["a", "b", "c", "d"];
const PODS: [&str; 3] = ["p", "q", "r"];

/// A pod of this node: its address's last octet and its hostPorts (port, protocol,
/// hostIP).
#[derive(Clone, Debug)]
struct PodSpec {
    ip: u8,
    host_ports: Vec<(u16, &'static str, Option<&'static str>)>,
}

impl PodSpec {
    fn yaml(&self, name: &str) -> String {
        let ports: Vec<String> = self
            .host_ports
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
            })
            .collect();
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{nodeName: node-1, containers: [{{name: app, ports: [{}]}}]}}\n\
             status: {{phase: Running, podIP: 10.244.0.{}}}\n",
            ports.join(", "),
            self.ip
        )
    }
}

fn pod_spec() -> impl Strategy<Value = PodSpec> {
    // Ports that collide with each other, the NodePorts and the health-check ports.
    let host_port = (
        prop::sample::select(vec![8088u16, 30000, 30002, 32000]),
        prop::sample::select(vec!["TCP", "UDP"]),
        prop::option::of(prop::sample::select(vec!["198.51.100.1", "0.0.0.0"])),
    );
    (
        prop::sample::select(vec![21u8, 22]),
        prop::collection::vec(host_port, 0..3),
    )
        .prop_map(|(ip, host_ports)| PodSpec { ip, host_ports })
}

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
}

impl ServiceSpec {
    fn yaml(&self, name: &str) -> String {
        let mut spec = format!(
            "  type: {}\n  clusterIP: 10.96.0.{}\n",
            self.kind, self.cluster_ip
        );
        if let Some(ip) = self.external_ip {
            spec.push_str(&format!("  externalIPs: [192.0.2.{ip}]\n"));
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
                format!("status: {{loadBalancer: {{ingress: [{{ip: 192.0.2.{ip}}}]}}}}\n")
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

fn slice_yaml(service: &str, slice: u8, endpoints: &[EndpointSpec]) -> String {
    let mut list = String::new();
    for (address, node, condition, zone) in endpoints {
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
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-{slice}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports:\n{ports}endpoints:\n{list}"
    )
}

fn node_yaml(name: &str, ip: &str, cidr: &str, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{topology.kubernetes.io/zone: '{zone}'}}}}\nspec: {{podCIDR: {cidr}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
    )
}

#[derive(Clone, Debug)]
enum Change {
    Service(usize, ServiceSpec),
    Slice(usize, u8, Vec<EndpointSpec>),
    DeleteService(usize),
    DeleteSlice(usize, u8),
    /// This node's address, pod CIDR and zone.
    ThisNode(&'static str, &'static str, &'static str),
    NodeJoins,
    NodeLeaves,
    Pod(usize, PodSpec),
    DeletePod(usize),
}

fn change() -> impl Strategy<Value = Change> {
    let service = 0..SERVICES.len();
    prop_oneof![
        4 => (service.clone(), service_spec()).prop_map(|(i, s)| Change::Service(i, s)),
        4 => (service.clone(), 0u8..2, endpoints()).prop_map(|(i, n, e)| Change::Slice(i, n, e)),
        1 => service.clone().prop_map(Change::DeleteService),
        1 => (service, 0u8..2).prop_map(|(i, n)| Change::DeleteSlice(i, n)),
        1 => (
            prop::sample::select(vec![
                ("198.51.100.1", "10.244.0.0/24"),
                ("198.51.100.101", "10.244.0.0/24"),
                ("198.51.100.1", "10.244.4.0/24"),
            ]),
            prop::sample::select(vec!["z1", "z2", ""]),
        )
            .prop_map(|((ip, cidr), zone)| Change::ThisNode(ip, cidr, zone)),
        1 => Just(Change::NodeJoins),
        1 => Just(Change::NodeLeaves),
        2 => (0..PODS.len(), pod_spec()).prop_map(|(i, p)| Change::Pod(i, p)),
        1 => (0..PODS.len()).prop_map(Change::DeletePod),
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
        Change::ThisNode(ip, cidr, zone) => node.apply(&node_yaml("node-1", ip, cidr, zone)),
        Change::NodeJoins => {
            node.apply(&node_yaml("node-3", "198.51.100.3", "10.244.2.0/24", "z2"))
        }
        Change::NodeLeaves if node.objects.nodes.len() > 2 => node.delete("Node", "", "node-3"),
        Change::NodeLeaves => {}
        Change::Pod(i, spec) => node.apply(&spec.yaml(PODS[*i])),
        Change::DeletePod(i) => {
            let exists = node
                .objects
                .pods
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some(PODS[*i]));
            if exists {
                node.delete("Pod", "default", PODS[*i]);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn an_update_of_some_services_writes_what_a_full_sync_writes(
        first in prop::collection::vec(change(), 0..6),
        changes in prop::collection::vec(change(), 1..25),
    ) {
        let limits = Limits {
            external_ip_cidrs: vec!["192.0.2.0/24".parse().unwrap()],
            ..Limits::default()
        };
        let mut node = SimNode::new("node-1", limits);
        node.objects.nodes = ferrite_agent::objects_yaml::parse_objects(&format!(
            "{}---\n{}",
            node_yaml("node-1", "198.51.100.1", "10.244.0.0/24", "z1"),
            node_yaml("node-2", "198.51.100.2", "10.244.1.0/24", "z2")
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
