//! IPv6 Service load balancing: Cilium's lb6 maps next to the IPv4 ones.
//!
//! The layouts are the IPv4 ones with 16-byte addresses (network order). What
//! needs no address is shared with IPv4: the master/slot value is a
//! [`ServiceValue`](crate::ServiceValue), and rev-NAT and backend ids come from one
//! allocator for both families, so `ferrite_lbstats`, `ferrite_affin` and the
//! purge maps, keyed by those ids, serve both without telling them apart.

/// Key of `ferrite_lb6_svc`: [`ServiceKey`](crate::ServiceKey) with an IPv6
/// address. Slot 0 is the frontend's master entry, slots 1..=count its backends
/// (ids of `ferrite_lb6_be`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service6Key {
    pub address: [u8; 16],
    /// Host order.
    pub port: u16,
    pub proto: u8,
    /// `service_scope`, as for IPv4.
    pub scope: u8,
    pub backend_slot: u16,
    pub _pad: u16,
}

impl Service6Key {
    pub const fn new(address: [u8; 16], port: u16, proto: u8, backend_slot: u16) -> Self {
        Self {
            address,
            port,
            proto,
            scope: crate::service_scope::ALL,
            backend_slot,
            _pad: 0,
        }
    }

    /// The same entry of the frontend's other scope (`service_scope`).
    pub const fn in_scope(self, scope: u8) -> Self {
        Self { scope, ..self }
    }
}

/// Value of `ferrite_lb6_be` (key: backend id, `u32`, never 0; ids are shared with
/// `ferrite_backend`, so an id names one backend of one family).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend6 {
    pub address: [u8; 16],
    /// Host order.
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

/// Value of `ferrite_lb6_rev` (key: rev-NAT index, `u32`, never 0; shared with
/// `ferrite_rev_nat`): the frontend a reply's source is rewritten back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevNat6Value {
    pub address: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Value of the socket storage `ferrite_sk_svc6`: [`SockService`](crate::SockService)
/// for a TCP socket connected over IPv6. A dual-stack socket that connected to an
/// IPv4-mapped address (`::ffff:a.b.c.d`) holds IPv4-mapped addresses here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockService6 {
    pub frontend_address: [u8; 16],
    pub backend_address: [u8; 16],
    pub rev_nat_index: u32,
    /// Host order.
    pub frontend_port: u16,
    /// Host order.
    pub backend_port: u16,
}

/// Key of the LRU `ferrite_sockrv6`: one backend an unconnected IPv6 UDP socket was
/// translated to ([`SockRevKey`](crate::SockRevKey) for IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockRev6Key {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    pub address: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
    pub _pad2: u32,
}

/// Value of `ferrite_sockrv6`: the Service address the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRev6Value {
    pub address: [u8; 16],
    pub rev_nat_index: u32,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// The IPv4 address an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, RFC 4291
/// 2.5.5.2) carries: a dual-stack socket's way of naming an IPv4 peer.
pub const fn ipv4_mapped(address: &[u8; 16]) -> Option<[u8; 4]> {
    let mut i = 0;
    while i < 10 {
        if address[i] != 0 {
            return None;
        }
        i += 1;
    }
    if address[10] != 0xff || address[11] != 0xff {
        return None;
    }
    Some([address[12], address[13], address[14], address[15]])
}

/// `address` as an IPv4-mapped IPv6 address.
pub const fn to_ipv4_mapped(address: [u8; 4]) -> [u8; 16] {
    let mut mapped = [0; 16];
    mapped[10] = 0xff;
    mapped[11] = 0xff;
    mapped[12] = address[0];
    mapped[13] = address[1];
    mapped[14] = address[2];
    mapped[15] = address[3];
    mapped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_addresses_round_trip_and_others_are_not_mapped() {
        let mapped = to_ipv4_mapped([10, 96, 0, 10]);
        assert_eq!(
            core::net::Ipv6Addr::from(mapped),
            "::ffff:10.96.0.10".parse::<core::net::Ipv6Addr>().unwrap()
        );
        assert_eq!(ipv4_mapped(&mapped), Some([10, 96, 0, 10]));
        let native: core::net::Ipv6Addr = "fd00:10:96::a".parse().unwrap();
        assert_eq!(ipv4_mapped(&native.octets()), None);
        // IPv4-compatible (deprecated, ::a.b.c.d) is not IPv4-mapped.
        let compatible: core::net::Ipv6Addr = "::10.96.0.10".parse().unwrap();
        assert_eq!(ipv4_mapped(&compatible.octets()), None);
    }
}
