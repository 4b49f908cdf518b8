//! What the NetworkPolicy maps say of an explained flow, read in userspace from the
//! same maps the datapath looks up: for each end that is an isolated pod of this
//! node, the rule that allows the flow, or that none does.
use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::lpm_trie::Key;
use ferrite_common::{
    policy::{
        PolicyKey, DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_EGRESS_ISOLATED,
        ENDPOINT_INGRESS_ISOLATED, IDENTITY_ANY, IDENTITY_WORLD, POLICY_PREFIX_FULL,
    },
    EndpointKey,
};

use super::NodeView;

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

/// Which rule of `pod` allows `peer` in `direction` over `protocol` to `port`.
fn rule(
    context: &NodeView,
    pod: Ipv4Addr,
    direction: u8,
    peer: Ipv4Addr,
    protocol: u8,
    port: u16,
) -> String {
    let peer_identity = identity(context, peer);
    for (identity, whom) in [
        (
            peer_identity,
            format!("identity {peer_identity} ({peer}'s)"),
        ),
        (IDENTITY_ANY, "any peer".to_string()),
    ] {
        let key = PolicyKey::lookup(pod.octets(), direction, identity, protocol, port);
        if context
            .maps
            .policy
            .get(&Key::new(POLICY_PREFIX_FULL, key), 0)
            .is_ok()
        {
            return format!("allowed by its rule for {whom}");
        }
    }
    format!(
        "no rule allows {peer} (identity {peer_identity}) to port {port}: see `ferrite inspect policy --pod {pod}`"
    )
}

/// The policy verdict of a flow from `source` to `destination` (after Service
/// translation), `None` when no pod of this node at either end is isolated.
pub fn describe(
    context: &NodeView,
    source: SocketAddrV4,
    destination: SocketAddrV4,
    protocol: u8,
) -> Option<String> {
    let (from, to, port) = (*source.ip(), *destination.ip(), destination.port());
    let mut said = Vec::new();
    if isolation(context, from) & ENDPOINT_EGRESS_ISOLATED != 0 {
        let verdict = rule(context, from, DIRECTION_EGRESS, to, protocol, port);
        said.push(format!("egress of {from}: {verdict}"));
    }
    if isolation(context, to) & ENDPOINT_INGRESS_ISOLATED != 0 {
        let node = [context.config.node_ip, context.config.overlay_ip];
        let verdict = if node.contains(&from.octets()) {
            "the node's own address, never policed".to_string()
        } else {
            rule(context, to, DIRECTION_INGRESS, from, protocol, port)
        };
        said.push(format!("ingress of {to}: {verdict}"));
    }
    (!said.is_empty()).then(|| said.join("; "))
}
