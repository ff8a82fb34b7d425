//! Kubernetes' name rules (RFC 1123 labels and subdomains), checked on every name the model reads.

use std::sync::Arc;

use crate::{
    error::StateError,
    meta::{Kind, MetaExt, ObjectMeta, ObjectRef},
};

#[derive(Clone, Copy)]
pub(crate) enum NameRule {
    /// RFC 1123 label: namespaces, service names.
    Label,
    /// RFC 1123 subdomain: pod and service-account names.
    Subdomain,
}

/// RFC 1123 label: 1-63 lowercase letters, digits and '-', not at either end.
pub(crate) fn is_dns_label(value: &str) -> bool {
    value.len() <= 63 && is_label_part(value)
}

/// A label's characters (no length limit: a subdomain limits its total length only).
fn is_label_part(part: &str) -> bool {
    !part.is_empty()
        && part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !part.starts_with('-')
        && !part.ends_with('-')
}

/// Whether `entry` may stand in an Istio `exportTo`: `.`, `*` or a namespace name.
pub(crate) fn is_export_target(entry: &str) -> bool {
    entry == "." || entry == "*" || is_dns_label(entry)
}

/// RFC 1123 subdomain: dot-separated labels, 253 bytes at most.
pub(crate) fn is_dns_subdomain(value: &str) -> bool {
    value.len() <= 253 && value.split('.').all(is_label_part)
}

pub(crate) fn check_name(
    object: &ObjectRef,
    field: &str,
    value: &str,
    rule: NameRule,
) -> Result<(), StateError> {
    let (ok, expected) = match rule {
        NameRule::Label => (is_dns_label(value), "DNS label (RFC 1123)"),
        NameRule::Subdomain => (is_dns_subdomain(value), "DNS subdomain (RFC 1123)"),
    };
    if ok {
        Ok(())
    } else {
        Err(StateError::InvalidName {
            object: object.clone(),
            field: field.to_owned(),
            value: value.to_owned(),
            expected,
        })
    }
}

/// Checks a namespaced object's namespace (a label) and name (a subdomain).
pub(crate) fn check_namespaced(object: &ObjectRef, meta: &ObjectMeta) -> Result<(), StateError> {
    check_name(
        object,
        "metadata.namespace",
        meta.namespace(),
        NameRule::Label,
    )?;
    check_name(object, "metadata.name", meta.name(), NameRule::Subdomain)
}

/// The key of a policy object (`namespace/name`), once its names are checked.
pub(crate) fn policy_key(kind: Kind, meta: &ObjectMeta) -> Result<Arc<str>, StateError> {
    check_namespaced(&ObjectRef::namespaced(kind, meta), meta)?;
    Ok(format!("{}/{}", meta.namespace(), meta.name()).into())
}
