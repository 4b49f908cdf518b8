//! The incremental update: the maps as last written, indexed so that updating some
//! Services costs time proportional to their entries, not to all of them.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use ferrite_common::{Backend, RevNatValue, ServiceKey, ServiceValue};

use super::{
    diff,
    ids::{Budget, ExistingIds},
    service_entries::{keep_as_written, service_contents},
    Capacities, MapContents, Op,
};
use crate::model::{L4Addr, ServiceFrontend, Skipped};

/// The maps as last written, with the reverse indexes an incremental update needs to
/// stay O(changed): the id of each value, and how many entries use each id.
#[derive(Clone, Debug, Default)]
pub struct Written {
    pub contents: MapContents,
    backend_id_of: HashMap<Backend, u32>,
    rev_nat_of: HashMap<RevNatValue, u32>,
    /// Backend id -> slots naming it; rev-NAT index -> masters naming it.
    backend_users: HashMap<u32, u32>,
    rev_nat_users: HashMap<u32, u32>,
}

impl Written {
    pub fn new(contents: MapContents) -> Self {
        let mut written = Self::default();
        let ops: Vec<Op> = contents
            .backends
            .iter()
            .map(|(k, v)| Op::PutBackend(*k, *v))
            .chain(contents.rev_nat.iter().map(|(k, v)| Op::PutRevNat(*k, *v)))
            .chain(
                contents
                    .services
                    .iter()
                    .map(|(k, v)| Op::PutService(*k, *v)),
            )
            .collect();
        written.apply(&ops);
        written.contents = contents;
        written
    }

    /// Record `ops` as written, keeping the indexes in step.
    pub fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            match *op {
                Op::PutBackend(id, value) => {
                    if let Some(old) = self.contents.backends.insert(id, value) {
                        self.forget_backend(id, old);
                    }
                    self.backend_id_of.entry(value).or_insert(id);
                }
                Op::DeleteBackend(id) => {
                    if let Some(old) = self.contents.backends.remove(&id) {
                        self.forget_backend(id, old);
                    }
                }
                Op::PutRevNat(index, value) => {
                    if let Some(old) = self.contents.rev_nat.insert(index, value) {
                        self.forget_rev_nat(index, old);
                    }
                    self.rev_nat_of.entry(value).or_insert(index);
                }
                Op::DeleteRevNat(index) => {
                    if let Some(old) = self.contents.rev_nat.remove(&index) {
                        self.forget_rev_nat(index, old);
                    }
                }
                Op::PutService(key, value) => {
                    if let Some(old) = self.contents.services.insert(key, value) {
                        self.forget_service(&key, &old);
                    }
                    if key.backend_slot == 0 {
                        add_user(&mut self.rev_nat_users, value.rev_nat_index);
                    } else {
                        add_user(&mut self.backend_users, value.backend_id);
                    }
                }
                Op::DeleteService(key) => {
                    if let Some(old) = self.contents.services.remove(&key) {
                        self.forget_service(&key, &old);
                    }
                }
                other => self.contents.apply(&[other]),
            }
        }
    }

    fn forget_backend(&mut self, id: u32, value: Backend) {
        if self.backend_id_of.get(&value) == Some(&id) {
            self.backend_id_of.remove(&value);
        }
    }

    fn forget_rev_nat(&mut self, index: u32, value: RevNatValue) {
        if self.rev_nat_of.get(&value) == Some(&index) {
            self.rev_nat_of.remove(&value);
        }
    }

    fn forget_service(&mut self, key: &ServiceKey, old: &ServiceValue) {
        if key.backend_slot == 0 {
            remove_user(&mut self.rev_nat_users, old.rev_nat_index);
        } else {
            remove_user(&mut self.backend_users, old.backend_id);
        }
    }
}

fn add_user<K: Eq + std::hash::Hash>(users: &mut HashMap<K, u32>, key: K) {
    *users.entry(key).or_default() += 1;
}

fn remove_user<K: Eq + std::hash::Hash>(users: &mut HashMap<K, u32>, key: K) {
    if let std::collections::hash_map::Entry::Occupied(mut entry) = users.entry(key) {
        *entry.get_mut() -= 1;
        if *entry.get() == 0 {
            entry.remove();
        }
    }
}

/// The writes for an incremental update of some Services, in time proportional to
/// their entries: `frontends` are all the frontends those Services had (in
/// `written`) or have now, `now` the ones they have now with their backends. The
/// same ordered diff as a full sync, over just these entries; a backend or rev-NAT
/// entry that another Service still uses is never removed.
pub fn service_update(
    written: &Written,
    frontends: &BTreeSet<L4Addr>,
    now: &BTreeMap<L4Addr, ServiceFrontend>,
    capacities: &Capacities,
) -> (Vec<Op>, Vec<Skipped>) {
    let maps = &written.contents;
    let mut current = MapContents {
        config: maps.config,
        ..MapContents::default()
    };
    for frontend in frontends {
        let master = ServiceKey::new(frontend.ip, frontend.port, frontend.protocol.number(), 0);
        keep_as_written(master, maps, &mut current);
    }
    let mut desired = MapContents {
        config: maps.config,
        ..MapContents::default()
    };
    let mut skipped = Vec::new();
    let existing = ExistingIds {
        backend: &|value| written.backend_id_of.get(value).copied(),
        rev_nat: &|value| written.rev_nat_of.get(value).copied(),
    };
    let mut budget = Budget::after(capacities, maps);
    service_contents(
        now.iter(),
        maps,
        &existing,
        &mut budget,
        &mut desired,
        &mut skipped,
    );
    let mut ops = diff(&current, &desired);
    // Users outside these frontends keep a backend or rev-NAT entry alive.
    let ours = |pick: &dyn Fn(&ServiceKey, &ServiceValue) -> bool| {
        current.services.iter().filter(|(k, v)| pick(k, v)).count() as u32
    };
    ops.retain(|op| match op {
        Op::DeleteBackend(id) => {
            let all = written.backend_users.get(id).copied().unwrap_or(0);
            all <= ours(&|k, v| k.backend_slot != 0 && v.backend_id == *id)
        }
        Op::DeleteRevNat(index) => {
            let all = written.rev_nat_users.get(index).copied().unwrap_or(0);
            all <= ours(&|k, v| k.backend_slot == 0 && v.rev_nat_index == *index)
        }
        _ => true,
    });
    (ops, skipped)
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
        let (ops, skipped) = service_update(
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
