//! `cargo xtask demo`: one node (a network namespace), five pods, the agent on
//! examples/one-node.yaml, and real TCP and UDP traffic through a ClusterIP. Everything
//! it creates is removed at the end, on failure and on Ctrl-C.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::{bail, Context, Result};
use ferrite_agent::datapath;
use ferrite_tests::{
    cluster::{self, BACKENDS, CLIENTS, TCP_FRONTEND, TCP_TARGET, UDP_FRONTEND, UDP_TARGET},
    lab::{sh, Node},
};

const REQUESTS_PER_CLIENT: usize = 30;

fn main() -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: tearing down…");
        flag.store(true, Ordering::SeqCst);
    })?;
    let keep = std::env::args().any(|a| a == "--keep");
    let result = run(&interrupted, keep);
    println!("teardown: agent stopped; pods, node and pins removed");
    result
}

fn check(interrupted: &AtomicBool) -> Result<()> {
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// A demo killed hard (SIGKILL) cannot clean up: remove what it left first.
fn remove_leftovers(node: &str) {
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name == node || name.starts_with(&format!("{node}-")) {
                let _ = sh("ip", &["netns", "del", name]);
            }
        }
    }
    let _ = datapath::uninstall(&datapath::pin_dir(node));
}

fn run(interrupted: &AtomicBool, keep: bool) -> Result<()> {
    let node_name = cluster::EXAMPLE_NODE;
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/one-node.yaml");
    let config = config.canonicalize().context("examples/one-node.yaml")?;
    remove_leftovers(node_name);

    println!("Ferrite demo: one node, five pods, a ClusterIP Service over three backends\n");
    let mut node = Node::named(node_name)?;
    println!(
        "[1/5] node {node_name:?}: network namespace; datapath pinned at {}",
        node.pin_dir().display()
    );
    for (name, ip) in CLIENTS.iter().chain(BACKENDS.iter()) {
        node.add_pod(name, *ip)?;
    }
    let pods: Vec<String> = node
        .pods
        .iter()
        .map(|p| format!("{} {}", p.name, p.ip))
        .collect();
    println!(
        "[2/5] pods (veth, /32, gateway 169.254.1.1): {}",
        pods.join(", ")
    );
    let mut servers = Vec::new();
    for (name, _) in BACKENDS {
        servers.push(node.pod(name).serve(TCP_TARGET)?);
        servers.push(node.pod(name).serve(UDP_TARGET)?);
    }
    check(interrupted)?;

    node.start_agent_with(&config)?;
    node.wait_for_sync(2, 5)?;
    println!("[3/5] agent running on {}: synced", config.display());
    check(interrupted)?;

    println!(
        "[4/5] traffic: {} clients x {REQUESTS_PER_CLIENT} TCP connections to {TCP_FRONTEND} and UDP requests to {UDP_FRONTEND}",
        CLIENTS.len()
    );
    let mut seen: BTreeMap<&str, (usize, usize)> =
        BACKENDS.iter().map(|(n, _)| (*n, (0, 0))).collect();
    let mut udp_from_vip = 0;
    for (client, _) in CLIENTS {
        let pod = node.pod(client);
        for i in 0..REQUESTS_PER_CLIENT {
            check(interrupted)?;
            let request = format!("{client} #{i}");
            let reply = pod.tcp_request(TCP_FRONTEND, &request)?;
            let backend = reply.split('|').next().unwrap_or_default().to_string();
            if let Some(entry) = seen.get_mut(backend.as_str()) {
                entry.0 += 1;
            }
            let (reply, from) = pod.udp_request(UDP_FRONTEND, &request)?;
            if from == SocketAddr::V4(UDP_FRONTEND) {
                udp_from_vip += 1;
            }
            let backend = reply.split('|').next().unwrap_or_default().to_string();
            if let Some(entry) = seen.get_mut(backend.as_str()) {
                entry.1 += 1;
            }
        }
    }
    println!(
        "\n      {:<8} {:<13} {:>16} {:>13}",
        "BACKEND", "POD IP", "TCP CONNECTIONS", "UDP REQUESTS"
    );
    for (name, ip) in BACKENDS {
        let (tcp, udp) = seen[name];
        println!("      {name:<8} {:<13} {tcp:>16} {udp:>13}", ip.to_string());
    }
    let total = CLIENTS.len() * REQUESTS_PER_CLIENT;
    println!(
        "      every TCP connection was to {} (TCP accepts replies only from there); {udp_from_vip}/{total} UDP replies came from {UDP_FRONTEND}\n",
        TCP_FRONTEND
    );
    if seen.values().any(|(tcp, udp)| *tcp == 0 || *udp == 0) || udp_from_vip != total {
        bail!("traffic was not spread over every backend or replies did not come from the VIP");
    }

    println!("[5/5] ferrite inspect services (read from the pinned maps):\n");
    for line in node.inspect("services")?.lines() {
        println!("      {line}");
    }
    println!();
    for line in node.inspect("stats")?.lines() {
        println!("      {line}");
    }
    println!(
        "\n      try: bpftool map dump pinned {}/ferrite_service",
        node.pin_dir().display()
    );
    if keep {
        println!("\n--keep: the node stays up; press Ctrl-C to tear down");
        while !interrupted.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    drop(servers);
    drop(node);
    Ok(())
}
