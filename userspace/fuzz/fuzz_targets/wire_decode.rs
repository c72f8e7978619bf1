//! enbd-core's wire decoders, shared with the kernel; see `enbd_fuzz::wire_decode`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| enbd_fuzz::wire_decode::fuzz(data));
