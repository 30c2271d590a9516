#![no_main]
//! See `weft::fuzzing::mesh_yaml`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzzing::mesh_yaml(data));
