//! Locating things in a mesh file's YAML after parsing: the line of a field below an object
//! ([`locate`], for errors found once the objects are read: duplicate pod IPs, an unparsable
//! pod IP, ...) and the line of a named object or of a field below it ([`locate_object`],
//! [`locate_field`], for the policy warnings of `weft check` and of a load). Each walks the document again to the field, which the deserializer then marks;
//! that costs a re-parse, but only on the error path.
//!
//! Owns the path walk. Knows no object kinds and never touches files, state or sockets.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

// === locating fields after parsing ===

pub(super) use crate::source::objects::Seg;

/// The deserializer's mark on the node a path names.
const LOCATED: &str = "\u{0}weft-located";
/// The mark on the deepest ancestor that exists, when the path goes further.
const MISSING: &str = "\u{0}weft-missing";

/// Walks to `path` inside document `doc` and makes the deserializer mark it: returns the
/// 1-based line of the node the path names (or of the deepest ancestor that exists).
pub(super) fn locate(text: &str, doc: usize, path: &[Seg<'_>]) -> Option<usize> {
    mark(text, doc, path, false)
}

/// [`locate`], but `None` when the node the path names does not exist.
fn locate_exact(text: &str, doc: usize, path: &[Seg<'_>]) -> Option<usize> {
    mark(text, doc, path, true)
}

fn mark(text: &str, doc: usize, path: &[Seg<'_>], exact: bool) -> Option<usize> {
    let de = serde_yaml_ng::Deserializer::from_str(text).nth(doc)?;
    let err = match (LocateSeed { path }).deserialize(de) {
        Ok(()) => return None,
        Err(e) => e,
    };
    let why = err.to_string();
    if why.contains(LOCATED) || (!exact && why.contains(MISSING)) {
        err.location().map(|l| l.line())
    } else {
        None
    }
}

/// The 1-based line of `metadata.name` of the object of `kind` named `namespace/name` (an
/// object without a namespace is in `default`), searching documents and `kind: List` items.
/// For messages about objects found after parsing, such as `weft check`'s policy warnings.
pub fn locate_object(text: &str, kind: &str, namespace: &str, name: &str) -> Option<usize> {
    locate_field(text, kind, namespace, name, "metadata.name")
}

/// The 1-based line of `field` of the object of `kind` named `namespace/name` (as
/// [`locate_object`] finds it). `field` is a path below the object: keys joined by `.`,
/// sequence indexes in brackets (`spec.rules[0].from[0].source.principals[1]`); `None` when
/// it is not such a path, or the object or its field is not in the text (an object in
/// `default` may not say `namespace:`).
pub fn locate_field(
    text: &str,
    kind: &str,
    namespace: &str,
    name: &str,
    field: &str,
) -> Option<usize> {
    #[derive(Deserialize)]
    struct Named {
        #[serde(default)]
        kind: Option<String>,
        #[serde(default)]
        metadata: Option<NamedMeta>,
        #[serde(default)]
        items: Option<Vec<Named>>,
    }
    #[derive(Deserialize)]
    struct NamedMeta {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
    }
    let field = field_path(field)?;
    let is = |o: &Named| {
        o.kind.as_deref() == Some(kind)
            && o.metadata.as_ref().is_some_and(|m| {
                m.name.as_deref() == Some(name)
                    && m.namespace
                        .as_deref()
                        .filter(|n| !n.is_empty())
                        .unwrap_or("default")
                        == namespace
            })
    };
    for (doc, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        // Stop at an error: after a syntax error the iterator would repeat it. Files that
        // `parse_mesh` accepted have none.
        let Ok(head) = Option::<Named>::deserialize(de) else {
            return None;
        };
        let Some(head) = head else { continue };
        let mut path: Vec<Seg<'_>> = if is(&head) {
            Vec::new()
        } else if let Some(i) = head.items.iter().flatten().position(is) {
            vec![Seg::Key("items"), Seg::Index(i)]
        } else {
            continue;
        };
        path.extend(field);
        return locate_exact(text, doc, &path);
    }
    None
}

/// `a.b[2].c` as path steps; `None` when it is not that shape.
fn field_path(field: &str) -> Option<Vec<Seg<'_>>> {
    let mut out = Vec::new();
    for part in field.split('.') {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if key.is_empty() {
            return None;
        }
        out.push(Seg::Key(key));
        while let Some(r) = rest.strip_prefix('[') {
            let (index, after) = r.split_once(']')?;
            out.push(Seg::Index(index.parse().ok()?));
            rest = after;
        }
        if !rest.is_empty() {
            return None;
        }
    }
    Some(out)
}

struct LocateSeed<'p, 'a> {
    path: &'p [Seg<'a>],
}

impl<'de> DeserializeSeed<'de> for LocateSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.path.first() {
            None => d.deserialize_any(Here),
            Some(Seg::Key(_)) => d.deserialize_map(self),
            Some(Seg::Index(_)) => d.deserialize_seq(self),
        }
    }
}

impl<'de> Visitor<'de> for LocateSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a path")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some(Seg::Key(want)) = self.path.first() else {
            return Err(serde::de::Error::custom(MISSING));
        };
        while let Some(key) = map.next_key::<AnyKey>()? {
            if key.0.as_deref() == Some(*want) {
                return map.next_value_seed(LocateSeed {
                    path: &self.path[1..],
                });
            }
            map.next_value::<IgnoredAny>()?;
        }
        // Not found: mark the mapping that should have had the key.
        Err(serde::de::Error::custom(MISSING))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some(Seg::Index(want)) = self.path.first() else {
            return Err(serde::de::Error::custom(MISSING));
        };
        for _ in 0..*want {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(serde::de::Error::custom(MISSING));
            }
        }
        match seq.next_element_seed(LocateSeed {
            path: &self.path[1..],
        })? {
            Some(()) => Ok(()),
            None => Err(serde::de::Error::custom(MISSING)),
        }
    }
}

/// A mapping key of any scalar type (`None` for non-string keys).
struct AnyKey(Option<String>);

impl<'de> Deserialize<'de> for AnyKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AnyKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AnyKey, E> {
                Ok(AnyKey(Some(v.to_string())))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<AnyKey, E> {
                Ok(AnyKey(None))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<AnyKey, E> {
                Ok(AnyKey(None))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<AnyKey, E> {
                Ok(AnyKey(None))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<AnyKey, E> {
                Ok(AnyKey(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Marks the node it is asked to deserialize.
struct Here;

impl<'de> Visitor<'de> for Here {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anything")
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(serde::de::Error::custom(LOCATED))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(serde::de::Error::custom(LOCATED))
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(LOCATED))
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(LOCATED))
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(LOCATED))
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(LOCATED))
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(LOCATED))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Err(E::custom(LOCATED))
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse::fixtures::{line_of, LIST};
    use super::*;

    #[test]
    fn objects_are_located_by_kind_namespace_and_name() {
        let at = line_of(LIST, "name: web-allow-frontend", 0);
        assert_eq!(
            locate_object(LIST, "AuthorizationPolicy", "shop", "web-allow-frontend"),
            Some(at)
        );
        assert_eq!(
            locate_object(LIST, "PeerAuthentication", "shop", "web-allow-frontend"),
            None
        );
        assert_eq!(
            locate_object(LIST, "AuthorizationPolicy", "other", "web-allow-frontend"),
            None
        );
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n";
        assert_eq!(
            locate_object(text, "AuthorizationPolicy", "default", "p"),
            Some(8)
        );
    }

    #[test]
    fn fields_below_an_object_are_located_and_missing_ones_are_not() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
                    kind: AuthorizationPolicy\n\
                    metadata:\n  name: p\n  namespace: shop\n\
                    spec:\n  rules:\n  - from:\n    - source:\n        principals:\n        - a\n        - b\n\
                    \x20 - to:\n    - operation: {methods: [POST]}\n";
        let at = |field: &str| locate_field(text, "AuthorizationPolicy", "shop", "p", field);
        assert_eq!(at("metadata.namespace"), Some(8));
        assert_eq!(at("spec.rules[0]"), Some(11));
        assert_eq!(at("spec.rules[0].from[0].source.principals[1]"), Some(15));
        assert_eq!(at("spec.rules[1]"), Some(16));
        assert_eq!(at("spec.rules[1].to[0].operation.methods[0]"), Some(17));
        // Past the end of what exists.
        assert_eq!(at("spec.rules[0].from[0].source.principals[7]"), None);
        assert_eq!(at("spec.selector"), None);
        assert_eq!(at("metadata.name.x"), None);
        assert_eq!(at("spec..rules"), None);
        assert_eq!(at("spec.rules[x]"), None);
        assert_eq!(
            locate_field(text, "AuthorizationPolicy", "shop", "q", "spec"),
            None
        );
    }
}
