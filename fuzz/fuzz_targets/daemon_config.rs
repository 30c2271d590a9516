#![no_main]
//! See `weft::fuzzing::daemon_config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzzing::daemon_config(data));
