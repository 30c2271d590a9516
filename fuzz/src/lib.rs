//! What the fuzz targets share: the fixtures of `fixtures/`, compiled in.
#![forbid(unsafe_code)]

use std::sync::LazyLock;

use weft::fuzzing::Fixtures;

/// The key set and CA the targets check tokens and CA responses against.
pub static FIXTURES: LazyLock<Fixtures> = LazyLock::new(|| {
    match Fixtures::from_texts(
        include_str!("../fixtures/jwks.json"),
        include_str!("../fixtures/ca-leaf-key.pem"),
        include_str!("../fixtures/ca-root.pem"),
    ) {
        Ok(f) => f,
        Err(e) => panic!("fuzz/fixtures: {e}"),
    }
});
