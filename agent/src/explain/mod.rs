//! `ferrite explain`: what the node's loaded datapath programs do with a packet,
//! against its live pinned maps, changing nothing. The packet a sender on the chosen
//! side would send is built and run with BPF_PROG_TEST_RUN through the explain copy
//! of the program of the attach point it enters (the same logic, loaded with the
//! node's programs from the same object, never attached): it takes the decisions a
//! real packet would but skips every write (conntrack, affinity pins, SNAT ports,
//! fragments, counters, drop logs), noting them with its steps and verdict in
//! `ferrite_trace` (see `ferrite_common::explain`). Runs in the node's network
//! namespace (test runs resolve device indexes there).
//! - `pod`: the pod's frame entering its host veth (`ferrite_from_pod`);
//! - `overlay`: the inner frame as the node's VXLAN device hands it over, with the
//!   tunnel key of the node owning the source (`ferrite_from_overlay`);
//! - `world`: the frame arriving on the uplink: the XDP program (`ferrite_from_world`),
//!   then, if it passes the packet, the uplink's tcx program (`ferrite_from_uplink`),
//!   or that one alone on a node balancing external traffic at tcx;
//! - `--socket`: a `connect()`/`sendmsg()` to a Service: socket-level programs cannot
//!   be test-run, so the never-attached `ferrite_explain_sock` runs the same frontend
//!   match and `lb::choose` on the address, hashed over a socket cookie.
mod frame;
mod policy;
mod report;
pub mod run;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
};

use anyhow::{bail, Context, Result};
use aya::maps::lpm_trie::Key;
use ferrite_common::{
    config_flag, explain::SockRequest, pod_mac_for, program_names, vtep_mac_for, Endpoint6Key,
    EndpointInfo, EndpointKey, NodeConfig, RouteInfo, HOST_VETH_MAC, PROTO_TCP, ROUTE_NODE,
};

pub use frame::FrameSummary;
pub use policy::PolicyEnd;
pub use report::{render_table, Explanation, ProgramRun, Verdict};

use crate::{maps::NodeMaps, model::policy::PolicyNames, plan::Interface};

/// Which side the packet comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ingress {
    /// A pod of this node: its frame enters the pod's host veth.
    Pod,
    /// A pod of another node: the inner frame arrives decapsulated on the VXLAN device.
    Overlay,
    /// Outside the cluster: the frame arrives on the node's uplink.
    World,
}

/// What to explain: a packet of one family (IPv4 or IPv6; a socket call: IPv4).
#[derive(Clone, Debug)]
pub struct Request {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub protocol: u8,
    pub ingress: Ingress,
    /// Pod ingress: the host veth the frame enters (default: the source pod's own).
    pub veth: Option<String>,
    /// Overlay ingress: the node the tunnel comes from (default: the node whose pod
    /// CIDR holds the source).
    pub sender_node: Option<Ipv4Addr>,
    /// Explain a socket's `connect()` (TCP) or `sendmsg()` (UDP) instead of a packet.
    pub socket: bool,
    /// Socket: the cookie backends are hashed over (a real socket's is unknown ahead).
    pub cookie: u64,
    /// Keep each program's output frame as hex.
    pub hex: bool,
}

/// The source port a sender picks when none is given (an ephemeral port).
pub const DEFAULT_SOURCE_PORT: u16 = 40000;

/// Explain `request` against the node whose pins are in `pin_dir`; `names` tells
/// which NetworkPolicies the policy maps' rules come from (the node's agent).
pub fn explain(
    node: &str,
    pin_dir: &Path,
    names: &dyn PolicyNames,
    request: &Request,
) -> Result<Explanation> {
    let maps = NodeMaps::open(pin_dir)?;
    let config = maps.config.get(&0, 0).context("reading ferrite_config")?;
    let interfaces = crate::host::interfaces::interfaces()?;
    let runner = run::Runner::new(pin_dir)?;
    let context = NodeView {
        maps: &maps,
        config,
        interfaces: &interfaces,
    };
    let flow = frame::Flow {
        source: request.source,
        destination: request.destination,
        protocol: request.protocol,
    };
    if flow.source.is_ipv4() != flow.destination.is_ipv4() {
        bail!(
            "{} and {} are of different families",
            flow.source,
            flow.destination
        );
    }
    let mut runs = Vec::new();
    if request.socket {
        let SocketAddr::V4(destination) = request.destination else {
            bail!(
                "--socket explains IPv4 Services only (IPv6 Services are not in the datapath yet)"
            );
        };
        let traced = runner.socket(SockRequest {
            address: destination.ip().octets(),
            port: request.destination.port(),
            proto: request.protocol,
            cookie: request.cookie,
            ..SockRequest::default()
        })?;
        runs.push(report::socket_run(&context, names, request, &traced)?);
        return Ok(Explanation::new(node, request, "socket", runs));
    }
    match request.ingress {
        Ingress::Pod => {
            let (ifindex, device, source_mac) = pod_veth(&context, request)?;
            let packet = frame::first_packet(&flow, HOST_VETH_MAC, source_mac)?;
            let hook = format!("tcx ingress of {device} (ifindex {ifindex})");
            let traced = runner.tc(
                program_names::FROM_POD,
                &packet,
                &run::TcContext {
                    ifindex,
                    cb: [0; 5],
                },
            )?;
            runs.push(report::packet_run(
                &context,
                names,
                request,
                program_names::FROM_POD,
                hook,
                &traced,
            )?);
        }
        Ingress::Overlay => {
            let vxlan = config.vxlan_ifindex;
            if vxlan == 0 {
                bail!("this node has no overlay device yet (ferrite_config: vxlan_ifindex 0)");
            }
            let sender = match request.sender_node {
                Some(node) => node,
                None => context.sender_node(flow.source.ip())?,
            };
            let packet = frame::first_packet(&flow, config.vtep_mac, vtep_mac_for(sender))?;
            let hook = format!(
                "tcx ingress of {} (ifindex {vxlan}), tunnel from {sender} (VNI {})",
                context.device_name(vxlan),
                config.vni
            );
            let traced = runner.tc(
                program_names::FROM_OVERLAY,
                &packet,
                &run::TcContext {
                    ifindex: vxlan,
                    cb: [config.vni, u32::from(sender), 0, 0, 0],
                },
            )?;
            runs.push(report::packet_run(
                &context,
                names,
                request,
                program_names::FROM_OVERLAY,
                hook,
                &traced,
            )?);
        }
        Ingress::World => {
            let (name, uplink) = context.uplink()?;
            const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
            let mut packet = frame::first_packet(&flow, uplink.mac, ROUTER_MAC)?;
            let tc_hook = format!("tcx ingress of {name} (ifindex {})", uplink.ifindex);
            if config.flags & config_flag::EXTERNAL_IN_TC == 0 {
                // The receive queue of a device without XDP attached is not set up
                // for XDP: the run then takes the test run's own device.
                let traced = runner
                    .xdp(&packet, Some(uplink.ifindex))
                    .or_else(|_| runner.xdp(&packet, None))?;
                let passed = traced.return_value == report::XDP_PASS;
                packet = traced.frame.clone();
                runs.push(report::packet_run(
                    &context,
                    names,
                    request,
                    program_names::FROM_WORLD,
                    format!("XDP of {name} (ifindex {})", uplink.ifindex),
                    &traced,
                )?);
                if !passed {
                    return Ok(Explanation::new(node, request, "world", runs));
                }
            }
            let traced = runner.tc(
                program_names::FROM_UPLINK,
                &packet,
                &run::TcContext {
                    ifindex: uplink.ifindex,
                    cb: [0; 5],
                },
            )?;
            runs.push(report::packet_run(
                &context,
                names,
                request,
                program_names::FROM_UPLINK,
                tc_hook,
                &traced,
            )?);
        }
    }
    let side = match request.ingress {
        Ingress::Pod => "pod",
        Ingress::Overlay => "overlay",
        Ingress::World => "world",
    };
    Ok(Explanation::new(node, request, side, runs))
}

/// The node's maps and devices, read once for the explanation.
pub(crate) struct NodeView<'a> {
    pub maps: &'a NodeMaps,
    pub config: NodeConfig,
    pub interfaces: &'a BTreeMap<String, Interface>,
}

impl NodeView<'_> {
    /// The name of the device with `ifindex` in this network namespace.
    pub fn device_name(&self, ifindex: u32) -> String {
        self.interfaces
            .iter()
            .find(|(_, i)| i.ifindex == ifindex)
            .map(|(name, _)| name.clone())
            .unwrap_or_else(|| format!("ifindex {ifindex}"))
    }

    /// The route covering `address` (longest prefix; `ferrite_routes` or
    /// `ferrite_routes6` by family), if any.
    pub fn route(&self, address: IpAddr) -> Option<RouteInfo> {
        match address {
            IpAddr::V4(v4) => self.maps.routes.get(&Key::new(32, v4.octets()), 0),
            IpAddr::V6(v6) => self.maps.routes6.get(&Key::new(128, v6.octets()), 0),
        }
        .ok()
    }

    /// The pod of this node with `address`, if any (`ferrite_endpnt` or
    /// `ferrite_endpnt6` by family).
    pub fn endpoint(&self, address: IpAddr) -> Result<Option<EndpointInfo>> {
        match address {
            IpAddr::V4(v4) => self.maps.endpoint(&EndpointKey {
                address: v4.octets(),
            }),
            IpAddr::V6(v6) => self.maps.endpoint6(&Endpoint6Key {
                address: v6.octets(),
            }),
        }
    }

    /// The node whose pod CIDR holds `address` (the sender of its overlay packets;
    /// the tunnel is IPv4 for either family).
    fn sender_node(&self, address: IpAddr) -> Result<Ipv4Addr> {
        match self.route(address) {
            Some(route) if route.flags & ROUTE_NODE == 0 => Ok(Ipv4Addr::from(route.node_ip)),
            _ => bail!(
                "{address} is in no node's pod CIDR: give the sending node with --sender-node"
            ),
        }
    }

    /// The uplink: the device holding the node's IP.
    fn uplink(&self) -> Result<(String, Interface)> {
        let node_ip = Ipv4Addr::from(self.config.node_ip);
        if node_ip.is_unspecified() {
            bail!("the node's IP is not known yet (ferrite_config: node_ip 0.0.0.0)");
        }
        let name = crate::host::interfaces::interface_with_address(node_ip)?
            .with_context(|| format!("no device here has the node's IP {node_ip}"))?;
        let uplink = self
            .interfaces
            .get(&name)
            .with_context(|| format!("device {name}"))?;
        Ok((name, *uplink))
    }
}

/// The host veth a pod's frame enters (`--veth`, else the source pod's own) and
/// the MAC the frame comes from (the source pod's, when it is a pod of this node).
fn pod_veth(context: &NodeView, request: &Request) -> Result<(u32, String, [u8; 6])> {
    let source = request.source.ip();
    let endpoint = context.endpoint(source)?;
    let source_mac = match (endpoint, source) {
        (_, IpAddr::V4(v4)) => pod_mac_for(v4),
        (Some(endpoint), IpAddr::V6(_)) => endpoint.pod_mac,
        // A spoofed IPv6 source: any unicast MAC (the datapath does not look at it).
        (None, IpAddr::V6(_)) => UNKNOWN_POD_MAC,
    };
    if let Some(name) = &request.veth {
        let interface = context
            .interfaces
            .get(name)
            .with_context(|| format!("no device {name} here"))?;
        return Ok((interface.ifindex, name.clone(), source_mac));
    }
    let endpoint = endpoint.with_context(|| {
        format!("{source} is not a pod of this node: give the veth it enters with --veth")
    })?;
    Ok((
        endpoint.ifindex,
        context.device_name(endpoint.ifindex),
        source_mac,
    ))
}

/// The source MAC of a frame from an IPv6 address that is no pod of this node: a
/// locally administered unicast one.
const UNKNOWN_POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// `ADDRESS[:PORT]`: a source, with an ephemeral port when none is given; IPv6 as
/// `fd00::2` or `[fd00::2]:PORT`.
pub fn parse_source(value: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = value.parse::<SocketAddr>() {
        return Ok(address);
    }
    value
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_SOURCE_PORT))
        .map_err(|_| format!("{value:?} is not ADDRESS, ADDRESS:PORT or [IPV6]:PORT"))
}

/// `ADDRESS:PORT/tcp` or `ADDRESS:PORT/udp` (IPv6: `[ADDRESS]:PORT/tcp`).
pub fn parse_destination(value: &str) -> Result<(SocketAddr, u8), String> {
    let (address, protocol) = value
        .rsplit_once('/')
        .ok_or_else(|| format!("{value:?}: expected ADDRESS:PORT/tcp or ADDRESS:PORT/udp"))?;
    let protocol = match protocol.to_ascii_lowercase().as_str() {
        "tcp" => PROTO_TCP,
        "udp" => ferrite_common::PROTO_UDP,
        other => return Err(format!("{other:?}: only tcp and udp are explained")),
    };
    let address = address
        .parse::<SocketAddr>()
        .map_err(|_| format!("{address:?} is not ADDRESS:PORT or [IPV6]:PORT"))?;
    Ok((address, protocol))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_take_an_ephemeral_port_when_none_is_given() {
        assert_eq!(
            parse_source("10.244.0.2").unwrap(),
            "10.244.0.2:40000".parse().unwrap()
        );
        assert_eq!(
            parse_source("10.244.0.2:1234").unwrap(),
            "10.244.0.2:1234".parse().unwrap()
        );
        assert!(parse_source("pod-a").is_err());
    }

    #[test]
    fn destinations_need_a_port_and_a_protocol() {
        assert_eq!(
            parse_destination("10.96.0.10:80/tcp").unwrap(),
            ("10.96.0.10:80".parse().unwrap(), PROTO_TCP)
        );
        assert_eq!(
            parse_destination("10.96.0.10:53/UDP").unwrap().1,
            ferrite_common::PROTO_UDP
        );
        assert!(parse_destination("10.96.0.10:80").is_err());
        assert!(parse_destination("10.96.0.10/tcp").is_err());
        assert!(parse_destination("10.96.0.10:80/sctp").is_err());
    }

    #[test]
    fn ipv6_sources_and_destinations_are_bracketed_with_a_port() {
        assert_eq!(
            parse_source("fd00:10:244::2").unwrap(),
            "[fd00:10:244::2]:40000".parse().unwrap()
        );
        assert_eq!(
            parse_source("[fd00:10:244::2]:1234").unwrap(),
            "[fd00:10:244::2]:1234".parse().unwrap()
        );
        assert_eq!(
            parse_destination("[fd00:10:244::1:3]:8080/tcp").unwrap(),
            ("[fd00:10:244::1:3]:8080".parse().unwrap(), PROTO_TCP)
        );
        assert!(parse_destination("fd00:10:244::1:3:8080/tcp").is_err());
    }
}
