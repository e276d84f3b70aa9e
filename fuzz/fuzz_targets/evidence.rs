#![no_main]
//! `veil_fuzz::evidence` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| veil_fuzz::evidence(data));
