//! User stories for topology-aware routing (EndpointSlice hints, as the EndpointSlice
//! controller sets them for `trafficDistribution: PreferSameZone` / `PreferSameNode`
//! and `service.kubernetes.io/topology-mode: Auto`): three nodes in two zones, a
//! backend and a client pod on each; for each mode, every request of every node's
//! client, and the fallbacks kube-proxy makes to all endpoints. Needs root.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context, Result};
use ferrite_common::{ServiceKey, PROTO_TCP};
use ferrite_tests::{
    cluster::TCP_TARGET,
    fake_apiserver::FakeApiServer,
    lab::{answered_by, pod_ip, Cluster, ObjectSource, Server},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 1);
/// Requests per client and case: every answer is looked at.
const REQUESTS: usize = 30;

struct Lab {
    _servers: Vec<Server>,
    cluster: Cluster,
}

/// Nodes n0, n1, n2 with backend pods b0, b1, b2 and client pods c0, c1, c2, the
/// agents reading their objects from `source`.
fn lab(socket_lb: bool, source: ObjectSource) -> Result<Lab> {
    let mut cluster = Cluster::new(3)?;
    if source == ObjectSource::Kubernetes {
        FakeApiServer::serve_cluster(&mut cluster)?;
    }
    let mut servers = Vec::new();
    for (index, node) in cluster.nodes.iter_mut().enumerate() {
        if !socket_lb {
            node.agent_args.push("--socket-lb=false".into());
        }
        node.add_pod(&format!("b{index}"), pod_ip(index, 0))?;
        node.add_pod(&format!("c{index}"), pod_ip(index, 5))?;
    }
    for index in 0..3 {
        servers.push(cluster.pod(&format!("b{index}")).serve(TCP_TARGET)?);
    }
    cluster.write_config(&config(&cluster, ["a", "a", "b"], ["", "", ""])?)?;
    cluster.start_agents()?;
    Ok(Lab {
        _servers: servers,
        cluster,
    })
}

/// The cluster with node `i` in zone `zones[i]` (no label when empty), and Service
/// `web` whose endpoint b`i` carries `hints[i]` (a YAML flow mapping, or none).
fn config(cluster: &Cluster, zones: [&str; 3], hints: [&str; 3]) -> Result<String> {
    let mut docs = Vec::new();
    let mut endpoints = String::new();
    for (index, node) in cluster.nodes.iter().enumerate() {
        let labels = match zones[index] {
            "" => String::new(),
            zone => format!(", labels: {{topology.kubernetes.io/zone: {zone}}}"),
        };
        docs.push(format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}{labels}}}\nspec: {{podCIDR: 10.244.{index}.0/24}}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}]}}\n",
            node.name,
            node.ip.context("plugged")?
        ));
        docs.extend(node.pods.iter().map(|p| p.yaml(&node.name)));
        let hint = match hints[index] {
            "" => String::new(),
            hint => format!(", hints: {hint}"),
        };
        endpoints.push_str(&format!(
            "- {{addresses: [\"{}\"], nodeName: {}, conditions: {{ready: true}}{hint}}}\n",
            pod_ip(index, 0),
            node.name
        ));
    }
    docs.push(format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{clusterIP: {VIP}, trafficDistribution: PreferSameZone, ports: [{{name: http, port: 80, targetPort: {TCP_TARGET}}}]}}\n"
    ));
    docs.push(format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: {TCP_TARGET}, protocol: TCP}}]\nendpoints:\n{endpoints}"
    ));
    Ok(docs.join("---\n"))
}

fn zone(zone: &str) -> String {
    format!("{{forZones: [{{name: {zone}}}]}}")
}

fn node_and_zone(cluster: &Cluster, index: usize, zone: &str) -> String {
    format!(
        "{{forNodes: [{{name: {}}}], forZones: [{{name: {zone}}}]}}",
        cluster.nodes[index].name
    )
}

/// Apply a case and check, on every node, which backends its client reaches:
/// `expected[i]` for node i's client (backend indexes), all of its requests.
fn case(
    lab: &Lab,
    what: &str,
    zones: [&str; 3],
    hints: [&str; 3],
    expected: [&[usize]; 3],
) -> Result<()> {
    let cluster = &lab.cluster;
    cluster.write_config(&config(cluster, zones, hints)?)?;
    let master = ServiceKey::new(VIP, 80, PROTO_TCP, 0);
    for (index, node) in cluster.nodes.iter().enumerate() {
        node.wait_for_maps(&format!("{what}: node {index}'s backends"), |m| {
            m.services.get(&master).map(|v| usize::from(v.count)) == Some(expected[index].len())
                && m.routes.len() >= 3
        })?;
    }
    for (index, wanted) in expected.iter().enumerate() {
        let client = cluster.pod(&format!("c{index}")).probe();
        let mut reached = BTreeSet::new();
        for request in 0..REQUESTS {
            let request = format!("{what} {request}");
            let outcome = client.tcp(SocketAddrV4::new(VIP, 80), &request)?;
            reached.insert(answered_by(outcome.answer()?, &request)?);
        }
        let wanted: BTreeSet<String> = wanted.iter().map(|b| format!("b{b}")).collect();
        assert_eq!(reached, wanted, "{what}: node {index}'s client");
    }
    Ok(())
}

// Every case from a YAML file and from an API server's watch events (where a zone
// label's removal is a Node update).
ferrite_tests::from_both_sources!(
    prefer_same_zone_and_same_node_narrow_each_nodes_backends_and_fall_back_to_all
);

fn prefer_same_zone_and_same_node_narrow_each_nodes_backends_and_fall_back_to_all(
    source: ObjectSource,
) -> Result<()> {
    let lab = lab(true, source)?;
    let c = &lab.cluster;
    let all: &[usize] = &[0, 1, 2];
    let (za, zb) = (zone("a"), zone("b"));
    // PreferSameZone: zone a's nodes use zone a's backends, zone b's its own.
    case(
        &lab,
        "same zone",
        ["a", "a", "b"],
        [&za, &za, &zb],
        [&[0, 1], &[0, 1], &[2]],
    )?;
    // PreferSameNode: each node its own backend.
    let (n0, n1, n2) = (
        node_and_zone(c, 0, "a"),
        node_and_zone(c, 1, "a"),
        node_and_zone(c, 2, "b"),
    );
    case(
        &lab,
        "same node",
        ["a", "a", "b"],
        [&n0, &n1, &n2],
        [&[0], &[1], &[2]],
    )?;
    // Fallbacks: an endpoint without hints; a zone without endpoints (zone b's node
    // uses all, zone a's still narrow); the zone label gone from node 2.
    case(
        &lab,
        "one endpoint unhinted",
        ["a", "a", "b"],
        [&za, &za, ""],
        [all, all, all],
    )?;
    case(
        &lab,
        "zone b has none",
        ["a", "a", "b"],
        [&za, &za, &za],
        [all, all, all],
    )?;
    case(
        &lab,
        "node 2 without a zone",
        ["a", "a", ""],
        [&za, &za, &zb],
        [&[0, 1], &[0, 1], all],
    )?;
    Ok(())
}

#[test]
fn prefer_same_zone_narrows_the_per_packet_path_too() -> Result<()> {
    let lab = lab(false, ObjectSource::File)?;
    let (za, zb) = (zone("a"), zone("b"));
    case(
        &lab,
        "same zone, per packet",
        ["a", "a", "b"],
        [&za, &za, &zb],
        [&[0, 1], &[0, 1], &[2]],
    )
}
