//! The file source: a multi-document YAML of real Kubernetes objects (v1 Service,
//! discovery.k8s.io/v1 EndpointSlice, v1 Pod, v1 Node; `kind: List` is unwrapped). Each document
//! is parsed on its own with k8s-openapi types, so one bad document is skipped with
//! a reason and the others still apply.
use std::sync::Arc;

use serde::Deserialize;
use serde_yaml::Value;

use crate::model::{ClusterObjects, Skipped};

pub fn parse_objects(yaml: &str) -> (ClusterObjects, Vec<Skipped>) {
    let mut objects = ClusterObjects::default();
    let mut skipped = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let what = format!("document {}", index + 1);
        match Value::deserialize(document) {
            Ok(Value::Null) => {}
            Ok(value) => add_object(value, &what, &mut objects, &mut skipped),
            Err(error) => {
                skipped.push(Skipped {
                    object: what,
                    reason: format!("invalid YAML: {error}"),
                });
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        }
    }
    (objects, skipped)
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
                reason: format!("unsupported kind {kind:?} (apiVersion {api_version:?})"),
            });
            return;
        }
    };
    if let Err(error) = result {
        skipped.push(Skipped {
            object: what,
            reason: format!("does not match the Kubernetes schema: {error}"),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        );
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!((objects.pods.len(), objects.services.len()), (1, 1));
    }

    #[test]
    fn schema_mismatch_names_the_object() {
        let (_, skipped) =
            parse_objects("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: 7}\n");
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].object.contains("Service s"), "{}", skipped[0]);
    }
}
