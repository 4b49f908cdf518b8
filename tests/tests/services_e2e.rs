//! Cases of the Kubernetes "Services" e2e suite (test/e2e/network: service.go,
//! conntrack.go, loadbalancer.go), named after them, each run twice: the agents
//! reading a YAML file, and the agents watching an API server (the fake one, on the
//! node network) where every change is the watch events of the objects that changed.
//!
//! Two nodes: `a1` (node 0) serves TCP and UDP, `a2` (node 0) is the server pod the
//! UDP case cycles to, `c0` (node 0) and `c1` (node 1) are clients; the world is
//! outside the cluster. Needs root.
use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use ferrite_agent::plan::MapContents;
use ferrite_common::{ServiceKey, PROTO_TCP, PROTO_UDP};
use ferrite_tests::{
    cluster::{load_balancer_yaml, service_yaml, TCP_TARGET, UDP_TARGET},
    fake_apiserver::FakeApiServer,
    lab::{
        http_get, parse_answer, pod_ip, udp_ask, wait_until, Cluster, ObjectSource, Server, SETTLE,
        WORLD_GATEWAY, WORLD_IP,
    },
};

/// Two ClusterIPs served by `a1`: one always proxied, one whose labels the case changes.
const PROXIED: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 1);
const LABELLED: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 2);
/// A LoadBalancer (TCP 80 / UDP 81, nodePorts 30300 / 30301) whose endpoints the case sets.
const LB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 3);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 103);
const NODE_PORT: u16 = 30300;
const HEALTH_PORT: u16 = 32300;
/// The fixed source port of the UDP client that outlives its server pod.
const UDP_CLIENT_PORT: u16 = 40123;

struct Lab {
    _servers: Vec<Server>,
    cluster: Cluster,
}

impl Lab {
    /// Two nodes and their pods, the agents reading `source`, the cluster's objects
    /// those of `objects` (given the cluster, beside the Nodes and Pods), synced on
    /// every node.
    fn new(source: ObjectSource, objects: impl Fn(&Cluster) -> String) -> Result<Self> {
        let mut cluster = Cluster::new(2)?;
        if source == ObjectSource::Kubernetes {
            FakeApiServer::serve_cluster(&mut cluster)?;
        }
        cluster.nodes[0].add_pod("a1", pod_ip(0, 1))?;
        cluster.nodes[0].add_pod("a2", pod_ip(0, 2))?;
        cluster.nodes[0].add_pod("c0", pod_ip(0, 5))?;
        cluster.nodes[1].add_pod("c1", pod_ip(1, 5))?;
        let mut servers = Vec::new();
        for pod in ["a1", "a2"] {
            servers.push(cluster.pod(pod).serve(TCP_TARGET)?);
            servers.push(cluster.pod(pod).serve(UDP_TARGET)?);
        }
        let route = LB_IP.to_string();
        let via = cluster.nodes[0].ip.context("plugged")?.to_string();
        ferrite_tests::lab::sh(
            "ip",
            &[
                "-n",
                &cluster.world.name,
                "route",
                "add",
                &route,
                "via",
                &via,
            ],
        )?;
        let mut lab = Self {
            _servers: servers,
            cluster,
        };
        lab.set_objects(&objects)?;
        lab.cluster.start_agents()?;
        for node in &lab.cluster.nodes {
            node.wait_for_maps("both pod CIDRs", |m| m.pod_routes() == 2)?;
        }
        Ok(lab)
    }

    /// The cluster's objects are now the Nodes, the Pods and `objects`.
    fn set_objects(&self, objects: impl Fn(&Cluster) -> String) -> Result<()> {
        let c = &self.cluster;
        c.write_config(&format!("{}---\n{}", c.nodes_and_pods_yaml(), objects(c)))
    }

    fn node_ip(&self, index: usize) -> Ipv4Addr {
        self.cluster.nodes[index].ip.expect("plugged")
    }

    /// Wait until every node's maps pass `check`.
    fn wait_everywhere(&self, what: &str, check: impl Fn(&MapContents) -> bool) -> Result<()> {
        self.cluster
            .nodes
            .iter()
            .try_for_each(|node| node.wait_for_maps(what, &check))
    }
}

fn serves(maps: &MapContents, vip: Ipv4Addr) -> bool {
    maps.services
        .contains_key(&ServiceKey::new(vip, 80, PROTO_TCP, 0))
}

/// The ClusterIP Service `name` on `vip` served by `a1`, with `labels` (a flow map).
fn cluster_ip(c: &Cluster, name: &str, vip: Ipv4Addr, labels: &str) -> String {
    service_yaml(name, vip, &[c.pod("a1").ip]).replacen(
        &format!("metadata: {{name: {name}, namespace: default}}"),
        &format!("metadata: {{name: {name}, namespace: default, labels: {labels}}}"),
        1,
    )
}

/// Whether a pod on each node reaches `vip` over TCP (one request, answered by
/// `a1`), or gets nothing at all.
fn reachable_from_pods(lab: &Lab, vip: Ipv4Addr) -> Result<bool> {
    let mut reached = Vec::new();
    for client in ["c0", "c1"] {
        let request = format!("{client} to {vip}");
        let outcome = lab
            .cluster
            .pod(client)
            .probe()
            .tcp(SocketAddrV4::new(vip, 80), &request)?;
        match &outcome.reply {
            Some(reply) => {
                let (server, _) = parse_answer(reply, &request)?;
                ensure!(server == "a1", "{request}: answered by {server}");
                reached.push(true);
            }
            None => reached.push(false),
        }
    }
    ensure!(
        reached[0] == reached[1],
        "{vip}: reached from one node's pod only ({reached:?})"
    );
    Ok(reached[0])
}

/// service.go "should implement service.kubernetes.io/service-proxy-name" and
/// "should implement service.kubernetes.io/headless": a Service carrying `label` is
/// left to another proxy; taking the label off serves it, putting it back stops
/// that, and the unlabelled Service is served throughout.
fn a_labelled_service_is_left_alone_until_the_label_goes(
    source: ObjectSource,
    label: &str,
) -> Result<()> {
    let objects = |labelled: bool| {
        let label = if labelled {
            format!("{{{label}}}")
        } else {
            "{app: web}".to_string()
        };
        move |c: &Cluster| {
            [
                cluster_ip(c, "proxied", PROXIED, "{app: web}"),
                cluster_ip(c, "labelled", LABELLED, &label),
            ]
            .join("---\n")
        }
    };
    let lab = Lab::new(source, objects(true))?;
    lab.wait_everywhere("the unlabelled Service", |m| serves(m, PROXIED))?;
    ensure!(
        reachable_from_pods(&lab, PROXIED)?,
        "the unlabelled Service"
    );
    for node in &lab.cluster.nodes {
        ensure!(
            !serves(&node.maps()?.contents()?, LABELLED),
            "{}: the labelled Service has a frontend",
            node.name
        );
    }
    ensure!(
        !reachable_from_pods(&lab, LABELLED)?,
        "the labelled Service was served"
    );

    lab.set_objects(objects(false))?;
    lab.wait_everywhere("the Service, its label gone", |m| serves(m, LABELLED))?;
    ensure!(
        reachable_from_pods(&lab, LABELLED)?,
        "not served without the label"
    );

    lab.set_objects(objects(true))?;
    lab.wait_everywhere("the Service, labelled again", |m| !serves(m, LABELLED))?;
    ensure!(
        !reachable_from_pods(&lab, LABELLED)?,
        "still served with the label back"
    );
    ensure!(
        reachable_from_pods(&lab, PROXIED)?,
        "the unlabelled Service"
    );
    Ok(())
}

fn should_implement_service_proxy_name(source: ObjectSource) -> Result<()> {
    // The agents run without --service-proxy-name: Services naming any proxy are not theirs.
    a_labelled_service_is_left_alone_until_the_label_goes(
        source,
        "service.kubernetes.io/service-proxy-name: foo-bar",
    )
}

fn should_implement_service_kubernetes_io_headless(source: ObjectSource) -> Result<()> {
    a_labelled_service_is_left_alone_until_the_label_goes(
        source,
        "service.kubernetes.io/headless: \"\"",
    )
}

/// The LoadBalancer with `externalTrafficPolicy: Local` and a healthCheckNodePort,
/// its endpoints `a1` on node 0 with `conditions`.
fn local_load_balancer(c: &Cluster, conditions: &str) -> String {
    load_balancer_yaml(
        "local",
        LB_VIP,
        80,
        NODE_PORT,
        &format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {HEALTH_PORT}\n"),
        &[LB_IP],
        &[(c.pod("a1").ip, c.nodes[0].name.as_str())],
    )
    .replace("{ready: true}", conditions)
}

/// The health check node port of node `index`, asked from the world: (status, body).
fn health(lab: &Lab, index: usize) -> Result<(u16, String)> {
    let to = SocketAddrV4::new(lab.node_ip(index), HEALTH_PORT);
    let mut stream = lab.cluster.world.tcp_connect(to)?;
    http_get(&mut stream, "/")
}

/// loadbalancer.go "should fail health check node port if there are only terminating
/// endpoints" and "should fallback to local terminating endpoints when there are no
/// ready endpoints with externalTrafficPolicy=Local": node 0's health check says 200
/// while `a1` is ready and 503 once it only terminates (load balancers stop sending
/// new clients), yet a client that still arrives at node 0 is served by the
/// terminating `a1` (nothing else could serve it there) and keeps its address (the world's address on
/// the node network, which it connects from).
fn should_fail_health_check_node_port_if_there_are_only_terminating_endpoints(
    source: ObjectSource,
) -> Result<()> {
    let lab = Lab::new(source, |c| local_load_balancer(c, "{ready: true}"))?;
    lab.cluster.nodes[0].wait_for_maps("the NodePort", serves_node_port)?;
    wait_until("node 0's health check to pass", SETTLE, || {
        health(&lab, 0).is_ok_and(|(status, _)| status == 200)
    })?;
    let (_, body) = health(&lab, 0)?;
    ensure!(body.contains("\"localEndpoints\":1"), "{body}");

    lab.set_objects(|c| {
        local_load_balancer(c, "{ready: false, serving: true, terminating: true}")
    })?;
    wait_until("node 0's health check to fail", SETTLE, || {
        health(&lab, 0).is_ok_and(|(status, _)| status == 503)
    })?;
    let (_, body) = health(&lab, 0)?;
    ensure!(body.contains("\"localEndpoints\":0"), "{body}");

    for to in [
        SocketAddrV4::new(lab.node_ip(0), NODE_PORT),
        SocketAddrV4::new(LB_IP, 80),
    ] {
        let request = format!("world to {to}");
        let reply = lab.cluster.world.tcp_request(to, &request)?;
        let (server, client) = parse_answer(&reply, &request)?;
        ensure!(
            (server.as_str(), client.as_str()) == ("a1", WORLD_GATEWAY.to_string().as_str()),
            "{request}: answered by {server}, which saw {client}"
        );
    }
    Ok(())
}

fn serves_node_port(maps: &MapContents) -> bool {
    maps.services.keys().any(|k| k.port == NODE_PORT)
}

/// The NodePort Service (UDP `NODE_PORT + 1`) whose one endpoint is `server` on
/// node 0 (`None`: no endpoint).
fn udp_node_port(c: &Cluster, server: Option<&str>) -> String {
    let endpoint: Vec<_> = server
        .map(|server| (c.pod(server).ip, c.nodes[0].name.as_str()))
        .into_iter()
        .collect();
    load_balancer_yaml("udp", LB_VIP, 80, NODE_PORT, "", &[], &endpoint)
        .replace("type: LoadBalancer", "type: NodePort")
}

/// conntrack.go "should be able to preserve UDP traffic when server pod cycles for a
/// NodePort service": a client keeps sending from one source port to node 0's UDP
/// NodePort; its server pod goes away and another takes its place (a new address);
/// the same client socket's datagrams reach the new pod (no stale conntrack entry
/// keeps sending them to the old one). Clients: the world and a pod on node 1.
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_nodeport_service(
    source: ObjectSource,
) -> Result<()> {
    let lab = Lab::new(source, |c| udp_node_port(c, Some("a1")))?;
    lab.cluster.nodes[0].wait_for_maps("the NodePort", |m| {
        m.services
            .keys()
            .any(|k| k.port == NODE_PORT + 1 && k.proto == PROTO_UDP)
    })?;
    let to = SocketAddrV4::new(lab.node_ip(0), NODE_PORT + 1);
    let world = lab
        .cluster
        .world
        .run(|| UdpSocket::bind(SocketAddrV4::new(WORLD_IP, UDP_CLIENT_PORT)))??;
    world.set_read_timeout(Some(Duration::from_millis(200)))?;
    let pod = lab.cluster.pod("c1").probe().from_port(UDP_CLIENT_PORT);
    let pod_asks = |request: &str| -> Result<Option<String>> {
        let outcome = pod.udp(to, request)?;
        match &outcome.reply {
            Some(reply) => Ok(Some(parse_answer(reply, request)?.0)),
            None => Ok(None),
        }
    };
    let mut sent = 0;
    let mut answered_by = |who: &str| -> Result<()> {
        wait_until(
            &format!("the clients' datagrams to reach {who}"),
            SETTLE,
            || {
                sent += 1;
                let from_world = udp_ask(&world, to, &format!("world {sent}"));
                let from_pod = pod_asks(&format!("pod {sent}"));
                matches!((from_world, from_pod), (Ok(Some(w)), Ok(Some(p))) if w == who && p == who)
            },
        )
    };
    answered_by("a1")?;

    // The server pod is deleted: its endpoint goes, then its replacement's comes.
    lab.set_objects(|c| udp_node_port(c, None))?;
    lab.cluster.nodes[0].wait_for_maps("a1 out of the backends", |m| {
        !m.backends
            .values()
            .any(|b| b.address == lab.cluster.pod("a1").ip.octets())
    })?;
    lab.set_objects(|c| udp_node_port(c, Some("a2")))?;
    answered_by("a2")
}

ferrite_tests::from_both_sources!(
    should_implement_service_proxy_name,
    should_implement_service_kubernetes_io_headless,
    should_fail_health_check_node_port_if_there_are_only_terminating_endpoints,
    should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_nodeport_service,
);
