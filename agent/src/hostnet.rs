//! The node's own networking around the datapath, done with iproute2 and nftables:
//! the VXLAN device, host routes to local pods (so the stack can return replies to
//! masqueraded egress traffic), IPv4 forwarding, and the masquerade rule.
use std::{
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
