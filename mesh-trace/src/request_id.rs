//! `x-request-id`: the id Envoy gives every request that comes without one (a random UUID,
//! version 4), kept when the request has one, so that the applications' logs, the proxies'
//! access logs and the spans of one request can be joined (Istio's access log writes it as
//! `request_id`, Envoy's spans as `guid:x-request-id`).

use std::fmt::Write as _;

use http::{header::Entry, HeaderMap, HeaderName, HeaderValue};

/// `x-request-id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A new random UUID (version 4, RFC 9562), as text.
pub fn new_request_id() -> String {
    // The version (4) and variant (10) bits over random ones.
    let bits = (fastrand::u128(..) & !(0xf_u128 << 76) & !(0x3_u128 << 62))
        | (0x4_u128 << 76)
        | (0x2_u128 << 62);
    let hex = format!("{bits:032x}");
    let mut id = String::with_capacity(36);
    for (i, part) in [
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..],
    ]
    .into_iter()
    .enumerate()
    {
        if i > 0 {
            id.push('-');
        }
        let _ = id.write_str(part);
    }
    id
}

/// The request's `x-request-id`, after giving it a new one when it had none (or an empty one).
pub fn ensure_request_id(headers: &mut HeaderMap) -> &HeaderValue {
    let fresh = || {
        // A UUID's text is always a valid header value; the fallback is never used.
        HeaderValue::from_str(&new_request_id())
            .unwrap_or_else(|_| HeaderValue::from_static("00000000-0000-4000-8000-000000000000"))
    };
    match headers.entry(X_REQUEST_ID) {
        Entry::Occupied(kept) if !kept.get().is_empty() => kept.into_mut(),
        Entry::Occupied(mut empty) => {
            empty.insert(fresh());
            empty.into_mut()
        }
        Entry::Vacant(none) => none.insert(fresh()),
    }
}

#[cfg(test)]
mod tests {
    use super::{ensure_request_id, new_request_id, X_REQUEST_ID};

    #[test]
    fn new_ids_are_version_4_uuids_and_differ() {
        let ids: Vec<String> = (0..1000).map(|_| new_request_id()).collect();
        for id in &ids {
            let parts: Vec<&str> = id.split('-').collect();
            let lengths: Vec<usize> = parts.iter().map(|p| p.len()).collect();
            assert_eq!(lengths, [8, 4, 4, 4, 12], "{id}");
            assert!(parts[2].starts_with('4'), "version 4: {id}");
            assert!(
                matches!(&parts[3][..1], "8" | "9" | "a" | "b"),
                "variant: {id}"
            );
            assert!(id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
        }
        let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }

    #[test]
    fn a_request_keeps_its_id_and_gets_one_when_it_has_none() {
        let mut headers = http::HeaderMap::new();
        headers.insert(X_REQUEST_ID, "abc-123".parse().unwrap());
        assert_eq!(ensure_request_id(&mut headers), "abc-123");
        let mut empty = http::HeaderMap::new();
        empty.insert(X_REQUEST_ID, "".parse().unwrap());
        let given = ensure_request_id(&mut empty).clone();
        assert_eq!(given.len(), 36);
        let mut none = http::HeaderMap::new();
        assert_eq!(ensure_request_id(&mut none).len(), 36);
        assert_eq!(none.get_all(X_REQUEST_ID).iter().count(), 1);
    }
}
