//! `ferrite inspect policy`: each policed pod's effective rules as the maps hold
//! them: its isolation (endpoint flags), and every allowed (direction, peer, protocol,
//! ports) with the address prefixes the peer's identity stands for on this node.
//! The maps know no names: the node's running agent names each pod and the
//! NetworkPolicies each rule comes from (from the model it wrote the maps from);
//! without it, the rows are the maps' alone, with a note.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::{bail, Result};
use ferrite_common::policy::{
    DIRECTION_INGRESS, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, IDENTITY_ANY,
    POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL,
};
use serde::Serialize;

use super::{protocol_name, Row};
use crate::{
    model::policy::{Direction, EndpointSources, PodAddress, PolicyNames},
    plan::{rules_of, MapContents, PolicyRule},
};

/// Which pod `--pod` means: its address, or `NAMESPACE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodChoice {
    Address(Ipv4Addr),
    Name { namespace: String, name: String },
}

/// `ADDRESS` or `NAMESPACE/NAME`.
pub fn parse_pod(value: &str) -> Result<PodChoice, String> {
    if let Ok(address) = value.parse() {
        return Ok(PodChoice::Address(address));
    }
    match value.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok(PodChoice::Name {
                namespace: namespace.into(),
                name: name.into(),
            })
        }
        _ => Err(format!(
            "{value:?} is neither a pod's IPv4 address nor NAMESPACE/NAME"
        )),
    }
}

/// The address of the pod `choice` means, on this node.
pub(super) fn resolve(choice: &PodChoice, names: &dyn PolicyNames) -> Result<Ipv4Addr> {
    let (namespace, name) = match choice {
        PodChoice::Address(address) => return Ok(*address),
        PodChoice::Name { namespace, name } => (namespace, name),
    };
    match names.pod_address(namespace, name) {
        Ok(PodAddress::Here(address)) => Ok(address),
        Ok(PodAddress::Elsewhere(address, node)) => bail!(
            "{namespace}/{name} ({address}) runs on node {}, not this one: inspect that node",
            node.as_deref().unwrap_or("(not scheduled)")
        ),
        Ok(PodAddress::Unknown) => bail!(
            "the agent knows no pod {namespace}/{name} with an address policies see (not \
             running yet, finished, or on the host's network: never policed)"
        ),
        Err(why) => bail!(
            "--pod {namespace}/{name} needs the node's agent to find the pod's address: {why}; \
             give the pod's address instead"
        ),
    }
}

#[derive(Serialize)]
pub(super) struct PolicyRow {
    pod: Ipv4Addr,
    /// `namespace/name`, when the agent told.
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_name: Option<String>,
    direction: &'static str,
    /// `allow`, or `deny all` for an isolated direction without any rule.
    verdict: &'static str,
    /// The peer's identity (`any`: every peer; empty for `deny all`).
    identity: String,
    /// The address prefixes of that identity on this node.
    peers: Vec<String>,
    protocol: String,
    ports: String,
    /// The NetworkPolicies (`namespace/name`) the rule comes from; for `deny all`,
    /// those isolating the pod. `None`: the agent could not be asked.
    policies: Option<Vec<String>>,
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
        "POLICIES",
    ];
    fn cells(&self) -> Vec<String> {
        let mut peers = self.peers.iter().take(4).cloned().collect::<Vec<_>>();
        if self.peers.len() > 4 {
            peers.push(format!("+{} more", self.peers.len() - 4));
        }
        let pod = match &self.pod_name {
            Some(name) => format!("{} {name}", self.pod),
            None => self.pod.to_string(),
        };
        let policies = match &self.policies {
            None => "?".to_string(),
            Some(list) if list.is_empty() => "-".to_string(),
            Some(list) => list.join(", "),
        };
        vec![
            pod,
            self.direction.into(),
            self.verdict.into(),
            self.identity.clone(),
            peers.join(", "),
            self.protocol.clone(),
            self.ports.clone(),
            policies,
        ]
    }
}

/// What the agent says of one pod's rules: the policies of each map rule, and of
/// each isolated direction.
struct Named {
    pod: String,
    rules: BTreeMap<PolicyRule, BTreeSet<String>>,
    ingress: Vec<String>,
    egress: Vec<String>,
    truncated: bool,
}

impl Named {
    fn of(sources: EndpointSources) -> Self {
        let mut rules: BTreeMap<PolicyRule, BTreeSet<String>> = BTreeMap::new();
        for policy in &sources.policies {
            for allow in &policy.allows {
                for rule in rules_of(sources.address, allow) {
                    rules.entry(rule).or_default().insert(policy.name.clone());
                }
            }
        }
        let names = |direction| {
            sources
                .selecting(direction)
                .into_iter()
                .map(String::from)
                .collect()
        };
        Self {
            pod: sources.pod.clone(),
            ingress: names(Direction::Ingress),
            egress: names(Direction::Egress),
            rules,
            truncated: sources.truncated,
        }
    }
}

/// The rows of the pods `pod` selects (every policed pod if `None`), with the
/// names `names` gives; and a note on what the names lack, if anything.
pub(super) fn rows(
    contents: &MapContents,
    pod: Option<Ipv4Addr>,
    names: &dyn PolicyNames,
) -> (Vec<PolicyRow>, Option<String>) {
    let mut prefixes_of: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (key, value) in &contents.ipcache {
        prefixes_of.entry(value.identity).or_default().push(format!(
            "{}/{}",
            Ipv4Addr::from(key.network),
            key.prefix_len
        ));
    }
    let mut rows = Vec::new();
    // Once the agent cannot be asked, it is not asked again for the next pods.
    let mut unreachable: Option<String> = None;
    let mut cut_short = false;
    for (key, endpoint) in &contents.endpoints {
        let ip = Ipv4Addr::from(key.address);
        let isolated = ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED;
        if pod.is_some_and(|p| p != ip) || endpoint.flags & isolated == 0 {
            continue;
        }
        let named = match &unreachable {
            Some(_) => None,
            None => match names.pod_policies(ip) {
                Ok(sources) => sources.map(Named::of),
                Err(why) => {
                    unreachable = Some(why);
                    None
                }
            },
        };
        let names_known = unreachable.is_none();
        cut_short |= named.as_ref().is_some_and(|n| n.truncated);
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
                let policies = names_known.then(|| {
                    named
                        .as_ref()
                        .and_then(|n| n.rules.get(rule))
                        .map(|set| set.iter().cloned().collect())
                        .unwrap_or_default()
                });
                rows.push(PolicyRow {
                    pod: ip,
                    pod_name: named.as_ref().map(|n| n.pod.clone()),
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
                    policies,
                });
            }
            if rows.len() == before {
                let policies = names_known.then(|| {
                    named
                        .as_ref()
                        .map(|n| {
                            if direction == DIRECTION_INGRESS {
                                n.ingress.clone()
                            } else {
                                n.egress.clone()
                            }
                        })
                        .unwrap_or_default()
                });
                rows.push(PolicyRow {
                    pod: ip,
                    pod_name: named.as_ref().map(|n| n.pod.clone()),
                    direction: name,
                    verdict: "deny all",
                    identity: String::new(),
                    peers: Vec::new(),
                    protocol: "-".into(),
                    ports: "-".into(),
                    policies,
                });
            }
        }
    }
    let note = match (unreachable, cut_short) {
        (Some(why), _) => Some(format!("policy names: {why}")),
        (None, true) => {
            Some("policy names: the agent's answer was cut short: some are missing".into())
        }
        (None, false) => None,
    };
    (rows, note)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::{Allow, NoPolicyNames, PolicySource};
    use ferrite_common::{
        policy::{IpcacheValue, PolicyValue},
        EndpointInfo, EndpointKey,
    };

    const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
    const OTHER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
    const TCP: u8 = 6;

    fn allow(port: u16) -> Allow {
        Allow {
            direction: Direction::Ingress,
            identity: 7,
            protocol: TCP,
            ports: Some((port, port)),
        }
    }

    /// x/a (POD) isolated for ingress by three policies, two of them allowing port
    /// 80 from identity 7, one port 81; x/b (OTHER) isolated for egress, no rule.
    struct Agent;

    impl PolicyNames for Agent {
        fn pod_policies(&self, address: Ipv4Addr) -> Result<Option<EndpointSources>, String> {
            let source = |name: &str, allows: Vec<Allow>, egress: bool| PolicySource {
                name: name.into(),
                ingress: !egress,
                egress,
                allows,
            };
            let (pod, policies) = if address == POD {
                let policies = vec![
                    source("x/from-y", vec![allow(80)], false),
                    source("x/from-y-too", vec![allow(80)], false),
                    source("x/port-81", vec![allow(81)], false),
                ];
                ("x/a", policies)
            } else {
                ("x/b", vec![source("x/no-egress", vec![], true)])
            };
            Ok(Some(EndpointSources {
                pod: pod.into(),
                address,
                policies,
                truncated: false,
            }))
        }

        fn pod_address(&self, namespace: &str, name: &str) -> Result<PodAddress, String> {
            Ok(match (namespace, name) {
                ("x", "a") => PodAddress::Here(POD),
                ("y", "a") => {
                    PodAddress::Elsewhere(Ipv4Addr::new(10, 244, 1, 20), Some("n2".into()))
                }
                _ => PodAddress::Unknown,
            })
        }
    }

    fn contents() -> MapContents {
        let mut contents = MapContents::default();
        for (address, flags) in [
            (POD, ENDPOINT_INGRESS_ISOLATED),
            (OTHER, ENDPOINT_EGRESS_ISOLATED),
        ] {
            contents.endpoints.insert(
                EndpointKey {
                    address: address.octets(),
                },
                EndpointInfo {
                    flags,
                    ..EndpointInfo::default()
                },
            );
        }
        for port in [80, 81] {
            for rule in rules_of(POD, &allow(port)) {
                contents.policy.insert(rule, PolicyValue { policy: 0 });
            }
        }
        contents.ipcache.insert(
            crate::plan::RouteKey {
                prefix_len: 32,
                network: [10, 244, 1, 20],
            },
            IpcacheValue {
                identity: 7,
                flags: 0,
            },
        );
        contents
    }

    #[test]
    fn rows_name_the_policies_each_rule_comes_from_and_those_denying_all() {
        let (rows, note) = rows(&contents(), None, &Agent);
        assert_eq!(note, None);
        // Each row as `POD VERDICT PORTS NAME: POLICIES`.
        let seen: Vec<String> = rows
            .iter()
            .map(|r| {
                let policies = r.policies.as_ref().map(|p| p.join(","));
                format!(
                    "{} {} {} {}: {}",
                    r.pod,
                    r.verdict,
                    r.ports,
                    r.pod_name.as_deref().unwrap_or("?"),
                    policies.as_deref().unwrap_or("?")
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                "10.244.0.10 allow 80 x/a: x/from-y,x/from-y-too",
                "10.244.0.10 allow 81 x/a: x/port-81",
                "10.244.0.11 deny all - x/b: x/no-egress",
            ]
        );
        let table = super::super::text(&rows);
        assert!(table.contains("10.244.0.10 x/a"), "{table}");
        assert!(table.contains("x/from-y, x/from-y-too"), "{table}");
    }

    #[test]
    fn without_the_agent_rows_are_the_maps_and_a_note_says_why_names_are_missing() {
        let down = NoPolicyNames("agent not reachable (no socket)".into());
        let (rows, note) = rows(&contents(), Some(POD), &down);
        assert_eq!(rows.len(), 2);
        assert!(rows
            .iter()
            .all(|r| r.policies.is_none() && r.pod_name.is_none()));
        assert_eq!(
            note.as_deref(),
            Some("policy names: agent not reachable (no socket)")
        );
    }

    #[test]
    fn pods_are_chosen_by_address_or_by_name_through_the_agent() {
        assert_eq!(parse_pod("10.244.0.10"), Ok(PodChoice::Address(POD)));
        let x_a = parse_pod("x/a").unwrap();
        assert_eq!(resolve(&x_a, &Agent).unwrap(), POD);
        for (pod, why) in [("y/a", "runs on node n2"), ("x/zz", "knows no pod x/zz")] {
            let refused = resolve(&parse_pod(pod).unwrap(), &Agent).unwrap_err();
            assert!(format!("{refused:#}").contains(why), "{pod}: {refused:#}");
        }
        let down = NoPolicyNames("agent not reachable".into());
        let refused = format!("{:#}", resolve(&x_a, &down).unwrap_err());
        assert!(refused.contains("needs the node's agent"), "{refused}");
        for bad in ["x", "x/a/b", "/a", "pod-a"] {
            assert!(parse_pod(bad).is_err(), "{bad}");
        }
    }
}
