//! The ordered writes between two map images (see the module docs of `plan`), drift,
//! and what a diff ends: removed backends and (frontend, backend) pairs.
use std::collections::{BTreeMap, BTreeSet};

use std::net::{Ipv4Addr, Ipv6Addr};

use ferrite_common::{NodeConfig, ServiceValue};

use super::{LbFamily, MapContents, Op};

/// Selects every key: for maps that `changes` compares whole.
fn all<K>(_: &K) -> bool {
    true
}

/// The writes that turn `current` into `desired`, in a safe order (see the module
/// docs of `plan`). Entries already right are not written: a restart that finds the
/// maps in order writes nothing and never disturbs a live flow.
pub fn diff(current: &MapContents, desired: &MapContents) -> Vec<Op> {
    let (route_puts, route_deletes) = changes(&current.routes, &desired.routes, all);
    let (route6_puts, route6_deletes) = changes(&current.routes6, &desired.routes6, all);
    let v4 = ServiceChanges::<Ipv4Addr>::between(current, desired);
    let v6 = ServiceChanges::<Ipv6Addr>::between(current, desired);
    let (endpoint_puts, endpoint_deletes) = changes(&current.endpoints, &desired.endpoints, all);
    let (endpoint6_puts, endpoint6_deletes) =
        changes(&current.endpoints6, &desired.endpoints6, all);
    let (maglev_puts, maglev_deletes) = changes(&current.maglev, &desired.maglev, all);
    let range_puts = desired.source_ranges.difference(&current.source_ranges);
    let range_deletes = current.source_ranges.difference(&desired.source_ranges);
    let (ipcache_puts, ipcache_deletes) = changes(&current.ipcache, &desired.ipcache, all);
    let (policy_puts, policy_deletes) = changes(&current.policy, &desired.policy, all);
    let mut ops = Vec::new();
    // The datapath caches endpoint, route and policy lookups in conntrack entries per
    // route epoch: bumped by the last write, after every such change is in.
    let routes_change = !(route_puts.is_empty()
        && route_deletes.is_empty()
        && route6_puts.is_empty()
        && route6_deletes.is_empty()
        && endpoint_puts.is_empty()
        && endpoint_deletes.is_empty()
        && endpoint6_puts.is_empty()
        && endpoint6_deletes.is_empty()
        && ipcache_puts.is_empty()
        && ipcache_deletes.is_empty()
        && policy_puts.is_empty()
        && policy_deletes.is_empty());
    let config_first = NodeConfig {
        route_epoch: current.config.route_epoch,
        ..desired.config
    };
    if current.config != config_first {
        ops.push(Op::PutConfig(config_first));
    }
    ops.extend(route_puts.into_iter().map(|(k, v)| Op::PutRoute(k, v)));
    ops.extend(route6_puts.into_iter().map(|(k, v)| Op::PutRoute6(k, v)));
    v4.backends_and_rev_nat(&mut ops);
    v6.backends_and_rev_nat(&mut ops);
    v4.slots(&mut ops);
    v6.slots(&mut ops);
    ops.extend(maglev_puts.into_iter().map(|(k, digest)| {
        let count = desired.services.get(&k).map(|m| m.count).unwrap_or(0);
        Op::PutMaglev(k, count, digest)
    }));
    ops.extend(range_puts.map(|r| Op::PutSourceRange(*r)));
    v4.masters(&mut ops);
    v6.masters(&mut ops);
    // An identity is named by its class of peers, so it means the same before and
    // after these writes: the rules allowing an identity go in first, then the
    // addresses taking it (an address that moves meets its new allows at once,
    // never rules meant for other peers), then the endpoints' isolation flags (what
    // a policed pod allows is in before it is isolated). Rules and entries that
    // went are removed after, rules first.
    ops.extend(policy_puts.into_iter().map(|(k, v)| Op::PutPolicy(k, v)));
    ops.extend(ipcache_puts.into_iter().map(|(k, v)| Op::PutIpcache(k, v)));
    ops.extend(
        endpoint_puts
            .into_iter()
            .map(|(k, v)| Op::PutEndpoint(k, v)),
    );
    ops.extend(
        endpoint6_puts
            .into_iter()
            .map(|(k, v)| Op::PutEndpoint6(k, v)),
    );
    v4.master_removals(&mut ops);
    v6.master_removals(&mut ops);
    ops.extend(maglev_deletes.into_iter().map(Op::DeleteMaglev));
    ops.extend(range_deletes.map(|r| Op::DeleteSourceRange(*r)));
    v4.slot_removals(&mut ops);
    v6.slot_removals(&mut ops);
    v4.rev_nat_and_backend_removals(&mut ops);
    v6.rev_nat_and_backend_removals(&mut ops);
    ops.extend(endpoint_deletes.into_iter().map(Op::DeleteEndpoint));
    ops.extend(endpoint6_deletes.into_iter().map(Op::DeleteEndpoint6));
    ops.extend(policy_deletes.into_iter().map(Op::DeletePolicy));
    ops.extend(ipcache_deletes.into_iter().map(Op::DeleteIpcache));
    ops.extend(route_deletes.into_iter().map(Op::DeleteRoute));
    ops.extend(route6_deletes.into_iter().map(Op::DeleteRoute6));
    if routes_change || desired.config.route_epoch != current.config.route_epoch {
        ops.push(Op::PutConfig(NodeConfig {
            route_epoch: current.config.route_epoch.wrapping_add(1),
            ..desired.config
        }));
    }
    ops
}

/// The puts and the removals of one map ([`changes`]).
type Changes<K, V> = (Vec<(K, V)>, Vec<K>);

/// What changes in one family's Service maps, written by [`diff`] step by step.
struct ServiceChanges<A: LbFamily> {
    backends: Changes<u32, A::Backend>,
    rev_nat: Changes<u32, A::RevNat>,
    slots: Changes<A::ServiceKey, ServiceValue>,
    masters: Changes<A::ServiceKey, ServiceValue>,
}

impl<A: LbFamily> ServiceChanges<A> {
    fn between(current: &MapContents, desired: &MapContents) -> Self {
        let (current_services, desired_services) = (A::services(current), A::services(desired));
        Self {
            backends: changes(A::backends(current), A::backends(desired), all),
            rev_nat: changes(A::rev_nat(current), A::rev_nat(desired), all),
            slots: changes(current_services, desired_services, |k| A::slot(k) != 0),
            masters: changes(current_services, desired_services, |k| A::slot(k) == 0),
        }
    }

    fn backends_and_rev_nat(&self, ops: &mut Vec<Op>) {
        let backends = self.backends.0.iter();
        ops.extend(backends.map(|(id, value)| A::put_backend(*id, *value)));
        let rev_nat = self.rev_nat.0.iter();
        ops.extend(rev_nat.map(|(index, value)| A::put_rev_nat(*index, *value)));
    }

    fn slots(&self, ops: &mut Vec<Op>) {
        let slots = self.slots.0.iter();
        ops.extend(slots.map(|(key, value)| A::put_service(*key, *value)));
    }

    fn masters(&self, ops: &mut Vec<Op>) {
        let masters = self.masters.0.iter();
        ops.extend(masters.map(|(key, value)| A::put_service(*key, *value)));
    }

    fn master_removals(&self, ops: &mut Vec<Op>) {
        ops.extend(self.masters.1.iter().map(|key| A::delete_service(*key)));
    }

    fn slot_removals(&self, ops: &mut Vec<Op>) {
        ops.extend(self.slots.1.iter().map(|key| A::delete_service(*key)));
    }

    fn rev_nat_and_backend_removals(&self, ops: &mut Vec<Op>) {
        ops.extend(self.rev_nat.1.iter().map(|index| A::delete_rev_nat(*index)));
        ops.extend(self.backends.1.iter().map(|id| A::delete_backend(*id)));
    }
}

/// One ordered pass over both maps (they are sorted): the entries of `desired`
/// (selected by `keep`) that `current` lacks or holds differently, and the keys of
/// `current` that `desired` no longer has.
fn changes<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    keep: impl Fn(&K) -> bool,
) -> Changes<K, V> {
    use std::cmp::Ordering;
    let (mut puts, mut deletes) = (Vec::new(), Vec::new());
    let mut cur = current.iter().filter(|(k, _)| keep(k)).peekable();
    let mut des = desired.iter().filter(|(k, _)| keep(k)).peekable();
    loop {
        match (cur.peek(), des.peek()) {
            (None, None) => break,
            (Some((ck, _)), None) => {
                deletes.push(**ck);
                cur.next();
            }
            (None, Some((dk, dv))) => {
                puts.push((**dk, **dv));
                des.next();
            }
            (Some((ck, cv)), Some((dk, dv))) => match ck.cmp(dk) {
                Ordering::Less => {
                    deletes.push(**ck);
                    cur.next();
                }
                Ordering::Greater => {
                    puts.push((**dk, **dv));
                    des.next();
                }
                Ordering::Equal => {
                    if cv != dv {
                        puts.push((**dk, **dv));
                    }
                    cur.next();
                    des.next();
                }
            },
        }
    }
    (puts, deletes)
}

/// What `actual` holds differently from `expected`, as the writes that would put it
/// back (endpoints of both families aside: the CNI plugin writes them between
/// syncs).
pub fn drift(expected: &MapContents, actual: &MapContents) -> Vec<Op> {
    let without_endpoints = |maps: &MapContents| MapContents {
        endpoints: BTreeMap::new(),
        endpoints6: BTreeMap::new(),
        ..maps.clone()
    };
    diff(&without_endpoints(actual), &without_endpoints(expected))
}

/// (rev-NAT index, backend id) pairs `ops` end, applied to `before`: a backend that no
/// longer serves a frontend (neither ready nor terminating), or a frontend that is
/// gone. Their conntrack and affinity entries must go even when the backend lives on
/// behind another Service (backends are shared by value): its flows of this frontend
/// move to the frontend's current backends. Proportional to the frontends touched.
pub fn ended_pairs(before: &MapContents, ops: &[Op]) -> BTreeSet<(u32, u32)> {
    let mut ended = ended_pairs_of::<Ipv4Addr>(before, ops);
    ended.extend(ended_pairs_of::<Ipv6Addr>(before, ops));
    ended
}

/// [`ended_pairs`] of family `A`'s frontends (their ids are the other family's
/// never: one id space).
fn ended_pairs_of<A: LbFamily>(before: &MapContents, ops: &[Op]) -> BTreeSet<(u32, u32)> {
    let touched: BTreeSet<A::ServiceKey> = ops
        .iter()
        .filter_map(|op| A::service_write(op).map(|(key, _)| A::frontend_range(&key).0))
        .collect();
    if touched.is_empty() {
        return BTreeSet::new();
    }
    let services = A::services(before);
    let mut after = BTreeMap::new();
    for master in &touched {
        let (first, last) = A::frontend_range(master);
        after.extend(services.range(first..=last));
    }
    for (key, value) in ops.iter().filter_map(A::service_write) {
        match value {
            Some(value) => drop(after.insert(key, value)),
            None => drop(after.remove(&key)),
        }
    }
    let mut ended = BTreeSet::new();
    for master in touched {
        let (Some(old_rev_nat), old_ids) = members::<A>(services, master) else {
            continue;
        };
        let (new_rev_nat, new_ids) = members::<A>(&after, master);
        for id in old_ids {
            if new_rev_nat != Some(old_rev_nat) || !new_ids.contains(&id) {
                ended.insert((old_rev_nat, id));
            }
        }
    }
    ended
}

/// Backend ids a diff removes (of either family: one id space): conntrack entries
/// naming them must go too, before the id can ever be handed out again.
pub fn removed_backends(ops: &[Op]) -> BTreeSet<u32> {
    ops.iter()
        .filter_map(|op| match op {
            Op::DeleteBackend(id) | Op::DeleteBackend6(id) => Some(*id),
            _ => None,
        })
        .collect()
}

/// The rev-NAT index of a frontend and the backend ids of all its slots (ready and
/// terminating, of every scope: a backend in-cluster clients still use keeps its
/// flows) in `services`.
fn members<A: LbFamily>(
    services: &BTreeMap<A::ServiceKey, ServiceValue>,
    master: A::ServiceKey,
) -> (Option<u32>, BTreeSet<u32>) {
    let (first, last) = A::frontend_range(&master);
    let mut rev_nat = None;
    let mut ids = BTreeSet::new();
    for (key, value) in services.range(first..=last) {
        if A::slot(key) == 0 {
            rev_nat = Some(value.rev_nat_index);
        } else {
            ids.insert(value.backend_id);
        }
    }
    (rev_nat, ids)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use super::*;
    use crate::model::L4Addr;
    use ferrite_common::{ServiceKey, PROTO_TCP};

    #[test]
    fn the_route_epoch_moves_on_last_after_endpoint_changes_and_only_then() {
        use ferrite_common::{EndpointInfo, EndpointKey, RevNatValue};
        let mut current = MapContents::default();
        current.config.route_epoch = 41;
        let mut desired = current.clone();
        let pod = EndpointKey {
            address: [10, 244, 0, 5],
        };
        desired.endpoints.insert(pod, EndpointInfo::default());
        let ops = diff(&current, &desired);
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(matches!(ops[0], Op::PutEndpoint(..)));
        assert_eq!(
            ops[1],
            Op::PutConfig(NodeConfig {
                route_epoch: 42,
                ..desired.config
            })
        );

        // Only Services changing: the caches stay valid.
        let mut services_only = current.clone();
        services_only.rev_nat.insert(
            1,
            RevNatValue {
                address: [10, 96, 0, 1],
                port: 80,
                _pad: 0,
            },
        );
        assert!(diff(&current, &services_only)
            .iter()
            .all(|op| !matches!(op, Op::PutConfig(_))));
        // A config change alone keeps the epoch.
        let mut mtu = current.clone();
        mtu.config.pod_mtu = 1400;
        assert_eq!(diff(&current, &mtu), vec![Op::PutConfig(mtu.config)]);
    }

    #[test]
    fn ipv6_route_changes_move_the_route_epoch_on_and_go_last_with_the_routes() {
        use super::super::Route6Key;
        use ferrite_common::RouteInfo;
        let mut current = MapContents::default();
        current.config.route_epoch = 3;
        let cidr = Route6Key {
            prefix_len: 64,
            network: "fd00:10:244:1::"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        };
        let info = RouteInfo {
            node_ip: [198, 51, 100, 2],
            ..Default::default()
        };
        let mut desired = current.clone();
        desired.routes6.insert(cidr, info);
        let bumped = |epoch| {
            Op::PutConfig(NodeConfig {
                route_epoch: epoch,
                ..desired.config
            })
        };
        assert_eq!(
            diff(&current, &desired),
            vec![Op::PutRoute6(cidr, info), bumped(4)]
        );
        let mut written = desired.clone();
        written.config.route_epoch = 4;
        assert!(diff(&written, &written).is_empty());
        assert_eq!(
            diff(&written, &current),
            vec![Op::DeleteRoute6(cidr), bumped(5)]
        );
        // Drift puts it back (the agent alone writes routes).
        assert_eq!(drift(&desired, &current)[0], Op::PutRoute6(cidr, info));
    }

    #[test]
    fn ipv6_endpoint_changes_move_the_route_epoch_on_too() {
        use ferrite_common::{Endpoint6Key, EndpointInfo};
        let mut current = MapContents::default();
        current.config.route_epoch = 7;
        let pod = Endpoint6Key {
            address: "fd00:10:244::5"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        };
        let mut desired = current.clone();
        desired.endpoints6.insert(pod, EndpointInfo::default());
        let bumped = Op::PutConfig(NodeConfig {
            route_epoch: 8,
            ..desired.config
        });
        assert_eq!(
            diff(&current, &desired),
            vec![Op::PutEndpoint6(pod, EndpointInfo::default()), bumped]
        );
        // Its removal comes with the removals, the epoch last again.
        let mut written = desired.clone();
        written.config.route_epoch = 8;
        let ops = diff(&written, &current);
        assert_eq!(ops[0], Op::DeleteEndpoint6(pod));
        assert!(
            matches!(ops[1], Op::PutConfig(c) if c.route_epoch == 9),
            "{ops:?}"
        );
        // Drift leaves them out, as IPv4's: the CNI plugin writes them between syncs.
        assert!(drift(&current, &desired).is_empty());
    }

    #[test]
    fn first_sync_writes_backends_then_slots_then_master() {
        let vip = tcp("10.96.0.10", 80);
        let s = state(&[(vip, &[tcp("10.244.0.2", 8080), tcp("10.244.0.3", 8080)])]);
        let (desired, ops) = plan(&s, &MapContents::default());
        assert_eq!(desired.backends.len(), 2);
        assert_eq!(desired.services.len(), 3);
        let position = |pred: &dyn Fn(&Op) -> bool| ops.iter().position(pred).unwrap();
        let master = position(&|op| matches!(op, Op::PutService(k, _) if k.backend_slot == 0));
        let last_slot = ops
            .iter()
            .rposition(|op| matches!(op, Op::PutService(k, _) if k.backend_slot != 0))
            .unwrap();
        let last_backend = ops
            .iter()
            .rposition(|op| matches!(op, Op::PutBackend(..)))
            .unwrap();
        assert!(last_backend < last_slot && last_slot < master);
        let mut maps = MapContents::default();
        apply_checking_each_step(&mut maps, &ops);
        assert_eq!(maps, desired);
    }

    #[test]
    fn resync_of_unchanged_state_writes_nothing() {
        let s = state(&[(tcp("10.96.0.10", 80), &[tcp("10.244.0.2", 8080)])]);
        let (desired, _) = plan(&s, &MapContents::default());
        let (again, ops) = plan(&s, &desired);
        assert!(ops.is_empty(), "{ops:?}");
        assert_eq!(again, desired);
    }

    #[test]
    fn shrinking_and_growing_services_stay_consistent_at_every_step() {
        let vip = tcp("10.96.0.10", 80);
        let b = |n: u8| tcp(&format!("10.244.0.{n}"), 8080);
        let mut maps = MapContents::default();
        for backends in [
            vec![b(1), b(2), b(3)],
            vec![b(1), b(3)],
            vec![b(1), b(3), b(4), b(5)],
            vec![],
            vec![b(2)],
        ] {
            let s = state(&[(vip, &backends)]);
            let (desired, ops) = plan(&s, &maps);
            apply_checking_each_step(&mut maps, &ops);
            assert_eq!(maps, desired);
        }
    }

    #[test]
    fn removals_come_after_every_write_and_masters_go_first() {
        let vip = tcp("10.96.0.10", 80);
        let mut maps = MapContents::default();
        let (_, ops) = plan(&state(&[(vip, &[tcp("10.244.0.1", 80)])]), &maps);
        apply(&mut maps, &ops);
        let (_, ops) = plan(
            &state(&[(tcp("10.96.0.11", 80), &[tcp("10.244.0.2", 80)])]),
            &maps,
        );
        let first_delete = ops
            .iter()
            .position(|op| {
                matches!(
                    op,
                    Op::DeleteService(_) | Op::DeleteBackend(_) | Op::DeleteRevNat(_)
                )
            })
            .unwrap();
        assert!(ops[..first_delete].iter().all(|op| matches!(
            op,
            Op::PutBackend(..) | Op::PutRevNat(..) | Op::PutService(..) | Op::PutEndpoint(..)
        )));
        assert!(matches!(ops[first_delete], Op::DeleteService(k) if k.backend_slot == 0));
        apply_checking_each_step(&mut maps, &ops);
    }

    #[test]
    fn a_backend_leaving_one_service_ends_that_pair_only_and_terminating_ends_none() {
        let (one, two) = (tcp("10.96.0.1", 80), tcp("10.96.0.2", 80));
        let (a, b) = (tcp("10.244.0.2", 8080), tcp("10.244.0.3", 8080));
        let (before, _) = plan(&state(&[(one, &[a]), (two, &[a])]), &MapContents::default());
        let rev_nat = |maps: &MapContents, vip: &L4Addr| {
            maps.services[&ServiceKey::new(vip.ip, 80, PROTO_TCP, 0)].rev_nat_index
        };
        let id_of = |maps: &MapContents, backend: &L4Addr| {
            *maps
                .backends
                .iter()
                .find(|(_, v)| v.address == backend.ip.octets())
                .unwrap()
                .0
        };
        // `one` moves from a to b; a lives on behind `two`.
        let (_, ops) = plan(&state(&[(one, &[b]), (two, &[a])]), &before);
        assert!(removed_backends(&ops).is_empty(), "a still backs two");
        assert_eq!(
            ended_pairs(&before, &ops),
            BTreeSet::from([(rev_nat(&before, &one), id_of(&before, &a))])
        );
        // a turning terminating in `one` ends nothing: its flows finish there.
        let mut draining = state(&[(one, &[b]), (two, &[a])]);
        draining.services.get_mut(&one).unwrap().terminating = vec![a];
        let (_, ops) = plan(&draining, &before);
        assert!(ended_pairs(&before, &ops).is_empty(), "{ops:?}");
        // `one` removed: every pair of it ends.
        let (_, ops) = plan(&state(&[(two, &[a])]), &before);
        assert_eq!(
            ended_pairs(&before, &ops),
            BTreeSet::from([(rev_nat(&before, &one), id_of(&before, &a))])
        );
    }
}
