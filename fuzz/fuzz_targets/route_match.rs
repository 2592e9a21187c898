#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_proxy::fuzzing::route_match(data));
