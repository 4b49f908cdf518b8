//! How a pod is wired to its node, the way the datapath expects it (used by the CNI
//! plugin, and by the tests' static pods): a veth pair, host end `fer…` with MAC
//! ee:ee:ee:ee:ee:ee in the node's namespace, pod end in the pod's namespace with
//! MAC `0a:58:<ip>`, the pod IP as a /32, `default via 169.254.1.1 onlink` and a
//! permanent neighbour entry for that gateway. Pods are IPv4-only, so IPv6 is
//! disabled on the pod interface (no router solicitations into the datapath).
use std::{
    fs,
    net::Ipv4Addr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context, Result};
use ferrite_common::{pod_mac_for, HOST_VETH_MAC, POD_GATEWAY_IP};

use crate::hostnet::{run, run_with_input};

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

/// Delete the pod end of a pair (and so the pair) from inside the pod's namespace.
/// Returns whether it existed.
pub fn delete_pod_end(netns: &Path, name: &str) -> Result<bool> {
    in_netns(netns, || delete_link(name))
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
