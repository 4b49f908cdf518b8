//! Helpers shared by the plan's unit tests.
use std::collections::BTreeMap;

use ferrite_common::{Backend, RevNatValue, ServiceKey};

use super::lb_family::LbFamily;
use super::*;
use crate::model::{DesiredState, L4Addr, Protocol, ServiceFrontend, ServiceRef};

pub(super) fn tcp(ip: &str, port: u16) -> L4Addr {
    L4Addr {
        ip: ip.parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
    }
}

pub(super) fn state(services: &[(L4Addr, &[L4Addr])]) -> DesiredState {
    let mut state = DesiredState::default();
    for (frontend, backends) in services {
        state.services.insert(
            *frontend,
            ServiceFrontend {
                service: ServiceRef {
                    namespace: "default".into(),
                    name: frontend.to_string(),
                },
                name: frontend.to_string(),
                backends: backends.to_vec(),
                ..ServiceFrontend::default()
            },
        );
    }
    state
}

pub(super) fn plan(state: &DesiredState, current: &MapContents) -> (MapContents, Vec<Op>) {
    let (desired, skipped) =
        desired_contents(state, &BTreeMap::new(), current, &NodeSettings::default());
    assert!(skipped.is_empty(), "{skipped:?}");
    let ops = diff(current, &desired);
    (desired, ops)
}

pub(super) fn apply(current: &mut MapContents, ops: &[Op]) {
    current.apply(ops);
}

/// What the datapath relies on after every single write, in both families' maps:
/// each master entry's slots exist and point at existing backends, and its rev-NAT
/// entry exists.
pub(super) fn assert_consistent(maps: &MapContents) {
    assert_consistent_family::<std::net::Ipv4Addr>(maps);
    assert_consistent_family::<std::net::Ipv6Addr>(maps);
}

fn assert_consistent_family<A: LbFamily>(maps: &MapContents) {
    let services = A::services(maps);
    for (key, value) in services.iter().filter(|(k, _)| A::slot(k) == 0) {
        assert!(
            A::rev_nat(maps).contains_key(&value.rev_nat_index),
            "{key:?}"
        );
        for slot in 1..=value.count {
            let slot_key = A::at(key, A::scope(key), slot);
            let slot_value = services.get(&slot_key).expect("slot missing");
            assert!(A::backends(maps).contains_key(&slot_value.backend_id));
        }
    }
}

pub(super) fn tcp6(ip: &str, port: u16) -> crate::model::L4Addr6 {
    L4Addr {
        ip: ip.parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
    }
}

/// `state`'s frontends plus IPv6 ones.
pub(super) fn dual_state(
    services: &[(L4Addr, &[L4Addr])],
    services6: &[(crate::model::L4Addr6, &[crate::model::L4Addr6])],
) -> DesiredState {
    let mut state = state(services);
    for (frontend, backends) in services6 {
        state.services6.insert(
            *frontend,
            ServiceFrontend {
                service: ServiceRef {
                    namespace: "default".into(),
                    name: frontend.to_string(),
                },
                name: frontend.to_string(),
                backends: backends.to_vec(),
                ..ServiceFrontend::default()
            },
        );
    }
    state
}

pub(super) fn apply_checking_each_step(current: &mut MapContents, ops: &[Op]) {
    for op in ops {
        apply(current, std::slice::from_ref(op));
        assert_consistent(current);
    }
}

/// Frontend -> backend addresses and rev-NAT target: what the maps mean,
/// whatever ids they use.
pub(super) fn meaning(maps: &MapContents) -> BTreeMap<ServiceKey, (Vec<Backend>, RevNatValue)> {
    maps.services
        .iter()
        .filter(|(k, _)| k.backend_slot == 0)
        .map(|(key, master)| {
            let backends = (1..=master.count)
                .map(|slot| {
                    let slot = maps.services[&ServiceKey {
                        backend_slot: slot,
                        ..*key
                    }];
                    maps.backends[&slot.backend_id]
                })
                .collect();
            (*key, (backends, maps.rev_nat[&master.rev_nat_index]))
        })
        .collect()
}

/// An incremental update of IPv4 frontends only.
pub(super) fn update_v4(
    written: &Written,
    frontends: &std::collections::BTreeSet<L4Addr>,
    now: &BTreeMap<L4Addr, ServiceFrontend>,
    capacities: &Capacities,
) -> (Vec<Op>, Vec<crate::model::Skipped>) {
    service_update(
        written,
        Changed { frontends, now },
        Changed {
            frontends: &Default::default(),
            now: &Default::default(),
        },
        capacities,
    )
}
