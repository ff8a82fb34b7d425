//! A path of an `AuthorizationPolicy` operation (`paths`, `notPaths`), as Istio reads it:
//! `*` (any path), `prefix*`, `*suffix`, an exact path, or a path template with `{*}` (one
//! segment) and `{**}` (the rest). Parsed, and so checked, when the policy is read; matched by
//! the waypoint against a request's normalized path without its query.
//!
//! Template rules (Istio's): the path starts with `/`; a segment with an operator is exactly
//! `{*}` or `{**}`; `{**}` is the last operator; no `*`, `{` or `}` anywhere else. `{*}` matches
//! one non-empty segment; `{**}` one or more segments, which may be empty (`/foo/{**}/`
//! matches `/foo//` and `/foo/a/b/`, not `/foo/a`).

use std::{fmt, str::FromStr};

use crate::string_match::StringMatch;

/// Why a path is not a valid pattern.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathPatternError {
    #[error("empty value not allowed")]
    Empty,
    #[error(
        "{path:?} is not a valid path template: {problem} (`{{*}}` matches one segment, \
         `{{**}}` the rest; a segment with one holds nothing else)"
    )]
    Template { path: String, problem: &'static str },
}

/// A segment of a path template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Matches itself.
    Literal(String),
    /// `{*}`: one non-empty segment.
    One,
}

/// A parsed path pattern; displayed as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathPattern {
    /// Exact, `prefix*`, `*suffix` or `*` (any path).
    Plain(StringMatch),
    /// A template: the segments before `{**}` (all of them without one), and the literal
    /// segments after it.
    Template {
        written: String,
        head: Vec<Segment>,
        rest: Option<Vec<String>>,
    },
}

impl FromStr for PathPattern {
    type Err = PathPatternError;

    fn from_str(path: &str) -> Result<Self, Self::Err> {
        if path.is_empty() {
            return Err(PathPatternError::Empty);
        }
        if !path.contains(['{', '}']) {
            return Ok(PathPattern::Plain(StringMatch::new(path)));
        }
        let invalid = |problem| PathPatternError::Template {
            path: path.to_owned(),
            problem,
        };
        if !path.starts_with('/') {
            return Err(invalid("it must start with `/`"));
        }
        let mut head = Vec::new();
        let mut rest: Option<Vec<String>> = None;
        for segment in path.split('/') {
            match segment {
                "{**}" if rest.is_some() => return Err(invalid("`{**}` appears twice")),
                "{**}" => rest = Some(Vec::new()),
                "{*}" if rest.is_some() => return Err(invalid("`{**}` must be the last operator")),
                "{*}" => head.push(Segment::One),
                literal if literal.contains(['*', '{', '}']) => {
                    return Err(invalid(
                        "`*`, `{` or `}` outside an operator, or an operator sharing its segment",
                    ))
                }
                literal => match &mut rest {
                    Some(rest) => rest.push(literal.to_owned()),
                    None => head.push(Segment::Literal(literal.to_owned())),
                },
            }
        }
        Ok(PathPattern::Template {
            written: path.to_owned(),
            head,
            rest,
        })
    }
}

impl PathPattern {
    /// Whether `path` (normalized, without its query) matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Plain(pattern) => pattern.matches(path),
            PathPattern::Template { head, rest, .. } => {
                let segments: Vec<&str> = path.split('/').collect();
                let fits = |pattern: &Segment, segment: &&str| match pattern {
                    Segment::Literal(literal) => literal == segment,
                    Segment::One => !segment.is_empty(),
                };
                match rest {
                    None => {
                        segments.len() == head.len()
                            && head.iter().zip(&segments).all(|(p, s)| fits(p, s))
                    }
                    Some(tail) => {
                        // `{**}` takes at least one segment between the head and the tail.
                        segments.len() > head.len() + tail.len()
                            && head.iter().zip(&segments).all(|(p, s)| fits(p, s))
                            && tail
                                .iter()
                                .rev()
                                .zip(segments.iter().rev())
                                .all(|(p, s)| p == s)
                    }
                }
            }
        }
    }
}

impl fmt::Display for PathPattern {
    /// The pattern as written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Plain(pattern) => pattern.fmt(f),
            PathPattern::Template { written, .. } => f.write_str(written),
        }
    }
}

impl serde::Serialize for PathPattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> PathPattern {
        text.parse().unwrap()
    }

    /// `written` parses, displays as written, matches each of `inside` and none of `outside`.
    fn assert_matches(written: &str, inside: &[&str], outside: &[&str]) {
        let p = pattern(written);
        assert_eq!(p.to_string(), written);
        for path in inside {
            assert!(p.matches(path), "{written} should match {path}");
        }
        for path in outside {
            assert!(!p.matches(path), "{written} should not match {path}");
        }
    }

    #[test]
    fn plain_patterns_are_istio_string_matches() {
        let table: &[(&str, &[&str], &[&str])] = &[
            ("*", &["/", "/a/b"], &[""]),
            ("/api/*", &["/api/", "/api/v1/x"], &["/api", "/apix"]),
            ("*.json", &["/a.json", "/b/c.json"], &["/a.jsonx"]),
            ("/admin", &["/admin"], &["/admin/", "/Admin", "/admin/x"]),
        ];
        for (written, inside, outside) in table {
            assert_matches(written, inside, outside);
        }
    }

    #[test]
    fn templates_match_by_segment() {
        let table: &[(&str, &[&str], &[&str])] = &[
            (
                "/foo/{*}",
                &["/foo/bar"],
                &["/foo/bar/baz", "/foo/", "/foo"],
            ),
            (
                "/foo/{*}/bar/{**}",
                &["/foo/buzz/bar/", "/foo/buzz/bar/baz", "/foo/b/bar/x/y"],
                &["/foo/buzz/bar", "/foo//bar/x", "/foo/a/b/bar/x"],
            ),
            (
                "/foo/{**}/",
                &["/foo//", "/foo/bar/", "/foo/a/b/"],
                &["/foo/bar", "/foo/"],
            ),
            (
                "/foo/{**}",
                &["/foo/a", "/foo/a/b", "/foo/"],
                &["/foo", "/bar/a"],
            ),
            (
                "/{*}/items/{*}",
                &["/shop/items/7"],
                &["/shop/items", "/shop/items/7/x", "/shop/item/7"],
            ),
        ];
        for (written, inside, outside) in table {
            assert!(
                matches!(pattern(written), PathPattern::Template { .. }),
                "{written}"
            );
            assert_matches(written, inside, outside);
        }
    }

    #[test]
    fn invalid_templates_are_refused_with_the_reason() {
        for (written, problem) in [
            ("/*/baz/{*}", "outside an operator"),
            ("/**/baz/{*}", "outside an operator"),
            ("/{**}/foo/{*}", "must be the last operator"),
            ("/{**}/{**}", "appears twice"),
            ("/foo/{*}.txt", "sharing its segment"),
            ("/foo/{bar}", "outside an operator"),
            ("foo/{*}", "must start with `/`"),
            ("/foo/{*", "outside an operator"),
        ] {
            let error = written.parse::<PathPattern>().unwrap_err().to_string();
            assert!(error.contains(problem), "{written}: {error}");
            assert!(error.contains(written), "{written}: {error}");
        }
        assert_eq!("".parse::<PathPattern>(), Err(PathPatternError::Empty));
    }
}
