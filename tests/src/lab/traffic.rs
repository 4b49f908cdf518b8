//! Traffic between the lab's namespaces: servers in pods, answers, requests,
//! bulk transfers and connection loops.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket,
    },
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{Netns, Pod};

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

/// Send `request` on `socket` to `to` and read one answer: the pod that answered
/// (`None`: no answer within the socket's timeout).
pub fn udp_ask(socket: &UdpSocket, to: SocketAddrV4, request: &str) -> Result<Option<String>> {
    socket.send_to(request.as_bytes(), to)?;
    let mut buf = [0u8; 2048];
    match socket.recv_from(&mut buf) {
        Ok((n, _)) => Ok(Some(
            parse_answer(&String::from_utf8_lossy(&buf[..n]), request)?.0,
        )),
        Err(_) => Ok(None),
    }
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
    pub fn start(netns: &Netns, name: &str, address: impl Into<SocketAddr>) -> Result<Self> {
        let address: SocketAddr = address.into();
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

/// Send `bytes` over one TCP connection from `client` to a sink in `server` on `port`.
/// Returns what the sink counted (it also answers the count to the client, which is
/// checked) and how long the transfer took.
pub fn bulk_transfer(
    client: &Pod,
    server: &Pod,
    port: u16,
    bytes: usize,
) -> Result<(usize, Duration)> {
    bulk_transfer_to(client, server, SocketAddrV4::new(server.ip, port), bytes)
}

/// [`bulk_transfer`] to the server's address `to`, of either family (the sink
/// listens on the unspecified address of `to`'s family and port).
pub fn bulk_transfer_to(
    client: &Pod,
    server: &Pod,
    to: impl Into<SocketAddr>,
    bytes: usize,
) -> Result<(usize, Duration)> {
    let to: SocketAddr = to.into();
    let any = match to {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let listener = server
        .netns
        .run(move || TcpListener::bind((any, to.port())))??;
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
    let mut stream = client.tcp_connect(to)?;
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
pub fn connection_loop(client: &Pod, to: impl Into<SocketAddr>, count: usize) -> Result<Duration> {
    let to: SocketAddr = to.into();
    client.netns.run(move || -> Result<Duration> {
        let start = Instant::now();
        for i in 0..count {
            let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            exchange(&mut stream, &format!("c{i}"))?;
        }
        Ok(start.elapsed())
    })?
}
