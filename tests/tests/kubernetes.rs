//! User stories for the agent in Kubernetes mode: the real kube-rs client and
//! watchers against a fake API server (list/watch JSON, resourceVersion, bookmarks,
//! 410 Gone) running on 127.0.0.1 inside the node's network namespace. Needs root.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::Result;
use ferrite_agent::plan::MapContents;
use ferrite_common::{Service6Key, ServiceKey, PROTO_TCP};
use ferrite_tests::{
    cluster::{self, BACKENDS, CLIENTS, TCP_FRONTEND},
    fake_apiserver::FakeApiServer,
    lab::{answered_by, node_yaml, Node, Server},
};

struct KubeCluster {
    _servers: Vec<Server>,
    api: FakeApiServer,
    node: Node,
}

fn master_count(maps: &MapContents, vip: Ipv4Addr, port: u16) -> Option<u16> {
    maps.services
        .get(&ServiceKey::new(vip, port, PROTO_TCP, 0))
        .map(|v| v.count)
}

/// The IPv6 frontend `vip`:`port`/TCP in `ferrite_lb6_svc`: its count and the
/// addresses of its ready backends (`ferrite_lb6_be`), in slot order.
fn frontend6(
    maps: &MapContents,
    vip: std::net::Ipv6Addr,
    port: u16,
) -> Option<(u16, Vec<std::net::Ipv6Addr>)> {
    let master = Service6Key::new(vip.octets(), port, PROTO_TCP, 0);
    let value = maps.services6.get(&master)?;
    let backends = (1..=value.count)
        .filter_map(|slot| {
            let id = maps.services6.get(&Service6Key {
                backend_slot: slot,
                ..master
            })?;
            Some(maps.backends6.get(&id.backend_id)?.address.into())
        })
        .collect();
    Some((value.count, backends))
}

/// The example cluster served by the fake API server, plus this node's Node object;
/// the agent started on a kubeconfig and synced.
fn kube_cluster() -> Result<KubeCluster> {
    kube_cluster_resyncing_every(None)
}

/// [`kube_cluster`], its agent's full resyncs `resync_seconds` apart (else the lab's).
fn kube_cluster_resyncing_every(resync_seconds: Option<u32>) -> Result<KubeCluster> {
    let (mut node, servers) = cluster::example_node("kube")?;
    if let Some(seconds) = resync_seconds {
        node.resync_seconds = seconds;
    }
    let api = FakeApiServer::start(&node.netns)?;
    api.apply_yaml(&cluster::example_for(&node.name))?;
    api.apply_yaml(&node_yaml(
        &node.name,
        "198.51.100.1".parse()?,
        "10.244.0.0/24",
    ))?;
    let kubeconfig = node.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    node.start_agent_kube(&kubeconfig)?;
    node.wait_for_sync(2, 5)?;
    Ok(KubeCluster {
        _servers: servers,
        api,
        node,
    })
}

/// GET `path` from the agent's HTTP endpoint (inside the node's netns).
fn http_get(node: &ferrite_tests::lab::Node, path: &str) -> Result<(u16, String)> {
    node.agent_http(path)
}

#[test]
fn the_agent_syncs_from_the_api_server_serves_traffic_and_reports_ready_and_metrics() -> Result<()>
{
    let c = kube_cluster()?;
    let client = c.node.pod(CLIENTS[0].0);
    for i in 0..10 {
        let request = format!("via the API {i}");
        answered_by(&client.tcp_request(TCP_FRONTEND, &request)?, &request)?;
    }
    assert_eq!(http_get(&c.node, "/healthz")?.0, 200);
    // Ready once the first sync has returned (its map writes land just before).
    ferrite_tests::lab::wait_until("/readyz to answer 200", ferrite_tests::lab::SETTLE, || {
        http_get(&c.node, "/readyz").is_ok_and(|(status, _)| status == 200)
    })?;
    let (status, metrics) = http_get(&c.node, "/metrics")?;
    assert_eq!(status, 200);
    for needle in [
        "ferrite_syncs_total",
        "ferrite_sync_duration_seconds_bucket",
        "ferrite_datapath_packets{reason=\"service_new_flow\"} 10",
        "ferrite_map_entries{map=\"ferrite_endpnt\"} 5",
        "ferrite_map_capacity{map=\"ferrite_ct\"}",
        "ferrite_event_to_map_seconds_count",
    ] {
        assert!(metrics.contains(needle), "no {needle:?} in:\n{metrics}");
    }
    // Per Service port and backend: every packet a client sent to the VIP, counted
    // once, on the backend it went to.
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok());
    let sum_of = |prefix: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(value)
            .sum()
    };
    let frontend = format!("frontend=\"{TCP_FRONTEND}\"");
    let per_backend: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("ferrite_service_backend_packets{") && l.contains(&frontend))
        .collect();
    assert!(
        per_backend.len() >= 2
            && per_backend
                .iter()
                .all(|l| l.contains("service=\"default/web:http\"")),
        "per-backend series:\n{metrics}"
    );
    let new_flows = sum_of("ferrite_datapath_packets{reason=\"service_new_flow\"}");
    let to_services =
        new_flows + sum_of("ferrite_datapath_packets{reason=\"service_established\"}");
    assert_eq!(
        per_backend.iter().filter_map(|l| value(l)).sum::<u64>(),
        to_services,
        "{metrics}"
    );
    // And every flow opened, once, on the backend it went to.
    let flows: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("ferrite_service_backend_flows{") && l.contains(&frontend))
        .filter_map(value)
        .sum();
    assert_eq!((flows, new_flows), (10, 10), "{metrics}");
    Ok(())
}

#[test]
fn services_endpointslices_and_nodes_follow_adds_updates_and_deletes() -> Result<()> {
    let c = kube_cluster()?;
    let (api, node) = (&c.api, &c.node);
    let api_vip: Ipv4Addr = "10.96.0.20".parse()?;
    // Add a Service with its EndpointSlice.
    api.apply_yaml(&cluster::service_yaml("api", api_vip, &[BACKENDS[0].1]))?;
    node.wait_for_maps("the new Service", |m| {
        master_count(m, api_vip, 80) == Some(1)
    })?;
    // Update an EndpointSlice: web loses its third backend.
    let two = [BACKENDS[0].1, BACKENDS[1].1];
    api.apply_yaml(&cluster::example_with_backends(&node.name, &two))?;
    node.wait_for_maps("web down to 2 backends", |m| {
        master_count(m, *TCP_FRONTEND.ip(), 80) == Some(2)
    })?;
    // Delete the added Service.
    api.delete("Service", "default", "api");
    node.wait_for_maps("the deleted Service gone", |m| {
        master_count(m, api_vip, 80).is_none()
    })?;
    // A Node joins and leaves: its route follows.
    api.apply_yaml(&node_yaml(
        "other",
        "198.51.100.7".parse()?,
        "10.244.7.0/24",
    ))?;
    node.wait_for_maps("the new node's route", |m| m.pod_routes() == 2)?;
    api.delete("Node", "", "other");
    node.wait_for_maps("the departed node's route gone", |m| m.pod_routes() == 1)?;
    // Traffic still flows through what remains.
    let request = "after the changes";
    let backend = answered_by(
        &node.pod(CLIENTS[0].0).tcp_request(TCP_FRONTEND, request)?,
        request,
    )?;
    assert_ne!(backend, BACKENDS[2].0);
    // This node turns dual-stack: the agent publishes its IPv6 pod CIDR for the CNI
    // plugin beside the IPv4 one (the datapath's writes stay IPv4: golden
    // `dual-stack-nodes.txtar`).
    api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\n\
         spec: {{podCIDR: 10.244.0.0/24, podCIDRs: [10.244.0.0/24, \"fd00:10:244::/64\"]}}\n\
         status: {{addresses: [{{type: InternalIP, address: 198.51.100.1}}, \
         {{type: InternalIP, address: \"2001:db8::1\"}}]}}\n",
        node.name
    ))?;
    let published = || {
        std::fs::read_to_string(ferrite_agent::files::pod_cidr_file(&node.name)).unwrap_or_default()
    };
    ferrite_tests::lab::wait_until(
        "the IPv6 pod CIDR published",
        ferrite_tests::lab::SETTLE,
        || published() == "10.244.0.0/24\nfd00:10:244::/64\n",
    )?;
    Ok(())
}

/// A rollout or scale-up changes a NodePort Service's EndpointSlice, an edit its
/// spec: each arrives as a watch event and updates that Service alone, and its
/// NodePort frontends on this node stay in the maps throughout (they once vanished
/// until the next full resync). Full resyncs are a minute apart here, so only the
/// updates act.
#[test]
fn a_node_port_stays_in_the_maps_through_endpointslice_and_service_changes() -> Result<()> {
    let c = kube_cluster_resyncing_every(Some(60))?;
    let (api, node) = (&c.api, &c.node);
    let (vip, node_ip): (Ipv4Addr, Ipv4Addr) = ("10.96.0.40".parse()?, "198.51.100.1".parse()?);
    let (port, node_port) = (8080, 30080);
    let service = |backends: &[Ipv4Addr], extra: &str| {
        let backends: Vec<(Ipv4Addr, &str)> = backends
            .iter()
            .map(|ip| (*ip, node.name.as_str()))
            .collect();
        cluster::load_balancer_yaml("np", vip, port, node_port, extra, &[], &backends)
    };
    let (web1, web2, web3) = (BACKENDS[0].1, BACKENDS[1].1, BACKENDS[2].1);
    api.apply_yaml(&service(&[web1, web2], ""))?;
    node.wait_for_maps("the NodePort with two backends", |m| {
        master_count(m, node_ip, node_port) == Some(2)
    })?;

    // Watch the NodePort's master entry, from before the changes until after them.
    let pins = node.pin_dir();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<(usize, usize)> {
            let maps = ferrite_agent::maps::NodeMaps::open(&pins)?;
            let (mut reads, mut missing) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let contents = maps.contents()?;
                reads += 1;
                if master_count(&contents, node_ip, node_port).is_none() {
                    missing += 1;
                }
            }
            Ok((reads, missing))
        })
    };
    // Scale up: the slice gains a backend.
    api.apply_yaml(&service(&[web1, web2, web3], ""))?;
    node.wait_for_maps("the ClusterIP with three backends", |m| {
        master_count(m, vip, port) == Some(3)
    })?;
    let maps = node.maps()?.contents()?;
    assert_eq!(
        master_count(&maps, node_ip, node_port),
        Some(3),
        "NodePort after the scale-up"
    );
    // The Service itself changes: session affinity on.
    api.apply_yaml(&service(
        &[web1, web2, web3],
        "  sessionAffinity: ClientIP
",
    ))?;
    node.wait_for_maps("the ClusterIP with affinity", |m| {
        m.services
            .get(&ServiceKey::new(vip, port, PROTO_TCP, 0))
            .is_some_and(|v| v.affinity_timeout_s > 0)
    })?;
    let maps = node.maps()?.contents()?;
    let node_port_master = maps
        .services
        .get(&ServiceKey::new(node_ip, node_port, PROTO_TCP, 0))
        .copied();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, missing) = watcher.join().expect("the watcher thread")?;
    assert!(
        node_port_master.is_some_and(|v| v.count == 3 && v.affinity_timeout_s > 0),
        "NodePort after the Service change: {node_port_master:?}"
    );
    assert!(reads > 0);
    assert_eq!(
        missing, 0,
        "the NodePort was missing in {missing} of {reads} reads"
    );
    // And it answers: a pod reaches the Service on this node's NodePort.
    let request = "through the NodePort";
    answered_by(
        &node
            .pod(CLIENTS[0].0)
            .tcp_request(std::net::SocketAddrV4::new(node_ip, node_port), request)?,
        request,
    )?;
    Ok(())
}

#[test]
fn a_watch_cut_mid_stream_reconnects_and_misses_nothing() -> Result<()> {
    let c = kube_cluster()?;
    let before = c.api.requests().len();
    c.api.disconnect_watches();
    // Changed while the watches reconnect: replayed from their resourceVersion.
    let two = [BACKENDS[0].1, BACKENDS[1].1];
    c.api
        .apply_yaml(&cluster::example_with_backends(&c.node.name, &two))?;
    c.node
        .wait_for_maps("the change made during the reconnect", |m| {
            master_count(m, *TCP_FRONTEND.ip(), 80) == Some(2)
        })?;
    // Every watch comes back resuming from where it was (each on its own backoff:
    // the one that carried the change may be back first), and nothing is relisted.
    let resumed = |kind: &str| {
        c.api.requests()[before..]
            .iter()
            .any(|r| r.kind == kind && r.watch && r.resource_version > 0)
    };
    ferrite_tests::lab::wait_until("every watch to resume", ferrite_tests::lab::SETTLE, || {
        ["Service", "EndpointSlice", "Node", "Pod"]
            .iter()
            .all(|kind| resumed(kind))
    })?;
    let after = c.api.requests().split_off(before);
    assert!(
        after.iter().all(|r| r.watch),
        "relisted instead of resuming: {after:?}"
    );
    Ok(())
}

#[test]
fn after_410_gone_the_agent_relists_and_removes_what_was_deleted_in_the_gap() -> Result<()> {
    let c = kube_cluster()?;
    let extra: Ipv4Addr = "10.96.0.30".parse()?;
    c.api
        .apply_yaml(&cluster::service_yaml("extra", extra, &[BACKENDS[1].1]))?;
    c.node.wait_for_maps("the extra Service", |m| {
        master_count(m, extra, 80) == Some(1)
    })?;
    let before = c.node.maps()?.contents()?;

    // The watches are down while the Service is deleted; by the time they come back
    // the history is compacted, so they get 410 Gone and must relist.
    c.api.begin_gap();
    c.api.delete("Service", "default", "extra");
    c.api.delete("EndpointSlice", "default", "extra-1");
    std::thread::sleep(Duration::from_millis(300));
    c.api.end_gap();
    c.node
        .wait_for_maps("the Service deleted during the gap to go", |m| {
            master_count(m, extra, 80).is_none()
        })?;
    // Nothing else was flushed or rewritten: web keeps its entries and ids.
    let after = c.node.maps()?.contents()?;
    let web = |m: &MapContents| {
        m.services
            .iter()
            .filter(|(k, _)| k.address == TCP_FRONTEND.ip().octets())
            .map(|(k, v)| (*k, *v))
            .collect::<Vec<_>>()
    };
    assert_eq!(web(&after), web(&before));
    assert_eq!(after.endpoints, before.endpoints);
    let (_, metrics) = http_get(&c.node, "/metrics")?;
    let restarts: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("ferrite_watch_restarts_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum();
    assert!(restarts >= 1, "no watch restart counted:\n{metrics}");
    Ok(())
}

/// NetworkPolicies, Pods and their labels arrive as watch events like everything
/// else: a default-deny cuts a pod off, a policy allowing pods of its namespace
/// lets them back in, relabelling the client out of the peer cuts it off again,
/// and deleting the policies opens everything.
#[test]
fn network_policies_and_pod_labels_follow_watch_events() -> Result<()> {
    use ferrite_common::policy::ENDPOINT_INGRESS_ISOLATED;
    let c = kube_cluster()?;
    let (api, node) = (&c.api, &c.node);
    let (client, _) = CLIENTS[0];
    let pod_yaml = |name: &str, role: &str| {
        let pod = node.pod(name);
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{role: {role}}}}}\n\
             spec: {{nodeName: {}, containers: [{{name: app, image: none}}]}}\n\
             status: {{phase: Running, podIP: {}}}\n",
            node.name, pod.ip
        )
    };
    api.apply_yaml(&pod_yaml(client, "client"))?;
    api.apply_yaml(&pod_yaml(BACKENDS[0].0, "web"))?;
    let web = std::net::SocketAddrV4::new(BACKENDS[0].1, ferrite_tests::cluster::TCP_TARGET);
    let reaches = || {
        node.pod(client)
            .probe()
            .tcp(web, "hello")
            .map(|o| o.reply.is_some())
    };
    assert!(reaches()?, "web before any policy");

    let isolated = |m: &MapContents| {
        m.endpoints.iter().any(|(k, e)| {
            k.address == BACKENDS[0].1.octets() && e.flags & ENDPOINT_INGRESS_ISOLATED != 0
        })
    };
    api.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: default}\n\
         spec: {podSelector: {matchLabels: {role: web}}, policyTypes: [Ingress]}\n",
    )?;
    node.wait_for_maps("web isolated", isolated)?;
    assert!(!reaches()?, "web reached under a default deny");

    api.apply_yaml(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-clients, namespace: default}\n\
         spec: {podSelector: {matchLabels: {role: web}}, ingress: [{from: [{podSelector: {matchLabels: {role: client}}}]}]}\n",
    )?;
    node.wait_for_maps("web's allow rule", |m| !m.policy.is_empty())?;
    assert!(reaches()?, "the allowed client is refused");

    api.apply_yaml(&pod_yaml(client, "other"))?;
    node.wait_for_maps("the relabelled client out of the rule", |m| {
        m.policy.is_empty()
    })?;
    assert!(!reaches()?, "a client outside the peer reached web");

    api.delete("NetworkPolicy", "default", "deny");
    api.delete("NetworkPolicy", "default", "from-clients");
    node.wait_for_maps("web open again", |m| !isolated(m))?;
    assert!(reaches()?, "web closed after the policies went");
    // The policies, the relabel and the deletions were policy updates, not full
    // syncs (the pods' first appearance is wiring: full syncs).
    let (_, metrics) = http_get(node, "/metrics")?;
    let policy_updates: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("ferrite_policy_updates_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum();
    assert!(
        policy_updates >= 3,
        "{policy_updates} policy updates counted:\n{metrics}"
    );
    Ok(())
}

/// Cloud load balancers and the cluster autoscaler probe kube-proxy's port 10256:
/// the agent answers there with kube-proxy's JSON. A Node update carrying the
/// autoscaler's `ToBeDeletedByClusterAutoscaler` taint turns `/healthz` 503 with
/// `nodeEligible: false`, so load balancers drain the node, while `/livez` (is the
/// datapath synced?) stays 200; with the taint gone, 200 again.
/// A dual-stack Pod's IPv6 address (its `status.podIPs`) lands in `ferrite_endpnt6`
/// as the agent's entry, naming the pod's veth with its IPv4 entry's MACs; a Pod
/// claiming that address for another pod is refused (web keeps it); the entry
/// leaves with its Pod.
#[test]
fn a_dual_stack_pods_ipv6_address_follows_its_pod_object() -> Result<()> {
    use ferrite_common::{endpoint_flag::FROM_POD_OBJECT, Endpoint6Key};
    let c = kube_cluster()?;
    let (api, node) = (&c.api, &c.node);
    let ((web, web_ip), (thief, thief_ip)) = (BACKENDS[0], CLIENTS[0]);
    let ip6: std::net::Ipv6Addr = "fd00:10:244::15".parse()?;
    let key = Endpoint6Key {
        address: ip6.octets(),
    };
    let pod_yaml = |name: &str, ip: Ipv4Addr| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{nodeName: {}, containers: [{{name: app, image: none}}]}}\n\
             status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}, {{ip: '{ip6}'}}]}}\n",
            node.name
        )
    };
    let web_veth = node.pod(web).host_interface.clone();
    let web_ifindex = node
        .netns
        .run(move || ferrite_agent::host::interfaces::ifindex(&web_veth))?
        .ok_or_else(|| anyhow::anyhow!("web's veth"))?;
    api.apply_yaml(&pod_yaml(web, web_ip))?;
    node.wait_for_maps("web's IPv6 entry", |m| {
        let ipv4 = m.endpoints.get(&ferrite_common::EndpointKey {
            address: web_ip.octets(),
        });
        m.endpoints6.get(&key).is_some_and(|e| {
            e.ifindex == web_ifindex
                && e.flags & FROM_POD_OBJECT != 0
                && ipv4.is_some_and(|v4| (v4.pod_mac, v4.host_mac) == (e.pod_mac, e.host_mac))
        })
    })?;

    api.apply_yaml(&pod_yaml(thief, thief_ip))?;
    let refusal = format!(
        "Pod default/{thief}: pod IP {ip6} is the address of the live pod behind {}",
        node.pod(web).host_interface
    );
    let agent = node.agent.as_ref().expect("agent runs");
    ferrite_tests::lab::wait_until("the thief refused", ferrite_tests::lab::SETTLE, || {
        agent.log_text().contains(&refusal)
    })?;
    let entry = node.maps()?.endpoint6(&key)?;
    assert_eq!(entry.map(|e| e.ifindex), Some(web_ifindex), "web keeps it");

    api.delete("Pod", "default", thief);
    api.delete("Pod", "default", web);
    node.wait_for_maps("web's IPv6 entry gone with its Pod", |m| {
        !m.endpoints6.contains_key(&key)
    })?;
    Ok(())
}

#[test]
fn kube_proxys_health_endpoint_drains_a_node_the_autoscaler_is_about_to_delete() -> Result<()> {
    use ferrite_tests::lab::{wait_until, SETTLE};
    let c = kube_cluster()?;
    let (api, node) = (&c.api, &c.node);
    let answer = |path: &str| -> Result<(u16, serde_json::Value)> {
        let (status, body) = node.proxy_healthz(path)?;
        Ok((status, serde_json::from_str(&body)?))
    };
    wait_until("/healthz 200", SETTLE, || {
        answer("/healthz").is_ok_and(|(status, _)| status == 200)
    })?;
    let (_, healthz) = answer("/healthz")?;
    assert_eq!(healthz["nodeEligible"], true, "{healthz}");
    assert!(healthz["lastUpdated"].is_string(), "{healthz}");
    assert!(healthz["currentTime"].is_string(), "{healthz}");
    let (status, livez) = answer("/livez")?;
    assert_eq!(status, 200, "{livez}");
    assert!(livez.get("nodeEligible").is_none(), "{livez}");

    let this_node = node_yaml(&node.name, "198.51.100.1".parse()?, "10.244.0.0/24");
    let tainted = this_node.replace(
        "spec: {podCIDR: 10.244.0.0/24}",
        "spec: {podCIDR: 10.244.0.0/24, taints: [{key: ToBeDeletedByClusterAutoscaler, value: \"1765000000\", effect: NoSchedule}]}",
    );
    assert_ne!(tainted, this_node);
    api.apply_yaml(&tainted)?;
    wait_until("/healthz 503 for the tainted node", SETTLE, || {
        answer("/healthz")
            .is_ok_and(|(status, body)| status == 503 && body["nodeEligible"] == false)
    })?;
    assert_eq!(answer("/livez")?.0, 200, "the proxy itself is alive");

    api.apply_yaml(&this_node)?;
    wait_until("/healthz 200 with the taint gone", SETTLE, || {
        answer("/healthz").is_ok_and(|(status, body)| status == 200 && body["nodeEligible"] == true)
    })?;
    Ok(())
}

/// A dual-stack Service from the API server: its IPv4 half is served and stays in the
/// maps, unchanged, while its IPv6 EndpointSlice scales, refuses an address and goes,
/// and through a full sync; the IPv6 half's frontend and backends land in
/// `ferrite_lb6_svc` and `ferrite_lb6_be` and go with the slice, then with the
/// Service. A RequireDualStack Service with one clusterIP is refused alone, logged
/// and counted. Full resyncs are a minute apart, so the watch updates act.
#[test]
fn a_dual_stack_service_keeps_serving_ipv4_while_its_ipv6_slice_changes() -> Result<()> {
    let c = kube_cluster_resyncing_every(Some(60))?;
    let (api, node) = (&c.api, &c.node);
    let vip: Ipv4Addr = "10.96.0.50".parse()?;
    let two = [BACKENDS[0].1, BACKENDS[1].1];
    let v4_slice = cluster::endpoint_slice_yaml("dual", &cluster::ready_endpoints(&two));
    api.apply_yaml(&format!(
        "apiVersion: v1
kind: Service
metadata: {{name: dual, namespace: default}}
spec:
  clusterIP: {vip}
  clusterIPs: [{vip}, \"fd00:10:96::50\"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: http}}]
---
{v4_slice}"
    ))?;
    node.wait_for_maps("the dual-stack Service's IPv4 half", |m| {
        master_count(m, vip, 80) == Some(2)
    })?;
    let v6_slice = |endpoints: &[&str]| {
        let endpoints: String = endpoints
            .iter()
            .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dual-v6
  namespace: default
  labels: {{kubernetes.io/service-name: dual}}
addressType: IPv6
ports: [{{name: http, port: {}, protocol: TCP}}]
endpoints:
{endpoints}",
            cluster::TCP_TARGET
        )
    };

    // Watch the IPv4 master entry from before the IPv6 changes until after them.
    let pins = node.pin_dir();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<(usize, usize)> {
            let maps = ferrite_agent::maps::NodeMaps::open(&pins)?;
            let (mut reads, mut changed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                reads += 1;
                if master_count(&maps.contents()?, vip, 80) != Some(2) {
                    changed += 1;
                }
            }
            Ok((reads, changed))
        })
    };
    let log = || {
        node.agent
            .as_ref()
            .map(|a| a.log_text())
            .unwrap_or_default()
    };
    let vip6: std::net::Ipv6Addr = "fd00:10:96::50".parse()?;
    let (one, two6): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        ("fd00:10:244::11".parse()?, "fd00:10:244::12".parse()?);
    let serves6 = |backends: &[std::net::Ipv6Addr]| {
        let backends = backends.to_vec();
        move |m: &MapContents| {
            frontend6(m, vip6, 80) == Some((backends.len() as u16, backends.clone()))
        }
    };
    node.wait_for_maps("the IPv6 half without backends", serves6(&[]))?;
    api.apply_yaml(&v6_slice(&["fd00:10:244::11"]))?;
    node.wait_for_maps("the IPv6 backend in the lb6 maps", serves6(&[one]))?;
    // The scaled slice holds a link-local address: refused, logged, the rest written.
    api.apply_yaml(&v6_slice(&[
        "fd00:10:244::11",
        "fd00:10:244::12",
        "fe80::1",
    ]))?;
    let refused_endpoint = "EndpointSlice default/dual-v6: endpoint address fe80::1 is link-local";
    ferrite_tests::lab::wait_until("the IPv6 slice read", ferrite_tests::lab::SETTLE, || {
        log().contains(refused_endpoint)
    })?;
    node.wait_for_maps("both IPv6 backends", serves6(&[one, two6]))?;
    let backends6 = |m: &MapContents| {
        let addresses: Vec<std::net::Ipv6Addr> =
            m.backends6.values().map(|b| b.address.into()).collect();
        addresses.contains(&one) || addresses.contains(&two6)
    };
    api.delete("EndpointSlice", "default", "dual-v6");
    node.wait_for_maps("the IPv6 backends gone with their slice", |m| {
        serves6(&[])(m) && !backends6(m)
    })?;
    // A RequireDualStack Service with one clusterIP: refused alone, with its reason.
    api.apply_yaml(
        "apiVersion: v1
kind: Service
metadata: {name: half, namespace: default}
spec:
  clusterIP: 10.96.0.51
  clusterIPs: [10.96.0.51]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{name: http, port: 80, protocol: TCP, targetPort: http}]
",
    )?;
    let refused_service = "Service default/half: ipFamilyPolicy RequireDualStack does not allow 1";
    ferrite_tests::lab::wait_until(
        "the half dual-stack Service refused",
        ferrite_tests::lab::SETTLE,
        || log().contains(refused_service),
    )?;
    // Its count is a full sync's (updates log): a Node joining brings one.
    api.apply_yaml(&node_yaml(
        "other",
        "198.51.100.7".parse()?,
        "10.244.7.0/24",
    ))?;
    ferrite_tests::lab::wait_until("the refusal counted", ferrite_tests::lab::SETTLE, || {
        node.metric("ferrite_skipped_objects")
            .is_ok_and(|n| n >= 1.0)
    })?;
    // The IPv4 half answers throughout, and the refused Service has no entry.
    let request = "to the dual-stack Service";
    answered_by(
        &node
            .pod(CLIENTS[0].0)
            .tcp_request(std::net::SocketAddrV4::new(vip, 80), request)?,
        request,
    )?;
    let maps = node.maps()?.contents()?;
    assert_eq!(master_count(&maps, "10.96.0.51".parse()?, 80), None);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, changed) = watcher.join().expect("the watcher thread")?;
    assert!(reads > 0);
    assert_eq!(
        changed, 0,
        "the IPv4 frontend changed in {changed} of {reads} reads"
    );
    // The Service gone: its IPv6 frontend and rev-NAT entry go too.
    api.delete("Service", "default", "dual");
    node.wait_for_maps("the IPv6 frontend gone with its Service", |m| {
        m.services6.keys().all(|k| k.address != vip6.octets())
            && m.rev_nat6.values().all(|r| r.address != vip6.octets())
    })?;
    Ok(())
}
