#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_agent::fuzz_targets::cni_stdin(data));
