//! A lab of network namespaces: a "node" is a netns with its own agent and pin
//! directory; a "pod" is a netns wired to its node with a veth pair exactly as the
//! CNI plugin does it (eth0 with a /32, default route via 169.254.1.1 with a permanent
//! neighbour entry, no bridge). Nothing here touches the root namespace's network:
//! all traffic stays between namespaces the lab made. Every object removes what it
//! created when dropped, so a failing test leaves nothing behind.
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use ferrite_agent::{datapath, maps::NodeMaps, model::pod_interface_name, plan::MapContents};
use ferrite_common::pod_mac_for;

/// MAC of every host-side veth (Calico's choice): pods need one static neighbour entry.
pub const GATEWAY_MAC: &str = "ee:ee:ee:ee:ee:ee";
pub const GATEWAY_IP: &str = "169.254.1.1";
/// Long enough for any step to settle on a loaded 2-core machine; only a bound on
/// waiting, never a performance assertion.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Fails with a clear message when not root (BPF and netns need it).
pub fn require_root() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("this test needs root (BPF maps/programs and network namespaces): run `cargo xtask test` as root");
    }
    Ok(())
}

/// A name unique to this process and call, short enough for netns and node names.
pub fn unique(label: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "fe{}x{}-{label}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_ip(args: &[&str]) -> Result<()> {
    sh("ip", args).map(drop)
}

/// Poll `check` until it returns true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        run_ip(&["netns", "add", name])?;
        let ns = Self { name: name.into() };
        run_ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Run `f` on a thread that has entered this namespace. Sockets created there
    /// stay in it, wherever they are used afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = fs::File::open(self.path())?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
        })
    }

    /// Like [`Netns::run`] but on a detached thread (for servers).
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
        let file = fs::File::open(self.path())?;
        Ok(std::thread::spawn(move || {
            if nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
                f();
            }
        }))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run_ip(&["netns", "del", &self.name]);
    }
}

/// A pod: its own netns, eth0 wired to a host-side veth in the node's netns.
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    pub host_interface: String,
    pub netns: Netns,
}

impl Pod {
    /// The v1 Pod object the agent reads for this pod.
    pub fn yaml(&self, node: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}}}\nspec: {{nodeName: {node}, containers: [{{name: app, image: none}}]}}\nstatus: {{phase: Running, podIP: {}}}\n",
            self.name, self.namespace, self.ip
        )
    }

    /// Start TCP and UDP servers on `port` that answer `<pod name>|<request>`.
    pub fn serve(&self, port: u16) -> Result<Server> {
        Server::start(self, port)
    }

    /// One TCP request: connect, send a line, read the answer line.
    pub fn tcp_request(&self, to: SocketAddrV4, message: &str) -> Result<String> {
        let mut stream = self.tcp_connect(to)?;
        exchange(&mut stream, message)
    }

    pub fn tcp_connect(&self, to: SocketAddrV4) -> Result<TcpStream> {
        let stream = self
            .netns
            .run(move || TcpStream::connect_timeout(&to.into(), Duration::from_secs(5)))??;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(stream)
    }

    /// One UDP request; returns the answer and the address it came from.
    pub fn udp_request(&self, to: SocketAddrV4, message: &str) -> Result<(String, SocketAddr)> {
        let socket = self.netns.run(|| UdpSocket::bind("0.0.0.0:0"))??;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 2048];
        // UDP may lose a datagram; a few tries keep the test about behaviour, not luck.
        for _ in 0..3 {
            socket.send_to(message.as_bytes(), to)?;
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                return Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
            }
        }
        bail!("no UDP answer from {to}")
    }
}

/// Send a line on an open connection and read the answer line.
pub fn exchange(stream: &mut TcpStream, message: &str) -> Result<String> {
    stream.write_all(format!("{message}\n").as_bytes())?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.is_empty() {
        bail!("connection closed without an answer");
    }
    Ok(line.trim_end().to_string())
}

/// TCP + UDP servers in a pod, stopped on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    fn start(pod: &Pod, port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = pod
            .netns
            .run(move || TcpListener::bind(("0.0.0.0", port)))??;
        listener.set_nonblocking(true)?;
        let udp = pod
            .netns
            .run(move || UdpSocket::bind(("0.0.0.0", port)))??;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut threads = Vec::new();
        let (name, flag) = (pod.name.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let name = name.clone();
                        std::thread::spawn(move || serve_connection(stream, &name));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
        let (name, flag) = (pod.name.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let request = String::from_utf8_lossy(&buf[..n]);
                    let _ = udp.send_to(format!("{name}|{request}").as_bytes(), from);
                }
            }
        }));
        Ok(Self { stop, threads })
    }
}

fn serve_connection(stream: TcpStream, name: &str) {
    let _ = stream.set_nonblocking(false);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if writer
            .write_all(format!("{name}|{line}\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

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

/// A node: a netns holding the host ends of its pods' veths, a config file, an
/// agent, and the pin directory /sys/fs/bpf/ferrite/<name>/.
pub struct Node {
    pub name: String,
    /// Extra arguments for `ferrite agent` (e.g. `--datapath-log debug`).
    pub agent_args: Vec<String>,
    pub pods: Vec<Pod>,
    pub agent: Option<Agent>,
    pub netns: Netns,
    pub dir: PathBuf,
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
        Ok(Self {
            name,
            agent_args: Vec::new(),
            pods: Vec::new(),
            agent: None,
            netns,
            dir,
        })
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("cluster.yaml")
    }

    pub fn pin_dir(&self) -> PathBuf {
        datapath::pin_dir(&self.name)
    }

    /// Create a pod and wire it as the CNI plugin would. Returns its index.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Result<usize> {
        let namespace = "default".to_string();
        let host_interface = pod_interface_name(&namespace, name);
        let netns = Netns::new(&format!("{}-{name}", self.name))?;
        let (node, pod) = (self.name.as_str(), netns.name.as_str());
        let mac = pod_mac_for(ip).map(|b| format!("{b:02x}")).join(":");
        let address = format!("{ip}/32");
        run_ip(&[
            "-n",
            node,
            "link",
            "add",
            &host_interface,
            "address",
            GATEWAY_MAC,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            &mac,
            "netns",
            pod,
        ])?;
        run_ip(&["-n", pod, "addr", "add", &address, "dev", "eth0"])?;
        run_ip(&["-n", pod, "link", "set", "eth0", "up"])?;
        run_ip(&[
            "-n", pod, "route", "add", "default", "via", GATEWAY_IP, "dev", "eth0", "onlink",
        ])?;
        run_ip(&[
            "-n",
            pod,
            "neigh",
            "add",
            GATEWAY_IP,
            "lladdr",
            GATEWAY_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        run_ip(&["-n", node, "link", "set", &host_interface, "up"])?;
        // Pods are IPv4-only: no IPv6 router solicitations into the datapath.
        netns.run(|| {
            fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1")
                .and_then(|_| fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1"))
        })??;
        self.pods.push(Pod {
            name: name.into(),
            namespace,
            ip,
            host_interface,
            netns,
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
        // One log per start, so a restarted agent does not truncate its predecessor's.
        let starts = fs::read_dir(&self.dir)?.filter_map(Result::ok).count();
        let log = self.dir.join(format!("agent-{starts}.log"));
        let log_file = fs::File::create(&log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.path().display()))
            .arg(ferrite_bin())
            .args(["agent", "--node", &self.name, "--resync-seconds", "2"])
            .arg("--config")
            .arg(config)
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

    /// `ferrite inspect <table>` output for this node.
    pub fn inspect(&self, table: &str) -> Result<String> {
        sh(
            ferrite_bin().to_str().context("path")?,
            &["inspect", "--node", &self.name, table],
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.agent = None; // kill first: it must not re-create pins
        self.pods.clear();
        let _ = datapath::uninstall(&self.pin_dir());
        let _ = fs::remove_dir_all(&self.dir);
    }
}
