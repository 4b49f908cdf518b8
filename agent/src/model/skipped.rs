//! What the model and the plan leave out, and why: a reason the agent can act on,
//! shown as the text logs and tests read.
use std::{fmt, net::IpAddr};

use super::{L4Addr, ServiceRef, SERVICE_NAME_LABEL};

/// An object (or part of one) left out of the model, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub object: String,
    pub reason: SkipReason,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// Why something was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The object or a field of it is invalid, or the node's limits refuse it: the
    /// text says which field and why.
    Invalid(String),
    /// A document of the YAML file of a kind the model does not read.
    UnsupportedKind { kind: String, api_version: String },
    /// A document of the YAML file that does not parse as its kind.
    SchemaMismatch(String),
    /// An EndpointSlice without the label naming its Service.
    NoServiceLabel,
    /// An EndpointSlice of another address type than IPv4 and IPv6 (FQDN).
    UnsupportedAddressType(String),
    /// An SCTP Service port; the Service's other ports apply.
    Sctp,
    /// A NodePort or LoadBalancer port the API server has not given a nodePort yet.
    NoNodePort,
    /// An endpoint without any address.
    EndpointWithoutAddresses,
    /// An endpoint address no Service may send traffic to.
    EndpointAddressRefused(IpAddr),
    /// A Node listed twice: the later one applies.
    NodeListedTwice,
    /// A frontend (of either family, as shown) another Service port took first
    /// (`owner` names it).
    FrontendTaken { frontend: String, owner: String },
    /// A pod's hostPort on a frontend or healthCheckNodePort that a Service or an
    /// older pod has (`owner` names it).
    HostPortTaken { frontend: L4Addr, owner: String },
    /// A health-check port another Service took first.
    HealthCheckPortTaken { port: u16, owner: ServiceRef },
    /// A pod IP another pod (`owner`, as namespace/name) took first.
    PodIpTaken { ip: IpAddr, owner: String },
    /// A pod IP whose endpoint entry names another live interface (a pod the CNI
    /// plugin wired, or one an earlier object named): that pod keeps it.
    PodIpHeld { ip: IpAddr, interface: String },
    /// More backends than a frontend's slot numbers can count.
    TooManyBackends {
        /// The frontend as shown (`10.96.0.1:80/TCP`, `[fd00::1]:80/TCP`).
        frontend: String,
        count: usize,
    },
    /// A Service map has no room for the frontend's new entries; `kept`: it was in
    /// the maps already and keeps the entries it had; `reserved`: what is left is
    /// kept for small frontends and kube-system's, and this one is neither.
    MapFull {
        map: &'static str,
        capacity: usize,
        kept: bool,
        reserved: bool,
    },
    /// Every rev-NAT index is in use.
    NoRevNatIndex,
    /// Every backend id is in use.
    /// The backend as shown.
    NoBackendId(String),
    /// A pod whose host interface does not exist (yet): the CNI plugin is still
    /// wiring it, so a later sync writes its endpoint.
    InterfaceMissing { interface: String },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(reason) => f.write_str(reason),
            Self::UnsupportedKind { kind, api_version } => {
                write!(f, "unsupported kind {kind:?} (apiVersion {api_version:?})")
            }
            Self::SchemaMismatch(error) => {
                write!(f, "does not match the Kubernetes schema: {error}")
            }
            Self::NoServiceLabel => write!(f, "no {SERVICE_NAME_LABEL} label"),
            Self::UnsupportedAddressType(address_type) => {
                write!(
                    f,
                    "addressType {address_type} is not supported (IPv4 and IPv6 only)"
                )
            }
            Self::Sctp => f.write_str("SCTP is not supported; the other ports still apply"),
            Self::NoNodePort => f.write_str("no nodePort allocated"),
            Self::EndpointWithoutAddresses => f.write_str("endpoint without addresses"),
            Self::EndpointAddressRefused(IpAddr::V4(ip)) => {
                write!(
                    f,
                    "endpoint address {ip} is loopback, link-local or multicast"
                )
            }
            Self::EndpointAddressRefused(IpAddr::V6(ip)) => {
                let what = crate::limits::special6(*ip).unwrap_or("special");
                write!(f, "endpoint address {ip} is {what}")
            }
            Self::NodeListedTwice => f.write_str("listed twice: the later one applies"),
            Self::FrontendTaken { frontend, owner } => {
                write!(f, "frontend {frontend} already used by {owner}")
            }
            Self::HostPortTaken { frontend, owner } => {
                write!(f, "hostPort {frontend} already used by {owner}")
            }
            Self::HealthCheckPortTaken { port, owner } => {
                write!(f, "healthCheckNodePort {port} already used by {owner}")
            }
            Self::PodIpTaken { ip, owner } => write!(f, "pod IP {ip} already used by {owner}"),
            Self::PodIpHeld { ip, interface } => write!(
                f,
                "pod IP {ip} is the address of the live pod behind {interface}, which keeps it"
            ),
            Self::TooManyBackends { frontend, count } => {
                write!(
                    f,
                    "{frontend} has {count} backends: more than a port may have"
                )
            }
            Self::MapFull {
                map,
                capacity,
                kept,
                reserved,
            } => {
                if *reserved {
                    write!(
                        f,
                        "{map} has only the room kept for small Services and kube-system left \
                         (1/{} of its {capacity} entries): the Service port is not written",
                        crate::limits::RESERVE_DIVISOR
                    )?;
                } else {
                    write!(
                        f,
                        "{map} is full ({capacity} entries): the Service port is not written"
                    )?;
                }
                if *kept {
                    f.write_str("; its backends stay as they were")?;
                }
                Ok(())
            }
            Self::NoRevNatIndex => f.write_str("no rev-NAT index left"),
            Self::NoBackendId(backend) => write!(f, "no backend id left for {backend}"),
            Self::InterfaceMissing { interface } => {
                write!(f, "host interface {interface} does not exist (yet)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use std::net::Ipv4Addr;

    /// Logs, the readiness endpoint and end-to-end tests read these texts.
    #[test]
    fn reasons_read_as_the_agent_has_always_logged_them() {
        let frontend = L4Addr {
            ip: Ipv4Addr::new(10, 96, 0, 1),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let ip = Ipv4Addr::new(127, 0, 0, 1);
        let owner = ServiceRef {
            namespace: "shop".into(),
            name: "web".into(),
        };
        for (reason, text) in [
            (
                SkipReason::Invalid("spec is missing".into()),
                "spec is missing",
            ),
            (
                SkipReason::UnsupportedKind {
                    kind: "Gizmo".into(),
                    api_version: "example.com/v1".into(),
                },
                "unsupported kind \"Gizmo\" (apiVersion \"example.com/v1\")",
            ),
            (
                SkipReason::SchemaMismatch("invalid type".into()),
                "does not match the Kubernetes schema: invalid type",
            ),
            (
                SkipReason::NoServiceLabel,
                "no kubernetes.io/service-name label",
            ),
            (
                SkipReason::UnsupportedAddressType("FQDN".into()),
                "addressType FQDN is not supported (IPv4 and IPv6 only)",
            ),
            (
                SkipReason::Sctp,
                "SCTP is not supported; the other ports still apply",
            ),
            (SkipReason::NoNodePort, "no nodePort allocated"),
            (
                SkipReason::EndpointWithoutAddresses,
                "endpoint without addresses",
            ),
            (
                SkipReason::EndpointAddressRefused(ip.into()),
                "endpoint address 127.0.0.1 is loopback, link-local or multicast",
            ),
            (
                SkipReason::EndpointAddressRefused("::1".parse().unwrap()),
                "endpoint address ::1 is loopback",
            ),
            (
                SkipReason::NodeListedTwice,
                "listed twice: the later one applies",
            ),
            (
                SkipReason::FrontendTaken {
                    frontend: frontend.to_string(),
                    owner: "shop/web:http".into(),
                },
                "frontend 10.96.0.1:80/TCP already used by shop/web:http",
            ),
            (
                SkipReason::HostPortTaken {
                    frontend,
                    owner: "pod shop/web (hostPort)".into(),
                },
                "hostPort 10.96.0.1:80/TCP already used by pod shop/web (hostPort)",
            ),
            (
                SkipReason::HealthCheckPortTaken { port: 32000, owner },
                "healthCheckNodePort 32000 already used by shop/web",
            ),
            (
                SkipReason::PodIpTaken {
                    ip: ip.into(),
                    owner: "shop/a".into(),
                },
                "pod IP 127.0.0.1 already used by shop/a",
            ),
            (
                SkipReason::PodIpHeld {
                    ip: ip.into(),
                    interface: "fer0123456789ab".into(),
                },
                "pod IP 127.0.0.1 is the address of the live pod behind fer0123456789ab, \
                 which keeps it",
            ),
            (
                SkipReason::TooManyBackends {
                    frontend: frontend.to_string(),
                    count: 70_000,
                },
                "10.96.0.1:80/TCP has 70000 backends: more than a port may have",
            ),
            (
                SkipReason::MapFull {
                    map: "ferrite_service",
                    capacity: 8,
                    kept: false,
                    reserved: false,
                },
                "ferrite_service is full (8 entries): the Service port is not written",
            ),
            (
                SkipReason::MapFull {
                    map: "ferrite_backend",
                    capacity: 800,
                    kept: false,
                    reserved: true,
                },
                "ferrite_backend has only the room kept for small Services and kube-system \
                 left (1/8 of its 800 entries): the Service port is not written",
            ),
            (
                SkipReason::MapFull {
                    map: "ferrite_backend",
                    capacity: 8,
                    kept: true,
                    reserved: false,
                },
                "ferrite_backend is full (8 entries): the Service port is not written; \
                 its backends stay as they were",
            ),
            (SkipReason::NoRevNatIndex, "no rev-NAT index left"),
            (
                SkipReason::NoBackendId(frontend.to_string()),
                "no backend id left for 10.96.0.1:80/TCP",
            ),
            (
                SkipReason::InterfaceMissing {
                    interface: "fer0123456789ab".into(),
                },
                "host interface fer0123456789ab does not exist (yet)",
            ),
        ] {
            assert_eq!(reason.to_string(), text);
        }
    }
}
