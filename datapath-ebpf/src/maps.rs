//! Every map the datapath uses. Names and layouts come from `ferrite_common`; the
//! agent pins them under /sys/fs/bpf/ferrite/<node>/ and sizes them at load time.
use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::btf_maps::{
    lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray,
    ProgramArray, RingBuf, SkStorage,
};
use ferrite_common::{
    capacity, monitor,
    policy::{IpcacheValue, PolicyKey, PolicyValue},
    purge::{self, PurgePair},
    stat, tail_call, AffinityKey, AffinityValue, Backend, Counter, CtKey, CtValue, Endpoint6Key,
    EndpointInfo, EndpointKey, ExplainTrace, FragmentKey, FragmentPorts, LbStatKey, MaglevTable,
    MonitorEvent, NodeConfig, RevNatValue, Route6Prefix, RouteInfo, ServiceKey, ServiceValue,
    SockRevKey, SockRevValue, SockService, SourceRangeKey,
};
use ferrite_common::{
    Backend6, RevNat6Value, Service6Key, SockRev6Key, SockRev6Value, SockService6,
};

/// BTF maps, each named `ferrite_common::map_names::<its static's name>`: what aya's
/// `#[btf_map(name = "...")]` expands to, but that attribute takes only a string
/// literal, which would write each name a second time.
macro_rules! btf_maps {
    ($($(#[$doc:meta])* pub static $map:ident: $type:ty = $init:expr;)*) => {$(
        $(#[$doc])*
        #[unsafe(link_section = ".maps")]
        #[unsafe(export_name = ferrite_common::map_name!($map))]
        pub static $map: $type = $init;
    )*};
}

btf_maps! {
    pub static SERVICES: HashMap<ServiceKey, ServiceValue, { capacity::SERVICES as usize }> =
        HashMap::new();

    pub static BACKENDS: HashMap<u32, Backend, { capacity::BACKENDS as usize }> = HashMap::new();

    pub static REV_NAT: HashMap<u32, RevNatValue, { capacity::REV_NAT as usize }> = HashMap::new();

    pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo, { capacity::ENDPOINTS as usize }> =
        HashMap::new();

    pub static ENDPOINTS6: HashMap<Endpoint6Key, EndpointInfo, { capacity::ENDPOINTS6 as usize }> =
        HashMap::new();

    pub static CONNTRACK: LruHashMap<CtKey, CtValue, { capacity::CONNTRACK as usize }> =
        LruHashMap::new();

    pub static STATS: PerCpuArray<Counter, { stat::COUNT as usize }> = PerCpuArray::new();

    pub static LB_STATS: LruPerCpuHashMap<LbStatKey, Counter, { capacity::LB_STATS as usize }> =
        LruPerCpuHashMap::new();

    /// Maglev table of each external frontend (32 KiB values: allocated as used).
    pub static MAGLEV: HashMap<
        ServiceKey,
        MaglevTable,
        { capacity::MAGLEV as usize },
        { BPF_F_NO_PREALLOC as usize },
    > = HashMap::new();

    pub static FRAGMENTS: LruHashMap<
        FragmentKey,
        FragmentPorts,
        { capacity::FRAGMENTS as usize },
    > = LruHashMap::new();

    pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { capacity::AFFINITY as usize }> =
        LruHashMap::new();

    /// Allowed client networks of frontends with `loadBalancerSourceRanges`.
    pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8, { capacity::SOURCE_RANGES as usize }> =
        LpmTrie::new();

    /// Backend -> Service address of translated sockets (socket-level LB).
    pub static SOCK_REV_NAT: LruHashMap<
        SockRevKey,
        SockRevValue,
        { capacity::SOCK_REV_NAT as usize },
    > = LruHashMap::new();

    /// The Service of each TCP socket translated at connect (per-socket storage: no
    /// global table to fill or evict, gone with the socket).
    pub static SOCK_SERVICE: SkStorage<SockService> = SkStorage::new();

    /// IPv6 Services (`lb6`): the IPv4 maps above with IPv6 addresses; ids, affinity
    /// and per-backend counters are shared with IPv4.
    pub static SERVICES6: HashMap<Service6Key, ServiceValue, { capacity::SERVICES6 as usize }> =
        HashMap::new();

    pub static BACKENDS6: HashMap<u32, Backend6, { capacity::BACKENDS6 as usize }> =
        HashMap::new();

    pub static REV_NAT6: HashMap<u32, RevNat6Value, { capacity::REV_NAT6 as usize }> =
        HashMap::new();

    pub static SOCK_REV_NAT6: LruHashMap<
        SockRev6Key,
        SockRev6Value,
        { capacity::SOCK_REV_NAT6 as usize },
    > = LruHashMap::new();

    pub static SOCK_SERVICE6: SkStorage<SockService6> = SkStorage::new();

    /// What the last explain run on each CPU did (`trace`).
    pub static TRACE: PerCpuArray<ExplainTrace, 1> = PerCpuArray::new();

    pub static CONFIG: Array<NodeConfig, 1> = Array::new();

    /// Drops and new flows for `ferrite monitor` (see `events`).
    pub static EVENTS: RingBuf<MonitorEvent, { monitor::RING_BYTES as usize }> = RingBuf::new();

    /// `monitor::WANT_*` bits: which events a monitor listens for now (0: none).
    pub static MONITOR: Array<u32, 1> = Array::new();

    /// Pod CIDR -> owning node. Key data: the IPv4 network in network order.
    pub static ROUTES: LpmTrie<[u8; 4], RouteInfo, { capacity::ROUTES as usize }> = LpmTrie::new();

    /// IPv6 pod CIDR -> owning node (its IPv4 underlay address: the tunnel stays
    /// IPv4), and other nodes' IPv6 addresses (/128, `ROUTE_NODE`). Key data: the
    /// IPv6 network in network order.
    pub static ROUTES6: LpmTrie<Route6Prefix, RouteInfo, { capacity::ROUTES6 as usize }> =
        LpmTrie::new();

    /// Address prefix -> NetworkPolicy identity of its addresses.
    pub static IPCACHE: LpmTrie<[u8; 4], IpcacheValue, { capacity::IPCACHE as usize }> =
        LpmTrie::new();

    /// What each policed pod allows: (pod, direction, peer identity, protocol, port).
    pub static POLICY: LpmTrie<PolicyKey, PolicyValue, { capacity::POLICY as usize }> =
        LpmTrie::new();

    /// Removed backends whose flows `purge` deletes (filled and emptied by the agent).
    pub static PURGE_BACKENDS: HashMap<u32, u8, { purge::CAPACITY as usize }> = HashMap::new();

    /// Ended (rev-NAT index, backend) pairs whose flows `purge` deletes.
    pub static PURGE_PAIRS: HashMap<PurgePair, u8, { purge::CAPACITY as usize }> =
        HashMap::new();

    /// Programs tail-called by slot (`tail_call`); an empty slot fails the call.
    pub static TAIL_CALLS: ProgramArray<{ tail_call::SLOTS as usize }> = ProgramArray::new();
}

#[inline(always)]
pub fn route_key(addr: u32) -> Key<[u8; 4]> {
    Key::new(32, addr.to_ne_bytes())
}

#[inline(always)]
pub fn route6_key(addr: &[u32; 4]) -> Key<Route6Prefix> {
    // SAFETY: 16 bytes of plain integers either way; the words hold the packet's
    // bytes in order.
    Key::new(128, unsafe {
        core::mem::transmute::<[u32; 4], [u8; 16]>(*addr)
    })
}
