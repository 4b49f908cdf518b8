//! `ferrite inspect`: a node's datapath state straight from its pinned maps, so it
//! works whether or not the agent runs. Each table's rows are built once, then
//! rendered as aligned text for people or as JSON for scripts (`-o json`): both views
//! show the same fields.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use ferrite_common::{
    stat, CT_FLAG_CLOSING, CT_FLAG_REPLY, CT_FLAG_UNESTABLISHED, CT_FLAG_VIA_STACK, ROUTE_LOCAL,
    ROUTE_NATIVE, ROUTE_NODE,
};
use serde::Serialize;

mod policy;

pub use policy::{parse_pod, PodChoice};

use crate::{
    maps::{describe_op, NodeMaps},
    model::Protocol,
    plan::{op_map, LbFamily, MapContents, Op},
};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Table {
    Services,
    Backends,
    Endpoints,
    Conntrack,
    Stats,
    Routes,
    /// NetworkPolicy: each isolated pod's allowed peers, protocols and ports, and
    /// the policies they come from (`--pod ADDRESS` or `--pod NAMESPACE/NAME` for
    /// one pod).
    Policy,
    /// Writes a sync would make now (needs the objects: --config or the API).
    Diff,
}

/// How a table is printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns with a header line.
    #[default]
    Table,
    /// A JSON array of objects, one per row, with the same fields.
    Json,
}

/// Family `A`'s Service frontends, each with its ready backends.
fn service_rows<A: LbFamily>(contents: &MapContents) -> Vec<ServiceRow> {
    let services = A::services(contents);
    services
        .iter()
        .filter(|(k, _)| A::slot(k) == 0)
        .map(|(key, value)| {
            let (address, port, proto) = A::frontend_of(key);
            ServiceRow {
                frontend: A::describe(key),
                address,
                port,
                protocol: protocol_name(proto),
                rev_nat_index: value.rev_nat_index,
                count: value.count,
                backends: (1..=value.count)
                    .filter_map(|slot| {
                        let id = services.get(&A::at(key, A::scope(key), slot))?.backend_id;
                        let (address, port, _) = A::backend_of(A::backends(contents).get(&id)?);
                        Some(BackendRef { id, address, port })
                    })
                    .collect(),
            }
        })
        .collect()
}

/// Family `A`'s backends by id.
fn backend_rows<A: LbFamily>(contents: &MapContents) -> Vec<BackendRow> {
    A::backends(contents)
        .iter()
        .map(|(id, backend)| {
            let (address, port, proto) = A::backend_of(backend);
            BackendRow {
                id: *id,
                address,
                port,
                protocol: protocol_name(proto),
            }
        })
        .collect()
}

/// A row of one of the tables: its fields for JSON, its cells for text.
trait Row: Serialize {
    const HEADER: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

#[derive(Serialize)]
struct BackendRef {
    id: u32,
    address: IpAddr,
    port: u16,
}

#[derive(Serialize)]
struct ServiceRow {
    frontend: String,
    address: IpAddr,
    port: u16,
    protocol: String,
    rev_nat_index: u32,
    count: u16,
    backends: Vec<BackendRef>,
}

impl Row for ServiceRow {
    const HEADER: &'static [&'static str] = &["FRONTEND", "REV-NAT", "COUNT", "BACKENDS"];
    fn cells(&self) -> Vec<String> {
        let backends: Vec<String> = self
            .backends
            .iter()
            .map(|b| std::net::SocketAddr::new(b.address, b.port).to_string())
            .collect();
        vec![
            self.frontend.clone(),
            self.rev_nat_index.to_string(),
            self.count.to_string(),
            backends.join(", "),
        ]
    }
}

#[derive(Serialize)]
struct BackendRow {
    id: u32,
    address: IpAddr,
    port: u16,
    protocol: String,
}

impl Row for BackendRow {
    const HEADER: &'static [&'static str] = &["ID", "BACKEND"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            format!(
                "{}/{}",
                std::net::SocketAddr::new(self.address, self.port),
                self.protocol
            ),
        ]
    }
}

#[derive(Serialize)]
struct EndpointRow {
    /// IPv4 (`ferrite_endpnt`) or IPv6 (`ferrite_endpnt6`).
    pod_ip: IpAddr,
    ifindex: u32,
    pod_mac: String,
    gateway_mac: String,
    /// `agent` (for a Pod object: goes with it) or `cni` (for a pod the agent had
    /// not heard of: stays while its interface lives).
    written_by: &'static str,
}

impl Row for EndpointRow {
    const HEADER: &'static [&'static str] =
        &["POD IP", "IFINDEX", "POD MAC", "GATEWAY MAC", "WRITTEN BY"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.pod_ip.to_string(),
            self.ifindex.to_string(),
            self.pod_mac.clone(),
            self.gateway_mac.clone(),
            self.written_by.to_string(),
        ]
    }
}

#[derive(Serialize)]
struct ConntrackRow {
    direction: &'static str,
    protocol: String,
    source: String,
    destination: String,
    backend_id: u32,
    rev_nat_index: u32,
    packets: u64,
    bytes: u64,
    state: &'static str,
}

impl Row for ConntrackRow {
    const HEADER: &'static [&'static str] = &[
        "DIR",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "BACKEND",
        "REV-NAT",
        "PACKETS",
        "STATE",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.direction.into(),
            self.protocol.clone(),
            self.source.clone(),
            self.destination.clone(),
            self.backend_id.to_string(),
            self.rev_nat_index.to_string(),
            self.packets.to_string(),
            self.state.into(),
        ]
    }
}

#[derive(Serialize)]
struct RouteRow {
    destination: String,
    node_ip: Ipv4Addr,
    vtep_mac: String,
    kind: &'static str,
}

impl Row for RouteRow {
    const HEADER: &'static [&'static str] = &["DESTINATION", "NODE IP", "VTEP MAC", "KIND"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.destination.clone(),
            self.node_ip.to_string(),
            self.vtep_mac.clone(),
            self.kind.into(),
        ]
    }
}

#[derive(Serialize)]
struct StatRow {
    counter: &'static str,
    packets: u64,
    bytes: u64,
}

impl Row for StatRow {
    const HEADER: &'static [&'static str] = &["COUNTER", "PACKETS", "BYTES"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.counter.into(),
            self.packets.to_string(),
            self.bytes.to_string(),
        ]
    }
}

/// One write a sync would make.
#[derive(Serialize)]
struct DiffRow {
    map: &'static str,
    action: &'static str,
    description: String,
}

fn protocol_name(number: u8) -> String {
    Protocol::from_number(number)
        .map(|p| p.to_string())
        .unwrap_or_else(|| number.to_string())
}

fn mac(bytes: [u8; 6]) -> String {
    bytes.map(|b| format!("{b:02x}")).join(":")
}

/// Columns padded to their widest cell, two spaces apart; the last is not padded.
fn text<R: Row>(rows: &[R]) -> String {
    let lines: Vec<Vec<String>> =
        std::iter::once(R::HEADER.iter().map(|h| h.to_string()).collect())
            .chain(rows.iter().map(Row::cells))
            .collect();
    let mut widths = vec![0; R::HEADER.len()];
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in lines {
        let last = line.len().saturating_sub(1);
        for (column, cell) in line.iter().enumerate() {
            if column == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[column]));
            }
        }
        out.push('\n');
    }
    out
}

fn json<R: Serialize>(rows: &[R]) -> Result<String> {
    Ok(serde_json::to_string_pretty(rows)? + "\n")
}

fn show<R: Row>(rows: &[R], output: Output) -> Result<String> {
    match output {
        Output::Table => Ok(text(rows)),
        Output::Json => json(rows),
    }
}

/// `inspect diff`: the writes a sync would make now, one per entry that differs
/// from the desired state.
pub fn render_diff(writes: &[Op], output: Output) -> Result<String> {
    let rows: Vec<DiffRow> = writes
        .iter()
        .map(|op| DiffRow {
            map: op_map(op),
            action: op_action(op),
            description: describe_op(op),
        })
        .collect();
    if output == Output::Json {
        return json(&rows);
    }
    if rows.is_empty() {
        return Ok("no drift: the maps hold exactly the desired state\n".into());
    }
    let mut out = format!("{} entries differ from the desired state:\n", rows.len());
    for row in rows {
        out.push_str(&format!("  {}\n", row.description));
    }
    Ok(out)
}

fn op_action(op: &Op) -> &'static str {
    if op.removes() {
        "remove"
    } else {
        "write"
    }
}

/// Both families' endpoints: IPv4's, then IPv6's.
fn endpoint_rows(contents: &crate::plan::MapContents) -> Vec<EndpointRow> {
    let v4 = contents
        .endpoints
        .iter()
        .map(|(key, e)| (IpAddr::from(Ipv4Addr::from(key.address)), e));
    let v6 = contents
        .endpoints6
        .iter()
        .map(|(key, e)| (IpAddr::from(Ipv6Addr::from(key.address)), e));
    v4.chain(v6)
        .map(|(pod_ip, e)| EndpointRow {
            pod_ip,
            ifindex: e.ifindex,
            pod_mac: mac(e.pod_mac),
            gateway_mac: mac(e.host_mac),
            written_by: if e.flags & ferrite_common::endpoint_flag::FROM_POD_OBJECT != 0 {
                "agent"
            } else {
                "cni"
            },
        })
        .collect()
}

pub fn render(maps: &NodeMaps, table: Table, output: Output) -> Result<String> {
    let no_names = crate::model::policy::NoPolicyNames("not asked".into());
    render_for_pod(maps, table, output, None, &no_names)
}

/// [`render`], the `policy` table limited to the pod `pod` and naming policies as
/// `names` (the node's agent) tells. A note on names missing ends the table (goes
/// to stderr with JSON, which stays an array of rows).
pub fn render_for_pod(
    maps: &NodeMaps,
    table: Table,
    output: Output,
    pod: Option<&PodChoice>,
    names: &dyn crate::model::policy::PolicyNames,
) -> Result<String> {
    let pod = pod
        .map(|choice| policy::resolve(choice, names))
        .transpose()?;
    let contents = maps.contents_without_maglev()?;
    match table {
        Table::Policy => {
            let (rows, note) = policy::rows(&contents, pod, names);
            let mut shown = show(&rows, output)?;
            match (note, output) {
                (Some(note), Output::Table) => shown.push_str(&format!("{note}\n")),
                (Some(note), Output::Json) => eprintln!("{note}"),
                (None, _) => {}
            }
            Ok(shown)
        }
        // IPv6 Services (the lb6 maps) after the IPv4 ones.
        Table::Services => {
            let mut rows = service_rows::<Ipv4Addr>(&contents);
            rows.extend(service_rows::<Ipv6Addr>(&contents));
            show(&rows, output)
        }
        Table::Backends => {
            let mut rows = backend_rows::<Ipv4Addr>(&contents);
            rows.extend(backend_rows::<Ipv6Addr>(&contents));
            show(&rows, output)
        }
        Table::Endpoints => show(&endpoint_rows(&contents), output),
        Table::Conntrack => {
            let mut entries = maps.conntrack_entries()?;
            entries.sort_by_key(|(k, _)| *k);
            let rows: Vec<ConntrackRow> = entries
                .into_iter()
                .map(|(k, v)| ConntrackRow {
                    direction: if v.flags & CT_FLAG_VIA_STACK != 0 {
                        "via stack"
                    } else if v.flags & CT_FLAG_REPLY == 0 {
                        "forward"
                    } else {
                        "reply"
                    },
                    protocol: protocol_name(k.proto),
                    source: format!("{}:{}", Ipv4Addr::from(k.saddr), k.sport),
                    destination: format!("{}:{}", Ipv4Addr::from(k.daddr), k.dport),
                    backend_id: v.backend_id,
                    rev_nat_index: v.rev_nat_index,
                    packets: v.packets,
                    bytes: v.bytes,
                    state: if v.flags & CT_FLAG_CLOSING != 0 {
                        "closing"
                    } else if v.flags & CT_FLAG_UNESTABLISHED != 0 {
                        "handshake"
                    } else {
                        "open"
                    },
                })
                .collect();
            show(&rows, output)
        }
        Table::Diff => anyhow::bail!("`diff` needs the objects: see `ferrite inspect --help`"),
        Table::Routes => {
            let destinations = contents.routes.iter().map(|(key, route)| {
                let destination = format!("{}/{}", Ipv4Addr::from(key.network), key.prefix_len);
                (destination, route)
            });
            // IPv6 pod CIDRs and other nodes' IPv6 addresses (`ferrite_routes6`) after
            // the IPv4 ones.
            let destinations6 = contents.routes6.iter().map(|(key, route)| {
                let network = std::net::Ipv6Addr::from(key.network);
                (format!("{network}/{}", key.prefix_len), route)
            });
            let rows: Vec<RouteRow> = destinations
                .chain(destinations6)
                .map(|(destination, route)| RouteRow {
                    destination,
                    node_ip: Ipv4Addr::from(route.node_ip),
                    vtep_mac: mac(route.vtep_mac),
                    kind: if route.flags & ROUTE_LOCAL != 0 {
                        "local"
                    } else if route.flags & (ROUTE_NODE | ROUTE_NATIVE) == ROUTE_NODE | ROUTE_NATIVE
                    {
                        "node (NodePort replies natively)"
                    } else if route.flags & ROUTE_NODE != 0 {
                        "node (NodePort replies via overlay)"
                    } else if route.flags & ROUTE_NATIVE != 0 {
                        "native"
                    } else {
                        "overlay"
                    },
                })
                .collect();
            show(&rows, output)
        }
        Table::Stats => {
            let rows: Vec<StatRow> = maps
                .counters()?
                .iter()
                .enumerate()
                .map(|(index, counter)| StatRow {
                    counter: stat::NAMES[index],
                    packets: counter.packets,
                    bytes: counter.bytes,
                })
                .collect();
            show(&rows, output)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> Vec<StatRow> {
        vec![
            StatRow {
                counter: "drop_spoofed",
                packets: 3,
                bytes: 126,
            },
            StatRow {
                counter: "service_new",
                packets: 12345,
                bytes: 7,
            },
        ]
    }

    #[test]
    fn text_pads_each_column_to_its_widest_cell_under_one_header() {
        let shown = text(&stats());
        assert_eq!(
            shown,
            "COUNTER       PACKETS  BYTES\n\
             drop_spoofed  3        126\n\
             service_new   12345    7\n"
        );
    }

    #[test]
    fn json_holds_the_same_rows_with_named_fields() -> Result<()> {
        let parsed: serde_json::Value = serde_json::from_str(&json(&stats())?)?;
        assert_eq!(
            parsed,
            serde_json::json!([
                {"counter": "drop_spoofed", "packets": 3, "bytes": 126},
                {"counter": "service_new", "packets": 12345, "bytes": 7},
            ])
        );
        Ok(())
    }

    #[test]
    fn services_of_both_families_show_their_backends_as_addresses_in_text_and_json() -> Result<()> {
        use ferrite_common::{Backend, Backend6, Service6Key, ServiceKey, ServiceValue, PROTO_TCP};
        let master = |count, rev_nat_index| ServiceValue {
            count,
            rev_nat_index,
            ..ServiceValue::default()
        };
        let slot = |backend_id| ServiceValue {
            backend_id,
            ..ServiceValue::default()
        };
        let vip = ServiceKey::new(Ipv4Addr::new(10, 96, 0, 10), 80, PROTO_TCP, 0);
        let vip6_address: Ipv6Addr = "fd00:10:96::10".parse()?;
        let vip6 = Service6Key::new(vip6_address.octets(), 80, PROTO_TCP, 0);
        let backend = |address, port| Backend {
            address,
            port,
            proto: PROTO_TCP,
            flags: 0,
        };
        let contents = MapContents {
            services: [
                (vip, master(2, 1)),
                (
                    ServiceKey {
                        backend_slot: 1,
                        ..vip
                    },
                    slot(4),
                ),
                (
                    ServiceKey {
                        backend_slot: 2,
                        ..vip
                    },
                    slot(9),
                ),
            ]
            .into(),
            backends: [
                (4, backend([10, 244, 0, 2], 8080)),
                (9, backend([10, 244, 1, 3], 8080)),
            ]
            .into(),
            services6: [
                (vip6, master(1, 2)),
                (
                    Service6Key {
                        backend_slot: 1,
                        ..vip6
                    },
                    slot(10),
                ),
            ]
            .into(),
            backends6: [(
                10,
                Backend6 {
                    address: "fd00:10:244::2".parse::<Ipv6Addr>()?.octets(),
                    port: 8080,
                    proto: PROTO_TCP,
                    flags: 0,
                },
            )]
            .into(),
            ..MapContents::default()
        };
        let mut rows = service_rows::<Ipv4Addr>(&contents);
        rows.extend(service_rows::<Ipv6Addr>(&contents));
        let shown = text(&rows);
        let lines: Vec<&str> = shown.lines().collect();
        assert!(
            lines[1].starts_with("10.96.0.10:80/TCP")
                && lines[1].ends_with("10.244.0.2:8080, 10.244.1.3:8080"),
            "{shown}"
        );
        assert!(
            lines[2].starts_with("[fd00:10:96::10]:80/TCP")
                && lines[2].ends_with("[fd00:10:244::2]:8080"),
            "{shown}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&json(&rows)?)?;
        assert_eq!(parsed[0]["address"], "10.96.0.10");
        assert_eq!(parsed[0]["backends"][1]["address"], "10.244.1.3");
        assert_eq!(parsed[0]["backends"][1]["id"], 9);
        assert_eq!(parsed[1]["address"], "fd00:10:96::10");
        assert_eq!(parsed[1]["backends"][0]["address"], "fd00:10:244::2");
        let mut backends = backend_rows::<Ipv4Addr>(&contents);
        backends.extend(backend_rows::<Ipv6Addr>(&contents));
        assert!(
            text(&backends).contains("[fd00:10:244::2]:8080/TCP"),
            "{}",
            text(&backends)
        );
        Ok(())
    }

    #[test]
    fn endpoints_list_both_families_each_as_written() -> Result<()> {
        use ferrite_common::{endpoint_flag::FROM_POD_OBJECT, Endpoint6Key, EndpointInfo};
        let entry = |flags| EndpointInfo {
            ifindex: 7,
            pod_mac: [2, 0, 0, 0, 0, 5],
            host_mac: [2, 0, 0, 0, 0, 1],
            flags,
        };
        let mut contents = crate::plan::MapContents::default();
        contents.endpoints.insert(
            ferrite_common::EndpointKey {
                address: [10, 244, 0, 5],
            },
            entry(0),
        );
        let ip6: Ipv6Addr = "fd00:10:244::5".parse()?;
        contents.endpoints6.insert(
            Endpoint6Key {
                address: ip6.octets(),
            },
            entry(FROM_POD_OBJECT),
        );
        let rows = endpoint_rows(&contents);
        let shown = text(&rows);
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 3, "{shown}");
        assert!(
            lines[1].starts_with("10.244.0.5 ") && lines[1].ends_with("cni"),
            "{shown}"
        );
        assert!(
            lines[2].starts_with("fd00:10:244::5 ") && lines[2].ends_with("agent"),
            "{shown}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&json(&rows)?)?;
        assert_eq!(parsed[1]["pod_ip"], "fd00:10:244::5");
        assert_eq!(parsed[1]["ifindex"], 7);
        Ok(())
    }

    #[test]
    fn diff_says_no_drift_in_text_and_is_an_empty_array_in_json() -> Result<()> {
        assert!(render_diff(&[], Output::Table)?.starts_with("no drift"));
        assert_eq!(render_diff(&[], Output::Json)?.trim(), "[]");
        Ok(())
    }

    #[test]
    fn each_pending_write_names_its_map_and_action() -> Result<()> {
        let writes = [Op::DeleteBackend(7), Op::DeleteRevNat(2)];
        let shown = render_diff(&writes, Output::Table)?;
        assert!(shown.starts_with("2 entries differ"), "{shown}");
        assert!(shown.contains("removing backend 7"), "{shown}");
        let parsed: serde_json::Value = serde_json::from_str(&render_diff(&writes, Output::Json)?)?;
        assert_eq!(parsed[0]["map"], ferrite_common::map_names::BACKENDS);
        assert_eq!(parsed[0]["action"], "remove");
        assert_eq!(parsed[1]["map"], ferrite_common::map_names::REV_NAT);
        Ok(())
    }
}
