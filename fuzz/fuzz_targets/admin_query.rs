#![no_main]
//! See `weft::fuzzing::admin_query`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzzing::admin_query(data));
