//! The agent's side of `ferrite monitor`: one reader of `ferrite_events`, any number
//! of monitors on the node's Unix socket, each with a bounded queue. A monitor that
//! reads too slowly loses what does not fit in its queue: counted, and told where the
//! gap is (a `missed` line queued as soon as there is room, after what it already had
//! queued); it never holds up the reader, the other monitors or the agent. Queries
//! (`ferrite explain`, `inspect policy`) are answered on the same thread, a few at
//! a time, each one line written within the request timeout.
use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData, RingBuf};
use ferrite_common::map_names;
use tokio::{
    io::{unix::AsyncFd, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::mpsc,
};
use tracing::{info, warn};

use super::{answer, decode, describe, parse_incoming, socket_path, Filter, Incoming, Line};
use crate::{
    files::{self, create_private_dir},
    telemetry::Telemetry,
};

/// Lines queued for one monitor before it starts missing events.
pub const QUEUE_LINES: usize = 4096;
/// Monitors served at once: each holds a queue and a connection.
pub const MAX_MONITORS: usize = 32;
/// How long a new connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Queries answered at once; more wait their turn. Each answer is computed on the
/// monitor thread (one pod's policies: cheap) and may be up to a few MB to write.
const MAX_QUERIES: usize = 8;
/// What a monitor may send in all: its request line (a few hundred bytes). Past it,
/// its input ends, as if it had gone: no line grows without bound.
const MAX_INPUT_BYTES: u64 = 64 * 1024;

struct Subscriber {
    filter: Filter,
    queue: mpsc::Sender<Arc<str>>,
    /// Events that did not fit since the last one queued.
    missed: u64,
}

impl Subscriber {
    /// Queue `line` if there is room, after a `missed` line for the gap before it.
    fn offer(&mut self, line: &Arc<str>) {
        if self.missed > 0 {
            let gap = to_json(&Line::Missed { count: self.missed });
            if self.queue.try_send(gap.into()).is_err() {
                self.missed += 1;
                return;
            }
            self.missed = 0;
        }
        if self.queue.try_send(line.clone()).is_err() {
            self.missed += 1;
        }
    }
}

/// The connected monitors and the `ferrite_monitor` entry that follows them.
struct Subscribers {
    by_id: BTreeMap<u64, Subscriber>,
    next_id: u64,
    wants_entry: Array<MapData, u32>,
    wants: u32,
}

impl Subscribers {
    /// Write the union of what the monitors want, when it changed.
    fn update_wants(&mut self) -> Result<()> {
        let wants = self.by_id.values().fold(0, |all, s| all | s.filter.wants);
        if wants != self.wants {
            self.wants_entry
                .set(0, wants, 0)
                .with_context(|| format!("writing {}", map_names::MONITOR))?;
            self.wants = wants;
        }
        Ok(())
    }

    fn subscribe(&mut self, subscriber: Subscriber) -> Result<u64, String> {
        if self.by_id.len() >= MAX_MONITORS {
            return Err(format!("{MAX_MONITORS} monitors are connected already"));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.by_id.insert(id, subscriber);
        if let Err(e) = self.update_wants() {
            self.by_id.remove(&id);
            return Err(format!("{e:#}"));
        }
        Ok(id)
    }

    fn unsubscribe(&mut self, id: u64) {
        self.by_id.remove(&id);
        if let Err(e) = self.update_wants() {
            warn!("monitor: {e:#}");
        }
    }
}

/// The monitor service of a node's agent, running on a thread of its own.
pub struct MonitorHub {
    subscribers: Arc<Mutex<Subscribers>>,
    socket: PathBuf,
}

impl MonitorHub {
    /// Open the node's event maps, clear `ferrite_monitor` (an earlier agent's
    /// monitors are gone with it) and listen on the node's monitor socket.
    pub fn start(node: &str, pin_dir: &Path, telemetry: Arc<Telemetry>) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        };
        let ring: RingBuf<MapData> = open(map_names::EVENTS)?.try_into()?;
        let mut wants_entry: Array<MapData, u32> = open(map_names::MONITOR)?.try_into()?;
        wants_entry.set(0, 0, 0)?;
        create_private_dir(&files::run_dir(node))?;
        let socket = socket_path(node);
        // A socket file left by an earlier agent: nothing listens on it any more.
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", socket.display())),
        }
        let listener = std::os::unix::net::UnixListener::bind(&socket)
            .with_context(|| format!("listening on {}", socket.display()))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let subscribers = Arc::new(Mutex::new(Subscribers {
            by_id: BTreeMap::new(),
            next_id: 0,
            wants_entry,
            wants: 0,
        }));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let shared = subscribers.clone();
        let node_name = node.to_string();
        std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || {
                let served = runtime.block_on(serve(listener, ring, shared, telemetry, node_name));
                if let Err(e) = served {
                    warn!("monitor service stopped: {e:#}");
                }
            })?;
        info!(socket = %socket.display(), "serving monitors");
        Ok(Self {
            subscribers,
            socket,
        })
    }

    /// Monitors connected now.
    pub fn monitors(&self) -> usize {
        self.lock().by_id.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before the agent exits: no event is wanted any more, and nobody may connect.
    pub fn stop(&self) {
        let mut subscribers = self.lock();
        subscribers.by_id.clear();
        if let Err(e) = subscribers.update_wants() {
            warn!("monitor: {e:#}");
        }
        if let Err(e) = std::fs::remove_file(&self.socket) {
            warn!("removing {}: {e}", self.socket.display());
        }
    }
}

async fn serve(
    listener: std::os::unix::net::UnixListener,
    ring: RingBuf<MapData>,
    subscribers: Arc<Mutex<Subscribers>>,
    telemetry: Arc<Telemetry>,
    node: String,
) -> Result<()> {
    let listener = UnixListener::from_std(listener)?;
    let queries = Arc::new(tokio::sync::Semaphore::new(MAX_QUERIES));
    let accept = async {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let connection = Connection {
                        subscribers: subscribers.clone(),
                        telemetry: telemetry.clone(),
                        node: node.clone(),
                        queries: queries.clone(),
                    };
                    tokio::spawn(connection.serve(stream));
                }
                Err(e) => warn!("monitor: accepting a connection: {e}"),
            }
        }
    };
    tokio::select! {
        () = accept => Ok(()),
        read = read_events(ring, &subscribers, &telemetry) => read,
    }
}

/// Take every event from the ring as it comes and queue it for each monitor it
/// matches (serialized once); a full queue counts a miss instead of waiting.
async fn read_events(
    ring: RingBuf<MapData>,
    subscribers: &Mutex<Subscribers>,
    telemetry: &Telemetry,
) -> Result<()> {
    // SAFETY: the ring owns its map's file descriptor, open and the same for as long
    // as the AsyncFd holds the ring.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    // Records of another layout come from the programs of the previous object
    // during an upgrade (the ring keeps its size, so its pin is reused), until
    // their links move to the new ones: skipped, said once.
    let mut foreign_records = 0u64;
    loop {
        let mut ready = ring.readable_mut().await?;
        let names = telemetry.service_names();
        let pods = telemetry.pod_names();
        let ring = ready.get_inner_mut();
        while let Some(record) = ring.next() {
            let Some(event) = decode(&record) else {
                foreign_records += 1;
                if foreign_records == 1 {
                    warn!(
                        bytes = record.len(),
                        "monitor: skipping ring records of another layout (the previous \
                         datapath's, during an upgrade)"
                    );
                }
                continue;
            };
            drop(record);
            let mut subscribers = subscribers.lock().unwrap_or_else(|e| e.into_inner());
            let mut line: Option<Arc<str>> = None;
            for subscriber in subscribers.by_id.values_mut() {
                if subscriber.filter.matches(&event) {
                    let line = line
                        .get_or_insert_with(|| to_json(&describe(&event, &names, &pods)).into());
                    subscriber.offer(line);
                }
            }
        }
        ready.clear_ready();
    }
}

fn to_json(line: &impl serde::Serialize) -> String {
    let mut json = serde_json::to_string(line).unwrap_or_default();
    json.push('\n');
    json
}

struct Connection {
    subscribers: Arc<Mutex<Subscribers>>,
    telemetry: Arc<Telemetry>,
    node: String,
    queries: Arc<tokio::sync::Semaphore>,
}

impl Connection {
    async fn serve(self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read.take(MAX_INPUT_BYTES)).lines();
        let request = match tokio::time::timeout(REQUEST_TIMEOUT, lines.next_line()).await {
            Ok(Ok(Some(line))) => parse_incoming(&line),
            Ok(Ok(None)) => return,
            Ok(Err(e)) => Err(format!("reading the request: {e}")),
            Err(_) => Err("no request".to_string()),
        };
        let request = match request {
            Ok(Incoming::Query(query)) => return self.answer(&query, write).await,
            Ok(Incoming::Monitor(request)) => Ok(request),
            Err(message) => Err(message),
        };
        let names = self.telemetry.service_names();
        let filter = request.and_then(|request| Filter::new(&request, &names));
        let (queue, mut queued) = mpsc::channel(QUEUE_LINES);
        let subscribed = filter.and_then(|filter| {
            self.lock().subscribe(Subscriber {
                filter,
                queue,
                missed: 0,
            })
        });
        let id = match subscribed {
            Ok(id) => id,
            Err(message) => {
                // Best effort: the monitor may be gone already.
                let refusal = to_json(&Line::Error { message });
                let _ = write.write_all(refusal.as_bytes()).await;
                return;
            }
        };
        let listening = to_json(&Line::Listening {
            node: self.node.clone(),
        });
        let mut sent = write.write_all(listening.as_bytes()).await;
        while sent.is_ok() {
            tokio::select! {
                line = queued.recv() => {
                    let Some(line) = line else { break };
                    sent = write.write_all(line.as_bytes()).await;
                }
                // A monitor sends nothing after its request: end of input (or an
                // error) is the monitor gone.
                input = lines.next_line() => {
                    if !matches!(input, Ok(Some(_))) {
                        break;
                    }
                }
            }
        }
        self.lock().unsubscribe(id);
    }

    /// Answer `query` with one line (written within the request timeout: a client
    /// that does not read is dropped), then close.
    async fn answer(&self, query: &super::Query, mut write: tokio::net::unix::OwnedWriteHalf) {
        let Ok(Ok(_turn)) = tokio::time::timeout(REQUEST_TIMEOUT, self.queries.acquire()).await
        else {
            return;
        };
        let line = to_json(&answer(query, self.telemetry.policy().as_ref()));
        // Best effort: the client may be gone already.
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(line.as_bytes())).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }
}
