#![no_main]
//! See `weft::fuzzing::path_normalize`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzzing::path_normalize(data));
