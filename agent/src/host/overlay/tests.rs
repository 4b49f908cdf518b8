//! The overlay host side's pure diff and read-back, both families.
use super::*;
use crate::netlink::Route;

fn overlay(address: &str, routes: &[(&str, &str, &str)]) -> OverlayHost {
    let ipv4 = OverlayFamily {
        address: Some(address.parse().unwrap()),
        routes: routes
            .iter()
            .map(|(cidr, node, gateway)| {
                let node_ip: Ipv4Addr = node.parse().unwrap();
                let route = OverlayRoute {
                    node_ip,
                    gateway: gateway.parse().unwrap(),
                    vtep_mac: ferrite_common::vtep_mac_for(node_ip),
                    native_device: None,
                };
                (cidr.parse().unwrap(), route)
            })
            .collect(),
    };
    OverlayHost {
        vtep_mac: Some([0x0a, 0x58, 198, 51, 100, 1]),
        ipv4,
        ipv6: OverlayFamily::default(),
    }
}

#[test]
fn overlay_routes_follow_nodes_and_a_removed_node_loses_only_its_route() {
    let empty = OverlayHost::default();
    let two = overlay(
        "10.244.0.1",
        &[
            ("10.244.1.0/24", "198.51.100.2", "10.244.1.1"),
            ("10.244.2.0/24", "198.51.100.3", "10.244.2.1"),
        ],
    );
    let commands = |current, desired| -> Vec<String> {
        overlay_changes(current, desired, 1)
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    let first = commands(&empty, &two);
    assert_eq!(
        first,
        [
            "link set dev ferrite_vxlan address 0a:58:c6:33:64:01",
            "addr replace 10.244.0.1/32 dev ferrite_vxlan",
            "neigh replace 10.244.1.1 lladdr 0a:58:c6:33:64:02 dev ferrite_vxlan nud permanent",
            "route replace 10.244.1.0/24 encap ip id 1 dst 198.51.100.2 ttl 64 via 10.244.1.1 dev ferrite_vxlan onlink src 10.244.0.1",
            "neigh replace 10.244.2.1 lladdr 0a:58:c6:33:64:03 dev ferrite_vxlan nud permanent",
            "route replace 10.244.2.0/24 encap ip id 1 dst 198.51.100.3 ttl 64 via 10.244.2.1 dev ferrite_vxlan onlink src 10.244.0.1",
        ]
    );
    assert!(
        commands(&two, &two).is_empty(),
        "nothing to do when in place"
    );
    let one = overlay(
        "10.244.0.1",
        &[("10.244.1.0/24", "198.51.100.2", "10.244.1.1")],
    );
    assert_eq!(
        commands(&two, &one),
        [
            "route del 10.244.2.0/24 dev ferrite_vxlan",
            "neigh del 10.244.2.1 dev ferrite_vxlan"
        ]
    );
    // A node that moves to another IP gets its route rewritten.
    let moved = overlay(
        "10.244.0.1",
        &[("10.244.1.0/24", "198.51.100.9", "10.244.1.1")],
    );
    assert_eq!(commands(&one, &moved).len(), 2);
}

#[test]
fn overlay_routes_are_read_back_from_the_devices_routes() {
    let device = 9;
    let mut overlay = Route::new(
        "10.244.1.0/24".parse().unwrap(),
        device,
        RouteScope::Universe,
    );
    overlay.gateway = Some("10.244.1.1".parse().unwrap());
    overlay.source = Some("10.244.0.1".parse().unwrap());
    overlay.onlink = true;
    overlay.encap = Some(IpEncap {
        id: 1,
        destination: "198.51.100.2".parse().unwrap(),
        ttl: 64,
    });
    let mut elsewhere = overlay.clone();
    elsewhere.destination = "10.244.2.0/24".parse().unwrap();
    elsewhere.device = Some(device + 1);
    let mut plain = overlay.clone();
    plain.destination = "10.244.3.0/24".parse().unwrap();
    plain.encap = None;
    let kernel = Route::new("10.9.0.0/16".parse().unwrap(), device, RouteScope::Link);
    let routes = overlay_routes(&[overlay, elsewhere, plain, kernel], device, None);
    assert_eq!(routes.len(), 1, "{routes:?}");
    let (route, src) = routes[&"10.244.1.0/24".parse().unwrap()];
    assert_eq!(
        (route.node_ip, route.gateway, src),
        (
            "198.51.100.2".parse().unwrap(),
            "10.244.1.1".parse().unwrap(),
            "10.244.0.1".parse().unwrap()
        )
    );
}

#[test]
fn native_routes_go_via_the_node_on_the_uplink_with_its_managed_neighbour_and_switch_both_ways() {
    let uplink = 4;
    let vxlan = overlay(
        "10.244.0.1",
        &[("10.244.1.0/24", "198.51.100.2", "10.244.1.1")],
    );
    let mut native = vxlan.clone();
    native.ipv4.routes.insert(
        "10.244.1.0/24".parse().unwrap(),
        OverlayRoute::native("198.51.100.2".parse().unwrap(), uplink),
    );
    let commands = |current, desired| -> Vec<String> {
        overlay_changes(current, desired, 1)
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(
        commands(&vxlan, &native),
        [
            "neigh replace 198.51.100.2 dev <uplink ifindex 4> managed",
            "route replace 10.244.1.0/24 via 198.51.100.2 dev <uplink ifindex 4> src 10.244.0.1"
        ]
    );
    assert!(commands(&native, &native).is_empty());
    assert_eq!(
        commands(&native, &vxlan),
        [
            "neigh replace 10.244.1.1 lladdr 0a:58:c6:33:64:02 dev ferrite_vxlan nud permanent",
            "route replace 10.244.1.0/24 encap ip id 1 dst 198.51.100.2 ttl 64 via 10.244.1.1 dev ferrite_vxlan onlink src 10.244.0.1",
            "neigh del 198.51.100.2 dev <uplink ifindex 4>",
        ]
    );
    let mut gone = native.clone();
    gone.ipv4.routes.clear();
    assert_eq!(
        commands(&native, &gone),
        [
            "route del 10.244.1.0/24 dev <uplink ifindex 4>",
            "neigh del 198.51.100.2 dev <uplink ifindex 4>"
        ]
    );
    // A node with two pod CIDRs keeps its entry while one of them is routed.
    let mut two_cidrs = native.clone();
    two_cidrs.ipv4.routes.insert(
        "10.245.1.0/24".parse().unwrap(),
        OverlayRoute::native("198.51.100.2".parse().unwrap(), uplink),
    );
    assert_eq!(
        commands(&two_cidrs, &native),
        ["route del 10.245.1.0/24 dev <uplink ifindex 4>"]
    );
}

#[test]
fn native_routes_are_read_back_only_with_the_nodes_own_source() {
    let (vxlan_device, uplink) = (9, 4);
    let own: Ipv4Addr = "10.244.0.1".parse().unwrap();
    let mut native = Route::new(
        "10.244.1.0/24".parse().unwrap(),
        uplink,
        RouteScope::Universe,
    );
    native.gateway = Some("198.51.100.2".parse().unwrap());
    native.source = Some(own);
    // Someone else's route on the uplink: not the agent's to touch.
    let mut foreign = native.clone();
    foreign.destination = "10.9.0.0/16".parse().unwrap();
    foreign.source = None;
    let routes = overlay_routes(&[native, foreign], vxlan_device, Some(own));
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(
        routes[&"10.244.1.0/24".parse().unwrap()],
        (
            OverlayRoute::native("198.51.100.2".parse().unwrap(), uplink),
            own
        )
    );
}

/// A dual-stack node: `own` IPv4 and IPv6 overlay addresses, and per other node
/// (node IP, IPv4 pod CIDR, IPv6 pod CIDR) routes of both families.
fn dual_stack(own: (&str, &str), nodes: &[(&str, &str, &str)]) -> OverlayHost {
    let mut host = overlay(own.0, &[]);
    host.ipv6.address = Some(own.1.parse().unwrap());
    for (node, cidr, cidr6) in nodes {
        let node_ip: Ipv4Addr = node.parse().unwrap();
        let vtep_mac = ferrite_common::vtep_mac_for(node_ip);
        let cidr: ipnet::Ipv4Net = cidr.parse().unwrap();
        let cidr6: ipnet::Ipv6Net = cidr6.parse().unwrap();
        let route = OverlayRouteOf {
            node_ip,
            gateway: crate::plan::overlay_address(&cidr).unwrap(),
            vtep_mac,
            native_device: None,
        };
        host.ipv4.routes.insert(cidr, route);
        let route6 = OverlayRouteOf {
            node_ip,
            gateway: crate::plan::overlay_address6(&cidr6).unwrap(),
            vtep_mac,
            native_device: None,
        };
        host.ipv6.routes.insert(cidr6, route6);
    }
    host
}

#[test]
fn ipv6_pod_cidrs_are_routed_inside_the_ipv4_tunnel_and_go_with_their_node() {
    let commands = |current, desired| -> Vec<String> {
        overlay_changes(current, desired, 1)
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    let own = ("10.244.0.1", "fd00:10:244::1");
    let two = dual_stack(
        own,
        &[
            ("198.51.100.2", "10.244.1.0/24", "fd00:10:244:1::/64"),
            ("198.51.100.3", "10.244.2.0/24", "fd00:10:244:2::/64"),
        ],
    );
    let empty = OverlayHost::default();
    let first = commands(&empty, &two);
    assert_eq!(
        first[..4],
        [
            "link set dev ferrite_vxlan address 0a:58:c6:33:64:01",
            "addr replace 10.244.0.1/32 dev ferrite_vxlan",
            "neigh replace 10.244.1.1 lladdr 0a:58:c6:33:64:02 dev ferrite_vxlan nud permanent",
            "route replace 10.244.1.0/24 encap ip id 1 dst 198.51.100.2 ttl 64 via 10.244.1.1 dev ferrite_vxlan onlink src 10.244.0.1",
        ]
    );
    assert_eq!(
        first[6..],
        [
            "addr replace fd00:10:244::1/128 dev ferrite_vxlan",
            "neigh replace fd00:10:244:1::1 lladdr 0a:58:c6:33:64:02 dev ferrite_vxlan nud permanent",
            "route replace fd00:10:244:1::/64 encap ip id 1 dst 198.51.100.2 ttl 64 via fd00:10:244:1::1 dev ferrite_vxlan onlink src fd00:10:244::1",
            "neigh replace fd00:10:244:2::1 lladdr 0a:58:c6:33:64:03 dev ferrite_vxlan nud permanent",
            "route replace fd00:10:244:2::/64 encap ip id 1 dst 198.51.100.3 ttl 64 via fd00:10:244:2::1 dev ferrite_vxlan onlink src fd00:10:244::1",
        ]
    );
    assert!(commands(&two, &two).is_empty(), "nothing when in place");
    // The node that goes takes its routes and neighbours of both families.
    let one = dual_stack(
        own,
        &[("198.51.100.2", "10.244.1.0/24", "fd00:10:244:1::/64")],
    );
    assert_eq!(
        commands(&two, &one),
        [
            "route del 10.244.2.0/24 dev ferrite_vxlan",
            "neigh del 10.244.2.1 dev ferrite_vxlan",
            "route del fd00:10:244:2::/64 dev ferrite_vxlan",
            "neigh del fd00:10:244:2::1 dev ferrite_vxlan",
        ]
    );
    // A node that drops its IPv6 half keeps its IPv4 route.
    let mut ipv4_only = one.clone();
    ipv4_only.ipv6.routes.clear();
    assert_eq!(
        commands(&one, &ipv4_only),
        [
            "route del fd00:10:244:1::/64 dev ferrite_vxlan",
            "neigh del fd00:10:244:1::1 dev ferrite_vxlan",
        ]
    );
    // This node losing its IPv6 pod CIDR: no source for IPv6 routes, none stay.
    let mut own_ipv4_only = one.clone();
    own_ipv4_only.ipv6.address = None;
    assert_eq!(
        commands(&one, &own_ipv4_only),
        [
            "route del fd00:10:244:1::/64 dev ferrite_vxlan",
            "neigh del fd00:10:244:1::1 dev ferrite_vxlan",
            "addr del fd00:10:244::1/128 dev ferrite_vxlan",
        ]
    );
    // A route read back with another source (or a rewritten one) is rewritten.
    let mut drifted = one.clone();
    let route = drifted.ipv6.routes.values_mut().next().unwrap();
    route.gateway = Ipv6Addr::UNSPECIFIED;
    assert_eq!(commands(&drifted, &one).len(), 2);
}

#[test]
fn ipv6_overlay_routes_are_read_back_but_not_as_native_ones() {
    let device = 9;
    let own: Ipv6Addr = "fd00:10:244::1".parse().unwrap();
    let mut overlay = RouteOf::<Ipv6Addr>::new(
        "fd00:10:244:1::/64".parse().unwrap(),
        device,
        RouteScope::Universe,
    );
    overlay.gateway = Some("fd00:10:244:1::1".parse().unwrap());
    overlay.source = Some(own);
    overlay.onlink = true;
    overlay.encap = Some(IpEncap {
        id: 1,
        destination: "198.51.100.2".parse().unwrap(),
        ttl: 64,
    });
    // The device's own link-local route: no encap, not the overlay's.
    let link_local =
        RouteOf::<Ipv6Addr>::new("fe80::/64".parse().unwrap(), device, RouteScope::Universe);
    // Elsewhere with the own source but an IPv6 gateway: no node of the
    // underlay, not an overlay route.
    let mut elsewhere = overlay.clone();
    elsewhere.destination = "fd00:10:244:2::/64".parse().unwrap();
    elsewhere.device = Some(device + 1);
    elsewhere.encap = None;
    let routes = overlay_routes(&[overlay, link_local, elsewhere], device, Some(own));
    assert_eq!(routes.len(), 1, "{routes:?}");
    let (route, src) = routes[&"fd00:10:244:1::/64".parse().unwrap()];
    assert_eq!(
        (route.node_ip, route.gateway, route.native_device, src),
        (
            "198.51.100.2".parse().unwrap(),
            "fd00:10:244:1::1".parse().unwrap(),
            None,
            own
        )
    );
    assert!(link_local_address("fe80::1"));
    assert!(!link_local_address("fd00:10:244::1"));
    assert!(!link_local_address("10.244.0.1"));
}

fn link_local_address(ip: &str) -> bool {
    link_local(ip.parse().unwrap())
}

#[test]
fn the_ipv6_overlay_address_is_the_first_after_the_anycast_one() {
    let address = |cidr: &str| crate::plan::overlay_address6(&cidr.parse().unwrap());
    assert_eq!(
        address("fd00:10:244:1::/64"),
        "fd00:10:244:1::1".parse().ok()
    );
    assert_eq!(address("fd00:10:244:1::5/128"), None);
}
