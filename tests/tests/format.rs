//! The value format through the public API: every single-bit flip is rejected, round trips hold
//! for arbitrary values and labels, and the parser never panics on arbitrary bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use envelope_core::{Error, Keyring, Label, format};
use envelope_tests::Fixture;
use proptest::prelude::*;

#[test]
fn every_single_bit_flip_is_rejected() {
    let fx = Fixture::new();
    let label = Label::new("users.ssn").unwrap();
    for plaintext in [&b""[..], b"078-05-1120", &[0xa5; 200][..]] {
        let blob = fx.keyring.blocking().encrypt(&label, plaintext).unwrap();
        let text = format::to_text(&blob);
        for bit in 0..blob.len() * 8 {
            let mut bad = blob.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            match fx.keyring.blocking().decrypt(&label, &bad) {
                Ok(_) => panic!(
                    "flipping bit {bit} of a {}-byte value went unnoticed",
                    blob.len()
                ),
                // Each flip is caught by the parser, the key lookup, or the tag; never a panic.
                Err(Error::Decrypt { .. } | Error::Format(_) | Error::UnknownKey { .. }) => {}
                Err(other) => panic!("bit {bit}: unexpected error {other}"),
            }
            // The same through the text form.
            let bad_text = format::to_text(&bad);
            assert!(open_text(&fx.keyring, &label, &bad_text).is_err());
        }
        assert_eq!(open_text(&fx.keyring, &label, &text).unwrap(), plaintext);
    }
}

#[test]
fn truncation_at_every_length_is_rejected() {
    let fx = Fixture::new();
    let label = Label::new("users.ssn").unwrap();
    let blob = fx
        .keyring
        .blocking()
        .encrypt(&label, b"078-05-1120")
        .unwrap();
    for len in 0..blob.len() {
        let err = fx
            .keyring
            .blocking()
            .decrypt(&label, &blob[..len])
            .unwrap_err();
        assert!(matches!(err, Error::Format(_)), "length {len}: {err}");
    }
}

/// A text-form value opened the way the text column types open it.
fn open_text(keyring: &Keyring, label: &Label, text: &str) -> Result<Vec<u8>, Error> {
    keyring.blocking().decrypt(label, &format::from_text(text)?)
}

fn arb_label() -> impl Strategy<Value = Label> {
    "[!-~]{1,255}".prop_map(|s| Label::new(s).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn round_trips(plaintext in proptest::collection::vec(any::<u8>(), 0..2048), label in arb_label()) {
        thread_local! { static FX: Fixture = Fixture::new(); }
        FX.with(|fx| {
            let blob = fx.keyring.blocking().encrypt(&label, &plaintext).unwrap();
            prop_assert_eq!(blob.len(), format::sealed_len(plaintext.len()));
            prop_assert!(blob.len() - plaintext.len() <= 48 || plaintext.len() >= 16384);
            prop_assert_eq!(fx.keyring.blocking().decrypt(&label, &blob).unwrap(), plaintext.clone());
            let text = fx.keyring.blocking().encrypt(&label, &plaintext).map(|b| format::to_text(&b)).unwrap();
            prop_assert_eq!(open_text(&fx.keyring, &label, &text).unwrap(), plaintext.clone());
            Ok(())
        })?;
    }

    #[test]
    fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        if let Ok(env) = format::parse(&bytes) {
            // Whatever parses is exactly one well-formed value.
            prop_assert_eq!(format::sealed_len(env.ciphertext_len()), bytes.len());
        }
        let text = String::from_utf8_lossy(&bytes);
        let _ = format::from_text(&text);
    }

    #[test]
    fn other_labels_never_open(plaintext in proptest::collection::vec(any::<u8>(), 0..64), a in arb_label(), b in arb_label()) {
        prop_assume!(a != b);
        thread_local! { static FX: Fixture = Fixture::new(); }
        FX.with(|fx| {
            let blob = fx.keyring.blocking().encrypt(&a, &plaintext).unwrap();
            let opened = fx.keyring.blocking().decrypt(&b, &blob);
            prop_assert!(matches!(opened, Err(Error::Decrypt { .. })), "{:?}", opened.map(|_| "opened"));
            Ok(())
        })?;
    }
}
