//! Kubernetes label selectors (`matchLabels` and `matchExpressions`), checked when read and
//! matched against an object's labels.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sSelector;

use crate::meta::Labels;

/// A label selector: every `matchLabels` pair and every expression must hold. An empty selector
/// matches everything, as Kubernetes has it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LabelSelector {
    labels: Labels,
    expressions: Vec<Expression>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expression {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// Why a selector is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error(
        "matchExpressions[{index}]: operator {operator:?} is not In, NotIn, Exists or DoesNotExist"
    )]
    Operator { index: usize, operator: String },
    #[error("matchExpressions[{index}]: operator {operator} needs at least one value")]
    NoValues {
        index: usize,
        operator: &'static str,
    },
    #[error("matchExpressions[{index}]: operator {operator} takes no values")]
    Values {
        index: usize,
        operator: &'static str,
    },
}

impl LabelSelector {
    /// The selector `selector` says, checked.
    pub fn parse(selector: &K8sSelector) -> Result<Self, SelectorError> {
        let mut expressions = Vec::new();
        for (index, e) in selector
            .match_expressions
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let values: BTreeSet<String> = e
                .values
                .as_deref()
                .unwrap_or_default()
                .iter()
                .cloned()
                .collect();
            let key = e.key.clone();
            let expression = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(SelectorError::NoValues {
                        index,
                        operator: if e.operator == "In" { "In" } else { "NotIn" },
                    })
                }
                "In" => Expression::In(key, values),
                "NotIn" => Expression::NotIn(key, values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(SelectorError::Values {
                        index,
                        operator: if e.operator == "Exists" {
                            "Exists"
                        } else {
                            "DoesNotExist"
                        },
                    })
                }
                "Exists" => Expression::Exists(key),
                "DoesNotExist" => Expression::DoesNotExist(key),
                other => {
                    return Err(SelectorError::Operator {
                        index,
                        operator: other.to_owned(),
                    })
                }
            };
            expressions.push(expression);
        }
        Ok(Self {
            labels: selector.match_labels.clone().unwrap_or_default(),
            expressions,
        })
    }

    /// Whether `labels` satisfy every pair and expression.
    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|e| match e {
                Expression::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
                Expression::NotIn(key, values) => {
                    labels.get(key).is_none_or(|v| !values.contains(v))
                }
                Expression::Exists(key) => labels.contains_key(key),
                Expression::DoesNotExist(key) => !labels.contains_key(key),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::{K8sSelector, LabelSelector, SelectorError};
    use crate::meta::Labels;

    fn selector(yaml: &str) -> Result<LabelSelector, SelectorError> {
        let parsed: K8sSelector = serde_yaml::from_str(yaml).expect("a selector");
        LabelSelector::parse(&parsed)
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn labels_and_expressions_must_all_hold() {
        let s = selector(
            "matchLabels: {team: shop}\nmatchExpressions:\n- {key: env, operator: In, values: [prod, stage]}\n- {key: frozen, operator: DoesNotExist}\n- {key: tier, operator: NotIn, values: [db]}\n- {key: mesh, operator: Exists}\n",
        )
        .expect("valid");
        assert!(s.matches(&labels(&[("team", "shop"), ("env", "prod"), ("mesh", "")])));
        assert!(!s.matches(&labels(&[("team", "shop"), ("env", "dev"), ("mesh", "")])));
        assert!(!s.matches(&labels(&[("team", "shop"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[
            ("team", "shop"),
            ("env", "prod"),
            ("mesh", ""),
            ("frozen", "yes")
        ])));
        assert!(!s.matches(&labels(&[
            ("team", "shop"),
            ("env", "prod"),
            ("mesh", ""),
            ("tier", "db")
        ])));
        assert!(selector("{}").expect("empty").matches(&Labels::new()));
    }

    #[test]
    fn bad_expressions_are_refused() {
        assert_eq!(
            selector("matchExpressions: [{key: a, operator: Like, values: [x]}]\n"),
            Err(SelectorError::Operator {
                index: 0,
                operator: "Like".to_owned()
            })
        );
        assert_eq!(
            selector("matchExpressions: [{key: a, operator: In}]\n"),
            Err(SelectorError::NoValues {
                index: 0,
                operator: "In"
            })
        );
        assert_eq!(
            selector("matchExpressions: [{key: a, operator: Exists, values: [x]}]\n"),
            Err(SelectorError::Values {
                index: 0,
                operator: "Exists"
            })
        );
    }
}
