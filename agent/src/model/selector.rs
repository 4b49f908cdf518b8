//! Kubernetes label selectors (`matchLabels` and `matchExpressions` with `In`,
//! `NotIn`, `Exists`, `DoesNotExist`), checked once and then matched against label
//! sets. The empty selector selects everything; a missing one (`None` where the API
//! allows it) is the caller's to interpret.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::fields::truncated;

/// One requirement of a selector.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A label selector the API accepts, ready to match (its requirements AND-ed).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector `selector` says, or why it is not one the API server accepts
    /// (an unknown operator, `In`/`NotIn` without values, `Exists` with values).
    pub fn parse(selector: &LabelSelector) -> Result<Self, String> {
        let mut requirements: Vec<Requirement> = selector
            .match_labels
            .iter()
            .flatten()
            .map(|(key, value)| Requirement::Equals(key.clone(), value.clone()))
            .collect();
        for expression in selector.match_expressions.iter().flatten() {
            let key = expression.key.clone();
            let values = expression.values.clone().unwrap_or_default();
            let requirement = match expression.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "matchExpressions {:?} {} needs values",
                        truncated(&key),
                        expression.operator
                    ))
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!(
                        "matchExpressions {:?} {} takes no values",
                        truncated(&key),
                        expression.operator
                    ))
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(format!(
                        "matchExpressions operator {:?} is not In, NotIn, Exists or DoesNotExist",
                        truncated(other)
                    ))
                }
            };
            requirements.push(requirement);
        }
        requirements.sort();
        requirements.dedup();
        Ok(Self { requirements })
    }

    /// Whether a label set satisfies every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements
            .iter()
            .all(|requirement| match requirement {
                Requirement::Equals(key, value) => labels.get(key) == Some(value),
                Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
                // A label that is absent is not in any set: NotIn holds.
                Requirement::NotIn(key, values) => {
                    labels.get(key).is_none_or(|v| !values.contains(v))
                }
                Requirement::Exists(key) => labels.contains_key(key),
                Requirement::DoesNotExist(key) => !labels.contains_key(key),
            })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(ToString::to_string).collect()),
        }
    }

    #[test]
    fn match_labels_and_every_operator_are_anded() {
        let selector = Selector::parse(&LabelSelector {
            match_labels: Some([("app".to_string(), "web".to_string())].into()),
            match_expressions: Some(vec![
                expression("tier", "In", &["front", "edge"]),
                expression("env", "NotIn", &["test"]),
                expression("team", "Exists", &[]),
                expression("legacy", "DoesNotExist", &[]),
            ]),
        })
        .unwrap();
        let base = [("app", "web"), ("tier", "front"), ("team", "a")];
        assert!(selector.matches(&labels(&base)));
        assert!(selector.matches(&labels(&[base[0], base[1], base[2], ("env", "prod")])));
        for broken in [
            vec![("app", "db"), ("tier", "front"), ("team", "a")],
            vec![("app", "web"), ("tier", "back"), ("team", "a")],
            vec![("app", "web"), ("tier", "front")],
            vec![base[0], base[1], base[2], ("env", "test")],
            vec![base[0], base[1], base[2], ("legacy", "")],
        ] {
            assert!(!selector.matches(&labels(&broken)), "{broken:?}");
        }
        let everything = Selector::parse(&LabelSelector::default()).unwrap();
        assert!(everything.matches(&labels(&[])));
    }

    #[test]
    fn selectors_the_api_refuses_are_refused_with_a_reason() {
        for (expression, says) in [
            (expression("a", "In", &[]), "needs values"),
            (expression("a", "Exists", &["x"]), "takes no values"),
            (expression("a", "Gt", &["1"]), "is not In"),
        ] {
            let error = Selector::parse(&LabelSelector {
                match_expressions: Some(vec![expression]),
                ..LabelSelector::default()
            })
            .unwrap_err();
            assert!(error.contains(says), "{error}");
        }
    }
}
