//! The file source: a multi-document YAML of real Kubernetes objects (v1 Service,
//! discovery.k8s.io/v1 EndpointSlice, v1 Pod, v1 Node; `kind: List` is unwrapped). Each document
//! is parsed on its own with k8s-openapi types, so one bad object is skipped with
//! a reason and the others still apply. A file that is not YAML at all (a syntax
//! error anywhere) or holds no document (empty: caught mid-write?) is refused whole:
//! the agent keeps what it applied last, rather than read the file as a cluster
//! without the objects it could not read.
use std::{fmt, sync::Arc};

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::{
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::inotify::{AddWatchFlags, InitFlags, Inotify},
};
use serde::Deserialize;
use serde_yaml::Value;

use crate::model::{ClusterObjects, SkipReason, Skipped};

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

/// Why a whole file was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line of a syntax error.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

pub fn parse_objects(yaml: &str) -> Result<(ClusterObjects, Vec<Skipped>), ConfigError> {
    let mut objects = ClusterObjects::default();
    let mut skipped = Vec::new();
    let mut documents = 0;
    for (index, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let what = format!("document {}", index + 1);
        match Value::deserialize(document) {
            Ok(Value::Null) => {}
            Ok(value) => {
                documents += 1;
                add_object(value, &what, &mut objects, &mut skipped);
            }
            // Everything after a syntax error is unreadable: refuse the whole file
            // rather than apply a cluster without those objects.
            Err(error) => {
                return Err(ConfigError {
                    line: error.location().map(|l| l.line()),
                    message: format!("{what} is not valid YAML: {error}"),
                });
            }
        }
    }
    if documents == 0 {
        return Err(ConfigError {
            line: None,
            message: "no object in the file (empty, or caught mid-write?); a cluster without \
                      objects is `apiVersion: v1`, `kind: List`, `items: []`"
                .into(),
        });
    }
    Ok((objects, skipped))
}

fn add_object(value: Value, what: &str, objects: &mut ClusterObjects, skipped: &mut Vec<Skipped>) {
    let field = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string();
    let what = format!("{what} ({kind} {name})");
    let result = match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = match value.get("items") {
                Some(Value::Sequence(items)) => items.clone(),
                _ => Vec::new(),
            };
            for (i, item) in items.into_iter().enumerate() {
                add_object(item, &format!("{what} item {}", i + 1), objects, skipped);
            }
            Ok(())
        }
        ("v1", "Service") => {
            serde_yaml::from_value(value).map(|s| objects.services.push(Arc::new(s)))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            serde_yaml::from_value(value).map(|s| objects.endpoint_slices.push(Arc::new(s)))
        }
        ("v1", "Pod") => serde_yaml::from_value(value).map(|p| objects.pods.push(Arc::new(p))),
        ("v1", "Node") => serde_yaml::from_value(value).map(|n| objects.nodes.push(Arc::new(n))),
        _ => {
            skipped.push(Skipped {
                object: what,
                reason: SkipReason::UnsupportedKind { kind, api_version },
            });
            return;
        }
    };
    if let Err(error) = result {
        skipped.push(Skipped {
            object: what,
            reason: SkipReason::SchemaMismatch(error.to_string()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syntax_error_anywhere_or_an_empty_file_refuses_the_whole_file_naming_the_line() {
        let good = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n";
        let broken = "apiVersion: v1\nkind: Service\nmetadata: {name: [\n";
        for (what, yaml, line) in [
            ("in document 1", broken.to_string(), Some(4)),
            (
                "in document 3",
                format!("{good}---\n{good}---\n{broken}"),
                // The unclosed flow sequence runs to the end of the file.
                Some(12),
            ),
            ("empty", String::new(), None),
            ("comments only", "# nothing yet\n---\n".into(), None),
        ] {
            let error = parse_objects(&yaml).expect_err(what);
            assert_eq!(error.line, line, "{what}: {error}");
        }
        let (objects, skipped) =
            parse_objects("apiVersion: v1\nkind: List\nitems: []\n").expect("an empty List");
        assert!(objects.services.is_empty() && skipped.is_empty());
    }

    #[test]
    fn lists_are_unwrapped_and_empty_documents_ignored() {
        let (objects, skipped) = parse_objects(
            r#"
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a}
  spec: {containers: []}
- apiVersion: v1
  kind: Service
  metadata: {name: s}
---
"#,
        )
        .unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!((objects.pods.len(), objects.services.len()), (1, 1));
    }

    #[test]
    fn schema_mismatch_names_the_object() {
        let (_, skipped) =
            parse_objects("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: 7}\n")
                .unwrap();
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].object.contains("Service s"), "{}", skipped[0]);
    }
}
