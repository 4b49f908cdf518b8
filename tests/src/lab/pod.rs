//! Pods: a netns wired to its node as the CNI plugin wires one.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Result};

use super::{sh, Netns, Probe, Server};

/// A pod: its own netns, eth0 wired to a host-side veth in the node's netns.
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, for a dual-stack pod.
    pub ip6: Option<Ipv6Addr>,
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

    /// The v1 Pod object the agent reads for this pod (`podIPs` lists its IPv6
    /// address too when it has one).
    pub fn yaml(&self, node: &str) -> String {
        let pod_ips = match self.ip6 {
            Some(ip6) => format!(", podIPs: [{{ip: {}}}, {{ip: \"{ip6}\"}}]", self.ip),
            None => String::new(),
        };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}}}\nspec: {{nodeName: {node}, containers: [{{name: app, image: none}}]}}\nstatus: {{phase: Running, podIP: {}{pod_ips}}}\n",
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
    pub fn tcp_request(&self, to: impl Into<SocketAddr>, message: &str) -> Result<String> {
        self.netns.tcp_request(to, message)
    }

    pub fn tcp_connect(&self, to: impl Into<SocketAddr>) -> Result<TcpStream> {
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
