#![no_main]
//! `veil_fuzz::signed_job` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| veil_fuzz::signed_job(data));
