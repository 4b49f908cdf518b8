//! `control-plane` (policy part): what a full sync computes for NetworkPolicy in a
//! cluster of 10,000 pods (100 namespaces x 100, over 50 nodes) and 1,000 policies
//! (10 per namespace, each selecting one app's pods, ingress from a tier of the pods
//! of the namespaces of one team, on a numbered and a named port): the model and
//! the planned writes of one node, in-process (the agent's own code, without
//! parsing or map I/O), first from empty maps, then after one pod's labels change
//! and after one policy's peer selector changes: each change planned as a full
//! sync (side by side) and as the agent plans it, an update of the policy index
//! (`NodeState::plan_policy`). Side by side too: the same cluster without policies.
//! The resident memory after the first sync is printed.
use std::{collections::BTreeMap, fmt::Write as _, time::Instant};

use anyhow::Result;
use ferrite_agent::{
    model::{
        policy::{ObjectKey, PolicyChanges},
        ClusterObjects, NodeContext,
    },
    objects_yaml::parse_objects,
    plan::{FullPlan, MapContents, NodeSettings, NodeState},
};

use super::percentile;

const NAMESPACES: usize = 100;
const PODS_PER_NAMESPACE: usize = 100;
const NODES: usize = 50;
const POLICIES_PER_NAMESPACE: usize = 10;
const CHANGES: usize = 20;

/// How a policy's peer changes.
#[derive(Clone, Copy, PartialEq)]
enum Repolicy {
    /// To another tier: a selector other policies use too.
    SharedSelector,
    /// To a selector no other policy uses (for the same pods as before): every
    /// address it selects changes identity.
    NewSelector,
}

fn cluster_yaml(
    policies: bool,
    relabelled: Option<usize>,
    repoliced: Option<(usize, Repolicy)>,
) -> String {
    let mut yaml = String::new();
    for node in 0..NODES {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-{node}}}\nspec: {{podCIDR: 10.{}.{}.0/24}}\n\
             status: {{addresses: [{{type: InternalIP, address: 192.168.{}.{}}}]}}\n",
            64 + node / 256,
            node % 256,
            node / 250,
            node % 250 + 1
        );
    }
    for namespace in 0..NAMESPACES {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{namespace}, labels: {{team: team-{}}}}}\n",
            namespace % 10
        );
        for pod in 0..PODS_PER_NAMESPACE {
            let index = namespace * PODS_PER_NAMESPACE + pod;
            let node = index % NODES;
            let slot = index / NODES + 2;
            let tier = if relabelled == Some(index) {
                9
            } else {
                pod % 3
            };
            let _ = write!(
                yaml,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p-{pod}, namespace: ns-{namespace}, \
                 labels: {{app: app-{}, tier: t-{tier}}}}}\nspec: {{nodeName: node-{node}, containers: \
                 [{{name: c, image: i, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
                 status: {{phase: Running, podIP: 10.{}.{}.{}}}\n",
                pod % POLICIES_PER_NAMESPACE,
                64 + node / 256,
                node % 256,
                slot
            );
        }
        if policies {
            for policy in 0..POLICIES_PER_NAMESPACE {
                let index = namespace * POLICIES_PER_NAMESPACE + policy;
                let peer_pods = match repoliced {
                    Some((i, Repolicy::SharedSelector)) if i == index => {
                        format!("matchLabels: {{tier: t-{}}}", (policy + 1) % 3)
                    }
                    Some((i, Repolicy::NewSelector)) if i == index => format!(
                        "matchLabels: {{tier: t-{}}}, matchExpressions: [{{key: app, operator: Exists}}]",
                        policy % 3
                    ),
                    _ => format!("matchLabels: {{tier: t-{}}}", policy % 3),
                };
                let _ = write!(
                    yaml,
                    "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np-{policy}, \
                     namespace: ns-{namespace}}}\nspec: {{podSelector: {{matchLabels: {{app: app-{policy}}}}}, \
                     ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{team: team-{}}}}}, podSelector: \
                     {{{peer_pods}}}}}], ports: [{{port: 9090, protocol: TCP}}, {{port: http}}]}}]}}\n",
                    (namespace + policy) % 10,
                );
            }
        }
    }
    yaml
}

/// Milliseconds of one full plan of node-0 from `current`, and the plan.
fn plan(objects: &ClusterObjects, current: &MapContents) -> (f64, FullPlan) {
    let settings = NodeSettings {
        node: "node-0".into(),
        ..NodeSettings::default()
    };
    let started = Instant::now();
    let (context, _) = NodeContext::new("node-0", &settings.limits, &objects.nodes, None);
    let plan = FullPlan::new(objects, context, &BTreeMap::new(), current, None, &settings);
    (started.elapsed().as_secs_f64() * 1000.0, plan)
}

/// Milliseconds of one policy update of `state` (planned and recorded as written).
fn update(state: &mut NodeState, changes: &PolicyChanges) -> f64 {
    let started = Instant::now();
    let plan = state
        .plan_policy(changes)
        .expect("a change only policy reads");
    state.commit_policy(plan);
    started.elapsed().as_secs_f64() * 1000.0
}

/// The resident memory of this process, in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// A change: the objects after it, and what the sources hand over for it.
fn changed(
    objects: &ClusterObjects,
    pod: Option<(usize, usize)>,
    policy: Option<(usize, usize)>,
) -> PolicyChanges {
    let mut changes = PolicyChanges::default();
    if let Some((namespace, pod)) = pod {
        let key = ObjectKey {
            namespace: format!("ns-{namespace}"),
            name: format!("p-{pod}"),
        };
        let object = objects
            .pods
            .iter()
            .find(|p| ObjectKey::of(&p.metadata) == key)
            .cloned();
        changes.pods.push((key, object));
    }
    if let Some((namespace, policy)) = policy {
        let key = ObjectKey {
            namespace: format!("ns-{namespace}"),
            name: format!("np-{policy}"),
        };
        let object = objects
            .network_policies
            .iter()
            .find(|p| ObjectKey::of(&p.metadata) == key)
            .cloned();
        changes.network_policies.push((key, object));
    }
    changes
}

pub fn bench() -> Result<()> {
    println!(
        "\nNetworkPolicy: {} pods ({NAMESPACES} namespaces, {NODES} nodes), {} policies; node-0's model and writes, in-process",
        NAMESPACES * PODS_PER_NAMESPACE,
        NAMESPACES * POLICIES_PER_NAMESPACE
    );
    println!(
        "{:<16} {:<11} {:>9} {:>14} {:>14} {:>14} {:>14} {:>8} {:>7} {:>8}",
        "cluster",
        "change",
        "first ms",
        "full p50 ms",
        "full p99 ms",
        "update p50 ms",
        "update p99 ms",
        "ipcache",
        "policy",
        "RSS MiB"
    );
    for policies in [false, true] {
        let (objects, _) = parse_objects(&cluster_yaml(policies, None, None))?;
        let (first, plan_0) = plan(&objects, &MapContents::default());
        let rss = rss_mib();
        let (ipcache, policy) = (plan_0.written.ipcache.len(), plan_0.written.policy.len());
        let kinds: &[&str] = if policies {
            &["pod label", "policy", "new peer"]
        } else {
            &["pod label"]
        };
        for kind in kinds {
            let (_, start) = plan(&objects, &MapContents::default());
            let mut current = start.written.clone();
            let mut state = start.into_state();
            let (mut full, mut updates) = (Vec::new(), Vec::new());
            for change in 0..CHANGES {
                // A pod of node-0 changes tier (every 50th pod is node-0's), or a
                // policy selects another tier of peers, or its tier by a selector
                // of its own.
                let relabelled = (change * NODES * 7) % (NAMESPACES * PODS_PER_NAMESPACE);
                let repoliced = (change * 37) % (NAMESPACES * POLICIES_PER_NAMESPACE);
                let repolicy = match *kind {
                    "policy" => Some(Repolicy::SharedSelector),
                    "new peer" => Some(Repolicy::NewSelector),
                    _ => None,
                };
                let (yaml, pod, policy) = if let Some(repolicy) = repolicy {
                    let (namespace, policy) = (
                        repoliced / POLICIES_PER_NAMESPACE,
                        repoliced % POLICIES_PER_NAMESPACE,
                    );
                    (
                        cluster_yaml(policies, None, Some((repoliced, repolicy))),
                        None,
                        Some((namespace, policy)),
                    )
                } else {
                    let (namespace, pod) = (
                        relabelled / PODS_PER_NAMESPACE,
                        relabelled % PODS_PER_NAMESPACE,
                    );
                    (
                        cluster_yaml(policies, Some(relabelled), None),
                        Some((namespace, pod)),
                        None,
                    )
                };
                let (after, _) = parse_objects(&yaml)?;
                let (ms, next) = plan(&after, &current);
                full.push(ms);
                current = next.written;
                updates.push(update(&mut state, &changed(&after, pod, policy)));
                // Back to the first cluster, as an update too (not timed).
                let (before, _) = parse_objects(&cluster_yaml(policies, None, None))?;
                update(&mut state, &changed(&before, pod, policy));
                let (_, back) = plan(&before, &current);
                current = back.written;
                assert!(
                    state.written.contents == current,
                    "the updates wrote what full syncs write"
                );
            }
            println!(
                "{:<16} {kind:<11} {first:>9.1} {:>14.1} {:>14.1} {:>14.2} {:>14.2} {ipcache:>8} {policy:>7} {rss:>8.0}",
                if policies {
                    "with policies"
                } else {
                    "no policies"
                },
                percentile(full.clone(), 0.5),
                percentile(full, 0.99),
                percentile(updates.clone(), 0.5),
                percentile(updates, 0.99),
            );
        }
    }
    println!("targets: first sync < 1,000 ms, one change p99 < 10 ms (with policies, as the agent plans it: update)");
    Ok(())
}
