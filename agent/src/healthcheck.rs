//! `spec.healthCheckNodePort` of `externalTrafficPolicy: Local` LoadBalancers,
//! answered the way kube-proxy does: HTTP 200 while this node has a ready local
//! endpoint of the Service, 503 when it has none, with kube-proxy's JSON body and
//! `X-Load-Balancing-Endpoint-Weight` header, so a cloud load balancer sends traffic
//! only to nodes that can serve it without leaving the node.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use futures::FutureExt;
use tracing::{info, warn};

use crate::{
    http::{Handler, HttpRuntime, Limits, Reply},
    model::{HealthCheck, ServiceRef},
};

struct Listener {
    check: Arc<Mutex<HealthCheck>>,
    /// Closes the port and its connections when dropped.
    _server: crate::http::Listener,
}

/// The health-check servers of this node, one listener per port, all on the agent's
/// HTTP runtime (see `http` for what a client can and cannot do to them).
#[derive(Default)]
pub struct HealthChecks {
    /// `None` until the agent gives it its runtime: no port is served before.
    http: Option<Arc<HttpRuntime>>,
    listeners: BTreeMap<u16, Listener>,
}

/// Status and body of the answer for `check`.
pub fn answer(check: &HealthCheck) -> (u16, String) {
    let status = if check.local_endpoints > 0 { 200 } else { 503 };
    let body = format!(
        "{{\"service\":{{\"namespace\":\"{}\",\"name\":\"{}\"}},\"localEndpoints\":{},\"serviceProxyHealthy\":true}}\n",
        check.service.namespace, check.service.name, check.local_endpoints
    );
    (status, body)
}

/// The whole answer, headers included, as kube-proxy gives it (to any path).
pub fn reply(check: &HealthCheck) -> Reply {
    let (status, body) = answer(check);
    Reply {
        status,
        headers: vec![
            ("Content-Type", "application/json".into()),
            ("X-Content-Type-Options", "nosniff".into()),
            (
                "X-Load-Balancing-Endpoint-Weight",
                check.local_endpoints.to_string(),
            ),
        ],
        body,
    }
}

impl HealthChecks {
    /// Serve the ports on `http` from now on.
    pub fn new(http: Arc<HttpRuntime>) -> Self {
        Self {
            http: Some(http),
            listeners: BTreeMap::new(),
        }
    }

    /// Serve exactly `checks` (a full sync's).
    pub fn set(&mut self, checks: &BTreeMap<u16, HealthCheck>) {
        let gone: Vec<u16> = self
            .listeners
            .keys()
            .filter(|port| !checks.contains_key(port))
            .copied()
            .collect();
        for port in gone {
            self.stop(port);
        }
        for (port, check) in checks {
            self.serve(*port, check);
        }
    }

    /// Replace the checks of the `changed` Services with `checks` (theirs now).
    pub fn update_services(
        &mut self,
        changed: &BTreeSet<ServiceRef>,
        checks: &BTreeMap<u16, HealthCheck>,
    ) {
        let gone: Vec<u16> = self
            .listeners
            .iter()
            .filter(|(port, l)| {
                !checks.contains_key(port)
                    && l.check.lock().is_ok_and(|c| changed.contains(&c.service))
            })
            .map(|(port, _)| *port)
            .collect();
        for port in gone {
            self.stop(port);
        }
        for (port, check) in checks {
            if changed.contains(&check.service) {
                self.serve(*port, check);
            }
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }

    fn stop(&mut self, port: u16) {
        if self.listeners.remove(&port).is_some() {
            info!(port, "health-check port closed");
        }
    }

    fn serve(&mut self, port: u16, check: &HealthCheck) {
        if let Some(listener) = self.listeners.get(&port) {
            if let Ok(mut current) = listener.check.lock() {
                *current = check.clone();
            }
            return;
        }
        let Some(http) = &self.http else {
            return;
        };
        let shared = Arc::new(Mutex::new(check.clone()));
        let state = shared.clone();
        let handler: Handler = Arc::new(move |_path: &str| {
            let reply = match state.lock() {
                Ok(check) => reply(&check),
                Err(_) => Reply::text(500, "health state lost\n"),
            };
            std::future::ready(reply).boxed()
        });
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let server = match http.serve(addr, Limits::DEFAULT, handler) {
            Ok(server) => server,
            Err(e) => {
                // Retried on the next sync; the Service's traffic is not affected.
                warn!(port, "health-check port not served: {e:#}");
                return;
            }
        };
        info!(port, service = %check.service, "serving health-check port");
        self.listeners.insert(
            port,
            Listener {
                check: shared,
                _server: server,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_200_with_local_endpoints_and_503_without_like_kube_proxy() {
        let mut check = HealthCheck {
            service: ServiceRef {
                namespace: "shop".into(),
                name: "web".into(),
            },
            local_endpoints: 2,
        };
        let (status, body) = answer(&check);
        assert_eq!(status, 200);
        assert_eq!(
            body,
            "{\"service\":{\"namespace\":\"shop\",\"name\":\"web\"},\"localEndpoints\":2,\"serviceProxyHealthy\":true}\n"
        );
        let headers = reply(&check).headers;
        assert!(headers.contains(&("X-Load-Balancing-Endpoint-Weight", "2".into())));
        assert!(headers.contains(&("Content-Type", "application/json".into())));
        check.local_endpoints = 0;
        assert_eq!(answer(&check).0, 503);
    }
}
