//! The desired contents of every map: node config, routes, Service entries and pod
//! endpoints.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ferrite_common::{
    endpoint_flag, pod_mac_for, EndpointInfo, EndpointKey, NodeConfig, RouteInfo, ROUTE_LOCAL,
    ROUTE_NATIVE, ROUTE_NODE, ROUTE_REMOTE, VXLAN_DEVICE,
};

use super::{
    ids::{ids_of, Budget, ExistingIds, SharedIds},
    image::EndpointFamily,
    overlay_address,
    service_entries::service_contents,
    Interface, MapContents, NodeSettings, Route6Key, RouteKey,
};
use crate::model::{DesiredState, LocalPod, SkipReason, Skipped};

/// Of the pods claiming one address (the model gave it to the first listed), the
/// one whose host veth its live endpoint entry names keeps it: a later-listed Pod
/// object cannot take a live pod's address by coming first. The skip reports follow.
pub fn settle_pod_claims(
    state: &mut DesiredState,
    skipped: &mut [Skipped],
    interfaces: &BTreeMap<String, Interface>,
    current: &MapContents,
) {
    let object = |pod: &LocalPod| format!("Pod {}/{}", pod.namespace, pod.name);
    let rivals = std::mem::take(&mut state.pod_rivals);
    for rival in rivals {
        let key = EndpointKey {
            address: rival.ip.octets(),
        };
        let holds = match (
            current.endpoints.get(&key),
            interfaces.get(&rival.interface),
        ) {
            (Some(entry), Some(interface)) => entry.ifindex == interface.ifindex,
            _ => false,
        };
        let displaced = holds
            .then(|| state.pods.insert(rival.ip, rival.clone()))
            .flatten();
        let Some(displaced) = displaced else {
            state.pod_rivals.push(rival);
            continue;
        };
        let owner = format!("{}/{}", rival.namespace, rival.name);
        for report in skipped.iter_mut() {
            if let SkipReason::PodIpTaken { ip, owner: was } = &mut report.reason {
                if *ip != IpAddr::V4(rival.ip) {
                    continue;
                }
                if report.object == object(&rival) {
                    report.object = object(&displaced);
                }
                *was = owner.clone();
            }
        }
        state.pod_rivals.push(displaced);
    }
}

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
    let uplink = settings
        .uplink
        .as_ref()
        .and_then(|u| interfaces.get(&u.name));
    let native = settings.routing == super::Routing::Native;
    // Natively, pods get the uplink's MTU; over VXLAN, the device's (50 less).
    let pod_mtu_device = if native {
        uplink
    } else {
        interfaces.get(VXLAN_DEVICE)
    };
    let mut config_flags = 0;
    if settings.external_in_tc {
        config_flags |= ferrite_common::config_flag::EXTERNAL_IN_TC;
    }
    if native {
        config_flags |= ferrite_common::config_flag::NATIVE_ROUTING;
    }
    out.config = NodeConfig {
        node_ip: this_node.map(|n| n.ip.octets()).unwrap_or_default(),
        flags: config_flags,
        vxlan_ifindex: interfaces.get(VXLAN_DEVICE).map(|i| i.ifindex).unwrap_or(0),
        vni: settings.vni,
        vtep_mac: this_node.map(|n| n.vtep_mac).unwrap_or_default(),
        pod_mtu: pod_mtu_device
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
        uplink_ifindex: uplink.map(|i| i.ifindex).unwrap_or(0),
        node_ip6: this_node
            .and_then(|n| n.ip6)
            .map(|ip| ip.octets())
            .unwrap_or_default(),
    };
    // Other nodes routed natively (on-link, `--routing native`); the others are
    // refused it, with their reason, and stay on the overlay.
    let mut native_flag = BTreeMap::new();
    for node in state.nodes.values().filter(|n| n.name != settings.node) {
        let flag = match settings.routes_natively_to(node.ip) {
            Ok(true) => ROUTE_NATIVE,
            Ok(false) => 0,
            Err(reason) => {
                skipped.push(Skipped {
                    object: format!("Node {} (native routing)", node.name),
                    reason: SkipReason::Invalid(reason),
                });
                0
            }
        };
        native_flag.insert(node.name.as_str(), flag);
    }
    for node in state.nodes.values() {
        let flags = if node.name == settings.node {
            ROUTE_LOCAL
        } else {
            ROUTE_REMOTE | native_flag[node.name.as_str()]
        };
        let info = RouteInfo {
            node_ip: node.ip.octets(),
            vtep_mac: node.vtep_mac,
            flags,
        };
        for cidr in &node.pod_cidrs {
            let key = RouteKey {
                prefix_len: cidr.prefix_len() as u32,
                network: cidr.network().octets(),
            };
            out.routes.insert(key, info);
        }
        // Its IPv6 pod CIDR: the same node, reached the same way (the tunnel to it
        // is IPv4 either way).
        for cidr in &node.pod_cidrs6 {
            let key = Route6Key {
                prefix_len: cidr.prefix_len() as u32,
                network: cidr.network().octets(),
            };
            out.routes6.insert(key, info);
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
                    flags: ROUTE_NODE | native_flag[node.name.as_str()],
                },
            );
            // Its IPv6 address: the socket programs serve it at a nodePort as this
            // node's NodePort. Nothing routes by it (IPv6 NodePort replies do not
            // cross nodes), so it is never native.
            if let Some(ip6) = node.ip6 {
                out.routes6.insert(
                    Route6Key {
                        prefix_len: 128,
                        network: ip6.octets(),
                    },
                    RouteInfo {
                        node_ip: node.ip.octets(),
                        vtep_mac: node.vtep_mac,
                        flags: ROUTE_NODE,
                    },
                );
            }
        }
    }
    let (backend_ids, rev_nat_ids) = ids_of(&state.services, ids_from);
    let (backend6_ids, rev_nat6_ids) = ids_of(&state.services6, ids_from);
    let existing = ExistingIds::<Ipv4Addr> {
        backend: Box::new(|value| backend_ids.get(value).copied()),
        rev_nat: Box::new(|value| rev_nat_ids.get(value).copied()),
    };
    let existing6 = ExistingIds::<Ipv6Addr> {
        backend: Box::new(|value| backend6_ids.get(value).copied()),
        rev_nat: Box::new(|value| rev_nat6_ids.get(value).copied()),
    };
    let mut budget = Budget::after(&settings.capacities, current);
    let mut ids = SharedIds::new(current, &budget);
    service_contents(
        state.services.iter(),
        current,
        &existing,
        &mut ids,
        &mut budget,
        &mut out,
        &mut skipped,
    );
    service_contents(
        state.services6.iter(),
        current,
        &existing6,
        &mut ids,
        &mut budget,
        &mut out,
        &mut skipped,
    );

    // Endpoint entries. One makes its address the pod's: traffic to it from this
    // node goes into the pod's veth, and the pod may send from it. The CNI plugin
    // writes the entry of a pod it wires before the agent hears of the pod; the
    // agent writes one for each Pod object (marked as its own), except where the
    // address is another live interface's: a Pod object never takes a live pod's
    // address, whoever wrote its entry.
    let live: BTreeMap<u32, &str> = interfaces
        .iter()
        .map(|(name, interface)| (interface.ifindex, name.as_str()))
        .collect();
    let mut claims = Claims {
        live: &live,
        current,
        out: &mut out,
        skipped: &mut skipped,
        owners6: BTreeMap::new(),
    };
    for pod in state.pods.values() {
        let Some(interface) = interfaces.get(&pod.interface) else {
            claims.skipped.push(Skipped {
                object: pod_object(pod),
                reason: SkipReason::InterfaceMissing {
                    interface: pod.interface.clone(),
                },
            });
            continue;
        };
        let entry = EndpointInfo {
            ifindex: interface.ifindex,
            pod_mac: pod_mac_for(pod.ip),
            host_mac: interface.mac,
            flags: endpoint_flag::FROM_POD_OBJECT,
        };
        claims.claim(pod, pod.ip, entry);
        if let Some(ip6) = pod.ip6 {
            claims.claim(pod, ip6, entry);
        }
    }
    // The CNI plugin's entries of pods the agent has not heard of (yet) stay while
    // their interface lives; the agent's own go with their Pod objects.
    keep_cni_entries::<Ipv4Addr>(current, &live, &mut out);
    keep_cni_entries::<Ipv6Addr>(current, &live, &mut out);
    super::policy::policy_contents(&state.policy, &state.pods, &mut out);
    (out, skipped)
}

fn pod_object(pod: &LocalPod) -> String {
    format!("Pod {}/{}", pod.namespace, pod.name)
}

/// Pods' claims on their addresses' endpoint entries, of either family.
struct Claims<'a> {
    /// The name of each live interface, by index.
    live: &'a BTreeMap<u32, &'a str>,
    current: &'a MapContents,
    out: &'a mut MapContents,
    skipped: &'a mut Vec<Skipped>,
    /// Who has each IPv6 address so far (the model settles IPv4 claims, whose
    /// addresses key its pods: two Pod objects may still claim one IPv6 address).
    owners6: BTreeMap<Ipv6Addr, &'a LocalPod>,
}

impl<'a> Claims<'a> {
    /// Write `entry` for `pod`'s address `ip`, unless the address is another live
    /// interface's (that entry stays, whoever wrote it) or, for IPv6, an earlier
    /// pod's.
    fn claim<A: EndpointFamily>(&mut self, pod: &'a LocalPod, ip: A, entry: EndpointInfo) {
        let key = ip.endpoint_key();
        let held = A::endpoints(self.current).get(&key).and_then(|held| {
            let holder = self.live.get(&held.ifindex)?;
            (held.ifindex != entry.ifindex).then_some((held, holder))
        });
        if let Some((held, holder)) = held {
            self.skipped.push(Skipped {
                object: pod_object(pod),
                reason: SkipReason::PodIpHeld {
                    ip: ip.into(),
                    interface: holder.to_string(),
                },
            });
            // Its holder's own claim, if it is a Pod object of this sync, wins.
            A::endpoints_mut(self.out).entry(key).or_insert(*held);
            return;
        }
        if let IpAddr::V6(ip6) = ip.into() {
            if let Some(owner) = self.owners6.get(&ip6) {
                self.skipped.push(Skipped {
                    object: pod_object(pod),
                    reason: SkipReason::PodIpTaken {
                        ip: ip6.into(),
                        owner: format!("{}/{}", owner.namespace, owner.name),
                    },
                });
                return;
            }
            self.owners6.insert(ip6, pod);
        }
        A::endpoints_mut(self.out).insert(key, entry);
    }
}

/// Keep the entries of `current` the CNI plugin wrote (not marked as the agent's)
/// whose interface lives and that no pod claims.
fn keep_cni_entries<A: EndpointFamily>(
    current: &MapContents,
    live: &BTreeMap<u32, &str>,
    out: &mut MapContents,
) {
    for (key, info) in A::endpoints(current) {
        let cni_written = info.flags & endpoint_flag::FROM_POD_OBJECT == 0;
        if cni_written && live.contains_key(&info.ifindex) {
            A::endpoints_mut(out).entry(*key).or_insert(*info);
        }
    }
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
                    ip6: None,
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

    fn interface(ifindex: u32) -> Interface {
        Interface {
            ifindex,
            mac: [2, 0, 0, 0, 0, ifindex as u8],
            mtu: 1450,
        }
    }

    fn entry(ifindex: u32, flags: u32) -> EndpointInfo {
        EndpointInfo {
            ifindex,
            flags,
            ..EndpointInfo::default()
        }
    }

    fn key(last: u8) -> EndpointKey {
        EndpointKey {
            address: [10, 244, 0, last],
        }
    }

    fn endpoint_ops(current: &MapContents, desired: &MapContents) -> Vec<Op> {
        diff(current, desired)
            .into_iter()
            .filter(|op| matches!(op, Op::PutEndpoint(..) | Op::DeleteEndpoint(_)))
            .collect()
    }

    #[test]
    fn the_agents_entries_go_with_their_pod_objects_and_the_cnis_stay_while_their_interface_lives()
    {
        use ferrite_common::endpoint_flag::FROM_POD_OBJECT;
        // .7: the CNI's, for a pod the agent has not heard of; .8: the agent's, for
        // a Pod object that is gone; .9: the agent's, for a Pod object now claiming
        // .10 on the same interface. Every interface lives.
        let current = MapContents {
            endpoints: [
                (key(7), entry(7, 0)),
                (key(8), entry(8, FROM_POD_OBJECT)),
                (key(9), entry(9, FROM_POD_OBJECT)),
            ]
            .into(),
            ..MapContents::default()
        };
        let interfaces = BTreeMap::from([
            ("fercni".to_string(), interface(7)),
            ("fergone".to_string(), interface(8)),
            ("fermoved".to_string(), interface(9)),
        ]);
        let mut state = DesiredState::default();
        let ip = Ipv4Addr::new(10, 244, 0, 10);
        state.pods.insert(
            ip,
            LocalPod {
                namespace: "default".into(),
                name: "moved".into(),
                ip,
                ip6: None,
                interface: "fermoved".into(),
            },
        );
        let (desired, skipped) =
            desired_contents(&state, &interfaces, &current, &NodeSettings::default());
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(
            endpoint_ops(&current, &desired),
            vec![
                Op::PutEndpoint(
                    key(10),
                    EndpointInfo {
                        ifindex: 9,
                        pod_mac: pod_mac_for(ip),
                        host_mac: [2, 0, 0, 0, 0, 9],
                        flags: FROM_POD_OBJECT,
                    }
                ),
                Op::DeleteEndpoint(key(8)),
                Op::DeleteEndpoint(key(9)),
            ]
        );
    }

    #[test]
    fn a_pod_object_never_takes_the_address_of_a_live_interface() {
        use ferrite_common::endpoint_flag::FROM_POD_OBJECT;
        let ip = Ipv4Addr::new(10, 244, 0, 7);
        let mut state = DesiredState::default();
        state.pods.insert(
            ip,
            LocalPod {
                namespace: "default".into(),
                name: "thief".into(),
                ip,
                ip6: None,
                interface: "ferthief".into(),
            },
        );
        // Whoever wrote the victim's entry (the CNI, or the agent for an object),
        // it stays while the victim's interface lives.
        for flags in [0, FROM_POD_OBJECT] {
            let current = MapContents {
                endpoints: [(key(7), entry(7, flags))].into(),
                ..MapContents::default()
            };
            let mut interfaces = BTreeMap::from([
                ("fervictim".to_string(), interface(7)),
                ("ferthief".to_string(), interface(9)),
            ]);
            let (desired, skipped) =
                desired_contents(&state, &interfaces, &current, &NodeSettings::default());
            assert_eq!(endpoint_ops(&current, &desired), vec![], "flags {flags}");
            assert_eq!(
                skipped.iter().map(ToString::to_string).collect::<Vec<_>>(),
                [
                    "Pod default/thief: pod IP 10.244.0.7 is the address of the live pod \
                  behind fervictim, which keeps it"
                ]
            );
            // Once the victim's interface is gone, the address is free.
            interfaces.remove("fervictim");
            let (desired, skipped) =
                desired_contents(&state, &interfaces, &current, &NodeSettings::default());
            assert!(skipped.is_empty(), "{skipped:?}");
            assert_eq!(desired.endpoints[&key(7)].ifindex, 9);
        }
    }

    /// Two Pod objects claim one address, the first listed a thief: the pod whose
    /// veth holds the live entry keeps it, and the reports say so.
    #[test]
    fn of_two_pod_objects_claiming_an_address_the_live_holder_keeps_it() {
        let ip = Ipv4Addr::new(10, 244, 0, 5);
        let pod = |name: &str| LocalPod {
            namespace: "default".into(),
            name: name.into(),
            ip,
            ip6: None,
            interface: format!("fer{name}"),
        };
        let mut state = DesiredState::default();
        state.pods.insert(ip, pod("thief"));
        state.pod_rivals.push(pod("web"));
        let mut skipped = vec![Skipped {
            object: "Pod default/web".into(),
            reason: SkipReason::PodIpTaken {
                ip: ip.into(),
                owner: "default/thief".into(),
            },
        }];
        let interfaces = BTreeMap::from([
            ("ferweb".to_string(), interface(7)),
            ("ferthief".to_string(), interface(9)),
        ]);
        // The CNI wired web: its entry names web's veth.
        let current = MapContents {
            endpoints: [(key(5), entry(7, 0))].into(),
            ..MapContents::default()
        };
        settle_pod_claims(&mut state, &mut skipped, &interfaces, &current);
        assert_eq!(state.pods[&ip], pod("web"));
        assert_eq!(state.pod_rivals, vec![pod("thief")]);
        assert_eq!(
            skipped.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["Pod default/thief: pod IP 10.244.0.5 already used by default/web"]
        );
        let (desired, more) =
            desired_contents(&state, &interfaces, &current, &NodeSettings::default());
        assert!(more.is_empty(), "{more:?}");
        assert_eq!(
            desired.endpoints[&key(5)].flags,
            ferrite_common::endpoint_flag::FROM_POD_OBJECT,
            "web's entry, now the agent's"
        );
        assert_eq!(desired.endpoints[&key(5)].ifindex, 7);

        // Without a live entry, the first listed keeps it.
        let mut state = DesiredState::default();
        state.pods.insert(ip, pod("thief"));
        state.pod_rivals.push(pod("web"));
        settle_pod_claims(&mut state, &mut [], &interfaces, &MapContents::default());
        assert_eq!(state.pods[&ip], pod("thief"));
    }

    fn key6(last: u8) -> ferrite_common::Endpoint6Key {
        ferrite_common::Endpoint6Key {
            address: ip6(last).octets(),
        }
    }

    fn ip6(last: u8) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, last.into())
    }

    fn dual_stack_pod(name: &str, last: u8, ip6_last: u8) -> LocalPod {
        LocalPod {
            namespace: "default".into(),
            name: name.into(),
            ip: Ipv4Addr::new(10, 244, 0, last),
            ip6: Some(ip6(ip6_last)),
            interface: format!("fer{name}"),
        }
    }

    /// A pod's IPv6 entry is its IPv4 entry's twin; a Pod object claiming a live
    /// pod's IPv6 address gets none (whichever of them comes first), nor one claiming
    /// an IPv6 address an earlier pod has; the CNI's IPv6 entries stay while their
    /// interface lives, the agent's go with their objects.
    #[test]
    fn ipv6_entries_follow_the_rules_of_ipv4_ones() {
        use ferrite_common::endpoint_flag::FROM_POD_OBJECT;
        let interfaces = BTreeMap::from([
            ("ferweb".to_string(), interface(7)),
            ("ferthief".to_string(), interface(8)),
            ("ferlate".to_string(), interface(9)),
            ("fercni".to_string(), interface(10)),
        ]);
        // web's IPv6 entry is the CNI's; thief claims it with an IPv4 address below
        // and above web's.
        for thief_ip in [4, 6] {
            let mut state = DesiredState::default();
            for pod in [
                dual_stack_pod("web", 5, 5),
                dual_stack_pod("thief", thief_ip, 5),
                // An address nobody holds.
                dual_stack_pod("late", 9, 9),
            ] {
                state.pods.insert(pod.ip, pod);
            }
            let current = MapContents {
                endpoints6: [
                    (key6(5), entry(7, 0)),
                    (key6(20), entry(10, 0)),
                    (key6(21), entry(11, 0)),
                    (key6(22), entry(9, FROM_POD_OBJECT)),
                ]
                .into(),
                ..MapContents::default()
            };
            let (desired, skipped) =
                desired_contents(&state, &interfaces, &current, &NodeSettings::default());
            assert_eq!(
                skipped.iter().map(ToString::to_string).collect::<Vec<_>>(),
                [
                    "Pod default/thief: pod IP fd00:10:244::5 is the address of the live pod \
                  behind ferweb, which keeps it"
                ],
                "thief at .{thief_ip}"
            );
            let web = EndpointInfo {
                ifindex: 7,
                pod_mac: pod_mac_for(Ipv4Addr::new(10, 244, 0, 5)),
                host_mac: [2, 0, 0, 0, 0, 7],
                flags: FROM_POD_OBJECT,
            };
            assert_eq!(desired.endpoints[&key(5)], web);
            assert_eq!(desired.endpoints6[&key6(5)], web, "the IPv4 entry's twin");
            assert_eq!(desired.endpoints[&key(thief_ip)].ifindex, 8);
            // The CNI's entry of a live interface stays, the one of a gone
            // interface and the agent's of a gone object go.
            assert_eq!(desired.endpoints6[&key6(20)], entry(10, 0));
            assert!(!desired.endpoints6.contains_key(&key6(21)));
            assert!(!desired.endpoints6.contains_key(&key6(22)));
            assert_eq!(desired.endpoints6[&key6(9)].ifindex, 9);
            assert_eq!(desired.endpoints6.len(), 3);
        }

        // Two Pod objects claiming one IPv6 address nobody holds: the first (by
        // IPv4 address) has it; once its entry is written, it holds it.
        let mut state = DesiredState::default();
        for pod in [dual_stack_pod("web", 5, 5), dual_stack_pod("thief", 6, 5)] {
            state.pods.insert(pod.ip, pod);
        }
        let (desired, skipped) = desired_contents(
            &state,
            &interfaces,
            &MapContents::default(),
            &NodeSettings::default(),
        );
        assert_eq!(
            skipped.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["Pod default/thief: pod IP fd00:10:244::5 already used by default/web"]
        );
        assert_eq!(desired.endpoints6[&key6(5)].ifindex, 7);
        assert_eq!(desired.endpoints.len(), 2, "each keeps its IPv4 address");
        let (again, skipped) =
            desired_contents(&state, &interfaces, &desired, &NodeSettings::default());
        assert_eq!(again, desired);
        assert!(
            skipped[0].to_string().contains("behind ferweb"),
            "{skipped:?}"
        );
    }

    fn node(name: &str, ip: [u8; 4], cidr: &str) -> crate::model::ClusterNode {
        crate::model::ClusterNode {
            zone: None,
            name: name.into(),
            ip: Ipv4Addr::from(ip),
            pod_cidrs: vec![cidr.parse().unwrap()],
            ip6: None,
            pod_cidrs6: Vec::new(),
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

    #[test]
    fn other_nodes_ipv6_addresses_become_node_routes6_and_go_with_their_address() {
        let settings = NodeSettings {
            node: "a".into(),
            ..NodeSettings::default()
        };
        let mut s = DesiredState::default();
        for (name, last) in [("a", 1), ("b", 2)] {
            let mut n = node(name, [198, 51, 100, last], "10.244.0.0/24");
            n.ip6 = Some(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last.into()));
            s.nodes.insert(n.name.clone(), n);
        }
        let interfaces = BTreeMap::new();
        let (desired, _) = desired_contents(&s, &interfaces, &MapContents::default(), &settings);
        let own6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets();
        assert_eq!(desired.config.node_ip6, own6);
        let node_b6 = Route6Key {
            prefix_len: 128,
            network: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2).octets(),
        };
        assert_eq!(
            desired.routes6.get(&node_b6),
            Some(&RouteInfo {
                node_ip: [198, 51, 100, 2],
                vtep_mac: ferrite_common::vtep_mac_for(Ipv4Addr::new(198, 51, 100, 2)),
                flags: ROUTE_NODE,
            })
        );
        assert_eq!(desired.routes6.len(), 1, "not this node's own address");

        // Node b loses its IPv6 address: only its /128 goes (then the epoch moves).
        s.nodes.get_mut("b").unwrap().ip6 = None;
        let (smaller, _) = desired_contents(&s, &interfaces, &desired, &settings);
        assert_eq!(
            diff(&desired, &smaller),
            vec![
                Op::DeleteRoute6(node_b6),
                Op::PutConfig(NodeConfig {
                    route_epoch: desired.config.route_epoch + 1,
                    ..smaller.config
                }),
            ]
        );
        // This node loses its own: the config forgets it.
        s.nodes.get_mut("a").unwrap().ip6 = None;
        let (own_gone, _) = desired_contents(&s, &interfaces, &smaller, &settings);
        assert_eq!(own_gone.config.node_ip6, [0; 16]);
    }

    #[test]
    fn native_routing_marks_on_link_nodes_and_refuses_the_others_with_a_reason() {
        let settings = NodeSettings {
            node: "a".into(),
            routing: super::super::Routing::Native,
            uplink: Some(super::super::Uplink {
                name: "eth0".into(),
                subnets: vec!["198.51.100.0/24".parse().unwrap()],
            }),
            ..NodeSettings::default()
        };
        let mut s = DesiredState::default();
        for n in [
            node("a", [198, 51, 100, 1], "10.244.0.0/24"),
            node("b", [198, 51, 100, 2], "10.244.1.0/24"),
            node("far", [192, 0, 2, 9], "10.244.2.0/24"),
        ] {
            s.nodes.insert(n.name.clone(), n);
        }
        let interface = |ifindex, mtu| Interface {
            ifindex,
            mac: [0; 6],
            mtu,
        };
        let interfaces = BTreeMap::from([
            (VXLAN_DEVICE.to_string(), interface(9, 1450)),
            ("eth0".to_string(), interface(3, 1500)),
        ]);
        let (desired, skipped) =
            desired_contents(&s, &interfaces, &MapContents::default(), &settings);
        assert_eq!(desired.config.uplink_ifindex, 3);
        assert_eq!(desired.config.pod_mtu, 1500, "pods get the uplink's MTU");
        assert_ne!(
            desired.config.flags & ferrite_common::config_flag::NATIVE_ROUTING,
            0
        );
        let route = |network, prefix_len| RouteKey {
            prefix_len,
            network,
        };
        let flags = |key| desired.routes[&key].flags;
        assert_eq!(flags(route([10, 244, 0, 0], 24)), ROUTE_LOCAL);
        assert_eq!(
            flags(route([10, 244, 1, 0], 24)),
            ROUTE_REMOTE | ROUTE_NATIVE
        );
        assert_eq!(
            flags(route([198, 51, 100, 2], 32)),
            ROUTE_NODE | ROUTE_NATIVE
        );
        // Not on-link: over VXLAN, with the reason reported.
        assert_eq!(flags(route([10, 244, 2, 0], 24)), ROUTE_REMOTE);
        assert_eq!(flags(route([192, 0, 2, 9], 32)), ROUTE_NODE);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].object, "Node far (native routing)");
        assert!(
            skipped[0].reason.to_string().contains("not on-link"),
            "{}",
            skipped[0].reason
        );
    }
}
