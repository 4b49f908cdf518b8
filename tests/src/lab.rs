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
use ferrite_agent::{
    datapath, hostnet,
    maps::NodeMaps,
    model::pod_interface_name,
    plan::MapContents,
    podnet::{self, PodInterface},
};

/// MAC of every host-side veth (Calico's choice): pods need one static neighbour entry.
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

    /// One TCP request from this namespace: connect, send a line, read the answer.
    pub fn tcp_request(&self, to: SocketAddrV4, message: &str) -> Result<String> {
        let mut stream = self.tcp_connect(to)?;
        exchange(&mut stream, message)
    }

    pub fn tcp_connect(&self, to: SocketAddrV4) -> Result<TcpStream> {
        let stream =
            self.run(move || TcpStream::connect_timeout(&to.into(), Duration::from_secs(5)))??;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(stream)
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

/// A cgroup v2 directory of the lab's own: a node's subtree, whose processes (its
/// pods' and its host processes' probes) get the node's socket-level load balancing.
/// Never the machine's root: the agent attaches there. Removed on drop, once the
/// processes in it are gone.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> Result<Self> {
        let path = datapath::default_cgroup_root()?.join(name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A probe still exiting keeps the directory busy for a moment.
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
                for pid in procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The `ferrite-probe` binary: next to the running executable (demo, bench) or one
/// directory up (test binaries live in `deps/`); $FERRITE_PROBE overrides.
pub fn probe_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("FERRITE_PROBE") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    [dir.join("ferrite-probe"), dir.join("../ferrite-probe")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join("ferrite-probe"))
}

/// What one probe request gave (see `ferrite-probe`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ProbeOutcome {
    pub reply: Option<String>,
    /// The peer as the socket reports it (recvfrom, getpeername).
    pub from: Option<String>,
    /// The socket's own address.
    pub local: Option<String>,
    /// `refused`, `timeout`, or the OS error.
    pub error: Option<String>,
    pub micros: u64,
}

impl ProbeOutcome {
    /// The answer, or the error as a failure.
    pub fn answer(&self) -> Result<&str> {
        match (&self.reply, &self.error) {
            (Some(reply), _) => Ok(reply),
            (None, error) => bail!("no answer: {error:?}"),
        }
    }
}

/// A process of a node (a pod's, or the node's own): in the node's cgroup subtree and
/// the given network namespace, as `ferrite-probe` runs it.
#[derive(Clone, Debug)]
pub struct Probe {
    pub cgroup: Option<PathBuf>,
    pub netns: PathBuf,
    /// UDP sockets send from this port (0: any).
    pub udp_port: u16,
}

impl Probe {
    /// The same process, its UDP sockets sending from `port` (a fixed-port client).
    pub fn from_port(mut self, port: u16) -> Self {
        self.udp_port = port;
        self
    }

    fn command(&self) -> Command {
        let mut command = Command::new(probe_bin());
        if let Some(cgroup) = &self.cgroup {
            command.arg("--cgroup").arg(cgroup);
        }
        command.arg("--netns").arg(&self.netns);
        command.arg("--bind").arg(self.udp_port.to_string());
        command
    }

    fn run(&self, args: &[&str]) -> Result<ProbeOutcome> {
        let out = self
            .command()
            .args(args)
            .output()
            .context("running ferrite-probe")?;
        if !out.status.success() {
            bail!(
                "ferrite-probe {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("ferrite-probe output")
    }

    /// Run another client program (wrk, iperf3) where this probe runs; its output.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command()
            .arg("exec")
            .args(args)
            .output()
            .context("running ferrite-probe exec")?;
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One TCP connection, one request line.
    pub fn tcp(&self, to: SocketAddrV4, message: &str) -> Result<ProbeOutcome> {
        self.run(&["tcp", &to.to_string(), message])
    }

    /// One datagram from an unconnected UDP socket (sendto/recvfrom).
    pub fn udp(&self, to: SocketAddrV4, message: &str) -> Result<ProbeOutcome> {
        self.run(&["udp", &to.to_string(), message])
    }

    /// One datagram from a connected UDP socket.
    pub fn udp_connected(&self, to: SocketAddrV4, message: &str) -> Result<ProbeOutcome> {
        self.run(&["udp-connected", &to.to_string(), message])
    }

    /// A TCP connection held open by a probe process, one request per `send`.
    pub fn hold(&self, to: SocketAddrV4) -> Result<HeldConnection> {
        let mut child = self
            .command()
            .args(["hold", &to.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("running ferrite-probe")?;
        let stdout = BufReader::new(child.stdout.take().context("probe stdout")?);
        let mut held = HeldConnection {
            child,
            stdout,
            connected: None,
        };
        held.connected = Some(held.read_outcome()?);
        Ok(held)
    }
}

/// A TCP connection a probe process holds open (killed on drop).
pub struct HeldConnection {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
    /// How the connection opened (`from`: its peer as the socket reports it).
    pub connected: Option<ProbeOutcome>,
}

impl HeldConnection {
    fn read_outcome(&mut self) -> Result<ProbeOutcome> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.is_empty() {
            bail!("ferrite-probe ended");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// One request on the held connection.
    pub fn send(&mut self, message: &str) -> Result<ProbeOutcome> {
        let stdin = self.child.stdin.as_mut().context("probe stdin")?;
        writeln!(stdin, "{message}")?;
        stdin.flush()?;
        self.read_outcome()
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pod: its own netns, eth0 wired to a host-side veth in the node's netns.
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    pub host_interface: String,
    pub netns: Netns,
    /// Its node's cgroup subtree, where its processes run (`None`: not a lab
    /// node's pod, so no socket-level load balancing applies to it).
    pub cgroup: Option<PathBuf>,
}

impl Pod {
    /// A process of this pod, in its node's cgroup subtree (socket-level LB applies).
    pub fn probe(&self) -> Probe {
        Probe {
            cgroup: self.cgroup.clone(),
            netns: self.netns.path(),
            udp_port: 0,
        }
    }

    /// The v1 Pod object the agent reads for this pod.
    pub fn yaml(&self, node: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}}}\nspec: {{nodeName: {node}, containers: [{{name: app, image: none}}]}}\nstatus: {{phase: Running, podIP: {}}}\n",
            self.name, self.namespace, self.ip
        )
    }

    /// Start TCP and UDP servers on `port` that answer `<pod name>|<client IP>|<request>`.
    pub fn serve(&self, port: u16) -> Result<Server> {
        Server::start(
            &self.netns,
            &self.name,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
        )
    }

    /// One TCP request: connect, send a line, read the answer line.
    pub fn tcp_request(&self, to: SocketAddrV4, message: &str) -> Result<String> {
        self.netns.tcp_request(to, message)
    }

    pub fn tcp_connect(&self, to: SocketAddrV4) -> Result<TcpStream> {
        self.netns.tcp_connect(to)
    }

    /// A UDP socket in this pod bound to `address:port`, an address that is not the
    /// pod's own (added to its eth0 first): what a pod spoofing its source sends with.
    pub fn spoofing_socket(&self, address: Ipv4Addr, port: u16) -> Result<UdpSocket> {
        sh(
            "ip",
            &[
                "-n",
                &self.netns.name,
                "addr",
                "add",
                &format!("{address}/32"),
                "dev",
                "eth0",
            ],
        )?;
        Ok(self
            .netns
            .run(move || UdpSocket::bind(SocketAddrV4::new(address, port)))??)
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

/// Which server answered a request (the `<name>` of `<name>|<client IP>|<request>`),
/// checking the payload came back intact.
pub fn answered_by(reply: &str, request: &str) -> Result<String> {
    Ok(parse_answer(reply, request)?.0)
}

/// `(server name, client IP as the server saw it)` of an answer to `request`.
pub fn parse_answer(reply: &str, request: &str) -> Result<(String, String)> {
    let mut parts = reply.splitn(3, '|');
    let (name, peer, echoed) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    anyhow::ensure!(
        echoed == request,
        "payload changed: sent {request:?}, got {reply:?}"
    );
    Ok((name.to_string(), peer.to_string()))
}

/// A TCP connection from `netns` from a fixed address and port (reusable while an
/// earlier connection from it is in TIME_WAIT) to `to`.
pub fn tcp_from_port(netns: &Netns, from: SocketAddrV4, to: SocketAddrV4) -> Result<TcpStream> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = netns.run(move || -> Result<Socket> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&SockAddr::from(from))?;
        socket.connect_timeout(&SockAddr::from(to), Duration::from_secs(3))?;
        Ok(socket)
    })??;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(stream)
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

/// One HTTP/1.1 GET of `path` on an open connection: (status, body).
pub fn http_get(stream: &mut TcpStream, path: &str) -> Result<(u16, String)> {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: ferrite\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("HTTP status")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// TCP + UDP servers in a pod, stopped on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Servers in `netns` on `address` (TCP and UDP) answering each request line with
    /// `<name>|<client IP as seen>|<request>`. A host with several addresses must bind
    /// the one clients use: an unbound UDP socket answers from the route's source.
    pub fn start(netns: &Netns, name: &str, address: SocketAddrV4) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = netns.run(move || TcpListener::bind(address))??;
        // Block in accept (no polling delay per connection), waking up now and then
        // to see the stop flag: Linux applies SO_RCVTIMEO to accept.
        nix::sys::socket::setsockopt(
            &listener,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )?;
        let udp = netns.run(move || UdpSocket::bind(address))??;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut threads = Vec::new();
        let (tcp_name, flag) = (name.to_string(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                // An error is the accept timeout: loop to check the stop flag.
                if let Ok((stream, _)) = listener.accept() {
                    let name = tcp_name.clone();
                    std::thread::spawn(move || serve_connection(stream, &name));
                }
            }
        }));
        let (name, flag) = (name.to_string(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let request = String::from_utf8_lossy(&buf[..n]);
                    let reply = format!("{name}|{}|{request}", from.ip());
                    let _ = udp.send_to(reply.as_bytes(), from);
                }
            }
        }));
        Ok(Self { stop, threads })
    }
}

fn serve_connection(stream: TcpStream, name: &str) {
    // Accepted sockets inherit the listener's accept timeout: connections may idle.
    let _ = stream.set_read_timeout(None);
    let peer = stream
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if writer
            .write_all(format!("{name}|{peer}|{line}\n").as_bytes())
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

    pub fn pid(&self) -> u32 {
        self.child.id()
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
        let namespace = "default".to_string();
        let host_interface = pod_interface_name(&namespace, name);
        let netns = Netns::new(&format!("{}-{name}", self.name))?;
        let interface = PodInterface {
            netns: netns.path(),
            name: "eth0".into(),
            host_name: host_interface.clone(),
            ip,
            mtu: self.pod_mtu,
        };
        self.netns.run(|| podnet::create(&interface))??;
        self.pods.push(Pod {
            name: name.into(),
            namespace,
            ip,
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

    /// GET `path` from the agent's HTTP endpoint (its default port, in the node's
    /// netns): (status, body).
    pub fn agent_http(&self, path: &str) -> Result<(u16, String)> {
        let path = path.to_string();
        self.netns.run(move || -> Result<(u16, String)> {
            let mut stream = TcpStream::connect_timeout(
                &SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9965).into(),
                Duration::from_secs(5),
            )?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            http_get(&mut stream, &path)
        })?
    }

    /// A counter or gauge of the agent's /metrics (`name` as exported, e.g.
    /// `ferrite_syncs_total`), summed over its label sets.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let (_, text) = self.agent_http("/metrics")?;
        let values: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        anyhow::ensure!(!values.is_empty(), "no metric {name}");
        Ok(values.iter().sum())
    }

    /// `ferrite inspect <table>` output for this node.
    pub fn inspect(&self, table: &str) -> Result<String> {
        sh(
            ferrite_bin().to_str().context("path")?,
            &["inspect", "--node", &self.name, table],
        )
    }

    /// `ferrite explain --node <name> ARGS` run in the node's network namespace (as
    /// an operator runs it, with nsenter): its output.
    pub fn explain_text(&self, args: &[&str]) -> Result<String> {
        let netns = format!("--net={}", self.netns.path().display());
        let bin = ferrite_bin();
        let mut all = vec![
            netns.as_str(),
            bin.to_str().context("path")?,
            "explain",
            "--node",
            &self.name,
        ];
        all.extend_from_slice(args);
        sh("nsenter", &all)
    }

    /// `ferrite explain --node <name> ARGS -o json` in the node's netns, parsed.
    pub fn explain(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "json"]);
        let shown = self.explain_text(&all)?;
        serde_json::from_str(&shown).with_context(|| format!("not JSON:\n{shown}"))
    }

    /// `ferrite inspect diff` against this node's config file, run in its network
    /// namespace as an operator runs it, with `extra` arguments (e.g. `-o json`).
    pub fn inspect_diff(&self, extra: &[&str]) -> Result<String> {
        let netns = format!("--net={}", self.netns.path().display());
        let bin = ferrite_bin();
        let config = self.config_path();
        let mut args = vec![
            netns.as_str(),
            bin.to_str().context("path")?,
            "inspect",
            "--node",
            &self.name,
            "diff",
            "--config",
            config.to_str().context("path")?,
        ];
        args.extend_from_slice(extra);
        sh("nsenter", &args)
    }

    /// `ferrite inspect <table> -o json` output for this node, parsed.
    pub fn inspect_json(&self, table: &str) -> Result<serde_json::Value> {
        let shown = sh(
            ferrite_bin().to_str().context("path")?,
            &["inspect", "--node", &self.name, table, "-o", "json"],
        )?;
        serde_json::from_str(&shown).with_context(|| format!("not JSON:\n{shown}"))
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
        let _ = fs::remove_dir_all(hostnet::run_dir(&self.name));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The node network: a bridge in a namespace of its own; nodes, the world and
/// non-Ferrite hosts plug into it with a veth called `ul0`.
pub struct Underlay {
    pub netns: Netns,
    ports: AtomicUsize,
}

pub const UNDERLAY_PREFIX: &str = "198.51.100";
/// A host "outside the cluster", reached through the node's default route.
pub const WORLD_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const WORLD_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The lab's Service CIDR (Kubernetes' default).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

impl Underlay {
    pub fn new() -> Result<Self> {
        Self::named(&unique("ul"))
    }

    pub fn named(name: &str) -> Result<Self> {
        require_root()?;
        let netns = Netns::new(name)?;
        run_ip(&["-n", &netns.name, "link", "add", "br0", "type", "bridge"])?;
        run_ip(&["-n", &netns.name, "link", "set", "br0", "up"])?;
        Ok(Self {
            netns,
            ports: AtomicUsize::new(0),
        })
    }

    /// Plug `netns` in as `ul0` with `address`/24.
    pub fn plug(&self, netns: &Netns, address: Ipv4Addr) -> Result<()> {
        let port = format!("p{}", self.ports.fetch_add(1, Ordering::Relaxed));
        let ul = self.netns.name.as_str();
        run_ip(&[
            "-n",
            ul,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "ul0",
            "netns",
            &netns.name,
        ])?;
        run_ip(&["-n", ul, "link", "set", &port, "master", "br0", "up"])?;
        run_ip(&[
            "-n",
            &netns.name,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "ul0",
        ])?;
        run_ip(&["-n", &netns.name, "link", "set", "ul0", "up"])
    }
}

/// Node `index`'s underlay address and pod CIDR (10.244.<index>.0/24).
pub fn node_ip(index: usize) -> Ipv4Addr {
    format!("{UNDERLAY_PREFIX}.{}", index + 1).parse().unwrap()
}

pub fn pod_ip(node: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node as u8, pod as u8 + 2)
}

/// The v1 Node object of a node.
pub fn node_yaml(name: &str, ip: Ipv4Addr, pod_cidr: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: {pod_cidr}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
    )
}

/// Several Ferrite nodes on one underlay, with a world behind their default route.
/// Fields drop in order: nodes (agents, pods), world, underlay.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub world: Netns,
    pub underlay: Underlay,
}

impl Cluster {
    /// `count` uniquely named nodes with overlay MTUs; agents not started yet.
    pub fn new(count: usize) -> Result<Self> {
        let names: Vec<String> = (0..count).map(|i| unique(&format!("n{i}"))).collect();
        Self::named(&unique("ul"), &unique("world"), &names)
    }

    /// Nodes called `names` (node `i` gets underlay address .i+1 and pod CIDR
    /// 10.244.i.0/24), with the underlay and world namespaces named as given.
    pub fn named(underlay: &str, world: &str, names: &[String]) -> Result<Self> {
        let underlay = Underlay::named(underlay)?;
        let world = Netns::new(world)?;
        underlay.plug(&world, WORLD_GATEWAY)?;
        // A host on a real wire sends complete checksums; a veth would hand the node
        // CHECKSUM_PARTIAL packets, which only exist inside one machine (and which
        // XDP, having no skb, cannot tell apart).
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &world.name,
                "ethtool",
                "-K",
                "ul0",
                "tx",
                "off",
            ],
        )?;
        run_ip(&[
            "-n",
            &world.name,
            "addr",
            "add",
            &format!("{WORLD_IP}/32"),
            "dev",
            "lo",
        ])?;
        let mut nodes = Vec::new();
        for (index, name) in names.iter().enumerate() {
            let mut node = Node::named(name)?;
            let ip = node_ip(index);
            underlay.plug(&node.netns, ip)?;
            let gateway = WORLD_GATEWAY.to_string();
            run_ip(&[
                "-n",
                &node.netns.name,
                "route",
                "add",
                "default",
                "via",
                &gateway,
            ])?;
            node.ip = Some(ip);
            node.pod_mtu = 1500 - ferrite_common::VXLAN_OVERHEAD;
            node.agent_args
                .extend(["--cluster-cidr".into(), CLUSTER_CIDR.into()]);
            nodes.push(node);
        }
        Ok(Self {
            nodes,
            world,
            underlay,
        })
    }

    /// Node objects of every node, and the Pod objects of every pod.
    pub fn nodes_and_pods_yaml(&self) -> String {
        let mut docs = Vec::new();
        for (index, node) in self.nodes.iter().enumerate() {
            let cidr = format!("10.244.{index}.0/24");
            docs.push(node_yaml(&node.name, node.ip.expect("plugged"), &cidr));
            docs.extend(node.pods.iter().map(|p| p.yaml(&node.name)));
        }
        docs.join("---\n")
    }

    /// The same cluster-wide file for every node's agent.
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        self.nodes.iter().try_for_each(|n| n.write_config(yaml))
    }

    pub fn start_agents(&mut self) -> Result<()> {
        self.nodes.iter_mut().try_for_each(Node::start_agent)
    }

    /// Find a pod by name on any node.
    pub fn pod(&self, name: &str) -> &Pod {
        self.nodes
            .iter()
            .flat_map(|n| n.pods.iter())
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }
}

/// Send `bytes` over one TCP connection from `client` to a sink in `server` on `port`.
/// Returns what the sink counted (it also answers the count to the client, which is
/// checked) and how long the transfer took.
pub fn bulk_transfer(
    client: &Pod,
    server: &Pod,
    port: u16,
    bytes: usize,
) -> Result<(usize, Duration)> {
    let listener = server
        .netns
        .run(move || TcpListener::bind(("0.0.0.0", port)))??;
    let sink = std::thread::spawn(move || -> Result<usize> {
        let (mut stream, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            match stream.read(&mut buf)? {
                0 => break,
                n => total += n,
            }
        }
        stream.write_all(total.to_string().as_bytes())?;
        Ok(total)
    });
    let start = Instant::now();
    let mut stream = client.tcp_connect(SocketAddrV4::new(server.ip, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let chunk = vec![0x5au8; 1 << 16];
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        stream.write_all(&chunk[..n])?;
        sent += n;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let elapsed = start.elapsed();
    let received = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink thread panicked"))??;
    if reply != received.to_string() {
        bail!("sink counted {received} bytes but answered {reply:?}");
    }
    Ok((received, elapsed))
}

/// `count` sequential TCP connections from `client` to `to`, each one request line
/// and its answer; returns the elapsed time. Runs on one thread inside the pod.
pub fn connection_loop(client: &Pod, to: SocketAddrV4, count: usize) -> Result<Duration> {
    client.netns.run(move || -> Result<Duration> {
        let start = Instant::now();
        for i in 0..count {
            let mut stream = TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            exchange(&mut stream, &format!("c{i}"))?;
        }
        Ok(start.elapsed())
    })?
}
