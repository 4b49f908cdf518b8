//! A fake Kubernetes API server for the agent's watch source: real list/watch JSON
//! over HTTP/1.1 (chunked watch streams, resourceVersion, BOOKMARK, ERROR 410 Gone),
//! enough for kube-rs's client and watcher to run unmodified. Tests change objects,
//! cut watch connections, and open a "gap": watches are refused while objects change,
//! then older resourceVersions are answered with 410 (as after etcd compaction).
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
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

use crate::lab::Netns;

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
    /// Listen on 127.0.0.1 inside `netns` (where the agent runs).
    pub fn start(netns: &Netns) -> Result<Self> {
        let listener = netns.run(|| TcpListener::bind("127.0.0.1:0"))??;
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
                        std::thread::spawn(move || {
                            let _ = handle(stream, &state);
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

    /// Cut every open watch connection mid-stream.
    /// Every list and watch request so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

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

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.disconnect_watches();
    }
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) -> Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

fn chunk(stream: &mut TcpStream, line: &str) -> std::io::Result<()> {
    write!(stream, "{:x}\r\n{line}\n\r\n", line.len() + 1)?;
    stream.flush()
}

fn handle(mut stream: TcpStream, state: &Mutex<State>) -> Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let target = request_line
        .split_whitespace()
        .nth(1)
        .context("no target")?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let Some((_, kind)) = RESOURCES.iter().find(|(p, _)| *p == path) else {
        return respond(
            &mut stream,
            "404 Not Found",
            r#"{"kind":"Status","code":404}"#,
        );
    };
    let node_filter = params
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName="))
        .map(str::to_string);
    let watch = params.get("watch").map(String::as_str) == Some("true");
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
        return respond(&mut stream, "200 OK", &body);
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
            chunk(&mut stream, &gone.to_string())?;
            write!(stream, "0\r\n\r\n")?;
            return Ok(());
        }
        for (rv, event_type, object) in &st.history {
            if *rv > from && key_of(object).0 == *kind && matches(&node_filter, object) {
                let line = json!({"type": event_type, "object": object});
                chunk(&mut stream, &line.to_string())?;
            }
        }
        let bookmark = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": "v1",
            "metadata": {"resourceVersion": st.resource_version.to_string()}}});
        chunk(&mut stream, &bookmark.to_string())?;
        st.watches.push(Watch {
            kind: kind.to_string(),
            node_filter,
            events: sender,
        });
    }
    // Until the server drops our sender (disconnect) or the client goes away.
    for line in events {
        if chunk(&mut stream, &line).is_err() {
            bail!("client went away");
        }
    }
    let _ = write!(stream, "0\r\n\r\n");
    Ok(())
}
