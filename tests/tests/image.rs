//! The image, run as the DaemonSet runs it: `cargo xtask image`'s OCI image under a
//! private containerd per lab node, driven through containerd's CRI plugin as
//! kubelet drives it, with the pod spec of deploy/daemonset.yaml (and the
//! ConfigMap of deploy/configmap.yaml) translated by tests/src/kubelet.rs. The agent
//! reaches a fake API server over TLS by in-cluster configuration only, with no
//! permission but deploy/rbac.yaml's; pod sandboxes made through the same CRI get
//! their network from the plugin the init container installed and reach a ClusterIP
//! backed by pods on both nodes; a rolling update to a new tag keeps open
//! connections; deleting the DaemonSet's pods leaves the datapath serving until
//! `ferrite uninstall` (from the image) removes it. Needs root.
use std::{
    collections::BTreeSet,
    mem::ManuallyDrop,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use ferrite_tests::{
    cluster::{service_yaml, TCP_TARGET},
    containerd::{self, Containerd},
    fake_apiserver::{cluster_role_rules, Access, ClusterCa, FakeApiServer},
    install_cni::{deploy_dir, is_executable, Scratch},
    kubelet::{self, documents, HttpProbe, NodeView},
    lab::{
        answered_by, http_get, node_ip, require_root, sh, unique, wait_until, Cluster,
        HeldConnection, Netns, Probe, Server, SETTLE,
    },
};
use k8s_cri::v1::{
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata,
};

/// The image's archive: $FERRITE_IMAGE (`cargo xtask test` sets it to the image of
/// its debug build), else where `cargo xtask image` writes the release image.
fn image_archive() -> Result<PathBuf> {
    let path = std::env::var_os("FERRITE_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
                "../target/image/ferrite-{}.oci.tar",
                env!("CARGO_PKG_VERSION")
            ))
        });
    ensure!(
        path.exists(),
        "no image at {}: build it with `cargo xtask image` (`--debug`: what `cargo xtask \
         test` builds and sets $FERRITE_IMAGE to)",
        path.display()
    );
    Ok(path)
}

/// The tag the archive's index names.
fn archive_tag(archive: &Path) -> Result<String> {
    let index: serde_json::Value = serde_json::from_str(&sh(
        "tar",
        &["-xOf", archive.to_str().unwrap(), "index.json"],
    )?)?;
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .map(String::from)
        .context("the archive's index names no tag")
}

/// A copy of the archive's OCI layout under `scratch`, changed by `change` (umoci
/// commands on `<layout>:<tag>`), archived again with only the tag `new_tag`.
fn derived_archive(
    archive: &Path,
    tag: &str,
    new_tag: &str,
    scratch: &Scratch,
    change: impl FnOnce(&str, &str) -> Result<()>,
) -> Result<PathBuf> {
    let layout = scratch.dir(&format!("{new_tag}-layout"))?;
    let layout_str = layout.to_str().context("layout path")?;
    sh("tar", &["-xf", archive.to_str().unwrap(), "-C", layout_str])?;
    let base = format!("{layout_str}:{tag}");
    let image = format!("{layout_str}:{new_tag}");
    change(&base, &image)?;
    sh("umoci", &["rm", "--image", &base])?;
    sh("umoci", &["gc", "--layout", layout_str])?;
    let out = scratch.root.join(format!("{new_tag}.oci.tar"));
    sh(
        "tar",
        &[
            "-cf",
            out.to_str().unwrap(),
            "-C",
            layout_str,
            "oci-layout",
            "index.json",
            "blobs",
        ],
    )?;
    Ok(out)
}

/// The pod sandbox image (kubelet's pause, which cannot be pulled here): the image's
/// own layer (glibc) with `ferrite-pause` as its entrypoint, tagged `pause`.
fn pause_archive(archive: &Path, tag: &str, scratch: &Scratch) -> Result<PathBuf> {
    derived_archive(archive, tag, "pause", scratch, |base, image| {
        sh(
            "umoci",
            &[
                "insert",
                "--image",
                base,
                "--tag",
                "pause",
                env!("CARGO_BIN_EXE_ferrite-pause"),
                "/pause",
            ],
        )?;
        sh(
            "umoci",
            &["config", "--image", image, "--config.entrypoint", "/pause"],
        )
        .map(drop)
    })
}

/// A new release of the image for the rolling update: the same files under another
/// tag, a distinct image (its config differs by a label, so its digest does too).
fn update_archive(archive: &Path, tag: &str, new_tag: &str, scratch: &Scratch) -> Result<PathBuf> {
    derived_archive(archive, tag, new_tag, scratch, |base, _| {
        sh(
            "umoci",
            &[
                "config",
                "--image",
                base,
                "--tag",
                new_tag,
                "--config.label",
                &format!("org.opencontainers.image.version={new_tag}"),
            ],
        )
        .map(drop)
    })
}

const PAUSE_REPOSITORY: &str = "ferrite.test/pause";
/// The rolling update's tag.
const UPDATE_TAG: &str = "0.1.1-test";

/// One HTTP GET as kubelet's httpGet probe makes it, from the node's network.
fn probe(netns: &Netns, probe: &HttpProbe) -> Result<u16> {
    let addr: SocketAddr = format!("{}:{}", probe.host, probe.port).parse()?;
    let mut stream =
        netns.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)))??;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    Ok(http_get(&mut stream, &probe.path)?.0)
}

/// The Ferrite programs attached to a cgroup.
fn socket_programs(path: &Path) -> Result<Vec<String>> {
    let shown = sh("bpftool", &["cgroup", "show", &path.to_string_lossy()])?;
    Ok(shown
        .lines()
        .filter_map(|line| line.split_whitespace().find(|w| w.starts_with("ferrite_")))
        .map(String::from)
        .collect())
}

/// The DaemonSet's pod on a node: its sandbox, its agent container, the probes.
struct DaemonPod {
    sandbox: String,
    agent: String,
    liveness: HttpProbe,
    readiness: HttpProbe,
    grace: Duration,
}

/// What every node of the test has: its containerd and the files of its "host".
struct ImageNode {
    containerd: Containerd,
    cni_bin: PathBuf,
    cni_conf: PathBuf,
    pod: Option<DaemonPod>,
}

struct Manifests {
    daemonset: String,
    configmap: String,
    image: String,
}

/// The node's path for a hostPath volume: the CNI directories are the lab node's
/// own (its containerd's CRI uses them), the host's cgroup hierarchy is the node's
/// cgroup v2 subtree (the agent attaches socket-level load balancing there, never to
/// the machine's root); bpffs and /run/ferrite are the machine's, as for every lab
/// node (pins and run files are per node name), and so is /proc/sys/net, whose
/// files answer for the reader's network namespace (the node's). Any other path fails the test.
fn host_path(node: &ferrite_tests::lab::Node, host_root: &Path, path: &str) -> Result<PathBuf> {
    Ok(match path {
        "/opt/cni/bin" | "/etc/cni/net.d" => host_root.join(path.trim_start_matches('/')),
        "/sys/fs/cgroup" => node.cgroup.path.clone(),
        // Read through the container's network namespace: the node's.
        "/sys/fs/bpf" | "/run/ferrite" | "/proc/sys/net" => PathBuf::from(path),
        other => bail!("hostPath {other}: no lab translation (tests/tests/image.rs)"),
    })
}

/// Run the DaemonSet's pod on `node` with `image` for every container: the init
/// containers to completion (exit 0), then the agent.
fn deploy(
    lab_node: &ferrite_tests::lab::Node,
    node: &mut ImageNode,
    manifests: &Manifests,
    ca: &ClusterCa,
    token: &str,
    image: &str,
) -> Result<()> {
    let uid = unique("pod");
    let volumes_dir = lab_node.dir.join(&uid);
    let host_root = lab_node.dir.join("host");
    let host = |path: &str| host_path(lab_node, &host_root, path);
    let image_of = |_: &str| image.to_string();
    let view = NodeView {
        node_name: &lab_node.name,
        host_path: &host,
        volumes_dir: &volumes_dir,
        token,
        ca_pem: &ca.ca_pem,
        kubernetes_service: ("10.96.0.1", 443),
        image: &image_of,
        pod_uid: &uid,
    };
    let pod = kubelet::pod_on_node(&manifests.daemonset, &manifests.configmap, &view)?;
    let sandbox = node.containerd.run_pod_sandbox(pod.sandbox.clone())?;
    for init in &pod.init_containers {
        let id = node
            .containerd
            .start_container(&sandbox, &pod.sandbox, init.config.clone())?;
        let code = node.containerd.wait_exited(&id, Duration::from_secs(60))?;
        ensure!(
            code == 0,
            "init container {} exited with {code}:\n{}",
            init.name,
            node.containerd.container_log(&id)
        );
        println!(
            "{}: init container {} done:\n{}",
            lab_node.name,
            init.name,
            node.containerd.container_log(&id)
        );
    }
    let [agent] = pod.containers.as_slice() else {
        bail!("one container expected, the agent");
    };
    let id = node
        .containerd
        .start_container(&sandbox, &pod.sandbox, agent.config.clone())?;
    node.pod = Some(DaemonPod {
        sandbox,
        agent: id,
        liveness: agent.liveness.clone().context("liveness probe")?,
        readiness: agent.readiness.clone().context("readiness probe")?,
        grace: Duration::from_secs(pod.grace_seconds),
    });
    Ok(())
}

/// Wait until the agent's readiness probe answers 200 (as kubelet would mark the
/// pod ready), then check liveness too.
fn wait_ready(lab_node: &ferrite_tests::lab::Node, node: &ImageNode) -> Result<()> {
    let pod = node.pod.as_ref().context("no pod")?;
    let ready = wait_until(
        "the agent's readiness probe to answer 200",
        SETTLE * 2,
        || probe(&lab_node.netns, &pod.readiness).is_ok_and(|status| status == 200),
    );
    if let Err(e) = ready {
        bail!(
            "{e}: agent log:\n{}",
            node.containerd.container_log(&pod.agent)
        );
    }
    ensure!(probe(&lab_node.netns, &pod.liveness)? == 200, "liveness");
    Ok(())
}

/// Delete the DaemonSet's pod as kubelet does: StopContainer with the grace period
/// (SIGTERM, SIGKILL after it), then the sandbox. The agent must exit on SIGTERM,
/// with status 0 (SIGKILL at the end of the grace period would be 137).
fn delete_pod(node: &mut ImageNode) -> Result<()> {
    let pod = node.pod.take().context("no pod")?;
    let code = node.containerd.stop_container(&pod.agent, pod.grace)?;
    ensure!(
        code == 0,
        "the agent exited with {code} on SIGTERM:\n{}",
        node.containerd.container_log(&pod.agent)
    );
    node.containerd.remove_container(&pod.agent)?;
    node.containerd.remove_pod_sandbox(&pod.sandbox)?;
    Ok(())
}

/// A sandbox on the pod network, as kubelet asks for one: its address and netns.
fn pod_sandbox(node: &mut ImageNode, name: &str) -> Result<(Ipv4Addr, PathBuf)> {
    let config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: unique(name),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
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
    let id = node.containerd.run_pod_sandbox(config)?;
    let (ip, netns) = node.containerd.sandbox_network(&id)?;
    Ok((
        ip.parse().with_context(|| format!("sandbox IP {ip:?}"))?,
        netns,
    ))
}

/// A netns made by containerd, used by the lab's helpers but never deleted by them.
fn borrowed_netns(path: &Path) -> Result<ManuallyDrop<Netns>> {
    ensure!(
        path.parent() == Some(Path::new("/var/run/netns"))
            || path.parent() == Some(Path::new("/run/netns")),
        "sandbox netns {} is not under /run/netns",
        path.display()
    );
    Ok(ManuallyDrop::new(Netns {
        name: path.file_name().unwrap().to_string_lossy().into(),
    }))
}

fn pod_object(name: &str, node: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec: {{nodeName: {node}, containers: [{{name: app, image: none}}]}}\nstatus: {{phase: Running, podIP: {ip}}}\n"
    )
}

/// The test's view of the manifests: the ConfigMap pointed at the test's API server.
/// What kube-proxy's iptables mode hooks into the nat table, in short.
const KUBE_PROXY_CHAINS: &str = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n-A POSTROUTING -j KUBE-POSTROUTING\n\
-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE\nCOMMIT\n";

/// Whether `node`'s nat table (nf_tables backend) has a `KUBE-` chain.
fn kube_chains(node: &ferrite_tests::lab::Node) -> Result<bool> {
    let saved = node
        .netns
        .run_with_input(&["iptables-nft-save", "-t", "nat"], "")?;
    Ok(saved.contains("KUBE-"))
}

/// The shipped manifests, pointed at the test's API server, with the take-over
/// from kube-proxy turned on as the migration section of docs/operations.md says.
fn manifests(api: SocketAddrV4) -> Result<Manifests> {
    let shipped = std::fs::read_to_string(deploy_dir().join("daemonset.yaml"))?;
    let take_over = "# - --take-over-from-kube-proxy";
    ensure!(
        shipped.contains(take_over),
        "the DaemonSet's take-over line"
    );
    let daemonset = shipped.replace(take_over, "- --take-over-from-kube-proxy");
    let mut configmaps = documents(&std::fs::read_to_string(
        deploy_dir().join("configmap.yaml"),
    )?)?;
    let data = &mut configmaps[0]["data"];
    for (key, value) in [
        ("kubernetes-service-host", api.ip().to_string()),
        ("kubernetes-service-port", api.port().to_string()),
    ] {
        ensure!(!data[key].is_null(), "configmap.yaml has no {key}");
        data[key] = serde_yaml_ng::Value::String(value);
    }
    // The lab's cluster is the ConfigMap's as shipped.
    ensure!(data["cluster-cidr"] == ferrite_tests::lab::CLUSTER_CIDR);
    ensure!(data["service-cidr"] == ferrite_tests::lab::SERVICE_CIDR);
    let configmap = configmaps
        .iter()
        .map(serde_yaml_ng::to_string)
        .collect::<Result<Vec<_>, _>>()?
        .join("---\n");
    let ds = documents(&daemonset)?;
    let image = ds[0]["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .context("image")?
        .to_string();
    Ok(Manifests {
        daemonset,
        configmap,
        image,
    })
}

/// The rules the DaemonSet's service account has: the ClusterRole rbac.yaml binds
/// to it.
fn service_account_rules(daemonset: &str) -> Result<Vec<ferrite_tests::fake_apiserver::Rule>> {
    let ds = documents(daemonset)?;
    let account = ds[0]["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .context("serviceAccountName")?;
    let namespace = ds[0]["metadata"]["namespace"]
        .as_str()
        .context("namespace")?;
    let rbac = std::fs::read_to_string(deploy_dir().join("rbac.yaml"))?;
    let binding = documents(&rbac)?
        .into_iter()
        .find(|d| {
            d["kind"] == "ClusterRoleBinding"
                && d["subjects"].as_sequence().is_some_and(|s| {
                    s.iter().any(|s| {
                        s["kind"] == "ServiceAccount"
                            && s["name"] == account
                            && s["namespace"] == namespace
                    })
                })
        })
        .context("no ClusterRoleBinding for the service account")?;
    cluster_role_rules(
        &rbac,
        binding["roleRef"]["name"].as_str().context("roleRef")?,
    )
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it_on_two_nodes_through_updates_and_removal() -> Result<()>
{
    require_root()?;
    if let Some(reason) = containerd::unavailable() {
        println!("SKIPPED: the image's test needs containerd here: {reason}");
        return Ok(());
    }
    let archive = image_archive()?;
    let scratch = Scratch::new("image")?;
    let cluster = Cluster::new(2)?;
    let api_addr = SocketAddrV4::new(node_ip(0), 6443);
    let manifests = manifests(api_addr)?;
    let (repository, tag) = manifests.image.rsplit_once(':').context("image tag")?;
    ensure!(
        archive_tag(&archive)? == tag,
        "the DaemonSet runs {}, the archive holds another tag",
        manifests.image
    );
    let pause = pause_archive(&archive, tag, &scratch)?;
    let update = update_archive(&archive, tag, UPDATE_TAG, &scratch)?;

    // The API server: TLS with the test's CA, the service account's token, RBAC.
    let ca = ClusterCa::new(node_ip(0).into())?;
    let token = format!("{:032x}", fastrand::u128(..));
    let access = Access {
        token: token.clone(),
        rules: service_account_rules(&manifests.daemonset)?,
    };
    let api = FakeApiServer::start_in_cluster(
        &cluster.nodes[0].netns,
        api_addr.into(),
        ca.server.clone(),
        access,
    )?;
    api.apply_yaml(&cluster.nodes_and_pods_yaml())?;
    // The server refuses what the role does not grant, and strangers.
    let from_node = |token: Option<&str>, path: &str| {
        let path = path.to_string();
        let token = token.map(String::from);
        cluster.nodes[1]
            .netns
            .run(|| ca.get(api_addr.into(), token.as_deref(), &path))?
    };
    assert_eq!(from_node(Some(&token), "/api/v1/secrets")?, 403);
    assert_eq!(from_node(None, "/api/v1/services")?, 401);
    assert_eq!(from_node(Some(&token), "/api/v1/services")?, 200);
    let expected_refusals = api.refusals().len();

    // A containerd per node, the image and the sandbox image in it.
    let mut nodes = Vec::new();
    for lab_node in &cluster.nodes {
        let host_root = lab_node.dir.join("host");
        let (cni_bin, cni_conf) = (
            host_root.join("opt/cni/bin"),
            host_root.join("etc/cni/net.d"),
        );
        let containerd = Containerd::start(
            &lab_node.netns,
            &lab_node.dir.join("containerd"),
            &cni_bin,
            &cni_conf,
            &format!("{PAUSE_REPOSITORY}:pause"),
        )?;
        let start = Instant::now();
        containerd.import(&archive, repository)?;
        containerd.import(&pause, PAUSE_REPOSITORY)?;
        println!(
            "{}: images imported in {:?}: {:?}",
            lab_node.name,
            start.elapsed(),
            containerd.images()?
        );
        ensure!(
            !containerd.network_ready(),
            "no CNI configuration yet, so no pod network"
        );
        nodes.push(ImageNode {
            containerd,
            cni_bin,
            cni_conf,
            pod: None,
        });
    }

    // Node 0 was a kube-proxy node (iptables mode, nf_tables backend): the agent,
    // told to take over as the migration section says, removes its chains.
    cluster.nodes[0]
        .netns
        .run_with_input(&["iptables-nft-restore", "--noflush"], KUBE_PROXY_CHAINS)?;
    ensure!(
        kube_chains(&cluster.nodes[0])?,
        "kube-proxy's chains loaded"
    );

    // The DaemonSet's pod on each node: install-cni, then the agent.
    for (lab_node, node) in cluster.nodes.iter().zip(&mut nodes) {
        deploy(lab_node, node, &manifests, &ca, &token, &manifests.image)?;
    }
    for (lab_node, node) in cluster.nodes.iter().zip(&nodes) {
        for plugin in ["ferrite-cni", "loopback"] {
            ensure!(
                is_executable(&node.cni_bin.join(plugin)),
                "{plugin} not installed in {}",
                node.cni_bin.display()
            );
        }
        let conflist: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            node.cni_conf.join("10-ferrite.conflist"),
        )?)?;
        assert_eq!(conflist["plugins"][0]["node"], lab_node.name.as_str());
        wait_until("containerd's NetworkReady", SETTLE, || {
            node.containerd.network_ready()
        })?;
        wait_ready(lab_node, node)?;
        // Socket-level load balancing on the host's cgroup hierarchy as the pod
        // mounts it (read-only at /host/sys/fs/cgroup): the node's subtree here.
        let mut attached = socket_programs(&lab_node.cgroup.path)?;
        attached.sort();
        let mut expected: Vec<&str> = ferrite_common::program_names::SOCKET_LB
            .iter()
            .map(|(name, _)| *name)
            .collect();
        expected.sort();
        assert_eq!(attached, expected);
    }
    wait_until("kube-proxy's chains gone from node 0", SETTLE, || {
        kube_chains(&cluster.nodes[0]).is_ok_and(|left| !left)
    })?;
    let machine_root = ferrite_agent::datapath::default_cgroup_root()?;
    assert_eq!(socket_programs(&machine_root)?, Vec::<String>::new());
    // The agents listed and watched everything through in-cluster configuration,
    // and asked for nothing the ClusterRole does not grant.
    assert_eq!(api.refusals()[expected_refusals..], []);
    let kinds: BTreeSet<String> = api.requests().into_iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        [
            "EndpointSlice",
            "Namespace",
            "NetworkPolicy",
            "Node",
            "Pod",
            "Service"
        ]
        .map(String::from)
        .into()
    );

    // Pods through containerd's CRI: backends on both nodes, a client on node 0.
    let mut servers: Vec<Server> = Vec::new();
    let mut backends = Vec::new();
    let mut pod_objects = Vec::new();
    for (index, node) in nodes.iter_mut().enumerate() {
        let name = format!("web-{index}");
        let (ip, netns) = pod_sandbox(node, &name)?;
        let netns = borrowed_netns(&netns)?;
        servers.push(Server::start(
            &netns,
            &name,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, TCP_TARGET),
        )?);
        pod_objects.push(pod_object(&name, &cluster.nodes[index].name, ip));
        backends.push(ip);
    }
    let (client_ip, client_netns) = pod_sandbox(&mut nodes[0], "client")?;
    pod_objects.push(pod_object("client", &cluster.nodes[0].name, client_ip));
    // The client's process in the node's cgroup subtree, as the pod's would be
    // (socket-level load balancing), and one outside it in the same sandbox, whose
    // flows take the per-packet path (NAT and conntrack in the pinned maps).
    let client = Probe {
        cgroup: Some(cluster.nodes[0].cgroup.path.clone()),
        netns: client_netns.clone(),
        udp_port: 0,
    };
    let per_packet_client = Probe {
        cgroup: None,
        netns: client_netns,
        udp_port: 0,
    };
    api.apply_yaml(&pod_objects.join("---\n"))?;
    let vip = Ipv4Addr::new(10, 96, 0, 80);
    let frontend = SocketAddrV4::new(vip, 80);
    api.apply_yaml(&service_yaml("web", vip, &backends))?;
    let mut seen = BTreeSet::new();
    wait_until(
        "the ClusterIP answered by the pods of both nodes",
        SETTLE,
        || {
            let request = format!("hello {}", seen.len());
            if let Ok(outcome) = client.tcp(frontend, &request) {
                if let Some(server) = outcome.reply.and_then(|r| answered_by(&r, &request).ok()) {
                    seen.insert(server);
                }
            }
            seen.len() == 2
        },
    )?;

    // Open connections, then a rolling update: a new tag, node by node, each pod
    // deleted (SIGTERM) and its successor started, install-cni first.
    let mut held: Vec<(HeldConnection, String)> = Vec::new();
    for i in 0..8 {
        let holder = if i % 2 == 0 {
            &client
        } else {
            &per_packet_client
        };
        let mut connection = holder.hold(frontend)?;
        let request = format!("held {i}");
        let server = answered_by(connection.send(&request)?.answer()?, &request)?;
        held.push((connection, server));
    }
    let check_held = |held: &mut Vec<(HeldConnection, String)>, when: &str| -> Result<()> {
        for (i, (connection, server)) in held.iter_mut().enumerate() {
            let request = format!("{when} {i}");
            let answer = connection.send(&request)?;
            ensure!(
                answered_by(answer.answer()?, &request)? == *server,
                "held connection {i} changed backend {when}"
            );
        }
        Ok(())
    };
    let updated = format!("{repository}:{UPDATE_TAG}");
    for node in &nodes {
        node.containerd.import(&update, repository)?;
    }
    for (lab_node, node) in cluster.nodes.iter().zip(&mut nodes) {
        delete_pod(node)?;
        check_held(&mut held, "while an agent is gone")?;
        deploy(lab_node, node, &manifests, &ca, &token, &updated)?;
        wait_ready(lab_node, node)?;
        let pod = node.pod.as_ref().context("no pod")?;
        let status = node.containerd.container_status(&pod.agent)?;
        assert_eq!(status.image.map(|i| i.image).unwrap_or_default(), updated);
        check_held(&mut held, "after the update")?;
    }
    // The updated agents serve what changes after them: a new Service.
    let vip2 = Ipv4Addr::new(10, 96, 0, 81);
    let frontend2 = SocketAddrV4::new(vip2, 80);
    api.apply_yaml(&service_yaml("web2", vip2, &backends))?;
    wait_until(
        "the Service made after the update to answer",
        SETTLE,
        || {
            client
                .tcp(frontend2, "new")
                .is_ok_and(|outcome| outcome.reply.is_some())
        },
    )?;
    assert_eq!(api.refusals()[expected_refusals..], []);

    // The DaemonSet deleted: its pods go, the datapath stays and serves.
    for node in &mut nodes {
        delete_pod(node)?;
    }
    check_held(&mut held, "with the DaemonSet gone")?;
    for i in 0..4 {
        for prober in [&client, &per_packet_client] {
            let request = format!("no agent {i}");
            answered_by(prober.tcp(frontend, &request)?.answer()?, &request)?;
        }
    }
    drop(held);
    drop(servers);
    // The pods go (their CNI DEL), then `ferrite uninstall` from the image removes
    // the datapath, run as the agent's container is (host network, its mounts and
    // capabilities).
    for node in &mut nodes {
        for sandbox in node.containerd.sandboxes() {
            node.containerd.remove_pod_sandbox(&sandbox)?;
        }
    }
    for (lab_node, node) in cluster.nodes.iter().zip(&mut nodes) {
        let host_root = lab_node.dir.join("host");
        let host = |path: &str| host_path(lab_node, &host_root, path);
        let image_of = |_: &str| updated.clone();
        let uid = unique("uninstall");
        let volumes_dir = lab_node.dir.join(&uid);
        let view = NodeView {
            node_name: &lab_node.name,
            host_path: &host,
            volumes_dir: &volumes_dir,
            token: &token,
            ca_pem: &ca.ca_pem,
            kubernetes_service: ("10.96.0.1", 443),
            image: &image_of,
            pod_uid: &uid,
        };
        let pod = kubelet::pod_on_node(&manifests.daemonset, &manifests.configmap, &view)?;
        let mut config = pod.containers[0].config.clone();
        config.command = vec!["ferrite".into(), "uninstall".into()];
        config.args = vec!["--node".into(), lab_node.name.clone()];
        if let Some(metadata) = config.metadata.as_mut() {
            metadata.name = "uninstall".into();
        }
        let sandbox = node.containerd.run_pod_sandbox(pod.sandbox.clone())?;
        let id = node
            .containerd
            .start_container(&sandbox, &pod.sandbox, config)?;
        let code = node.containerd.wait_exited(&id, Duration::from_secs(60))?;
        ensure!(
            code == 0,
            "ferrite uninstall exited with {code}:\n{}",
            node.containerd.container_log(&id)
        );
        node.containerd.remove_pod_sandbox(&sandbox)?;
        ensure!(!lab_node.pin_dir().exists(), "pins left after uninstall");
        ensure!(
            sh(
                "ip",
                &["-n", &lab_node.netns.name, "link", "show", "ferrite_vxlan"]
            )
            .is_err(),
            "the VXLAN device is left after uninstall"
        );
        let tables = sh(
            "ip",
            &[
                "netns",
                "exec",
                &lab_node.netns.name,
                "nft",
                "list",
                "tables",
            ],
        )?;
        ensure!(!tables.contains("ferrite"), "nftables: {tables}");
    }
    drop(nodes);
    drop(api);
    drop(cluster);
    drop(scratch);
    Ok(())
}
