#![no_main]
//! `veil_fuzz::run_record` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| veil_fuzz::run_record(data));
