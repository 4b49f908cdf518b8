//! Nodes: a netns with its config file, its agent process and its pin directory.
use std::{
    fs,
    io::Read,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result};
use ferrite_agent::{
    datapath, files, host, host::pods::PodInterface, maps::NodeMaps, model::pod_interface_name,
    plan::MapContents,
};

use super::{require_root, unique, wait_until, Cgroup, Netns, Pod, Probe, SERVICE_CIDR, SETTLE};

/// A running `ferrite agent`, killed on drop.
pub struct Agent {
    child: Child,
    pub log: PathBuf,
}

impl Agent {
    /// SIGKILL, as an OOM kill or a crash would.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A number of its `/proc/<pid>/status` (`VmRSS`, `VmHWM` in KiB; `Threads`).
    pub fn status_number(&self, field: &str) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {field} in the agent's status"))
    }

    /// The descriptors it has open.
    pub fn open_fds(&self) -> Result<usize> {
        Ok(fs::read_dir(format!("/proc/{}/fd", self.pid()))?.count())
    }

    pub fn log_text(&self) -> String {
        let mut text = String::new();
        let _ = fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut text));
        text
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `ferrite` binary ($FERRITE_BIN, set by `cargo xtask`, else target/debug).
pub fn ferrite_bin() -> PathBuf {
    std::env::var_os("FERRITE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ferrite"))
}

/// The eBPF object ($FERRITE_BPF_OBJECT, set by `cargo xtask`, else target/bpf).
pub fn bpf_object() -> PathBuf {
    std::env::var_os("FERRITE_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpf")
                .join(datapath::OBJECT_FILE_NAME)
        })
}

/// Where an agent reads the cluster from.
enum AgentSource<'a> {
    File(&'a Path),
    Kubernetes { kubeconfig: &'a Path },
}

/// A node: a netns holding the host ends of its pods' veths, a config file, an
/// agent, and the pin directory /sys/fs/bpf/ferrite/<name>/.
pub struct Node {
    pub name: String,
    /// MTU of pod interfaces (uplink MTU - 50 with the overlay).
    pub pod_mtu: u32,
    /// Address on the underlay, once plugged in.
    pub ip: Option<Ipv4Addr>,
    /// Extra arguments for `ferrite agent` (e.g. `--datapath-log debug`).
    pub agent_args: Vec<String>,
    /// `--resync-seconds` of its agent (short in tests, so drift repairs show fast).
    pub resync_seconds: u32,
    pub pods: Vec<Pod>,
    pub agent: Option<Agent>,
    pub netns: Netns,
    pub dir: PathBuf,
    /// The node's cgroup subtree: its agent attaches socket-level load balancing
    /// here (`--cgroup-root`), never to the machine's root.
    pub cgroup: Cgroup,
}

impl Node {
    /// A node with a unique name (tests run side by side).
    pub fn new(label: &str) -> Result<Self> {
        Self::named(&unique(label))
    }

    /// A node called `name`; the caller makes sure no other node has that name.
    pub fn named(name: &str) -> Result<Self> {
        require_root()?;
        let name = name.to_string();
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&dir)?;
        let netns = Netns::new(&name)?;
        let cgroup = Cgroup::new(&name)?;
        Ok(Self {
            name,
            pod_mtu: 1500,
            ip: None,
            agent_args: admission_args(),
            resync_seconds: 2,
            pods: Vec::new(),
            agent: None,
            netns,
            dir,
            cgroup,
        })
    }

    /// A process of the node itself (host network), in its cgroup subtree.
    pub fn host_probe(&self) -> Probe {
        Probe {
            cgroup: Some(self.cgroup.path.clone()),
            netns: self.netns.path(),
            udp_port: 0,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("cluster.yaml")
    }

    pub fn pin_dir(&self) -> PathBuf {
        datapath::pin_dir(&self.name)
    }

    /// Create a pod and wire it as the CNI plugin would. Returns its index.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Result<usize> {
        self.add_pod_in("default", name, ip)
    }

    /// [`Node::add_pod`] in the Kubernetes namespace `namespace`.
    pub fn add_pod_in(&mut self, namespace: &str, name: &str, ip: Ipv4Addr) -> Result<usize> {
        self.add_pod_with(namespace, name, ip, None)
    }

    /// A dual-stack pod: an address of each family, wired as the CNI plugin wires one.
    pub fn add_dual_stack_pod(&mut self, name: &str, ip: Ipv4Addr, ip6: Ipv6Addr) -> Result<usize> {
        self.add_pod_with("default", name, ip, Some(ip6))
    }

    fn add_pod_with(
        &mut self,
        namespace: &str,
        name: &str,
        ip: Ipv4Addr,
        ip6: Option<Ipv6Addr>,
    ) -> Result<usize> {
        let namespace = namespace.to_string();
        let host_interface = pod_interface_name(&namespace, name);
        let netns = if namespace == "default" {
            Netns::new(&format!("{}-{name}", self.name))?
        } else {
            Netns::new(&format!("{}-{namespace}-{name}", self.name))?
        };
        let interface = PodInterface {
            netns: netns.path(),
            name: "eth0".into(),
            host_name: host_interface.clone(),
            ip,
            ip6,
            mtu: self.pod_mtu,
        };
        self.netns.run(|| host::pods::create(&interface))??;
        self.pods.push(Pod {
            name: name.into(),
            namespace,
            ip,
            ip6,
            host_interface,
            netns,
            cgroup: Some(self.cgroup.path.clone()),
        });
        Ok(self.pods.len() - 1)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The Pod objects of every pod of this node, as YAML documents.
    pub fn pods_yaml(&self) -> String {
        self.pods
            .iter()
            .map(|p| p.yaml(&self.name))
            .collect::<Vec<_>>()
            .join("---\n")
    }

    /// Write the agent's config atomically (rename), as a ConfigMap update would.
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        let tmp = self.dir.join("cluster.yaml.tmp");
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, self.config_path())?;
        Ok(())
    }

    /// Start `ferrite agent` inside this node's netns on [`Node::config_path`].
    pub fn start_agent(&mut self) -> Result<()> {
        self.start_agent_with(&self.config_path())
    }

    /// Start `ferrite agent` inside this node's netns on `config`.
    pub fn start_agent_with(&mut self, config: &Path) -> Result<()> {
        self.spawn_agent(AgentSource::File(config))
    }

    /// Start `ferrite agent` in Kubernetes mode (no `--config`), on `kubeconfig`.
    pub fn start_agent_kube(&mut self, kubeconfig: &Path) -> Result<()> {
        self.spawn_agent(AgentSource::Kubernetes { kubeconfig })
    }

    fn spawn_agent(&mut self, source: AgentSource) -> Result<()> {
        // One log per start, so a restarted agent does not truncate its predecessor's.
        let starts = fs::read_dir(&self.dir)?.filter_map(Result::ok).count();
        let log = self.dir.join(format!("agent-{starts}.log"));
        let log_file = fs::File::create(&log)?;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.netns.path().display()))
            .arg(ferrite_bin())
            .args(["agent", "--node", &self.name])
            .arg("--resync-seconds")
            .arg(self.resync_seconds.to_string())
            .arg("--cgroup-root")
            .arg(&self.cgroup.path);
        match source {
            AgentSource::File(config) => command.arg("--config").arg(config),
            AgentSource::Kubernetes { kubeconfig } => command.env("KUBECONFIG", kubeconfig),
        };
        let child = command
            .arg("--bpf-object")
            .arg(bpf_object())
            .args(&self.agent_args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting the agent")?;
        self.agent = Some(Agent { child, log });
        Ok(())
    }

    pub fn kill_agent(&mut self) -> Result<()> {
        if let Some(mut agent) = self.agent.take() {
            agent.kill()?;
        }
        Ok(())
    }

    pub fn maps(&self) -> Result<NodeMaps> {
        NodeMaps::open(&self.pin_dir())
    }

    /// Wait until the maps satisfy `check` (the agent applied what we expect).
    pub fn wait_for_maps(
        &self,
        what: &str,
        mut check: impl FnMut(&MapContents) -> bool,
    ) -> Result<()> {
        let result = wait_until(what, SETTLE, || {
            self.maps()
                .and_then(|m| m.contents())
                .map(|c| check(&c))
                .unwrap_or(false)
        });
        if result.is_err() {
            if let Some(agent) = &self.agent {
                eprintln!("agent log:\n{}", agent.log_text());
            }
        }
        result
    }

    /// Wait until the agent has written `services` master entries and `endpoints`.
    pub fn wait_for_sync(&self, services: usize, endpoints: usize) -> Result<()> {
        self.wait_for_maps(
            &format!("{services} services and {endpoints} endpoints in the maps"),
            |c| {
                c.services.keys().filter(|k| k.backend_slot == 0).count() == services
                    && c.endpoints.len() == endpoints
            },
        )
    }
}

/// What the lab's agents accept, as an operator would set it: clusterIPs in the
/// Service CIDR, externalIPs in the documentation range the world's tests use.
fn admission_args() -> Vec<String> {
    [
        "--service-cidr",
        SERVICE_CIDR,
        "--external-ip-cidr",
        "192.0.2.0/24",
    ]
    .map(String::from)
    .to_vec()
}

impl Drop for Node {
    fn drop(&mut self) {
        self.agent = None; // kill first: it must not re-create pins
        self.pods.clear();
        let _ = datapath::uninstall(&self.pin_dir());
        let _ = fs::remove_dir_all(files::run_dir(&self.name));
        let _ = fs::remove_dir_all(&self.dir);
    }
}
