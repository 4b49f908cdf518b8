//! `containers[].ports[].hostPort` of this node's pods: frontends on the node's
//! NodePort addresses (or the port's `hostIP`), each with one backend, the pod at its
//! `containerPort`, served by every path a NodePort is (as Cilium serves hostPorts
//! with its kube-proxy replacement), so no `portmap` plugin is needed.
//!
//! Who keeps a contested port, the same on every sync: a Service's frontend or
//! healthCheckNodePort always (a pod never takes a Service's traffic); between pods,
//! the oldest (`creationTimestamp`, then namespace and name), as the scheduler would
//! have kept the later one off the node.
use std::{net::Ipv4Addr, sync::Arc};

use ferrite_common::{SNAT_PORT_MAX, SNAT_PORT_MIN};
use k8s_openapi::api::core::v1::{ContainerPort, Pod};

use super::{
    fields::{object_name, parse_ipv4, valid_port},
    namespace_of, DesiredState, FrontendKind, L4Addr, NodeContext, Protocol, ServiceFrontend,
    ServiceRef, SkipReason, Skipped,
};

/// A pod of this node the model wired, and its address.
pub(super) struct WiredPod<'a> {
    pub pod: &'a Arc<Pod>,
    pub ip: Ipv4Addr,
}

/// Add the hostPort frontends of `pods` (this node's, wired at their addresses) to
/// `state`, after its Services: a port that clashes with a frontend or health-check
/// port already there is skipped with the owner named.
pub(super) fn add_host_ports(
    mut pods: Vec<WiredPod<'_>>,
    context: &NodeContext,
    state: &mut DesiredState,
    skipped: &mut Vec<Skipped>,
) {
    pods.retain(|wired| has_host_ports(wired.pod));
    if pods.is_empty() {
        return;
    }
    pods.sort_by_cached_key(|wired| {
        let meta = &wired.pod.metadata;
        (
            meta.creation_timestamp.clone(),
            namespace_of(meta).to_string(),
            meta.name.clone(),
        )
    });
    let node_addresses = context.node_port_ips();
    for wired in pods {
        let meta = &wired.pod.metadata;
        let owner = ServiceRef {
            namespace: namespace_of(meta).to_string(),
            // No Service is named so ("/" is in no DNS label): an update of a
            // Service never touches a pod's frontends.
            name: format!("pod/{}", meta.name.as_deref().unwrap_or_default()),
        };
        let display = format!(
            "pod {}/{}{}",
            owner.namespace,
            meta.name.as_deref().unwrap_or_default(),
            FrontendKind::HostPort.suffix()
        );
        let containers = wired.pod.spec.iter().flat_map(|spec| &spec.containers);
        for (c, container) in containers.enumerate() {
            for (p, port) in container.ports.iter().flatten().enumerate() {
                let field = format!("spec.containers[{c}].ports[{p}]");
                let wanted = match host_port(port, &field, &node_addresses, wired.ip) {
                    Ok(Some(wanted)) => wanted,
                    Ok(None) => continue,
                    Err(reason) => {
                        skipped.push(Skipped {
                            object: object_name("Pod", meta),
                            reason,
                        });
                        continue;
                    }
                };
                if let Some(reason) = taken(&wanted, state) {
                    skipped.push(Skipped {
                        object: object_name("Pod", meta),
                        reason,
                    });
                    continue;
                }
                for frontend in wanted.frontends {
                    state.services.insert(
                        frontend,
                        ServiceFrontend {
                            service: owner.clone(),
                            name: display.clone(),
                            backends: vec![wanted.backend],
                            kind: FrontendKind::HostPort,
                            // One backend, on this node: the client's address is kept.
                            local_only: true,
                            ..ServiceFrontend::default()
                        },
                    );
                }
                state.contenders.insert(owner.clone());
            }
        }
    }
}

/// Whether `pod` asks for a hostPort in any container.
pub fn has_host_ports(pod: &Pod) -> bool {
    pod.spec.iter().flat_map(|s| &s.containers).any(|c| {
        c.ports
            .iter()
            .flatten()
            .any(|p| p.host_port.is_some_and(|h| h != 0))
    })
}

/// One container port's hostPort: its frontends and its backend.
struct HostPort {
    frontends: Vec<L4Addr>,
    backend: L4Addr,
}

/// The frontends `port` asks for (`None`: no hostPort), or why it may have none.
fn host_port(
    port: &ContainerPort,
    field: &str,
    node_addresses: &[Ipv4Addr],
    pod_ip: Ipv4Addr,
) -> Result<Option<HostPort>, SkipReason> {
    let Some(number) = port.host_port.filter(|p| *p != 0) else {
        return Ok(None);
    };
    let number = valid_port(number, &format!("{field}.hostPort")).map_err(SkipReason::Invalid)?;
    let protocol = match Protocol::parse(port.protocol.as_deref()) {
        Ok(protocol) => protocol,
        Err(other) if other == "SCTP" => return Err(SkipReason::Sctp),
        Err(other) => {
            return Err(SkipReason::Invalid(format!(
                "unknown protocol {other:?} on {field}"
            )))
        }
    };
    let container_port = valid_port(port.container_port, &format!("{field}.containerPort"))
        .map_err(SkipReason::Invalid)?;
    if (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&number) {
        return Err(SkipReason::Invalid(format!(
            "{field}.hostPort {number} is in {SNAT_PORT_MIN}-{SNAT_PORT_MAX}, the node's \
             ports for forwarded NodePort flows"
        )));
    }
    let addresses = match port.host_ip.as_deref() {
        None | Some("" | "0.0.0.0") => node_addresses.to_vec(),
        Some(host_ip) => {
            let ip =
                parse_ipv4(host_ip, &format!("{field}.hostIP")).map_err(SkipReason::Invalid)?;
            // A loopback hostIP is for the node's own processes (portmap DNATs it in
            // OUTPUT): the socket-level load balancing serves it at connect()/sendmsg().
            if !ip.is_loopback() && !node_addresses.contains(&ip) {
                let served: Vec<String> = node_addresses.iter().map(ToString::to_string).collect();
                return Err(SkipReason::Invalid(format!(
                    "{field}.hostIP {ip} is not an address this node serves NodePorts on ({})",
                    served.join(", ")
                )));
            }
            vec![ip]
        }
    };
    Ok(Some(HostPort {
        frontends: addresses
            .into_iter()
            .map(|ip| L4Addr {
                ip,
                port: number,
                protocol,
            })
            .collect(),
        backend: L4Addr {
            ip: pod_ip,
            port: container_port,
            protocol,
        },
    }))
}

/// Why `wanted` cannot have its frontends: one of them, or its port as a
/// healthCheckNodePort, is already another's. A Service that keeps it is recorded as
/// a contender (its removal needs a full sync, which gives the port to the pod).
fn taken(wanted: &HostPort, state: &mut DesiredState) -> Option<SkipReason> {
    for frontend in &wanted.frontends {
        if let Some(existing) = state.services.get(frontend) {
            let owner = existing.name.clone();
            let service = existing.service.clone();
            state.contenders.insert(service);
            return Some(SkipReason::HostPortTaken {
                frontend: *frontend,
                owner,
            });
        }
    }
    let frontend = wanted.frontends.first()?;
    let check = state.health_checks.get(&frontend.port);
    match check {
        Some(check) if frontend.protocol == Protocol::Tcp => {
            let service = check.service.clone();
            state.contenders.insert(service.clone());
            Some(SkipReason::HostPortTaken {
                frontend: *frontend,
                owner: format!("the healthCheckNodePort of {service}"),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

    /// A pod of node-a at `ip` with the container ports `ports` (flow-style entries).
    fn pod(name: &str, ip: &str, ports: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{nodeName: node-a, containers: [{{name: app, ports: [{ports}]}}]}}\n\
             status: {{phase: Running, podIP: {ip}}}\n"
        )
    }

    const WEB_PORTS: &str = "{containerPort: 8080, hostPort: 8088}, \
                             {containerPort: 5353, hostPort: 8088, protocol: UDP}";

    fn host_ports(state: &DesiredState) -> Vec<(String, String, String)> {
        state
            .services
            .iter()
            .filter(|(_, f)| f.kind == FrontendKind::HostPort)
            .map(|(frontend, f)| {
                assert_eq!(f.backends.len(), 1);
                (
                    frontend.to_string(),
                    f.backends[0].to_string(),
                    f.name.clone(),
                )
            })
            .collect()
    }

    fn reasons(skipped: &[Skipped]) -> Vec<String> {
        skipped.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_host_port_is_a_frontend_on_the_node_address_with_the_pod_as_its_one_backend() {
        let (state, skipped) = build_yaml(&format!(
            "{SHOP_NODE}---\n{}",
            pod("web", "10.244.0.5", WEB_PORTS)
        ));
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(
            host_ports(&state),
            [
                (
                    "198.51.100.1:8088/TCP".into(),
                    "10.244.0.5:8080/TCP".into(),
                    "pod shop/web (hostPort)".into()
                ),
                (
                    "198.51.100.1:8088/UDP".into(),
                    "10.244.0.5:5353/UDP".into(),
                    "pod shop/web (hostPort)".into()
                ),
            ]
        );
        let frontend = &state.services[&tcp("198.51.100.1", 8088)];
        assert!(frontend.local_only && frontend.kind.is_external());
        // An update of some Services never decides a pod's port.
        assert!(state.contenders.contains(&frontend.service));
        assert_eq!(frontend.service.name, "pod/web");
    }

    /// The older pod keeps the port (here by name: no creationTimestamp), whatever
    /// the order of the objects; the later one is refused with the owner named, and
    /// takes the port over once the first is gone.
    #[test]
    fn of_two_pods_asking_for_one_host_port_the_older_keeps_it() {
        let first = pod("web", "10.244.0.5", WEB_PORTS);
        let second = pod("web2", "10.244.0.6", "{containerPort: 80, hostPort: 8088}");
        for docs in [[&first, &second], [&second, &first]] {
            let (state, skipped) =
                build_yaml(&format!("{SHOP_NODE}---\n{}---\n{}", docs[0], docs[1]));
            assert_eq!(host_ports(&state).len(), 2);
            assert_eq!(
                state.services[&tcp("198.51.100.1", 8088)].backends,
                [tcp("10.244.0.5", 8080)]
            );
            assert_eq!(
                reasons(&skipped),
                ["Pod shop/web2: hostPort 198.51.100.1:8088/TCP already used by pod shop/web (hostPort)"]
            );
        }
        let (state, skipped) = build_yaml(&format!("{SHOP_NODE}---\n{second}"));
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(
            state.services[&tcp("198.51.100.1", 8088)].backends,
            [tcp("10.244.0.6", 80)]
        );
        // With creation timestamps, age decides, not the name.
        let aged = |yaml: &str, at: &str| {
            yaml.replace(
                "namespace: shop}",
                &format!("namespace: shop, creationTimestamp: '{at}'}}"),
            )
        };
        let (state, skipped) = build_yaml(&format!(
            "{SHOP_NODE}---\n{}---\n{}",
            aged(&first, "2025-01-02T00:00:00Z"),
            aged(&second, "2025-01-01T00:00:00Z")
        ));
        assert_eq!(
            state.services[&tcp("198.51.100.1", 8088)].backends,
            [tcp("10.244.0.6", 80)]
        );
        assert!(reasons(&skipped)[0].starts_with("Pod shop/web: hostPort 198.51.100.1:8088/TCP"));
    }

    /// A Service's NodePort or healthCheckNodePort stays the Service's, and the
    /// Service becomes a contender (removing it needs a full sync, which gives the
    /// port to the pod).
    #[test]
    fn a_services_node_port_or_health_check_port_is_never_taken_by_a_pod() {
        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: shop}\n\
            spec: {type: LoadBalancer, clusterIP: 10.96.0.5, externalTrafficPolicy: Local, \
            healthCheckNodePort: 30999, ports: [{port: 80, nodePort: 30080}]}\n";
        let (state, skipped) = build_yaml(&format!(
            "{SHOP_NODE}---\n{service}---\n{}",
            pod(
                "web",
                "10.244.0.5",
                "{containerPort: 80, hostPort: 30080}, {containerPort: 81, hostPort: 30999}, \
                 {containerPort: 82, hostPort: 30999, protocol: UDP}"
            )
        ));
        assert_eq!(
            reasons(&skipped),
            [
                "Pod shop/web: hostPort 198.51.100.1:30080/TCP already used by shop/lb:80 (NodePort)",
                "Pod shop/web: hostPort 198.51.100.1:30999/TCP already used by the healthCheckNodePort of shop/lb",
            ]
        );
        assert_eq!(
            state.services[&tcp("198.51.100.1", 30080)].kind,
            FrontendKind::NodePort
        );
        assert_eq!(
            host_ports(&state).len(),
            1,
            "UDP 30999 is no health check's"
        );
        assert!(state.contenders.contains(&ServiceRef {
            namespace: "shop".into(),
            name: "lb".into()
        }));
    }

    #[test]
    fn host_ip_limits_a_host_port_to_one_node_address_and_must_be_one() {
        let limits = crate::limits::Limits {
            node_port_addresses: crate::limits::NodePortAddresses::parse("0.0.0.0/0").unwrap(),
            ..open_limits()
        };
        let yaml = format!(
            "{SHOP_NODE}---\n{}",
            pod(
                "web",
                "10.244.0.5",
                "{containerPort: 80, hostPort: 80}, {containerPort: 81, hostPort: 81, hostIP: 192.0.2.7}, \
                 {containerPort: 82, hostPort: 82, hostIP: 203.0.113.1}, {containerPort: 83, hostPort: 83, hostIP: 0.0.0.0}, \
                 {containerPort: 84, hostPort: 84, hostIP: 127.0.0.1}"
            )
        );
        let (objects, _) = crate::objects_yaml::parse_objects(&yaml).unwrap();
        let (context, _) = NodeContext::new(NODE, &limits, &objects.nodes, None);
        let context = context.with_host_addresses(vec![
            "192.0.2.7".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
        ]);
        let (state, skipped) = build(&objects, &context);
        let frontends: Vec<String> = host_ports(&state).into_iter().map(|f| f.0).collect();
        assert_eq!(
            frontends,
            [
                "127.0.0.1:84/TCP",
                "192.0.2.7:80/TCP",
                "192.0.2.7:81/TCP",
                "192.0.2.7:83/TCP",
                "198.51.100.1:80/TCP",
                "198.51.100.1:83/TCP"
            ]
        );
        assert_eq!(
            reasons(&skipped),
            [
                "Pod shop/web: spec.containers[0].ports[2].hostIP 203.0.113.1 is not an address \
              this node serves NodePorts on (192.0.2.7, 198.51.100.1)"
            ]
        );
    }

    /// Ports no frontend can serve are refused with a reason; pods whose hostPorts
    /// mean nothing here (hostNetwork, no address yet, another node's, finished)
    /// give none and no reason.
    #[test]
    fn hostile_or_meaningless_host_ports_are_refused_or_left_out() {
        let other_node = "apiVersion: v1\nkind: Pod\nmetadata: {name: there, namespace: shop}\n\
            spec: {nodeName: node-b, containers: [{name: app, ports: [{containerPort: 80, hostPort: 80}]}]}\n\
            status: {podIP: 10.244.1.5}\n";
        let host_network = "apiVersion: v1\nkind: Pod\nmetadata: {name: host, namespace: shop}\n\
            spec: {nodeName: node-a, hostNetwork: true, containers: [{name: app, ports: [{containerPort: 80, hostPort: 80}]}]}\n\
            status: {podIP: 198.51.100.1}\n";
        let pending = "apiVersion: v1\nkind: Pod\nmetadata: {name: pending, namespace: shop}\n\
            spec: {nodeName: node-a, containers: [{name: app, ports: [{containerPort: 80, hostPort: 80}]}]}\n";
        let done = pod("done", "10.244.0.9", "{containerPort: 80, hostPort: 80}")
            .replace("phase: Running", "phase: Succeeded");
        let (state, skipped) = build_yaml(&[
            SHOP_NODE.to_string(),
            pod(
                "web",
                "10.244.0.5",
                "{containerPort: 80, hostPort: 80, protocol: SCTP}, {containerPort: 80, hostPort: 70000}, \
                 {containerPort: 0, hostPort: 81}, {containerPort: 80, hostPort: 62000}, \
                 {containerPort: 80, hostPort: 82, protocol: QUIC}, {containerPort: 80, hostPort: 83, hostIP: 'fd00::1'}, \
                 {containerPort: 80, hostPort: 84}, {containerPort: 80}",
            ),
            other_node.into(),
            host_network.into(),
            pending.into(),
            done,
        ]
        .join("---\n"));
        let frontends: Vec<String> = host_ports(&state).into_iter().map(|f| f.0).collect();
        assert_eq!(frontends, ["198.51.100.1:84/TCP"]);
        assert_eq!(
            reasons(&skipped),
            [
                "Pod shop/web: SCTP is not supported; the other ports still apply",
                "Pod shop/web: spec.containers[0].ports[1].hostPort 70000 is out of range 1-65535",
                "Pod shop/web: spec.containers[0].ports[2].containerPort 0 is out of range 1-65535",
                "Pod shop/web: spec.containers[0].ports[3].hostPort 62000 is in 61000-65535, the \
                 node's ports for forwarded NodePort flows",
                "Pod shop/web: unknown protocol \"QUIC\" on spec.containers[0].ports[4]",
                "Pod shop/web: spec.containers[0].ports[5].hostIP \"fd00::1\" is not an IPv4 address",
            ]
        );
    }
}
