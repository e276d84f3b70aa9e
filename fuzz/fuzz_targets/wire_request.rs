#![no_main]
//! `veil_fuzz::wire_request` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| veil_fuzz::wire_request(data));
