//! Reading Kubernetes manifests for the deploy tests: every YAML document of a file, typed
//! with k8s-openapi so that a field the types do not know (a misspelling) fails the test
//! instead of being dropped. Included by `tests/deploy.rs` and `tests/deploy_standalone.rs`
//! with `#[path]`, without the rest of `support`.
#![allow(dead_code)]

use std::path::Path;

use serde::de::DeserializeOwned;

/// Every YAML document of `dir/file` as (kind, value).
pub fn docs_in(dir: &Path, file: &str) -> Vec<(String, serde_yaml_ng::Value)> {
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            let v = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(d)
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            let kind = v["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: no kind"))
                .to_string();
            (kind, v)
        })
        .filter(|(_, v)| !v.is_null())
        .collect()
}

/// Parses `v` as `T` and checks that nothing was dropped: a misspelt field would parse and
/// be silently ignored otherwise.
pub fn typed<T: DeserializeOwned + serde::Serialize>(file: &str, v: &serde_yaml_ng::Value) -> T {
    let t: T = serde_yaml_ng::from_value(v.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let original = serde_json::to_value(v).unwrap();
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(
        back, original,
        "{file}: fields lost in parsing (unknown or misspelt?)"
    );
    t
}

/// The one object of `kind` in `dir/file`, typed.
pub fn one_in<T: DeserializeOwned + serde::Serialize>(dir: &Path, file: &str, kind: &str) -> T {
    let all = docs_in(dir, file);
    let matching: Vec<_> = all.iter().filter(|(k, _)| k == kind).collect();
    assert_eq!(matching.len(), 1, "{file}: expected one {kind}");
    typed(file, &matching[0].1)
}
