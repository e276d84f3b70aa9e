#![no_main]
//! `veil_fuzz::gguf_header` under libFuzzer.

libfuzzer_sys::fuzz_target!(|data: &[u8]| veil_fuzz::gguf_header(data));
