//! Arbitrary bytes through a keyring's open path, next to values it really sealed: never a panic,
//! never plaintext for anything but the sealed values themselves.
#![no_main]

use std::sync::{Arc, OnceLock};

use envelope_core::{KeyMaterial, Keyring, Label, LocalKms, MemoryKeyStore};
use libfuzzer_sys::fuzz_target;

struct Setup {
    keyring: Keyring,
    label: Label,
    sealed: Vec<u8>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
        let keyring = Keyring::builder(kms, MemoryKeyStore::new())
            .build()
            .unwrap();
        let label = Label::new("fuzz.value").unwrap();
        let sealed = keyring.blocking().encrypt(&label, b"the one real value").unwrap();
        Setup { keyring, label, sealed }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    if let Ok(plaintext) = s.keyring.blocking().decrypt(&s.label, data) {
        assert_eq!(data, &s.sealed[..]);
        assert_eq!(plaintext, b"the one real value");
    }
});
