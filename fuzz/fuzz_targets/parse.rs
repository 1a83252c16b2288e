//! Arbitrary bytes through the binary and text parsers: never a panic, and whatever parses is
//! exactly one well-formed value whose length matches its header.
#![no_main]

use envelope_core::format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = format::parse(data) {
        assert_eq!(format::sealed_len(env.ciphertext_len()), data.len());
        assert_eq!(format::peek_key_id(data).ok(), Some(env.key_id()));
        // Text form round trip of a parsed value.
        let text = format::to_text(data);
        assert_eq!(format::from_text(&text).ok().as_deref(), Some(data));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(bytes) = format::from_text(text) {
            assert_eq!(format::to_text(&bytes), text);
        }
    }
});
