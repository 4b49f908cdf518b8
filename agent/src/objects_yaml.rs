//! The file format of the file source: a multi-document YAML of real Kubernetes
//! objects (v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Pod, v1 Node, v1
//! Namespace, networking.k8s.io/v1 NetworkPolicy; `kind:
//! List` is unwrapped). Each document is parsed on its own (Services and
//! EndpointSlices into the model's own types, Pods and Nodes into k8s-openapi's), so
//! one bad object is skipped with a reason and the others still apply. A file that
//! is not YAML at all (a syntax error anywhere) or holds no document (empty: caught
//! mid-write?) is refused whole: the agent keeps what it applied last, rather than
//! read the file as a cluster without the objects it could not read.
use std::{fmt, sync::Arc};

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::model::{ClusterObjects, SkipReason, Skipped};

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
    check_nesting(yaml)?;
    let mut objects = ClusterObjects::default();
    let mut skipped = Vec::new();
    let mut documents = 0;
    let mut lists = 0;
    for (index, document) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let what = format!("document {}", index + 1);
        match Value::deserialize(document) {
            Ok(Value::Null) => {}
            Ok(value) => {
                documents += 1;
                lists += usize::from(is_list(&value));
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
    let supported = objects.services.len()
        + objects.endpoint_slices.len()
        + objects.pods.len()
        + objects.nodes.len()
        + objects.network_policies.len()
        + objects.namespaces.len();
    if supported == 0 && lists == 0 {
        // Nothing the model reads: a file caught mid-write, or not a cluster at all.
        // Applying it would remove every Service, route and pod entry.
        return Err(ConfigError {
            line: None,
            message: format!(
                "no Service, EndpointSlice, Pod or Node in the file ({documents} documents of \
                 other kinds or unreadable: caught mid-write?); a cluster without objects \
                 is `apiVersion: v1`, `kind: List`, `items: []`"
            ),
        });
    }
    Ok((objects, skipped))
}

/// The deepest nesting a file may have (Kubernetes objects need about 10): libyaml's
/// scan is quadratic in depth, so a small hostile file could stall the agent.
pub const MAX_NESTING: usize = 128;

/// Refuse a file nested deeper than [`MAX_NESTING`] before the YAML parser sees it:
/// flow collections (`[`, `{` outside quotes and comments) and block structure
/// (indentation and `- ` markers at the start of a line) are counted in one pass.
fn check_nesting(yaml: &str) -> Result<(), ConfigError> {
    let refuse = |line: usize, what: &str| ConfigError {
        line: Some(line),
        message: format!("nested deeper than {MAX_NESTING} levels ({what})"),
    };
    let mut flow = 0usize;
    for (index, line) in yaml.lines().enumerate() {
        let structure = line
            .chars()
            .take_while(|c| matches!(c, ' ' | '\t' | '-' | '?' | ':'))
            .count();
        // Every block level takes at least one column; allow two per level.
        if structure > 2 * MAX_NESTING {
            return Err(refuse(index + 1, "indentation"));
        }
        let mut quote: Option<char> = None;
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => {
                    flow += 1;
                    if flow > MAX_NESTING {
                        return Err(refuse(index + 1, "flow collections"));
                    }
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Whether a document is a `v1` `List`.
fn is_list(value: &Value) -> bool {
    value.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && value.get("kind").and_then(Value::as_str) == Some("List")
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
            serde_yaml_ng::from_value(value).map(|s| objects.services.push(Arc::new(s)))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            serde_yaml_ng::from_value(value).map(|s| objects.endpoint_slices.push(Arc::new(s)))
        }
        ("v1", "Pod") => serde_yaml_ng::from_value(value).map(|p| objects.pods.push(Arc::new(p))),
        ("v1", "Node") => serde_yaml_ng::from_value(value).map(|n| objects.nodes.push(Arc::new(n))),
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            serde_yaml_ng::from_value(value).map(|p| objects.network_policies.push(Arc::new(p)))
        }
        ("v1", "Namespace") => {
            serde_yaml_ng::from_value(value).map(|n| objects.namespaces.push(Arc::new(n)))
        }
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
    fn a_file_without_any_supported_object_is_refused_and_an_empty_list_is_a_cluster() {
        for (what, yaml) in [
            ("a word", "hello\n"),
            (
                "unsupported kinds only",
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
            ),
            (
                "objects that do not read",
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: 80}\n",
            ),
        ] {
            let error = parse_objects(yaml).expect_err(what);
            assert!(
                error
                    .message
                    .contains("no Service, EndpointSlice, Pod or Node"),
                "{what}: {error}"
            );
        }
        let (objects, skipped) = parse_objects("apiVersion: v1\nkind: List\nitems: []\n").unwrap();
        assert!(objects.services.is_empty() && skipped.is_empty());
    }

    #[test]
    fn a_file_nested_deeper_than_kubernetes_objects_go_is_refused_before_parsing() {
        let deep_flow = format!("{}{}\n", "[".repeat(200_000), "]".repeat(200_000));
        let deep_block: String = (0..300)
            .map(|i| format!("{}- a:\n", " ".repeat(2 * i)))
            .collect();
        for (what, yaml) in [("flow", deep_flow), ("block", deep_block)] {
            let error = parse_objects(&yaml).expect_err(what);
            assert!(error.message.contains("nested deeper"), "{what}: {error}");
        }
        // Brackets in quotes and comments are text.
        let quoted = format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: n, annotations: {{a: \"{}\"}}}} # {}\n",
            "[".repeat(500),
            "{".repeat(500)
        );
        assert!(parse_objects(&quoted).is_ok());
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
        // Next to an object that reads (a file of unreadable objects alone is refused).
        let (_, skipped) = parse_objects(
            "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: 7}\n",
        )
        .unwrap();
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].object.contains("Service s"), "{}", skipped[0]);
    }
}
