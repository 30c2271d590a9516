//! Replays the inputs kept for the fuzz targets through the same entry points the fuzzer
//! calls (`weft::fuzzing`), so a parser fixed after a fuzzing find stays fixed without the
//! fuzzer: every file of `fuzz/regressions/<target>/` (inputs that once found a bug) and of
//! `fuzz/corpus/<target>/` (the seeds). `scripts/fuzz` runs the fuzzer itself.

use std::path::{Path, PathBuf};

use weft::fuzzing::{Fixtures, TARGETS};

fn fixtures(root: &Path) -> Fixtures {
    let read = |name: &str| std::fs::read_to_string(root.join("fuzz/fixtures").join(name)).unwrap();
    Fixtures::from_texts(&read("jwks.json"), &read("ca-leaf-key.pem")).unwrap()
}

/// `(target, file)` for every file under `fuzz/<kind>/<target>/`.
fn inputs(root: &Path, kind: &str) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(root.join("fuzz").join(kind)) else {
        return out;
    };
    for dir in dirs {
        let dir = dir.unwrap();
        let target = dir.file_name().to_string_lossy().into_owned();
        for file in std::fs::read_dir(dir.path()).unwrap() {
            out.push((target.clone(), file.unwrap().path()));
        }
    }
    out.sort();
    out
}

#[test]
fn every_kept_fuzz_input_runs_through_its_parser_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = fixtures(root);
    let mut failures = Vec::new();
    let mut count = 0;
    for kind in ["regressions", "corpus"] {
        for (target, file) in inputs(root, kind) {
            assert!(
                TARGETS.contains(&target.as_str()),
                "fuzz/{kind}/{target}: no such target; targets: {TARGETS:?}"
            );
            let bytes = std::fs::read(&file).unwrap();
            count += 1;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                weft::fuzzing::run(&target, &bytes, &fixtures)
            }));
            if outcome.is_err() {
                failures.push(file.display().to_string());
            }
        }
    }
    assert!(
        count > 0,
        "no fuzz inputs found under {}",
        root.join("fuzz").display()
    );
    assert!(failures.is_empty(), "panicked on: {failures:#?}");
}

#[test]
fn the_ca_fixture_chain_is_accepted_so_the_ca_target_reaches_every_check() {
    // The CA seeds only lead the fuzzer past the key and identity checks if the fixtures
    // still make a chain weft accepts.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = fixtures(root);
    let seed = std::fs::read(root.join("fuzz/corpus/ca_response/leaf-root")).unwrap();
    assert!(weft::fuzzing::ca_response_accepted(&seed, &fixtures));
}
