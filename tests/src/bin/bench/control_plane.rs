//! `control-plane`: Services x endpoints from the fake API server into the maps (agent
//! start to the last Service in the map, then single EndpointSlice changes), next to
//! kube-proxy's iptables-restore and nftables `nft -f` of the same Services.
//! `control-plane-large`: 100,000 Services x 10 endpoints, then 250,000 frontends
//! (125,000 Services of two ports), Ferrite alone (kube-proxy's iptables mode is
//! unusable there).
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::Result;
use ferrite_common::PROTO_TCP;
use ferrite_tests::{
    fake_apiserver::FakeApiServer,
    lab::{node_yaml, wait_until, Netns, Node},
};

use super::{iptables_restore, kube_proxy_endpoints, percentile, timed_in_netns};

const ENDPOINTS: u32 = 10;
const CHANGES: usize = 100;
/// How long the idle agent's CPU time is counted (six resync periods).
const IDLE_WINDOW: Duration = Duration::from_secs(60);

/// The CPU time (user + system) process `pid` spends over `window`, as a percentage
/// of one core.
fn idle_cpu_percent(pid: u32, window: Duration) -> Result<f64> {
    let ticks = || -> Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces) in parentheses:
        // state is field 3, utime 14 and stime 15.
        let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let field =
            |n: usize| -> Result<u64> { Ok(fields.get(n - 3).copied().unwrap_or("").parse()?) };
        Ok(field(14)? + field(15)?)
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) } as f64;
    let before = ticks()?;
    std::thread::sleep(window);
    let spent = (ticks()? - before) as f64 / per_second;
    Ok(100.0 * spent / window.as_secs_f64())
}

/// One run's size and what it is compared with.
pub struct Scale {
    services: u32,
    /// Ports of each Service (80 -> 8080, then 443 -> 8443): one frontend each.
    ports: u32,
    /// Run kube-proxy's restores of the same Services next to it.
    kube_proxy: bool,
    /// `--map-capacity` settings the size needs.
    capacities: &'static [(&'static str, u32)],
}

pub const TEN_THOUSAND: Scale = Scale {
    services: 10_000,
    ports: 1,
    kube_proxy: true,
    capacities: &[],
};

/// 100,000 Services of one port each: 1.1M Service entries, 1M backends and 100,000
/// reverse-NAT entries (past what a 16-bit index numbers).
pub const HUNDRED_THOUSAND: Scale = Scale {
    services: 100_000,
    ports: 1,
    kube_proxy: false,
    capacities: &[
        (ferrite_common::map_names::SERVICES, 1 << 21),
        (ferrite_common::map_names::BACKENDS, 1 << 21),
        (ferrite_common::map_names::REV_NAT, 1 << 17),
    ],
};

/// 250,000 frontends: 125,000 Services of two ports (2.75M Service entries, 2.5M
/// backends: each port has its own target port).
pub const QUARTER_MILLION_FRONTENDS: Scale = Scale {
    services: 125_000,
    ports: 2,
    kube_proxy: false,
    capacities: &[
        (ferrite_common::map_names::SERVICES, 1 << 22),
        (ferrite_common::map_names::BACKENDS, 1 << 22),
        (ferrite_common::map_names::REV_NAT, 1 << 18),
    ],
};

/// (Service port, target port) of port `index` of every Service.
fn port(index: u32) -> (u16, u16) {
    [(80, 8080), (443, 8443)][index as usize]
}

fn vip(service: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + service)
}

fn endpoint(service: u32, endpoint: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + service * ENDPOINTS + endpoint)
}

/// The addresses the changes bring in: above every `endpoint`.
fn fresh_endpoint(change: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + change as u32)
}

fn objects(
    service: u32,
    ports: u32,
    endpoints: &[Ipv4Addr],
) -> (serde_json::Value, serde_json::Value) {
    use serde_json::json;
    let name = format!("svc-{service}");
    let (service_ports, slice_ports): (Vec<_>, Vec<_>) = (0..ports)
        .map(|index| {
            let (port, target) = port(index);
            let name = format!("p{port}");
            (
                json!({"name": name, "port": port, "protocol": "TCP", "targetPort": target}),
                json!({"name": name, "port": target, "protocol": "TCP"}),
            )
        })
        .unzip();
    let svc = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"clusterIP": vip(service).to_string(), "ports": service_ports}});
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": slice_ports,
        "endpoints": endpoints.iter().map(|ip| json!({"addresses": [ip.to_string()],
            "conditions": {"ready": true}})).collect::<Vec<_>>()});
    (svc, slice)
}

/// kube-proxy's iptables layout for the same Services (KUBE-SERVICES -> KUBE-SVC-*
/// with statistic probabilities -> KUBE-SEP-* DNAT), as one iptables-restore input.
fn iptables_rules(services: std::ops::Range<u32>) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::new();
    for s in services {
        let svc = format!("KUBE-SVC-{s:012}");
        chains.push_str(&format!(":{svc} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j {svc}\n",
            vip(s)
        ));
        let endpoints: Vec<SocketAddrV4> = (0..ENDPOINTS)
            .map(|e| SocketAddrV4::new(endpoint(s, e), 8080))
            .collect();
        kube_proxy_endpoints(
            &svc,
            &format!("{s:06}"),
            6,
            &endpoints,
            &mut chains,
            &mut rules,
        );
    }
    format!("{chains}{rules}COMMIT\n")
}

/// kube-proxy's nftables layout (its `nftables` mode): one verdict map from
/// address . protocol . port to a chain per Service, which picks an endpoint chain
/// with `numgen random mod n`, which DNATs. `table` opens the input (the whole table,
/// or only the elements and chains one change rewrites).
fn nft_rules(services: std::ops::Range<u32>, whole_table: bool) -> String {
    let mut out = String::new();
    if whole_table {
        out.push_str(
            "table ip kube-proxy {\n\
             map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n\
             chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }\n\
             chain nat-prerouting { type nat hook prerouting priority dstnat; jump services; }\n\
             }\n",
        );
    }
    for s in services {
        let svc = format!("service-{s:06}-bench/svc/tcp/http");
        let mut picks = Vec::new();
        for e in 0..ENDPOINTS {
            let sep = format!("endpoint-{s:06}-{e}");
            out.push_str(&format!(
                "add chain ip kube-proxy {sep}\nflush chain ip kube-proxy {sep}\n\
                 add rule ip kube-proxy {sep} meta l4proto tcp dnat to {}:8080\n",
                endpoint(s, e)
            ));
            picks.push(format!("{e} : goto {sep}"));
        }
        out.push_str(&format!(
            "add chain ip kube-proxy {svc}\nflush chain ip kube-proxy {svc}\n\
             add rule ip kube-proxy {svc} numgen random mod {ENDPOINTS} vmap {{ {} }}\n\
             add element ip kube-proxy service-ips {{ {} . tcp . 80 : goto {svc} }}\n",
            picks.join(", "),
            vip(s)
        ));
    }
    out
}

/// What kube-proxy takes for the same Services: the full load and one Service's
/// rewrite (20 times with iptables-restore, 5 with nft -f).
struct KubeProxy {
    iptables_full: Duration,
    iptables_one: Vec<f64>,
    nft_full: Duration,
    nft_one: Vec<f64>,
}

fn kube_proxy(services: u32) -> Result<KubeProxy> {
    let netns = Netns::new(&ferrite_tests::lab::unique("kp"))?;
    let iptables_full = iptables_restore(&netns, &iptables_rules(0..services), false)?;
    let one = iptables_rules(0..1).replace(":KUBE-SERVICES - [0:0]\n", "");
    let mut iptables_one = Vec::new();
    for _ in 0..20 {
        iptables_one.push(iptables_restore(&netns, &one, true)?.as_secs_f64() * 1000.0);
    }
    let nft_full = timed_in_netns(&netns, &["nft", "-f", "-"], &nft_rules(0..services, true))?;
    // nft reads the whole table back before each change: seconds at 10k, so fewer.
    let mut nft_one = Vec::new();
    for _ in 0..5 {
        let input = nft_rules(0..1, false).replace(
            "add element",
            "delete element ip kube-proxy service-ips { 10.100.0.0 . tcp . 80 }\nadd element",
        );
        nft_one.push(timed_in_netns(&netns, &["nft", "-f", "-"], &input)?.as_secs_f64() * 1000.0);
    }
    Ok(KubeProxy {
        iptables_full,
        iptables_one,
        nft_full,
        nft_one,
    })
}

pub fn bench(scale: &Scale) -> Result<()> {
    let (services, ports) = (scale.services, scale.ports);
    let mut node = Node::new("cp")?;
    // The agent's default full-resync period, not the tests' quick one.
    node.resync_seconds = 10;
    for (map, capacity) in scale.capacities {
        node.agent_args
            .extend(["--map-capacity".to_string(), format!("{map}={capacity}")]);
    }
    let api = FakeApiServer::start(&node.netns)?;
    api.apply_yaml(&node_yaml(
        &node.name,
        "198.51.100.1".parse()?,
        "10.244.0.0/24",
    ))?;
    for s in 0..services {
        let endpoints: Vec<_> = (0..ENDPOINTS).map(|e| endpoint(s, e)).collect();
        let (svc, slice) = objects(s, ports, &endpoints);
        api.apply(svc);
        api.apply(slice);
    }
    let kubeconfig = node.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let start = Instant::now();
    node.start_agent_kube(&kubeconfig)?;
    let last_port = port(ports - 1).0;
    let last_service = ferrite_common::ServiceKey::new(vip(services - 1), last_port, PROTO_TCP, 0);
    let maps_ready = || {
        node.maps()
            .ok()
            .and_then(|m| m.services.get(&last_service, 0).ok())
            .is_some()
    };
    if let Err(e) = wait_until("the first full sync", Duration::from_secs(600), maps_ready) {
        let log = node
            .agent
            .as_ref()
            .map(|a| a.log_text())
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        eprintln!("agent log (last lines, newest first):\n{}", tail.join("\n"));
        return Err(e);
    }
    let first_sync = start.elapsed();
    let pid = node.agent.as_ref().map(|a| a.pid()).unwrap_or(0);

    // Single EndpointSlice changes: the newest endpoint sorts last, so it lands in
    // the Service's last backend slot.
    let maps = node.maps()?;
    let mut latencies = Vec::new();
    for i in 0..CHANGES {
        let service = (i as u32 * 97) % services;
        let fresh = fresh_endpoint(i);
        let mut endpoints: Vec<_> = (1..ENDPOINTS).map(|e| endpoint(service, e)).collect();
        endpoints.push(fresh);
        let (_, slice) = objects(service, ports, &endpoints);
        let slot = ferrite_common::ServiceKey::new(vip(service), 80, PROTO_TCP, ENDPOINTS as u16);
        let changed = Instant::now();
        api.apply(slice);
        loop {
            let landed = maps
                .services
                .get(&slot, 0)
                .ok()
                .and_then(|v| maps.backends.get(&v.backend_id, 0).ok())
                .is_some_and(|b| b.address == fresh.octets());
            if landed {
                break;
            }
            anyhow::ensure!(
                changed.elapsed() < Duration::from_secs(30),
                "change {i} never reached the map"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        latencies.push(changed.elapsed().as_secs_f64() * 1000.0);
    }
    // The next full resync compares the maps with the objects: after updates that
    // wrote what a full sync writes, it has nothing to write. (The last update has
    // counted its writes well within the second waited first.)
    std::thread::sleep(Duration::from_secs(1));
    // At 250,000 frontends a full sync keeps the agent from answering /metrics
    // within the client's 5 s: ask again.
    let metric = |name: &str| -> Result<f64> {
        let mut value = None;
        wait_until(name, Duration::from_secs(300), || {
            value = node.metric(name).ok();
            value.is_some()
        })?;
        Ok(value.unwrap_or_default())
    };
    let (syncs, writes) = (
        metric("ferrite_syncs_total")?,
        metric("ferrite_map_writes_total")?,
    );
    let resynced = wait_until(
        "a full resync after the changes",
        Duration::from_secs(300),
        || node.metric("ferrite_syncs_total").is_ok_and(|n| n > syncs),
    );
    let resync_writes = match resynced {
        Ok(()) => format!("{}", metric("ferrite_map_writes_total")? - writes),
        Err(e) => {
            let log = node
                .agent
                .as_ref()
                .map(|a| a.log_text())
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!(
                "{e}; agent log (last lines, newest first):\n{}",
                tail.join("\n")
            );
            "none".to_string()
        }
    };
    // Nothing changes from here: what the agent spends is its resyncs' and timers'.
    let idle_cpu = idle_cpu_percent(pid, IDLE_WINDOW)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let status_mib = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    };
    drop(maps);
    drop(api);
    drop(node);

    let kube_proxy = if scale.kube_proxy {
        Some(kube_proxy(services)?)
    } else {
        None
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let column = |f: &dyn Fn(&KubeProxy) -> f64| {
        kube_proxy
            .as_ref()
            .map_or("not run".to_string(), |k| format!("{:.1}ms", f(k)))
    };
    let shape = if ports == 1 {
        String::new()
    } else {
        format!(" x {ports} ports ({} frontends)", services * ports)
    };
    println!(
        "\nControl plane: {services} Services{shape} x {ENDPOINTS} endpoints from the fake API server\n"
    );
    println!(
        "{:<44} {:>12} {:>22} {:>18}",
        "", "ferrite", "kube-proxy iptables", "kube-proxy nft"
    );
    println!(
        "{:<44} {:>10.0}ms {:>22} {:>18}",
        "first full sync (agent start -> maps / load)",
        ms(first_sync),
        column(&|k| ms(k.iptables_full)),
        column(&|k| ms(k.nft_full)),
    );
    for (label, p) in [
        ("one EndpointSlice change, p50", 0.5),
        ("one EndpointSlice change, p99", 0.99),
    ] {
        println!(
            "{:<44} {:>10.1}ms {:>22} {:>18}",
            label,
            percentile(latencies.clone(), p),
            column(&|k| percentile(k.iptables_one.clone(), p)),
            column(&|k| percentile(k.nft_one.clone(), p)),
        );
    }
    println!(
        "{:<44} {:>10}MB   (heap and stacks {} MB, program text {} MB; peak {} MB)",
        "agent RSS after the changes",
        status_mib("VmRSS:"),
        status_mib("RssAnon:"),
        status_mib("RssFile:"),
        status_mib("VmHWM:")
    );
    println!(
        "{:<44} {:>12}   (0: the updates wrote what a full sync writes)",
        "writes of the full resync after the changes", resync_writes
    );
    println!(
        "{:<44} {:>11.2}%   (utime + stime over {} s with nothing changing, of one core)",
        "idle CPU",
        idle_cpu,
        IDLE_WINDOW.as_secs()
    );
    println!(
        "\ntargets at 10k x 10: full sync < 0.5 s, RSS < 50 MB; at 100k x 10: full sync < 5 s, \
         p99 < 5 ms, RSS < 300 MB (kube-proxy columns: its load of the same rules; one change = \
         one Service's chains rewritten: iptables-restore --noflush, nft -f)"
    );
    Ok(())
}
