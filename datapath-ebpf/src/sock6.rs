//! Socket-level load balancing for IPv6 sockets (Cilium's sock6 programs): `sock`'s
//! design, over the IPv6 Service maps (`ferrite_lb6_*`), with the backend chosen by
//! the same code (`sock::balance`, `lb::choose`: slots, affinity by the client's
//! network namespace, traffic-policy scope, terminating endpoints).
//! - A TCP or UDP `connect()` or an unconnected UDP `sendmsg()` to an IPv6 frontend
//!   is rewritten to a backend; the socket remembers the Service in `ferrite_sk_svc6`
//!   (TCP) or `ferrite_sockrv6` by cookie (UDP), so `getpeername` and `recvmsg` show
//!   the Service address.
//! - Dual-stack sockets name IPv4 peers by IPv4-mapped addresses (`::ffff:a.b.c.d`):
//!   a connect to an IPv4 frontend that way goes to `::ffff:<IPv4 backend>`, the
//!   Service remembered IPv4-mapped in the IPv6 maps. The kernel hands an unconnected
//!   UDP send to an IPv4-mapped address to the IPv4 hook (`sendmsg4` sees the plain
//!   IPv4 address and fills `ferrite_sockrev`), yet reports its answers to the IPv6
//!   one (seen here, kernel 6.18): recvmsg6 reads both maps. sendmsg6 handles
//!   IPv4-mapped addresses as connect6 does all the same, as Cilium's does.
//! - The monitor sees an IPv6 call with its IPv6 frontend and backend, an
//!   IPv4-mapped one as the IPv4 call it is; the caller's own address is not read
//!   (the source is unknown, `::`, as a connecting IPv4 socket's).
//! - Another node's IPv6 address (a `ROUTE_NODE` /128 in `ferrite_routes6`) at a
//!   nodePort is balanced over this node's IPv6 NodePort frontend (its address:
//!   `NodeConfig::node_ip6`), as `sock` does for IPv4. There is no explain copy yet.
use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
    EbpfContext,
};
use ferrite_common::{
    lb6::{ipv4_mapped, to_ipv4_mapped},
    monitor, program_names, stat, svc_flag, Service6Key, ServiceValue, SockRev6Key, SockRev6Value,
    SockRevKey, SockService6, PROTO_TCP, PROTO_UDP, ROUTE_NODE,
};

use crate::{
    events::{self, FlowTarget, FlowTarget6, Tuple6},
    lb,
    maps::{route6_key, CONFIG, ROUTES6, SERVICES6, SOCK_REV_NAT, SOCK_REV_NAT6, SOCK_SERVICE6},
    sock::{self, balance, remember_reverse, remember_service, Request, ALLOW, REFUSE},
};

const AF_INET6: u32 = 10;

/// The address an IPv6 socket call names (network order) and its port (host order).
struct Request6 {
    address: [u8; 16],
    port: u16,
    proto: u8,
}

#[inline(always)]
fn request(ctx: &SockAddrContext) -> Option<Request6> {
    let sa = ctx.sock_addr;
    if unsafe { (*sa).user_family } != AF_INET6 {
        return None;
    }
    Some(Request6 {
        address: peer_address(ctx),
        port: u16::from_be(unsafe { (*sa).user_port } as u16),
        proto: unsafe { (*sa).protocol } as u8,
    })
}

/// The call's IPv6 address, read a 32-bit word at a time (the context's access size).
#[inline(always)]
fn peer_address(ctx: &SockAddrContext) -> [u8; 16] {
    let words = unsafe { core::ptr::addr_of!((*ctx.sock_addr).user_ip6) };
    let mut address = [0u8; 16];
    for i in 0..4 {
        let word = unsafe { core::ptr::read_volatile(&(*words)[i]) };
        address[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    address
}

/// Rewrite the call's peer: one 32-bit store per word, as the context wants them.
#[inline(always)]
fn set_peer(ctx: &SockAddrContext, address: &[u8; 16], port: u16) {
    let words = unsafe { core::ptr::addr_of_mut!((*ctx.sock_addr).user_ip6) };
    for i in 0..4 {
        let word = u32::from_ne_bytes([
            address[i * 4],
            address[i * 4 + 1],
            address[i * 4 + 2],
            address[i * 4 + 3],
        ]);
        unsafe { core::ptr::write_volatile(&mut (*words)[i], word) };
    }
    unsafe { (*ctx.sock_addr).user_port = port.to_be() as u32 };
}

/// The entries an IPv6 call balances over (as an in-cluster client's).
#[inline(always)]
fn frontend(req: &Request6) -> Option<(Service6Key, ServiceValue)> {
    let (master, svc) = own_frontend(req)?;
    Some(lb::in_cluster_entries(master, svc))
}

/// The IPv6 frontend the call names, or, for another node's IPv6 address at a
/// nodePort, this node's NodePort frontend (as `sock` does for IPv4).
#[inline(always)]
fn own_frontend(req: &Request6) -> Option<(Service6Key, ServiceValue)> {
    let key = Service6Key::new(req.address, req.port, req.proto, 0);
    if let Some(svc) = unsafe { SERVICES6.get(key) } {
        return Some((key, *svc));
    }
    let node_ip6 = CONFIG.get(0)?.node_ip6;
    // SAFETY: 16 bytes of plain integers either way.
    let words = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(req.address) };
    let route = ROUTES6.get(&route6_key(&words))?;
    if route.flags & ROUTE_NODE == 0 || node_ip6 == [0; 16] {
        return None;
    }
    let key = Service6Key::new(node_ip6, req.port, req.proto, 0);
    let svc = unsafe { SERVICES6.get(key) }?;
    (svc.flags & svc_flag::NODE_PORT != 0).then_some((key, *svc))
}

/// The call as a monitor sees it (its source is not read).
#[inline(always)]
fn tuple(req: &Request6) -> Tuple6 {
    Tuple6 {
        daddr: req.address,
        dport: req.port,
        proto: req.proto,
        ..Tuple6::default()
    }
}

/// Rewrite the call's address to a backend of the frontend it names: an IPv6
/// frontend, or an IPv4 one by its IPv4-mapped address. `program`: the calling
/// program's `monitor::PROGRAMS` index.
#[inline(always)]
fn translate(ctx: &SockAddrContext, req: &Request6, program: u8) -> i32 {
    if let Some(ipv4) = ipv4_mapped(&req.address) {
        return translate_mapped(ctx, req, ipv4, program);
    }
    let Some((master, svc)) = frontend(req) else {
        return ALLOW;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(chosen) = balance(ctx, master, &svc, cookie) else {
        events::refused(&sock::seen_by(program), stat::SOCK_REFUSED, &tuple(req));
        return REFUSE;
    };
    let backend = chosen.backend;
    remember(
        ctx,
        req,
        cookie,
        svc.rev_nat_index,
        &backend.address,
        backend.port,
    );
    set_peer(ctx, &backend.address, backend.port);
    let target = FlowTarget6 {
        backend_address: backend.address,
        backend_port: backend.port,
        rev_nat_index: svc.rev_nat_index,
        backend_id: chosen.id,
    };
    events::new_flow(
        &sock::seen_by(program),
        stat::SOCK_TRANSLATED,
        &tuple(req),
        &target,
    );
    ALLOW
}

/// A dual-stack socket's call to `::ffff:<ipv4>`: balanced over the IPv4 frontend,
/// reported to the monitor as the IPv4 call it is.
#[inline(always)]
fn translate_mapped(ctx: &SockAddrContext, req: &Request6, ipv4: [u8; 4], program: u8) -> i32 {
    let req4 = Request {
        address: u32::from_ne_bytes(ipv4),
        port: req.port,
        proto: req.proto,
    };
    let Some((master, svc)) = sock::frontend(&req4) else {
        return ALLOW;
    };
    // The source address of a send is not readable here (msg_src_ip4 is sendmsg4's).
    let tuple = req4.tuple_from(0);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(chosen) = balance(ctx, master, &svc, cookie) else {
        events::refused(&sock::seen_by(program), stat::SOCK_REFUSED, &tuple);
        return REFUSE;
    };
    let backend = to_ipv4_mapped(chosen.backend.address);
    remember(
        ctx,
        req,
        cookie,
        svc.rev_nat_index,
        &backend,
        chosen.backend.port,
    );
    set_peer(ctx, &backend, chosen.backend.port);
    let target = FlowTarget {
        backend_address: chosen.address(),
        backend_port: chosen.backend.port,
        rev_nat_index: svc.rev_nat_index,
        backend_id: chosen.id,
    };
    events::new_flow(
        &sock::seen_by(program),
        stat::SOCK_TRANSLATED,
        &tuple,
        &target,
    );
    ALLOW
}

/// Remember the Service `req` asked for, now going to `backend`:`port` (best effort:
/// without it, answers and the peer show the backend's address).
#[inline(always)]
fn remember(
    ctx: &SockAddrContext,
    req: &Request6,
    cookie: u64,
    rev_nat_index: u32,
    backend: &[u8; 16],
    port: u16,
) {
    if req.proto == PROTO_TCP {
        let service = SockService6 {
            frontend_address: req.address,
            backend_address: *backend,
            rev_nat_index,
            frontend_port: req.port,
            backend_port: port,
        };
        remember_service(&SOCK_SERVICE6, ctx, service);
    } else {
        let key = SockRev6Key {
            cookie,
            address: *backend,
            port,
            _pad: 0,
            _pad2: 0,
        };
        let rev = SockRev6Value {
            address: req.address,
            rev_nat_index,
            port: req.port,
            _pad: 0,
        };
        remember_reverse(&SOCK_REV_NAT6, &key, &rev);
    }
}

/// cgroup/connect6: TCP connects, and UDP connects to an IPv6 frontend. There is no
/// per-packet IPv6 Service path to leave connected UDP to (resolvers connect their
/// UDP sockets), so it is pointed at a backend at connect as Cilium does; it stays
/// on that backend until it connects again. Connected UDP to an IPv4-mapped
/// address sends IPv4 packets, which the IPv4 per-packet path balances.
#[cgroup_sock_addr(connect6)]
pub fn ferrite_connect6(ctx: SockAddrContext) -> i32 {
    const PROGRAM: u8 = monitor::program_index(program_names::SOCK_CONNECT6);
    match request(&ctx) {
        Some(req) if req.proto == PROTO_TCP => translate(&ctx, &req, PROGRAM),
        Some(req) if req.proto == PROTO_UDP && ipv4_mapped(&req.address).is_none() => {
            translate(&ctx, &req, PROGRAM)
        }
        _ => ALLOW,
    }
}

/// cgroup/sendmsg6: unconnected UDP sends with a destination address.
#[cgroup_sock_addr(sendmsg6)]
pub fn ferrite_sendmsg6(ctx: SockAddrContext) -> i32 {
    const PROGRAM: u8 = monitor::program_index(program_names::SOCK_SENDMSG6);
    match request(&ctx) {
        Some(req) if req.proto == PROTO_UDP => translate(&ctx, &req, PROGRAM),
        _ => ALLOW,
    }
}

/// cgroup/recvmsg6 and getpeername6: a backend's address the socket was translated
/// to reads as the Service address it asked for.
#[cgroup_sock_addr(recvmsg6)]
pub fn ferrite_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn ferrite_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}

#[inline(always)]
fn reverse(ctx: &SockAddrContext) -> i32 {
    let Some(req) = request(ctx) else {
        return ALLOW;
    };
    let frontend = if req.proto == PROTO_TCP {
        let service = unsafe { SOCK_SERVICE6.get_ptr_mut(ctx) };
        if service.is_null() {
            return ALLOW;
        }
        let service = unsafe { *service };
        (service.backend_address == req.address && service.backend_port == req.port)
            .then_some((service.frontend_address, service.frontend_port))
    } else {
        reverse_datagram(ctx, &req)
    };
    if let Some((address, port)) = frontend {
        set_peer(ctx, &address, port);
    }
    ALLOW
}

/// The Service an unconnected UDP socket sent to, by the backend answering it.
#[inline(always)]
fn reverse_datagram(ctx: &SockAddrContext, req: &Request6) -> Option<([u8; 16], u16)> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(ipv4) = ipv4_mapped(&req.address) {
        // Sent through sendmsg4 (see the module's notes): the IPv4 map has it.
        let key = SockRevKey {
            cookie,
            address: ipv4,
            port: req.port,
            _pad: 0,
        };
        if let Some(rev) = unsafe { SOCK_REV_NAT.get(key) } {
            return Some((to_ipv4_mapped(rev.address), rev.port));
        }
    }
    let key = SockRev6Key {
        cookie,
        address: req.address,
        port: req.port,
        _pad: 0,
        _pad2: 0,
    };
    unsafe { SOCK_REV_NAT6.get(key) }.map(|rev| (rev.address, rev.port))
}
