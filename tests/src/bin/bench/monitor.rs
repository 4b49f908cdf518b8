//! `cargo xtask bench monitor`: how long a datapath event takes to reach a
//! `ferrite monitor` line. A lab node with its agent and two monitors (`-o json`,
//! the real binary); a pod sends datagrams from an address that is not its own, one
//! at a time, each waited for. Latency: the bench's CLOCK_MONOTONIC when it has read
//! the line from the monitor's stdout, minus the event's `time_ns` (the kernel's
//! CLOCK_MONOTONIC when the datapath saw the packet): the ring, the agent's fan-out,
//! its socket, the monitor's decoding and printing, the pipe.
use std::time::Duration;

use anyhow::{Context, Result};
use ferrite_agent::monitor::Line;
use ferrite_tests::{
    cluster::{self, CLIENTS, UDP_FRONTEND},
    monitor::Monitor,
};

const DROPS: usize = 500;
/// A hang guard only.
const PATIENCE: Duration = Duration::from_secs(30);

fn monotonic_ns() -> Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

fn percentile(sorted: &[u64], fraction: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index] as f64 / 1000.0
}

pub fn bench() -> Result<()> {
    let (mut node, _servers) = cluster::example_node("benchmon")?;
    node.write_config(&cluster::example_for(&node.name))?;
    node.start_agent()?;
    node.wait_for_sync(2, 5)?;
    let monitors = [
        Monitor::start(&node, &[], PATIENCE)?,
        Monitor::start(&node, &[], PATIENCE)?,
    ];
    let spoofed = CLIENTS[1].1;
    let socket = node.pod(CLIENTS[0].0).spoofing_socket(spoofed, 0)?;
    let mut latencies: [Vec<u64>; 2] = Default::default();
    for i in 0..DROPS {
        let payload = format!("drop {i}");
        socket.send_to(payload.as_bytes(), UDP_FRONTEND)?;
        for (monitor, latencies) in monitors.iter().zip(&mut latencies) {
            let line = monitor.wait_for(
                PATIENCE,
                |line| matches!(line, Line::Drop(e) if e.source == spoofed),
            )?;
            let read = monotonic_ns()?;
            let Line::Drop(event) = line else {
                unreachable!()
            };
            latencies.push(read.checked_sub(event.time_ns).context("clock")?);
        }
    }
    println!("\nferrite monitor latency: datapath drop -> JSON line read from `ferrite monitor`,");
    println!("{DROPS} spoofed datagrams one at a time, two monitors attached (the issue asks < 100 ms)\n");
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10}",
        "monitor", "median µs", "p90 µs", "p99 µs", "max µs"
    );
    for (i, latencies) in latencies.iter_mut().enumerate() {
        latencies.sort_unstable();
        println!(
            "{:<10} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            i + 1,
            percentile(latencies, 0.5),
            percentile(latencies, 0.9),
            percentile(latencies, 0.99),
            percentile(latencies, 1.0)
        );
    }
    drop(monitors);
    Ok(())
}
