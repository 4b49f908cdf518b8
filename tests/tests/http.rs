//! User stories for the agent's HTTP listeners facing hostile clients (issue 24):
//! `/healthz`, `/readyz` and `/metrics` on `--http-addr`, and a healthCheckNodePort,
//! which a cloud load balancer probes from outside. One client must not be able to
//! stall them for everyone, grow the agent's memory, hold a thread per connection or
//! end a listener. Needs root.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::AsFd,
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use ferrite_tests::{
    cluster::load_balancer_yaml,
    lab::{http_get, sh, wait_until, Agent, Cluster, Node, SETTLE},
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// The agent's `--http-addr` port (the lab's agents keep the default, 127.0.0.1).
const AGENT_PORT: u16 = 9965;
const HEALTH_PORT: u16 = 32000;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const MIB: u64 = 1024 * 1024;

/// A node whose agent serves a healthCheckNodePort (an `externalTrafficPolicy:
/// Local` LoadBalancer with one endpoint on this node), both answering.
fn node_with_health_check(label: &str) -> Result<Node> {
    let mut node = Node::new(label)?;
    node.write_config(&load_balancer_yaml(
        "lb",
        VIP,
        80,
        30080,
        &format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {HEALTH_PORT}\n"),
        &[],
        &[(BACKEND, &node.name.clone())],
    ))?;
    node.start_agent()?;
    wait_until("/readyz 200", SETTLE, || {
        node.agent_http("/readyz")
            .is_ok_and(|(status, _)| status == 200)
    })?;
    wait_until("the health-check port", SETTLE, || {
        get(&node, HEALTH_PORT, "/").is_ok_and(|(status, ..)| status == 200)
    })?;
    Ok(node)
}

fn agent(node: &Node) -> &Agent {
    node.agent.as_ref().expect("the agent runs")
}

fn local(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
}

/// Send `request` on a new connection in the node's netns and read until the server
/// closes: (status, head, body).
fn raw(node: &Node, port: u16, request: &str) -> Result<(u16, String, String)> {
    let mut stream = node.netns.tcp_connect(local(port))?;
    stream.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").context("no HTTP head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, head.to_ascii_lowercase(), body.to_string()))
}

fn get(node: &Node, port: u16, path: &str) -> Result<(u16, String, String)> {
    raw(
        node,
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n"),
    )
}

/// Both listeners answer a GET now.
fn both_answer(node: &Node) -> bool {
    node.agent_http("/healthz")
        .is_ok_and(|(status, body)| status == 200 && body == "ok\n")
        && get(node, HEALTH_PORT, "/").is_ok_and(|(status, ..)| status == 200)
}

/// The server closed this connection (FIN or RST), whatever is left unread in it.
fn closed_by_peer(stream: &TcpStream) -> bool {
    // Only hang-ups are asked for (POLLERR and POLLHUP always are): any event is one.
    // (nix knows no POLLRDHUP, so `revents()` would not show it.)
    let hung_up = PollFlags::from_bits_retain(nix::libc::POLLRDHUP);
    let mut fds = [PollFd::new(stream.as_fd(), hung_up)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|ready| ready > 0)
}

/// A connection to `port` with a small receive buffer that pipelines GETs of `path`
/// and reads nothing, returned once the server stopped taking its requests (its
/// answers fill the buffers) or 64 MiB of requests went in.
fn client_that_never_reads(node: &Node, port: u16, path: &str) -> Result<TcpStream> {
    let socket = node.netns.run(|| -> Result<Socket> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_recv_buffer_size(4096)?;
        socket.connect_timeout(&SockAddr::from(local(port)), Duration::from_secs(5))?;
        Ok(socket)
    })??;
    let mut stream: TcpStream = socket.into();
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let batch = format!("GET {path} HTTP/1.1\r\nHost: node\r\n\r\n").repeat(512);
    let mut sent = 0u64;
    while sent < 64 * MIB {
        match stream.write(batch.as_bytes()) {
            Ok(n) => sent += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => bail!("the server closed the connection after {sent} bytes: {e}"),
        }
    }
    eprintln!("port {port}: {sent} bytes of pipelined requests sent, nothing read");
    Ok(stream)
}

/// A client pipelines requests on a connection and never reads the answers (a
/// tiny_http agent then blocked `/healthz` for everyone: a cloud load balancer
/// drains the node, the liveness probe restarts the agent). Meanwhile both
/// listeners answer everyone else, and the server drops the client that reads
/// nothing once its writes stall (5 s), so its answers do not pile up.
#[test]
fn a_client_that_pipelines_requests_and_never_reads_holds_up_nobody() -> Result<()> {
    let node = node_with_health_check("pipe")?;
    for (port, path) in [(AGENT_PORT, "/metrics"), (HEALTH_PORT, "/")] {
        let stuck = client_that_never_reads(&node, port, path)?;
        wait_until(
            &format!("both listeners to answer while port {port} has a client that never reads"),
            SETTLE,
            || both_answer(&node),
        )?;
        wait_until(
            &format!("port {port} to drop the client that reads nothing"),
            SETTLE,
            || closed_by_peer(&stuck),
        )?;
    }
    Ok(())
}

/// How sending an endless request ended.
#[derive(Debug)]
enum Sent {
    /// The server closed the connection after this many bytes.
    Closed(u64),
    /// The server neither read nor closed for 5 s.
    Stalled(u64),
    /// All of it went in.
    All(u64),
}

impl Sent {
    fn bytes(&self) -> u64 {
        match self {
            Sent::Closed(n) | Sent::Stalled(n) | Sent::All(n) => *n,
        }
    }
}

/// Send `head`, then `filler` over and over up to `total` bytes, on a connection to
/// `port`; measure the agent's resident and peak memory before the connection
/// closes on our side.
fn send_endless(
    node: &Node,
    port: u16,
    head: &str,
    filler: &[u8],
    total: u64,
) -> Result<(Sent, u64, u64)> {
    let mut stream = node.netns.tcp_connect(local(port))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(head.as_bytes())?;
    let chunk = filler.repeat((MIB as usize).div_ceil(filler.len()));
    let mut sent = head.len() as u64;
    let outcome = loop {
        if sent >= total {
            break Sent::All(sent);
        }
        match stream.write(&chunk) {
            Ok(n) => sent += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break Sent::Stalled(sent)
            }
            Err(_) => break Sent::Closed(sent),
        }
    };
    let agent = agent(node);
    let memory = (agent.status_number("VmRSS")?, agent.status_number("VmHWM")?);
    drop(stream);
    Ok((outcome, memory.0, memory.1))
}

/// 300 MiB of endless request: one header value, header lines, a body. tiny_http
/// kept a header whole in memory (300 MB sent: +324 MB of RSS, against a 512 Mi
/// limit). Now each connection closes within a few KiB (431 for the head, 405 with
/// `Connection: close` for the body, which is never read), the agent's resident and
/// peak memory grow by far less than what was sent, and both listeners answer.
#[test]
fn an_endless_request_is_cut_off_and_costs_the_agent_no_memory() -> Result<()> {
    const TOTAL: u64 = 300 * MIB;
    const GROWTH_KIB: u64 = 64 * 1024;
    let node = node_with_health_check("endless")?;
    let (rss_before, peak_before) = (
        agent(&node).status_number("VmRSS")?,
        agent(&node).status_number("VmHWM")?,
    );
    let body_head =
        format!("POST /healthz HTTP/1.1\r\nHost: node\r\nContent-Length: {TOTAL}\r\n\r\n");
    for (what, port, head, filler) in [
        (
            "an endless header value",
            AGENT_PORT,
            "GET /healthz HTTP/1.1\r\nHost: node\r\nX-Endless: ",
            &b"a"[..],
        ),
        (
            "endless header lines",
            HEALTH_PORT,
            "GET / HTTP/1.1\r\nHost: node\r\n",
            &b"X-Again: a\r\n"[..],
        ),
        ("an endless body", AGENT_PORT, body_head.as_str(), &b"a"[..]),
    ] {
        let (sent, rss, peak) = send_endless(&node, port, head, filler, TOTAL)?;
        eprintln!(
            "{what}: {sent:?} ({} MiB); agent RSS {rss_before} -> {rss} KiB, peak {peak_before} -> \
             {peak} KiB",
            sent.bytes() / MIB
        );
        assert!(
            matches!(sent, Sent::Closed(n) if n < 16 * MIB),
            "{what}: the server did not close the connection early: {sent:?}"
        );
        assert!(
            rss.saturating_sub(rss_before) < GROWTH_KIB,
            "{what}: RSS {rss_before} -> {rss} KiB"
        );
        assert!(
            peak.saturating_sub(peak_before) < GROWTH_KIB,
            "{what}: peak RSS {peak_before} -> {peak} KiB"
        );
        wait_until(&format!("both listeners after {what}"), SETTLE, || {
            both_answer(&node)
        })?;
    }
    Ok(())
}

/// Let this process hold `fds` descriptors (2,000 client sockets).
fn allow_descriptors(fds: u64) -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < fds {
        setrlimit(Resource::RLIMIT_NOFILE, fds.min(hard), hard)?;
    }
    Ok(())
}

/// Open `count` connections from the node's netns, one in four to the health-check
/// port; the ones that connected.
fn flood(node: &Node, count: usize) -> Result<Vec<TcpStream>> {
    let streams = node.netns.run(|| {
        (0..count)
            .filter_map(|i| {
                let port = if i % 4 == 3 { HEALTH_PORT } else { AGENT_PORT };
                TcpStream::connect_timeout(&local(port).into(), Duration::from_secs(5)).ok()
            })
            .collect::<Vec<_>>()
    })?;
    eprintln!("{} of {count} flood connections open", streams.len());
    Ok(streams)
}

/// 2,000 connections opened and held (tiny_http held a thread for each). The agent's
/// thread count stays where it was, each listener keeps at most 64 connections
/// (the oldest are closed to make room, so a probe's connection is served), and
/// both answer while the flood is held and after it.
#[test]
fn two_thousand_held_connections_take_no_thread_each_and_probes_are_answered() -> Result<()> {
    allow_descriptors(4096)?;
    let node = node_with_health_check("flood")?;
    let (threads_before, fds_before) = (
        agent(&node).status_number("Threads")?,
        agent(&node).open_fds()?,
    );
    let held = flood(&node, 2000)?;
    assert!(held.len() >= 1500, "only {} connected", held.len());
    wait_until("both listeners during the flood", SETTLE, || {
        both_answer(&node)
    })?;
    // The listeners may still be draining their backlogs (each accept closes the
    // oldest connection, whose descriptor goes when its task is next polled): the
    // count must come down to the bound while the flood is held.
    let bound = fds_before + 2 * 64 + 4;
    let settled = wait_until("at most 64 connections per listener", SETTLE, || {
        agent(&node).open_fds().is_ok_and(|fds| fds <= bound)
    });
    let (threads, fds) = (
        agent(&node).status_number("Threads")?,
        agent(&node).open_fds()?,
    );
    eprintln!("threads {threads_before} -> {threads}, descriptors {fds_before} -> {fds}");
    assert!(
        threads <= threads_before + 4,
        "threads {threads_before} -> {threads}"
    );
    assert!(
        settled.is_ok(),
        "descriptors {fds_before} -> {fds}: more than 64 connections per listener"
    );
    drop(held);
    wait_until("both listeners after the flood", SETTLE, || {
        both_answer(&node)
    })?;
    Ok(())
}

/// Sets the agent's soft descriptor limit; puts the old one back on drop.
struct DescriptorLimit {
    pid: u32,
    old: String,
}

impl DescriptorLimit {
    fn set(pid: u32, soft: usize) -> Result<Self> {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
        let old = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .context("no descriptor limit")?
            .to_string();
        sh(
            "prlimit",
            &["--pid", &pid.to_string(), &format!("--nofile={soft}:")],
        )?;
        Ok(Self { pid, old })
    }
}

impl Drop for DescriptorLimit {
    fn drop(&mut self) {
        let _ = Command::new("prlimit")
            .args([
                "--pid",
                &self.pid.to_string(),
                &format!("--nofile={}:", self.old),
            ])
            .status();
    }
}

/// The agent runs out of descriptors (its soft limit lowered to 16 above what it
/// uses) while clients keep connecting, so `accept` fails with EMFILE (which ended a
/// tiny_http listener for good while the agent ran on). The failure is logged and
/// retried, the oldest connection is closed to take the next one: both listeners
/// answer during the shortage and after it, with the agent's usual limit back.
#[test]
fn accept_failing_for_want_of_descriptors_ends_no_listener() -> Result<()> {
    let node = node_with_health_check("emfile")?;
    let agent = agent(&node);
    let threads_before = agent.status_number("Threads")?;
    let soft = agent.open_fds()? + 16;
    let limit = DescriptorLimit::set(agent.pid(), soft)?;
    let held = flood(&node, 400)?;
    // At the limit the listener gives the oldest connection back after each failed
    // accept, so the descriptor count only touches the limit: its log tells.
    let out_of_descriptors = |log: &str| {
        log.lines()
            .filter(|l| l.contains("HTTP accept failed") && l.contains("Too many open files"))
            .count()
    };
    wait_until("the agent to run out of descriptors", SETTLE, || {
        out_of_descriptors(&agent.log_text()) > 0
    })?;
    wait_until("both listeners while out of descriptors", SETTLE, || {
        both_answer(&node)
    })?;
    let threads = agent.status_number("Threads")?;
    assert!(
        threads <= threads_before + 4,
        "threads {threads_before} -> {threads}"
    );
    drop(held);
    drop(limit);
    wait_until("both listeners after the shortage", SETTLE, || {
        both_answer(&node)
    })?;
    let accept_lines = out_of_descriptors(&agent.log_text());
    eprintln!("{accept_lines} accept failures logged");
    assert!(
        (1..=5).contains(&accept_lines),
        "accept failures are logged, at most once per 10 s: {accept_lines}"
    );
    Ok(())
}

/// Only GET and HEAD are answered: POST, PUT, DELETE, PATCH and OPTIONS get 405
/// with `Allow: GET, HEAD` (tiny_http answered every method, 200 on /healthz). HEAD
/// gets the GET's status and length without a body; the health-check port still
/// answers any path the way kube-proxy does.
#[test]
fn only_get_and_head_are_answered() -> Result<()> {
    let node = node_with_health_check("methods")?;
    for (port, path) in [(AGENT_PORT, "/healthz"), (HEALTH_PORT, "/")] {
        for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            let (status, head, _) = raw(
                &node,
                port,
                &format!(
                    "{method} {path} HTTP/1.1\r\nHost: node\r\nContent-Length: 2\r\n\
                     Connection: close\r\n\r\nhi"
                ),
            )?;
            assert_eq!(status, 405, "{method} on port {port}: {head}");
            assert!(head.contains("\r\nallow: get, head"), "{head}");
        }
        let (status, head, body) = raw(
            &node,
            port,
            &format!("HEAD {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n"),
        )?;
        let (get_status, get_head, get_body) = get(&node, port, path)?;
        assert_eq!((status, get_status), (200, 200), "{head}\n{get_head}");
        assert_eq!(body, "", "HEAD answered with a body");
        let length = format!("\r\ncontent-length: {}\r\n", get_body.len());
        assert!(head.contains(&length), "{head}");
        assert!(get_head.contains(&length), "{get_head}");
    }
    let (_, head, body) = get(&node, HEALTH_PORT, "/any/path")?;
    assert!(
        head.contains("\r\nx-load-balancing-endpoint-weight: 1")
            && head.contains("\r\ncontent-type: application/json"),
        "{head}"
    );
    assert!(body.contains("\"localEndpoints\":1"), "{body}");
    Ok(())
}

/// kube-proxy's health endpoint, as a cloud load balancer probes it: from outside
/// the cluster on the node's address, port 10256, kube-proxy's JSON. A Node object
/// that is being deleted (`deletionTimestamp`) answers `/healthz` 503 with
/// `nodeEligible: false` (load balancers drain it) and `/livez` 200; once it is not,
/// 200 again. In file mode: the Node object comes from the config file.
#[test]
fn kube_proxys_health_endpoint_answers_load_balancers_and_drains_a_node_being_deleted() -> Result<()>
{
    let mut cluster = Cluster::new(1)?;
    let objects = cluster.nodes_and_pods_yaml();
    cluster.write_config(&objects)?;
    cluster.start_agents()?;
    let node = &cluster.nodes[0];
    let address = SocketAddrV4::new(node.ip.context("plugged")?, 10256);
    let from_world = |path: &str| -> Result<(u16, serde_json::Value)> {
        let path = path.to_string();
        let (status, body) = cluster.world.run(move || -> Result<(u16, String)> {
            let mut stream = TcpStream::connect_timeout(&address.into(), Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            http_get(&mut stream, &path)
        })??;
        Ok((status, serde_json::from_str(&body)?))
    };
    wait_until("/healthz 200 from the world", SETTLE, || {
        from_world("/healthz").is_ok_and(|(status, _)| status == 200)
    })?;
    let (_, healthz) = from_world("/healthz")?;
    assert_eq!(healthz["nodeEligible"], true, "{healthz}");
    assert_eq!(
        healthz["lastUpdated"], healthz["currentTime"],
        "healthy: lastUpdated is now, as kube-proxy answers"
    );
    assert_eq!(from_world("/livez")?.0, 200);

    let name = &node.name;
    let deleting = objects.replace(
        &format!("metadata: {{name: {name}}}"),
        &format!("metadata: {{name: {name}, deletionTimestamp: \"2026-12-07T00:00:00Z\"}}"),
    );
    assert_ne!(deleting, objects);
    cluster.write_config(&deleting)?;
    wait_until("/healthz 503 for the node being deleted", SETTLE, || {
        from_world("/healthz")
            .is_ok_and(|(status, body)| status == 503 && body["nodeEligible"] == false)
    })?;
    assert_eq!(from_world("/livez")?.0, 200, "the proxy itself is alive");

    cluster.write_config(&objects)?;
    wait_until("/healthz 200 again", SETTLE, || {
        from_world("/healthz")
            .is_ok_and(|(status, body)| status == 200 && body["nodeEligible"] == true)
    })?;
    Ok(())
}
