//! The test bed's IPv6 Services (`ferrite_lb6_*`, written directly: the agent's plan
//! does not write them yet) and its socket-level programs attached to a cgroup.
use std::{fs, net::SocketAddrV6, path::Path};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::{links::CgroupAttachMode, CgroupSockAddr},
};
use ferrite_common::{map_names, program_names, Backend6, RevNat6Value, Service6Key, ServiceValue};

use crate::testbed::Testbed;

/// How an IPv6 frontend is written: its rev-NAT index and its master entry's options.
#[derive(Clone, Copy, Debug, Default)]
pub struct Frontend6 {
    pub rev_nat_index: u32,
    /// `svc_flag` bits.
    pub flags: u32,
    /// Session affinity timeout (seconds; 0: none).
    pub affinity_timeout_s: u32,
}

impl Testbed {
    fn hash_map6<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> Result<HashMap<&mut MapData, K, V>> {
        Ok(HashMap::try_from(
            self.ebpf
                .map_mut(name)
                .with_context(|| format!("map {name}"))?,
        )?)
    }

    /// A `ferrite_lb6_be` entry.
    pub fn add_backend6(&mut self, id: u32, backend: SocketAddrV6, protocol: u8) -> Result<()> {
        let value = Backend6 {
            address: backend.ip().octets(),
            port: backend.port(),
            proto: protocol,
            flags: 0,
        };
        self.hash_map6::<u32, Backend6>(map_names::BACKENDS6)?
            .insert(id, value, 0)?;
        Ok(())
    }

    /// An IPv6 frontend over backends written before (`add_backend6`): its rev-NAT
    /// entry, its slots, then its master entry, as the agent orders IPv4 ones. No
    /// backend ids: a frontend without ready backends.
    pub fn add_frontend6(
        &mut self,
        frontend: SocketAddrV6,
        protocol: u8,
        options: Frontend6,
        backend_ids: &[u32],
    ) -> Result<()> {
        let address = frontend.ip().octets();
        let rev = RevNat6Value {
            address,
            port: frontend.port(),
            _pad: 0,
        };
        self.hash_map6::<u32, RevNat6Value>(map_names::REV_NAT6)?
            .insert(options.rev_nat_index, rev, 0)?;
        let mut services = self.hash_map6::<Service6Key, ServiceValue>(map_names::SERVICES6)?;
        for (i, id) in backend_ids.iter().enumerate() {
            let slot = Service6Key::new(address, frontend.port(), protocol, i as u16 + 1);
            let value = ServiceValue {
                backend_id: *id,
                ..ServiceValue::default()
            };
            services.insert(slot, value, 0)?;
        }
        let master = Service6Key::new(address, frontend.port(), protocol, 0);
        let value = ServiceValue {
            rev_nat_index: options.rev_nat_index,
            flags: options.flags,
            affinity_timeout_s: options.affinity_timeout_s,
            count: u16::try_from(backend_ids.len())?,
            ..ServiceValue::default()
        };
        services.insert(master, value, 0)?;
        Ok(())
    }

    /// An IPv6 Service frontend with its backends (ids from `first_backend_id`).
    pub fn add_service6(
        &mut self,
        frontend: SocketAddrV6,
        protocol: u8,
        options: Frontend6,
        first_backend_id: u32,
        backends: &[SocketAddrV6],
    ) -> Result<()> {
        let mut ids = Vec::new();
        for (i, backend) in backends.iter().enumerate() {
            let id = first_backend_id + i as u32;
            self.add_backend6(id, *backend, protocol)?;
            ids.push(id);
        }
        self.add_frontend6(frontend, protocol, options, &ids)
    }

    /// Load the socket-level programs (`program_names::SOCKET_LB`) and attach them to
    /// the cgroup directory `cgroup` (a test's own subtree, never the machine's root).
    /// The links are the test bed's: dropping it detaches them.
    pub fn attach_socket_lb(&mut self, cgroup: &Path) -> Result<()> {
        let directory = fs::File::open(cgroup)
            .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
        for (name, _) in program_names::SOCKET_LB {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name}"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("verifier rejected {name}"))?;
            program
                .attach(&directory, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        }
        Ok(())
    }
}
