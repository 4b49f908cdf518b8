//! kube-proxy's rules for a set of Service ports, as its iptables and nftables modes
//! write them (`pkg/proxy/iptables/proxier.go`, `pkg/proxy/nftables/proxier.go`):
//! what the benchmark loads next to Ferrite, and what the take-over tests load on a
//! node before Ferrite replaces kube-proxy there.
use std::{
    fmt::Write,
    net::{Ipv4Addr, SocketAddrV4},
};

/// A KUBE-SVC chain's endpoints as kube-proxy writes them: one KUBE-SEP chain each
/// (`KUBE-SEP-<id><index, index_width digits>`), picked with statistic probabilities
/// 1/n, 1/(n-1), ... so each is equally likely, and a DNAT in each (`proto`: `tcp`,
/// `udp`).
pub fn endpoint_chains(
    svc: &str,
    id: &str,
    index_width: usize,
    proto: &str,
    endpoints: &[SocketAddrV4],
    chains: &mut String,
    rules: &mut String,
) {
    for (e, endpoint) in endpoints.iter().enumerate() {
        let sep = format!("KUBE-SEP-{id}{e:0index_width$}");
        chains.push_str(&format!(":{sep} - [0:0]\n"));
        let remaining = endpoints.len() - e;
        if remaining > 1 {
            rules.push_str(&format!(
                "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}\n",
                1.0 / remaining as f64
            ));
        } else {
            rules.push_str(&format!("-A {svc} -j {sep}\n"));
        }
        rules.push_str(&format!(
            "-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {endpoint}\n"
        ));
    }
}

/// [`endpoint_chains`] of a TCP Service port.
pub fn kube_proxy_endpoints(
    svc: &str,
    id: &str,
    index_width: usize,
    endpoints: &[SocketAddrV4],
    chains: &mut String,
    rules: &mut String,
) {
    endpoint_chains(svc, id, index_width, "tcp", endpoints, chains, rules);
}

/// One Service port as kube-proxy serves it.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// `tcp` or `udp`.
    pub proto: &'static str,
    pub node_port: Option<u16>,
    pub endpoints: Vec<SocketAddrV4>,
}

/// kube-proxy's iptables mode for `ports` (`cluster_cidr`: its `--cluster-cidr`), as
/// one `iptables-restore` input: nat (KUBE-SERVICES, KUBE-NODEPORTS, KUBE-SVC-*,
/// KUBE-EXT-*, KUBE-SEP-*, KUBE-MARK-MASQ, KUBE-POSTROUTING), filter (KUBE-FORWARD,
/// KUBE-PROXY-FIREWALL, KUBE-EXTERNAL-SERVICES, KUBE-NODEPORTS, KUBE-SERVICES, the
/// canary) and mangle (the canary), with the jumps from the built-in chains.
pub fn iptables(ports: &[ServicePort], cluster_cidr: &str) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for (index, port) in ports.iter().enumerate() {
        let id = format!("{index:016}");
        let (svc, ext) = (format!("KUBE-SVC-{id}"), format!("KUBE-EXT-{id}"));
        let (proto, vip, p) = (port.proto, port.cluster_ip, port.port);
        chains.push_str(&format!(":{svc} - [0:0]\n"));
        let _ = write!(
            rules,
            "-A KUBE-SERVICES -d {vip}/32 -p {proto} -m {proto} --dport {p} -j {svc}\n\
             -A {svc} ! -s {cluster_cidr} -d {vip}/32 -p {proto} -m {proto} --dport {p} -j KUBE-MARK-MASQ\n"
        );
        if let Some(node_port) = port.node_port {
            chains.push_str(&format!(":{ext} - [0:0]\n"));
            let _ = write!(
                rules,
                "-A KUBE-NODEPORTS -p {proto} -m {proto} --dport {node_port} -j {ext}\n\
                 -A {ext} -j KUBE-MARK-MASQ\n-A {ext} -j {svc}\n"
            );
        }
        let mut endpoint_rules = String::new();
        endpoint_chains(
            &svc,
            &id,
            2,
            proto,
            &port.endpoints,
            &mut chains,
            &mut endpoint_rules,
        );
        // Hairpin: an endpoint reaching itself through the Service is masqueraded.
        for (e, endpoint) in port.endpoints.iter().enumerate() {
            let _ = writeln!(
                rules,
                "-A KUBE-SEP-{id}{e:02} -s {}/32 -j KUBE-MARK-MASQ",
                endpoint.ip()
            );
        }
        rules.push_str(&endpoint_rules);
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    format!(
        "{chains}{rules}COMMIT\n\
         *filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
         :KUBE-PROXY-CANARY - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n:KUBE-SERVICES - [0:0]\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n\
         *mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n"
    )
}

/// kube-proxy's nftables mode for `ports`, as one `nft -f` input: `table ip
/// kube-proxy` with the service-ips and service-nodeports verdict maps, a chain per
/// Service port picking an endpoint chain with `numgen random`, a DNAT per endpoint,
/// and masquerading of marked traffic.
pub fn nftables(ports: &[ServicePort], cluster_cidr: &str) -> String {
    let mut ips = Vec::new();
    let mut node_ports = Vec::new();
    let mut chains = String::new();
    for (index, port) in ports.iter().enumerate() {
        let (proto, vip, p) = (port.proto, port.cluster_ip, port.port);
        let svc = format!("service-{index}-default/svc/{proto}/{p}");
        ips.push(format!("{vip} . {proto} . {p} : goto {svc}"));
        let picks: Vec<String> = (0..port.endpoints.len())
            .map(|e| format!("{e} : goto endpoint-{index}-{e}"))
            .collect();
        let _ = writeln!(
            chains,
            "  chain {svc} {{\n    ip daddr {vip} {proto} dport {p} ip saddr != {cluster_cidr} jump mark-for-masquerade\n    numgen random mod {} vmap {{ {} }}\n  }}",
            port.endpoints.len(),
            picks.join(", ")
        );
        if let Some(node_port) = port.node_port {
            let ext = format!("external-{index}-default/svc/{proto}/{p}");
            node_ports.push(format!("{proto} . {node_port} : goto {ext}"));
            let _ = writeln!(
                chains,
                "  chain {ext} {{\n    jump mark-for-masquerade\n    goto {svc}\n  }}"
            );
        }
        for (e, endpoint) in port.endpoints.iter().enumerate() {
            let _ = writeln!(
                chains,
                "  chain endpoint-{index}-{e} {{\n    ip saddr {} jump mark-for-masquerade\n    meta l4proto {proto} dnat to {endpoint}\n  }}",
                endpoint.ip()
            );
        }
    }
    let elements = |items: &[String]| {
        if items.is_empty() {
            String::new()
        } else {
            format!("    elements = {{ {} }}\n", items.join(", "))
        }
    };
    format!(
        "table ip kube-proxy {{
  map service-ips {{
    type ipv4_addr . inet_proto . inet_service : verdict
{}  }}
  map service-nodeports {{
    type inet_proto . inet_service : verdict
{}  }}
  chain mark-for-masquerade {{
    meta mark set meta mark | 0x4000
  }}
  chain masquerading {{
    meta mark & 0x4000 == 0 return
    meta mark set meta mark ^ 0x4000
    masquerade fully-random
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @service-ips
    fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
  }}
  chain nat-prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }}
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    jump services
  }}
  chain nat-postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    jump masquerading
  }}
  chain filter-forward {{
    type filter hook forward priority -110; policy accept;
    ct state new jump firewall-check
  }}
  chain firewall-check {{
  }}
{chains}}}
",
        elements(&ips),
        elements(&node_ports)
    )
}
