//! `conntrack-read`: reading a full `ferrite_ct` (262,144 entries), as every backend
//! removal (its flows are purged), the conntrack GC and the metrics do: by
//! BPF_MAP_LOOKUP_BATCH, as the agent reads it, next to entry by entry (next key,
//! then value), in alternating rounds.
use std::time::Instant;

use anyhow::Result;
use aya::maps::IterableMap;
use ferrite_common::{capacity, CtKey, CtValue};
use ferrite_tests::testbed::Testbed;

use super::median;

const ROUNDS: usize = 5;

pub fn bench() -> Result<()> {
    let mut bed = Testbed::load()?;
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
    let values = vec![CtValue::default(); keys.len()];
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
    Ok(())
}
