#![no_main]
//! `veil_fuzz::tee_evidence` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| veil_fuzz::tee_evidence(data));
