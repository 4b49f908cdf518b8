//! Every map the datapath uses. Names and layouts come from `ferrite_common`; the
//! agent pins them under /sys/fs/bpf/ferrite/<node>/ and sizes them at load time.
use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::{
    btf_maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf,
        SkStorage,
    },
    macros::btf_map,
};
use ferrite_common::{
    capacity, monitor, stat, AffinityKey, AffinityValue, Backend, Counter, CtKey, CtValue,
    EndpointInfo, EndpointKey, ExplainTrace, FragmentKey, FragmentPorts, LbStatKey, MaglevTable,
    MonitorEvent, NodeConfig, RevNatValue, RouteInfo, ServiceKey, ServiceValue, SockRevKey,
    SockRevValue, SockService, SourceRangeKey,
};

#[btf_map(name = "ferrite_service")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { capacity::SERVICES as usize }> =
    HashMap::new();

#[btf_map(name = "ferrite_backend")]
pub static BACKENDS: HashMap<u32, Backend, { capacity::BACKENDS as usize }> = HashMap::new();

#[btf_map(name = "ferrite_rev_nat")]
pub static REV_NAT: HashMap<u16, RevNatValue, { capacity::REV_NAT as usize }> = HashMap::new();

#[btf_map(name = "ferrite_endpnt")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo, { capacity::ENDPOINTS as usize }> =
    HashMap::new();

#[btf_map(name = "ferrite_ct")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue, { capacity::CONNTRACK as usize }> =
    LruHashMap::new();

#[btf_map(name = "ferrite_stats")]
pub static STATS: PerCpuArray<Counter, { stat::COUNT as usize }> = PerCpuArray::new();

#[btf_map(name = "ferrite_lbstats")]
pub static LB_STATS: LruPerCpuHashMap<LbStatKey, Counter, { capacity::LB_STATS as usize }> =
    LruPerCpuHashMap::new();

/// Maglev table of each external frontend (32 KiB values: allocated as used).
#[btf_map(name = "ferrite_maglev")]
pub static MAGLEV: HashMap<
    ServiceKey,
    MaglevTable,
    { capacity::MAGLEV as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[btf_map(name = "ferrite_frags")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts, { capacity::FRAGMENTS as usize }> =
    LruHashMap::new();

#[btf_map(name = "ferrite_affin")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { capacity::AFFINITY as usize }> =
    LruHashMap::new();

/// Allowed client networks of frontends with `loadBalancerSourceRanges`.
#[btf_map(name = "ferrite_srcrng")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8, { capacity::SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// Backend -> Service address of translated sockets (socket-level LB).
#[btf_map(name = "ferrite_sockrev")]
pub static SOCK_REV_NAT: LruHashMap<SockRevKey, SockRevValue, { capacity::SOCK_REV_NAT as usize }> =
    LruHashMap::new();

/// The Service of each TCP socket translated at connect (per-socket storage: no
/// global table to fill or evict, gone with the socket).
#[btf_map(name = "ferrite_sk_svc")]
pub static SOCK_SERVICE: SkStorage<SockService> = SkStorage::new();

/// What the last explain run on each CPU did (`trace`).
#[btf_map(name = "ferrite_trace")]
pub static TRACE: PerCpuArray<ExplainTrace, 1> = PerCpuArray::new();

#[btf_map(name = "ferrite_config")]
pub static CONFIG: Array<NodeConfig, 1> = Array::new();

/// Drops and new flows for `ferrite monitor` (see `events`).
#[btf_map(name = "ferrite_events")]
pub static EVENTS: RingBuf<MonitorEvent, { monitor::RING_BYTES as usize }> = RingBuf::new();

/// `monitor::WANT_*` bits: which events a monitor listens for now (0: none).
#[btf_map(name = "ferrite_monitor")]
pub static MONITOR: Array<u32, 1> = Array::new();

/// Pod CIDR -> owning node. Key data: the IPv4 network in network order.
#[btf_map(name = "ferrite_routes")]
pub static ROUTES: LpmTrie<[u8; 4], RouteInfo, { capacity::ROUTES as usize }> = LpmTrie::new();

#[inline(always)]
pub fn route_key(addr: u32) -> Key<[u8; 4]> {
    Key::new(32, addr.to_ne_bytes())
}
