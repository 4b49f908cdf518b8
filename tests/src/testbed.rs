//! The datapath object loaded without pinning, for BPF_PROG_TEST_RUN: fill its maps,
//! feed it frames, read back the frame and the verdict.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
    os::fd::AsFd,
};

use anyhow::{Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use ferrite_agent::{
    explain::run::{skb_context, xdp_context, OneCpu, TcContext},
    maps::NodeMaps,
    model::{policy::Allow, L4Addr, Protocol},
    plan::{
        self, backend_value, maglev_digest, rev_nat_value, FrontendEntries, MapContents, Op,
        SourceRange,
    },
};
use ferrite_common::{
    explain::{self, SockRequest},
    map_names, pod_mac_for,
    policy::{IpcacheValue, PolicyValue, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED},
    program_names, stat, Counter, CtKey, CtValue, Endpoint6Key, EndpointInfo, EndpointKey,
    ExplainTrace, MaglevTable, MonitorEvent, NodeConfig, RouteInfo, ServiceKey, ServiceValue,
};

use crate::lab::{bpf_object, require_root};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
/// BPF_PROG_TEST_RUN runs skb programs as if the packet came in on loopback.
pub const TEST_RUN_IFINDEX: u32 = 1;

pub struct Testbed {
    pub ebpf: Ebpf,
    /// The same maps, opened as the agent opens a node's: the Service entries are
    /// written through its map writer, laid out by its plan.
    maps: NodeMaps,
}

pub struct RunResult {
    pub verdict: u32,
    pub frame: Vec<u8>,
}

impl Testbed {
    pub fn load() -> Result<Self> {
        Self::load_sized(&[])
    }

    /// The maps, as the agent opens a node's.
    pub fn node_maps(&mut self) -> &mut NodeMaps {
        &mut self.maps
    }

    /// Loaded with some maps sized otherwise (`(name, max_entries)`), as the agent
    /// sizes them for a node's load.
    pub fn load_sized(capacities: &[(&str, u32)]) -> Result<Self> {
        require_root()?;
        let mut loader = EbpfLoader::new();
        for (name, entries) in capacities {
            loader.map_max_entries(name, *entries);
        }
        let mut ebpf = loader
            .load_file(bpf_object())
            .context("loading the eBPF object")?;
        for name in [
            program_names::FROM_POD,
            program_names::FROM_POD6,
            program_names::TO_POD,
            program_names::FROM_OVERLAY,
            program_names::FROM_OVERLAY6,
            program_names::FROM_UPLINK,
            program_names::FROM_HOST,
            program_names::NOOP,
            program_names::EXPLAIN_POD,
            program_names::EXPLAIN_OVERLAY,
            program_names::EXPLAIN_POD6,
            program_names::EXPLAIN_OVERLAY6,
            program_names::EXPLAIN_UPLINK,
            program_names::EXPLAIN_SOCK,
            program_names::PURGE,
        ]
        .into_iter()
        .chain(program_names::TC_FLOORS)
        {
            let program: &mut SchedClassifier =
                ebpf.program_mut(name).context("program")?.try_into()?;
            program.load()?;
        }
        for name in [
            program_names::FROM_WORLD,
            program_names::NOOP_XDP,
            program_names::EXPLAIN_WORLD,
        ]
        .into_iter()
        .chain(program_names::XDP_FLOORS)
        {
            let xdp: &mut Xdp = ebpf.program_mut(name).context("program")?.try_into()?;
            xdp.load()?;
        }
        let mut maps = NodeMaps::from_maps(|name| {
            let map = ebpf.map(name).with_context(|| format!("map {name}"))?;
            let id = map_data(name, map)?.info()?.id();
            Ok(Map::from_map_data(MapData::from_id(id)?)?)
        })?;
        // The agent's writer purges ended flows with the object's program, as a node's.
        let purge: &SchedClassifier = ebpf
            .program(program_names::PURGE)
            .context("program")?
            .try_into()?;
        maps.set_purge_program(Some(purge.fd()?.as_fd().try_clone_to_owned()?));
        Ok(Self { ebpf, maps })
    }

    /// Write `entries` (Service entries only: a plan's endpoints or routes would bump
    /// the route epoch of a default config) as the agent writes a plan: its ops, in
    /// its order.
    fn write_service_entries(&mut self, entries: &MapContents) -> Result<()> {
        self.maps
            .apply(&plan::diff(&MapContents::default(), entries))
    }

    /// The master entry of a frontend written before.
    fn master(&self, frontend: SocketAddrV4, protocol: u8) -> Result<(ServiceKey, ServiceValue)> {
        let key = ServiceKey::new(*frontend.ip(), frontend.port(), protocol, 0);
        Ok((key, self.maps.services.get(&key, 0)?))
    }

    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> Result<HashMap<&mut MapData, K, V>> {
        Ok(HashMap::try_from(self.ebpf.map_mut(name).context("map")?)?)
    }

    /// A pod on this "node": `ifindex` is where its traffic must come from.
    pub fn add_endpoint(&mut self, ip: Ipv4Addr, ifindex: u32) -> Result<()> {
        self.set_endpoint(ip, ifindex, [0xee; 6])
    }

    /// Write the pod `ip`'s endpoint entry: its host-side veth `ifindex` and that
    /// veth's MAC (the source MAC of frames delivered to the pod).
    pub fn set_endpoint(&mut self, ip: Ipv4Addr, ifindex: u32, host_mac: [u8; 6]) -> Result<()> {
        self.hash_map::<EndpointKey, EndpointInfo>(map_names::ENDPOINTS)?
            .insert(
                EndpointKey {
                    address: ip.octets(),
                },
                EndpointInfo {
                    ifindex,
                    pod_mac: pod_mac_for(ip),
                    host_mac,
                    flags: 0,
                },
                0,
            )?;
        Ok(())
    }

    /// The pod with the IPv6 address `ip` on this "node": its entry in
    /// `ferrite_endpnt6`, `flags` as the agent sets them (`policy::ENDPOINT_*`).
    pub fn add_endpoint6(&mut self, ip: Ipv6Addr, info: EndpointInfo) -> Result<()> {
        self.hash_map::<Endpoint6Key, EndpointInfo>(map_names::ENDPOINTS6)?
            .insert(
                Endpoint6Key {
                    address: ip.octets(),
                },
                info,
                0,
            )?;
        Ok(())
    }

    /// Fill `ferrite_progs` as the agent does at load (the IPv6 half of the
    /// from-pod program is reached through it).
    pub fn fill_tail_calls(&mut self) -> Result<()> {
        ferrite_agent::datapath::fill_tail_calls(&mut self.ebpf)
    }

    /// Move the node's route epoch on, as the agent does after endpoint or route
    /// changes (its last write).
    pub fn bump_route_epoch(&mut self) -> Result<()> {
        self.update_config(|config| config.route_epoch = config.route_epoch.wrapping_add(1))
    }

    /// A Service frontend with its backends, written in the agent's order.
    pub fn add_service(
        &mut self,
        frontend: SocketAddrV4,
        protocol: u8,
        rev_nat_index: u32,
        first_backend_id: u32,
        backends: &[SocketAddrV4],
    ) -> Result<()> {
        let entries = service_contents(
            frontend,
            protocol,
            rev_nat_index,
            first_backend_id,
            backends,
        )?;
        self.write_service_entries(&entries)
    }

    /// A `ferrite_backend` entry.
    pub fn add_backend(&mut self, id: u32, backend: SocketAddrV4, protocol: u8) -> Result<()> {
        let value = backend_value(&l4_addr(backend, protocol)?);
        self.maps.apply(&[Op::PutBackend(id, value)])
    }

    /// A Service frontend over backends already written (`add_backend`): its rev-NAT
    /// entry, its slots, then its master entry, as the agent orders them.
    pub fn add_frontend(
        &mut self,
        frontend: SocketAddrV4,
        protocol: u8,
        rev_nat_index: u32,
        backend_ids: &[u32],
    ) -> Result<()> {
        let mut entries = MapContents::default();
        frontend_entries(&mut entries, frontend, protocol, rev_nat_index, backend_ids)?;
        self.write_service_entries(&entries)
    }

    /// Change this node's `ferrite_config` entry.
    pub fn update_config(&mut self, change: impl FnOnce(&mut NodeConfig)) -> Result<()> {
        let mut config: Array<&mut MapData, NodeConfig> =
            Array::try_from(self.ebpf.map_mut(map_names::CONFIG).context("config")?)?;
        let mut value = config.get(&0, 0)?;
        change(&mut value);
        config.set(0, value, 0)?;
        Ok(())
    }

    /// This node's own address (NodePorts, SNAT).
    pub fn set_node_ip(&mut self, ip: Ipv4Addr) -> Result<()> {
        self.update_config(|config| config.node_ip = ip.octets())
    }

    /// Node-wide flags (`config_flag`).
    pub fn set_config_flags(&mut self, flags: u32) -> Result<()> {
        self.update_config(|config| config.flags = flags)
    }

    /// The largest packet pods take (`pod_mtu`; 0, the default here, means no limit).
    pub fn set_pod_mtu(&mut self, mtu: u16) -> Result<()> {
        self.update_config(|config| config.pod_mtu = mtu)
    }

    /// Set the master entry flags (`svc_flag`) of a frontend written by `add_service`.
    pub fn set_service_flags(
        &mut self,
        frontend: SocketAddrV4,
        protocol: u8,
        flags: u32,
    ) -> Result<()> {
        let (key, master) = self.master(frontend, protocol)?;
        self.maps
            .apply(&[Op::PutService(key, ServiceValue { flags, ..master })])
    }

    /// Give a frontend written by `add_service` session affinity (`timeout_s`).
    pub fn set_affinity(
        &mut self,
        frontend: SocketAddrV4,
        protocol: u8,
        timeout_s: u32,
    ) -> Result<()> {
        let (key, master) = self.master(frontend, protocol)?;
        let value = ServiceValue {
            affinity_timeout_s: timeout_s,
            ..master
        };
        self.maps.apply(&[Op::PutService(key, value)])
    }

    /// Allow `network/prefix_len` to reach `frontend` (loadBalancerSourceRanges).
    pub fn add_source_range(
        &mut self,
        frontend: SocketAddrV4,
        protocol: u8,
        network: Ipv4Addr,
        prefix_len: u32,
    ) -> Result<()> {
        let range = SourceRange {
            frontend: ServiceKey::new(*frontend.ip(), frontend.port(), protocol, 0),
            network: network.octets(),
            prefix_len,
        };
        self.maps.apply(&[Op::PutSourceRange(range)])
    }

    /// A `ferrite_routes` entry: `network/prefix_len` belongs to the node `node_ip`
    /// (`ROUTE_LOCAL`, `ROUTE_REMOTE` or `ROUTE_NODE`), as the agent writes it.
    pub fn add_route(
        &mut self,
        network: Ipv4Addr,
        prefix_len: u32,
        node_ip: Ipv4Addr,
        flags: u16,
    ) -> Result<()> {
        let mut routes: LpmTrie<&mut MapData, [u8; 4], RouteInfo> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::ROUTES).context("routes")?)?;
        routes.insert(
            &Key::new(prefix_len, network.octets()),
            RouteInfo {
                node_ip: node_ip.octets(),
                vtep_mac: ferrite_common::vtep_mac_for(node_ip),
                flags,
            },
            0,
        )?;
        Ok(())
    }

    /// A `ferrite_routes6` entry: the IPv6 pod CIDR `network/prefix_len` belongs to
    /// the node `node_ip` (its IPv4 underlay address), as the agent writes it.
    pub fn add_route6(
        &mut self,
        network: Ipv6Addr,
        prefix_len: u32,
        node_ip: Ipv4Addr,
        flags: u16,
    ) -> Result<()> {
        let mut routes: LpmTrie<&mut MapData, [u8; 16], RouteInfo> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::ROUTES6).context("routes6")?)?;
        routes.insert(
            &Key::new(prefix_len, network.octets()),
            RouteInfo {
                node_ip: node_ip.octets(),
                vtep_mac: ferrite_common::vtep_mac_for(node_ip),
                flags,
            },
            0,
        )?;
        Ok(())
    }

    /// Mark the pod `ip` isolated (`policy::ENDPOINT_*_ISOLATED` bits), as the
    /// agent does for a pod a NetworkPolicy selects.
    pub fn set_isolation(&mut self, ip: Ipv4Addr, isolation: u32) -> Result<()> {
        let mut endpoints = self.hash_map::<EndpointKey, EndpointInfo>(map_names::ENDPOINTS)?;
        let key = EndpointKey {
            address: ip.octets(),
        };
        let mut info = endpoints.get(&key, 0)?;
        info.flags =
            (info.flags & !(ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED)) | isolation;
        endpoints.insert(key, info, 0)?;
        Ok(())
    }

    /// Give the addresses of `network`/`prefix_len` the policy identity `identity`,
    /// through the agent's map writer.
    pub fn set_identity(
        &mut self,
        network: Ipv4Addr,
        prefix_len: u32,
        identity: u32,
    ) -> Result<()> {
        self.maps.apply(&[Op::PutIpcache(
            plan::RouteKey {
                prefix_len,
                network: network.octets(),
            },
            IpcacheValue { identity, flags: 0 },
        )])
    }

    /// Write (`true`) or remove the `ferrite_policy` entries of `allow` for the pod
    /// `ip`, laid out by the agent's plan and written by its map writer.
    pub fn set_allow(&mut self, ip: Ipv4Addr, allow: &Allow, present: bool) -> Result<()> {
        let ops: Vec<Op> = plan::rules_of(ip, allow)
            .into_iter()
            .map(|rule| {
                if present {
                    Op::PutPolicy(rule, PolicyValue { policy: 0 })
                } else {
                    Op::DeletePolicy(rule)
                }
            })
            .collect();
        self.maps.apply(&ops)
    }

    /// Remove the route of `network`/`prefix_len`.
    pub fn remove_route(&mut self, network: Ipv4Addr, prefix_len: u32) -> Result<()> {
        let mut routes: LpmTrie<&mut MapData, [u8; 4], RouteInfo> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::ROUTES).context("routes")?)?;
        routes.remove(&Key::new(prefix_len, network.octets()))?;
        Ok(())
    }

    /// Remove the endpoint entry of the pod `ip`.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<()> {
        self.hash_map::<EndpointKey, EndpointInfo>(map_names::ENDPOINTS)?
            .remove(&EndpointKey {
                address: ip.octets(),
            })?;
        Ok(())
    }

    /// The Maglev table of an external frontend written by `add_service`, built from
    /// its slots by the agent's map writer.
    pub fn add_maglev(&mut self, frontend: SocketAddrV4, protocol: u8) -> Result<()> {
        let (key, master) = self.master(frontend, protocol)?;
        let mut backends = Vec::new();
        for slot in 1..=master.count {
            let slot_key = ServiceKey {
                backend_slot: slot,
                ..key
            };
            let id = self.maps.services.get(&slot_key, 0)?.backend_id;
            backends.push(self.maps.backends.get(&id, 0)?);
        }
        let digest = maglev_digest(backends.into_iter());
        self.maps.apply(&[Op::PutMaglev(key, master.count, digest)])
    }

    /// Write `table` as the Maglev table of the frontend (entry i: the backend slot
    /// that owns it), over whatever table it had.
    pub fn set_maglev_table(
        &mut self,
        frontend: SocketAddrV4,
        protocol: u8,
        table: &MaglevTable,
    ) -> Result<()> {
        let master = ServiceKey::new(*frontend.ip(), frontend.port(), protocol, 0);
        self.hash_map::<ServiceKey, MaglevTable>(map_names::MAGLEV)?
            .insert(master, table, 0)?;
        Ok(())
    }

    /// The `ferrite_ct` entry under `key`, if any.
    pub fn conntrack(&self, key: &CtKey) -> Result<Option<CtValue>> {
        let ct: HashMap<&MapData, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map(map_names::CONNTRACK).context("conntrack")?)?;
        match ct.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Write a `ferrite_ct` entry as the datapath would.
    pub fn insert_conntrack(&mut self, key: CtKey, value: CtValue) -> Result<()> {
        self.hash_map::<CtKey, CtValue>(map_names::CONNTRACK)?
            .insert(key, value, 0)?;
        Ok(())
    }

    /// Every key in `ferrite_ct`.
    pub fn conntrack_keys(&self) -> Result<Vec<CtKey>> {
        let ct: HashMap<&MapData, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map(map_names::CONNTRACK).context("conntrack")?)?;
        Ok(ct.keys().collect::<Result<_, _>>()?)
    }

    /// Remove `keys` from `ferrite_ct` (already gone is fine).
    pub fn remove_conntrack(&mut self, keys: &[CtKey]) -> Result<()> {
        let mut ct = self.hash_map::<CtKey, CtValue>(map_names::CONNTRACK)?;
        for key in keys {
            match ct.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Run the uplink's XDP program once on `frame` (verdict: XDP_PASS, XDP_DROP...).
    pub fn from_world(&self, frame: &[u8]) -> Result<RunResult> {
        Ok(self.run_xdp_program(program_names::FROM_WORLD, frame, 1)?.0)
    }

    /// Run the XDP program `name` `repeat` times on `frame`.
    pub fn run_xdp_program(
        &self,
        name: &str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(RunResult, std::time::Duration)> {
        let program: &Xdp = self.ebpf.program(name).context("program")?.try_into()?;
        test_run(program, frame, repeat)
    }

    /// The loaded program `name`'s file descriptor (to put it in a program array).
    pub fn program_fd(&self, name: &str) -> Result<std::os::fd::BorrowedFd<'_>> {
        let program = self.ebpf.program(name).context("program")?;
        Ok(program.fd()?.as_fd())
    }

    /// Instructions of the loaded program `name` after the verifier's rewrites
    /// (bpftool's "xlated" length / 8).
    pub fn xlated_instructions(&self, name: &str) -> Result<u32> {
        let program = self.ebpf.program(name).context("program")?;
        Ok(program.info()?.size_translated().unwrap_or(0) / 8)
    }

    /// Run the TC program `name` `repeat` times on `frame`.
    pub fn run_program(
        &self,
        name: &str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(RunResult, std::time::Duration)> {
        let program: &SchedClassifier = self.ebpf.program(name).context("program")?.try_into()?;
        test_run(program, frame, repeat)
    }

    /// Run the TC program `name` once on `frame` as if it arrived on the device
    /// `ifindex` of the calling thread's network namespace, whose FIB and neighbour
    /// table `bpf_fib_lookup` then reads.
    pub fn run_program_on(&self, name: &str, frame: &[u8], ifindex: u32) -> Result<RunResult> {
        let program: &SchedClassifier = self.ebpf.program(name).context("program")?.try_into()?;
        let context = TcContext {
            ifindex,
            cb: [0; 5],
        };
        run_with_skb_context(program, frame, &skb_context(0, &context))
    }

    /// Run the from-pod program once on `frame`.
    pub fn from_pod(&self, frame: &[u8]) -> Result<RunResult> {
        Ok(self.run_program(program_names::FROM_POD, frame, 1)?.0)
    }

    /// Packets counted under `index` (summed over CPUs).
    pub fn counter(&self, index: u32) -> Result<u64> {
        let stats: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.ebpf.map(map_names::STATS).context("stats")?)?;
        Ok(stats.get(&index, 0)?.iter().map(|c| c.packets).sum())
    }

    /// Say which events a monitor listens for (`monitor::WANT_*`; 0: none), as the
    /// agent does while monitors are connected.
    pub fn set_monitor(&mut self, wants: u32) -> Result<()> {
        let mut monitor: Array<&mut MapData, u32> =
            Array::try_from(self.ebpf.map_mut(map_names::MONITOR).context("monitor")?)?;
        monitor.set(0, wants, 0)?;
        Ok(())
    }

    /// Every event in `ferrite_events` not taken yet, oldest first (taken now).
    pub fn take_events(&mut self) -> Result<Vec<MonitorEvent>> {
        let mut ring = RingBuf::try_from(self.ebpf.map_mut(map_names::EVENTS).context("events")?)?;
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            anyhow::ensure!(
                item.len() == std::mem::size_of::<MonitorEvent>(),
                "an event of {} bytes",
                item.len()
            );
            // SAFETY: MonitorEvent is plain integers; read_unaligned copies the bytes.
            events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
        Ok(events)
    }

    pub fn drops(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut out = Vec::new();
        for index in 0..stat::COUNT {
            let n = self.counter(index)?;
            if n > 0 && stat::NAMES[index as usize].starts_with("drop") {
                out.push((stat::NAMES[index as usize], n));
            }
        }
        Ok(out)
    }
}

/// Explain runs (`ferrite explain`) of the testbed's programs: the caller's thread
/// stays on one CPU, whose slot of `ferrite_trace` each run's trace is read from.
pub struct Explainer<'a> {
    bed: &'a Testbed,
    cpu: OneCpu,
}

/// The mark of an explain run with `nonce`.
pub fn explain_word(nonce: u16) -> u32 {
    explain::MAGIC | nonce as u32
}

impl Testbed {
    pub fn explainer(&self) -> Result<Explainer<'_>> {
        Ok(Explainer {
            bed: self,
            cpu: OneCpu::pin()?,
        })
    }

    /// The contents of every map of the datapath (bpftool's dump of each, by name),
    /// but the explain runs' own trace and those that cannot be iterated: the
    /// per-socket storage and the monitor's event ring (see `take_events`).
    pub fn map_dumps(&self) -> Result<BTreeMap<String, String>> {
        let mut dumps = BTreeMap::new();
        for name in map_names::ALL {
            let skipped = [
                map_names::TRACE,
                map_names::SOCK_SERVICE,
                map_names::SOCK_SERVICE6,
                map_names::EVENTS,
            ];
            if skipped.contains(&name) {
                continue;
            }
            let map = self.ebpf.map(name).with_context(|| format!("map {name}"))?;
            let id = map_data(name, map)?.info()?.id();
            let out = std::process::Command::new("bpftool")
                .args(["map", "dump", "id", &id.to_string(), "-j"])
                .output()
                .context("running bpftool")?;
            anyhow::ensure!(out.status.success(), "bpftool dump of {name} failed");
            dumps.insert(
                name.to_string(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            );
        }
        Ok(dumps)
    }
}

/// An explain run's verdict, frame and trace.
pub struct Explained {
    pub run: RunResult,
    pub trace: ExplainTrace,
}

impl Explainer<'_> {
    /// This CPU's slot of `ferrite_trace`.
    pub fn trace(&self) -> Result<ExplainTrace> {
        let map: PerCpuArray<&MapData, ExplainTrace> =
            PerCpuArray::try_from(self.bed.ebpf.map(map_names::TRACE).context("trace")?)?;
        Ok(map.get(&0, 0)?[self.cpu.cpu()])
    }

    /// Run the explain copy `name` of a TC program on `frame` as the explain run
    /// `nonce`, arriving as `context` says (ifindex 1: the test run's own loopback).
    pub fn tc(
        &self,
        name: &str,
        frame: &[u8],
        context: &TcContext,
        nonce: u16,
    ) -> Result<Explained> {
        Ok(Explained {
            run: self.tc_with_mark(name, frame, context, explain_word(nonce))?,
            trace: self.trace()?,
        })
    }

    /// Run the TC program `name` on `frame` with the skb mark `mark`.
    pub fn tc_with_mark(
        &self,
        name: &str,
        frame: &[u8],
        context: &TcContext,
        mark: u32,
    ) -> Result<RunResult> {
        let program: &SchedClassifier =
            self.bed.ebpf.program(name).context("program")?.try_into()?;
        run_with_skb_context(program, frame, &skb_context(mark, context))
    }

    /// The from-pod program on `frame`, explained.
    pub fn from_pod(&self, frame: &[u8], nonce: u16) -> Result<Explained> {
        let context = TcContext {
            ifindex: TEST_RUN_IFINDEX,
            cb: [0; 5],
        };
        self.tc(program_names::EXPLAIN_POD, frame, &context, nonce)
    }

    /// The XDP program's explain copy on `frame` (its metadata stripped from the frame).
    pub fn from_world(&self, frame: &[u8], nonce: u16) -> Result<Explained> {
        let program: &Xdp = self
            .bed
            .ebpf
            .program(program_names::EXPLAIN_WORLD)
            .context("program")?
            .try_into()?;
        let meta_len = explain::XDP_METADATA_LEN;
        let mut data = explain_word(nonce).to_ne_bytes().to_vec();
        data.extend_from_slice(frame);
        let ctx = xdp_context(meta_len, data.len(), 0);
        let mut out = vec![0u8; data.len() + 256];
        let result = program.test_run(TestRunOptions {
            data_in: Some(&data),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(Explained {
            run: RunResult {
                verdict: result.return_value,
                frame: out[meta_len..].to_vec(),
            },
            trace: self.trace()?,
        })
    }

    /// The socket-level selection on `request`, explained (its word set from `nonce`).
    pub fn socket(&self, request: SockRequest, nonce: u16) -> Result<Explained> {
        let request = SockRequest {
            word: explain_word(nonce),
            ..request
        };
        // SAFETY: a #[repr(C)] value of integers without implicit padding.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&request as *const SockRequest).cast::<u8>(),
                std::mem::size_of::<SockRequest>(),
            )
        };
        let (run, _) = self
            .bed
            .run_program(program_names::EXPLAIN_SOCK, bytes, 1)?;
        Ok(Explained {
            run,
            trace: self.trace()?,
        })
    }
}

/// Put a frontend's rev-NAT entry and `ferrite_service` entries into `out`, laid out
/// as the agent's plan lays them out: every backend ready, no flags.
/// The entries of a Service frontend over `backends` (ids from `first_backend_id`),
/// as [`Testbed::add_service`] writes them: what benches diff one change against.
pub fn service_contents(
    frontend: SocketAddrV4,
    protocol: u8,
    rev_nat_index: u32,
    first_backend_id: u32,
    backends: &[SocketAddrV4],
) -> Result<MapContents> {
    let mut entries = MapContents::default();
    let mut ids = Vec::new();
    for (i, backend) in backends.iter().enumerate() {
        let id = first_backend_id + i as u32;
        entries
            .backends
            .insert(id, backend_value(&l4_addr(*backend, protocol)?));
        ids.push(id);
    }
    frontend_entries(&mut entries, frontend, protocol, rev_nat_index, &ids)?;
    Ok(entries)
}

fn frontend_entries(
    out: &mut MapContents,
    frontend: SocketAddrV4,
    protocol: u8,
    rev_nat_index: u32,
    backend_ids: &[u32],
) -> Result<()> {
    let frontend = l4_addr(frontend, protocol)?;
    out.rev_nat.insert(rev_nat_index, rev_nat_value(&frontend));
    FrontendEntries {
        frontend,
        scope: ferrite_common::service_scope::ALL,
        rev_nat_index,
        backend_ids,
        ready: u16::try_from(backend_ids.len())?,
        flags: 0,
        affinity_timeout_s: 0,
    }
    .write_into(out);
    Ok(())
}

fn l4_addr(addr: SocketAddrV4, protocol: u8) -> Result<L4Addr> {
    Ok(L4Addr {
        ip: *addr.ip(),
        port: addr.port(),
        protocol: Protocol::from_number(protocol)
            .with_context(|| format!("protocol {protocol} of {addr}"))?,
    })
}

/// The data of a map of a kind the test bed reads or writes.
fn map_data<'m>(name: &str, map: &'m Map) -> Result<&'m MapData> {
    match map {
        Map::HashMap(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuLruHashMap(data)
        | Map::PerCpuHashMap(data)
        | Map::LpmTrie(data)
        | Map::ProgramArray(data)
        | Map::Array(data) => Ok(data),
        _ => anyhow::bail!("{name}: not a map kind the test bed handles"),
    }
}

/// BPF_PROG_TEST_RUN of any packet program: the verdict, the frame it left and the
/// kernel's time per run.
fn test_run<P>(program: &P, frame: &[u8], repeat: u32) -> Result<(RunResult, std::time::Duration)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((
        RunResult {
            verdict: result.return_value,
            frame: out,
        },
        result.duration,
    ))
}

/// One run of the TC `program` on `frame` with the `__sk_buff` context `ctx`.
fn run_with_skb_context(program: &SchedClassifier, frame: &[u8], ctx: &[u8]) -> Result<RunResult> {
    let mut out = vec![0u8; frame.len() + 256];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(ctx),
        ..TestRunOptions::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok(RunResult {
        verdict: result.return_value,
        frame: out,
    })
}
