//! The Service entries of a set of frontends (backends, rev-NAT, slots, masters,
//! Maglev tables and source ranges), shared by the full and the incremental plan,
//! written once for both families.
use std::collections::{BTreeMap, BTreeSet};

use ferrite_common::{service_scope, svc_flag, ServiceKey};

use super::{
    backend_value,
    ids::{Budget, ExistingIds, SharedIds},
    maglev_digest, FrontendEntries, LbFamily, MapContents, SourceRange,
};
use crate::model::{FrontendKind, L4Addr, ServiceFrontend, SkipReason, Skipped};

/// Write the Service entries (backends, rev-NAT, slots, masters) of `services`, of
/// family `A`, into `out`. Ids already in `written` (all the maps hold) are kept for
/// the same value; new ones come from `ids`, shared by both families' passes.
pub(super) fn service_contents<'s, A: LbFamily>(
    services: impl Iterator<Item = (&'s L4Addr<A>, &'s ServiceFrontend<A>)>,
    written: &MapContents,
    existing: &ExistingIds<A>,
    ids: &mut SharedIds,
    budget: &mut Budget,
    out: &mut MapContents,
    skipped: &mut Vec<Skipped>,
) {
    let mut backend_id_of: BTreeMap<A::Backend, u32> = BTreeMap::new();
    let mut rev_nat_of: BTreeMap<A::RevNat, u32> = BTreeMap::new();
    for (frontend, service) in services {
        let rev = A::rev_nat_value(frontend);
        let views = views_of(service);
        let key = |scope: u8, slot: u16| A::at(&A::service_key(frontend, 0), scope, slot);
        // The model refuses larger Services; a slot number must never wrap.
        if let Some(view) = views
            .iter()
            .find(|v| v.slot_count() > crate::limits::MAX_BACKENDS_PER_PORT)
        {
            skipped.push(Skipped {
                object: service.name.clone(),
                reason: SkipReason::TooManyBackends {
                    frontend: frontend.to_string(),
                    count: view.slot_count(),
                },
            });
            continue;
        }
        // Only entries the maps do not hold yet need room: writes come before
        // removals, so what this plan removes frees its room for the next one.
        let new_entries: usize = views
            .iter()
            .map(|view| {
                (0..=view.slot_count() as u16)
                    .filter(|slot| !A::services(written).contains_key(&key(view.scope, *slot)))
                    .count()
            })
            .sum();
        let new_rev_nat =
            usize::from(!rev_nat_of.contains_key(&rev) && (existing.rev_nat)(&rev).is_none());
        let new_backends = views
            .iter()
            .flat_map(|view| view.ready.iter().chain(view.terminating))
            .map(A::backend_value)
            .collect::<BTreeSet<_>>()
            .iter()
            .filter(|b| !backend_id_of.contains_key(*b) && (existing.backend)(b).is_none())
            .count();
        let largest = views.iter().map(View::slot_count).max().unwrap_or(0);
        let may_use_reserve = largest <= crate::limits::SMALL_FRONTEND_BACKENDS
            || service.service.namespace == "kube-system";
        if let Some(full) =
            budget.refuse::<A>(new_entries, new_backends, new_rev_nat, may_use_reserve)
        {
            // A port already in the maps keeps what it has: it goes on working.
            let kept = keep_as_written::<A>(key(service_scope::ALL, 0), written, out);
            skipped.push(Skipped {
                object: service.name.clone(),
                reason: SkipReason::MapFull {
                    map: full.name,
                    capacity: full.capacity,
                    kept,
                    reserved: full.reserved,
                },
            });
            continue;
        }
        budget.take::<A>(new_entries, new_backends, new_rev_nat);
        let rev_nat_index = match rev_nat_of.get(&rev) {
            Some(index) => *index,
            None => match (existing.rev_nat)(&rev).or_else(|| ids.rev_nat.allocate()) {
                Some(index) => {
                    rev_nat_of.insert(rev, index);
                    A::rev_nat_mut(out).insert(index, rev);
                    index
                }
                None => {
                    skipped.push(Skipped {
                        object: service.name.clone(),
                        reason: SkipReason::NoRevNatIndex,
                    });
                    continue;
                }
            },
        };
        // Ready backends fill slots 1..=count, which new flows pick from; terminating
        // ones follow after `count`: no new flow picks them, but the maps say which
        // frontend they still serve (their flows' conntrack entries name their id).
        let mut view_slots = Vec::with_capacity(views.len());
        for view in &views {
            let mut slots = Vec::with_capacity(view.slot_count());
            for addr in view.ready.iter().chain(view.terminating) {
                let value = A::backend_value(addr);
                let id = match backend_id_of.get(&value) {
                    Some(id) => Some(*id),
                    None => (existing.backend)(&value).or_else(|| ids.backend.allocate()),
                };
                let Some(id) = id else {
                    skipped.push(Skipped {
                        object: service.name.clone(),
                        reason: SkipReason::NoBackendId(addr.to_string()),
                    });
                    break;
                };
                backend_id_of.insert(value, id);
                slots.push(id);
            }
            if slots.len() != view.slot_count() {
                break;
            }
            view_slots.push(slots);
        }
        if view_slots.len() != views.len() {
            continue;
        }
        for (view, slots) in views.iter().zip(&view_slots) {
            let entries = FrontendEntries::<A> {
                frontend: *frontend,
                scope: view.scope,
                rev_nat_index,
                backend_ids: slots,
                ready: u16::try_from(view.ready.len()).expect("bounded above"),
                flags: view.flags,
                affinity_timeout_s: service.affinity_timeout_s,
            };
            // Only clients from outside use Maglev (the in-cluster scope hashes);
            // only IPv4 frontends have that path.
            let external = A::external_key(&entries.master()).zip(A::external_frontend(service));
            match external {
                Some((master, service)) if view.scope == service_scope::ALL => {
                    external_entries(master, service, out)
                }
                _ => {}
            }
            entries.write_into(out);
        }
    }
    for (value, id) in backend_id_of {
        A::backends_mut(out).insert(id, value);
    }
}

/// The Maglev table and source ranges of an external IPv4 frontend's `master`.
fn external_entries(master: ServiceKey, service: &ServiceFrontend, out: &mut MapContents) {
    if service.kind.is_external() && !service.backends.is_empty() {
        let digest = maglev_digest(service.backends.iter().map(backend_value));
        out.maglev.insert(master, digest);
    }
    for range in &service.source_ranges {
        out.source_ranges.insert(SourceRange {
            frontend: master,
            network: range.network().octets(),
            prefix_len: range.prefix_len() as u32,
        });
    }
}

/// The entries of one scope of a frontend.
struct View<'s, A> {
    scope: u8,
    ready: &'s [L4Addr<A>],
    terminating: &'s [L4Addr<A>],
    flags: u32,
}

impl<A> View<'_, A> {
    fn slot_count(&self) -> usize {
        self.ready.len() + self.terminating.len()
    }
}

/// Every client's entries and, for a frontend whose in-cluster clients use other
/// backends (`externalTrafficPolicy: Local`), theirs.
fn views_of<A: LbFamily>(service: &ServiceFrontend<A>) -> Vec<View<'_, A>> {
    let flags = service_flags(service);
    let mut views = vec![View {
        scope: service_scope::ALL,
        ready: &service.backends,
        terminating: &service.terminating,
        flags,
    }];
    if let Some(in_cluster) = &service.in_cluster {
        views[0].flags |= svc_flag::IN_CLUSTER_SCOPE;
        views.push(View {
            scope: service_scope::IN_CLUSTER,
            ready: &in_cluster.backends,
            terminating: &in_cluster.terminating,
            flags: flags & !svc_flag::LOCAL_ONLY,
        });
    }
    views
}

/// The same for both families: an IPv6 frontend with `SOURCE_RANGES` has no
/// `ferrite_srcrng` entries, so a path of clients from outside would admit none.
fn service_flags<A: LbFamily>(service: &ServiceFrontend<A>) -> u32 {
    let mut flags = 0;
    if service.kind.is_external() {
        flags |= svc_flag::EXTERNAL;
    }
    if service.local_only {
        flags |= svc_flag::LOCAL_ONLY;
    }
    if service.kind == FrontendKind::NodePort {
        flags |= svc_flag::NODE_PORT;
    }
    if !service.source_ranges.is_empty() {
        flags |= svc_flag::SOURCE_RANGES;
    }
    flags
}

/// Copy a frontend's entries (masters and slots of every scope, their backends and
/// rev-NAT entry) from `written` into `out` unchanged. Returns whether it had any.
pub(super) fn keep_as_written<A: LbFamily>(
    master: A::ServiceKey,
    written: &MapContents,
    out: &mut MapContents,
) -> bool {
    let (first, last) = A::frontend_range(&master);
    let mut any = false;
    for (key, value) in A::services(written).range(first..=last) {
        any = true;
        A::services_mut(out).insert(*key, *value);
        if A::slot(key) == 0 {
            if let Some(rev) = A::rev_nat(written).get(&value.rev_nat_index) {
                A::rev_nat_mut(out).insert(value.rev_nat_index, *rev);
            }
        } else if let Some(backend) = A::backends(written).get(&value.backend_id) {
            A::backends_mut(out).insert(value.backend_id, *backend);
        }
    }
    if let Some(master) = A::external_key(&first) {
        if let Some(digest) = written.maglev.get(&master) {
            out.maglev.insert(master, *digest);
        }
        out.source_ranges.extend(
            written
                .source_ranges
                .iter()
                .filter(|r| r.frontend == master)
                .copied(),
        );
    }
    any
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use super::*;
    use ferrite_common::PROTO_TCP;

    #[test]
    fn terminating_backends_keep_slots_after_count_which_new_flows_never_pick() {
        let vip = tcp("10.96.0.10", 80);
        let (ready, terminating) = (tcp("10.244.0.2", 8080), tcp("10.244.0.3", 8080));
        let mut s = state(&[(vip, &[ready])]);
        s.services.get_mut(&vip).unwrap().terminating = vec![terminating];
        let (desired, _) = plan(&s, &MapContents::default());
        let key = |slot| ServiceKey::new(vip.ip, 80, PROTO_TCP, slot);
        assert_eq!(
            desired.services[&key(0)].count,
            1,
            "new flows pick slot 1 only"
        );
        let backend_of = |slot| desired.backends[&desired.services[&key(slot)].backend_id];
        assert_eq!(backend_of(1).address, ready.ip.octets());
        assert_eq!(backend_of(2).address, terminating.ip.octets());
        assert_eq!(desired.services.len(), 3);
    }

    #[test]
    fn a_local_frontend_gives_in_cluster_clients_every_endpoint_under_its_own_scope() {
        let node_port = tcp("198.51.100.1", 30080);
        let (here, there) = (tcp("10.244.0.2", 8080), tcp("10.244.1.2", 8080));
        let mut s = state(&[(node_port, &[])]);
        let frontend = s.services.get_mut(&node_port).unwrap();
        frontend.kind = FrontendKind::NodePort;
        frontend.local_only = true;
        frontend.in_cluster = Some(crate::model::InClusterBackends {
            backends: vec![here, there],
            terminating: vec![],
        });
        let (desired, _) = plan(&s, &MapContents::default());
        let key =
            |scope, slot| ServiceKey::new(node_port.ip, 30080, PROTO_TCP, slot).in_scope(scope);
        let own = desired.services[&key(service_scope::ALL, 0)];
        assert_eq!(own.count, 0, "no local endpoint for clients from outside");
        assert_ne!(own.flags & svc_flag::LOCAL_ONLY, 0);
        assert_ne!(own.flags & svc_flag::IN_CLUSTER_SCOPE, 0);
        let in_cluster = desired.services[&key(service_scope::IN_CLUSTER, 0)];
        assert_eq!(in_cluster.count, 2);
        assert_eq!(
            in_cluster.rev_nat_index, own.rev_nat_index,
            "replies read the same"
        );
        assert_eq!(
            in_cluster.flags & (svc_flag::LOCAL_ONLY | svc_flag::IN_CLUSTER_SCOPE),
            0
        );
        let backend_of = |slot| {
            desired.backends[&desired.services[&key(service_scope::IN_CLUSTER, slot)].backend_id]
        };
        assert_eq!(backend_of(1).address, here.ip.octets());
        assert_eq!(backend_of(2).address, there.ip.octets());
        // A backend leaving the local endpoints but still serving in-cluster clients
        // keeps its flows; leaving both ends them.
        let mut local_gone = s.clone();
        local_gone.services.get_mut(&node_port).unwrap().in_cluster =
            Some(crate::model::InClusterBackends {
                backends: vec![there],
                terminating: vec![],
            });
        let (_, ops) = plan(&local_gone, &desired);
        let ended = ended_pairs(&desired, &ops);
        let here_id = desired.services[&key(service_scope::IN_CLUSTER, 1)].backend_id;
        assert_eq!(ended, [(own.rev_nat_index, here_id)].into());
        let mut with_local = s.clone();
        with_local.services.get_mut(&node_port).unwrap().backends = vec![there];
        let (before, _) = plan(&with_local, &desired);
        let (_, ops) = plan(&s, &before);
        assert!(!ops.is_empty());
        assert!(ended_pairs(&before, &ops).is_empty(), "{ops:?}");
    }

    #[test]
    fn a_backend_shared_by_two_services_is_written_once() {
        let shared = tcp("10.244.0.9", 80);
        let (desired, _) = plan(
            &state(&[
                (tcp("10.96.0.1", 80), &[shared]),
                (tcp("10.96.0.2", 80), &[shared]),
            ]),
            &MapContents::default(),
        );
        assert_eq!(desired.backends.len(), 1);
        assert_eq!(desired.rev_nat.len(), 2);
    }

    #[test]
    fn rev_nat_indexes_go_past_16_bits_when_the_map_holds_more() {
        let settings = NodeSettings {
            capacities: Capacities {
                rev_nat: 100_000,
                ..Capacities::default()
            },
            ..NodeSettings::default()
        };
        let backend = tcp("10.244.0.9", 80);
        let first = tcp("10.96.0.1", 80);
        let second = tcp("10.96.0.2", 80);
        let no_policies = BTreeMap::new();
        let one = state(&[(first, &[backend])]);
        let (mut written, _) =
            desired_contents(&one, &no_policies, &MapContents::default(), &settings);
        // As if 65,534 frontends had come before it: the highest 16-bit index.
        let (index, rev) = written.rev_nat.pop_first().unwrap();
        written.rev_nat.insert(65_535, rev);
        for value in written.services.values_mut() {
            if value.rev_nat_index == index {
                value.rev_nat_index = 65_535;
            }
        }
        let both = state(&[(first, &[backend]), (second, &[backend])]);
        let (desired, skipped) = desired_contents(&both, &no_policies, &written, &settings);
        assert!(skipped.is_empty(), "{skipped:?}");
        let master = |frontend: L4Addr| {
            desired.services[&ServiceKey::new(frontend.ip, frontend.port, PROTO_TCP, 0)]
        };
        assert_eq!(master(first).rev_nat_index, 65_535);
        assert_eq!(master(second).rev_nat_index, 65_536);
        let ops = diff(&written, &desired);
        assert!(
            ops.contains(&Op::PutRevNat(65_536, rev_nat_value(&second))),
            "{ops:?}"
        );
        assert_consistent(&desired);
    }
}
