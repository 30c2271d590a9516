#![no_main]
//! See `weft::fuzzing::jwt_token`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzzing::jwt_token(data, &weft_fuzz::FIXTURES));
