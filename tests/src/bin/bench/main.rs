//! `cargo xtask bench [section]...`: Ferrite side by side with its baselines. Sections:
//! `datapath` (ns/packet of each per-packet path in BPF_PROG_TEST_RUN vs no-op
//! programs, `datapath.rs`), `insitu` (the same programs' run time per packet under
//! real TCP traffic in a lab cluster, `insitu.rs`), `overlay` (vs flannel-style),
//! `control-plane` (vs iptables-restore), `nodeport` (vs kube-proxy iptables),
//! `clusterip` (vs direct and kube-proxy's layouts, with backends keeping
//! TIME_WAIT and without: `clusterip-time-wait`, `clusterip-no-time-wait` run one,
//! `clusterip.rs`), `clusterip-families` (a dual-stack ClusterIP's IPv6 next to its
//! IPv4, socket-level LB, `clusterip_families.rs`), `latency`
//! (request/response on an established flow, `latency.rs`), `monitor` (how
//! soon a datapath event reaches `ferrite monitor`, `monitor.rs`), `cni` (the CNI
//! plugin's ADD and DEL of one pod, `cni.rs`).
use std::net::{Ipv4Addr, SocketAddrV4};

mod clusterip;
mod clusterip_families;
mod cni;
mod comparison;
mod conntrack_read;
mod control_plane;
mod datapath;
mod insitu;
mod latency;
mod monitor;
mod policy_plan;

use anyhow::Result;

/// The Services counts a section measures: `defaults`, or those of
/// FERRITE_BENCH_SIZES (comma-separated) for a shorter run.
fn sizes(defaults: &[u32]) -> Vec<u32> {
    std::env::var("FERRITE_BENCH_SIZES")
        .ok()
        .and_then(|v| v.split(',').map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| defaults.to_vec())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `ferrite-bench [datapath|insitu|overlay|control-plane|conntrack-read|nodeport|clusterip[-time-wait|-no-time-wait]|clusterip-families|latency|monitor|cni]...`: the
/// sections to run (all by default).
fn main() -> Result<()> {
    let sections: Vec<String> = std::env::args().skip(1).collect();
    let run = |name: &str| sections.is_empty() || sections.iter().any(|s| s == name);
    if run("datapath") {
        datapath::bench()?;
    }
    if run("insitu") {
        insitu::bench()?;
    }
    if run("overlay") {
        overlay_bench()?;
    }
    if run("control-plane") {
        control_plane::bench(&control_plane::TEN_THOUSAND)?;
    }
    if run("control-plane") || run("control-plane-policy") {
        policy_plan::bench()?;
    }
    if run("control-plane") || run("conntrack-read") {
        conntrack_read::bench()?;
    }
    if run("control-plane-large") || run("control-plane-100k") {
        control_plane::bench(&control_plane::HUNDRED_THOUSAND)?;
    }
    if run("control-plane-large") || run("control-plane-250k") {
        control_plane::bench(&control_plane::QUARTER_MILLION_FRONTENDS)?;
    }
    if run("nodeport") {
        nodeport_bench()?;
    }
    {
        use comparison::TimeWait;
        let settings: Vec<TimeWait> = [
            ("clusterip-no-time-wait", TimeWait::Off),
            ("clusterip-time-wait", TimeWait::KernelDefault),
        ]
        .into_iter()
        .filter(|(section, _)| run("clusterip") || run(section))
        .map(|(_, setting)| setting)
        .collect();
        if !settings.is_empty() {
            clusterip::bench(&settings)?;
        }
    }
    if run("clusterip-families") {
        clusterip_families::bench()?;
    }
    if run("latency") {
        latency::bench()?;
    }
    if run("monitor") {
        monitor::bench()?;
    }
    if run("cni") {
        cni::bench()?;
    }
    Ok(())
}

const TRANSFER_BYTES: usize = 512 << 20;
const CONNECTIONS: usize = 2_000;
const OVERLAY_ROUNDS: usize = 3;

/// Cross-node pod -> pod: Ferrite over VXLAN next to the flannel-style vxlan wiring
/// (Linux bridge + kernel vxlan + routes, no BPF), in both families (both
/// dual-stack: IPv6 inside the IPv4 VXLAN, Ferrite's through the kernel's LWT encap
/// route and `ferrite_from_overlay6`, flannel's through `flannel.1`'s IPv6 routes),
/// and Ferrite routing natively (`--routing native`) next to flannel's host-gw
/// wiring (bridge + routes via the other node, no BPF); same underlay and traffic,
/// pod MTU 1450 with VXLAN and 1500 without, rounds alternating so noise hits all.
fn overlay_bench() -> Result<()> {
    use anyhow::Context;
    use ferrite_tests::{
        cluster::TCP_TARGET,
        flannel::FlannelCluster,
        lab::{bulk_transfer_to, connection_loop, pod_ip, pod_ip6, Cluster, Pod, Routing, Server},
    };
    use std::net::{IpAddr, SocketAddr};
    let ferrite_cluster = |routing| -> Result<Cluster> {
        let dual_stack = routing == Routing::Vxlan;
        let mut cluster = Cluster::with_routing(2, routing)?;
        if dual_stack {
            cluster.dual_stack()?;
            cluster.nodes[0].add_dual_stack_pod("client", pod_ip(0, 0), pod_ip6(0, 0))?;
            cluster.nodes[1].add_dual_stack_pod("server", pod_ip(1, 0), pod_ip6(1, 0))?;
        } else {
            cluster.nodes[0].add_pod("client", pod_ip(0, 0))?;
            cluster.nodes[1].add_pod("server", pod_ip(1, 0))?;
        }
        cluster.write_config(&cluster.nodes_and_pods_yaml())?;
        cluster.start_agents()?;
        for node in &cluster.nodes {
            node.wait_for_maps("overlay routes", |m| {
                m.pod_routes() == 2
                    && m.endpoints.len() == 1
                    && (!dual_stack || (m.pod_routes6() == 2 && m.endpoints6.len() == 1))
            })?;
        }
        Ok(cluster)
    };
    let ferrite = ferrite_cluster(Routing::Vxlan)?;
    let native = ferrite_cluster(Routing::Native)?;
    let flannel = FlannelCluster::dual_stack(2, 1500 - ferrite_common::VXLAN_OVERHEAD)?;
    let host_gw = FlannelCluster::host_gw(2)?;
    let ipv6 = |pod: &Pod| -> Result<IpAddr> { Ok(pod.ip6.context("a dual-stack pod")?.into()) };
    // Pairs: Ferrite, then its baseline.
    let setups: [(&str, &Pod, &Pod, IpAddr); 6] = [
        (
            "ferrite vxlan",
            ferrite.pod("client"),
            ferrite.pod("server"),
            ferrite.pod("server").ip.into(),
        ),
        (
            "flannel-style vxlan",
            &flannel.pods[0],
            &flannel.pods[1],
            flannel.pods[1].ip.into(),
        ),
        (
            "ferrite native",
            native.pod("client"),
            native.pod("server"),
            native.pod("server").ip.into(),
        ),
        (
            "flannel host-gw",
            &host_gw.pods[0],
            &host_gw.pods[1],
            host_gw.pods[1].ip.into(),
        ),
        (
            "ferrite vxlan",
            ferrite.pod("client"),
            ferrite.pod("server"),
            ipv6(ferrite.pod("server"))?,
        ),
        (
            "flannel-style vxlan",
            &flannel.pods[0],
            &flannel.pods[1],
            ipv6(&flannel.pods[1])?,
        ),
    ];
    let _servers: Vec<Server> = setups
        .iter()
        .map(|(_, _, server, ip)| {
            Server::start(
                &server.netns,
                &server.name,
                SocketAddr::new(*ip, TCP_TARGET),
            )
        })
        .collect::<Result<_>>()?;
    let mut gbits: [Vec<f64>; 6] = Default::default();
    let mut rates: [Vec<f64>; 6] = Default::default();
    for round in 0..OVERLAY_ROUNDS {
        for (i, (_, client, server, ip)) in setups.iter().enumerate() {
            // A port per setup: a server's families share its namespace.
            let port = 9100 + (round * setups.len() + i) as u16;
            let to = SocketAddr::new(*ip, port);
            let (bytes, elapsed) = bulk_transfer_to(client, server, to, TRANSFER_BYTES)?;
            gbits[i].push(bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9);
            let elapsed = connection_loop(client, SocketAddr::new(*ip, TCP_TARGET), CONNECTIONS)?;
            rates[i].push(CONNECTIONS as f64 / elapsed.as_secs_f64());
        }
    }
    let gbits = gbits.map(median);
    let rates = rates.map(median);
    println!("\nCross-node pod -> pod, median of {OVERLAY_ROUNDS} alternating rounds\n");
    println!(
        "{:<28} {:>15} {:>20} {:>8}",
        "", "ferrite", "baseline", "ratio"
    );
    for (pair, title) in [
        (0, "VXLAN, IPv4 (pod MTU 1450)"),
        (4, "VXLAN, IPv6 in IPv4 (pod MTU 1450)"),
        (2, "native, IPv4 (pod MTU 1500)"),
    ] {
        let (ours, theirs) = (setups[pair].0, setups[pair + 1].0);
        println!("{title}: {ours} vs {theirs}");
        println!(
            "  {:<26} {:>15.2} {:>20.2} {:>7.2}x",
            "TCP throughput, Gbit/s",
            gbits[pair],
            gbits[pair + 1],
            gbits[pair] / gbits[pair + 1]
        );
        println!(
            "  {:<26} {:>15.0} {:>20.0} {:>7.2}x",
            "TCP connections/s",
            rates[pair],
            rates[pair + 1],
            rates[pair] / rates[pair + 1]
        );
    }
    println!(
        "ferrite native vs ferrite vxlan: {:.2}x throughput, {:.2}x connections/s",
        gbits[2] / gbits[0],
        rates[2] / rates[0]
    );
    println!(
        "IPv6 vs IPv4 over VXLAN: ferrite {:.2}x throughput, {:.2}x connections/s; flannel-style {:.2}x, {:.2}x",
        gbits[4] / gbits[0],
        rates[4] / rates[0],
        gbits[5] / gbits[1],
        rates[5] / rates[1]
    );
    println!("\ntarget: ferrite >= its flannel-style baseline (ratio >= 1.00)");
    Ok(())
}

use ferrite_tests::kube_proxy_layout::kube_proxy_endpoints;

fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

fn iptables_restore(
    netns: &ferrite_tests::lab::Netns,
    input: &str,
    noflush: bool,
) -> Result<std::time::Duration> {
    let command: &[&str] = if noflush {
        &["iptables-restore", "--noflush"]
    } else {
        &["iptables-restore"]
    };
    timed_in_netns(netns, command, input)
}

/// How long `command` takes in `netns` to read `input` from stdin and succeed.
fn timed_in_netns(
    netns: &ferrite_tests::lab::Netns,
    command: &[&str],
    input: &str,
) -> Result<std::time::Duration> {
    let start = std::time::Instant::now();
    netns.run_with_input(command, input)?;
    Ok(start.elapsed())
}

const NP_SIZES: [u32; 2] = [1_000, 10_000];
const NP_CONNECTIONS: usize = 400;
const NP_ROUNDS: usize = 3;
/// The measured Service's NodePorts (echo, iperf3); fillers take 30000 upwards.
const NP_ECHO: u16 = 32760;
const NP_IPERF: u16 = 32761;
const NP_FILLER_NODE_PORTS: u32 = 2700;
const IPERF_PORT: u16 = 5201;

fn np_vip(s: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + s)
}

fn np_lb_ip(s: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + s)
}

/// Two made-up endpoints per filler Service (never reached).
fn np_filler_endpoint(s: u32, e: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + s * 2 + e)
}

fn np_filler_node_port(s: u32) -> Option<u16> {
    (s < NP_FILLER_NODE_PORTS).then(|| 30_000 + s as u16)
}

/// `services - 1` LoadBalancer fillers (LB IP, NodePort while the range lasts, two
/// endpoints) and the measured NodePort Service on `backend` (echo 80 -> 8080 on
/// NP_ECHO, iperf3 5201 on NP_IPERF), as Kubernetes YAML.
fn np_yaml(services: u32, backend: Ipv4Addr) -> String {
    use std::fmt::Write;
    let mut yaml = String::new();
    for s in 0..services - 1 {
        let node_port = np_filler_node_port(s)
            .map(|p| format!(", nodePort: {p}"))
            .unwrap_or_default();
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: f{s}, namespace: default}}\nspec: {{type: LoadBalancer, clusterIP: {}, ports: [{{port: 80, targetPort: 8080{node_port}}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: {}}}]}}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: f{s}-1, namespace: default, labels: {{kubernetes.io/service-name: f{s}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [\"{}\"]}}, {{addresses: [\"{}\"]}}]\n",
            np_vip(s),
            np_lb_ip(s),
            np_filler_endpoint(s, 0),
            np_filler_endpoint(s, 1)
        );
    }
    let _ = write!(
        yaml,
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: measured, namespace: default}}\nspec: {{type: NodePort, clusterIP: {}, ports: [{{name: echo, port: 80, targetPort: 8080, nodePort: {NP_ECHO}}}, {{name: iperf, port: {IPERF_PORT}, nodePort: {NP_IPERF}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: measured-1, namespace: default, labels: {{kubernetes.io/service-name: measured}}}}\naddressType: IPv4\nports: [{{name: echo, port: 8080}}, {{name: iperf, port: {IPERF_PORT}}}]\nendpoints: [{{addresses: [\"{backend}\"]}}]\n",
        np_vip(services - 1)
    );
    yaml
}

/// kube-proxy's iptables layout (nat table) for the same Services: KUBE-SERVICES
/// (ClusterIP and LB IP rules, then KUBE-NODEPORTS for local addresses), KUBE-EXT-*
/// (mark for masquerade), KUBE-SVC-* with statistic probabilities, KUBE-SEP-* DNAT.
fn np_kube_proxy_rules(services: u32, backend: Ipv4Addr) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n-A POSTROUTING -j KUBE-POSTROUTING\n-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n-A KUBE-POSTROUTING -j MASQUERADE --random-fully\n",
    );
    let mut service = |s: u32,
                       proto_port: &[(u16, Option<u16>, u16)],
                       lb: Option<Ipv4Addr>,
                       endpoints: &[Ipv4Addr]| {
        for (index, (port, node_port, target)) in proto_port.iter().enumerate() {
            let id = format!("{s:08}{index:02}");
            let (svc, ext) = (format!("KUBE-SVC-{id}"), format!("KUBE-EXT-{id}"));
            chains.push_str(&format!(":{svc} - [0:0]\n:{ext} - [0:0]\n"));
            rules.push_str(&format!(
                "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport {port} -j {svc}\n",
                np_vip(s)
            ));
            if let Some(lb) = lb {
                rules.push_str(&format!(
                    "-A KUBE-SERVICES -d {lb}/32 -p tcp -m tcp --dport {port} -j {ext}\n"
                ));
            }
            if let Some(node_port) = node_port {
                rules.push_str(&format!(
                    "-A KUBE-NODEPORTS -p tcp -m tcp --dport {node_port} -j {ext}\n"
                ));
            }
            rules.push_str(&format!("-A {ext} -j KUBE-MARK-MASQ\n-A {ext} -j {svc}\n"));
            let targets: Vec<SocketAddrV4> = endpoints
                .iter()
                .map(|ip| SocketAddrV4::new(*ip, *target))
                .collect();
            kube_proxy_endpoints(&svc, &id, 2, &targets, &mut chains, &mut rules);
        }
    };
    for s in 0..services - 1 {
        service(
            s,
            &[(80, np_filler_node_port(s), 8080)],
            Some(np_lb_ip(s)),
            &[np_filler_endpoint(s, 0), np_filler_endpoint(s, 1)],
        );
    }
    service(
        services - 1,
        &[
            (80, Some(NP_ECHO), 8080),
            (IPERF_PORT, Some(NP_IPERF), IPERF_PORT),
        ],
        None,
        &[backend],
    );
    rules.push_str("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    format!("{chains}{rules}COMMIT\n")
}

/// `count` sequential TCP connections from `netns` to `to`, one request each.
fn np_connection_rate(
    netns: &ferrite_tests::lab::Netns,
    to: SocketAddrV4,
    count: usize,
) -> Result<f64> {
    use ferrite_tests::lab::exchange;
    use std::{net::TcpStream, time::Duration};
    netns.run(move || -> Result<f64> {
        let start = std::time::Instant::now();
        for i in 0..count {
            let mut stream = TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            exchange(&mut stream, &format!("c{i}"))?;
        }
        Ok(count as f64 / start.elapsed().as_secs_f64())
    })?
}

/// iperf3 from `netns` to `to` for 3 seconds: Gbit/s received.
fn np_iperf(netns: &ferrite_tests::lab::Netns, to: SocketAddrV4) -> Result<f64> {
    use anyhow::Context;
    let out = ferrite_tests::lab::sh(
        "ip",
        &[
            "netns",
            "exec",
            &netns.name,
            "iperf3",
            "-c",
            &to.ip().to_string(),
            "-p",
            &to.port().to_string(),
            "-t",
            "3",
            "-J",
        ],
    )?;
    let report: serde_json::Value = serde_json::from_str(&out)?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 report without sum_received")?;
    Ok(bits / 1e9)
}

/// An iperf3 server in a netns, killed on drop.
struct IperfServer(std::process::Child);

impl IperfServer {
    fn start(netns: &ferrite_tests::lab::Netns) -> Result<Self> {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &netns.name, "iperf3", "-s", "-p"])
            .arg(IPERF_PORT.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(Self(child))
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// NodePort from the world: node 0 runs Ferrite (XDP on its uplink), node 1 the same
/// Services as kube-proxy's iptables rules (conntrack DNAT + masquerade); one backend
/// pod on each node serves an echo and iperf3. Rounds alternate between the two.
fn nodeport_bench() -> Result<()> {
    use ferrite_tests::{
        cluster::TCP_TARGET,
        lab::{pod_ip, sh, wait_until, Cluster},
    };
    let mut cluster = Cluster::new(2)?;
    cluster.nodes[0].add_pod("server", pod_ip(0, 0))?;
    cluster.nodes[0].resync_seconds = 3600;
    cluster.nodes[1].add_pod("kp-server", pod_ip(1, 0))?;
    // The kube-proxy node routes to its pod the way a bridge-less CNI does.
    let (kp, kp_pod) = (&cluster.nodes[1], &cluster.nodes[1].pods[0]);
    let pod = format!("{}/32", kp_pod.ip);
    sh(
        "ip",
        &[
            "-n",
            &kp.netns.name,
            "route",
            "add",
            &pod,
            "dev",
            &kp_pod.host_interface,
        ],
    )?;
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &kp.netns.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    )?;
    let _servers = [
        cluster.pod("server").serve(TCP_TARGET)?,
        cluster.pod("kp-server").serve(TCP_TARGET)?,
    ];
    let _iperf = [
        IperfServer::start(&cluster.pod("server").netns)?,
        IperfServer::start(&cluster.pod("kp-server").netns)?,
    ];
    let nodes_yaml = cluster.nodes_and_pods_yaml();
    let node_ips = [cluster.nodes[0].ip.unwrap(), cluster.nodes[1].ip.unwrap()];
    println!("\nNodePort from outside the cluster: Ferrite XDP vs kube-proxy iptables, median of {NP_ROUNDS} alternating rounds\n");
    println!(
        "{:<10} {:<26} {:>10} {:>12} {:>8}",
        "services", "", "ferrite", "kube-proxy", "ratio"
    );
    for (index, services) in NP_SIZES.into_iter().enumerate() {
        cluster.nodes[0].write_config(&format!(
            "{nodes_yaml}{}",
            np_yaml(services, cluster.pod("server").ip)
        ))?;
        if index == 0 {
            cluster.nodes[0].start_agent()?;
        }
        let restore = iptables_restore(
            &cluster.nodes[1].netns,
            &np_kube_proxy_rules(services, cluster.pod("kp-server").ip),
            false,
        )?;
        let node = &cluster.nodes[0];
        wait_until(
            &format!("{services} Services in the maps"),
            std::time::Duration::from_secs(300),
            || {
                node.maps()
                    .map(|m| {
                        m.services
                            .keys()
                            .filter_map(Result::ok)
                            .filter(|k| k.backend_slot == 0)
                            .count() as u32
                            >= services * 2
                    })
                    .unwrap_or(false)
            },
        )?;
        let mut rates: [Vec<f64>; 2] = Default::default();
        let mut gbits: [Vec<f64>; 2] = Default::default();
        for _ in 0..NP_ROUNDS {
            for (i, ip) in node_ips.iter().enumerate() {
                rates[i].push(np_connection_rate(
                    &cluster.world,
                    SocketAddrV4::new(*ip, NP_ECHO),
                    NP_CONNECTIONS,
                )?);
                gbits[i].push(np_iperf(&cluster.world, SocketAddrV4::new(*ip, NP_IPERF))?);
            }
        }
        let [rate_f, rate_k] = rates.map(median);
        let [gbit_f, gbit_k] = gbits.map(median);
        println!(
            "{services:<10} {:<26} {rate_f:>10.0} {rate_k:>12.0} {:>7.2}x",
            "TCP connections/s",
            rate_f / rate_k
        );
        println!(
            "{:<10} {:<26} {gbit_f:>10.2} {gbit_k:>12.2} {:>7.2}x",
            "",
            "TCP throughput, Gbit/s",
            gbit_f / gbit_k
        );
        println!(
            "{:<10} {:<26} {:>10} {:>12.0}",
            "",
            "(iptables-restore, ms)",
            "",
            restore.as_secs_f64() * 1000.0
        );
    }
    println!("\ntarget: ferrite >= kube-proxy (ratio >= 1.00)");
    Ok(())
}
