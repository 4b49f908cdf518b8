//! What the NetworkPolicy maps say of an explained flow, read in userspace from the
//! same maps the datapath looks up: for each end that is an isolated pod of this
//! node, the rule that allows the flow, or that none does. The maps number peers
//! and know no policy: which NetworkPolicies gave the rule (or select the pod, when
//! none allows it) the node's running agent tells, from the model it wrote the
//! maps from; without it, the verdict stands with a note.
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use aya::maps::lpm_trie::Key;
use ferrite_common::{
    policy::{
        PolicyKey, DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_EGRESS_ISOLATED,
        ENDPOINT_INGRESS_ISOLATED, IDENTITY_ANY, IDENTITY_WORLD, POLICY_PREFIX_FULL,
    },
    EndpointKey,
};
use serde::Serialize;

use super::{NodeView, Request};
use crate::model::policy::{Direction, EndpointSources, PolicyNames};

/// The policy verdict at one isolated end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyEnd {
    /// The pod of this node at this end.
    pub pod: Ipv4Addr,
    /// Its `namespace/name`, when the agent told.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    pub allowed: bool,
    /// The NetworkPolicies (`namespace/name`) whose rules allow the flow.
    pub allowed_by: Vec<String>,
    /// The NetworkPolicies selecting the pod for this direction.
    pub selected_by: Vec<String>,
    /// Why the policies are not named (the agent could not be asked), if they are not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub names_unknown: Option<String>,
}

/// The isolation flags of `address` if it is a pod of this node.
fn isolation(context: &NodeView, address: Ipv4Addr) -> u32 {
    context
        .maps
        .endpoints
        .get(
            &EndpointKey {
                address: address.octets(),
            },
            0,
        )
        .map(|e| e.flags)
        .unwrap_or(0)
}

fn identity(context: &NodeView, address: Ipv4Addr) -> u32 {
    context
        .maps
        .ipcache
        .get(&Key::new(32, address.octets()), 0)
        .map(|v| v.identity)
        .unwrap_or(IDENTITY_WORLD)
}

/// One end of the flow: the pod, the peer, and which way.
struct End {
    pod: Ipv4Addr,
    direction: Direction,
    peer: Ipv4Addr,
    protocol: u8,
    port: u16,
}

/// `x/a`, `x/a and x/b`, `x/a, x/b and x/c`.
fn listed(names: &[String]) -> String {
    match names {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// Whether the maps hold a rule of `end`'s pod allowing it, and what it says.
fn rule(
    context: &NodeView,
    sources: &Result<Option<EndpointSources>, String>,
    end: &End,
) -> (String, PolicyEnd) {
    let direction = match end.direction {
        Direction::Ingress => DIRECTION_INGRESS,
        Direction::Egress => DIRECTION_EGRESS,
    };
    let peer_identity = identity(context, end.peer);
    let allowed_for = [
        (
            peer_identity,
            format!("identity {peer_identity} ({}'s)", end.peer),
        ),
        (IDENTITY_ANY, "any peer".to_string()),
    ]
    .into_iter()
    .find(|(identity, _)| {
        let key = PolicyKey::lookup(
            end.pod.octets(),
            direction,
            *identity,
            end.protocol,
            end.port,
        );
        context
            .maps
            .policy
            .get(&Key::new(POLICY_PREFIX_FULL, key), 0)
            .is_ok()
    })
    .map(|(_, whom)| whom);
    verdict(end, peer_identity, allowed_for, sources)
}

/// What to say of `end`, whose pod's rule for `allowed_for` allows it (`None`:
/// none does; `peer_identity`: the peer's in the maps), naming the policies the
/// agent gave as `sources`.
fn verdict(
    end: &End,
    peer_identity: u32,
    allowed_for: Option<String>,
    sources: &Result<Option<EndpointSources>, String>,
) -> (String, PolicyEnd) {
    let (pod, peer, port) = (end.pod, end.peer, end.port);
    let mut verdict = PolicyEnd {
        pod,
        pod_name: None,
        direction: match end.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        },
        allowed: allowed_for.is_some(),
        allowed_by: Vec::new(),
        selected_by: Vec::new(),
        names_unknown: None,
    };
    let mut text = match &allowed_for {
        Some(whom) => format!("allowed by its rule for {whom}"),
        None => format!("no rule allows {peer} (identity {peer_identity}) to port {port}"),
    };
    match sources {
        Ok(Some(sources)) => {
            let names = |list: Vec<&str>| list.into_iter().map(String::from).collect::<Vec<_>>();
            verdict.pod_name = Some(sources.pod.clone());
            verdict.selected_by = names(sources.selecting(end.direction));
            verdict.allowed_by =
                names(sources.allowing(end.direction, peer_identity, end.protocol, port));
            let what = verdict.direction;
            match (verdict.allowed, verdict.allowed_by.is_empty()) {
                (true, false) => {
                    let policies = &verdict.allowed_by;
                    let noun = if policies.len() == 1 {
                        "NetworkPolicy"
                    } else {
                        "NetworkPolicies"
                    };
                    text.push_str(&format!(", from {noun} {}", listed(policies)));
                }
                (false, true) if verdict.selected_by.is_empty() => {
                    text.push_str(&format!(
                        "; the agent's model has no policy selecting it for {what} (maps and \
                         model differ: the next sync repairs the maps)"
                    ));
                }
                (false, true) => text.push_str(&format!(
                    ": none of the NetworkPolicies selecting it for {what} ({}) allows it",
                    listed(&verdict.selected_by)
                )),
                (true, true) => text.push_str(
                    "; the agent's model names no policy for it (maps and model differ: the \
                     next sync repairs the maps)",
                ),
                (false, false) => text.push_str(&format!(
                    "; the agent's model has it allowed by {} (maps and model differ: the \
                     next sync repairs the maps)",
                    listed(&verdict.allowed_by)
                )),
            }
            if sources.truncated {
                text.push_str(" (the agent's answer was cut short: names may be missing)");
            }
        }
        Ok(None) => {
            verdict.names_unknown = Some("the agent's model has no pod of this node there".into());
            text.push_str(" (policy names: the agent's model has no pod of this node there)");
        }
        Err(why) => {
            verdict.names_unknown = Some(why.clone());
            text.push_str(&format!(" (policy names: {why})"));
        }
    }
    if !verdict.allowed {
        let pod_arg = verdict.pod_name.clone().unwrap_or_else(|| pod.to_string());
        text.push_str(&format!("; see `ferrite inspect policy --pod {pod_arg}`"));
    }
    (text, verdict)
}

/// The policy verdict of a flow from `source` to `destination` (after Service
/// translation), `None` when no pod of this node at either end is isolated; with
/// it, each isolated end's verdict and the policies behind it (`names`: the agent).
pub fn describe(
    context: &NodeView,
    names: &dyn PolicyNames,
    source: SocketAddrV4,
    destination: SocketAddrV4,
    protocol: u8,
) -> Option<(String, Vec<PolicyEnd>)> {
    let (from, to, port) = (*source.ip(), *destination.ip(), destination.port());
    let mut said = Vec::new();
    let mut ends = Vec::new();
    if isolation(context, from) & ENDPOINT_EGRESS_ISOLATED != 0 {
        let end = End {
            pod: from,
            direction: Direction::Egress,
            peer: to,
            protocol,
            port,
        };
        let (verdict, end) = rule(context, &names.pod_policies(from), &end);
        said.push(format!("egress of {from}: {verdict}"));
        ends.push(end);
    }
    if isolation(context, to) & ENDPOINT_INGRESS_ISOLATED != 0 {
        let node = [context.config.node_ip, context.config.overlay_ip];
        if node.contains(&from.octets()) {
            said.push(format!(
                "ingress of {to}: the node's own address, never policed"
            ));
        } else {
            let end = End {
                pod: to,
                direction: Direction::Ingress,
                peer: from,
                protocol,
                port,
            };
            let (verdict, end) = rule(context, &names.pod_policies(to), &end);
            said.push(format!("ingress of {to}: {verdict}"));
            ends.push(end);
        }
    }
    (!said.is_empty()).then(|| (said.join("; "), ends))
}

/// What NetworkPolicy does to an IPv6 flow, `None` when neither end is an isolated
/// pod of this node.
pub fn describe6(context: &NodeView, request: &Request) -> Option<String> {
    let flags = |address: IpAddr| {
        context
            .endpoint(address)
            .ok()
            .flatten()
            .map_or(0, |e| e.flags)
    };
    let (from, to) = (request.source.ip(), request.destination.ip());
    ipv6_verdict(from, flags(from), to, flags(to))
}

/// The policy line of IPv6 from `from` to `to` (each end's isolation flags, 0 for
/// no pod of this node). There are no IPv6 rules yet: the datapath fails closed,
/// dropping the IPv6 of a pod isolated in either direction, the sender judged first
/// (`policy::ipv6_denied` in the datapath).
fn ipv6_verdict(from: IpAddr, from_flags: u32, to: IpAddr, to_flags: u32) -> Option<String> {
    let isolated = |flags: u32| flags & (ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED) != 0;
    let (end, direction) = if isolated(from_flags) {
        (from, "egress")
    } else if isolated(to_flags) {
        (to, "ingress")
    } else {
        return None;
    };
    Some(format!(
        "{direction} of {end}: denied: a NetworkPolicy isolates this pod and IPv6 has no \
         NetworkPolicy rules yet, so its IPv6 traffic is dropped either way"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::{Allow, PolicySource};

    const TCP: u8 = 6;

    fn sources() -> EndpointSources {
        let from_y = |name: &str, port: u16| PolicySource {
            name: name.into(),
            ingress: true,
            egress: false,
            allows: vec![Allow {
                direction: Direction::Ingress,
                identity: 7,
                protocol: TCP,
                ports: Some((port, port)),
            }],
        };
        EndpointSources {
            pod: "x/a".into(),
            address: Ipv4Addr::new(10, 244, 0, 10),
            policies: vec![
                from_y("x/a-from-y", 80),
                from_y("x/also-from-y", 80),
                from_y("x/other-port", 81),
            ],
            truncated: false,
        }
    }

    fn end(port: u16) -> End {
        End {
            pod: Ipv4Addr::new(10, 244, 0, 10),
            direction: Direction::Ingress,
            peer: Ipv4Addr::new(10, 244, 1, 20),
            protocol: TCP,
            port,
        }
    }

    #[test]
    fn an_allowed_flow_names_every_policy_allowing_it_and_a_denied_one_those_selecting_the_pod() {
        let (text, said) = verdict(&end(80), 7, Some("identity 7".into()), &Ok(Some(sources())));
        assert_eq!(
            text,
            "allowed by its rule for identity 7, from NetworkPolicies x/a-from-y and x/also-from-y"
        );
        assert_eq!(said.allowed_by, ["x/a-from-y", "x/also-from-y"]);
        assert_eq!(said.pod_name.as_deref(), Some("x/a"));
        assert!(said.allowed);

        let (text, said) = verdict(&end(82), 7, None, &Ok(Some(sources())));
        assert!(!said.allowed && said.allowed_by.is_empty());
        assert_eq!(
            said.selected_by,
            ["x/a-from-y", "x/also-from-y", "x/other-port"]
        );
        assert_eq!(
            text,
            "no rule allows 10.244.1.20 (identity 7) to port 82: none of the NetworkPolicies \
             selecting it for ingress (x/a-from-y, x/also-from-y and x/other-port) allows it; \
             see `ferrite inspect policy --pod x/a`"
        );
    }

    #[test]
    fn without_the_agent_the_verdict_of_the_maps_stands_with_a_note() {
        let down = Err("agent not reachable (connecting to /run/x)".to_string());
        let (text, said) = verdict(&end(80), 7, Some("identity 7".into()), &down);
        assert_eq!(
            text,
            "allowed by its rule for identity 7 (policy names: agent not reachable (connecting to /run/x))"
        );
        assert!(said.allowed && said.allowed_by.is_empty() && said.names_unknown.is_some());
        let (text, _) = verdict(&end(82), 7, None, &down);
        assert!(
            text.starts_with("no rule allows 10.244.1.20 (identity 7) to port 82 (policy names: agent not reachable")
                && text.ends_with("see `ferrite inspect policy --pod 10.244.0.10`"),
            "{text}"
        );
    }

    #[test]
    fn maps_and_model_disagreeing_is_said() {
        // The maps allow port 82; the model has no policy allowing it.
        let (text, _) = verdict(&end(82), 7, Some("identity 7".into()), &Ok(Some(sources())));
        assert!(text.contains("maps and model differ"), "{text}");
    }

    #[test]
    fn ipv6_to_or_from_an_isolated_pod_is_denied_either_way_the_sender_first() {
        let (a, b): (IpAddr, IpAddr) = ("fd00::2".parse().unwrap(), "fd00::3".parse().unwrap());
        assert_eq!(ipv6_verdict(a, 0, b, 0), None);
        let line = ipv6_verdict(a, 0, b, ENDPOINT_EGRESS_ISOLATED).unwrap();
        assert!(line.starts_with("ingress of fd00::3: denied"), "{line}");
        let line =
            ipv6_verdict(a, ENDPOINT_INGRESS_ISOLATED, b, ENDPOINT_INGRESS_ISOLATED).unwrap();
        assert!(line.starts_with("egress of fd00::2: denied"), "{line}");
    }
}
