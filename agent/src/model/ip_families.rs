//! A Service's IP families: its `clusterIPs` (one per family, the first being
//! `clusterIP`), `ipFamilies` and `ipFamilyPolicy`, checked as the API server checks
//! them; and what building a frontend of one family needs of it ([`ServiceFamily`]),
//! so that both families' frontends come from the same code.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::{
    fields::truncated,
    objects::{EndpointSlice, ServiceSpec},
    L4Addr, NodeContext, ServiceFrontend, ServiceRef, ServicesModel,
};
use crate::limits::FrontendFamily;

/// A Service's clusterIP of each family it has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ClusterIps {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// `spec.ipFamilyPolicy`, its variants named as Kubernetes names them (reasons show
/// them).
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IpFamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

impl IpFamilyPolicy {
    /// The policy, or (unset, as in a file) what the API server defaults it to: dual
    /// stack required when two clusterIPs are given, else single stack.
    fn of(spec: &ServiceSpec, cluster_ips: usize) -> Result<Self, String> {
        match spec.ip_family_policy.as_deref() {
            None if cluster_ips == 2 => Ok(Self::RequireDualStack),
            None | Some("SingleStack") => Ok(Self::SingleStack),
            Some("PreferDualStack") => Ok(Self::PreferDualStack),
            Some("RequireDualStack") => Ok(Self::RequireDualStack),
            Some(other) => Err(format!("unknown ipFamilyPolicy {:?}", truncated(other))),
        }
    }

    /// How many clusterIPs a Service of this policy has, once allocated.
    fn allows(self, cluster_ips: usize) -> bool {
        match self {
            Self::SingleStack => cluster_ips == 1,
            Self::PreferDualStack => (1..=2).contains(&cluster_ips),
            Self::RequireDualStack => cluster_ips == 2,
        }
    }
}

/// The family of an address, as `ipFamilies` names it.
fn family_name(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// A Service's clusterIPs, checked as the API server checks them: `clusterIPs[0]`
/// is `clusterIP` (a file may give `clusterIP` alone), at most one per family, as
/// many as `ipFamilyPolicy` allows, and `ipFamilies` (when given) naming their
/// families in their order. A headless Service (`None`) is not load-balanced.
pub(super) fn cluster_ips(spec: &ServiceSpec) -> Result<ClusterIps, String> {
    let cluster_ip = spec
        .cluster_ip
        .as_deref()
        .ok_or("spec.clusterIP is missing")?;
    let listed: Vec<&str> = match spec.cluster_ips.as_deref() {
        None | Some([]) => vec![cluster_ip],
        Some(ips) if ips[0] != cluster_ip => {
            return Err(format!(
                "spec.clusterIPs[0] {:?} is not spec.clusterIP {:?}",
                truncated(&ips[0]),
                truncated(cluster_ip)
            ))
        }
        Some(ips) => ips.iter().map(String::as_str).collect(),
    };
    if listed.len() > 2 {
        return Err(format!(
            "spec.clusterIPs has {} addresses (at most one per IP family)",
            listed.len()
        ));
    }
    if cluster_ip == "None" {
        if listed.len() > 1 {
            return Err("spec.clusterIPs of a headless Service is more than [None]".into());
        }
        return Err("headless Service (clusterIP None): DNS returns pod IPs directly".into());
    }
    let mut ips = Vec::with_capacity(listed.len());
    for (i, ip) in listed.iter().enumerate() {
        let field = if i == 0 {
            "spec.clusterIP".to_string()
        } else {
            format!("spec.clusterIPs[{i}]")
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{field} {:?} is not an IP address", truncated(ip)))?;
        ips.push(ip);
    }
    if let [a, b] = ips[..] {
        if a.is_ipv4() == b.is_ipv4() {
            return Err(format!(
                "spec.clusterIPs {a} and {b} are both {} (one per IP family)",
                family_name(a)
            ));
        }
    }
    let policy = IpFamilyPolicy::of(spec, ips.len())?;
    if !policy.allows(ips.len()) {
        return Err(format!(
            "ipFamilyPolicy {policy:?} does not allow {} clusterIP(s) {}",
            ips.len(),
            listed.join(", ")
        ));
    }
    if let Some(families) = spec.ip_families.as_deref().filter(|f| !f.is_empty()) {
        let wanted: Vec<&str> = ips.iter().map(|ip| family_name(*ip)).collect();
        if families
            .iter()
            .map(String::as_str)
            .ne(wanted.iter().copied())
        {
            let families: Vec<String> = families.iter().map(|f| truncated(f)).collect();
            return Err(format!(
                "spec.ipFamilies [{}] do not match the families of spec.clusterIPs [{}]",
                families.join(", "),
                wanted.join(", ")
            ));
        }
    }
    let mut out = ClusterIps::default();
    for ip in ips {
        match ip {
            IpAddr::V4(v4) => out.v4 = Some(v4),
            IpAddr::V6(v6) => out.v6 = Some(v6),
        }
    }
    Ok(out)
}

/// A Service's EndpointSlices, by address type.
#[derive(Default)]
pub(super) struct FamilySlices<'a> {
    pub v4: Vec<&'a EndpointSlice>,
    pub v6: Vec<&'a EndpointSlice>,
}

/// EndpointSlices by the Service they are labelled for.
pub(super) type SlicesByService<'a> = BTreeMap<ServiceRef, FamilySlices<'a>>;

/// What building one family's frontends needs of the family.
pub(super) trait ServiceFamily: FrontendFamily {
    /// Whether an endpoint address is one no Service may send traffic to (what the
    /// API server refuses as an endpoint, and a hostile object could point at).
    fn endpoint_refused(ip: Self) -> bool;
    /// The addresses NodePorts of this family answer on.
    fn node_port_ips(here: &NodeContext) -> Vec<Self>;
    /// The Service's slices of this family.
    fn slices<'s, 'a>(slices: &'s FamilySlices<'a>) -> &'s [&'a EndpointSlice];
    /// This family's frontends in a model.
    fn frontends(model: &mut ServicesModel) -> &mut BTreeMap<L4Addr<Self>, ServiceFrontend<Self>>;
}

impl ServiceFamily for Ipv4Addr {
    fn endpoint_refused(ip: Self) -> bool {
        ip.is_loopback()
            || ip.is_link_local()
            || ip.is_multicast()
            || ip.is_unspecified()
            || ip.is_broadcast()
    }

    fn node_port_ips(here: &NodeContext) -> Vec<Self> {
        here.node_port_ips()
    }

    fn slices<'s, 'a>(slices: &'s FamilySlices<'a>) -> &'s [&'a EndpointSlice] {
        &slices.v4
    }

    fn frontends(model: &mut ServicesModel) -> &mut BTreeMap<L4Addr, ServiceFrontend> {
        &mut model.frontends
    }
}

impl ServiceFamily for Ipv6Addr {
    /// Loopback, unspecified, link-local, multicast and IPv4-mapped.
    fn endpoint_refused(ip: Self) -> bool {
        crate::limits::special6(ip).is_some()
    }

    fn node_port_ips(here: &NodeContext) -> Vec<Self> {
        here.node_port_ips6()
    }

    fn slices<'s, 'a>(slices: &'s FamilySlices<'a>) -> &'s [&'a EndpointSlice] {
        &slices.v6
    }

    fn frontends(
        model: &mut ServicesModel,
    ) -> &mut BTreeMap<L4Addr<Ipv6Addr>, ServiceFrontend<Ipv6Addr>> {
        &mut model.frontends6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ServiceSpec {
        serde_yaml_ng::from_str(yaml).expect("spec")
    }

    #[test]
    fn cluster_ips_are_checked_as_the_api_server_checks_them() {
        let v4: Ipv4Addr = "10.96.0.10".parse().unwrap();
        let v6: Ipv6Addr = "fd00:10:96::10".parse().unwrap();
        for (yaml, expected) in [
            ("{clusterIP: 10.96.0.10}", (Some(v4), None)),
            (
                "{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10], ipFamilies: [IPv4], ipFamilyPolicy: SingleStack}",
                (Some(v4), None),
            ),
            (
                "{clusterIP: 'fd00:10:96::10', ipFamilies: [IPv6]}",
                (None, Some(v6)),
            ),
            (
                "{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00:10:96::10'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack}",
                (Some(v4), Some(v6)),
            ),
            (
                "{clusterIP: 'fd00:10:96::10', clusterIPs: ['fd00:10:96::10', 10.96.0.10], ipFamilyPolicy: PreferDualStack}",
                (Some(v4), Some(v6)),
            ),
            (
                "{clusterIP: 10.96.0.10, ipFamilies: [IPv4], ipFamilyPolicy: PreferDualStack}",
                (Some(v4), None),
            ),
            // Unset policy with two clusterIPs: RequireDualStack, as defaulted.
            (
                "{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00:10:96::10']}",
                (Some(v4), Some(v6)),
            ),
        ] {
            let ips = cluster_ips(&spec(yaml)).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            assert_eq!((ips.v4, ips.v6), expected, "{yaml}");
        }
        for (yaml, says) in [
            ("{}", "spec.clusterIP is missing"),
            ("{clusterIP: None}", "headless"),
            ("{clusterIP: None, clusterIPs: [None, None]}", "headless"),
            ("{clusterIP: 10.96.0.300}", "not an IP address"),
            (
                "{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.11]}",
                "is not spec.clusterIP",
            ),
            (
                "{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 10.96.0.11]}",
                "both IPv4",
            ),
            (
                "{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::1', 'fd00::2']}",
                "at most one per IP family",
            ),
            (
                "{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::1'], ipFamilyPolicy: SingleStack}",
                "SingleStack does not allow 2",
            ),
            (
                "{clusterIP: 10.96.0.10, ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack}",
                "RequireDualStack does not allow 1",
            ),
            (
                "{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::1'], ipFamilies: [IPv6, IPv4]}",
                "do not match",
            ),
            (
                "{clusterIP: 10.96.0.10, ipFamilies: [IPv6]}",
                "do not match",
            ),
            (
                "{clusterIP: 10.96.0.10, ipFamilies: [IPv4, IPv6], ipFamilyPolicy: PreferDualStack}",
                "do not match",
            ),
            (
                "{clusterIP: 10.96.0.10, ipFamilyPolicy: TripleStack}",
                "unknown ipFamilyPolicy",
            ),
        ] {
            let reason = cluster_ips(&spec(yaml)).expect_err(yaml);
            assert!(reason.contains(says), "{yaml}: {reason}");
        }
    }
}
