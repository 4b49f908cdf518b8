//! User story: an operator restarts, kills and upgrades the agent while the cluster
//! carries traffic, and no live flow notices (cilium#29667: conntrack GC at start
//! deleted valid flows; kube-proxy restarts flushing UDP conntrack), nor do
//! connections balanced at the socket (they have no conntrack to lose). Needs root.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::programs::links::{FdLink, PinnedLink};
use ferrite_common::{ServiceKey, PROTO_TCP, PROTO_UDP};
use ferrite_tests::{
    cluster::{
        self, load_balancer_yaml, service_yaml, CLIENTS, TCP_FRONTEND, TCP_TARGET, UDP_TARGET,
    },
    lab::{
        exchange, parse_answer, pod_ip, wait_until, Cluster, HeldConnection, Netns, Node, Server,
    },
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const PORT: u16 = 80;
const NODE_PORT: u16 = 30080;
const TCP_FLOWS: usize = 100;
const UDP_FLOWS: usize = 20;
/// The other flows go from the world to node 0's NodePort.
const TCP_FLOWS_TO_CLUSTER_IP: usize = 60;
const UDP_FLOWS_TO_CLUSTER_IP: usize = 10;
/// Connections a pod's process opens to the ClusterIP, balanced at the socket.
const SOCKET_FLOWS: usize = 10;
/// The large sync: this many extra Services (TCP and UDP port, 10 endpoints each),
/// 10,000 frontends and 100,000 backend slots, after the test's own Service.
const EXTRA_SERVICES: u32 = 5_000;

fn extra_vip(index: u32) -> Ipv4Addr {
    let [_, _, high, low] = index.to_be_bytes();
    Ipv4Addr::new(10, 100, high, low)
}

/// One long-lived flow and the backend that answered it first.
enum Flow {
    Tcp(TcpStream, String),
    Udp(UdpSocket, String),
    /// A TCP connection of a process in the node's cgroup (socket-level LB).
    Socket(HeldConnection, String),
}

impl Flow {
    /// One request/answer on the flow; returns the answering pod.
    fn exchange(&mut self, request: &str) -> Result<String> {
        match self {
            Flow::Tcp(stream, _) => Ok(parse_answer(&exchange(stream, request)?, request)?.0),
            Flow::Udp(socket, _) => {
                let mut buf = [0u8; 2048];
                // UDP may lose a datagram on a busy machine; the 5-tuple stays the same.
                for _ in 0..3 {
                    socket.send(request.as_bytes())?;
                    if let Ok(n) = socket.recv(&mut buf) {
                        let reply = String::from_utf8_lossy(&buf[..n]);
                        return Ok(parse_answer(&reply, request)?.0);
                    }
                }
                bail!("no UDP answer")
            }
            Flow::Socket(held, _) => Ok(parse_answer(held.send(request)?.answer()?, request)?.0),
        }
    }

    fn backend(&self) -> &str {
        match self {
            Flow::Tcp(_, backend) | Flow::Udp(_, backend) | Flow::Socket(_, backend) => backend,
        }
    }
}

fn udp_flow(netns: &Netns, to: SocketAddrV4) -> Result<UdpSocket> {
    let socket = netns.run(|| UdpSocket::bind("0.0.0.0:0"))??;
    socket.connect(to)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(socket)
}

/// Every flow still answers, from the backend it started with.
fn check_flows(flows: &mut [Flow], phase: &str) -> Result<()> {
    for (index, flow) in flows.iter_mut().enumerate() {
        let request = format!("flow {index} {phase}");
        let backend = flow
            .exchange(&request)
            .with_context(|| format!("flow {index} {phase}"))?;
        anyhow::ensure!(
            backend == flow.backend(),
            "flow {index} {phase}: answered by {backend}, started on {}",
            flow.backend()
        );
    }
    Ok(())
}

/// Link pin name -> (link id, program id) of every link pinned for a node.
fn links(pin_dir: &Path) -> Result<BTreeMap<String, (u32, u32)>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(pin_dir.join("links"))? {
        let entry = entry?;
        let link = FdLink::from(PinnedLink::from_pin(entry.path())?);
        let info = link.info()?;
        out.insert(
            entry.file_name().to_string_lossy().into_owned(),
            (info.id(), info.program_id()),
        );
    }
    Ok(out)
}

#[test]
fn a_hundred_tcp_and_twenty_udp_flows_survive_kills_a_kill_mid_sync_and_an_upgrade() -> Result<()> {
    ferrite_tests::lab::require_root()?;
    // Clients on node 0, backends on both nodes; the world uses node 0's NodePort,
    // so flows cross from_pod, from_overlay, the XDP program and the uplink's tcx.
    let mut cluster = Cluster::new(2)?;
    cluster.nodes[0].add_pod("client", pod_ip(0, 0))?;
    cluster.nodes[0].add_pod("web-a", pod_ip(0, 1))?;
    cluster.nodes[1].add_pod("web-b", pod_ip(1, 1))?;
    cluster.nodes[1].add_pod("web-c", pod_ip(1, 2))?;
    let mut servers: Vec<Server> = Vec::new();
    for pod in ["web-a", "web-b", "web-c"] {
        servers.push(cluster.pod(pod).serve(TCP_TARGET)?);
        servers.push(cluster.pod(pod).serve(UDP_TARGET)?);
    }
    let backends: Vec<(Ipv4Addr, &str)> = vec![
        (cluster.pod("web-a").ip, &cluster.nodes[0].name),
        (cluster.pod("web-b").ip, &cluster.nodes[1].name),
        (cluster.pod("web-c").ip, &cluster.nodes[1].name),
    ];
    let small = format!(
        "{}---\n{}",
        cluster.nodes_and_pods_yaml(),
        load_balancer_yaml("web", VIP, PORT, NODE_PORT, "", &[], &backends)
    );
    cluster.write_config(&small)?;
    // XDP on the uplink too (as on a real NIC): its link must survive upgrades as well.
    for node in &mut cluster.nodes {
        node.agent_args.extend(["--xdp".into(), "always".into()]);
    }
    cluster.start_agents()?;
    let node_port = SocketAddrV4::new(cluster.nodes[0].ip.context("plugged")?, NODE_PORT);
    let master = |ip, port, proto| ServiceKey::new(ip, port, proto, 0);
    for node in &cluster.nodes {
        node.wait_for_maps("the Service and both nodes' pod CIDR routes", |m| {
            m.pod_routes() == 2 && m.services.contains_key(&master(VIP, PORT + 1, PROTO_UDP))
        })?;
    }

    // 60 TCP + 10 UDP flows from the client pod to the ClusterIP, 40 TCP + 10 UDP
    // from the world to the NodePort.
    let client = &cluster.pod("client").netns;
    let world = &cluster.world;
    let cluster_ip = SocketAddrV4::new(VIP, PORT);
    let mut flows = Vec::new();
    for index in 0..TCP_FLOWS {
        let (from, to) = match index < TCP_FLOWS_TO_CLUSTER_IP {
            true => (client, cluster_ip),
            false => (world, node_port),
        };
        let mut stream = from.tcp_connect(to)?;
        let request = format!("open tcp {index}");
        let backend = parse_answer(&exchange(&mut stream, &request)?, &request)?.0;
        flows.push(Flow::Tcp(stream, backend));
    }
    for index in 0..UDP_FLOWS {
        let (from, to) = match index < UDP_FLOWS_TO_CLUSTER_IP {
            true => (client, SocketAddrV4::new(VIP, PORT + 1)),
            false => (world, SocketAddrV4::new(*node_port.ip(), NODE_PORT + 1)),
        };
        let mut flow = Flow::Udp(udp_flow(from, to)?, String::new());
        let backend = flow.exchange(&format!("open udp {index}"))?;
        if let Flow::Udp(_, b) = &mut flow {
            *b = backend;
        }
        flows.push(flow);
    }
    let client_ip = cluster.pod("client").ip;
    // The per-packet flows' entries, so only what the socket connections add counts.
    let tracked_before: std::collections::BTreeSet<ferrite_common::CtKey> = cluster.nodes[0]
        .maps()?
        .conntrack_entries()?
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    let mut socket_ports = Vec::new();
    for index in 0..SOCKET_FLOWS {
        let mut held = cluster.pod("client").probe().hold(cluster_ip)?;
        let connected = held.connected.clone().context("connected")?;
        anyhow::ensure!(
            connected.from.as_deref() == Some(cluster_ip.to_string().as_str()),
            "the socket's peer reads as the Service: {connected:?}"
        );
        let local: SocketAddrV4 = connected.local.as_deref().context("local")?.parse()?;
        socket_ports.push(local.port());
        let request = format!("open socket {index}");
        let backend = parse_answer(held.send(&request)?.answer()?, &request)?.0;
        flows.push(Flow::Socket(held, backend));
    }
    // Balanced at the socket: no Service translation in conntrack for any of them.
    // (A socket connection that picked the client port of a live per-packet flow to
    // the same backend has that flow's reply tuple: it is port-remapped, as any direct
    // connection would be, which is no Service translation.)
    let conntrack = cluster.nodes[0].maps()?.conntrack_entries()?;
    let tracked: Vec<_> = conntrack
        .iter()
        .filter(|(key, value)| {
            !tracked_before.contains(key)
                && value.rev_nat_index != ferrite_common::REV_NAT_NONE
                && [key.saddr, key.daddr].contains(&client_ip.octets())
                && (socket_ports.contains(&key.sport) || socket_ports.contains(&key.dport))
        })
        .collect();
    assert!(
        tracked.is_empty(),
        "socket-LB connections in conntrack: {tracked:?}"
    );
    let spread: std::collections::BTreeSet<&str> = flows.iter().map(Flow::backend).collect();
    assert_eq!(spread.len(), 3, "flows reach every backend: {spread:?}");
    let node = &mut cluster.nodes[0];
    let links_at_start = links(&node.pin_dir())?;
    assert_eq!(
        links_at_start.len(),
        9 + ferrite_common::program_names::SOCKET_LB.len(),
        "two pod veths both ways, the VXLAN device, the uplink's tcx both ways and XDP \
         (--xdp always), lo's egress, the socket-level hooks: {links_at_start:?}"
    );

    // 1. SIGKILL and restart.
    node.kill_agent()?;
    check_flows(&mut flows, "with the agent killed")?;
    node.start_agent()?;
    let links_now = links(&node.pin_dir())?;
    check_flows(&mut flows, "after a restart")?;

    // 2. SIGKILL in the middle of a large sync: the agent dies after writing some
    //    backend slots of the new Services and none of their master entries.
    let endpoints: Vec<Ipv4Addr> = (1..=10).map(|i| Ipv4Addr::new(10, 244, 9, i)).collect();
    let mut large = small.clone();
    for index in 0..EXTRA_SERVICES {
        large.push_str("---\n");
        large.push_str(&service_yaml(
            &format!("extra-{index}"),
            extra_vip(index),
            &endpoints,
        ));
    }
    node.write_config(&large)?;
    node.kill_agent()?;
    node.start_agent()?;
    let maps = node.maps()?;
    let first_slot = ServiceKey::new(extra_vip(0), PORT, PROTO_TCP, 1);
    let last_master = master(extra_vip(EXTRA_SERVICES - 1), 53, PROTO_UDP);
    // Polled without wait_until's 50 ms naps: on an idle machine the agent writes
    // the rest of the sync in less than that.
    let start = std::time::Instant::now();
    while maps.services.get(&first_slot, 0).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for the large sync to start writing slots"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    node.kill_agent()?;
    let written = maps.services.keys().filter_map(Result::ok).count();
    eprintln!("killed mid-sync with {written} service map entries written (110,004 when done)");
    assert!(
        maps.services.get(&last_master, 0).is_err(),
        "the agent was killed before it finished the sync"
    );
    check_flows(&mut flows, "after a kill mid-sync")?;
    node.start_agent()?;
    wait_until("the large sync to finish", Duration::from_secs(120), || {
        maps.services.get(&last_master, 0).is_ok()
    })?;
    check_flows(&mut flows, "after the large sync finished")?;

    // 3. Upgrade: a new agent loads the datapath anew (new programs, here with another
    //    log level so their read-only data differs too) over the same pinned maps.
    //    Every link must be the same link, now running a new program: replaced in
    //    place, never detached. Flows are exercised while it happens.
    let before_upgrade = links(&node.pin_dir())?;
    node.agent_args
        .extend(["--datapath-log".to_string(), "info".to_string()]);
    node.kill_agent()?;
    node.start_agent()?;
    let mut rounds = 0;
    wait_until(
        "every link to run the upgraded programs",
        Duration::from_secs(60),
        || {
            rounds += 1;
            let request_ok = check_flows(&mut flows[..5], &format!("during upgrade {rounds}"));
            request_ok.is_ok()
                && links(&node.pin_dir()).is_ok_and(|now| {
                    now.len() == before_upgrade.len()
                        && now.iter().all(|(name, (link, program))| {
                            before_upgrade
                                .get(name)
                                .is_some_and(|(old_link, old_program)| {
                                    old_link == link && old_program != program
                                })
                        })
                })
        },
    )?;
    check_flows(&mut flows, "after the upgrade")?;
    for (name, (link, _)) in links_at_start.iter().chain(&links_now) {
        assert_eq!(
            before_upgrade.get(name).map(|(l, _)| l),
            Some(link),
            "{name} kept its link through restarts"
        );
    }
    // New connections after everything.
    let request = "new after upgrade";
    parse_answer(&cluster.world.tcp_request(node_port, request)?, request)?;
    let client = &cluster.pod("client").netns;
    parse_answer(&client.tcp_request(cluster_ip, request)?, request)?;
    drop(servers);
    Ok(())
}

/// Ten connections of the first client to the TCP frontend, each with the backend
/// that answered it.
fn open_streams(node: &Node) -> Result<Vec<(TcpStream, String)>> {
    let client = node.pod(CLIENTS[0].0);
    (0..10)
        .map(|index| {
            let mut stream = client.tcp_connect(TCP_FRONTEND)?;
            let request = format!("open {index}");
            let backend = parse_answer(&exchange(&mut stream, &request)?, &request)?.0;
            Ok((stream, backend))
        })
        .collect()
}

/// Every stream is still answered, by the backend that answered it first.
fn each_stream_keeps_its_backend(streams: &mut [(TcpStream, String)]) -> Result<()> {
    for (index, (stream, backend)) in streams.iter_mut().enumerate() {
        let request = format!("after {index}");
        assert_eq!(
            &parse_answer(&exchange(stream, &request)?, &request)?.0,
            backend
        );
    }
    Ok(())
}

/// What the node's running agent has logged.
fn agent_log(node: &Node) -> String {
    node.agent
        .as_ref()
        .map(|a| a.log_text())
        .unwrap_or_default()
}

/// Map name -> (map id, capacity) of every map pinned for a node.
fn pinned_maps(pin_dir: &Path) -> Result<BTreeMap<String, (u32, u32)>> {
    let mut out = BTreeMap::new();
    for name in ferrite_common::map_names::ALL {
        let info = aya::maps::MapInfo::from_pin(pin_dir.join(name))?;
        out.insert(name.to_string(), (info.id(), info.max_entries()));
    }
    Ok(out)
}

/// The id of the program in `ferrite_progs`' slot `slot` (bpftool's lookup: the
/// value of a program array is the program's id, as little-endian bytes).
fn tail_call_target(pin_dir: &Path, slot: u32) -> Result<u32> {
    let pin = pin_dir.join(ferrite_common::map_names::TAIL_CALLS);
    let key: Vec<String> = slot.to_le_bytes().iter().map(u8::to_string).collect();
    let mut args = vec![
        "map",
        "lookup",
        "pinned",
        pin.to_str().context("pin path")?,
        "key",
    ];
    args.extend(key.iter().map(String::as_str));
    args.push("-j");
    let out: serde_json::Value = serde_json::from_str(&ferrite_tests::lab::sh("bpftool", &args)?)?;
    let bytes: Vec<u8> = out["value"]
        .as_array()
        .with_context(|| format!("no value bytes: {out}"))?
        .iter()
        .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect();
    Ok(u32::from_le_bytes(
        bytes
            .try_into()
            .map_err(|b| anyhow::anyhow!("value {b:?}"))?,
    ))
}

/// The name of the loaded program `id`.
fn program_name(id: u32) -> Result<String> {
    let out: serde_json::Value = serde_json::from_str(&ferrite_tests::lab::sh(
        "bpftool",
        &["prog", "show", "id", &id.to_string(), "-j"],
    )?)?;
    Ok(out["name"].as_str().unwrap_or_default().to_string())
}

#[test]
fn an_upgrade_that_changes_one_maps_layout_recreates_that_map_only() -> Result<()> {
    ferrite_tests::lab::require_root()?;
    let (mut node, servers) = cluster::example_node("layout")?;
    node.write_config(&cluster::example_for(&node.name))?;
    node.start_agent()?;
    node.wait_for_sync(2, 5)?;
    let mut streams = open_streams(&node)?;
    let before = pinned_maps(&node.pin_dir())?;
    let slot = ferrite_common::tail_call::FROM_POD6;
    let ipv6_program = tail_call_target(&node.pin_dir(), slot)?;
    assert_eq!(program_name(ipv6_program)?, "ferrite_from_pod6");

    // The new agent's object wants a smaller session-affinity map (as an upgrade
    // changing a value layout would): that map is re-created, the rest kept.
    let changed = ferrite_common::map_names::AFFINITY;
    node.agent_args = vec!["--map-capacity".into(), format!("{changed}=1000")];
    node.kill_agent()?;
    node.start_agent()?;
    let log = || agent_log(&node);
    wait_until("the new agent to sync", Duration::from_secs(30), || {
        log().contains("synced")
    })?;
    let after = pinned_maps(&node.pin_dir())?;
    // The kept program array points at the new agent's IPv6 program.
    let new_ipv6_program = tail_call_target(&node.pin_dir(), slot)?;
    assert_ne!(new_ipv6_program, ipv6_program, "slot {slot} refilled");
    assert_eq!(program_name(new_ipv6_program)?, "ferrite_from_pod6");
    for (name, (id, capacity)) in &after {
        if name == changed {
            assert_ne!(*id, before[name].0, "{name} was re-created");
            assert_eq!(*capacity, 1000);
        } else {
            assert_eq!((*id, *capacity), before[name], "{name} was kept");
        }
    }
    assert!(
        log().contains("re-creating") && log().contains(changed),
        "the agent says which map it re-created:\n{}",
        log()
    );
    // Conntrack was kept: every connection stays on its backend.
    each_stream_keeps_its_backend(&mut streams)?;
    drop(servers);
    Ok(())
}

/// The previous release's `ferrite_rev_nat` (16-bit keys) is still pinned when the
/// new agent starts: that map alone is re-created (the other maps' layouts did not
/// change, or changed size: each is checked the same way), the agent says why, and
/// refills it with the same indexes, so flows through the kept conntrack entries still
/// have their replies translated back.
#[test]
fn an_upgrade_from_16_bit_rev_nat_keys_recreates_the_rev_nat_map() -> Result<()> {
    ferrite_tests::lab::require_root()?;
    let (mut node, servers) = cluster::example_node("oldrevnat")?;
    node.write_config(&cluster::example_for(&node.name))?;
    node.start_agent()?;
    node.wait_for_sync(2, 5)?;
    let mut streams = open_streams(&node)?;
    node.kill_agent()?;
    // What the previous release pinned: the running programs keep the map they hold.
    let changed = ferrite_common::map_names::REV_NAT;
    let pin = node.pin_dir().join(changed);
    std::fs::remove_file(&pin)?;
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args(["type", "hash", "key", "2", "value", "8", "entries", "65535"])
        .args(["name", changed])
        .status()?;
    anyhow::ensure!(created.success(), "bpftool map create: {created}");
    let before = pinned_maps(&node.pin_dir())?;
    node.start_agent()?;
    let log = || agent_log(&node);
    wait_until("the new agent to sync", Duration::from_secs(30), || {
        log().contains("synced")
    })?;
    let after = pinned_maps(&node.pin_dir())?;
    for (name, (id, capacity)) in &after {
        if name == changed {
            assert_ne!(*id, before[name].0, "{name} was re-created");
        } else {
            assert_eq!((*id, *capacity), before[name], "{name} was kept");
        }
    }
    let rev_nat = aya::maps::MapInfo::from_pin(&pin)?;
    assert_eq!(rev_nat.key_size(), 4);
    assert!(
        log().contains("re-creating") && log().contains(changed) && log().contains("key 2 B"),
        "the agent says which map it re-created and why:\n{}",
        log()
    );
    each_stream_keeps_its_backend(&mut streams)?;
    let mut stream = node.pod(CLIENTS[0].0).tcp_connect(TCP_FRONTEND)?;
    parse_answer(&exchange(&mut stream, "new")?, "new")?;
    drop(servers);
    Ok(())
}
