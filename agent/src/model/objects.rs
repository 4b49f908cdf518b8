//! Services and EndpointSlices as the model reads them: only the fields it uses,
//! with k8s-openapi's Rust names and types (so model code reads them alike) and the
//! Kubernetes JSON names. The watch caches hold one of these per object instead of
//! the full API type, whose unread fields (selectors, zones, target
//! references, conditions...) are most of a cached object's size. Unknown fields are
//! ignored and missing or null ones take their default, as k8s-openapi does.
//!
//! Both implement `k8s_openapi::Resource` and `Metadata`, so kube-rs watches and
//! lists them as it does the API types.
use k8s_openapi::{
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
    ListableResource, Metadata, NamespaceResourceScope, Resource,
};
use serde::{Deserialize, Deserializer};

/// A field Kubernetes always sets: null or missing reads as its default, as
/// k8s-openapi reads it (serde alone refuses a null for a non-`Option` field).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A v1 Service.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Service {
    #[serde(deserialize_with = "null_as_default")]
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceSpec>,
    pub status: Option<ServiceStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// One per IP family, the first `clusterIP` (dual-stack).
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    /// `IPv4`, `IPv6`: the families of `clusterIPs`, in their order.
    pub ip_families: Option<Vec<String>>,
    /// `SingleStack`, `PreferDualStack` or `RequireDualStack`.
    pub ip_family_policy: Option<String>,
    #[serde(rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    /// `false`: a LoadBalancer without nodePorts (the load balancer reaches pods
    /// directly).
    pub allocate_load_balancer_node_ports: Option<bool>,
    pub external_traffic_policy: Option<String>,
    pub health_check_node_port: Option<i32>,
    pub internal_traffic_policy: Option<String>,
    pub load_balancer_source_ranges: Option<Vec<String>>,
    pub ports: Option<Vec<ServicePort>>,
    pub session_affinity: Option<String>,
    pub session_affinity_config: Option<SessionAffinityConfig>,
    #[serde(rename = "type")]
    pub type_: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServicePort {
    pub name: Option<String>,
    pub node_port: Option<i32>,
    #[serde(deserialize_with = "null_as_default")]
    pub port: i32,
    pub protocol: Option<String>,
    pub target_port: Option<IntOrString>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SessionAffinityConfig {
    #[serde(rename = "clientIP")]
    pub client_ip: Option<ClientIPConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ClientIPConfig {
    pub timeout_seconds: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceStatus {
    pub load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LoadBalancerStatus {
    pub ingress: Option<Vec<LoadBalancerIngress>>,
}

/// An ingress point; one with only a hostname has `ip` None.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LoadBalancerIngress {
    pub ip: Option<String>,
    /// `Proxy`: the load balancer proxies to the NodePorts, the IP is not the
    /// nodes' to capture (KEP-1860); `VIP` or unset: it is.
    #[serde(rename = "ipMode")]
    pub ip_mode: Option<String>,
}

/// A discovery.k8s.io/v1 EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(deserialize_with = "null_as_default")]
    pub address_type: String,
    pub endpoints: Option<Vec<Endpoint>>,
    #[serde(deserialize_with = "null_as_default")]
    pub metadata: ObjectMeta,
    pub ports: Option<Vec<EndpointPort>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(deserialize_with = "null_as_default")]
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
    pub node_name: Option<String>,
    /// Where the EndpointSlice controller wants the endpoint used (topology-aware
    /// routing, `trafficDistribution`).
    pub hints: Option<EndpointHints>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EndpointHints {
    pub for_zones: Option<Vec<ForName>>,
    pub for_nodes: Option<Vec<ForName>>,
}

/// A zone or node an endpoint is hinted for.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(default)]
pub struct ForName {
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

impl Resource for Service {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Service";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "services";
    type Scope = NamespaceResourceScope;
}

impl ListableResource for Service {
    const LIST_KIND: &'static str = "ServiceList";
}

impl Metadata for Service {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Resource for EndpointSlice {
    const API_VERSION: &'static str = "discovery.k8s.io/v1";
    const GROUP: &'static str = "discovery.k8s.io";
    const KIND: &'static str = "EndpointSlice";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "endpointslices";
    type Scope = NamespaceResourceScope;
}

impl ListableResource for EndpointSlice {
    const LIST_KIND: &'static str = "EndpointSliceList";
}

impl Metadata for EndpointSlice {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Every field the model reads, spelled as the API server sends it, among fields
    /// it does not read (which must be ignored).
    #[test]
    fn a_service_in_kubernetes_json_sets_every_field_the_model_reads() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "lb", "namespace": "shop", "uid": "u-1"},
            "spec": {
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.5",
                "clusterIPs": ["10.96.0.5", "fd00:10:96::5"],
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "RequireDualStack",
                "selector": {"app": "web"},
                "externalIPs": ["192.0.2.200"],
                "allocateLoadBalancerNodePorts": false,
                "externalTrafficPolicy": "Local",
                "internalTrafficPolicy": "Local",
                "healthCheckNodePort": 32000,
                "loadBalancerSourceRanges": ["203.0.113.0/24"],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
                "ports": [
                    {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web",
                     "nodePort": 30080, "appProtocol": "http"},
                    {"port": 53, "protocol": "UDP", "targetPort": 5353}
                ]
            },
            "status": {"loadBalancer": {"ingress": [
                {"ip": "192.0.2.100", "ipMode": "VIP"}, {"hostname": "lb.example"}
            ]}, "conditions": []}
        }))
        .expect("parses");
        let expected = Service {
            metadata: ObjectMeta {
                name: Some("lb".into()),
                namespace: Some("shop".into()),
                uid: Some("u-1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.5".into()),
                cluster_ips: Some(vec!["10.96.0.5".into(), "fd00:10:96::5".into()]),
                ip_families: Some(vec!["IPv4".into(), "IPv6".into()]),
                ip_family_policy: Some("RequireDualStack".into()),
                external_ips: Some(vec!["192.0.2.200".into()]),
                allocate_load_balancer_node_ports: Some(false),
                external_traffic_policy: Some("Local".into()),
                health_check_node_port: Some(32000),
                internal_traffic_policy: Some("Local".into()),
                load_balancer_source_ranges: Some(vec!["203.0.113.0/24".into()]),
                ports: Some(vec![
                    ServicePort {
                        name: Some("http".into()),
                        node_port: Some(30080),
                        port: 80,
                        protocol: Some("TCP".into()),
                        target_port: Some(IntOrString::String("web".into())),
                    },
                    ServicePort {
                        name: None,
                        node_port: None,
                        port: 53,
                        protocol: Some("UDP".into()),
                        target_port: Some(IntOrString::Int(5353)),
                    },
                ]),
                session_affinity: Some("ClientIP".into()),
                session_affinity_config: Some(SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig {
                        timeout_seconds: Some(600),
                    }),
                }),
                type_: Some("LoadBalancer".into()),
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![
                        LoadBalancerIngress {
                            ip: Some("192.0.2.100".into()),
                            ip_mode: Some("VIP".into()),
                        },
                        LoadBalancerIngress {
                            ip: None,
                            ip_mode: None,
                        },
                    ]),
                }),
            }),
        };
        assert_eq!(service, expected);
    }

    #[test]
    fn an_endpoint_slice_in_kubernetes_json_sets_every_field_the_model_reads() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "lb-1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "lb"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.0.11"], "nodeName": "node-a", "zone": "z1",
                 "conditions": {"ready": false, "serving": true, "terminating": true},
                 "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node-a"}]},
                 "targetRef": {"kind": "Pod", "name": "web-1"}},
                {"addresses": ["10.244.1.11"]}
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}]
        }))
        .expect("parses");
        let expected = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: Some(vec![
                Endpoint {
                    addresses: vec!["10.244.0.11".into()],
                    conditions: Some(EndpointConditions {
                        ready: Some(false),
                        serving: Some(true),
                        terminating: Some(true),
                    }),
                    node_name: Some("node-a".into()),
                    hints: Some(EndpointHints {
                        for_zones: Some(vec![ForName { name: "z1".into() }]),
                        for_nodes: Some(vec![ForName {
                            name: "node-a".into(),
                        }]),
                    }),
                },
                Endpoint {
                    addresses: vec!["10.244.1.11".into()],
                    conditions: None,
                    node_name: None,
                    hints: None,
                },
            ]),
            metadata: ObjectMeta {
                name: Some("lb-1".into()),
                namespace: Some("shop".into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/service-name".into(),
                    "lb".into(),
                )])),
                ..ObjectMeta::default()
            },
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
            }]),
        };
        assert_eq!(slice, expected);
    }

    /// What k8s-openapi accepts the slim types accept alike: fields Kubernetes always
    /// sets may be missing or null; a wrong type is still an error.
    #[test]
    fn missing_and_null_fields_read_as_k8s_openapi_reads_them() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": null, "addressType": null, "endpoints": [{"addresses": null}]
        }))
        .expect("parses");
        assert_eq!(slice.address_type, "");
        assert_eq!(slice.endpoints.unwrap()[0].addresses, Vec::<String>::new());
        let service: Service =
            serde_json::from_value(serde_json::json!({"spec": {"ports": [{"name": "a"}]}}))
                .expect("parses");
        assert_eq!(service.spec.unwrap().ports.unwrap()[0].port, 0);
        for wrong in [
            serde_json::json!({"spec": {"ports": 80}}),
            serde_json::json!({"spec": {"clusterIP": 7}}),
            serde_json::json!({"spec": {"ports": [{"port": "80"}]}}),
        ] {
            assert!(
                serde_json::from_value::<Service>(wrong.clone()).is_err(),
                "{wrong}"
            );
        }
    }

    /// kube-rs finds both at the API server's paths for them.
    #[test]
    fn kube_resolves_the_api_paths() {
        use kube::Resource as _;
        assert_eq!(
            Service::url_path(&(), Some("shop")),
            "/api/v1/namespaces/shop/services"
        );
        assert_eq!(
            EndpointSlice::url_path(&(), None),
            "/apis/discovery.k8s.io/v1/endpointslices"
        );
        assert_eq!(Service::api_version(&()), "v1");
        assert_eq!(EndpointSlice::kind(&()), "EndpointSlice");
    }
}
