//! The server's option negotiation; see `enbd_fuzz::handshake`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| enbd_fuzz::handshake::fuzz(data));
