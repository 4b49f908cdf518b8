//! Socket-level load balancing (Cilium's socket LB, Calico's connect-time LB):
//! cgroup/sock_addr programs on the node's cgroup subtree, so they serve the sockets
//! of its pods and host processes alike, whatever their network namespace. A TCP
//! `connect()` or an unconnected UDP `sendmsg()` to a Service frontend is rewritten
//! to a backend before any packet exists, so the flow's packets carry the backend's
//! address from the start: no per-packet NAT, no conntrack, no reverse NAT.
//! - Frontends: every Service address the node's maps hold (ClusterIP, LoadBalancer
//!   IPs, externalIPs, this node's NodePorts), and any other node's address at a
//!   nodePort, which is served like this node's (as Cilium does inside the cluster).
//! - Backends are chosen as the per-packet path chooses (`lb::choose`: same slots,
//!   session affinity, the agent's traffic-policy and terminating-endpoint rules),
//!   hashed over the socket cookie; affinity is keyed by the client's network
//!   namespace (a socket has no source address yet).
//! - No ready backend: the call fails with ECONNREFUSED (`sock_refused`).
//! - The socket remembers the Service address: a TCP socket in its own storage
//!   (`ferrite_sk_svc`, freed with it), an unconnected UDP socket, which may send to
//!   several Services, per backend by socket cookie (`ferrite_sockrev`, LRU):
//!   `getpeername` and `recvmsg` show the Service, as the client expects (DNS answers
//!   come from the Service address). A global map insert per TCP connect cost ~5 % of
//!   the connection rate; socket storage costs nothing measurable.
//! - Connected UDP is left to the per-packet path: its conntrack entries move it to
//!   another backend when its backend leaves, which a socket rewritten at `connect()`
//!   could not do without destroying it.
//! - IPv6 and dual-stack sockets: `sock6`, with the family-independent pieces here
//!   (`balance`, `remember_service`, `remember_reverse`).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{LruHashMap, SkStorage},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
    EbpfContext,
};
use ferrite_common::{
    explain::{self, step, verdict, write, SockRequest},
    monitor, program_names, stat, svc_flag, ServiceKey, ServiceValue, SockRevKey, SockRevValue,
    SockService, AFFINITY_CLIENT_NETNS, PROTO_TCP, PROTO_UDP, ROUTE_NODE,
};

use crate::{
    events::{self, FlowTarget, Seen, Tuple},
    lb::{self, Chosen, Selection},
    maps::{route_key, CONFIG, ROUTES, SERVICES, SOCK_REV_NAT, SOCK_SERVICE},
    packet::Packet,
    stats::{count, count_lb},
    trace,
};

const AF_INET: u32 = 2;
const ECONNREFUSED: i32 = 111;
/// What cgroup/sock_addr programs return: go on with the call, or fail it.
pub const ALLOW: i32 = 1;
pub const REFUSE: i32 = 0;

/// The address a socket call names (raw network-order address, host-order port).
pub struct Request {
    pub address: u32,
    pub port: u16,
    pub proto: u8,
}

impl Request {
    /// The call as a monitor sees it: from the socket's own address where it has
    /// one (sendmsg's source; a connecting socket's bound address is not read).
    #[inline(always)]
    fn tuple(&self, ctx: &SockAddrContext) -> Tuple {
        let sa = unsafe { &*ctx.sock_addr };
        self.tuple_from(if self.proto == PROTO_UDP {
            sa.msg_src_ip4
        } else {
            0
        })
    }

    /// The call as a monitor sees it, from `saddr` (raw network order, 0: unknown).
    #[inline(always)]
    pub fn tuple_from(&self, saddr: u32) -> Tuple {
        Tuple {
            saddr,
            daddr: self.address,
            sport: 0,
            dport: self.port,
            proto: self.proto,
        }
    }
}

/// A socket program's place in `monitor::PROGRAMS`, by the call it serves.
#[inline(always)]
fn seen(req: &Request) -> Seen {
    if req.proto == PROTO_TCP {
        seen_by(const { monitor::program_index(program_names::SOCK_CONNECT4) })
    } else {
        seen_by(const { monitor::program_index(program_names::SOCK_SENDMSG4) })
    }
}

/// An event of the socket program `program` (its `monitor::PROGRAMS` index).
#[inline(always)]
pub fn seen_by(program: u8) -> Seen {
    Seen {
        program,
        ifindex: 0,
        len: 0,
    }
}

#[inline(always)]
fn request(ctx: &SockAddrContext) -> Option<Request> {
    let sa = unsafe { &*ctx.sock_addr };
    if sa.user_family != AF_INET {
        return None;
    }
    Some(Request {
        address: sa.user_ip4,
        port: u16::from_be(sa.user_port as u16),
        proto: sa.protocol as u8,
    })
}

/// The entries a socket balances over for the frontend it asks for: the master key
/// and entry (a socket is an in-cluster client: `lb::in_cluster_entries`).
#[inline(always)]
pub fn frontend(req: &Request) -> Option<(ServiceKey, ServiceValue)> {
    let (master, svc) = own_frontend(req)?;
    Some(lb::in_cluster_entries(master, svc))
}

#[inline(always)]
fn own_frontend(req: &Request) -> Option<(ServiceKey, ServiceValue)> {
    let key = lb::frontend_key(req.address, req.port, req.proto, 0);
    if let Some(svc) = unsafe { SERVICES.get(key) } {
        return Some((key, *svc));
    }
    // Another node's address at a nodePort: this node's NodePort frontend serves it.
    let node_ip = CONFIG.get(0)?.node_ip;
    let route = ROUTES.get(&route_key(req.address))?;
    if route.flags & ROUTE_NODE == 0 || route.node_ip != req.address.to_ne_bytes() {
        return None;
    }
    let key = lb::frontend_key(u32::from_ne_bytes(node_ip), req.port, req.proto, 0);
    let svc = unsafe { SERVICES.get(key) }?;
    (svc.flags & svc_flag::NODE_PORT != 0).then_some((key, *svc))
}

/// How a socket's backend is chosen: hashed over its cookie, affinity by its
/// network namespace (`netns`: its cookie).
#[inline(always)]
fn selection<K>(master: K, cookie: u64, netns: u64, explain: bool) -> Selection<K> {
    Selection {
        master,
        hash: lb::mix(cookie as u32 ^ (cookie >> 32) as u32),
        client_kind: AFFINITY_CLIENT_NETNS,
        client: (netns as u32).to_ne_bytes(),
        explain,
    }
}

/// Never attached: what a connect or send of the `SockRequest` in the test packet
/// would get, chosen as [`translate`] chooses, with nothing written: its trace in
/// `ferrite_trace` (`ferrite explain --socket`). cgroup/sock_addr programs cannot be
/// test-run.
#[classifier]
pub fn ferrite_explain_sock(ctx: TcContext) -> i32 {
    let Ok(request) = Packet::load::<SockRequest>(&ctx, 0) else {
        return TC_ACT_SHOT;
    };
    if !explain::is_explain(request.word) {
        return TC_ACT_SHOT;
    }
    trace::begin(request.word);
    let req = Request {
        address: u32::from_ne_bytes(request.address),
        port: request.port,
        proto: request.proto,
    };
    let Some((master, svc)) = frontend(&req) else {
        trace::record(true, |trace| trace.verdict = verdict::PASS);
        return TC_ACT_OK;
    };
    trace::record(true, |trace| {
        trace.steps |= step::FRONTEND;
        trace.frontend = master;
        trace.service = svc;
    });
    let selection = selection(master, request.cookie, request.netns_cookie, true);
    let refused = lb::choose(&selection, &svc, false).is_none();
    trace::record(true, |trace| {
        if refused {
            trace.verdict = verdict::DROP;
            trace.drop_reason = stat::SOCK_REFUSED;
            trace.counted |= 1 << stat::SOCK_REFUSED;
        } else {
            trace.verdict = verdict::PASS;
            trace.counted |= 1 << stat::SOCK_TRANSLATED;
            trace.skipped |= write::LB_STATS;
        }
    });
    if refused {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

/// Rewrite the call's address to a backend of the frontend it names.
#[inline(always)]
fn translate(ctx: &SockAddrContext, req: &Request) -> i32 {
    let Some((master, svc)) = frontend(req) else {
        return ALLOW;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(chosen) = balance(ctx, master, &svc, cookie) else {
        events::refused(&seen(req), stat::SOCK_REFUSED, &req.tuple(ctx));
        return REFUSE;
    };
    // Best effort: without it, answers and the peer show the backend's address.
    if req.proto == PROTO_TCP {
        let service = SockService {
            frontend_address: req.address.to_ne_bytes(),
            frontend_port: req.port,
            rev_nat_index: svc.rev_nat_index,
            backend_address: chosen.backend.address,
            backend_port: chosen.backend.port,
            _pad: 0,
        };
        remember_service(&SOCK_SERVICE, ctx, service);
    } else {
        let rev_key = SockRevKey {
            cookie,
            address: chosen.backend.address,
            port: chosen.backend.port,
            _pad: 0,
        };
        let rev = SockRevValue {
            address: req.address.to_ne_bytes(),
            port: req.port,
            rev_nat_index: svc.rev_nat_index,
            _pad: 0,
        };
        remember_reverse(&SOCK_REV_NAT, &rev_key, &rev);
    }
    unsafe {
        (*ctx.sock_addr).user_ip4 = chosen.address();
        (*ctx.sock_addr).user_port = chosen.backend.port.to_be() as u32;
    }
    let target = FlowTarget {
        backend_address: chosen.address(),
        backend_port: chosen.backend.port,
        rev_nat_index: svc.rev_nat_index,
        backend_id: chosen.id,
    };
    events::new_flow(&seen(req), stat::SOCK_TRANSLATED, &req.tuple(ctx), &target);
    ALLOW
}

/// The backend a socket call to the entries under `master` (either family) gets,
/// counted (`sock_translated` and the backend's counters); `None`: no ready backend,
/// the call is refused (`sock_refused`, ECONNREFUSED: the caller returns `REFUSE`).
#[inline(always)]
pub fn balance<K: lb::Family>(
    ctx: &SockAddrContext,
    master: K,
    svc: &ServiceValue,
    cookie: u64,
) -> Option<Chosen<K::Backend>> {
    // The namespace cookie only matters (and is only read) for affinity.
    let netns = if svc.affinity_timeout_s != 0 {
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
    } else {
        0
    };
    let chosen = lb::choose(&selection(master, cookie, netns, false), svc, false);
    match &chosen {
        Some(chosen) => {
            count(stat::SOCK_TRANSLATED, 0);
            count_lb(svc.rev_nat_index, chosen.id, 0);
        }
        None => {
            count(stat::SOCK_REFUSED, 0);
            unsafe { bpf_set_retval(-ECONNREFUSED) };
        }
    }
    chosen
}

/// Keep `service` in the socket's own storage (a TCP socket's Service).
#[inline(always)]
pub fn remember_service<T>(storage: &SkStorage<T>, ctx: &SockAddrContext, mut service: T) {
    let stored = unsafe { storage.get_or_insert_ptr_mut(ctx, Some(&mut service)) };
    if !stored.is_null() {
        // A socket connecting again (after a failed connect) replaces it.
        unsafe { *stored = service };
    }
}

/// Keep the Service an unconnected UDP socket sent to, by its cookie and backend.
#[inline(always)]
pub fn remember_reverse<K, V: PartialEq, const M: usize>(
    map: &LruHashMap<K, V, M>,
    key: &K,
    rev: &V,
) {
    // A UDP socket sends many datagrams: write only what changed.
    if unsafe { map.get(key) }.is_none_or(|known| known != rev) {
        let _ = map.insert(key, rev, 0);
    }
}

/// cgroup/connect4: TCP connects (connected UDP is left to the per-packet path).
#[cgroup_sock_addr(connect4)]
pub fn ferrite_connect4(ctx: SockAddrContext) -> i32 {
    match request(&ctx) {
        Some(req) if req.proto == PROTO_TCP => translate(&ctx, &req),
        _ => ALLOW,
    }
}

/// cgroup/sendmsg4: unconnected UDP sends with a destination address.
#[cgroup_sock_addr(sendmsg4)]
pub fn ferrite_sendmsg4(ctx: SockAddrContext) -> i32 {
    match request(&ctx) {
        Some(req) if req.proto == PROTO_UDP => translate(&ctx, &req),
        _ => ALLOW,
    }
}

/// cgroup/recvmsg4 and getpeername4: a backend's address the socket was translated
/// to reads as the Service address it asked for.
#[cgroup_sock_addr(recvmsg4)]
pub fn ferrite_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn ferrite_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}

#[inline(always)]
fn reverse(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    if sa.user_family != AF_INET {
        return ALLOW;
    }
    let (address, port) = (sa.user_ip4.to_ne_bytes(), u16::from_be(sa.user_port as u16));
    let frontend = if sa.protocol == PROTO_TCP as u32 {
        let service = unsafe { SOCK_SERVICE.get_ptr_mut(ctx) };
        if service.is_null() {
            return ALLOW;
        }
        let service = unsafe { *service };
        (service.backend_address == address && service.backend_port == port)
            .then_some((service.frontend_address, service.frontend_port))
    } else {
        let key = SockRevKey {
            cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            address,
            port,
            _pad: 0,
        };
        unsafe { SOCK_REV_NAT.get(key) }.map(|rev| (rev.address, rev.port))
    };
    if let Some((address, port)) = frontend {
        unsafe {
            (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(address);
            (*ctx.sock_addr).user_port = port.to_be() as u32;
        }
    }
    ALLOW
}
