//! From explain runs' traces to what `ferrite explain` prints: a table by default,
//! JSON (`-o json`) for scripts.
use std::{
    fmt::Write,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use anyhow::Result;
use ferrite_common::{
    explain::{choice, step, verdict, write},
    stat, svc_flag, CtKey, ExplainTrace, CT_FLAG_CLOSING, CT_FLAG_EXTERNAL, CT_FLAG_REPLY,
    CT_FLAG_SNAT, CT_FLAG_UNESTABLISHED, CT_FLAG_VIA_STACK, PROTO_TCP,
};
use serde::Serialize;

use super::{frame, run::Traced, FrameSummary, NodeView, Request};
use crate::model::policy::PolicyNames;

pub const XDP_PASS: u32 = 2;

/// The whole explanation: the packet, each program it went through, and the outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub node: String,
    /// `pod`, `overlay`, `world` or `socket`.
    pub ingress: String,
    pub source: String,
    pub destination: String,
    pub protocol: String,
    /// What finally happens to it (the last program's verdict).
    pub verdict: Verdict,
    /// The backend it goes to: chosen for a new flow, or the one its conntrack entry
    /// pins an established flow to.
    pub backend: Option<ChosenBackend>,
    pub runs: Vec<ProgramRun>,
}

/// One program's run.
#[derive(Clone, Debug, Serialize)]
pub struct ProgramRun {
    /// The program whose logic ran (the node's program at that hook).
    pub program: String,
    /// Its explain copy, which ran it (loaded with it, never attached).
    pub run_as: String,
    /// Where it runs: the hook and device.
    pub hook: String,
    pub anti_spoofing: Option<String>,
    pub conntrack: Option<String>,
    pub frontend: Option<Frontend>,
    pub backend: Option<ChosenBackend>,
    /// The source the new flow is SNATed to (`address:port`).
    pub snat: Option<String>,
    /// Where an established flow's destination came from.
    pub route: Option<String>,
    /// NetworkPolicy: the rule that allows the flow at each isolated end, or none,
    /// and the policies behind it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The same, per isolated end, with the policies (`namespace/name`) named.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<super::policy::PolicyEnd>,
    pub verdict: Verdict,
    /// The frame as the program left it (none for a dropped packet or a socket call).
    pub output: Option<FrameSummary>,
    /// The counters (`ferrite inspect stats` names) a real packet would bump.
    pub counted: Vec<&'static str>,
    /// The writes a real packet would make, skipped.
    pub writes_skipped: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_hex: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Frontend {
    /// `address:port/protocol`.
    pub address: String,
    pub rev_nat_index: u32,
    /// Backend slots (0: no ready backend).
    pub backends: u16,
    /// `external`, `traffic-policy-local`, `nodeport`, `source-ranges`.
    pub flags: Vec<&'static str>,
    pub affinity_timeout_s: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChosenBackend {
    /// `address:port`.
    pub address: String,
    pub id: u32,
    /// Why this one: the affinity pin, the Maglev or hash slot, or conntrack.
    pub why: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// `pass`, `drop`, `to_pod`, `redirect`, `redirect_neigh`, `bounce`, `to_host`
    /// (socket calls: `translated`, `untouched`, `refused`).
    pub action: &'static str,
    /// With `drop`/`refused`: the counter it is counted under (`stat::NAMES`).
    pub drop_reason: Option<&'static str>,
    /// The device it leaves through or is delivered behind.
    pub device: Option<String>,
    pub ifindex: Option<u32>,
    /// Sent over the overlay: the node it goes to.
    pub node: Option<Ipv4Addr>,
    pub description: String,
}

fn protocol_name(protocol: u8) -> &'static str {
    if protocol == PROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

impl Explanation {
    pub fn new(node: &str, request: &Request, ingress: &str, runs: Vec<ProgramRun>) -> Self {
        let verdict = runs
            .last()
            .map(|r| r.verdict.clone())
            .expect("every explanation runs a program");
        let backend = runs.iter().find_map(|r| r.backend.clone());
        Self {
            node: node.into(),
            ingress: ingress.into(),
            source: request.source.to_string(),
            destination: request.destination.to_string(),
            protocol: protocol_name(request.protocol).into(),
            verdict,
            backend,
            runs,
        }
    }
}

fn counted(trace: &ExplainTrace) -> Vec<&'static str> {
    (0..stat::COUNT)
        .filter(|i| trace.counted & (1u64 << i) != 0)
        .map(|i| stat::NAMES[i as usize])
        .collect()
}

const WRITE_NAMES: [(u32, &str); 10] = [
    (write::CT_ACCOUNTING, "conntrack accounting"),
    (write::CT_CACHE, "conntrack route/source cache"),
    (write::CT_CREATE, "new conntrack entries"),
    (write::CT_REOPEN, "removal of a closing flow's entries"),
    (write::AFFINITY, "session-affinity pin"),
    (write::FRAGMENT, "fragment ports"),
    (write::LB_STATS, "Service/backend counter"),
    (write::DROP_LOG, "drop log line and monitor event"),
    (write::MONITOR_EVENT, "monitor event"),
    (
        write::SNAT_RECLAIM,
        "takeover of a half-open flow's SNAT port",
    ),
];

fn writes_skipped(trace: &ExplainTrace) -> Vec<&'static str> {
    WRITE_NAMES
        .iter()
        .filter(|(bit, _)| trace.skipped & bit != 0)
        .map(|(_, name)| *name)
        .collect()
}

fn frontend(trace: &ExplainTrace) -> Option<Frontend> {
    if trace.steps & step::FRONTEND == 0 {
        return None;
    }
    let key = trace.frontend;
    let svc = trace.service;
    let flags = [
        (svc_flag::EXTERNAL, "external"),
        (svc_flag::LOCAL_ONLY, "traffic-policy-local"),
        (svc_flag::NODE_PORT, "nodeport"),
        (svc_flag::SOURCE_RANGES, "source-ranges"),
        (svc_flag::IN_CLUSTER_SCOPE, "in-cluster-scope"),
    ]
    .iter()
    .filter(|(bit, _)| svc.flags & bit != 0)
    .map(|(_, name)| *name)
    .collect();
    Some(Frontend {
        address: format!(
            "{}:{}/{}",
            Ipv4Addr::from(key.address),
            key.port,
            protocol_name(key.proto)
        ),
        rev_nat_index: svc.rev_nat_index,
        backends: svc.count,
        flags,
        affinity_timeout_s: svc.affinity_timeout_s,
    })
}

/// Why the backend was chosen; `hashed_over`: what the hash covers.
fn chosen(trace: &ExplainTrace, hashed_over: &str) -> Option<ChosenBackend> {
    if trace.steps & step::BACKEND_CHOSEN == 0 {
        return None;
    }
    let count = trace.service.count;
    let mut why = match trace.choice {
        choice::AFFINITY => format!(
            "session-affinity pin of this client (timeout {} s)",
            trace.service.affinity_timeout_s
        ),
        choice::MAGLEV => format!(
            "Maglev table entry of {hashed_over} -> slot {} of {count}",
            trace.backend_slot
        ),
        _ => format!("{hashed_over} -> slot {} of {count}", trace.backend_slot),
    };
    if trace.service.flags & svc_flag::LOCAL_ONLY != 0 {
        why.push_str("; traffic policy Local: every slot is an endpoint on this node");
    }
    if trace.frontend.scope == ferrite_common::service_scope::IN_CLUSTER {
        why.push_str("; an in-cluster client of a traffic-policy-Local frontend: any endpoint");
    }
    if trace.service.affinity_timeout_s != 0 && trace.choice != choice::AFFINITY {
        why.push_str("; no live affinity pin: this flow would pin the client to it");
    }
    Some(ChosenBackend {
        address: format!(
            "{}:{}",
            Ipv4Addr::from(trace.backend.address),
            trace.backend.port
        ),
        id: trace.backend_id,
        why,
    })
}

fn conntrack(trace: &ExplainTrace) -> Option<String> {
    if trace.steps & step::CT_HIT != 0 {
        let flags = trace.ct_flags;
        let mut text = if flags & CT_FLAG_VIA_STACK != 0 {
            "hit: a flow the node's stack forwarded to this pod (e.g. a hostPort): \
             its answers go back through the stack, which translates them"
                .to_string()
        } else if flags & CT_FLAG_REPLY != 0 {
            "hit: the reply entry of a translated flow (reverse NAT)".to_string()
        } else {
            "hit: the forward entry of an established flow".to_string()
        };
        for (bit, name) in [
            (CT_FLAG_EXTERNAL, "external"),
            (CT_FLAG_SNAT, "SNATed"),
            (CT_FLAG_CLOSING, "closing"),
            (CT_FLAG_UNESTABLISHED, "handshake not completed"),
        ] {
            if flags & bit != 0 {
                write!(text, ", {name}").expect("writing to a String");
            }
        }
        return Some(text);
    }
    (trace.steps & step::CT_MISS != 0).then(|| "miss: a new flow".to_string())
}

/// The backend an established flow's forward entry pins it to (live map; IPv4
/// only: IPv6 flows have no conntrack).
fn conntrack_backend(context: &NodeView, request: &Request) -> Option<ChosenBackend> {
    let (SocketAddr::V4(source), SocketAddr::V4(destination)) =
        (request.source, request.destination)
    else {
        return None;
    };
    let key = CtKey {
        saddr: source.ip().octets(),
        daddr: destination.ip().octets(),
        sport: source.port(),
        dport: destination.port(),
        proto: request.protocol,
        _pad: 0,
        _pad2: 0,
    };
    let entry = context.maps.conntrack.get(&key, 0).ok()?;
    if entry.flags & CT_FLAG_REPLY != 0 || entry.rev_nat_index == 0 {
        return None;
    }
    Some(ChosenBackend {
        address: format!(
            "{}:{}",
            Ipv4Addr::from(entry.backend_address),
            entry.backend_port
        ),
        id: entry.backend_id,
        why: "the flow's conntrack entry pins it (chosen at its first packet)".into(),
    })
}

fn verdict_of(context: &NodeView, program: &str, traced: &Traced) -> Verdict {
    let trace = &traced.trace;
    let target = trace.verdict_target;
    let device = (target != 0).then(|| context.device_name(target));
    let destination = frame::destination(&traced.frame);
    let mut out = Verdict {
        action: "pass",
        drop_reason: None,
        device: device.clone(),
        ifindex: (target != 0).then_some(target),
        node: None,
        description: String::new(),
    };
    let device = device.unwrap_or_default();
    match trace.verdict {
        verdict::PASS if program == ferrite_common::program_names::FROM_WORLD => {
            out.description = "passed on to the uplink's tcx program".into();
        }
        verdict::PASS => out.description = "handed to the node's network stack".into(),
        verdict::DROP => {
            let reason = stat::NAMES
                .get(trace.drop_reason as usize)
                .copied()
                .unwrap_or("drop_internal");
            out.action = "drop";
            out.drop_reason = Some(reason);
            out.description = match trace.drop_reason {
                stat::DROP_POLICY_INGRESS => format!(
                    "dropped ({reason}): the receiving pod is isolated for ingress and none of \
                     its NetworkPolicies allows this peer, protocol and port \
                     (its policy line names the policies)"
                ),
                stat::DROP_POLICY_EGRESS => format!(
                    "dropped ({reason}): the sending pod is isolated for egress and none of \
                     its NetworkPolicies allows this peer, protocol and port \
                     (its policy line names the policies)"
                ),
                _ => format!("dropped ({reason})"),
            };
        }
        verdict::TO_POD => {
            out.action = "to_pod";
            let pod = destination.map(|d| d.to_string()).unwrap_or_default();
            out.description =
                format!("delivered into the pod {pod} behind {device} (ifindex {target})");
        }
        verdict::REDIRECT if target == context.config.vxlan_ifindex && target != 0 => {
            out.action = "redirect";
            out.node = destination
                .and_then(|d| context.route(d))
                .map(|r| Ipv4Addr::from(r.node_ip));
            out.description = match out.node {
                Some(node) => format!("sent over the overlay ({device}) to node {node}"),
                None => format!("sent over the overlay ({device})"),
            };
        }
        verdict::REDIRECT => {
            out.action = "redirect";
            out.description = format!("sent out of {device} (ifindex {target})");
        }
        verdict::REDIRECT_NEIGH => {
            out.action = "redirect_neigh";
            out.description = format!(
                "sent out of {device} (ifindex {target}), the kernel resolving the next hop"
            );
        }
        verdict::BOUNCE => {
            out.action = "bounce";
            out.description = "answered in place, sent back where it came from".into();
        }
        verdict::TO_HOST => {
            out.action = "to_host";
            out.description = "handed to the node's own processes (through lo)".into();
        }
        other => {
            out.action = "unknown";
            out.description = format!("no verdict recorded ({other})");
        }
    }
    out
}

fn anti_spoofing(program: &str, request: &Request, trace: &ExplainTrace) -> Option<String> {
    use ferrite_common::program_names::{FROM_OVERLAY, FROM_POD};
    let source = request.source.ip();
    let whose = match program {
        FROM_POD => "the pod behind this veth",
        FROM_OVERLAY => "in the pod CIDR of the node the tunnel comes from",
        _ => return None,
    };
    if trace.steps & step::SOURCE_CHECKED != 0 {
        Some(format!("passed: {source} is {whose}"))
    } else if trace.steps & step::SOURCE_CACHED != 0 {
        Some("passed: this flow's source was verified before (its conntrack entry)".into())
    } else if trace.verdict == verdict::DROP && trace.drop_reason == stat::DROP_SPOOFED {
        Some(format!("failed: {source} is not {whose}"))
    } else {
        None
    }
}

/// One packet program's run, explained.
pub fn packet_run(
    context: &NodeView,
    names: &dyn PolicyNames,
    request: &Request,
    program: &str,
    hook: String,
    traced: &Traced,
) -> Result<ProgramRun> {
    let trace = &traced.trace;
    let verdict = verdict_of(context, program, traced);
    let output = (verdict.action != "drop")
        .then(|| frame::summarize(&traced.frame))
        .transpose()?;
    let established = trace.steps & step::CT_HIT != 0 && trace.ct_flags & CT_FLAG_REPLY == 0;
    let backend = chosen(trace, "the flow hash").or_else(|| {
        established
            .then(|| conntrack_backend(context, request))
            .flatten()
    });
    let route = (trace.steps & step::CT_HIT != 0
        && matches!(verdict.action, "to_pod" | "redirect"))
    .then(|| {
        if trace.steps & step::ROUTE_RESOLVED != 0 {
            "resolved from the endpoint and route maps (the entry's cache is stale)".into()
        } else {
            "cached in the flow's conntrack entry".into()
        }
    });
    let snat = (trace.steps & step::SNAT != 0)
        .then(|| format!("{}:{}", Ipv4Addr::from(trace.snat_address), trace.snat_port));
    let (policy, policies) = policy_of_flow(context, names, request, backend.as_ref());
    Ok(ProgramRun {
        program: program.into(),
        run_as: super::run::explain_copy(program)?.into(),
        hook,
        anti_spoofing: anti_spoofing(program, request, trace),
        conntrack: conntrack(trace),
        frontend: frontend(trace),
        backend,
        snat,
        route,
        policy,
        policies: policies.unwrap_or_default(),
        verdict,
        output,
        counted: counted(trace),
        writes_skipped: writes_skipped(trace),
        frame_hex: request.hex.then(|| frame::hex(&traced.frame)),
    })
}

/// What NetworkPolicy says of the flow `request` makes, as the pods see it: to the
/// chosen backend, if any, else to the destination asked for.
fn policy_of_flow(
    context: &NodeView,
    names: &dyn PolicyNames,
    request: &Request,
    backend: Option<&ChosenBackend>,
) -> (Option<String>, Option<Vec<super::policy::PolicyEnd>>) {
    let (SocketAddr::V4(source), SocketAddr::V4(destination)) =
        (request.source, request.destination)
    else {
        return (super::policy::describe6(context, request), None);
    };
    let translated_to = backend
        .and_then(|b| b.address.parse::<SocketAddrV4>().ok())
        .unwrap_or(destination);
    super::policy::describe(context, names, source, translated_to, request.protocol).unzip()
}

/// The socket-level selection's run, explained; with what NetworkPolicy says of
/// the flow the socket's packets then make (to the backend chosen).
pub fn socket_run(
    context: &NodeView,
    names: &dyn PolicyNames,
    request: &Request,
    traced: &Traced,
) -> Result<ProgramRun> {
    let trace = &traced.trace;
    let call = if request.protocol == PROTO_TCP {
        "connect() of a TCP socket (cgroup/connect4)"
    } else {
        "sendmsg() of an unconnected UDP socket (cgroup/sendmsg4)"
    };
    let frontend = frontend(trace);
    let hashed_over = format!(
        "the socket's cookie (this run: {}; another socket may get another slot)",
        request.cookie
    );
    let backend = chosen(trace, &hashed_over);
    let (policy, policies) = policy_of_flow(context, names, request, backend.as_ref());
    let verdict = match (&frontend, &backend) {
        (None, _) => Verdict {
            action: "untouched",
            drop_reason: None,
            device: None,
            ifindex: None,
            node: None,
            description: "not a Service frontend: the call goes on as made".into(),
        },
        (Some(_), Some(backend)) => Verdict {
            action: "translated",
            drop_reason: None,
            device: None,
            ifindex: None,
            node: None,
            description: format!("the socket is rewritten to {}", backend.address),
        },
        (Some(_), None) => Verdict {
            action: "refused",
            drop_reason: Some(stat::NAMES[stat::SOCK_REFUSED as usize]),
            device: None,
            ifindex: None,
            node: None,
            description: "no ready backend: the call fails with ECONNREFUSED".into(),
        },
    };
    Ok(ProgramRun {
        program: format!(
            "{} (its socket-level choice)",
            if request.protocol == PROTO_TCP {
                ferrite_common::program_names::SOCK_CONNECT4
            } else {
                ferrite_common::program_names::SOCK_SENDMSG4
            }
        ),
        run_as: ferrite_common::program_names::EXPLAIN_SOCK.into(),
        hook: call.into(),
        anti_spoofing: None,
        conntrack: None,
        frontend,
        backend,
        snat: None,
        route: None,
        policy,
        policies: policies.unwrap_or_default(),
        verdict,
        output: None,
        counted: counted(trace),
        writes_skipped: writes_skipped(trace),
        frame_hex: None,
    })
}

/// The explanation as a readable table.
pub fn render_table(explanation: &Explanation) -> String {
    let mut out = String::new();
    let line = |out: &mut String, label: &str, value: &str| {
        writeln!(out, "    {label:<15} {value}").expect("writing to a String");
    };
    writeln!(
        out,
        "node {}: {} -> {}/{} from the {} side",
        explanation.node,
        explanation.source,
        explanation.destination,
        explanation.protocol,
        explanation.ingress
    )
    .expect("writing to a String");
    for (i, run) in explanation.runs.iter().enumerate() {
        writeln!(
            out,
            "[{}] {} at {} (run as {})",
            i + 1,
            run.program,
            run.hook,
            run.run_as
        )
        .expect("writing");
        if let Some(text) = &run.anti_spoofing {
            line(&mut out, "anti-spoofing", text);
        }
        if let Some(text) = &run.conntrack {
            line(&mut out, "conntrack", text);
        }
        if let Some(text) = &run.policy {
            line(&mut out, "policy", text);
        }
        if let Some(f) = &run.frontend {
            let mut text = format!(
                "{} (rev-NAT {}, {} backends",
                f.address, f.rev_nat_index, f.backends
            );
            if !f.flags.is_empty() {
                write!(text, ", {}", f.flags.join(", ")).expect("writing");
            }
            text.push(')');
            line(&mut out, "frontend", &text);
        }
        if let Some(b) = &run.backend {
            line(
                &mut out,
                "backend",
                &format!("{} (id {}): {}", b.address, b.id, b.why),
            );
        }
        if let Some(snat) = &run.snat {
            line(&mut out, "snat", &format!("source -> {snat}"));
        }
        if let Some(route) = &run.route {
            line(&mut out, "route", route);
        }
        if let Some(o) = &run.output {
            let mut text = format!("{} -> {} {}", o.source, o.destination, o.protocol);
            if let Some(icmp) = &o.icmp {
                write!(text, " {icmp}").expect("writing");
            }
            let valid = if o.checksums_valid {
                "checksums valid"
            } else {
                "CHECKSUMS INVALID"
            };
            write!(
                text,
                ", {valid}, MACs {} -> {}",
                o.eth_source, o.eth_destination
            )
            .expect("writing");
            line(&mut out, "packet out", &text);
        }
        line(
            &mut out,
            "verdict",
            &format!("{}: {}", run.verdict.action, run.verdict.description),
        );
        if !run.counted.is_empty() {
            line(&mut out, "counted", &run.counted.join(", "));
        }
        if !run.writes_skipped.is_empty() {
            line(&mut out, "writes skipped", &run.writes_skipped.join(", "));
        }
        if let Some(hex) = &run.frame_hex {
            line(&mut out, "frame out", "");
            for hex_line in hex.lines() {
                writeln!(out, "      {hex_line}").expect("writing");
            }
        }
    }
    writeln!(
        out,
        "=> {}: {}",
        explanation.verdict.action, explanation.verdict.description
    )
    .expect("writing");
    out
}
