//! NetworkPolicy as the Kubernetes network-policy e2e tests it: three namespaces x,
//! y, z with pods a, b, c each, spread over two nodes, every pod serving TCP and UDP
//! on ports 80 and 81. After each change of policies (or labels), every (client,
//! server, port, protocol) is probed and the whole reachability matrix compared with
//! the one the policies mean. The matrix runs twice: the agents reading a YAML file,
//! and the agents watching an API server (each change the watch events of the
//! objects that changed). Needs root.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use ferrite_agent::{monitor::Line, plan::RouteKey};
use ferrite_tests::{
    fake_apiserver::FakeApiServer,
    lab::{node_yaml, pod_ip, Cluster, ObjectSource, Pod, Server, WORLD_IP},
    monitor::Monitor,
};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PORTS: [u16; 2] = [80, 81];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
/// A hang guard only: a monitor's lines arrive in well under a second.
const PATIENCE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Proto {
    Tcp,
    Udp,
}

/// A pod of the matrix: `x/a`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PodRef {
    namespace: &'static str,
    name: &'static str,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn all_pods() -> Vec<PodRef> {
    NAMESPACES
        .iter()
        .flat_map(|namespace| PODS.iter().map(|name| PodRef { namespace, name }))
        .collect()
}

type Key = (PodRef, PodRef, u16, Proto);

/// The lab: the cluster, the pods' addresses and their servers.
struct Matrix {
    cluster: Cluster,
    ips: BTreeMap<PodRef, Ipv4Addr>,
    labels: BTreeMap<PodRef, String>,
    namespace_labels: BTreeMap<&'static str, String>,
    _servers: Vec<Server>,
    /// Each change gets a marker ipBlock the agents must have written (its sync
    /// moves the route epoch, their last write).
    changes: u8,
}

impl Matrix {
    fn new(source: ObjectSource) -> Result<Self> {
        let mut cluster = Cluster::new(2)?;
        if source == ObjectSource::Kubernetes {
            FakeApiServer::serve_cluster(&mut cluster)?;
        }
        let mut ips = BTreeMap::new();
        for (index, pod) in all_pods().into_iter().enumerate() {
            let node = index % 2;
            let ip = pod_ip(node, index / 2);
            cluster.nodes[node].add_pod_in(pod.namespace, pod.name, ip)?;
            ips.insert(pod, ip);
        }
        let mut servers = Vec::new();
        for node in &cluster.nodes {
            for pod in &node.pods {
                for port in PORTS {
                    let name = format!("{}/{}", pod.namespace, pod.name);
                    let address = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
                    servers.push(Server::start(&pod.netns, &name, address)?);
                }
            }
        }
        let labels = all_pods()
            .into_iter()
            .map(|p| (p.clone(), format!("pod: {}", p.name)))
            .collect();
        let namespace_labels = NAMESPACES
            .iter()
            .map(|n| (*n, format!("ns: {n}")))
            .collect();
        let mut matrix = Self {
            cluster,
            ips,
            labels,
            namespace_labels,
            _servers: servers,
            changes: 0,
        };
        matrix.cluster.write_config(&matrix.objects(""))?;
        matrix.cluster.start_agents()?;
        for node in &matrix.cluster.nodes {
            node.wait_for_maps("every pod's endpoint", |c| c.endpoints.len() >= 4)?;
        }
        Ok(matrix)
    }

    fn pod(&self, pod: &PodRef) -> &Pod {
        self.cluster.nodes[self.node_of(pod)]
            .pods
            .iter()
            .find(|p| p.namespace == pod.namespace && p.name == pod.name)
            .expect("a lab pod")
    }

    fn ip(&self, pod: &PodRef) -> Ipv4Addr {
        self.ips[pod]
    }

    fn node_of(&self, pod: &PodRef) -> usize {
        all_pods().iter().position(|p| p == pod).expect("a pod") % 2
    }

    /// Every object: nodes, namespaces, pods (named ports serve-<port>-<tcp|udp>), a
    /// Service VIP:80 -> x/a:80, and `policies`.
    fn objects(&self, policies: &str) -> String {
        let mut docs = Vec::new();
        for (index, node) in self.cluster.nodes.iter().enumerate() {
            let cidr = format!("10.244.{index}.0/24");
            docs.push(node_yaml(&node.name, node.ip.expect("plugged"), &cidr));
        }
        for (namespace, labels) in &self.namespace_labels {
            docs.push(format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}, labels: {{{labels}}}}}\n"
            ));
        }
        for pod in all_pods() {
            let node = &self.cluster.nodes[self.node_of(&pod)].name;
            let ports: Vec<String> = PORTS
                .iter()
                .flat_map(|port| {
                    ["TCP", "UDP"].map(|proto| {
                        format!(
                            "{{name: serve-{port}-{}, containerPort: {port}, protocol: {proto}}}",
                            proto.to_lowercase()
                        )
                    })
                })
                .collect();
            docs.push(format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, labels: {{{}}}}}\n\
                 spec: {{nodeName: {node}, containers: [{{name: app, image: none, ports: [{}]}}]}}\n\
                 status: {{phase: Running, podIP: {}}}\n",
                pod.name,
                pod.namespace,
                self.labels[&pod],
                ports.join(", "),
                self.ip(&pod)
            ));
        }
        let xa = self.ip(&PodRef {
            namespace: "x",
            name: "a",
        });
        docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: x}}\n\
             spec: {{type: ClusterIP, clusterIP: {VIP}, ports: [{{name: http, port: 80, targetPort: 80, protocol: TCP}}]}}\n"
        ));
        docs.push(format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: x, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 80, protocol: TCP}}]\n\
             endpoints: [{{addresses: [\"{xa}\"], conditions: {{ready: true}}}}]\n"
        ));
        if !policies.is_empty() {
            docs.push(policies.to_string());
        }
        docs.join("---\n")
    }

    /// Write `policies` (YAML documents) and wait until every agent synced them.
    fn apply(&mut self, policies: &str) -> Result<()> {
        self.changes += 1;
        let marker = Ipv4Addr::new(192, 0, 2, self.changes);
        let marker_policy = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: marker, namespace: z}}\n\
             spec: {{podSelector: {{matchLabels: {{nothing: selected}}}}, egress: [{{to: [{{ipBlock: {{cidr: {marker}/32}}}}]}}]}}\n"
        );
        let all = if policies.is_empty() {
            marker_policy
        } else {
            format!("{policies}---\n{marker_policy}")
        };
        let epochs: Vec<u32> = self
            .cluster
            .nodes
            .iter()
            .map(|n| Ok(n.maps()?.contents()?.config.route_epoch))
            .collect::<Result<_>>()?;
        self.cluster.write_config(&self.objects(&all))?;
        let key = RouteKey {
            prefix_len: 32,
            network: marker.octets(),
        };
        for (node, before) in self.cluster.nodes.iter().zip(epochs) {
            node.wait_for_maps("the policies synced", |c| {
                c.ipcache.contains_key(&key) && c.config.route_epoch != before
            })?;
        }
        Ok(())
    }

    /// Probe every (client, server, port, protocol) at once.
    fn probe(&self) -> Result<BTreeMap<Key, bool>> {
        let mut keys = Vec::new();
        for client in all_pods() {
            for server in all_pods() {
                for port in PORTS {
                    for proto in [Proto::Tcp, Proto::Udp] {
                        keys.push((client.clone(), server.clone(), port, proto));
                    }
                }
            }
        }
        let results: Vec<Result<bool>> = std::thread::scope(|scope| {
            let handles: Vec<_> = keys
                .iter()
                .map(|(client, server, port, proto)| {
                    let netns = &self.pod(client).netns;
                    let to = SocketAddrV4::new(self.ip(server), *port);
                    let expected = server.to_string();
                    let proto = *proto;
                    scope.spawn(move || {
                        netns
                            .run(move || reaches(to, proto, &expected))
                            .and_then(|r| r)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| bail!("probe panicked")))
                .collect()
        });
        keys.into_iter()
            .zip(results)
            .map(|(key, result)| Ok((key, result?)))
            .collect()
    }

    /// Probe and compare with `expected(client, server, port, proto)`; on a
    /// difference, fail with every differing cell.
    fn expect(
        &self,
        case: &str,
        expected: impl Fn(&PodRef, &PodRef, u16, Proto) -> bool,
    ) -> Result<()> {
        // From an API server a change is several watch events (Pods, Namespaces and
        // policies come on streams of their own), which may take more than one sync
        // to arrive: the marker policy says the policies are in, not that a label
        // change on another stream is. So there, the matrix may take a few rounds
        // to become the expected one; it must become exactly that.
        let rounds = match self.cluster.object_source() {
            ObjectSource::File => 1,
            ObjectSource::Kubernetes => 4,
        };
        let mut seen = self.probe()?;
        for _ in 1..rounds {
            if self.differences(&seen, &expected).is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
            seen = self.probe()?;
        }
        let wrong = self.differences(&seen, &expected);
        if !wrong.is_empty() {
            for node in &self.cluster.nodes {
                if let Some(agent) = &node.agent {
                    eprintln!("agent {} log:\n{}", node.name, agent.log_text());
                }
            }
            bail!("{case}: the reachability matrix differs:\n{wrong}");
        }
        eprintln!("{case}: {} probes as expected", seen.len());
        Ok(())
    }

    /// Every cell of `seen` that differs from `expected`, one line each.
    fn differences(
        &self,
        seen: &BTreeMap<Key, bool>,
        expected: &impl Fn(&PodRef, &PodRef, u16, Proto) -> bool,
    ) -> String {
        let mut wrong = String::new();
        for ((client, server, port, proto), reached) in seen {
            // A pod reaching its own address never leaves it (the upstream suite's
            // loopback rule).
            let want = client == server || expected(client, server, *port, *proto);
            if *reached != want {
                let _ = writeln!(
                    wrong,
                    "  {client} -> {server}:{port}/{proto:?}: {} (expected {})",
                    if *reached { "reached" } else { "blocked" },
                    if want { "reached" } else { "blocked" }
                );
            }
        }
        wrong
    }
}

/// Whether `to` answers as the pod `expected` over `proto`, from this thread's
/// network namespace.
fn reaches(to: SocketAddrV4, proto: Proto, expected: &str) -> Result<bool> {
    let timeout = Duration::from_millis(1500);
    let answer = match proto {
        Proto::Tcp => {
            let Ok(mut stream) = TcpStream::connect_timeout(&to.into(), timeout) else {
                return Ok(false);
            };
            stream.set_read_timeout(Some(timeout))?;
            stream.write_all(b"probe\n")?;
            let mut line = String::new();
            if BufReader::new(stream).read_line(&mut line).is_err() {
                return Ok(false);
            }
            line
        }
        Proto::Udp => {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(timeout / 2))?;
            let mut buf = [0u8; 512];
            let mut answer = None;
            for _ in 0..2 {
                socket.send_to(b"probe", to)?;
                if let Ok(n) = socket.recv(&mut buf) {
                    answer = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                    break;
                }
            }
            let Some(answer) = answer else {
                return Ok(false);
            };
            answer
        }
    };
    // `<namespace>/<pod>|<client>|probe`.
    Ok(answer.starts_with(&format!("{expected}|")))
}

fn policy(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

fn pod_ref(name: &str) -> PodRef {
    all_pods()
        .into_iter()
        .find(|p| is(p, name))
        .expect("a matrix pod")
}

fn is(pod: &PodRef, name: &str) -> bool {
    pod.to_string() == name
}

ferrite_tests::from_both_sources!(the_reachability_matrix_follows_every_policy_change);

fn the_reachability_matrix_follows_every_policy_change(source: ObjectSource) -> Result<()> {
    use Proto::{Tcp, Udp};
    let mut m = Matrix::new(source)?;
    m.apply("")?;
    m.expect("no policy", |_, _, _, _| true)?;

    m.apply(&policy(
        "x",
        "deny-ingress",
        "{podSelector: {}, policyTypes: [Ingress]}",
    ))?;
    m.expect("default-deny ingress in x", |_, s, _, _| s.namespace != "x")?;
    // `ferrite explain` says why: z/a -> x/a, both pods of node 0.
    let (z_a, x_a) = (pod_ref("z/a"), pod_ref("x/a"));
    let explanation = m.cluster.nodes[m.node_of(&x_a)].explain(&[
        "--from",
        &format!("{}:40000", m.ip(&z_a)),
        "--to",
        &format!("{}:80/tcp", m.ip(&x_a)),
    ])?;
    assert_eq!(
        explanation["verdict"]["drop_reason"], "drop_policy_ingress",
        "{explanation:#}"
    );
    let said = explanation["runs"][0]["policy"]
        .as_str()
        .unwrap_or_default();
    assert!(
        said.starts_with(&format!("ingress of {}: no rule allows", m.ip(&x_a))),
        "{explanation:#}"
    );
    eprintln!("explain z/a -> x/a: {said}");
    // ... and names the policy isolating x/a, which allows nothing (the agent's).
    assert!(
        said.contains(
            "none of the NetworkPolicies selecting it for ingress (x/deny-ingress) allows it"
        ),
        "{explanation:#}"
    );
    let end = &explanation["runs"][0]["policies"][0];
    assert_eq!(
        (
            &end["pod_name"],
            &end["allowed"],
            &end["selected_by"],
            &end["allowed_by"]
        ),
        (
            &"x/a".into(),
            &false.into(),
            &serde_json::json!(["x/deny-ingress"]),
            &serde_json::json!([])
        ),
        "{explanation:#}"
    );
    // `ferrite monitor` names both pods of the drop, and its reason the direction.
    let monitor = Monitor::start(
        &m.cluster.nodes[m.node_of(&x_a)],
        &["--address", &m.ip(&x_a).to_string()],
        PATIENCE,
    )?;
    let to_x_a = SocketAddrV4::new(m.ip(&x_a), 80);
    assert!(!m
        .pod(&z_a)
        .netns
        .run(|| reaches(to_x_a, Proto::Tcp, "x/a"))??);
    let dropped = monitor.wait_for(
        PATIENCE,
        |line| matches!(line, Line::Drop(e) if e.reason == "drop_policy_ingress"),
    )?;
    let Line::Drop(dropped) = dropped else {
        unreachable!()
    };
    assert_eq!(
        (
            dropped.source_pod.as_deref(),
            dropped.destination_pod.as_deref()
        ),
        (Some("z/a"), Some("x/a")),
        "{dropped:?}"
    );
    drop(monitor);

    m.apply(&policy(
        "x",
        "deny-egress",
        "{podSelector: {}, policyTypes: [Egress]}",
    ))?;
    m.expect("default-deny egress in x", |c, _, _, _| c.namespace != "x")?;

    m.apply(&policy(
        "x",
        "deny-all",
        "{podSelector: {}, policyTypes: [Ingress, Egress]}",
    ))?;
    m.expect("deny all in x", |c, s, _, _| {
        c.namespace != "x" && s.namespace != "x"
    })?;

    let from_y_on_tcp_80 = policy(
        "x",
        "a-from-y",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: \
         {matchExpressions: [{key: ns, operator: In, values: [y]}]}}], ports: [{port: 80, protocol: TCP}]}]}",
    );
    m.apply(&from_y_on_tcp_80)?;
    m.expect("x/a from namespace y on TCP 80", |c, s, p, pr| {
        !is(s, "x/a") || (c.namespace == "y" && p == 80 && pr == Tcp)
    })?;

    // `ferrite explain` names the rule that lets y/b (node 0, as x/a) in.
    let x_a = pod_ref("x/a");
    let explanation = m.cluster.nodes[m.node_of(&x_a)].explain(&[
        "--from",
        &format!("{}:40000", m.ip(&pod_ref("y/b"))),
        "--to",
        &format!("{}:80/tcp", m.ip(&x_a)),
    ])?;
    let said = explanation["runs"][0]["policy"]
        .as_str()
        .unwrap_or_default();
    assert!(
        said.contains("allowed by its rule for identity")
            && said.contains("from NetworkPolicy x/a-from-y"),
        "{explanation:#}"
    );
    assert_eq!(
        explanation["runs"][0]["policies"][0]["allowed_by"],
        serde_json::json!(["x/a-from-y"]),
        "{explanation:#}"
    );
    // So does `--socket`, of the flow to the backend the socket is given (x/a).
    let socket = m.cluster.nodes[m.node_of(&x_a)].explain(&[
        "--socket",
        "--from",
        &format!("{}:40000", m.ip(&pod_ref("y/b"))),
        "--to",
        &format!("{VIP}:80/tcp"),
    ])?;
    let said = socket["runs"][0]["policy"].as_str().unwrap_or_default();
    assert!(
        said.starts_with(&format!("ingress of {}: allowed", m.ip(&x_a)))
            && said.contains("from NetworkPolicy x/a-from-y"),
        "{socket:#}"
    );
    // `ferrite inspect policy` shows x/a's one rule, its peers namespace y's pods.
    let shown = m.cluster.nodes[m.node_of(&x_a)].inspect_json("policy")?;
    let rows: Vec<_> = shown
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["pod"] == m.ip(&x_a).to_string())
        .collect();
    let y_ips: Vec<String> = all_pods()
        .iter()
        .filter(|p| p.namespace == "y")
        .map(|p| format!("{}/32", m.ip(p)))
        .collect();
    assert_eq!(rows.len(), 1, "{shown:#}");
    let row = rows[0];
    assert_eq!(
        (
            &row["direction"],
            &row["verdict"],
            &row["protocol"],
            &row["ports"]
        ),
        (
            &"ingress".into(),
            &"allow".into(),
            &"TCP".into(),
            &"80".into()
        ),
        "{row:#}"
    );
    let mut peers: Vec<String> = row["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| p.as_str().unwrap_or_default().to_string())
        .collect();
    peers.sort();
    let mut want = y_ips.clone();
    want.sort();
    assert_eq!(peers, want, "{row:#}");
    assert_eq!(
        (&row["pod_name"], &row["policies"]),
        (&"x/a".into(), &serde_json::json!(["x/a-from-y"])),
        "{row:#}"
    );
    eprintln!(
        "inspect policy x/a:\n{}",
        m.cluster.nodes[m.node_of(&x_a)].inspect_text(&["policy", "--pod", "x/a"])?
    );
    // `--pod x/a` is `--pod <its address>`.
    let node_of_x_a = &m.cluster.nodes[m.node_of(&x_a)];
    let by_name = node_of_x_a.inspect_json_with("policy", &["--pod", "x/a"])?;
    let by_address =
        node_of_x_a.inspect_json_with("policy", &["--pod", &m.ip(&x_a).to_string()])?;
    assert_eq!(by_name, by_address);
    assert_eq!(by_name.as_array().map(Vec::len), Some(1), "{by_name:#}");
    assert_eq!(by_name[0], *row);
    // A pod of the other node is inspected there.
    let elsewhere = node_of_x_a
        .inspect_json_with("policy", &["--pod", "y/a"])
        .unwrap_err();
    assert!(
        format!("{elsewhere:#}").contains("runs on node"),
        "{elsewhere:#}"
    );

    // Through the Service in front of x/a: the policy sees the client and port 80,
    // on the per-packet path (this process) and at the socket (a pod's process).
    let vip = SocketAddrV4::new(VIP, 80);
    for (client, allowed) in [("y/c", true), ("z/c", false), ("x/b", false)] {
        let client = all_pods().into_iter().find(|p| is(p, client)).unwrap();
        let pod = m.pod(&client);
        let per_packet = pod.netns.run(|| reaches(vip, Tcp, "x/a"))??;
        let socket = pod.probe().tcp(vip, "probe")?;
        let at_socket = socket
            .reply
            .as_deref()
            .is_some_and(|r| r.starts_with("x/a|"));
        assert_eq!(
            (per_packet, at_socket),
            (allowed, allowed),
            "{client} -> the Service of x/a (per packet, at the socket): {socket:?}"
        );
    }

    let one_peer = policy(
        "x",
        "a-from-y-b",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: \
         {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]}",
    );
    m.apply(&one_peer)?;
    m.expect("x/a from pods b of namespace y (one peer)", |c, s, _, _| {
        !is(s, "x/a") || is(c, "y/b")
    })?;
    let two_peers = policy(
        "x",
        "a-from-y-or-b",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: \
         {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: b}}}]}]}",
    );
    m.apply(&two_peers)?;
    m.expect(
        "x/a from namespace y or pods b of x (two peers)",
        |c, s, _, _| !is(s, "x/a") || c.namespace == "y" || is(c, "x/b"),
    )?;

    // Labels change under a policy: a pod's, then a namespace's.
    let y_b = all_pods().into_iter().find(|p| is(p, "y/b")).unwrap();
    m.labels.insert(y_b.clone(), "pod: b2".into());
    m.apply(&one_peer)?;
    m.expect(
        "y/b relabelled: the one-peer policy selects no client",
        |_, s, _, _| !is(s, "x/a"),
    )?;
    m.labels.insert(y_b, "pod: b".into());
    m.namespace_labels.insert("y", "ns: y2".into());
    m.apply(&two_peers)?;
    m.expect(
        "namespace y relabelled: only x/b of the two peers",
        |c, s, _, _| !is(s, "x/a") || is(c, "x/b"),
    )?;
    m.namespace_labels.insert("y", "ns: y".into());

    m.apply(&policy(
        "x",
        "a-named-port",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: serve-81-udp, protocol: UDP}]}]}",
    ))?;
    m.expect("x/a on its named port serve-81-udp", |_, s, p, pr| {
        !is(s, "x/a") || (p == 81 && pr == Udp)
    })?;

    m.apply(&policy(
        "x",
        "a-port-range",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: 80, endPort: 81, protocol: TCP}]}]}",
    ))?;
    m.expect("x/a on TCP 80-81 (endPort)", |_, s, _, pr| {
        !is(s, "x/a") || pr == Tcp
    })?;

    // An SCTP rule is not a TCP or UDP one: the same port over TCP and UDP stays shut.
    m.apply(&policy(
        "x",
        "a-sctp-80",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: 80, protocol: SCTP}]}]}",
    ))?;
    m.expect("x/a on SCTP 80 only", |_, s, _, _| !is(s, "x/a"))?;

    let y_b_ip = m.ip(&all_pods().into_iter().find(|p| is(p, "y/b")).unwrap());
    m.apply(&policy(
        "x",
        "a-to-block",
        &format!(
            "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: \
             [{{ipBlock: {{cidr: 10.244.0.0/16, except: [{y_b_ip}/32]}}}}]}}]}}"
        ),
    ))?;
    m.expect(
        "x/a egress to the pod network except y/b (ipBlock)",
        |c, s, _, _| !is(c, "x/a") || !is(s, "y/b"),
    )?;

    m.apply(&format!(
        "{}---\n{}",
        policy(
            "x",
            "a-no-egress",
            "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress]}"
        ),
        policy(
            "y",
            "b-from-all",
            "{podSelector: {matchLabels: {pod: b}}, ingress: [{}]}"
        )
    ))?;
    m.expect(
        "egress denied at x/a though y/b allows everyone",
        |c, _, _, _| !is(c, "x/a"),
    )?;

    m.apply(&format!(
        "{}---\n{}",
        policy(
            "x",
            "a-from-y-80",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: \
             {matchLabels: {ns: y}}}], ports: [{port: 80}]}]}"
        ),
        policy(
            "x",
            "a-from-z-81-udp",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: \
             {matchLabels: {ns: z}}}], ports: [{port: 81, protocol: UDP}]}]}"
        )
    ))?;
    m.expect("two policies on x/a add up", |c, s, p, pr| {
        !is(s, "x/a")
            || (c.namespace == "y" && p == 80 && pr == Tcp)
            || (c.namespace == "z" && p == 81 && pr == Udp)
    })?;

    // The node's own processes reach its pods whatever the policy (kubelet probes);
    // another node's are outside every peer.
    m.apply(&policy(
        "x",
        "deny-ingress",
        "{podSelector: {}, policyTypes: [Ingress]}",
    ))?;
    let x_a = all_pods().into_iter().find(|p| is(p, "x/a")).unwrap();
    let to = SocketAddrV4::new(m.ip(&x_a), 80);
    let own = m.cluster.nodes[m.node_of(&x_a)]
        .host_probe()
        .tcp(to, "probe")?;
    assert!(own.answer()?.starts_with("x/a|"), "{own:?}");
    let other = m.cluster.nodes[1 - m.node_of(&x_a)]
        .host_probe()
        .tcp(to, "probe")?;
    assert!(other.reply.is_none(), "another node reached x/a: {other:?}");

    m.apply("")?;
    m.expect("every policy deleted", |_, _, _, _| true)?;

    // With the agent down, the tools say what the maps say, and that names need it.
    m.apply(&policy(
        "x",
        "deny-ingress",
        "{podSelector: {}, policyTypes: [Ingress]}",
    ))?;
    let node = m.node_of(&x_a);
    m.cluster.nodes[node].kill_agent()?;
    let node = &m.cluster.nodes[node];
    let explanation = node.explain(&[
        "--from",
        &format!("{}:40000", m.ip(&pod_ref("z/a"))),
        "--to",
        &format!("{}:80/tcp", m.ip(&x_a)),
    ])?;
    let said = explanation["runs"][0]["policy"]
        .as_str()
        .unwrap_or_default();
    assert!(
        said.starts_with(&format!("ingress of {}: no rule allows", m.ip(&x_a)))
            && said.contains("(policy names: agent not reachable"),
        "{explanation:#}"
    );
    let rows = node.inspect_json_with("policy", &["--pod", &m.ip(&x_a).to_string()])?;
    assert_eq!(
        (&rows[0]["verdict"], &rows[0]["policies"]),
        (&"deny all".into(), &serde_json::Value::Null),
        "{rows:#}"
    );
    let by_name = node
        .inspect_json_with("policy", &["--pod", "x/a"])
        .unwrap_err();
    assert!(
        format!("{by_name:#}").contains("needs the node's agent"),
        "{by_name:#}"
    );
    Ok(())
}

/// Whether `to` answers an ICMP echo request (identifier `id`) from this thread's
/// network namespace within a second (a raw socket: the lab has no `ping`).
fn pings(to: Ipv4Addr, id: u16) -> Result<bool> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut request = [8u8, 0, 0, 0, 0, 0, 0, 1, b'p', b'i', b'n', b'g'];
    request[4..6].copy_from_slice(&id.to_be_bytes());
    let sum = request
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    request[2..4].copy_from_slice(&checksum.to_be_bytes());
    let destination = SockAddr::from(SocketAddrV4::new(to, 0));
    for _ in 0..3 {
        socket.send_to(&request, &destination)?;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
        while let Ok(n) = socket.recv(&mut buf) {
            // SAFETY: `recv` initialised the first `n` bytes.
            let packet: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            let icmp = &packet[header_len..];
            let from_target = packet[12..16] == to.octets();
            if from_target && icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// What a connected UDP socket from this thread's network namespace gets for a
/// datagram to `to`: `Ok(true)` for ECONNREFUSED (an ICMP port unreachable came
/// back), `Ok(false)` for silence.
fn refused(to: SocketAddrV4) -> Result<bool> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(to)?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        match socket.send(b"probe") {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(true),
            _ => {}
        }
        match socket.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(true),
            Ok(_) => bail!("{to} answered"),
            Err(_) => {}
        }
    }
    Ok(false)
}

/// Whether `to` answers as the pod `expected` over TCP from `WORLD_IP` (the world's
/// own address; it would otherwise send from its underlay address), from this
/// thread's network namespace.
fn reaches_from_world_ip(to: SocketAddrV4, expected: &str) -> Result<bool> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SockAddr::from(SocketAddrV4::new(WORLD_IP, 0)))?;
    if socket
        .connect_timeout(&SockAddr::from(to), Duration::from_millis(1500))
        .is_err()
    {
        return Ok(false);
    }
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_millis(1500)))?;
    stream.write_all(b"probe\n")?;
    let mut line = String::new();
    if BufReader::new(stream).read_line(&mut line).is_err() {
        return Ok(false);
    }
    Ok(line.starts_with(&format!("{expected}|")))
}

ferrite_tests::from_both_sources!(icmp_and_external_clients_of_isolated_pods);

/// Every pod of namespace x isolated both ways; x/a admits pods b and c of x (any
/// protocol, so ICMP too) and they may send it anything; nothing else is allowed.
/// Pings from x/b (the other node) and x/c (x/a's node) are answered though x/a may
/// send nothing and they receive nothing on their own; x/a's pings go nowhere; a
/// connected UDP socket of x/b gets ECONNREFUSED from a closed port of x/a; a client
/// in the world reaching x/a through a NodePort on x/a's node is dropped there
/// (`drop_policy_ingress`) until an ipBlock admits its address.
fn icmp_and_external_clients_of_isolated_pods(source: ObjectSource) -> Result<()> {
    const NODE_PORT: u16 = 30080;
    let mut m = Matrix::new(source)?;
    let (x_a, x_b, x_c) = (pod_ref("x/a"), pod_ref("x/b"), pod_ref("x/c"));
    let node_of_a = m.node_of(&x_a);
    assert_ne!(m.node_of(&x_b), node_of_a, "x/b is on the other node");
    assert_eq!(m.node_of(&x_c), node_of_a, "x/c is on x/a's node");
    let node_ip = m.cluster.nodes[node_of_a].ip.context("plugged")?;
    let node_port = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web-np, namespace: x}}\n\
         spec: {{type: NodePort, clusterIP: 10.96.0.81, ports: [{{name: http, port: 80, targetPort: 80, nodePort: {NODE_PORT}, protocol: TCP}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-np-1, namespace: x, labels: {{kubernetes.io/service-name: web-np}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 80, protocol: TCP}}]\n\
         endpoints: [{{addresses: [\"{}\"], conditions: {{ready: true}}}}]\n",
        m.ip(&x_a)
    );
    let isolated = format!(
        "{node_port}---\n{}---\n{}---\n{}",
        policy(
            "x",
            "deny-all",
            "{podSelector: {}, policyTypes: [Ingress, Egress]}"
        ),
        policy(
            "x",
            "a-from-b-and-c",
            "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: \
             [{podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}}]}]}"
        ),
        policy(
            "x",
            "b-and-c-to-a",
            "{podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}, \
             policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {pod: a}}}]}]}"
        ),
    );
    m.apply(&isolated)?;
    // From the API server the policies may take a few syncs more (see `expect`).
    let rounds = match source {
        ObjectSource::File => 1,
        ObjectSource::Kubernetes => 4,
    };
    let ping = |m: &Matrix, from: &PodRef, to: &PodRef, id: u16| -> Result<bool> {
        let to = m.ip(to);
        m.pod(from).netns.run(move || pings(to, id))?
    };
    let mut seen = Vec::new();
    for round in 0..rounds {
        seen = vec![
            ping(&m, &x_b, &x_a, 101)?,
            ping(&m, &x_c, &x_a, 102)?,
            ping(&m, &x_a, &x_b, 103)?,
            ping(&m, &x_a, &x_c, 104)?,
        ];
        if seen == [true, true, false, false] {
            break;
        }
        if round + 1 < rounds {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    assert_eq!(
        seen,
        [true, true, false, false],
        "pings x/b -> x/a, x/c -> x/a, x/a -> x/b, x/a -> x/c"
    );

    // The allowed datagram's port unreachable comes back to the client's socket.
    let closed = SocketAddrV4::new(m.ip(&x_a), 9);
    assert!(
        m.pod(&x_b).netns.run(move || refused(closed))??,
        "x/b's connected UDP socket to x/a's closed port is not refused"
    );

    // The world through the NodePort on x/a's node: dropped before x/a.
    let node = &m.cluster.nodes[node_of_a];
    let drops = |node: &ferrite_tests::lab::Node| -> Result<u64> {
        let stats = node.inspect_json("stats")?;
        let row = stats
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["counter"] == "drop_policy_ingress"))
            .context("a drop_policy_ingress row")?;
        row["packets"].as_u64().context("packets")
    };
    let before = drops(node)?;
    let frontend = SocketAddrV4::new(node_ip, NODE_PORT);
    let reached = m
        .cluster
        .world
        .run(move || reaches_from_world_ip(frontend, "x/a"))??;
    assert!(!reached, "the world reached x/a through its NodePort");
    assert!(drops(node)? > before, "no drop_policy_ingress counted");

    let world_allowed = policy(
        "x",
        "a-from-the-world",
        &format!(
            "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Ingress], ingress: [{{from: \
             [{{ipBlock: {{cidr: {WORLD_IP}/32}}}}], ports: [{{port: 80, protocol: TCP}}]}}]}}"
        ),
    );
    m.apply(&format!("{isolated}---\n{world_allowed}"))?;
    let mut reached = false;
    for _ in 0..rounds {
        reached = m
            .cluster
            .world
            .run(move || reaches_from_world_ip(frontend, "x/a"))??;
        if reached {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        reached,
        "an ipBlock holding the world's address does not let it in"
    );
    Ok(())
}
