//! `control-plane` (policy part): what a full sync computes for NetworkPolicy in a
//! cluster of 10,000 pods (100 namespaces x 100, over 50 nodes) and 1,000 policies
//! (10 per namespace, each selecting one app's pods, ingress from a tier of the pods
//! of the namespaces of one team, on a numbered and a named port): the model and
//! the planned writes of one node, in-process (the agent's own code, without
//! parsing or map I/O), first from empty maps, then after one pod's labels change
//! (each change is a full sync: every Pod event is). Side by side: the same cluster
//! without policies.
use std::{collections::BTreeMap, fmt::Write as _, time::Instant};

use anyhow::Result;
use ferrite_agent::{
    model::NodeContext,
    objects_yaml::parse_objects,
    plan::{FullPlan, MapContents, NodeSettings},
};

use super::percentile;

const NAMESPACES: usize = 100;
const PODS_PER_NAMESPACE: usize = 100;
const NODES: usize = 50;
const POLICIES_PER_NAMESPACE: usize = 10;
const CHANGES: usize = 20;

fn cluster_yaml(policies: bool, relabelled: Option<usize>) -> String {
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
                let _ = write!(
                    yaml,
                    "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np-{policy}, \
                     namespace: ns-{namespace}}}\nspec: {{podSelector: {{matchLabels: {{app: app-{policy}}}}}, \
                     ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{team: team-{}}}}}, podSelector: \
                     {{matchLabels: {{tier: t-{}}}}}}}], ports: [{{port: 9090, protocol: TCP}}, {{port: http}}]}}]}}\n",
                    (namespace + policy) % 10,
                    policy % 3
                );
            }
        }
    }
    yaml
}

/// Milliseconds of one full plan of node-0 from `current`, and the plan.
fn plan(yaml: &str, current: &MapContents) -> Result<(f64, FullPlan)> {
    let (objects, _) = parse_objects(yaml)?;
    let settings = NodeSettings {
        node: "node-0".into(),
        ..NodeSettings::default()
    };
    let started = Instant::now();
    let (context, _) = NodeContext::new("node-0", &settings.limits, &objects.nodes, None);
    let plan = FullPlan::new(
        &objects,
        context,
        &BTreeMap::new(),
        current,
        None,
        &settings,
    );
    Ok((started.elapsed().as_secs_f64() * 1000.0, plan))
}

pub fn bench() -> Result<()> {
    println!(
        "\nNetworkPolicy in a full sync: {} pods ({NAMESPACES} namespaces, {NODES} nodes), {} policies; node-0's model and writes, in-process",
        NAMESPACES * PODS_PER_NAMESPACE,
        NAMESPACES * POLICIES_PER_NAMESPACE
    );
    println!(
        "{:<16} {:>14} {:>16} {:>16} {:>10} {:>10}",
        "cluster", "first sync ms", "change p50 ms", "change p99 ms", "ipcache", "policy"
    );
    for policies in [false, true] {
        let (first, plan_0) = plan(&cluster_yaml(policies, None), &MapContents::default())?;
        let mut changes = Vec::new();
        let mut current = plan_0.written.clone();
        for change in 0..CHANGES {
            // A pod of node-0 changes tier (every 50th pod is node-0's).
            let relabelled = (change * NODES * 7) % (NAMESPACES * PODS_PER_NAMESPACE);
            let (ms, next) = plan(&cluster_yaml(policies, Some(relabelled)), &current)?;
            changes.push(ms);
            current = next.written;
        }
        println!(
            "{:<16} {first:>14.1} {:>16.1} {:>16.1} {:>10} {:>10}",
            if policies {
                "with policies"
            } else {
                "no policies"
            },
            percentile(changes.clone(), 0.5),
            percentile(changes, 0.99),
            plan_0.written.ipcache.len(),
            plan_0.written.policy.len()
        );
    }
    println!("targets: first sync < 1,000 ms, one change p99 < 10 ms (with policies)");
    Ok(())
}
