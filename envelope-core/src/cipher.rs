//! AES-256-GCM sealing and opening of v1 values, and the local KMS's key wrapping. The only
//! module that touches the AEAD implementation (aws-lc-rs: see BENCHMARKS.md for why).

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::format::{self, Envelope, NONCE_LEN, TAG_LEN};
use crate::keys::{KeyId, KeyMaterial, Label};
use crate::nonce;

/// Expand a 32-byte key into an AES-256-GCM context. aws-lc allocates the context with
/// `OPENSSL_malloc`, and `OPENSSL_free` wipes it, so the key schedule is zeroized on drop.
fn aead_key(material: &[u8]) -> Result<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, material)
        .map(LessSafeKey::new)
        .map_err(|_| {
            Error::System(crate::error::SystemError::Crypto(
                "AES-256-GCM refused a 32-byte key",
            ))
        })
}

/// An opened data key: the initialized cipher (key schedule already expanded) and its id.
/// The raw key bytes are never kept.
pub(crate) struct DataCipher {
    id: KeyId,
    aead: LessSafeKey,
}

impl DataCipher {
    /// # Errors
    /// [`SystemError::Crypto`](crate::SystemError::Crypto) if the AES implementation refuses the key, which only a broken build
    /// can cause.
    pub(crate) fn new(id: KeyId, material: &KeyMaterial) -> Result<Self> {
        Ok(DataCipher {
            id,
            aead: aead_key(material.expose())?,
        })
    }

    pub(crate) fn id(&self) -> KeyId {
        self.id
    }

    /// Seal with a fresh nonce from [`nonce::fill`]: unpredictable, never shared with a forked
    /// process, and at our per-key volumes unique. (The keyring draws the nonce itself, to check
    /// which process it runs in.)
    #[cfg(test)]
    pub(crate) fn seal(&self, label: &Label, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        nonce::fill(&mut nonce)?;
        self.seal_with_nonce(label, &nonce, plaintext)
    }

    /// Seal with a caller-chosen nonce: one from [`nonce::fill`], or a test vector's.
    pub(crate) fn seal_with_nonce(
        &self,
        label: &Label,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        if plaintext.len() > format::MAX_PLAINTEXT_LEN {
            return Err(Error::Misuse(crate::error::Misuse::PlaintextTooLarge {
                len: plaintext.len(),
                max: format::MAX_PLAINTEXT_LEN,
            }));
        }
        // One allocation of the exact final size: no reallocation copies plaintext around.
        let mut out = Vec::with_capacity(format::sealed_len(plaintext.len()));
        format::write_header(&mut out, &self.id, nonce);
        format::write_length(&mut out, plaintext.len());
        let body = out.len();
        out.extend_from_slice(plaintext);
        let (header, buffer) = out.split_at_mut(body);
        let sealed = format::with_aad(header, label, |aad| {
            self.aead.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                buffer,
            )
        });
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(out)
            }
            Err(_) => {
                // Only possible past GCM's 2^36-byte limit, far above MAX_PLAINTEXT_LEN.
                out.zeroize();
                Err(Error::System(crate::error::SystemError::Crypto(
                    "AES-256-GCM refused to seal a value",
                )))
            }
        }
    }

    /// Open a parsed value. The caller has checked that the value's key id is this key's.
    pub(crate) fn open(&self, envelope: &Envelope<'_>, label: &Label) -> Result<Vec<u8>> {
        debug_assert_eq!(envelope.key_id(), self.id);
        let nonce = Nonce::try_assume_unique_for_key(envelope.nonce())
            .map_err(|_| Error::Decrypt { key_id: self.id })?;
        // Decrypt straight from the stored bytes into the output: one pass, one allocation.
        let mut out = vec![0u8; envelope.ciphertext().len()];
        let result = format::with_aad(envelope.header(), label, |aad| {
            self.aead.open_separate_gather(
                nonce,
                Aad::from(aad),
                envelope.ciphertext(),
                envelope.tag(),
                &mut out,
            )
        });
        match result {
            Ok(()) => Ok(out),
            Err(_) => {
                out.zeroize();
                Err(Error::Decrypt { key_id: self.id })
            }
        }
    }
}

/// A key-wrapping cipher for the local KMS: AES-256-GCM over a 32-byte key.
///
/// Wrapped form: `0x01 || nonce (12) || ciphertext (32) || tag (16)`, 61 bytes.
///
/// It keeps the master key bytes (zeroized on drop) and expands them per call: wrapping runs once
/// per data key, so the ~100 ns of key setup is noise, and construction cannot fail.
pub(crate) struct WrapCipher(Zeroizing<Box<[u8]>>);

impl WrapCipher {
    pub(crate) const WRAPPED_LEN: usize = 1 + NONCE_LEN + KeyMaterial::LEN + TAG_LEN;

    pub(crate) fn new(master: &KeyMaterial) -> Self {
        WrapCipher(Zeroizing::new(Box::from(&master.expose()[..])))
    }

    /// # Errors
    /// When the OS random number generator fails, or (never for 32 bytes) GCM refuses the input.
    pub(crate) fn wrap(&self, aad: &[u8], key: &KeyMaterial) -> Result<Vec<u8>> {
        let aead = aead_key(&self.0[..])?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce::fill(&mut nonce)?;
        let mut out = Vec::with_capacity(Self::WRAPPED_LEN);
        out.push(1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(key.expose());
        let tag = aead.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[1 + NONCE_LEN..],
        );
        match tag {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(out)
            }
            Err(_) => {
                // Never leave plaintext key bytes behind.
                out.zeroize();
                Err(Error::System(crate::error::SystemError::Crypto(
                    "AES-256-GCM refused to wrap a key",
                )))
            }
        }
    }

    /// `None` when the bytes are not a wrapped key of this cipher under this AAD.
    pub(crate) fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Option<KeyMaterial> {
        if wrapped.len() != Self::WRAPPED_LEN || wrapped[0] != 1 {
            return None;
        }
        let aead = aead_key(&self.0[..]).ok()?;
        let nonce = Nonce::try_assume_unique_for_key(&wrapped[1..1 + NONCE_LEN]).ok()?;
        let (ciphertext, tag) = wrapped[1 + NONCE_LEN..].split_at(KeyMaterial::LEN);
        let mut key = Zeroizing::new([0u8; KeyMaterial::LEN]);
        aead.open_separate_gather(nonce, Aad::from(aad), ciphertext, tag, &mut key[..])
            .ok()?;
        KeyMaterial::from_slice(&key[..]).ok()
    }
}

impl fmt::Debug for DataCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataCipher")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(byte: u8) -> DataCipher {
        DataCipher::new(
            KeyId::from_bytes([byte; 16]),
            &KeyMaterial::from_slice(&[byte; 32]).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn seal_open_round_trip() {
        let c = cipher(1);
        let label = Label::new("users.ssn").unwrap();
        for pt in [&b""[..], b"x", &[7u8; 4096][..]] {
            let blob = c.seal(&label, pt).unwrap();
            assert_eq!(blob.len(), format::sealed_len(pt.len()));
            let env = format::parse(&blob).unwrap();
            assert_eq!(c.open(&env, &label).unwrap(), pt);
        }
    }

    #[test]
    fn nonces_differ() {
        let c = cipher(1);
        let label = Label::new("t.c").unwrap();
        let a = c.seal(&label, b"same").unwrap();
        let b = c.seal(&label, b"same").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn wrong_label_or_key_fails_opaquely() {
        let c = cipher(1);
        let blob = c
            .seal(&Label::new("users.ssn").unwrap(), b"secret")
            .unwrap();
        let env = format::parse(&blob).unwrap();
        assert!(matches!(
            c.open(&env, &Label::new("users.email").unwrap()),
            Err(Error::Decrypt { .. })
        ));
        let other = DataCipher::new(c.id(), &KeyMaterial::from_slice(&[2; 32]).unwrap()).unwrap();
        assert!(matches!(
            other.open(&env, &Label::new("users.ssn").unwrap()),
            Err(Error::Decrypt { .. })
        ));
    }

    #[test]
    fn debug_shows_only_the_id() {
        let dbg = format!("{:?}", cipher(3));
        assert!(dbg.contains("DataCipher"));
        assert!(!dbg.contains("aead"));
    }
}
