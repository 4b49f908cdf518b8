//! Ferrite's nftables rules, one table replaced atomically (`nft -f -`).

use anyhow::Result;
use ferrite_common::VXLAN_DEVICE;
use ipnet::Ipv4Net;

use crate::command::run_with_input;

/// nftables table holding Ferrite's rules (removed by `ferrite uninstall`).
pub const NFT_TABLE: &str = "ferrite";

fn nft(script: &str) -> Result<()> {
    run_with_input("nft", &["-f", "-"], script).map(drop)
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

/// Remove Ferrite's table (uninstall); nothing to do when it is not there.
pub fn remove_table() {
    let _ = nft(&format!(
        "table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n"
    ));
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
