//! The CNI plugin (`ferrite-cni`, spec 1.1.0): wires pods the way the datapath
//! expects (see [`crate::podnet`]), allocates their addresses from the node's pod
//! CIDR, attaches the pinned from-pod program and writes the endpoint map. It needs
//! only what the agent pinned, not the agent itself.
//!
//! Every command holds the node's IPAM lock from start to end, so plugin runs on a
//! node are serialised; an ADD that fails undoes what it did, in reverse.
pub mod ipam;
pub mod spec;

use std::{io::Read, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use ferrite_common::{pod_mac_for, program_names, EndpointInfo, EndpointKey, HOST_VETH_MAC};
use ipnet::Ipv4Net;

use crate::{
    datapath, hostnet,
    maps::NodeMaps,
    model::pod_interface_name,
    plan::Op,
    podnet::{self, mac_string, PodInterface},
};
use ipam::{Owner, Store};
use spec::{code, CniError, CniResult, Command, Environment, NetConf, OrCode, Wired};

/// Entry point of the `ferrite-cni` binary; returns the process exit code.
pub fn main() -> i32 {
    let outcome = Environment::parse(|name| std::env::var(name).ok()).and_then(|env| {
        let mut input = Vec::new();
        std::io::stdin()
            .read_to_end(&mut input)
            .context("reading stdin")
            .or_code(code::IO_FAILURE, "cannot read the network configuration")?;
        run(&env, &input)
    });
    match outcome {
        Ok(Some(output)) => {
            println!("{output}");
            0
        }
        Ok(None) => 0,
        Err(error) => {
            println!(
                "{}",
                serde_json::to_string(&error).unwrap_or_else(|_| error.msg.clone())
            );
            1
        }
    }
}

/// Run one command; returns what to print on success.
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
        Command::Check => check(env, &conf).map(|_| None),
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

fn pod_cidr(conf: &NetConf, error_code: u32) -> Result<Ipv4Net, CniError> {
    if let Some(cidr) = conf.pod_cidr {
        return Ok(cidr);
    }
    let path = hostnet::pod_cidr_file(&conf.node);
    std::fs::read_to_string(&path)
        .context("reading the pod CIDR")
        .and_then(|s| s.trim().parse::<Ipv4Net>().context("parsing the pod CIDR"))
        .or_code(
            error_code,
            &format!(
                "the pod CIDR of node {} is unknown (no podCIDR in the config, nothing in {})",
                conf.node,
                path.display()
            ),
        )
}

fn host_interface_name(env: &Environment) -> String {
    match env.pod() {
        // The agent derives the same name from the Pod object.
        Some((namespace, name)) => pod_interface_name(namespace, name),
        None => pod_interface_name("", &env.container_id),
    }
}

fn add(env: &Environment, conf: &NetConf) -> Result<CniResult, CniError> {
    let pin_dir = pin_dir_with_datapath(conf, code::TRY_AGAIN_LATER)?;
    let cidr = pod_cidr(conf, code::TRY_AGAIN_LATER)?;
    let store = Store::lock(&conf.ipam_dir()).or_code(code::IO_FAILURE, "IPAM store")?;
    if let Some((ip, _)) = store
        .find(&env.container_id, &env.ifname)
        .or_code(code::IO_FAILURE, "IPAM store")?
    {
        return Err(CniError::new(
            code::ALREADY_ATTACHED,
            format!(
                "{}/{} already has {ip}: DEL it first",
                env.container_id, env.ifname
            ),
        ));
    }
    let owner = Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        host_interface: host_interface_name(env),
    };
    let ip = store
        .allocate(cidr, &owner)
        .or_code(code::IO_FAILURE, "IPAM store")?
        .ok_or_else(|| {
            CniError::new(code::NO_FREE_ADDRESS, format!("no free address in {cidr}"))
        })?;
    let pod = PodInterface {
        netns: env.netns.clone().into(),
        name: env.ifname.clone(),
        host_name: owner.host_interface.clone(),
        ip,
        mtu: conf.mtu,
    };
    let mut rollback = Rollback::default();
    let store = &store;
    rollback.push("the address", move || store.release(ip));
    wire(&pod, &pin_dir, &mut rollback).or_code(code::WIRING_FAILED, "wiring the pod failed")?;
    rollback.disarm();
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
        },
    ))
}

fn wire<'a>(pod: &'a PodInterface, pin_dir: &'a Path, rollback: &mut Rollback<'a>) -> Result<()> {
    // A host veth of that name is left from an earlier sandbox of the same pod
    // (its DEL has not come yet): the new sandbox replaces it, as Calico does.
    podnet::delete_host_end(&pod.host_name)?;
    podnet::create(pod)?;
    rollback.push("the veth pair", || {
        podnet::delete_host_end(&pod.host_name).map(drop)
    });
    hostnet::add_pod_route(pod.ip, &pod.host_name)?;
    datapath::attach_pinned_pod_programs(pin_dir, &pod.host_name)?;
    rollback.push("the datapath attachments", || {
        datapath::pod_attachments(&pod.host_name)
            .iter()
            .try_for_each(|a| datapath::detach(pin_dir, a))
    });
    let ifindex = podnet::ifindex(&pod.host_name).context("host veth vanished")?;
    let mut maps = NodeMaps::open(pin_dir)?;
    let key = EndpointKey {
        address: pod.ip.octets(),
    };
    let endpoint = EndpointInfo {
        ifindex,
        pod_mac: pod_mac_for(pod.ip),
        host_mac: HOST_VETH_MAC,
        flags: 0,
    };
    maps.apply(&[Op::PutEndpoint(key, endpoint)])?;
    Ok(())
}

/// Remove what an attachment left on the host once its pod end is gone: the host
/// veth if it is still the one the endpoint map names for `ip` (a pod's newer
/// sandbox reuses the name, and keeps it), the endpoint entry if its interface is
/// gone, and the link pin of a vanished host veth.
fn release_host_side(pin_dir: &Path, ip: Ipv4Addr, host_interface: &str) -> Result<()> {
    if !pin_dir.exists() {
        return Ok(()); // datapath uninstalled: nothing pinned is left to clean
    }
    let mut maps = NodeMaps::open(pin_dir)?;
    let key = EndpointKey {
        address: ip.octets(),
    };
    if let Some(endpoint) = maps.endpoint(&key)? {
        if podnet::ifindex(host_interface) == Some(endpoint.ifindex) {
            podnet::delete_host_end(host_interface)?;
        }
        let live = datapath::interfaces()?
            .values()
            .any(|i| i.ifindex == endpoint.ifindex);
        if !live {
            maps.apply(&[Op::DeleteEndpoint(key)])?;
        }
    }
    if !podnet::link_exists(host_interface) {
        let pinned = datapath::attachments(pin_dir)?;
        for attachment in datapath::pod_attachments(host_interface) {
            if pinned.contains(&attachment) {
                datapath::detach(pin_dir, &attachment)?;
            }
        }
    }
    Ok(())
}

fn del(env: &Environment, conf: &NetConf) -> Result<(), CniError> {
    let store = Store::lock(&conf.ipam_dir()).or_code(code::IO_FAILURE, "IPAM store")?;
    // Gone already (netns deleted, or never created) is success: DEL is idempotent.
    if !env.netns.is_empty() && Path::new(&env.netns).exists() {
        podnet::delete_pod_end(Path::new(&env.netns), &env.ifname)
            .or_code(code::WIRING_FAILED, "removing the pod interface")?;
    }
    let Some((ip, owner)) = store
        .find(&env.container_id, &env.ifname)
        .or_code(code::IO_FAILURE, "IPAM store")?
    else {
        return Ok(());
    };
    release_host_side(&datapath::pin_dir(&conf.node), ip, &owner.host_interface)
        .or_code(code::WIRING_FAILED, "cleaning up the host side")?;
    store
        .release(ip)
        .or_code(code::IO_FAILURE, "releasing the address")
}

/// Release every attachment the runtime no longer lists as valid.
fn gc(conf: &NetConf) -> Result<(), CniError> {
    let Some(valid) = &conf.valid_attachments else {
        return Ok(()); // nothing to compare with: keep everything
    };
    let store = Store::lock(&conf.ipam_dir()).or_code(code::IO_FAILURE, "IPAM store")?;
    let pin_dir = datapath::pin_dir(&conf.node);
    for (ip, owner) in store
        .allocations()
        .or_code(code::IO_FAILURE, "IPAM store")?
    {
        let listed = valid
            .iter()
            .any(|a| a.container_id == owner.container_id && a.ifname == owner.ifname);
        if !listed {
            release_host_side(&pin_dir, ip, &owner.host_interface)
                .or_code(code::WIRING_FAILED, "cleaning up the host side")?;
            store
                .release(ip)
                .or_code(code::IO_FAILURE, "releasing the address")?;
        }
    }
    Ok(())
}

/// Verify the attachment is still as ADD left it.
fn check(env: &Environment, conf: &NetConf) -> Result<(), CniError> {
    if conf.cni_version.starts_with("0.3") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "CHECK needs cniVersion 0.4.0 or later",
        ));
    }
    let pin_dir = pin_dir_with_datapath(conf, code::CHECK_FAILED)?;
    let store = Store::lock(&conf.ipam_dir()).or_code(code::IO_FAILURE, "IPAM store")?;
    let Some((ip, owner)) = store
        .find(&env.container_id, &env.ifname)
        .or_code(code::IO_FAILURE, "IPAM store")?
    else {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("no attachment {}/{}", env.container_id, env.ifname),
        ));
    };
    let problems = check_attachment(env, conf, &pin_dir, ip, &owner)
        .or_code(code::CHECK_FAILED, "checking the attachment")?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(
            CniError::new(code::CHECK_FAILED, "the pod's networking changed")
                .details(problems.join("; ")),
        )
    }
}

fn check_attachment(
    env: &Environment,
    conf: &NetConf,
    pin_dir: &Path,
    ip: Ipv4Addr,
    owner: &Owner,
) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let address = format!("{ip}/32");
    let listed = conf
        .prev_result
        .as_ref()
        .and_then(|r| r["ips"].as_array())
        .is_some_and(|ips| ips.iter().any(|i| i["address"] == address.as_str()));
    if !listed {
        problems.push(format!("prevResult does not list {address}"));
    }
    let ifname = env.ifname.clone();
    let pod_side = podnet::in_netns(Path::new(&env.netns), move || {
        let mut found = (false, false);
        for ifaddr in nix::ifaddrs::getifaddrs()? {
            if ifaddr.interface_name != ifname {
                continue;
            }
            let address = ifaddr.address.as_ref();
            if let Some(link) = address.and_then(|a| a.as_link_addr()) {
                found.0 = link.addr() == Some(pod_mac_for(ip));
            }
            if let Some(inet) = address.and_then(|a| a.as_sockaddr_in()) {
                found.1 |= inet.ip() == ip;
            }
        }
        Ok(found)
    })?;
    if !pod_side.0 {
        problems.push(format!("{} is missing or has the wrong MAC", env.ifname));
    }
    if !pod_side.1 {
        problems.push(format!("{} does not have {ip}", env.ifname));
    }
    let host_ifindex = podnet::ifindex(&owner.host_interface);
    if host_ifindex.is_none() {
        problems.push(format!("host veth {} is missing", owner.host_interface));
    }
    let pinned = datapath::attachments(pin_dir)?;
    for attachment in datapath::pod_attachments(&owner.host_interface) {
        if !pinned.contains(&attachment) {
            problems.push(format!("no datapath link {}", attachment.pin_name()));
        }
    }
    let endpoint = NodeMaps::open(pin_dir)?.endpoint(&EndpointKey {
        address: ip.octets(),
    })?;
    if endpoint.map(|e| e.ifindex) != host_ifindex || host_ifindex.is_none() {
        problems.push(format!("endpoint map entry of {ip} is missing or stale"));
    }
    Ok(problems)
}

/// Ready when the datapath is pinned and the pod CIDR is known.
fn status(conf: &NetConf) -> Result<(), CniError> {
    pin_dir_with_datapath(conf, code::PLUGIN_NOT_AVAILABLE)?;
    pod_cidr(conf, code::PLUGIN_NOT_AVAILABLE)?;
    Ok(())
}
