#![no_main]
//! See `weft::fuzzing::hbone_connect`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzzing::hbone_connect(data));
