//! `ferrite explain` against a running node (the real binary, `-o json`, in the
//! node's network namespace): what it says a packet gets is what the same packet then
//! gets for real (the server that answers, the counter that moves), and explaining
//! changes nothing in the maps. Needs root; each test builds its own uniquely named
//! node and removes it on every path.
use std::{
    net::{Ipv4Addr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use anyhow::{Context, Result};
use ferrite_agent::maps::NodeMaps;
use ferrite_common::{
    stat, AffinityKey, AffinityValue, Counter, CtKey, CtValue, Endpoint6Key, LbStatKey,
};
use ferrite_tests::{
    cluster::{
        self, load_balancer_yaml, BACKENDS, CLIENTS, TCP_FRONTEND, TCP_TARGET, UDP_FRONTEND,
        UDP_TARGET,
    },
    lab::{
        answered_by, exchange, parse_answer, pod_ip, pod_ip6, sh, tcp_from_port, wait_until,
        Cluster, Node, Server, SETTLE, WORLD_IP,
    },
};
use serde_json::Value;

struct ExampleCluster {
    _servers: Vec<Server>,
    node: Node,
}

/// The example cluster, plus `extra` objects (YAML documents), synced.
fn example_cluster(extra: &str, services: usize) -> Result<ExampleCluster> {
    let (mut node, servers) = cluster::example_node("expl")?;
    node.write_config(&format!("{}{extra}", cluster::example_for(&node.name)))?;
    node.start_agent()?;
    node.wait_for_sync(services, 5)?;
    Ok(ExampleCluster {
        _servers: servers,
        node,
    })
}

/// What an explain run must leave alone: every conntrack entry (accounting
/// included), affinity pin and Service/backend counter, and the counters it names.
#[derive(Debug, PartialEq)]
struct State {
    conntrack: Vec<(CtKey, CtValue)>,
    affinity: Vec<(AffinityKey, AffinityValue)>,
    lb_counters: Vec<(LbStatKey, Counter)>,
    counters: Vec<(&'static str, u64)>,
}

fn counter(maps: &NodeMaps, name: &str) -> Result<u64> {
    let index = stat::NAMES
        .iter()
        .position(|n| *n == name)
        .with_context(|| format!("no counter {name}"))?;
    Ok(maps.counters()?[index].packets)
}

fn state(node: &Node, counters: &[&'static str]) -> Result<State> {
    let maps = node.maps()?;
    let mut conntrack = maps.conntrack_entries()?;
    conntrack.sort_by_key(|(k, _)| *k);
    let mut affinity = maps.affinity.iter().collect::<Result<Vec<_>, _>>()?;
    affinity.sort_by_key(|(k, _)| *k);
    let mut lb_counters = maps.lb_counters()?;
    lb_counters.sort_by_key(|(k, _)| *k);
    let counters = counters
        .iter()
        .map(|name| Ok((*name, counter(&maps, name)?)))
        .collect::<Result<_>>()?;
    Ok(State {
        conntrack,
        affinity,
        lb_counters,
        counters,
    })
}

/// The counter names an explanation says a real packet bumps (all its runs).
fn counted(explanation: &Value) -> Vec<&'static str> {
    let named: Vec<String> = explanation["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|run| run["counted"].as_array().cloned().unwrap_or_default())
        .filter_map(|name| name.as_str().map(str::to_string))
        .collect();
    stat::NAMES
        .iter()
        .copied()
        .filter(|name| named.iter().any(|n| n == name))
        .collect()
}

/// Explain `args` on `node`, checking that the maps are the same before and after
/// (the counters it names included).
fn explain_unchanged(node: &Node, args: &[&str]) -> Result<Value> {
    // The counters are only known from the explanation: explained twice, the state
    // is compared around the second run.
    let first = node.explain(args)?;
    let names = counted(&first);
    assert!(!names.is_empty(), "nothing counted: {first:#}");
    let before = state(node, &names)?;
    let explanation = node.explain(args)?;
    assert_eq!(before, state(node, &names)?, "explaining changed the maps");
    assert_eq!(explanation["verdict"], first["verdict"]);
    Ok(explanation)
}

fn backend_name(address: &str) -> Result<&'static str> {
    let ip: Ipv4Addr = address.split(':').next().context("address")?.parse()?;
    BACKENDS
        .iter()
        .find(|(_, backend)| *backend == ip)
        .map(|(name, _)| *name)
        .with_context(|| format!("{address} is no backend"))
}

#[test]
fn a_pod_to_cluster_ip_flow_is_explained_new_then_established_as_it_really_goes() -> Result<()> {
    let cluster = example_cluster("", 2)?;
    let node = &cluster.node;
    let (client, client_ip) = CLIENTS[0];
    let from = SocketAddrV4::new(client_ip, 41001);
    let args = ["--from", "10.244.0.2:41001", "--to", "10.96.0.10:80/tcp"];
    let new = explain_unchanged(node, &args)?;
    assert_eq!(new["verdict"]["action"], "to_pod", "{new:#}");
    let run = &new["runs"][0];
    assert_eq!(run["conntrack"], "miss: a new flow");
    assert!(run["anti_spoofing"]
        .as_str()
        .unwrap_or("")
        .starts_with("passed"));
    assert_eq!(run["frontend"]["address"], "10.96.0.10:80/tcp");
    assert_eq!(run["output"]["checksums_valid"], true);
    let predicted = backend_name(new["backend"]["address"].as_str().context("backend")?)?;

    // The same flow for real: the predicted backend answers.
    let pod = node.pod(client);
    let mut stream = tcp_from_port(&pod.netns, from, TCP_FRONTEND)?;
    let answered = answered_by(&exchange(&mut stream, "first")?, "first")?;
    assert_eq!(answered, predicted);

    // Established now: conntrack holds it, and says the same backend.
    let established = explain_unchanged(node, &args)?;
    let run = &established["runs"][0];
    assert!(
        run["conntrack"]
            .as_str()
            .unwrap_or("")
            .starts_with("hit: the forward entry"),
        "{established:#}"
    );
    assert_eq!(established["backend"]["address"], new["backend"]["address"]);
    assert_eq!(established["verdict"]["action"], "to_pod");
    assert_eq!(
        answered_by(&exchange(&mut stream, "again")?, "again")?,
        predicted
    );
    Ok(())
}

#[test]
fn a_spoofed_source_is_explained_as_the_drop_a_real_one_gets() -> Result<()> {
    let cluster = example_cluster("", 2)?;
    let node = &cluster.node;
    let pod = node.pod(CLIENTS[0].0);
    let spoofed = Ipv4Addr::new(10, 244, 0, 99);
    let explanation = explain_unchanged(
        node,
        &[
            "--from",
            "10.244.0.99:41002",
            "--to",
            "10.96.0.10:53/udp",
            "--veth",
            &pod.host_interface,
        ],
    )?;
    assert_eq!(explanation["verdict"]["action"], "drop");
    assert_eq!(explanation["verdict"]["drop_reason"], "drop_spoofed");
    assert!(explanation["runs"][0]["anti_spoofing"]
        .as_str()
        .unwrap_or("")
        .starts_with("failed"));

    // For real: the pod sends from an address that is not its own.
    let before = counter(&node.maps()?, "drop_spoofed")?;
    let socket = pod.spoofing_socket(spoofed, 41002)?;
    socket.send_to(b"spoofed", UDP_FRONTEND)?;
    wait_until(
        "the spoofed datagram dropped",
        Duration::from_secs(5),
        || {
            node.maps()
                .and_then(|m| counter(&m, "drop_spoofed"))
                .is_ok_and(|n| n > before)
        },
    )?;
    Ok(())
}

#[test]
fn a_service_without_backends_is_explained_as_refused_and_a_real_connect_is_refused() -> Result<()>
{
    let empty = cluster::service_yaml("empty", Ipv4Addr::new(10, 96, 0, 20), &[]);
    let cluster = example_cluster(&format!("---\n{empty}"), 4)?;
    let node = &cluster.node;
    let explanation = explain_unchanged(
        node,
        &["--from", "10.244.0.3:41003", "--to", "10.96.0.20:80/tcp"],
    )?;
    assert_eq!(
        explanation["verdict"]["action"], "bounce",
        "{explanation:#}"
    );
    let run = &explanation["runs"][0];
    assert_eq!(run["frontend"]["backends"], 0);
    assert!(run["output"]["icmp"]
        .as_str()
        .unwrap_or("")
        .contains("port unreachable"));
    assert!(counted(&explanation).contains(&"service_rejected"));

    let before = counter(&node.maps()?, "service_rejected")?;
    let pod = node.pod(CLIENTS[1].0);
    let refused = tcp_from_port(
        &pod.netns,
        SocketAddrV4::new(CLIENTS[1].1, 41003),
        SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 80),
    )
    .err()
    .context("the connect succeeded")?;
    let refused = refused
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind);
    assert_eq!(refused, Some(std::io::ErrorKind::ConnectionRefused));
    assert_eq!(counter(&node.maps()?, "service_rejected")?, before + 1);
    Ok(())
}

#[test]
fn a_socket_call_is_explained_with_the_socket_level_choice_and_refusal() -> Result<()> {
    let empty = cluster::service_yaml("empty", Ipv4Addr::new(10, 96, 0, 20), &[]);
    let cluster = example_cluster(&format!("---\n{empty}"), 4)?;
    let node = &cluster.node;
    let socket = |to: &str, cookie: &str| {
        [
            "--socket",
            "--from",
            "10.244.0.2",
            "--to",
            to,
            "--cookie",
            cookie,
        ]
        .map(str::to_string)
    };
    let args = socket("10.96.0.10:80/tcp", "7");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let translated = explain_unchanged(node, &args)?;
    assert_eq!(
        translated["verdict"]["action"], "translated",
        "{translated:#}"
    );
    backend_name(
        translated["backend"]["address"]
            .as_str()
            .context("backend")?,
    )?;
    assert!(counted(&translated).contains(&"sock_translated"));
    // Hashed over the cookie: each cookie its backend, every backend some cookie's.
    let mut chosen = std::collections::BTreeSet::new();
    for cookie in 1..=24 {
        let args = socket("10.96.0.10:80/tcp", &cookie.to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let explanation = node.explain(&args)?;
        chosen.insert(explanation["backend"]["address"].to_string());
    }
    assert_eq!(chosen.len(), BACKENDS.len(), "{chosen:?}");
    let args = socket("10.96.0.20:80/tcp", "7");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused = explain_unchanged(node, &args)?;
    assert_eq!(refused["verdict"]["action"], "refused");
    assert_eq!(refused["verdict"]["drop_reason"], "sock_refused");

    // For real, from a process of the pod (in the node's cgroup: socket-level LB).
    let probe = node.pod(CLIENTS[0].0).probe();
    let before = counter(&node.maps()?, "sock_translated")?;
    let outcome = probe.tcp(TCP_FRONTEND, "via the socket")?;
    let answered = answered_by(outcome.answer()?, "via the socket")?;
    assert!(BACKENDS.iter().any(|(name, _)| *name == answered));
    assert_eq!(counter(&node.maps()?, "sock_translated")?, before + 1);
    let before = counter(&node.maps()?, "sock_refused")?;
    let outcome = probe.tcp(
        SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 80),
        "nobody",
    )?;
    assert_eq!(outcome.error.as_deref(), Some("refused"), "{outcome:?}");
    assert_eq!(counter(&node.maps()?, "sock_refused")?, before + 1);
    Ok(())
}

#[test]
fn the_table_names_every_step_and_hex_shows_the_frame() -> Result<()> {
    let cluster = example_cluster("", 2)?;
    let node = &cluster.node;
    let table =
        node.explain_text(&["--from", "10.244.0.2", "--to", "10.96.0.10:80/tcp", "--hex"])?;
    println!("{table}");
    for label in [
        "ferrite_from_pod at tcx ingress",
        "anti-spoofing",
        "conntrack",
        "frontend",
        "backend",
        "packet out",
        "checksums valid",
        "verdict",
        "frame out",
        "=> to_pod",
    ] {
        assert!(table.contains(label), "no {label:?} in:\n{table}");
    }
    Ok(())
}

/// Two nodes: a client pod `c0` on node 0, a server pod `b0` on node 1, the backend of
/// a LoadBalancer Service (NodePort 30080, LoadBalancer IP 192.0.2.100 routed to node
/// 0 and admitting 198.18.0.0/15 only) and of an `externalTrafficPolicy: Local` one
/// (NodePort 30090), neither with an endpoint on node 0.
struct TwoNodes {
    _servers: Vec<Server>,
    cluster: Cluster,
}

const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);

fn two_nodes(agent_args: &[&str]) -> Result<TwoNodes> {
    let mut cluster = Cluster::new(2)?;
    for node in &mut cluster.nodes {
        node.agent_args
            .extend(agent_args.iter().map(ToString::to_string));
    }
    cluster.nodes[0].add_pod("c0", pod_ip(0, 5))?;
    cluster.nodes[1].add_pod("b0", pod_ip(1, 0))?;
    let servers = vec![
        cluster.pod("b0").serve(TCP_TARGET)?,
        cluster.pod("b0").serve(UDP_TARGET)?,
    ];
    let via = cluster.nodes[0].ip.context("plugged")?.to_string();
    let world = cluster.world.name.clone();
    sh(
        "ip",
        &[
            "-n",
            &world,
            "route",
            "add",
            &LB_IP.to_string(),
            "via",
            &via,
        ],
    )?;
    let b0 = (cluster.pod("b0").ip, cluster.nodes[1].name.as_str());
    let shop = load_balancer_yaml(
        "shop",
        Ipv4Addr::new(10, 96, 0, 80),
        80,
        30080,
        "  loadBalancerSourceRanges: [\"198.18.0.0/15\"]\n",
        &[LB_IP],
        &[b0],
    );
    let local = load_balancer_yaml(
        "local",
        Ipv4Addr::new(10, 96, 0, 90),
        80,
        30090,
        "  externalTrafficPolicy: Local\n",
        &[],
        &[b0],
    );
    cluster.write_config(&format!(
        "{}---\n{shop}---\n{local}",
        cluster.nodes_and_pods_yaml()
    ))?;
    cluster.start_agents()?;
    for node in &cluster.nodes {
        node.wait_for_maps("both Services' frontends and the routes", |m| {
            m.pod_routes() == 2
                && m.services
                    .iter()
                    .filter(|(k, v)| {
                        k.backend_slot == 0 && v.flags & ferrite_common::svc_flag::EXTERNAL != 0
                    })
                    .count()
                    >= 5
        })?;
    }
    Ok(TwoNodes {
        _servers: servers,
        cluster,
    })
}

#[test]
fn pod_to_pod_across_nodes_is_explained_on_both_as_it_really_goes() -> Result<()> {
    let env = two_nodes(&[])?;
    let c = &env.cluster;
    let (c0, b0) = (c.pod("c0"), c.pod("b0"));
    let from = SocketAddrV4::new(c0.ip, 41020);
    let to = SocketAddrV4::new(b0.ip, TCP_TARGET);
    let (from_arg, to_arg) = (from.to_string(), format!("{to}/tcp"));
    let sent = explain_unchanged(&c.nodes[0], &["--from", &from_arg, "--to", &to_arg])?;
    assert_eq!(sent["verdict"]["action"], "redirect", "{sent:#}");
    let node1 = c.nodes[1].ip.context("plugged")?.to_string();
    assert_eq!(sent["verdict"]["node"], node1.as_str());
    assert!(counted(&sent).contains(&"sent_to_node"));
    let received = explain_unchanged(
        &c.nodes[1],
        &["--ingress", "overlay", "--from", &from_arg, "--to", &to_arg],
    )?;
    assert_eq!(received["verdict"]["action"], "to_pod", "{received:#}");
    assert!(counted(&received).contains(&"received_from_node"));

    let mut stream = tcp_from_port(&c0.netns, from, to)?;
    assert_eq!(answered_by(&exchange(&mut stream, "hi")?, "hi")?, "b0");
    Ok(())
}

/// On the lab's veth uplinks the default balances at the uplink's tcx ingress: the
/// explanation runs that program alone.
#[test]
fn world_traffic_is_explained_snat_source_ranges_and_local_policy_as_it_really_goes() -> Result<()>
{
    world_traffic_is_explained_as_it_really_goes(&[], &["ferrite_from_uplink"])
}

/// With XDP on the uplink: the XDP program, then (for what it passes) the tcx one.
#[test]
fn world_traffic_through_xdp_is_explained_as_it_really_goes() -> Result<()> {
    world_traffic_is_explained_as_it_really_goes(
        &["--xdp", "always"],
        &["ferrite_from_world", "ferrite_from_uplink"],
    )
}

fn programs(explanation: &Value) -> Vec<&str> {
    explanation["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|run| run["program"].as_str())
        .collect()
}

fn world_traffic_is_explained_as_it_really_goes(
    agent_args: &[&str],
    passed_through: &[&str],
) -> Result<()> {
    let env = two_nodes(agent_args)?;
    let c = &env.cluster;
    let node0 = c.nodes[0].ip.context("plugged")?;

    // NodePort whose only backend is on the other node: DNAT, SNAT to this node,
    // over the overlay.
    let from = SocketAddrV4::new(WORLD_IP, 41021);
    let node_port = SocketAddrV4::new(node0, 30080);
    let explanation = explain_unchanged(
        &c.nodes[0],
        &[
            "--ingress",
            "world",
            "--from",
            &from.to_string(),
            "--to",
            &format!("{node_port}/tcp"),
        ],
    )?;
    let b0 = SocketAddrV4::new(c.pod("b0").ip, TCP_TARGET).to_string();
    assert_eq!(
        explanation["backend"]["address"],
        b0.as_str(),
        "{explanation:#}"
    );
    assert_eq!(explanation["verdict"]["action"], "redirect");
    assert_eq!(programs(&explanation), passed_through);
    let snat = explanation["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|run| run["snat"].as_str())
        .context("no SNAT")?
        .to_string();
    assert!(snat.starts_with(&format!("{node0}:")), "{snat}");
    let mut stream = tcp_from_port(&c.world, from, node_port)?;
    let (pod, client) = parse_answer(&exchange(&mut stream, "hello")?, "hello")?;
    assert_eq!((pod.as_str(), client), ("b0", node0.to_string()));

    // Denied by loadBalancerSourceRanges, and no local endpoint under policy Local.
    for (to, reason) in [
        (SocketAddrV4::new(LB_IP, 80), "drop_source_range"),
        (SocketAddrV4::new(node0, 30090), "drop_no_local_backend"),
    ] {
        let explanation = explain_unchanged(
            &c.nodes[0],
            &[
                "--ingress",
                "world",
                "--from",
                "203.0.113.10:41022",
                "--to",
                &format!("{to}/tcp"),
            ],
        )?;
        assert_eq!(explanation["verdict"]["action"], "drop", "{explanation:#}");
        assert_eq!(explanation["verdict"]["drop_reason"], reason);
        // Dropped by the first program on the way.
        assert_eq!(programs(&explanation), &passed_through[..1]);
        let before = counter(&c.nodes[0].maps()?, reason)?;
        let refused = tcp_from_port(&c.world, SocketAddrV4::new(WORLD_IP, 41022), to);
        assert!(refused.is_err(), "{to} answered");
        assert!(
            counter(&c.nodes[0].maps()?, reason)? > before,
            "{reason} did not move"
        );
    }
    Ok(())
}

/// Two dual-stack pods of a node and one of another node: IPv6 between the pods of
/// the node is explained as delivered into the server pod, and is; IPv6 from a
/// veth that is not the source's is the drop it really gets; IPv6 from the other
/// node's pod, explained at this node's overlay device, is checked against that
/// node's IPv6 pod CIDR and delivered, and is.
#[test]
fn ipv6_between_dual_stack_pods_is_explained_as_it_really_goes() -> Result<()> {
    const PORT6: u16 = 8087;
    let mut cluster = Cluster::new(2)?;
    cluster.dual_stack()?;
    let (web6, client6, remote6) = (pod_ip6(0, 0), pod_ip6(0, 1), pod_ip6(1, 0));
    cluster.nodes[0].add_dual_stack_pod("web", pod_ip(0, 0), web6)?;
    cluster.nodes[0].add_dual_stack_pod("client", pod_ip(0, 1), client6)?;
    cluster.nodes[1].add_dual_stack_pod("remote", pod_ip(1, 0), remote6)?;
    let web_at = SocketAddrV6::new(web6, PORT6, 0, 0);
    let _web = Server::start(&cluster.pod("web").netns, "web", web_at)?;
    cluster.write_config(&cluster.nodes_and_pods_yaml())?;
    cluster.start_agents()?;
    let node = &cluster.nodes[0];
    node.wait_for_maps("both pods' IPv6 addresses in ferrite_endpnt6", |m| {
        [web6, client6].iter().all(|ip| {
            m.endpoints6.contains_key(&Endpoint6Key {
                address: ip.octets(),
            })
        })
    })?;
    let to = format!("{web_at}/tcp");

    let from = SocketAddrV6::new(client6, 41030, 0, 0).to_string();
    let explanation = explain_unchanged(node, &["--from", &from, "--to", &to])?;
    assert_eq!(
        explanation["verdict"]["action"], "to_pod",
        "{explanation:#}"
    );
    let web = cluster.pod("web");
    assert_eq!(
        explanation["verdict"]["device"],
        web.host_interface.as_str()
    );
    let run = &explanation["runs"][0];
    assert_eq!(run["run_as"], "ferrite_explain_pod");
    assert!(run["anti_spoofing"]
        .as_str()
        .unwrap_or("")
        .starts_with("passed"));
    assert_eq!(run["output"]["destination"], web_at.to_string());
    assert_eq!(run["output"]["checksums_valid"], true);
    assert!(counted(&explanation).contains(&"delivered_local"));
    let table = node.explain_text(&["--from", &from, "--to", &to])?;
    eprintln!("{table}");
    assert!(
        table.contains(&format!("passed: {client6} is the pod behind this veth"))
            && table.contains(&format!("delivered into the pod {web6} behind")),
        "{table}"
    );
    // For real: the server answers the client's own address, delivered by the
    // datapath.
    let before = counter(&node.maps()?, "delivered_local")?;
    let client = cluster.pod("client");
    assert_eq!(
        client.tcp_request(web_at, "six")?,
        format!("web|{client6}|six")
    );
    assert!(counter(&node.maps()?, "delivered_local")? > before);

    // The client's address entering the web pod's veth: spoofed.
    let spoofed = explain_unchanged(
        node,
        &["--from", &from, "--to", &to, "--veth", &web.host_interface],
    )?;
    assert_eq!(
        spoofed["verdict"]["drop_reason"], "drop_spoofed",
        "{spoofed:#}"
    );

    // From the other node's pod, at this node's overlay device.
    let from = SocketAddrV6::new(remote6, 41031, 0, 0).to_string();
    let received = explain_unchanged(
        node,
        &["--ingress", "overlay", "--from", &from, "--to", &to],
    )?;
    assert_eq!(received["verdict"]["action"], "to_pod", "{received:#}");
    assert!(counted(&received).contains(&"received_from_node"));
    let before = counter(&node.maps()?, "received_from_node")?;
    let remote = cluster.pod("remote");
    wait_until("a TCP answer across nodes over IPv6", SETTLE, || {
        remote
            .tcp_request(web_at, "across")
            .is_ok_and(|answer| answer == format!("web|{remote6}|across"))
    })?;
    assert!(counter(&node.maps()?, "received_from_node")? > before);
    Ok(())
}
