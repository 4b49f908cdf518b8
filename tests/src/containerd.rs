//! A private containerd for one lab node, driven through its CRI plugin over gRPC as
//! kubelet drives it: its own root, state and socket under a directory of the test,
//! running in the node's network namespace (so host-network pods are on the node,
//! and the CNI plugins it runs for pod sandboxes wire them to the node) and in a
//! mount namespace of its own whose mounts are shared, as on a systemd host (the
//! machine's own mounts here are private, and CRI refuses `HostToContainer`
//! propagation from a private mount). Its CNI directories are the node's. Dropping it
//! removes every pod sandbox it made, then stops it and its shims.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
    ContainerConfig, ContainerState, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, ListImagesRequest, PodSandboxConfig, PodSandboxStatusRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StatusRequest, StopContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::lab::{sh, wait_until, Netns};

/// The CRI plugin's containerd namespace.
const NAMESPACE: &str = "k8s.io";

/// Whether containerd can run here at all: its binaries, runc and the shim exist.
/// Where they do not, the image's test says so and skips (the only reason it may).
pub fn unavailable() -> Option<String> {
    ["containerd", "ctr", "containerd-shim-runc-v2", "runc"]
        .iter()
        .find(|binary| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {binary}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|binary| {
            format!("{binary} is not installed (`cargo xtask setup` installs containerd and runc)")
        })
}

/// Whether this process may lower an OOM score adjustment (CAP_SYS_RESOURCE). Where
/// root lacks it (some CI sandboxes), containerd is told not to ask for scores below
/// its own (`restrict_oom_score_adj`, as for rootless containerd), else runc fails
/// every sandbox writing -998 to oom_score_adj.
fn has_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// A running containerd of one node.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The cgroup parent of its pods (cgroupfs driver: `/<name>` in every hierarchy).
    cgroup_parent: String,
    child: Child,
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    sandboxes: Vec<String>,
}

impl Containerd {
    /// Start containerd in `netns`, its files under `dir`, the CRI plugin's CNI
    /// directories `cni_bin` and `cni_conf`, pod sandboxes of `sandbox_image`.
    pub fn start(
        netns: &Netns,
        dir: &Path,
        cni_bin: &Path,
        cni_conf: &Path,
        sandbox_image: &str,
    ) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        let cgroup_parent = format!("/{}", netns.name);
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = {restrict_oom}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"#,
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                socket = socket.display(),
                opt = dir.join("opt").display(),
                cni_bin = cni_bin.display(),
                cni_conf = cni_conf.display(),
                restrict_oom = !has_sys_resource(),
            ),
        )?;
        let log = dir.join("containerd.log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.path().display()))
            .args([
                "unshare",
                "--mount",
                "--propagation",
                "unchanged",
                "sh",
                "-c",
            ])
            .arg("mount --make-rshared / && exec containerd --config \"$0\"")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting containerd")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Connected on first use (and again after a failure): the socket appears
        // once containerd has started.
        let path = socket.clone();
        let channel = {
            let _context = runtime.enter();
            Endpoint::try_from("http://[::]")?.connect_with_connector_lazy(tower::service_fn(
                move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                },
            ))
        };
        let containerd = Self {
            dir: dir.to_path_buf(),
            socket: socket.clone(),
            log,
            cgroup_parent,
            child,
            runtime,
            channel,
            sandboxes: Vec::new(),
        };
        wait_until("containerd's socket", Duration::from_secs(30), || {
            socket.exists()
        })
        .map_err(|e| e.context(containerd.log_text()))?;
        // The CRI plugin answers once it has started.
        let start = Instant::now();
        loop {
            match containerd.status() {
                Ok(_) => break,
                Err(e) if start.elapsed() > Duration::from_secs(30) => {
                    bail!(
                        "containerd's CRI does not answer: {e:#}\n{}",
                        containerd.log_text()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        Ok(containerd)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of its log, for a failure's message.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `ctr` on this containerd, in the CRI plugin's namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["--address", self.socket.to_str().unwrap(), "-n", NAMESPACE];
        all.extend(args);
        sh("ctr", &all)
    }

    /// Import an OCI archive whose index names its tags, as `repository:<tag>`.
    pub fn import(&self, archive: &Path, repository: &str) -> Result<()> {
        self.ctr(&[
            "images",
            "import",
            "--base-name",
            repository,
            archive.to_str().context("archive path")?,
        ])
        .map(drop)
    }

    /// The names of the images the CRI plugin sees.
    pub fn images(&self) -> Result<Vec<String>> {
        let mut client = ImageServiceClient::new(self.channel.clone());
        let images = self
            .runtime
            .block_on(client.list_images(ListImagesRequest { filter: None }))?
            .into_inner()
            .images;
        Ok(images.into_iter().flat_map(|i| i.repo_tags).collect())
    }

    fn client(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    /// The runtime's conditions, `(type, status, message)`: RuntimeReady and
    /// NetworkReady (a CNI configuration loaded).
    pub fn status(&self) -> Result<Vec<(String, bool, String)>> {
        let mut client = self.client();
        let status = self
            .runtime
            .block_on(client.status(StatusRequest { verbose: false }))?
            .into_inner()
            .status
            .context("no status")?;
        Ok(status
            .conditions
            .into_iter()
            .map(|c| (c.r#type, c.status, format!("{}: {}", c.reason, c.message)))
            .collect())
    }

    pub fn network_ready(&self) -> bool {
        self.status().is_ok_and(|conditions| {
            conditions
                .iter()
                .any(|(t, ok, _)| t == "NetworkReady" && *ok)
        })
    }

    /// RunPodSandbox (the cgroup parent set to this node's); the sandbox's id.
    pub fn run_pod_sandbox(&mut self, mut config: PodSandboxConfig) -> Result<String> {
        let linux = config.linux.get_or_insert_with(Default::default);
        linux.cgroup_parent = self.cgroup_parent.clone();
        let mut client = self.client();
        let id = self
            .runtime
            .block_on(client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))
            .map_err(|status| {
                anyhow::anyhow!(
                    "RunPodSandbox: {}\ncontainerd's log ends:\n{}",
                    status.message(),
                    self.log_tail()
                )
            })?
            .into_inner()
            .pod_sandbox_id;
        self.sandboxes.push(id.clone());
        Ok(id)
    }

    /// The sandboxes it made that are not removed yet.
    pub fn sandboxes(&self) -> Vec<String> {
        self.sandboxes.clone()
    }

    /// CreateContainer then StartContainer; the container's id.
    pub fn start_container(
        &self,
        sandbox: &str,
        sandbox_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String> {
        let mut sandbox_config = sandbox_config.clone();
        sandbox_config
            .linux
            .get_or_insert_with(Default::default)
            .cgroup_parent = self.cgroup_parent.clone();
        let mut client = self.client();
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self
            .runtime
            .block_on(client.create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.into(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            }))
            .map_err(|status| anyhow::anyhow!("CreateContainer {name}: {}", status.message()))?
            .into_inner()
            .container_id;
        self.runtime
            .block_on(client.start_container(StartContainerRequest {
                container_id: id.clone(),
            }))
            .map_err(|status| anyhow::anyhow!("StartContainer {name}: {}", status.message()))?;
        Ok(id)
    }

    pub fn container_status(&self, id: &str) -> Result<ContainerStatus> {
        let mut client = self.client();
        self.runtime
            .block_on(client.container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }))?
            .into_inner()
            .status
            .context("no container status")
    }

    /// Wait for a container to exit; its exit code.
    pub fn wait_exited(&self, id: &str, timeout: Duration) -> Result<i32> {
        let start = Instant::now();
        loop {
            let status = self.container_status(id)?;
            if status.state == ContainerState::ContainerExited as i32 {
                return Ok(status.exit_code);
            }
            if start.elapsed() > timeout {
                bail!("container {id} still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the container wrote (containerd's CRI log file: `<time> <stream> <tag> <line>`).
    pub fn container_log(&self, id: &str) -> String {
        self.container_status(id)
            .ok()
            .and_then(|status| fs::read_to_string(status.log_path).ok())
            .unwrap_or_default()
    }

    /// StopContainer as kubelet stops one: SIGTERM, SIGKILL after `grace`; its exit
    /// code.
    pub fn stop_container(&self, id: &str, grace: Duration) -> Result<i32> {
        let mut client = self.client();
        self.runtime
            .block_on(client.stop_container(StopContainerRequest {
                container_id: id.into(),
                timeout: grace.as_secs() as i64,
            }))?;
        Ok(self.container_status(id)?.exit_code)
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        let mut client = self.client();
        self.runtime
            .block_on(client.remove_container(RemoveContainerRequest {
                container_id: id.into(),
            }))?;
        Ok(())
    }

    /// StopPodSandbox (its network torn down by the CNI plugins' DEL) and
    /// RemovePodSandbox.
    pub fn remove_pod_sandbox(&mut self, id: &str) -> Result<()> {
        let mut client = self.client();
        self.runtime
            .block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .map_err(|status| anyhow::anyhow!("StopPodSandbox: {}", status.message()))?;
        self.runtime
            .block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .map_err(|status| anyhow::anyhow!("RemovePodSandbox: {}", status.message()))?;
        self.sandboxes.retain(|s| s != id);
        Ok(())
    }

    /// A sandbox's address (from its CNI result) and network namespace.
    pub fn sandbox_network(&self, id: &str) -> Result<(String, PathBuf)> {
        let mut client = self.client();
        let response = self
            .runtime
            .block_on(client.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            }))?
            .into_inner();
        let ip = response
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        let info: serde_json::Value =
            serde_json::from_str(response.info.get("info").context("no verbose info")?)?;
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|namespaces| {
                namespaces
                    .iter()
                    .find(|n| n["type"] == "network")
                    .and_then(|n| n["path"].as_str())
            })
            .context("the sandbox has no network namespace of its own")?;
        Ok((ip, PathBuf::from(netns)))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in self.sandboxes.clone() {
            if let Err(e) = self.remove_pod_sandbox(&id) {
                eprintln!("containerd: removing sandbox {id}: {e:#}");
            }
        }
        // SIGTERM, then SIGKILL; then the shims (they outlive containerd by design),
        // each found by the socket address on its command line.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let address = self.socket.display().to_string();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args
                .first()
                .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"))
                && args
                    .windows(2)
                    .any(|w| w[0] == b"-address" && w[1] == address.as_bytes())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // Its pods' cgroups, in every hierarchy (runc removes each container's, not
        // the parent it was given).
        std::thread::sleep(Duration::from_millis(200));
        let parent = self.cgroup_parent.trim_start_matches('/');
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            // cgroup v2 only: the parent is the node's own subtree.
            remove_cgroup_tree(&root.join(parent), true);
        } else {
            for hierarchy in fs::read_dir(root).into_iter().flatten().flatten() {
                let unified = hierarchy.file_name() == "unified";
                remove_cgroup_tree(&hierarchy.path().join(parent), unified);
            }
        }
        // Its mounts were in its own mount namespace, gone with its last process.
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Remove a cgroup directory's children, then the directory unless `keep_top` (the
/// node's own cgroup v2 subtree, where the pods get the agent's socket-level load
/// balancing, is the lab's to remove).
fn remove_cgroup_tree(dir: &Path, keep_top: bool) {
    for child in fs::read_dir(dir).into_iter().flatten().flatten() {
        if child.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&child.path(), false);
        }
    }
    if !keep_top {
        let _ = fs::remove_dir(dir);
    }
}
