#![no_main]
//! `veil_fuzz::ee_key` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| veil_fuzz::ee_key(data));
