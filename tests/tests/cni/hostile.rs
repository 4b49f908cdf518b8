//! Hostile and broken input to the CNI plugin, through the real binary: a
//! configuration, environment or node state the plugin did not make must not let it
//! hand out addresses that are not pods', wire the node itself, remove what it did
//! not create, or get stuck.
use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::Path,
};

use anyhow::{Context, Result};
use ferrite_agent::host;
use ferrite_common::{EndpointInfo, EndpointKey};
use ferrite_tests::{
    cluster::TCP_TARGET,
    cni::{ferrite_conflist, Outcome, Runtime, Sandbox, Stdin},
    lab::{answered_by, sh, wait_until, Node, Server, SETTLE},
};
use serde_json::{json, Value};

use super::{cni_cluster, leftovers, nothing_left, Leftovers};

/// Run `command` for `sandbox` with the runtime's configuration as the plugin gets it.
fn exec(runtime: &Runtime, command: &str, sandbox: &Sandbox) -> Result<Outcome> {
    exec_with(runtime, &Runtime::env(command, sandbox), &Value::Null)
}

/// Run the plugin with `env`, its configuration changed by `changes` (an object of
/// fields to set; Null: none).
fn exec_with(runtime: &Runtime, env: &[(&str, String)], changes: &Value) -> Result<Outcome> {
    let mut config = runtime.plugin_config(0, None, &Value::Null);
    if let Some(changes) = changes.as_object() {
        for (key, value) in changes {
            config[key] = value.clone();
        }
    }
    runtime.exec("ferrite-cni", env, config.to_string().as_bytes())
}

fn msg(outcome: &Outcome) -> String {
    format!("{} {}", outcome.output["msg"], outcome.output["details"])
}

/// A runtime whose conflist sets `field` of Ferrite's entry.
fn runtime_with(node: &Node, field: &str, value: Value) -> Runtime {
    let mut conflist = ferrite_conflist(node);
    conflist["plugins"][0][field] = value;
    Runtime::new(node, conflist)
}

#[test]
fn pod_cidrs_that_are_not_pods_to_have_are_refused() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let mut pod = Sandbox::new("cidr")?;
    for (cidr, says) in [
        ("127.0.0.0/24", "loopback"),
        ("169.254.1.0/24", "link-local"),
        ("0.0.0.0/16", "0.0.0.0/8"),
        ("224.0.0.0/24", "multicast"),
        ("10.244.0.0/31", "holds no pod"),
        ("10.244.0.2/32", "holds no pod"),
        ("10.0.0.0/8", "shorter"),
        ("0.0.0.0/0", "shorter"),
    ] {
        let outcome = exec_with(
            &runtime,
            &Runtime::env("ADD", &pod),
            &json!({"podCIDR": cidr}),
        )?;
        assert_eq!(outcome.code(), Some(7), "{cidr}: {}", outcome.output);
        assert!(msg(&outcome).contains(says), "{cidr}: {}", outcome.output);
    }
    assert_eq!(leftovers(node)?, nothing_left());

    // The narrowest a node may have: a /30 holds one pod.
    let narrow = runtime_with(node, "podCIDR", json!("10.244.0.0/30"));
    narrow.add(&mut pod)?;
    assert_eq!(pod.pod.ip, Ipv4Addr::new(10, 244, 0, 2));
    let second = Sandbox::new("cidr2")?;
    assert_eq!(exec(&narrow, "ADD", &second)?.code(), Some(101));
    narrow.del(&pod)?;
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

#[test]
fn del_cleans_up_and_succeeds_when_the_netns_was_unmounted_to_an_empty_file() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let mut pod = Sandbox::new("unmounted")?;
    runtime.add(&mut pod)?;
    let path = pod.netns_path();
    sh("umount", &[&path.display().to_string()])?;
    let meta = fs::metadata(&path)?;
    assert!(meta.is_file() && meta.len() == 0, "{meta:?}");

    runtime.del(&pod)?;
    assert_eq!(leftovers(node)?, nothing_left());
    runtime.del(&pod)?;
    // ADD into it is refused, with the spec's code for a bad environment.
    let outcome = exec(&runtime, "ADD", &pod)?;
    assert_eq!(outcome.code(), Some(4), "{}", outcome.output);
    assert!(msg(&outcome).contains("not a network namespace"));
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

#[test]
fn the_nodes_own_namespace_is_refused_and_del_removes_only_what_add_made() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let node_netns = node.netns.path().display().to_string();
    let env = |command: &str, container: &str, ifname: &str| {
        vec![
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", container.to_string()),
            ("CNI_NETNS", node_netns.clone()),
            ("CNI_IFNAME", ifname.to_string()),
        ]
    };
    let outcome = exec_with(&runtime, &env("ADD", "ctr-node", "eth0"), &Value::Null)?;
    assert_eq!(outcome.code(), Some(4), "{}", outcome.output);
    assert!(msg(&outcome).contains("node's own network namespace"));
    let routes = sh("ip", &["-n", &node.netns.name, "-4", "route", "show"])?;
    assert!(!routes.contains("169.254.1.1"), "{routes}");
    assert_eq!(leftovers(node)?, nothing_left());
    let check = exec_with(&runtime, &env("CHECK", "ctr-node", "eth0"), &Value::Null)?;
    assert_eq!(check.code(), Some(4), "{}", check.output);

    // DEL of containers never added: a node interface and a pod's own eth0 stay.
    sh(
        "ip",
        &[
            "-n",
            &node.netns.name,
            "link",
            "add",
            "keep0",
            "type",
            "veth",
            "peer",
            "name",
            "keep1",
        ],
    )?;
    let outcome = exec_with(&runtime, &env("DEL", "ctr-never", "keep0"), &Value::Null)?;
    assert!(outcome.success, "{}", outcome.output);
    assert!(node.netns.run(|| host::interfaces::link_exists("keep0"))?);
    let foreign = Sandbox::new("foreign")?;
    sh(
        "ip",
        &[
            "-n",
            &foreign.pod.netns.name,
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
    let outcome = exec(&runtime, "DEL", &foreign)?;
    assert!(outcome.success, "{}", outcome.output);
    assert!(foreign
        .pod
        .netns
        .run(|| host::interfaces::link_exists("eth0"))?);
    Ok(())
}

#[test]
fn unreadable_allocation_files_are_skipped_and_their_addresses_stay_taken() -> Result<()> {
    let (cluster, _) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let store = node.dir.join("ipam").join(&node.name);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&store)?;
    fs::write(store.join("10.244.0.2"), b"{not json")?;
    fs::create_dir(store.join("10.244.0.3"))?;
    std::os::unix::fs::symlink("/etc/hostname", store.join("10.244.0.4"))?;
    // .2 to .6 are usable: the three bad files hold theirs.
    let runtime = runtime_with(node, "podCIDR", json!("10.244.0.0/29"));
    let (mut a, mut b) = (Sandbox::new("bad-a")?, Sandbox::new("bad-b")?);
    runtime.add(&mut a)?;
    runtime.add(&mut b)?;
    assert_eq!(
        (a.pod.ip, b.pod.ip),
        (Ipv4Addr::new(10, 244, 0, 5), Ipv4Addr::new(10, 244, 0, 6))
    );
    runtime.del(&a)?;
    assert!(runtime.check(&b)?.success, "CHECK of another pod");
    runtime.del(&b)?;
    let left = leftovers(node)?;
    assert_eq!(left.addresses, ["10.244.0.2", "10.244.0.3", "10.244.0.4"]);
    assert_eq!(
        (left.veths.len(), left.endpoints, left.link_pins.len()),
        (0, 0, 0)
    );
    Ok(())
}

#[test]
fn an_add_after_a_lost_del_reclaims_its_attachment_once_the_netns_is_gone() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let mut first = Sandbox::new("lost")?;
    runtime.add(&mut first)?;
    let mut second = Sandbox::new("lost")?;
    second.container_id = first.container_id.clone();
    // While the first namespace lives, the attachment is live.
    assert_eq!(exec(&runtime, "ADD", &second)?.code(), Some(103));
    // Its namespace goes without a DEL.
    sh("ip", &["netns", "del", &first.pod.netns.name])?;
    runtime.add(&mut second)?;
    assert_eq!(leftovers(node)?.addresses, [second.pod.ip.to_string()]);
    assert_eq!(leftovers(node)?.endpoints, 1);
    assert!(runtime.check(&second)?.success);
    // Now the attachment is live again.
    assert_eq!(exec(&runtime, "ADD", &second)?.code(), Some(103));
    runtime.del(&second)?;
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

/// Wait until the kernel has torn down a pod's veth pair (a namespace goes
/// asynchronously once nothing holds it).
fn wait_for_veth_gone(node: &Node, sandbox: &Sandbox) -> Result<()> {
    let host = sandbox.pod.host_interface.clone();
    wait_until(&format!("{host} is gone"), SETTLE, || {
        node.netns
            .run(|| host::interfaces::link_exists(&host))
            .is_ok_and(|exists| !exists)
    })
}

/// The IPAM file holding `sandbox`'s address.
fn allocation_file(node: &Node, sandbox: &Sandbox) -> std::path::PathBuf {
    node.dir
        .join("ipam")
        .join(&node.name)
        .join(sandbox.pod.ip.to_string())
}

#[test]
fn a_pod_gone_without_a_del_does_not_refuse_the_next_pod_its_namespace_inode_went_to() -> Result<()>
{
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let mut dead = Sandbox::new("inode-dead")?;
    runtime.add(&mut dead)?;
    // Its namespace goes without a DEL.
    sh("ip", &["netns", "del", &dead.pod.netns.name])?;
    wait_for_veth_gone(node, &dead)?;
    // The kernel hands the freed inode number to the next namespace made (unless
    // another namespace of the machine comes first): done here by hand, the dead
    // pod's record names the new namespace's device and inode.
    let mut next = Sandbox::new("inode-next")?;
    let id = host::netns::netns_id(&next.netns_path())?.expect("a namespace");
    let file = allocation_file(node, &dead);
    let mut record: Value = serde_json::from_slice(&fs::read(&file)?)?;
    record["netns"]["id"] = json!({"dev": id.dev, "ino": id.ino});
    fs::write(&file, record.to_string())?;

    // Not a second interface of one pod: the dead pod's veth pair is gone.
    runtime.add(&mut next)?;
    assert!(runtime.check(&next)?.success);
    assert_ne!(next.pod.ip, dead.pod.ip, "the range is not full");
    // The runtime's late DEL of the dead pod removes its own and nothing else.
    runtime.del(&dead)?;
    assert!(!file.exists());
    let check = runtime.check(&next)?;
    assert!(check.success, "{}", check.output);
    runtime.del(&next)?;
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

/// What an ADD or DEL may change on a node: the IPAM store's files (the lock aside)
/// with their contents, the endpoint entries, and veths, addresses and link pins.
type NodeState = (
    BTreeMap<String, Vec<u8>>,
    BTreeMap<EndpointKey, EndpointInfo>,
    Leftovers,
);

fn node_state(node: &Node) -> Result<NodeState> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(node.dir.join("ipam").join(&node.name))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "lock" {
            files.insert(name, fs::read(entry.path())?);
        }
    }
    Ok((files, node.maps()?.endpoint_entries()?, leftovers(node)?))
}

/// The node's /32 route to `ip`, as `ip route` prints it (empty: none).
fn pod_route(node: &Node, ip: Ipv4Addr) -> Result<String> {
    let route = format!("{ip}/32");
    sh(
        "ip",
        &[
            "-n",
            &node.netns.name,
            "-4",
            "route",
            "show",
            "exact",
            &route,
        ],
    )
}

/// ADD through the real binary, keeping its stderr (what the runtime logs); the
/// sandbox gets the result as `Runtime::add` gives it.
fn add_logged(runtime: &Runtime, sandbox: &mut Sandbox) -> Result<Outcome> {
    let outcome = exec(runtime, "ADD", sandbox)?;
    if outcome.success {
        let address = outcome.output["ips"][0]["address"]
            .as_str()
            .context("no address")?;
        sandbox.pod.ip = address.split('/').next().unwrap_or_default().parse()?;
        sandbox.result = Some(outcome.output.clone());
    }
    Ok(outcome)
}

#[test]
fn a_full_range_reclaims_pods_gone_without_a_del_and_never_one_whose_namespace_lives() -> Result<()>
{
    let (mut cluster, _) = cni_cluster()?;
    // The agent drops endpoint entries of vanished interfaces when it resyncs:
    // without it, what goes is the plugin's doing (pods work from the pins alone).
    cluster.nodes[0].kill_agent()?;
    let node = &cluster.nodes[0];
    // .2 to .6: five pods fill it.
    let runtime = runtime_with(node, "podCIDR", json!("10.244.0.0/29"));
    let mut pods = (0..5)
        .map(|i| Sandbox::new(&format!("full-{i}")))
        .collect::<Result<Vec<_>>>()?;
    for pod in &mut pods {
        runtime.add(pod)?;
    }
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.pod.ip).collect();
    assert_eq!(
        ips,
        (2..=6)
            .map(|i| Ipv4Addr::new(10, 244, 0, i))
            .collect::<Vec<_>>()
    );
    let mut late = Sandbox::new("full-late")?;
    let refused = |says: &str| -> Result<()> {
        let before = node_state(node)?;
        let outcome = exec(&runtime, "ADD", &late)?;
        assert_eq!(outcome.code(), Some(101), "{}", outcome.output);
        assert!(msg(&outcome).contains(says), "{}", outcome.output);
        assert!(!outcome.stderr.contains("reclaimed"), "{}", outcome.stderr);
        assert_eq!(node_state(node)?, before, "a refused ADD changed the node");
        Ok(())
    };

    // Every holder alive: 101, the store, entries and wiring as they were.
    refused("no attachment holding it is gone: 5 whose namespace exists")?;

    // Pod 1's namespace unmounted from its path but held (a process in it), and
    // another namespace mounted at the path: its veth pair lives, so does it.
    let held = fs::File::open(pods[1].netns_path())?;
    sh("ip", &["netns", "del", &pods[1].pod.netns.name])?;
    sh("ip", &["netns", "add", &pods[1].pod.netns.name])?;
    refused("1 whose host veth exists, 4 whose namespace exists")?;

    // Pods 1 and 3 go without a DEL, as with a crashed runtime.
    drop(held);
    sh("ip", &["netns", "del", &pods[3].pod.netns.name])?;
    wait_for_veth_gone(node, &pods[1])?;
    wait_for_veth_gone(node, &pods[3])?;
    let dead_entries = node.maps()?.endpoint_entries()?;
    for dead in [&pods[1], &pods[3]] {
        let key = EndpointKey {
            address: dead.pod.ip.octets(),
        };
        assert!(
            dead_entries.contains_key(&key),
            "{} kept its entry",
            dead.pod.ip
        );
    }

    // Both are reclaimed, each named in the log, and the ADD gets the first.
    let outcome = add_logged(&runtime, &mut late)?;
    assert!(outcome.success, "{} {}", outcome.output, outcome.stderr);
    assert_eq!(late.pod.ip, pods[1].pod.ip);
    for (dead, why) in [
        (&pods[1], "names another network namespace"),
        (&pods[3], "is gone (no namespace at the path)"),
    ] {
        let line = outcome
            .stderr
            .lines()
            .find(|l| {
                l.contains(&format!(
                    "reclaimed {} of {}/eth0",
                    dead.pod.ip, dead.container_id
                ))
            })
            .with_context(|| format!("{} not reclaimed: {}", dead.pod.ip, outcome.stderr))?;
        assert!(
            line.contains(why) && line.contains(&dead.pod.host_interface),
            "{line}"
        );
    }
    let left = leftovers(node)?;
    let mut live = [&pods[0], &pods[2], &pods[4], &late];
    let mut addresses: Vec<String> = live.iter().map(|p| p.pod.ip.to_string()).collect();
    addresses.sort();
    assert_eq!(left.addresses, addresses, "pod 3's file went too");
    live.sort_by_key(|p| p.pod.host_interface.clone());
    let veths: Vec<String> = live.iter().map(|p| p.pod.host_interface.clone()).collect();
    assert_eq!(left.veths, veths);
    assert_eq!(
        left.endpoints, 4,
        "pod 3's entry went, pod 1's is the new pod's"
    );
    assert_eq!(
        left.link_pins.len(),
        8,
        "two per live veth: {:?}",
        left.link_pins
    );
    let late_ifindex = node
        .netns
        .run(|| host::interfaces::ifindex(&late.pod.host_interface))?
        .context("the new pod's veth")?;
    let entry = node.maps()?.endpoint(&EndpointKey {
        address: late.pod.ip.octets(),
    })?;
    assert_eq!(entry.map(|e| e.ifindex), Some(late_ifindex));
    assert!(pod_route(node, late.pod.ip)?.contains(&late.pod.host_interface));
    assert_eq!(pod_route(node, pods[3].pod.ip)?.trim(), "");
    for pod in [&late, &pods[0]] {
        let check = runtime.check(pod)?;
        assert!(check.success, "{}: {}", pod.pod.name, check.output);
    }

    // The pods talk: to the new one at the reclaimed address, and from it.
    let _late_server = late.pod.serve(TCP_TARGET)?;
    let to_late = SocketAddrV4::new(late.pod.ip, TCP_TARGET);
    assert_eq!(
        answered_by(&pods[0].pod.tcp_request(to_late, "a")?, "a")?,
        "full-late"
    );
    let _server = pods[2].pod.serve(TCP_TARGET)?;
    let to_2 = SocketAddrV4::new(pods[2].pod.ip, TCP_TARGET);
    assert_eq!(
        answered_by(&late.pod.tcp_request(to_2, "b")?, "b")?,
        "full-2"
    );

    // The runtime's late DELs of the dead pods remove nothing (pod 1's path
    // holds another namespace now); pod 3's address is free without a reclaim.
    let before = node_state(node)?;
    runtime.del(&pods[1])?;
    runtime.del(&pods[3])?;
    assert_eq!(node_state(node)?, before);
    assert!(runtime.check(&late)?.success);
    let mut again = Sandbox::new("full-again")?;
    let outcome = add_logged(&runtime, &mut again)?;
    assert!(outcome.success, "{}", outcome.output);
    assert_eq!(again.pod.ip, pods[3].pod.ip);
    assert!(!outcome.stderr.contains("reclaimed"), "{}", outcome.stderr);

    for pod in [&pods[0], &pods[2], &pods[4], &late, &again] {
        runtime.del(pod)?;
    }
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

#[test]
fn a_second_interface_for_a_pod_is_refused_and_the_first_keeps_working() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let (mut client, mut web) = (Sandbox::new("client")?, Sandbox::new("web")?);
    runtime.add(&mut client)?;
    runtime.add(&mut web)?;
    let mut net1 = Runtime::env("ADD", &web);
    net1.retain(|(k, _)| *k != "CNI_IFNAME");
    net1.push(("CNI_IFNAME", "net1".into()));
    let outcome = exec_with(&runtime, &net1, &Value::Null)?;
    assert_eq!(outcome.code(), Some(4), "{}", outcome.output);
    assert!(
        msg(&outcome).contains("one interface per pod"),
        "{}",
        outcome.output
    );

    let check = runtime.check(&web)?;
    assert!(check.success, "the first attachment: {}", check.output);
    let _server = web.pod.serve(TCP_TARGET)?;
    let to_web = SocketAddrV4::new(web.pod.ip, TCP_TARGET);
    assert_eq!(
        answered_by(&client.pod.tcp_request(to_web, "hi")?, "hi")?,
        "web"
    );
    assert_eq!(leftovers(node)?.addresses.len(), 2);
    runtime.del(&client)?;
    runtime.del(&web)?;
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

type Breakage = fn(&Node, &Sandbox) -> Result<String>;

#[test]
fn check_names_each_part_of_the_wiring_that_broke() -> Result<()> {
    let (mut cluster, runtime) = cni_cluster()?;
    // The agent repairs the node's side on every resync: CHECK alone is tested.
    cluster.nodes[0].kill_agent()?;
    let node = &cluster.nodes[0];
    let cases: [(&str, &str, Breakage); 6] = [
        (
            "pod default route",
            "no default route via 169.254.1.1",
            |_, s| sh("ip", &["-n", &s.pod.netns.name, "route", "del", "default"]),
        ),
        (
            "pod gateway neighbour",
            "no permanent neighbour 169.254.1.1",
            |_, s| {
                let ns = &s.pod.netns.name;
                sh(
                    "ip",
                    &["-n", ns, "neigh", "del", "169.254.1.1", "dev", "eth0"],
                )
            },
        ),
        ("node route", "node has no route", |n, s| {
            let route = format!("{}/32", s.pod.ip);
            sh("ip", &["-n", &n.netns.name, "route", "del", &route])
        }),
        ("pod MTU", "eth0 has MTU 1400", |_, s| {
            let ns = &s.pod.netns.name;
            sh("ip", &["-n", ns, "link", "set", "eth0", "mtu", "1400"])
        }),
        ("host veth down", "is down", |n, s| {
            let host = &s.pod.host_interface;
            sh("ip", &["-n", &n.netns.name, "link", "set", host, "down"])
        }),
        (
            "node neighbour",
            "node has no permanent neighbour",
            |n, s| {
                let (ip, host) = (s.pod.ip.to_string(), &s.pod.host_interface);
                sh(
                    "ip",
                    &["-n", &n.netns.name, "neigh", "del", &ip, "dev", host],
                )
            },
        ),
    ];
    for (what, says, breakage) in cases {
        let mut pod = Sandbox::new("checked")?;
        runtime.add(&mut pod)?;
        assert!(runtime.check(&pod)?.success, "{what}: healthy first");
        breakage(node, &pod)?;
        let outcome = runtime.check(&pod)?;
        assert_eq!(outcome.code(), Some(102), "{what}: {}", outcome.output);
        assert!(msg(&outcome).contains(says), "{what}: {}", outcome.output);
        runtime.del(&pod)?;
    }

    // The result the runtime hands back must still list what ADD returned.
    let mut pod = Sandbox::new("listed")?;
    runtime.add(&mut pod)?;
    if let Some(result) = pod.result.as_mut() {
        result["routes"] = json!([]);
    }
    let outcome = runtime.check(&pod)?;
    assert_eq!(outcome.code(), Some(102), "{}", outcome.output);
    assert!(msg(&outcome).contains("prevResult has no default route"));
    runtime.del(&pod)?;
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

#[test]
fn the_agent_restores_a_flapped_host_veths_route_and_neighbour() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let mut pod = Sandbox::new("flapped")?;
    runtime.add(&mut pod)?;
    let _server = pod.pod.serve(TCP_TARGET)?;
    let to_pod = SocketAddrV4::new(pod.pod.ip, TCP_TARGET);
    let from_node =
        || -> Result<String> { answered_by(&node.netns.tcp_request(to_pod, "n")?, "n") };
    assert_eq!(from_node()?, "flapped");
    let metric = "ferrite_pod_wiring_repairs_total";
    let before = node.metric(metric)?;

    let host = &pod.pod.host_interface;
    sh("ip", &["-n", &node.netns.name, "link", "set", host, "down"])?;
    sh("ip", &["-n", &node.netns.name, "link", "set", host, "up"])?;
    wait_until("the agent repaired the pod's wiring", SETTLE, || {
        node.metric(metric).is_ok_and(|after| after > before)
    })?;
    let route = format!("{}/32", pod.pod.ip);
    let routes = sh(
        "ip",
        &[
            "-n",
            &node.netns.name,
            "-4",
            "route",
            "show",
            "exact",
            &route,
        ],
    )?;
    assert!(routes.contains(host.as_str()), "{routes}");
    let neighbours = sh(
        "ip",
        &[
            "-n",
            &node.netns.name,
            "neigh",
            "show",
            "nud",
            "permanent",
            "dev",
            host,
        ],
    )?;
    assert!(neighbours.contains(&pod.pod.ip.to_string()), "{neighbours}");
    assert_eq!(from_node()?, "flapped", "the node reaches the pod again");
    assert!(runtime.check(&pod)?.success);
    runtime.del(&pod)?;
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

#[test]
fn data_dirs_not_the_plugins_alone_are_refused_and_stores_cannot_take_each_others_pods(
) -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let data_dir = |name: &str| node.dir.join(name);
    let other = runtime_with(node, "dataDir", json!(data_dir("ipam-b")));
    let (mut a, mut b) = (Sandbox::new("store-a")?, Sandbox::new("store-b")?);
    runtime.add(&mut a)?;
    other.add(&mut b)?;
    assert_ne!(a.pod.ip, b.pod.ip, "two stores of one node, one address");
    other.del(&b)?;
    assert!(runtime.check(&a)?.success, "a DEL in the other store");

    // An allocation file naming another pod's address and veth.
    let intruder = Sandbox::new("intruder")?;
    let forged = json!({
        "containerID": intruder.container_id,
        "ifname": "eth0",
        "hostInterface": a.pod.host_interface,
    });
    let forged_path = data_dir("ipam-b")
        .join(&node.name)
        .join(a.pod.ip.to_string());
    fs::write(&forged_path, forged.to_string())?;
    other.del(&intruder)?;
    let check = runtime.check(&a)?;
    assert!(check.success, "a forged owner's DEL: {}", check.output);

    // The node's store a link to elsewhere, or another user's directory.
    let elsewhere = data_dir("elsewhere");
    fs::DirBuilder::new().mode(0o755).create(&elsewhere)?;
    let linked = data_dir("ipam-linked");
    fs::DirBuilder::new().mode(0o700).create(&linked)?;
    std::os::unix::fs::symlink(&elsewhere, linked.join(&node.name))?;
    let foreign = data_dir("ipam-foreign");
    fs::DirBuilder::new().mode(0o700).create(&foreign)?;
    fs::DirBuilder::new()
        .mode(0o755)
        .create(foreign.join(&node.name))?;
    nix::unistd::chown(&foreign.join(&node.name), Some(1234.into()), None)?;
    for (dir, untouched) in [(&linked, &elsewhere), (&foreign, &foreign.join(&node.name))] {
        for command in ["ADD", "DEL"] {
            let outcome = exec_with(
                &runtime,
                &Runtime::env(command, &a),
                &json!({"dataDir": dir}),
            )?;
            assert_eq!(outcome.code(), Some(7), "{command} {}", outcome.output);
        }
        let meta = fs::metadata(untouched)?;
        assert_eq!(meta.mode() & 0o777, 0o755, "{}", untouched.display());
        assert!(!untouched.join("lock").exists());
    }
    runtime.del(&a)?;
    assert_eq!(leftovers(node)?, nothing_left());
    assert!(
        !Path::new(&forged_path).exists(),
        "the forged file was released"
    );
    Ok(())
}

#[test]
fn a_container_id_longer_than_any_runtime_makes_is_refused_and_leaves_nothing() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let mut pod = Sandbox::new("long-id")?;
    // Its allocation file would be larger than the store reads back: DEL found
    // nothing and the address, veth and entry stayed.
    pod.container_id = "c".repeat(100_000);
    for command in ["ADD", "CHECK", "DEL"] {
        let outcome = exec(&runtime, command, &pod)?;
        assert_eq!(outcome.code(), Some(4), "{command}: {}", outcome.output);
        assert!(
            msg(&outcome).contains("at most 1024"),
            "{command}: {}",
            outcome.output
        );
        assert!(
            outcome.output.to_string().len() < 1000,
            "the id is cut short"
        );
    }
    assert_eq!(leftovers(node)?, nothing_left());
    // The longest id taken is wired, checked and removed.
    pod.container_id = "c".repeat(1024);
    runtime.add(&mut pod)?;
    assert!(runtime.check(&pod)?.success);
    runtime.del(&pod)?;
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

#[test]
fn stdin_that_never_ends_is_refused_after_a_mebibyte() -> Result<()> {
    let (cluster, mut runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    // A plugin that reads on past its cap fails at this limit (it took 7 GB in 6 s)
    // instead of taking the machine's memory.
    runtime.address_space = Some(1 << 30);
    let mut pod = Sandbox::new("zero")?;
    let endless = Stdin::File(fs::File::open("/dev/zero")?);
    let outcome = runtime.exec_from("ferrite-cni", &Runtime::env("ADD", &pod), endless)?;
    assert_eq!(outcome.code(), Some(7), "{}", outcome.output);
    assert!(
        msg(&outcome).contains("larger than 1048576 bytes"),
        "{}",
        outcome.output
    );
    // A configuration padded past the cap is refused too, before it is parsed.
    let mut padded = runtime.plugin_config(0, None, &Value::Null).to_string();
    padded.push_str(&" ".repeat(1 << 20));
    let outcome = runtime.exec("ferrite-cni", &Runtime::env("ADD", &pod), padded.as_bytes())?;
    assert_eq!(outcome.code(), Some(7), "{}", outcome.output);
    assert_eq!(leftovers(node)?, nothing_left());
    // Within the limit, pods are wired as ever.
    runtime.add(&mut pod)?;
    assert!(runtime.check(&pod)?.success);
    runtime.del(&pod)?;
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

#[test]
fn a_namespace_that_is_not_a_network_namespace_is_refused() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let pod = Sandbox::new("other-ns")?;
    // `self` is the plugin: namespaces of every other kind it is in.
    for kind in ["mnt", "uts", "ipc", "pid", "user", "cgroup"] {
        let mut env = Runtime::env("ADD", &pod);
        env.retain(|(k, _)| *k != "CNI_NETNS");
        env.push(("CNI_NETNS", format!("/proc/self/ns/{kind}")));
        for command in ["ADD", "CHECK"] {
            env[0].1 = command.into();
            let outcome = exec_with(&runtime, &env, &Value::Null)?;
            assert_eq!(
                outcome.code(),
                Some(4),
                "{kind} {command}: {}",
                outcome.output
            );
            assert!(
                msg(&outcome).contains("is not a network namespace"),
                "{kind} {command}: {}",
                outcome.output
            );
        }
    }
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

#[test]
fn a_relative_data_dir_is_refused() -> Result<()> {
    let (cluster, mut runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    // The runtime's working directory, where a relative path would have led.
    let cwd = node.dir.join("runtime-cwd");
    fs::create_dir(&cwd)?;
    runtime.cwd = Some(cwd.clone());
    let pod = Sandbox::new("relative")?;
    for command in ["ADD", "DEL", "CHECK"] {
        let outcome = exec_with(
            &runtime,
            &Runtime::env(command, &pod),
            &json!({"dataDir": "ipam-relative"}),
        )?;
        assert_eq!(outcome.code(), Some(7), "{command}: {}", outcome.output);
        assert!(
            msg(&outcome).contains("ipam-relative") && msg(&outcome).contains("not an absolute"),
            "{command}: {}",
            outcome.output
        );
    }
    assert!(!cwd.join("ipam-relative").exists());
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

#[test]
fn pod_cidrs_holding_a_node_address_are_refused_and_no_pod_gets_one() -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let node_ip = node.ip.context("plugged")?;
    let refused = |cidr: &str, says: &str| -> Result<()> {
        let pod = Sandbox::new("node-address")?;
        let outcome = exec_with(
            &runtime,
            &Runtime::env("ADD", &pod),
            &json!({"podCIDR": cidr}),
        )?;
        assert_eq!(outcome.code(), Some(7), "{cidr}: {}", outcome.output);
        assert!(msg(&outcome).contains(says), "{cidr}: {}", outcome.output);
        Ok(())
    };
    // The agent accepted 10.244.0.0/24 from the node's Node object: a configured
    // range outside it (the node network, another node's pod CIDR) is no pod's.
    refused(
        "198.51.100.0/24",
        "outside this node's pod CIDR 10.244.0.0/24",
    )?;
    refused(
        "10.244.1.0/24",
        "outside this node's pod CIDR 10.244.0.0/24",
    )?;
    assert_eq!(leftovers(node)?, nothing_left());

    // An address of the node's own in the range (here on a veth of the node) is
    // skipped: a /29 holds four pods, none at .2.
    let ns = &node.netns.name;
    sh(
        "ip",
        &[
            "-n", ns, "link", "add", "cnitest0", "type", "veth", "peer", "name", "cnitest1",
        ],
    )?;
    sh(
        "ip",
        &["-n", ns, "addr", "add", "10.244.0.2/32", "dev", "cnitest0"],
    )?;
    let narrow = runtime_with(node, "podCIDR", json!("10.244.0.0/29"));
    let mut pods = (0..4)
        .map(|i| Sandbox::new(&format!("beside-{i}")))
        .collect::<Result<Vec<_>>>()?;
    for pod in &mut pods {
        narrow.add(pod)?;
    }
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.pod.ip).collect();
    assert_eq!(
        ips,
        (3..=6)
            .map(|i| Ipv4Addr::new(10, 244, 0, i))
            .collect::<Vec<_>>()
    );
    let fifth = Sandbox::new("beside-full")?;
    assert_eq!(exec(&narrow, "ADD", &fifth)?.code(), Some(101));
    for pod in &pods {
        narrow.del(pod)?;
    }
    assert_eq!(leftovers(node)?, nothing_left());

    // Before the agent knows this node's pod CIDR (its Node object has none), the
    // nodes it knows still count: another node's address or pod CIDR, or this
    // node's own address, in a configured range refuses it.
    let far_ip = Ipv4Addr::new(10, 250, 0, 9);
    cluster.write_config(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus: {{addresses: [{{type: InternalIP, address: {node_ip}}}]}}\n---\n{}",
        node.name,
        ferrite_tests::lab::node_yaml("far", far_ip, "10.244.1.0/24")
    ))?;
    node.wait_for_maps("the far node's routes and none of this node's CIDR", |m| {
        m.routes.keys().any(|k| k.network == far_ip.octets())
            && !m
                .routes
                .values()
                .any(|r| r.flags == ferrite_common::ROUTE_LOCAL)
    })?;
    refused("10.250.0.0/24", "holds another node's address 10.250.0.9")?;
    refused(
        "198.51.100.0/24",
        &format!("holds this node's address {node_ip}"),
    )?;
    refused(
        "10.244.1.0/25",
        "overlaps 10.244.1.0/24, the pod CIDR of the node at 10.250.0.9",
    )?;
    assert_eq!(leftovers(node)?, nothing_left());
    // A range clear of every node is served.
    let mut clear = Sandbox::new("clear")?;
    narrow.add(&mut clear)?;
    assert_eq!(clear.pod.ip, Ipv4Addr::new(10, 244, 0, 3));
    narrow.del(&clear)?;
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}

/// The YAML of Pod `default/name` on `node` claiming `ip`.
fn pod_object(node: &Node, name: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec: {{nodeName: {}, containers: [{{name: app, image: none}}]}}\nstatus: {{phase: Running, podIP: {ip}}}\n",
        node.name
    )
}

#[test]
fn pod_objects_claiming_a_node_or_a_live_pods_address_get_no_entry_and_the_agents_go_with_them(
) -> Result<()> {
    let (cluster, runtime) = cni_cluster()?;
    let node = &cluster.nodes[0];
    let node_ip = node.ip.context("plugged")?;
    let (mut client, mut victim, mut thief) = (
        Sandbox::new("client")?,
        Sandbox::new("victim")?,
        Sandbox::new("thief")?,
    );
    for pod in [&mut client, &mut victim, &mut thief] {
        runtime.add(pod)?;
    }
    // The thief's pod answers on the addresses it claims, if it gets their traffic.
    for claimed in [victim.pod.ip, node_ip] {
        let address = format!("{claimed}/32");
        sh(
            "ip",
            &[
                "-n",
                &thief.pod.netns.name,
                "addr",
                "add",
                &address,
                "dev",
                "eth0",
            ],
        )?;
    }
    let _servers = [
        victim.pod.serve(TCP_TARGET)?,
        thief.pod.serve(TCP_TARGET)?,
        Server::start(&node.netns, "node", SocketAddrV4::new(node_ip, TCP_TARGET))?,
    ];
    let ask = |to: Ipv4Addr, request: &str| -> Result<String> {
        let reply = client
            .pod
            .tcp_request(SocketAddrV4::new(to, TCP_TARGET), request)?;
        answered_by(&reply, request)
    };
    let entry_of = |ip: Ipv4Addr| -> Result<Option<EndpointInfo>> {
        node.maps()?.endpoint(&EndpointKey {
            address: ip.octets(),
        })
    };
    let ifindex_of = |sandbox: &Sandbox| -> Result<u32> {
        let host = sandbox.pod.host_interface.clone();
        node.netns
            .run(move || host::interfaces::ifindex(&host))?
            .context("host veth")
    };
    // Write the config with `pods`, and wait for a full sync that began after the
    // agent read it.
    let config = |pods: &[String]| -> Result<()> {
        let reads = node.metric("ferrite_config_reads_total")?;
        let mut docs = vec![cluster.nodes_and_pods_yaml()];
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
    };
    let logged = |what: &str| -> Result<()> {
        wait_until(&format!("the agent to log {what:?}"), SETTLE, || {
            node.agent
                .as_ref()
                .is_some_and(|a| a.log_text().contains(what))
        })
    };
    assert_eq!(ask(victim.pod.ip, "first")?, "victim");

    // The thief's Pod object claims the victim's address, which the CNI wired for a
    // pod the agent has not heard of: refused, the victim keeps its traffic.
    config(&[pod_object(node, "thief", victim.pod.ip)])?;
    assert_eq!(ask(victim.pod.ip, "held")?, "victim");
    assert_eq!(
        entry_of(victim.pod.ip)?.map(|e| e.ifindex),
        Some(ifindex_of(&victim)?)
    );
    logged(&format!(
        "Pod default/thief: pod IP {} is the address of the live pod behind {}",
        victim.pod.ip, victim.pod.host_interface
    ))?;

    // The victim's own object listed after the thief's: the victim has it.
    config(&[
        pod_object(node, "thief", victim.pod.ip),
        pod_object(node, "victim", victim.pod.ip),
    ])?;
    assert_eq!(ask(victim.pod.ip, "listed")?, "victim");
    let entry = entry_of(victim.pod.ip)?.context("the victim's entry")?;
    assert_eq!(entry.ifindex, ifindex_of(&victim)?);
    logged(&format!(
        "Pod default/thief: pod IP {} already used by default/victim",
        victim.pod.ip
    ))?;

    // The thief claims the node's address: no entry, the node keeps its traffic.
    config(&[
        pod_object(node, "thief", node_ip),
        pod_object(node, "victim", victim.pod.ip),
    ])?;
    assert_eq!(ask(node_ip, "to the node")?, "node");
    assert_eq!(entry_of(node_ip)?, None);
    assert_eq!(ask(victim.pod.ip, "still")?, "victim");
    logged(&format!(
        "Pod default/thief: status.podIP {node_ip} is node {}'s address",
        node.name
    ))?;

    // A free address of the pod CIDR it gets, as the agent's own entry...
    let free = Ipv4Addr::new(10, 244, 0, 200);
    config(&[
        pod_object(node, "thief", free),
        pod_object(node, "victim", victim.pod.ip),
    ])?;
    let thief_ifindex = ifindex_of(&thief)?;
    node.wait_for_maps("the thief's claim written", |m| {
        m.endpoints
            .get(&EndpointKey {
                address: free.octets(),
            })
            .is_some_and(|e| e.ifindex == thief_ifindex)
    })?;
    // ...which goes with its object, while the CNI's entry of the thief's own
    // address stays (its veth lives) and the victim keeps the agent's.
    config(&[pod_object(node, "victim", victim.pod.ip)])?;
    assert_eq!(entry_of(free)?, None, "the thief's claim stayed");
    assert_eq!(
        entry_of(thief.pod.ip)?.map(|e| e.ifindex),
        Some(thief_ifindex)
    );
    assert_eq!(ask(thief.pod.ip, "own")?, "thief");
    assert_eq!(ask(victim.pod.ip, "last")?, "victim");

    for pod in [&client, &victim, &thief] {
        runtime.del(pod)?;
    }
    assert_eq!(leftovers(node)?, nothing_left());
    Ok(())
}
