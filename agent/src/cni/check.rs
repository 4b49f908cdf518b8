//! CHECK: compare everything ADD set up, in the pod, on the node and in the
//! datapath, and what its result listed, with what is there now.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::Result;
use ferrite_common::{
    pod_mac_for, Endpoint6Key, EndpointInfo, EndpointKey, HOST_VETH_MAC, POD_GATEWAY_IP,
};

use super::{
    ipam::{Held, Owner},
    owner_tag,
    spec::{code, CniError, Environment, NetConf, OrCode},
    AttachmentNetns,
};
use crate::{
    datapath,
    host::{
        self,
        pods::{HostWiring, POD_GATEWAY_IP6},
    },
    maps::NodeMaps,
    netlink::mac_string,
    netlink::Netlink,
};

/// Verify the attachment is still as ADD left it.
pub fn check(env: &Environment, conf: &NetConf) -> Result<(), CniError> {
    if conf.cni_version.starts_with("0.3") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "CHECK needs cniVersion 0.4.0 or later",
        ));
    }
    let pin_dir = super::pin_dir_with_datapath(conf, code::CHECK_FAILED)?;
    let netns = match super::attachment_netns(&env.netns)? {
        AttachmentNetns::Pod(id) => id,
        other => return Err(other.refusal(&env.netns)),
    };
    let store = super::open_store(conf)?;
    let unknown = || {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("no attachment {}/{}", env.container_id, env.ifname),
        )
    };
    let held = store
        .find(&env.container_id, &env.ifname)
        .or_code(code::IO_FAILURE, "IPAM store")?
        .ok_or_else(unknown)?;
    // An interrupted run's record: no pod was wired with it.
    let Held {
        owner,
        v4: Some(ip),
        v6: ip6,
    } = held
    else {
        return Err(unknown());
    };
    let mut problems = Vec::new();
    if owner.netns.as_ref().is_some_and(|n| n.id != netns) {
        problems.push(format!(
            "{} is not the network namespace the attachment was made in",
            env.netns
        ));
    }
    problems.extend(result_problems(env, conf, ip, ip6, &owner));
    problems.extend(
        pod_problems(env, conf, ip, ip6).or_code(code::CHECK_FAILED, "checking the pod side")?,
    );
    problems.extend(
        host_problems(conf, &pin_dir, ip, &owner)
            .or_code(code::CHECK_FAILED, "checking the node side")?,
    );
    if let Some(ip6) = ip6 {
        problems.extend(
            host_problems6(&pin_dir, ip, ip6, &owner.host_interface)
                .or_code(code::CHECK_FAILED, "checking the node side (IPv6)")?,
        );
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(
            CniError::new(code::CHECK_FAILED, "the pod's networking changed")
                .details(problems.join("; ")),
        )
    }
}

/// What prevResult must still list: the addresses, both interfaces, the default
/// routes.
fn result_problems(
    env: &Environment,
    conf: &NetConf,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    owner: &Owner,
) -> Vec<String> {
    let mut problems = Vec::new();
    let empty = serde_json::Value::Null;
    let result = conf.prev_result.as_ref().unwrap_or(&empty);
    let list = |field: &str| result[field].as_array().cloned().unwrap_or_default();
    let address = format!("{ip}/32");
    if !list("ips").iter().any(|i| i["address"] == address.as_str()) {
        problems.push(format!("prevResult does not list {address}"));
    }
    let interfaces = list("interfaces");
    if !interfaces
        .iter()
        .any(|i| i["name"] == owner.host_interface.as_str() && i["sandbox"].is_null())
    {
        problems.push(format!(
            "prevResult does not list host interface {}",
            owner.host_interface
        ));
    }
    if !interfaces
        .iter()
        .any(|i| i["name"] == env.ifname.as_str() && i["sandbox"] == env.netns.as_str())
    {
        problems.push(format!(
            "prevResult does not list {} in {}",
            env.ifname, env.netns
        ));
    }
    let gateway = POD_GATEWAY_IP.to_string();
    if !list("routes")
        .iter()
        .any(|r| r["dst"] == "0.0.0.0/0" && r["gw"] == gateway.as_str())
    {
        problems.push(format!("prevResult has no default route via {gateway}"));
    }
    if let Some(ip6) = ip6 {
        let address = format!("{ip6}/128");
        if !list("ips").iter().any(|i| i["address"] == address.as_str()) {
            problems.push(format!("prevResult does not list {address}"));
        }
        let gateway = POD_GATEWAY_IP6.to_string();
        if !list("routes")
            .iter()
            .any(|r| r["dst"] == "::/0" && r["gw"] == gateway.as_str())
        {
            problems.push(format!("prevResult has no default route via {gateway}"));
        }
    }
    problems
}

/// The pod's interface (MAC, MTU, up, its /32), its default route via the gateway
/// and the gateway's permanent neighbour entry; for a dual-stack pod the same for
/// IPv6, and IPv6 up on the interface with DAD off (an IPv4-only pod: IPv6 off).
fn pod_problems(
    env: &Environment,
    conf: &NetConf,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
) -> Result<Vec<String>> {
    let name = env.ifname.clone();
    let mtu = conf.mtu;
    host::netns::in_netns(Path::new(&env.netns), move || {
        let mut problems = Vec::new();
        let mut netlink = Netlink::open()?;
        let Some(link) = netlink.link(&name)? else {
            return Ok(vec![format!("{name} is missing")]);
        };
        if link.mac != Some(pod_mac_for(ip)) {
            problems.push(format!("{name} has MAC {}", shown_mac(link.mac)));
        }
        if link.mtu != mtu {
            problems.push(format!("{name} has MTU {}, not {mtu}", link.mtu));
        }
        if !link.up {
            problems.push(format!("{name} is down"));
        }
        let has_address = netlink
            .addresses()?
            .iter()
            .any(|a| a.device == link.index && a.ip == ip && a.prefix_len == 32);
        if !has_address {
            problems.push(format!("{name} does not have {ip}/32"));
        }
        let routed = netlink.routes()?.iter().any(|r| {
            r.destination.prefix_len() == 0
                && r.gateway == Some(POD_GATEWAY_IP)
                && r.device == Some(link.index)
        });
        if !routed {
            problems.push(format!(
                "the pod has no default route via {POD_GATEWAY_IP} dev {name}"
            ));
        }
        let resolved = netlink.neighbours()?.iter().any(|n| {
            n.device == link.index
                && n.permanent
                && n.ip == POD_GATEWAY_IP
                && n.mac == Some(HOST_VETH_MAC)
        });
        if !resolved {
            problems.push(format!(
                "the pod has no permanent neighbour {POD_GATEWAY_IP} lladdr {} dev {name}",
                mac_string(HOST_VETH_MAC)
            ));
        }
        problems.extend(pod_problems6(&mut netlink, &name, link.index, ip6)?);
        Ok(problems)
    })
}

/// In the pod's namespace: its IPv6 sysctls, and for a dual-stack pod its /128, the
/// default route via [`POD_GATEWAY_IP6`] and that gateway's permanent entry.
fn pod_problems6(
    netlink: &mut Netlink,
    name: &str,
    index: u32,
    ip6: Option<Ipv6Addr>,
) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let sysctl = |key: &str| {
        let path = Path::new("/proc/sys/net/ipv6/conf").join(name).join(key);
        std::fs::read_to_string(path)
            .ok()
            .map(|v| v.trim().to_string())
    };
    let Some(ip6) = ip6 else {
        // Kernels without IPv6 have no such file: nothing to check.
        if sysctl("disable_ipv6").is_some_and(|v| v != "1") {
            problems.push(format!("IPv6 is enabled on {name}"));
        }
        return Ok(problems);
    };
    if sysctl("disable_ipv6").as_deref() != Some("0") {
        problems.push(format!("IPv6 is disabled on {name}"));
    }
    if sysctl("accept_dad").as_deref() != Some("0") {
        problems.push(format!("duplicate address detection is on for {name}"));
    }
    let has_address = netlink
        .addresses6()?
        .iter()
        .any(|a| a.device == index && a.ip == ip6 && a.prefix_len == 128);
    if !has_address {
        problems.push(format!("{name} does not have {ip6}/128"));
    }
    let routed = netlink.routes6()?.iter().any(|r| {
        r.destination.prefix_len() == 0
            && r.gateway == Some(POD_GATEWAY_IP6)
            && r.device == Some(index)
    });
    if !routed {
        problems.push(format!(
            "the pod has no default route ::/0 via {POD_GATEWAY_IP6} dev {name}"
        ));
    }
    let resolved = netlink.neighbours6()?.iter().any(|n| {
        n.device == index && n.permanent && n.ip == POD_GATEWAY_IP6 && n.mac == Some(HOST_VETH_MAC)
    });
    if !resolved {
        problems.push(format!(
            "the pod has no permanent neighbour {POD_GATEWAY_IP6} lladdr {} dev {name}",
            mac_string(HOST_VETH_MAC)
        ));
    }
    Ok(problems)
}

/// Whether `entry` is the endpoint entry the pod at `ip` behind `host` should have.
fn names_the_pod(entry: Option<EndpointInfo>, ip: Ipv4Addr, host: &str) -> bool {
    entry.is_some_and(|e| {
        Some(e.ifindex) == host::interfaces::ifindex(host)
            && e.pod_mac == pod_mac_for(ip)
            && e.host_mac == HOST_VETH_MAC
    })
}

/// The node's side of a dual-stack pod: IPv6 on the host veth, its /128 route to
/// the pod, the pod's permanent neighbour entry and its IPv6 endpoint entry.
fn host_problems6(pin_dir: &Path, ip: Ipv4Addr, ip6: Ipv6Addr, host: &str) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let endpoint6 = NodeMaps::open(pin_dir)?.endpoint6(&Endpoint6Key {
        address: ip6.octets(),
    })?;
    if !names_the_pod(endpoint6, ip, host) {
        problems.push(format!("endpoint map entry of {ip6} is missing or stale"));
    }
    let disabled = Path::new("/proc/sys/net/ipv6/conf")
        .join(host)
        .join("disable_ipv6");
    if std::fs::read_to_string(disabled)
        .ok()
        .as_deref()
        .map(str::trim)
        != Some("0")
    {
        problems.push(format!("IPv6 is disabled on host veth {host}"));
    }
    let mut netlink = Netlink::open()?;
    let Some(link) = netlink.link(host)? else {
        return Ok(problems); // reported missing already
    };
    let routed = netlink.routes6()?.iter().any(|r| {
        r.destination.prefix_len() == 128
            && r.destination.addr() == ip6
            && r.gateway.is_none()
            && r.device == Some(link.index)
    });
    if !routed {
        problems.push(format!("the node has no route {ip6}/128 dev {host}"));
    }
    let mac = pod_mac_for(ip);
    let resolved = netlink
        .neighbours6()?
        .iter()
        .any(|n| n.device == link.index && n.permanent && n.ip == ip6 && n.mac == Some(mac));
    if !resolved {
        problems.push(format!(
            "the node has no permanent neighbour {ip6} lladdr {} dev {host}",
            mac_string(mac)
        ));
    }
    Ok(problems)
}

/// A link's MAC for a message (`none` when it has no Ethernet address).
fn shown_mac(mac: Option<[u8; 6]>) -> String {
    mac.map_or_else(|| "none".into(), mac_string)
}

/// The host veth (ours, up, MAC, MTU), the node's route and neighbour for the pod,
/// the datapath links and the endpoint entry.
fn host_problems(
    conf: &NetConf,
    pin_dir: &Path,
    ip: Ipv4Addr,
    owner: &Owner,
) -> Result<Vec<String>> {
    let host = &owner.host_interface;
    let Some(link) = Netlink::open()?.link(host)? else {
        return Ok(vec![format!("host veth {host} is missing")]);
    };
    let mut problems = Vec::new();
    // Veths wired before owners were recorded have no alias.
    let tag = owner_tag(&owner.container_id);
    if link.alias.is_some_and(|alias| alias != tag) {
        problems.push(format!("host veth {host} is not this container's"));
    }
    if link.mac != Some(HOST_VETH_MAC) {
        problems.push(format!("host veth {host} has MAC {}", shown_mac(link.mac)));
    }
    if link.mtu != conf.mtu {
        problems.push(format!(
            "host veth {host} has MTU {}, not {}",
            link.mtu, conf.mtu
        ));
    }
    problems.extend(HostWiring::read()?.missing(ip, host));
    let pinned = datapath::attachments(pin_dir)?;
    for attachment in datapath::pod_attachments(host) {
        if !pinned.contains(&attachment) {
            problems.push(format!("no datapath link {}", attachment.pin_name()));
        }
    }
    let endpoint = NodeMaps::open(pin_dir)?.endpoint(&EndpointKey {
        address: ip.octets(),
    })?;
    if !names_the_pod(endpoint, ip, host) {
        problems.push(format!("endpoint map entry of {ip} is missing or stale"));
    }
    Ok(problems)
}
