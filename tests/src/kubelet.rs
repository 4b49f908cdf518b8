//! What kubelet makes of deploy/daemonset.yaml's pod template on one node, for the
//! image's end-to-end test: the CRI requests it sends (pod sandbox, then each init
//! container to completion, then the containers), with env resolved from the
//! Downward API and the ConfigMap of deploy/configmap.yaml, `$(VAR)` expanded in
//! command and args, every volume mounted (hostPath volumes at the node's paths, the
//! ConfigMap's keys as files, the service account's token, CA and namespace at
//! /var/run/secrets/kubernetes.io/serviceaccount), the securityContext's
//! capabilities and nothing more, and the probes. The manifest is parsed, not copied:
//! a field this translation does not know fails the test, so the manifest cannot
//! gain something the test silently ignores.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use k8s_cri::v1::{
    Capability, ContainerConfig, ContainerMetadata, ImageSpec, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, MountPropagation, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
};
use serde::Deserialize;
use serde_yaml_ng::Value;

/// Where kubelet mounts a pod's service account credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// kubelet's defaults for a container that is not privileged (procMount Default).
const MASKED_PATHS: [&str; 10] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Every Kubernetes document of a YAML file.
pub fn documents(text: &str) -> Result<Vec<Value>> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(Value::deserialize)
        .collect::<Result<_, _>>()
        .context("parsing YAML")
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

fn keys(value: &Value) -> Vec<String> {
    value
        .as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Fail on a key of `value` outside `known`.
fn only(what: &str, value: &Value, known: &[&str]) -> Result<()> {
    for key in keys(value) {
        if !known.contains(&key.as_str()) {
            bail!("{what}: `{key}` is not translated by the image's test (tests/src/kubelet.rs)");
        }
    }
    Ok(())
}

/// An httpGet probe as kubelet calls it: GET http://host:port/path.
#[derive(Clone, Debug)]
pub struct HttpProbe {
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// One container, ready for CreateContainer.
#[derive(Clone, Debug)]
pub struct Container {
    pub name: String,
    pub config: ContainerConfig,
    pub liveness: Option<HttpProbe>,
    pub readiness: Option<HttpProbe>,
}

/// A pod of the DaemonSet on one node: its sandbox and containers.
pub struct PodOnNode {
    pub sandbox: PodSandboxConfig,
    pub init_containers: Vec<Container>,
    pub containers: Vec<Container>,
    /// terminationGracePeriodSeconds (kubelet's StopContainer timeout).
    pub grace_seconds: u64,
    pub service_account: String,
}

/// What the node gives the pod: its name, its host paths, the credentials.
pub struct NodeView<'a> {
    pub node_name: &'a str,
    /// The node's path for a hostPath volume's `path` (a lab node has its own
    /// directories for some of them).
    pub host_path: &'a dyn Fn(&str) -> Result<PathBuf>,
    /// A directory of the test where kubelet's volumes (ConfigMap, service account)
    /// are written for this pod.
    pub volumes_dir: &'a Path,
    /// The service account token and the cluster's CA certificate (PEM).
    pub token: &'a str,
    pub ca_pem: &'a str,
    /// What kubelet puts into every container's environment for the `kubernetes`
    /// Service (KUBERNETES_SERVICE_HOST, _PORT): its ClusterIP and port.
    pub kubernetes_service: (&'a str, u16),
    /// The image each container runs (the manifest's, or a rolling update's).
    pub image: &'a dyn Fn(&str) -> String,
    /// A distinct uid per pod (a rolling update makes a new pod).
    pub pod_uid: &'a str,
}

/// Translate the DaemonSet in `daemonset_yaml` for one node.
pub fn pod_on_node(
    daemonset_yaml: &str,
    configmap_yaml: &str,
    node: &NodeView,
) -> Result<PodOnNode> {
    let daemonset = documents(daemonset_yaml)?
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("no DaemonSet")?;
    let configmaps: Vec<Value> = documents(configmap_yaml)?
        .into_iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .collect();
    let namespace = daemonset["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    let template = &daemonset["spec"]["template"];
    let spec = &template["spec"];
    only(
        "pod spec",
        spec,
        &[
            "serviceAccountName",
            "hostNetwork",
            // Scheduling and admission, not the node's business:
            "priorityClassName",
            "tolerations",
            // Cluster DNS for a host-network pod: the lab has no DNS server; the
            // agent resolves no name (it reaches the API server by address).
            "dnsPolicy",
            "terminationGracePeriodSeconds",
            "initContainers",
            "containers",
            "volumes",
        ],
    )?;
    let host_network = spec["hostNetwork"].as_bool().unwrap_or(false);
    let name = format!(
        "{}-{}",
        daemonset["metadata"]["name"].as_str().context("name")?,
        node.pod_uid
    );
    let labels: BTreeMap<String, String> = template["metadata"]["labels"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.clone(),
            uid: node.pod_uid.into(),
            namespace: namespace.clone(),
            attempt: 0,
        }),
        hostname: if host_network {
            String::new()
        } else {
            name.clone()
        },
        log_directory: node.volumes_dir.join("logs").display().to_string(),
        labels: labels.clone().into_iter().collect(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: if host_network {
                        NamespaceMode::Node
                    } else {
                        NamespaceMode::Pod
                    } as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    fs::create_dir_all(node.volumes_dir.join("logs"))?;

    // Volumes, as the node sees them.
    let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
    for volume in spec["volumes"].as_sequence().context("volumes")? {
        let volume_name = volume["name"].as_str().context("volume name")?.to_string();
        only(
            &format!("volume {volume_name}"),
            volume,
            &["name", "hostPath", "configMap"],
        )?;
        let path = if let Some(path) = volume["hostPath"]["path"].as_str() {
            let on_node = (node.host_path)(path)?;
            match volume["hostPath"]["type"].as_str().unwrap_or("") {
                "DirectoryOrCreate" => fs::create_dir_all(&on_node)?,
                "Directory" if !on_node.is_dir() => {
                    bail!("hostPath {path} ({}) is not a directory", on_node.display())
                }
                "Directory" | "" => {}
                other => bail!("hostPath type {other} is not translated"),
            }
            on_node
        } else if let Some(configmap) = volume["configMap"]["name"].as_str() {
            let data = &configmaps
                .iter()
                .find(|c| c["metadata"]["name"] == configmap)
                .with_context(|| format!("no ConfigMap {configmap}"))?["data"];
            let dir = node.volumes_dir.join(&volume_name);
            fs::create_dir_all(&dir)?;
            for (key, value) in data.as_mapping().context("data")? {
                fs::write(
                    dir.join(key.as_str().context("key")?),
                    value.as_str().context("value")?,
                )?;
            }
            dir
        } else {
            bail!("volume {volume_name}: neither hostPath nor configMap")
        };
        volumes.insert(volume_name, path);
    }
    // The service account (automountServiceAccountToken defaults to true).
    let service_account = spec["serviceAccountName"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    let credentials = node.volumes_dir.join("serviceaccount");
    fs::create_dir_all(&credentials)?;
    fs::write(credentials.join("token"), node.token)?;
    fs::write(credentials.join("ca.crt"), node.ca_pem)?;
    fs::write(credentials.join("namespace"), &namespace)?;

    let configmap_value = |name: &str, key: &str| -> Result<String> {
        configmaps
            .iter()
            .find(|c| c["metadata"]["name"] == name)
            .and_then(|c| c["data"][key].as_str())
            .map(String::from)
            .with_context(|| format!("no key {key} in ConfigMap {name}"))
    };
    let container = |c: &Value| -> Result<Container> {
        let name = c["name"].as_str().context("container name")?.to_string();
        only(
            &format!("container {name}"),
            c,
            &[
                "name",
                "image",
                "command",
                "args",
                "env",
                "ports",
                "livenessProbe",
                "readinessProbe",
                "resources",
                "securityContext",
                "volumeMounts",
            ],
        )?;
        // kubelet's variables for the `kubernetes` Service first; the container's
        // own env overrides them.
        let mut env: Vec<(String, String)> = vec![
            (
                "KUBERNETES_SERVICE_HOST".into(),
                node.kubernetes_service.0.into(),
            ),
            (
                "KUBERNETES_SERVICE_PORT".into(),
                node.kubernetes_service.1.to_string(),
            ),
        ];
        for var in c["env"].as_sequence().into_iter().flatten() {
            let var_name = var["name"].as_str().context("env name")?.to_string();
            let value = if let Some(value) = var["value"].as_str() {
                value.to_string()
            } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
                node.node_name.to_string()
            } else if let Some(configmap) = var["valueFrom"]["configMapKeyRef"].as_mapping() {
                let get = |k: &str| configmap.get(k).and_then(Value::as_str).unwrap_or("");
                configmap_value(get("name"), get("key"))?
            } else {
                bail!("env {var_name} of {name}: not translated: {var:?}")
            };
            env.retain(|(n, _)| *n != var_name);
            env.push((var_name, value));
        }
        let expand = |arg: &String| {
            env.iter().fold(arg.clone(), |arg, (n, v)| {
                arg.replace(&format!("$({n})"), v)
            })
        };
        let security = &c["securityContext"];
        only(
            &format!("securityContext of {name}"),
            security,
            &["privileged", "runAsUser", "capabilities"],
        )?;
        let privileged = security["privileged"].as_bool().unwrap_or(false);
        let mut mounts = Vec::new();
        for mount in c["volumeMounts"].as_sequence().into_iter().flatten() {
            only(
                &format!("volumeMount of {name}"),
                mount,
                &["name", "mountPath", "readOnly", "mountPropagation"],
            )?;
            let volume = mount["name"].as_str().context("mount name")?;
            let propagation = match mount["mountPropagation"].as_str() {
                None | Some("None") => MountPropagation::PropagationPrivate,
                Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
                Some("Bidirectional") => MountPropagation::PropagationBidirectional,
                Some(other) => bail!("mountPropagation {other}"),
            };
            mounts.push(Mount {
                container_path: mount["mountPath"].as_str().context("mountPath")?.into(),
                host_path: volumes
                    .get(volume)
                    .with_context(|| format!("no volume {volume}"))?
                    .display()
                    .to_string(),
                readonly: mount["readOnly"].as_bool().unwrap_or(false),
                propagation: propagation as i32,
                ..Default::default()
            });
        }
        mounts.push(Mount {
            container_path: SERVICE_ACCOUNT_DIR.into(),
            host_path: credentials.display().to_string(),
            readonly: true,
            ..Default::default()
        });
        let ports: BTreeMap<String, u16> = c["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p["name"].as_str()?.to_string(),
                    p["containerPort"].as_u64()? as u16,
                ))
            })
            .collect();
        let probe = |p: &Value| -> Result<Option<HttpProbe>> {
            if p.is_null() {
                return Ok(None);
            }
            only(
                &format!("probe of {name}"),
                p,
                &["httpGet", "periodSeconds", "failureThreshold"],
            )?;
            let get = &p["httpGet"];
            let port = match &get["port"] {
                Value::Number(n) => n.as_u64().context("port")? as u16,
                Value::String(named) => *ports
                    .get(named)
                    .with_context(|| format!("no port {named}"))?,
                other => bail!("probe port {other:?}"),
            };
            Ok(Some(HttpProbe {
                // kubelet's default host is the pod's IP: the node's, with hostNetwork.
                host: get["host"].as_str().context("probe host")?.into(),
                port,
                path: get["path"].as_str().unwrap_or("/").into(),
            }))
        };
        let memory_limit = match c["resources"]["limits"]["memory"].as_str() {
            Some(mi) => {
                mi.strip_suffix("Mi")
                    .context("memory limit in Mi")?
                    .parse::<i64>()?
                    * 1024
                    * 1024
            }
            None => 0,
        };
        only(
            &format!("resources of {name}"),
            &c["resources"],
            &["requests", "limits"],
        )?;
        only(
            &format!("resource limits of {name}"),
            &c["resources"]["limits"],
            &["memory"],
        )?;
        // kubelet's CPU shares for a request (cgroup cpu.shares: 1024 per CPU, at
        // least 2).
        let cpu_shares = match c["resources"]["requests"]["cpu"].as_str() {
            Some(milli) if milli.ends_with('m') => {
                (milli.trim_end_matches('m').parse::<i64>()? * 1024 / 1000).max(2)
            }
            Some(cpus) => (cpus.parse::<f64>()? * 1024.0) as i64,
            None => 2,
        };
        let image = (node.image)(c["image"].as_str().context("image")?);
        Ok(Container {
            name: name.clone(),
            liveness: probe(&c["livenessProbe"])?,
            readiness: probe(&c["readinessProbe"])?,
            config: ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.clone(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: image.clone(),
                    user_specified_image: image,
                    ..Default::default()
                }),
                command: strings(&c["command"]).iter().map(expand).collect(),
                args: strings(&c["args"]).iter().map(expand).collect(),
                envs: env
                    .iter()
                    .map(|(key, value)| KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                mounts,
                log_path: format!("{name}/0.log"),
                linux: Some(LinuxContainerConfig {
                    resources: Some(LinuxContainerResources {
                        memory_limit_in_bytes: memory_limit,
                        cpu_shares,
                        ..Default::default()
                    }),
                    security_context: Some(LinuxContainerSecurityContext {
                        capabilities: Some(Capability {
                            add_capabilities: strings(&security["capabilities"]["add"]),
                            drop_capabilities: strings(&security["capabilities"]["drop"]),
                            ..Default::default()
                        }),
                        privileged,
                        namespace_options: sandbox
                            .linux
                            .as_ref()
                            .and_then(|l| l.security_context.as_ref())
                            .and_then(|s| s.namespace_options.clone()),
                        run_as_user: security["runAsUser"]
                            .as_i64()
                            .map(|value| Int64Value { value }),
                        masked_paths: if privileged {
                            vec![]
                        } else {
                            MASKED_PATHS.map(String::from).to_vec()
                        },
                        readonly_paths: if privileged {
                            vec![]
                        } else {
                            READONLY_PATHS.map(String::from).to_vec()
                        },
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            },
        })
    };
    Ok(PodOnNode {
        init_containers: spec["initContainers"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(container)
            .collect::<Result<_>>()?,
        containers: spec["containers"]
            .as_sequence()
            .context("containers")?
            .iter()
            .map(container)
            .collect::<Result<_>>()?,
        sandbox,
        grace_seconds: spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30),
        service_account,
    })
}
