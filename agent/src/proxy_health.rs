//! kube-proxy's own health endpoint (`--healthz-bind-address`, kube-proxy's flag and
//! default `0.0.0.0:10256`): what cloud load balancers and cluster autoscalers probe
//! to learn whether a node's Service proxy works and whether the node should still
//! take load-balancer traffic. kube-proxy's rules (pkg/proxy/healthcheck/
//! proxy_health.go):
//! - `/livez`: 200 while the datapath keeps being synced; 503 once the last sync (a
//!   full one or one of changed Services) is older than two resync periods (kube-proxy:
//!   two `--sync-period`s for a queued change), counted from the start until the
//!   first sync;
//! - `/healthz`: the same, and 503 while this node's Node object is being deleted
//!   (`deletionTimestamp`) or carries the cluster autoscaler's
//!   `ToBeDeletedByClusterAutoscaler` taint, so load balancers drain the node first;
//! - bodies are kube-proxy's JSON: `{"lastUpdated": ..,"currentTime": .., "nodeEligible":
//!   ..}` (`/livez` without `nodeEligible`), `lastUpdated` being the current time while
//!   healthy, as kube-proxy keeps it for older clients. Times are RFC 3339 in UTC
//!   (kube-proxy prints Go's `time.String()`, which no client parses).
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use futures::FutureExt;
use k8s_openapi::{api::core::v1::Node, jiff::Timestamp};

use crate::http::{Handler, Reply};

/// kube-proxy's default `--healthz-bind-address`.
pub const DEFAULT_BIND_ADDRESS: &str = "0.0.0.0:10256";

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether load balancers should still send traffic to the node `node` describes:
/// not while it is being deleted or the cluster autoscaler is about to delete it.
pub fn node_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let tainted = node
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !deleting && !tainted
}

/// The health the endpoint reports, updated by the agent's syncs.
#[derive(Debug, Default)]
pub struct ProxyHealth {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Two resync periods; `None` until the sync loop runs (nothing is judged).
    timeout: Option<Duration>,
    /// The last sync, or the start while there was none.
    since: Option<Instant>,
    last_synced: Option<SystemTime>,
    /// Eligible until a Node object says otherwise (kube-proxy's start-up rule).
    node_eligible: bool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            timeout: None,
            since: None,
            last_synced: None,
            node_eligible: true,
        }
    }
}

impl ProxyHealth {
    /// The sync loop starts at `now` and syncs at least every `resync`.
    pub fn start(&self, resync: Duration, now: Instant) {
        let mut state = self.state.lock().expect("proxy health");
        state.timeout = Some(resync * 2);
        state.since.get_or_insert(now);
    }

    /// The datapath was synced at `now` (`wall` on the clock the answers show).
    pub fn synced(&self, now: Instant, wall: SystemTime) {
        let mut state = self.state.lock().expect("proxy health");
        state.since = Some(now);
        state.last_synced = Some(wall);
    }

    /// What this node's Node object says (see [`node_eligible`]). Returns whether
    /// that changed.
    pub fn set_node_eligible(&self, eligible: bool) -> bool {
        let mut state = self.state.lock().expect("proxy health");
        std::mem::replace(&mut state.node_eligible, eligible) != eligible
    }

    /// The answer to a GET of `path` at `now` (`wall`).
    pub fn answer(&self, path: &str, now: Instant, wall: SystemTime) -> Reply {
        let state = self.state.lock().expect("proxy health");
        let synced_in_time = match (state.timeout, state.since) {
            (Some(timeout), Some(since)) => now.saturating_duration_since(since) <= timeout,
            _ => true,
        };
        let current = timestamp(wall);
        let (healthy, body) = match path {
            "/healthz" => {
                let healthy = synced_in_time && state.node_eligible;
                let last = if healthy {
                    current.clone()
                } else {
                    state.last_synced.map(timestamp).unwrap_or_else(zero_time)
                };
                let body = format!(
                    r#"{{"lastUpdated": "{last}","currentTime": "{current}", "nodeEligible": {}}}"#,
                    state.node_eligible
                );
                (healthy, body)
            }
            "/livez" => {
                let last = if synced_in_time {
                    current.clone()
                } else {
                    state.last_synced.map(timestamp).unwrap_or_else(zero_time)
                };
                let body = format!(r#"{{"lastUpdated": "{last}","currentTime": "{current}"}}"#);
                (synced_in_time, body)
            }
            _ => return Reply::text(404, "404 page not found\n"),
        };
        Reply {
            status: if healthy { 200 } else { 503 },
            headers: vec![
                ("Content-Type", "application/json".into()),
                ("X-Content-Type-Options", "nosniff".into()),
            ],
            body,
        }
    }
}

fn timestamp(wall: SystemTime) -> String {
    Timestamp::try_from(wall)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| zero_time())
}

/// What kube-proxy shows before anything was synced: Go's zero time.
fn zero_time() -> String {
    "0001-01-01T00:00:00Z".to_string()
}

/// `/healthz` and `/livez` for [`crate::http::HttpRuntime::serve`].
pub fn endpoint(health: Arc<ProxyHealth>) -> Handler {
    Arc::new(move |path: &str| {
        let reply = health.answer(path, Instant::now(), SystemTime::now());
        std::future::ready(reply).boxed()
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{NodeSpec, Taint},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };

    use super::*;

    fn node(taints: &[&str], deleting: bool) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n".into()),
                deletion_timestamp: deleting.then_some(Time(Timestamp::UNIX_EPOCH)),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: Some(
                    taints
                        .iter()
                        .map(|key| Taint {
                            key: key.to_string(),
                            effect: "NoSchedule".into(),
                            ..Taint::default()
                        })
                        .collect(),
                ),
                ..NodeSpec::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn a_node_being_deleted_or_about_to_be_is_not_eligible() {
        assert!(node_eligible(&node(&[], false)));
        assert!(node_eligible(&node(
            &["node.kubernetes.io/unschedulable"],
            false
        )));
        assert!(!node_eligible(&node(&[TO_BE_DELETED_TAINT], false)));
        assert!(!node_eligible(&node(&[], true)));
    }

    #[test]
    fn healthz_and_livez_follow_the_syncs_and_healthz_the_node() {
        let health = ProxyHealth::default();
        let start = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let resync = Duration::from_secs(10);
        let at = |secs: u64| start + Duration::from_secs(secs);
        let wall_at = |secs: u64| wall + Duration::from_secs(secs);
        let status = |path: &str, secs: u64| health.answer(path, at(secs), wall_at(secs)).status;
        // Before the loop runs nothing is judged.
        assert_eq!(status("/healthz", 0), 200);
        health.start(resync, at(0));
        assert_eq!(status("/livez", 20), 200, "two periods from the start");
        assert_eq!(status("/livez", 21), 503, "no sync within two periods");
        let body = health.answer("/livez", at(21), wall_at(21)).body;
        assert!(
            body.contains(r#""lastUpdated": "0001-01-01T00:00:00Z""#),
            "{body}"
        );
        health.synced(at(25), wall_at(25));
        assert_eq!(status("/healthz", 30), 200);
        let reply = health.answer("/healthz", at(30), wall_at(30));
        assert_eq!(
            reply.body,
            r#"{"lastUpdated": "2027-01-15T08:00:30Z","currentTime": "2027-01-15T08:00:30Z", "nodeEligible": true}"#
        );
        assert!(reply
            .headers
            .contains(&("Content-Type", "application/json".into())));
        // The node marked for deletion: load balancers are told to drain it, while
        // the proxy itself stays alive.
        assert!(health.set_node_eligible(false));
        let reply = health.answer("/healthz", at(31), wall_at(31));
        assert_eq!(reply.status, 503);
        assert_eq!(
            reply.body,
            r#"{"lastUpdated": "2027-01-15T08:00:25Z","currentTime": "2027-01-15T08:00:31Z", "nodeEligible": false}"#
        );
        assert_eq!(status("/livez", 31), 200);
        assert!(!health.set_node_eligible(false), "no change");
        health.set_node_eligible(true);
        assert_eq!(status("/healthz", 45), 200);
        assert_eq!(status("/healthz", 46), 503, "the last sync is 21 s old");
        assert_eq!(status("/metrics", 30), 404);
    }
}
