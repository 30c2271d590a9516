#![no_main]
//! See `weft::fuzzing::ca_response`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzzing::ca_response(data, &weft_fuzz::FIXTURES));
