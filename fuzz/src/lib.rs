//! What the fuzz targets share: the fixtures of `fixtures/`, compiled in.
#![forbid(unsafe_code)]

use std::sync::LazyLock;

use weft::fuzzing::Fixtures;

/// The key set the targets check tokens against, and the key CA responses must certify.
pub static FIXTURES: LazyLock<Fixtures> = LazyLock::new(|| {
    match Fixtures::from_texts(
        include_str!("../fixtures/jwks.json"),
        include_str!("../fixtures/ca-leaf-key.pem"),
    ) {
        Ok(f) => f,
        Err(e) => panic!("fuzz/fixtures: {e}"),
    }
});
