//! The NetworkPolicy maps' contents: `ferrite_ipcache` from the address identities,
//! `ferrite_policy` from what each policed pod allows (a port range becomes the
//! fewest aligned prefixes that cover it), and the isolation flags of the pods'
//! endpoint entries.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use ferrite_common::{
    policy::{
        IpcacheValue, PolicyKey, PolicyValue, DIRECTION_EGRESS, DIRECTION_INGRESS,
        ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, POLICY_PREFIX_ANY_PORT,
        POLICY_PREFIX_ANY_PROTOCOL,
    },
    Endpoint6Key, EndpointInfo, EndpointKey,
};

use super::{diff, MapContents, Op, PolicyRule, RouteKey};
use crate::model::{
    policy::{Allow, Direction, EndpointPolicy, PolicyDelta, PolicyModel},
    LocalPod,
};

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

/// The IPv6 entry of the pod at `ip` that its isolation applies to: the entry of
/// its IPv6 address `ip6` (if it has one) when it names the veth its IPv4 entry
/// names (never another pod's, holding an address the pod claims).
fn isolated_with(maps: &MapContents, ip: Ipv4Addr, ip6: Option<Ipv6Addr>) -> Option<Endpoint6Key> {
    let key = Endpoint6Key {
        address: ip6?.octets(),
    };
    let ifindex = maps
        .endpoints
        .get(&EndpointKey {
            address: ip.octets(),
        })?
        .ifindex;
    (maps.endpoints6.get(&key)?.ifindex == ifindex).then_some(key)
}

/// The writes of a policy update: the entries `delta` touches, as `written` holds
/// them and as they are to be, through the same ordered diff as a full sync (what
/// a policed pod allows is in before its endpoint says it is isolated; the route
/// epoch moves last, so conntrack's cached verdicts are judged again). `ip6_of`
/// gives a local pod's IPv6 address by its IPv4 one: its IPv6 entry is isolated
/// as its IPv4 entry is.
pub(super) fn policy_update(
    written: &MapContents,
    delta: &PolicyDelta,
    ip6_of: impl Fn(Ipv4Addr) -> Option<Ipv6Addr>,
) -> Vec<Op> {
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
        if let Some(key6) = isolated_with(written, *ip, ip6_of(*ip)) {
            let entry = written.endpoints6[&key6];
            current.endpoints6.insert(key6, entry);
            let flags = isolation_flags(entry.flags, now.as_ref());
            desired
                .endpoints6
                .insert(key6, EndpointInfo { flags, ..entry });
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

/// Write the policy entries of `model` into `out`, whose endpoints (of this node's
/// `pods`) are already in.
pub(super) fn policy_contents(
    model: &PolicyModel,
    pods: &BTreeMap<Ipv4Addr, LocalPod>,
    out: &mut MapContents,
) {
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
        let isolate = |entry: &mut EndpointInfo| {
            if endpoint.ingress_isolated {
                entry.flags |= ENDPOINT_INGRESS_ISOLATED;
            }
            if endpoint.egress_isolated {
                entry.flags |= ENDPOINT_EGRESS_ISOLATED;
            }
        };
        let ip6 = pods.get(ip).and_then(|pod| pod.ip6);
        if let Some(entry) = isolated_with(out, *ip, ip6).and_then(|k| out.endpoints6.get_mut(&k)) {
            isolate(entry);
        }
        if let Some(entry) = out.endpoints.get_mut(&EndpointKey {
            address: ip.octets(),
        }) {
            isolate(entry);
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
