//! The incremental update: the maps as last written, indexed so that updating some
//! Services costs time proportional to their entries, not to all of them.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::Hash,
    net::{Ipv4Addr, Ipv6Addr},
};

use ferrite_common::ServiceValue;

use super::{
    diff,
    ids::{Budget, ExistingIds, SharedIds},
    service_entries::{keep_as_written, service_contents},
    Capacities, LbFamily, MapContents, Op,
};
use crate::model::{L4Addr, ServiceFrontend, Skipped};

/// The maps as last written, with the reverse indexes an incremental update needs to
/// stay O(changed): the id of each value, and how many entries use each id.
#[derive(Clone, Debug, Default)]
pub struct Written {
    pub contents: MapContents,
    ids: FamilyIds<Ipv4Addr>,
    ids6: FamilyIds<Ipv6Addr>,
    /// Backend id -> slots naming it; rev-NAT index -> masters naming it (one id
    /// space for both families).
    backend_users: HashMap<u32, u32>,
    rev_nat_users: HashMap<u32, u32>,
}

/// The id of each backend and frontend value of one family.
#[derive(Clone, Debug)]
struct FamilyIds<A: LbFamily> {
    backend_id_of: HashMap<A::Backend, u32>,
    rev_nat_of: HashMap<A::RevNat, u32>,
}

impl<A: LbFamily> Default for FamilyIds<A> {
    fn default() -> Self {
        Self {
            backend_id_of: HashMap::new(),
            rev_nat_of: HashMap::new(),
        }
    }
}

/// Which family's index of [`Written`] a family uses.
trait Indexed: LbFamily {
    fn ids(written: &Written) -> &FamilyIds<Self>;
    fn ids_mut(written: &mut Written) -> &mut FamilyIds<Self>;
}

impl Indexed for Ipv4Addr {
    fn ids(written: &Written) -> &FamilyIds<Self> {
        &written.ids
    }

    fn ids_mut(written: &mut Written) -> &mut FamilyIds<Self> {
        &mut written.ids
    }
}

impl Indexed for Ipv6Addr {
    fn ids(written: &Written) -> &FamilyIds<Self> {
        &written.ids6
    }

    fn ids_mut(written: &mut Written) -> &mut FamilyIds<Self> {
        &mut written.ids6
    }
}

impl Written {
    pub fn new(contents: MapContents) -> Self {
        let mut written = Self::default();
        written.apply(&all_puts::<Ipv4Addr>(&contents));
        written.apply(&all_puts::<Ipv6Addr>(&contents));
        written.contents = contents;
        written
    }

    /// Record `ops` as written, keeping the indexes in step.
    pub fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            if !(self.index::<Ipv4Addr>(op) || self.index::<Ipv6Addr>(op)) {
                self.contents.apply(std::slice::from_ref(op));
            }
        }
    }

    /// Record `op` if it writes family `A`'s Service maps; whether it did.
    fn index<A: Indexed>(&mut self, op: &Op) -> bool {
        if let Some((key, value)) = A::service_write(op) {
            let old = match value {
                Some(value) => {
                    if A::slot(&key) == 0 {
                        add_user(&mut self.rev_nat_users, value.rev_nat_index);
                    } else {
                        add_user(&mut self.backend_users, value.backend_id);
                    }
                    A::services_mut(&mut self.contents).insert(key, value)
                }
                None => A::services_mut(&mut self.contents).remove(&key),
            };
            if let Some(old) = old {
                self.forget_service::<A>(&key, &old);
            }
            return true;
        }
        if let Some((id, value)) = A::backend_write(op) {
            let backends = A::backends_mut(&mut self.contents);
            let old = match value {
                Some(value) => backends.insert(id, value),
                None => backends.remove(&id),
            };
            let id_of = &mut A::ids_mut(self).backend_id_of;
            if let Some(old) = old {
                forget(id_of, old, id);
            }
            if let Some(value) = value {
                id_of.entry(value).or_insert(id);
            }
            return true;
        }
        if let Some((index, value)) = A::rev_nat_write(op) {
            let rev_nat = A::rev_nat_mut(&mut self.contents);
            let old = match value {
                Some(value) => rev_nat.insert(index, value),
                None => rev_nat.remove(&index),
            };
            let index_of = &mut A::ids_mut(self).rev_nat_of;
            if let Some(old) = old {
                forget(index_of, old, index);
            }
            if let Some(value) = value {
                index_of.entry(value).or_insert(index);
            }
            return true;
        }
        false
    }

    fn forget_service<A: LbFamily>(&mut self, key: &A::ServiceKey, old: &ServiceValue) {
        if A::slot(key) == 0 {
            remove_user(&mut self.rev_nat_users, old.rev_nat_index);
        } else {
            remove_user(&mut self.backend_users, old.backend_id);
        }
    }
}

/// Every entry of family `A`'s Service maps in `contents`, as the puts writing it.
fn all_puts<A: LbFamily>(contents: &MapContents) -> Vec<Op> {
    let backends = A::backends(contents).iter();
    let rev_nat = A::rev_nat(contents).iter();
    let services = A::services(contents).iter();
    backends
        .map(|(id, value)| A::put_backend(*id, *value))
        .chain(rev_nat.map(|(index, value)| A::put_rev_nat(*index, *value)))
        .chain(services.map(|(key, value)| A::put_service(*key, *value)))
        .collect()
}

/// Forget that `value` has `id`, unless another id has taken its place.
fn forget<V: Eq + Hash>(id_of: &mut HashMap<V, u32>, value: V, id: u32) {
    if id_of.get(&value) == Some(&id) {
        id_of.remove(&value);
    }
}

fn add_user<K: Eq + Hash>(users: &mut HashMap<K, u32>, key: K) {
    *users.entry(key).or_default() += 1;
}

fn remove_user<K: Eq + Hash>(users: &mut HashMap<K, u32>, key: K) {
    if let std::collections::hash_map::Entry::Occupied(mut entry) = users.entry(key) {
        *entry.get_mut() -= 1;
        if *entry.get() == 0 {
            entry.remove();
        }
    }
}

/// Some Services' frontends of one family: all they had (in `written`) or have now,
/// and the ones they have now with their backends.
pub struct Changed<'a, A: LbFamily> {
    pub frontends: &'a BTreeSet<L4Addr<A>>,
    pub now: &'a BTreeMap<L4Addr<A>, ServiceFrontend<A>>,
}

/// The writes for an incremental update of some Services, in time proportional to
/// their entries: `v4` and `v6` their frontends of each family (see [`Changed`]).
/// The same ordered diff as a full sync, over just these entries; a backend or
/// rev-NAT entry that another Service still uses is never removed.
pub fn service_update(
    written: &Written,
    v4: Changed<Ipv4Addr>,
    v6: Changed<Ipv6Addr>,
    capacities: &Capacities,
) -> (Vec<Op>, Vec<Skipped>) {
    let maps = &written.contents;
    let mut current = MapContents {
        config: maps.config,
        ..MapContents::default()
    };
    for frontend in v4.frontends {
        keep_as_written::<Ipv4Addr>(Ipv4Addr::service_key(frontend, 0), maps, &mut current);
    }
    for frontend in v6.frontends {
        keep_as_written::<Ipv6Addr>(Ipv6Addr::service_key(frontend, 0), maps, &mut current);
    }
    let mut desired = MapContents {
        config: maps.config,
        ..MapContents::default()
    };
    let mut skipped = Vec::new();
    let mut budget = Budget::after(capacities, maps);
    let mut ids = SharedIds::new(maps, &budget);
    service_contents(
        v4.now.iter(),
        maps,
        &existing::<Ipv4Addr>(written),
        &mut ids,
        &mut budget,
        &mut desired,
        &mut skipped,
    );
    service_contents(
        v6.now.iter(),
        maps,
        &existing::<Ipv6Addr>(written),
        &mut ids,
        &mut budget,
        &mut desired,
        &mut skipped,
    );
    let mut ops = diff(&current, &desired);
    // Users outside these frontends keep a backend or rev-NAT entry alive.
    let ours = |pick: &dyn Fn(bool, &ServiceValue) -> bool| {
        let v4 = current.services.iter().map(|(k, v)| (k.backend_slot, v));
        let v6 = current.services6.iter().map(|(k, v)| (k.backend_slot, v));
        v4.chain(v6).filter(|(slot, v)| pick(*slot == 0, v)).count() as u32
    };
    ops.retain(|op| match op {
        Op::DeleteBackend(id) | Op::DeleteBackend6(id) => {
            let all = written.backend_users.get(id).copied().unwrap_or(0);
            all <= ours(&|master, v| !master && v.backend_id == *id)
        }
        Op::DeleteRevNat(index) | Op::DeleteRevNat6(index) => {
            let all = written.rev_nat_users.get(index).copied().unwrap_or(0);
            all <= ours(&|master, v| master && v.rev_nat_index == *index)
        }
        _ => true,
    });
    (ops, skipped)
}

/// The ids `written` gives family `A`'s values.
fn existing<A: Indexed>(written: &Written) -> ExistingIds<'_, A> {
    let ids = A::ids(written);
    ExistingIds {
        backend: Box::new(|value| ids.backend_id_of.get(value).copied()),
        rev_nat: Box::new(|value| ids.rev_nat_of.get(value).copied()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use super::*;
    use crate::model::ServiceFrontend;

    #[test]
    fn an_incremental_service_update_means_what_a_full_sync_means_and_leaves_no_garbage() {
        let b = |n: u8| tcp(&format!("10.244.0.{n}"), 8080);
        let vip = |n: u8| tcp(&format!("10.96.0.{n}"), 80);
        let before = state(&[
            (vip(1), &[b(1), b(2)]),
            (vip(2), &[b(2), b(3)]), // b(2) is shared with vip(1)
            (vip(3), &[b(4)]),
        ]);
        let (mut maps, _) = plan(&before, &MapContents::default());
        // vip(1) drops the shared b(2) and gains b(5); vip(3) goes; vip(4) arrives.
        let after = state(&[
            (vip(1), &[b(1), b(5)]),
            (vip(2), &[b(2), b(3)]),
            (vip(4), &[b(4), b(6)]),
        ]);
        let frontends: BTreeSet<L4Addr> = [vip(1), vip(3), vip(4)].into();
        let now: BTreeMap<L4Addr, ServiceFrontend> = after
            .services
            .iter()
            .filter(|(f, _)| frontends.contains(f))
            .map(|(f, s)| (*f, s.clone()))
            .collect();
        let (ops, skipped) = update_v4(
            &Written::new(maps.clone()),
            &frontends,
            &now,
            &Capacities::default(),
        );
        assert!(skipped.is_empty(), "{skipped:?}");
        apply_checking_each_step(&mut maps, &ops);
        let (full, _) = plan(&after, &MapContents::default());
        assert_eq!(meaning(&maps), meaning(&full));
        // b(2) stays (vip(2) uses it), nothing unreferenced is left behind.
        let referenced: BTreeSet<u32> = maps
            .services
            .iter()
            .filter(|(k, _)| k.backend_slot != 0)
            .map(|(_, v)| v.backend_id)
            .collect();
        assert_eq!(
            maps.backends.keys().copied().collect::<BTreeSet<_>>(),
            referenced
        );
        assert_eq!(maps.rev_nat.len(), 3);
        // Nothing of vip(2) was touched.
        assert!(ops.iter().all(|op| match op {
            Op::PutService(k, _) | Op::DeleteService(k) => k.address != vip(2).ip.octets(),
            _ => true,
        }));
        // A full resync afterwards finds nothing to change.
        let (_, resync) = plan(&after, &maps);
        assert!(resync.is_empty(), "{resync:?}");
    }
}
