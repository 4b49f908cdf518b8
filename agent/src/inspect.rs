//! `ferrite inspect`: readable tables straight from a node's pinned maps, so they
//! work whether or not the agent runs.
use std::{fmt::Write, net::Ipv4Addr};

use anyhow::Result;
use ferrite_common::{stat, CT_FLAG_CLOSING, CT_FLAG_REPLY};

use crate::{maps::NodeMaps, model::Protocol, plan::describe_service_key};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Table {
    Services,
    Backends,
    Endpoints,
    Conntrack,
    Stats,
    Routes,
    /// Writes a sync would make now (needs the objects: --config or the API).
    Diff,
}

/// `inspect diff`: one line per entry that differs from the desired state.
pub fn render_diff(writes: &[crate::plan::Op]) -> String {
    if writes.is_empty() {
        return "no drift: the maps hold exactly the desired state\n".into();
    }
    let mut out = format!("{} entries differ from the desired state:\n", writes.len());
    for op in writes {
        let _ = writeln!(out, "  {}", crate::maps::describe_op(op));
    }
    out
}

fn protocol_name(number: u8) -> String {
    Protocol::from_number(number)
        .map(|p| p.to_string())
        .unwrap_or_else(|| number.to_string())
}

fn mac(bytes: [u8; 6]) -> String {
    bytes.map(|b| format!("{b:02x}")).join(":")
}

pub fn render(maps: &NodeMaps, table: Table) -> Result<String> {
    let contents = maps.contents_without_maglev()?;
    let mut out = String::new();
    match table {
        Table::Services => {
            writeln!(
                out,
                "{:<24} {:>7} {:>8}  BACKENDS",
                "FRONTEND", "REV-NAT", "COUNT"
            )?;
            for (key, value) in contents
                .services
                .iter()
                .filter(|(k, _)| k.backend_slot == 0)
            {
                let backends: Vec<String> = (1..=value.count)
                    .filter_map(|slot| {
                        let slot_key = ferrite_common::ServiceKey {
                            backend_slot: slot,
                            ..*key
                        };
                        let id = contents.services.get(&slot_key)?.backend_id;
                        let b = contents.backends.get(&id)?;
                        Some(format!("{}:{}", Ipv4Addr::from(b.address), b.port))
                    })
                    .collect();
                writeln!(
                    out,
                    "{:<24} {:>7} {:>8}  {}",
                    describe_service_key(key),
                    value.rev_nat_index,
                    value.count,
                    backends.join(", ")
                )?;
            }
        }
        Table::Backends => {
            writeln!(out, "{:>6}  BACKEND", "ID")?;
            for (id, b) in &contents.backends {
                writeln!(
                    out,
                    "{id:>6}  {}:{}/{}",
                    Ipv4Addr::from(b.address),
                    b.port,
                    protocol_name(b.proto)
                )?;
            }
        }
        Table::Endpoints => {
            writeln!(
                out,
                "{:<16} {:>8}  {:<18} {:<18}",
                "POD IP", "IFINDEX", "POD MAC", "GATEWAY MAC"
            )?;
            for (key, e) in &contents.endpoints {
                writeln!(
                    out,
                    "{:<16} {:>8}  {:<18} {:<18}",
                    Ipv4Addr::from(key.address).to_string(),
                    e.ifindex,
                    mac(e.pod_mac),
                    mac(e.host_mac)
                )?;
            }
        }
        Table::Conntrack => {
            writeln!(
                out,
                "{:<7} {:<5} {:<22} {:<22} {:>7} {:>7} {:>9}  STATE",
                "DIR", "PROTO", "SOURCE", "DESTINATION", "BACKEND", "REV-NAT", "PACKETS"
            )?;
            let mut entries = maps.conntrack_entries()?;
            entries.sort_by_key(|(k, _)| *k);
            for (k, v) in entries {
                writeln!(
                    out,
                    "{:<7} {:<5} {:<22} {:<22} {:>7} {:>7} {:>9}  {}",
                    if v.flags & CT_FLAG_REPLY == 0 {
                        "forward"
                    } else {
                        "reply"
                    },
                    protocol_name(k.proto),
                    format!("{}:{}", Ipv4Addr::from(k.saddr), k.sport),
                    format!("{}:{}", Ipv4Addr::from(k.daddr), k.dport),
                    v.backend_id,
                    v.rev_nat_index,
                    v.packets,
                    if v.flags & CT_FLAG_CLOSING != 0 {
                        "closing"
                    } else {
                        "open"
                    }
                )?;
            }
        }
        Table::Diff => anyhow::bail!("`diff` needs the objects: see `ferrite inspect --help`"),
        Table::Routes => {
            writeln!(
                out,
                "{:<20} {:<16} {:<18} KIND",
                "DESTINATION", "NODE IP", "VTEP MAC"
            )?;
            for (key, route) in &contents.routes {
                let kind = if route.flags & ferrite_common::ROUTE_LOCAL != 0 {
                    "local"
                } else if route.flags & ferrite_common::ROUTE_NODE != 0 {
                    "node (NodePort replies via overlay)"
                } else {
                    "overlay"
                };
                writeln!(
                    out,
                    "{:<20} {:<16} {:<18} {kind}",
                    format!("{}/{}", Ipv4Addr::from(key.network), key.prefix_len),
                    Ipv4Addr::from(route.node_ip).to_string(),
                    mac(route.vtep_mac)
                )?;
            }
        }
        Table::Stats => {
            writeln!(out, "{:<22} {:>12} {:>14}", "COUNTER", "PACKETS", "BYTES")?;
            for (index, counter) in maps.counters()?.iter().enumerate() {
                writeln!(
                    out,
                    "{:<22} {:>12} {:>14}",
                    stat::NAMES[index],
                    counter.packets,
                    counter.bytes
                )?;
            }
        }
    }
    Ok(out)
}
