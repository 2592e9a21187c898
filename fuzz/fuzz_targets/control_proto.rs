#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_proxy::fuzzing::control_proto(data));
