//! `ferrite inspect policy`: each policed pod's effective rules as the maps hold
//! them: its isolation (endpoint flags), and every allowed (direction, peer, protocol,
//! ports) with the address prefixes the peer's identity stands for on this node.
use std::{collections::BTreeMap, net::Ipv4Addr};

use ferrite_common::policy::{
    DIRECTION_INGRESS, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, IDENTITY_ANY,
    POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL,
};
use serde::Serialize;

use super::{protocol_name, Row};
use crate::plan::MapContents;

#[derive(Serialize)]
pub(super) struct PolicyRow {
    pod: Ipv4Addr,
    direction: &'static str,
    /// `allow`, or `deny all` for an isolated direction without any rule.
    verdict: &'static str,
    /// The peer's identity (`any`: every peer; empty for `deny all`).
    identity: String,
    /// The address prefixes of that identity on this node.
    peers: Vec<String>,
    protocol: String,
    ports: String,
}

impl Row for PolicyRow {
    const HEADER: &'static [&'static str] = &[
        "POD",
        "DIRECTION",
        "VERDICT",
        "IDENTITY",
        "PEERS",
        "PROTOCOL",
        "PORTS",
    ];
    fn cells(&self) -> Vec<String> {
        let mut peers = self.peers.iter().take(4).cloned().collect::<Vec<_>>();
        if self.peers.len() > 4 {
            peers.push(format!("+{} more", self.peers.len() - 4));
        }
        vec![
            self.pod.to_string(),
            self.direction.into(),
            self.verdict.into(),
            self.identity.clone(),
            peers.join(", "),
            self.protocol.clone(),
            self.ports.clone(),
        ]
    }
}

/// The rows of the pods `pod` selects (every policed pod if `None`).
pub(super) fn rows(contents: &MapContents, pod: Option<Ipv4Addr>) -> Vec<PolicyRow> {
    let mut prefixes_of: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (key, value) in &contents.ipcache {
        prefixes_of.entry(value.identity).or_default().push(format!(
            "{}/{}",
            Ipv4Addr::from(key.network),
            key.prefix_len
        ));
    }
    let mut rows = Vec::new();
    for (key, endpoint) in &contents.endpoints {
        let ip = Ipv4Addr::from(key.address);
        if pod.is_some_and(|p| p != ip) {
            continue;
        }
        for (direction, name, isolated) in [
            (DIRECTION_INGRESS, "ingress", ENDPOINT_INGRESS_ISOLATED),
            (
                ferrite_common::policy::DIRECTION_EGRESS,
                "egress",
                ENDPOINT_EGRESS_ISOLATED,
            ),
        ] {
            if endpoint.flags & isolated == 0 {
                continue;
            }
            let before = rows.len();
            for rule in contents
                .policy
                .keys()
                .filter(|r| r.key.endpoint == key.address && r.key.direction == direction)
            {
                let identity = u32::from_be_bytes(rule.key.identity);
                let (protocol, ports) = if rule.prefix_len <= POLICY_PREFIX_ANY_PROTOCOL {
                    ("any".to_string(), "any".to_string())
                } else if rule.prefix_len <= POLICY_PREFIX_ANY_PORT {
                    (protocol_name(rule.key.protocol), "any".to_string())
                } else {
                    let bits = (rule.prefix_len - POLICY_PREFIX_ANY_PORT).min(16);
                    let first = u16::from_be_bytes(rule.key.port);
                    let last = first | u16::MAX.checked_shr(bits).unwrap_or(0);
                    let ports = if first == last {
                        first.to_string()
                    } else {
                        format!("{first}-{last}")
                    };
                    (protocol_name(rule.key.protocol), ports)
                };
                rows.push(PolicyRow {
                    pod: ip,
                    direction: name,
                    verdict: "allow",
                    identity: if identity == IDENTITY_ANY {
                        "any".into()
                    } else {
                        identity.to_string()
                    },
                    peers: if identity == IDENTITY_ANY {
                        vec!["0.0.0.0/0".into()]
                    } else {
                        prefixes_of.get(&identity).cloned().unwrap_or_default()
                    },
                    protocol,
                    ports,
                });
            }
            if rows.len() == before {
                rows.push(PolicyRow {
                    pod: ip,
                    direction: name,
                    verdict: "deny all",
                    identity: String::new(),
                    peers: Vec::new(),
                    protocol: "-".into(),
                    ports: "-".into(),
                });
            }
        }
    }
    rows
}
