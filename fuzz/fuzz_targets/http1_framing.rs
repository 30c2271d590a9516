#![no_main]
//! See `weft::fuzzing::http1_framing`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzzing::http1_framing(data));
