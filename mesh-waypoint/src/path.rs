//! A request's path, normalized before anything reads it (policy, routes) and sent on so. This
//! is Istio's `MERGE_SLASHES`: its default `BASE` (Envoy's `normalize_path`: RFC 3986, with
//! percent-encoded unreserved characters decoded, other escapes in upper case, `.` and `..`
//! segments removed, and backslashes made slashes), then runs of slashes merged into one.
//! Istio recommends `MERGE_SLASHES` against CVE-2021-31920; its default, `BASE`, lets
//! `//admin` past a DENY on `/admin` to a server that merges slashes itself. Without
//! normalization, `/./admin`, `/x/../admin`, `/%61dmin` or `/\admin` would pass it the same way.
//! `%2F` stays encoded (Istio's `DECODE_AND_MERGE_SLASHES`, which may break applications, is
//! not taken), and a path with `%00` is refused, as Istio refuses it.

use std::borrow::Cow;

use http::{uri::PathAndQuery, Uri};

/// The normalized form of `path` (no query); `None` for a path Istio refuses (`%00`).
pub(crate) fn normalize(path: &str) -> Option<Cow<'_, str>> {
    if path
        .as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0')
    {
        return None;
    }
    let decoded = decode_unreserved(path);
    let slashed = if decoded.contains('\\') {
        Cow::Owned(decoded.replace('\\', "/"))
    } else {
        decoded
    };
    let dotted = if has_dot_segment(&slashed) {
        Cow::Owned(remove_dot_segments(&slashed))
    } else {
        slashed
    };
    Some(if dotted.contains("//") {
        Cow::Owned(merge_slashes(&dotted))
    } else {
        dotted
    })
}

/// Rewrites `uri`'s path to its normalized form; `false` when the path is refused or the result
/// is not a valid URI (the request then gets 400).
pub(crate) fn normalize_uri(uri: &mut Uri) -> bool {
    let normalized = match normalize(uri.path()) {
        None => return false,
        Some(Cow::Borrowed(_)) => return true,
        Some(Cow::Owned(path)) => path,
    };
    let with_query = match uri.query() {
        Some(query) => format!("{normalized}?{query}"),
        None => normalized,
    };
    let Ok(path_and_query) = PathAndQuery::try_from(with_query) else {
        return false;
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(path_and_query);
    match Uri::from_parts(parts) {
        Ok(new) => {
            *uri = new;
            true
        }
        Err(_) => false,
    }
}

/// `path` with each run of slashes made one.
fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c != '/' || !out.ends_with('/') {
            out.push(c);
        }
    }
    out
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

fn hex(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Decodes `%XX` of unreserved characters and upper-cases the others' hex digits; anything else
/// (a `%` without two hex digits) is kept.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some((hex(bytes[i + 1])?, hex(bytes[i + 2])?)))
            .flatten();
        match escape {
            Some((high, low)) if is_unreserved(high * 16 + low) => {
                out.push(char::from(high * 16 + low));
                i += 3;
            }
            Some(_) => {
                out.push('%');
                out.push(char::from(bytes[i + 1]).to_ascii_uppercase());
                out.push(char::from(bytes[i + 2]).to_ascii_uppercase());
                i += 3;
            }
            None => {
                // Copy up to the next `%` (a UTF-8 sequence stays whole).
                let next = path[i + 1..].find('%').map_or(bytes.len(), |n| i + 1 + n);
                out.push_str(&path[i..next]);
                i = next;
            }
        }
    }
    if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    }
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/')
        .any(|segment| segment == "." || segment == "..")
}

/// RFC 3986, 5.2.4, on an absolute path: `.` segments dropped, `..` removes the segment before
/// it (never above the root); a path ending in `.` or `..` keeps its trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (index, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {}
            ".." => {
                out.pop();
            }
            other => out.push(other),
        }
        if index == last && (*segment == "." || *segment == "..") {
            out.push("");
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_as_rfc_3986() {
        for (raw, normalized) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/./admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/a/./b/../c/", "/a/c/"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/%61dmin", "/admin"),
            ("/%2e%2E/admin", "/admin"),
            ("/x/%2e%2e/admin", "/admin"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb/../c", "/c"),
            ("//admin", "/admin"),
            ("/a//b///c", "/a/b/c"),
            ("/a//../b", "/a/b"),
            ("/\\admin", "/admin"),
            ("/a\\..\\admin", "/admin"),
            ("/a%", "/a%"),
            ("/a%4", "/a%4"),
            ("/a%zz", "/a%zz"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/..a/b..", "/..a/b.."),
        ] {
            assert_eq!(normalize(raw).as_deref(), Some(normalized), "{raw}");
        }
        for refused in ["/a%00", "/%00/b", "/a/%00?x"] {
            assert_eq!(normalize(refused), None, "{refused}");
        }
        assert!(matches!(normalize("/plain/path"), Some(Cow::Borrowed(_))));
    }

    #[test]
    fn the_uri_keeps_its_query_and_authority() {
        let mut uri: Uri = "http://web:80/x/../admin?a=/../b".parse().unwrap();
        assert!(normalize_uri(&mut uri));
        assert_eq!(uri.to_string(), "http://web:80/admin?a=/../b");
        let mut uri: Uri = "/%61?q".parse().unwrap();
        assert!(normalize_uri(&mut uri));
        assert_eq!(uri.to_string(), "/a?q");
        let mut uri: Uri = "/a%00b".parse().unwrap();
        assert!(!normalize_uri(&mut uri), "refused");
    }
}
