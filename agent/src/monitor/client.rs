//! The `ferrite monitor` command's side: connect to the node's agent, send the
//! request, read its lines; name devices and render lines as a table. And the
//! tools' questions to the agent ([`ask`], [`AgentPolicyNames`]).
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};

use super::{socket_path, Answer, Event, Line, Query, QueryLine, Request};
use crate::model::policy::{EndpointSources, PodAddress, PolicyNames};

/// How long the tools wait for the agent's answer (it answers at once, unless
/// many others ask at the same moment).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent of `node`'s answer to `query`.
pub fn ask(node: &str, query: &Query) -> Result<Answer> {
    let path = socket_path(node);
    let mut stream =
        UnixStream::connect(&path).with_context(|| format!("connecting to {}", path.display()))?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    let mut line = serde_json::to_string(&QueryLine {
        query: query.clone(),
    })?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("reading the answer")?;
    anyhow::ensure!(!answer.is_empty(), "the agent closed without answering");
    serde_json::from_str(&answer).context("an answer this tool cannot read")
}

/// Policy names from the running agent of a node.
pub struct AgentPolicyNames {
    pub node: String,
}

impl AgentPolicyNames {
    fn ask(&self, query: &Query) -> Result<Answer, String> {
        match ask(&self.node, query) {
            Ok(Answer::Error { message }) => Err(format!("the agent cannot tell: {message}")),
            Ok(answer) => Ok(answer),
            Err(e) => Err(format!("agent not reachable ({e:#})")),
        }
    }
}

impl PolicyNames for AgentPolicyNames {
    fn pod_policies(&self, address: std::net::Ipv4Addr) -> Result<Option<EndpointSources>, String> {
        match self.ask(&Query::PodPolicies { address })? {
            Answer::PodPolicies { sources } => Ok(sources),
            other => Err(format!("an answer to another question: {other:?}")),
        }
    }

    fn pod_address(&self, namespace: &str, name: &str) -> Result<PodAddress, String> {
        let pod = format!("{namespace}/{name}");
        match self.ask(&Query::PodAddress { pod })? {
            Answer::PodAddress { address } => Ok(address),
            other => Err(format!("an answer to another question: {other:?}")),
        }
    }
}

/// The lines the agent of `node` sends for `request`, as they come.
pub fn connect(node: &str, request: &Request) -> Result<impl Iterator<Item = Result<Line>>> {
    let path = socket_path(node);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "connecting to {} (is the agent of node {node} running, and are you root?)",
            path.display()
        )
    })?;
    let mut request = serde_json::to_string(request)?;
    request.push('\n');
    stream.write_all(request.as_bytes())?;
    Ok(BufReader::new(stream).lines().map(|line| {
        let line = line.context("reading from the agent")?;
        serde_json::from_str::<Line>(&line).with_context(|| format!("unexpected line {line:?}"))
    }))
}

/// Name the device of `event` in this network namespace, where there is one.
pub fn name_interface(event: &mut Event) {
    if event.ifindex != 0 {
        event.interface = nix::net::if_::if_indextoname(event.ifindex)
            .ok()
            .and_then(|name| name.into_string().ok());
    }
}

/// The wall-clock time of a node's CLOCK_MONOTONIC reading (the monitor runs on the
/// node, so its own clocks convert).
pub fn wall_clock_of(monotonic_ns: u64) -> Option<SystemTime> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
    SystemTime::now().checked_sub(Duration::from_nanos(now_ns.saturating_sub(monotonic_ns)))
}

/// `HH:MM:SS.mmm` (UTC) of `time`.
pub fn time_of_day(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        since_epoch.subsec_millis()
    )
}

pub const TABLE_HEADER: &str =
    "TIME (UTC)    EVENT  REASON                 PROGRAM               INTERFACE            PROTO  SOURCE                 DESTINATION            DETAIL";

/// `address:port` (`[address]:port` for IPv6), the address alone without a port,
/// `-` when neither is known (a connecting socket has no source yet).
fn endpoint(address: std::net::IpAddr, port: u16) -> String {
    if address.is_unspecified() && port == 0 {
        "-".to_string()
    } else if port == 0 {
        address.to_string()
    } else {
        std::net::SocketAddr::new(address, port).to_string()
    }
}

/// One table row for `line` (`time`: when it happened, as `HH:MM:SS.mmm`); `None`
/// for lines that are not events or misses.
pub fn table_row(line: &Line, time: &str) -> Option<String> {
    let (kind, event) = match line {
        Line::Drop(event) => ("drop", event),
        Line::Flow(event) => ("flow", event),
        Line::Missed { count } => {
            return Some(format!(
                "{time:<13} missed {count} events: this monitor read too slowly"
            ))
        }
        Line::Listening { .. } | Line::Error { .. } => return None,
    };
    let interface = match (&event.interface, event.ifindex) {
        (_, 0) => "-".to_string(),
        (Some(name), index) => format!("{name}({index})"),
        (None, index) => format!("if{index}"),
    };
    let mut detail = Vec::new();
    if let (Some(backend), Some(port)) = (event.backend, event.backend_port) {
        detail.push(format!("backend {}", endpoint(backend, port)));
    }
    match (&event.source_pod, &event.destination_pod) {
        (Some(from), Some(to)) => detail.push(format!("pods {from} -> {to}")),
        (Some(from), None) => detail.push(format!("from pod {from}")),
        (None, Some(to)) => detail.push(format!("to pod {to}")),
        (None, None) => {}
    }
    if let Some(service) = &event.service {
        detail.push(format!("service {service}"));
    }
    if event.bytes != 0 {
        detail.push(format!("{} bytes", event.bytes));
    }
    Some(format!(
        "{time:<13} {kind:<6} {:<22} {:<21} {interface:<20} {:<6} {:<22} {:<22} {}",
        event.reason,
        event.program,
        if event.protocol.is_empty() {
            "-"
        } else {
            &event.protocol
        },
        endpoint(event.source, event.source_port),
        endpoint(event.destination, event.destination_port),
        detail.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn rows_show_the_event_its_place_and_what_was_chosen() {
        let flow = Event {
            reason: "service_new_flow".into(),
            program: "ferrite_from_pod".into(),
            ifindex: 7,
            interface: Some("fv0a2f".into()),
            protocol: "tcp".into(),
            source: Ipv4Addr::new(10, 244, 0, 2).into(),
            source_port: 40000,
            destination: Ipv4Addr::new(10, 96, 0, 10).into(),
            destination_port: 80,
            bytes: 60,
            service: Some("default/web:http".into()),
            source_pod: Some("default/client".into()),
            destination_pod: None,
            backend: Some(Ipv4Addr::new(10, 244, 1, 5).into()),
            backend_port: Some(8080),
            time_ns: 0,
        };
        let row = table_row(&Line::Flow(flow.clone()), "07:59:01.123").unwrap();
        for part in [
            "07:59:01.123",
            " flow ",
            "service_new_flow",
            "fv0a2f(7)",
            "10.244.0.2:40000",
            "10.96.0.10:80",
            "backend 10.244.1.5:8080, from pod default/client, service default/web:http, 60 bytes",
        ] {
            assert!(row.contains(part), "{part:?} in {row:?}");
        }
        let ipv6 = Event {
            source: "fd00:10:244::2".parse().unwrap(),
            source_port: 0,
            destination: "fd00:10:96::a".parse().unwrap(),
            backend: Some("fd00:10:244:1::5".parse().unwrap()),
            ..flow
        };
        let row = table_row(&Line::Flow(ipv6), "t").unwrap();
        for part in [
            " fd00:10:244::2 ",
            " [fd00:10:96::a]:80 ",
            "backend [fd00:10:244:1::5]:8080",
        ] {
            assert!(row.contains(part), "{part:?} in {row:?}");
        }
        let missed = table_row(&Line::Missed { count: 4 }, "t").unwrap();
        assert!(missed.contains("missed 4 events"), "{missed}");
        assert_eq!(table_row(&Line::Listening { node: "n".into() }, "t"), None);
    }

    #[test]
    fn times_of_day_are_utc_to_the_millisecond() {
        let time = UNIX_EPOCH + Duration::from_millis(86_400_000 * 3 + 3_723_004);
        assert_eq!(time_of_day(time), "01:02:03.004");
    }
}
