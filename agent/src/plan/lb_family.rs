//! What the plan needs of an IP family's Service maps (`ferrite_service`,
//! `ferrite_backend`, `ferrite_rev_nat` and their lb6 twins): their keys and values,
//! where a map image holds them and the ops that write them, so that the Service
//! rules (ids, order, scopes, flags) are written once for both families.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
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
