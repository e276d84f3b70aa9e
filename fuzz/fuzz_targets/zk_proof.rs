#![no_main]
//! `veil_fuzz::zk_proof` under libFuzzer; the verifying key is built before the first input.

libfuzzer_sys::fuzz_target!(init: veil_fuzz::prepare(), |data: &[u8]| veil_fuzz::zk_proof(data));
