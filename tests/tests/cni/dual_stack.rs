//! Dual-stack pods: a conflist with an IPv4 and an IPv6 pod CIDR gives each pod an
//! address of each, wired as the IPv4 one is (a /128, a default route via a
//! link-local gateway with a permanent neighbour entry, DAD off), checked and
//! removed whole, its address in `ferrite_endpnt6` beside its IPv4 one in
//! `ferrite_endpnt` (the CNI plugin's entry, then the agent's for its Pod object).
//! The IPv6 wiring is checked in the namespaces, and two dual-stack pods talk over
//! IPv6 (the datapath's IPv6 program delivers straight into the pod).
use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::{ensure, Context, Result};
use ferrite_agent::{
    host,
    netlink::{Netlink, Route6},
    plan::Op,
};
use ferrite_common::{
    endpoint_flag::FROM_POD_OBJECT, map_names, pod_mac_for, Endpoint6Key, EndpointInfo,
    EndpointKey, HOST_VETH_MAC,
};
use ferrite_tests::{
    cni::{ferrite_conflist, Runtime, Sandbox},
    lab::{wait_until, Cluster, Node, SETTLE},
};
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

    // The pods talk over IPv6: the from-pod program hands the datagrams to its IPv6
    // program (the agent filled the slot), which finds the pod of this node in
    // ferrite_endpnt6 (the CNI plugin's entry) and delivers them into it.
    let web_ip6: Ipv6Addr = web_ip6
        .as_ref()
        .and_then(|a| a.as_str())
        .unwrap_or_default()
        .trim_end_matches("/128")
        .parse()?;
    let delivered = || -> Result<u64> {
        let counters = node.maps()?.counters()?;
        Ok(counters[ferrite_common::stat::DELIVERED_LOCAL as usize].packets)
    };
    let before = delivered()?;
    let server = web
        .pod
        .netns
        .run(move || std::net::UdpSocket::bind((web_ip6, 9)))??;
    server.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    client.pod.netns.run(move || -> Result<()> {
        let socket = std::net::UdpSocket::bind((ip6, 0))?;
        socket.send_to(b"over IPv6", (web_ip6, 9))?;
        Ok(())
    })??;
    let mut received = [0u8; 64];
    let (n, from) = server.recv_from(&mut received)?;
    assert_eq!(&received[..n], b"over IPv6");
    assert_eq!(
        from.ip(),
        std::net::IpAddr::V6(ip6),
        "the client's own address"
    );
    ensure!(
        delivered()? > before,
        "delivered by the datapath, not the stack"
    );

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

/// The runtime of a dual-stack conflist (the IPv4 pod CIDR and [`POD_CIDR6`]).
fn dual_stack_runtime(node: &Node) -> Runtime {
    let mut conflist = ferrite_conflist(node);
    conflist["plugins"][0]["podCIDRs"] = json!(["10.244.0.0/24", POD_CIDR6]);
    Runtime::new(node, conflist)
}

/// The IPv6 address an ADD's result lists.
fn result_ip6(result: &serde_json::Value) -> Result<Ipv6Addr> {
    let address = result["ips"][1]["address"]
        .as_str()
        .context("an IPv6 address")?;
    Ok(address.trim_end_matches("/128").parse()?)
}

fn key6(ip6: Ipv6Addr) -> Endpoint6Key {
    Endpoint6Key {
        address: ip6.octets(),
    }
}

fn ifindex_of(node: &Node, sandbox: &Sandbox) -> Result<u32> {
    let host = sandbox.pod.host_interface.clone();
    node.netns
        .run(move || host::interfaces::ifindex(&host))?
        .context("host veth")
}

/// Pod `default/name` on `node` at `ip` and `ip6` (its `status.podIPs`).
fn dual_stack_pod_object(node: &Node, name: &str, ip: Ipv4Addr, ip6: Ipv6Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{nodeName: {}, containers: [{{name: app, image: none}}]}}\n\
         status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}, {{ip: '{ip6}'}}]}}\n",
        node.name
    )
}

/// Write the agent's config (the cluster's Node, dual-stack, and `pods`), and wait
/// for a full sync that began after the agent read it.
fn configure(cluster: &Cluster, pods: &[String]) -> Result<()> {
    let node = &cluster.nodes[0];
    let nodes = cluster.nodes_and_pods_yaml().replace(
        "spec: {podCIDR: 10.244.0.0/24}",
        &format!("spec: {{podCIDR: 10.244.0.0/24, podCIDRs: [10.244.0.0/24, \"{POD_CIDR6}\"]}}"),
    );
    ensure!(nodes.contains(POD_CIDR6), "{nodes}");
    let reads = node.metric("ferrite_config_reads_total")?;
    let mut docs = vec![nodes];
    docs.extend(pods.iter().cloned());
    cluster.write_config(&docs.join("---\n"))?;
    wait_until("the agent read the config", SETTLE, || {
        node.metric("ferrite_config_reads_total")
            .is_ok_and(|now| now > reads)
    })?;
    let syncs = node.metric("ferrite_syncs_total")?;
    wait_until("a sync after the read", SETTLE, || {
        node.metric("ferrite_syncs_total")
            .is_ok_and(|now| now > syncs)
    })
}

/// A dual-stack pod's IPv6 address in `ferrite_endpnt6`: the CNI plugin's entry, the
/// twin of its IPv4 one (CHECK misses it once it is gone); the agent's once a Pod
/// object gives the pod that address, never another pod's for a Pod object
/// claiming it, gone with the object; DEL removes both entries, and again.
#[test]
fn the_ipv6_endpoint_entry_follows_the_cni_and_pod_objects_and_stays_its_pods() -> Result<()> {
    let (cluster, _) = super::cni_cluster()?;
    let node = &cluster.nodes[0];
    let runtime = dual_stack_runtime(node);
    let (mut web, mut thief) = (Sandbox::new("web6e")?, Sandbox::new("thief6e")?);
    let web_ip6 = result_ip6(&runtime.add(&mut web)?)?;
    let thief_ip6 = result_ip6(&runtime.add(&mut thief)?)?;
    let entry6 = |ip6: Ipv6Addr| node.maps()?.endpoint6(&key6(ip6));
    let (web_ifindex, thief_ifindex) = (ifindex_of(node, &web)?, ifindex_of(node, &thief)?);
    let cni_entry = EndpointInfo {
        ifindex: web_ifindex,
        pod_mac: pod_mac_for(web.pod.ip),
        host_mac: HOST_VETH_MAC,
        flags: 0,
    };
    assert_eq!(entry6(web_ip6)?, Some(cni_entry));
    let web_key = EndpointKey {
        address: web.pod.ip.octets(),
    };
    assert_eq!(
        node.maps()?.endpoint(&web_key)?,
        Some(cni_entry),
        "the twin of its IPv4 entry"
    );
    assert_eq!(entry6(thief_ip6)?.map(|e| e.ifindex), Some(thief_ifindex));

    // CHECK misses the IPv6 entry once it is gone.
    node.maps()?.endpoints6.remove(&key6(web_ip6))?;
    let outcome = runtime.check(&web)?;
    assert_eq!(outcome.code(), Some(102), "{}", outcome.output);
    let details = outcome.output["details"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        details.contains(&format!("endpoint map entry of {web_ip6} is missing")),
        "{details}"
    );
    node.maps()?
        .apply(&[Op::PutEndpoint6(key6(web_ip6), cni_entry)])?;
    assert!(runtime.check(&web)?.success, "CHECK with the entry back");

    // web's Pod object: both its entries become the agent's.
    let web_object = dual_stack_pod_object(node, "web6e", web.pod.ip, web_ip6);
    configure(&cluster, std::slice::from_ref(&web_object))?;
    node.wait_for_maps("web's IPv6 entry, the agent's", |m| {
        m.endpoints6
            .get(&key6(web_ip6))
            .is_some_and(|e| e.ifindex == web_ifindex && e.flags & FROM_POD_OBJECT != 0)
    })?;

    // thief's Pod object claims web's IPv6 address (its IPv4 one its own):
    // refused, web keeps its entry, thief's own IPv6 entry stays the CNI's.
    let thief_object = dual_stack_pod_object(node, "thief6e", thief.pod.ip, web_ip6);
    configure(&cluster, &[thief_object, web_object])?;
    let agent = node.agent.as_ref().context("the agent runs")?;
    let refusal = format!(
        "Pod default/thief6e: pod IP {web_ip6} is the address of the live pod behind {}",
        web.pod.host_interface
    );
    wait_until("the refusal logged", SETTLE, || {
        agent.log_text().contains(&refusal)
    })?;
    assert_eq!(entry6(web_ip6)?.map(|e| e.ifindex), Some(web_ifindex));
    assert_eq!(
        entry6(thief_ip6)?,
        Some(EndpointInfo {
            ifindex: thief_ifindex,
            pod_mac: pod_mac_for(thief.pod.ip),
            host_mac: HOST_VETH_MAC,
            flags: 0,
        })
    );

    // The objects go: the agent's entries go with them, the CNI's of thief stay.
    configure(&cluster, &[])?;
    node.wait_for_maps("web's entries gone with its object", |m| {
        !m.endpoints6.contains_key(&key6(web_ip6)) && !m.endpoints.contains_key(&web_key)
    })?;
    assert_eq!(entry6(thief_ip6)?.map(|e| e.ifindex), Some(thief_ifindex));

    for sandbox in [&web, &thief] {
        runtime.del(sandbox)?;
        runtime.del(sandbox)?;
    }
    assert_eq!(super::leftovers(node)?, super::nothing_left());
    Ok(())
}

/// An ADD that writes the IPv4 entry but cannot write the IPv6 one (the map is
/// full) fails and takes the IPv4 entry back, with the rest; an IPv6 address whose
/// entry names a live interface is never handed out.
#[test]
fn a_dual_stack_add_that_cannot_write_its_ipv6_entry_leaves_neither_entry() -> Result<()> {
    let (cluster, _) = super::cni_cluster()?;
    let node = &cluster.nodes[0];
    let runtime = dual_stack_runtime(node);
    // Fill ferrite_endpnt6 with entries of a live interface (the node's lo, so the
    // agent keeps them), outside the pod range.
    let pinned = node.pin_dir().join(map_names::ENDPOINTS6);
    let capacity = aya::maps::MapInfo::from_pin(&pinned)?.max_entries();
    let filler: Vec<Op> = (0..capacity)
        .map(|n| {
            let ip6 = Ipv6Addr::from(
                u128::from(Ipv6Addr::new(0xfd00, 0xffff, 0, 0, 0, 0, 0, 0)) + u128::from(n),
            );
            Op::PutEndpoint6(
                key6(ip6),
                EndpointInfo {
                    ifindex: 1,
                    ..EndpointInfo::default()
                },
            )
        })
        .collect();
    node.maps()?.apply(&filler)?;
    let mut pod = Sandbox::new("full6")?;
    let error = runtime.add(&mut pod).unwrap_err();
    ensure!(format!("{error:#}").contains("\"code\":100"), "{error:#}");
    ensure!(
        format!("{error:#}").contains(map_names::ENDPOINTS6),
        "names the map: {error:#}"
    );
    let left = super::leftovers(node)?;
    assert_eq!(
        (
            left.endpoints,
            left.endpoints6,
            left.veths.len(),
            left.addresses.len()
        ),
        (0, capacity as usize, 0, 0),
        "{left:?}"
    );
    let stored = stored_ipv6(node)?;
    assert!(stored.is_empty(), "IPv6 addresses left: {stored:?}");

    // With room again, but the range's first IPv6 address held by a live entry
    // (a pod of another store): the pod gets the next.
    let mut maps = node.maps()?;
    for op in &filler {
        if let Op::PutEndpoint6(key, _) = op {
            maps.endpoints6.remove(key)?;
        }
    }
    let first: Ipv6Addr = "fd00:10:244::2".parse()?;
    maps.apply(&[Op::PutEndpoint6(
        key6(first),
        EndpointInfo {
            ifindex: 1,
            ..EndpointInfo::default()
        },
    )])?;
    let ip6 = result_ip6(&runtime.add(&mut pod)?)?;
    assert_ne!(ip6, first);
    assert!(runtime.check(&pod)?.success, "CHECK");
    runtime.del(&pod)?;
    node.maps()?.endpoints6.remove(&key6(first))?;
    assert_eq!(super::leftovers(node)?, super::nothing_left());
    Ok(())
}
