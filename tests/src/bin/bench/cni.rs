//! `cargo xtask bench cni`: how long the real `ferrite-cni` takes to ADD and DEL a
//! pod, as a runtime runs it (nsenter into the node, configuration on stdin), in a
//! one-node lab cluster with its agent. The pod's namespace is made once and reused,
//! so the time is the plugin's own (plus its process start). With
//! `FERRITE_BENCH_CNI_BASELINE=/path/to/another/ferrite-cni` the two binaries take
//! turns, each cycle in the other order, so the machine's noise hits both.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use ferrite_tests::cni::{ferrite_conflist, Runtime, Sandbox};

const CYCLES: usize = 200;

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index].as_secs_f64() * 1e3
}

struct Plugin {
    label: String,
    runtime: Runtime,
    sandbox: Sandbox,
    adds: Vec<Duration>,
    dels: Vec<Duration>,
}

impl Plugin {
    fn cycle(&mut self) -> Result<()> {
        let start = Instant::now();
        self.runtime.add(&mut self.sandbox)?;
        self.adds.push(start.elapsed());
        let start = Instant::now();
        self.runtime.del(&self.sandbox)?;
        self.dels.push(start.elapsed());
        Ok(())
    }
}

pub fn bench() -> Result<()> {
    let cluster = ferrite_tests::cni::one_node_cluster()?;
    let node = &cluster.nodes[0];
    let mut binaries = vec![("this build".to_string(), None)];
    if let Some(baseline) = std::env::var_os("FERRITE_BENCH_CNI_BASELINE") {
        let path = PathBuf::from(baseline);
        ensure!(path.exists(), "no baseline plugin at {}", path.display());
        binaries.push((format!("baseline {}", path.display()), Some(path)));
    }
    let mut plugins = binaries
        .into_iter()
        .enumerate()
        .map(|(i, (label, binary))| {
            let mut runtime = Runtime::new(node, ferrite_conflist(node));
            if let Some(binary) = binary {
                runtime.ferrite_cni = binary;
            }
            Ok(Plugin {
                label,
                runtime,
                sandbox: Sandbox::new(&format!("bench{i}"))?,
                adds: Vec::new(),
                dels: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for cycle in 0..CYCLES {
        if cycle % 2 == 1 {
            plugins.reverse();
        }
        for plugin in &mut plugins {
            plugin.cycle()?;
        }
        if cycle % 2 == 1 {
            plugins.reverse();
        }
    }
    println!("\nferrite-cni ADD and DEL of one pod ({CYCLES} cycles, one-node lab, wall time of the plugin process)\n");
    println!(
        "{:<48} {:>12} {:>9} {:>12} {:>9}",
        "plugin", "ADD med ms", "p99 ms", "DEL med ms", "p99 ms"
    );
    for plugin in &mut plugins {
        plugin.adds.sort();
        plugin.dels.sort();
        println!(
            "{:<48} {:>12.2} {:>9.2} {:>12.2} {:>9.2}",
            plugin.label,
            percentile(&plugin.adds, 0.5),
            percentile(&plugin.adds, 0.99),
            percentile(&plugin.dels, 0.5),
            percentile(&plugin.dels, 0.99),
        );
    }
    Ok(())
}
