//! The policy model's unit tests: semantics of the Kubernetes API, one by one.
use super::*;
use crate::{limits::Limits, objects_yaml::parse_objects};

const NODE: &str = "node-a";

/// Namespaces x (team: a), y (team: b), z; pods a, b, c in each (label pod: NAME),
/// x's on node-a; pod x/a serves named port `serve-80-tcp` on 80.
fn cluster(policies: &str) -> (PolicyModel, Vec<String>) {
    let (index, skipped) = cluster_index(policies);
    (index.model().clone(), skipped)
}

/// [`cluster`]'s index (what the agent keeps and answers queries from).
fn cluster_index(policies: &str) -> (PolicyIndex, Vec<String>) {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDR: 10.244.0.0/24}\nstatus: {addresses: [{type: InternalIP, address: 198.51.100.1}]}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-b}\nspec: {podCIDR: 10.244.1.0/24}\nstatus: {addresses: [{type: InternalIP, address: 198.51.100.2}]}\n",
    );
    for (n, (ns, labels)) in [("x", "{team: a}"), ("y", "{team: b}"), ("z", "{}")]
        .iter()
        .enumerate()
    {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {labels}}}\n"
        ));
        for (p, pod) in ["a", "b", "c"].iter().enumerate() {
            let node = if *ns == "x" { "node-a" } else { "node-b" };
            let ip = format!("10.244.{}.{}", usize::from(*ns != "x"), 10 + n * 10 + p);
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c, ports: [{{name: serve-80-tcp, containerPort: 80}}, {{name: serve-81-udp, containerPort: 81, protocol: UDP}}]}}]}}\nstatus: {{podIP: {ip}}}\n"
            ));
        }
    }
    yaml.push_str(policies);
    let (objects, skipped) = parse_objects(&yaml).unwrap();
    assert!(skipped.is_empty(), "{skipped:?}");
    let (context, _) = NodeContext::new(NODE, &Limits::default(), &objects.nodes, None);
    let mut skipped = Vec::new();
    let index = PolicyIndex::build(
        &objects.network_policies,
        &objects.namespaces,
        &objects.pods,
        &context,
        &mut skipped,
    );
    (index, skipped.iter().map(ToString::to_string).collect())
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// The identity of an address, as the datapath's longest-prefix lookup finds it.
fn identity(model: &PolicyModel, address: &str) -> Identity {
    let address = ip(address);
    model
        .ipcache
        .iter()
        .filter(|(prefix, _)| prefix.contains(&address))
        .max_by_key(|(prefix, _)| prefix.prefix_len())
        .map(|(_, identity)| *identity)
        .unwrap_or(IDENTITY_WORLD)
}

/// Whether pod `endpoint` of node-a allows `direction` traffic with `peer`, as
/// the datapath decides it (not isolated: allowed).
fn allowed(
    model: &PolicyModel,
    endpoint: &str,
    direction: Direction,
    peer: &str,
    protocol: u8,
    port: u16,
) -> bool {
    let Some(policy) = model.endpoints.get(&ip(endpoint)) else {
        return true;
    };
    let isolated = match direction {
        Direction::Ingress => policy.ingress_isolated,
        Direction::Egress => policy.egress_isolated,
    };
    let peer = identity(model, peer);
    !isolated
        || policy.allows.iter().any(|a| {
            a.direction == direction
                && (a.identity == peer || a.identity == IDENTITY_ANY)
                && (a.protocol == 0 || a.protocol == protocol)
                && a.ports.is_none_or(|(s, e)| (s..=e).contains(&port))
        })
}

// x/a 10.244.0.10, x/b .11, x/c .12; y/a 10.244.1.20 ...; z/a 10.244.1.30 ...
const XA: &str = "10.244.0.10";
const XB: &str = "10.244.0.11";
const YA: &str = "10.244.1.20";
const ZB: &str = "10.244.1.31";

fn policy(name: &str, spec: &str) -> String {
    format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec: {spec}\n")
}

#[test]
fn default_deny_and_allows_by_pod_namespace_and_both_selectors() {
    let (model, skipped) = cluster(&policy("deny", "{podSelector: {}}"));
    assert!(skipped.is_empty(), "{skipped:?}");
    assert!(!allowed(&model, XA, Direction::Ingress, XB, TCP, 80));
    assert!(
        allowed(&model, XA, Direction::Egress, YA, TCP, 80),
        "egress not isolated"
    );

    let (model, _) = cluster(&policy(
        "allow",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}, {namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [b]}]}}, {namespaceSelector: {}, podSelector: {matchLabels: {pod: b}}}]}]}",
    ));
    assert!(
        allowed(&model, XA, Direction::Ingress, XB, TCP, 80),
        "x/b by podSelector"
    );
    assert!(
        allowed(&model, XA, Direction::Ingress, YA, UDP, 81),
        "y/a by namespaceSelector"
    );
    assert!(
        allowed(&model, XA, Direction::Ingress, ZB, TCP, 80),
        "z/b by both together"
    );
    assert!(
        !allowed(&model, XA, Direction::Ingress, "10.244.1.30", TCP, 80),
        "z/a by neither"
    );
    assert!(
        !allowed(&model, XA, Direction::Ingress, "203.0.113.9", TCP, 80),
        "the world"
    );
    assert!(
        !model.endpoints.contains_key(&ip(XB)),
        "x/b is not selected"
    );
}

#[test]
fn ports_named_ports_ranges_and_protocols() {
    let (model, _) = cluster(&policy(
        "ports",
        "{podSelector: {}, policyTypes: [Ingress, Egress], ingress: [{ports: [{port: serve-80-tcp}, {port: 1000, endPort: 1010, protocol: UDP}, {port: 81, protocol: SCTP}]}], egress: [{to: [{podSelector: {}, namespaceSelector: {}}], ports: [{port: serve-81-udp, protocol: UDP}]}]}",
    ));
    assert!(
        allowed(&model, XA, Direction::Ingress, YA, TCP, 80),
        "named port"
    );
    assert!(!allowed(&model, XA, Direction::Ingress, YA, TCP, 81));
    assert!(
        allowed(&model, XA, Direction::Ingress, YA, UDP, 1005),
        "range"
    );
    assert!(!allowed(&model, XA, Direction::Ingress, YA, UDP, 1011));
    assert!(allowed(&model, XA, Direction::Ingress, YA, SCTP, 81));
    assert!(
        !allowed(&model, XA, Direction::Ingress, YA, TCP, 1005),
        "SCTP and UDP are not TCP"
    );
    assert!(
        allowed(&model, XA, Direction::Egress, ZB, UDP, 81),
        "egress named port of the peer"
    );
    assert!(!allowed(&model, XA, Direction::Egress, ZB, UDP, 80));
    assert!(
        !allowed(&model, XA, Direction::Egress, "203.0.113.9", UDP, 81),
        "the world is no pod"
    );
}

#[test]
fn ip_blocks_with_except_stacked_policies_and_refusals() {
    let (model, skipped) = cluster(&format!(
        "{}{}{}",
        policy(
            "cidr",
            "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.244.1.0/24, except: [10.244.1.20/32]}}, {ipBlock: {cidr: 203.0.113.0/24}}]}]}",
        ),
        policy("more", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.244.1.20/32}}], ports: [{port: 81, protocol: UDP}]}]}"),
        policy("broken", "{podSelector: {matchExpressions: [{key: pod, operator: Gt, values: ['1']}]}}"),
    ));
    assert!(
        allowed(&model, XB, Direction::Egress, ZB, TCP, 80),
        "inside the cidr"
    );
    assert!(
        !allowed(&model, XB, Direction::Egress, YA, TCP, 80),
        "in the except"
    );
    assert!(allowed(
        &model,
        XB,
        Direction::Egress,
        "203.0.113.77",
        TCP,
        443
    ));
    assert!(!allowed(
        &model,
        XB,
        Direction::Egress,
        "198.51.100.9",
        TCP,
        443
    ));
    // Stacked: x/a also reaches the excepted address on UDP 81.
    assert!(allowed(&model, XA, Direction::Egress, YA, UDP, 81));
    assert!(!allowed(&model, XA, Direction::Egress, YA, TCP, 81));
    assert!(
        skipped
            .iter()
            .any(|s| s.contains("broken") && s.contains("podSelector")),
        "{skipped:?}"
    );
}

/// The policies the index names for x/a's rule (`direction`, the peer's identity,
/// `protocol`, `port`).
fn allowing(
    index: &PolicyIndex,
    direction: Direction,
    peer: &str,
    protocol: u8,
    port: u16,
) -> Vec<String> {
    let sources = index.endpoint_sources(ip(XA)).expect("x/a is policed");
    let peer = identity(index.model(), peer);
    sources
        .allowing(direction, peer, protocol, port)
        .into_iter()
        .map(String::from)
        .collect()
}

#[test]
fn queries_name_the_policies_each_allow_comes_from_and_add_up_to_the_model() {
    let (index, _) = cluster_index(&format!(
        "{}{}{}{}",
        policy("deny", "{podSelector: {}, policyTypes: [Ingress, Egress]}"),
        policy(
            "from-team-b",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}], ports: [{port: 80}]}]}",
        ),
        policy(
            "from-y-a-any-port",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: a}}}]}]}",
        ),
        policy(
            "to-block",
            "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}}], ports: [{port: 443}]}]}",
        ),
    ));
    let sources = index.endpoint_sources(ip(XA)).expect("x/a is policed");
    assert_eq!(sources.pod, "x/a");
    assert!(!sources.truncated);
    assert_eq!(
        sources.selecting(Direction::Ingress),
        ["x/deny", "x/from-team-b", "x/from-y-a-any-port"]
    );
    assert_eq!(
        sources.selecting(Direction::Egress),
        ["x/deny", "x/to-block"]
    );
    // Stacked policies allowing the same flow are both named.
    assert_eq!(
        allowing(&index, Direction::Ingress, YA, TCP, 80),
        ["x/from-team-b", "x/from-y-a-any-port"]
    );
    // One policy each: y/b by the namespaceSelector on port 80; y/a on another port.
    assert_eq!(
        allowing(&index, Direction::Ingress, "10.244.1.21", TCP, 80),
        ["x/from-team-b"]
    );
    assert_eq!(
        allowing(&index, Direction::Ingress, YA, UDP, 81),
        ["x/from-y-a-any-port"]
    );
    assert!(allowing(&index, Direction::Ingress, "10.244.1.21", TCP, 81).is_empty());
    assert!(allowing(&index, Direction::Ingress, ZB, TCP, 80).is_empty());
    // The ipBlock, and its except.
    assert_eq!(
        allowing(&index, Direction::Egress, "203.0.113.9", TCP, 443),
        ["x/to-block"]
    );
    assert!(allowing(&index, Direction::Egress, "203.0.113.200", TCP, 443).is_empty());
    assert!(allowing(&index, Direction::Egress, "203.0.113.9", TCP, 80).is_empty());
    // What the policies give, together, is what the model's endpoint holds.
    let endpoint = &index.model().endpoints[&ip(XA)];
    let union: BTreeSet<Allow> = sources
        .policies
        .iter()
        .flat_map(|p| p.allows.iter().copied())
        .collect();
    assert_eq!(union, endpoint.allows);
    let names: BTreeSet<String> = sources.policies.iter().map(|p| p.name.clone()).collect();
    assert_eq!(names, endpoint.policies);
    // Only pods of this node have policies here; any known pod has an address.
    assert_eq!(index.endpoint_sources(ip(YA)), None, "y/a runs on node-b");
    assert_eq!(index.pod_address("x", "a"), PodAddress::Here(ip(XA)));
    assert_eq!(
        index.pod_address("y", "a"),
        PodAddress::Elsewhere(ip(YA), Some("node-b".into()))
    );
    assert_eq!(index.pod_address("x", "nope"), PodAddress::Unknown);
}

#[test]
fn answers_are_bounded() {
    // Many ports from one policy: the answer keeps at most MAX_SOURCE_ALLOWS.
    let ports: Vec<String> = (1..=MAX_SOURCE_ALLOWS + 10)
        .map(|p| format!("{{port: {p}}}"))
        .collect();
    let (index, _) = cluster_index(&policy(
        "many",
        &format!(
            "{{podSelector: {{matchLabels: {{pod: a}}}}, ingress: [{{ports: [{}]}}]}}",
            ports.join(", ")
        ),
    ));
    let sources = index.endpoint_sources(ip(XA)).expect("policed");
    assert!(sources.truncated);
    let kept: usize = sources.policies.iter().map(|p| p.allows.len()).sum();
    assert_eq!(kept, MAX_SOURCE_ALLOWS);
}

/// A `namespaceSelector` peer means the same pods whichever namespace its policy is
/// in: policies of different namespaces naming it share one peer, so one more such
/// policy gives no address a new identity; a `podSelector` alone means pods of the
/// policy's own namespace, so the same selector in another namespace is another peer.
#[test]
fn equal_namespace_selector_peers_are_one_peer_across_namespaces() {
    let peer =
        "{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchLabels: {pod: a}}}";
    let in_namespace = |namespace: &str, peer: &str| {
        policy(
            &format!("from-{namespace}"),
            &format!("{{podSelector: {{}}, ingress: [{{from: [{peer}]}}]}}"),
        )
        .replace("namespace: x}", &format!("namespace: {namespace}}}"))
    };
    let (one, _) = cluster(&in_namespace("x", peer));
    let (two, _) = cluster(&(in_namespace("x", peer) + &in_namespace("z", peer)));
    assert_ne!(identity(&one, YA), IDENTITY_WORLD, "y/a is a peer");
    assert_eq!(one.ipcache, two.ipcache, "z's policy names the same peer");
    assert!(allowed(&two, XA, Direction::Ingress, YA, TCP, 80));

    let own = "{podSelector: {matchLabels: {pod: a}}}";
    let (one, _) = cluster(&in_namespace("x", own));
    let (two, _) = cluster(&(in_namespace("x", own) + &in_namespace("y", own)));
    assert_ne!(identity(&two, YA), IDENTITY_WORLD, "y's policy selects y/a");
    assert_eq!(identity(&one, YA), IDENTITY_WORLD, "x's does not");
    assert_ne!(identity(&one, XA), identity(&two, YA));
}
