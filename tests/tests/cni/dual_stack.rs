//! Dual-stack pods: a conflist with an IPv4 and an IPv6 pod CIDR gives each pod an
//! address of each, wired as the IPv4 one is (a /128, a default route via a
//! link-local gateway with a permanent neighbour entry, DAD off), checked and
//! removed whole. The IPv6 wiring is checked in the namespaces, and IPv6 the pod
//! sends is seen reaching the datapath's IPv6 program (`ferrite_from_pod6`), which
//! drops it as spoofed while nothing writes the pod's address to `ferrite_endpnt6`.
use std::{fs, net::Ipv6Addr, path::Path};

use anyhow::{ensure, Result};
use ferrite_agent::netlink::{Netlink, Route6};
use ferrite_tests::cni::{ferrite_conflist, Runtime, Sandbox};
use serde_json::json;

const POD_CIDR6: &str = "fd00:10:244::/120";
const GATEWAY6: &str = "fe80::ecee:eeff:feee:eeee";

/// What the pod's namespace shows of its IPv6 wiring.
#[derive(Debug, PartialEq, Eq)]
struct PodIpv6 {
    disable_ipv6: String,
    accept_dad: String,
    /// Its global addresses with their prefix.
    addresses: Vec<String>,
    default_via: Vec<Ipv6Addr>,
    /// The permanent neighbours: address and MAC.
    permanent: Vec<(Ipv6Addr, Option<[u8; 6]>)>,
}

fn pod_ipv6(sandbox: &Sandbox) -> Result<PodIpv6> {
    sandbox.pod.netns.run(|| -> Result<PodIpv6> {
        let sysctl = |key: &str| {
            fs::read_to_string(Path::new("/proc/sys/net/ipv6/conf/eth0").join(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let mut netlink = Netlink::open()?;
        let eth0 = netlink.link_index("eth0")?;
        Ok(PodIpv6 {
            disable_ipv6: sysctl("disable_ipv6"),
            accept_dad: sysctl("accept_dad"),
            addresses: netlink
                .addresses6()?
                .into_iter()
                .filter(|a| a.device == eth0 && !a.ip.is_unicast_link_local())
                .map(|a| format!("{}/{}", a.ip, a.prefix_len))
                .collect(),
            default_via: netlink
                .routes6()?
                .into_iter()
                .filter(|r| r.destination.prefix_len() == 0 && r.device == Some(eth0))
                .filter_map(|r| r.gateway)
                .collect(),
            permanent: netlink
                .neighbours6()?
                .into_iter()
                .filter(|n| n.device == eth0 && n.permanent)
                .map(|n| (n.ip, n.mac))
                .collect(),
        })
    })?
}

#[test]
fn dual_stack_pods_get_an_address_of_each_family_wired_checked_and_removed() -> Result<()> {
    let (cluster, plain) = super::cni_cluster()?;
    let node = &cluster.nodes[0];
    let mut conflist = ferrite_conflist(node);
    conflist["plugins"][0]["podCIDRs"] = json!(["10.244.0.0/24", POD_CIDR6]);
    let runtime = Runtime::new(node, conflist);
    let (mut client, mut web, mut v4_only) = (
        Sandbox::new("client6")?,
        Sandbox::new("web6")?,
        Sandbox::new("v4only")?,
    );
    let result = runtime.add(&mut client)?;
    runtime.add(&mut web)?;
    plain.add(&mut v4_only)?;

    // The result lists both addresses, their gateways and default routes.
    let ips = result["ips"].as_array().cloned().unwrap_or_default();
    ensure!(ips.len() == 2, "two addresses: {result}");
    assert_eq!(ips[0]["address"], format!("{}/32", client.pod.ip));
    let address6 = ips[1]["address"].as_str().unwrap_or_default().to_string();
    let ip6: Ipv6Addr = address6.trim_end_matches("/128").parse()?;
    ensure!(
        ip6.segments()[..7] == [0xfd00, 0x10, 0x244, 0, 0, 0, 0]
            && ip6.segments()[7] < 0x100
            && address6.ends_with("/128"),
        "{address6} from {POD_CIDR6}"
    );
    assert_eq!(ips[1]["gateway"], GATEWAY6);
    assert_eq!(ips[1]["interface"], 1);
    assert_eq!(result["routes"][1], json!({"dst": "::/0", "gw": GATEWAY6}));
    let web_ip6 = web.result.as_ref().map(|r| r["ips"][1]["address"].clone());
    ensure!(
        web_ip6 != Some(json!(address6)),
        "two pods, two IPv6 addresses"
    );

    // The pod's namespace: IPv6 on, DAD off, its /128, the default route via the
    // link-local gateway and that gateway's permanent entry at the host veth's MAC.
    let gateway: Ipv6Addr = GATEWAY6.parse()?;
    assert_eq!(
        pod_ipv6(&client)?,
        PodIpv6 {
            disable_ipv6: "0".into(),
            accept_dad: "0".into(),
            addresses: vec![address6.clone()],
            default_via: vec![gateway],
            permanent: vec![(gateway, Some([0xee; 6]))],
        }
    );
    // An IPv4-only pod's IPv6 stays off.
    assert_eq!(pod_ipv6(&v4_only)?.disable_ipv6, "1");
    assert!(pod_ipv6(&v4_only)?.addresses.is_empty());

    // The node: IPv6 on the host veth, a /128 route and the pod's permanent entry.
    let host = client.pod.host_interface.clone();
    let (routed, resolved, host_ipv6) = node.netns.run(|| -> Result<_> {
        let mut netlink = Netlink::open()?;
        let index = netlink.link_index(&host)?;
        let routed = netlink.routes6()?.iter().any(|r| {
            r.destination.prefix_len() == 128
                && r.destination.addr() == ip6
                && r.device == Some(index)
        });
        let resolved = netlink
            .neighbours6()?
            .iter()
            .any(|n| n.device == index && n.ip == ip6 && n.permanent);
        let disabled = fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{host}/disable_ipv6"))?;
        Ok((routed, resolved, disabled.trim().to_string()))
    })??;
    ensure!(
        routed && resolved,
        "node: route {routed}, neighbour {resolved}"
    );
    assert_eq!(host_ipv6, "0");

    assert!(
        runtime.check(&client)?.success,
        "CHECK of a healthy dual-stack pod"
    );
    assert!(plain.check(&v4_only)?.success, "CHECK of an IPv4-only pod");

    // What IPv6 from the pod does today: the from-pod program hands it to its IPv6
    // program (the agent filled the slot), where the pod's address is no endpoint's.
    let dropped = || -> Result<u64> {
        let counters = node.maps()?.counters()?;
        Ok(counters[ferrite_common::stat::DROP_SPOOFED as usize].packets)
    };
    let before = dropped()?;
    client.pod.netns.run(move || -> Result<()> {
        let socket = std::net::UdpSocket::bind((ip6, 0))?;
        for _ in 0..3 {
            socket.send_to(b"over IPv6", ("fd00:10:244::99", 9))?;
        }
        Ok(())
    })??;
    ferrite_tests::lab::wait_until(
        "three IPv6 datagrams dropped as drop_spoofed",
        ferrite_tests::lab::SETTLE,
        || dropped().is_ok_and(|now| now >= before + 3),
    )?;

    // CHECK sees the IPv6 default route gone.
    client.pod.netns.run(|| -> Result<()> {
        let mut netlink = Netlink::open()?;
        let eth0 = netlink.link_index("eth0")?;
        netlink.delete_route6(&Route6 {
            destination: Default::default(),
            device: Some(eth0),
            gateway: Some(gateway),
        })?;
        Ok(())
    })??;
    let outcome = runtime.check(&client)?;
    assert_eq!(outcome.code(), Some(102), "{}", outcome.output);
    ensure!(
        outcome.output.to_string().contains("::/0"),
        "names the route: {}",
        outcome.output
    );

    // DEL removes both addresses; again is fine.
    for sandbox in [&client, &web] {
        runtime.del(sandbox)?;
        runtime.del(sandbox)?;
    }
    plain.del(&v4_only)?;
    let left: Vec<String> = fs::read_dir(node.dir.join("ipam").join(&node.name))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.parse::<std::net::IpAddr>().is_ok())
        .collect();
    ensure!(left.is_empty(), "addresses left: {left:?}");
    assert_eq!(super::leftovers(node)?, super::nothing_left());
    Ok(())
}

/// ADD with `podCIDRs` `cidrs`: its outcome.
fn add_with_cidrs(
    node: &ferrite_tests::lab::Node,
    sandbox: &Sandbox,
    cidrs: serde_json::Value,
) -> Result<ferrite_tests::cni::Outcome> {
    let mut conflist = ferrite_conflist(node);
    conflist["plugins"][0]["podCIDRs"] = cidrs;
    let runtime = Runtime::new(node, conflist);
    let config = runtime.plugin_config(0, None, &serde_json::Value::Null);
    runtime.exec(
        "ferrite-cni",
        &Runtime::env("ADD", sandbox),
        config.to_string().as_bytes(),
    )
}

#[test]
fn ipv6_pod_cidrs_that_are_not_pods_to_have_are_refused_and_the_published_one_is_used() -> Result<()>
{
    let (cluster, plain) = super::cni_cluster()?;
    let node = &cluster.nodes[0];
    let mut pod = Sandbox::new("cidr6")?;
    for (cidrs, says) in [
        (json!(["10.244.0.0/24", "::/0"]), "prefix /0"),
        (json!(["10.244.0.0/24", "::1/128"]), "prefix /128"),
        (json!(["10.244.0.0/24", "::/64"]), "unspecified"),
        (json!(["10.244.0.0/24", "fe80::/64"]), "link-local"),
        (json!(["10.244.0.0/24", "ff02::/64"]), "multicast"),
        (
            json!(["10.244.0.0/24", "::ffff:10.0.0.0/120"]),
            "IPv4-mapped",
        ),
        (json!(["10.244.0.0/24", "fd00::/48"]), "outside /64../120"),
        (
            json!(["10.244.0.0/24", "10.244.1.0/24"]),
            "more than one CIDR",
        ),
        (json!(["fd00:10:244::/64"]), "no IPv4 CIDR"),
    ] {
        let outcome = add_with_cidrs(node, &pod, cidrs.clone())?;
        assert_eq!(outcome.code(), Some(7), "{cidrs}: {}", outcome.output);
        let msg = format!("{} {}", outcome.output["msg"], outcome.output["details"]);
        ensure!(msg.contains(says), "{cidrs}: {}", outcome.output);
    }
    assert_eq!(super::leftovers(node)?, super::nothing_left());

    // The Node turns dual-stack: the agent publishes its IPv6 pod CIDR and a conflist
    // without pod CIDRs gives pods an address of it.
    let yaml = cluster.nodes_and_pods_yaml().replace(
        "spec: {podCIDR: 10.244.0.0/24}",
        "spec: {podCIDR: 10.244.0.0/24, podCIDRs: [10.244.0.0/24, \"fd00:10:244:5::/64\"]}",
    );
    ensure!(yaml.contains("fd00:10:244:5::/64"), "{yaml}");
    cluster.write_config(&yaml)?;
    let published = ferrite_agent::files::pod_cidr_file(&node.name);
    ferrite_tests::lab::wait_until(
        "the IPv6 pod CIDR published",
        std::time::Duration::from_secs(15),
        || fs::read_to_string(&published).is_ok_and(|s| s.contains("fd00:10:244:5::/64")),
    )?;
    let result = plain.add(&mut pod)?;
    assert_eq!(result["ips"][1]["address"], "fd00:10:244:5::2/128");
    assert!(plain.check(&pod)?.success, "CHECK");
    plain.del(&pod)?;
    assert_eq!(super::leftovers(node)?, super::nothing_left());
    Ok(())
}

/// The IPv6 addresses of the store's files.
fn stored_ipv6(node: &ferrite_tests::lab::Node) -> Result<Vec<Ipv6Addr>> {
    let mut found: Vec<Ipv6Addr> = fs::read_dir(node.dir.join("ipam").join(&node.name))?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    found.sort();
    Ok(found)
}

#[test]
fn parallel_dual_stack_adds_get_distinct_addresses_and_a_full_ipv6_range_reclaims_gone_pods(
) -> Result<()> {
    let (cluster, _) = super::cni_cluster()?;
    let node = &cluster.nodes[0];
    let mut conflist = ferrite_conflist(node);
    conflist["plugins"][0]["podCIDRs"] = json!(["10.244.0.0/24", POD_CIDR6]);
    let runtime = Runtime::new(node, conflist);
    let mut sandboxes = (0..8)
        .map(|i| Sandbox::new(&format!("d{i}")))
        .collect::<Result<Vec<_>>>()?;
    runtime.add_parallel(&mut sandboxes)?;
    let mut ips6: Vec<String> = sandboxes
        .iter()
        .filter_map(|s| s.result.as_ref())
        .map(|r| r["ips"][1]["address"].to_string())
        .collect();
    ips6.sort();
    ips6.dedup();
    assert_eq!(
        ips6.len(),
        8,
        "every pod has its own IPv6 address: {ips6:?}"
    );
    assert_eq!(stored_ipv6(node)?.len(), 8);
    for sandbox in &sandboxes {
        runtime.del(sandbox)?;
    }
    assert!(stored_ipv6(node)?.is_empty());

    // Every IPv6 address of the range held by attachments gone without a DEL (their
    // namespace path names nothing, no veth, no IPv4 address: an interrupted run's
    // records): the next ADD finds the range full, reclaims them and gets one.
    let store = node.dir.join("ipam").join(&node.name);
    for last in 2..=0xffu16 {
        let owner = json!({
            "containerID": format!("gone-{last}"),
            "ifname": "eth0",
            "hostInterface": format!("fergone{last}"),
            "netns": {"path": format!("/run/netns/ferrite-gone-{last}"), "id": {"dev": 4, "ino": 1}},
        });
        fs::write(
            store.join(format!("fd00:10:244::{last:x}")),
            owner.to_string(),
        )?;
    }
    let mut next = Sandbox::new("after-full")?;
    let result = runtime.add(&mut next)?;
    let address6 = result["ips"][1]["address"].as_str().unwrap_or_default();
    ensure!(address6.starts_with("fd00:10:244::"), "{result}");
    let stored = stored_ipv6(node)?;
    assert_eq!(stored.len(), 1, "the gone ones released: {stored:?}");
    assert!(runtime.check(&next)?.success, "CHECK");
    runtime.del(&next)?;
    assert!(stored_ipv6(node)?.is_empty());
    assert_eq!(super::leftovers(node)?, super::nothing_left());
    Ok(())
}
