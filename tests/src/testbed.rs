//! The datapath object loaded without pinning, for BPF_PROG_TEST_RUN: fill its maps,
//! feed it frames, read back the frame and the verdict.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use ferrite_common::{
    map_names, pod_mac_for, program_names, stat, Backend, Counter, EndpointInfo, EndpointKey,
    NodeConfig, RevNatValue, ServiceKey, ServiceValue, SourceRangeKey, SOURCE_RANGE_FRONTEND_BITS,
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
}

pub struct RunResult {
    pub verdict: u32,
    pub frame: Vec<u8>,
}

impl Testbed {
    pub fn load() -> Result<Self> {
        require_root()?;
        let mut ebpf = Ebpf::load_file(bpf_object()).context("loading the eBPF object")?;
        for name in [
            program_names::FROM_POD,
            program_names::TO_POD,
            program_names::FROM_OVERLAY,
            program_names::FROM_UPLINK,
            program_names::FROM_HOST,
            program_names::NOOP,
        ] {
            let program: &mut SchedClassifier =
                ebpf.program_mut(name).context("program")?.try_into()?;
            program.load()?;
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(program_names::FROM_WORLD)
            .context("program")?
            .try_into()?;
        xdp.load()?;
        Ok(Self { ebpf })
    }

    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> Result<HashMap<&mut MapData, K, V>> {
        Ok(HashMap::try_from(self.ebpf.map_mut(name).context("map")?)?)
    }

    /// A pod on this "node": `ifindex` is where its traffic must come from.
    pub fn add_endpoint(&mut self, ip: Ipv4Addr, ifindex: u32) -> Result<()> {
        self.hash_map::<EndpointKey, EndpointInfo>(map_names::ENDPOINTS)?
            .insert(
                EndpointKey {
                    address: ip.octets(),
                },
                EndpointInfo {
                    ifindex,
                    pod_mac: pod_mac_for(ip),
                    host_mac: [0xee; 6],
                    flags: 0,
                },
                0,
            )?;
        Ok(())
    }

    /// A Service frontend with its backends, written in the agent's order.
    pub fn add_service(
        &mut self,
        frontend: SocketAddrV4,
        protocol: u8,
        rev_nat_index: u16,
        first_backend_id: u32,
        backends: &[SocketAddrV4],
    ) -> Result<()> {
        let mut backend_map = self.hash_map::<u32, Backend>(map_names::BACKENDS)?;
        for (i, b) in backends.iter().enumerate() {
            backend_map.insert(
                first_backend_id + i as u32,
                Backend {
                    address: b.ip().octets(),
                    port: b.port(),
                    proto: protocol,
                    flags: 0,
                },
                0,
            )?;
        }
        self.hash_map::<u16, RevNatValue>(map_names::REV_NAT)?
            .insert(
                rev_nat_index,
                RevNatValue {
                    address: frontend.ip().octets(),
                    port: frontend.port(),
                    _pad: 0,
                },
                0,
            )?;
        let mut services = self.hash_map::<ServiceKey, ServiceValue>(map_names::SERVICES)?;
        let key = |slot| ServiceKey::new(*frontend.ip(), frontend.port(), protocol, slot);
        for i in 0..backends.len() {
            services.insert(
                key(i as u16 + 1),
                ServiceValue {
                    backend_id: first_backend_id + i as u32,
                    ..Default::default()
                },
                0,
            )?;
        }
        services.insert(
            key(0),
            ServiceValue {
                backend_id: 0,
                count: backends.len() as u16,
                rev_nat_index,
                ..Default::default()
            },
            0,
        )?;
        Ok(())
    }

    /// Change this node's `ferrite_config` entry.
    fn update_config(&mut self, change: impl FnOnce(&mut NodeConfig)) -> Result<()> {
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
        let mut services = self.hash_map::<ServiceKey, ServiceValue>(map_names::SERVICES)?;
        let key = ServiceKey::new(*frontend.ip(), frontend.port(), protocol, 0);
        let master = services.get(&key, 0)?;
        services.insert(key, ServiceValue { flags, ..master }, 0)?;
        Ok(())
    }

    /// Allow `network/prefix_len` to reach `frontend` (loadBalancerSourceRanges).
    pub fn add_source_range(
        &mut self,
        frontend: SocketAddrV4,
        protocol: u8,
        network: Ipv4Addr,
        prefix_len: u32,
    ) -> Result<()> {
        let mut ranges: LpmTrie<&mut MapData, SourceRangeKey, u8> = LpmTrie::try_from(
            self.ebpf
                .map_mut(map_names::SOURCE_RANGES)
                .context("source ranges")?,
        )?;
        let key = SourceRangeKey {
            frontend: ServiceKey::new(*frontend.ip(), frontend.port(), protocol, 0),
            network: network.octets(),
        };
        ranges.insert(
            &Key::new(SOURCE_RANGE_FRONTEND_BITS + prefix_len, key),
            1,
            0,
        )?;
        Ok(())
    }

    /// Run the uplink's XDP program once on `frame` (verdict: XDP_PASS, XDP_DROP...).
    pub fn from_world(&self, frame: &[u8]) -> Result<RunResult> {
        let program: &Xdp = self
            .ebpf
            .program(program_names::FROM_WORLD)
            .context("program")?
            .try_into()?;
        Ok(test_run(program, frame, 1)?.0)
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
