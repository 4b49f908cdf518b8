//! One write, every value in it, as a line of a golden file or of an assertion.
use std::net::{Ipv4Addr, Ipv6Addr};

use ferrite_agent::{
    model,
    plan::{describe_policy_rule, Op},
};
use ferrite_common::{
    endpoint_flag,
    policy::{ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED},
    service_scope, svc_flag, EndpointInfo, NodeConfig, RouteInfo, Service6Key, ServiceKey,
    ServiceValue, ROUTE_LOCAL, ROUTE_NODE, ROUTE_REMOTE,
};

fn l4(address: [u8; 4], port: u16, proto: u8) -> String {
    let protocol = model::Protocol::from_number(proto)
        .map(|p| p.to_string())
        .unwrap_or_else(|| format!("proto{proto}"));
    format!("{}:{port}/{protocol}", Ipv4Addr::from(address))
}

/// An IPv6 frontend or backend: `[fd00::1]:80/TCP`.
fn l4_6(address: [u8; 16], port: u16, proto: u8) -> String {
    let protocol = model::Protocol::from_number(proto)
        .map(|p| p.to_string())
        .unwrap_or_else(|| format!("proto{proto}"));
    format!("[{}]:{port}/{protocol}", Ipv6Addr::from(address))
}

fn service_key(key: &ServiceKey) -> String {
    scoped(l4(key.address, key.port, key.proto), key.scope)
}

fn service6_key(key: &Service6Key) -> String {
    scoped(l4_6(key.address, key.port, key.proto), key.scope)
}

fn scoped(frontend: String, scope: u8) -> String {
    match scope {
        service_scope::ALL => frontend,
        service_scope::IN_CLUSTER => format!("{frontend} in-cluster"),
        other => format!("{frontend} scope={other}"),
    }
}

fn flag_names(flags: u32) -> String {
    let names: Vec<&str> = [
        (svc_flag::EXTERNAL, "external"),
        (svc_flag::LOCAL_ONLY, "local-only"),
        (svc_flag::NODE_PORT, "node-port"),
        (svc_flag::SOURCE_RANGES, "source-ranges"),
        (svc_flag::IN_CLUSTER_SCOPE, "in-cluster-scope"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| *name)
    .collect();
    let unknown = flags
        & !(svc_flag::EXTERNAL
            | svc_flag::LOCAL_ONLY
            | svc_flag::NODE_PORT
            | svc_flag::SOURCE_RANGES
            | svc_flag::IN_CLUSTER_SCOPE);
    let mut shown = if names.is_empty() {
        "-".to_string()
    } else {
        names.join(",")
    };
    if unknown != 0 {
        shown.push_str(&format!(",{unknown:#x}"));
    }
    shown
}

fn service_value(key: &ServiceKey, value: &ServiceValue) -> String {
    slot_value(service_key(key), key.backend_slot, value)
}

fn slot_value(key: String, backend_slot: u16, value: &ServiceValue) -> String {
    if backend_slot == 0 {
        format!(
            "{} count={} rev-nat={} flags={} affinity={}s",
            key,
            value.count,
            value.rev_nat_index,
            flag_names(value.flags),
            value.affinity_timeout_s
        )
    } else {
        format!("{key} slot {backend_slot} backend={}", value.backend_id)
    }
}

fn config(config: &NodeConfig) -> String {
    // This node's IPv6 address only when it has one (IPv4-only clusters read as before).
    let node_ip6 = Some(Ipv6Addr::from(config.node_ip6))
        .filter(|ip| !ip.is_unspecified())
        .map(|ip| format!(" node-ip6={ip}"))
        .unwrap_or_default();
    format!(
        "node-ip={}{node_ip6} overlay-ip={} vni={} vxlan-port={} vxlan-ifindex={} pod-mtu={} flags={} epoch={}",
        Ipv4Addr::from(config.node_ip),
        Ipv4Addr::from(config.overlay_ip),
        config.vni,
        config.vxlan_port,
        config.vxlan_ifindex,
        config.pod_mtu,
        config.flags,
        config.route_epoch
    )
}

fn route(info: &RouteInfo) -> String {
    let kind = match info.flags {
        ROUTE_LOCAL => "local".to_string(),
        ROUTE_REMOTE => "remote".to_string(),
        ROUTE_NODE => "node".to_string(),
        other => format!("flags={other}"),
    };
    format!("via {} {kind}", Ipv4Addr::from(info.node_ip))
}

/// An endpoint entry's value (either family's): `ifindex=10 written-by=agent
/// isolated=ingress`.
fn endpoint(info: &EndpointInfo) -> String {
    let isolated: Vec<&str> = [
        (ENDPOINT_INGRESS_ISOLATED, "ingress"),
        (ENDPOINT_EGRESS_ISOLATED, "egress"),
    ]
    .iter()
    .filter(|(bit, _)| info.flags & bit != 0)
    .map(|(_, name)| *name)
    .collect();
    format!(
        "ifindex={} written-by={}{}",
        info.ifindex,
        if info.flags & endpoint_flag::FROM_POD_OBJECT != 0 {
            "agent"
        } else {
            "cni"
        },
        if isolated.is_empty() {
            String::new()
        } else {
            format!(" isolated={}", isolated.join(","))
        }
    )
}

/// One write, every value in it: a line of a golden file.
pub fn render(op: &Op) -> String {
    match op {
        Op::PutBackend(id, b) => format!("put backend {id} {}", l4(b.address, b.port, b.proto)),
        Op::PutRevNat(index, v) => format!(
            "put rev-nat {index} {}:{}",
            Ipv4Addr::from(v.address),
            v.port
        ),
        Op::PutService(key, value) => format!("put service {}", service_value(key, value)),
        Op::PutBackend6(id, b) => format!("put backend6 {id} {}", l4_6(b.address, b.port, b.proto)),
        Op::PutRevNat6(index, v) => format!(
            "put rev-nat6 {index} [{}]:{}",
            Ipv6Addr::from(v.address),
            v.port
        ),
        Op::PutService6(key, value) => format!(
            "put service6 {}",
            slot_value(service6_key(key), key.backend_slot, value)
        ),
        Op::DeleteService6(key) => format!(
            "delete service6 {} slot {}",
            service6_key(key),
            key.backend_slot
        ),
        Op::DeleteRevNat6(index) => format!("delete rev-nat6 {index}"),
        Op::DeleteBackend6(id) => format!("delete backend6 {id}"),
        Op::PutEndpoint(key, info) => {
            format!(
                "put endpoint {} {}",
                Ipv4Addr::from(key.address),
                endpoint(info)
            )
        }
        Op::PutEndpoint6(key, info) => {
            format!(
                "put endpoint6 {} {}",
                Ipv6Addr::from(key.address),
                endpoint(info)
            )
        }
        Op::PutConfig(c) => format!("put config {}", config(c)),
        Op::PutRoute(key, info) => format!(
            "put route {}/{} {}",
            Ipv4Addr::from(key.network),
            key.prefix_len,
            route(info)
        ),
        Op::DeleteRoute(key) => format!(
            "delete route {}/{}",
            Ipv4Addr::from(key.network),
            key.prefix_len
        ),
        Op::PutRoute6(key, info) => format!(
            "put route6 {}/{} {}",
            Ipv6Addr::from(key.network),
            key.prefix_len,
            route(info)
        ),
        Op::DeleteRoute6(key) => format!(
            "delete route6 {}/{}",
            Ipv6Addr::from(key.network),
            key.prefix_len
        ),
        Op::DeleteService(key) => format!(
            "delete service {} slot {}",
            service_key(key),
            key.backend_slot
        ),
        Op::DeleteRevNat(index) => format!("delete rev-nat {index}"),
        Op::DeleteBackend(id) => format!("delete backend {id}"),
        Op::DeleteEndpoint(key) => format!("delete endpoint {}", Ipv4Addr::from(key.address)),
        Op::DeleteEndpoint6(key) => format!("delete endpoint6 {}", Ipv6Addr::from(key.address)),
        Op::PutMaglev(key, count, _) => {
            format!("put maglev {} backends={count}", service_key(key))
        }
        Op::DeleteMaglev(key) => format!("delete maglev {}", service_key(key)),
        Op::PutSourceRange(range) => format!(
            "put source-range {} from {}/{}",
            service_key(&range.frontend),
            Ipv4Addr::from(range.network),
            range.prefix_len
        ),
        Op::DeleteSourceRange(range) => format!(
            "delete source-range {} from {}/{}",
            service_key(&range.frontend),
            Ipv4Addr::from(range.network),
            range.prefix_len
        ),
        Op::PutIpcache(key, value) => format!(
            "put ipcache {}/{} identity={}",
            Ipv4Addr::from(key.network),
            key.prefix_len,
            value.identity
        ),
        Op::DeleteIpcache(key) => format!(
            "delete ipcache {}/{}",
            Ipv4Addr::from(key.network),
            key.prefix_len
        ),
        Op::PutPolicy(rule, _) => format!("put policy {}", describe_policy_rule(rule)),
        Op::DeletePolicy(rule) => format!("delete policy {}", describe_policy_rule(rule)),
    }
}
