//! The CNI plugin (`ferrite-cni`, spec 1.1.0): wires pods the way the datapath
//! expects (see [`crate::host::pods`]), allocates their addresses from the node's pod
//! CIDR, attaches the pinned from-pod program and writes the endpoint map. It needs
//! only what the agent pinned, not the agent itself.
//!
//! Every command holds the node's IPAM lock from start to end, so plugin runs on a
//! node are serialised; an ADD that fails undoes what it did, in reverse (the
//! attachments gone without a DEL that a full range made it release stay released:
//! see the `reclaim` module).
mod check;
pub mod ipam;
mod reclaim;
pub mod spec;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::{bail, Context, Result};
use ferrite_common::{
    pod_mac_for, program_names, Endpoint6Key, EndpointInfo, EndpointKey, HOST_VETH_MAC,
    ROUTE_LOCAL, ROUTE_NATIVE, ROUTE_NODE, ROUTE_REMOTE,
};
use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use crate::{
    datapath, files, host,
    host::{netns::NetnsId, pods::PodInterface},
    limits::Limits,
    maps::NodeMaps,
    model::pod_attachment_interface_name,
    netlink::mac_string,
    plan::Op,
};
use ipam::{Held, NetnsRecord, Owner, Store, Untrusted};
use spec::{code, CniError, CniResult, Command, Environment, NetConf, OrCode, PodRanges, Wired};

/// Run one command (the `ferrite-cni` binary reads `env` and `input` from the
/// process); returns what to print on success.
pub fn run(env: &Environment, input: &[u8]) -> Result<Option<String>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(spec::version_info().to_string()));
    }
    let conf = NetConf::parse(input)?;
    let with_version = |mut error: CniError| {
        error.cni_version = conf.cni_version.clone();
        error
    };
    match env.command {
        Command::Add => add(env, &conf)
            .map(|result| Some(serde_json::to_string(&result).expect("result serialises"))),
        Command::Del => del(env, &conf).map(|_| None),
        Command::Check => check::check(env, &conf).map(|_| None),
        Command::Gc => gc(&conf).map(|_| None),
        Command::Status => status(&conf).map(|_| None),
        Command::Version => unreachable!("answered above"),
    }
    .map_err(with_version)
}

type Undo<'a> = Box<dyn FnOnce() -> Result<()> + 'a>;

/// Undo actions of a half-done ADD, run in reverse unless the ADD completes.
#[derive(Default)]
struct Rollback<'a> {
    steps: Vec<(&'static str, Undo<'a>)>,
}

impl<'a> Rollback<'a> {
    fn push(&mut self, what: &'static str, undo: impl FnOnce() -> Result<()> + 'a) {
        self.steps.push((what, Box::new(undo)));
    }

    fn disarm(mut self) {
        self.steps.clear();
    }
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        while let Some((what, undo)) = self.steps.pop() {
            if let Err(e) = undo() {
                eprintln!("ferrite-cni: rollback of {what} failed: {e:#}");
            }
        }
    }
}

fn pin_dir_with_datapath(conf: &NetConf, error_code: u32) -> Result<std::path::PathBuf, CniError> {
    let pin_dir = datapath::pin_dir(&conf.node);
    let program = pin_dir.join(program_names::FROM_POD);
    if !program.exists() {
        return Err(CniError::new(
            error_code,
            format!("the Ferrite datapath of node {} is not loaded", conf.node),
        )
        .details(format!(
            "{} does not exist: is the ferrite agent running on this node?",
            program.display()
        )));
    }
    Ok(pin_dir)
}

/// Where the node's pod CIDRs come from, for messages.
fn ranges_source(conf: &NetConf) -> String {
    match (&conf.pod_cidrs, conf.pod_cidr) {
        (Some(_), _) => "podCIDRs of the network configuration".into(),
        (None, Some(_)) => "podCIDR of the network configuration".into(),
        (None, None) => files::pod_cidr_file(&conf.node).display().to_string(),
    }
}

/// The node's pod CIDRs, from the configuration or as the agent published them (one
/// per line: IPv4, then IPv6 on a dual-stack node); held to the rules Node objects
/// are (a loopback, link-local or too wide or narrow range would give pods
/// addresses that are not theirs to have).
fn pod_ranges(conf: &NetConf, error_code: u32) -> Result<PodRanges, CniError> {
    let path = files::pod_cidr_file(&conf.node);
    let source = ranges_source(conf);
    let ranges = match conf.configured_ranges() {
        Some(ranges) => ranges,
        None => std::fs::read_to_string(&path)
            .context("reading the pod CIDR")
            .and_then(|s| {
                PodRanges::parse_lines(&s)
                    .map_err(anyhow::Error::msg)
                    .context("parsing the pod CIDR")
            })
            .or_code(
                error_code,
                &format!(
                    "the pod CIDR of node {} is unknown (no podCIDR in the config, nothing in {})",
                    conf.node,
                    path.display()
                ),
            )?,
    };
    let limits = Limits::default();
    let refused = limits
        .refuse_pod_cidr(&ranges.v4, &[], &[])
        .map(|why| (ranges.v4.to_string(), why))
        .or_else(|| {
            let v6 = ranges.v6?;
            Some((v6.to_string(), limits.refuse_pod_cidr6(&v6, &[], &[])?))
        });
    if let Some((cidr, why)) = refused {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("pod CIDR {cidr} ({source}) is refused: {why}"),
        ));
    }
    Ok(ranges)
}

/// What the pinned datapath says of the cluster's nodes, as the agent accepted
/// them from their Node objects: this node's pod CIDRs and address, other nodes'
/// pod CIDRs and addresses (`ferrite_routes`, `ferrite_config`).
#[derive(Debug, Default)]
struct KnownNodes {
    own_cidrs: Vec<Ipv4Net>,
    own_ip: Option<Ipv4Addr>,
    other_cidrs: Vec<(Ipv4Net, Ipv4Addr)>,
    other_ips: Vec<Ipv4Addr>,
}

impl KnownNodes {
    fn read(pin_dir: &Path) -> Result<Self> {
        let maps = NodeMaps::open(pin_dir)?;
        let mut known = Self {
            own_ip: Some(Ipv4Addr::from(maps.node_config()?.node_ip))
                .filter(|ip| !ip.is_unspecified()),
            ..Self::default()
        };
        for (key, route) in maps.route_entries()? {
            let Ok(net) = Ipv4Net::new(Ipv4Addr::from(key.network), key.prefix_len as u8) else {
                continue;
            };
            // Reached natively or over the overlay, alike here.
            match route.flags & !ROUTE_NATIVE {
                ROUTE_LOCAL => known.own_cidrs.push(net),
                ROUTE_REMOTE => known.other_cidrs.push((net, Ipv4Addr::from(route.node_ip))),
                ROUTE_NODE => known.other_ips.push(net.addr()),
                _ => {}
            }
        }
        Ok(known)
    }

    /// Why pods may not have addresses of `cidr`, if they may not: once the agent
    /// accepted this node's pod CIDR, outside it; a node's address in it (a pod
    /// there takes the traffic meant for that node); another node's pod CIDR
    /// overlapping it.
    fn refuse(&self, cidr: &Ipv4Net) -> Option<String> {
        let list = |nets: &[Ipv4Net]| {
            nets.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.own_cidrs.is_empty() && !self.own_cidrs.iter().any(|own| own.contains(cidr)) {
            return Some(format!(
                "it is outside this node's pod CIDR {} (from its Node object)",
                list(&self.own_cidrs)
            ));
        }
        if let Some(ip) = self.own_ip.filter(|ip| cidr.contains(ip)) {
            return Some(format!("it holds this node's address {ip}"));
        }
        if let Some(ip) = self.other_ips.iter().find(|ip| cidr.contains(*ip)) {
            return Some(format!("it holds another node's address {ip}"));
        }
        self.other_cidrs
            .iter()
            .find(|(other, _)| other.contains(cidr) || cidr.contains(other))
            .map(|(other, node)| format!("it overlaps {other}, the pod CIDR of the node at {node}"))
    }
}

/// The node's pod CIDRs (see [`pod_ranges`]), refused (code 7) where the IPv4 one
/// conflicts with the nodes the pinned datapath knows (it knows no IPv6 yet).
fn checked_pod_ranges(
    conf: &NetConf,
    pin_dir: &Path,
    error_code: u32,
) -> Result<PodRanges, CniError> {
    let ranges = pod_ranges(conf, error_code)?;
    let known =
        KnownNodes::read(pin_dir).or_code(code::WIRING_FAILED, "reading the node's routes")?;
    if let Some(why) = known.refuse(&ranges.v4) {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "pod CIDR {} ({}) is refused: {why}",
                ranges.v4,
                ranges_source(conf)
            ),
        ));
    }
    Ok(ranges)
}

/// Addresses of the node's own interfaces (its InternalIP, the overlay address,
/// whatever else an admin put there): never a pod's.
fn node_addresses() -> Result<BTreeSet<IpAddr>> {
    let mut netlink = crate::netlink::Netlink::open()?;
    let v4 = netlink.addresses()?.into_iter().map(|a| IpAddr::V4(a.ip));
    let v6 = netlink.addresses6()?.into_iter().map(|a| IpAddr::V6(a.ip));
    Ok(v4.chain(v6).collect())
}

fn host_interface_name(env: &Environment) -> String {
    match env.pod() {
        // The agent derives the same name for eth0 from the Pod object.
        Some((namespace, name)) => pod_attachment_interface_name(namespace, name, &env.ifname),
        None => pod_attachment_interface_name("", &env.container_id, &env.ifname),
    }
}

/// What a host veth's alias records of its owner: the container id (hashed when
/// longer than an alias may be).
fn owner_tag(container_id: &str) -> String {
    if container_id.len() <= 200 {
        return container_id.to_string();
    }
    let digest = Sha256::digest(container_id.as_bytes());
    format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// Whether a host veth of `owner`'s recorded name exists that may be its own: its
/// alias names the owner's container, or it has none (or it could not be read).
/// A newer sandbox of the same pod reuses the name and records its own container.
/// A veth pair lives and dies as one: while it exists, so does the pod end.
fn host_veth_may_be_its(owner: &Owner) -> bool {
    host::interfaces::link_exists(&owner.host_interface)
        && host::interfaces::link_alias(&owner.host_interface)
            .is_none_or(|alias| alias == owner_tag(&owner.container_id))
}

/// The data directory of the node, locked; code 7 if it cannot be trusted.
fn open_store(conf: &NetConf) -> Result<Store, CniError> {
    Store::lock(&conf.ipam_dir()).map_err(|e| {
        let code = if e.downcast_ref::<Untrusted>().is_some() {
            code::INVALID_CONFIG
        } else {
            code::IO_FAILURE
        };
        CniError::new(code, "the IPAM data directory cannot be used").details(format!("{e:#}"))
    })
}

/// What CNI_NETNS names.
enum AttachmentNetns {
    /// A network namespace other than the node's.
    Pod(NetnsId),
    /// The namespace the plugin runs in: the node's own.
    Node,
    /// Nothing, something that is no longer a namespace (unmounted), or a
    /// namespace of another kind.
    Gone,
}

impl AttachmentNetns {
    fn refusal(&self, path: &str) -> CniError {
        let msg = match self {
            Self::Pod(_) => format!("CNI_NETNS {path} is usable"),
            Self::Node => format!("CNI_NETNS {path} is the node's own network namespace"),
            Self::Gone => format!("CNI_NETNS {path} is not a network namespace"),
        };
        CniError::new(code::INVALID_ENVIRONMENT, msg)
    }
}

fn attachment_netns(path: &str) -> Result<AttachmentNetns, CniError> {
    if path.is_empty() {
        return Ok(AttachmentNetns::Gone);
    }
    let id = host::netns::netns_id(Path::new(path))
        .or_code(code::INVALID_ENVIRONMENT, "inspecting CNI_NETNS")?;
    let own = host::netns::own_netns_id().or_code(code::IO_FAILURE, "the node's namespace")?;
    Ok(match id {
        None => AttachmentNetns::Gone,
        Some(id) if id == own => AttachmentNetns::Node,
        Some(id) => AttachmentNetns::Pod(id),
    })
}

/// Whether an attachment's pod still exists: the namespace it was made in is still
/// at its path (older records: its host veth is still there).
fn attachment_alive(owner: &Owner) -> bool {
    match &owner.netns {
        Some(record) => match host::netns::netns_id(Path::new(&record.path)) {
            Ok(found) => found == Some(record.id),
            Err(_) => true, // cannot tell: keep it
        },
        None => host::interfaces::link_exists(&owner.host_interface),
    }
}

fn add(env: &Environment, conf: &NetConf) -> Result<CniResult, CniError> {
    let pin_dir = pin_dir_with_datapath(conf, code::TRY_AGAIN_LATER)?;
    let ranges = checked_pod_ranges(conf, &pin_dir, code::TRY_AGAIN_LATER)?;
    let netns = match attachment_netns(&env.netns)? {
        AttachmentNetns::Pod(id) => id,
        other => return Err(other.refusal(&env.netns)),
    };
    let store = open_store(conf)?;
    let mut attachments = store
        .attachments()
        .or_code(code::IO_FAILURE, "IPAM store")?;
    let same = |h: &Held| h.is(&env.container_id, &env.ifname);
    if let Some(held) = attachments.iter().find(|h| same(h)) {
        if attachment_alive(&held.owner) {
            return Err(CniError::new(
                code::ALREADY_ATTACHED,
                format!(
                    "{}/{} already has {}: DEL it first",
                    env.container_id,
                    env.ifname,
                    held.shown()
                ),
            ));
        }
        // Its DEL never came and its namespace is gone: reclaim it.
        eprintln!(
            "ferrite-cni: reclaiming {} of {}/{}: its network namespace is gone",
            held.shown(),
            env.container_id,
            env.ifname
        );
        release_host_side(&pin_dir, held)
            .or_code(code::WIRING_FAILED, "reclaiming the stale attachment")?;
        store
            .release_all(held)
            .or_code(code::IO_FAILURE, "releasing the stale address")?;
        attachments.retain(|h| !same(h));
    }
    // Another live attachment in this namespace. The kernel hands a freed
    // namespace's inode number to the next namespace made, so a record naming this
    // one may be a pod that went without a DEL: only one whose veth pair still
    // exists is in it.
    let sharing = attachments.iter().find(|h| {
        h.owner.netns.as_ref().is_some_and(|n| n.id == netns) && host_veth_may_be_its(&h.owner)
    });
    if let Some(other) = sharing {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!(
                "{} already has Ferrite's interface {} ({}, container {}): Ferrite wires one interface per pod",
                env.netns,
                other.owner.ifname,
                other.shown(),
                other.owner.container_id
            ),
        ));
    }
    let owner = Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        host_interface: host_interface_name(env),
        netns: Some(NetnsRecord {
            path: env.netns.clone(),
            id: netns,
        }),
    };
    let (in_use, in_use6) =
        live_endpoints(&pin_dir).or_code(code::WIRING_FAILED, "reading the endpoints")?;
    let node_addresses =
        node_addresses().or_code(code::WIRING_FAILED, "reading the node's addresses")?;
    let taken = |ip: IpAddr| node_addresses.contains(&ip);
    // The addresses are released after the wiring is undone (a rollback of its own:
    // the wiring's steps borrow the pod, made once the addresses are known).
    let mut addresses = Rollback::default();
    let store = &store;
    let cidr = ranges.v4;
    let ip = claim_or_reclaim(store, &pin_dir, cidr.into(), &attachments, || {
        let ip = store.allocate(cidr, &owner, |ip| in_use.contains(&ip) || taken(ip.into()))?;
        Ok(ip.map(IpAddr::V4))
    })?;
    let IpAddr::V4(ip) = ip else {
        unreachable!("allocated from the IPv4 range")
    };
    addresses.push("the address", move || store.release(ip));
    let ip6 = match ranges.v6 {
        None => None,
        Some(cidr6) => {
            let ip6 = claim_or_reclaim(store, &pin_dir, cidr6.into(), &attachments, || {
                let ip6 = store.allocate6(cidr6, &owner, |ip| {
                    in_use6.contains(&ip) || taken(ip.into())
                })?;
                Ok(ip6.map(IpAddr::V6))
            })?;
            let IpAddr::V6(ip6) = ip6 else {
                unreachable!("allocated from the IPv6 range")
            };
            addresses.push("the IPv6 address", move || store.release(ip6));
            Some(ip6)
        }
    };
    let pod = PodInterface {
        netns: env.netns.clone().into(),
        name: env.ifname.clone(),
        host_name: owner.host_interface.clone(),
        ip,
        ip6,
        mtu: conf.mtu,
    };
    let mut rollback = Rollback::default();
    wire(&pod, &owner, &pin_dir, &mut rollback)
        .or_code(code::WIRING_FAILED, "wiring the pod failed")?;
    for ip in std::iter::once(IpAddr::V4(ip)).chain(ip6.map(IpAddr::V6)) {
        store
            .remember_last(ip)
            .or_code(code::IO_FAILURE, "IPAM store")?;
    }
    rollback.disarm();
    addresses.disarm();
    Ok(CniResult::new(
        conf,
        &Wired {
            host_interface: pod.host_name.clone(),
            host_mac: mac_string(HOST_VETH_MAC),
            pod_interface: pod.name.clone(),
            pod_mac: mac_string(pod_mac_for(ip)),
            sandbox: env.netns.clone(),
            ip,
            gateway: ferrite_common::POD_GATEWAY_IP,
            ip6: ip6.map(|ip6| (ip6, host::pods::POD_GATEWAY_IP6)),
        },
    ))
}

/// An address of `cidr` from `allocate`; when the range is full, the attachments
/// whose pods are gone (their DELs never came) are released and it tries once more.
fn claim_or_reclaim(
    store: &Store,
    pin_dir: &Path,
    cidr: ipnet::IpNet,
    attachments: &[Held],
    allocate: impl Fn() -> Result<Option<IpAddr>>,
) -> Result<IpAddr, CniError> {
    let allocate = || allocate().or_code(code::IO_FAILURE, "IPAM store");
    if let Some(ip) = allocate()? {
        return Ok(ip);
    }
    let full = |details: String| {
        CniError::new(code::NO_FREE_ADDRESS, format!("no free address in {cidr}")).details(details)
    };
    let pass = reclaim::reclaim_gone(store, pin_dir, cidr, attachments)
        .map_err(|e| full(format!("looking for attachments to reclaim: {e:#}")))?;
    let retried = if pass.reclaimed.is_empty() {
        None
    } else {
        allocate()?
    };
    retried.ok_or_else(|| full(pass.summary()))
}

/// Addresses (IPv4, IPv6) whose endpoint entry names a live interface: pods wired
/// from another data directory (a second store for the node) hold them.
fn live_endpoints(pin_dir: &Path) -> Result<(BTreeSet<Ipv4Addr>, BTreeSet<Ipv6Addr>)> {
    let live = live_ifindexes()?;
    let maps = NodeMaps::open(pin_dir)?;
    let v4 = maps
        .endpoint_entries()?
        .into_iter()
        .filter(|(_, e)| live.contains(&e.ifindex))
        .map(|(k, _)| Ipv4Addr::from(k.address))
        .collect();
    let v6 = maps
        .endpoint6_entries()?
        .into_iter()
        .filter(|(_, e)| live.contains(&e.ifindex))
        .map(|(k, _)| Ipv6Addr::from(k.address))
        .collect();
    Ok((v4, v6))
}

/// The indexes of the node's interfaces.
fn live_ifindexes() -> Result<BTreeSet<u32>> {
    Ok(host::interfaces::interfaces()?
        .values()
        .map(|i| i.ifindex)
        .collect())
}

fn wire<'a>(
    pod: &'a PodInterface,
    owner: &Owner,
    pin_dir: &'a Path,
    rollback: &mut Rollback<'a>,
) -> Result<()> {
    // A host veth of that name is left from an earlier sandbox of the same pod
    // (its DEL has not come yet): the new sandbox replaces it, as Calico does.
    host::pods::delete_host_end(&pod.host_name)?;
    host::pods::create(pod)?;
    rollback.push("the veth pair", || {
        host::pods::delete_host_end(&pod.host_name).map(drop)
    });
    host::interfaces::set_link_alias(&pod.host_name, &owner_tag(&owner.container_id))?;
    let ifindex = host::interfaces::ifindex(&pod.host_name).context("host veth vanished")?;
    let mut maps = NodeMaps::open(pin_dir)?;
    let key = EndpointKey {
        address: pod.ip.octets(),
    };
    let key6 = pod.ip6.map(|ip6| Endpoint6Key {
        address: ip6.octets(),
    });
    // An address another live interface's entry names is that pod's, of either
    // family.
    let live = live_ifindexes()?;
    let held = |existing: Option<EndpointInfo>| existing.filter(|e| live.contains(&e.ifindex));
    if let Some(existing) = held(maps.endpoint(&key)?) {
        bail!(
            "{} is the endpoint of interface index {} already",
            pod.ip,
            existing.ifindex
        );
    }
    if let (Some(ip6), Some(key6)) = (pod.ip6, &key6) {
        if let Some(existing) = held(maps.endpoint6(key6)?) {
            bail!(
                "{ip6} is the endpoint of interface index {} already",
                existing.ifindex
            );
        }
    }
    host::pods::add_pod_route(pod.ip, &pod.host_name)?;
    if let Some(ip6) = pod.ip6 {
        host::pods::add_pod_route6(ip6, pod_mac_for(pod.ip), &pod.host_name)?;
    }
    datapath::attach_pinned_pod_programs(pin_dir, &pod.host_name)?;
    rollback.push("the datapath attachments", || {
        datapath::pod_attachments(&pod.host_name)
            .iter()
            .try_for_each(|a| datapath::detach(pin_dir, a))
    });
    let endpoint = EndpointInfo {
        ifindex,
        pod_mac: pod_mac_for(pod.ip),
        host_mac: HOST_VETH_MAC,
        flags: 0,
    };
    // Each entry is undone if what follows fails (the other family's entry, the
    // IPAM's bookkeeping): no pod is left with one family in the datapath.
    maps.apply(&[Op::PutEndpoint(key, endpoint)])?;
    rollback.push("the endpoint entry", move || {
        let mut maps = NodeMaps::open(pin_dir)?;
        if maps.endpoint(&key)?.is_some_and(|e| e.ifindex == ifindex) {
            maps.apply(&[Op::DeleteEndpoint(key)])?;
        }
        Ok(())
    });
    if let Some(key6) = key6 {
        maps.apply(&[Op::PutEndpoint6(key6, endpoint)])?;
        rollback.push("the IPv6 endpoint entry", move || {
            let mut maps = NodeMaps::open(pin_dir)?;
            if maps.endpoint6(&key6)?.is_some_and(|e| e.ifindex == ifindex) {
                maps.apply(&[Op::DeleteEndpoint6(key6)])?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// Remove what an attachment left on the host once its pod end is gone: its host
/// veth if the veth is still this container's (its alias says so; a pod's newer
/// sandbox reuses the name and keeps it), the endpoint entries of its addresses
/// (IPv4 and IPv6) if they name that veth or no live interface (never another
/// pod's), and the link pins of a vanished host veth. (Its IPv6 route and
/// neighbour go with the veth.)
fn release_host_side(pin_dir: &Path, held: &Held) -> Result<()> {
    if !pin_dir.exists() {
        return Ok(()); // datapath uninstalled: nothing pinned is left to clean
    }
    let owner = &held.owner;
    let host = &owner.host_interface;
    let mut maps = NodeMaps::open(pin_dir)?;
    let key = held.v4.map(|ip| EndpointKey {
        address: ip.octets(),
    });
    let endpoint = match &key {
        Some(key) => maps.endpoint(key)?,
        None => None,
    };
    let key6 = held.v6.map(|ip6| Endpoint6Key {
        address: ip6.octets(),
    });
    let endpoint6 = match &key6 {
        Some(key6) => maps.endpoint6(key6)?,
        None => None,
    };
    let host_ifindex = host::interfaces::ifindex(host);
    let ours = host_ifindex.is_some()
        && match host::interfaces::link_alias(host) {
            Some(alias) => alias == owner_tag(&owner.container_id),
            // Wired before owners were recorded: the endpoint entry decides.
            None => endpoint.is_some_and(|e| Some(e.ifindex) == host_ifindex),
        };
    if ours {
        host::pods::delete_host_end(host)?;
    }
    let live = live_ifindexes()?;
    if let (Some(endpoint), Some(key)) = (endpoint, key) {
        if !live.contains(&endpoint.ifindex) {
            maps.apply(&[Op::DeleteEndpoint(key)])?;
        }
    }
    if let (Some(endpoint6), Some(key6)) = (endpoint6, key6) {
        if !live.contains(&endpoint6.ifindex) {
            maps.apply(&[Op::DeleteEndpoint6(key6)])?;
        }
    }
    if !host::interfaces::link_exists(host) {
        let pinned = datapath::attachments(pin_dir)?;
        for attachment in datapath::pod_attachments(host) {
            if pinned.contains(&attachment) {
                datapath::detach(pin_dir, &attachment)?;
            }
        }
    }
    Ok(())
}

fn del(env: &Environment, conf: &NetConf) -> Result<(), CniError> {
    let store = open_store(conf)?;
    // Never added (or released already): nothing of ours to remove, and whatever
    // CNI_NETNS holds is not ours. DEL is idempotent.
    let Some(held) = store
        .find(&env.container_id, &env.ifname)
        .or_code(code::IO_FAILURE, "IPAM store")?
    else {
        return Ok(());
    };
    // A namespace that is gone, unmounted or the node's own has no pod end to remove.
    if let (AttachmentNetns::Pod(_), Some(ip)) = (attachment_netns(&env.netns)?, held.v4) {
        host::pods::delete_pod_end(Path::new(&env.netns), &env.ifname, ip)
            .or_code(code::WIRING_FAILED, "removing the pod interface")?;
    }
    release_host_side(&datapath::pin_dir(&conf.node), &held)
        .or_code(code::WIRING_FAILED, "cleaning up the host side")?;
    store
        .release_all(&held)
        .or_code(code::IO_FAILURE, "releasing the address")
}

/// Release every attachment the runtime no longer lists as valid.
fn gc(conf: &NetConf) -> Result<(), CniError> {
    let Some(valid) = &conf.valid_attachments else {
        return Ok(()); // nothing to compare with: keep everything
    };
    let store = open_store(conf)?;
    let pin_dir = datapath::pin_dir(&conf.node);
    for held in store
        .attachments()
        .or_code(code::IO_FAILURE, "IPAM store")?
    {
        let listed = valid.iter().any(|a| held.is(&a.container_id, &a.ifname));
        if !listed {
            release_host_side(&pin_dir, &held)
                .or_code(code::WIRING_FAILED, "cleaning up the host side")?;
            store
                .release_all(&held)
                .or_code(code::IO_FAILURE, "releasing the address")?;
        }
    }
    Ok(())
}

/// Ready when the datapath is pinned and the pod CIDR is known (and one pods may
/// have).
fn status(conf: &NetConf) -> Result<(), CniError> {
    let pin_dir = pin_dir_with_datapath(conf, code::PLUGIN_NOT_AVAILABLE)?;
    checked_pod_ranges(conf, &pin_dir, code::PLUGIN_NOT_AVAILABLE)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn pod_cidrs_holding_a_node_or_outside_the_accepted_one_are_refused() {
        let known = KnownNodes {
            own_cidrs: vec![net("10.244.0.0/24")],
            own_ip: Some("198.51.100.1".parse().unwrap()),
            other_cidrs: vec![(net("10.244.1.0/24"), "198.51.100.2".parse().unwrap())],
            other_ips: vec!["198.51.100.2".parse().unwrap()],
        };
        assert_eq!(known.refuse(&net("10.244.0.0/24")), None);
        assert_eq!(known.refuse(&net("10.244.0.128/25")), None);
        for (cidr, says) in [
            (
                "10.244.0.0/23",
                "outside this node's pod CIDR 10.244.0.0/24",
            ),
            ("198.51.100.0/24", "outside this node's pod CIDR"),
            ("10.250.0.0/24", "outside this node's pod CIDR"),
        ] {
            let why = known.refuse(&net(cidr)).unwrap_or_default();
            assert!(why.contains(says), "{cidr}: {why:?}");
        }
        // Before the agent accepted this node's pod CIDR: the nodes' addresses and
        // pod CIDRs still count.
        let known = KnownNodes {
            own_cidrs: vec![],
            ..known
        };
        assert_eq!(known.refuse(&net("10.244.0.0/24")), None);
        for (cidr, says) in [
            ("198.51.100.0/30", "this node's address 198.51.100.1"),
            ("198.51.100.2/31", "another node's address 198.51.100.2"),
            (
                "10.244.1.64/26",
                "overlaps 10.244.1.0/24, the pod CIDR of the node at 198.51.100.2",
            ),
            ("10.244.0.0/16", "overlaps 10.244.1.0/24"),
        ] {
            let why = known.refuse(&net(cidr)).unwrap_or_default();
            assert!(why.contains(says), "{cidr}: {why:?}");
        }
    }
}
