//! The Istio objects the agent reads (`security.istio.io` `PeerAuthentication`, versions `v1` and
//! `v1beta1`, which have the same schema) and their deserialization; re-exported by [`super::k8s`],
//! whose parser reads them like the Kubernetes kinds.

use std::{collections::BTreeMap, fmt};

use serde::{
    de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Unexpected, Visitor},
    Deserialize, Deserializer,
};
use serde_yaml::Value;

use crate::meta::{nullable, Labels, ObjectMeta};

/// `apiVersion`s of `PeerAuthentication` the agent reads.
pub const PEER_AUTHENTICATION_VERSIONS: [&str; 2] =
    ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// A `security.istio.io` `PeerAuthentication` (`v1` or `v1beta1`): the mTLS mode its workloads
/// accept inbound.
///
/// Unlike the Kubernetes kinds, whose values are checked when the state is built, the rules
/// Istio's validation applies to the spec are checked when it is parsed, so that an error names
/// the field and its line: a mode is one of `UNSET`, `DISABLE`, `PERMISSIVE`, `STRICT`; a
/// `portLevelMtls` key is a port number (1-65535, written as a number or a string) listed once;
/// `portLevelMtls` needs a selector with `matchLabels` (Istio's CRD rule "portLevelMtls requires
/// selector"); `selector.matchExpressions` is not part of Istio's `WorkloadSelector` and is
/// refused rather than ignored, since ignoring it would widen the selection. Names and
/// `creationTimestamp` are checked when the state is built.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerAuthentication {
    /// Name, namespace, `creationTimestamp` (the oldest of conflicting policies wins).
    pub metadata: ObjectMeta,
    /// `spec`.
    pub spec: PeerAuthenticationSpec,
}

/// `spec` of a `PeerAuthentication`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerAuthenticationSpec {
    /// `selector`: the workloads of the policy's namespace it applies to. `None`, or empty
    /// `matchLabels`, makes it namespace-wide (mesh-wide in the root namespace), as in Istio.
    pub selector: Option<WorkloadSelector>,
    /// `mtls`; absent means `UNSET`.
    pub mtls: Option<MutualTls>,
    /// `portLevelMtls`: per workload port (not service port); only with a selector.
    pub port_level_mtls: BTreeMap<u16, MutualTls>,
}

impl PeerAuthenticationSpec {
    /// `mtls.mode`, [`PeerAuthMode::Unset`] when absent.
    pub fn mode(&self) -> PeerAuthMode {
        self.mtls.as_ref().map_or(PeerAuthMode::Unset, |m| m.mode)
    }

    /// The selector's labels; empty for a namespace- or mesh-wide policy.
    pub fn match_labels(&self) -> Option<&Labels> {
        self.selector
            .as_ref()
            .map(|s| &s.match_labels)
            .filter(|labels| !labels.is_empty())
    }
}

/// Istio's `WorkloadSelector`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadSelector {
    /// `matchLabels`: a workload is selected when it has all of them.
    pub match_labels: Labels,
}

/// `mtls` of a `PeerAuthentication`, or one entry of its `portLevelMtls`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct MutualTls {
    /// `mode`; absent or `null` means `UNSET`.
    #[serde(default, deserialize_with = "nullable")]
    pub mode: PeerAuthMode,
}

/// A `PeerAuthentication` mTLS mode, as written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerAuthMode {
    /// `UNSET`: inherit from the parent level (PERMISSIVE if none sets a mode).
    #[default]
    Unset,
    /// `DISABLE`: plaintext only, in sidecar mode. ztunnel cannot turn mTLS off: the agent treats
    /// it as `PERMISSIVE` (see [`super::MtlsMode`]).
    Disable,
    /// `PERMISSIVE`: mTLS and plaintext accepted.
    Permissive,
    /// `STRICT`: mTLS only.
    Strict,
}

impl fmt::Display for PeerAuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerAuthMode::Unset => "UNSET",
            PeerAuthMode::Disable => "DISABLE",
            PeerAuthMode::Permissive => "PERMISSIVE",
            PeerAuthMode::Strict => "STRICT",
        })
    }
}

/// Whether a `PeerAuthentication` read untyped (pass 1 of the parser) has a non-empty
/// `spec.selector.matchLabels`: `portLevelMtls` is only valid then, whatever the key order.
pub(super) fn has_match_labels(value: &Value) -> bool {
    value
        .get("spec")
        .and_then(|spec| spec.get("selector"))
        .and_then(|selector| selector.get("matchLabels"))
        .and_then(Value::as_mapping)
        .is_some_and(|labels| !labels.is_empty())
}

/// Deserializes a `PeerAuthentication`; `match_labels` is [`has_match_labels`] of the same object.
#[derive(Clone, Copy)]
pub(super) struct PeerAuthSeed {
    pub(super) match_labels: bool,
}

impl<'de> DeserializeSeed<'de> for PeerAuthSeed {
    type Value = PeerAuthentication;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PeerAuthSeed {
    type Value = PeerAuthentication;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a PeerAuthentication")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut metadata = None;
        let mut spec = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "metadata" => metadata = Some(map.next_value()?),
                "spec" => spec = map.next_value_seed(SpecSeed(self))?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(PeerAuthentication {
            metadata: metadata.ok_or_else(|| de::Error::missing_field("metadata"))?,
            spec: spec.unwrap_or_default(),
        })
    }
}

/// Deserializes `spec` (`null` reads as `None`).
struct SpecSeed(PeerAuthSeed);

impl<'de> DeserializeSeed<'de> for SpecSeed {
    type Value = Option<PeerAuthenticationSpec>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for SpecSeed {
    type Value = Option<PeerAuthenticationSpec>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a PeerAuthentication spec")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut spec = PeerAuthenticationSpec::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "selector" => spec.selector = map.next_value()?,
                "mtls" => spec.mtls = map.next_value()?,
                "portLevelMtls" => {
                    spec.port_level_mtls = map.next_value_seed(PortLevelSeed {
                        allowed: self.0.match_labels,
                    })?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(spec))
    }
}

impl<'de> Deserialize<'de> for WorkloadSelector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SelectorVisitor;
        impl<'de> Visitor<'de> for SelectorVisitor {
            type Value = WorkloadSelector;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a workload selector (matchLabels)")
            }
            fn visit_unit<E: de::Error>(self) -> Result<WorkloadSelector, E> {
                Ok(WorkloadSelector::default())
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<WorkloadSelector, A::Error> {
                let mut selector = WorkloadSelector::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "matchLabels" => {
                            selector.match_labels =
                                map.next_value::<Option<Labels>>()?.unwrap_or_default();
                        }
                        "matchExpressions" => {
                            map.next_value::<NoExpressions>()?;
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(selector)
            }
        }
        deserializer.deserialize_map(SelectorVisitor)
    }
}

/// `selector.matchExpressions`: refused unless empty (Istio selects by `matchLabels` only).
pub(super) struct NoExpressions;

impl<'de> Deserialize<'de> for NoExpressions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExpressionsVisitor;
        impl<'de> Visitor<'de> for ExpressionsVisitor {
            type Value = NoExpressions;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("no expressions")
            }
            fn visit_unit<E: de::Error>(self) -> Result<NoExpressions, E> {
                Ok(NoExpressions)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NoExpressions, A::Error> {
                match seq.next_element::<IgnoredAny>()? {
                    None => Ok(NoExpressions),
                    Some(_) => Err(de::Error::custom(UNSUPPORTED_EXPRESSIONS)),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<NoExpressions, A::Error> {
                Err(de::Error::custom(UNSUPPORTED_EXPRESSIONS))
            }
        }
        deserializer.deserialize_any(ExpressionsVisitor)
    }
}

const UNSUPPORTED_EXPRESSIONS: &str =
    "not supported: Istio's workload selector has only `matchLabels` (ignoring expressions would \
     select more workloads than meant)";

/// Deserializes `portLevelMtls` (`null` reads as empty); `allowed` is whether the policy has a
/// selector with `matchLabels`.
struct PortLevelSeed {
    allowed: bool,
}

impl<'de> DeserializeSeed<'de> for PortLevelSeed {
    type Value = BTreeMap<u16, MutualTls>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for PortLevelSeed {
    type Value = BTreeMap<u16, MutualTls>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map from port number to {mode}")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(BTreeMap::new())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(BTreeMap::new())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        if !self.allowed {
            return Err(de::Error::custom(
                "requires a selector with matchLabels (Istio: \"portLevelMtls requires \
                 selector\"; ports are a workload's, so namespace- and mesh-wide policies cannot \
                 have them)",
            ));
        }
        let mut ports = BTreeMap::new();
        while let Some(port) = map.next_key_seed(PortKey { seen: &ports })? {
            let mtls = map.next_value::<Option<MutualTls>>()?.unwrap_or_default();
            ports.insert(port, mtls);
        }
        Ok(ports)
    }
}

/// A `portLevelMtls` key: a port number, written as a number or as a string of digits, not
/// among the keys `seen` before (`8080` and `"8080"` are the same port).
struct PortKey<'a> {
    seen: &'a BTreeMap<u16, MutualTls>,
}

impl PortKey<'_> {
    fn port<E: de::Error>(&self, value: u64, unexpected: Unexpected<'_>) -> Result<u16, E> {
        match u16::try_from(value) {
            Ok(port) if self.seen.contains_key(&port) => {
                Err(E::custom(format_args!("port {port} is listed twice")))
            }
            Ok(port) if port != 0 => Ok(port),
            _ => Err(E::invalid_value(unexpected, self)),
        }
    }
}

impl<'de> DeserializeSeed<'de> for PortKey<'_> {
    type Value = u16;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<u16, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Visitor<'_> for PortKey<'_> {
    type Value = u16;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port number (1-65535)")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u16, E> {
        self.port(v, Unexpected::Unsigned(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u16, E> {
        let unexpected = Unexpected::Signed(v);
        match u64::try_from(v) {
            Ok(v) => self.port(v, unexpected),
            Err(_) => Err(E::invalid_value(unexpected, &self)),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u16, E> {
        let unexpected = Unexpected::Str(v);
        match v.parse::<u64>() {
            Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) => self.port(n, unexpected),
            _ => Err(E::invalid_value(unexpected, &self)),
        }
    }
}
