//! The Kubernetes manifests in deploy/ are what an operator applies: they must be
//! valid for a recent Kubernetes (strict schema validation with the PyPI
//! `kubernetes-validate`, installed by `cargo xtask setup`) and keep the promises the
//! README makes (read-only RBAC, no privileged container, every node covered).
use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};
use ferrite_tests::install_cni;
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
    assert_eq!(
        resources,
        [
            "endpointslices",
            "namespaces",
            "networkpolicies",
            "nodes",
            "pods",
            "services"
        ]
    );
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
    assert_eq!(
        added,
        ["BPF", "NET_ADMIN", "PERFMON", "SETPCAP", "SYS_ADMIN"]
    );
    for init in pod["initContainers"].as_sequence().context("init")? {
        assert_ne!(init["securityContext"]["privileged"], true);
    }
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["ports"][0]["containerPort"], 9965);
    Ok(())
}

/// `/metrics` names every Service and backend: the agent serves it on the node's
/// loopback unless the operator exposes it, and kubelet probes it there (the pod
/// shares the node's network, as kubelet does).
#[test]
fn the_agents_http_endpoint_is_on_loopback_where_kubelet_probes_it() -> Result<()> {
    let docs = documents("daemonset.yaml")?;
    let template = &docs[0]["spec"]["template"];
    let agent = &template["spec"]["containers"][0];
    let command = strings(&agent["command"]);
    assert!(
        command.contains(&"--http-addr=127.0.0.1:9965".to_string()),
        "{command:?}"
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(get["host"], "127.0.0.1", "{probe}");
        let port = &get["port"];
        let named = agent["ports"]
            .as_sequence()
            .context("ports")?
            .iter()
            .find(|p| &p["name"] == port || &p["containerPort"] == port)
            .with_context(|| format!("{probe}: no port {port:?}"))?;
        assert_eq!(named["containerPort"], 9965, "{probe}");
    }
    assert!(
        template["metadata"]["annotations"]["prometheus.io/scrape"].is_null(),
        "scraping is announced but /metrics is on loopback"
    );
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
    // ferrite-cni alone (hostPorts are served in eBPF), still a plugin chain: a
    // plugin a user appends gets ferrite-cni's result as its prevResult.
    assert_eq!(file["plugins"].as_array().map(Vec::len), Some(1));
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

/// The init container's `--plugins-from`: where the image holds the plugins it ships.
fn plugins_from_of(init: &Value) -> Result<String> {
    strings(&init["command"])
        .iter()
        .find_map(|a| a.strip_prefix("--plugins-from=").map(String::from))
        .context("the init container passes no --plugins-from=")
}

fn install_cni_container(pod: &Value) -> Result<Value> {
    pod["initContainers"]
        .as_sequence()
        .and_then(|inits| inits.iter().find(|i| i["name"] == "install-cni"))
        .cloned()
        .context("no install-cni init container")
}

#[test]
fn the_image_ships_exactly_the_plugins_the_conflist_and_the_runtime_need() -> Result<()> {
    let conflist: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        deploy_dir().join("10-ferrite.conflist"),
    )?)?;
    let mut needed: Vec<String> = ferrite_agent::install_cni::needed_plugins(&conflist)?
        .into_iter()
        .map(|need| need.plugin)
        .collect();
    needed.sort();
    let mut shipped = install_cni::shipped_plugins()?;
    shipped.sort();
    assert_eq!(
        needed,
        ["loopback"],
        "no portmap: the agent serves hostPorts"
    );
    assert_eq!(shipped, needed, "deploy/cni-plugins");
    // A plugin a user chains after ferrite-cni is one the installer requires too.
    let mut chained = conflist.clone();
    chained["plugins"]
        .as_array_mut()
        .context("plugins")?
        .push(serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    let mut needed: Vec<String> = ferrite_agent::install_cni::needed_plugins(&chained)?
        .into_iter()
        .map(|need| need.plugin)
        .collect();
    needed.sort();
    assert_eq!(needed, ["loopback", "portmap"]);
    // The image (deploy/Dockerfile and `cargo xtask image` alike, both through
    // deploy/assemble-rootfs) puts the list's plugins where the init container looks.
    let docs = documents("daemonset.yaml")?;
    let init = install_cni_container(&docs[0]["spec"]["template"]["spec"])?;
    let contents = std::fs::read_to_string(deploy_dir().join("image-contents"))?;
    let destinations: Vec<&str> = contents
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .filter_map(|line| line.trim().strip_prefix("cni-plugins "))
        .map(str::trim)
        .collect();
    assert_eq!(
        destinations,
        [plugins_from_of(&init)?],
        "deploy/image-contents"
    );
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile"))?;
    assert!(
        dockerfile.contains("RUN /src/deploy/assemble-rootfs /src /rootfs")
            && dockerfile.contains("COPY --from=rootfs /rootfs/ /"),
        "the Dockerfile must build its image as deploy/assemble-rootfs does:\n{dockerfile}"
    );
    Ok(())
}

/// `$(NAME)` references in a container's command, as the kubelet expands them.
fn expand(arg: &str, env: &[(String, String)]) -> String {
    env.iter().fold(arg.to_string(), |arg, (name, value)| {
        arg.replace(&format!("$({name})"), value)
    })
}

#[test]
fn the_install_cni_init_container_installs_with_its_command_mounts_and_capabilities() -> Result<()>
{
    ferrite_tests::lab::require_root()?; // setpriv narrows the capability bounding set
    let daemonset = documents("daemonset.yaml")?;
    let configmaps = documents("configmap.yaml")?;
    let pod = &daemonset[0]["spec"]["template"]["spec"];
    let init = install_cni_container(pod)?;
    let scratch = install_cni::Scratch::new("icni-manifest")?;

    // The kubelet's view: env from the Downward API (the node is `worker-1`).
    let mut env = Vec::new();
    for var in init["env"].as_sequence().context("env")? {
        let name = var["name"].as_str().context("env name")?.to_string();
        let value = match (&var["value"], &var["valueFrom"]["fieldRef"]["fieldPath"]) {
            (Value::String(value), _) => value.clone(),
            (_, path) if path == "spec.nodeName" => "worker-1".to_string(),
            other => bail!("env {name}: {other:?} is not handled here"),
        };
        env.push((name, value));
    }
    // Each mount is a directory under the scratch root at the same path; a
    // ConfigMap volume holds the ConfigMap's keys as files.
    let volumes = pod["volumes"].as_sequence().context("volumes")?;
    for mount in init["volumeMounts"].as_sequence().context("mounts")? {
        let path = mount["mountPath"].as_str().context("mountPath")?;
        let dir = scratch.dir(path)?;
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .context("a mount without its volume")?;
        if let Some(name) = volume["configMap"]["name"].as_str() {
            let configmap = configmaps
                .iter()
                .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name)
                .with_context(|| format!("no ConfigMap {name}"))?;
            for (key, value) in configmap["data"].as_mapping().context("data")? {
                let (key, value) = (
                    key.as_str().context("key")?,
                    value.as_str().context("value")?,
                );
                std::fs::write(dir.join(key), value)?;
            }
        } else {
            assert!(volume["hostPath"].is_mapping(), "{volume:?}");
        }
    }
    // The image's plugins, where the Dockerfile puts them (checked above).
    scratch.image_plugins(&plugins_from_of(&init)?)?;

    // The command, its absolute paths moved under the scratch root.
    let command = strings(&init["command"]);
    assert_eq!(command[0], "ferrite", "the image's binary");
    let reroot = |arg: String| match arg.split_once("=/") {
        Some((flag, path)) => format!("{flag}={}", scratch.root.join(path).display()),
        None => arg,
    };
    let args: Vec<String> = command[1..]
        .iter()
        .chain(strings(&init["args"]).iter())
        .map(|arg| reroot(expand(arg, &env)))
        .collect();
    // The container's capabilities and nothing more: the bounding set of root.
    let security = &init["securityContext"];
    assert_eq!(security["runAsUser"], 0);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let keep: Vec<String> = strings(&security["capabilities"]["add"])
        .iter()
        .map(|c| format!(",+{}", c.to_lowercase()))
        .collect();
    let out = Command::new("setpriv")
        .arg(format!("--bounding-set=-all{}", keep.concat()))
        .arg("--inh-caps=-all")
        .arg("--")
        .arg(ferrite_tests::lab::ferrite_bin())
        .args(&args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_BACKTRACE", "0")
        .output()?;
    let log = install_cni::text_of(&out);
    assert!(out.status.success(), "{args:?}: {log}");
    let bin = scratch.root.join("host/opt/cni/bin");
    for plugin in ["ferrite-cni", "loopback"] {
        assert!(
            install_cni::is_executable(&bin.join(plugin)),
            "{plugin}: {log}"
        );
    }
    let conflist: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        scratch.root.join("host/etc/cni/net.d/10-ferrite.conflist"),
    )?)?;
    assert_eq!(conflist["plugins"][0]["node"], "worker-1");
    Ok(())
}
