//! Objects and helpers shared by the model's unit tests.
use super::*;
use crate::limits::Limits;
use crate::objects_yaml::parse_objects;

pub(super) const NODE: &str = "node-a";

/// Limits that let every externalIP through (the default allows none).
pub(super) fn open_limits() -> Limits {
    Limits {
        external_ip_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
        external_ip_cidrs6: vec!["::/0".parse().unwrap()],
        ..Limits::default()
    }
}

pub(super) fn build_yaml(yaml: &str) -> (DesiredState, Vec<Skipped>) {
    let (objects, mut skipped) = parse_objects(yaml).unwrap();
    let (state, more) = build_all(&objects);
    skipped.extend(more);
    (state, skipped)
}

/// The model of `objects` for [`NODE`], in the context their Nodes make.
pub(super) fn build_all(objects: &ClusterObjects) -> (DesiredState, Vec<Skipped>) {
    let (context, mut skipped) = NodeContext::new(NODE, &open_limits(), &objects.nodes, None);
    let (state, more) = build(objects, &context);
    skipped.extend(more);
    (state, skipped)
}

pub(super) fn addr(s: &str, port: u16, protocol: Protocol) -> L4Addr {
    L4Addr {
        ip: s.parse().unwrap(),
        port,
        protocol,
    }
}

pub(super) fn tcp(s: &str, port: u16) -> L4Addr {
    addr(s, port, Protocol::Tcp)
}

pub(super) const SHOP_NODE: &str = "apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.0.0/24}
status: {addresses: [{type: InternalIP, address: 198.51.100.1}]}
";

/// A LoadBalancer `shop/lb` with `spec_extra` (flow-style entries), one ready
/// endpoint here, one ready on node-b, one terminating here.
pub(super) fn load_balancer(spec_extra: &str) -> String {
    format!(
        "{SHOP_NODE}---
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: shop}}
spec: {{type: LoadBalancer, clusterIP: 10.96.0.5, externalIPs: [192.0.2.200], ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]{spec_extra}}}
status: {{loadBalancer: {{ingress: [{{ip: 192.0.2.100}}, {{hostname: lb.example}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: lb-1, namespace: shop, labels: {{kubernetes.io/service-name: lb}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- {{addresses: [10.244.0.11], nodeName: node-a}}
- {{addresses: [10.244.1.11], nodeName: node-b, conditions: {{ready: true}}}}
- {{addresses: [10.244.0.12], nodeName: node-a, conditions: {{ready: false, serving: true, terminating: true}}}}
- {{addresses: [10.244.0.13], nodeName: node-a, conditions: {{ready: false, serving: false, terminating: true}}}}
"
    )
}

pub(super) const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.0.11]
  conditions: {ready: true}
- addresses: [10.244.0.12]
- addresses: [10.244.0.13]
  conditions: {ready: false}
"#;
