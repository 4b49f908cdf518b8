//! The desired contents of every map: node config, routes, Service entries and pod
//! endpoints.
use std::collections::{BTreeMap, BTreeSet};

use ferrite_common::{
    pod_mac_for, Backend, EndpointInfo, EndpointKey, NodeConfig, RevNatValue, RouteInfo,
    ROUTE_LOCAL, ROUTE_NODE, ROUTE_REMOTE, VXLAN_DEVICE,
};

use super::{
    ids::{keys_of, Budget, ExistingIds},
    image::{backend_value, rev_nat_value},
    overlay_address,
    service_entries::service_contents,
    Interface, MapContents, NodeSettings, RouteKey,
};
use crate::model::{DesiredState, SkipReason, Skipped};

/// The map contents that realise `state`. Pods whose interface does not exist (yet)
/// and frontends for which no id is left are reported in the skipped list.
pub fn desired_contents(
    state: &DesiredState,
    interfaces: &BTreeMap<String, Interface>,
    current: &MapContents,
    settings: &NodeSettings,
) -> (MapContents, Vec<Skipped>) {
    desired_contents_keeping_ids(state, interfaces, current, current, settings)
}

/// Like [`desired_contents`], reusing the ids `ids_from` gives each value (the
/// agent's own last write): an entry altered behind the agent's back is then
/// rewritten in place, and flows pinned to its id keep going.
pub fn desired_contents_keeping_ids(
    state: &DesiredState,
    interfaces: &BTreeMap<String, Interface>,
    current: &MapContents,
    ids_from: &MapContents,
    settings: &NodeSettings,
) -> (MapContents, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let mut out = MapContents::default();

    let this_node = state.nodes.get(&settings.node);
    out.config = NodeConfig {
        node_ip: this_node.map(|n| n.ip.octets()).unwrap_or_default(),
        flags: if settings.external_in_tc {
            ferrite_common::config_flag::EXTERNAL_IN_TC
        } else {
            0
        },
        vxlan_ifindex: interfaces.get(VXLAN_DEVICE).map(|i| i.ifindex).unwrap_or(0),
        vni: settings.vni,
        vtep_mac: this_node.map(|n| n.vtep_mac).unwrap_or_default(),
        pod_mtu: interfaces
            .get(VXLAN_DEVICE)
            .map(|i| i.mtu.min(u16::MAX.into()) as u16)
            .unwrap_or(0),
        overlay_ip: this_node
            .and_then(|n| n.pod_cidrs.first())
            .and_then(overlay_address)
            .map(|ip| ip.octets())
            .unwrap_or_default(),
        vxlan_port: settings.vxlan_port,
        _pad: 0,
        // Carried over: `diff` bumps it when the endpoints or routes change.
        route_epoch: current.config.route_epoch,
    };
    for node in state.nodes.values() {
        let flags = if node.name == settings.node {
            ROUTE_LOCAL
        } else {
            ROUTE_REMOTE
        };
        for cidr in &node.pod_cidrs {
            out.routes.insert(
                RouteKey {
                    prefix_len: cidr.prefix_len() as u32,
                    network: cidr.network().octets(),
                },
                RouteInfo {
                    node_ip: node.ip.octets(),
                    vtep_mac: node.vtep_mac,
                    flags,
                },
            );
        }
    }
    // Other nodes' own addresses: replies to the NodePort flows they SNAT come back
    // to them through the overlay (see `ROUTE_NODE`).
    for node in state.nodes.values() {
        if node.name != settings.node {
            out.routes.insert(
                RouteKey {
                    prefix_len: 32,
                    network: node.ip.octets(),
                },
                RouteInfo {
                    node_ip: node.ip.octets(),
                    vtep_mac: node.vtep_mac,
                    flags: ROUTE_NODE,
                },
            );
        }
    }
    let wanted_backends: BTreeSet<Backend> = state
        .services
        .values()
        .flat_map(|service| {
            service
                .backends
                .iter()
                .chain(&service.terminating)
                .map(backend_value)
        })
        .collect();
    let wanted_rev_nat: BTreeSet<RevNatValue> = state.services.keys().map(rev_nat_value).collect();
    let backend_ids = keys_of(&ids_from.backends, &wanted_backends);
    let rev_nat_ids = keys_of(&ids_from.rev_nat, &wanted_rev_nat);
    let existing = ExistingIds {
        backend: &|value| backend_ids.get(value).copied(),
        rev_nat: &|value| rev_nat_ids.get(value).copied(),
    };
    let mut budget = Budget::after(&settings.capacities, current);
    service_contents(
        state.services.iter(),
        current,
        &existing,
        &mut budget,
        &mut out,
        &mut skipped,
    );

    for pod in state.pods.values() {
        let Some(interface) = interfaces.get(&pod.interface) else {
            skipped.push(Skipped {
                object: format!("Pod {}/{}", pod.namespace, pod.name),
                reason: SkipReason::InterfaceMissing {
                    interface: pod.interface.clone(),
                },
            });
            continue;
        };
        out.endpoints.insert(
            EndpointKey {
                address: pod.ip.octets(),
            },
            EndpointInfo {
                ifindex: interface.ifindex,
                pod_mac: pod_mac_for(pod.ip),
                host_mac: interface.mac,
                flags: 0,
            },
        );
    }
    // The CNI plugin writes the endpoint of a pod it wires before the agent hears of
    // the pod: an endpoint whose interface still exists is kept, only those of
    // vanished interfaces go.
    let live: BTreeSet<u32> = interfaces.values().map(|i| i.ifindex).collect();
    for (key, info) in &current.endpoints {
        if !out.endpoints.contains_key(key) && live.contains(&info.ifindex) {
            out.endpoints.insert(*key, *info);
        }
    }
    (out, skipped)
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;
    use crate::model::{DesiredState, LocalPod};
    use ferrite_common::{pod_mac_for, EndpointInfo, EndpointKey};
    use std::net::Ipv4Addr;

    #[test]
    fn pods_without_an_interface_wait_and_the_rest_are_written() {
        let mut s = DesiredState::default();
        for (n, interface) in [(2u8, "ferA"), (3, "ferB")] {
            let ip = Ipv4Addr::new(10, 244, 0, n);
            s.pods.insert(
                ip,
                LocalPod {
                    namespace: "default".into(),
                    name: format!("pod{n}"),
                    ip,
                    interface: interface.into(),
                },
            );
        }
        let interfaces = BTreeMap::from([(
            "ferA".to_string(),
            Interface {
                ifindex: 7,
                mac: [2, 0, 0, 0, 0, 7],
                mtu: 1450,
            },
        )]);
        let (desired, skipped) = desired_contents(
            &s,
            &interfaces,
            &MapContents::default(),
            &NodeSettings::default(),
        );
        assert_eq!(desired.endpoints.len(), 1);
        let info = desired.endpoints.values().next().unwrap();
        assert_eq!(
            (info.ifindex, info.pod_mac),
            (7, pod_mac_for(Ipv4Addr::new(10, 244, 0, 2)))
        );
        assert_eq!(skipped.len(), 1);
        assert_eq!(
            skipped[0].reason,
            SkipReason::InterfaceMissing {
                interface: "ferB".into()
            }
        );
        assert_eq!(
            skipped[0].reason.to_string(),
            "host interface ferB does not exist (yet)"
        );
    }

    #[test]
    fn endpoints_written_by_the_cni_stay_while_their_interface_exists() {
        let cni_written = |ifindex| {
            (
                EndpointKey {
                    address: [10, 244, 0, ifindex as u8],
                },
                EndpointInfo {
                    ifindex,
                    ..EndpointInfo::default()
                },
            )
        };
        let current = MapContents {
            endpoints: [cni_written(7), cni_written(8)].into(),
            ..MapContents::default()
        };
        let interfaces = BTreeMap::from([(
            "ferlive".to_string(),
            Interface {
                ifindex: 7,
                mac: [0; 6],
                mtu: 1450,
            },
        )]);
        let (desired, _) = desired_contents(
            &DesiredState::default(),
            &interfaces,
            &current,
            &NodeSettings::default(),
        );
        let endpoint_ops: Vec<Op> = diff(&current, &desired)
            .into_iter()
            .filter(|op| matches!(op, Op::PutEndpoint(..) | Op::DeleteEndpoint(_)))
            .collect();
        assert_eq!(
            endpoint_ops,
            vec![Op::DeleteEndpoint(cni_written(8).0)],
            "only the endpoint of the vanished interface goes"
        );
    }

    fn node(name: &str, ip: [u8; 4], cidr: &str) -> crate::model::ClusterNode {
        crate::model::ClusterNode {
            zone: None,
            name: name.into(),
            ip: Ipv4Addr::from(ip),
            pod_cidrs: vec![cidr.parse().unwrap()],
            vtep_mac: ferrite_common::vtep_mac_for(Ipv4Addr::from(ip)),
        }
    }

    #[test]
    fn nodes_become_routes_and_removing_one_touches_only_its_route() {
        let settings = NodeSettings {
            node: "a".into(),
            vni: 7,
            ..NodeSettings::default()
        };
        let mut s = DesiredState::default();
        for n in [
            node("a", [198, 51, 100, 1], "10.244.0.0/24"),
            node("b", [198, 51, 100, 2], "10.244.1.0/24"),
            node("c", [198, 51, 100, 3], "10.244.2.0/24"),
        ] {
            s.nodes.insert(n.name.clone(), n);
        }
        let interfaces = BTreeMap::from([(
            VXLAN_DEVICE.to_string(),
            Interface {
                ifindex: 9,
                mac: [0; 6],
                mtu: 1400,
            },
        )]);
        let (desired, _) = desired_contents(&s, &interfaces, &MapContents::default(), &settings);
        assert_eq!(desired.config.vni, 7);
        assert_eq!(desired.config.vxlan_ifindex, 9);
        assert_eq!(
            desired.config.pod_mtu, 1400,
            "pods get the VXLAN device's MTU"
        );
        assert_eq!(desired.config.node_ip, [198, 51, 100, 1]);
        let route = |n: [u8; 4]| RouteKey {
            prefix_len: 24,
            network: n,
        };
        assert_eq!(desired.routes[&route([10, 244, 0, 0])].flags, ROUTE_LOCAL);
        assert_eq!(desired.routes[&route([10, 244, 1, 0])].flags, ROUTE_REMOTE);
        let node_b = RouteKey {
            prefix_len: 32,
            network: [198, 51, 100, 2],
        };
        assert_eq!(desired.routes[&node_b].flags, ROUTE_NODE);
        assert!(!desired
            .routes
            .keys()
            .any(|k| k.network == [198, 51, 100, 1]));
        let ops = diff(&MapContents::default(), &desired);
        assert!(matches!(ops[0], Op::PutConfig(_)), "config first: {ops:?}");

        s.nodes.remove("c");
        let (smaller, _) = desired_contents(&s, &interfaces, &desired, &settings);
        // Its pod CIDR and its own address (for NodePort replies) go, nothing else;
        // then the route epoch moves on, last, so no flow keeps a route cached from
        // before.
        assert_eq!(
            diff(&desired, &smaller),
            vec![
                Op::DeleteRoute(route([10, 244, 2, 0])),
                Op::DeleteRoute(RouteKey {
                    prefix_len: 32,
                    network: [198, 51, 100, 3],
                }),
                Op::PutConfig(NodeConfig {
                    route_epoch: desired.config.route_epoch + 1,
                    ..smaller.config
                }),
            ]
        );
    }
}
