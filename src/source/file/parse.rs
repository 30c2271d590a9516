//! The mesh file's entry point: [`parse_mesh`] runs the two reading passes ([`super::kinds`])
//! and the translation ([`super::translate`]), and collects every error and warning as
//! `file:line: message` ([`MeshError`]).
//!
//! Owns the result and error types and the parser's bookkeeping of errors and warnings (each
//! located through [`super::locate`]). It reads text and returns data or errors; it never
//! touches files, state or sockets (the watch and reload in [`super`] do).

use std::fmt;

use super::locate::{locate, Seg};
use crate::model::Mesh;
use crate::yaml::message as yaml_message;

/// One problem in a mesh file, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshError {
    /// The file's name as given by the caller.
    pub file: String,
    /// 1-based line (0 when the position is unknown).
    pub line: usize,
    /// What is wrong, naming the field.
    pub message: String,
}

impl fmt::Display for MeshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// Every error found in a mesh file; the file is rejected whole when there is any.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct MeshErrors(pub Vec<MeshError>);

impl fmt::Display for MeshErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A parsed mesh and the warnings met on the way (same `file:line: message` form).
#[derive(Clone, Debug)]
pub struct Parsed {
    /// The mesh.
    pub mesh: Mesh,
    /// Things skipped or worth a look; they do not reject the file.
    pub warnings: Vec<MeshError>,
}

/// Parses a mesh file's text. `file` is only used in messages.
pub fn parse_mesh(file: &str, text: &str) -> Result<Parsed, MeshErrors> {
    let mut p = Parser {
        file,
        text,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let objects = p.read_objects();
    if objects.is_empty() && p.errors.is_empty() {
        p.error_at(
            1,
            "the file holds no Kubernetes objects (empty or only comments); refusing to apply an \
             empty mesh"
                .into(),
        );
        return Err(MeshErrors(p.errors));
    }
    let mesh = p.translate(objects);
    if !p.errors.is_empty() {
        return Err(MeshErrors(p.errors));
    }
    Ok(Parsed {
        mesh,
        warnings: p.warnings,
    })
}

/// Where an object sits: document index and, inside a `List`, the item index.
#[derive(Clone, Copy, Debug)]
pub(super) struct Origin {
    pub(super) doc: usize,
    pub(super) item: Option<usize>,
}

/// One parse: the text, and the errors and warnings found so far.
pub(super) struct Parser<'a> {
    pub(super) file: &'a str,
    pub(super) text: &'a str,
    pub(super) errors: Vec<MeshError>,
    pub(super) warnings: Vec<MeshError>,
}

impl Parser<'_> {
    pub(super) fn error_at(&mut self, line: usize, message: String) {
        self.errors.push(MeshError {
            file: self.file.to_string(),
            line,
            message,
        });
    }

    pub(super) fn yaml_error(&mut self, e: &serde_yaml_ng::Error) {
        let line = e.location().map(|l| l.line()).unwrap_or(0);
        let message = yaml_message(e);
        self.error_at(line, message);
    }

    /// The line of `path` below the object at `origin`.
    pub(super) fn line_of(&self, origin: Origin, path: &[Seg<'_>]) -> usize {
        let mut full: Vec<Seg<'_>> = Vec::with_capacity(path.len() + 2);
        if let Some(i) = origin.item {
            full.push(Seg::Key("items"));
            full.push(Seg::Index(i));
        }
        full.extend_from_slice(path);
        locate(self.text, origin.doc, &full).unwrap_or(0)
    }

    pub(super) fn error_in(&mut self, origin: Origin, path: &[Seg<'_>], message: String) {
        let line = self.line_of(origin, path);
        self.error_at(line, message);
    }

    pub(super) fn warn_in(&mut self, origin: Origin, path: &[Seg<'_>], message: String) {
        let line = self.line_of(origin, path);
        self.warnings.push(MeshError {
            file: self.file.to_string(),
            line,
            message,
        });
    }
}

/// What the tests of the mesh file share: the kubectl List fixture and two helpers.
#[cfg(test)]
pub(super) mod fixtures {
    use super::parse_mesh;

    pub(in crate::source::file) const LIST: &str =
        include_str!("../../../tests/data/kubectl-list.yaml");

    pub(in crate::source::file) fn errors(text: &str) -> Vec<String> {
        match parse_mesh("mesh.yaml", text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// The 1-based line of the first line containing `needle`, searching from `after`.
    pub(in crate::source::file) fn line_of(text: &str, needle: &str, after: usize) -> usize {
        text.lines()
            .enumerate()
            .skip(after)
            .find(|(_, l)| l.contains(needle))
            .map(|(i, _)| i + 1)
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::errors;

    #[test]
    fn an_empty_file_is_refused() {
        for text in ["", "\n\n", "# only a comment\n", "---\n---\n"] {
            let e = errors(text);
            assert_eq!(e.len(), 1);
            assert!(e[0].contains("holds no Kubernetes objects"), "{e:?}");
        }
    }

    #[test]
    fn several_errors_are_all_reported() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\nspec: {containers: 1}\n";
        let e = errors(text);
        assert_eq!(e.len(), 2, "{e:?}");
    }
}
