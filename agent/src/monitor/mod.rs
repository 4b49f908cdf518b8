//! `ferrite monitor`: the datapath's drops and new Service flows as they happen.
//!
//! The datapath writes [`MonitorEvent`]s to the ring buffer `ferrite_events` while the
//! `ferrite_monitor` entry asks for their kind. A ring buffer has one consumer
//! position, so the agent alone reads it ([`hub`]) and fans the events out to the
//! monitors connected to its Unix socket, `/run/ferrite/<node>/monitor.sock`: a local
//! socket needs no port and no address, only root (the directory is the agent's,
//! mode 0700) reaches it, and a closed connection is a monitor gone, so the agent
//! knows when the last leaves and clears the entry. Each monitor sends one
//! [`Request`] line and then reads JSON [`Line`]s ([`client`]).
//!
//! The same socket answers questions about the agent's model ([`Query`]: which
//! NetworkPolicies give a pod what; where a pod is), for `ferrite explain` and
//! `ferrite inspect policy` to name what the maps only number: a line
//! `{"query": ...}` gets one [`Answer`] line, then the agent closes. An agent that
//! predates a query answers it with an `error` line, as any request it cannot read.
pub mod client;
pub mod hub;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use ferrite_common::{monitor, stat, MonitorEvent};
use serde::{Deserialize, Serialize};

use crate::{
    files,
    model::{
        policy::{EndpointSources, PodAddress},
        Protocol,
    },
    telemetry::{PodNames, ServiceNames},
};

/// Where the agent of `node` serves monitors.
pub fn socket_path(node: &str) -> PathBuf {
    files::run_dir(node).join("monitor.sock")
}

/// Which events a monitor wants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Dropped packets and refused socket calls, with the reason.
    #[default]
    Drop,
    /// New Service flows, with the backend chosen.
    Flow,
    All,
}

impl Kind {
    /// The `ferrite_monitor` bits (`monitor::WANT_*`) this kind needs.
    pub fn wants(self) -> u32 {
        match self {
            Kind::Drop => monitor::WANT_DROPS,
            Kind::Flow => monitor::WANT_FLOWS,
            Kind::All => monitor::WANT_DROPS | monitor::WANT_FLOWS,
        }
    }
}

/// What a monitor asks for: its first line to the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub kind: Kind,
    /// Only events with this address on either side (or as the backend chosen).
    #[serde(default)]
    pub address: Option<IpAddr>,
    /// Only events with this port on either side (or as the backend's).
    #[serde(default)]
    pub port: Option<u16>,
    /// Only events to or from a frontend of this Service (`NAMESPACE/NAME`).
    #[serde(default)]
    pub service: Option<String>,
}

/// A question about the agent's model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Query {
    /// The NetworkPolicies selecting the pod of this node at `address`, and what
    /// each gives it.
    PodPolicies { address: Ipv4Addr },
    /// Where the pod `NAMESPACE/NAME` is.
    PodAddress { pod: String },
}

/// The first line of a connection that asks instead of monitoring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryLine {
    pub query: Query,
}

/// The agent's one line for a [`Query`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Answer {
    /// `None`: no pod of this node is at the address.
    PodPolicies {
        sources: Option<EndpointSources>,
    },
    PodAddress {
        address: PodAddress,
    },
    /// The query was refused or cannot be answered (the same line as a refused
    /// monitor request's).
    Error {
        message: String,
    },
}

/// What a connection's first line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    Monitor(Request),
    Query(Query),
}

/// Read a connection's first line: a query when it has a `query` field, else a
/// monitor request.
pub fn parse_incoming(line: &str) -> Result<Incoming, String> {
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(line).map_err(|e| format!("not a monitor request: {e}"))?;
    if object.contains_key("query") {
        let query = serde_json::from_value::<QueryLine>(object.into())
            .map_err(|e| format!("not a query this agent knows: {e}"))?;
        return Ok(Incoming::Query(query.query));
    }
    serde_json::from_value::<Request>(object.into())
        .map(Incoming::Monitor)
        .map_err(|e| format!("not a monitor request: {e}"))
}

/// The answer to `query` from the agent's policy index (`None`: no sync holds).
pub fn answer(query: &Query, policy: Option<&crate::plan::SharedPolicy>) -> Answer {
    let Some(policy) = policy else {
        return Answer::Error {
            message: "the agent has no synced model right now (starting, or its last sync \
                      failed)"
                .into(),
        };
    };
    let index = policy.read().unwrap_or_else(|e| e.into_inner());
    match query {
        Query::PodPolicies { address } => Answer::PodPolicies {
            sources: index.endpoint_sources(*address),
        },
        Query::PodAddress { pod } => match pod.split_once('/') {
            Some((namespace, name)) if !name.contains('/') => Answer::PodAddress {
                address: index.pod_address(namespace, name),
            },
            _ => Answer::Error {
                message: format!("{pod:?} is not NAMESPACE/NAME"),
            },
        },
    }
}

/// One line from the agent to a monitor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Line {
    /// The monitor is subscribed: events from now on reach it.
    Listening {
        node: String,
    },
    Drop(Event),
    Flow(Event),
    /// Events that matched but did not fit in this monitor's queue (it read too
    /// slowly), right here: after the line before, before the line after.
    Missed {
        count: u64,
    },
    /// The request was refused; the agent closes the connection.
    Error {
        message: String,
    },
}

/// A drop or a new flow, readable: names instead of indexes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// CLOCK_MONOTONIC of the node when the datapath saw it.
    pub time_ns: u64,
    /// The counter it was counted under (`ferrite inspect stats` names).
    pub reason: String,
    /// The program that saw it (its attach point: `ferrite_from_pod` is a pod's veth
    /// ingress, `ferrite_from_world` the uplink's XDP, ...).
    pub program: String,
    /// The device it was seen on (0: a socket call).
    pub ifindex: u32,
    /// The device's name, where the monitor could resolve it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// `tcp`, `udp`, another protocol's number (IPv6: the next header after the
    /// fixed one), or empty when not an IP packet.
    pub protocol: String,
    pub source: IpAddr,
    pub source_port: u16,
    pub destination: IpAddr,
    pub destination_port: u16,
    /// The packet's length (0: a socket call).
    pub bytes: u32,
    /// The Service port whose frontend the destination is (`namespace/name:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The pods of this node at either end (`namespace/name`), where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_pod: Option<String>,
    /// Flows: the backend chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_port: Option<u16>,
}

/// Decode one ring buffer record (`None`: not an event of this agent's layout).
pub fn decode(record: &[u8]) -> Option<MonitorEvent> {
    if record.len() != std::mem::size_of::<MonitorEvent>() {
        return None;
    }
    // SAFETY: MonitorEvent is plain integers and byte arrays, any bytes are valid;
    // read_unaligned copies them out of the record.
    Some(unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) })
}

/// An address of `event` (16 bytes, see [`MonitorEvent`]) in its family.
fn address_of(event: &MonitorEvent, address: [u8; 16]) -> IpAddr {
    if event.family == monitor::FAMILY_IPV6 {
        Ipv6Addr::from(address).into()
    } else {
        ipv4_part(address).into()
    }
}

/// The IPv4 address in the first 4 bytes of an event's address.
fn ipv4_part(address: [u8; 16]) -> [u8; 4] {
    [address[0], address[1], address[2], address[3]]
}

/// An IPv4 event's address, as the names of Services and pods (IPv4) are keyed;
/// `None` for IPv6 events.
fn ipv4_of(event: &MonitorEvent, address: [u8; 16]) -> Option<[u8; 4]> {
    (event.family != monitor::FAMILY_IPV6).then(|| ipv4_part(address))
}

/// The readable line of `event`; `names`: Service port names by frontend, `pods`:
/// this node's pods by address.
pub fn describe(event: &MonitorEvent, names: &ServiceNames, pods: &PodNames) -> Line {
    let name = |table: &[&str], index: usize| {
        table
            .get(index)
            .map_or_else(|| format!("unknown ({index})"), |n| n.to_string())
    };
    let protocol = match (event.proto, Protocol::from_number(event.proto)) {
        (0, _) => String::new(),
        (_, Some(known)) => known.to_string().to_lowercase(),
        (number, None) => number.to_string(),
    };
    let is_flow = event.kind == monitor::KIND_FLOW;
    let readable = Event {
        time_ns: event.time_ns,
        reason: name(&stat::NAMES, event.reason as usize),
        program: name(&monitor::PROGRAMS, event.program as usize),
        ifindex: event.ifindex,
        interface: None,
        protocol,
        source: address_of(event, event.saddr),
        source_port: event.sport,
        destination: address_of(event, event.daddr),
        destination_port: event.dport,
        bytes: event.len,
        service: ipv4_of(event, event.daddr).and_then(|d| names.get(&(d, event.dport)).cloned()),
        source_pod: ipv4_of(event, event.saddr).and_then(|s| pods.get(&s).cloned()),
        destination_pod: ipv4_of(event, event.daddr).and_then(|d| pods.get(&d).cloned()),
        backend: is_flow.then(|| address_of(event, event.backend_address)),
        backend_port: is_flow.then_some(event.backend_port),
    };
    if is_flow {
        Line::Flow(readable)
    } else {
        Line::Drop(readable)
    }
}

/// A monitor's request, resolved against the node's Services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// `monitor::WANT_*` bits.
    pub wants: u32,
    pub address: Option<IpAddr>,
    pub port: Option<u16>,
    /// The frontends (address, port) of the Service asked for.
    pub frontends: Option<BTreeSet<([u8; 4], u16)>>,
}

impl Filter {
    /// `request` with its Service resolved through `names` (frontend -> Service port
    /// name); refused with a reason when the Service has no frontend on this node.
    pub fn new(request: &Request, names: &ServiceNames) -> Result<Self, String> {
        let frontends = match &request.service {
            None => None,
            Some(service) => {
                if service.split('/').count() != 2 || service.contains(':') {
                    return Err(format!(
                        "{service:?} is not NAMESPACE/NAME (a Service, not one of its ports)"
                    ));
                }
                let port_prefix = format!("{service}:");
                let found: BTreeSet<_> = names
                    .iter()
                    .filter(|(_, name)| name.starts_with(&port_prefix))
                    .map(|(frontend, _)| *frontend)
                    .collect();
                if found.is_empty() {
                    return Err(format!(
                        "no Service {service} on this node (not synced, or no frontend)"
                    ));
                }
                Some(found)
            }
        };
        Ok(Self {
            wants: request.kind.wants(),
            address: request.address,
            port: request.port,
            frontends,
        })
    }

    pub fn matches(&self, event: &MonitorEvent) -> bool {
        let wanted = match event.kind {
            monitor::KIND_DROP => monitor::WANT_DROPS,
            monitor::KIND_FLOW => monitor::WANT_FLOWS,
            _ => 0,
        };
        let is_flow = event.kind == monitor::KIND_FLOW;
        let address_ok = self.address.is_none_or(|a| {
            let seen = |address| address_of(event, address) == a;
            seen(event.saddr) || seen(event.daddr) || (is_flow && seen(event.backend_address))
        });
        let port_ok = self.port.is_none_or(|p| {
            event.sport == p || event.dport == p || (is_flow && event.backend_port == p)
        });
        let service_ok = self.frontends.as_ref().is_none_or(|frontends| {
            let frontend = |address, port| {
                ipv4_of(event, address).is_some_and(|a| frontends.contains(&(a, port)))
            };
            frontend(event.daddr, event.dport) || frontend(event.saddr, event.sport)
        });
        self.wants & wanted != 0 && address_ok && port_ok && service_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_common::PROTO_TCP;

    /// An IPv4 address as events hold it.
    fn v4(address: [u8; 4]) -> [u8; 16] {
        let mut wide = [0; 16];
        wide[..4].copy_from_slice(&address);
        wide
    }

    fn drop_event() -> MonitorEvent {
        MonitorEvent {
            time_ns: 5,
            kind: monitor::KIND_DROP,
            program: monitor::program_index(ferrite_common::program_names::FROM_POD),
            proto: PROTO_TCP,
            reason: stat::DROP_SPOOFED,
            ifindex: 7,
            len: 60,
            family: monitor::FAMILY_IPV4,
            saddr: v4([10, 244, 0, 99]),
            daddr: v4([10, 96, 0, 10]),
            sport: 40000,
            dport: 80,
            ..Default::default()
        }
    }

    fn flow_event() -> MonitorEvent {
        MonitorEvent {
            kind: monitor::KIND_FLOW,
            reason: stat::SERVICE_NEW_FLOW,
            saddr: v4([10, 244, 0, 2]),
            backend_address: v4([10, 244, 1, 5]),
            backend_port: 8080,
            ..drop_event()
        }
    }

    fn names() -> ServiceNames {
        [
            (([10, 96, 0, 10], 80), "default/web:http".to_string()),
            (([10, 96, 0, 10], 443), "default/web:https".to_string()),
            (([10, 96, 0, 11], 80), "default/web2:http".to_string()),
        ]
        .into()
    }

    #[test]
    fn events_read_with_names_and_the_service_of_their_frontend() {
        let pods = PodNames::from([([10, 244, 0, 99], "default/client".to_string())]);
        let line = describe(&drop_event(), &names(), &pods);
        let expected = Event {
            time_ns: 5,
            reason: "drop_spoofed".into(),
            program: "ferrite_from_pod".into(),
            ifindex: 7,
            interface: None,
            protocol: "tcp".into(),
            source: Ipv4Addr::new(10, 244, 0, 99).into(),
            source_port: 40000,
            destination: Ipv4Addr::new(10, 96, 0, 10).into(),
            destination_port: 80,
            bytes: 60,
            service: Some("default/web:http".into()),
            source_pod: Some("default/client".into()),
            destination_pod: None,
            backend: None,
            backend_port: None,
        };
        assert_eq!(line, Line::Drop(expected.clone()));
        let Line::Flow(flow) = describe(&flow_event(), &names(), &PodNames::new()) else {
            panic!("a flow")
        };
        assert_eq!(flow.backend, Some(Ipv4Addr::new(10, 244, 1, 5).into()));
        assert_eq!(flow.backend_port, Some(8080));
        // Indexes a newer datapath may use are shown, not trusted.
        let odd = MonitorEvent {
            reason: 200,
            program: 99,
            proto: 1,
            ..drop_event()
        };
        let Line::Drop(odd) = describe(&odd, &ServiceNames::new(), &PodNames::new()) else {
            panic!("a drop")
        };
        assert_eq!(
            (
                odd.reason.as_str(),
                odd.program.as_str(),
                odd.protocol.as_str()
            ),
            ("unknown (200)", "unknown (99)", "1")
        );
    }

    #[test]
    fn lines_round_trip_through_json_one_object_each() {
        let line = describe(&flow_event(), &names(), &PodNames::new());
        let json = serde_json::to_string(&line).unwrap();
        assert!(json.starts_with(r#"{"type":"flow","#), "{json}");
        assert!(!json.contains('\n'));
        assert_eq!(serde_json::from_str::<Line>(&json).unwrap(), line);
        let missed = serde_json::to_string(&Line::Missed { count: 3 }).unwrap();
        assert_eq!(missed, r#"{"type":"missed","count":3}"#);
    }

    #[test]
    fn records_of_another_size_are_not_events() {
        assert_eq!(
            decode(&[0; 56]),
            None,
            "the IPv4-only events of older datapaths"
        );
        let event = drop_event();
        // SAFETY: MonitorEvent is plain integers without implicit padding.
        let bytes: [u8; 88] = unsafe { std::mem::transmute(event) };
        assert_eq!(decode(&bytes), Some(event));
    }

    #[test]
    fn filters_match_kind_address_port_and_service_on_either_side() {
        let all = |request: Request| Filter::new(&request, &names()).unwrap();
        let drop = drop_event();
        let flow = flow_event();
        let drops = all(Request::default());
        assert!(drops.matches(&drop) && !drops.matches(&flow));
        let flows = all(Request {
            kind: Kind::Flow,
            ..Default::default()
        });
        assert!(!flows.matches(&drop) && flows.matches(&flow));
        let everything = |r: Request| {
            all(Request {
                kind: Kind::All,
                ..r
            })
        };
        let by_address = |a: [u8; 4]| {
            everything(Request {
                address: Some(Ipv4Addr::from(a).into()),
                ..Default::default()
            })
        };
        assert!(by_address([10, 244, 0, 99]).matches(&drop));
        assert!(by_address([10, 96, 0, 10]).matches(&drop));
        assert!(!by_address([10, 244, 1, 5]).matches(&drop));
        assert!(by_address([10, 244, 1, 5]).matches(&flow), "the backend");
        let by_port = |p: u16| {
            everything(Request {
                port: Some(p),
                ..Default::default()
            })
        };
        assert!(by_port(40000).matches(&drop) && by_port(80).matches(&drop));
        assert!(!by_port(8080).matches(&drop) && by_port(8080).matches(&flow));
        let web = everything(Request {
            service: Some("default/web".into()),
            ..Default::default()
        });
        assert_eq!(web.frontends.as_ref().map(BTreeSet::len), Some(2));
        assert!(web.matches(&drop));
        let other = MonitorEvent {
            daddr: v4([10, 96, 0, 11]),
            ..drop
        };
        assert!(!web.matches(&other), "default/web2 is another Service");
    }

    fn ipv6_flow() -> MonitorEvent {
        MonitorEvent {
            family: monitor::FAMILY_IPV6,
            saddr: "fd00:10:244::2".parse::<Ipv6Addr>().unwrap().octets(),
            daddr: "fd00:10:96::a".parse::<Ipv6Addr>().unwrap().octets(),
            backend_address: "fd00:10:244:1::5".parse::<Ipv6Addr>().unwrap().octets(),
            ..flow_event()
        }
    }

    #[test]
    fn ipv6_events_read_and_filter_by_their_ipv6_addresses() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        // An IPv6 address whose first 4 bytes spell a known IPv4 frontend or pod is
        // neither.
        let mut event = ipv6_flow();
        event.daddr[..4].copy_from_slice(&[10, 96, 0, 10]);
        let pods = PodNames::from([([253, 0, 0, 16], "default/client".to_string())]);
        let Line::Flow(flow) = describe(&event, &names(), &pods) else {
            panic!("a flow")
        };
        assert_eq!(
            (flow.source, flow.destination, flow.backend),
            (
                ip("fd00:10:244::2"),
                ip("a60:a:96::a"),
                Some(ip("fd00:10:244:1::5"))
            )
        );
        assert_eq!((&flow.service, &flow.source_pod), (&None, &None));
        let json = serde_json::to_string(&Line::Flow(flow.clone())).unwrap();
        assert!(json.contains(r#""source":"fd00:10:244::2""#), "{json}");
        assert_eq!(
            serde_json::from_str::<Line>(&json).unwrap(),
            Line::Flow(flow)
        );

        let by_address = |a: &str| {
            Filter::new(
                &Request {
                    kind: Kind::All,
                    address: Some(ip(a)),
                    ..Default::default()
                },
                &names(),
            )
            .unwrap()
        };
        let event = ipv6_flow();
        assert!(by_address("fd00:10:244::2").matches(&event));
        assert!(by_address("fd00:10:96::a").matches(&event));
        assert!(
            by_address("fd00:10:244:1::5").matches(&event),
            "the backend"
        );
        assert!(!by_address("fd00:10:244::3").matches(&event));
        // IPv4 filters and events do not match the other family's bytes.
        assert!(!by_address("253.0.0.16").matches(&event));
        assert!(!by_address("::").matches(&drop_event()));
        assert!(by_address("10.244.0.99").matches(&drop_event()));
        // A request naming an IPv6 address reads as the agent expects.
        assert_eq!(
            parse_incoming(r#"{"kind":"all","address":"fd00::1"}"#),
            Ok(Incoming::Monitor(Request {
                kind: Kind::All,
                address: Some(ip("fd00::1")),
                ..Request::default()
            }))
        );
    }

    #[test]
    fn a_service_unknown_here_or_not_namespace_slash_name_is_refused_with_a_reason() {
        for (service, reason) in [
            ("default/missing", "no Service default/missing"),
            ("web", "not NAMESPACE/NAME"),
            ("default/web:http", "not NAMESPACE/NAME"),
        ] {
            let request = Request {
                service: Some(service.into()),
                ..Default::default()
            };
            let refused = Filter::new(&request, &names()).unwrap_err();
            assert!(refused.contains(reason), "{service}: {refused}");
        }
    }

    #[test]
    fn a_first_line_with_a_query_is_a_query_and_any_other_a_monitor_request() {
        let query = serde_json::to_string(&QueryLine {
            query: Query::PodAddress { pod: "x/a".into() },
        })
        .unwrap();
        assert_eq!(
            parse_incoming(&query),
            Ok(Incoming::Query(Query::PodAddress { pod: "x/a".into() }))
        );
        // Monitors' requests read as before.
        assert_eq!(
            parse_incoming(r#"{"kind":"drop","port":80}"#),
            Ok(Incoming::Monitor(Request {
                port: Some(80),
                ..Request::default()
            }))
        );
        // A query of a newer tool is refused with a reason, not taken for a monitor.
        let newer = parse_incoming(r#"{"query":{"pod_routes":{}}}"#).unwrap_err();
        assert!(newer.contains("not a query this agent knows"), "{newer}");
        assert!(parse_incoming("not json").is_err());
    }

    #[test]
    fn an_agent_without_a_synced_model_or_a_bad_name_answers_an_error_line() {
        let query = Query::PodAddress { pod: "x/a".into() };
        let Answer::Error { message } = answer(&query, None) else {
            panic!("an error")
        };
        assert!(message.contains("no synced model"), "{message}");
        // The error line of an answer is the error line of a refused request: a tool
        // asking an older agent reads its refusal.
        let refusal = serde_json::to_string(&Line::Error {
            message: "m".into(),
        })
        .unwrap();
        assert_eq!(
            serde_json::from_str::<Answer>(&refusal).unwrap(),
            Answer::Error {
                message: "m".into()
            }
        );
        let (context, _) =
            crate::model::NodeContext::new("node-a", &crate::limits::Limits::default(), &[], None);
        let index = crate::model::policy::PolicyIndex::build(&[], &[], &[], &context, &mut vec![]);
        let empty: crate::plan::SharedPolicy = std::sync::Arc::new(std::sync::RwLock::new(index));
        for pod in ["x", "x/a/b"] {
            let query = Query::PodAddress { pod: pod.into() };
            assert!(
                matches!(answer(&query, Some(&empty)), Answer::Error { .. }),
                "{pod}"
            );
        }
        assert_eq!(
            answer(&query, Some(&empty)),
            Answer::PodAddress {
                address: PodAddress::Unknown
            }
        );
        let policies = Query::PodPolicies {
            address: Ipv4Addr::new(10, 244, 0, 2),
        };
        assert_eq!(
            answer(&policies, Some(&empty)),
            Answer::PodPolicies { sources: None }
        );
    }
}
