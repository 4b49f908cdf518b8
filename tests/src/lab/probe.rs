//! Processes of a node or pod run as `ferrite-probe`: requests, held connections.
use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context, Result};

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
    pub fn tcp(&self, to: impl Into<SocketAddr>, message: &str) -> Result<ProbeOutcome> {
        self.run(&["tcp", &to.into().to_string(), message])
    }

    /// One datagram from an unconnected UDP socket (sendto/recvfrom).
    pub fn udp(&self, to: impl Into<SocketAddr>, message: &str) -> Result<ProbeOutcome> {
        self.run(&["udp", &to.into().to_string(), message])
    }

    /// One datagram from a connected UDP socket.
    pub fn udp_connected(&self, to: impl Into<SocketAddr>, message: &str) -> Result<ProbeOutcome> {
        self.run(&["udp-connected", &to.into().to_string(), message])
    }

    /// One-byte round trips to `to` over `protocol` (`tcp`: one connection, `udp`:
    /// one unconnected socket) for `seconds`, every one timed.
    pub fn ping_pong(
        &self,
        to: impl Into<SocketAddr>,
        protocol: &str,
        seconds: f64,
    ) -> Result<PingPong> {
        let to = to.into();
        let out = self
            .command()
            .args(["ping-pong", &to.to_string(), protocol, &seconds.to_string()])
            .output()
            .context("running ferrite-probe")?;
        if !out.status.success() {
            bail!(
                "ferrite-probe ping-pong {to} {protocol} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("ferrite-probe ping-pong output")
    }

    /// A TCP connection held open by a probe process, one request per `send`.
    pub fn hold(&self, to: impl Into<SocketAddr>) -> Result<HeldConnection> {
        let mut child = self
            .command()
            .args(["hold", &to.into().to_string()])
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

/// What `ferrite-probe ping-pong` measured: one-byte round trips on one connection.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PingPong {
    pub transactions: usize,
    pub seconds: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
}

impl PingPong {
    pub fn per_second(&self) -> f64 {
        self.transactions as f64 / self.seconds
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
