//! User stories of `ferrite monitor` on one node with its agent: several monitors at
//! once see the same real drop; a flow monitor sees a new ClusterIP flow with the
//! backend that answered; the datapath stops writing events once the last monitor
//! leaves. Needs root; each test builds its own uniquely named node.
use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use ferrite_agent::monitor::Line;
use ferrite_common::monitor::{WANT_DROPS, WANT_FLOWS};
use ferrite_tests::{
    cluster::{self, BACKENDS, CLIENTS, TCP_FRONTEND, UDP_FRONTEND},
    lab::{answered_by, wait_until, Node, Server, SETTLE},
    monitor::{wanted_events, Monitor},
};

/// A hang guard only: events arrive in well under a second.
const PATIENCE: Duration = Duration::from_secs(30);

fn example_node(label: &str) -> Result<(Node, Vec<Server>)> {
    let (mut node, servers) = cluster::example_node(label)?;
    node.write_config(&cluster::example_for(&node.name))?;
    node.start_agent()?;
    node.wait_for_sync(2, 5)?;
    // Ready once the sync that wrote the maps has returned (and named the Services
    // `--service` finds).
    ferrite_tests::lab::wait_until("/readyz 200", ferrite_tests::lab::SETTLE, || {
        node.agent_http("/readyz")
            .is_ok_and(|(status, _)| status == 200)
    })?;
    Ok((node, servers))
}

#[test]
fn two_monitors_at_once_both_see_a_spoofed_drop_and_the_datapath_stops_when_they_leave(
) -> Result<()> {
    let (node, _servers) = example_node("mon")?;
    assert_eq!(wanted_events(&node)?, 0, "nobody listens yet");
    let first = Monitor::start(&node, &[], PATIENCE)?;
    let second = Monitor::start(&node, &["--type", "drop"], PATIENCE)?;
    assert_eq!(wanted_events(&node)?, WANT_DROPS);

    // A pod claims another pod's address and sends from it.
    let attacker = node.pod(CLIENTS[0].0);
    let victim_ip = CLIENTS[1].1;
    let socket = attacker.spoofing_socket(victim_ip, 0)?;
    let source_port = socket.local_addr()?.port();
    socket.send_to(b"spoofed", UDP_FRONTEND)?;

    for monitor in [&first, &second] {
        let line = monitor.wait_for(PATIENCE, |line| {
            matches!(line, Line::Drop(e) if e.source == victim_ip && e.source_port == source_port)
        })?;
        let Line::Drop(event) = line else {
            unreachable!()
        };
        assert_eq!(event.reason, "drop_spoofed");
        assert_eq!(event.program, "ferrite_from_pod");
        assert_eq!(event.protocol, "udp");
        assert_eq!(
            SocketAddr::new(event.destination, event.destination_port),
            SocketAddr::from(UDP_FRONTEND)
        );
        // Where the pod's frames enter the node: its host-side veth.
        assert_eq!(
            event.interface.as_deref(),
            Some(attacker.host_interface.as_str())
        );
        assert_ne!(event.ifindex, 0);
        assert!(event.bytes > 0);
        assert_eq!(event.service.as_deref(), Some("default/web:dns"));
    }

    // One leaves: the other still listens, and the datapath still reports.
    first.interrupt()?;
    socket.send_to(b"spoofed again", UDP_FRONTEND)?;
    second.wait_for(
        PATIENCE,
        |line| matches!(line, Line::Drop(e) if e.source == victim_ip && e.bytes > 0),
    )?;
    assert_eq!(wanted_events(&node)?, WANT_DROPS);
    second.interrupt()?;
    wait_until("the monitor entry cleared", SETTLE, || {
        wanted_events(&node).is_ok_and(|wants| wants == 0)
    })?;
    // The agent kept serving through it all.
    let client = node.pod(CLIENTS[1].0);
    let (reply, _) = client.udp_request(UDP_FRONTEND, "still served")?;
    answered_by(&reply, "still served")?;
    Ok(())
}

#[test]
fn a_flow_monitor_sees_a_new_cluster_ip_flow_with_the_backend_that_answered() -> Result<()> {
    let (node, _servers) = example_node("monf")?;
    let flows = Monitor::start(
        &node,
        &["--type", "flow", "--service", "default/web"],
        PATIENCE,
    )?;
    assert_eq!(wanted_events(&node)?, WANT_FLOWS);
    let client = node.pod(CLIENTS[0].0);
    let request = "a new flow";
    // A process of the pod (socket-level load balancing translates its connect).
    let outcome = client.probe().tcp(TCP_FRONTEND, request)?;
    let backend_name = answered_by(outcome.answer()?, request)?;
    let backend_ip = BACKENDS
        .iter()
        .find(|(name, _)| *name == backend_name)
        .map(|(_, ip)| *ip)
        .expect("a known backend");
    let line = flows.wait_for(PATIENCE, |line| {
        matches!(line, Line::Flow(e) if SocketAddr::new(e.destination, e.destination_port) == SocketAddr::from(TCP_FRONTEND))
    })?;
    let Line::Flow(event) = line else {
        unreachable!()
    };
    assert_eq!(event.backend, Some(backend_ip.into()));
    assert_eq!(event.backend_port, Some(cluster::TCP_TARGET));
    assert_eq!(event.protocol, "tcp");
    assert_eq!(event.service.as_deref(), Some("default/web:http"));
    assert!(
        matches!(
            (event.reason.as_str(), event.program.as_str()),
            ("sock_translated", "ferrite_connect4") | ("service_new_flow", "ferrite_from_pod")
        ),
        "{event:?}"
    );
    drop(flows);
    wait_until("the monitor entry cleared", SETTLE, || {
        wanted_events(&node).is_ok_and(|wants| wants == 0)
    })?;
    Ok(())
}

#[test]
fn a_connect_refused_at_the_socket_for_want_of_backends_is_a_drop_of_the_connect_program(
) -> Result<()> {
    let (mut node, _servers) = cluster::example_node("monr")?;
    node.write_config(&cluster::example_with_backends(&node.name, &[]))?;
    node.start_agent()?;
    node.wait_for_sync(2, 5)?;
    let drops = Monitor::start(
        &node,
        &["--port", &TCP_FRONTEND.port().to_string()],
        PATIENCE,
    )?;
    let client = node.pod(CLIENTS[0].0);
    let outcome = client.probe().tcp(TCP_FRONTEND, "nobody serves")?;
    assert_eq!(outcome.error.as_deref(), Some("refused"), "{outcome:?}");
    let line = drops.wait_for(PATIENCE, |line| matches!(line, Line::Drop(_)))?;
    let Line::Drop(event) = line else {
        unreachable!()
    };
    assert_eq!(event.reason, "sock_refused");
    assert_eq!(event.program, "ferrite_connect4");
    assert_eq!(
        SocketAddr::new(event.destination, event.destination_port),
        SocketAddr::from(TCP_FRONTEND)
    );
    assert_eq!(event.protocol, "tcp");
    // A socket call: no device, no packet.
    assert_eq!((event.ifindex, event.interface, event.bytes), (0, None, 0));
    assert_eq!(event.service.as_deref(), Some("default/web:http"));
    Ok(())
}

#[test]
fn a_monitor_that_stops_reading_misses_events_is_told_how_many_and_holds_up_nobody() -> Result<()> {
    let (node, _servers) = example_node("mons")?;
    // A monitor that sends its request, then reads nothing for a while.
    let mut stalled = RawMonitor::connect(&node.name)?;
    assert!(matches!(stalled.next()?, Some(Line::Listening { .. })));
    let reading = Monitor::start(&node, &[], PATIENCE)?;
    let socket = node.pod(CLIENTS[0].0).spoofing_socket(CLIENTS[1].1, 0)?;
    // More drops than the stalled monitor's queue and its socket's buffer hold.
    let burst = ferrite_agent::monitor::hub::QUEUE_LINES * 5;
    for _ in 0..burst {
        socket.send_to(b"x", UDP_FRONTEND)?;
    }
    // The reading monitor is not held up: it gets drops sent after the burst (sent
    // again until one comes: the burst may have filled the kernel's ring for a while).
    let marked = |payload: &[u8]| 14 + 20 + 8 + payload.len() as u32;
    let last = b"after the burst";
    let mut seen = false;
    for _ in 0..ATTEMPTS {
        socket.send_to(last, UDP_FRONTEND)?;
        if reading
            .wait_for(
                RETRY,
                |line| matches!(line, Line::Drop(e) if e.bytes == marked(last)),
            )
            .is_ok()
        {
            seen = true;
            break;
        }
    }
    assert!(seen, "the reading monitor got nothing after the burst");

    // The stalled monitor reads again: what it had queued, and how many it missed.
    let mut drops_read = 0;
    let missed = loop {
        match stalled.next()? {
            Some(Line::Drop(_)) => drops_read += 1,
            Some(Line::Missed { count }) => break count,
            Some(other) => anyhow::bail!("unexpected {other:?}"),
            None => anyhow::bail!("no missed count after {drops_read} drops"),
        }
    };
    assert!(
        missed > 0 && drops_read >= ferrite_agent::monitor::hub::QUEUE_LINES,
        "{drops_read} drops, then {missed} missed: the gap comes after all it had queued"
    );
    assert!(
        drops_read as u64 + missed <= burst as u64 + ATTEMPTS as u64,
        "{drops_read} drops read and {missed} missed: more than were sent"
    );
    // And it gets events again.
    let again = b"after the gap";
    let mut seen = false;
    for _ in 0..ATTEMPTS {
        socket.send_to(again, UDP_FRONTEND)?;
        while let Some(line) = stalled.next()? {
            if matches!(line, Line::Drop(e) if e.bytes == marked(again)) {
                seen = true;
                break;
            }
        }
        if seen {
            break;
        }
    }
    assert!(seen, "the stalled monitor got nothing after reading again");
    Ok(())
}

/// Attempts at a drop that may be lost (a full ring), each given RETRY.
const ATTEMPTS: usize = 30;
const RETRY: Duration = Duration::from_secs(1);

/// A monitor speaking the agent's protocol directly, reading only when asked.
struct RawMonitor {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    partial: String,
}

impl RawMonitor {
    fn connect(node: &str) -> Result<Self> {
        use std::io::Write;
        let mut stream =
            std::os::unix::net::UnixStream::connect(ferrite_agent::monitor::socket_path(node))?;
        stream.write_all(b"{\"kind\":\"drop\"}\n")?;
        stream.set_read_timeout(Some(RETRY))?;
        Ok(Self {
            reader: std::io::BufReader::new(stream),
            partial: String::new(),
        })
    }

    /// The next line, or `None` when none came within RETRY.
    fn next(&mut self) -> Result<Option<Line>> {
        use std::io::BufRead;
        match self.reader.read_line(&mut self.partial) {
            Ok(0) => anyhow::bail!("the agent closed the connection"),
            Ok(_) => {
                let line = serde_json::from_str(&self.partial)?;
                self.partial.clear();
                Ok(Some(line))
            }
            // A line cut by the timeout stays in `partial` for the next call.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}
