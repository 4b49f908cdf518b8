//! User stories for one node: pods in network namespaces, the agent on the example
//! YAML, real TCP and UDP through a ClusterIP. Needs root; each test builds its own
//! uniquely named node and removes it (netns, veths, pins) on every path.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, SocketAddrV4},
};

use anyhow::Result;
use ferrite_common::{EndpointKey, ServiceKey, ServiceValue, PROTO_TCP, PROTO_UDP};
use ferrite_tests::{
    cluster::{self, BACKENDS, CLIENTS, TCP_FRONTEND, TCP_TARGET, UDP_FRONTEND, UDP_TARGET},
    lab::{answered_by, exchange, node_yaml, parse_answer, sh, tcp_from_port, Node, Server},
};

/// The example cluster running: 2 clients, 3 backends serving TCP and UDP, the agent
/// synced. Servers are dropped before the node.
struct ExampleCluster {
    _servers: Vec<Server>,
    node: Node,
}

fn example_cluster() -> Result<ExampleCluster> {
    example_cluster_with(&[])
}

fn example_cluster_with(agent_args: &[&str]) -> Result<ExampleCluster> {
    let (mut node, servers) = cluster::example_node("clip")?;
    node.agent_args = agent_args.iter().map(ToString::to_string).collect();
    node.write_config(&cluster::example_for(&node.name))?;
    node.start_agent()?;
    node.wait_for_sync(2, 5)?;
    Ok(ExampleCluster {
        _servers: servers,
        node,
    })
}

fn tcp_master_count(maps: &ferrite_agent::plan::MapContents) -> Option<u16> {
    let key = ServiceKey::new(*TCP_FRONTEND.ip(), TCP_FRONTEND.port(), PROTO_TCP, 0);
    maps.services.get(&key).map(|v: &ServiceValue| v.count)
}

#[test]
fn a_cluster_ip_spreads_tcp_and_udp_over_every_backend_and_answers_from_the_vip() -> Result<()> {
    let cluster = example_cluster()?;
    let mut tcp_backends = BTreeSet::new();
    let mut udp_backends = BTreeSet::new();
    for (client, _) in CLIENTS {
        let pod = cluster.node.pod(client);
        for i in 0..30 {
            let request = format!("{client} tcp {i}");
            // TCP only accepts answers from the address it connected to: the VIP.
            let reply = pod.tcp_request(TCP_FRONTEND, &request)?;
            tcp_backends.insert(answered_by(&reply, &request)?);

            let request = format!("{client} udp {i}");
            let (reply, from) = pod.udp_request(UDP_FRONTEND, &request)?;
            assert_eq!(
                from,
                SocketAddr::V4(UDP_FRONTEND),
                "UDP answer not from the VIP"
            );
            udp_backends.insert(answered_by(&reply, &request)?);
        }
    }
    let all: BTreeSet<String> = BACKENDS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(tcp_backends, all, "TCP backends used");
    assert_eq!(udp_backends, all, "UDP backends used");
    Ok(())
}

#[test]
fn removing_a_backend_from_the_yaml_stops_new_connections_to_it() -> Result<()> {
    let cluster = example_cluster()?;
    let node = &cluster.node;
    let remaining = [BACKENDS[0].1, BACKENDS[1].1];
    node.write_config(&cluster::example_with_backends(&node.name, &remaining))?;
    node.wait_for_maps("the TCP Service down to 2 backends", |m| {
        tcp_master_count(m) == Some(2)
    })?;
    let client = node.pod(CLIENTS[0].0);
    for i in 0..40 {
        let request = format!("after removal {i}");
        let backend = answered_by(&client.tcp_request(TCP_FRONTEND, &request)?, &request)?;
        assert_ne!(
            backend, BACKENDS[2].0,
            "connection {i} went to the removed backend"
        );
        let (reply, _) = client.udp_request(UDP_FRONTEND, &request)?;
        assert_ne!(answered_by(&reply, &request)?, BACKENDS[2].0);
    }
    Ok(())
}

#[test]
fn a_killed_agent_leaves_live_connections_working_and_a_restart_resyncs_without_breaking_them(
) -> Result<()> {
    let mut cluster = example_cluster()?;
    // Long-lived connections through the VIP, 3 per client.
    let mut connections = Vec::new();
    for (client, _) in CLIENTS {
        for i in 0..3 {
            let mut stream = cluster.node.pod(client).tcp_connect(TCP_FRONTEND)?;
            let request = format!("{client} conn {i} hello");
            let backend = answered_by(&exchange(&mut stream, &request)?, &request)?;
            connections.push((stream, backend));
        }
    }
    let synced = cluster.node.maps()?.contents()?;

    cluster.node.kill_agent()?;
    for (i, (stream, backend)) in connections.iter_mut().enumerate() {
        let request = format!("conn {i} while the agent is dead");
        assert_eq!(
            &answered_by(&exchange(stream, &request)?, &request)?,
            backend
        );
    }
    // New connections too: the pinned datapath works on its own.
    let client = cluster.node.pod(CLIENTS[1].0);
    for i in 0..10 {
        let request = format!("new {i} while the agent is dead");
        answered_by(&client.tcp_request(TCP_FRONTEND, &request)?, &request)?;
    }

    // Damage the maps behind the agent's back: a stale Service and a missing one.
    let mut maps = cluster.node.maps()?;
    let stale = ServiceKey::new("10.96.9.9".parse()?, 9, PROTO_TCP, 0);
    maps.services.insert(stale, ServiceValue::default(), 0)?;
    let udp_master = ServiceKey::new(*UDP_FRONTEND.ip(), UDP_FRONTEND.port(), PROTO_UDP, 0);
    maps.services.remove(&udp_master)?;

    cluster.node.start_agent()?;
    cluster
        .node
        .wait_for_maps("the restarted agent to repair the maps", |m| {
            !m.services.contains_key(&stale) && m.services.contains_key(&udp_master)
        })?;
    assert_eq!(
        cluster.node.maps()?.contents()?,
        synced,
        "after resync the maps hold exactly what the first agent wrote (same ids, no flush)"
    );
    for (i, (stream, backend)) in connections.iter_mut().enumerate() {
        let request = format!("conn {i} after restart");
        assert_eq!(
            &answered_by(&exchange(stream, &request)?, &request)?,
            backend
        );
    }
    let client = cluster.node.pod(CLIENTS[1].0);
    let (reply, from) = client.udp_request(UDP_FRONTEND, "udp after restart")?;
    assert_eq!(from, SocketAddr::V4(UDP_FRONTEND));
    answered_by(&reply, "udp after restart")?;
    Ok(())
}

#[test]
fn pods_reach_each_other_by_pod_ip_on_the_same_node() -> Result<()> {
    let cluster = example_cluster()?;
    let client = cluster.node.pod(CLIENTS[0].0);
    for (name, ip) in BACKENDS {
        let reply = client.tcp_request(SocketAddrV4::new(ip, TCP_TARGET), "direct")?;
        assert_eq!(answered_by(&reply, "direct")?, name);
        let target = SocketAddrV4::new(ip, UDP_TARGET);
        let (reply, from) = client.udp_request(target, "direct udp")?;
        assert_eq!(
            (answered_by(&reply, "direct udp")?, from),
            (name.to_string(), SocketAddr::V4(target))
        );
    }
    Ok(())
}

#[test]
fn operators_see_services_in_inspect_and_named_fields_in_bpftool() -> Result<()> {
    let cluster = example_cluster()?;
    let node = &cluster.node;
    let services = node.inspect("services")?;
    let line = services
        .lines()
        .find(|l| l.starts_with("10.96.0.10:80/TCP"))
        .unwrap_or_else(|| panic!("no TCP frontend in:\n{services}"));
    for (_, ip) in BACKENDS {
        assert!(line.contains(&format!("{ip}:{TCP_TARGET}")), "{line}");
    }
    let endpoints = node.inspect("endpoints")?;
    assert_eq!(endpoints.lines().count(), 1 + 5, "{endpoints}");

    // The same rows for scripts: `-o json`, one object per row with named fields.
    let services = node.inspect_json("services")?;
    let frontend = services
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["frontend"] == "10.96.0.10:80/TCP"))
        .unwrap_or_else(|| panic!("no TCP frontend in:\n{services:#}"));
    assert_eq!(frontend["port"], 80);
    let mut backend_ips: Vec<&str> = frontend["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter_map(|b| b["address"].as_str())
        .collect();
    backend_ips.sort_unstable();
    let mut expected: Vec<String> = BACKENDS.iter().map(|(_, ip)| ip.to_string()).collect();
    expected.sort_unstable();
    assert_eq!(backend_ips, expected, "{frontend:#}");
    for table in ["backends", "endpoints", "routes", "stats", "conntrack"] {
        let rows = node.inspect_json(table)?;
        assert!(rows.is_array(), "{table}: {rows:#}");
    }
    let endpoints = node.inspect_json("endpoints")?;
    assert_eq!(endpoints.as_array().map(Vec::len), Some(5), "{endpoints:#}");
    let stats = node.inspect_json("stats")?;
    assert_eq!(
        stats.as_array().map(Vec::len),
        Some(ferrite_common::stat::COUNT as usize),
        "{stats:#}"
    );

    let pinned = node.pin_dir().join(ferrite_common::map_names::SERVICES);
    let dump = sh(
        "bpftool",
        &["map", "dump", "pinned", pinned.to_str().unwrap()],
    )?;
    for field in [
        "address",
        "port",
        "proto",
        "backend_slot",
        "backend_id",
        "count",
        "rev_nat_index",
    ] {
        assert!(
            dump.contains(&format!("\"{field}\"")),
            "bpftool shows no {field}:\n{dump}"
        );
    }
    // Endpoint entries name the host veth each pod sits behind.
    let contents = node.maps()?.contents()?;
    let by_ip: BTreeMap<_, _> = contents.endpoints.iter().collect();
    let key = EndpointKey {
        address: CLIENTS[0].1.octets(),
    };
    assert!(by_ip.contains_key(&key));
    Ok(())
}

#[test]
fn a_pod_sending_from_an_ip_that_is_not_its_own_is_dropped_counted_and_logged() -> Result<()> {
    let cluster = example_cluster_with(&["--datapath-log", "debug"])?;
    let node = &cluster.node;
    let attacker = node.pod(CLIENTS[0].0);
    // Claim another pod's address on the attacker's eth0 and send from it.
    let socket = attacker.spoofing_socket(CLIENTS[1].1, 0)?;
    for _ in 0..3 {
        socket.send_to(b"spoofed", UDP_FRONTEND)?;
    }
    let spoofed = || -> Result<u64> {
        let counters = node.maps()?.counters()?;
        Ok(counters[ferrite_common::stat::DROP_SPOOFED as usize].packets)
    };
    ferrite_tests::lab::wait_until(
        "3 spoofed packets counted",
        ferrite_tests::lab::SETTLE,
        || spoofed().map(|n| n >= 3).unwrap_or(false),
    )?;
    let agent = node.agent.as_ref().expect("agent runs");
    ferrite_tests::lab::wait_until(
        "the drop in the agent log",
        ferrite_tests::lab::SETTLE,
        || agent.log_text().contains("drop: reason drop_spoofed"),
    )
    .inspect_err(|_| eprintln!("agent log:\n{}", agent.log_text()))?;
    // The victim's own traffic is unaffected.
    let (reply, _) = node
        .pod(CLIENTS[1].0)
        .udp_request(UDP_FRONTEND, "genuine")?;
    answered_by(&reply, "genuine")?;
    Ok(())
}

/// Maps that kept a deleted backend (cilium#7930): an entry altered
/// behind the agent's back shows in `ferrite inspect diff`, and the agent's periodic
/// check logs it and puts it back.
#[test]
fn drift_made_behind_the_agents_back_shows_in_inspect_diff_and_is_repaired() -> Result<()> {
    let cluster = example_cluster()?;
    let node = &cluster.node;
    let diff = || node.inspect_diff(&[]);
    let diff_json = || node.inspect_diff(&["-o", "json"]);
    assert!(diff()?.starts_with("no drift"), "{}", diff()?);
    assert_eq!(diff_json()?.trim(), "[]");

    // Someone points a backend at another port with bpftool-like access.
    let mut maps = node.maps()?;
    let (id, backend) = maps
        .contents()?
        .backends
        .into_iter()
        .find(|(_, b)| b.port == TCP_TARGET)
        .expect("a TCP backend");
    maps.backends.insert(
        id,
        ferrite_common::Backend {
            port: 9999,
            ..backend
        },
        0,
    )?;
    let shown = diff()?;
    assert!(
        shown.contains("entries differ") && shown.contains(&format!("backend {id}")),
        "{shown}"
    );
    let pending: serde_json::Value = serde_json::from_str(&diff_json()?)?;
    assert!(
        pending
            .as_array()
            .is_some_and(|writes| writes.iter().any(|w| {
                w["map"] == ferrite_common::map_names::BACKENDS && w["action"] == "write"
            })),
        "{pending:#}"
    );
    // The agent knows which id it wrote: it repairs the entry in place.
    node.wait_for_maps("the agent to repair the backend", |c| {
        c.backends.get(&id) == Some(&backend)
    })?;
    let log = node.agent.as_ref().expect("agent").log_text();
    assert!(log.contains("maps drifted"), "{log}");
    assert!(diff()?.starts_with("no drift"));
    assert_eq!(diff_json()?.trim(), "[]");
    Ok(())
}

/// Syncs that change routes (nodes join and leave) move the route epoch the datapath
/// caches lookups under; the agent records the epoch it wrote, so the full resyncs
/// after them find nothing drifted (they used to log and count `ferrite_config`
/// drift after every such sync).
#[test]
fn syncs_that_move_the_route_epoch_leave_no_drift_for_the_resyncs() -> Result<()> {
    let cluster = example_cluster()?;
    let node = &cluster.node;
    let this = node_yaml(&node.name, "198.51.100.1".parse()?, "10.244.0.0/24");
    let base = format!("{}---\n{this}", cluster::example_for(&node.name));
    let epoch = |m: &ferrite_agent::plan::MapContents| m.config.route_epoch;
    let mut last = epoch(&node.maps()?.contents()?);
    for i in 0..4u8 {
        let other = node_yaml(
            &format!("{}-peer", node.name),
            std::net::Ipv4Addr::new(198, 51, 100, 50 + i),
            &format!("10.244.{}.0/24", 50 + i),
        );
        node.write_config(&format!("{base}---\n{other}"))?;
        node.wait_for_maps("the peer's route and a new epoch", |m| {
            m.pod_routes() == 2 && epoch(m) != last
        })?;
        last = epoch(&node.maps()?.contents()?);
    }
    let syncs = node.metric("ferrite_syncs_total")?;
    ferrite_tests::lab::wait_until("two more full resyncs", ferrite_tests::lab::SETTLE, || {
        node.metric("ferrite_syncs_total")
            .is_ok_and(|n| n >= syncs + 2.0)
    })?;
    let (_, metrics) = node.agent_http("/metrics")?;
    let drifted: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("ferrite_drift_repairs_total") && !l.ends_with(" 0"))
        .collect();
    assert!(drifted.is_empty(), "{drifted:?}");
    let log = node.agent.as_ref().expect("agent").log_text();
    assert!(!log.contains("maps drifted"), "{log}");
    Ok(())
}

/// A Service scaled to zero and back blackholed UDP for hours (kubernetes#48370):
/// one UDP client socket (one 5-tuple) keeps sending to the ClusterIP
/// while its backend is replaced, the Service drops to no endpoints, and comes back.
/// It gets answers from whatever backend is current after each change, and no
/// conntrack entry ever names a backend that is gone.
#[test]
fn a_udp_client_follows_its_service_through_backend_churn_and_scale_to_zero() -> Result<()> {
    let cluster = example_cluster()?;
    let node = &cluster.node;
    let client = node.pod(CLIENTS[0].0);
    let socket = client
        .netns
        .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    socket.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
    let mut sequence = 0;
    let ask = |sequence: &mut u32| -> Option<String> {
        *sequence += 1;
        let request = format!("udp churn {sequence}");
        socket.send_to(request.as_bytes(), UDP_FRONTEND).ok()?;
        let mut buf = [0u8; 512];
        // A late answer to an earlier request (a loaded machine) is skipped, not
        // taken for this one's.
        loop {
            let (n, _) = socket.recv_from(&mut buf).ok()?;
            if let Ok(name) = answered_by(&String::from_utf8_lossy(&buf[..n]), &request) {
                return Some(name);
            }
        }
    };
    let no_stale_conntrack = || -> Result<()> {
        let maps = node.maps()?;
        let backends = maps.contents()?.backends;
        for (key, value) in maps.conntrack_entries()? {
            let service_flow = value.backend_id != 0;
            anyhow::ensure!(
                !service_flow || backends.contains_key(&value.backend_id),
                "conntrack entry {key:?} names backend {} which is gone",
                value.backend_id
            );
        }
        Ok(())
    };
    // Every step: only this backend (or none) is ready; the same socket keeps asking.
    for (step, ready) in [
        Some(BACKENDS[0]),
        Some(BACKENDS[1]),
        None,
        Some(BACKENDS[2]),
    ]
    .into_iter()
    .enumerate()
    {
        let ips: Vec<_> = ready.iter().map(|(_, ip)| *ip).collect();
        let syncs_before = node.metric("ferrite_syncs_total")?;
        node.write_config(&cluster::example_with_backends(&node.name, &ips))?;
        node.wait_for_maps("the UDP Service to have the step's backend", |m| {
            let key =
                |slot| ServiceKey::new(*UDP_FRONTEND.ip(), UDP_FRONTEND.port(), PROTO_UDP, slot);
            let count = m.services.get(&key(0)).map(|v| v.count as usize);
            let first = m
                .services
                .get(&key(1))
                .and_then(|slot| m.backends.get(&slot.backend_id))
                .map(|b| std::net::Ipv4Addr::from(b.address));
            count == Some(ips.len()) && (ips.is_empty() || first == Some(ips[0]))
        })?;
        // The maps show the new backend before the sync ends: it still purges the
        // flows of removed backends, and a request sent in between could take one.
        ferrite_tests::lab::wait_until(
            "the step's sync to end",
            ferrite_tests::lab::SETTLE,
            || {
                node.metric("ferrite_syncs_total")
                    .is_ok_and(|syncs| syncs > syncs_before)
            },
        )?;
        match ready {
            Some((name, _)) => {
                let answered = (0..50).find_map(|_| ask(&mut sequence));
                assert_eq!(answered.as_deref(), Some(name), "step {step}");
                // Once moved, it stays on the current backend.
                for _ in 0..5 {
                    assert_eq!(ask(&mut sequence).as_deref(), Some(name), "step {step}");
                }
            }
            None => assert_eq!(ask(&mut sequence), None, "no endpoints, no answer"),
        }
        no_stale_conntrack()?;
    }
    Ok(())
}

/// A full services map silently broke Services (cilium#12815): with
/// `ferrite_service` sized for exactly the example, a new Service is refused whole
/// with a log line naming the map and the Service, the example keeps working, and
/// later changes still apply.
#[test]
fn a_full_services_map_refuses_the_new_service_loudly_and_keeps_the_others() -> Result<()> {
    let cluster = example_cluster_with(&["--map-capacity", "ferrite_service=8"])?;
    let node = &cluster.node;
    let extra = std::net::Ipv4Addr::new(10, 96, 0, 20);
    let with_extra = |backends: &[std::net::Ipv4Addr]| {
        format!(
            "{}---\n{}",
            cluster::example_with_backends(&node.name, backends),
            cluster::service_yaml("extra", extra, &[BACKENDS[0].1])
        )
    };
    let all: Vec<_> = BACKENDS.iter().map(|(_, ip)| *ip).collect();
    node.write_config(&with_extra(&all))?;
    let agent = node.agent.as_ref().expect("agent");
    ferrite_tests::lab::wait_until(
        "the agent to refuse the extra Service",
        ferrite_tests::lab::SETTLE,
        || {
            agent
                .log_text()
                .contains("ferrite_service is full (8 entries)")
        },
    )?;
    let log = agent.log_text();
    assert!(log.contains("default/extra:http"), "{log}");
    let pinned = node.pin_dir().join(ferrite_common::map_names::SERVICES);
    let shown = sh(
        "bpftool",
        &["map", "show", "pinned", pinned.to_str().unwrap()],
    )?;
    assert!(shown.contains("max_entries 8"), "{shown}");
    let maps = node.maps()?.contents()?;
    assert_eq!(maps.services.len(), 8);
    assert!(!maps.services.keys().any(|k| k.address == extra.octets()));
    // `inspect diff` plans for the maps as they were created: no drift (with the
    // default capacity it would want to write the refused Service).
    let diff = node.inspect_diff(&[])?;
    assert!(diff.starts_with("no drift"), "{diff}");
    // The example still answers, and still follows changes.
    let client = node.pod(CLIENTS[0].0);
    answered_by(
        &client.tcp_request(TCP_FRONTEND, "still here")?,
        "still here",
    )?;
    node.write_config(&with_extra(&all[..2]))?;
    node.wait_for_maps("the example down to 2 backends", |m| {
        tcp_master_count(m) == Some(2)
    })?;
    answered_by(&client.tcp_request(TCP_FRONTEND, "after")?, "after")?;
    Ok(())
}

/// Once the datapath is loaded the agent keeps only CAP_BPF and
/// CAP_NET_ADMIN, in every thread and in the bounding set (so the `ip` and `nft` it
/// runs get no more), and it goes on syncing.
#[test]
fn the_running_agent_holds_only_bpf_and_net_admin() -> Result<()> {
    let cluster = example_cluster()?;
    let node = &cluster.node;
    let pid = node.agent.as_ref().expect("agent").pid();
    // `nsenter` execs the agent: its pid is the agent's.
    const BPF_AND_NET_ADMIN: &str = "0000008000001000";
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            let value = status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{set}:")))
                .map(str::trim);
            assert_eq!(value, Some(BPF_AND_NET_ADMIN), "{set} of a thread of {pid}");
        }
        threads += 1;
    }
    assert!(threads >= 2, "the HTTP thread too ({threads} threads)");
    // Still syncing with what it kept.
    node.write_config(&cluster::example_with_backends(
        &node.name,
        &[BACKENDS[0].1],
    ))?;
    node.wait_for_maps("the TCP Service down to 1 backend", |m| {
        tcp_master_count(m) == Some(1)
    })?;
    Ok(())
}

#[test]
fn finished_flows_leave_the_conntrack_map_and_live_ones_stay() -> Result<()> {
    let mut cluster = example_cluster()?;
    // Collect garbage every second (it runs with each full resync).
    cluster.node.resync_seconds = 1;
    cluster.node.kill_agent()?;
    cluster.node.start_agent()?;
    let client = cluster.node.pod(CLIENTS[0].0);
    let mut live = Vec::new();
    for i in 0..3 {
        let mut stream = client.tcp_connect(TCP_FRONTEND)?;
        let request = format!("live {i}");
        let backend = answered_by(&exchange(&mut stream, &request)?, &request)?;
        live.push((stream, backend));
    }
    for i in 0..20 {
        let request = format!("short {i}");
        answered_by(&client.tcp_request(TCP_FRONTEND, &request)?, &request)?;
    }
    let entries = || -> Result<usize> { Ok(cluster.node.maps()?.conntrack_entries()?.len()) };
    assert!(entries()? >= 2 * 23, "every flow has its two entries");
    // Closed both ways: gone 10 s after their last packet; the open ones stay,
    // although idle all that time.
    ferrite_tests::lab::wait_until(
        "closed flows to be collected",
        std::time::Duration::from_secs(40),
        || entries().is_ok_and(|n| n == 2 * live.len()),
    )?;
    for (i, (stream, backend)) in live.iter_mut().enumerate() {
        let request = format!("live {i} after collection");
        assert_eq!(
            &answered_by(&exchange(stream, &request)?, &request)?,
            backend
        );
    }
    Ok(())
}

#[test]
fn connections_sharing_a_client_port_and_a_backend_each_get_their_own_answers() -> Result<()> {
    let cluster = example_cluster()?;
    let node = &cluster.node;
    let (client_name, client_ip) = CLIENTS[0];
    let client = &node.pod(client_name).netns;
    let from = SocketAddrV4::new(client_ip, 41000);
    // Through the Service, kept open.
    let mut via_service = tcp_from_port(client, from, TCP_FRONTEND)?;
    let backend = answered_by(&exchange(&mut via_service, "via the vip")?, "via the vip")?;
    let backend_ip = BACKENDS.iter().find(|(n, _)| *n == backend).unwrap().1;
    // A second Service whose only backend is that one.
    let other_vip = std::net::Ipv4Addr::new(10, 96, 7, 7);
    node.write_config(&format!(
        "{}---\n{}",
        cluster::example_for(&node.name),
        cluster::service_yaml("other", other_vip, &[backend_ip])
    ))?;
    node.wait_for_sync(4, 5)?;
    // The same client port straight to that backend, and through the other Service:
    // all three flows share the reply tuple backend:8080 -> client:41000. Linux NAT
    // remaps the later flows' source port; so does the datapath, and each socket gets
    // its own answers.
    let direct = SocketAddrV4::new(backend_ip, TCP_TARGET);
    let mut direct_stream = tcp_from_port(client, from, direct)?;
    let mut via_other = tcp_from_port(client, from, SocketAddrV4::new(other_vip, 80))?;
    for round in 0..3 {
        for (stream, what) in [
            (&mut direct_stream, "direct"),
            (&mut via_service, "via the vip"),
            (&mut via_other, "via the other vip"),
        ] {
            let request = format!("{what} {round}");
            let (name, seen_as) = parse_answer(&exchange(stream, &request)?, &request)?;
            assert_eq!((name, seen_as), (backend.clone(), client_ip.to_string()));
        }
    }
    let counters = node.maps()?.counters()?;
    assert_eq!(
        counters[ferrite_common::stat::PORT_REMAPPED as usize].packets,
        2
    );
    // A port whose Service connection to that backend closed is reused straight to
    // the backend: the closing flow's tuple is reopened, not remapped. (Another port
    // than above: the client's own TIME_WAIT of the direct connection would refuse.)
    drop((via_service, direct_stream, via_other));
    let other_port = SocketAddrV4::new(client_ip, 41001);
    let mut once = tcp_from_port(client, other_port, SocketAddrV4::new(other_vip, 80))?;
    answered_by(&exchange(&mut once, "once")?, "once")?;
    drop(once);
    let mut again = tcp_from_port(client, other_port, direct)?;
    assert_eq!(
        answered_by(&exchange(&mut again, "again")?, "again")?,
        backend
    );
    let counters = node.maps()?.counters()?;
    assert_eq!(
        counters[ferrite_common::stat::PORT_REMAPPED as usize].packets,
        2
    );
    assert_eq!(
        counters[ferrite_common::stat::CT_REOPENED as usize].packets,
        1
    );
    Ok(())
}

#[test]
fn drift_is_repaired_on_schedule_even_while_the_cluster_keeps_changing() -> Result<()> {
    let cluster = example_cluster()?;
    let node = &cluster.node;
    let udp_master = ServiceKey::new(*UDP_FRONTEND.ip(), UDP_FRONTEND.port(), PROTO_UDP, 0);
    node.maps()?.services.remove(&udp_master)?;
    // A change every 300 ms: each is an event-driven sync, which diffs against what the
    // agent wrote and cannot see the drift; the full resync (every 2 s here) must still
    // come, and repair it.
    let base = cluster::example_for(&node.name);
    let churn_vip = |round: u8| std::net::Ipv4Addr::new(10, 96, 5, round);
    let mut round = 0u8;
    let mut write_error = None;
    ferrite_tests::lab::wait_until(
        "a full resync to repair the deleted entry",
        std::time::Duration::from_secs(20),
        || {
            round = round.wrapping_add(1);
            let extra = cluster::service_yaml("churn", churn_vip(round), &[BACKENDS[0].1]);
            if let Err(e) = node.write_config(&format!("{base}---\n{extra}")) {
                write_error = Some(e);
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
            node.maps()
                .is_ok_and(|m| m.services.get(&udp_master, 0).is_ok())
        },
    )?;
    if let Some(e) = write_error {
        return Err(e.context("writing the churned config"));
    }
    // The churn did run through the agent: several rounds, the last one applied.
    assert!(round >= 3, "only {round} rounds of churn");
    let last = churn_vip(round);
    node.wait_for_maps("the last churn round's Service", |m| {
        m.services.keys().any(|k| k.address == last.octets())
            && m.services
                .keys()
                .filter(|k| k.address[..3] == [10, 96, 5])
                .all(|k| k.address == last.octets())
    })?;
    Ok(())
}
