//! EndpointSlices -> the backends of one Service port, and the compaction of slices
//! for the watch cache (kept here, next to the code that reads compacted slices).
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    fields::{object_name, parse_ip, valid_port},
    ip_families::ServiceFamily,
    objects::{Endpoint, EndpointConditions, EndpointHints, EndpointSlice, ForName, ServicePort},
    L4Addr, NodeContext, Protocol, ServiceRef, SkipReason, Skipped,
};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
pub fn slice_service(slice: &EndpointSlice) -> Option<ServiceRef> {
    let meta = &slice.metadata;
    let service = meta.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ServiceRef::in_namespace_of(meta, service))
}

/// The nodes and the zones an endpoint is hinted for.
type Hints = (BTreeSet<String>, BTreeSet<String>);

/// The endpoints of one Service port (of one family), sorted into what each policy
/// uses.
pub(super) struct PortEndpoints<A> {
    ready: BTreeSet<L4Addr<A>>,
    pub(super) local_ready: usize,
    /// Serving and terminating: (address, on this node).
    terminating: BTreeSet<(L4Addr<A>, bool)>,
    local: BTreeSet<L4Addr<A>>,
    /// Topology hints of ready endpoints: the nodes and zones each is hinted for.
    hints: BTreeMap<L4Addr<A>, Hints>,
    /// The ready endpoints this node's clients use when the hints say so (kube-proxy's
    /// topology rules, see [`PortEndpoints::apply_topology`]); `None`: all of them.
    topology: Option<BTreeSet<L4Addr<A>>>,
}

impl<A> Default for PortEndpoints<A> {
    fn default() -> Self {
        Self {
            ready: BTreeSet::new(),
            local_ready: 0,
            terminating: BTreeSet::new(),
            local: BTreeSet::new(),
            hints: BTreeMap::new(),
            topology: None,
        }
    }
}

/// Backends for new flows, and those kept for established flows.
type Picked<A> = (Vec<L4Addr<A>>, Vec<L4Addr<A>>);

impl<A: ServiceFamily> PortEndpoints<A> {
    /// (backends for new flows, ones kept for established flows: terminating, and
    /// ready ones topology leaves out for this node).
    pub(super) fn for_policy(&self, local_only: bool) -> Picked<A> {
        let eligible = |a: &L4Addr<A>| !local_only || self.local.contains(a);
        let mut ready: Vec<L4Addr<A>> = self.ready.iter().copied().filter(eligible).collect();
        let mut kept: BTreeSet<L4Addr<A>> = self
            .terminating
            .iter()
            .filter(|(a, local)| !local_only || *local || self.local.contains(a))
            .map(|(a, _)| *a)
            .collect();
        // Topology narrows the endpoints of cluster-wide policies only (kube-proxy's
        // "cluster endpoints"); the rest keep their established flows.
        if let (false, Some(preferred)) = (local_only, &self.topology) {
            let (near, far): Picked<A> = ready.into_iter().partition(|a| preferred.contains(a));
            ready = near;
            kept.extend(far);
        }
        if ready.is_empty() {
            // Nothing ready: serving terminating endpoints take new flows rather than
            // none (kube-proxy does the same since Kubernetes 1.26).
            (kept.into_iter().collect(), Vec::new())
        } else {
            (ready, kept.into_iter().collect())
        }
    }

    /// kube-proxy's topology rules (pkg/proxy/topology.go): when every ready
    /// endpoint has node hints and one names this node, those; else when every one
    /// has zone hints and one names this node's zone, those; else all. The
    /// EndpointSlice controller sets the hints from `trafficDistribution` and the
    /// `service.kubernetes.io/topology-mode` annotation.
    fn apply_topology(&mut self, here: &NodeContext) {
        let hinted = |pick: &dyn Fn(&Hints) -> &BTreeSet<String>,
                      wanted: Option<&str>|
         -> Option<BTreeSet<L4Addr<A>>> {
            let all_hinted = self
                .ready
                .iter()
                .all(|a| self.hints.get(a).is_some_and(|h| !pick(h).is_empty()));
            let wanted = wanted?;
            let for_us: BTreeSet<L4Addr<A>> = self
                .ready
                .iter()
                .filter(|a| self.hints.get(a).is_some_and(|h| pick(h).contains(wanted)))
                .copied()
                .collect();
            (all_hinted && !for_us.is_empty()).then_some(for_us)
        };
        if self.ready.is_empty() {
            return;
        }
        self.topology =
            hinted(&|h| &h.0, Some(&here.name)).or_else(|| hinted(&|h| &h.1, here.zone()));
    }
}

/// The endpoints of a Service port in its slices of family `A`.
pub(super) fn port_backends<A: ServiceFamily>(
    port: &ServicePort,
    protocol: Protocol,
    slices: &[&EndpointSlice],
    here: &NodeContext,
    display: &str,
    skipped: &mut Vec<Skipped>,
) -> PortEndpoints<A> {
    let port_name = port.name.as_deref().unwrap_or("");
    let mut out = PortEndpoints::default();
    for slice in slices {
        let slice_name = object_name("EndpointSlice", &slice.metadata);
        let slice_port = slice.ports.as_deref().unwrap_or_default().iter().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && Protocol::parse(p.protocol.as_deref()) == Ok(protocol)
        });
        let target = match (slice_port.and_then(|p| p.port), &port.target_port) {
            (Some(n), _) => valid_port(n, "port"),
            // No slice port: a numeric (or absent) targetPort still says where to go.
            (None, Some(IntOrString::Int(n))) => valid_port(*n, "targetPort"),
            (None, None) => Ok(port.port as u16),
            (None, Some(IntOrString::String(named))) => Err(format!(
                "named targetPort {named:?} has no matching port {port_name:?} in the slice"
            )),
        };
        let target = match target {
            Ok(t) => t,
            Err(reason) => {
                skipped.push(Skipped {
                    object: format!("{slice_name} for {display}"),
                    reason: SkipReason::Invalid(reason),
                });
                continue;
            }
        };
        let compacted = is_compacted(slice);
        for endpoint in slice.endpoints.iter().flatten() {
            let state = endpoint_state(endpoint);
            if state == EndpointState::Unused {
                continue;
            }
            // All addresses of an endpoint are fungible; kube-proxy uses the first.
            // A compacted slice holds the addresses of alike endpoints comma-separated.
            let addresses: Vec<&str> = match endpoint.addresses.first() {
                Some(first) if compacted => first.split(',').collect(),
                Some(first) => vec![first.as_str()],
                None => Vec::new(),
            };
            if addresses.is_empty() {
                skipped.push(Skipped {
                    object: slice_name.clone(),
                    reason: SkipReason::EndpointWithoutAddresses,
                });
                continue;
            }
            for address in addresses {
                let Some(backend) = backend::<A>(address, target, protocol, &slice_name, skipped)
                else {
                    continue;
                };
                let local = here.owns(endpoint.node_name.as_deref(), backend.ip.into());
                if local {
                    out.local.insert(backend);
                }
                match state {
                    EndpointState::Ready => {
                        if out.ready.insert(backend) && local {
                            out.local_ready += 1;
                        }
                        if let Some(hints) = &endpoint.hints {
                            let names = |list: &Option<Vec<ForName>>| -> BTreeSet<String> {
                                list.iter().flatten().map(|n| n.name.clone()).collect()
                            };
                            let entry = out.hints.entry(backend).or_default();
                            entry.0.extend(names(&hints.for_nodes));
                            entry.1.extend(names(&hints.for_zones));
                        }
                    }
                    _ => {
                        out.terminating.insert((backend, local));
                    }
                }
            }
        }
    }
    // An address both ready (in one slice) and terminating (in another) is ready.
    let ready = out.ready.clone();
    out.terminating.retain(|(a, _)| !ready.contains(a));
    out.apply_topology(here);
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EndpointState {
    Ready,
    /// Not ready, but serving and terminating: finishes its flows.
    Terminating,
    Unused,
}

fn endpoint_state(endpoint: &Endpoint) -> EndpointState {
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    if ready {
        EndpointState::Ready
    } else if serving && terminating {
        EndpointState::Terminating
    } else {
        EndpointState::Unused
    }
}

fn backend<A: ServiceFamily>(
    address: &str,
    port: u16,
    protocol: Protocol,
    slice_name: &str,
    skipped: &mut Vec<Skipped>,
) -> Option<L4Addr<A>> {
    match parse_ip::<A>(address, "endpoint address") {
        // What the API server itself refuses as an endpoint (and a hostile object
        // could point a Service at): loopback, link-local (cloud metadata), multicast.
        Ok(ip) if A::endpoint_refused(ip) => {
            skipped.push(Skipped {
                object: slice_name.to_string(),
                reason: SkipReason::EndpointAddressRefused(ip.into()),
            });
            None
        }
        Ok(ip) => Some(L4Addr { ip, port, protocol }),
        Err(reason) => {
            skipped.push(Skipped {
                object: slice_name.to_string(),
                reason: SkipReason::Invalid(reason),
            });
            None
        }
    }
}

/// Label marking an EndpointSlice compacted by [`compact_slice`].
pub const COMPACTED_LABEL: &str = "ferrite.dev/compacted";

fn is_compacted(slice: &EndpointSlice) -> bool {
    slice
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.get(COMPACTED_LABEL).is_some_and(|v| v == "true"))
}

/// Shrink an EndpointSlice to what the model reads, for the watch cache: the first
/// addresses of the endpoints alike for the model (same state, node and hints),
/// comma-separated, become the one address of one endpoint per such group (one
/// `Endpoint` and one string instead of one of each per pod); later addresses of an
/// endpoint go. The model reads the result exactly as the original.
pub fn compact_slice(slice: &mut EndpointSlice) {
    if is_compacted(slice) {
        return;
    }
    type Alike = (bool, Option<String>, Option<EndpointHints>);
    let mut groups: BTreeMap<Alike, Vec<String>> = BTreeMap::new();
    for endpoint in slice.endpoints.iter().flatten() {
        let state = endpoint_state(endpoint);
        if state == EndpointState::Unused {
            continue;
        }
        let Some(first) = endpoint.addresses.first() else {
            return; // keep it as is: the model reports such endpoints
        };
        if first.contains(',') {
            return;
        }
        groups
            .entry((
                state == EndpointState::Ready,
                endpoint.node_name.clone(),
                endpoint.hints.clone(),
            ))
            .or_default()
            .push(first.clone());
    }
    let endpoints: Vec<Endpoint> = groups
        .into_iter()
        .map(|((ready, node_name, hints), addresses)| Endpoint {
            addresses: vec![addresses.join(",")],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(true),
                terminating: Some(!ready),
            }),
            node_name,
            hints,
        })
        .collect();
    slice.endpoints = (!endpoints.is_empty()).then_some(endpoints);
    slice
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(COMPACTED_LABEL.into(), "true".into());
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::test_support::*;
    use super::super::*;
    use crate::objects_yaml::parse_objects;

    #[test]
    fn named_target_port_resolves_through_the_slice_and_not_ready_is_left_out() {
        let (state, skipped) = build_yaml(WEB);
        assert!(skipped.is_empty(), "{skipped:?}");
        let http = &state.services[&addr("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(http.name, "shop/web:http");
        assert_eq!(
            http.backends,
            vec![
                addr("10.244.0.11", 8080, Protocol::Tcp),
                addr("10.244.0.12", 8080, Protocol::Tcp)
            ]
        );
        let dns = &state.services[&addr("10.96.0.10", 53, Protocol::Udp)];
        assert_eq!(dns.backends.len(), 2);
        assert!(dns.backends.iter().all(|b| b.port == 5353));
    }

    #[test]
    fn numeric_target_port_applies_without_slice_ports() {
        let (state, skipped) = build_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: api}
spec: {clusterIP: 10.96.0.20, ports: [{port: 443, targetPort: 8443}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.5]}]
"#,
        );
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(
            state.services[&addr("10.96.0.20", 443, Protocol::Tcp)].backends,
            vec![addr("10.244.0.5", 8443, Protocol::Tcp)]
        );
    }

    #[test]
    fn terminating_endpoints_serve_only_when_nothing_is_ready() {
        let yaml = load_balancer("").replace(
            "- {addresses: [10.244.0.11], nodeName: node-a}\n- {addresses: [10.244.1.11], nodeName: node-b, conditions: {ready: true}}\n",
            "",
        );
        let (state, _) = build_yaml(&yaml);
        let f = &state.services[&tcp("10.96.0.5", 80)];
        assert_eq!(f.backends, vec![tcp("10.244.0.12", 8080)]);
        assert!(f.terminating.is_empty());
    }

    #[test]
    fn compacted_slices_mean_exactly_what_the_originals_mean() {
        let yaml = format!(
            "{WEB}---\n{}",
            r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-def
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.1, 10.244.9.9]
  conditions: {ready: true}
- addresses: [not-an-ip]
- addresses: [10.244.1.2]
  conditions: {ready: false}
"#
        );
        let (objects, _) = parse_objects(&yaml).unwrap();
        let original = build_all(&objects);
        let mut compacted = objects.clone();
        for slice in &mut compacted.endpoint_slices {
            compact_slice(Arc::make_mut(slice));
            assert!(slice.endpoints.iter().flatten().count() <= 1);
        }
        assert_eq!(build_all(&compacted), original);
        // Compacting twice changes nothing.
        let again = compacted.clone();
        for slice in &mut compacted.endpoint_slices {
            compact_slice(Arc::make_mut(slice));
        }
        assert_eq!(build_all(&again), build_all(&compacted));
    }

    #[test]
    fn compaction_keeps_node_names_and_terminating_endpoints() {
        let yaml = load_balancer(", externalTrafficPolicy: Local");
        let (objects, _) = parse_objects(&yaml).unwrap();
        let original = build_all(&objects);
        let mut compacted = objects.clone();
        for slice in &mut compacted.endpoint_slices {
            compact_slice(Arc::make_mut(slice));
            // Groups: ready on node-a, ready on node-b, terminating on node-a.
            assert_eq!(slice.endpoints.iter().flatten().count(), 3);
        }
        assert_eq!(build_all(&compacted), original);
    }

    /// node-a (zone `z1`) and its Service `web` with three ready endpoints, each with
    /// `hints` (YAML flow mappings, or empty for none).
    fn topology(zone_label: &str, hints: [&str; 3]) -> DesiredState {
        let zone = if zone_label.is_empty() {
            String::new()
        } else {
            format!(", labels: {{topology.kubernetes.io/zone: {zone_label}}}")
        };
        let endpoints: String = ["10.244.0.11", "10.244.1.11", "10.244.2.11"]
            .iter()
            .zip(hints)
            .map(|(ip, hints)| {
                let hints = if hints.is_empty() {
                    String::new()
                } else {
                    format!(", hints: {hints}")
                };
                format!("- {{addresses: [{ip}]{hints}}}\n")
            })
            .collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-a{zone}}}\nspec: {{podCIDR: 10.244.0.0/24}}\nstatus: {{addresses: [{{type: InternalIP, address: 198.51.100.1}}]}}\n---
apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec: {{type: NodePort, clusterIP: 10.96.0.10, ports: [{{port: 80, nodePort: 30080}}]}}
---
apiVersion: v1\nkind: Service\nmetadata: {{name: local, namespace: shop}}\nspec: {{clusterIP: 10.96.0.11, internalTrafficPolicy: Local, ports: [{{port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}---
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: local-1, namespace: shop, labels: {{kubernetes.io/service-name: local}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}"
        );
        let (objects, _) = parse_objects(&yaml).unwrap();
        let (state, skipped) = build_all(&objects);
        assert!(skipped.is_empty(), "{skipped:?}");
        // Compacted (as the watch cache keeps slices) it means the same.
        let mut compacted = objects.clone();
        for slice in &mut compacted.endpoint_slices {
            compact_slice(Arc::make_mut(slice));
        }
        assert_eq!(build_all(&compacted).0, state);
        state
    }

    /// The last octet of each backend for new flows, and of each kept for established
    /// ones, at a frontend.
    fn picked(state: &DesiredState, frontend: L4Addr) -> (Vec<u8>, Vec<u8>) {
        let service = &state.services[&frontend];
        let third = |list: &Vec<L4Addr>| list.iter().map(|a| a.ip.octets()[2]).collect();
        (third(&service.backends), third(&service.terminating))
    }

    #[test]
    fn topology_hints_narrow_cluster_wide_backends_as_kube_proxy_does() {
        let vip = tcp("10.96.0.10", 8080 - 8000);
        let node_port = tcp("198.51.100.1", 30080);
        let zones = [
            "{forZones: [{name: z1}]}",
            "{forZones: [{name: z1}]}",
            "{forZones: [{name: z2}]}",
        ];
        // PreferSameZone / topology-mode Auto: the zone's endpoints, the others kept
        // for the flows they have; on the ClusterIP and the NodePort (policy Cluster).
        let state = topology("z1", zones);
        assert_eq!(picked(&state, vip), (vec![0, 1], vec![2]));
        assert_eq!(picked(&state, node_port), (vec![0, 1], vec![2]));
        // internalTrafficPolicy Local is not narrowed by topology.
        assert_eq!(picked(&state, tcp("10.96.0.11", 80)), (vec![0], vec![]));
        // Fallbacks to every endpoint: one endpoint without hints, a zone without
        // endpoints, the node's zone label gone.
        for (label, hints) in [
            (
                "z1",
                ["{forZones: [{name: z1}]}", "", "{forZones: [{name: z2}]}"],
            ),
            ("z3", zones),
            ("", zones),
        ] {
            assert_eq!(
                picked(&topology(label, hints), vip),
                (vec![0, 1, 2], vec![]),
                "{label} {hints:?}"
            );
        }
        // PreferSameNode: this node's endpoint; when none is for this node, the zone;
        // when the zone has none either, all.
        let same_node = |node: &str, zone: &str| {
            format!("{{forNodes: [{{name: {node}}}], forZones: [{{name: {zone}}}]}}")
        };
        let state = topology(
            "z1",
            [
                &same_node("node-b", "z1"),
                &same_node("node-a", "z1"),
                &same_node("node-c", "z2"),
            ],
        );
        assert_eq!(picked(&state, vip), (vec![1], vec![0, 2]));
        let state = topology(
            "z1",
            [
                &same_node("node-b", "z1"),
                &same_node("node-c", "z1"),
                &same_node("node-d", "z2"),
            ],
        );
        assert_eq!(picked(&state, vip), (vec![0, 1], vec![2]));
        let state = topology(
            "z9",
            [
                &same_node("node-b", "z1"),
                &same_node("node-c", "z1"),
                &same_node("node-d", "z2"),
            ],
        );
        assert_eq!(picked(&state, vip), (vec![0, 1, 2], vec![]));
    }
}
