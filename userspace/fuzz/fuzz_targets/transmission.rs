//! The server's request loop; see `enbd_fuzz::transmission`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| enbd_fuzz::transmission::fuzz(data));
