//! The whole model of one node, from all the objects: Services with their
//! EndpointSlices (against the node context: the cluster's nodes), then this node's
//! pods and their hostPorts. An update of some Services builds them with the same [`build_services`].
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use super::{
    fields::object_name,
    frontends::Frontends,
    host_ports::{add_host_ports, WiredPod},
    ip_families::{ServiceFamily, SlicesByService},
    objects::{EndpointSlice, Service},
    pods::local_pod,
    policy::PolicyIndex,
    service::service_frontends,
    slice_service, ClusterObjects, DesiredState, HealthCheck, L4Addr, L4Addr6, NodeContext,
    ServiceFrontend, ServiceFrontend6, ServiceRef, SkipReason, Skipped,
};

/// Build the desired state of the node `context` is for. Never fails: what cannot be
/// used is returned in the skipped list with a reason.
pub fn build(objects: &ClusterObjects, context: &NodeContext) -> (DesiredState, Vec<Skipped>) {
    let (state, _, skipped) = build_with_policy_index(objects, context);
    (state, skipped)
}

/// [`build`], with the policy index the model's policy part comes from (kept for
/// updates of Pods, Namespaces and NetworkPolicies).
pub fn build_with_policy_index(
    objects: &ClusterObjects,
    context: &NodeContext,
) -> (DesiredState, PolicyIndex, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let services = build_services(
        &objects.services,
        &objects.endpoint_slices,
        context,
        &mut skipped,
    );
    let mut state = DesiredState {
        services: services.frontends,
        services6: services.frontends6,
        health_checks: services.health_checks,
        contenders: services.contenders,
        nodes: context.nodes.clone(),
        ..DesiredState::default()
    };
    let policy = PolicyIndex::build(
        &objects.network_policies,
        &objects.namespaces,
        &objects.pods,
        context,
        &mut skipped,
    );
    state.policy = policy.model().clone();
    let mut wired = Vec::new();
    for pod in &objects.pods {
        match local_pod(pod, context) {
            Ok(Some(local)) => {
                if let Some(existing) = state.pods.get(&local.ip) {
                    skipped.push(Skipped {
                        object: object_name("Pod", &pod.metadata),
                        reason: SkipReason::PodIpTaken {
                            ip: local.ip.into(),
                            owner: format!("{}/{}", existing.namespace, existing.name),
                        },
                    });
                    state.pod_rivals.push(local);
                    continue;
                }
                wired.push(WiredPod { pod, ip: local.ip });
                state.pods.insert(local.ip, local);
            }
            Ok(None) => {}
            Err(reason) => {
                state.refused_pods.insert((
                    pod.metadata.namespace.clone().unwrap_or_default(),
                    pod.metadata.name.clone().unwrap_or_default(),
                ));
                skipped.push(Skipped {
                    object: object_name("Pod", &pod.metadata),
                    reason: SkipReason::Invalid(reason),
                })
            }
        }
    }
    add_host_ports(wired, context, &mut state, &mut skipped);
    (state, policy, skipped)
}

/// The Services' part of the model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicesModel {
    pub frontends: BTreeMap<L4Addr, ServiceFrontend>,
    /// The IPv6 frontends (written to the lb6 maps).
    pub frontends6: BTreeMap<L4Addr6, ServiceFrontend6>,
    /// Health-check ports to serve, by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Services that claim a frontend or health-check port another Service claims
    /// too, the one that has it included.
    pub contenders: BTreeSet<ServiceRef>,
}

/// The frontends and health checks of `services`, each with the backends `slices`
/// give it, against `context`. The same for a full sync (every Service) and an
/// update (some Services and their slices). A frontend or health-check port claimed
/// by several Services goes to the one listed first (sources list the oldest first).
pub fn build_services(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    context: &NodeContext,
    skipped: &mut Vec<Skipped>,
) -> ServicesModel {
    let mut slices_by_service = SlicesByService::new();
    for slice in slices {
        let what = object_name("EndpointSlice", &slice.metadata);
        let Some(service) = slice_service(slice) else {
            skipped.push(Skipped {
                object: what,
                reason: SkipReason::NoServiceLabel,
            });
            continue;
        };
        let of_service = slices_by_service.entry(service).or_default();
        match slice.address_type.as_str() {
            "IPv4" => of_service.v4.push(slice),
            "IPv6" => of_service.v6.push(slice),
            other => skipped.push(Skipped {
                object: what,
                reason: SkipReason::UnsupportedAddressType(other.to_string()),
            }),
        }
    }

    let mut model = ServicesModel::default();
    for service in services {
        if !context.limits.serves(service.metadata.labels.as_ref()) {
            continue;
        }
        let built = match service_frontends(service, &slices_by_service, context, skipped) {
            Ok(built) => built,
            Err(reason) => {
                skipped.push(Skipped {
                    object: object_name("Service", &service.metadata),
                    reason: SkipReason::Invalid(reason),
                });
                continue;
            }
        };
        if let Some((port, check)) = built.health_check {
            if let Some(existing) = model.health_checks.get(&port) {
                model.contenders.insert(existing.service.clone());
                model.contenders.insert(check.service.clone());
                skipped.push(Skipped {
                    object: format!("Service {}", check.service),
                    reason: SkipReason::HealthCheckPortTaken {
                        port,
                        owner: existing.service.clone(),
                    },
                });
            } else {
                model.health_checks.insert(port, check);
            }
        }
        claim::<Ipv4Addr>(&mut model, built.frontends, skipped);
        claim::<Ipv6Addr>(&mut model, built.frontends6, skipped);
    }
    model
}

/// Give a Service its frontends of family `A` that no Service listed before has;
/// the ones taken stay the earlier Service's, and both are contenders.
fn claim<A: ServiceFamily>(
    model: &mut ServicesModel,
    frontends: Frontends<A>,
    skipped: &mut Vec<Skipped>,
) {
    for (frontend, entry) in frontends {
        let existing = A::frontends(model).get(&frontend);
        if let Some((owner, owner_service)) = existing.map(|e| (e.name.clone(), e.service.clone()))
        {
            model.contenders.insert(owner_service);
            model.contenders.insert(entry.service.clone());
            skipped.push(Skipped {
                object: entry.name.clone(),
                reason: SkipReason::FrontendTaken {
                    frontend: frontend.to_string(),
                    owner,
                },
            });
            continue;
        }
        A::frontends(model).insert(frontend, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

    fn svc(name: &str, spec: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n")
    }

    fn slice(name: &str, body: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: bad}}}}\n{body}\n"
        )
    }

    const GOOD_PORT: &str = "{clusterIP: 10.96.7.7, ports: [{port: 80}]}";

    /// Every hostile object is skipped with a reason naming it, and
    /// the example Service keeps working; nothing panics.
    #[test]
    fn thirty_hostile_objects_are_each_skipped_with_a_reason_and_the_rest_applies() {
        let long = "a".repeat(253);
        let many_ports: String = (1..=10_000)
            .map(|p| format!("{{name: p{p}, port: {p}}}"))
            .collect::<Vec<_>>()
            .join(", ");
        let cases: Vec<(&str, String, &str)> = vec![
            ("no name", "apiVersion: v1\nkind: Service\nmetadata: {namespace: shop}\nspec: {clusterIP: 10.96.7.1, ports: [{port: 80}]}\n".into(), "<unnamed>"),
            ("no spec", "apiVersion: v1\nkind: Service\nmetadata: {name: nospec}\n".into(), "nospec"),
            ("no clusterIP", svc("noip", "{ports: [{port: 80}]}"), "noip"),
            ("IPv6 loopback clusterIP", svc("v6", "{clusterIP: '::1', ports: [{port: 80}]}"), "v6"),
            ("bad clusterIP", svc("badip", "{clusterIP: 999.1.1.1, ports: [{port: 80}]}"), "badip"),
            ("0.0.0.0 clusterIP", svc("zero", "{clusterIP: 0.0.0.0, ports: [{port: 80}]}"), "zero"),
            ("port 0", svc("port0", "{clusterIP: 10.96.7.2, ports: [{port: 0}]}"), "port0"),
            ("port 70000", svc("bigport", "{clusterIP: 10.96.7.3, ports: [{port: 70000}]}"), "bigport"),
            ("unknown protocol", svc("quic", "{clusterIP: 10.96.7.4, ports: [{port: 80, protocol: QUIC}]}"), "quic"),
            ("SCTP port", svc("sctp", "{clusterIP: 10.96.7.5, ports: [{port: 80, protocol: SCTP}, {name: b, port: 81}]}"), "SCTP"),
            ("negative targetPort", svc("negtarget", "{clusterIP: 10.96.7.6, ports: [{port: 80, targetPort: -1}]}"), "negtarget"),
            ("ExternalName", svc("extname", "{type: ExternalName, externalName: example.com}"), "extname"),
            ("unknown type", svc("weird", "{type: Weird, clusterIP: 10.96.7.8, ports: [{port: 80}]}"), "weird"),
            ("no ports", svc("noports", "{clusterIP: 10.96.7.9, ports: []}"), "noports"),
            ("10,000 ports", svc("manyports", &format!("{{clusterIP: 10.96.7.10, ports: [{many_ports}]}}")), "manyports"),
            ("253-char name", svc(&long, GOOD_PORT), "aaaaaaaaaa"),
            ("uppercase name", svc("Upper", GOOD_PORT), "Upper"),
            ("duplicate clusterIP:port", svc("copycat", "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}"), "already used"),
            ("headless", svc("headless", "{clusterIP: None, ports: [{port: 80}]}"), "headless"),
            ("slice without label", "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: orphan, namespace: shop}\naddressType: IPv4\n".into(), "orphan"),
            ("IPv4 address in IPv6 slice", format!("{}---\n{}", svc("bad", "{clusterIP: 'fd00::7', ports: [{port: 80}]}"), slice("six", "addressType: IPv6\nports: [{port: 8080}]\nendpoints: [{addresses: [10.244.3.3]}]")), "six"),
            ("FQDN slice", slice("fqdn", "addressType: FQDN\nendpoints: [{addresses: [example.com]}]"), "fqdn"),
            ("IPv6 address in IPv4 slice", format!("{}---\n{}", svc("bad", GOOD_PORT), slice("mixed", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: ['fd00::3']}]")), "mixed"),
            ("garbage address", format!("{}---\n{}", svc("bad", GOOD_PORT), slice("garbage", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [not-an-address]}]")), "garbage"),
            ("endpoint without addresses", format!("{}---\n{}", svc("bad", GOOD_PORT), slice("empty", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: []}]")), "empty"),
            ("loopback endpoint", format!("{}---\n{}", svc("bad", GOOD_PORT), slice("loop", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [127.0.0.1]}]")), "loop"),
            ("cloud metadata endpoint", format!("{}---\n{}", svc("bad", GOOD_PORT), slice("metadata", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [169.254.169.254]}]")), "metadata"),
            ("slice port 0", format!("{}---\n{}", svc("bad", GOOD_PORT), slice("sport", "addressType: IPv4\nports: [{port: 0}]\nendpoints: [{addresses: [10.244.3.3]}]")), "sport"),
            ("pod with garbage IP", "apiVersion: v1\nkind: Pod\nmetadata: {name: badpod, namespace: shop}\nspec: {nodeName: node-a, containers: []}\nstatus: {podIP: 10.244.0.300}\n".into(), "badpod"),
            ("pod with IPv6 IP", "apiVersion: v1\nkind: Pod\nmetadata: {name: v6pod, namespace: shop}\nspec: {nodeName: node-a, containers: []}\nstatus: {podIP: 'fd00::5'}\n".into(), "v6pod"),
            ("node without InternalIP", "apiVersion: v1\nkind: Node\nmetadata: {name: noaddr}\nspec: {podCIDR: 10.244.9.0/24}\n".into(), "noaddr"),
            ("node with garbage podCIDR", "apiVersion: v1\nkind: Node\nmetadata: {name: badcidr}\nspec: {podCIDR: 10.244.9.0/99}\nstatus: {addresses: [{type: InternalIP, address: 198.51.100.9}]}\n".into(), "badcidr"),
            ("node with a bad VTEP MAC", "apiVersion: v1\nkind: Node\nmetadata: {name: badmac, annotations: {ferrite.dev/vtep-mac: zz}}\nspec: {podCIDR: 10.244.8.0/24}\nstatus: {addresses: [{type: InternalIP, address: 198.51.100.8}]}\n".into(), "badmac"),
            ("unknown kind", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: deploy}\n".into(), "deploy"),
            ("not a mapping", "just a string\n".into(), ""),
            ("wrong field type", "apiVersion: v1\nkind: Service\nmetadata: {name: typed, namespace: shop}\nspec: {ports: 80}\n".into(), "typed"),
        ];
        assert!(cases.len() >= 30);
        for (what, yaml, marker) in &cases {
            let (state, skipped) = build_yaml(&format!("{WEB}---\n{yaml}"));
            assert!(
                skipped
                    .iter()
                    .any(|s| s.object.contains(marker) || s.reason.to_string().contains(marker)),
                "{what}: no reason naming {marker:?} in {skipped:?}"
            );
            let http = &state.services[&addr("10.96.0.10", 80, Protocol::Tcp)];
            assert_eq!(http.name, "shop/web:http", "{what}");
            assert_eq!(http.backends.len(), 2, "{what}");
        }
        // Legitimate if unusual: a 253-character Pod name and an endpoint outside
        // the cluster (a Service without selector pointing elsewhere) both apply.
        let (state, _) = build_yaml(&format!(
            "{}---\n{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {long}, namespace: shop}}\nspec: {{nodeName: node-a, containers: []}}\nstatus: {{podIP: 10.244.0.77}}\n",
            svc("bad", GOOD_PORT),
            slice("outside", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [203.0.113.5]}]")
        ));
        assert_eq!(
            state.pods[&"10.244.0.77".parse().unwrap()].interface.len(),
            15
        );
        assert_eq!(
            state.services[&addr("10.96.7.7", 80, Protocol::Tcp)].backends,
            vec![addr("203.0.113.5", 8080, Protocol::Tcp)]
        );
    }

    #[test]
    fn invalid_objects_are_skipped_and_the_rest_applies() {
        let yaml = format!(
            r#"{WEB}
---
apiVersion: v1
kind: Service
metadata: {{name: bad-ip}}
spec: {{clusterIP: 10.96.0.300, ports: [{{port: 80}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: port-zero}}
spec: {{clusterIP: 10.96.0.31, ports: [{{port: 0}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: weird-proto}}
spec: {{clusterIP: 10.96.0.32, ports: [{{port: 80, protocol: QUIC}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: no-spec}}
---
apiVersion: v1
kind: Service
spec: {{clusterIP: 10.96.0.33, ports: [{{port: 80}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: v6}}
spec: {{clusterIP: "fe80::10", ports: [{{port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: fqdn-slice, labels: {{kubernetes.io/service-name: web}}}}
addressType: FQDN
endpoints: [{{addresses: ["example.com"]}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: orphan}}
addressType: IPv4
endpoints: []
---
apiVersion: v1
kind: Service
metadata: [this is not a mapping]
---
kind: Gizmo
apiVersion: example.com/v1
metadata: {{name: g}}
"#
        );
        let (state, skipped) = build_yaml(&yaml);
        // web still applies in full.
        assert_eq!(state.services.len(), 2);
        let reasons: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        let expect = [
            "not an IP address",
            "out of range",
            "unknown protocol \"QUIC\"",
            "spec is missing",
            "metadata.name is missing",
            "fe80::10 is link-local",
            "addressType FQDN is not supported",
            "no kubernetes.io/service-name label",
            "Gizmo",
        ];
        for needle in expect {
            assert!(
                reasons.iter().any(|r| r.contains(needle)),
                "no reason mentions {needle:?}: {reasons:#?}"
            );
        }
        // The malformed metadata is reported too. (A document that is not YAML at all
        // refuses the whole file instead: see the source tests.)
        assert!(reasons.len() > expect.len(), "{reasons:#?}");
    }

    #[test]
    fn duplicate_frontend_keeps_the_first_service() {
        let (state, skipped) = build_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: one}
spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: two}
spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}
"#,
        );
        assert_eq!(
            state.services[&addr("10.96.0.50", 80, Protocol::Tcp)].name,
            "default/one:80"
        );
        assert!(
            matches!(&skipped[0].reason, SkipReason::FrontendTaken { owner, .. } if owner == "default/one:80"),
            "{skipped:?}"
        );
        assert!(skipped[0]
            .reason
            .to_string()
            .contains("already used by default/one:80"));
    }
}
