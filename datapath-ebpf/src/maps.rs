//! Every map the datapath uses. Names and layouts come from `ferrite_common`; the
//! agent pins them under /sys/fs/bpf/ferrite/<node>/ and sizes them at load time.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use ferrite_common::{
    capacity, stat, Backend, Counter, CtKey, CtValue, EndpointInfo, EndpointKey, NodeConfig,
    RevNatValue, ServiceKey, ServiceValue,
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

#[btf_map(name = "ferrite_config")]
pub static CONFIG: Array<NodeConfig, 1> = Array::new();
