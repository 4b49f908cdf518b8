//! Taking a node over from kube-proxy (`ferrite agent --take-over-from-kube-proxy`).
//!
//! Two steps of the agent's first sync, in this order:
//!
//! 1. **Seed `ferrite_ct` from the kernel's conntrack table** (ctnetlink dump), once
//!    the sync is planned and before its programs are attached and frontends
//!    written (`agent::reconcile`), so no packet meets Ferrite without its flow: every
//!    flow netfilter translated whose original destination is a frontend Ferrite now
//!    serves gets the forward and reply entries the datapath's `create` (or, when
//!    netfilter also masqueraded it, `create_snat`) would have written, pinned to the
//!    backend netfilter chose. Once Ferrite's programs see the flow's packets first
//!    (they run before netfilter), they keep sending them where kube-proxy did.
//! 2. **Remove kube-proxy's rules**, once the sync has written every frontend: the `KUBE-*` chains of kube-proxy's iptables mode
//!    and the jumps to them, in the nat, filter and mangle tables of every iptables
//!    backend present (nf_tables and legacy, IPv4 and IPv6), and the `ip`/`ip6 kube-proxy` tables of
//!    its nftables mode. IPVS mode is not taken over (see [`ipvs_left`]).
//!
//! What kube-proxy's `--cleanup` does, without a moment where nothing serves: the
//! rules go only after Ferrite serves every Service and holds every open flow.
use std::{collections::BTreeMap, net::Ipv4Addr, process::Command};

use anyhow::{bail, Context, Result};
use ferrite_common::{
    svc_flag, Backend, CtKey, CtValue, ServiceKey, ServiceValue, CT_FLAG_CLOSING, CT_FLAG_EXTERNAL,
    CT_FLAG_REPLY, CT_FLAG_SNAT, CT_FLAG_UNESTABLISHED, PROTO_TCP, PROTO_UDP,
};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::{
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
        Protocol, Tuple,
    },
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::command::run_with_input;

/// One direction of a kernel conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Direction {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

/// An IPv4 TCP or UDP flow of the kernel's conntrack table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFlow {
    pub proto: u8,
    /// As the client sent it (to the Service frontend).
    pub original: Direction,
    /// As the backend answers (after netfilter's DNAT, and SNAT if any).
    pub reply: Direction,
    /// `TCP_CONNTRACK_*` of a TCP flow (0 for UDP).
    pub tcp_state: u8,
}

/// `TCP_CONNTRACK_*` (include/uapi/linux/netfilter/nf_conntrack_tcp.h).
const TCP_ESTABLISHED: u8 = 3;
const TCP_TIME_WAIT: u8 = 7;
const TCP_CLOSE: u8 = 8;

/// Every IPv4 TCP and UDP flow of the kernel's conntrack table (of the calling
/// thread's network namespace), dumped over ctnetlink.
pub fn kernel_flows() -> Result<Vec<KernelFlow>> {
    let mut socket = Socket::new(NETLINK_NETFILTER).context("opening a netfilter socket")?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            ConntrackMessage::Get(vec![]),
        )),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .context("asking for the conntrack table")?;
    let mut flows = Vec::new();
    let mut receive = vec![0u8; 1 << 16];
    loop {
        let size = socket
            .recv(&mut &mut receive[..], 0)
            .context("reading the conntrack table")?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<NetfilterMessage>::deserialize(&receive[offset..size])
                .context("parsing a conntrack message")?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(flows),
                NetlinkPayload::Error(e) => bail!("dumping the conntrack table: {e:?}"),
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
                    ..
                }) => flows.extend(flow_of(&attributes)),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

fn flow_of(attributes: &[ConntrackAttribute]) -> Option<KernelFlow> {
    let mut original = None;
    let mut reply = None;
    let mut tcp_state = 0;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(tuple) => original = direction(tuple),
            ConntrackAttribute::CtaTupleReply(tuple) => reply = direction(tuple),
            ConntrackAttribute::CtaProtoInfo(infos) => {
                for info in infos {
                    if let ProtoInfo::TCP(tcp) = info {
                        for field in tcp {
                            if let ProtoInfoTCP::State(state) = field {
                                tcp_state = *state;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let ((proto, original), (_, reply)) = (original?, reply?);
    Some(KernelFlow {
        proto,
        original,
        reply,
        tcp_state,
    })
}

fn direction(tuple: &[Tuple]) -> Option<(u8, Direction)> {
    let mut d = Direction {
        src: Ipv4Addr::UNSPECIFIED,
        dst: Ipv4Addr::UNSPECIFIED,
        sport: 0,
        dport: 0,
    };
    let mut proto = None;
    for part in tuple {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(std::net::IpAddr::V4(a)) => d.src = *a,
                        IPTuple::DestinationAddress(std::net::IpAddr::V4(a)) => d.dst = *a,
                        _ => {}
                    }
                }
            }
            Tuple::Proto(fields) => {
                for field in fields {
                    match field {
                        ProtoTuple::Protocol(Protocol::Tcp) => proto = Some(PROTO_TCP),
                        ProtoTuple::Protocol(Protocol::Udp) => proto = Some(PROTO_UDP),
                        ProtoTuple::SourcePort(p) => d.sport = *p,
                        ProtoTuple::DestinationPort(p) => d.dport = *p,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((proto?, d))
}

fn ct_key(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey {
        saddr: src.octets(),
        daddr: dst.octets(),
        sport,
        dport,
        proto,
        _pad: 0,
        _pad2: 0,
    }
}

/// The two `ferrite_ct` entries (reply first, then forward) the datapath would have
/// written had it balanced `flow` to the backend netfilter chose, at `now` (jiffies).
/// `None` for a flow Ferrite does not serve: not translated by netfilter, its
/// original destination no frontend of `services`, its backend none of `backends`,
/// or a TCP flow already finished (TIME_WAIT, CLOSE). `external_client`: whether a
/// client address is outside the cluster (the flow entered through the uplink, as
/// `external::balance` records it: `CT_FLAG_EXTERNAL`).
pub fn seed_entries(
    flow: &KernelFlow,
    services: &BTreeMap<ServiceKey, ServiceValue>,
    backends_by_address: &BackendIds,
    external_client: impl Fn(Ipv4Addr) -> bool,
    now: u64,
) -> Option<[(CtKey, CtValue); 2]> {
    let (o, r) = (flow.original, flow.reply);
    let translated = (r.src, r.sport) != (o.dst, o.dport);
    if !translated || matches!(flow.tcp_state, TCP_TIME_WAIT | TCP_CLOSE) {
        return None;
    }
    let master = services.get(&ServiceKey::new(o.dst, o.dport, flow.proto, 0))?;
    let backend_id = *backends_by_address.get(&(r.src.octets(), r.sport, flow.proto))?;
    let mut flags = 0;
    if master.flags & svc_flag::EXTERNAL != 0 && external_client(o.src) {
        flags |= CT_FLAG_EXTERNAL;
    }
    if flow.proto == PROTO_TCP {
        match flow.tcp_state {
            TCP_ESTABLISHED => {}
            state if state < TCP_ESTABLISHED => flags |= CT_FLAG_UNESTABLISHED,
            _ => flags |= CT_FLAG_CLOSING,
        }
    }
    // Masqueraded too: the backend answers to r.dst:r.dport (create_snat's layout).
    let snat = (r.dst, r.dport) != (o.src, o.sport);
    if snat {
        flags |= CT_FLAG_SNAT;
    }
    let value = |flags: u16, nat: (Ipv4Addr, u16)| CtValue {
        backend_id,
        rev_nat_index: master.rev_nat_index,
        flags,
        backend_address: r.src.octets(),
        backend_port: r.sport,
        nat_port: nat.1,
        nat_address: nat.0.octets(),
        created_jiffies: now,
        last_seen_jiffies: now,
        ..CtValue::default()
    };
    let (reply_nat, forward_nat) = if snat {
        ((o.src, o.sport), (r.dst, r.dport))
    } else {
        ((Ipv4Addr::UNSPECIFIED, 0), (Ipv4Addr::UNSPECIFIED, 0))
    };
    Some([
        (
            ct_key(r.src, r.dst, r.sport, r.dport, flow.proto),
            value(flags | CT_FLAG_REPLY, reply_nat),
        ),
        (
            ct_key(o.src, o.dst, o.sport, o.dport, flow.proto),
            value(flags, forward_nat),
        ),
    ])
}

/// Backend ids by (address, port, protocol).
pub type BackendIds = BTreeMap<([u8; 4], u16, u8), u32>;

/// Backend ids by (address, port, protocol), from `ferrite_backend`.
pub fn backends_by_address(backends: &BTreeMap<u32, Backend>) -> BackendIds {
    backends
        .iter()
        .map(|(id, b)| ((b.address, b.port, b.proto), *id))
        .collect()
}

/// An iptables backend: its `-save` and `-restore` commands.
struct Iptables {
    name: &'static str,
    save: &'static str,
    restore: &'static str,
}

const IPTABLES: [Iptables; 4] = [
    Iptables {
        name: "iptables-nft",
        save: "iptables-nft-save",
        restore: "iptables-nft-restore",
    },
    Iptables {
        name: "iptables-legacy",
        save: "iptables-legacy-save",
        restore: "iptables-legacy-restore",
    },
    Iptables {
        name: "ip6tables-nft",
        save: "ip6tables-nft-save",
        restore: "ip6tables-nft-restore",
    },
    Iptables {
        name: "ip6tables-legacy",
        save: "ip6tables-legacy-save",
        restore: "ip6tables-legacy-restore",
    },
];

/// The tables kube-proxy's iptables mode writes to.
const IPTABLES_TABLES: [&str; 3] = ["nat", "filter", "mangle"];

/// The kubelet's own `KUBE-` chains (it keeps them whatever proxy runs): left alone.
const KUBELET_CHAINS: [&str; 2] = ["KUBE-FIREWALL", "KUBE-KUBELET-CANARY"];

fn is_kube_proxy_chain(chain: &str) -> bool {
    chain.starts_with("KUBE-") && !KUBELET_CHAINS.contains(&chain)
}

/// The `iptables-restore --noflush` input that removes kube-proxy's chains from one
/// table's `iptables-save` output, and how many rules that removes (the rules of
/// its chains and the jumps to them from other chains). `None`: nothing of
/// kube-proxy's there.
pub fn iptables_removal(table: &str, saved: &str) -> Option<(String, usize)> {
    let mut chains = Vec::new();
    let mut jumps = Vec::new();
    let mut rules = 0;
    for line in saved.lines() {
        if let Some(chain) = line.strip_prefix(':') {
            let chain = chain.split_whitespace().next().unwrap_or_default();
            if is_kube_proxy_chain(chain) {
                chains.push(chain.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            if is_kube_proxy_chain(chain) {
                rules += 1;
            } else if rule
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| {
                    matches!(w[0], "-j" | "-g" | "--jump" | "--goto") && is_kube_proxy_chain(w[1])
                })
            {
                jumps.push(format!("-D {rule}"));
            }
        }
    }
    if chains.is_empty() && jumps.is_empty() {
        return None;
    }
    let mut input = format!("*{table}\n");
    for jump in &jumps {
        input.push_str(jump);
        input.push('\n');
    }
    for chain in &chains {
        input.push_str(&format!("-F {chain}\n"));
    }
    for chain in &chains {
        input.push_str(&format!("-X {chain}\n"));
    }
    input.push_str("COMMIT\n");
    Some((input, rules + jumps.len()))
}

/// What removing kube-proxy's rules did, per backend.
#[derive(Debug, Default)]
pub struct RulesRemoved {
    /// (backend and table, rules removed), e.g. `("iptables-nft nat", 42)`.
    pub removed: Vec<(String, usize)>,
    /// Backends that could not be read or written, with why.
    pub failed: Vec<String>,
    /// Tools missing here (what they would have removed stays).
    pub missing: Vec<&'static str>,
}

impl RulesRemoved {
    pub fn total(&self) -> usize {
        self.removed.iter().map(|(_, n)| n).sum()
    }
}

/// Remove kube-proxy's iptables chains (every backend present) and nftables tables.
pub fn remove_kube_proxy_rules() -> RulesRemoved {
    let mut done = RulesRemoved::default();
    for backend in &IPTABLES {
        for table in IPTABLES_TABLES {
            let saved = match Command::new(backend.save).args(["-t", table]).output() {
                // Not installed: whatever this backend holds stays.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    done.missing.push(backend.save);
                    break;
                }
                Err(e) => {
                    done.failed
                        .push(format!("{} -t {table}: {e}", backend.save));
                    continue;
                }
                // A table this backend never created: nothing in it.
                Ok(out) if !out.status.success() => continue,
                Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            };
            let Some((input, rules)) = iptables_removal(table, &saved) else {
                continue;
            };
            match run_with_input(backend.restore, &["--noflush"], &input) {
                Ok(_) => done
                    .removed
                    .push((format!("{} {table}", backend.name), rules)),
                Err(e) => done.failed.push(format!("{e:#}")),
            }
        }
    }
    for family in ["ip", "ip6"] {
        let listed = Command::new("nft")
            .args(["-j", "list", "table", family, "kube-proxy"])
            .output();
        let rules = match listed {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                done.missing.push("nft");
                break;
            }
            Err(e) => {
                done.failed.push(format!("nft: {e}"));
                continue;
            }
            // No such table.
            Ok(out) if !out.status.success() => continue,
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .matches("{\"rule\":")
                .count(),
        };
        match run_with_input(
            "nft",
            &["-f", "-"],
            &format!("delete table {family} kube-proxy\n"),
        ) {
            Ok(_) => done
                .removed
                .push((format!("nftables {family} kube-proxy"), rules)),
            Err(e) => done.failed.push(format!("{e:#}")),
        }
    }
    done
}

/// What kube-proxy's IPVS mode left on the node (its `kube-ipvs0` device, IPVS
/// virtual servers), if anything: Ferrite does not take IPVS over (no IPVS on the
/// machines it is tested on), so the agent says so and leaves it.
pub fn ipvs_left() -> Option<String> {
    let device = std::path::Path::new("/sys/class/net/kube-ipvs0").exists();
    let servers = std::fs::read_to_string("/proc/net/ip_vs")
        .map(|table| {
            table
                .lines()
                .filter(|l| l.starts_with("TCP") || l.starts_with("UDP"))
                .count()
        })
        .unwrap_or(0);
    (device || servers > 0).then(|| {
        format!(
            "kube-proxy's IPVS mode is not taken over: {}{} virtual servers left as they are",
            if device { "kube-ipvs0 and " } else { "" },
            servers
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_common::ServiceKey;

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
    const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);
    const WORLD: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

    fn served() -> (BTreeMap<ServiceKey, ServiceValue>, BackendIds) {
        let mut services = BTreeMap::new();
        services.insert(
            ServiceKey::new(VIP, 80, PROTO_TCP, 0),
            ServiceValue {
                count: 1,
                rev_nat_index: 3,
                ..Default::default()
            },
        );
        services.insert(
            ServiceKey::new(NODE, 30080, PROTO_TCP, 0),
            ServiceValue {
                count: 1,
                rev_nat_index: 4,
                flags: svc_flag::EXTERNAL | svc_flag::NODE_PORT,
                ..Default::default()
            },
        );
        let mut backends = BTreeMap::new();
        backends.insert(
            7,
            Backend {
                address: BACKEND.octets(),
                port: 8080,
                proto: PROTO_TCP,
                flags: 0,
            },
        );
        (services, backends_by_address(&backends))
    }

    fn d(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Direction {
        Direction {
            src,
            dst,
            sport,
            dport,
        }
    }

    #[test]
    fn a_pods_connection_through_a_cluster_ip_keeps_the_backend_netfilter_chose() {
        let (services, backends) = served();
        let flow = KernelFlow {
            proto: PROTO_TCP,
            original: d(POD, 40000, VIP, 80),
            reply: d(BACKEND, 8080, POD, 40000),
            tcp_state: TCP_ESTABLISHED,
        };
        let [(reply_key, reply), (forward_key, forward)] =
            seed_entries(&flow, &services, &backends, |_| false, 99).unwrap();
        assert_eq!(reply_key, ct_key(BACKEND, POD, 8080, 40000, PROTO_TCP));
        assert_eq!(reply.flags, CT_FLAG_REPLY);
        assert_eq!(forward_key, ct_key(POD, VIP, 40000, 80, PROTO_TCP));
        assert_eq!(forward.flags, 0);
        for entry in [reply, forward] {
            assert_eq!((entry.backend_id, entry.rev_nat_index), (7, 3));
            assert_eq!(
                (entry.backend_address, entry.backend_port),
                (BACKEND.octets(), 8080)
            );
            assert_eq!(entry.last_seen_jiffies, 99);
        }
    }

    #[test]
    fn a_masqueraded_node_port_flow_from_the_world_is_seeded_as_create_snat_writes_it() {
        let (services, backends) = served();
        let flow = KernelFlow {
            proto: PROTO_TCP,
            original: d(WORLD, 50000, NODE, 30080),
            reply: d(BACKEND, 8080, NODE, 50001),
            tcp_state: TCP_ESTABLISHED,
        };
        let [(reply_key, reply), (forward_key, forward)] =
            seed_entries(&flow, &services, &backends, |ip| ip == WORLD, 1).unwrap();
        assert_eq!(reply_key, ct_key(BACKEND, NODE, 8080, 50001, PROTO_TCP));
        assert_eq!(reply.flags, CT_FLAG_EXTERNAL | CT_FLAG_SNAT | CT_FLAG_REPLY);
        assert_eq!((reply.nat_address, reply.nat_port), (WORLD.octets(), 50000));
        assert_eq!(forward_key, ct_key(WORLD, NODE, 50000, 30080, PROTO_TCP));
        assert_eq!(forward.flags, CT_FLAG_EXTERNAL | CT_FLAG_SNAT);
        assert_eq!(
            (forward.nat_address, forward.nat_port),
            (NODE.octets(), 50001)
        );
        assert_eq!(forward.rev_nat_index, 4);
    }

    #[test]
    fn flows_ferrite_does_not_serve_or_that_are_over_are_left_to_the_kernel() {
        let (services, backends) = served();
        let untranslated = KernelFlow {
            proto: PROTO_TCP,
            original: d(POD, 40000, BACKEND, 8080),
            reply: d(BACKEND, 8080, POD, 40000),
            tcp_state: TCP_ESTABLISHED,
        };
        let other_frontend = KernelFlow {
            original: d(POD, 40000, Ipv4Addr::new(10, 96, 0, 11), 80),
            ..untranslated
        };
        let unknown_backend = KernelFlow {
            original: d(POD, 40000, VIP, 80),
            reply: d(Ipv4Addr::new(10, 244, 9, 9), 8080, POD, 40000),
            ..untranslated
        };
        let finished = KernelFlow {
            original: d(POD, 40000, VIP, 80),
            tcp_state: TCP_TIME_WAIT,
            ..untranslated
        };
        for flow in [untranslated, other_frontend, unknown_backend, finished] {
            assert!(
                seed_entries(&flow, &services, &backends, |_| false, 0).is_none(),
                "{flow:?}"
            );
        }
    }

    #[test]
    fn kube_proxys_chains_and_the_jumps_to_them_go_and_everything_else_stays() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
            :KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\n\
            :OTHER - [0:0]\n\
            -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
            -A PREROUTING -j OTHER\n\
            -A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-X\n\
            -A KUBE-SVC-X -j DNAT --to-destination 10.244.0.7:8080\n\
            -A OTHER -j RETURN\nCOMMIT\n";
        let (input, rules) = iptables_removal("nat", saved).unwrap();
        assert_eq!(
            input,
            "*nat\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -F KUBE-SERVICES\n-F KUBE-SVC-X\n-X KUBE-SERVICES\n-X KUBE-SVC-X\nCOMMIT\n"
        );
        assert_eq!(rules, 3);
        assert!(iptables_removal("filter", "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n").is_none());
    }
}
