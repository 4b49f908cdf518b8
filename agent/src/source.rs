//! The file source: the YAML file of Kubernetes objects (see `objects_yaml`), watched
//! with inotify. Each change that parses is reported to the driver as a snapshot;
//! a file refused whole changes nothing, the agent keeps what it applied last.
use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::{
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::inotify::{AddWatchFlags, InitFlags, Inotify},
};
use tracing::{error, warn};

use crate::{
    driver::{Snapshot, Source, SourceEvent},
    objects_yaml::parse_objects,
    telemetry::Telemetry,
};

/// How long the config file must stay quiet before it is read (a writer that does
/// not replace it atomically is still writing).
const CONFIG_SETTLE: Duration = Duration::from_millis(100);

/// The largest config file the agent reads (a 52,231-Service file is 52 MB).
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

enum ReadError {
    /// Not there (yet), or not readable: the last applied state stays, quietly.
    Io(std::io::Error),
    /// Not a file a config can be: refused, and `/readyz` says why.
    Refused(String),
}

/// Read the config file: a regular file (not a device, FIFO or directory, even
/// through a link) of at most [`MAX_CONFIG_BYTES`]. Opened without blocking, so a
/// FIFO cannot hold the agent's loop.
fn read_config(path: &Path) -> Result<String, ReadError> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(ReadError::Io)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    if !meta.is_file() {
        return Err(ReadError::Refused(
            "not a regular file (a device, FIFO or directory)".into(),
        ));
    }
    let too_big = || ReadError::Refused(format!("larger than {MAX_CONFIG_BYTES} bytes"));
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    let mut content = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut content)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => ReadError::Refused("not UTF-8 text".into()),
            _ => ReadError::Io(e),
        })?;
    if content.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    Ok(content)
}

/// The file as a source of events: a snapshot each time it changes and parses.
pub struct FileSource {
    watch: FileWatch,
    /// How long one wait for a change lasts at most.
    poll: Duration,
    telemetry: Arc<Telemetry>,
    /// The file may have changed since it was last read (at first: never read).
    unread_change: bool,
    last_content: Option<String>,
    /// What the file held when it last parsed: a refused file changes nothing, and
    /// full syncs (drift repair, conntrack collection) go on with this.
    applied: Option<Snapshot>,
}

impl FileSource {
    pub fn new(path: &Path, poll: Duration, telemetry: Arc<Telemetry>) -> Result<Self> {
        Ok(Self {
            watch: FileWatch::new(path)?,
            poll,
            telemetry,
            unread_change: true,
            last_content: None,
            applied: None,
        })
    }

    /// Read the file if it may have changed; returns whether it now holds objects
    /// other than those applied.
    fn read_if_changed(&mut self) -> bool {
        if !std::mem::take(&mut self.unread_change) {
            return false;
        }
        self.telemetry.config_reads.inc();
        let path = self.watch.path();
        let content = match read_config(path) {
            Ok(content) if self.last_content.as_ref() != Some(&content) => content,
            Ok(_) => return false,
            Err(ReadError::Io(e)) => {
                warn!(config = %path.display(), "cannot read config: {e}");
                return false;
            }
            Err(ReadError::Refused(why)) => {
                error!(config = %path.display(), "config refused, the last applied state stays: {why}");
                self.telemetry.set_config_rejected(Some(why));
                self.last_content = None;
                return false;
            }
        };
        let parsed = match parse_objects(&content) {
            Ok((objects, skipped)) => {
                self.applied = Some(Snapshot {
                    objects,
                    skipped,
                    oldest_change: None,
                });
                self.telemetry.set_config_rejected(None);
                true
            }
            Err(e) => {
                error!(
                    config = %path.display(),
                    "config refused, the last applied state stays: {e}"
                );
                self.telemetry.set_config_rejected(Some(e.to_string()));
                false
            }
        };
        self.last_content = Some(content);
        parsed
    }
}

impl Source for FileSource {
    fn next_event(&mut self, deadline: Instant) -> Result<Option<SourceEvent>> {
        if !self.read_if_changed() {
            let timeout = deadline
                .saturating_duration_since(Instant::now())
                .min(self.poll);
            self.unread_change = self.watch.wait(timeout, CONFIG_SETTLE)?;
            if !self.read_if_changed() {
                return Ok(None);
            }
        }
        Ok(self.applied.clone().map(SourceEvent::Snapshot))
    }

    fn snapshot(&mut self) -> Result<Option<Snapshot>> {
        self.read_if_changed();
        Ok(self.applied.clone())
    }
}

/// The config file, watched (inotify on its directory: editors and ConfigMap volumes
/// replace files by rename, a ConfigMap by swapping a symlinked directory) instead
/// of re-read on a timer: a large file costs nothing while it does not change.
pub struct FileWatch {
    inotify: Inotify,
    path: PathBuf,
}

impl FileWatch {
    pub fn new(path: &Path) -> Result<Self> {
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).context("inotify")?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        inotify
            .add_watch(
                dir,
                AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_MODIFY
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CREATE
                    | AddWatchFlags::IN_DELETE
                    | AddWatchFlags::IN_ATTRIB,
            )
            .with_context(|| format!("watching {}", dir.display()))?;
        Ok(Self {
            inotify,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wait up to `timeout` for the file (or a ConfigMap volume's `..data` link) to
    /// change; once it does, wait until it has been quiet for `settle` (a writer still
    /// writing). Returns whether it changed (the caller compares the content).
    pub fn wait(&self, timeout: Duration, settle: Duration) -> Result<bool> {
        if !self.events_within(timeout)? {
            return Ok(false);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.events_within(settle)? && Instant::now() < deadline {}
        Ok(true)
    }

    /// Whether events about the file arrive within `timeout` (all events are drained).
    fn events_within(&self, timeout: Duration) -> Result<bool> {
        let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&self.inotify),
            PollFlags::POLLIN,
        )];
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => Ok(false),
            Ok(_) => {
                let name = self.path.file_name();
                let mut ours = false;
                while let Ok(events) = self.inotify.read_events() {
                    if events.is_empty() {
                        break;
                    }
                    // The file itself, or a ConfigMap volume's `..data` swap; not
                    // other files in the directory (logs, editors' temporaries).
                    ours |= events.iter().any(|e| match &e.name {
                        Some(n) => {
                            Some(n.as_os_str()) == name || n.as_encoded_bytes().starts_with(b"..")
                        }
                        None => true,
                    });
                }
                Ok(ours)
            }
            Err(e) => Err(e).context("waiting for the config file"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn services_yaml(names: &[&str]) -> String {
        let mut yaml = String::from("apiVersion: v1\nkind: List\nitems:\n");
        for name in names {
            yaml += &format!("- {{apiVersion: v1, kind: Service, metadata: {{name: {name}}}}}\n");
        }
        yaml
    }

    fn service_names(snapshot: &Snapshot) -> Vec<String> {
        snapshot
            .objects
            .services
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect()
    }

    /// The source's next snapshot event before `deadline`, through quiet polls.
    fn next_snapshot_until(source: &mut FileSource, deadline: Instant) -> Option<Snapshot> {
        while Instant::now() < deadline {
            match source.next_event(deadline).unwrap() {
                Some(SourceEvent::Snapshot(snapshot)) => return Some(snapshot),
                Some(other) => panic!("the file source only has snapshots: {other:?}"),
                None => {}
            }
        }
        None
    }

    fn next_snapshot(source: &mut FileSource) -> Option<Snapshot> {
        next_snapshot_until(source, Instant::now() + Duration::from_secs(5))
    }

    #[test]
    fn each_change_that_parses_is_a_snapshot_and_a_refused_file_keeps_the_last_one() {
        let dir = std::env::temp_dir().join(format!("ferrite-file-source-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.yaml");
        fs::write(&path, services_yaml(&["a"])).unwrap();
        let telemetry = Telemetry::new(PathBuf::new(), BTreeMap::new());
        let mut source =
            FileSource::new(&path, Duration::from_millis(20), telemetry.clone()).unwrap();

        let first = source.snapshot().unwrap().expect("the file parses");
        assert_eq!(service_names(&first), ["a"]);
        let quiet = Instant::now() + Duration::from_millis(50);
        assert!(source.next_event(quiet).unwrap().is_none(), "no change yet");

        fs::write(&path, services_yaml(&["a", "b"])).unwrap();
        let changed = next_snapshot(&mut source).expect("the change");
        assert_eq!(service_names(&changed), ["a", "b"]);

        fs::write(&path, "apiVersion: v1\nkind: [\n").unwrap();
        let quiet = Instant::now() + Duration::from_millis(300);
        assert!(next_snapshot_until(&mut source, quiet).is_none());
        assert_eq!(
            telemetry.readiness(std::time::Instant::now()).0,
            503,
            "readyz says why"
        );
        let kept = source.snapshot().unwrap().expect("the last applied");
        assert_eq!(service_names(&kept), ["a", "b"]);

        fs::write(&path, services_yaml(&["c"])).unwrap();
        let repaired = next_snapshot(&mut source).expect("the repaired file");
        assert_eq!(service_names(&repaired), ["c"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
