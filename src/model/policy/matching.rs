//! The patterns rules match request attributes with: Istio's [`StringMatch`] (exact, prefix,
//! suffix, presence) and, for paths, [`PathMatch`], which is a string match or an Envoy URI
//! [`PathTemplate`].
//!
//! Owns: parsing, printing and matching these patterns. Does not own: which attribute a
//! pattern is tested against (`authz`), other scalars (`scalar`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::scalar::Parse;

/// An Istio string match: exact, prefix (`abc*`), suffix (`*abc`) or presence (`*`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StringMatch {
    /// Equal to the value.
    Exact(String),
    /// Starts with the value (written `value*`).
    Prefix(String),
    /// Ends with the value (written `*value`).
    Suffix(String),
    /// Any non-empty value (written `*`).
    Any,
}

impl StringMatch {
    /// Tests a value against the pattern.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Any => !value.is_empty(),
        }
    }
}

impl FromStr for StringMatch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "*" {
            return Ok(StringMatch::Any);
        }
        let m = if let Some(p) = s.strip_suffix('*') {
            StringMatch::Prefix(p.to_string())
        } else if let Some(x) = s.strip_prefix('*') {
            StringMatch::Suffix(x.to_string())
        } else {
            StringMatch::Exact(s.to_string())
        };
        let inner = match &m {
            StringMatch::Exact(v) | StringMatch::Prefix(v) | StringMatch::Suffix(v) => v,
            StringMatch::Any => "",
        };
        if inner.contains('*') {
            return Err(format!(
                "invalid match {s:?}: '*' is only allowed at the start or the end"
            ));
        }
        if s.is_empty() {
            return Err("empty match value".to_string());
        }
        Ok(m)
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(s) => f.write_str(s),
            StringMatch::Prefix(s) => write!(f, "{s}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Any => f.write_str("*"),
        }
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Parse::<StringMatch>::new("a match string"))
    }
}

impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A `paths`/`notPaths` entry: an Istio string match, or a path template when it contains
/// the `{*}` or `{**}` operator (as Istio decides).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PathMatch {
    /// Exact, prefix (`/api/*`), suffix (`*.png`) or presence (`*`).
    String(StringMatch),
    /// A path template such as `/api/{*}/items/{**}`.
    Template(PathTemplate),
}

impl PathMatch {
    /// Tests a (normalized, query-less) path.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::String(m) => m.matches(path),
            PathMatch::Template(t) => t.matches(path),
        }
    }
}

impl FromStr for PathMatch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains("{*}") || s.contains("{**}") {
            s.parse().map(PathMatch::Template)
        } else {
            s.parse().map(PathMatch::String)
        }
    }
}

impl fmt::Display for PathMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathMatch::String(m) => m.fmt(f),
            PathMatch::Template(t) => f.write_str(&t.text),
        }
    }
}

impl<'de> Deserialize<'de> for PathMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Parse::<PathMatch>::new("a path match"))
    }
}

impl Serialize for PathMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An Istio path template, which istiod hands to Envoy's URI template matcher
/// (`envoy.path.match.uri_template`): `/` then `/`-separated segments, each
///
/// - `{*}`: one segment, one or more path characters and no `/` (Envoy's `[pchar]+`);
/// - `{**}`: zero or more path characters *including* `/` (Envoy's `[pchar/]*`); it must be
///   the last operator (literal segments may follow);
/// - a literal of path characters, matched exactly.
///
/// Path characters are RFC 3986 `pchar` less `*` and `=` (Envoy's `kLiteral`):
/// `A-Z a-z 0-9 - . _ ~ % ! $ & ' ( ) + , ; : @`. Istio's validation refuses `*`, `{`, `}` outside
/// an operator and any other character in a segment that holds an operator (`/a/{*}.txt`).
/// A trailing `/` is a literal: `/foo/{**}/` needs the path to end in `/`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PathTemplate {
    text: String,
    /// `/`-joined pieces, adjacent literals merged (the separators are literals).
    pieces: Vec<TemplatePiece>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum TemplatePiece {
    Literal(String),
    /// `{*}`.
    Segment,
    /// `{**}`.
    Segments,
}

/// Envoy's `kLiteral`: the characters a template literal (and a glob) may hold.
fn is_template_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@".contains(&b)
}

impl PathTemplate {
    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Tests a (normalized, query-less) path against the whole template.
    pub fn matches(&self, path: &str) -> bool {
        fn go(pieces: &[TemplatePiece], s: &[u8]) -> bool {
            let Some((first, rest)) = pieces.split_first() else {
                return s.is_empty();
            };
            match first {
                TemplatePiece::Literal(l) => s.starts_with(l.as_bytes()) && go(rest, &s[l.len()..]),
                TemplatePiece::Segment => {
                    let run = s.iter().take_while(|&&b| is_template_char(b)).count();
                    (1..=run).rev().any(|k| go(rest, &s[k..]))
                }
                TemplatePiece::Segments => {
                    let run = s
                        .iter()
                        .take_while(|&&b| b == b'/' || is_template_char(b))
                        .count();
                    (0..=run).rev().any(|k| go(rest, &s[k..]))
                }
            }
        }
        go(&self.pieces, path.as_bytes())
    }
}

impl FromStr for PathTemplate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| Err(format!("invalid path template {s:?}: {why}"));
        let Some(rest) = s.strip_prefix('/') else {
            return bad("it must start with '/'");
        };
        let mut pieces = Vec::new();
        let mut literal = String::from("/");
        let mut seen_segments = false;
        let segments: Vec<&str> = rest.split('/').collect();
        for (i, seg) in segments.iter().enumerate() {
            if i > 0 {
                literal.push('/');
            }
            let op =
                match *seg {
                    "{*}" => Some(TemplatePiece::Segment),
                    "{**}" => Some(TemplatePiece::Segments),
                    "" if i + 1 == segments.len() => None,
                    "" => return bad("empty segment"),
                    lit if lit.bytes().all(is_template_char) => {
                        literal.push_str(lit);
                        None
                    }
                    _ => return bad(
                        "a segment is either {*}, {**} or a literal without '*', '{', '}', '=', \
                         '/' or characters outside RFC 3986 pchar",
                    ),
                };
            if let Some(op) = op {
                if seen_segments {
                    return bad("{**} must be the last operator");
                }
                seen_segments = op == TemplatePiece::Segments;
                if !literal.is_empty() {
                    pieces.push(TemplatePiece::Literal(std::mem::take(&mut literal)));
                }
                pieces.push(op);
            }
        }
        if !literal.is_empty() {
            pieces.push(TemplatePiece::Literal(literal));
        }
        Ok(PathTemplate {
            text: s.to_string(),
            pieces,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_matches_follow_istio_wildcards() {
        let m = |p: &str| p.parse::<StringMatch>().unwrap();
        assert!(m("abc").matches("abc") && !m("abc").matches("abcd"));
        assert!(m("abc*").matches("abcd") && !m("abc*").matches("xabc"));
        assert!(m("*abc").matches("xabc") && !m("*abc").matches("abcx"));
        assert!(m("*").matches("x") && !m("*").matches(""));
        assert!("a*b".parse::<StringMatch>().is_err());
        assert!("".parse::<StringMatch>().is_err());
    }

    #[test]
    fn path_templates_follow_envoy_uri_templates() {
        let t = |p: &str| p.parse::<PathMatch>().unwrap();
        assert!(matches!(
            t("/api/*"),
            PathMatch::String(StringMatch::Prefix(_))
        ));
        assert!(matches!(t("/foo/{*}"), PathMatch::Template(_)));
        // The examples of Istio's `Operation.paths` documentation.
        assert!(t("/foo/{*}").matches("/foo/bar"));
        assert!(!t("/foo/{*}").matches("/foo/bar/baz"));
        assert!(t("/foo/{**}/").matches("/foo/bar/"));
        assert!(t("/foo/{**}/").matches("/foo//"));
        assert!(!t("/foo/{**}/").matches("/foo/bar"));
        assert!(t("/foo/{*}/bar/{**}").matches("/foo/buzz/bar/"));
        assert!(t("/foo/{*}/bar/{**}").matches("/foo/buzz/bar/baz"));
        // `{*}` needs one or more path characters; `=` is not one (Envoy's `kLiteral`).
        assert!(!t("/foo/{*}").matches("/foo/"));
        assert!(!t("/foo/{*}").matches("/foo/a=b"));
        assert!(t("/foo/{*}").matches("/foo/a%2Fb"));
        assert!(t("/{**}").matches("/"));
        assert!(t("/a/{**}/z").matches("/a/b/c/z"));
        assert_eq!(t("/a/{*}/b").to_string(), "/a/{*}/b");
        for bad in [
            "/*/baz/{*}",
            "/**/baz/{*}",
            "/{**}/foo/{*}",
            "/foo/{*}.txt",
            "foo/{*}",
            "/a//{*}",
        ] {
            assert!(bad.parse::<PathMatch>().is_err(), "{bad}");
        }
    }
}
