#![no_main]
//! See `weft::fuzzing::jwks`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzzing::jwks(data));
