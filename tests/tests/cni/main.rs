//! User stories for the CNI plugin, invoked exactly as a container runtime does
//! (CNI_* environment + configuration on stdin, in the node's network namespace)
//! against real network namespaces. Needs root; every node, pod netns, veth and pin
//! is uniquely named and removed on every path.
mod dual_stack;
mod hostile;

use std::net::SocketAddrV4;

use anyhow::{ensure, Context, Result};
use ferrite_agent::{datapath, files, host};
use ferrite_common::{EndpointKey, VXLAN_DEVICE};
use ferrite_tests::{
    cluster::{self, TCP_FRONTEND, TCP_TARGET},
    cni::{ferrite_conflist, Runtime, Sandbox},
    lab::{answered_by, parse_answer, sh, Cluster, Node, WORLD_GATEWAY},
};
use serde_json::{json, Value};

/// A one-node cluster (underlay, world) with the agent synced and the node's pod
/// CIDR (10.244.0.0/24, from its Node object) published for the plugin.
fn cni_cluster() -> Result<(Cluster, Runtime)> {
    let cluster = ferrite_tests::cni::one_node_cluster()?;
    let runtime = Runtime::new(&cluster.nodes[0], ferrite_conflist(&cluster.nodes[0]));
    Ok((cluster, runtime))
}

/// What pods leave on a node: IPAM allocations, host veths, endpoint entries (of
/// both families) and datapath link pins (the overlay's own link aside).
#[derive(Debug, PartialEq, Eq)]
struct Leftovers {
    addresses: Vec<String>,
    veths: Vec<String>,
    endpoints: usize,
    endpoints6: usize,
    link_pins: Vec<String>,
}

fn leftovers(node: &Node) -> Result<Leftovers> {
    let ipam_dir = node.dir.join("ipam").join(&node.name);
    let mut addresses: Vec<String> = std::fs::read_dir(&ipam_dir)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.parse::<std::net::Ipv4Addr>().is_ok() || name.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default();
    addresses.sort();
    let veths: Vec<String> = node
        .netns
        .run(host::interfaces::interfaces)??
        .into_keys()
        .filter(|name| name.starts_with("fer") && name != VXLAN_DEVICE)
        .collect();
    // Pods' links only (the node's own: the VXLAN device, the uplink, lo, cgroup).
    let link_pins = datapath::attachments(&node.pin_dir())?
        .into_iter()
        .filter(|a| {
            a.device()
                .is_some_and(|d| d.starts_with("fer") && d != VXLAN_DEVICE)
        })
        .map(|a| a.pin_name())
        .collect();
    Ok(Leftovers {
        addresses,
        veths,
        endpoints: node.maps()?.endpoint_entries()?.len(),
        endpoints6: node.maps()?.endpoint6_entries()?.len(),
        link_pins,
    })
}

fn nothing_left() -> Leftovers {
    Leftovers {
        addresses: vec![],
        veths: vec![],
        endpoints: 0,
        endpoints6: 0,
        link_pins: vec![],
    }
}

#[test]
fn pods_wired_by_the_cni_reach_each_other_and_services_and_del_removes_every_trace() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let (mut client, mut web) = (Sandbox::new("client")?, Sandbox::new("web")?);
    let result = runtime.add(&mut client)?;
    runtime.add(&mut web)?;

    // The result as the spec shapes it, in the conflist's version.
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(result["interfaces"][0]["name"], client.pod.host_interface);
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(
        result["interfaces"][1]["sandbox"],
        client.netns_path().display().to_string()
    );
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(result["ips"][0]["interface"], 1);
    assert!(result["ips"][0].get("version").is_none());
    ensure!(
        client.pod.ip.octets()[..3] == [10, 244, 0] && client.pod.ip != web.pod.ip,
        "addresses come from the node's pod CIDR: {} {}",
        client.pod.ip,
        web.pod.ip
    );

    // Pod to pod by IP, before the agent has heard of either pod.
    let _server = web.pod.serve(TCP_TARGET)?;
    let to_web = SocketAddrV4::new(web.pod.ip, TCP_TARGET);
    assert_eq!(
        answered_by(&client.pod.tcp_request(to_web, "hi")?, "hi")?,
        "web"
    );

    // A ClusterIP in front of the CNI-wired pod.
    let yaml = format!(
        "{}---\n{}",
        cluster.nodes_and_pods_yaml(),
        cluster::service_yaml("web", *TCP_FRONTEND.ip(), &[web.pod.ip])
    );
    cluster.write_config(&yaml)?;
    node.wait_for_sync(2, 2)?; // TCP and UDP ports, two pods
    let reply = client.pod.tcp_request(TCP_FRONTEND, "via vip")?;
    assert_eq!(answered_by(&reply, "via vip")?, "web");

    assert!(runtime.check(&client)?.success, "CHECK of a healthy pod");

    runtime.del(&client)?;
    runtime.del(&web)?;
    assert_eq!(leftovers(node)?, nothing_left());
    // Idempotent: DEL again, and CHECK now knows no such container.
    runtime.del(&client)?;
    assert_eq!(runtime.check(&client)?.code(), Some(3));
    Ok(())
}

/// The plugin wires pods through netlink itself: a runtime whose PATH holds no
/// `ip` (nothing at all) gets pods that are wired, pass CHECK, talk to each other
/// and leave nothing behind after DEL.
#[test]
fn pods_are_wired_checked_and_removed_with_nothing_on_the_plugins_path() -> Result<()> {
    let (cluster, mut runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let empty = node.dir.join("empty-path");
    std::fs::create_dir(&empty)?;
    runtime.path = empty.display().to_string();
    let (mut client, mut web) = (Sandbox::new("client")?, Sandbox::new("web")?);
    runtime.add(&mut client)?;
    runtime.add(&mut web)?;
    let check = runtime.check(&client)?;
    assert!(check.success, "CHECK of a healthy pod: {}", check.output);
    let _server = web.pod.serve(TCP_TARGET)?;
    let to_web = SocketAddrV4::new(web.pod.ip, TCP_TARGET);
    assert_eq!(
        answered_by(&client.pod.tcp_request(to_web, "no ip")?, "no ip")?,
        "web"
    );
    runtime.del(&client)?;
    runtime.del(&web)?;
    assert_eq!(leftovers(node)?, nothing_left());
    runtime.del(&client)?;
    Ok(())
}

#[test]
fn check_reports_a_pod_whose_datapath_entry_was_removed() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let mut pod = Sandbox::new("checked")?;
    runtime.add(&mut pod)?;
    let mut maps = node.maps()?;
    maps.endpoints.remove(&EndpointKey {
        address: pod.pod.ip.octets(),
    })?;
    let outcome = runtime.check(&pod)?;
    assert_eq!(outcome.code(), Some(102), "{}", outcome.output);
    assert!(outcome.output["details"]
        .as_str()
        .unwrap_or_default()
        .contains("endpoint map entry"));
    runtime.del(&pod)?;
    Ok(())
}

#[test]
fn pods_are_wired_while_the_agent_is_down() -> Result<()> {
    let (mut cluster, runtime) = cni_cluster()?;
    cluster.nodes[0].kill_agent()?;
    let (mut a, mut b) = (Sandbox::new("a")?, Sandbox::new("b")?);
    runtime.add(&mut a)?;
    runtime.add(&mut b)?;
    let _server = b.pod.serve(TCP_TARGET)?;
    let reply = a
        .pod
        .tcp_request(SocketAddrV4::new(b.pod.ip, TCP_TARGET), "agent down")?;
    assert_eq!(answered_by(&reply, "agent down")?, "b");
    runtime.del(&a)?;
    runtime.del(&b)?;
    assert_eq!(leftovers(&cluster.nodes[0])?, nothing_left());
    Ok(())
}

#[test]
fn sixteen_parallel_adds_get_distinct_addresses() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let mut sandboxes = (0..16)
        .map(|i| Sandbox::new(&format!("p{i}")))
        .collect::<Result<Vec<_>>>()?;
    runtime.add_parallel(&mut sandboxes)?;
    let mut ips: Vec<_> = sandboxes.iter().map(|s| s.pod.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 16, "every pod has its own address");
    let node = &cluster.nodes[0];
    assert_eq!(node.maps()?.endpoint_entries()?.len(), 16);
    std::thread::scope(|scope| {
        let runtime = &runtime;
        let dels: Vec<_> = sandboxes
            .iter()
            .map(|sandbox| scope.spawn(move || runtime.del(sandbox)))
            .collect();
        dels.into_iter()
            .try_for_each(|del| del.join().expect("DEL thread panicked"))
    })?;
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

#[test]
fn a_thousand_add_del_cycles_leak_no_address_veth_map_entry_or_file() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let mut sandbox = Sandbox::new("cycle")?;
    for cycle in 0..1000 {
        // A new container (sandbox id) each time, as a restarting pod gets.
        sandbox.container_id = format!("cycle-{cycle}");
        runtime
            .add(&mut sandbox)
            .with_context(|| format!("ADD {cycle}"))?;
        runtime
            .del(&sandbox)
            .with_context(|| format!("DEL {cycle}"))?;
    }
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

#[test]
fn del_succeeds_for_unknown_containers_twice_and_after_the_netns_is_gone() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let never_added = Sandbox::new("ghost")?;
    runtime.del(&never_added)?;

    let mut pod = Sandbox::new("gone")?;
    runtime.add(&mut pod)?;
    // The runtime removed the sandbox's netns before calling DEL.
    sh("ip", &["netns", "del", &pod.pod.netns.name])?;
    runtime.del(&pod)?;
    runtime.del(&pod)?;
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

#[test]
fn a_failed_add_leaves_no_address_veth_or_map_entry_behind() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    // Fails creating the veth: the pod already has an eth0.
    let mut taken_name = Sandbox::new("taken")?;
    sh(
        "ip",
        &[
            "-n",
            &taken_name.pod.netns.name,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "other",
        ],
    )?;
    let error = runtime.add(&mut taken_name).unwrap_err();
    assert!(format!("{error:#}").contains("\"code\":100"), "{error:#}");
    // The kernel's answer, named: the request, the pair and the errno.
    assert!(
        format!("{error:#}").contains("netlink RTM_NEWLINK veth")
            && format!("{error:#}").contains("<-> eth0: File exists (os error 17)"),
        "{error:#}"
    );
    assert_eq!(leftovers(node)?, nothing_left());

    // Fails after the veth exists: the pod already has a default route.
    let mut routed = Sandbox::new("routed")?;
    let ns = routed.pod.netns.name.clone();
    sh(
        "ip",
        &[
            "-n", &ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
        ],
    )?;
    sh("ip", &["-n", &ns, "link", "set", "d0", "up"])?;
    sh("ip", &["-n", &ns, "route", "add", "default", "dev", "d0"])?;
    let error = runtime.add(&mut routed).unwrap_err();
    assert!(format!("{error:#}").contains("\"code\":100"), "{error:#}");
    assert_eq!(leftovers(node)?, nothing_left());
    // Nothing wired on the node either, and the IPAM state is as before: the
    // round-robin position did not move.
    let routes = node.netns.run(|| sh("ip", &["-4", "route", "show"]))??;
    let neighbours = node
        .netns
        .run(|| sh("ip", &["-4", "neigh", "show", "nud", "permanent"]))??;
    for host in [&taken_name.pod.host_interface, &routed.pod.host_interface] {
        assert!(
            !routes.contains(host.as_str()),
            "{host} routes left:\n{routes}"
        );
        assert!(!neighbours.contains(host.as_str()), "{neighbours}");
    }
    let last_reserved = node
        .dir
        .join("ipam")
        .join(&node.name)
        .join("last_reserved_ip");
    assert!(
        !last_reserved.exists(),
        "a failed ADD moved last_reserved_ip"
    );
    Ok(())
}

#[test]
fn malformed_configuration_and_environment_get_the_specs_error_codes() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let pod = Sandbox::new("errors")?;
    let good = runtime.plugin_config(0, None, &Value::Null);
    let add_env = |netns: bool| {
        let mut env = vec![
            ("CNI_COMMAND", "ADD".to_string()),
            ("CNI_CONTAINERID", pod.container_id.clone()),
            ("CNI_IFNAME", "eth0".to_string()),
        ];
        if netns {
            env.push(("CNI_NETNS", pod.netns_path().display().to_string()));
        }
        env
    };
    let with = |change: &dyn Fn(&mut Value)| {
        let mut config = good.clone();
        change(&mut config);
        config.to_string().into_bytes()
    };
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, Vec<u8>, u64);
    let cases: Vec<Case> = vec![
        ("no CNI_COMMAND", vec![], good.to_string().into_bytes(), 4),
        (
            "ADD without CNI_NETNS",
            add_env(false),
            good.to_string().into_bytes(),
            4,
        ),
        (
            "undecodable JSON",
            add_env(true),
            b"{\"cniVersion\":".to_vec(),
            6,
        ),
        (
            "no node",
            add_env(true),
            with(&|c| drop(c.as_object_mut().map(|o| o.remove("node")))),
            7,
        ),
        (
            "an MTU of 20",
            add_env(true),
            with(&|c| c["mtu"] = json!(20)),
            7,
        ),
        (
            "an unsupported version",
            add_env(true),
            with(&|c| c["cniVersion"] = json!("0.1.0")),
            1,
        ),
        (
            "a node without a datapath",
            add_env(true),
            with(&|c| c["node"] = json!("no-such-node")),
            11,
        ),
    ];
    for (what, env, stdin, expected) in cases {
        let outcome = runtime.exec("ferrite-cni", &env, &stdin)?;
        assert_eq!(outcome.code(), Some(expected), "{what}: {}", outcome.output);
        assert!(
            outcome.output["msg"].is_string(),
            "{what}: {}",
            outcome.output
        );
    }
    assert_eq!(
        leftovers(node)?,
        nothing_left(),
        "no failed ADD left anything"
    );

    let version = runtime.exec("ferrite-cni", &[("CNI_COMMAND", "VERSION".into())], b"{}")?;
    assert_eq!(version.output["cniVersion"], "1.1.0");
    assert!(version.output["supportedVersions"]
        .as_array()
        .context("versions")?
        .contains(&json!("0.4.0")));

    let status = |config: &Value| {
        let mut config = config.clone();
        config["cniVersion"] = json!("1.1.0");
        runtime.exec(
            "ferrite-cni",
            &[("CNI_COMMAND", "STATUS".into())],
            config.to_string().as_bytes(),
        )
    };
    assert!(status(&good)?.success, "STATUS with the datapath pinned");
    let mut elsewhere = good.clone();
    elsewhere["node"] = json!("no-such-node");
    assert_eq!(status(&elsewhere)?.code(), Some(50));
    Ok(())
}

#[test]
fn gc_releases_attachments_the_runtime_no_longer_knows() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let (mut kept, mut stale) = (Sandbox::new("kept")?, Sandbox::new("stale")?);
    runtime.add(&mut kept)?;
    runtime.add(&mut stale)?;
    let outcome = runtime.gc(&[&kept])?;
    assert!(outcome.success, "{}", outcome.output);
    let left = leftovers(node)?;
    assert_eq!(left.addresses, vec![kept.pod.ip.to_string()]);
    assert_eq!(left.veths, vec![kept.pod.host_interface.clone()]);
    assert_eq!(left.endpoints, 1);
    assert!(runtime.check(&kept)?.success, "the listed pod is untouched");
    runtime.del(&kept)?;
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

#[test]
fn chained_portmap_and_tuning_accept_ferrites_result() -> Result<()> {
    let (cluster, mut runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let plugins = runtime.conflist["plugins"]
        .as_array_mut()
        .context("plugins")?;
    plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}));
    plugins.push(json!({"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}}));
    let port_mappings = json!({"portMappings": [
        {"hostPort": 30080, "containerPort": TCP_TARGET, "protocol": "tcp"}
    ]});
    let mut pod = Sandbox::new("mapped")?;
    runtime.add_with(&mut pod, &port_mappings)?;

    // tuning ran in the pod's netns on top of Ferrite's interface.
    let somaxconn = pod
        .pod
        .netns
        .run(|| std::fs::read_to_string("/proc/sys/net/core/somaxconn"))??;
    assert_eq!(somaxconn.trim(), "512");
    // portmap's DNAT took the pod address from Ferrite's result: the world reaches
    // the pod on the node's host port.
    let _server = pod.pod.serve(TCP_TARGET)?;
    let node_ip = node.ip.context("node is plugged")?;
    let reply = cluster
        .world
        .tcp_request(SocketAddrV4::new(node_ip, 30080), "host port")?;
    let (name, peer) = parse_answer(&reply, "host port")?;
    assert_eq!(name, "mapped");
    // The world's address on the underlay (it is the nodes' gateway): not SNATed.
    assert_eq!(
        peer,
        WORLD_GATEWAY.to_string(),
        "no SNAT for outside clients"
    );

    // Ferrite's CHECK accepts the chain's final result. (portmap 1.1's own CHECK
    // fails for IPv4-only pods: containernetworking/plugins#819.)
    let check = Runtime::new(node, ferrite_conflist(node)).check(&pod)?;
    assert!(
        check.success,
        "CHECK with the chained result: {}",
        check.output
    );
    runtime.del_with(&pod, &port_mappings)?;
    assert_eq!(leftovers(node)?, nothing_left());
    let nat = node.netns.run(|| sh("iptables-save", &["-t", "nat"]))??;
    assert!(
        !nat.contains(&pod.pod.ip.to_string()),
        "portmap removed its rules:\n{nat}"
    );
    Ok(())
}

/// Pins and state files are root's alone (0600 files in 0700
/// directories): they name pods and addresses, and a pin grants map access.
#[test]
fn pins_and_state_files_are_private_to_root() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let mut pod = Sandbox::new("private")?;
    runtime.add(&mut pod)?;
    fn check(path: &std::path::Path, found: &mut usize) -> Result<()> {
        let meta = std::fs::symlink_metadata(path)?;
        let expected = if meta.is_dir() { 0o700 } else { 0o600 };
        ensure!(
            meta.mode() & 0o777 == expected && meta.uid() == 0,
            "{} is {:o} owned by {}",
            path.display(),
            meta.mode() & 0o777,
            meta.uid()
        );
        *found += 1;
        if meta.is_dir() {
            for entry in std::fs::read_dir(path)? {
                check(&entry?.path(), found)?;
            }
        }
        Ok(())
    }
    let mut found = 0;
    for dir in [
        node.pin_dir(),
        files::run_dir(&node.name),
        node.dir.join("ipam").join(&node.name),
    ] {
        check(&dir, &mut found)?;
    }
    // Maps, programs, links, the pod CIDR, the address file, the lock...
    assert!(found > 15, "only {found} files checked");
    runtime.del(&pod)?;
    Ok(())
}
