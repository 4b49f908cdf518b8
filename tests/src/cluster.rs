//! The example cluster (examples/one-node.yaml) and variations of it for tests.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;

use crate::lab::{Node, Server};

/// The example file the demo runs on; its node is called `ferrite-demo`.
pub const EXAMPLE: &str = include_str!("../../examples/one-node.yaml");
pub const EXAMPLE_NODE: &str = "ferrite-demo";

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const TCP_FRONTEND: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
pub const UDP_FRONTEND: SocketAddrV4 = SocketAddrV4::new(VIP, 53);
/// Backends listen here (the Service's targetPorts).
pub const TCP_TARGET: u16 = 8080;
pub const UDP_TARGET: u16 = 5353;

/// Pods of the example: (name, IP).
pub const CLIENTS: [(&str, Ipv4Addr); 2] = [
    ("client-a", Ipv4Addr::new(10, 244, 0, 2)),
    ("client-b", Ipv4Addr::new(10, 244, 0, 3)),
];
pub const BACKENDS: [(&str, Ipv4Addr); 3] = [
    ("web-1", Ipv4Addr::new(10, 244, 0, 11)),
    ("web-2", Ipv4Addr::new(10, 244, 0, 12)),
    ("web-3", Ipv4Addr::new(10, 244, 0, 13)),
];

/// A uniquely named node (after `label`) with the example's pods, its backends
/// serving TCP and UDP; no config and no agent yet. Drop the servers before the node.
pub fn example_node(label: &str) -> Result<(Node, Vec<Server>)> {
    let mut node = Node::new(label)?;
    for (name, ip) in CLIENTS.iter().chain(BACKENDS.iter()) {
        node.add_pod(name, *ip)?;
    }
    let mut servers = Vec::new();
    for (name, _) in BACKENDS {
        servers.push(node.pod(name).serve(TCP_TARGET)?);
        servers.push(node.pod(name).serve(UDP_TARGET)?);
    }
    Ok((node, servers))
}

/// The example with its node renamed (tests use unique node names).
pub fn example_for(node: &str) -> String {
    EXAMPLE.replace(
        &format!("nodeName: {EXAMPLE_NODE}"),
        &format!("nodeName: {node}"),
    )
}

/// The example's Service with only `ready` backends in its EndpointSlice, plus the
/// example's pods on `node`.
pub fn example_with_backends(node: &str, ready: &[Ipv4Addr]) -> String {
    let example = example_for(node);
    let (head, _) = example
        .split_once("\nendpoints:")
        .expect("example has an endpoints list");
    let (_, pods) = example
        .split_once("# Pods")
        .expect("example has a pods section");
    let endpoints = ready_endpoints(ready);
    format!("{head}\nendpoints:\n{endpoints}---\n# Pods{pods}")
}

/// A ClusterIP Service like the example's (TCP 80 -> named port http 8080, UDP 53 ->
/// 5353) and its EndpointSlice with `backends` ready.
pub fn service_yaml(name: &str, vip: Ipv4Addr, backends: &[Ipv4Addr]) -> String {
    let endpoints = ready_endpoints(backends);
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {vip}
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: http}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: {UDP_TARGET}}}
---
{}",
        endpoint_slice_yaml(name, &endpoints)
    )
}

/// A LoadBalancer Service `name` (TCP `port` -> TCP_TARGET on NodePort `node_port`,
/// UDP `port + 1` -> UDP_TARGET on `node_port + 1`), with `spec_extra` lines added to
/// its spec (indented two spaces, e.g. `  externalTrafficPolicy: Local\n`), the
/// load balancer's `ingress` IPs, and its EndpointSlice with `backends` ready, each
/// `(address, nodeName)`.
pub fn load_balancer_yaml(
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    node_port: u16,
    spec_extra: &str,
    ingress: &[Ipv4Addr],
    backends: &[(Ipv4Addr, &str)],
) -> String {
    let endpoints: String = backends
        .iter()
        .map(|(ip, node)| {
            format!("- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions: {{ready: true}}\n")
        })
        .collect();
    let ingress: String = ingress
        .iter()
        .map(|ip| format!("{{ip: \"{ip}\"}},"))
        .collect();
    let (udp_port, udp_node_port) = (port + 1, node_port + 1);
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: {vip}
{spec_extra}  ports:
  - {{name: http, port: {port}, protocol: TCP, targetPort: {TCP_TARGET}, nodePort: {node_port}}}
  - {{name: dns, port: {udp_port}, protocol: UDP, targetPort: {UDP_TARGET}, nodePort: {udp_node_port}}}
status: {{loadBalancer: {{ingress: [{ingress}]}}}}
---
{}",
        endpoint_slice_yaml(name, &endpoints)
    )
}

/// EndpointSlice list items: each of `ips` a ready endpoint.
pub fn ready_endpoints(ips: &[Ipv4Addr]) -> String {
    ips.iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
        .collect()
}

/// The EndpointSlice of the Service `name` (ports http -> TCP_TARGET, dns ->
/// UDP_TARGET) with `endpoints` (YAML list items).
pub fn endpoint_slice_yaml(name: &str, endpoints: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
- {{name: http, port: {TCP_TARGET}, protocol: TCP}}
- {{name: dns, port: {UDP_TARGET}, protocol: UDP}}
endpoints:
{endpoints}"
    )
}
