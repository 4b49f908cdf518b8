//! The NetworkPolicy maps' contents: `ferrite_ipcache` from the address identities,
//! `ferrite_policy` from what each policed pod allows (a port range becomes the
//! fewest aligned prefixes that cover it), and the isolation flags of the pods'
//! endpoint entries.
use std::net::Ipv4Addr;

use ferrite_common::{
    policy::{
        IpcacheValue, PolicyKey, PolicyValue, DIRECTION_EGRESS, DIRECTION_INGRESS,
        ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, POLICY_PREFIX_ANY_PORT,
        POLICY_PREFIX_ANY_PROTOCOL,
    },
    EndpointKey,
};

use super::{diff, MapContents, Op, PolicyRule, RouteKey};
use crate::model::policy::{Allow, Direction, EndpointPolicy, PolicyDelta, PolicyModel};

fn ipcache_key(prefix: &ipnet::Ipv4Net) -> RouteKey {
    RouteKey {
        prefix_len: u32::from(prefix.prefix_len()),
        network: prefix.network().octets(),
    }
}

/// The isolation flags of an endpoint entry for `policy` (the other flags kept).
fn isolation_flags(flags: u32, policy: Option<&EndpointPolicy>) -> u32 {
    let mut flags = flags & !(ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED);
    if policy.is_some_and(|p| p.ingress_isolated) {
        flags |= ENDPOINT_INGRESS_ISOLATED;
    }
    if policy.is_some_and(|p| p.egress_isolated) {
        flags |= ENDPOINT_EGRESS_ISOLATED;
    }
    flags
}

/// The writes of a policy update: the entries `delta` touches, as `written` holds
/// them and as they are to be, through the same ordered diff as a full sync (what
/// a policed pod allows is in before its endpoint says it is isolated; the route
/// epoch moves last, so conntrack's cached verdicts are judged again).
pub(super) fn policy_update(written: &MapContents, delta: &PolicyDelta) -> Vec<Op> {
    let mut current = MapContents {
        config: written.config,
        ..MapContents::default()
    };
    let mut desired = MapContents {
        config: written.config,
        ..MapContents::default()
    };
    for (prefix, now) in &delta.ipcache {
        let key = ipcache_key(prefix);
        if let Some(value) = written.ipcache.get(&key) {
            current.ipcache.insert(key, *value);
        }
        if let Some(identity) = now {
            let value = IpcacheValue {
                identity: *identity,
                flags: 0,
            };
            desired.ipcache.insert(key, value);
        }
    }
    for (ip, (before, now)) in &delta.endpoints {
        let key = EndpointKey {
            address: ip.octets(),
        };
        if let Some(entry) = written.endpoints.get(&key) {
            current.endpoints.insert(key, *entry);
            let mut entry = *entry;
            entry.flags = isolation_flags(entry.flags, now.as_ref());
            desired.endpoints.insert(key, entry);
        }
        for allow in before.iter().flat_map(|b| &b.allows) {
            for rule in rules_of(*ip, allow) {
                if let Some(value) = written.policy.get(&rule) {
                    current.policy.insert(rule, *value);
                }
            }
        }
        for allow in now.iter().flat_map(|n| &n.allows) {
            for rule in rules_of(*ip, allow) {
                desired.policy.insert(rule, PolicyValue { policy: 0 });
            }
        }
    }
    diff(&current, &desired)
}

/// Write the policy entries of `model` into `out`, whose endpoints are already in.
pub(super) fn policy_contents(model: &PolicyModel, out: &mut MapContents) {
    for (prefix, identity) in &model.ipcache {
        out.ipcache.insert(
            ipcache_key(prefix),
            IpcacheValue {
                identity: *identity,
                flags: 0,
            },
        );
    }
    for (ip, endpoint) in &model.endpoints {
        if let Some(entry) = out.endpoints.get_mut(&EndpointKey {
            address: ip.octets(),
        }) {
            if endpoint.ingress_isolated {
                entry.flags |= ENDPOINT_INGRESS_ISOLATED;
            }
            if endpoint.egress_isolated {
                entry.flags |= ENDPOINT_EGRESS_ISOLATED;
            }
        }
        for allow in &endpoint.allows {
            for rule in rules_of(*ip, allow) {
                out.policy.insert(rule, PolicyValue { policy: 0 });
            }
        }
    }
}

/// The `ferrite_policy` entries of one allow of the pod at `ip`.
pub fn rules_of(ip: Ipv4Addr, allow: &Allow) -> Vec<PolicyRule> {
    let key = |protocol: u8, port: u16| PolicyKey {
        endpoint: ip.octets(),
        direction: match allow.direction {
            Direction::Ingress => DIRECTION_INGRESS,
            Direction::Egress => DIRECTION_EGRESS,
        },
        identity: allow.identity.to_be_bytes(),
        protocol,
        port: port.to_be_bytes(),
    };
    match (allow.protocol, allow.ports) {
        (0, _) => vec![PolicyRule {
            prefix_len: POLICY_PREFIX_ANY_PROTOCOL,
            key: key(0, 0),
        }],
        (protocol, None) => vec![PolicyRule {
            prefix_len: POLICY_PREFIX_ANY_PORT,
            key: key(protocol, 0),
        }],
        (protocol, Some((first, last))) => port_prefixes(first, last)
            .into_iter()
            .map(|(port, bits)| PolicyRule {
                prefix_len: POLICY_PREFIX_ANY_PORT + bits,
                key: key(protocol, port),
            })
            .collect(),
    }
}

/// The fewest aligned blocks covering `first..=last`: (start, fixed bits of 16).
pub fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u32)> {
    let mut blocks = Vec::new();
    let (mut start, end) = (u32::from(first), u32::from(last));
    while start <= end {
        // The largest block aligned at `start` that ends by `end`.
        let mut size = if start == 0 {
            1 << 16
        } else {
            1 << start.trailing_zeros()
        };
        while start + size - 1 > end {
            size >>= 1;
        }
        blocks.push((start as u16, 16 - size.trailing_zeros()));
        start += size;
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every port of a range is covered, none outside, by disjoint blocks.
    #[test]
    fn port_ranges_become_the_fewest_aligned_prefixes() {
        for (first, last, count) in [
            (80, 80, 1),
            (0, 65535, 1),
            (1000, 1010, 3),
            (1, 65535, 16),
            (32768, 65535, 1),
            (65535, 65535, 1),
        ] {
            let blocks = port_prefixes(first, last);
            assert_eq!(blocks.len(), count, "{first}-{last}: {blocks:?}");
            let covered = |port: u32| {
                blocks
                    .iter()
                    .filter(|(start, bits)| {
                        let mask = if *bits == 0 {
                            0
                        } else {
                            u32::MAX << (32 - bits) >> 16
                        };
                        port & mask == u32::from(*start)
                    })
                    .count()
            };
            for port in 0..=65535u32 {
                let inside = (u32::from(first)..=u32::from(last)).contains(&port);
                assert_eq!(
                    covered(port),
                    usize::from(inside),
                    "{first}-{last}: port {port}"
                );
            }
        }
    }
}
