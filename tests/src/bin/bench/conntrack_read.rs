//! `conntrack-read`: reading a full `ferrite_ct` (262,144 entries), as the conntrack
//! GC and the metrics do: by BPF_MAP_LOOKUP_BATCH, as the agent reads it, next to
//! entry by entry (next key, then value), in alternating rounds. Then one endpoint
//! change with that table: a Service's slots rewritten and the removed backend's
//! flows purged, as the agent's writer does it (a sparse table read out, a busy one
//! walked in the kernel by `ferrite_purge`) and read to userspace (the way before),
//! in alternating rounds; first with an empty table, then with the full one.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd,
    time::Instant,
};

use anyhow::{Context, Result};
use aya::maps::IterableMap;
use ferrite_agent::{maps::NodeMaps, plan};
use ferrite_common::{capacity, CtKey, CtValue, PROTO_TCP};
use ferrite_tests::testbed::{service_contents, Testbed};

use super::{median, percentile};

const ROUNDS: usize = 5;
/// The table's flows are spread over this many backends (ids from 1).
const TABLE_BACKENDS: u32 = 1_000;
const CHANGE_ROUNDS: usize = 60;

pub fn bench() -> Result<()> {
    let mut bed = Testbed::load()?;
    // The common case first: a change on a node with few flows.
    endpoint_change(&mut bed)?;
    let maps = bed.node_maps();
    let entries = capacity::CONNTRACK;
    let keys: Vec<CtKey> = (0..entries)
        .map(|i| CtKey {
            saddr: [10, 244, 0, 2].map(|b| b ^ (i >> 16) as u8),
            daddr: [10, 96, (i >> 8) as u8, i as u8],
            sport: 40_000,
            dport: 80,
            proto: 6,
            _pad: 0,
            _pad2: 0,
        })
        .collect();
    let values: Vec<CtValue> = (0..entries)
        .map(|i| CtValue {
            backend_id: 1 + i % TABLE_BACKENDS,
            ..CtValue::default()
        })
        .collect();
    let fd = {
        use std::os::fd::AsFd;
        maps.conntrack.map().fd().as_fd().try_clone_to_owned()?
    };
    for (keys, values) in keys.chunks(4096).zip(values.chunks(4096)) {
        use std::os::fd::AsFd;
        // An LRU map as full as its capacity evicts some: what stays is read.
        let _ = ferrite_agent::bpf_syscall::update_batch(fd.as_fd(), keys, values);
    }
    let (mut batched, mut one_by_one, mut held) = (Vec::new(), Vec::new(), 0);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        held = maps.conntrack_entries()?.len();
        batched.push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        let read = maps.conntrack.iter().filter_map(Result::ok).count();
        one_by_one.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(read.abs_diff(held) < 1024, "both read the same table");
    }
    let (batched, one_by_one) = (median(batched), median(one_by_one));
    println!(
        "\nReading a full ferrite_ct ({held} entries held of {entries}), median of {ROUNDS} rounds:\n\
         batched {batched:.1} ms, entry by entry {one_by_one:.1} ms ({:.1}x)",
        one_by_one / batched
    );
    endpoint_change(&mut bed)
}

/// A Service of 10 backends (ids 1-10) loses backend 10, whose flows are a
/// thousandth of the full table; after each round it comes back with its flows.
fn endpoint_change(bed: &mut Testbed) -> Result<()> {
    let frontend = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80);
    let backends: Vec<SocketAddrV4> = (1..=10)
        .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, i), 8080))
        .collect();
    let all = service_contents(frontend, PROTO_TCP, 1, 1, &backends)?;
    let fewer = service_contents(frontend, PROTO_TCP, 1, 1, &backends[..9])?;
    let (removal, restore) = (plan::diff(&all, &fewer), plan::diff(&fewer, &all));
    let maps = bed.node_maps();
    maps.write(
        &plan::MapContents::default(),
        &plan::diff(&plan::MapContents::default(), &all),
    )?;
    let (victims, values): (Vec<CtKey>, Vec<CtValue>) = maps
        .conntrack_entries()?
        .into_iter()
        .filter(|(_, value)| value.backend_id == 10)
        .unzip();
    let held = maps.conntrack_entries()?.len();
    let program = maps.set_purge_program(None).context("the purge program")?;
    let (mut in_kernel, mut in_userspace) = (Vec::new(), Vec::new());
    let change = |maps: &mut NodeMaps, times: &mut Vec<f64>| -> Result<()> {
        let started = Instant::now();
        let purged = maps.write(&all, &removal)?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            purged == victims.len(),
            "purged {purged} of {}",
            victims.len()
        );
        maps.write(&fewer, &restore)?;
        if !victims.is_empty() {
            let fd = maps.conntrack.map().fd().as_fd();
            ferrite_agent::bpf_syscall::update_batch(fd, &victims, &values)
                .map_err(|failed| failed.error)?;
        }
        Ok(())
    };
    for round in 0..CHANGE_ROUNDS {
        for kernel in [round % 2 == 0, round % 2 != 0] {
            if kernel {
                maps.set_purge_program(Some(program.try_clone()?));
                change(maps, &mut in_kernel)?;
                maps.set_purge_program(None);
            } else {
                change(maps, &mut in_userspace)?;
            }
        }
    }
    maps.set_purge_program(Some(program));
    let ms = |times: &Vec<f64>| {
        format!(
            "p50 {:.1} ms, p99 {:.1} ms",
            percentile(times.clone(), 0.5),
            percentile(times.clone(), 0.99)
        )
    };
    println!(
        "\nOne endpoint change with ferrite_ct holding {held} entries (the removed backend's \
         {} entries purged), {CHANGE_ROUNDS} alternating rounds:\n\
         the agent's purge (in the kernel, ferrite_purge, past {} entries): {}\n\
         purge read to userspace (before):                                {}",
        victims.len(),
        ferrite_agent::maps::SPARSE_CONNTRACK_ENTRIES,
        ms(&in_kernel),
        ms(&in_userspace)
    );
    Ok(())
}
