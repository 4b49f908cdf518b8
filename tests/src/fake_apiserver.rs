//! A fake Kubernetes API server for the agent's watch source: real list/watch JSON
//! over HTTP/1.1 (chunked watch streams, resourceVersion, BOOKMARK, ERROR 410 Gone),
//! enough for kube-rs's client and watcher to run unmodified. Tests change objects,
//! cut watch connections, and open a "gap": watches are refused while objects change,
//! then older resourceVersions are answered with 410 (as after etcd compaction).
//!
//! [`FakeApiServer::start_in_cluster`] serves the same over TLS, as the agent reaches
//! the real one from a pod: a bearer token (the service account's) is required, and
//! only what a ClusterRole's rules grant is answered (403 for the rest, recorded).
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::lab::{Cluster, Netns, ObjectStore, WORLD_GATEWAY};

/// The collections the agent watches: (URL path, kind).
const RESOURCES: [(&str, &str); 6] = [
    ("/api/v1/services", "Service"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice"),
    ("/api/v1/nodes", "Node"),
    ("/api/v1/pods", "Pod"),
    ("/api/v1/namespaces", "Namespace"),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "NetworkPolicy",
    ),
];

struct Watch {
    kind: String,
    node_filter: Option<String>,
    events: mpsc::Sender<String>,
}

/// A request the server answered: what a test can tell a relist from a resumed watch by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The object kind (`Service`, `EndpointSlice`, `Node`, `Pod`).
    pub kind: String,
    pub watch: bool,
    /// The resourceVersion a watch resumed from (0: from now / none given).
    pub resource_version: u64,
}

#[derive(Default)]
struct State {
    /// Every list and watch request, in order.
    requests: Vec<Request>,
    resource_version: u64,
    /// (kind, namespace, name) -> object, and its JSON text (lists are concatenated
    /// from these, so a list of 10,000 objects costs the server little next to the
    /// client it serves, as with the API server's watch cache).
    objects: BTreeMap<(String, String, String), (Value, String)>,
    watches: Vec<Watch>,
    /// Requests refused for want of the token or of a rule.
    refusals: Vec<Refusal>,
    /// Watch requests are refused (connection closed) while set.
    gap: bool,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_valid: u64,
    /// Every event (resourceVersion, type, object), replayed to watches that start
    /// from an older resourceVersion, as the real API server does.
    history: Vec<(u64, String, Value)>,
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

/// One rule of a ClusterRole: the verbs it grants on resources of API groups.
#[derive(Clone, Debug)]
pub struct Rule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
}

impl Rule {
    fn grants(&self, group: &str, resource: &str, verb: &str) -> bool {
        let has = |list: &[String], item: &str| list.iter().any(|x| x == item || x == "*");
        has(&self.api_groups, group) && has(&self.resources, resource) && has(&self.verbs, verb)
    }
}

/// The rules of the ClusterRole `name` in a Kubernetes YAML file (deploy/rbac.yaml).
pub fn cluster_role_rules(yaml: &str, name: &str) -> Result<Vec<Rule>> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let doc: Value = serde::Deserialize::deserialize(document)?;
        if doc["kind"] == "ClusterRole" && doc["metadata"]["name"] == name {
            return doc["rules"]
                .as_array()
                .context("rules")?
                .iter()
                .map(|r| {
                    Ok(Rule {
                        api_groups: strings(&r["apiGroups"]),
                        resources: strings(&r["resources"]),
                        verbs: strings(&r["verbs"]),
                    })
                })
                .collect();
        }
    }
    bail!("no ClusterRole {name}")
}

/// A cluster's CA and an API server certificate it signed for `server_ip`, as a
/// cluster's PKI holds them: the CA's PEM goes to pods as `ca.crt`.
pub struct ClusterCa {
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    pub server: Arc<rustls::ServerConfig>,
}

impl ClusterCa {
    pub fn new(server_ip: std::net::IpAddr) -> Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
            SanType,
        };
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "ferrite-test-cluster-ca");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(Vec::<String>::new())?;
        server.subject_alt_names = vec![SanType::IpAddress(server_ip)];
        server
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        let server_cert = server.signed_by(&server_key, &Issuer::from_params(&ca, &ca_key))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![server_cert.der().clone(), ca_cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
            )?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().to_vec(),
            server: Arc::new(config),
        })
    }

    /// GET `path` from the server at `addr` over TLS, trusting only this CA, with
    /// `token` as bearer token (if any): the status.
    pub fn get(&self, addr: SocketAddr, token: Option<&str>, path: &str) -> Result<u16> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from(self.ca_der.clone()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let connection = rustls::ClientConnection::new(Arc::new(config), name)?;
        let socket = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut tls = rustls::StreamOwned::new(connection, socket);
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            tls,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
        )?;
        tls.flush()?;
        let mut line = String::new();
        BufReader::new(tls).read_line(&mut line)?;
        line.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no HTTP status in {line:?}"))
    }
}

/// Who may ask what: the bearer token the server accepts and the rules bound to it.
#[derive(Clone, Debug)]
pub struct Access {
    pub token: String,
    pub rules: Vec<Rule>,
}

/// A refused request: `401` without the token, `403` outside the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// `METHOD target`, and the verb and resource it asked for.
    pub request: String,
}

/// The (API group, resource, verb) of a request, as the API server's authorizer
/// sees it; None for a URL that names no resource.
fn attributes(method: &str, path: &str, watch: bool) -> Option<(String, String, String)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _namespace, resource, tail @ ..] => {
            let mut r = vec![*resource];
            r.extend(tail);
            r
        }
        other => other.to_vec(),
    };
    let (resource, named) = match rest.as_slice() {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => return None,
    };
    let verb = match (method, named, watch) {
        ("GET" | "HEAD", _, true) => "watch",
        ("GET" | "HEAD", false, false) => "list",
        ("GET" | "HEAD", true, false) => "get",
        ("POST", _, _) => "create",
        ("PUT", _, _) => "update",
        ("PATCH", _, _) => "patch",
        ("DELETE", false, _) => "deletecollection",
        ("DELETE", true, _) => "delete",
        _ => return None,
    };
    Some((group.to_string(), resource, verb.to_string()))
}

fn key_of(object: &Value) -> (String, String, String) {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        text(&object["kind"]),
        text(&object["metadata"]["namespace"]),
        text(&object["metadata"]["name"]),
    )
}

fn node_of(object: &Value) -> Option<&str> {
    object["spec"]["nodeName"].as_str()
}

fn matches(watch_filter: &Option<String>, object: &Value) -> bool {
    watch_filter
        .as_deref()
        .is_none_or(|node| node_of(object) == Some(node))
}

/// `%3D` -> `=` and friends, enough for field selectors.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FakeApiServer {
    /// Listen on 127.0.0.1 inside `netns` (where the agent runs): plain HTTP, no
    /// credentials asked, everything allowed.
    pub fn start(netns: &Netns) -> Result<Self> {
        let listener = netns.run(|| TcpListener::bind("127.0.0.1:0"))??;
        Self::serve(listener, None, None)
    }

    /// Serve `cluster`'s objects from its world, on the node network's gateway address
    /// (every node reaches it as a node reaches its API server): the cluster's agents
    /// run in Kubernetes mode from then on.
    pub fn serve_cluster(cluster: &mut Cluster) -> Result<()> {
        let listener = cluster
            .world
            .run(|| TcpListener::bind(SocketAddr::from((WORLD_GATEWAY, 0))))??;
        cluster.serve_objects_from(Box::new(Self::serve(listener, None, None)?));
        Ok(())
    }

    /// Listen on `addr` inside `netns` over TLS (`tls`: the server's certificate and
    /// key), answering only requests with `access.token` as bearer token that its
    /// rules grant, as an API server does for a pod's service account.
    pub fn start_in_cluster(
        netns: &Netns,
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        access: Access,
    ) -> Result<Self> {
        let listener = netns.run(|| TcpListener::bind(addr))??;
        Self::serve(listener, Some(tls), Some(access))
    }

    fn serve(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        access: Option<Access>,
    ) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            resource_version: 1,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (state2, stop2) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let state = state2.clone();
                        let (tls, access) = (tls.clone(), access.clone());
                        std::thread::spawn(move || {
                            let _ = stream.set_nonblocking(false);
                            match tls {
                                None => handle(stream, &state, access.as_ref()),
                                Some(config) => rustls::ServerConnection::new(config)
                                    .map_err(anyhow::Error::from)
                                    .and_then(|connection| {
                                        let tls = rustls::StreamOwned::new(connection, stream);
                                        handle(tls, &state, access.as_ref())
                                    }),
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self { addr, state, stop })
    }

    /// A kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n",
                self.addr
            ),
        )?;
        Ok(())
    }

    fn notify(state: &mut State, event_type: &str, object: &Value) {
        let rv = state.resource_version;
        state
            .history
            .push((rv, event_type.to_string(), object.clone()));
        let kind = key_of(object).0;
        let line = json!({"type": event_type, "object": object}).to_string();
        state.watches.retain(|w| {
            if w.kind != kind || !matches(&w.node_filter, object) {
                return true;
            }
            w.events.send(line.clone()).is_ok()
        });
    }

    /// Create or update an object (a Kubernetes object as JSON, with kind and apiVersion).
    pub fn apply(&self, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
        let key = key_of(&object);
        let event = if state.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let text = object.to_string();
        state.objects.insert(key, (object.clone(), text));
        Self::notify(&mut state, event, &object);
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let key = (kind.to_string(), namespace.to_string(), name.to_string());
        if let Some((mut object, _)) = state.objects.remove(&key) {
            object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            Self::notify(&mut state, "DELETED", &object);
        }
    }

    /// Every list and watch request so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Every request refused so far (401, 403), in order.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.state.lock().unwrap().refusals.clone()
    }

    /// Cut every open watch connection mid-stream.
    pub fn disconnect_watches(&self) {
        self.state.lock().unwrap().watches.clear();
    }

    /// Start a gap: open watches are cut and new ones refused until `end_gap`.
    pub fn begin_gap(&self) {
        let mut state = self.state.lock().unwrap();
        state.gap = true;
        state.watches.clear();
    }

    /// End the gap as compaction would: every resourceVersion from before now is
    /// gone, so resuming watches get ERROR 410 and must relist.
    pub fn end_gap(&self) {
        let mut state = self.state.lock().unwrap();
        state.oldest_valid = state.resource_version;
        state.gap = false;
    }

    /// Load every document of a Kubernetes YAML file (`kind: List` not supported).
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        for document in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value: Value = serde::Deserialize::deserialize(document)?;
            if !value.is_null() {
                self.apply(value);
            }
        }
        Ok(())
    }
}

impl ObjectStore for FakeApiServer {
    fn apply(&self, object: Value) {
        FakeApiServer::apply(self, object)
    }

    fn delete(&self, kind: &str, namespace: &str, name: &str) {
        FakeApiServer::delete(self, kind, namespace, name)
    }

    fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        FakeApiServer::write_kubeconfig(self, path)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.disconnect_watches();
    }
}

fn respond(stream: &mut impl Write, status: &str, body: &str) -> Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    Ok(())
}

fn chunk(stream: &mut impl Write, line: &str) -> std::io::Result<()> {
    write!(stream, "{:x}\r\n{line}\n\r\n", line.len() + 1)?;
    stream.flush()
}

fn handle(stream: impl Read + Write, state: &Mutex<State>, access: Option<&Access>) -> Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_string());
            }
        }
    }
    // No request has a body: what is buffered is the request's, the rest is ours.
    let stream = reader.get_mut();
    let mut words = request_line.split_whitespace();
    let method = words.next().context("no method")?.to_string();
    let target = words.next().context("no target")?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let watch = params.get("watch").map(String::as_str) == Some("true");
    if let Some(access) = access {
        let refuse = |status: u16, why: String| {
            state.lock().unwrap().refusals.push(Refusal {
                status,
                request: format!("{method} {target} ({why})"),
            });
        };
        if authorization.as_deref() != Some(&format!("Bearer {}", access.token)) {
            refuse(401, "no valid bearer token".into());
            return respond(
                stream,
                "401 Unauthorized",
                r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Unauthorized","code":401}"#,
            );
        }
        let verdict = match attributes(&method, path, watch) {
            Some((group, resource, verb)) => (
                access
                    .rules
                    .iter()
                    .any(|r| r.grants(&group, &resource, &verb)),
                format!("{verb} {resource} of API group {group:?}"),
            ),
            None => (false, "a URL naming no resource".into()),
        };
        if let (false, why) = verdict {
            refuse(403, why.clone());
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "Forbidden", "code": 403, "message": format!("forbidden: {why}")});
            return respond(stream, "403 Forbidden", &body.to_string());
        }
    }
    let Some((_, kind)) = RESOURCES.iter().find(|(p, _)| *p == path) else {
        return respond(stream, "404 Not Found", r#"{"kind":"Status","code":404}"#);
    };
    let node_filter = params
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName="))
        .map(str::to_string);
    state.lock().unwrap().requests.push(Request {
        kind: kind.to_string(),
        watch,
        resource_version: params
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    });
    if !watch {
        let st = state.lock().unwrap();
        // Pages as the API server gives them: `limit` items, then a `continue` token
        // (here: the namespace/name after which the next page starts).
        let limit: usize = params
            .get("limit")
            .and_then(|v| v.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let after = params.get("continue").and_then(|c| c.split_once('/'));
        let mut matching = st.objects.iter().filter(|((k, ns, name), (o, _))| {
            k == kind
                && matches(&node_filter, o)
                && after.is_none_or(|(a_ns, a_name)| (ns.as_str(), name.as_str()) > (a_ns, a_name))
        });
        let page: Vec<_> = matching.by_ref().take(limit).collect();
        let more = matching.next().is_some();
        let items: Vec<&str> = page.iter().map(|(_, (_, text))| text.as_str()).collect();
        let mut metadata = json!({"resourceVersion": st.resource_version.to_string()});
        if let (true, Some(((_, ns, name), _))) = (more, page.last()) {
            metadata["continue"] = json!(format!("{ns}/{name}"));
        }
        let head = json!({
            "kind": format!("{kind}List"),
            "apiVersion": "v1",
            "metadata": metadata,
        })
        .to_string();
        let body = format!(
            "{},\"items\":[{}]}}",
            head.strip_suffix('}').context("list head")?,
            items.join(",")
        );
        return respond(stream, "200 OK", &body);
    }
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (sender, events) = mpsc::channel();
    {
        let mut st = state.lock().unwrap();
        if st.gap {
            return Ok(()); // connection dropped: the client retries with backoff
        }
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )?;
        if from < st.oldest_valid {
            let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from} ({})", st.oldest_valid)}});
            chunk(stream, &gone.to_string())?;
            write!(stream, "0\r\n\r\n")?;
            return Ok(());
        }
        for (rv, event_type, object) in &st.history {
            if *rv > from && key_of(object).0 == *kind && matches(&node_filter, object) {
                let line = json!({"type": event_type, "object": object});
                chunk(stream, &line.to_string())?;
            }
        }
        let bookmark = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": "v1",
            "metadata": {"resourceVersion": st.resource_version.to_string()}}});
        chunk(stream, &bookmark.to_string())?;
        st.watches.push(Watch {
            kind: kind.to_string(),
            node_filter,
            events: sender,
        });
    }
    // Until the server drops our sender (disconnect) or the client goes away.
    for line in events {
        if chunk(stream, &line).is_err() {
            bail!("client went away");
        }
    }
    let _ = write!(stream, "0\r\n\r\n");
    Ok(())
}
