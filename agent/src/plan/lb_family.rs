//! What the plan needs of an IP family's Service maps (`ferrite_service`,
//! `ferrite_backend`, `ferrite_rev_nat` and their lb6 twins): their keys and values,
//! where a map image holds them and the ops that write them, so that the Service
//! rules (ids, order, scopes, flags) are written once for both families.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ferrite_common::{
    map_names, Backend, Backend6, RevNat6Value, RevNatValue, Service6Key, ServiceKey, ServiceValue,
};

use super::{Capacities, MapContents, Op};
use crate::model::{L4Addr, ServiceFrontend};

/// The Service maps of one IP family. Backend ids and rev-NAT indexes are one id
/// space for both families: an id names one backend (one frontend) of one family.
pub trait LbFamily: crate::family::Family {
    type ServiceKey: Copy + Ord + std::fmt::Debug;
    type Backend: Copy + Ord + std::hash::Hash + std::fmt::Debug;
    type RevNat: Copy + Ord + std::hash::Hash + std::fmt::Debug;

    /// The key of `frontend`'s entry `slot` (0: its master), every client's scope.
    fn service_key(frontend: &L4Addr<Self>, slot: u16) -> Self::ServiceKey;
    /// `key` in `scope` (`service_scope`) at `slot`.
    fn at(key: &Self::ServiceKey, scope: u8, slot: u16) -> Self::ServiceKey;
    fn slot(key: &Self::ServiceKey) -> u16;
    fn scope(key: &Self::ServiceKey) -> u8;
    /// The key and the frontend as the XDP/TC path of clients from outside
    /// (Maglev tables, source ranges) knows them: IPv4 only, IPv6 has no such path
    /// yet.
    fn external_key(key: &Self::ServiceKey) -> Option<ServiceKey>;
    fn external_frontend(service: &ServiceFrontend<Self>) -> Option<&ServiceFrontend>;

    /// The frontend's address, port and protocol number.
    fn frontend_of(key: &Self::ServiceKey) -> (IpAddr, u16, u8);
    /// The backend's address, port and protocol number.
    fn backend_of(backend: &Self::Backend) -> (IpAddr, u16, u8);
    /// Human-readable frontend (logs, inspect): `10.96.0.10:80/TCP`,
    /// `[fd00::10]:80/TCP (in-cluster)`.
    fn describe(key: &Self::ServiceKey) -> String {
        let (ip, port, proto) = Self::frontend_of(key);
        super::image::describe_frontend(ip, port, proto, Self::scope(key))
    }

    fn backend_value(addr: &L4Addr<Self>) -> Self::Backend;
    fn rev_nat_value(frontend: &L4Addr<Self>) -> Self::RevNat;

    fn services(maps: &MapContents) -> &BTreeMap<Self::ServiceKey, ServiceValue>;
    fn services_mut(maps: &mut MapContents) -> &mut BTreeMap<Self::ServiceKey, ServiceValue>;
    fn backends(maps: &MapContents) -> &BTreeMap<u32, Self::Backend>;
    fn backends_mut(maps: &mut MapContents) -> &mut BTreeMap<u32, Self::Backend>;
    fn rev_nat(maps: &MapContents) -> &BTreeMap<u32, Self::RevNat>;
    fn rev_nat_mut(maps: &mut MapContents) -> &mut BTreeMap<u32, Self::RevNat>;

    fn put_service(key: Self::ServiceKey, value: ServiceValue) -> Op;
    fn delete_service(key: Self::ServiceKey) -> Op;
    fn put_backend(id: u32, value: Self::Backend) -> Op;
    fn delete_backend(id: u32) -> Op;
    fn put_rev_nat(index: u32, value: Self::RevNat) -> Op;
    fn delete_rev_nat(index: u32) -> Op;
    /// The Service entry `op` writes (`Some` value) or removes (`None`), if it is a
    /// write of this family's `ferrite_service`.
    fn service_write(op: &Op) -> Option<(Self::ServiceKey, Option<ServiceValue>)>;
    /// The same for this family's backend map.
    fn backend_write(op: &Op) -> Option<(u32, Option<Self::Backend>)>;
    /// The same for this family's rev-NAT map.
    fn rev_nat_write(op: &Op) -> Option<(u32, Option<Self::RevNat>)>;

    /// This family's Service, backend and rev-NAT maps in `capacities`, with their
    /// names.
    fn capacities(capacities: &Capacities) -> [(usize, &'static str); 3];
    fn capacities_mut(capacities: &mut Capacities) -> [&mut usize; 3];

    /// The first and the last key of every entry of `key`'s frontend, all scopes.
    fn frontend_range(key: &Self::ServiceKey) -> (Self::ServiceKey, Self::ServiceKey) {
        (Self::at(key, 0, 0), Self::at(key, u8::MAX, u16::MAX))
    }
}

impl LbFamily for Ipv4Addr {
    type ServiceKey = ServiceKey;
    type Backend = Backend;
    type RevNat = RevNatValue;

    fn capacities(c: &Capacities) -> [(usize, &'static str); 3] {
        [
            (c.services, map_names::SERVICES),
            (c.backends, map_names::BACKENDS),
            (c.rev_nat, map_names::REV_NAT),
        ]
    }

    fn capacities_mut(c: &mut Capacities) -> [&mut usize; 3] {
        [&mut c.services, &mut c.backends, &mut c.rev_nat]
    }

    fn service_key(frontend: &L4Addr, slot: u16) -> ServiceKey {
        ServiceKey::new(frontend.ip, frontend.port, frontend.protocol.number(), slot)
    }

    fn at(key: &ServiceKey, scope: u8, backend_slot: u16) -> ServiceKey {
        ServiceKey {
            scope,
            backend_slot,
            ..*key
        }
    }

    fn slot(key: &ServiceKey) -> u16 {
        key.backend_slot
    }

    fn scope(key: &ServiceKey) -> u8 {
        key.scope
    }

    fn external_key(key: &ServiceKey) -> Option<ServiceKey> {
        Some(*key)
    }

    fn external_frontend(service: &ServiceFrontend) -> Option<&ServiceFrontend> {
        Some(service)
    }

    fn frontend_of(key: &ServiceKey) -> (IpAddr, u16, u8) {
        (Ipv4Addr::from(key.address).into(), key.port, key.proto)
    }

    fn backend_of(backend: &Backend) -> (IpAddr, u16, u8) {
        let ip = Ipv4Addr::from(backend.address).into();
        (ip, backend.port, backend.proto)
    }

    fn backend_value(addr: &L4Addr) -> Backend {
        Backend {
            address: addr.ip.octets(),
            port: addr.port,
            proto: addr.protocol.number(),
            flags: 0,
        }
    }

    fn rev_nat_value(frontend: &L4Addr) -> RevNatValue {
        RevNatValue {
            address: frontend.ip.octets(),
            port: frontend.port,
            _pad: 0,
        }
    }

    fn services(maps: &MapContents) -> &BTreeMap<ServiceKey, ServiceValue> {
        &maps.services
    }

    fn services_mut(maps: &mut MapContents) -> &mut BTreeMap<ServiceKey, ServiceValue> {
        &mut maps.services
    }

    fn backends(maps: &MapContents) -> &BTreeMap<u32, Backend> {
        &maps.backends
    }

    fn backends_mut(maps: &mut MapContents) -> &mut BTreeMap<u32, Backend> {
        &mut maps.backends
    }

    fn rev_nat(maps: &MapContents) -> &BTreeMap<u32, RevNatValue> {
        &maps.rev_nat
    }

    fn rev_nat_mut(maps: &mut MapContents) -> &mut BTreeMap<u32, RevNatValue> {
        &mut maps.rev_nat
    }

    fn put_service(key: ServiceKey, value: ServiceValue) -> Op {
        Op::PutService(key, value)
    }

    fn delete_service(key: ServiceKey) -> Op {
        Op::DeleteService(key)
    }

    fn put_backend(id: u32, value: Backend) -> Op {
        Op::PutBackend(id, value)
    }

    fn delete_backend(id: u32) -> Op {
        Op::DeleteBackend(id)
    }

    fn put_rev_nat(index: u32, value: RevNatValue) -> Op {
        Op::PutRevNat(index, value)
    }

    fn delete_rev_nat(index: u32) -> Op {
        Op::DeleteRevNat(index)
    }

    fn service_write(op: &Op) -> Option<(ServiceKey, Option<ServiceValue>)> {
        match op {
            Op::PutService(key, value) => Some((*key, Some(*value))),
            Op::DeleteService(key) => Some((*key, None)),
            _ => None,
        }
    }

    fn backend_write(op: &Op) -> Option<(u32, Option<Backend>)> {
        match op {
            Op::PutBackend(id, value) => Some((*id, Some(*value))),
            Op::DeleteBackend(id) => Some((*id, None)),
            _ => None,
        }
    }

    fn rev_nat_write(op: &Op) -> Option<(u32, Option<RevNatValue>)> {
        match op {
            Op::PutRevNat(index, value) => Some((*index, Some(*value))),
            Op::DeleteRevNat(index) => Some((*index, None)),
            _ => None,
        }
    }
}

impl LbFamily for Ipv6Addr {
    type ServiceKey = Service6Key;
    type Backend = Backend6;
    type RevNat = RevNat6Value;

    fn capacities(c: &Capacities) -> [(usize, &'static str); 3] {
        [
            (c.services6, map_names::SERVICES6),
            (c.backends6, map_names::BACKENDS6),
            (c.rev_nat6, map_names::REV_NAT6),
        ]
    }

    fn capacities_mut(c: &mut Capacities) -> [&mut usize; 3] {
        [&mut c.services6, &mut c.backends6, &mut c.rev_nat6]
    }

    fn service_key(frontend: &L4Addr<Ipv6Addr>, slot: u16) -> Service6Key {
        Service6Key::new(
            frontend.ip.octets(),
            frontend.port,
            frontend.protocol.number(),
            slot,
        )
    }

    fn at(key: &Service6Key, scope: u8, backend_slot: u16) -> Service6Key {
        Service6Key {
            scope,
            backend_slot,
            ..*key
        }
    }

    fn slot(key: &Service6Key) -> u16 {
        key.backend_slot
    }

    fn scope(key: &Service6Key) -> u8 {
        key.scope
    }

    fn external_key(_: &Service6Key) -> Option<ServiceKey> {
        None
    }

    fn external_frontend(_: &ServiceFrontend<Ipv6Addr>) -> Option<&ServiceFrontend> {
        None
    }

    fn frontend_of(key: &Service6Key) -> (IpAddr, u16, u8) {
        (Ipv6Addr::from(key.address).into(), key.port, key.proto)
    }

    fn backend_of(backend: &Backend6) -> (IpAddr, u16, u8) {
        let ip = Ipv6Addr::from(backend.address).into();
        (ip, backend.port, backend.proto)
    }

    fn backend_value(addr: &L4Addr<Ipv6Addr>) -> Backend6 {
        Backend6 {
            address: addr.ip.octets(),
            port: addr.port,
            proto: addr.protocol.number(),
            flags: 0,
        }
    }

    fn rev_nat_value(frontend: &L4Addr<Ipv6Addr>) -> RevNat6Value {
        RevNat6Value {
            address: frontend.ip.octets(),
            port: frontend.port,
            _pad: 0,
        }
    }

    fn services(maps: &MapContents) -> &BTreeMap<Service6Key, ServiceValue> {
        &maps.services6
    }

    fn services_mut(maps: &mut MapContents) -> &mut BTreeMap<Service6Key, ServiceValue> {
        &mut maps.services6
    }

    fn backends(maps: &MapContents) -> &BTreeMap<u32, Backend6> {
        &maps.backends6
    }

    fn backends_mut(maps: &mut MapContents) -> &mut BTreeMap<u32, Backend6> {
        &mut maps.backends6
    }

    fn rev_nat(maps: &MapContents) -> &BTreeMap<u32, RevNat6Value> {
        &maps.rev_nat6
    }

    fn rev_nat_mut(maps: &mut MapContents) -> &mut BTreeMap<u32, RevNat6Value> {
        &mut maps.rev_nat6
    }

    fn put_service(key: Service6Key, value: ServiceValue) -> Op {
        Op::PutService6(key, value)
    }

    fn delete_service(key: Service6Key) -> Op {
        Op::DeleteService6(key)
    }

    fn put_backend(id: u32, value: Backend6) -> Op {
        Op::PutBackend6(id, value)
    }

    fn delete_backend(id: u32) -> Op {
        Op::DeleteBackend6(id)
    }

    fn put_rev_nat(index: u32, value: RevNat6Value) -> Op {
        Op::PutRevNat6(index, value)
    }

    fn delete_rev_nat(index: u32) -> Op {
        Op::DeleteRevNat6(index)
    }

    fn service_write(op: &Op) -> Option<(Service6Key, Option<ServiceValue>)> {
        match op {
            Op::PutService6(key, value) => Some((*key, Some(*value))),
            Op::DeleteService6(key) => Some((*key, None)),
            _ => None,
        }
    }

    fn backend_write(op: &Op) -> Option<(u32, Option<Backend6>)> {
        match op {
            Op::PutBackend6(id, value) => Some((*id, Some(*value))),
            Op::DeleteBackend6(id) => Some((*id, None)),
            _ => None,
        }
    }

    fn rev_nat_write(op: &Op) -> Option<(u32, Option<RevNat6Value>)> {
        match op {
            Op::PutRevNat6(index, value) => Some((*index, Some(*value))),
            Op::DeleteRevNat6(index) => Some((*index, None)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::super::test_support::*;
    use super::super::*;
    use super::*;

    /// IPv6 Services take ids from the one id space (an id never names a backend or
    /// frontend of both families), are written as consistently as IPv4's at every
    /// step, keep their ids when the agent restarts on its own maps, and what they
    /// end (removed backends, ended pairs) is purged by id like IPv4's.
    #[test]
    fn ipv6_services_share_the_id_space_and_are_written_like_ipv4_ones() {
        let vip = tcp("10.96.0.10", 80);
        let vip6 = tcp6("fd00:10:96::10", 80);
        let (b, b6) = (tcp("10.244.0.2", 8080), tcp6("fd00:10:244::2", 8080));
        let c6 = tcp6("fd00:10:244::3", 8080);
        let s = dual_state(&[(vip, &[b])], &[(vip6, &[b6, c6])]);
        let mut maps = MapContents::default();
        let (desired, ops) = plan(&s, &maps);
        apply_checking_each_step(&mut maps, &ops);
        assert_eq!(maps, desired);
        let ids = |a: Vec<&u32>, b: Vec<&u32>| {
            let all = a.len() + b.len();
            (all, a.into_iter().chain(b).collect::<BTreeSet<_>>().len())
        };
        let backend_ids = ids(
            maps.backends.keys().collect(),
            maps.backends6.keys().collect(),
        );
        assert_eq!(backend_ids, (3, 3), "one backend id space");
        let rev_nat_ids = ids(
            maps.rev_nat.keys().collect(),
            maps.rev_nat6.keys().collect(),
        );
        assert_eq!(rev_nat_ids, (2, 2), "one rev-NAT id space");
        let master6 = Ipv6Addr::service_key(&vip6, 0);
        assert_eq!(maps.services6[&master6].count, 2);
        assert!(maps.maglev.is_empty() && maps.source_ranges.is_empty());
        // The order: lb6 backends and rev-NAT before their slots, masters last.
        let position = |pick: &dyn Fn(&Op) -> bool| ops.iter().position(pick).unwrap();
        let master = position(&|op| matches!(op, Op::PutService6(k, _) if k.backend_slot == 0));
        let slot = position(&|op| matches!(op, Op::PutService6(k, _) if k.backend_slot != 0));
        let backend = position(&|op| matches!(op, Op::PutBackend6(..)));
        assert!(backend < slot && slot < master, "{ops:?}");

        // A restart on its own maps writes nothing.
        let (again, ops) = plan(&s, &maps);
        assert!(ops.is_empty(), "{ops:?}");
        assert_eq!(again, maps);
        // An lb6 entry removed behind the agent's back is drift, put back in place.
        let mut tampered = maps.clone();
        let slot1 = Ipv6Addr::service_key(&vip6, 1);
        let value = tampered.services6.remove(&slot1).unwrap();
        assert_eq!(drift(&maps, &tampered), vec![Op::PutService6(slot1, value)]);

        // c6 leaves: its id is purged, and so is its pair with the frontend.
        let c6_id = *maps
            .backends6
            .iter()
            .find(|(_, v)| v.address == c6.ip.octets())
            .unwrap()
            .0;
        let rev_nat6 = maps.services6[&master6].rev_nat_index;
        let (_, ops) = plan(&dual_state(&[(vip, &[b])], &[(vip6, &[b6])]), &maps);
        assert_eq!(removed_backends(&ops), BTreeSet::from([c6_id]));
        assert_eq!(
            ended_pairs(&maps, &ops),
            BTreeSet::from([(rev_nat6, c6_id)])
        );
        let before = maps.clone();
        apply_checking_each_step(&mut maps, &ops);

        // The IPv6 frontend goes, masters first; the IPv4 one is untouched.
        let (_, ops) = plan(&dual_state(&[(vip, &[b])], &[]), &maps);
        assert!(
            matches!(ops[0], Op::DeleteService6(k) if k.backend_slot == 0),
            "{ops:?}"
        );
        assert!(
            ops.iter().all(|op| op_map(op).starts_with("ferrite_lb6")),
            "{ops:?}"
        );
        apply_checking_each_step(&mut maps, &ops);
        assert!(maps.services6.is_empty() && maps.backends6.is_empty());
        assert!(maps.rev_nat6.is_empty());
        assert_eq!(maps.services, before.services);
    }

    /// A full IPv6 map refuses the IPv6 frontend, naming the lb6 map; IPv4 goes on.
    #[test]
    fn a_full_lb6_map_refuses_the_ipv6_frontend_alone() {
        let settings = NodeSettings {
            capacities: Capacities {
                services6: 1,
                ..Capacities::default()
            },
            ..NodeSettings::default()
        };
        let s = dual_state(
            &[(tcp("10.96.0.10", 80), &[tcp("10.244.0.2", 80)])],
            &[(tcp6("fd00:10:96::10", 80), &[tcp6("fd00:10:244::2", 80)])],
        );
        let (desired, skipped) =
            desired_contents(&s, &BTreeMap::new(), &MapContents::default(), &settings);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(
            skipped[0]
                .reason
                .to_string()
                .contains("ferrite_lb6_svc is full (1 entries)"),
            "{}",
            skipped[0].reason
        );
        assert_eq!(desired.services.len(), 2);
        assert!(desired.services6.is_empty() && desired.backends6.is_empty());
    }
}
