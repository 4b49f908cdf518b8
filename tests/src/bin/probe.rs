//! `ferrite-probe`: a client process for the lab that runs where a pod's or a node's
//! own process runs: it first joins a cgroup (a lab node's subtree, so the node's
//! socket-level load balancing applies to it, as to any process of that node) and a
//! network namespace (a pod's, or the node's), then makes requests and prints one JSON
//! line per request: what answered, from which address the socket says it came, and
//! the error, if any (`refused`, `timeout` or the OS message).
//!
//! ```text
//! ferrite-probe --cgroup DIR --netns PATH tcp ADDR MESSAGE
//! ferrite-probe --cgroup DIR --netns PATH udp ADDR MESSAGE          # unconnected: sendto/recvfrom
//! ferrite-probe --cgroup DIR --netns PATH udp-connected ADDR MESSAGE
//! ferrite-probe --cgroup DIR --netns PATH hold ADDR   # TCP; one request per stdin line
//! ```
//! `--bind PORT` makes UDP sockets send from that port (a client with a fixed port).
//! ADDR is IPv4 (`10.96.0.10:80`) or IPv6 (`[fd00::10]:80`, `[::ffff:10.96.0.10]:80`:
//! an IPv6 address makes an IPv6 socket, dual-stack as Linux makes them by default).
//! `ferrite-probe ... ping-pong ADDR tcp|udp SECONDS` sends one byte and waits for
//! it back, over and over for SECONDS, on one TCP connection (or one unconnected UDP
//! socket), and prints the transactions and latency percentiles (the latency bench).
//! `ferrite-probe --cgroup DIR --netns PATH exec PROGRAM ARGS...` runs another client
//! (wrk, iperf3) there instead.
use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsFd,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

/// What one request gave.
#[derive(Serialize, Default)]
struct Outcome {
    /// The answer line.
    reply: Option<String>,
    /// Where the answer came from as the socket reports it (recvfrom or getpeername).
    from: Option<String>,
    /// The socket's own address (getsockname).
    local: Option<String>,
    /// `refused` (ECONNREFUSED), `timeout`, or the OS error.
    error: Option<String>,
    /// How long the request took, for the reader (tests assert on errors, not time).
    micros: u128,
}

const TIMEOUT: Duration = Duration::from_secs(5);

fn error_kind(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused".into(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout".into(),
        _ => e.to_string(),
    }
}

fn line_exchange(stream: &mut TcpStream, message: &str) -> std::io::Result<String> {
    stream.write_all(format!("{message}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::other("connection closed without an answer"));
    }
    Ok(line.trim_end().to_string())
}

fn tcp(to: SocketAddr, message: &str) -> Outcome {
    let start = Instant::now();
    let result = TcpStream::connect_timeout(&to, TIMEOUT).and_then(|mut stream| {
        stream.set_read_timeout(Some(TIMEOUT))?;
        let from = stream.peer_addr()?;
        Ok((
            line_exchange(&mut stream, message)?,
            from,
            stream.local_addr()?,
        ))
    });
    finish(result, start)
}

/// A UDP socket of `to`'s family, sending from `port` (0: any).
fn udp_socket(to: SocketAddr, port: u16) -> std::io::Result<UdpSocket> {
    if to.is_ipv6() {
        UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))
    } else {
        UdpSocket::bind(("0.0.0.0", port))
    }
}

fn udp(to: SocketAddr, message: &str, connected: bool, port: u16) -> Outcome {
    let start = Instant::now();
    let result = (|| {
        let socket = udp_socket(to, port)?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        let mut buf = [0u8; 2048];
        let (n, from) = if connected {
            socket.connect(to)?;
            socket.send(message.as_bytes())?;
            let n = socket.recv(&mut buf)?;
            (n, socket.peer_addr()?)
        } else {
            // As resolvers do: ICMP errors (port unreachable) are reported to an
            // unconnected socket only with IP_RECVERR.
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv4RecvErr, &true)
                .map_err(std::io::Error::from)?;
            if to.is_ipv6() {
                nix::sys::socket::setsockopt(
                    &socket,
                    nix::sys::socket::sockopt::Ipv6RecvErr,
                    &true,
                )
                .map_err(std::io::Error::from)?;
            }
            socket.send_to(message.as_bytes(), to)?;
            socket.recv_from(&mut buf)?
        };
        let local = socket.local_addr()?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from, local))
    })();
    finish(result, start)
}

fn finish(result: std::io::Result<(String, SocketAddr, SocketAddr)>, start: Instant) -> Outcome {
    let micros = start.elapsed().as_micros();
    match result {
        Ok((reply, from, local)) => Outcome {
            reply: Some(reply),
            from: Some(from.to_string()),
            local: Some(local.to_string()),
            micros,
            ..Outcome::default()
        },
        Err(e) => Outcome {
            error: Some(error_kind(&e)),
            micros,
            ..Outcome::default()
        },
    }
}

/// One TCP connection kept open: a request per stdin line, an outcome per request
/// (the first line reports the connection itself).
fn hold(to: SocketAddr) -> Result<()> {
    let start = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&to, TIMEOUT) {
        Ok(stream) => stream,
        Err(e) => return print(&finish(Err(e), start)),
    };
    stream.set_read_timeout(Some(TIMEOUT))?;
    let (from, local) = (stream.peer_addr()?, stream.local_addr()?);
    print(&Outcome {
        from: Some(from.to_string()),
        local: Some(local.to_string()),
        micros: start.elapsed().as_micros(),
        ..Outcome::default()
    })?;
    for line in std::io::stdin().lock().lines() {
        let start = Instant::now();
        let outcome = finish(
            line_exchange(&mut stream, &line?).map(|reply| (reply, from, local)),
            start,
        );
        print(&outcome)?;
    }
    Ok(())
}

fn print(outcome: &Outcome) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(outcome)?)?;
    out.flush()?;
    Ok(())
}

/// What a ping-pong run measured.
#[derive(Serialize)]
struct PingPong {
    transactions: usize,
    seconds: f64,
    p50_ns: u64,
    p99_ns: u64,
    p999_ns: u64,
}

/// One byte there and back, over and over for `seconds`, every round trip timed.
fn ping_pong(to: SocketAddr, protocol: &str, seconds: f64) -> Result<()> {
    let mut byte = [0u8; 1];
    let mut exchange: Box<dyn FnMut() -> std::io::Result<()>> = match protocol {
        "tcp" => {
            let mut stream = TcpStream::connect_timeout(&to, TIMEOUT)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            Box::new(move || {
                stream.write_all(b"x")?;
                std::io::Read::read_exact(&mut stream, &mut byte)
            })
        }
        "udp" => {
            let socket = udp_socket(to, 0)?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            Box::new(move || {
                socket.send_to(b"x", to)?;
                socket.recv_from(&mut byte).map(|_| ())
            })
        }
        other => bail!("ping-pong over {other:?}: tcp or udp"),
    };
    let mut samples = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    loop {
        let sent = Instant::now();
        if sent >= until {
            break;
        }
        exchange().context("a round trip")?;
        samples.push(sent.elapsed().as_nanos() as u64);
    }
    let elapsed = start.elapsed().as_secs_f64();
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    ensure!(!samples.is_empty(), "no round trip in {seconds} s");
    let result = PingPong {
        transactions: samples.len(),
        seconds: elapsed,
        p50_ns: at(0.5),
        p99_ns: at(0.99),
        p999_ns: at(0.999),
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut cgroup, mut netns) = (None::<PathBuf>, None::<PathBuf>);
    let mut port = 0u16;
    let mut rest = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cgroup" => cgroup = args.next().map(PathBuf::from),
            "--netns" => netns = args.next().map(PathBuf::from),
            "--bind" => port = args.next().context("--bind PORT")?.parse()?,
            _ => rest.push(arg),
        }
    }
    // Join the cgroup before any socket exists: the hooks see sockets by the cgroup
    // of the process that creates them.
    if let Some(cgroup) = cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cgroup.display()))?;
    }
    if let Some(netns) = netns {
        let file = std::fs::File::open(&netns)
            .with_context(|| format!("opening netns {}", netns.display()))?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the network namespace")?;
    }
    let address = |i: usize| -> Result<SocketAddr> {
        rest.get(i)
            .context("missing address")?
            .parse()
            .context("address:port")
    };
    let message = rest.get(2).cloned().unwrap_or_default();
    match rest.first().map(String::as_str) {
        Some("tcp") => print(&tcp(address(1)?, &message)),
        Some("udp") => print(&udp(address(1)?, &message, false, port)),
        Some("udp-connected") => print(&udp(address(1)?, &message, true, port)),
        Some("hold") => hold(address(1)?),
        Some("ping-pong") => {
            let seconds = rest.get(3).context("ping-pong: seconds")?.parse()?;
            ping_pong(address(1)?, &message, seconds)
        }
        Some("exec") => {
            use std::os::unix::process::CommandExt;
            let program = rest.get(1).context("exec: a program")?;
            Err(std::process::Command::new(program).args(&rest[2..]).exec()).context("exec")
        }
        other => {
            bail!("unknown command {other:?} (tcp, udp, udp-connected, hold, ping-pong, exec)")
        }
    }
}
