//! YAML error messages for the two YAML inputs, the daemon config (`config`) and the mesh
//! file (`source::file`): both report the position their own way (`file:line:`), so the
//! message drops the deserializer's own position suffix.
//!
//! Owns nothing else; reads no file.

/// The message of a YAML error without the trailing ` at line N column M` (the line is
/// reported separately, as `file:line:`).
pub(crate) fn message(e: &serde_yaml_ng::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
