//! How a pod is wired to its node, the way the datapath expects it (used by the CNI
//! plugin, and by the tests' static pods): a veth pair, host end `fer…` with MAC
//! ee:ee:ee:ee:ee:ee in the node's namespace, pod end in the pod's namespace with
//! MAC `0a:58:<ip>`, the pod IP as a /32, `default via 169.254.1.1 onlink` and a
//! permanent neighbour entry for that gateway. Pods are IPv4-only, so IPv6 is
//! disabled on the pod interface (no router solicitations into the datapath).
use std::{
    fs,
    net::Ipv4Addr,
    os::{
        fd::AsFd,
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context, Result};
use ferrite_common::{pod_mac_for, HOST_VETH_MAC, POD_GATEWAY_IP};
use serde::{Deserialize, Serialize};

use crate::hostnet::{run, run_with_input};

/// A network namespace's identity: device and inode of its nsfs file (what
/// `ip netns identify` and `stat -L` compare).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

/// The namespace `path` names; `None` when the path is gone or is no longer a
/// namespace (a runtime unmounted it and left the empty file it was mounted on).
pub fn netns_id(path: &Path) -> Result<Option<NetnsId>> {
    // Non-blocking: a FIFO or device at the path must not hang the plugin.
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other.with_context(|| format!("opening {}", path.display()))?,
    };
    let fs_type = nix::sys::statfs::fstatfs(&file)
        .with_context(|| format!("statfs {}", path.display()))?
        .filesystem_type();
    if fs_type != nix::sys::statfs::NSFS_MAGIC {
        return Ok(None);
    }
    let meta = file.metadata()?;
    Ok(Some(NetnsId {
        dev: meta.dev(),
        ino: meta.ino(),
    }))
}

/// The network namespace the calling thread runs in (the node's, for the plugin).
pub fn own_netns_id() -> Result<NetnsId> {
    netns_id(Path::new("/proc/thread-self/ns/net"))?
        .context("/proc/thread-self/ns/net is not a namespace")
}

/// `ip -j ARGS` in the calling thread's namespace, parsed (an empty answer is `[]`).
pub fn ip_json(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip -j {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("parsing ip -j {}", args.join(" ")))
}

/// The alias of link `name` (the plugin records the owning container id there),
/// `None` if the link has none or does not exist.
pub fn link_alias(name: &str) -> Option<String> {
    let links = ip_json(&["link", "show", "dev", name]).ok()?;
    links[0]["ifalias"].as_str().map(str::to_string)
}

/// Record who wired a host veth in its alias (one the IPAM files cannot forge).
pub fn set_link_alias(name: &str, alias: &str) -> Result<()> {
    run("ip", &["link", "set", "dev", name, "alias", alias])
        .with_context(|| format!("setting the alias of {name}"))
}

/// The MAC of link `name` in the calling thread's namespace.
pub fn link_mac(name: &str) -> Option<[u8; 6]> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifaddr| {
        (ifaddr.interface_name == name)
            .then(|| ifaddr.address?.as_link_addr()?.addr())
            .flatten()
    })
}

/// A pod interface to create or remove.
#[derive(Clone, Debug)]
pub struct PodInterface {
    /// The pod's network namespace (a path, e.g. /var/run/netns/NAME).
    pub netns: PathBuf,
    /// Name inside the pod (CNI_IFNAME, usually eth0).
    pub name: String,
    /// Name of the host end in the node's namespace.
    pub host_name: String,
    pub ip: Ipv4Addr,
    pub mtu: u32,
}

pub fn mac_string(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Run `f` on a thread inside the network namespace at `netns`; processes it spawns
/// are in that namespace too.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let file =
        fs::File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("entering the pod's network namespace")?;
                f()
            })
            .join()
            .map_err(|_| anyhow!("thread in netns panicked"))?
    })
}

/// The index of interface `name` in the calling thread's network namespace (a
/// socket ioctl, unlike /sys/class/net which shows the namespace sysfs was mounted in).
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

pub fn link_exists(name: &str) -> bool {
    ifindex(name).is_some()
}

/// Create and configure the veth pair (run in the node's namespace). On error the
/// pair is removed again.
pub fn create(pod: &PodInterface) -> Result<()> {
    let mtu = pod.mtu.to_string();
    let netns = pod.netns.to_string_lossy();
    run(
        "ip",
        &[
            "link",
            "add",
            &pod.host_name,
            "mtu",
            &mtu,
            "address",
            &mac_string(HOST_VETH_MAC),
            "type",
            "veth",
            "peer",
            "name",
            &pod.name,
            "mtu",
            &mtu,
            "address",
            &mac_string(pod_mac_for(pod.ip)),
            "netns",
            &netns,
        ],
    )
    .with_context(|| format!("creating veth {} <-> {}", pod.host_name, pod.name))?;
    let configured = configure_pod_side(pod).and_then(|_| {
        run("ip", &["link", "set", &pod.host_name, "up"])
            .with_context(|| format!("setting {} up", pod.host_name))
    });
    if configured.is_err() {
        let _ = delete_host_end(&pod.host_name);
    }
    configured
}

fn configure_pod_side(pod: &PodInterface) -> Result<()> {
    in_netns(&pod.netns, || {
        let ipv6 = Path::new("/proc/sys/net/ipv6/conf").join(&pod.name);
        if ipv6.exists() {
            fs::write(ipv6.join("disable_ipv6"), "1").context("disabling IPv6")?;
        }
        let (name, gateway) = (&pod.name, POD_GATEWAY_IP);
        let commands = format!(
            "addr add {ip}/32 dev {name}\n\
             link set {name} up\n\
             neigh add {gateway} lladdr {mac} dev {name} nud permanent\n\
             route add default via {gateway} dev {name} onlink\n",
            ip = pod.ip,
            mac = mac_string(HOST_VETH_MAC),
        );
        run_with_input("ip", &["-batch", "-"], &commands)
            .with_context(|| format!("configuring {name} in {}", pod.netns.display()))
    })
}

/// Delete the pod end of a pair (and so the pair) from inside the pod's namespace,
/// if it is the interface wired for `ip` (its MAC says so): an interface of that name
/// that the plugin did not create stays. Returns whether it was deleted.
pub fn delete_pod_end(netns: &Path, name: &str, ip: Ipv4Addr) -> Result<bool> {
    in_netns(netns, || {
        if link_mac(name) != Some(pod_mac_for(ip)) {
            return Ok(false);
        }
        delete_link(name)
    })
}

/// Delete a host end (and so the pair) in the current namespace, if it exists.
pub fn delete_host_end(host_name: &str) -> Result<bool> {
    delete_link(host_name)
}

/// Delete a link of the calling thread's namespace; one that vanishes meanwhile
/// (the kernel destroys the pairs of a deleted netns asynchronously) is gone: fine.
fn delete_link(name: &str) -> Result<bool> {
    if !link_exists(name) {
        return Ok(false);
    }
    match run("ip", &["link", "del", name]) {
        Err(_) if !link_exists(name) => Ok(false),
        other => other.map(|_| true),
    }
}

/// The host side of the node's pods as the kernel has it now: which links are up,
/// the /32 link routes and the permanent neighbours (read once, for every pod).
#[derive(Debug, Default)]
pub struct HostWiring {
    up: std::collections::BTreeSet<String>,
    routes: std::collections::BTreeSet<(String, String)>,
    neighbours: std::collections::BTreeSet<(String, String, String)>,
}

impl HostWiring {
    /// Read the calling thread's namespace.
    pub fn read() -> Result<Self> {
        let mut wiring = Self::default();
        for link in array(&ip_json(&["link", "show"])?) {
            let up = link["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "UP"));
            if let (true, Some(name)) = (up, link["ifname"].as_str()) {
                wiring.up.insert(name.into());
            }
        }
        for route in array(&ip_json(&["-4", "route", "show", "scope", "link"])?) {
            if let (Some(dst), Some(dev)) = (route["dst"].as_str(), route["dev"].as_str()) {
                wiring.routes.insert((dst.into(), dev.into()));
            }
        }
        for neigh in array(&ip_json(&["-4", "neigh", "show", "nud", "permanent"])?) {
            if let (Some(dst), Some(dev), Some(mac)) = (
                neigh["dst"].as_str(),
                neigh["dev"].as_str(),
                neigh["lladdr"].as_str(),
            ) {
                wiring
                    .neighbours
                    .insert((dst.into(), dev.into(), mac.into()));
            }
        }
        Ok(wiring)
    }

    /// What the host side of pod `ip` behind `interface` lacks: the link up, the
    /// node's /32 route and its permanent neighbour entry.
    pub fn missing(&self, ip: Ipv4Addr, interface: &str) -> Vec<String> {
        let mut missing = Vec::new();
        if !self.up.contains(interface) {
            missing.push(format!("host veth {interface} is down"));
        }
        if !self.routes.contains(&(ip.to_string(), interface.into())) {
            missing.push(format!("the node has no route {ip}/32 dev {interface}"));
        }
        let neighbour = (
            ip.to_string(),
            interface.to_string(),
            mac_string(pod_mac_for(ip)),
        );
        if !self.neighbours.contains(&neighbour) {
            missing.push(format!(
                "the node has no permanent neighbour {ip} lladdr {} dev {interface}",
                neighbour.2
            ));
        }
        missing
    }
}

/// Set a pod's host veth up and restore its /32 route and neighbour (a link taken
/// down loses both, and taking it up again restores neither).
pub fn repair_host_side(ip: Ipv4Addr, interface: &str) -> Result<()> {
    run("ip", &["link", "set", "dev", interface, "up"])?;
    crate::hostnet::add_pod_route(ip, interface)
}

/// Repair the host side of every pod of `endpoints` whose veth exists (a veth taken
/// down and up again loses its route and neighbour, and nothing else restores
/// them); returns what was missing, one line per pod repaired.
pub fn repair_host_sides(
    endpoints: &std::collections::BTreeMap<
        ferrite_common::EndpointKey,
        ferrite_common::EndpointInfo,
    >,
) -> Result<Vec<String>> {
    let interfaces = crate::datapath::interfaces()?;
    let names: std::collections::BTreeMap<u32, &String> =
        interfaces.iter().map(|(n, i)| (i.ifindex, n)).collect();
    let wiring = HostWiring::read()?;
    let mut repaired = Vec::new();
    for (key, endpoint) in endpoints {
        let Some(interface) = names.get(&endpoint.ifindex) else {
            continue; // its pod is going: nothing to repair
        };
        let ip = Ipv4Addr::from(key.address);
        let missing = wiring.missing(ip, interface);
        if !missing.is_empty() {
            repair_host_side(ip, interface)?;
            repaired.push(format!("{ip} on {interface}: {}", missing.join("; ")));
        }
    }
    Ok(repaired)
}

fn array(value: &serde_json::Value) -> &[serde_json::Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}
