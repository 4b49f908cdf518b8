//! Pod objects -> this node's pods, and the host-side interface names of pods.
use k8s_openapi::api::core::v1::Pod;
use sha2::{Digest, Sha256};

use std::net::{IpAddr, Ipv6Addr};

use k8s_openapi::api::core::v1::PodStatus;

use super::{
    fields::{parse_ipv4, truncated},
    namespace_of, LocalPod, NodeContext,
};

/// Host-side veth name of a pod: `fer` + 12 hex digits of SHA-256("namespace/name"),
/// 15 characters (IFNAMSIZ - 1), stable across restarts. The CNI plugin and the agent
/// both derive it, as Calico does with its `cali…` names.
pub fn pod_interface_name(namespace: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("{namespace}/{name}").as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("fer{hex}")
}

/// Host-side veth name of a pod's interface `ifname`: the pod's name for `eth0`
/// (the one the agent derives from the Pod object), a name of its own for any other
/// (`net1`, as Multus adds), so a second attachment never takes over the first's.
pub fn pod_attachment_interface_name(namespace: &str, name: &str, ifname: &str) -> String {
    if ifname == "eth0" {
        return pod_interface_name(namespace, name);
    }
    let digest = Sha256::digest(format!("{namespace}/{name}/{ifname}").as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("fer{hex}")
}

/// The pod of this node `pod` is, if it is one with an address; an error says why
/// it cannot have the address it claims (see [`NodeContext::refuse_pod_ip`]).
pub fn local_pod(pod: &Pod, context: &NodeContext) -> Result<Option<LocalPod>, String> {
    let spec = pod.spec.as_ref().ok_or("spec is missing")?;
    if spec.node_name.as_deref() != Some(context.name.as_str()) {
        return Ok(None);
    }
    if spec.host_network == Some(true) {
        return Ok(None); // uses the node's network: nothing to wire
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let name = pod
        .metadata
        .name
        .clone()
        .ok_or("metadata.name is missing")?;
    let namespace = namespace_of(&pod.metadata).to_string();
    let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()) else {
        return Ok(None); // not wired yet
    };
    let ip = parse_ipv4(ip, "status.podIP")?;
    if let Some(why) = context.refuse_pod_ip(ip) {
        return Err(why);
    }
    let ip6 = status.map(pod_ip6).transpose()?.flatten();
    if let Some(why) = ip6.and_then(|ip6| context.refuse_pod_ip6(ip6)) {
        return Err(why);
    }
    Ok(Some(LocalPod {
        interface: pod_interface_name(&namespace, &name),
        namespace,
        name,
        ip,
        ip6,
    }))
}

/// The IPv6 address among a pod's `status.podIPs` (a dual-stack pod has one per
/// family), if it has one.
fn pod_ip6(status: &PodStatus) -> Result<Option<Ipv6Addr>, String> {
    let mut found = None;
    for entry in status.pod_ips.iter().flatten() {
        let ip = entry.ip.as_str();
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => {}
            Ok(IpAddr::V6(ip6)) => {
                if found.replace(ip6).is_some_and(|first| first != ip6) {
                    return Err(format!(
                        "status.podIPs holds more than one IPv6 address ({})",
                        truncated(ip)
                    ));
                }
            }
            Err(_) => {
                return Err(format!(
                    "status.podIPs {:?} is not an IP address",
                    truncated(ip)
                ))
            }
        }
    }
    Ok(found)
}

/// Keep of a watched Pod only what the models read (name, namespace, labels,
/// timestamps; node, hostNetwork, containers' names and ports; phase and addresses):
/// a Pod's volumes, env, annotations and container statuses are most of its size,
/// and every Pod of the cluster is cached.
pub fn slim_pod(pod: &mut Pod) {
    pod.metadata.annotations = None;
    pod.metadata.finalizers = None;
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name,
            host_network: spec.host_network,
            containers: spec
                .containers
                .into_iter()
                .map(|c| k8s_openapi::api::core::v1::Container {
                    name: c.name,
                    ports: c.ports,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            host_ip: status.host_ip,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use super::slim_pod;
    use crate::limits::Limits;

    /// The watches cache slimmed Pods: every model reads the same from them.
    #[test]
    fn a_slimmed_pod_means_what_the_pod_meant() {
        let yaml = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.0.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.1.1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}, annotations: {big: "x"}}
spec:
  nodeName: node-a
  volumes: [{name: data, emptyDir: {}}]
  initContainers: [{name: init, image: busybox}]
  containers:
  - name: web
    image: nginx
    env: [{name: A, value: b}]
    ports: [{name: http, containerPort: 8080, protocol: TCP, hostPort: 80}]
status:
  phase: Running
  podIP: 10.244.0.5
  podIPs: [{ip: 10.244.0.5}]
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: node-a, containers: [{name: c, image: curl}]}
status: {phase: Running, podIP: 10.244.0.6}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: http}]}]
"#;
        let (objects, _) = crate::objects_yaml::parse_objects(yaml).unwrap();
        let mut slimmed = objects.clone();
        slimmed.pods = objects
            .pods
            .iter()
            .map(|pod| {
                let mut pod = (**pod).clone();
                slim_pod(&mut pod);
                std::sync::Arc::new(pod)
            })
            .collect();
        let (full, _) = build_all(&objects);
        let (slim, _) = build_all(&slimmed);
        assert!(!full.policy.endpoints.is_empty(), "the policy selects web");
        assert_eq!(full.policy, slim.policy);
        assert_eq!(full.pods, slim.pods);
        let web = &slimmed.pods[0];
        assert!(web.metadata.annotations.is_none());
        assert!(web.spec.as_ref().unwrap().volumes.is_none());
    }

    #[test]
    fn only_this_nodes_running_pods_with_an_ip_are_local() {
        let (state, skipped) = build_yaml(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: shop}
spec: {nodeName: node-a, containers: []}
status: {podIP: 10.244.0.11, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere}
spec: {nodeName: node-b, containers: []}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: pending}
spec: {nodeName: node-a, containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: done}
spec: {nodeName: node-a, containers: []}
status: {podIP: 10.244.0.12, phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: bad}
spec: {nodeName: node-a, containers: []}
status: {podIP: 10.244.0.999}
"#,
        );
        assert_eq!(state.pods.len(), 1);
        let pod = &state.pods[&"10.244.0.11".parse().unwrap()];
        assert_eq!(pod.interface, pod_interface_name("shop", "a"));
        assert_eq!(skipped.len(), 1, "{skipped:?}");
    }

    fn pod(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{nodeName: node-a, containers: []}}\nstatus: {{podIP: {ip}}}\n"
        )
    }

    const NODE_B: &str = "apiVersion: v1
kind: Node
metadata: {name: node-b}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 198.51.100.2}]}
";

    /// Pod objects claiming addresses that are no pod's of this node: each is
    /// skipped with a reason naming the address, the rest apply.
    #[test]
    fn pods_claiming_a_node_address_or_one_outside_this_nodes_pod_cidr_are_skipped() {
        let claims = [
            ("other-node", "198.51.100.2", "is node node-b's address"),
            ("this-node", "198.51.100.1", "is node node-a's address"),
            (
                "other-cidr",
                "10.244.1.5",
                "outside this node's pod CIDR 10.244.0.0/24",
            ),
            ("outside", "10.250.0.9", "outside this node's pod CIDR"),
            ("overlay", "10.244.0.1", "overlay address of 10.244.0.0/24"),
            ("network", "10.244.0.0", "network, broadcast"),
            ("broadcast", "10.244.0.255", "network, broadcast"),
            ("loopback", "127.0.0.1", "loopback"),
            ("metadata", "169.254.169.254", "link-local"),
        ];
        let mut docs = vec![
            SHOP_NODE.to_string(),
            NODE_B.to_string(),
            pod("fine", "10.244.0.7"),
        ];
        docs.extend(claims.iter().map(|(name, ip, _)| pod(name, ip)));
        // The node's own network: no address to check, nothing to wire.
        docs.push(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: host, namespace: shop}\n\
             spec: {nodeName: node-a, hostNetwork: true, containers: []}\n\
             status: {podIP: 198.51.100.1}\n"
                .into(),
        );
        let (state, skipped) = build_yaml(&docs.join("---\n"));
        let ips: Vec<String> = state.pods.keys().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.244.0.7"]);
        assert_eq!(skipped.len(), claims.len(), "{skipped:#?}");
        for (name, ip, says) in claims {
            let reason = skipped
                .iter()
                .find(|s| s.object == format!("Pod shop/{name}"))
                .unwrap_or_else(|| panic!("{name} not skipped: {skipped:#?}"))
                .reason
                .to_string();
            assert!(
                reason.contains(&format!("status.podIP {ip} is")) && reason.contains(says),
                "{name}: {reason}"
            );
        }
    }

    /// Before this node's Node object (and pod CIDR) is known: still never a node's
    /// address, nor one in another node's pod CIDR or outside the cluster CIDR.
    #[test]
    fn without_this_nodes_pod_cidr_pods_still_stay_off_other_nodes() {
        let docs = [
            NODE_B.to_string(),
            pod("fine", "10.244.0.7"),
            pod("other-node", "198.51.100.2"),
            pod("other-cidr", "10.244.1.5"),
            pod("outside", "10.250.0.9"),
        ];
        let (objects, _) = crate::objects_yaml::parse_objects(&docs.join("---\n")).unwrap();
        let limits = Limits {
            cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
            ..open_limits()
        };
        let (context, _) = NodeContext::new(NODE, &limits, &objects.nodes, None);
        let (state, skipped) = build(&objects, &context);
        let ips: Vec<String> = state.pods.keys().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.244.0.7"]);
        let reasons: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        assert_eq!(
            reasons,
            [
                "Pod shop/other-node: status.podIP 198.51.100.2 is node node-b's address",
                "Pod shop/other-cidr: status.podIP 10.244.1.5 is in 10.244.1.0/24, node node-b's pod CIDR",
                "Pod shop/outside: status.podIP 10.250.0.9 is outside the cluster CIDR 10.244.0.0/16",
            ]
        );
    }

    /// A dual-stack pod's IPv6 address (from `status.podIPs`) is held to the rules
    /// its IPv4 one is: one of this node's IPv6 pod CIDR the IPAM could have given.
    #[test]
    fn dual_stack_pods_get_their_ipv6_address_and_pods_claiming_a_bad_one_are_skipped() {
        const DUAL_NODE: &str = "apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.0.0/24, podCIDRs: [10.244.0.0/24, 'fd00:10:244::/64']}
status: {addresses: [{type: InternalIP, address: 198.51.100.1}, {type: InternalIP, address: '2001:db8::1'}]}
";
        const DUAL_NODE_B: &str = "apiVersion: v1
kind: Node
metadata: {name: node-b}
spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, 'fd00:10:244:1::/64']}
status: {addresses: [{type: InternalIP, address: 198.51.100.2}]}
";
        let dual = |name: &str, ip: &str, ips: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{nodeName: node-a, containers: []}}\n\
                 status: {{podIP: {ip}, podIPs: [{ips}]}}\n"
            )
        };
        let claims = [
            (
                "other-cidr",
                "fd00:10:244:1::5",
                "outside this node's IPv6 pod CIDR",
            ),
            (
                "outside",
                "fd00:99::5",
                "outside this node's IPv6 pod CIDR fd00:10:244::/64",
            ),
            ("network", "fd00:10:244::", "the network or node address"),
            ("first", "fd00:10:244::1", "the network or node address"),
            ("node", "2001:db8::1", "node node-a's address"),
            ("loopback", "::1", "loopback"),
            ("link-local", "fe80::5", "link-local"),
        ];
        let mut docs = vec![
            DUAL_NODE.to_string(),
            DUAL_NODE_B.to_string(),
            dual(
                "fine",
                "10.244.0.7",
                "{ip: 10.244.0.7}, {ip: 'fd00:10:244::7'}",
            ),
            // IPv4 only: no IPv6 address, as before.
            dual("v4", "10.244.0.8", "{ip: 10.244.0.8}"),
            pod("plain", "10.244.0.9"),
            dual(
                "twice",
                "10.244.0.10",
                "{ip: 'fd00:10:244::a'}, {ip: 'fd00:10:244::b'}",
            ),
            dual("garbage", "10.244.0.11", "{ip: 10.244.0.11}, {ip: 'nope'}"),
        ];
        for (n, (name, ip6, _)) in claims.iter().enumerate() {
            let ip = format!("10.244.0.{}", 20 + n);
            docs.push(dual(name, &ip, &format!("{{ip: {ip}}}, {{ip: '{ip6}'}}")));
        }
        let (state, skipped) = build_yaml(&docs.join("---\n"));
        let ip6 = |ip: &str| state.pods[&ip.parse().unwrap()].ip6;
        assert_eq!(ip6("10.244.0.7"), Some("fd00:10:244::7".parse().unwrap()));
        assert_eq!(ip6("10.244.0.8"), None);
        assert_eq!(ip6("10.244.0.9"), None);
        assert_eq!(state.pods.len(), 3, "{:?}", state.pods.keys());
        let reason = |name: &str| {
            skipped
                .iter()
                .find(|s| s.object == format!("Pod shop/{name}"))
                .unwrap_or_else(|| panic!("{name} not skipped: {skipped:#?}"))
                .reason
                .to_string()
        };
        assert!(
            reason("twice").contains("more than one IPv6 address"),
            "{}",
            reason("twice")
        );
        assert!(
            reason("garbage").contains("is not an IP address"),
            "{}",
            reason("garbage")
        );
        for (name, ip6, says) in claims {
            let reason = reason(name);
            assert!(
                reason.contains(&format!("status.podIPs {ip6} is")) && reason.contains(says),
                "{name}: {reason}"
            );
        }
        assert_eq!(skipped.len(), claims.len() + 2, "{skipped:#?}");

        // Before this node's IPv6 pod CIDR is known: none in another node's, none
        // outside the IPv6 cluster CIDR.
        let docs = [
            DUAL_NODE_B.to_string(),
            dual(
                "fine",
                "10.244.0.7",
                "{ip: 10.244.0.7}, {ip: 'fd00:10:244::7'}",
            ),
            dual(
                "other-cidr",
                "10.244.0.8",
                "{ip: 10.244.0.8}, {ip: 'fd00:10:244:1::8'}",
            ),
            dual(
                "outside",
                "10.244.0.9",
                "{ip: 10.244.0.9}, {ip: 'fd00:99::9'}",
            ),
        ];
        let (objects, _) = crate::objects_yaml::parse_objects(&docs.join("---\n")).unwrap();
        let limits = Limits {
            cluster_cidr6: Some("fd00:10:244::/56".parse().unwrap()),
            ..open_limits()
        };
        let (context, _) = NodeContext::new(NODE, &limits, &objects.nodes, None);
        let (state, skipped) = build(&objects, &context);
        let ips: Vec<String> = state.pods.keys().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.244.0.7"]);
        let reasons: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        assert_eq!(
            reasons,
            [
                "Pod shop/other-cidr: status.podIPs fd00:10:244:1::8 is in fd00:10:244:1::/64, \
                 node node-b's pod CIDR",
                "Pod shop/outside: status.podIPs fd00:99::9 is outside the cluster CIDR \
                 fd00:10:244::/56",
            ]
        );
    }

    #[test]
    fn interface_names_are_stable_and_fit_ifnamsiz() {
        let name = pod_interface_name("shop", "web-0");
        assert_eq!(name.len(), 15);
        assert!(name.starts_with("fer"));
        assert_eq!(name, pod_interface_name("shop", "web-0"));
        assert_ne!(name, pod_interface_name("shop", "web-1"));
        assert_eq!(pod_attachment_interface_name("shop", "web-0", "eth0"), name);
        let second = pod_attachment_interface_name("shop", "web-0", "net1");
        assert_eq!(second.len(), 15);
        assert!(second.starts_with("fer"));
        assert_ne!(second, name);
    }
}
