//! The node's own networking around the datapath, done with iproute2 and nftables:
//! the VXLAN device and the node's own place on the overlay (its address, routes to
//! other nodes' pod CIDRs), host routes to local pods (so the stack can return
//! replies to masqueraded egress traffic), IPv4 forwarding, and the masquerade rule.
use std::{
    collections::BTreeMap,
    io::Write,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use ferrite_common::{pod_mac_for, VXLAN_DEVICE};
use ipnet::Ipv4Net;

/// Runtime files shared with the CNI plugin: /run/ferrite/<node>/.
pub const RUN_DIR: &str = "/run/ferrite";

/// A node's runtime files (removed by `ferrite uninstall`).
pub fn run_dir(node: &str) -> std::path::PathBuf {
    std::path::Path::new(RUN_DIR).join(node)
}

/// Where the agent publishes this node's pod CIDR (from its Node object) for the CNI
/// plugin's IPAM when the network config does not set one.
pub fn pod_cidr_file(node: &str) -> std::path::PathBuf {
    run_dir(node).join("pod-cidr")
}

/// Write the pod CIDR file if it changed (atomically, mode 0600).
pub fn publish_pod_cidr(node: &str, cidr: Ipv4Net) -> Result<()> {
    let path = pod_cidr_file(node);
    let content = format!("{cidr}\n");
    if std::fs::read_to_string(&path).ok().as_deref() == Some(content.as_str()) {
        return Ok(());
    }
    crate::files::create_private_dir(path.parent().context("pod-cidr path")?)?;
    crate::files::write_private(&path, content.as_bytes()).context("publishing the pod CIDR")
}

/// nftables table holding Ferrite's rules (removed by `ferrite uninstall`).
pub const NFT_TABLE: &str = "ferrite";

pub(crate) fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Create the VXLAN device in external (collect_md) mode if it is missing: the
/// datapath sets the remote node per packet, the kernel builds outer headers.
pub fn ensure_vxlan_device(port: u16, exists: bool) -> Result<()> {
    if !exists {
        let port = port.to_string();
        run(
            "ip",
            &[
                "link",
                "add",
                VXLAN_DEVICE,
                "type",
                "vxlan",
                "external",
                "dstport",
                &port,
            ],
        )?;
    }
    run("ip", &["link", "set", VXLAN_DEVICE, "up"])
}

/// Give the VXLAN device the uplink's MTU minus the encapsulation (as flannel does),
/// so what it carries never needs outer fragmentation; pods get the same MTU (the
/// CNI conflist's `mtu`) and the datapath answers larger DF packets with ICMP.
pub fn set_vxlan_mtu(mtu: u32) -> Result<()> {
    run(
        "ip",
        &["link", "set", VXLAN_DEVICE, "mtu", &mtu.to_string()],
    )
}

/// Pods are routed, not bridged: packets the host stack sends to a pod (replies to
/// its masqueraded egress traffic) need a /32 route and, as the pod MAC is known, a
/// permanent neighbour entry instead of ARP.
pub fn add_pod_route(ip: Ipv4Addr, interface: &str) -> Result<()> {
    let address = format!("{ip}/32");
    let mac = pod_mac_for(ip).map(|b| format!("{b:02x}")).join(":");
    let ip = ip.to_string();
    run(
        "ip",
        &[
            "route", "replace", &address, "dev", interface, "scope", "link",
        ],
    )?;
    run(
        "ip",
        &[
            "neigh",
            "replace",
            &ip,
            "lladdr",
            &mac,
            "dev",
            interface,
            "nud",
            "permanent",
        ],
    )
}

/// Let `lo` accept packets whose source is one of the node's own addresses: the
/// datapath hands the node's processes the answers of their per-packet Service flows
/// there, and the source of a NodePort's answer is the node's own address (which
/// the stack otherwise drops as a martian). Only the node itself can send on `lo`.
pub fn accept_local_sources_on_lo() -> Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/conf/lo/accept_local";
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(PATH, "1").context("setting net.ipv4.conf.lo.accept_local")
}

/// Another node's pod CIDR as the node's own processes reach it: through that
/// node's overlay address (`gateway`, a permanent neighbour with its VTEP MAC) and a
/// lightweight-tunnel encap to its node IP on the collect_md VXLAN device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverlayRoute {
    pub node_ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub vtep_mac: [u8; 6],
}

/// The node's own place on the overlay (flannel's `flannel.1`, Calico's
/// `vxlan.calico` do the same): an address of its own pod CIDR and its VTEP MAC on
/// the VXLAN device, and a kernel route per other node's pod CIDR from that address,
/// so the node reaches every pod and the answers come back over the overlay (never
/// masqueraded: the rule spares the overlay device).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlayHost {
    pub address: Option<Ipv4Addr>,
    pub vtep_mac: Option<[u8; 6]>,
    pub routes: BTreeMap<ipnet::Ipv4Net, OverlayRoute>,
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn route_command(
    verb: &str,
    cidr: &ipnet::Ipv4Net,
    route: &OverlayRoute,
    vni: u32,
    src: Ipv4Addr,
) -> String {
    format!(
        "route {verb} {cidr} encap ip id {vni} dst {} ttl 64 via {} dev {VXLAN_DEVICE} onlink src {src}",
        route.node_ip, route.gateway
    )
}

/// The `ip -batch` lines that turn `current` into `desired` (pure): the device MAC
/// and address first (routes take their source from it), neighbours before routes,
/// removals last. Without an own address there are no routes (they need a source).
pub fn overlay_commands(current: &OverlayHost, desired: &OverlayHost, vni: u32) -> Vec<String> {
    let mut commands = Vec::new();
    if let Some(mac) = desired.vtep_mac.filter(|m| current.vtep_mac != Some(*m)) {
        commands.push(format!(
            "link set dev {VXLAN_DEVICE} address {}",
            mac_text(&mac)
        ));
    }
    if let Some(address) = desired.address.filter(|a| current.address != Some(*a)) {
        commands.push(format!("addr replace {address}/32 dev {VXLAN_DEVICE}"));
    }
    let wanted =
        |cidr: &ipnet::Ipv4Net| desired.address.is_some() && desired.routes.contains_key(cidr);
    for (cidr, route) in &desired.routes {
        let (Some(src), true) = (desired.address, wanted(cidr)) else {
            continue;
        };
        let same = current.routes.get(cidr) == Some(route) && current.address == desired.address;
        if !same {
            commands.push(format!(
                "neigh replace {} lladdr {} dev {VXLAN_DEVICE} nud permanent",
                route.gateway,
                mac_text(&route.vtep_mac)
            ));
            commands.push(route_command("replace", cidr, route, vni, src));
        }
    }
    for (cidr, route) in &current.routes {
        if !wanted(cidr) {
            commands.push(format!("route del {cidr} dev {VXLAN_DEVICE}"));
            if !desired.routes.values().any(|r| r.gateway == route.gateway) {
                commands.push(format!("neigh del {} dev {VXLAN_DEVICE}", route.gateway));
            }
        }
    }
    if let Some(old) = current.address.filter(|a| desired.address != Some(*a)) {
        commands.push(format!("addr del {old}/32 dev {VXLAN_DEVICE}"));
    }
    commands
}

fn ip_output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Parse `ip -4 route show dev <vxlan>` lines of overlay routes (others are ignored).
pub fn parse_overlay_routes(text: &str) -> BTreeMap<ipnet::Ipv4Net, (OverlayRoute, Ipv4Addr)> {
    let mut routes = BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |word: &str| {
            words
                .iter()
                .rposition(|w| *w == word)
                .and_then(|i| words.get(i + 1))
                .and_then(|v| v.parse::<Ipv4Addr>().ok())
        };
        let Some(cidr) = words.first().and_then(|w| w.parse::<ipnet::Ipv4Net>().ok()) else {
            continue;
        };
        if let (Some(node_ip), Some(gateway), Some(src)) =
            (after("dst"), after("via"), after("src"))
        {
            let route = OverlayRoute {
                node_ip,
                gateway,
                vtep_mac: [0; 6],
            };
            routes.insert(cidr, (route, src));
        }
    }
    routes
}

/// What the VXLAN device holds now: its address(es), MAC, and the overlay routes with
/// their neighbours' MACs.
pub fn read_overlay(device_mac: [u8; 6]) -> Result<OverlayHost> {
    let addresses = ip_output(&["-4", "-o", "addr", "show", "dev", VXLAN_DEVICE])?;
    let address = addresses.lines().find_map(|line| {
        let mut words = line.split_whitespace().skip_while(|w| *w != "inet").skip(1);
        words.next()?.split('/').next()?.parse().ok()
    });
    let neighbours: BTreeMap<Ipv4Addr, [u8; 6]> =
        ip_output(&["-4", "neigh", "show", "dev", VXLAN_DEVICE])?
            .lines()
            .filter(|line| line.contains("PERMANENT"))
            .filter_map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                let ip = words.first()?.parse().ok()?;
                let mac_text = words
                    .iter()
                    .position(|w| *w == "lladdr")
                    .and_then(|i| words.get(i + 1))?;
                let mut mac = [0u8; 6];
                for (byte, part) in mac.iter_mut().zip(mac_text.split(':')) {
                    *byte = u8::from_str_radix(part, 16).ok()?;
                }
                Some((ip, mac))
            })
            .collect();
    let routes = parse_overlay_routes(&ip_output(&["-4", "route", "show", "dev", VXLAN_DEVICE])?)
        .into_iter()
        .map(|(cidr, (mut route, src))| {
            route.vtep_mac = neighbours.get(&route.gateway).copied().unwrap_or_default();
            // A route from another source is not ours as wanted: rewrite it.
            if Some(src) != address {
                route.gateway = Ipv4Addr::UNSPECIFIED;
            }
            (cidr, route)
        })
        .collect();
    Ok(OverlayHost {
        address,
        vtep_mac: Some(device_mac),
        routes,
    })
}

/// Bring the VXLAN device's address, MAC, routes and neighbours to `desired`.
pub fn apply_overlay(current: &OverlayHost, desired: &OverlayHost, vni: u32) -> Result<usize> {
    let commands = overlay_commands(current, desired, vni);
    if !commands.is_empty() {
        let mut script = commands.join("\n");
        script.push('\n');
        run_with_input("ip", &["-batch", "-"], &script)
            .context("configuring the overlay's host routes")?;
    }
    Ok(commands.len())
}

/// Make sure IPv4 forwarding is on. Already on (kubeadm's preflight requires it) needs
/// no write, so a container with a read-only /proc/sys works.
pub fn enable_forwarding() -> Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(PATH, "1").context("enabling IPv4 forwarding (net.ipv4.ip_forward)")
}

/// Run `program args` with `input` on its stdin (nft -f -, ip -batch -).
pub(crate) fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn nft(script: &str) -> Result<()> {
    run_with_input("nft", &["-f", "-"], script)
}

/// Ferrite's nftables rules, replacing the table atomically:
/// - masquerade: pod traffic leaving the cluster CIDR (not through the overlay) gets
///   the node's address; cluster-internal traffic is never NATed;
/// - notrack for the overlay's own UDP port (both directions): the outer VXLAN
///   datagrams need no connection tracking or NAT lookup (Cilium does the same).
pub fn ruleset(cluster_cidr: Ipv4Net, vxlan_port: u16) -> String {
    format!(
        "table ip {NFT_TABLE} {{}}\n\
         delete table ip {NFT_TABLE}\n\
         table ip {NFT_TABLE} {{\n\
         \tchain overlay-in {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tudp dport {vxlan_port} notrack\n\
         \t}}\n\
         \tchain overlay-out {{\n\
         \t\ttype filter hook output priority raw; policy accept;\n\
         \t\tudp dport {vxlan_port} notrack\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {cluster_cidr} ip daddr != {cluster_cidr} oifname != \"{VXLAN_DEVICE}\" masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// Install (atomically replace) Ferrite's nftables rules.
pub fn install_rules(cluster_cidr: Ipv4Net, vxlan_port: u16) -> Result<()> {
    nft(&ruleset(cluster_cidr, vxlan_port))
}

/// Remove Ferrite's nftables table and VXLAN device (uninstall).
pub fn remove_all() {
    let _ = nft(&format!(
        "table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n"
    ));
    let _ = run("ip", &["link", "del", VXLAN_DEVICE]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(address: &str, routes: &[(&str, &str, &str)]) -> OverlayHost {
        OverlayHost {
            address: Some(address.parse().unwrap()),
            vtep_mac: Some([0x0a, 0x58, 198, 51, 100, 1]),
            routes: routes
                .iter()
                .map(|(cidr, node, gateway)| {
                    let node_ip: Ipv4Addr = node.parse().unwrap();
                    let route = OverlayRoute {
                        node_ip,
                        gateway: gateway.parse().unwrap(),
                        vtep_mac: ferrite_common::vtep_mac_for(node_ip),
                    };
                    (cidr.parse().unwrap(), route)
                })
                .collect(),
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
        let first = overlay_commands(&empty, &two, 1);
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
            overlay_commands(&two, &two, 1).is_empty(),
            "nothing to do when in place"
        );
        let one = overlay(
            "10.244.0.1",
            &[("10.244.1.0/24", "198.51.100.2", "10.244.1.1")],
        );
        assert_eq!(
            overlay_commands(&two, &one, 1),
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
        assert_eq!(overlay_commands(&one, &moved, 1).len(), 2);
    }

    #[test]
    fn overlay_routes_are_read_back_from_ip_output() {
        let text = "10.244.1.0/24  encap ip id 1 src 0.0.0.0 dst 198.51.100.2 ttl 64 tos 0 via 10.244.1.1 onlink src 10.244.0.1 \n\
                    10.9.0.0/16 proto kernel scope link src 10.9.0.1\n";
        let routes = parse_overlay_routes(text);
        assert_eq!(routes.len(), 1);
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
    fn masquerade_spares_cluster_traffic_and_the_overlay() {
        let rules = ruleset("10.244.0.0/16".parse().unwrap(), 4789);
        assert_eq!(rules.matches("udp dport 4789 notrack").count(), 2);
        assert!(rules.contains(
            "ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 oifname != \"ferrite_vxlan\" masquerade"
        ));
        // Replaces the table atomically, whether or not it existed.
        assert!(rules.starts_with("table ip ferrite {}\ndelete table ip ferrite\n"));
    }
}
