//! The pinned maps of one node, opened from /sys/fs/bpf/ferrite/<node>/: read back
//! into [`MapContents`], written with ordered [`Op`]s.
use std::{
    collections::BTreeSet,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};
use aya::maps::{
    lpm_trie::Key, Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray,
    PerCpuHashMap,
};
use ferrite_common::{
    map_names,
    policy::{IpcacheValue, PolicyKey, PolicyValue},
    program_names,
    purge::{self, PurgeCounts, PurgePair, PurgeRequest},
    stat, AffinityKey, AffinityValue, Backend, Backend6, Counter, CtKey, CtValue, Endpoint6Key,
    EndpointInfo, EndpointKey, LbStatKey, MaglevTable, NodeConfig, RevNat6Value, RevNatValue,
    Route6Prefix, RouteInfo, Service6Key, ServiceKey, ServiceValue, SourceRangeKey,
    MAGLEV_TABLE_SIZE, SOURCE_RANGE_FRONTEND_BITS,
};

use crate::plan::{
    describe_policy_rule, describe_service6_key, describe_service_key, maglev_digest, maglev_key,
    Capacities, MapContents, Op, PolicyRule, Route6Key, RouteKey, SourceRange,
};

/// The capacities the node's Service maps were created with (`--map-capacity` of the
/// agent that created them): what a plan for these maps must fit.
pub fn pinned_capacities(pin_dir: &Path) -> Result<Capacities> {
    let entries = |name: &str| -> Result<usize> {
        let path = pin_dir.join(name);
        let info = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(info.max_entries() as usize)
    };
    Ok(Capacities {
        services: entries(map_names::SERVICES)?,
        backends: entries(map_names::BACKENDS)?,
        rev_nat: entries(map_names::REV_NAT)?,
        services6: entries(map_names::SERVICES6)?,
        backends6: entries(map_names::BACKENDS6)?,
        rev_nat6: entries(map_names::REV_NAT6)?,
    })
}

/// The most entries one batch call writes or reads: enough to make the syscall's own
/// cost vanish (a few hundred ns against ~1 µs per entry), few enough that a call is
/// short and an agent stopped mid-sync stops between calls, in the order of its
/// writes.
const BATCH: usize = 1024;
/// Up to this many conntrack entries, a purge reads the table out instead of walking
/// it in the kernel (measured: an empty table 0.2 ms read, 4 ms walked; a full one
/// 100 ms read, 34 ms walked).
pub const SPARSE_CONNTRACK_ENTRIES: usize = 4096;

/// The open pinned maps of one node.
pub struct NodeMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub rev_nat: HashMap<MapData, u32, RevNatValue>,
    pub services6: HashMap<MapData, Service6Key, ServiceValue>,
    pub backends6: HashMap<MapData, u32, Backend6>,
    pub rev_nat6: HashMap<MapData, u32, RevNat6Value>,
    pub endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    pub endpoints6: HashMap<MapData, Endpoint6Key, EndpointInfo>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub stats: PerCpuArray<MapData, Counter>,
    pub routes: LpmTrie<MapData, [u8; 4], RouteInfo>,
    pub routes6: LpmTrie<MapData, Route6Prefix, RouteInfo>,
    pub config: Array<MapData, NodeConfig>,
    pub lb_stats: PerCpuHashMap<MapData, LbStatKey, Counter>,
    pub maglev: HashMap<MapData, ServiceKey, MaglevTable>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    pub ipcache: LpmTrie<MapData, [u8; 4], IpcacheValue>,
    pub policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    /// The in-kernel purge of ended flows: its program and the two maps it reads
    /// (`None`: pins of an agent from before it, or a test bed without it; the
    /// purge then reads the tables to userspace).
    purge_program: Option<OwnedFd>,
    purge_maps: Option<PurgeMaps>,
}

/// What `program_names::PURGE` reads: the removed backends, the ended pairs.
struct PurgeMaps {
    backends: HashMap<MapData, u32, u8>,
    pairs: HashMap<MapData, PurgePair, u8>,
}

fn source_range_key(range: &SourceRange) -> Key<SourceRangeKey> {
    Key::new(
        SOURCE_RANGE_FRONTEND_BITS + range.prefix_len,
        SourceRangeKey {
            frontend: range.frontend,
            network: range.network,
        },
    )
}

fn lpm_key(key: &RouteKey) -> Key<[u8; 4]> {
    Key::new(key.prefix_len, key.network)
}

fn policy_key(rule: &PolicyRule) -> Key<PolicyKey> {
    Key::new(rule.prefix_len, rule.key)
}

fn open(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("map {name}"))
}

/// Every entry of a hash map, read [`BATCH`] at a time (entry by entry where the
/// kernel has no batch lookup).
fn entries<K: aya::Pod + Ord, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &str,
) -> Result<std::collections::BTreeMap<K, V>> {
    let fd = map.map().fd().as_fd();
    match crate::bpf_syscall::lookup_all(fd, BATCH).with_context(|| format!("reading {name}"))? {
        Some(entries) => Ok(entries.into_iter().collect()),
        None => map
            .iter()
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {name}")),
    }
}

impl NodeMaps {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let mut maps = Self::from_maps(|name| open(pin_dir, name))?;
        if let Ok(program) = crate::bpf_syscall::bpf_obj_get(&pin_dir.join(program_names::PURGE)) {
            maps.set_purge_program(Some(program));
        }
        Ok(maps)
    }

    /// Purge ended flows by running `program` (`program_names::PURGE` of the object
    /// these maps belong to) in the kernel; `None`: by reading the tables instead.
    /// Returns the program used before.
    pub fn set_purge_program(&mut self, program: Option<OwnedFd>) -> Option<OwnedFd> {
        std::mem::replace(&mut self.purge_program, program)
    }

    /// The maps `map` opens by name: pinned ones, or those of an object loaded
    /// without pinning (the packet test bed writes through the agent's writer too).
    pub fn from_maps(mut map: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            services: map(map_names::SERVICES)?.try_into()?,
            backends: map(map_names::BACKENDS)?.try_into()?,
            rev_nat: map(map_names::REV_NAT)?.try_into()?,
            services6: map(map_names::SERVICES6)?.try_into()?,
            backends6: map(map_names::BACKENDS6)?.try_into()?,
            rev_nat6: map(map_names::REV_NAT6)?.try_into()?,
            endpoints: map(map_names::ENDPOINTS)?.try_into()?,
            endpoints6: map(map_names::ENDPOINTS6)?.try_into()?,
            conntrack: map(map_names::CONNTRACK)?.try_into()?,
            stats: map(map_names::STATS)?.try_into()?,
            routes: map(map_names::ROUTES)?.try_into()?,
            routes6: map(map_names::ROUTES6)?.try_into()?,
            config: map(map_names::CONFIG)?.try_into()?,
            lb_stats: map(map_names::LB_STATS)?.try_into()?,
            maglev: map(map_names::MAGLEV)?.try_into()?,
            affinity: map(map_names::AFFINITY)?.try_into()?,
            source_ranges: map(map_names::SOURCE_RANGES)?.try_into()?,
            ipcache: map(map_names::IPCACHE)?.try_into()?,
            policy: map(map_names::POLICY)?.try_into()?,
            purge_program: None,
            // Absent from the pins of an agent from before the in-kernel purge.
            purge_maps: (|| {
                Some(PurgeMaps {
                    backends: map(map_names::PURGE_BACKENDS).ok()?.try_into().ok()?,
                    pairs: map(map_names::PURGE_PAIRS).ok()?.try_into().ok()?,
                })
            })(),
        })
    }

    /// Everything the maps hold, as a sync compares it.
    pub fn contents(&self) -> Result<MapContents> {
        Ok(MapContents {
            maglev: self
                .maglev
                .iter()
                .map(|entry| entry.map(|(key, table)| (key, table.digest)))
                .collect::<Result<_, _>>()
                .with_context(|| format!("reading {}", map_names::MAGLEV))?,
            ..self.contents_without_maglev()?
        })
    }

    /// Like [`NodeMaps::contents`] but without reading the Maglev tables (32 KiB each,
    /// read whole to get their digests): for metrics and inspection, which do not
    /// compare them.
    pub fn contents_without_maglev(&self) -> Result<MapContents> {
        Ok(MapContents {
            services: entries(&self.services, map_names::SERVICES)?,
            backends: entries(&self.backends, map_names::BACKENDS)?,
            rev_nat: entries(&self.rev_nat, map_names::REV_NAT)?,
            services6: entries(&self.services6, map_names::SERVICES6)?,
            backends6: entries(&self.backends6, map_names::BACKENDS6)?,
            rev_nat6: entries(&self.rev_nat6, map_names::REV_NAT6)?,
            endpoints: entries(&self.endpoints, map_names::ENDPOINTS)?,
            endpoints6: entries(&self.endpoints6, map_names::ENDPOINTS6)?,
            routes: self.route_entries()?,
            routes6: self.route6_entries()?,
            config: self.config.get(&0, 0)?,
            maglev: Default::default(),
            source_ranges: self
                .source_ranges
                .iter()
                .map(|entry| {
                    entry.map(|(key, _)| SourceRange {
                        frontend: key.data().frontend,
                        network: key.data().network,
                        prefix_len: key.prefix_len().saturating_sub(SOURCE_RANGE_FRONTEND_BITS),
                    })
                })
                .collect::<Result<_, _>>()
                .with_context(|| format!("reading {}", map_names::SOURCE_RANGES))?,
            ipcache: self
                .ipcache
                .iter()
                .map(|entry| {
                    entry.map(|(key, value)| {
                        let prefix = RouteKey {
                            prefix_len: key.prefix_len(),
                            network: key.data(),
                        };
                        (prefix, value)
                    })
                })
                .collect::<Result<_, _>>()
                .with_context(|| format!("reading {}", map_names::IPCACHE))?,
            policy: self
                .policy
                .iter()
                .map(|entry| {
                    entry.map(|(key, value)| {
                        let rule = PolicyRule {
                            prefix_len: key.prefix_len(),
                            key: key.data(),
                        };
                        (rule, value)
                    })
                })
                .collect::<Result<_, _>>()
                .with_context(|| format!("reading {}", map_names::POLICY))?,
        })
    }

    /// The Maglev table of `master` built from its first `count` slots as the maps
    /// hold them now (written just before), checked against the planned `digest`.
    fn maglev_table(
        &self,
        master: &ServiceKey,
        count: u16,
        digest: u64,
    ) -> Result<Box<MaglevTable>> {
        let mut backends = Vec::with_capacity(count as usize);
        for slot in 1..=count {
            let key = ServiceKey {
                backend_slot: slot,
                ..*master
            };
            let id = self.services.get(&key, 0)?.backend_id;
            backends.push(self.backends.get(&id, 0)?);
        }
        anyhow::ensure!(
            maglev_digest(backends.iter().copied()) == digest,
            "the slots of {} changed while its Maglev table was built",
            describe_service_key(master)
        );
        let keys: Vec<[u8; 6]> = backends.iter().map(maglev_key).collect();
        let owners = crate::maglev::table(&keys, MAGLEV_TABLE_SIZE).map_err(anyhow::Error::msg)?;
        let mut table = Box::new(MaglevTable {
            digest,
            backend_slots: [0; MAGLEV_TABLE_SIZE],
            _pad: [0; 3],
        });
        for (entry, owner) in table.backend_slots.iter_mut().zip(owners) {
            *entry = owner as u16 + 1; // slots count from 1
        }
        Ok(table)
    }

    /// Every route (this node's pod CIDRs, other nodes' and their addresses).
    pub fn route_entries(&self) -> Result<std::collections::BTreeMap<RouteKey, RouteInfo>> {
        self.routes
            .iter()
            .map(|entry| {
                entry.map(|(key, value)| {
                    let route = RouteKey {
                        prefix_len: key.prefix_len(),
                        network: key.data(),
                    };
                    (route, value)
                })
            })
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", map_names::ROUTES))
    }

    /// Every IPv6 route (the nodes' IPv6 pod CIDRs).
    pub fn route6_entries(&self) -> Result<std::collections::BTreeMap<Route6Key, RouteInfo>> {
        self.routes6
            .iter()
            .map(|entry| {
                entry.map(|(key, value)| {
                    let route = Route6Key {
                        prefix_len: key.prefix_len(),
                        network: key.data(),
                    };
                    (route, value)
                })
            })
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", map_names::ROUTES6))
    }

    /// The node's configuration entry (its address, once the agent knows it).
    pub fn node_config(&self) -> Result<NodeConfig> {
        self.config
            .get(&0, 0)
            .with_context(|| format!("reading {}", map_names::CONFIG))
    }

    /// The endpoint entry of one pod address, if any.
    pub fn endpoint(&self, key: &EndpointKey) -> Result<Option<EndpointInfo>> {
        match self.endpoints.get(key, 0) {
            Ok(info) => Ok(Some(info)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading ferrite_endpnt"),
        }
    }

    /// The IPv6 endpoint entry of one pod address, if any.
    pub fn endpoint6(&self, key: &Endpoint6Key) -> Result<Option<EndpointInfo>> {
        match self.endpoints6.get(key, 0) {
            Ok(info) => Ok(Some(info)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", map_names::ENDPOINTS6)),
        }
    }

    /// Only the endpoints (a few hundred at most): the CNI plugin writes them between
    /// syncs, so even event-driven syncs read them fresh.
    pub fn endpoint_entries(
        &self,
    ) -> Result<std::collections::BTreeMap<EndpointKey, EndpointInfo>> {
        entries(&self.endpoints, map_names::ENDPOINTS)
    }

    /// Only the IPv6 endpoints (see [`NodeMaps::endpoint_entries`]).
    pub fn endpoint6_entries(
        &self,
    ) -> Result<std::collections::BTreeMap<Endpoint6Key, EndpointInfo>> {
        entries(&self.endpoints6, map_names::ENDPOINTS6)
    }

    /// Every conntrack entry (both directions of every flow), [`BATCH`] at a time: a
    /// full table is 262,144 entries, and read entry by entry (two syscalls each) it
    /// took most of a backend removal's time, and of the idle agent's.
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtValue)>> {
        let fd = self.conntrack.map().fd().as_fd();
        let batched = crate::bpf_syscall::lookup_all(fd, BATCH)
            .with_context(|| format!("reading {}", map_names::CONNTRACK))?;
        Ok(match batched {
            Some(entries) => entries,
            // LRU entries can vanish while we iterate: skip those instead of failing.
            None => self.conntrack.iter().filter_map(Result::ok).collect(),
        })
    }

    /// New flows per Service frontend and backend (`packets`), summed over CPUs.
    pub fn lb_counters(&self) -> Result<Vec<(LbStatKey, Counter)>> {
        // LRU entries can vanish while we iterate: skip those.
        Ok(self
            .lb_stats
            .iter()
            .filter_map(Result::ok)
            .map(|(key, per_cpu)| (key, sum(per_cpu.iter())))
            .collect())
    }

    /// Drop the counters of removed backends and Service ports, so an id reused
    /// later starts from zero.
    pub fn purge_lb_counters(&mut self, ops: &[Op]) -> Result<usize> {
        let removed_backends = crate::plan::removed_backends(ops);
        let removed_frontends: BTreeSet<u32> = ops
            .iter()
            .filter_map(|op| match op {
                Op::DeleteRevNat(index) => Some(*index),
                _ => None,
            })
            .collect();
        if removed_backends.is_empty() && removed_frontends.is_empty() {
            return Ok(0);
        }
        let stale: Vec<LbStatKey> = self
            .lb_stats
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                removed_backends.contains(&k.backend_id)
                    || removed_frontends.contains(&k.rev_nat_index)
            })
            .collect();
        for key in &stale {
            let _ = self.lb_stats.remove(key);
        }
        Ok(stale.len())
    }

    /// The datapath's counters, each summed over CPUs, in `stat` index order.
    pub fn counters(&self) -> Result<Vec<Counter>> {
        (0..stat::COUNT)
            .map(|index| Ok(sum(self.stats.get(&index, 0)?.iter())))
            .collect()
    }

    /// Apply `ops` in order. Stops at the first failure, naming the map and entry; the
    /// order of `ops` guarantees that what was written before is consistent. Puts in
    /// a row into one of the Service or endpoint maps go in one batch call.
    pub fn apply(&mut self, ops: &[Op]) -> Result<()> {
        let mut rest = ops;
        while !rest.is_empty() {
            let done = match self.put_batch(rest)? {
                0 => {
                    self.apply_one(&rest[0])?;
                    1
                }
                written => written,
            };
            rest = &rest[done..];
        }
        Ok(())
    }

    /// Write the puts into one map that `ops` starts with (at most [`BATCH`]) in one
    /// BPF_MAP_UPDATE_BATCH; returns how many ops that was (0: `ops` does not start
    /// with such a put).
    fn put_batch(&mut self, ops: &[Op]) -> Result<usize> {
        fn run<K: aya::Pod, V: aya::Pod>(
            map: &HashMap<MapData, K, V>,
            ops: &[Op],
            entry: impl Fn(&Op) -> Option<(K, V)>,
        ) -> Result<usize> {
            let (keys, values): (Vec<K>, Vec<V>) = ops.iter().take(BATCH).map_while(entry).unzip();
            let fd = map.map().fd().as_fd();
            match crate::bpf_syscall::update_batch(fd, &keys, &values) {
                Ok(()) => Ok(keys.len()),
                Err(failed) => Err(anyhow::Error::new(failed.error))
                    .with_context(|| describe_op(&ops[failed.written])),
            }
        }
        match ops.first() {
            Some(Op::PutBackend(..)) => run(&self.backends, ops, |op| match op {
                Op::PutBackend(id, value) => Some((*id, *value)),
                _ => None,
            }),
            Some(Op::PutRevNat(..)) => run(&self.rev_nat, ops, |op| match op {
                Op::PutRevNat(index, value) => Some((*index, *value)),
                _ => None,
            }),
            Some(Op::PutService(..)) => run(&self.services, ops, |op| match op {
                Op::PutService(key, value) => Some((*key, *value)),
                _ => None,
            }),
            Some(Op::PutBackend6(..)) => run(&self.backends6, ops, |op| match op {
                Op::PutBackend6(id, value) => Some((*id, *value)),
                _ => None,
            }),
            Some(Op::PutRevNat6(..)) => run(&self.rev_nat6, ops, |op| match op {
                Op::PutRevNat6(index, value) => Some((*index, *value)),
                _ => None,
            }),
            Some(Op::PutService6(..)) => run(&self.services6, ops, |op| match op {
                Op::PutService6(key, value) => Some((*key, *value)),
                _ => None,
            }),
            Some(Op::PutEndpoint(..)) => run(&self.endpoints, ops, |op| match op {
                Op::PutEndpoint(key, value) => Some((*key, *value)),
                _ => None,
            }),
            Some(Op::PutEndpoint6(..)) => run(&self.endpoints6, ops, |op| match op {
                Op::PutEndpoint6(key, value) => Some((*key, *value)),
                _ => None,
            }),
            _ => Ok(0),
        }
    }

    fn apply_one(&mut self, op: &Op) -> Result<()> {
        let result = match op {
            Op::PutBackend(id, value) => self.backends.insert(id, value, 0),
            Op::PutRevNat(index, value) => self.rev_nat.insert(index, value, 0),
            Op::PutService(key, value) => self.services.insert(key, value, 0),
            Op::PutEndpoint(key, value) => self.endpoints.insert(key, value, 0),
            Op::PutBackend6(id, value) => self.backends6.insert(id, value, 0),
            Op::PutRevNat6(index, value) => self.rev_nat6.insert(index, value, 0),
            Op::PutService6(key, value) => self.services6.insert(key, value, 0),
            Op::DeleteService6(key) => self.services6.remove(key),
            Op::DeleteRevNat6(index) => self.rev_nat6.remove(index),
            Op::DeleteBackend6(id) => self.backends6.remove(id),
            Op::PutEndpoint6(key, value) => self.endpoints6.insert(key, value, 0),
            Op::DeleteService(key) => self.services.remove(key),
            Op::DeleteRevNat(index) => self.rev_nat.remove(index),
            Op::DeleteBackend(id) => self.backends.remove(id),
            Op::DeleteEndpoint(key) => self.endpoints.remove(key),
            Op::DeleteEndpoint6(key) => self.endpoints6.remove(key),
            Op::PutConfig(config) => self.config.set(0, config, 0),
            Op::PutRoute(key, value) => self.routes.insert(&lpm_key(key), value, 0),
            Op::DeleteRoute(key) => self.routes.remove(&lpm_key(key)),
            Op::PutRoute6(key, value) => {
                let key = Key::new(key.prefix_len, key.network);
                self.routes6.insert(&key, value, 0)
            }
            Op::DeleteRoute6(key) => self.routes6.remove(&Key::new(key.prefix_len, key.network)),
            Op::PutMaglev(key, count, digest) => {
                let table = self
                    .maglev_table(key, *count, *digest)
                    .with_context(|| describe_op(op))?;
                self.maglev.insert(key, table.as_ref(), 0)
            }
            Op::DeleteMaglev(key) => self.maglev.remove(key),
            Op::PutSourceRange(range) => self.source_ranges.insert(&source_range_key(range), 1, 0),
            Op::DeleteSourceRange(range) => self.source_ranges.remove(&source_range_key(range)),
            Op::PutIpcache(key, value) => self.ipcache.insert(&lpm_key(key), value, 0),
            Op::DeleteIpcache(key) => self.ipcache.remove(&lpm_key(key)),
            Op::PutPolicy(rule, value) => self.policy.insert(&policy_key(rule), value, 0),
            Op::DeletePolicy(rule) => self.policy.remove(&policy_key(rule)),
        };
        match result {
            // A delete of what is already gone (the CNI plugin removed it) is done.
            Err(MapError::SyscallError(e))
                if op.removes() && e.io_error.raw_os_error() == Some(nix::libc::ENOENT) => {}
            other => other.with_context(|| describe_op(op))?,
        }
        Ok(())
    }

    /// Apply `ops` to maps that held `before`, then forget what they ended: the
    /// conntrack entries of removed backends and of ended Service-backend pairs, and
    /// the load-balancing counters of removed entries. Returns the flows purged.
    pub fn write(&mut self, before: &MapContents, ops: &[Op]) -> Result<usize> {
        let ended = crate::plan::ended_pairs(before, ops);
        self.apply(ops).context("applying map changes")?;
        let purged_flows = self.purge_conntrack(&crate::plan::removed_backends(ops), &ended)?;
        self.purge_lb_counters(ops)?;
        Ok(purged_flows)
    }

    /// Remove the entries of flows idle past their lifetime (see `conntrack_gc`), and
    /// return them as they were removed. An entry a packet touched since it was read
    /// is left for the next round.
    pub fn collect_conntrack_garbage(
        &mut self,
        (now, hz): (u64, u64),
        lifetimes: &crate::conntrack_gc::Lifetimes,
    ) -> Result<Vec<(CtKey, CtValue)>> {
        let entries = self.conntrack_entries()?;
        let mut removed = Vec::new();
        for (key, seen) in crate::conntrack_gc::expired(&entries, now, hz, lifetimes) {
            let Ok(value) = self.conntrack.get(&key, 0) else {
                continue;
            };
            if value.last_seen_jiffies == seen && self.conntrack.remove(&key).is_ok() {
                removed.push((key, value));
            }
        }
        Ok(removed)
    }

    /// Remove the conntrack entries (both directions) and affinity pins of flows that
    /// the sync ended: pinned to a removed backend (`removed_backends`), or to a
    /// backend that no longer serves their frontend (`ended`: rev-NAT index, backend
    /// id), though it may live on behind another. Forward entries cache their backend,
    /// so this is what moves such a flow to a current backend on its next packet (UDP
    /// clients are not stuck on the old one), and a later backend reusing the id never
    /// inherits them. Each entry is judged by its own backend id and rev-NAT index
    /// (forward and reply entries carry both). A table of at most
    /// [`SPARSE_CONNTRACK_ENTRIES`] is read out and purged from userspace; a busier one
    /// in the kernel when the program is there (one walk, no copy of the table), else
    /// from userspace too. Returns how many conntrack entries went.
    pub fn purge_conntrack(
        &mut self,
        removed_backends: &BTreeSet<u32>,
        ended: &BTreeSet<(u32, u32)>,
    ) -> Result<usize> {
        if removed_backends.is_empty() && ended.is_empty() {
            return Ok(0);
        }
        // The kernel's walk visits every bucket, flows or none (~4 ms for 262,144);
        // a table of a few thousand flows is read out and purged in a fraction of it.
        let fd = self.conntrack.map().fd().as_fd();
        if let Some((entries, true)) =
            crate::bpf_syscall::lookup_up_to(fd, BATCH, SPARSE_CONNTRACK_ENTRIES)
                .with_context(|| format!("reading {}", map_names::CONNTRACK))?
        {
            return self.purge_entries_in_userspace(entries, removed_backends, ended);
        }
        match self.purge_conntrack_in_kernel(removed_backends, ended) {
            Ok(Some(counts)) => return Ok(counts.conntrack as usize),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("in-kernel conntrack purge failed, purging from userspace: {e:#}")
            }
        }
        self.purge_conntrack_in_userspace(removed_backends, ended)
    }

    /// [`NodeMaps::purge_conntrack`] by `program_names::PURGE`; `None` when it cannot
    /// (no program, or more backends or pairs than its maps hold).
    pub fn purge_conntrack_in_kernel(
        &mut self,
        removed_backends: &BTreeSet<u32>,
        ended: &BTreeSet<(u32, u32)>,
    ) -> Result<Option<PurgeCounts>> {
        let (Some(program), Some(maps)) = (&self.purge_program, &mut self.purge_maps) else {
            return Ok(None);
        };
        let capacity = purge::CAPACITY as usize;
        if removed_backends.len() > capacity || ended.len() > capacity {
            return Ok(None);
        }
        // A few removed backends go inline in the request, compared without a
        // lookup per entry; more go through the map.
        let backends: Vec<u32> = removed_backends.iter().copied().collect();
        let mut request = PurgeRequest::default();
        if backends.len() <= purge::INLINE_BACKENDS {
            request.backends[..backends.len()].copy_from_slice(&backends);
            request.inline_backends = backends.len() as u32;
        } else {
            request.lookups |= purge::LOOKUP_BACKENDS;
        }
        if !ended.is_empty() {
            request.lookups |= purge::LOOKUP_PAIRS;
        }
        let pairs: Vec<PurgePair> = ended
            .iter()
            .map(|(index, backend)| PurgePair::new(*index, *backend))
            .collect();
        // What an agent stopped mid-purge left must not purge anything now.
        clear(&mut maps.backends, map_names::PURGE_BACKENDS)?;
        clear(&mut maps.pairs, map_names::PURGE_PAIRS)?;
        let run = (|| -> Result<PurgeCounts> {
            if request.lookups & purge::LOOKUP_BACKENDS != 0 {
                fill(&maps.backends, &backends, map_names::PURGE_BACKENDS)?;
            }
            fill(&maps.pairs, &pairs, map_names::PURGE_PAIRS)?;
            // SAFETY: PurgeRequest is #[repr(C)] u32s only: no padding bytes.
            let mut frame: Vec<u8> = unsafe {
                std::slice::from_raw_parts(
                    (&request as *const PurgeRequest).cast::<u8>(),
                    std::mem::size_of::<PurgeRequest>(),
                )
            }
            .to_vec();
            let returned = crate::bpf_syscall::test_run(program.as_fd(), &mut frame)
                .with_context(|| format!("running {}", program_names::PURGE))?;
            anyhow::ensure!(
                returned == purge::DONE as u32,
                "{} returned {returned}",
                program_names::PURGE
            );
            let counts = |at: usize| u32::from_ne_bytes(frame[at..at + 4].try_into().expect("4"));
            Ok(PurgeCounts {
                conntrack: counts(0),
                affinity: counts(4),
            })
        })();
        clear(&mut maps.backends, map_names::PURGE_BACKENDS)?;
        clear(&mut maps.pairs, map_names::PURGE_PAIRS)?;
        run.map(Some)
    }

    /// [`NodeMaps::purge_conntrack`] by reading both tables to userspace and deleting
    /// entry by entry: the way without the program.
    pub fn purge_conntrack_in_userspace(
        &mut self,
        removed_backends: &BTreeSet<u32>,
        ended: &BTreeSet<(u32, u32)>,
    ) -> Result<usize> {
        let entries = self.conntrack_entries()?;
        self.purge_entries_in_userspace(entries, removed_backends, ended)
    }

    /// The userspace purge of `entries`, the conntrack table as just read.
    fn purge_entries_in_userspace(
        &mut self,
        entries: Vec<(CtKey, CtValue)>,
        removed_backends: &BTreeSet<u32>,
        ended: &BTreeSet<(u32, u32)>,
    ) -> Result<usize> {
        let gone = |rev_nat_index: u32, backend_id: u32| {
            removed_backends.contains(&backend_id) || ended.contains(&(rev_nat_index, backend_id))
        };
        let stale: Vec<CtKey> = entries
            .into_iter()
            .filter(|(_, value)| gone(value.rev_nat_index, value.backend_id))
            .map(|(key, _)| key)
            .collect();
        for key in &stale {
            // Already evicted by the LRU is as good as removed.
            let _ = self.conntrack.remove(key);
        }
        // Session-affinity pins go too (per-packet and socket-level ones): the next
        // flow of such a client is balanced afresh instead of finding a reused id.
        let pins: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, pin)| gone(key.rev_nat_index, pin.backend_id))
            .map(|(key, _)| key)
            .collect();
        for key in &pins {
            let _ = self.affinity.remove(key);
        }
        Ok(stale.len())
    }
}

/// Write `keys` (each -> 1) into a purge map, in one batch.
fn fill<K: aya::Pod>(map: &HashMap<MapData, K, u8>, keys: &[K], name: &str) -> Result<()> {
    let ones = vec![1u8; keys.len()];
    crate::bpf_syscall::update_batch(map.map().fd().as_fd(), keys, &ones)
        .map_err(|failed| failed.error)
        .with_context(|| format!("writing {name}"))
}

/// Empty a purge map (a few entries at most, between purges none).
fn clear<K: aya::Pod + Ord>(map: &mut HashMap<MapData, K, u8>, name: &str) -> Result<()> {
    for key in entries(map, name)?.into_keys() {
        match map.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) => {}
            Err(e) => return Err(e).with_context(|| format!("emptying {name}")),
        }
    }
    Ok(())
}

/// One counter summed over its per-CPU values.
fn sum<'a>(per_cpu: impl Iterator<Item = &'a Counter>) -> Counter {
    per_cpu.fold(Counter::default(), |sum, c| Counter {
        packets: sum.packets + c.packets,
        bytes: sum.bytes + c.bytes,
    })
}

/// What `op` does, for errors and logs.
pub fn describe_op(op: &Op) -> String {
    match op {
        Op::PutBackend(id, b) => format!(
            "writing backend {id} ({}:{}) to {}",
            std::net::Ipv4Addr::from(b.address),
            b.port,
            map_names::BACKENDS
        ),
        Op::PutRevNat(index, _) => format!("writing rev-NAT {index} to {}", map_names::REV_NAT),
        Op::PutService(key, _) => format!(
            "writing service {} slot {} to {}",
            describe_service_key(key),
            key.backend_slot,
            map_names::SERVICES
        ),
        Op::PutBackend6(id, b) => format!(
            "writing backend {id} ({}) to {}",
            std::net::SocketAddr::new(std::net::Ipv6Addr::from(b.address).into(), b.port),
            map_names::BACKENDS6
        ),
        Op::PutRevNat6(index, _) => format!("writing rev-NAT {index} to {}", map_names::REV_NAT6),
        Op::PutService6(key, _) => format!(
            "writing service {} slot {} to {}",
            describe_service6_key(key),
            key.backend_slot,
            map_names::SERVICES6
        ),
        Op::DeleteService6(key) => format!(
            "removing service {} slot {} from {}",
            describe_service6_key(key),
            key.backend_slot,
            map_names::SERVICES6
        ),
        Op::DeleteRevNat6(index) => {
            format!("removing rev-NAT {index} from {}", map_names::REV_NAT6)
        }
        Op::DeleteBackend6(id) => format!("removing backend {id} from {}", map_names::BACKENDS6),
        Op::PutEndpoint(key, _) => format!(
            "writing endpoint {} to {}",
            std::net::Ipv4Addr::from(key.address),
            map_names::ENDPOINTS
        ),
        Op::PutEndpoint6(key, _) => format!(
            "writing endpoint {} to {}",
            std::net::Ipv6Addr::from(key.address),
            map_names::ENDPOINTS6
        ),
        Op::DeleteEndpoint6(key) => format!(
            "removing endpoint {} from {}",
            std::net::Ipv6Addr::from(key.address),
            map_names::ENDPOINTS6
        ),
        Op::DeleteService(key) => format!(
            "removing service {} slot {} from {}",
            describe_service_key(key),
            key.backend_slot,
            map_names::SERVICES
        ),
        Op::DeleteRevNat(index) => format!("removing rev-NAT {index} from {}", map_names::REV_NAT),
        Op::DeleteBackend(id) => format!("removing backend {id} from {}", map_names::BACKENDS),
        Op::DeleteEndpoint(key) => format!(
            "removing endpoint {} from {}",
            std::net::Ipv4Addr::from(key.address),
            map_names::ENDPOINTS
        ),
        Op::PutConfig(_) => format!("writing the node config to {}", map_names::CONFIG),
        Op::PutRoute(key, route) => format!(
            "writing route {}/{} via {} to {}",
            std::net::Ipv4Addr::from(key.network),
            key.prefix_len,
            std::net::Ipv4Addr::from(route.node_ip),
            map_names::ROUTES
        ),
        Op::DeleteRoute(key) => format!(
            "removing route {}/{} from {}",
            std::net::Ipv4Addr::from(key.network),
            key.prefix_len,
            map_names::ROUTES
        ),
        Op::PutRoute6(key, route) => format!(
            "writing route {}/{} via {} to {}",
            std::net::Ipv6Addr::from(key.network),
            key.prefix_len,
            std::net::Ipv4Addr::from(route.node_ip),
            map_names::ROUTES6
        ),
        Op::DeleteRoute6(key) => format!(
            "removing route {}/{} from {}",
            std::net::Ipv6Addr::from(key.network),
            key.prefix_len,
            map_names::ROUTES6
        ),
        Op::PutMaglev(key, count, _) => format!(
            "writing the Maglev table of {} ({count} backends) to {}",
            describe_service_key(key),
            map_names::MAGLEV
        ),
        Op::DeleteMaglev(key) => format!(
            "removing the Maglev table of {} from {}",
            describe_service_key(key),
            map_names::MAGLEV
        ),
        Op::PutSourceRange(range) => format!(
            "allowing {}/{} to reach {} in {}",
            std::net::Ipv4Addr::from(range.network),
            range.prefix_len,
            describe_service_key(&range.frontend),
            map_names::SOURCE_RANGES
        ),
        Op::DeleteSourceRange(range) => format!(
            "removing {}/{} of {} from {}",
            std::net::Ipv4Addr::from(range.network),
            range.prefix_len,
            describe_service_key(&range.frontend),
            map_names::SOURCE_RANGES
        ),
        Op::PutIpcache(key, value) => format!(
            "writing identity {} of {}/{} to {}",
            value.identity,
            std::net::Ipv4Addr::from(key.network),
            key.prefix_len,
            map_names::IPCACHE
        ),
        Op::DeleteIpcache(key) => format!(
            "removing {}/{} from {}",
            std::net::Ipv4Addr::from(key.network),
            key.prefix_len,
            map_names::IPCACHE
        ),
        Op::PutPolicy(rule, _) => format!(
            "allowing {} in {}",
            describe_policy_rule(rule),
            map_names::POLICY
        ),
        Op::DeletePolicy(rule) => format!(
            "removing {} from {}",
            describe_policy_rule(rule),
            map_names::POLICY
        ),
    }
}
