//! One IP family's frontends of a Service: on its clusterIP of the family, the
//! node's addresses of the family at each nodePort, and its load-balancer ingress
//! IPs and externalIPs of the family; each with the backends the family's
//! EndpointSlices give and its traffic policy allows. The same code for both
//! families: a dual-stack Service is built once per family.
use std::net::IpAddr;

use ipnet::IpNet;

use super::{
    endpoints::{port_backends, PortEndpoints},
    fields::truncated,
    ip_families::{FamilySlices, ServiceFamily},
    objects::{Service, ServicePort},
    FrontendKind, InClusterBackends, L4Addr, NodeContext, Protocol, ServiceFrontend, ServiceRef,
    SkipReason, Skipped,
};
use crate::limits::{MAX_BACKENDS_PER_PORT, MAX_SERVICE_ENTRIES};

/// A family's frontends, in the order they were made.
pub(super) type Frontends<A> = Vec<(L4Addr<A>, ServiceFrontend<A>)>;

/// What a Service's spec says about every one of its frontends.
pub(super) struct Policies {
    pub external_local: bool,
    pub internal_local: bool,
    pub affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges`, of both families.
    pub source_ranges: Vec<IpNet>,
}

/// A Service port as checked.
pub(super) struct ParsedPort<'a> {
    pub spec: &'a ServicePort,
    pub number: u16,
    pub protocol: Protocol,
    /// None for a ClusterIP Service, or when none is allocated yet.
    pub node_port: Option<u16>,
}

impl ParsedPort<'_> {
    /// `namespace/name:port-name` (or `:number` for an unnamed port).
    fn display(&self, service: &ServiceRef) -> String {
        match self.spec.name.as_deref().unwrap_or("") {
            "" => format!("{service}:{}", self.number),
            name => format!("{service}:{name}"),
        }
    }
}

/// A Service as checked, whatever the family: what each family's frontends share.
pub(super) struct CheckedService<'a> {
    pub service: &'a Service,
    pub service_ref: ServiceRef,
    pub is_load_balancer: bool,
    pub policy: Policies,
    pub ports: Vec<ParsedPort<'a>>,
}

impl CheckedService<'_> {
    /// The frontends of family `A` on `vip` (the Service's clusterIP of the
    /// family), and the most ready endpoints of this node any port has.
    pub(super) fn family_frontends<A: ServiceFamily>(
        &self,
        vip: A,
        slices: Option<&FamilySlices>,
        here: &NodeContext,
        skipped: &mut Vec<Skipped>,
    ) -> Result<(Frontends<A>, usize), String> {
        let external_ips = self.external_ips::<A>(here, skipped)?;
        let ingress_ips = if self.is_load_balancer {
            self.ingress_ips::<A>(here, skipped)?
        } else {
            Vec::new()
        };
        let node_port_ips = A::node_port_ips(here);
        let slices = slices.map(A::slices).unwrap_or_default();
        let source_ranges: Vec<A::Net> = self
            .policy
            .source_ranges
            .iter()
            .filter_map(|net| A::net(A::from_ip(net.network())?, net.prefix_len()))
            .collect();
        let mut frontends = Vec::new();
        let mut local_endpoints = 0;
        for port in &self.ports {
            let display = port.display(&self.service_ref);
            let endpoints =
                port_backends::<A>(port.spec, port.protocol, slices, here, &display, skipped);
            local_endpoints = local_endpoints.max(endpoints.local_ready);
            let of_port = PortFrontends {
                service: &self.service_ref,
                policy: &self.policy,
                source_ranges: &source_ranges,
                protocol: port.protocol,
                display,
                endpoints,
            };
            frontends.push(of_port.frontend(vip, port.number, FrontendKind::ClusterIp));
            if let Some(node_port) = port.node_port {
                for ip in &node_port_ips {
                    frontends.push(of_port.frontend(*ip, node_port, FrontendKind::NodePort));
                }
            }
            for ip in &ingress_ips {
                frontends.push(of_port.frontend(*ip, port.number, FrontendKind::LoadBalancer));
            }
            for ip in &external_ips {
                frontends.push(of_port.frontend(*ip, port.number, FrontendKind::ExternalIp));
            }
        }
        check_size(&frontends)?;
        Ok((frontends, local_endpoints))
    }

    /// Whether the node accepts `ip` as a frontend address of the Service; one it
    /// refuses leaves only that frontend out, with its reason.
    fn admitted<A: ServiceFamily>(
        &self,
        ip: A,
        field: &str,
        here: &NodeContext,
        skipped: &mut Vec<Skipped>,
    ) -> bool {
        match here.limits.refuse_frontend(ip, field, here.node_ips()) {
            Some(reason) => {
                skipped.push(Skipped {
                    object: format!("Service {} {field} {ip}", self.service_ref),
                    reason: SkipReason::Invalid(reason),
                });
                false
            }
            None => true,
        }
    }

    /// `spec.externalIPs` of family `A` the node admits (every one must be an
    /// address: the other family's are that family's).
    fn external_ips<A: ServiceFamily>(
        &self,
        here: &NodeContext,
        skipped: &mut Vec<Skipped>,
    ) -> Result<Vec<A>, String> {
        let spec = self.service.spec.as_ref();
        let mut ips = Vec::new();
        for ip in spec
            .and_then(|s| s.external_ips.as_ref())
            .into_iter()
            .flatten()
        {
            let Some(ip) = of_family::<A>(ip, "spec.externalIPs")? else {
                continue;
            };
            if self.admitted(ip, "spec.externalIPs", here, skipped) {
                ips.push(ip);
            }
        }
        Ok(ips)
    }

    /// A LoadBalancer's `status.loadBalancer.ingress` IPs of family `A` the node
    /// admits.
    fn ingress_ips<A: ServiceFamily>(
        &self,
        here: &NodeContext,
        skipped: &mut Vec<Skipped>,
    ) -> Result<Vec<A>, String> {
        let ingress = self
            .service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        let mut ips = Vec::new();
        // An IP the load balancer proxies from (ipMode Proxy) stays the load
        // balancer's: in-cluster traffic to it goes there, as with kube-proxy.
        let captured = ingress
            .into_iter()
            .flatten()
            .filter(|entry| entry.ip_mode.as_deref() != Some("Proxy"));
        // Hostname-only ingress: nothing to serve here.
        for ip in captured.filter_map(|entry| entry.ip.as_deref()) {
            let Some(ip) = of_family::<A>(ip, "status.loadBalancer.ingress ip")? else {
                continue;
            };
            if self.admitted(ip, "status.loadBalancer.ingress", here, skipped) {
                ips.push(ip);
            }
        }
        Ok(ips)
    }
}

/// `value` if it is an address of family `A`; `None` if of the other family.
fn of_family<A: ServiceFamily>(value: &str, field: &str) -> Result<Option<A>, String> {
    let ip: IpAddr = value
        .parse()
        .map_err(|_| format!("{field} {:?} is not an IP address", truncated(value)))?;
    Ok(A::from_ip(ip))
}

/// What every frontend of one Service port shares: its endpoints and the Service's
/// policies, which pick each frontend's backends by its kind.
struct PortFrontends<'a, A: ServiceFamily> {
    service: &'a ServiceRef,
    policy: &'a Policies,
    source_ranges: &'a [A::Net],
    protocol: Protocol,
    display: String,
    endpoints: PortEndpoints<A>,
}

impl<A: ServiceFamily> PortFrontends<'_, A> {
    fn frontend(&self, ip: A, port: u16, kind: FrontendKind) -> (L4Addr<A>, ServiceFrontend<A>) {
        let policy = self.policy;
        let local_only = if kind.is_external() {
            policy.external_local
        } else {
            policy.internal_local
        };
        let (backends, terminating) = self.endpoints.for_policy(local_only);
        // kube-proxy sends in-cluster traffic to a Local frontend to any endpoint.
        let in_cluster = (kind.is_external() && local_only).then(|| {
            let (backends, terminating) = self.endpoints.for_policy(false);
            InClusterBackends {
                backends,
                terminating,
            }
        });
        let source_ranges = if kind == FrontendKind::LoadBalancer {
            self.source_ranges.to_vec()
        } else {
            Vec::new()
        };
        let suffix = kind.suffix();
        (
            L4Addr {
                ip,
                port,
                protocol: self.protocol,
            },
            ServiceFrontend {
                service: self.service.clone(),
                name: format!("{}{suffix}", self.display),
                backends,
                terminating,
                kind,
                local_only,
                in_cluster,
                affinity_timeout_s: policy.affinity_timeout_s,
                source_ranges,
            },
        )
    }
}

/// Bounded, so one Service can neither wrap a slot count nor fill the shared maps
/// (each family's maps its own).
fn check_size<A: ServiceFamily>(frontends: &Frontends<A>) -> Result<(), String> {
    let mut entries = 0;
    for (frontend, entry) in frontends {
        let backends = entry.backends.len() + entry.terminating.len();
        if backends > MAX_BACKENDS_PER_PORT {
            return Err(format!(
                "{frontend} has {backends} endpoints (more than {MAX_BACKENDS_PER_PORT} a port may have)"
            ));
        }
        entries += 1 + backends;
        if let Some(in_cluster) = &entry.in_cluster {
            entries += 1 + in_cluster.backends.len() + in_cluster.terminating.len();
        }
    }
    if entries > MAX_SERVICE_ENTRIES {
        return Err(format!(
            "{entries} Service map entries (more than {MAX_SERVICE_ENTRIES} one Service may take)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::super::test_support::*;
    use super::super::*;

    fn tcp6(s: &str, port: u16) -> L4Addr6 {
        L4Addr {
            ip: s.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        }
    }

    /// node-a, dual-stack.
    const DUAL_NODE: &str = "apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.0.0/24, podCIDRs: [10.244.0.0/24, 'fd00:10:244::/64']}
status: {addresses: [{type: InternalIP, address: 198.51.100.1}, {type: InternalIP, address: '2001:db8::1'}]}
";

    /// A dual-stack LoadBalancer `shop/lb` (`spec_extra` added) with one slice per
    /// family: a ready endpoint here, one on node-b, one terminating here.
    fn dual_stack(spec_extra: &str) -> String {
        let slice = |family: &str, name: &str, [here, there, ending]: [&str; 3]| {
            format!(
                "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: lb}}}}
addressType: {family}
ports: [{{port: 8080}}]
endpoints:
- {{addresses: ['{here}'], nodeName: node-a}}
- {{addresses: ['{there}'], nodeName: node-b}}
- {{addresses: ['{ending}'], nodeName: node-a, conditions: {{ready: false, serving: true, terminating: true}}}}
"
            )
        };
        format!(
            "{DUAL_NODE}---
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: shop}}
spec: {{type: LoadBalancer, clusterIP: 10.96.0.5, clusterIPs: [10.96.0.5, 'fd00:10:96::5'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, externalIPs: [192.0.2.200, '2001:db8:e::200'], ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]{spec_extra}}}
status: {{loadBalancer: {{ingress: [{{ip: 192.0.2.100}}, {{ip: '2001:db8:1b::100'}}, {{hostname: lb.example}}]}}}}
---
{}---
{}",
            slice("IPv4", "lb-v4", ["10.244.0.11", "10.244.1.11", "10.244.0.12"]),
            slice(
                "IPv6",
                "lb-v6",
                ["fd00:10:244::11", "fd00:10:244:1::11", "fd00:10:244::12"]
            ),
        )
    }

    #[test]
    fn a_dual_stack_service_has_each_familys_frontends_with_that_familys_backends() {
        let (state, skipped) = build_yaml(&dual_stack(
            ", externalTrafficPolicy: Local, healthCheckNodePort: 32000, loadBalancerSourceRanges: [203.0.113.0/24, '2001:db8:5::/48']",
        ));
        assert!(skipped.is_empty(), "{skipped:?}");
        let v4: Vec<String> = state.services.keys().map(ToString::to_string).collect();
        assert_eq!(
            v4,
            [
                "10.96.0.5:80/TCP",
                "192.0.2.100:80/TCP",
                "192.0.2.200:80/TCP",
                "198.51.100.1:30080/TCP"
            ]
        );
        let v6: Vec<String> = state.services6.keys().map(ToString::to_string).collect();
        assert_eq!(
            v6,
            [
                "[2001:db8::1]:30080/TCP",
                "[2001:db8:e::200]:80/TCP",
                "[2001:db8:1b::100]:80/TCP",
                "[fd00:10:96::5]:80/TCP"
            ]
        );
        let vip6 = &state.services6[&tcp6("fd00:10:96::5", 80)];
        assert_eq!(
            vip6.backends,
            [
                tcp6("fd00:10:244::11", 8080),
                tcp6("fd00:10:244:1::11", 8080)
            ]
        );
        assert_eq!(vip6.terminating, [tcp6("fd00:10:244::12", 8080)]);
        assert_eq!(vip6.kind, FrontendKind::ClusterIp);
        // externalTrafficPolicy Local: this node's endpoint (by nodeName), and
        // every one for in-cluster clients; the family's source ranges only.
        let ingress6 = &state.services6[&tcp6("2001:db8:1b::100", 80)];
        assert_eq!(ingress6.backends, [tcp6("fd00:10:244::11", 8080)]);
        assert_eq!(ingress6.in_cluster.as_ref().unwrap().backends.len(), 2);
        assert_eq!(
            ingress6.source_ranges,
            ["2001:db8:5::/48".parse::<ipnet::Ipv6Net>().unwrap()]
        );
        let ingress4 = &state.services[&tcp("192.0.2.100", 80)];
        assert_eq!(ingress4.backends, [tcp("10.244.0.11", 8080)]);
        assert_eq!(
            ingress4.source_ranges,
            ["203.0.113.0/24".parse::<ipnet::Ipv4Net>().unwrap()]
        );
        assert_eq!(state.health_checks[&32000].local_endpoints, 1);
    }

    /// An IPv6-only Service has IPv6 frontends only (and is no fault); an IPv4-only
    /// one ignores IPv6 slices and externalIPs, as kube-proxy's IPv4 proxier does.
    #[test]
    fn single_stack_services_have_their_one_familys_frontends() {
        let yaml = dual_stack("")
            .replace(
                "clusterIP: 10.96.0.5, clusterIPs: [10.96.0.5, 'fd00:10:96::5'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack",
                "clusterIP: 'fd00:10:96::5', ipFamilies: [IPv6], ipFamilyPolicy: SingleStack",
            );
        let (state, skipped) = build_yaml(&yaml);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert!(state.services.is_empty());
        assert_eq!(state.services6.len(), 4);
        let yaml = dual_stack("").replace(
            "clusterIPs: [10.96.0.5, 'fd00:10:96::5'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack",
            "ipFamilyPolicy: PreferDualStack",
        );
        let (state, skipped) = build_yaml(&yaml);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(state.services.len(), 4);
        assert!(state.services6.is_empty());
    }

    /// IPv6 Service addresses the node refuses, each with its reason: a refused
    /// clusterIP refuses the Service alone (both families), a refused externalIP or
    /// ingress IP leaves out that frontend.
    #[test]
    fn ipv6_service_addresses_are_refused_as_ipv4_ones_are() {
        let limits = crate::limits::Limits {
            cluster_cidr6: Some("fd00:10:244::/56".parse().unwrap()),
            external_ip_cidrs6: vec!["2001:db8:e::/48".parse().unwrap()],
            ..open_limits()
        };
        let service = |name: &str, cluster_ip: &str, external: &str| {
            format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: '{cluster_ip}', externalIPs: [{external}], ports: [{{port: 80}}]}}\n")
        };
        let mut yaml = DUAL_NODE.to_string();
        for (i, address) in [
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
            "::ffff:10.96.0.1",
            "fd00:10:244:3::9",
        ]
        .iter()
        .enumerate()
        {
            yaml += &service(&format!("vip{i}"), address, "");
            yaml += &service(
                &format!("ext{i}"),
                &format!("fd00:10:96::{i}"),
                &format!("'{address}'"),
            );
        }
        yaml += &service("node", "fd00:10:96::a", "'2001:db8::1'");
        yaml += &service("outside", "fd00:10:96::b", "'2001:db8:f::1'");
        yaml += &service("fine", "fd00:10:96::c", "'2001:db8:e::1'");
        let (objects, _) = crate::objects_yaml::parse_objects(&yaml).unwrap();
        let (context, _) = NodeContext::new(NODE, &limits, &objects.nodes, None);
        let (state, skipped) = build(&objects, &context);
        let reasons: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        for says in [
            "Service default/vip0: spec.clusterIP ::1 is loopback",
            "Service default/vip1: spec.clusterIP :: is unspecified",
            "Service default/vip2: spec.clusterIP fe80::1 is link-local",
            "Service default/vip3: spec.clusterIP ff02::1 is multicast",
            "Service default/vip4: spec.clusterIP ::ffff:10.96.0.1 is IPv4-mapped",
            "Service default/vip5: spec.clusterIP fd00:10:244:3::9 is a pod address (in fd00:10:244::/56)",
            "Service default/ext0 spec.externalIPs ::1: spec.externalIPs ::1 is loopback",
            "Service default/ext5 spec.externalIPs fd00:10:244:3::9: spec.externalIPs fd00:10:244:3::9 is a pod address",
            "Service default/node spec.externalIPs 2001:db8::1: spec.externalIPs 2001:db8::1 is a node's address",
            "Service default/outside spec.externalIPs 2001:db8:f::1: spec.externalIPs 2001:db8:f::1 is outside the allowed externalIP ranges (2001:db8:e::/48)",
        ] {
            assert!(
                reasons.iter().any(|r| r.starts_with(says)),
                "no {says:?} in {reasons:#?}"
            );
        }
        assert_eq!(reasons.len(), 6 + 6 + 2, "{reasons:#?}");
        // Each Service with a refused externalIP keeps its clusterIP.
        let vips: Vec<Ipv6Addr> = state.services6.keys().map(|f| f.ip).collect();
        assert_eq!(vips.len(), 6 + 3 + 1, "{vips:?}");
        assert!(state.services6.contains_key(&tcp6("2001:db8:e::1", 80)));
    }

    /// A Service whose families do not add up is refused alone, with its reason;
    /// its neighbours keep their frontends.
    #[test]
    fn an_inconsistent_dual_stack_service_is_refused_alone() {
        let yaml = format!(
            "{WEB}---\n{}",
            dual_stack("").replace(
                "clusterIPs: [10.96.0.5, 'fd00:10:96::5']",
                "clusterIPs: [10.96.0.5]"
            )
        );
        let (state, skipped) = build_yaml(&yaml);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].object, "Service shop/lb");
        assert!(
            skipped[0]
                .reason
                .to_string()
                .contains("RequireDualStack does not allow 1"),
            "{}",
            skipped[0]
        );
        assert!(state.services6.is_empty());
        assert_eq!(state.services.len(), 2, "web's two ports");
    }

    /// IPv6 slices: per-port targets, conditions and refusals as for IPv4; an IPv4
    /// address in an IPv6 slice and FQDN slices are still skipped.
    #[test]
    fn ipv6_endpoints_are_read_as_ipv4_ones_are() {
        let yaml = format!(
            "{}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: lb-v6-bad, namespace: shop, labels: {{kubernetes.io/service-name: lb}}}}
addressType: IPv6
ports: [{{port: 8080}}]
endpoints: [{{addresses: ['::1']}}, {{addresses: ['fe80::7']}}, {{addresses: [10.244.0.99]}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: lb-fqdn, namespace: shop, labels: {{kubernetes.io/service-name: lb}}}}
addressType: FQDN
endpoints: [{{addresses: [example.com]}}]
",
            dual_stack("")
        );
        let (state, skipped) = build_yaml(&yaml);
        let reasons: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        assert_eq!(
            reasons,
            [
                "EndpointSlice shop/lb-fqdn: addressType FQDN is not supported (IPv4 and IPv6 only)",
                "EndpointSlice shop/lb-v6-bad: endpoint address ::1 is loopback",
                "EndpointSlice shop/lb-v6-bad: endpoint address fe80::7 is link-local (the pods' IPv6 gateway)",
                "EndpointSlice shop/lb-v6-bad: endpoint address \"10.244.0.99\" is not an IPv6 address",
            ]
        );
        let vip6 = &state.services6[&tcp6("fd00:10:96::5", 80)];
        assert_eq!(vip6.backends.len(), 2);
        assert_eq!(state.services[&tcp("10.96.0.5", 80)].backends.len(), 2);
    }
}
