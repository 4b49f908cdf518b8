//! The Kubernetes manifests in deploy/ are what an operator applies: they must be
//! valid for a recent Kubernetes (strict schema validation with the PyPI
//! `kubernetes-validate`, installed by `cargo xtask setup`) and keep the promises the
//! README makes (read-only RBAC, no privileged container, every node covered).
use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_yaml_ng::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn documents(file: &str) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(deploy_dir().join(file))?;
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(Value::deserialize)
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {file}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_manifest_validates_strictly_against_kubernetes_1_37() -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "manifests: {files:?}");
    for file in files {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", "1.37.0"])
            .arg(&file)
            .output()
            .context("running kubernetes-validate (installed by `cargo xtask setup`)")?;
        if !out.status.success() {
            bail!(
                "{} is not valid:\n{}{}",
                file.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

#[test]
fn rbac_only_reads_what_the_agent_watches() -> Result<()> {
    let docs = documents("rbac.yaml")?;
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .context("no ClusterRole")?;
    let mut resources = Vec::new();
    for rule in role["rules"].as_sequence().context("rules")? {
        let verbs = strings(&rule["verbs"]);
        assert!(
            verbs
                .iter()
                .all(|v| ["get", "list", "watch"].contains(&v.as_str())),
            "write access: {verbs:?}"
        );
        resources.extend(strings(&rule["resources"]));
    }
    resources.sort();
    assert_eq!(resources, ["endpointslices", "nodes", "pods", "services"]);
    Ok(())
}

#[test]
fn the_daemonset_runs_unprivileged_on_every_node_with_probes() -> Result<()> {
    let docs = documents("daemonset.yaml")?;
    let pod = &docs[0]["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert!(
        pod["tolerations"].as_sequence().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null())),
        "must tolerate every taint"
    );
    let agent = &pod["containers"][0];
    let security = &agent["securityContext"];
    assert_ne!(security["privileged"], true);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let mut added = strings(&security["capabilities"]["add"]);
    added.sort();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]);
    for init in pod["initContainers"].as_sequence().context("init")? {
        assert_ne!(init["securityContext"]["privileged"], true);
    }
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["ports"][0]["containerPort"], 9965);
    Ok(())
}

#[test]
fn the_conflist_file_and_the_configmap_copy_are_the_same_configuration() -> Result<()> {
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        deploy_dir().join("10-ferrite.conflist"),
    )?)?;
    let docs = documents("configmap.yaml")?;
    let embedded = docs[0]["data"]["10-ferrite.conflist"]
        .as_str()
        .context("no conflist in the ConfigMap")?;
    assert_eq!(serde_json::from_str::<serde_json::Value>(embedded)?, file);
    let ferrite = &file["plugins"][0];
    assert_eq!(ferrite["type"], "ferrite-cni");
    assert_eq!(ferrite["node"], "__NODE_NAME__");
    assert_eq!(file["plugins"][1]["type"], "portmap");
    // What the runtime will hand ferrite-cni once the installer named the node.
    let mut config = ferrite.clone();
    config["name"] = file["name"].clone();
    config["cniVersion"] = file["cniVersion"].clone();
    config["node"] = "worker-1".into();
    let parsed = ferrite_agent::cni::spec::NetConf::parse(config.to_string().as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: {}", e.msg, e.details))?;
    assert_eq!(parsed.mtu, 1450);
    Ok(())
}
