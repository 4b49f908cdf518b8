//! User stories for broken and hostile input: what an operator's mistake or an
//! attacker's file can and cannot do to a node. Needs root.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context, Result};
use ferrite_tests::{
    cluster::{self, CLIENTS, TCP_FRONTEND, TCP_TARGET},
    lab::{
        self, answered_by, exchange, node_yaml, pod_ip, wait_until, Cluster, Server, SETTLE,
        WORLD_IP,
    },
};

/// A config file that does not parse - a syntax error in the first or a later
/// document, an empty file caught mid-write, a file with no object Ferrite reads, one
/// nested 200,000 deep - or that is no file to read - a link to /dev/zero, a FIFO,
/// one past the size cap - is refused whole: the node keeps serving what was applied
/// last (full resyncs go on with it), `/readyz` says why (with the line),
/// `ferrite_config_rejections` counts it; the fixed file applies. The file is
/// watched: while it does not change it is not read again.
#[test]
fn a_config_that_does_not_parse_changes_nothing_and_readyz_says_why() -> Result<()> {
    let (mut node, _servers) = cluster::example_node("badcfg")?;
    let good = cluster::example_for(&node.name);
    node.write_config(&good)?;
    node.start_agent()?;
    node.wait_for_sync(2, 5)?;
    wait_until("/readyz 200", SETTLE, || {
        node.agent_http("/readyz")
            .is_ok_and(|(status, _)| status == 200)
    })?;
    let synced = node.maps()?.contents()?;
    let client = node.pod(CLIENTS[0].0);
    let mut live = client.tcp_connect(TCP_FRONTEND)?;
    let backend = answered_by(&exchange(&mut live, "before")?, "before")?;

    // The file is watched: full resyncs (every 2 s) go on without reading it.
    let (reads, syncs) = (
        node.metric("ferrite_config_reads_total")?,
        node.metric("ferrite_syncs_total")?,
    );
    wait_until("two more full resyncs", SETTLE, || {
        node.metric("ferrite_syncs_total")
            .is_ok_and(|s| s >= syncs + 2.0)
    })?;
    assert_eq!(
        node.metric("ferrite_config_reads_total")?,
        reads,
        "read while unchanged"
    );

    let broken = "apiVersion: v1\nkind: Service\nmetadata: {name: [\n";
    let cases = [
        (
            "a syntax error in document 1",
            format!("{broken}---\n{good}"),
            "line 4",
        ),
        (
            "a syntax error in document 3",
            format!("{good}---\n{broken}"),
            "line",
        ),
        ("an empty file", String::new(), "no object"),
        (
            "a word",
            "hello\n".into(),
            "no Service, EndpointSlice, Pod or Node",
        ),
        (
            "unsupported kinds only",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n".into(),
            "no Service, EndpointSlice, Pod or Node",
        ),
        (
            "a file nested 200,000 deep",
            format!("{}{}\n", "[".repeat(200_000), "]".repeat(200_000)),
            "nested deeper",
        ),
        ("a link to /dev/zero", String::new(), "not a regular file"),
        ("a FIFO", String::new(), "not a regular file"),
        ("a file past the size cap", String::new(), "larger than"),
    ];
    let path = node.config_path();
    for (index, (what, content, says)) in cases.iter().enumerate() {
        let _ = std::fs::remove_file(&path);
        match *what {
            "a link to /dev/zero" => std::os::unix::fs::symlink("/dev/zero", &path)?,
            "a FIFO" => nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRUSR)?,
            // Sparse: its size is past the cap without writing it.
            "a file past the size cap" => std::fs::File::create(&path)?
                .set_len(ferrite_agent::source::MAX_CONFIG_BYTES + 1)?,
            // Written in place, as a careless writer (or one caught mid-write) leaves it.
            _ => std::fs::write(&path, content)?,
        }
        wait_until(&format!("{what} to be refused"), SETTLE, || {
            node.metric("ferrite_config_rejections_total")
                .is_ok_and(|n| n >= (index + 1) as f64)
        })?;
        let (status, body) = node.agent_http("/readyz")?;
        assert_eq!(status, 503, "{what}: {body}");
        assert!(
            body.contains("config rejected") && body.contains(says),
            "{what}: {body}"
        );
        // A full resync with the last applied objects: nothing removed.
        let syncs = node.metric("ferrite_syncs_total")?;
        wait_until("a full resync", SETTLE, || {
            node.metric("ferrite_syncs_total")
                .is_ok_and(|s| s >= syncs + 1.0)
        })?;
        assert_eq!(node.maps()?.contents()?, synced, "{what} changed the maps");
        let request = format!("during {what}");
        assert_eq!(
            answered_by(&exchange(&mut live, &request)?, &request)?,
            backend
        );
        answered_by(&client.tcp_request(TCP_FRONTEND, &request)?, &request)?;
    }
    node.write_config(&good)?;
    wait_until("/readyz 200 again", SETTLE, || {
        node.agent_http("/readyz")
            .is_ok_and(|(status, _)| status == 200)
    })?;
    assert_eq!(node.maps()?.contents()?, synced);
    Ok(())
}

/// A ClusterIP-style Service `name` at `cluster_ip` (TCP `port`, named http, -> the
/// backend's TCP_TARGET), with `spec_extra` lines (indented two spaces) and
/// `port_extra` fields on its port, and an EndpointSlice with `backends` ready.
fn service(
    name: &str,
    cluster_ip: &str,
    port: u16,
    spec_extra: &str,
    port_extra: &str,
    backends: &[Ipv4Addr],
) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {cluster_ip}
{spec_extra}  ports: [{{name: http, port: {port}, protocol: TCP, targetPort: {TCP_TARGET}{port_extra}}}]
---
{}",
        cluster::endpoint_slice_yaml(name, &cluster::ready_endpoints(backends))
    )
}

/// Services and Nodes that claim what is not theirs, or more than their share, are
/// refused with a logged reason, and the rest of the file applies: a clusterIP on the
/// node's address (a pod's connect to node-IP:22 still reaches the node's sshd), on
/// loopback, the cloud metadata address, the pods' gateway, a pod address or outside
/// `--service-cidr`; an externalIP outside `--external-ip-cidr` (the world's server
/// still answers); a nodePort outside `--node-port-range`; a Service port with more
/// backends than a slot count holds (it used to wrap at 65,536); a Service taking more
/// than its share of the Service map; a Node claiming 0.0.0.0/0 or another node's pod
/// CIDR (this node's pods keep their routes and reach the node).
#[test]
fn services_and_nodes_claiming_what_is_not_theirs_are_refused_and_the_rest_applies() -> Result<()> {
    let mut cluster = Cluster::new(1)?;
    cluster.nodes[0].add_pod("client", pod_ip(0, 2))?;
    cluster.nodes[0].add_pod("web", pod_ip(0, 3))?;
    let node_ip = cluster.nodes[0].ip.context("plugged")?;
    let web = cluster.pod("web").ip;
    let _servers = [
        cluster.pod("web").serve(TCP_TARGET)?,
        Server::start(
            &cluster.nodes[0].netns,
            "sshd",
            SocketAddrV4::new(node_ip, 22),
        )?,
        Server::start(&cluster.world, "world", SocketAddrV4::new(WORLD_IP, 7000))?,
    ];
    // 16,382 backends: one more than a port's Maglev table spreads over.
    let many: Vec<Ipv4Addr> = (0..16_382u32)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + i))
        .collect();
    let wide_ports: String = (0..8)
        .map(|i| format!("{{name: p{i}, port: {}, protocol: TCP}},", 1000 + i))
        .collect();
    let wide = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: wide, namespace: default}}
spec: {{clusterIP: 10.96.3.9, ports: [{wide_ports}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: wide-1, namespace: default, labels: {{kubernetes.io/service-name: wide}}}}
addressType: IPv4
ports: [{}]
endpoints:
{}",
        (0..8)
            .map(|i| format!("{{name: p{i}, port: {}, protocol: TCP}},", 1000 + i))
            .collect::<String>(),
        cluster::ready_endpoints(&many[..8_200])
    );
    let hostile = [
        ("on-the-node", node_ip.to_string(), 22, "", ""),
        ("loopback", "127.0.0.1".into(), 80, "", ""),
        ("metadata", "169.254.169.254".into(), 80, "", ""),
        ("gateway", "169.254.1.1".into(), 80, "", ""),
        ("on-a-pod", web.to_string(), 80, "", ""),
        ("outside", "172.16.0.1".into(), 80, "", ""),
    ];
    let mut config = vec![
        cluster.nodes_and_pods_yaml(),
        node_yaml("greedy", lab::node_ip(5), "0.0.0.0/0"),
        node_yaml("overlapping", lab::node_ip(6), "10.244.0.0/23"),
        service("web", "10.96.3.1", 80, "", "", &[web]),
        service(
            "world-thief",
            "10.96.3.2",
            7000,
            &format!("  externalIPs: [\"{WORLD_IP}\"]\n"),
            "",
            &[web],
        ),
        service(
            "low-node-port",
            "10.96.3.3",
            80,
            "  type: NodePort\n",
            ", nodePort: 8080",
            &[web],
        ),
        service("crowd", "10.96.3.8", 80, "", "", &many),
        wide,
    ];
    for (name, ip, port, spec, extra) in &hostile {
        config.push(service(name, ip, *port, spec, extra, &[web]));
    }
    cluster.write_config(&config.join("---\n"))?;
    cluster.start_agents()?;
    let node = &cluster.nodes[0];
    wait_until("the agent to log its first sync", SETTLE, || {
        node.agent
            .as_ref()
            .is_some_and(|a| a.log_text().contains("synced"))
    })?;
    let log = node.agent.as_ref().context("agent")?.log_text();
    for reason in [
        format!("spec.clusterIP {node_ip} is outside the service CIDR"),
        "spec.clusterIP 127.0.0.1 is loopback".into(),
        "spec.clusterIP 169.254.169.254 is link-local".into(),
        "spec.clusterIP 169.254.1.1 is link-local".into(),
        format!("spec.clusterIP {web} is a pod address"),
        "spec.clusterIP 172.16.0.1 is outside the service CIDR".into(),
        format!("spec.externalIPs {WORLD_IP} is outside the allowed externalIP ranges"),
        "nodePort 8080 is outside the node port range 30000-32767".into(),
        "16382 endpoints (more than 16381".into(),
        "65608 Service map entries (more than 65536".into(),
        "Node greedy podCIDR 0.0.0.0/0".into(),
        "Node overlapping podCIDR 10.244.0.0/23".into(),
    ] {
        assert!(log.contains(&reason), "no {reason:?} in the log:\n{log}");
    }

    // Only what may be served is: web, and world-thief's own clusterIP.
    let frontends: BTreeSet<Ipv4Addr> = node
        .maps()?
        .contents()?
        .services
        .keys()
        .map(|key| Ipv4Addr::from(key.address))
        .collect();
    let expected: BTreeSet<Ipv4Addr> = ["10.96.3.1", "10.96.3.2"]
        .iter()
        .map(|ip| ip.parse().unwrap())
        .collect();
    assert_eq!(frontends, expected);

    let client = cluster.pod("client").probe();
    let ask = |to: SocketAddrV4, request: &str| -> Result<String> {
        answered_by(client.tcp(to, request)?.answer()?, request)
    };
    assert_eq!(ask(SocketAddrV4::new(node_ip, 22), "ssh")?, "sshd");
    assert_eq!(ask(SocketAddrV4::new(WORLD_IP, 7000), "out")?, "world");
    assert_eq!(ask(SocketAddrV4::new(web, TCP_TARGET), "direct")?, "web");
    assert_eq!(
        ask(SocketAddrV4::new(Ipv4Addr::new(10, 96, 3, 1), 80), "svc")?,
        "web"
    );

    // A refusal is logged once, when it is first made: not again with every sync
    // that writes something (a Service added) nor with every full resync.
    let late: Ipv4Addr = "10.96.3.20".parse()?;
    config.push(service("late", "10.96.3.20", 80, "", "", &[web]));
    cluster.write_config(&config.join("---\n"))?;
    node.wait_for_maps("the Service added later", |m| {
        m.services.keys().any(|k| k.address == late.octets())
    })?;
    let syncs = node.metric("ferrite_syncs_total")?;
    wait_until("two more full resyncs", SETTLE, || {
        node.metric("ferrite_syncs_total")
            .is_ok_and(|n| n >= syncs + 2.0)
    })?;
    let log = node.agent.as_ref().context("agent")?.log_text();
    let world_thief =
        format!("spec.externalIPs {WORLD_IP} is outside the allowed externalIP ranges");
    for reason in [
        world_thief.as_str(),
        "nodePort 8080 is outside",
        "Node greedy podCIDR",
    ] {
        assert_eq!(log.matches(reason).count(), 1, "{reason:?} in:\n{log}");
    }
    Ok(())
}

/// `ferrite uninstall --node N` removes what Ferrite installed for node N: its pins
/// and links, its runtime files and, in the network namespace it runs in, the VXLAN
/// device and nftables table - only when N is installed there (its pins exist). A
/// name that is not a node name (`..` once removed all of /run) is refused by every
/// command; a node without pins here leaves the namespace as it is.
#[test]
fn uninstall_touches_only_an_installed_node_and_names_that_are_no_node_are_refused() -> Result<()> {
    let (mut node, _servers) = cluster::example_node("uninst")?;
    // With a cluster CIDR the agent installs its nftables table too.
    node.agent_args
        .extend(["--cluster-cidr".into(), lab::CLUSTER_CIDR.into()]);
    node.write_config(&cluster::example_for(&node.name))?;
    node.start_agent()?;
    node.wait_for_sync(2, 5)?;
    let netns = format!("--net={}", node.netns.path().display());
    let bin = lab::ferrite_bin();
    let bin = bin.to_str().context("path")?;
    let in_node = |args: &[&str]| {
        let mut all = vec![netns.as_str(), bin];
        all.extend_from_slice(args);
        std::process::Command::new("nsenter").args(&all).output()
    };
    let run_dir = ferrite_agent::files::run_dir(&node.name);
    let vxlan_and_table_there = || -> Result<()> {
        lab::sh(
            "nsenter",
            &[&netns, "ip", "link", "show", ferrite_common::VXLAN_DEVICE],
        )?;
        lab::sh(
            "nsenter",
            &[&netns, "nft", "list", "table", "ip", "ferrite"],
        )?;
        Ok(())
    };
    vxlan_and_table_there()?;

    for name in ["..", "/run", "a/b", "Upper"] {
        let out = in_node(&["uninstall", "--node", name])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("not a node name"),
            "{name}: {stderr}"
        );
        let out = in_node(&["agent", "--node", name])?;
        assert!(!out.status.success(), "agent --node {name}");
    }
    let out = in_node(&["uninstall", "--node", "not-installed-here"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing removed"));
    vxlan_and_table_there()?;
    assert!(run_dir.is_dir() && node.pin_dir().is_dir());
    // The node still serves.
    let request = "after the refused uninstalls";
    answered_by(
        &node.pod(CLIENTS[0].0).tcp_request(TCP_FRONTEND, request)?,
        request,
    )?;
    Ok(())
}

/// Hostile Node objects join a running two-node cluster: one on a Service's
/// clusterIP, one inside node 1's pod CIDR, one on a pod's address, one on node 0's
/// own address, four on special addresses, and a newcomer named to sort first that
/// claims node 1's pod CIDR. Each is refused whole (its claims take nothing): the
/// Service still answers, pods on both nodes still reach each other, no hostile
/// address becomes a node route, and node 1 keeps its pod CIDR.
#[test]
fn hostile_node_objects_are_refused_and_take_nothing_from_services_or_other_nodes() -> Result<()> {
    let mut cluster = Cluster::new(2)?;
    cluster.nodes[0].add_pod("client", pod_ip(0, 2))?;
    cluster.nodes[1].add_pod("web", pod_ip(1, 3))?;
    let (client_ip, web_ip) = (cluster.pod("client").ip, cluster.pod("web").ip);
    let _servers = [
        cluster.pod("web").serve(TCP_TARGET)?,
        cluster.pod("client").serve(TCP_TARGET)?,
    ];
    let vip = "10.96.4.10";
    let base = format!(
        "{}---\n{}",
        cluster.nodes_and_pods_yaml(),
        service("web", vip, 80, "", "", &[web_ip])
    );
    cluster.write_config(&base)?;
    cluster.start_agents()?;
    let node0_ip = cluster.nodes[0].ip.context("plugged")?;
    let node1_ip = cluster.nodes[1].ip.context("plugged")?;
    let works = |when: &str| -> Result<()> {
        let ask = |from: &str, to: SocketAddrV4| -> Result<String> {
            let request = format!("{when}: {from} -> {to}");
            answered_by(
                cluster.pod(from).probe().tcp(to, &request)?.answer()?,
                &request,
            )
        };
        assert_eq!(
            ask("client", SocketAddrV4::new(vip.parse()?, 80))?,
            "web",
            "{when}"
        );
        assert_eq!(
            ask("client", SocketAddrV4::new(web_ip, TCP_TARGET))?,
            "web",
            "{when}"
        );
        assert_eq!(
            ask("web", SocketAddrV4::new(client_ip, TCP_TARGET))?,
            "client",
            "{when}"
        );
        Ok(())
    };
    let synced = |node: &ferrite_tests::lab::Node| {
        node.wait_for_maps("both nodes' routes", |m| m.pod_routes() == 2)
    };
    synced(&cluster.nodes[0])?;
    synced(&cluster.nodes[1])?;
    works("before")?;

    let hostile = [
        (
            "squatter",
            vip.to_string(),
            "10.244.20.0/24",
            "service CIDR",
        ),
        (
            "inside",
            "10.244.1.77".into(),
            "10.244.21.0/24",
            "cluster CIDR",
        ),
        (
            "on-a-pod",
            client_ip.to_string(),
            "10.244.22.0/24",
            "cluster CIDR",
        ),
        ("twin", node0_ip.to_string(), "10.244.23.0/24", "'s"),
        ("zero", "0.0.0.0".into(), "10.244.24.0/24", "0.0.0.0/8"),
        (
            "bcast",
            "255.255.255.255".into(),
            "10.244.25.0/24",
            "broadcast",
        ),
        ("loop", "127.0.0.1".into(), "10.244.26.0/24", "loopback"),
        (
            "meta",
            "169.254.169.254".into(),
            "10.244.27.0/24",
            "link-local",
        ),
    ];
    let mut config = vec![base];
    for (name, ip, cidr, _) in &hostile {
        config.push(node_yaml(name, ip.parse()?, cidr));
    }
    // Named to sort before every lab node, after node 1 had its CIDR.
    config.push(node_yaml("a0-thief", lab::node_ip(7), "10.244.1.0/24"));
    cluster.write_config(&config.join("---\n"))?;
    for node in &cluster.nodes {
        let agent = node.agent.as_ref().context("agent")?;
        wait_until("the hostile Nodes to be refused", SETTLE, || {
            agent
                .log_text()
                .contains("Node a0-thief podCIDR 10.244.1.0/24")
        })?;
        let log = agent.log_text();
        for (name, ip, _, says) in &hostile {
            assert!(
                log.lines()
                    .any(|l| l.contains(&format!("Node {name}: InternalIP {ip}"))
                        && l.contains(says)),
                "no refusal of {name} ({says}) in:\n{log}"
            );
        }
        let maps = node.maps()?.contents()?;
        let node_routes: BTreeSet<Ipv4Addr> = maps
            .routes
            .keys()
            .filter(|k| k.prefix_len == 32)
            .map(|k| Ipv4Addr::from(k.network))
            .collect();
        for (name, ip, _, _) in &hostile {
            let ip: Ipv4Addr = ip.parse()?;
            if ip != node0_ip {
                assert!(!node_routes.contains(&ip), "a node route to {name}'s {ip}");
            }
        }
        let node1_route = maps
            .routes
            .iter()
            .find(|(k, _)| {
                k.prefix_len == 24
                    && Ipv4Addr::from(k.network) == pod_ip(1, 0) & Ipv4Addr::new(255, 255, 255, 0)
            })
            .map(|(_, r)| Ipv4Addr::from(r.node_ip));
        assert_eq!(node1_route, Some(node1_ip), "node 1's pod CIDR route");
    }
    works("after")?;

    // Dual-stack Nodes claiming IPv6 ranges no node may have: each IPv6 podCIDR is
    // refused with its reason and counted; the Nodes' IPv4 halves stand.
    let dual_stack = |name: &str, index: usize, cidr6: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n\
             spec: {{podCIDRs: [10.244.{}.0/24, \"{cidr6}\"]}}\n\
             status: {{addresses: [{{type: InternalIP, address: {}}}]}}\n",
            40 + index,
            lab::node_ip(20 + index)
        )
    };
    let hostile6 = [
        ("v6-zero", "::/0", "prefix /0"),
        ("v6-loop", "::1/128", "prefix /128"),
        ("v6-link", "fe80::/64", "link-local"),
        ("v6-multi", "ff05::/64", "multicast"),
        ("v6-mapped", "::ffff:10.96.0.0/120", "IPv4-mapped"),
        ("v6-clash", "fd00:10:244::/80", "node a0-v6-first's"),
    ];
    config.push(dual_stack("a0-v6-first", 0, "fd00:10:244::/64"));
    for (index, (name, cidr6, _)) in hostile6.iter().enumerate() {
        config.push(dual_stack(name, index + 1, cidr6));
    }
    cluster.write_config(&config.join("---\n"))?;
    for node in &cluster.nodes {
        node.wait_for_maps("the dual-stack Nodes' IPv4 routes", |m| {
            m.pod_routes() == 2 + 1 + hostile6.len()
        })?;
        let agent = node.agent.as_ref().context("agent")?;
        let log = agent.log_text();
        for (name, cidr6, says) in &hostile6 {
            assert!(
                log.lines()
                    .any(|l| l.contains(&format!("Node {name} podCIDR {cidr6}: "))
                        && l.contains(says)),
                "no refusal of {name}'s {cidr6} ({says}) in:\n{log}"
            );
        }
        assert!(!log.contains("Node a0-v6-first podCIDR"), "{log}");
        let skipped = node.metric("ferrite_skipped_objects")?;
        assert!(
            skipped >= (hostile.len() + 1 + hostile6.len()) as f64,
            "ferrite_skipped_objects {skipped}"
        );
    }
    works("with the dual-stack Nodes")?;
    Ok(())
}
