//! Id allocation and room in the maps: backend ids and rev-NAT indexes are handed
//! out here, and a Service that does not fit is refused before any id is taken.
use std::collections::{BTreeMap, BTreeSet};

use crate::limits::RESERVE_DIVISOR;

use super::{Capacities, LbFamily, MapContents};
use crate::model::{L4Addr, ServiceFrontend};

/// The ids one map holds (backend ids, rev-NAT indexes: keys of either family's map).
pub(super) trait HeldIds {
    fn holds(&self, id: u32) -> bool;
    fn highest(&self) -> Option<u32>;
}

impl<V> HeldIds for BTreeMap<u32, V> {
    fn holds(&self, id: u32) -> bool {
        self.contains_key(&id)
    }

    fn highest(&self) -> Option<u32> {
        self.keys().next_back().copied()
    }
}

/// Hands out ids that are neither in use now nor still present in the maps (an id
/// being deleted must not be rewritten to mean something else in the same pass).
/// `in_maps` are the maps of both families holding this kind of id (one id space),
/// by reference: no copy of 100k keys.
pub(super) struct IdAllocator<'a> {
    in_maps: [&'a dyn HeldIds; 2],
    handed_out: BTreeSet<u32>,
    next: u32,
    max: u32,
    wrapped: bool,
}

impl<'a> IdAllocator<'a> {
    /// Starts above the highest id in use (O(1) per id while ids last), and wraps to
    /// the gaps from 1 once `max` is reached.
    pub(super) fn new(in_maps: [&'a dyn HeldIds; 2], max: u32) -> Self {
        let next = match in_maps.iter().filter_map(|m| m.highest()).max() {
            Some(highest) if highest < max => highest + 1,
            _ => 1,
        };
        Self {
            in_maps,
            handed_out: BTreeSet::new(),
            next,
            max,
            wrapped: false,
        }
    }

    pub(super) fn allocate(&mut self) -> Option<u32> {
        loop {
            let id = self.next;
            let free = !self.in_maps.iter().any(|m| m.holds(id)) && !self.handed_out.contains(&id);
            if id >= self.max {
                if self.wrapped {
                    return free.then(|| self.take(id));
                }
                self.wrapped = true;
                self.next = 1;
                if free {
                    return Some(self.take(id));
                }
                continue;
            }
            self.next = id + 1;
            if free {
                return Some(self.take(id));
            }
        }
    }

    fn take(&mut self, id: u32) -> u32 {
        self.handed_out.insert(id);
        id
    }
}

/// The allocators of both id spaces, shared by both families within one pass.
pub(super) struct SharedIds<'a> {
    pub(super) backend: IdAllocator<'a>,
    pub(super) rev_nat: IdAllocator<'a>,
}

impl<'a> SharedIds<'a> {
    /// New ids are in none of `written`'s maps of either family.
    pub(super) fn new(written: &'a MapContents, budget: &Budget) -> Self {
        Self {
            backend: IdAllocator::new([&written.backends, &written.backends6], u32::MAX),
            rev_nat: IdAllocator::new(
                [&written.rev_nat, &written.rev_nat6],
                budget.rev_nat_index_max(),
            ),
        }
    }
}

/// The key of the first entry holding each of `wanted`'s values, in one pass.
pub(super) fn keys_of<K: Copy, V: Ord + Copy>(
    map: &BTreeMap<K, V>,
    wanted: &BTreeSet<V>,
) -> BTreeMap<V, K> {
    let mut found = BTreeMap::new();
    if wanted.is_empty() {
        return found;
    }
    for (key, value) in map {
        if wanted.contains(value) {
            found.entry(*value).or_insert(*key);
        }
    }
    found
}

/// The ids `maps` give the backends and frontends of `services` (family `A`).
#[allow(clippy::type_complexity)]
pub(super) fn ids_of<A: LbFamily>(
    services: &BTreeMap<L4Addr<A>, ServiceFrontend<A>>,
    maps: &MapContents,
) -> (BTreeMap<A::Backend, u32>, BTreeMap<A::RevNat, u32>) {
    let wanted_backends: BTreeSet<A::Backend> = services
        .values()
        .flat_map(|service| {
            let in_cluster = service.in_cluster.iter();
            service
                .backends
                .iter()
                .chain(&service.terminating)
                .chain(in_cluster.flat_map(|c| c.backends.iter().chain(&c.terminating)))
                .map(A::backend_value)
        })
        .collect();
    let wanted_rev_nat: BTreeSet<A::RevNat> = services.keys().map(A::rev_nat_value).collect();
    (
        keys_of(A::backends(maps), &wanted_backends),
        keys_of(A::rev_nat(maps), &wanted_rev_nat),
    )
}

/// The id the maps already use for a value, if any.
pub(super) type IdOf<'a, V> = Box<dyn Fn(&V) -> Option<u32> + 'a>;

/// How to find the id the maps already use for a value of family `A`.
pub(super) struct ExistingIds<'a, A: LbFamily> {
    pub(super) backend: IdOf<'a, A::Backend>,
    pub(super) rev_nat: IdOf<'a, A::RevNat>,
}

/// A map without room for a frontend's new entries.
pub(super) struct FullMap {
    pub(super) name: &'static str,
    pub(super) capacity: usize,
    /// What is left is the reserve, which this frontend may not take.
    pub(super) reserved: bool,
}

/// What is left of each capacity while a plan is made.
pub(super) struct Budget {
    left: Capacities,
    total: Capacities,
}

impl Budget {
    /// Room left in maps holding `maps`.
    pub(super) fn after(capacities: &Capacities, maps: &MapContents) -> Self {
        Self {
            left: Capacities {
                services: capacities.services.saturating_sub(maps.services.len()),
                backends: capacities.backends.saturating_sub(maps.backends.len()),
                rev_nat: capacities.rev_nat.saturating_sub(maps.rev_nat.len()),
                services6: capacities.services6.saturating_sub(maps.services6.len()),
                backends6: capacities.backends6.saturating_sub(maps.backends6.len()),
                rev_nat6: capacities.rev_nat6.saturating_sub(maps.rev_nat6.len()),
            },
            total: *capacities,
        }
    }

    /// Why a frontend of family `A` needing these new entries does not fit, if it
    /// does not; one that may not use the reserve (`may_use_reserve` false) must
    /// leave it free.
    pub(super) fn refuse<A: LbFamily>(
        &self,
        services: usize,
        backends: usize,
        rev_nat: usize,
        may_use_reserve: bool,
    ) -> Option<FullMap> {
        let needs = [services, backends, rev_nat];
        let left = A::capacities(&self.left);
        let total = A::capacities(&self.total);
        (0..3).find_map(|map| {
            let reserve = if may_use_reserve {
                0
            } else {
                total[map].0 / RESERVE_DIVISOR
            };
            (needs[map] > left[map].0.saturating_sub(reserve)).then_some(FullMap {
                name: total[map].1,
                capacity: total[map].0,
                reserved: needs[map] <= left[map].0,
            })
        })
    }

    /// The highest rev-NAT index to hand out: the capacity of both families' maps
    /// (one id space), so a free index exists whenever the budget lets a new
    /// frontend in.
    pub(super) fn rev_nat_index_max(&self) -> u32 {
        u32::try_from(self.total.rev_nat + self.total.rev_nat6).unwrap_or(u32::MAX)
    }

    pub(super) fn take<A: LbFamily>(&mut self, services: usize, backends: usize, rev_nat: usize) {
        for (left, taken) in A::capacities_mut(&mut self.left)
            .into_iter()
            .zip([services, backends, rev_nat])
        {
            *left -= taken;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use super::*;
    use crate::model::{L4Addr, ServiceFrontend, SkipReason};
    use std::net::Ipv4Addr;

    #[test]
    fn ids_are_kept_for_unchanged_backends_and_not_reused_within_a_pass() {
        let vip = tcp("10.96.0.10", 80);
        let (first, ops) = plan(
            &state(&[(vip, &[tcp("10.244.0.1", 80), tcp("10.244.0.2", 80)])]),
            &MapContents::default(),
        );
        let mut maps = MapContents::default();
        apply(&mut maps, &ops);
        let id_of = |maps: &MapContents, ip: &str| {
            let octets = ip.parse::<Ipv4Addr>().unwrap().octets();
            maps.backends
                .iter()
                .find(|(_, b)| b.address == octets)
                .map(|(id, _)| *id)
        };
        let kept = id_of(&first, "10.244.0.2").unwrap();
        let removed = id_of(&first, "10.244.0.1").unwrap();
        // Replace .1 by .3: .2 keeps its id, .3 must not take .1's id while .1 is
        // still in the maps.
        let (second, ops) = plan(
            &state(&[(vip, &[tcp("10.244.0.2", 80), tcp("10.244.0.3", 80)])]),
            &maps,
        );
        assert_eq!(id_of(&second, "10.244.0.2"), Some(kept));
        assert_ne!(id_of(&second, "10.244.0.3"), Some(removed));
        assert_eq!(removed_backends(&ops), BTreeSet::from([removed]));
    }

    /// A full map fails one Service port loudly (unlike cilium#12815) and
    /// the others keep working; nothing is half-written, and the sync goes on.
    #[test]
    fn services_that_do_not_fit_are_skipped_whole_naming_the_map() {
        let b = |n: u8| tcp(&format!("10.244.0.{n}"), 8080);
        let vip = |n: u8| tcp(&format!("10.96.0.{n}"), 80);
        let settings = NodeSettings {
            capacities: Capacities {
                services: 8,
                ..Capacities::default()
            },
            ..NodeSettings::default()
        };
        let s = state(&[
            (vip(1), &[b(1), b(2), b(3)]),
            (vip(2), &[b(4), b(5), b(6)]),
            (vip(3), &[b(7), b(8), b(9)]),
        ]);
        let (desired, skipped) =
            desired_contents(&s, &BTreeMap::new(), &MapContents::default(), &settings);
        assert_eq!(desired.services.len(), 8);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].object, vip(3).to_string());
        assert_eq!(
            skipped[0].reason,
            SkipReason::MapFull {
                map: "ferrite_service",
                capacity: 8,
                kept: false,
                reserved: false,
            }
        );
        // The text the agent logs (end-to-end tests look for it).
        assert!(skipped[0]
            .reason
            .to_string()
            .contains("ferrite_service is full (8 entries)"));
        let mut maps = MapContents::default();
        apply_checking_each_step(&mut maps, &diff(&MapContents::default(), &desired));
        // Incrementally too: a new port does not fit until another one leaves.
        let written = Written::new(maps.clone());
        let only = |f: L4Addr| -> BTreeMap<L4Addr, ServiceFrontend> {
            [(f, s.services[&f].clone())].into()
        };
        let (ops, skipped) = update_v4(
            &written,
            &[vip(3)].into(),
            &only(vip(3)),
            &settings.capacities,
        );
        assert!(ops.is_empty() && skipped.len() == 1, "{ops:?} {skipped:?}");
        // vip(1) goes: its room is free once its removal is written, so vip(3) fits
        // on the next update (writes come before removals within one).
        let (ops, skipped) = update_v4(
            &written,
            &[vip(1), vip(3)].into(),
            &only(vip(3)),
            &settings.capacities,
        );
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        apply_checking_each_step(&mut maps, &ops);
        assert_eq!(maps.services.len(), 4);
        let (ops, skipped) = update_v4(
            &Written::new(maps.clone()),
            &[vip(3)].into(),
            &only(vip(3)),
            &settings.capacities,
        );
        assert!(skipped.is_empty(), "{skipped:?}");
        apply_checking_each_step(&mut maps, &ops);
        assert_eq!(maps.services.len(), 8);
        // A working port that would grow past the capacity keeps its old backends.
        let grown = state(&[
            (vip(2), &[b(4), b(5), b(6), b(10)]),
            (vip(3), &[b(7), b(8), b(9)]),
        ]);
        let (desired, skipped) = desired_contents(&grown, &BTreeMap::new(), &maps, &settings);
        assert!(
            matches!(skipped[0].reason, SkipReason::MapFull { kept: true, .. }),
            "{skipped:?}"
        );
        assert!(
            skipped[0].reason.to_string().contains("its backends stay"),
            "{skipped:?}"
        );
        let before = meaning(&maps);
        let ops = diff(&maps, &desired);
        apply_checking_each_step(&mut maps, &ops);
        assert_eq!(meaning(&maps), before);
    }

    /// Two huge Services of one namespace, their frontends sorting first, can take
    /// most of a map but not the reserve: kube-dns (small, and kube-system's) and a
    /// small Service still fit after them.
    #[test]
    fn huge_services_leave_the_reserve_to_small_ones_and_kube_system() {
        let settings = NodeSettings {
            capacities: Capacities {
                backends: 800,
                ..Capacities::default()
            },
            ..NodeSettings::default()
        };
        let backends = |first: u32, count: u32| -> Vec<L4Addr> {
            (first..first + count)
                .map(|n| {
                    tcp(
                        &Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + n).to_string(),
                        80,
                    )
                })
                .collect()
        };
        let (huge1, huge2, more) = (backends(0, 350), backends(350, 350), backends(700, 70));
        let mut s = state(&[
            (tcp("10.96.0.1", 80), &huge1),
            (tcp("10.96.0.2", 80), &huge2),
            (tcp("10.96.0.3", 80), &more),
            (tcp("10.96.0.10", 53), &backends(800, 2)),
            (tcp("10.96.0.20", 80), &backends(810, 3)),
        ]);
        let dns = s.services.get_mut(&tcp("10.96.0.10", 53)).unwrap();
        dns.service.namespace = "kube-system".into();
        let (desired, skipped) =
            desired_contents(&s, &BTreeMap::new(), &MapContents::default(), &settings);
        // 350 + 350 = 700 of 800: the reserve (100) is all that is left, and the
        // 70-backend frontend is not small, so it does not get it.
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].object, "10.96.0.3:80/TCP");
        assert!(matches!(
            skipped[0].reason,
            SkipReason::MapFull { reserved: true, .. }
        ));
        assert!(
            skipped[0]
                .reason
                .to_string()
                .contains("kept for small Services"),
            "{}",
            skipped[0].reason
        );
        for kept in ["10.96.0.10", "10.96.0.20"] {
            let ip: Ipv4Addr = kept.parse().unwrap();
            assert!(
                desired.services.keys().any(|k| k.address == ip.octets()),
                "{kept}"
            );
        }
        assert_eq!(desired.backends.len(), 705);
    }
}
