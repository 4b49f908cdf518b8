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

use tracing::{info, warn};

use crate::model::{HealthCheck, ServiceRef};

struct Listener {
    check: Arc<Mutex<HealthCheck>>,
    server: Arc<tiny_http::Server>,
}

/// The health-check servers of this node, one per port.
#[derive(Default)]
pub struct HealthChecks {
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

impl HealthChecks {
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
        if let Some(listener) = self.listeners.remove(&port) {
            listener.server.unblock();
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
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let server = match tiny_http::Server::http(addr) {
            Ok(server) => Arc::new(server),
            Err(e) => {
                // Retried on the next sync; the Service's traffic is not affected.
                warn!(port, "health-check port not served: {e}");
                return;
            }
        };
        let shared = Arc::new(Mutex::new(check.clone()));
        let (state, requests) = (shared.clone(), server.clone());
        std::thread::spawn(move || {
            for request in requests.incoming_requests() {
                let Ok(check) = state.lock().map(|c| c.clone()) else {
                    return;
                };
                let (status, body) = answer(&check);
                let mut response = tiny_http::Response::from_string(body).with_status_code(status);
                let weight = check.local_endpoints.to_string();
                for (name, value) in [
                    ("Content-Type", "application/json"),
                    ("X-Content-Type-Options", "nosniff"),
                    ("X-Load-Balancing-Endpoint-Weight", weight.as_str()),
                ] {
                    if let Ok(header) = tiny_http::Header::from_bytes(name, value) {
                        response.add_header(header);
                    }
                }
                let _ = request.respond(response);
            }
        });
        info!(port, service = %check.service, "serving health-check port");
        self.listeners.insert(
            port,
            Listener {
                check: shared,
                server,
            },
        );
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for listener in self.listeners.values() {
            listener.server.unblock();
        }
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
        check.local_endpoints = 0;
        assert_eq!(answer(&check).0, 503);
    }
}
