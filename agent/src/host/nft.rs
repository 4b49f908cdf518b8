//! Ferrite's nftables rules: one table per IP family (`ip ferrite`, `ip6 ferrite`),
//! both replaced in one atomic transaction (`nft -f -`).

use anyhow::Result;
use ferrite_common::VXLAN_DEVICE;
use ipnet::{Ipv4Net, Ipv6Net};

use crate::command::run_with_input;

/// nftables table holding Ferrite's rules, in each family (removed by `ferrite uninstall`).
pub const NFT_TABLE: &str = "ferrite";

fn nft(script: &str) -> Result<()> {
    run_with_input("nft", &["-f", "-"], script).map(drop)
}

/// Replace `family`'s table with one holding `chains` (none: the table is removed).
/// Declaring it empty first makes the delete valid whether or not it existed.
fn replace_table(family: &str, chains: Option<String>) -> String {
    let mut script =
        format!("table {family} {NFT_TABLE} {{}}\ndelete table {family} {NFT_TABLE}\n");
    if let Some(chains) = chains {
        script.push_str(&format!("table {family} {NFT_TABLE} {{\n{chains}}}\n"));
    }
    script
}

/// Pod traffic of `cidr` leaving it (not through the overlay) gets the node's
/// address; cluster-internal traffic is never NATed. `ip` or `ip6` is the match
/// keyword of the family.
fn masquerade_chain(ip: &str, cidr: &str) -> String {
    format!(
        "\tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\t{ip} saddr {cidr} {ip} daddr != {cidr} oifname != \"{VXLAN_DEVICE}\" masquerade\n\
         \t}}\n"
    )
}

/// Ferrite's nftables rules, replacing both tables atomically:
/// - IPv4: masquerade of `cluster_cidr`'s traffic leaving the cluster, and notrack
///   for the overlay's own UDP port (both directions): the outer VXLAN datagrams
///   need no connection tracking or NAT lookup (Cilium does the same); the underlay
///   is IPv4;
/// - IPv6: masquerade of `cluster_cidr6`'s traffic leaving the cluster to the node's
///   IPv6 address (Cilium's default for IPv6 too); no table without an IPv6 cluster CIDR.
pub fn ruleset(cluster_cidr: Ipv4Net, cluster_cidr6: Option<Ipv6Net>, vxlan_port: u16) -> String {
    let overlay_notrack = format!(
        "\tchain overlay-in {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tudp dport {vxlan_port} notrack\n\
         \t}}\n\
         \tchain overlay-out {{\n\
         \t\ttype filter hook output priority raw; policy accept;\n\
         \t\tudp dport {vxlan_port} notrack\n\
         \t}}\n"
    );
    let v4 = overlay_notrack + &masquerade_chain("ip", &cluster_cidr.to_string());
    let v6 = cluster_cidr6.map(|cidr| masquerade_chain("ip6", &cidr.to_string()));
    replace_table("ip", Some(v4)) + &replace_table("ip6", v6)
}

/// Install (atomically replace) Ferrite's nftables rules.
pub fn install_rules(
    cluster_cidr: Ipv4Net,
    cluster_cidr6: Option<Ipv6Net>,
    vxlan_port: u16,
) -> Result<()> {
    nft(&ruleset(cluster_cidr, cluster_cidr6, vxlan_port))
}

/// Remove Ferrite's tables (uninstall); nothing to do when they are not there.
pub fn remove_table() {
    let _ = nft(&(replace_table("ip", None) + &replace_table("ip6", None)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masquerade_spares_cluster_traffic_and_the_overlay() {
        let rules = ruleset("10.244.0.0/16".parse().unwrap(), None, 4789);
        assert_eq!(rules.matches("udp dport 4789 notrack").count(), 2);
        assert!(rules.contains(
            "ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 oifname != \"ferrite_vxlan\" masquerade"
        ));
        // Replaces the tables atomically, whether or not they existed; without an
        // IPv6 cluster CIDR the IPv6 table is removed.
        assert!(rules.starts_with("table ip ferrite {}\ndelete table ip ferrite\n"));
        assert!(rules.ends_with("table ip6 ferrite {}\ndelete table ip6 ferrite\n"));
        assert!(!rules.contains("ip6 saddr"));
    }

    #[test]
    fn ipv6_pod_traffic_leaving_the_cluster_is_masqueraded() {
        let rules = ruleset(
            "10.244.0.0/16".parse().unwrap(),
            Some("fd00:10:244::/56".parse().unwrap()),
            4789,
        );
        let v6 = rules
            .split_once("delete table ip6 ferrite\n")
            .expect("the IPv6 table is replaced")
            .1;
        assert!(v6.starts_with("table ip6 ferrite {\n"));
        assert!(v6.contains(
            "ip6 saddr fd00:10:244::/56 ip6 daddr != fd00:10:244::/56 oifname != \"ferrite_vxlan\" masquerade"
        ));
        // The overlay's underlay is IPv4: its notrack rules are in the IPv4 table only.
        assert!(!v6.contains("notrack"));
    }
}
