//! A Service -> its frontends (ClusterIP, NodePorts, LoadBalancer ingress IPs,
//! externalIPs) of each IP family it has, each with the backends its traffic policy
//! allows.
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    fields::{truncated, valid_port},
    frontends::{CheckedService, Frontends, ParsedPort, Policies},
    ip_families::{cluster_ips, ServiceFamily, SlicesByService},
    objects::{Service, ServicePort, ServiceSpec},
    HealthCheck, NodeContext, Protocol, ServiceRef, SkipReason, Skipped,
};
use crate::limits::Limits;

/// Ports one Service may have (Kubernetes sets no limit; a hostile Service with
/// thousands would take map space from every other one).
pub const MAX_SERVICE_PORTS: usize = 1024;

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The most `timeoutSeconds` Kubernetes accepts (1 day).
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

fn policies(spec: &ServiceSpec) -> Result<Policies, String> {
    let affinity_timeout_s = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => 0,
        "ClientIP" => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S as i32);
            if !(1..=MAX_AFFINITY_TIMEOUT_S).contains(&timeout) {
                return Err(format!(
                    "sessionAffinityConfig timeoutSeconds {timeout} is out of range 1-{MAX_AFFINITY_TIMEOUT_S}"
                ));
            }
            timeout as u32
        }
        other => return Err(format!("unknown sessionAffinity {:?}", truncated(other))),
    };
    let mut source_ranges = Vec::new();
    for range in spec.load_balancer_source_ranges.iter().flatten() {
        let net: IpNet = range.trim().parse().map_err(|_| {
            format!(
                "loadBalancerSourceRanges {:?} is not a CIDR",
                truncated(range)
            )
        })?;
        source_ranges.push(net.trunc());
    }
    source_ranges.sort();
    source_ranges.dedup();
    Ok(Policies {
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        affinity_timeout_s,
        source_ranges,
    })
}

/// A Service's frontends of each family, and the health-check port it asks for.
pub(super) struct BuiltService {
    pub frontends: Frontends<Ipv4Addr>,
    pub frontends6: Frontends<Ipv6Addr>,
    pub health_check: Option<(u16, HealthCheck)>,
}

/// A Service's frontends, with the health-check port it asks for, in named steps:
/// everything that makes the Service invalid is an `Err` (the Service is skipped
/// whole, both families), anything that leaves only part of it out is pushed to
/// `skipped`.
pub(super) fn service_frontends(
    service: &Service,
    slices_by_service: &SlicesByService,
    here: &NodeContext,
    skipped: &mut Vec<Skipped>,
) -> Result<BuiltService, String> {
    let service_ref = service_ref(service)?;
    let spec = service.spec.as_ref().ok_or("spec is missing")?;
    let service_type = ServiceType::of(spec)?;
    let vips = cluster_ips(spec)?;
    let vip4 = admitted_cluster_ip::<Ipv4Addr>(vips.v4, here)?;
    let vip6 = admitted_cluster_ip::<Ipv6Addr>(vips.v6, here)?;
    let ports = port_list(spec)?;
    let policy = policies(spec)?;
    // A LoadBalancer that asked for no nodePorts has none, and that is no fault.
    let wants_node_ports = service_type.has_node_ports()
        && !(service_type == ServiceType::LoadBalancer
            && spec.allocate_load_balancer_node_ports == Some(false));
    let ports = parse_ports(ports, wants_node_ports, &service_ref, &here.limits, skipped)?;
    let checked = CheckedService {
        service,
        service_ref,
        is_load_balancer: service_type == ServiceType::LoadBalancer,
        policy,
        ports,
    };
    let slices = slices_by_service.get(&checked.service_ref);
    let (frontends, local4) = match vip4 {
        Some(vip) => checked.family_frontends(vip, slices, here, skipped)?,
        None => (Vec::new(), 0),
    };
    let (frontends6, local6) = match vip6 {
        Some(vip) => checked.family_frontends(vip, slices, here, skipped)?,
        None => (Vec::new(), 0),
    };
    // The node has a local endpoint when it has one of either family.
    let local_endpoints = local4.max(local6);
    let (policy, service_ref) = (&checked.policy, &checked.service_ref);
    let health_check = health_check(spec, service_type, policy, service_ref, local_endpoints)?
        .filter(|(port, _)| match here.limits.refuse_node_port(*port) {
            // Not a port the node hands out: left unserved, the frontends still apply.
            Some(reason) => {
                skipped.push(Skipped {
                    object: format!("Service {service_ref} healthCheckNodePort {port}"),
                    reason: SkipReason::Invalid(reason),
                });
                false
            }
            None => true,
        });
    Ok(BuiltService {
        frontends,
        frontends6,
        health_check,
    })
}

/// The Service's clusterIP of family `A`, if it has one the node accepts; one it
/// refuses leaves the whole Service out (both families).
fn admitted_cluster_ip<A: ServiceFamily>(
    vip: Option<A>,
    here: &NodeContext,
) -> Result<Option<A>, String> {
    let Some(vip) = vip else {
        return Ok(None);
    };
    match here
        .limits
        .refuse_frontend(vip, "spec.clusterIP", here.node_ips())
    {
        Some(reason) => Err(reason),
        None => Ok(Some(vip)),
    }
}

/// The Service's name, checked as the API server checks it, in its namespace.
fn service_ref(service: &Service) -> Result<ServiceRef, String> {
    let name = service
        .metadata
        .name
        .as_deref()
        .ok_or("metadata.name is missing")?;
    if !is_dns_label(name) {
        return Err(format!(
            "metadata.name {:?} is not a DNS label (1-63 lowercase letters, digits, '-')",
            truncated(name)
        ));
    }
    Ok(ServiceRef::in_namespace_of(&service.metadata, name))
}

/// The Service types that are load-balanced (ExternalName ones are not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    fn of(spec: &ServiceSpec) -> Result<Self, String> {
        match spec.type_.as_deref().unwrap_or("ClusterIP") {
            "ClusterIP" => Ok(Self::ClusterIp),
            "NodePort" => Ok(Self::NodePort),
            "LoadBalancer" => Ok(Self::LoadBalancer),
            "ExternalName" => {
                Err("ExternalName Services are resolved by DNS, not load-balanced".into())
            }
            other => Err(format!("unknown Service type {other:?}")),
        }
    }

    /// NodePort and LoadBalancer Services have a nodePort on every port.
    fn has_node_ports(self) -> bool {
        self != Self::ClusterIp
    }
}

/// `spec.ports`: at least one, and not so many that one Service fills the maps every
/// other Service shares.
fn port_list(spec: &ServiceSpec) -> Result<&[ServicePort], String> {
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err("spec.ports is empty".into());
    }
    if ports.len() > MAX_SERVICE_PORTS {
        return Err(format!(
            "{} ports (more than {MAX_SERVICE_PORTS})",
            ports.len()
        ));
    }
    Ok(ports)
}

/// Every port checked before any frontend is made, so a bad Service is skipped whole,
/// never half-applied. An SCTP port, or a missing nodePort, leaves out only itself.
fn parse_ports<'a>(
    ports: &'a [ServicePort],
    wants_node_ports: bool,
    service_ref: &ServiceRef,
    limits: &Limits,
    skipped: &mut Vec<Skipped>,
) -> Result<Vec<ParsedPort<'a>>, String> {
    let mut parsed = Vec::with_capacity(ports.len());
    for port in ports {
        let number = valid_port(port.port, "port")?;
        let protocol = match Protocol::parse(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(other) if other == "SCTP" => {
                skipped.push(Skipped {
                    object: format!("Service {service_ref} port {number}/SCTP"),
                    reason: SkipReason::Sctp,
                });
                continue;
            }
            Err(other) => return Err(format!("unknown protocol {other:?} on port {number}")),
        };
        if let Some(IntOrString::Int(target)) = &port.target_port {
            valid_port(*target, "targetPort")?;
        }
        let node_port = match (wants_node_ports, port.node_port) {
            (true, Some(n)) => {
                let node_port = valid_port(n, "nodePort")?;
                if let Some(reason) = limits.refuse_node_port(node_port) {
                    return Err(reason);
                }
                Some(node_port)
            }
            (true, None) => {
                // The API server allocates one; without it only the other frontends apply.
                skipped.push(Skipped {
                    object: format!("Service {service_ref} port {number}"),
                    reason: SkipReason::NoNodePort,
                });
                None
            }
            (false, _) => None,
        };
        parsed.push(ParsedPort {
            spec: port,
            number,
            protocol,
            node_port,
        });
    }
    Ok(parsed)
}

/// The health-check port of an `externalTrafficPolicy: Local` LoadBalancer.
fn health_check(
    spec: &ServiceSpec,
    service_type: ServiceType,
    policy: &Policies,
    service_ref: &ServiceRef,
    local_endpoints: usize,
) -> Result<Option<(u16, HealthCheck)>, String> {
    Ok(match spec.health_check_node_port {
        Some(port) if service_type == ServiceType::LoadBalancer && policy.external_local => Some((
            valid_port(port, "healthCheckNodePort")?,
            HealthCheck {
                service: service_ref.clone(),
                local_endpoints,
            },
        )),
        _ => None,
    })
}

/// RFC 1035 label, as Kubernetes requires of Service names.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use super::*;

    #[test]
    fn a_load_balancer_has_clusterip_nodeport_ingress_and_external_ip_frontends() {
        let (state, skipped) = build_yaml(&load_balancer(
            ", externalTrafficPolicy: Local, healthCheckNodePort: 32000, sessionAffinity: ClientIP, loadBalancerSourceRanges: [203.0.113.0/24, \"2001:db8::/32\"]",
        ));
        assert!(skipped.is_empty(), "{skipped:?}");
        let all = vec![tcp("10.244.0.11", 8080), tcp("10.244.1.11", 8080)];
        let local = vec![tcp("10.244.0.11", 8080)];
        let terminating = vec![tcp("10.244.0.12", 8080)];
        let expect = |frontend: L4Addr, kind, backends: &Vec<L4Addr>, ranges: &[&str]| {
            let f = &state.services[&frontend];
            assert_eq!(f.kind, kind, "{frontend}");
            assert_eq!(&f.backends, backends, "{frontend}");
            assert_eq!(f.terminating, terminating, "{frontend}");
            assert_eq!(f.local_only, kind.is_external(), "{frontend}");
            // In-cluster clients of the external frontends reach every endpoint.
            let in_cluster = kind.is_external().then(|| InClusterBackends {
                backends: all.clone(),
                terminating: terminating.clone(),
            });
            assert_eq!(f.in_cluster, in_cluster, "{frontend}");
            assert_eq!(f.affinity_timeout_s, DEFAULT_AFFINITY_TIMEOUT_S);
            let ranges: Vec<ipnet::Ipv4Net> = ranges.iter().map(|r| r.parse().unwrap()).collect();
            assert_eq!(f.source_ranges, ranges, "{frontend}");
        };
        expect(tcp("10.96.0.5", 80), FrontendKind::ClusterIp, &all, &[]);
        expect(
            tcp("198.51.100.1", 30080),
            FrontendKind::NodePort,
            &local,
            &[],
        );
        expect(
            tcp("192.0.2.100", 80),
            FrontendKind::LoadBalancer,
            &local,
            &["203.0.113.0/24"],
        );
        expect(
            tcp("192.0.2.200", 80),
            FrontendKind::ExternalIp,
            &local,
            &[],
        );
        assert_eq!(state.services.len(), 4);
        assert_eq!(
            state.health_checks[&32000],
            HealthCheck {
                service: ServiceRef {
                    namespace: "shop".into(),
                    name: "lb".into()
                },
                local_endpoints: 1
            }
        );
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints_for_the_cluster_ip() {
        let (state, _) = build_yaml(&load_balancer(", internalTrafficPolicy: Local"));
        let cluster_ip = &state.services[&tcp("10.96.0.5", 80)];
        assert_eq!(cluster_ip.backends, vec![tcp("10.244.0.11", 8080)]);
        assert!(cluster_ip.local_only);
        // External frontends keep every endpoint (externalTrafficPolicy: Cluster).
        let node_port = &state.services[&tcp("198.51.100.1", 30080)];
        assert_eq!(node_port.backends.len(), 2);
        assert!(!node_port.local_only);
        assert!(state.health_checks.is_empty());
    }

    #[test]
    fn bad_affinity_and_source_ranges_skip_the_service_with_a_reason() {
        for (extra, reason) in [
            (
                ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}",
                "timeoutSeconds 0",
            ),
            (", sessionAffinity: Sticky", "unknown sessionAffinity"),
            (", loadBalancerSourceRanges: [everyone]", "not a CIDR"),
        ] {
            let (state, skipped) = build_yaml(&load_balancer(extra));
            assert!(state.services.is_empty(), "{extra}");
            assert!(
                skipped.iter().any(|s| s.reason.to_string().contains(reason)),
                "{extra}: {skipped:?}"
            );
        }
    }

    #[test]
    fn headless_and_external_name_are_skipped_with_reasons() {
        let (state, skipped) = build_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
"#,
        );
        assert!(state.services.is_empty());
        assert_eq!(skipped.len(), 2);
        assert!(
            skipped[0].reason.to_string().contains("headless"),
            "{}",
            skipped[0]
        );
        assert!(
            skipped[1].reason.to_string().contains("ExternalName"),
            "{}",
            skipped[1]
        );
    }

    #[test]
    fn a_health_check_port_outside_the_node_port_range_is_not_served() {
        let (state, skipped) = build_yaml(&load_balancer(
            ", externalTrafficPolicy: Local, healthCheckNodePort: 10250",
        ));
        assert!(state.health_checks.is_empty());
        assert_eq!(state.services.len(), 4, "the frontends still apply");
        assert!(
            skipped
                .iter()
                .any(|s| s.object.contains("healthCheckNodePort 10250")
                    && s.reason.to_string().contains("outside the node port range")),
            "{skipped:?}"
        );
    }

    /// kube-proxy's label rules: Services labelled for another proxy, or headless,
    /// are left alone (no frontend, no refusal); `--service-proxy-name` picks ours.
    #[test]
    fn services_labelled_for_another_proxy_or_headless_are_left_alone() {
        let service = |name: &str, labels: &str, ip: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, labels: {{{labels}}}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n")
        };
        let yaml = [
            service("plain", "", "10.96.0.41"),
            service(
                "other",
                "service.kubernetes.io/service-proxy-name: other-proxy",
                "10.96.0.42",
            ),
            service(
                "ours",
                "service.kubernetes.io/service-proxy-name: ferrite",
                "10.96.0.43",
            ),
            service(
                "headless",
                "service.kubernetes.io/headless: ''",
                "10.96.0.44",
            ),
        ]
        .join("---\n");
        let (objects, _) = crate::objects_yaml::parse_objects(&yaml).unwrap();
        let served = |proxy_name: Option<&str>| -> Vec<u8> {
            let limits = crate::limits::Limits {
                service_proxy_name: proxy_name.map(String::from),
                ..open_limits()
            };
            let (context, _) = NodeContext::new(NODE, &limits, &objects.nodes, None);
            let (state, skipped) = build(&objects, &context);
            assert!(skipped.is_empty(), "{skipped:?}");
            state.services.keys().map(|f| f.ip.octets()[3]).collect()
        };
        assert_eq!(served(None), vec![41]);
        assert_eq!(served(Some("ferrite")), vec![43]);
    }

    /// `--nodeport-addresses`: by default (`primary`) a NodePort answers on the
    /// InternalIP only; with CIDRs, on every address of the node inside them
    /// (a secondary address, a second interface's), never on loopback.
    #[test]
    fn node_ports_answer_on_the_node_addresses_nodeport_addresses_selects() {
        let yaml = format!(
            "{SHOP_NODE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{type: NodePort, clusterIP: 10.96.0.10, ports: [{{port: 80, nodePort: 30080}}]}}\n"
        );
        let (objects, _) = crate::objects_yaml::parse_objects(&yaml).unwrap();
        let host: Vec<Ipv4Addr> = [
            "127.0.0.1",
            "198.51.100.1",
            "198.51.100.7",
            "192.0.2.9",
            "10.1.0.4",
        ]
        .iter()
        .map(|ip| ip.parse().unwrap())
        .collect();
        let node_ports = |addresses: &str| -> Vec<String> {
            let limits = crate::limits::Limits {
                node_port_addresses: crate::limits::NodePortAddresses::parse(addresses).unwrap(),
                ..open_limits()
            };
            let (context, _) = NodeContext::new(NODE, &limits, &objects.nodes, None);
            let context = context.with_host_addresses(host.clone());
            let (state, skipped) = build(&objects, &context);
            assert!(skipped.is_empty(), "{skipped:?}");
            state
                .services
                .iter()
                .filter(|(_, f)| f.kind == FrontendKind::NodePort)
                .map(|(a, _)| a.to_string())
                .collect()
        };
        assert_eq!(node_ports("primary"), ["198.51.100.1:30080/TCP"]);
        assert_eq!(
            node_ports("198.51.100.0/24,192.0.2.0/24"),
            [
                "192.0.2.9:30080/TCP",
                "198.51.100.1:30080/TCP",
                "198.51.100.7:30080/TCP"
            ]
        );
        assert_eq!(node_ports("0.0.0.0/0").len(), 4, "all but loopback");
        assert_eq!(node_ports("127.0.0.0/8"), Vec::<String>::new());
    }

    /// A LoadBalancer that asked for no nodePorts has none (and no complaint); an
    /// ingress IP the load balancer proxies from (`ipMode: Proxy`) is not captured;
    /// several ingress IPs and a hostname-only entry.
    #[test]
    fn load_balancers_without_node_ports_and_proxy_ip_mode_ingress() {
        let (state, skipped) = build_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: shop}
spec: {type: LoadBalancer, clusterIP: 10.96.0.5, allocateLoadBalancerNodePorts: false, ports: [{port: 80}]}
status:
  loadBalancer:
    ingress:
    - {ip: 192.0.2.100, ipMode: VIP}
    - {ip: 192.0.2.101, ipMode: Proxy}
    - {ip: 192.0.2.102}
    - {hostname: lb.example}
"#,
        );
        assert!(skipped.is_empty(), "{skipped:?}");
        let frontends: Vec<String> = state.services.keys().map(ToString::to_string).collect();
        assert_eq!(
            frontends,
            [
                "10.96.0.5:80/TCP",
                "192.0.2.100:80/TCP",
                "192.0.2.102:80/TCP"
            ]
        );
    }

    #[test]
    fn sctp_port_is_skipped_but_other_ports_apply() {
        let (state, skipped) = build_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: mixed}
spec: {clusterIP: 10.96.0.40, ports: [{name: a, port: 80}, {name: b, port: 9, protocol: SCTP}]}
"#,
        );
        assert_eq!(state.services.len(), 1);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].reason, SkipReason::Sctp);
        assert!(skipped[0].reason.to_string().contains("SCTP"));
    }
}
