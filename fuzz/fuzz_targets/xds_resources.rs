#![no_main]
//! See `weft::fuzzing::xds_resources`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzzing::xds_resources(data));
