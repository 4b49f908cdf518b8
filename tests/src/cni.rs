//! A small container runtime for the CNI tests: it runs plugins the way containerd
//! does through libcni (CNI_* environment, the network configuration on stdin, in the
//! node's network namespace) and executes a conflist in order with `prevResult`
//! (DEL in reverse), injecting `runtimeConfig` for declared capabilities.
use std::{
    io::Write,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use ferrite_agent::model::pod_interface_name;
use serde_json::{json, Value};

use crate::lab::{ferrite_bin, unique, wait_until, Cluster, Netns, Node, Pod};

/// Where Debian's containernetworking-plugins are.
pub const SYSTEM_PLUGIN_DIR: &str = "/usr/lib/cni";

/// What a plugin run returned: its exit status, parsed stdout (Null when empty) and
/// stderr (what a runtime logs).
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub output: Value,
    pub stderr: String,
}

impl Outcome {
    /// The error code of a failed run.
    pub fn code(&self) -> Option<u64> {
        (!self.success)
            .then(|| self.output["code"].as_u64())
            .flatten()
    }
}

/// A pod sandbox as the runtime sees it: container id, netns, interface name, and
/// the pod (its address is known after ADD).
pub struct Sandbox {
    pub container_id: String,
    pub ifname: String,
    pub pod: Pod,
    /// The last ADD result (the runtime caches it for CHECK and DEL).
    pub result: Option<Value>,
}

impl Sandbox {
    /// A new sandbox (and netns) for pod `default/<name>`.
    pub fn new(name: &str) -> Result<Self> {
        let netns = Netns::new(&unique(&format!("sb-{name}")))?;
        Ok(Self {
            container_id: unique(&format!("ctr-{name}")),
            ifname: "eth0".into(),
            pod: Pod {
                name: name.into(),
                namespace: "default".into(),
                ip: Ipv4Addr::UNSPECIFIED,
                ip6: None,
                host_interface: pod_interface_name("default", name),
                netns,
                cgroup: None,
            },
            result: None,
        })
    }

    pub fn netns_path(&self) -> PathBuf {
        self.pod.netns.path()
    }
}

pub struct Runtime {
    node_netns: PathBuf,
    pub conflist: Value,
    /// The PATH plugins run with (a kubelet's runtime passes its own).
    pub path: String,
    /// The ferrite-cni binary to run (the build's by default).
    pub ferrite_cni: PathBuf,
    /// The working directory plugins run in (the test's own when unset).
    pub cwd: Option<PathBuf>,
    /// An address-space limit for plugin runs (bytes, `prlimit --as`): a plugin
    /// whose memory would grow past it fails instead of taking the machine's.
    pub address_space: Option<u64>,
}

/// What a plugin run reads on stdin.
pub enum Stdin<'a> {
    Bytes(&'a [u8]),
    /// A file opened for reading (`/dev/zero`: an endless stream).
    File(std::fs::File),
}

/// The PATH a runtime on a Debian node gives its plugins.
pub const DEFAULT_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// The conflist of a node: Ferrite alone, IPAM state in the node's test directory.
pub fn ferrite_conflist(node: &Node) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "ferrite",
        "plugins": [{
            "type": "ferrite-cni",
            "node": node.name,
            "mtu": node.pod_mtu,
            "dataDir": node.dir.join("ipam"),
        }],
    })
}

/// A tool (nsenter, prlimit) from the test's own PATH: the plugins' PATH may not
/// hold it (and a command's PATH is where Rust looks for its program).
fn tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("no {name} on PATH"))
}

impl Runtime {
    pub fn new(node: &Node, conflist: Value) -> Self {
        Self {
            node_netns: node.netns.path(),
            conflist,
            path: DEFAULT_PATH.into(),
            ferrite_cni: ferrite_bin().with_file_name("ferrite-cni"),
            cwd: None,
            address_space: None,
        }
    }

    fn plugin_binary(&self, plugin_type: &str) -> PathBuf {
        match plugin_type {
            "ferrite-cni" => self.ferrite_cni.clone(),
            other => PathBuf::from(SYSTEM_PLUGIN_DIR).join(other),
        }
    }

    /// Run one plugin binary with `env` (CNI_COMMAND etc.) and `stdin`.
    pub fn exec(&self, plugin_type: &str, env: &[(&str, String)], stdin: &[u8]) -> Result<Outcome> {
        self.exec_from(plugin_type, env, Stdin::Bytes(stdin))
    }

    /// Run one plugin binary with `env`, reading `stdin`.
    pub fn exec_from(
        &self,
        plugin_type: &str,
        env: &[(&str, String)],
        stdin: Stdin,
    ) -> Result<Outcome> {
        let binary = self.plugin_binary(plugin_type);
        let cni_path = format!(
            "{}:{SYSTEM_PLUGIN_DIR}",
            ferrite_bin().parent().context("bin dir")?.display()
        );
        let mut command = match self.address_space {
            Some(limit) => {
                let mut prlimit = Command::new(tool("prlimit")?);
                prlimit
                    .arg(format!("--as={limit}"))
                    .arg("--")
                    .arg(tool("nsenter")?);
                prlimit
            }
            None => Command::new(tool("nsenter")?),
        };
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        let input = match &stdin {
            Stdin::Bytes(_) => Stdio::piped(),
            Stdin::File(file) => Stdio::from(file.try_clone()?),
        };
        let mut child = command
            .arg(format!("--net={}", self.node_netns.display()))
            .arg(&binary)
            .env_clear()
            .env("PATH", &self.path)
            .env("CNI_PATH", cni_path)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(input)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", binary.display()))?;
        if let Stdin::Bytes(bytes) = stdin {
            // A plugin may fail before reading its input: like Go's exec (libcni),
            // the runtime does not count the closed pipe as an error of its own.
            match child.stdin.take().context("stdin")?.write_all(bytes) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other?,
            }
        }
        let out = child.wait_with_output()?;
        let output = if out.stdout.iter().all(u8::is_ascii_whitespace) {
            if !out.status.success() {
                bail!(
                    "{plugin_type} failed ({}) without a JSON error: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Value::Null
        } else {
            serde_json::from_slice(&out.stdout).with_context(|| {
                format!(
                    "{plugin_type} printed no JSON: {} / {}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            })?
        };
        Ok(Outcome {
            success: out.status.success(),
            output,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// The CNI_* variables of `command` for `sandbox`, as a kubelet's runtime sets them.
    pub fn env(command: &str, sandbox: &Sandbox) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", sandbox.container_id.clone()),
            ("CNI_NETNS", sandbox.netns_path().display().to_string()),
            ("CNI_IFNAME", sandbox.ifname.clone()),
            (
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                    sandbox.pod.namespace, sandbox.pod.name, sandbox.container_id
                ),
            ),
        ]
    }

    /// The configuration plugin `index` of the conflist receives (libcni's rules).
    pub fn plugin_config(&self, index: usize, prev: Option<&Value>, runtime: &Value) -> Value {
        let mut config = self.conflist["plugins"][index].clone();
        config["name"] = self.conflist["name"].clone();
        config["cniVersion"] = self.conflist["cniVersion"].clone();
        if let Some(prev) = prev {
            config["prevResult"] = prev.clone();
        }
        if let Some(capabilities) = config["capabilities"].as_object().cloned() {
            let mut injected = serde_json::Map::new();
            for (name, enabled) in capabilities {
                if enabled == true && !runtime[&name].is_null() {
                    injected.insert(name.clone(), runtime[&name].clone());
                }
            }
            if !injected.is_empty() {
                config["runtimeConfig"] = Value::Object(injected);
            }
        }
        config
    }

    fn plugins(&self) -> Vec<String> {
        self.conflist["plugins"]
            .as_array()
            .map(|plugins| {
                plugins
                    .iter()
                    .map(|p| p["type"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Run ADD through the chain; the pod gets the address of the final result.
    pub fn add_with(&self, sandbox: &mut Sandbox, runtime: &Value) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for (index, plugin) in self.plugins().iter().enumerate() {
            let config = self.plugin_config(index, prev.as_ref(), runtime);
            let outcome = self.exec(
                plugin,
                &Self::env("ADD", sandbox),
                config.to_string().as_bytes(),
            )?;
            if !outcome.success {
                bail!("{plugin} ADD failed: {}", outcome.output);
            }
            prev = Some(outcome.output);
        }
        let result = prev.context("empty conflist")?;
        let address = result["ips"][0]["address"].as_str().context("no address")?;
        sandbox.pod.ip = address.split('/').next().unwrap_or_default().parse()?;
        sandbox.result = Some(result.clone());
        Ok(result)
    }

    pub fn add(&self, sandbox: &mut Sandbox) -> Result<Value> {
        self.add_with(sandbox, &Value::Null)
    }

    /// ADD every sandbox at once, one thread each (as a runtime starting pods does).
    pub fn add_parallel(&self, sandboxes: &mut [Sandbox]) -> Result<()> {
        std::thread::scope(|scope| {
            let adds: Vec<_> = sandboxes
                .iter_mut()
                .map(|sandbox| scope.spawn(move || self.add(sandbox).map(drop)))
                .collect();
            adds.into_iter()
                .try_for_each(|add| add.join().expect("ADD thread panicked"))
        })
    }

    /// CHECK through the chain with the cached result.
    pub fn check_with(&self, sandbox: &Sandbox, runtime: &Value) -> Result<Outcome> {
        for (index, plugin) in self.plugins().iter().enumerate() {
            let config = self.plugin_config(index, sandbox.result.as_ref(), runtime);
            let outcome = self.exec(
                plugin,
                &Self::env("CHECK", sandbox),
                config.to_string().as_bytes(),
            )?;
            if !outcome.success {
                return Ok(outcome);
            }
        }
        Ok(Outcome {
            success: true,
            output: Value::Null,
            stderr: String::new(),
        })
    }

    pub fn check(&self, sandbox: &Sandbox) -> Result<Outcome> {
        self.check_with(sandbox, &Value::Null)
    }

    /// DEL through the chain in reverse; fails if any plugin fails.
    pub fn del_with(&self, sandbox: &Sandbox, runtime: &Value) -> Result<()> {
        for (index, plugin) in self.plugins().iter().enumerate().rev() {
            let config = self.plugin_config(index, sandbox.result.as_ref(), runtime);
            let outcome = self.exec(
                plugin,
                &Self::env("DEL", sandbox),
                config.to_string().as_bytes(),
            )?;
            if !outcome.success {
                bail!("{plugin} DEL failed: {}", outcome.output);
            }
        }
        Ok(())
    }

    pub fn del(&self, sandbox: &Sandbox) -> Result<()> {
        self.del_with(sandbox, &Value::Null)
    }

    /// GC (spec 1.1.0) of Ferrite with the attachments the runtime still knows.
    pub fn gc(&self, valid: &[&Sandbox]) -> Result<Outcome> {
        let mut config = self.plugin_config(0, None, &Value::Null);
        config["cniVersion"] = json!("1.1.0");
        config["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|s| json!({"containerID": s.container_id, "ifname": s.ifname}))
            .collect();
        self.exec(
            "ferrite-cni",
            &[("CNI_COMMAND", "GC".into())],
            config.to_string().as_bytes(),
        )
    }
}

/// A one-node cluster (underlay, world) with the agent synced and the node's pod
/// CIDR (10.244.0.0/24, from its Node object) published for the plugin.
pub fn one_node_cluster() -> Result<Cluster> {
    let mut cluster = Cluster::new(1)?;
    cluster.write_config(&cluster.nodes_and_pods_yaml())?;
    cluster.start_agents()?;
    let node = &cluster.nodes[0];
    wait_until(
        "the pod CIDR is published",
        std::time::Duration::from_secs(15),
        || ferrite_agent::files::pod_cidr_file(&node.name).exists(),
    )?;
    Ok(cluster)
}
