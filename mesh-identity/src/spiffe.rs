//! SPIFFE identities of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

const SCHEME: &str = "spiffe://";
/// Longest trust domain accepted (the SPIFFE specification's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest namespace accepted (a Kubernetes namespace is an RFC 1123 label).
pub const MAX_NAMESPACE_LEN: usize = 63;
/// Longest service account accepted (a Kubernetes service account is an RFC 1123 subdomain).
pub const MAX_SERVICE_ACCOUNT_LEN: usize = 253;

/// Why a SPIFFE id, or one of its parts, is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The text does not start with `spiffe://`.
    #[error("SPIFFE id {input:?} does not start with \"spiffe://\"")]
    MissingScheme {
        /// The text that was parsed.
        input: String,
    },
    /// The trust domain is empty.
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("trust domain {trust_domain:?} is {len} bytes long; at most {MAX_TRUST_DOMAIN_LEN} are allowed")]
    TrustDomainTooLong {
        /// The trust domain.
        trust_domain: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The trust domain contains a character outside `[a-z0-9._-]`.
    #[error(
        "trust domain {trust_domain:?} contains {character:?} at byte {position}; only lowercase \
         letters, digits, '.', '-' and '_' are allowed"
    )]
    InvalidTrustDomainCharacter {
        /// The trust domain.
        trust_domain: String,
        /// The offending character.
        character: char,
        /// Its byte offset in the trust domain.
        position: usize,
    },
    /// The path of the id is not `/ns/<namespace>/sa/<service-account>`.
    #[error(
        "SPIFFE id {input:?} has path {path:?}; expected /ns/<namespace>/sa/<service-account>"
    )]
    UnexpectedPath {
        /// The text that was parsed.
        input: String,
        /// The path part of it (everything after the trust domain).
        path: String,
    },
    /// The namespace is not a DNS label.
    #[error("namespace {value:?} is invalid: {problem}")]
    InvalidNamespace {
        /// The namespace.
        value: String,
        /// What is wrong with it.
        problem: NameProblem,
    },
    /// The service account is not a DNS subdomain.
    #[error("service account {value:?} is invalid: {problem}")]
    InvalidServiceAccount {
        /// The service account.
        value: String,
        /// What is wrong with it.
        problem: NameProblem,
    },
}

/// What is wrong with a namespace or service account name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameProblem {
    /// The name is empty.
    Empty,
    /// The name is longer than allowed.
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The maximum length.
        max: usize,
    },
    /// The name contains a character that is not allowed.
    InvalidCharacter {
        /// The offending character.
        character: char,
        /// Its byte offset in the name.
        position: usize,
    },
    /// The name does not start or end with a lowercase letter or digit.
    BadEdge,
}

impl fmt::Display for NameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("it is empty"),
            Self::TooLong { len, max } => {
                write!(f, "it is {len} bytes long; at most {max} are allowed")
            }
            Self::InvalidCharacter {
                character,
                position,
            } => write!(f, "it contains {character:?} at byte {position}"),
            Self::BadEdge => {
                f.write_str("it must start and end with a lowercase letter or a digit")
            }
        }
    }
}

/// A workload identity: the SPIFFE id `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Cheap to clone (one shared allocation) and small (24 bytes: connections carry two).
/// Equality, hashing and ordering follow the id's text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    uri: Arc<str>,
    /// Byte ranges of the parts inside `uri` (the parts' limits keep it under [`MAX_ID_LEN`]).
    trust_domain_end: u16,
    namespace: (u16, u16),
    service_account_start: u16,
}

/// The longest SPIFFE id an [`Identity`] can have, from the limits of its parts.
const MAX_ID_LEN: usize = SCHEME.len()
    + MAX_TRUST_DOMAIN_LEN
    + "/ns/".len()
    + MAX_NAMESPACE_LEN
    + "/sa/".len()
    + MAX_SERVICE_ACCOUNT_LEN;
const _: () = assert!(MAX_ID_LEN <= u16::MAX as usize);

/// An offset inside a validated id, which [`MAX_ID_LEN`] keeps within `u16`.
fn offset(n: usize) -> u16 {
    debug_assert!(n <= MAX_ID_LEN);
    // Truncation cannot happen: `n <= MAX_ID_LEN <= u16::MAX` (asserted at compile time).
    #[allow(clippy::cast_possible_truncation)]
    let n = n as u16;
    n
}

impl Identity {
    /// Builds the identity of service account `service_account` in namespace `namespace` of
    /// trust domain `trust_domain`, checking each part.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        validate_namespace(namespace)?;
        validate_service_account(service_account)?;
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        let trust_domain_end = SCHEME.len() + trust_domain.len();
        let namespace_start = trust_domain_end + "/ns/".len();
        let namespace_end = namespace_start + namespace.len();
        Ok(Self {
            uri: uri.into(),
            trust_domain_end: offset(trust_domain_end),
            namespace: (offset(namespace_start), offset(namespace_end)),
            service_account_start: offset(namespace_end + "/sa/".len()),
        })
    }

    /// Parses a SPIFFE id of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::MissingScheme {
                input: input.to_owned(),
            })?;
        let (trust_domain, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        validate_trust_domain(trust_domain)?;
        let unexpected_path = || IdentityError::UnexpectedPath {
            input: input.to_owned(),
            path: path.to_owned(),
        };
        let segments = path.strip_prefix('/').ok_or_else(unexpected_path)?;
        let mut parts = segments.split('/');
        let (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(unexpected_path());
        };
        Self::new(trust_domain, namespace, service_account)
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..usize::from(self.trust_domain_end)]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[usize::from(self.namespace.0)..usize::from(self.namespace.1)]
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.uri[usize::from(self.service_account_start)..]
    }

    /// The SPIFFE id as text (`spiffe://...`).
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Identity").field(&&*self.uri).finish()
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Checks a trust domain: non-empty, at most [`MAX_TRUST_DOMAIN_LEN`] bytes of lowercase letters,
/// digits, `.`, `-` and `_`.
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    if trust_domain.is_empty() {
        return Err(IdentityError::EmptyTrustDomain);
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdentityError::TrustDomainTooLong {
            trust_domain: trust_domain.to_owned(),
            len: trust_domain.len(),
        });
    }
    if let Some((position, character)) = trust_domain
        .char_indices()
        .find(|&(_, c)| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(IdentityError::InvalidTrustDomainCharacter {
            trust_domain: trust_domain.to_owned(),
            character,
            position,
        });
    }
    Ok(())
}

/// Checks a Kubernetes namespace name: an RFC 1123 label of at most [`MAX_NAMESPACE_LEN`] bytes.
pub fn validate_namespace(namespace: &str) -> Result<(), IdentityError> {
    check_dns_name(namespace, MAX_NAMESPACE_LEN, false).map_err(|problem| {
        IdentityError::InvalidNamespace {
            value: namespace.to_owned(),
            problem,
        }
    })
}

/// Checks a Kubernetes service account name: an RFC 1123 subdomain of at most
/// [`MAX_SERVICE_ACCOUNT_LEN`] bytes.
pub fn validate_service_account(service_account: &str) -> Result<(), IdentityError> {
    check_dns_name(service_account, MAX_SERVICE_ACCOUNT_LEN, true).map_err(|problem| {
        IdentityError::InvalidServiceAccount {
            value: service_account.to_owned(),
            problem,
        }
    })
}

/// A DNS label (`[a-z0-9-]`, alphanumeric at both ends), or with `dots` a DNS subdomain.
fn check_dns_name(name: &str, max: usize, dots: bool) -> Result<(), NameProblem> {
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if name.len() > max {
        return Err(NameProblem::TooLong {
            len: name.len(),
            max,
        });
    }
    if let Some((position, character)) = name.char_indices().find(|&(_, c)| {
        !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.'))
    }) {
        return Err(NameProblem::InvalidCharacter {
            character,
            position,
        });
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = name.as_bytes();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(NameProblem::BadEdge);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_builds_the_uri_and_accessors_return_the_parts() {
        let id = Identity::new("cluster.local", "default", "web-frontend").unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/web-frontend"
        );
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web-frontend");
        assert_eq!(id.as_str(), id.to_string());
    }

    #[test]
    fn the_longest_parts_keep_their_offsets_and_an_identity_stays_small() {
        let (td, ns, sa) = (
            "t".repeat(MAX_TRUST_DOMAIN_LEN),
            "n".repeat(MAX_NAMESPACE_LEN),
            "s".repeat(MAX_SERVICE_ACCOUNT_LEN),
        );
        let id = Identity::new(&td, &ns, &sa).unwrap();
        assert_eq!(id.as_str().len(), MAX_ID_LEN);
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            (td.as_str(), ns.as_str(), sa.as_str())
        );
        assert_eq!(Identity::parse(id.as_str()).unwrap(), id);
        // Every connection carries its source's and destination's: keep it at 24 bytes.
        assert_eq!(size_of::<Identity>(), 24);
    }

    #[test]
    fn parse_round_trips() {
        let text = "spiffe://td_1.example-org/ns/kube-system/sa/coredns.v2";
        let id: Identity = text.parse().unwrap();
        assert_eq!(id.trust_domain(), "td_1.example-org");
        assert_eq!(id.namespace(), "kube-system");
        assert_eq!(id.service_account(), "coredns.v2");
        assert_eq!(id.to_string(), text);
        assert_eq!(
            id,
            Identity::new("td_1.example-org", "kube-system", "coredns.v2").unwrap()
        );
    }

    #[test]
    fn equality_hash_and_order_follow_the_text() {
        use std::collections::HashSet;
        let a = Identity::new("td", "a", "x").unwrap();
        let b = Identity::new("td", "b", "x").unwrap();
        assert!(a < b);
        let set: HashSet<_> = [a.clone(), a.clone(), b.clone()].into_iter().collect();
        assert_eq!(set.len(), 2);
        assert_eq!(format!("{a:?}"), "Identity(\"spiffe://td/ns/a/sa/x\")");
    }

    #[test]
    fn parse_errors_are_precise() {
        assert_eq!(
            Identity::parse("http://td/ns/a/sa/b"),
            Err(IdentityError::MissingScheme {
                input: "http://td/ns/a/sa/b".into()
            })
        );
        assert_eq!(
            Identity::parse("spiffe:///ns/a/sa/b"),
            Err(IdentityError::EmptyTrustDomain)
        );
        assert_eq!(
            Identity::parse("spiffe://Cluster.local/ns/a/sa/b"),
            Err(IdentityError::InvalidTrustDomainCharacter {
                trust_domain: "Cluster.local".into(),
                character: 'C',
                position: 0
            })
        );
        for bad_path in [
            "spiffe://td",
            "spiffe://td/",
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa",
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/namespace/a/sa/b",
            "spiffe://td/ns/a/serviceaccount/b",
        ] {
            assert!(
                matches!(
                    Identity::parse(bad_path),
                    Err(IdentityError::UnexpectedPath { .. })
                ),
                "{bad_path}: {:?}",
                Identity::parse(bad_path)
            );
        }
        assert_eq!(
            Identity::parse("spiffe://td/ns//sa/b"),
            Err(IdentityError::InvalidNamespace {
                value: String::new(),
                problem: NameProblem::Empty
            })
        );
        assert_eq!(
            Identity::parse("spiffe://td/ns/a.b/sa/b"),
            Err(IdentityError::InvalidNamespace {
                value: "a.b".into(),
                problem: NameProblem::InvalidCharacter {
                    character: '.',
                    position: 1
                }
            })
        );
        assert_eq!(
            Identity::parse("spiffe://td/ns/a/sa/-b"),
            Err(IdentityError::InvalidServiceAccount {
                value: "-b".into(),
                problem: NameProblem::BadEdge
            })
        );
        assert_eq!(
            Identity::parse("spiffe://td/ns/a/sa/b?x=1"),
            Err(IdentityError::InvalidServiceAccount {
                value: "b?x=1".into(),
                problem: NameProblem::InvalidCharacter {
                    character: '?',
                    position: 1
                }
            })
        );
    }

    #[test]
    fn length_limits_are_enforced() {
        let long_ns = "a".repeat(MAX_NAMESPACE_LEN + 1);
        assert_eq!(
            Identity::new("td", &long_ns, "sa"),
            Err(IdentityError::InvalidNamespace {
                value: long_ns.clone(),
                problem: NameProblem::TooLong {
                    len: MAX_NAMESPACE_LEN + 1,
                    max: MAX_NAMESPACE_LEN
                }
            })
        );
        assert!(Identity::new("td", &long_ns[1..], "sa").is_ok());
        let long_td = "t".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert!(matches!(
            Identity::new(&long_td, "ns", "sa"),
            Err(IdentityError::TrustDomainTooLong { len, .. }) if len == MAX_TRUST_DOMAIN_LEN + 1
        ));
        assert!(matches!(
            Identity::new("td", "ns", &"s".repeat(MAX_SERVICE_ACCOUNT_LEN + 1)),
            Err(IdentityError::InvalidServiceAccount {
                problem: NameProblem::TooLong { .. },
                ..
            })
        ));
    }

    #[test]
    fn error_messages_name_the_offending_value() {
        let err = Identity::parse("spiffe://td/ns/Default/sa/b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "namespace \"Default\" is invalid: it contains 'D' at byte 0"
        );
    }
}
