//! Pod objects -> this node's pods, and the host-side interface names of pods.
use k8s_openapi::api::core::v1::Pod;
use sha2::{Digest, Sha256};

use super::{fields::parse_ipv4, namespace_of, LocalPod};

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

pub(super) fn local_pod(pod: &Pod, node: &str) -> Result<Option<LocalPod>, String> {
    let spec = pod.spec.as_ref().ok_or("spec is missing")?;
    if spec.node_name.as_deref() != Some(node) {
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
    Ok(Some(LocalPod {
        interface: pod_interface_name(&namespace, &name),
        namespace,
        name,
        ip,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

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
