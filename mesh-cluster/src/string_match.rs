//! Istio's string pattern (principals, namespaces, hosts, methods, header values, and the plain
//! form of paths): exact, `prefix*`, `*suffix`, or `*` (any non-empty value).

use std::fmt;

use serde::{Serialize, Serializer};

/// A pattern, as Istio writes it (and serialized so).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    /// `value`.
    Exact(String),
    /// `prefix*`.
    Prefix(String),
    /// `*suffix`.
    Suffix(String),
    /// `*`: any non-empty value (a connection with an identity).
    Presence,
}

impl StringMatch {
    /// Istio's reading of a pattern: `*` alone is presence, a leading `*` a suffix match (the
    /// rest taken literally), a trailing `*` a prefix match, anything else exact.
    pub fn new(pattern: &str) -> Self {
        if pattern == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else {
            StringMatch::Exact(pattern.to_owned())
        }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(exact) => value == exact,
            StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatch::Suffix(suffix) => value.ends_with(suffix.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

impl fmt::Display for StringMatch {
    /// The pattern as written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(exact) => f.write_str(exact),
            StringMatch::Prefix(prefix) => write!(f, "{prefix}*"),
            StringMatch::Suffix(suffix) => write!(f, "*{suffix}"),
            StringMatch::Presence => f.write_str("*"),
        }
    }
}

impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}
